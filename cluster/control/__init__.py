"""The control plane, above router and worker: the Ray pool, the launcher, the client and CLI, ``radixserve top``,
Prometheus discovery and helpers, and the cluster simulator."""
