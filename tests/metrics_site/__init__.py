"""A tiny site for the multiprocess metrics test: two views that use each pool, and /metrics."""
