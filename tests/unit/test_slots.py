"""SlotTable: picking by least in-flight, capacity, FIFO waiters, exclusion, reconciliation."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random

import pytest

from fastproxy.slots import PodIndex, PodSlots, QueueFull, RevisionSlots, SlotTable
from statesync.schema import PodRecord, PodState


def pod(uid: str, cc: int = 1, state: PodState = PodState.READY, gen: int = 1, rev: str = "r") -> PodRecord:
    return PodRecord(
        uid=uid,
        namespace="ml",
        revision=rev,
        ip="127.0.0.3",
        port=9000,
        concurrency=cc,
        state=state,
        generation=gen,
    )


def test_pick_least_inflight_and_never_over_capacity() -> None:
    table = SlotTable(seed=0)
    table.update([pod("a", 2), pod("b", 2), pod("c", 1)])
    leases = [table.pick("r") for _ in range(5)]
    assert all(lease is not None for lease in leases)
    counts = collections.Counter(lease[1].uid for lease in leases if lease)
    assert counts == {"a": 2, "b": 2, "c": 1}
    # the first three picks went one to each pod (least in flight first)
    assert {lease[1].uid for lease in leases[:3] if lease} == {"a", "b", "c"}
    assert table.pick("r") is None
    assert table.pick("unknown") is None


def test_ties_spread_released_pod_goes_last() -> None:
    table = SlotTable(seed=0)
    table.update([pod(u) for u in "abcd"])
    order = []
    for _ in range(8):
        lease = table.pick("r")
        assert lease is not None
        order.append(lease[1].uid)
        lease[0]()
    assert sorted(order[:4]) == list("abcd")
    assert order[4:] == order[:4]


def test_not_ready_pods_are_never_picked_and_in_flight_survives_updates() -> None:
    table = SlotTable()
    table.update([pod("a", 2)])
    lease = table.pick("r")
    assert lease is not None
    table.update([pod("a", 2, PodState.NOT_READY, gen=2)])
    assert table.pick("r") is None
    table.update([pod("a", 2, PodState.READY, gen=3)])
    assert table.pods["a"].inflight == 1
    second = table.pick("r")
    assert second is not None and table.pick("r") is None
    lease[0]()
    second[0]()
    assert table.pods["a"].inflight == 0


def test_double_release_is_an_error() -> None:
    table = SlotTable()
    table.update([pod("a")])
    lease = table.pick("r")
    assert lease is not None
    lease[0]()
    with pytest.raises(RuntimeError):
        lease[0]()


def test_exclusion_holds_until_generation_moves_or_readmit() -> None:
    table = SlotTable()
    table.update([pod("a"), pod("b")])
    assert table.exclude("a")
    picks = {table.pick("r")[1].uid for _ in range(1)}  # type: ignore[index]
    assert picks == {"b"}
    assert table.pick("r") is None
    table.update([pod("a", gen=1)])  # same generation: the writer has not moved past the failure
    assert table.pick("r") is None
    table.update([pod("a", gen=3)])
    lease = table.pick("r")
    assert lease is not None and lease[1].uid == "a"
    assert table.exclude("a")
    table.readmit("a")
    assert table.pods["a"].routable


def test_removed_pod_forgotten_and_release_after_removal_is_harmless() -> None:
    table = SlotTable()
    table.update([pod("a")])
    lease = table.pick("r")
    assert lease is not None
    table.update([pod("a", state=PodState.REMOVED, gen=2)])
    assert "a" not in table.pods and "r" not in table.revisions
    lease[0]()  # the in-flight request finishes after the pod left


def test_replace_all_forgets_missing_pods() -> None:
    table = SlotTable()
    table.update([pod("a"), pod("b")])
    table.replace_all([pod("b")])
    assert set(table.pods) == {"b"}


def test_concurrency_shrink_under_load_never_overbooks() -> None:
    table = SlotTable()
    table.update([pod("a", 3)])
    leases = [table.pick("r") for _ in range(3)]
    table.update([pod("a", 1, gen=2)])
    assert table.pick("r") is None
    for lease in leases:
        assert lease is not None
        lease[0]()
    assert table.pick("r") is not None
    assert table.pick("r") is None


async def test_release_wakes_exactly_one_waiter_in_fifo_order() -> None:
    loop = asyncio.get_running_loop()
    table = SlotTable()
    table.update([pod("a")])
    lease = table.pick("r")
    assert lease is not None
    first = table.enqueue("r", 0, loop)
    second = table.enqueue("r", 0, loop)
    lease[0]()
    assert first.done() and not second.done()
    handed_release, handed_pod = first.result()
    assert handed_pod.uid == "a"
    assert table.pick("r") is None  # the slot went to the waiter, not back to the pool
    table.leave_queue("r", first, 0)
    handed_release()
    assert second.done()


async def test_cancelled_waiter_is_skipped_and_queue_bounds_hold() -> None:
    loop = asyncio.get_running_loop()
    table = SlotTable(max_queued=2, max_queue_bytes=100)
    table.update([pod("a")])
    lease = table.pick("r")
    assert lease is not None
    gone = table.enqueue("r", 10, loop)
    stays = table.enqueue("r", 10, loop)
    with pytest.raises(QueueFull):
        table.enqueue("r", 0, loop)
    table.leave_queue("r", gone, 10)  # client went away
    assert table.revisions["r"].queued == 1
    with pytest.raises(QueueFull):
        table.enqueue("r", 95, loop)
    lease[0]()
    assert gone.cancelled() and stays.done() and not stays.cancelled()


async def test_pod_becoming_ready_serves_waiters_first() -> None:
    loop = asyncio.get_running_loop()
    table = SlotTable()
    waiters = [table.enqueue("r", 0, loop) for _ in range(3)]
    table.update([pod("a", 2)])
    assert [w.done() for w in waiters] == [True, True, False]
    assert table.pick("r") is None


async def test_bootstrap_fill_serves_waiters_and_levels_like_update() -> None:
    loop = asyncio.get_running_loop()
    records = [pod(f"a{i}", cc=2) for i in range(5)] + [pod("n", state=PodState.NOT_READY), pod("x", rev="q")]
    records.append(pod("gone", state=PodState.REMOVED))
    filled = SlotTable(seed=1)
    waiters = [filled.enqueue("r", 0, loop) for _ in range(3)]  # queued before the first state
    filled.replace_all(records)
    assert [w.done() for w in waiters] == [True, True, True]
    assert set(filled.pods) == {*(f"a{i}" for i in range(5)), "n", "x"}
    assert not filled.pods["n"].routable and filled.pods["a0"].routable
    # Capacity: 5 pods x 2 slots, 3 handed to the waiters; the rest by pick, never over capacity.
    picked = [filled.pick("r") for _ in range(7)]
    assert all(lease is not None for lease in picked[:7]) and filled.pick("r") is None
    assert all(p.inflight == 2 for uid, p in filled.pods.items() if uid.startswith("a"))
    assert filled.pick("q") is not None and filled.pick("q") is None
    # Without waiters, least in-flight first: every pod once before any pod twice.
    fresh = SlotTable(seed=2)
    fresh.replace_all(records)
    first = {fresh.pick("r")[1].uid for _ in range(5)}  # type: ignore[index]
    assert first == {f"a{i}" for i in range(5)}
    # A second whole state reconciles (pods forgotten, states changed) as before.
    fresh.replace_all([pod("a0", cc=2, state=PodState.NOT_READY, gen=2)])
    assert set(fresh.pods) == {"a0"} and not fresh.pods["a0"].routable


# ---- a bootstrap: revisions pending until first asked for --------------------------------------


def bootstrapped(records: list[PodRecord], seed: int = 0) -> SlotTable:
    by_revision: dict[str, list[PodRecord]] = {}
    for record in records:
        by_revision.setdefault(record.revision, []).append(record)
    table = SlotTable(seed=seed)
    table.adopt(by_revision)
    return table


def test_bootstrapped_revisions_stay_pending_until_first_pick() -> None:
    table = bootstrapped([pod("a", 2, rev="r1"), pod("b", rev="r1"), pod("c", rev="r2"), pod("d", rev="r3")])
    assert table.pods == {} and set(table.revisions) == {"r1", "r2", "r3"}
    assert table.revisions["r1"].free_slots == 3 and table.revisions["r1"].inflight == 0
    leases = [table.pick("r1") for _ in range(3)]
    assert sorted(lease[1].uid for lease in leases if lease) == ["a", "a", "b"]
    assert table.pick("r1") is None  # full, and never over capacity
    assert set(table.pods) == {"a", "b"} and table.revisions["r2"].pending is not None  # r2 untouched
    for lease in leases:
        assert lease is not None
        lease[0]()
    assert table.revisions["r1"].free_slots == 3


def test_a_delta_for_a_pending_revision_updates_its_records() -> None:
    table = bootstrapped([pod("a", rev="r1"), pod("b", rev="r1"), pod("c", rev="r2")])
    table.update([pod("a", state=PodState.NOT_READY, gen=2, rev="r1"), pod("b", state=PodState.REMOVED, gen=2, rev="r1"),
                  pod("n", rev="r1")])  # fmt: skip
    table.update([pod("c", state=PodState.REMOVED, gen=2, rev="r2")])
    assert "r2" not in table.revisions  # its last pod went: the revision is forgotten
    lease = table.pick("r1")
    assert lease is not None and lease[1].uid == "n"
    assert table.pick("r1") is None  # a is not ready, b is gone
    assert set(table.revisions["r1"].members) == {"a", "n"}


def test_has_prospects_for_pending_and_materialized_revisions() -> None:
    table = bootstrapped(
        [pod("a", state=PodState.PENDING, rev="r1"), pod("b", state=PodState.DRAINING, rev="r2")]
    )
    assert table.has_prospects("r1") and not table.has_prospects("r2") and not table.has_prospects("nope")
    assert table.pick("r1") is None and table.pick("r2") is None  # (materializes both)
    assert table.revisions["r1"].pending is None
    assert table.has_prospects("r1") and not table.has_prospects("r2")


def test_waiters_get_the_slots_of_a_revision_materialized_under_them() -> None:
    loop = asyncio.new_event_loop()
    try:
        table = bootstrapped([pod("a", state=PodState.NOT_READY, rev="r1")])
        waiter = table.enqueue("r1", 0, loop)
        assert table.revisions["r1"].pending is None  # enqueue materialized it
        table.update([pod("a", state=PodState.READY, gen=2, rev="r1")])
        assert waiter.done() and waiter.result()[1].uid == "a"
    finally:
        loop.close()


def test_replace_all_reconciles_pending_revisions_too() -> None:
    table = bootstrapped([pod("a", rev="r1"), pod("b", rev="r1"), pod("c", rev="r2")])
    assert table.pick("r2") is not None  # r2 materialized, r1 still pending
    table.replace_all([pod("a", rev="r1"), pod("d", rev="r3")])
    assert set(table.revisions) == {"r1", "r3"} and "c" not in table.pods  # (c's release stays harmless)
    lease = table.pick("r1")
    assert lease is not None and lease[1].uid == "a" and table.pick("r1") is None
    assert table.pick("r3") is not None


def test_adopt_needs_an_empty_table() -> None:
    table = SlotTable()
    table.update([pod("a")])
    with pytest.raises(RuntimeError, match="empty"):
        table.adopt({"r": [pod("b")]})


def test_bootstrapped_routers_start_on_different_pods() -> None:
    records = [pod(f"p{i}", rev="r") for i in range(50)]
    firsts = set()
    for seed in range(20):
        lease = bootstrapped(records, seed=seed).pick("r")
        assert lease is not None
        firsts.add(lease[1].uid)
    assert len(firsts) > 5


def test_materialize_pending_works_in_slices_until_nothing_is_pending() -> None:
    records = [pod(f"p{i}", rev=f"r{i % 10}") for i in range(100)]
    table = bootstrapped(records)
    assert table.materialize_pending(25) == 30  # whole revisions of 10 pods until >= 25
    assert sum(r.pending is None for r in table.revisions.values()) == 3
    while table.materialize_pending(25):
        pass
    assert len(table.pods) == 100 and all(r.pending is None for r in table.revisions.values())
    assert all(table.pick(f"r{k}") is not None for k in range(10))


# ---- the levels: FIFOs linked through the pods ---------------------------------------------------


def assert_levels_consistent(table: SlotTable) -> None:
    """Exactly the routable pods below their concurrency are linked, each once into the level of
    its count, with prev/next agreeing; the revision's totals match its pods."""
    for revision in table.revisions.values():
        for k, level in enumerate(revision.levels):
            linked = level.pods()
            assert len({id(p) for p in linked}) == len(linked)
            assert all(p.inflight == k for p in linked)
            assert level.last is (linked[-1] if linked else None)
            assert all(a.next is b and b.prev is a for a, b in itertools.pairwise(linked))
        linked_ids = {id(p) for level in revision.levels for p in level.pods()}
        for index, member in enumerate(revision.member_list):
            assert member.index == index and table.pods[member.uid] is member
            free = member.routable and member.inflight < member.concurrency
            assert (id(member) in linked_ids) == free, member.uid
        assert revision.capacity == sum(p.concurrency for p in revision.member_list if p.routable)


