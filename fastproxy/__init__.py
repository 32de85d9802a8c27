"""fastproxy: an ingress router for real-time AI inference on Kubernetes.

Theory of operation: see DESIGN.md-derived README. The data plane lives here (snapshot,
slot table, HTTP exchange, router); shared state and its single writer live in ``statesync``;
eBPF probes live in ``probes``.
"""

__version__ = "0.1.0"
