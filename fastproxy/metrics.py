"""Router statistics: plain counters on the hot path, Prometheus text at scrape time.

Theory of operation
-------------------
The data path only increments ints in dicts and bumps histograms; it never touches metric
objects, whose label lookups cost microseconds. A custom collector turns these
plain numbers, plus what the slot table and snapshot know (queue depth, in-flight per revision,
snapshot version and age, WebSocket sessions per revision from ``router.tunnels``), into
Prometheus metric families when /metrics is scraped (``fastproxy.exposition``'s, which render the
text prometheus_client would, without the 4.7 MB prometheus_client costs a router to import).

The added-latency histogram (``LatencyHistogram``) has geometric buckets, each one's upper edge 5%
above its lower one, from 10 us to 10 s (284 buckets, plus one under 10 us and one over the top).
``observe`` finds the bucket with one binary search of the edges (``bisect``, in C: nine float
comparisons, exact at the edges) and bumps an int in a list made at start: no container allocated. Quantiles interpolate inside their bucket (geometrically), so
the dashboard, ``/v1/state`` and ``fastproxy status`` show figures within 5%, not bucket edges.
The Prometheus exposition keeps every other edge (10.25% apart: 143 edges, 144 ``le`` lines with
+Inf), the resolution ``histogram_quantile``'s linear in-bucket interpolation needs to stay within
~5%, at half the series; the exact p50/p90/p99 are exported beside it as gauges.

Affinity waits (a prefix route's request waiting for its busy affine pods, ``fastproxy.proxy``'s
``_wait_affine``) are four histograms of the time waited, one per way a wait ends: their counts
are the waits. Only a request that waits observes one (``fastproxy_affinity_waits`` and
``fastproxy_affinity_wait_seconds``, labelled ``outcome``).

The module is compiled with the data path (``fastproxy.compiled``; types in ``metrics.pxd``): the
compiled ``Exchange`` bumps ``RouterStats``' counters as C fields and calls ``observe`` as a C call.
"""

from __future__ import annotations

import bisect
import math
import time
from bisect import bisect_right as _bisect_right
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fastproxy.exposition import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    MetricFamily,
)

if TYPE_CHECKING:
    from fastproxy.router import Router

# Seconds. Added latency is tens of microseconds when healthy, seconds when something is wrong.
LATENCY_LOW = 10e-6
LATENCY_HIGH = 10.0
LATENCY_GROWTH = 1.05  # each bucket's upper edge / its lower edge: the resolution
LATENCY_EXPORT_STRIDE = 2  # /metrics keeps every 2nd edge (growth 1.1025)
QUANTILES = (0.5, 0.9, 0.99)
QUEUE_WAIT_BOUNDS = (1e-3, 5e-3, 10e-3, 50e-3, 100e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0)
# Affinity waits (a route's affinity_wait_ms, up to 10 s): a wait pays only when shorter than the
# prefill a cache hit saves, tens to hundreds of ms, so the buckets are finest there.
AFFINITY_WAIT_BOUNDS = (1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 200e-3, 500e-3, 1.0, 2.0, 5.0, 10.0)
# How an affinity wait ended (the ``outcome`` label), in RouterStats' order: handed a slot of one
# of its affine pods; expired, then took another free pod; expired with no pod free, then the
# revision's FIFO (or its refusal when full); the client left (or the request failed) meanwhile.
AFFINITY_WAIT_OUTCOMES = ("affine", "other_pod", "queue", "abandoned")


class Histogram:
    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        total = 0
        out = []
        for bound, count in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile q (for status displays)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for bound, count in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return float("inf")


