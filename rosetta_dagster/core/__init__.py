"""Pure-Python cores of Rosetta. Nothing in this package imports Dagster."""
