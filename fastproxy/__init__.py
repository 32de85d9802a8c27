"""fastproxy: an ingress router for real-time AI inference on Kubernetes.

Theory of operation: see DESIGN.md-derived README. The data plane lives here (snapshot,
slot table, HTTP exchange, router); shared state and its single writer live in ``statesync``;
eBPF probes live in ``probes``.
"""

__version__ = "0.1.0"

from fastproxy.compiled import install_pure_finder as _install_pure_finder
from fastproxy.compiled import pure_requested as _pure_requested
from fastproxy.compiled import stale as _stale

if _pure_requested():  # FASTPROXY_PURE=1: the interpreted source, even where compiled modules exist
    _install_pure_finder()
elif _stale_modules := _stale():
    import warnings as _warnings

    _warnings.warn(
        f"compiled {', '.join(_stale_modules)} built from other source than is here: running the pure "
        "form (run `make compiled` to rebuild)",
        RuntimeWarning,
        stacklevel=1,
    )
    _install_pure_finder()
