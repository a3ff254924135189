"""Benchmarks: the product against its anchors on the same machine and workload."""
