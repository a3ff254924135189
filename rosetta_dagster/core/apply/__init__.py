"""Applying change events to destination PostgreSQL databases (no Dagster import)."""
