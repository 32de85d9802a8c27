"""The added-latency histogram's ``observe`` (once per request): the 5% log buckets
(``LatencyHistogram``, one ``math.log``) against the 13 fixed bucket edges it replaced (one bisect).

Run: ``.venv/bin/python -m pytest bench/bench_metrics.py --benchmark-only``. Each round observes
the same 1000 latencies spread over 10 us .. 10 ms (what a router sees), so the figures are per
1000 calls; the two must be within noise of each other (issue 18: no measurable cost per request).
"""

from __future__ import annotations

import random
from typing import Any

from fastproxy.metrics import Histogram, LatencyHistogram

# The fixed edges main used before issue 18 (seconds): the baseline.
OLD_ADDED_LATENCY_BOUNDS = (
    25e-6, 50e-6, 75e-6, 100e-6, 150e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3,
)  # fmt: skip
_rng = random.Random(18)
SAMPLES = [10 ** _rng.uniform(-5, -2) for _ in range(1000)]


def _observe_all(observe: Any) -> None:
    for value in SAMPLES:
        observe(value)


def test_observe_before_fixed_buckets(benchmark: Any) -> None:
    hist = Histogram(OLD_ADDED_LATENCY_BOUNDS)
    benchmark(_observe_all, hist.observe)
    assert hist.count % len(SAMPLES) == 0 and hist.count > 0


def test_observe_after_log_buckets(benchmark: Any) -> None:
    hist = LatencyHistogram()
    benchmark(_observe_all, hist.observe)
    assert hist.count % len(SAMPLES) == 0 and sum(hist.buckets) == hist.count
