"""Affinity policies: send a request to the pod that likely holds its prompt's KV cache.

Theory of operation
-------------------
A pod that already holds a prompt's prefix in its KV cache answers the first token far sooner, so
requests that share a prefix (a system prompt, the earlier turns of a conversation) should go to
the same pod -- but never at the price of overloading it or of waiting while another pod is free.

``prefix_affinity`` is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam
2018) on top of the slot table's exact counts. Each revision's pods sit on a hash ring
(``Ring``: ``POINTS_PER_POD`` points per pod, each a 64-bit blake2b of its UID). A request's key
(a hash of its prompt's first bytes, or of its session header; ``fastproxy.llm``) lands on the
ring; walking clockwise, the first pod that is routable, has a free slot and is within
``(1 + epsilon)`` of the revision's average load (in-flight over slots, the new request counted)
takes it. After ``MAX_PROBES`` points without one, any free pod does (``least_inflight``); with no
free pod at all the request waits in the revision's FIFO like any other and takes the first slot
freed anywhere. So affinity only ever chooses *among free pods*: it cannot double-book a pod,
and it never waits for an affine pod while another is free.

The ring holds every member of the revision the router knows (from the snapshot), routable or not,
and is derived from the UIDs alone: routers with the same snapshot build the same ring and send a
key to the same pod without talking to each other. A pod that is briefly not ready keeps its
points (it is skipped while walking), so its keys come back to it, cache and all. The ring is built
on a revision's first affine pick (O(pods log pods)) and then kept in step by the slot table
(``MemberIndex``: ``add``/``change``/``remove``, O(points) each), so deltas never rebuild it.

Adapter affinity: a request naming a LoRA adapter first walks a smaller ring of the pods that
advertise it (``PodRecord.adapters``), under the same bound; then the whole ring; then any free
pod. Sub-rings exist only for adapters some pod advertises, so request input cannot grow them.

Policies stay plain functions of a ``RevisionSlots`` returning ``(release, pod)`` or None, like
``fastproxy.slots.least_inflight`` (and Knative's throttler).
"""

from __future__ import annotations

import array
import bisect
import hashlib
import struct
from bisect import bisect_left as _bisect_left
from collections.abc import Iterable
from typing import Final

from fastproxy.slots import Lease, PodSlots, RevisionSlots, SlotTable, least_inflight
from statesync.schema import PodRecord

# Points per pod: the share of keys a pod owns varies as 1/sqrt(points); with 8, a 16-pod ring's
# largest share was ~3.6x its smallest and the load bound could cap only the largest (bench.affinity
# at CC=4: spread max/min 1.6-1.8); with 32 it is ~1.9x (spread ~1.3). The cost: a ring of 50k pods
# holds 1.6M points (~25 MB) and takes seconds to build on its revision's first affine pick.
POINTS_PER_POD: Final = 32
_DIGESTS: Final = POINTS_PER_POD // 8  # (a blake2b digest holds 8 points at most)
# Ring points looked at (the affine pod, then the next ones clockwise) before any free pod will do.
MAX_PROBES: Final = 8
# Rings up to this many points are lists (see Ring); larger ones arrays.
SMALL_RING: Final = 16_384
_POINTS: Final = struct.Struct(">8Q")


def _uid_of(pod: PodSlots) -> str:
    return pod.uid


def ring_points(uid: str) -> tuple[int, ...]:
    """A pod's points on every router's ring: a function of its UID alone."""
    data = uid.encode()
    points: tuple[int, ...] = ()
    for salt in range(_DIGESTS):
        digest = hashlib.blake2b(data, digest_size=64, person=b"fastproxy-ring", salt=bytes([salt])).digest()
        points += _POINTS.unpack(digest)
    return points


