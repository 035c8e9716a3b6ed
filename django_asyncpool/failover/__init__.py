"""Read failover: where a read of a replica alias goes while its breaker is open."""
