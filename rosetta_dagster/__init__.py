"""Rosetta: PostgreSQL change-data-capture pipelines orchestrated by Dagster."""
