"""Affinity policies: send a request to the pod that likely holds its prompt's KV cache.

Theory of operation
-------------------
A pod that already holds a prompt's prefix in its KV cache answers the first token far sooner, so
requests that share a prefix (a system prompt, the earlier turns of a conversation) should go to
the same pod -- but never at the price of overloading it, nor of waiting while another pod is free
unless the router is configured to (a bounded wait).

``prefix_affinity`` is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam
2018) on top of the slot table's exact counts, with Maglev's lookup table (Eisenbud et al. 2016)
as the consistent hash. Each revision's pods fill a table of a prime number of entries
(``table_size``: at least ``ENTRIES_PER_POD`` per pod, never fewer than 4099): every pod has its
own permutation of the entries, ``offset + j * skip`` modulo the size, both from a blake2b of its
UID, and the pods, in UID order, take turns claiming their next still-free entry until all are
claimed. So each pod owns ``size // pods`` or one more entries -- the key shares are even (at 16
pods 256 or 257 entries each; a ring of 32 points per pod gave ~1.9x between the largest and the
smallest share, and the least-owning pods idled) -- and the build is one pass over the entries
(``fill``; compiled, ~M log M cheap probes), not a sort of points. A request's key (a hash of its
prompt's first bytes, or of its session header; ``fastproxy.llm``) indexes the table (``key %
size``: no search); from that entry on, the first pod that is routable, has a free slot and is
within ``(1 + epsilon)`` of the revision's average load (in-flight over slots, the new request
counted) takes it. After ``MAX_PROBES`` entries without one (adjacent entries belong to unrelated
pods, so the spill of one pod's keys spreads), any free pod does (``least_inflight``); with no free
pod at all the request waits in the revision's FIFO like any other and takes the first slot freed
anywhere. So affinity only ever chooses *among free pods*: it cannot double-book a pod, and it
never waits for an affine pod while another is free -- unless configured to (the route's
``llm.affinity_wait_ms``, else the router's ``--affinity-wait-ms``; off by default; below).

The bounded wait (``pick_or_wait``): a request of a route with a wait looks at the key's first
``WAIT_CANDIDATES`` entries (its own pod, and the next, which took its earlier turns whenever the
first was busy). One that is free and within the bound takes the request, as above. When none can,
some of them are *full* (a pod with a free slot but over the bound is never waited for: the bound
is what keeps the spread) and some other pod is free, the request waits for the next slot freed on
one of the full ones -- the slot table hands that slot over exactly, as to a FIFO waiter
(``SlotTable.wait_for_pods``: after the revision's FIFO, whose requests found no free pod at all;
at most ``concurrency`` such waiters per pod, counted in the revision's queue bounds) -- for
the route's wait at most and never past the request's queue deadline; then it takes any free
pod at once (``pick``), or the FIFO if none is. A request waits once. It pays off only when the
wait is short against the prefill a hit saves: at CC=1 the affine pod is busy with another
conversation, whose remaining time is mostly decoding (the figures are in the README and
``bench/results/affinity-cc1-3rounds.md``).

The table holds every member of the revision the router knows (from the snapshot), routable or
not, and is a function of the UIDs alone: routers with the same snapshot build the same table and
send a key to the same pod without talking to each other. A pod that is briefly not ready keeps
its entries (it is skipped), so its keys come back to it, cache and all. When a pod joins or
leaves, Maglev moves mostly that pod's keys (tests/unit/test_affinity.py measures it); when the
revision outgrows its table (past ``size / ENTRIES_PER_POD`` pods, so at 256, 512, 1024... pods)
the next size is used and every key moves once.

Maintenance: the slot table tells a revision's table of every pod that joins, changes or leaves
(``MemberIndex``: ``add``/``change``/``remove``), which only counts the change. A rebuild costs
O(table size) -- about 2 ms at 1k pods (16k entries), 30 ms at 5k (131k), 0.5-0.7 s at 50k (1M),
compiled, 4-6x that pure -- so it is kept off the request path: once more than ``pods >>
REBUILD_SHIFT`` changes are pending (at least one) the table is *due*, and the router's periodic
sweep (``rebuild_due``, from ``Router.sweep_timeouts``, up to ``REBUILD_BUDGET`` entries per tick
but always one table) rebuilds it. So a revision of P pods is rebuilt at most once per P/8 joins
and leaves: its cost per change is bounded by ~8 * size / P = ~128 entries (at 50k pods one 0.6 s
rebuild per 6250 changes, ~0.1 ms a change; it is one stall of the loop then, not a request's).
A pick rebuilds the table itself only when it is absent or badly out of date: more than half its
pods changed (``pods >> STALE_SHIFT``). Until a rebuild a pod that left is skipped like any
unroutable pod (its entries spill to the next), and a pod that joined takes only spilled requests.

A revision whose pods advertise no adapter has no use for a table unless a request carries a key:
its index (``Maglev`` unbuilt: no entries) only counts the pods that advertise one
(``adapter_pods``), so a least-in-flight LLM route, whose requests name the model as the adapter,
never builds one -- the slot table's own policy picks.

Adapter affinity: a request naming a LoRA adapter first looks in a smaller table of the pods that
advertise it (``PodRecord.adapters``), under the same bound; then the whole table; then any free
pod. Sub-tables exist only for adapters some pod advertises, so request input cannot grow them.

Policies stay plain functions of a ``RevisionSlots`` returning ``(release, pod)`` or None, like
``fastproxy.slots.least_inflight`` (and Knative's throttler). This module is compiled
(``fastproxy.compiled``; its types in ``affinity.pxd``): the fill is a C loop there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

from fastproxy.slots import Lease, PodSlots, RevisionSlots, SlotTable, least_inflight, take
from statesync.schema import PodRecord

# Table sizes: the smallest prime above each power of two from 2^12. One size holds revisions of up
# to size / ENTRIES_PER_POD pods, so a revision's size (and its keys' places) change only when it
# doubles, not with every pod that joins.
TABLE_SIZES: Final = (4099, 8209, 16411, 32771, 65537, 131101, 262147, 524309, 1048583, 2097169,
                      4194319, 8388617, 16777259)  # fmt: skip
# Entries per pod, at least: a pod's share of the keys is within 1/16 of every other pod's.
ENTRIES_PER_POD: Final = 16
# Entries looked at (the key's own, then the next ones) before any free pod will do.
MAX_PROBES: Final = 8
# Entries (from the key's own) whose pods a request may wait for, when it is configured to
# (``pick_or_wait``): the key's pod, and the next, which took the key's earlier turns when the
# first was busy (so it too holds much of the prompt).
WAIT_CANDIDATES: Final = 2
# A table is due for the sweep's rebuild once more than pods >> REBUILD_SHIFT changes are pending,
# and a pick rebuilds it itself past pods >> STALE_SHIFT (see above).
REBUILD_SHIFT: Final = 3
STALE_SHIFT: Final = 1
# Table entries the router's sweep rebuilds per tick (at least one table): ~0.15 s compiled.
REBUILD_BUDGET: Final = 1 << 18
_LOW64: Final = (1 << 64) - 1


def table_size(pods: int) -> int:
    """The entries of a table for ``pods`` pods: a prime, at least ENTRIES_PER_POD per pod."""
    for size in TABLE_SIZES:
        if size >= pods * ENTRIES_PER_POD:
            return size
    return TABLE_SIZES[-1]


def _uid_of(pod: PodSlots) -> str:
    return pod.uid


def permutation(uid: str, size: int) -> tuple[int, int]:
    """A pod's ``(offset, skip)`` in every router's table of ``size`` entries: from its UID alone."""
    digest = hashlib.blake2b(uid.encode(), digest_size=16, person=b"fastproxy-maglev").digest()
    h = int.from_bytes(digest, "big")
    # (size is prime, so every skip in 1..size-1 visits every entry)
    return (h >> 64) % size, (h & _LOW64) % (size - 1) + 1


def fill(pods: list[PodSlots], offsets: list[int], skips: list[int], size: int) -> list[PodSlots]:
    """Maglev's population: the pods, in turn, each claim the next free entry of their permutation
    (``offsets`` is consumed: each becomes the pod's next entry to try). ``pods`` is not empty."""
    count = len(pods)
    entries: list[PodSlots] = [None] * size  # type: ignore[list-item]  # (all claimed on return)
    filled = 0
    while True:
        for i in range(count):
            at = offsets[i]
            skip = skips[i]
            while entries[at] is not None:
                at += skip
                if at >= size:
                    at -= size
            entries[at] = pods[i]
            at += skip
            if at >= size:
                at -= size
            offsets[i] = at
            filled += 1
            if filled == size:
                return entries


class Maglev:
    """One revision's pods (or one adapter's) in a Maglev lookup table, and its adapters' tables.
    Unbuilt (``build=False``), it only counts the pods that advertise adapters."""

    __slots__ = ("adapter_pods", "adapters", "built", "changes", "due", "entries", "pods", "size", "stale")

    def __init__(self, pods: Iterable[PodSlots], *, with_adapters: bool = True, build: bool = True) -> None:
        self.changes = 0  # joins, leaves and adapter changes since the build
        self.due = False  # for the sweep's rebuild (rebuild_due)
        self.adapters: dict[str, Maglev] = {}
        self.size = 0
        self.entries: list[PodSlots] = []
        if not build:
            self.built = False
            self.stale = True  # (a pick with a key builds it)
            self.pods = 0
            self.adapter_pods = sum(1 for pod in pods if pod.record.adapters)
            return
        self.built = True
        self.stale = False
        ordered = sorted(pods, key=_uid_of)  # every router takes turns in the same order
        self.pods = len(ordered)
        self.adapter_pods = 0
        if not ordered:
            return
        size = self.size = table_size(len(ordered))
        offsets: list[int] = []
        skips: list[int] = []
        for pod in ordered:
            offset, skip = permutation(pod.uid, size)
            offsets.append(offset)
            skips.append(skip)
        self.entries = fill(ordered, offsets, skips, size)
        if with_adapters:
            by_adapter: dict[str, list[PodSlots]] = {}
            for pod in ordered:
                if pod.record.adapters:
                    self.adapter_pods += 1
                    for adapter in pod.record.adapters:
                        by_adapter.setdefault(adapter, []).append(pod)
            self.adapters = {name: Maglev(group, with_adapters=False) for name, group in by_adapter.items()}

    def __len__(self) -> int:
        return self.size

    # ---- told by the slot table (fastproxy.slots.MemberIndex) ---------------------------------

    def add(self, pod: PodSlots) -> None:
        if pod.record.adapters:
            self.adapter_pods += 1
        self._changed()

    def remove(self, pod: PodSlots) -> None:
        if pod.record.adapters:
            self.adapter_pods -= 1
        self._changed()

    def change(self, pod: PodSlots, record: PodRecord) -> None:
        """``pod`` is about to get ``record``: only a change of its advertised adapters matters."""
        if pod.record.adapters != record.adapters:
            if not pod.record.adapters:
                self.adapter_pods += 1
            elif not record.adapters:
                self.adapter_pods -= 1
            self._changed()

    def _changed(self) -> None:
        if not self.built:
            return
        changes = self.changes = self.changes + 1
        if changes > self.pods >> REBUILD_SHIFT:
            self.due = True
            if changes > self.pods >> STALE_SHIFT:
                self.stale = True


def maglev_of(revision: RevisionSlots) -> Maglev:
    """The revision's table: built on first use, rebuilt when badly out of date (``stale``)."""
    table: Maglev | None = revision.ring  # type: ignore[assignment]  # (only this module sets it)
    if table is None or table.stale:
        table = Maglev(revision.members.values())
        revision.ring = table
    return table


def rebuild_due(slots: SlotTable, budget: int = REBUILD_BUDGET) -> int:
    """The router's periodic work: rebuild the tables that are due, until about ``budget`` entries
    were built (always one table, so a table larger than the budget is not put off for ever);
    returns the entries built. O(revisions) to look, and no pick pays for it."""
    done = 0
    for revision in slots.revisions.values():
        table: Maglev | None = revision.ring  # type: ignore[assignment]
        if table is not None and table.due and table.built:
            if done and done + table.size > budget:
                continue  # (next tick; a smaller one may still fit)
            fresh = Maglev(revision.members.values())
            revision.ring = fresh
            done += fresh.size
    return done


def _walk(table: Maglev, key: int, bound: float) -> Lease | None:
    """From ``key``'s entry on, the first pod that is routable, has a free slot, and whose load
    stays under ``bound`` (in-flight per slot) -- within ``MAX_PROBES`` entries."""
    size = table.size
    if not size:
        return None
    entries = table.entries
    at = key % size
    end = at + MAX_PROBES
    while at < end:
        pod = entries[at] if at < size else entries[at - size]  # (it wraps once at most)
        inflight = pod.inflight
        concurrency = pod.concurrency
        # inflight + 1 <= ceil(bound * concurrency)  <=>  inflight < bound * concurrency
        if inflight < concurrency and inflight < bound * concurrency and pod.routable:
            take(pod)
            return (pod.release, pod.record)
        at += 1
    return None


def prefix_affinity(
    revision: RevisionSlots, key: int, adapter: str | None = None, epsilon: float = 0.25
) -> Lease | None:
    """Policy: the key's pod in the table if it is free and within (1 + epsilon) of the average
    load, else the next such pod, else any free pod; None when no pod is free."""
    capacity = revision.capacity
    if capacity <= 0:
        return None
    table = maglev_of(revision)
    bound = (1.0 + epsilon) * (revision.inflight_total + 1) / capacity
    if adapter is not None and table.adapters:
        sub = table.adapters.get(adapter)
        if sub is not None:
            lease = _walk(sub, key, bound)
            if lease is not None:
                return lease
    lease = _walk(table, key, bound)
    if lease is not None:
        return lease
    return least_inflight(revision)


def _any_free(revision: RevisionSlots) -> bool:
    """Has any routable pod of the revision a free slot? (O(levels): the levels hold exactly those.)"""
    for level in revision.levels:  # noqa: SIM110  (a C loop compiled; any() would be a generator)
        if level.first is not None:
            return True
    return False


def pick_or_wait(
    table: SlotTable, revision: str, key: int, adapter: str | None, epsilon: float
) -> Lease | list[PodSlots] | None:
    """``pick`` for a route that may wait for its affine pods (``affinity_wait_ms``): the
    first ``WAIT_CANDIDATES`` pods of the key's entries (in the adapter's table when the request
    names an adapter some pod advertises) are its candidates. One that is free and within the
    bound takes the request. When none can, some are full (every slot taken; a pod merely over
    the bound is never waited for, the bound is what keeps the load spread) and another pod is
    free, the full candidates are returned: the caller waits for one of them, for a bounded time
    (``SlotTable.wait_for_pods``), then picks with ``pick`` (any free pod at once). Otherwise
    this is ``pick``: the rest of the walk, else any free pod, else None (the revision's FIFO)."""
    slots = table.revisions.get(revision)
    if slots is None:
        return None
    if slots.pending is not None:
        table._materialize(slots)
    capacity = slots.capacity
    if capacity <= 0:
        return None
    maglev = maglev_of(slots)
    candidates = maglev
    if adapter is not None and maglev.adapters:
        sub = maglev.adapters.get(adapter)
        if sub is not None:
            candidates = sub
    size = candidates.size
    if not size:
        return pick(table, revision, key, adapter, epsilon)
    bound = (1.0 + epsilon) * (slots.inflight_total + 1) / capacity
    entries = candidates.entries
    at = key % size
    full: list[PodSlots] = []
    for i in range(WAIT_CANDIDATES):
        pod = entries[(at + i) % size]
        inflight = pod.inflight
        concurrency = pod.concurrency
        if not pod.routable:
            continue
        if inflight < concurrency:
            if inflight < bound * concurrency:
                take(pod)
                return (pod.release, pod.record)
        elif pod not in full:
            full.append(pod)
    if full and _any_free(slots):
        return full
    return pick(table, revision, key, adapter, epsilon)


def adapter_key(adapter: str) -> int:
    return int.from_bytes(hashlib.blake2b(adapter.encode(), digest_size=8).digest(), "big")


def pick(
    table: SlotTable, revision: str, key: int | None, adapter: str | None, epsilon: float
) -> Lease | None:
    """``SlotTable.pick`` with affinity: ``key`` (a 64-bit prompt or session hash) and/or the LoRA
    ``adapter`` the request names. Without a key, an adapter that no pod advertises (the base
    model's own name, most often) changes nothing: the table's own policy picks."""
    if key is None and adapter is None:
        return table.pick(revision)
    slots = table.revisions.get(revision)
    if slots is None:
        return None
    if slots.pending is not None:
        table._materialize(slots)  # a table needs the revision's members
    if key is not None:
        # (prefix_affinity, inlined for the common case: the request path pays one call less)
        maglev: Maglev | None = slots.ring  # type: ignore[assignment]
        capacity = slots.capacity
        if maglev is None or maglev.stale or capacity <= 0 or (adapter is not None and maglev.adapters):
            return prefix_affinity(slots, key, adapter, epsilon)  # (an adapter that no pod has is none)
        lease = _walk(maglev, key, (1.0 + epsilon) * (slots.inflight_total + 1) / capacity)
        return lease if lease is not None else least_inflight(slots)
    index: Maglev | None = slots.ring  # type: ignore[assignment]
    if index is None:
        index = Maglev(slots.members.values(), build=False)  # (one pass; then kept in step)
        slots.ring = index
    if not index.adapter_pods:
        return table.pick(revision)  # no pod advertises an adapter: no table to look in
    maglev = maglev_of(slots)
    sub = maglev.adapters.get(adapter) if maglev.adapters and adapter is not None else None
    if sub is not None and adapter is not None and slots.capacity > 0:
        bound = (1.0 + epsilon) * (slots.inflight_total + 1) / slots.capacity
        lease = _walk(sub, adapter_key(adapter), bound)
        if lease is not None:
            return lease
    return table.pick(revision)
