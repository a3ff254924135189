"""Backfill jobs as partitions of a per-pipeline asset, launched by a sensor."""