class LatencyHistogram:
    """Geometric buckets, 5% apart from 10 us to 10 s; bucket 0 holds values under 10 us and the
    last one values above the top edge (which is the first edge at or above 10 s)."""

    __slots__ = ("_last", "bounds", "buckets", "count", "sum")

    def __init__(
        self, low: float = LATENCY_LOW, high: float = LATENCY_HIGH, growth: float = LATENCY_GROWTH
    ) -> None:
        if not (0 < low < high and growth > 1):
            raise ValueError(f"histogram needs 0 < low < high and growth > 1, got {low}, {high}, {growth}")
        steps = math.ceil(math.log(high / low) / math.log(growth) - 1e-9)
        # bounds[i] is the upper edge of bucket i; the bucket past the last bound is the overflow.
        self.bounds = tuple(low * growth**i for i in range(steps + 1))
        self.buckets = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self._last = len(self.bounds)

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        # Bucket i covers [bounds[i-1], bounds[i]): the number of edges at or below the value. Under
        # the lowest edge (0.0, a negative clock difference) is bucket 0, over the top one the last.
        index = _bisect_right(self.bounds, value)
        self.buckets[index] += 1

    def merge(self, other: LatencyHistogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different buckets")
        self.count += other.count
        self.sum += other.sum
        buckets = self.buckets
        for i, n in enumerate(other.buckets):
            buckets[i] += n

    def cumulative(self, stride: int = 1) -> list[tuple[str, int]]:
        """(le, cumulative count) for every ``stride``-th edge (the top one always), then +Inf."""
        out = []
        total = 0
        last = len(self.bounds) - 1
        for i, bound in enumerate(self.bounds):
            total += self.buckets[i]
            if i % stride == 0 or i == last:
                out.append((repr(bound), total))
        out.append(("+Inf", total + self.buckets[-1]))
        return out

    def quantile(self, q: float) -> float:
        """The q-quantile in seconds, interpolated inside its bucket (within 5% between 10 us and
        10 s); 0.0 when empty; values above the top edge report the top edge."""
        if not self.count:
            return 0.0
        rank = min(max(q, 0.0), 1.0) * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                if i == 0:  # [0, low): below the promised range, linear
                    return self.bounds[0] * max(rank - seen, 0.0) / n
                if i == self._last:
                    return self.bounds[-1]
                lower, upper = self.bounds[i - 1], self.bounds[i]
                return lower * (upper / lower) ** (max(rank - seen, 0.0) / n)
            seen += n
        return self.bounds[-1]


def merged_quantiles(hists: list[LatencyHistogram], qs: tuple[float, ...] = QUANTILES) -> list[float]:
    """Quantiles over several routers' histograms (the dev dashboard's view), in seconds."""
    merged = LatencyHistogram()
    for hist in hists:
        merged.merge(hist)
    return [merged.quantile(q) for q in qs]


class RouterStats:
    __slots__ = (
        "added_latency",
        "affinity_wait_abandoned",
        "affinity_wait_affine",
        "affinity_wait_other_pod",
        "affinity_wait_queue",
        "busy_refusals",
        "client_aborts",
        "errors",
        "local_exclusions",
        "queue_rejections",
        "queue_wait",
        "rechecks",
        "requests",
        "responses",
        "retries",
        "started",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.responses: dict[int, int] = {}
        self.errors: dict[str, int] = {}  # by reason class (timeout, reset, bad_request, bug...)
        self.retries: dict[str, int] = {}  # by failure kind
        self.local_exclusions = 0
        self.rechecks: dict[str, int] = {}  # re-check connects of excluded pods, by result
        self.busy_refusals = 0
        self.client_aborts = 0
        self.queue_rejections = 0
        self.added_latency = LatencyHistogram()
        self.queue_wait = Histogram(QUEUE_WAIT_BOUNDS)
        # Affinity waits by how they ended (AFFINITY_WAIT_OUTCOMES), each a histogram of the time
        # waited: its count is the number of such waits. Only a request that waits touches them.
        self.affinity_wait_affine = Histogram(AFFINITY_WAIT_BOUNDS)
        self.affinity_wait_other_pod = Histogram(AFFINITY_WAIT_BOUNDS)
        self.affinity_wait_queue = Histogram(AFFINITY_WAIT_BOUNDS)
        self.affinity_wait_abandoned = Histogram(AFFINITY_WAIT_BOUNDS)
        self.started = time.time()

    def affinity_waits(self) -> list[tuple[str, Histogram]]:
        """The affinity waits' histograms by outcome, in AFFINITY_WAIT_OUTCOMES' order."""
        return list(
            zip(
                AFFINITY_WAIT_OUTCOMES,
                (self.affinity_wait_affine, self.affinity_wait_other_pod, self.affinity_wait_queue,
                 self.affinity_wait_abandoned),
                strict=True,
            )
        )  # fmt: skip

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=hist.cumulative(), sum_value=hist.sum)


class RouterCollector:
    def __init__(self, router: Router, now: Callable[[], float] = time.time) -> None:
        self.router = router
        self.now = now

    def collect(self) -> Iterator[MetricFamily]:
        router = self.router
        stats = router.stats
        instance = router.config.instance
        yield CounterMetricFamily("fastproxy_requests", "Requests received", value=stats.requests)
        responses = CounterMetricFamily("fastproxy_responses", "Responses by status", labels=["status"])
        for status, count in sorted(stats.responses.items()):
            responses.add_metric([str(status)], count)
        yield responses
        errors = CounterMetricFamily("fastproxy_errors", "Failed requests by cause", labels=["cause"])
        for cause, count in sorted(stats.errors.items()):
            errors.add_metric([cause], count)
        yield errors
        retries = CounterMetricFamily("fastproxy_retries", "Re-picks by failure kind", labels=["kind"])
        for kind, count in sorted(stats.retries.items()):
            retries.add_metric([kind], count)
        yield retries
        yield CounterMetricFamily(
            "fastproxy_local_exclusions", "Pods excluded locally after a transport failure",
            value=stats.local_exclusions,
        )  # fmt: skip
        rechecks = CounterMetricFamily(
            "fastproxy_exclusion_rechecks", "TCP connects to excluded pods by result (ok lifts the exclusion)",
            labels=["result"],
        )  # fmt: skip
        for result, count in sorted(stats.rechecks.items()):
            rechecks.add_metric([result], count)
        yield rechecks
        yield CounterMetricFamily(
            "fastproxy_busy_refusals", "Sidecar busy refusals", value=stats.busy_refusals
        )
        yield CounterMetricFamily(
            "fastproxy_client_aborts", "Clients gone mid-request", value=stats.client_aborts
        )
        yield CounterMetricFamily(
            "fastproxy_queue_rejections",
            "Requests refused: queue full or deadline",
            value=stats.queue_rejections,
        )
        added = stats.added_latency
        yield HistogramMetricFamily(
            "fastproxy_added_latency_seconds",
            "Time spent in the router, queueing excluded (every other 5% bucket: edges 10.25% apart)",
            buckets=added.cumulative(LATENCY_EXPORT_STRIDE), sum_value=added.sum,
        )  # fmt: skip
        figures = GaugeMetricFamily(
            "fastproxy_added_latency_quantile_seconds",
            "Added latency quantiles since start, from the full-resolution histogram (within 5%)",
            labels=["quantile"],
        )  # fmt: skip
        for q in QUANTILES:
            figures.add_metric([str(q)], added.quantile(q))
        yield figures
        yield _histogram("fastproxy_queue_wait_seconds", "Time waited for a free slot", stats.queue_wait)
        yield from _affinity_wait_families(stats)
        inflight = GaugeMetricFamily(
            "fastproxy_inflight", "Requests in flight per revision", labels=["revision"]
        )
        queued = GaugeMetricFamily("fastproxy_queued", "Requests waiting per revision", labels=["revision"])
        demand = GaugeMetricFamily(
            "fastproxy_revision_demand", "In flight + queued per revision (the autoscaling signal)",
            labels=["revision"],
        )  # fmt: skip
        for name, revision in router.slots.revisions.items():
            busy = revision.inflight
            inflight.add_metric([name], busy)
            queued.add_metric([name], revision.queued)
            demand.add_metric([name], busy + revision.queued)
        yield inflight
        yield queued
        yield demand
        yield from self._websocket_families()
        snapshot = router.snapshot
        yield GaugeMetricFamily("fastproxy_snapshot_version", "Routing state version", value=snapshot.version)
        yield GaugeMetricFamily(
            "fastproxy_snapshot_epoch", "Routing state writer epoch", value=snapshot.epoch
        )
        yield GaugeMetricFamily(
            "fastproxy_snapshot_age_seconds", "Seconds since the routing state last changed",
            value=max(0.0, self.now() - router.snapshot_changed_at),
        )  # fmt: skip
        yield GaugeMetricFamily("fastproxy_snapshot_stale", "1 if the routing state may be out of date",
                                value=1 if router.stale else 0)  # fmt: skip
        yield GaugeMetricFamily("fastproxy_pods", "Pods in the routing state", value=len(snapshot.pods))
        up = GaugeMetricFamily("fastproxy_router_up", "1 while this router serves", labels=["instance"])
        up.add_metric([instance], 1)
        yield up
        yield from _gc_families()

    def _websocket_families(self) -> Iterator[MetricFamily]:
        tunnels = self.router.tunnels
        sessions = GaugeMetricFamily(
            "fastproxy_websocket_sessions", "Open WebSocket sessions per revision (each holds a pod slot)",
            labels=["revision"],
        )  # fmt: skip
        opened = CounterMetricFamily(
            "fastproxy_websocket_sessions_opened", "WebSocket sessions opened (pod answered 101)",
            labels=["revision"],
        )  # fmt: skip
        moved = CounterMetricFamily(
            "fastproxy_websocket_bytes", "Bytes relayed by WebSocket sessions, open ones included",
            labels=["revision", "direction"],
        )  # fmt: skip
        durations = HistogramMetricFamily(
            "fastproxy_websocket_session_seconds", "Durations of ended WebSocket sessions",
            labels=["revision"],
        )  # fmt: skip
        for name, stats in tunnels.items():
            sessions.add_metric([name], stats.open)
            opened.add_metric([name], stats.opened)
            inbound, outbound = tunnels.running_bytes(name)
            moved.add_metric([name, "client_to_pod"], inbound)
            moved.add_metric([name, "pod_to_client"], outbound)
            durations.add_metric([name], stats.durations.cumulative(), stats.durations.sum)
        yield sessions
        yield opened
        yield moved
        yield durations
        yield CounterMetricFamily(
            "fastproxy_websocket_idle_closes", "WebSocket sessions closed by the idle timeout",
            value=tunnels.idle_closes,
        )  # fmt: skip


def _affinity_wait_families(stats: RouterStats) -> Iterator[MetricFamily]:
    """The waits of prefix-route requests for their busy affine pods, by how each ended."""
    waits = CounterMetricFamily(
        "fastproxy_affinity_waits",
        "Requests that waited for a busy affine pod, by outcome (affine: handed its slot; other_pod: "
        "expired, took another free pod; queue: expired, no pod free; abandoned: client gone)",
        labels=["outcome"],
    )  # fmt: skip
    seconds = HistogramMetricFamily(
        "fastproxy_affinity_wait_seconds", "Time waited for a busy affine pod, by outcome", labels=["outcome"]
    )  # fmt: skip
    for outcome, hist in stats.affinity_waits():
        waits.add_metric([outcome], hist.count)
        seconds.add_metric([outcome], hist.cumulative(), hist.sum)
    yield waits
    yield seconds


def _gc_families() -> Iterator[MetricFamily]:
    """The cyclic collector's pauses (``fastproxy.gcwatch``), built with this module's families."""
    import gc

    from fastproxy.gcwatch import PAUSES  # (here: gcwatch builds on this module's Histogram)

    pauses = HistogramMetricFamily(
        "fastproxy_gc_pause_seconds",
        "Event-loop pauses of the cyclic garbage collector, by generation (2: a full collection)",
        labels=["generation"],
    )
    collected = CounterMetricFamily(
        "fastproxy_gc_collected_objects", "Objects the cyclic collector freed, by generation",
        labels=["generation"],
    )  # fmt: skip
    for generation, hist in enumerate(PAUSES.pauses):
        pauses.add_metric([str(generation)], hist.cumulative(), hist.sum)
        collected.add_metric([str(generation)], PAUSES.collected[generation])
    yield pauses
    yield collected
    yield GaugeMetricFamily(
        "fastproxy_gc_frozen_objects",
        "Objects moved out of the collector's sight (gc.freeze) after loading the routing state",
        value=gc.get_freeze_count(),
    )  # fmt: skip
