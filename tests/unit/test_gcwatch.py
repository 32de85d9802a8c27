"""The cyclic collector in a router: pauses on /metrics, and the freeze after a bulk load that
neither loses a delta nor keeps garbage beyond the next load."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Iterator

import msgspec
import pytest

from fastproxy import gcwatch
from fastproxy.config import RouterConfig
from fastproxy.exposition import render
from fastproxy.metrics import RouterCollector
from fastproxy.router import Router
from fastproxy.snapshot import RoutingSnapshot
from statesync.schema import Delta, PodRecord, PodState, Route, WeightedRevision

REVISIONS = 20


def pods(count: int, start: int = 0) -> list[PodRecord]:
    return [
        PodRecord(
            uid=f"pod-{i}",
            namespace="ml",
            revision=f"rev-{i % REVISIONS}",
            ip=f"127.3.{i // 250}.{i % 250 + 1}",
            port=8000,
            state=PodState.READY,
            ready=True,
        )
        for i in range(start, start + count)
    ]


ROUTES = [
    Route(service=f"svc-{r}", revisions=(WeightedRevision(revision=f"rev-{r}", weight=100),))
    for r in range(REVISIONS)
]


@pytest.fixture
def router() -> Iterator[Router]:
    loop = asyncio.new_event_loop()
    try:
        yield Router(RouterConfig(), loop)
    finally:
        loop.close()
        gc.unfreeze()  # (the next test starts with everything in the collector's sight again)


def sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def test_a_collection_moves_the_pause_metric_of_its_generation(router: Router) -> None:
    gcwatch.install()
    gcwatch.install()  # (idempotent: one callback, each collection counted once)
    assert gc.callbacks.count(gcwatch.PAUSES) == 1
    before = render(RouterCollector(router).collect()).decode()
    gc.collect(0)
    gc.collect()
    after = render(RouterCollector(router).collect()).decode()
    for generation in ("0", "2"):
        count = f'fastproxy_gc_pause_seconds_count{{generation="{generation}"}}'
        assert sample(after, count) >= sample(before, count) + 1, generation
        total = f'fastproxy_gc_pause_seconds_sum{{generation="{generation}"}}'
        assert sample(after, total) > sample(before, total), generation
    assert 'fastproxy_gc_pause_seconds_bucket{generation="2",le="+Inf"}' in after
    assert "fastproxy_gc_collected_objects_total" in after
    assert gcwatch.PAUSES.as_dict()["collections"][2] == sample(
        after, 'fastproxy_gc_pause_seconds_count{generation="2"}'
    )


class Cycle:
    """Stands for what a router drops in a cycle (an ended session and its protocol, say)."""

    __slots__ = ("__weakref__", "other")

    def __init__(self) -> None:
        self.other: Cycle | None = None


def test_frozen_cyclic_garbage_is_collected_at_the_next_settle() -> None:
    import weakref

    try:
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        gcwatch.settle()
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is not None  # frozen: no collection sees it, it waits ...
        assert gcwatch.settle() > 0
        assert gone() is None  # ... until the next load's settle, no longer
    finally:
        gc.unfreeze()


def test_pods_removed_after_a_freeze_are_freed_and_every_delta_applies_once(router: Router) -> None:
    router.install(RoutingSnapshot.build(1, 1, pods(2000), ROUTES))
    while router.slots.materialize_pending(1000):
        pass
    router.after_bulk_load("the test's state")
    frozen = gc.get_freeze_count()
    assert frozen >= 2000  # (the pods' PodSlots at least)
    removed = pods(500)
    for version, record in enumerate(removed, start=2):
        router.apply_delta(
            Delta(epoch=1, version=version, pods=(msgspec.structs.replace(record, state=PodState.REMOVED),))
        )
    assert router.snapshot.version == 501 and len(router.snapshot.pods) == 1500
    assert all(r.uid not in router.slots.pods for r in removed)
    # Each removed pod's PodSlots was freed by its reference count although frozen: no cycle
    # keeps a forgotten pod (unlinked from its level, out of its revision's members).
    assert gc.get_freeze_count() <= frozen - 500
    for revision in range(REVISIONS):
        assert router.slots.pick(f"rev-{revision}") is not None


def test_repeated_full_reads_keep_the_frozen_set_and_memory_bounded(router: Router) -> None:
    """Each round installs a whole state in which half the pods are new (a resync after churn),
    leaves some cyclic garbage behind, and settles: neither frozen objects nor memory grow."""
    frozen: list[int] = []
    traced: list[int] = []
    held: list[Cycle] = []  # cycles alive through one settle (so frozen), dropped in the next round
    tracemalloc.start()
    try:
        for round_ in range(8):
            start = round_ * 1000
            held.clear()
            router.install(RoutingSnapshot.build(1, round_ + 1, pods(2000, start), ROUTES))
            while router.slots.materialize_pending(1000):  # (what the warm-up does)
                pass
            for _ in range(500):
                a, b = Cycle(), Cycle()
                a.other, b.other = b, a
                held.append(a)
            del a, b
            router.after_bulk_load("a full read")
            frozen.append(gc.get_freeze_count())
            traced.append(tracemalloc.get_traced_memory()[0])
            assert len(router.slots.pods) == 2000 and f"pod-{start}" in router.slots.pods
    finally:
        tracemalloc.stop()
    assert max(frozen[2:]) <= frozen[1] * 1.02 + 50, frozen
    assert max(traced[2:]) <= traced[1] * 1.05 + 64 * 1024, traced


def test_settle_is_off_when_configured_off() -> None:
    loop = asyncio.new_event_loop()
    try:
        router = Router(RouterConfig(gc_freeze=False), loop)
        gc.unfreeze()
        router.install(RoutingSnapshot.build(1, 1, pods(100), ROUTES))
        router.after_bulk_load("the test's state")
        assert gc.get_freeze_count() == 0
    finally:
        loop.close()
