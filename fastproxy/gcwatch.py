"""The cyclic garbage collector in a router: what its pauses cost, seen on /metrics.

Theory of operation
-------------------
CPython's cyclic collector stops the event loop while it runs: a young-generation pass walks the
objects allocated since the last one (microseconds), a full pass walks every tracked container in
the process (at 50k pods, the slot table's ``PodSlots`` alone are 50k of them). Those pauses are
part of a request's added latency that no profile of the data path shows, so the router times
every collection and exports it: ``gc.callbacks`` calls ``CollectorPauses.__call__`` with
``"start"`` and ``"stop"`` around each collection; the pause (one ``perf_counter`` difference) goes
into a histogram per generation (``metrics.Histogram``: a bisect and three increments, no
allocation). A collection happens every ~700 net container allocations, far less often than a
request, so this costs a few hundred nanoseconds per collection and nothing per request.

``RouterCollector`` (``fastproxy.metrics``) turns these figures into the ``fastproxy_gc_*`` families.
The collector is process-wide, so is the watch: one ``PAUSES`` per process, ``install`` idempotent
(the router's ``serve`` installs it; tests and benchmarks may too).

What a router holds for long -- the snapshot, the slot table (``PodSlots`` are linked both ways,
so they are containers in cycles and stay tracked), routes, connections made at start -- is
loaded in bulk and then changes a few objects at a time. Measured at 50k pods (compiled, 87k
tracked containers): a full pass costs ~11 ms, and the 50k ``PodSlots`` a bootstrap's warm-up
creates sit in the young generations until one walks them (a 7.8 ms second-generation pass seen
under churn). So after each bulk load ``settle`` runs one full collection and freezes the
survivors: later passes walk only what was allocated since. Deltas barely allocate containers (a
router serving 2k req/s with 500 deltas/s ran 0-2 collections in 3 s), so this trims rare pauses,
not the per-delta cost.
"""

from __future__ import annotations

import gc
from time import perf_counter
from typing import Any

from fastproxy.metrics import Histogram

GENERATIONS = 3
# Seconds: a young pass is tens of microseconds, a full pass over 50k pods ~10 ms.
PAUSE_BOUNDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3)


class CollectorPauses:
    """Pause time and collected objects of every cyclic collection, by generation."""

    __slots__ = ("_started", "collected", "pauses")

    def __init__(self) -> None:
        self.pauses = [Histogram(PAUSE_BOUNDS) for _ in range(GENERATIONS)]
        self.collected = [0] * GENERATIONS  # objects found unreachable and freed, by generation
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = perf_counter()
            return
        generation = info["generation"]
        self.pauses[generation].observe(perf_counter() - self._started)
        self.collected[generation] += info["collected"]

    def counts(self) -> list[int]:
        return [hist.count for hist in self.pauses]

    def seconds(self) -> list[float]:
        return [hist.sum for hist in self.pauses]

    def as_dict(self) -> dict[str, Any]:
        """For /v1/state: collections, total pause seconds, objects freed, by generation."""
        return {
            "collections": self.counts(),
            "pause_seconds": self.seconds(),
            "collected": list(self.collected),
            "frozen": gc.get_freeze_count(),
        }


PAUSES = CollectorPauses()


def settle() -> int:
    """After a whole state was loaded: one full collection, then every surviving container frozen
    (``gc.freeze``: moved to the permanent generation, which no collection walks). Returns the
    frozen count. The previous freeze is lifted first, so what became cyclic garbage among the
    objects frozen last time (a replaced table, an ended session) is collected now: frozen garbage
    lives at most until the next load. Non-cyclic garbage never waits: reference counting frees a
    frozen object like any other (a removed pod's ``PodSlots``, a replaced snapshot's chunks)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def install() -> CollectorPauses:
    """Time every collection of this process from now on (once, however often it is called)."""
    if PAUSES not in gc.callbacks:
        gc.callbacks.append(PAUSES)
    return PAUSES
