"""Platform area: the config store and its connection pool."""
