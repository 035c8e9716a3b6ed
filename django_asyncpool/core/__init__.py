"""The core under every pool: what the pools share, written once. It imports no pool.

registry (each alias's state, every pool by kind), guard (breaker and retries),
breaker_redis (breaker state shared through Redis), checkout (the counted checkout),
liveness and hangups (when a connection is checked), waiters (the fair FIFO), loops
(loop shutdown, greenlet sleep), stats (counters and the snapshot), process (the one
fork hook and exit hook). Private to the package: import only from inside it.
"""
