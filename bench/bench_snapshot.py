"""Routing-state benchmarks: pick a pod, apply a one-pod delta, memory per pod.

Targets (issue 2): pick <= 1 us and one-pod delta apply <= 10 us, both flat from 1k to 100k pods
over 1k revisions (100k/1k median ratio <= 1.5). ``make bench`` prints the ratios
(bench/report.py). Each benchmark checks the result is right before it times anything.
"""

from __future__ import annotations

import gc
import tracemalloc

import msgspec
import pytest

from bench.conftest import REVISIONS, make_pods, make_routes
from fastproxy.slots import SlotTable
from fastproxy.snapshot import RoutingSnapshot
from statesync.schema import Delta, PodState

SCALES = [1_000, 10_000, 50_000, 100_000]


class RoutingState:
    """A snapshot and its slot table, as a router holds them."""

    def __init__(self, n_pods: int) -> None:
        self.pods = make_pods(n_pods)
        self.snapshot = RoutingSnapshot.build(1, 1, self.pods, make_routes())
        self.slots = SlotTable(seed=7)
        self.slots.replace_all(self.pods)
        self.slots.materialize_pending(n_pods)  # (a router that has served every revision)


_states: dict[int, RoutingState] = {}


def routing_state(n_pods: int) -> RoutingState:
    if n_pods not in _states:
        _states.clear()  # keep one scale in memory at a time
        gc.collect()
        _states[n_pods] = RoutingState(n_pods)
    return _states[n_pods]


@pytest.mark.benchmark(group="pick")
@pytest.mark.parametrize("n_pods", SCALES)
def bench_pick(benchmark, n_pods: int) -> None:
    """One pick plus its release: the whole slot-table cost a request pays (so pick alone is less)."""
    state = routing_state(n_pods)
    revision = state.pods[n_pods // 2].revision
    lease = state.slots.pick(revision)
    assert lease is not None and lease[1].revision == revision and lease[1].state is PodState.READY
    lease[0]()
    pick = state.slots.pick

    def pick_and_release() -> None:
        lease = pick(revision)
        lease[0]()  # type: ignore[index]

    benchmark(pick_and_release)
    assert all(p.inflight == 0 for p in state.slots.revisions[revision].members.values())


@pytest.mark.benchmark(group="delta-apply")
@pytest.mark.parametrize("n_pods", SCALES)
def bench_one_pod_delta_apply(benchmark, n_pods: int) -> None:
    """A router applying one published delta: new snapshot + slot-table reconcile."""
    state = routing_state(n_pods)
    target = state.pods[n_pods // 3]
    flip = {
        PodState.READY: PodState.NOT_READY,
        PodState.NOT_READY: PodState.READY,
    }

    def next_delta():
        current = state.snapshot.pods[target.uid]
        changed = msgspec.structs.replace(
            current, state=flip[current.state], generation=current.generation + 1
        )
        return (Delta(epoch=1, version=state.snapshot.version + 1, pods=(changed,)),), {}

    def apply(delta: Delta) -> None:
        state.snapshot = state.snapshot.apply(delta)
        state.slots.update(delta.pods)

    (first,), _ = next_delta()
    apply(first)
    assert state.snapshot.pods[target.uid].state is PodState.NOT_READY
    assert not state.slots.pods[target.uid].routable
    benchmark.pedantic(apply, setup=next_delta, rounds=5_000, warmup_rounds=50)
    assert len(state.snapshot.pods) == n_pods


@pytest.mark.benchmark(group="memory")
@pytest.mark.parametrize("n_pods", [10_000])
def bench_memory_per_pod(benchmark, n_pods: int) -> None:
    """Bytes per pod of the snapshot (records + maps) and of the slot table, by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    pods = make_pods(n_pods)
    after_records = tracemalloc.get_traced_memory()[0]
    snapshot = RoutingSnapshot.build(1, 1, pods, make_routes())
    after_snapshot = tracemalloc.get_traced_memory()[0]
    slots = SlotTable()
    slots.replace_all(pods)
    slots.materialize_pending(n_pods)
    after_slots = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(snapshot.pods) == n_pods and len(slots.pods) == n_pods
    per_pod = {
        "records_bytes_per_pod": after_records / n_pods,
        "snapshot_maps_bytes_per_pod": (after_snapshot - after_records) / n_pods,
        "slot_table_bytes_per_pod": (after_slots - after_snapshot) / n_pods,
        "revisions": REVISIONS,
    }
    benchmark.extra_info.update(per_pod)
    print("\nmemory per pod:", {k: round(v) for k, v in per_pod.items()})
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.benchmark(group="pick-only")
@pytest.mark.parametrize("n_pods", SCALES)
def bench_pick_only_per_100(benchmark, n_pods: int) -> None:
    """100 picks, one in each of 100 revisions, per round (releases happen untimed in setup):
    the round's time / 100 is the cost of one pick without the release."""
    state = routing_state(n_pods)
    revisions = sorted(state.slots.revisions)[:: max(1, len(state.slots.revisions) // 100)][:100]
    pick = state.slots.pick
    held: list = []

    def release_all():
        while held:
            held.pop()[0]()
        return (), {}

    def hundred_picks() -> None:
        append = held.append
        for revision in revisions:
            append(pick(revision))

    hundred_picks()
    assert all(lease is not None for lease in held) and len(held) == len(revisions) == 100
    release_all()
    benchmark.pedantic(hundred_picks, setup=release_all, rounds=2000, warmup_rounds=20)
    release_all()
    benchmark.extra_info["per_pick_ns"] = (
        benchmark.stats.stats.median / 100 * 1e9 if benchmark.stats else None
    )
