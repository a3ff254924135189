"""The thin Dagster layer: resources, assets, jobs, sensors and checks wiring the cores."""