def test_ties_stay_first_in_first_out_over_many_picks() -> None:
    """The pod idle longest goes first, however long the level has been churned (a dict-based level
    kept that order but slowed down as its deleted entries piled up at the front)."""
    table = SlotTable(seed=3)
    table.update(pod(f"p{i:03d}") for i in range(200))
    held = [table.pick("r") for _ in range(140)]  # 70% busy
    idle = collections.deque(p for p in table.revisions["r"].levels[0].pods())
    assert len(idle) == 60
    rng = random.Random(5)
    for _ in range(2000):
        lease = table.pick("r")
        assert lease is not None and lease[1].uid == idle.popleft().uid
        held.append(lease)
        released = held.pop(rng.randrange(len(held)))
        assert released is not None
        released[0]()
        idle.append(table.pods[released[1].uid])
    assert [p.uid for p in table.revisions["r"].levels[0].pods()] == [p.uid for p in idle]
    assert_levels_consistent(table)


async def test_concurrency_shrunk_under_waiters_hands_over_no_slot_beyond_it() -> None:
    loop = asyncio.get_running_loop()
    table = SlotTable()
    table.update([pod("a", 3)])
    leases = [table.pick("r") for _ in range(3)]
    waiter = table.enqueue("r", 0, loop)
    table.update([pod("a", 1, gen=2)])  # now 3 in flight on a pod of 1
    leases[0][0]()  # type: ignore[index]  # 2 in flight: still over, nothing to hand over
    leases[1][0]()  # type: ignore[index]  # 1 in flight: full
    assert not waiter.done() and table.pods["a"].inflight == 1
    leases[2][0]()  # type: ignore[index]  # a slot is free: the waiter gets it
    assert waiter.done() and table.pods["a"].inflight == 1 and table.revisions["r"].inflight_total == 1
    assert_levels_consistent(table)


