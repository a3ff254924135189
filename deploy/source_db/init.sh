#!/bin/sh
# Runs once, on an empty data directory: the replication user and the demo table.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="$SOURCE_DB_PASSWORD" -v db="$POSTGRES_DB" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH LOGIN REPLICATION PASSWORD :'pw';
GRANT CREATE ON DATABASE :"db" TO replicator;
CREATE TABLE public.test_table (
    id         integer PRIMARY KEY,
    data       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.test_table (id, data) SELECT g, 'row ' || g FROM generate_series(1, 100) g;
-- Owned by replicator: creating a publication FOR TABLE needs table ownership.
ALTER TABLE public.test_table OWNER TO replicator;
SQL
