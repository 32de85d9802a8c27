"""eBPF probes for the node agent (tracepoints only)."""