async def test_random_operations_keep_levels_and_counts_exact() -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(11)
    table = SlotTable(seed=11)
    leases: list[tuple[object, ...]] = []
    waiters: list[asyncio.Future[tuple[object, ...]]] = []
    gen = collections.Counter[str]()
    for step in range(3000):
        op = rng.random()
        uid = f"p{rng.randrange(30)}"
        rev = f"r{rng.randrange(3)}"
        if op < 0.35:
            lease = table.pick(rev)
            if lease is not None:
                leases.append(lease)
        elif op < 0.6 and leases:
            leases.pop(rng.randrange(len(leases)))[0]()  # type: ignore[operator]
        elif op < 0.8:
            gen[uid] += 1
            known = table.pods.get(uid)
            state = rng.choice([PodState.READY, PodState.READY, PodState.NOT_READY, PodState.REMOVED])
            table.update(
                [pod(uid, rng.randrange(1, 4), state, gen[uid], known.record.revision if known else rev)]
            )
        elif op < 0.85:
            table.exclude(uid)
        elif op < 0.9:
            table.readmit(uid)
        elif op < 0.95:
            waiters.append(table.enqueue(rev, 0, loop))
        else:
            for waiter in [w for w in waiters if w.done()]:
                waiters.remove(waiter)
                leases.append(waiter.result())
        for waiter in [w for w in waiters if w.done() and not w.cancelled()]:
            waiters.remove(waiter)
            leases.append(waiter.result())
        assert_levels_consistent(table)
        # (a lease belongs to the PodSlots it was taken from: a pod removed and added again is new)
        held = collections.Counter(id(lease[0].__self__) for lease in leases)  # type: ignore[attr-defined]
        for uid_, slot in table.pods.items():
            assert slot.inflight == held[id(slot)], (step, uid_)
    for lease in leases:
        lease[0]()  # type: ignore[operator]
    assert all(p.inflight == 0 for p in table.pods.values())
    assert all(r.inflight_total == 0 for r in table.revisions.values() if not r.queued)


