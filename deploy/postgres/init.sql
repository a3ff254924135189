-- Runs once, on an empty data directory, as the rosetta user (owner of config_db).
CREATE DATABASE dagster OWNER rosetta;
CREATE DATABASE warehouse OWNER rosetta;
