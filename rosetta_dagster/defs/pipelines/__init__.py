"""Pipelines area: one streaming job per pipeline declared in rosetta.yaml, and its assets."""