def test_pod_index_behaves_like_a_dict_through_growth_churn_and_shrinking() -> None:
    table = SlotTable()
    revision = RevisionSlots("r")
    index = PodIndex()
    model: dict[str, PodSlots] = {}
    rng = random.Random(2)
    uids = [f"u{i}" for i in range(3000)]
    for step in range(30_000):
        uid = rng.choice(uids[: 100 + step // 10])  # (the set of keys grows, then churns)
        op = rng.random()
        if op < 0.5:
            slot = PodSlots(pod(uid), revision)
            index[uid] = model[uid] = slot
        elif op < 0.8 and uid in model:
            del index[uid], model[uid]
        else:
            assert index.get(uid) is model.get(uid)
            assert (uid in index) == (uid in model)
        assert len(index) == len(model)
    assert index == model and sorted(index) == sorted(model)
    assert {u: p for u, p in index.items()} == model and len(index._slots) * 4 >= len(model) * 5
    for uid in list(model):
        del index[uid]
    assert not index and len(index._slots) <= 16  # shrunk back
    with pytest.raises(KeyError):
        index["u1"]
    with pytest.raises(KeyError):
        del index["u1"]
    with pytest.raises(ValueError, match="filed under"):
        index["other"] = PodSlots(pod("u1"), revision)
    assert table.pods == {}


# ---- a pod whose record moves to another revision (same UID) -----------------------------------


def test_a_pod_moved_to_another_revision_leaves_the_old_one_keeping_its_count() -> None:
    table = SlotTable(seed=0)
    table.update([pod("a", 2, rev="r1"), pod("b", rev="r1")])
    lease = table.pick("r1")
    assert lease is not None
    moved = lease[1].uid
    table.update([pod(moved, 2, gen=2, rev="r2")])
    old, new = table.revisions["r1"], table.revisions["r2"]
    assert moved not in old.members and set(new.members) == {moved}
    assert table.pods[moved].revision is new
    assert old.inflight_total == 0 and old.capacity == 1  # only the pod that stayed
    assert new.inflight_total == 1 and new.capacity == 2  # the request in flight moved with it
    other = table.pick("r1")
    assert other is not None and other[1].uid != moved and table.pick("r1") is None
    second = table.pick("r2")
    assert second is not None and second[1].uid == moved and table.pick("r2") is None  # 2 of 2
    lease[0]()  # the lease taken in r1 gives its slot back to the pod, now in r2
    assert new.inflight_total == 1 and old.inflight_total == 1
    again = table.pick("r2")
    assert again is not None and again[1].uid == moved


def test_a_pod_moved_out_of_its_revisions_last_pod_forgets_the_revision() -> None:
    table = SlotTable(seed=0)
    table.update([pod("a", rev="r1")])
    table.update([pod("a", gen=2, rev="r2")])
    assert "r1" not in table.revisions and table.pick("r1") is None
    lease = table.pick("r2")
    assert lease is not None and lease[1].uid == "a"


def test_a_pending_pod_moved_to_another_revision_leaves_the_old_ones_records() -> None:
    before = [pod("a", rev="r1"), pod("b", rev="r1"), pod("c", rev="r2")]
    table = bootstrapped(before)
    previous = {r.uid: r for r in before}
    table.update([pod("a", gen=2, rev="r2")], previous=previous)
    leases = [table.pick("r1") for _ in range(2)]
    assert leases[0] is not None and leases[0][1].uid == "b" and leases[1] is None
    assert sorted(lease[1].uid for lease in (table.pick("r2"), table.pick("r2")) if lease) == ["a", "c"]


def test_a_pending_pod_moved_into_a_materialized_revision() -> None:
    before = [pod("a", rev="r1"), pod("c", rev="r2")]
    table = bootstrapped(before)
    assert table.pick("r2") is not None  # r2 materialized, r1 still pending
    table.update([pod("a", gen=2, rev="r2")], previous={r.uid: r for r in before})
    assert "r1" not in table.revisions and table.pick("r1") is None
    lease = table.pick("r2")
    assert lease is not None and lease[1].uid == "a"


def test_replace_all_moves_a_pending_pod_to_its_new_revision() -> None:
    table = bootstrapped([pod("a", rev="r1"), pod("b", rev="r1")])
    table.replace_all([pod("a", gen=2, rev="r2"), pod("b", rev="r1")])
    assert set(table.revisions["r1"].pending_records()) == {pod("b", rev="r1")}
    lease = table.pick("r1")
    assert lease is not None and lease[1].uid == "b" and table.pick("r1") is None
    lease = table.pick("r2")
    assert lease is not None and lease[1].uid == "a"