class Ring:
    """The pods of one revision on a hash ring: sorted points and the pod owning each."""

    __slots__ = ("adapters", "owners", "points", "top")

    def __init__(self, pods: Iterable[PodSlots], *, with_adapters: bool = True) -> None:
        # Ties between points (2^-64 apart) are broken by UID, so every router orders them alike:
        # the pods go in UID order and the sort is stable. (Sorting the points' indexes by point,
        # not (point, uid, pod) tuples: ~4x faster, which matters for a ring of 50k pods.)
        flat: list[int] = []
        flat_owners: list[PodSlots] = []
        for pod in sorted(pods, key=_uid_of):
            flat += ring_points(pod.uid)
            flat_owners += [pod] * POINTS_PER_POD
        order = sorted(range(len(flat)), key=flat.__getitem__)
        # A large ring is an array, not a list of ints: 8 contiguous bytes per point, so a bisect
        # over a 50k-pod ring touches a few cache lines instead of 19 scattered int objects. A
        # small one (the common case: tens of pods per revision) is a list, in cache either way,
        # whose bisect compares ints without making one per probe (~0.3 us vs ~0.5 us).
        keys = [flat[i] for i in order]
        self.points: list[int] | array.array[int] = (
            keys if len(keys) <= SMALL_RING else array.array("Q", keys)
        )
        self.owners: list[PodSlots] = [flat_owners[i] for i in order]
        self.adapters: dict[str, Ring] = {}
        self.top = with_adapters  # a revision's ring (not an adapter's): it keeps the adapters' rings
        if with_adapters:
            by_adapter: dict[str, list[PodSlots]] = {}
            seen: set[str] = set()
            for pod in self.owners:
                if pod.record.adapters and pod.uid not in seen:
                    seen.add(pod.uid)
                    for adapter in pod.record.adapters:
                        by_adapter.setdefault(adapter, []).append(pod)
            self.adapters = {name: Ring(pods, with_adapters=False) for name, pods in by_adapter.items()}

    def __len__(self) -> int:
        return len(self.points)

    # ---- kept in step by the slot table (fastproxy.slots.MemberIndex) ------------------------

    def add(self, pod: PodSlots) -> None:
        self._insert(pod)
        if self.top:
            for adapter in pod.record.adapters:
                self._adapter_ring(adapter)._insert(pod)

    def _insert(self, pod: PodSlots) -> None:
        points, owners, uid = self.points, self.owners, pod.uid
        for point in ring_points(uid):
            at = bisect.bisect_left(points, point)
            while at < len(points) and points[at] == point and owners[at].uid < uid:
                at += 1
            points.insert(at, point)
            owners.insert(at, pod)

    def remove(self, pod: PodSlots) -> None:
        self._delete(pod)
        if self.top:
            for adapter in pod.record.adapters:
                self._leave_adapter(adapter, pod)

    def _delete(self, pod: PodSlots) -> None:
        points, owners = self.points, self.owners
        for point in ring_points(pod.uid):
            at = bisect.bisect_left(points, point)
            while at < len(points) and points[at] == point:
                if owners[at] is pod:
                    del points[at]
                    del owners[at]
                    break
                at += 1

    def _leave_adapter(self, adapter: str, pod: PodSlots) -> None:
        sub = self.adapters.get(adapter)
        if sub is not None:
            sub._delete(pod)
            if not sub.points:
                del self.adapters[adapter]

    def change(self, pod: PodSlots, record: PodRecord) -> None:
        """``pod`` is about to get ``record``: follow a change of its advertised adapters."""
        before, after = pod.record.adapters, record.adapters
        if before == after:
            return
        for adapter in before:
            if adapter not in after:
                self._leave_adapter(adapter, pod)
        for adapter in after:
            if adapter not in before:
                self._adapter_ring(adapter)._insert(pod)

    def _adapter_ring(self, adapter: str) -> Ring:
        sub = self.adapters.get(adapter)
        if sub is None:
            sub = self.adapters[adapter] = Ring((), with_adapters=False)
        return sub


def ring_of(revision: RevisionSlots) -> Ring:
    """The revision's ring, built on first use and kept in step by the slot table from then on."""
    ring = revision.ring
    if ring is None:
        ring = revision.ring = Ring(revision.members.values())
    return ring  # type: ignore[return-value]  # (only this module sets it)


def _walk(ring: Ring, key: int, bound: float) -> Lease | None:
    """The first pod clockwise from ``key`` that is routable, has a free slot, and whose load
    stays under ``bound`` (in-flight per slot) -- within ``MAX_PROBES`` points."""
    points = ring.points
    count = len(points)
    if not count:
        return None
    owners = ring.owners
    at = _bisect_left(points, key)
    end = at + (MAX_PROBES if count > MAX_PROBES else count)
    while at < end:
        pod = owners[at] if at < count else owners[at - count]  # (it wraps once at most)
        inflight = pod.inflight
        concurrency = pod.concurrency
        # inflight + 1 <= ceil(bound * concurrency)  <=>  inflight < bound * concurrency
        if inflight < concurrency and inflight < bound * concurrency and pod.routable:
            pod._take()
            return (pod.release, pod.record)
        at += 1
    return None


def prefix_affinity(
    revision: RevisionSlots, key: int, adapter: str | None = None, epsilon: float = 0.25
) -> Lease | None:
    """Policy: the key's pod on the ring if it is free and within (1 + epsilon) of the average
    load, else the next such pod clockwise, else any free pod; None when no pod is free."""
    capacity = revision.capacity
    if capacity <= 0:
        return None
    ring: Ring | None = revision.ring  # type: ignore[assignment]  # (only this module sets it)
    if ring is None:
        ring = ring_of(revision)
    bound = (1.0 + epsilon) * (revision.inflight_total + 1) / capacity
    if adapter is not None and ring.adapters:
        sub = ring.adapters.get(adapter)
        if sub is not None:
            lease = _walk(sub, key, bound)
            if lease is not None:
                return lease
    lease = _walk(ring, key, bound)
    if lease is not None:
        return lease
    return least_inflight(revision)


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
        table._materialize(slots)  # a ring needs the revision's members
    if key is not None:
        # (prefix_affinity, inlined for the common case: the request path pays one call less)
        ring = slots.ring
        capacity = slots.capacity
        if ring is None or adapter is not None or capacity <= 0:
            return prefix_affinity(slots, key, adapter, epsilon)
        lease = _walk(ring, key, (1.0 + epsilon) * (slots.inflight_total + 1) / capacity)  # type: ignore[arg-type]
        return lease if lease is not None else least_inflight(slots)
    ring = ring_of(slots)
    sub = ring.adapters.get(adapter) if ring.adapters and adapter is not None else None
    if sub is not None and adapter is not None and slots.capacity > 0:
        bound = (1.0 + epsilon) * (slots.inflight_total + 1) / slots.capacity
        lease = _walk(sub, adapter_key(adapter), bound)
        if lease is not None:
            return lease
    return table.pick(revision)
