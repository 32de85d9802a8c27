"""The router-local slot table: in-flight counts per pod and FIFO waiters per revision.

Theory of operation
-------------------
The snapshot says which pods exist and which are Ready; this table says how busy each one is *from
this router's point of view* (routers count optimistically; the sidecar holds the authoritative
count and refuses politely when full). It is mutable, lives beside the snapshot, and is touched
only by the router's event loop, so it needs no locks.

Per revision, pods with a free slot sit in ``levels[k]``: a ``Level``, the FIFO of the pods that
currently have ``k`` requests in flight, a doubly linked list threaded through the pods themselves
(``prev``/``next``). ``least_inflight`` takes the first pod of the lowest non-empty level, O(1) in
the number of pods; because a released pod goes to the *end* of its level, ties are spread (the pod
idle longest goes first). A pod at its concurrency is in no level, so it cannot be picked. Exactly
the routable pods below their concurrency are linked, each into ``levels[inflight]``. (The levels
were insertion-ordered dicts: taking a dict's first entry and appending at its end leaves deleted
slots at the front of its entries array, which finding "the first" scans until the dict is rebuilt:
17-30 us at 50k pods of one revision, and a dict entry per pod besides.)

A released slot is handed straight to the oldest live waiter of the revision (exactly one waiter
wakes per freed slot, and the slot cannot be stolen in between); only if nobody waits does the pod
go back into its level. A waiter whose deadline passes or whose client leaves is cancelled and
skipped. A request may also wait for a few given pods only (``wait_for_pods``: an affinity
policy's bounded wait for the pods holding its prompt's KV cache, ``fastproxy.affinity``): each pod
keeps a FIFO of those (at most its concurrency), and its freed slot goes to them after the
revision's FIFO, in the same exact hand-over.

``update(records)`` reconciles only the pods a delta changed; ``exclude(uid)`` takes a pod out of
rotation at once after a transport failure, until the writer's view of that pod moves past the
generation the failure was seen at, or ``readmit`` is called.

A whole state installed into an empty table (a router's bootstrap) is only grouped per revision:
each revision keeps its records ``pending`` until its first request finds no free pod in its (empty)
levels, and only then gets its ``PodSlots`` (``_materialize``, O(pods of that revision)), or when
the router warms up after installing (``materialize_pending``, a slice at a time between other
work). Deltas for a pending revision just update its records. So a router that starts on 50k pods pays per pod a
dict insertion, not an object and its level bookkeeping, and a revision nobody asks for costs
nothing more. A router that starts from the writer's revision index (``adopt_unread``) does not
even have the records yet: a revision's pending records are ``UnreadRecords`` -- the chunks that
hold them -- read from the router's current snapshot (decoding those chunks) when first needed.
The hot path is unchanged: the check for ``pending`` happens only when the policy found no pod.

Per revision, ``inflight_total`` and ``capacity`` (the slots of its routable pods) are kept as pods
take, release, enter and leave, so a policy that bounds a pod's load by the revision's average
(``fastproxy.affinity``) reads it in O(1). Such a policy keeps its own index of the revision's
members (``ring``, a ``MemberIndex``), told of each pod that joins, changes or leaves.

Memory (a router holds 50k pods in <= 60 MB): a pod costs its ``PodSlots`` (C fields once compiled:
counts are C ints, its UID is its record's) and one slot in the table's ``pods`` by UID, a
``PodIndex``: an open-addressing hash table whose slots are the PodSlots themselves (8 bytes a slot,
at most 4/5 full; a dict by UID cost ~38 bytes a pod at 50k); a revision
lists its members in a plain list (``member_list``, each pod knowing its index there, so one leaves
in O(1) by moving the last into its place), and makes its waiters' deque only when a request first
waits. ``members`` (a dict by UID) is built when asked for, by tests and a policy's first index.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from statesync.schema import PodRecord, PodState

Release = Callable[[], None]
Lease = tuple[Release, PodRecord]


class PodSlots:
    """One pod's in-flight count and its place in its revision's levels."""

    __slots__ = (
        "concurrency",
        "index",
        "inflight",
        "next",
        "prev",
        "record",
        "revision",
        "routable",
    )

    def __init__(self, record: PodRecord, revision: RevisionSlots) -> None:
        self.record = record
        self.concurrency = record.concurrency
        self.revision = revision
        self.inflight = 0
        self.routable = False
        self.index = -1  # in revision.member_list; -1 once forgotten
        # Neighbours in the level the pod is linked into (None at either end, or when in none).
        self.prev: PodSlots | None = None
        self.next: PodSlots | None = None

    @property
    def uid(self) -> str:
        return self.record.uid

    def release(self) -> None:
        """Give one slot back: to the oldest waiter if any, else to the pod's level."""
        inflight = self.inflight
        if inflight <= 0:
            raise RuntimeError(f"slot of pod {self.record.uid} released more often than acquired")
        revision = self.revision
        if not self.routable:
            self.inflight = inflight - 1
            revision.inflight_total -= 1
            return
        concurrency = self.concurrency
        if revision.queued and inflight <= concurrency and revision.hand_over(self):
            return  # (the slot went on to a waiter: still taken, the pod stays where it is)
        if revision.affine_queued and inflight <= concurrency and revision.hand_over_affine(self):
            return  # (likewise, to a request waiting for this very pod: fastproxy.affinity)
        self.inflight = inflight - 1
        revision.inflight_total -= 1
        if inflight <= concurrency:  # (concurrency may have shrunk under in-flight requests)
            levels = revision.levels
            if inflight < concurrency:
                _unlink(levels[inflight], self)
            _push(levels[inflight - 1], self)

    def _enter(self) -> None:
        """Put the pod into rotation (it became routable)."""
        self.routable = True
        revision = self.revision
        concurrency = self.concurrency
        revision.capacity += concurrency
        levels = revision.levels
        while len(levels) < concurrency:
            levels.append(Level())
        # Free capacity goes to waiters first, one slot per waiter.
        while revision.queued and self.inflight < concurrency:
            self.inflight += 1
            revision.inflight_total += 1
            if not revision.hand_over(self):
                self.inflight -= 1
                revision.inflight_total -= 1
                break
        if self.inflight < concurrency:
            _push(levels[self.inflight], self)

    def _leave(self) -> None:
        self.routable = False
        self.revision.capacity -= self.concurrency
        if self.inflight < self.concurrency:
            _unlink(self.revision.levels[self.inflight], self)


class Level:
    """The pods of a revision with one same count in flight, in the order they got it: a FIFO whose
    first is O(1) and from which any pod leaves in O(1), linked through the pods themselves."""

    __slots__ = ("first", "last")

    def __init__(self) -> None:
        self.first: PodSlots | None = None
        self.last: PodSlots | None = None

    def pods(self) -> list[PodSlots]:
        """The pods in order (for tests and inspection)."""
        out = []
        pod = self.first
        while pod is not None:
            out.append(pod)
            pod = pod.next
        return out


# The two level operations are functions, not Level methods: compiled, a call of either from this
# module is a C call with no method table (the .pxd types their arguments).


def _push(level: Level, pod: PodSlots) -> None:
    """Link ``pod`` (in no level) at the end of ``level``."""
    last = level.last
    pod.prev = last
    pod.next = None
    if last is None:
        level.first = pod
    else:
        last.next = pod
    level.last = pod


def _unlink(level: Level, pod: PodSlots) -> None:
    """Take ``pod`` out of ``level`` (if linked there: a pod is only ever linked into its own level)."""
    prev = pod.prev
    after = pod.next
    if prev is None:
        if level.first is not pod:
            return
        level.first = after
    else:
        prev.next = after
        pod.prev = None
    if after is None:
        level.last = prev
    else:
        after.prev = prev
        pod.next = None


class _Gone:
    """The mark a deleted pod leaves in ``PodIndex`` (its probe sequences run on past it)."""

    __slots__ = ()


_GONE = _Gone()
_SMALLEST_INDEX = 8


class PodIndex:
    """The table's pods by UID, read like a dict (``pods[uid]``, ``get``, ``in``, ``len``, iteration
    over UIDs, ``items``, ``values``): open addressing with linear probing, the slots holding the
    PodSlots themselves (a pod's key is ``pod.record.uid``), None where never used, ``_GONE`` where a
    pod was deleted. Grown (doubled) or rebuilt when used and deleted slots pass 4/5 of the table;
    halved when the pods fall under 1/8 of it. Not on the request path: updates, exclusions, tools."""

    __slots__ = ("_filled", "_live", "_mask", "_slots")

    def __init__(self) -> None:
        self._slots: list[PodSlots | _Gone | None] = [None] * _SMALLEST_INDEX
        self._mask = _SMALLEST_INDEX - 1
        self._live = 0  # pods
        self._filled = 0  # pods and _GONE marks

    def __len__(self) -> int:
        return self._live

    def __bool__(self) -> bool:
        return self._live > 0

    def get(self, uid: str, default: PodSlots | None = None) -> PodSlots | None:
        slots = self._slots
        mask = self._mask
        at = hash(uid) & mask
        while True:
            entry = slots[at]
            if entry is None:
                return default
            if entry is not _GONE and entry.record.uid == uid:  # type: ignore[union-attr]
                return entry  # type: ignore[return-value]
            at = (at + 1) & mask

    def __getitem__(self, uid: str) -> PodSlots:
        pod = self.get(uid)
        if pod is None:
            raise KeyError(uid)
        return pod

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, str) and self.get(uid) is not None

    def __setitem__(self, uid: str, pod: PodSlots) -> None:
        if pod.record.uid != uid:
            raise ValueError(f"pod {pod.record.uid} filed under {uid}")
        slots = self._slots
        mask = self._mask
        at = hash(uid) & mask
        free = -1  # the first _GONE mark on the way: reused
        while True:
            entry = slots[at]
            if entry is None:
                break
            if entry is _GONE:
                if free < 0:
                    free = at
            elif entry.record.uid == uid:  # type: ignore[union-attr]
                slots[at] = pod
                return
            at = (at + 1) & mask
        if free >= 0:
            slots[free] = pod
        else:
            slots[at] = pod
            self._filled += 1
        self._live += 1
        if self._filled * 5 > len(slots) * 4:
            self._rebuild(len(slots) * 2 if self._live * 2 > len(slots) else len(slots))

    def __delitem__(self, uid: str) -> None:
        slots = self._slots
        mask = self._mask
        at = hash(uid) & mask
        while True:
            entry = slots[at]
            if entry is None:
                raise KeyError(uid)
            if entry is not _GONE and entry.record.uid == uid:  # type: ignore[union-attr]
                slots[at] = _GONE
                self._live -= 1
                break
            at = (at + 1) & mask
        if self._live * 8 < len(slots) and len(slots) > _SMALLEST_INDEX:
            self._rebuild(len(slots) // 2)

    def _rebuild(self, size: int) -> None:
        pods = [entry for entry in self._slots if entry is not None and entry is not _GONE]
        slots: list[PodSlots | _Gone | None] = [None] * size
        mask = size - 1
        for pod in pods:
            at = hash(pod.record.uid) & mask  # type: ignore[union-attr]
            while slots[at] is not None:
                at = (at + 1) & mask
            slots[at] = pod
        self._slots = slots
        self._mask = mask
        self._live = self._filled = len(pods)

    def values(self) -> list[PodSlots]:
        return [entry for entry in self._slots if entry is not None and entry is not _GONE]  # type: ignore[misc]

    def keys(self) -> list[str]:
        return [pod.record.uid for pod in self.values()]

    def items(self) -> list[tuple[str, PodSlots]]:
        return [(pod.record.uid, pod) for pod in self.values()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PodIndex, dict)):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"PodIndex({len(self)} pods)"


class UnreadRecords:
    """A revision's records not read yet: the writer's chunks that hold them (its revision index)
    and where the current pod table is. Read from the table of the moment, a revision always gets
    its current records; a delta that touches the revision reads them first and applies on top."""

    __slots__ = ("chunks", "name", "table")

    def __init__(self, name: str, chunks: list[int], table: Callable[[], PodTableLike]) -> None:
        self.name = name
        self.chunks = chunks
        self.table = table

    def __len__(self) -> int:
        return len(self.chunks)  # (an estimate of the pods, for warm-up slices)

    def read(self) -> list[PodRecord]:
        table = self.table()
        name = self.name
        return [record for chunk in self.chunks for record in table.chunk(chunk) if record.revision == name]


class PodTableLike(Protocol):
    def chunk(self, chunk: int) -> list[PodRecord]: ...


class PodLookup(Protocol):
    """Records by UID (a ``PodTable``, a dict)."""

    def get(self, uid: str, default: PodRecord | None = None, /) -> PodRecord | None: ...


class MemberIndex(Protocol):
    """A policy's index of a revision's pods (the Maglev table, ``fastproxy.affinity.Maglev``), kept in step."""

    def add(self, pod: PodSlots) -> None: ...

    def change(self, pod: PodSlots, record: PodRecord) -> None: ...

    def remove(self, pod: PodSlots) -> None: ...


class RevisionSlots:
    """The pods of one revision that this router knows, plus its FIFO of waiting requests."""

    __slots__ = (
        "affine",
        "affine_of",
        "affine_queued",
        "capacity",
        "inflight_total",
        "levels",
        "member_list",
        "name",
        "pending",
        "queued",
        "queued_bytes",
        "ring",
        "waiters",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.levels: list[Level] = [Level()]
        self.member_list: list[PodSlots] = []
        # The revision's records while it has no PodSlots yet (filled by a bootstrap, not yet asked
        # for): a list as the bootstrap grouped them (or where to read them), a dict by uid once a
        # delta touched one; None once materialized. Never both: no members while this is not None.
        self.pending: list[PodRecord] | dict[str, PodRecord] | UnreadRecords | None = None

        # (made by the first request that waits: most revisions never queue one)
        self.waiters: collections.deque[asyncio.Future[Lease]] | None = None
        self.queued = 0  # live (not cancelled) waiters
        self.queued_bytes = 0
        self.inflight_total = 0  # requests in flight on its pods (routable or not)
        self.capacity = 0  # slots of its routable pods
        self.ring: MemberIndex | None = None  # an affinity policy's index, once one is used
        # Requests waiting for one of a few given pods (``SlotTable.wait_for_pods``): each pod's
        # FIFO of them, and each waiter's pods; made by the first such wait.
        self.affine: dict[PodSlots, collections.deque[asyncio.Future[Lease]]] | None = None
        self.affine_of: dict[asyncio.Future[Lease], list[PodSlots]] | None = None
        self.affine_queued = 0  # live (not cancelled, not served) such waiters

    @property
    def members(self) -> dict[str, PodSlots]:
        """The revision's pods by UID (built on each call)."""
        return {pod.record.uid: pod for pod in self.member_list}

    def _add_member(self, pod: PodSlots) -> None:
        pod.index = len(self.member_list)
        self.member_list.append(pod)

    def _remove_member(self, pod: PodSlots) -> None:
        index = pod.index
        members = self.member_list
        if index < 0 or index >= len(members) or members[index] is not pod:
            return
        last = members.pop()
        if last is not pod:
            members[index] = last
            last.index = index
        pod.index = -1

    def pending_records(self) -> Iterable[PodRecord]:
        pending = self.pending
        if pending is None:
            return ()
        if isinstance(pending, UnreadRecords):
            pending = self.pending = pending.read()
        return pending.values() if isinstance(pending, dict) else pending

    def pending_by_uid(self) -> dict[str, PodRecord]:
        """The pending records as a dict (converted once, for updates)."""
        pending = self.pending
        if isinstance(pending, UnreadRecords):
            pending = pending.read()
        if not isinstance(pending, dict):
            pending = self.pending = {r.uid: r for r in pending or ()}
        return pending

    def hand_over(self, pod: PodSlots) -> bool:
        """Give one slot of ``pod``, already counted as taken, to the oldest live waiter. The
        caller has checked ``queued``; False (nobody to give it to) leaves the count to the caller."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.done():
                continue
            self.queued -= 1
            waiter.set_result((pod.release, pod.record))
            return True
        return False

    def hand_over_affine(self, pod: PodSlots) -> bool:
        """``hand_over`` to the oldest live request waiting for ``pod`` itself (``wait_for_pods``)."""
        affine = self.affine
        if affine is None:
            return False
        waiters = affine.get(pod)
        while waiters:
            waiter = waiters.popleft()
            if waiter.done():
                continue  # (served by another of its pods, or cancelled: leave_queue unlists it)
            self.affine_queued -= 1
            waiter.set_result((pod.release, pod.record))
            return True
        return False

    @property
    def inflight(self) -> int:
        return sum(p.inflight for p in self.member_list)

    @property
    def free_slots(self) -> int:
        if self.pending is not None:
            return sum(r.concurrency for r in self.pending_records() if r.state is PodState.READY)
        return sum(
            p.concurrency - p.inflight for p in self.member_list if p.routable and p.inflight < p.concurrency
        )

    def has_prospects(self) -> bool:
        """Is any pod servable now or possibly soon (not draining; removed ones are gone)?"""
        draining = PodState.DRAINING
        if self.pending is not None:
            return any(r.state is not draining for r in self.pending_records())
        return any(p.record.state is not draining for p in self.member_list)


def take(pod: PodSlots) -> None:
    """Count one more request on ``pod`` and move it up a level (or out, when full). For a routable
    pod below its concurrency (so linked into its level), as a policy picks one. (A function, not a
    method: PodSlots has no cpdef method, and a policy in another module calls this in C.)"""
    revision = pod.revision
    levels = revision.levels
    inflight = pod.inflight
    _unlink(levels[inflight], pod)
    inflight = pod.inflight = inflight + 1
    revision.inflight_total += 1
    if inflight < pod.concurrency:
        _push(levels[inflight], pod)


def least_inflight(revision: RevisionSlots) -> Lease | None:
    """Policy: the pod with the fewest requests in flight; ties go to the one idle longest."""
    levels = revision.levels
    for level in levels:
        pod = level.first
        if pod is not None:
            after = pod.next  # (the pod leaves the front of its level: Level.unlink, inlined)
            level.first = after
            if after is None:
                level.last = None
            else:
                after.prev = None
                pod.next = None
            inflight = pod.inflight = pod.inflight + 1
            revision.inflight_total += 1
            if inflight < pod.concurrency:
                _push(levels[inflight], pod)
            return (pod.release, pod.record)
    return None


Policy = Callable[[RevisionSlots], Lease | None]


class QueueFull(Exception):
    """The revision's wait queue is at its count or byte bound."""


class SlotTable:
    __slots__ = ("_excluded", "_random", "max_queue_bytes", "max_queued", "pods", "policy", "revisions")

    def __init__(
        self,
        policy: Policy = least_inflight,
        *,
        max_queued: int = 1000,
        max_queue_bytes: int = 64 * 1024 * 1024,
        seed: int | None = None,
    ) -> None:
        self.policy = policy
        self.pods = PodIndex()
        # Pods excluded locally: the generation of the record the failure was seen at. (Few at a
        # time: a dict beside, not a field in each of 50k PodSlots.)
        self._excluded: dict[str, int] = {}
        self.revisions: dict[str, RevisionSlots] = {}
        self.max_queued = max_queued
        self.max_queue_bytes = max_queue_bytes
        self._random = random.Random(seed)

    # ---- the request path ----------------------------------------------------------------

    def pick(self, revision: str) -> Lease | None:
        """A Ready pod of ``revision`` with a free slot and the callable that gives it back."""
        slots = self.revisions.get(revision)
        if slots is None:
            return None
        lease = self.policy(slots)
        if lease is None and slots.pending is not None:
            self._materialize(slots)
            lease = self.policy(slots)
        return lease

    def has_prospects(self, revision: str) -> bool:
        """May a request for ``revision`` wait for a pod (any pod that is not draining)?"""
        slots = self.revisions.get(revision)
        return slots is not None and slots.has_prospects()

    def enqueue(
        self, revision: str, body_bytes: int, loop: asyncio.AbstractEventLoop, front: bool = False
    ) -> asyncio.Future[Lease]:
        """Wait in the revision's FIFO for the next freed slot. Raises ``QueueFull``."""
        slots = self.revisions.get(revision)
        if slots is None:
            slots = self.revisions[revision] = RevisionSlots(revision)
        elif slots.pending is not None:
            self._materialize(slots)  # (so that its pods' free slots are handed to waiters)
        if slots.queued >= self.max_queued:
            raise QueueFull(f"revision {revision}: {slots.queued} requests already waiting")
        if slots.queued_bytes + body_bytes > self.max_queue_bytes:
            raise QueueFull(f"revision {revision}: {slots.queued_bytes} bytes already waiting")
        waiter: asyncio.Future[Lease] = loop.create_future()
        waiters = slots.waiters
        if waiters is None:
            waiters = slots.waiters = collections.deque()
        if front:
            waiters.appendleft(waiter)
        else:
            waiters.append(waiter)
        slots.queued += 1
        slots.queued_bytes += body_bytes
        return waiter

    def wait_for_pods(
        self, revision: str, pods: list[PodSlots], body_bytes: int, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[Lease] | None:
        """Wait for the next slot freed on any of ``pods`` (routable members of ``revision``): an
        affinity policy's bounded wait for the pods that likely hold a prompt's KV cache
        (``fastproxy.affinity.pick_or_wait``). A freed slot goes to the revision's FIFO first
        (those requests found no free pod at all), then to the pod's oldest such waiter. Bounded:
        each pod has at most ``concurrency`` waiters (one more would wait longer than a whole
        request of it), and they count towards the revision's ``max_queued`` and
        ``max_queue_bytes``. None when a bound leaves no pod to wait for: the caller picks any
        free pod. ``leave_queue`` ends the wait, as for a FIFO waiter."""
        slots = self.revisions.get(revision)
        if slots is None or slots.queued + slots.affine_queued >= self.max_queued:
            return None
        if slots.queued_bytes + body_bytes > self.max_queue_bytes:
            return None
        affine = slots.affine
        if affine is None:
            affine = slots.affine = {}
            slots.affine_of = {}
        chosen = [pod for pod in pods if pod.revision is slots and len(affine.get(pod, ())) < pod.concurrency]
        if not chosen:
            return None
        waiter: asyncio.Future[Lease] = loop.create_future()
        for pod in chosen:
            waiters = affine.get(pod)
            if waiters is None:
                waiters = affine[pod] = collections.deque()
            waiters.append(waiter)
        slots.affine_of[waiter] = chosen  # type: ignore[index]
        slots.affine_queued += 1
        slots.queued_bytes += body_bytes
        return waiter

    def leave_queue(self, revision: str, waiter: asyncio.Future[Lease], body_bytes: int) -> None:
        """The waiter stops waiting (served, deadline, client gone). A slot it was handed but will
        not use goes back. Idempotent per waiter only if called once; the router calls it once."""
        slots = self.revisions.get(revision)
        if slots is None:
            return
        slots.queued_bytes -= body_bytes
        if slots.affine_of and waiter in slots.affine_of:
            self._leave_affine(slots, waiter)
            return
        if waiter.done():
            if not waiter.cancelled():
                return  # it was handed a slot; the caller owns it now
        else:
            waiter.cancel()
            slots.queued -= 1

    def _leave_affine(self, slots: RevisionSlots, waiter: asyncio.Future[Lease]) -> None:
        """``leave_queue`` for a ``wait_for_pods`` waiter: off every pod's list (so the lists hold
        only live waiters, at most ``concurrency`` each), its wait counted off unless served."""
        affine = slots.affine
        assert affine is not None and slots.affine_of is not None
        for pod in slots.affine_of.pop(waiter):
            waiters = affine.get(pod)
            if waiters is not None:
                if waiter in waiters:  # (else popped by the hand-over that served it, or skipped as done)
                    waiters.remove(waiter)
                if not waiters:
                    del affine[pod]
        if not waiter.done():
            waiter.cancel()
            slots.affine_queued -= 1

    # ---- the state path ------------------------------------------------------------------

    def update(self, records: Iterable[PodRecord], previous: PodLookup | None = None) -> None:
        """Reconcile the pods a delta changed. O(len(records)). ``previous``: the records as they
        were before (the router's snapshot before the delta), for a pod still pending whose record
        moved to another revision: its old revision's pending records are not indexed by UID, so
        only the old record says where to take it from. (A pod with PodSlots knows its revision.)"""
        entering: list[PodSlots] = []
        excluded = self._excluded
        for record in records:
            pod = self.pods.get(record.uid)
            if pod is None:
                if previous is not None:
                    self._leave_old_pending(record, previous)
                revision = self.revisions.get(record.revision)
                if revision is not None and revision.pending is not None:
                    self._update_pending(revision, record)
                    continue
            if record.state is PodState.REMOVED:
                if pod is not None:
                    self._forget(pod)
                continue
            if pod is None:
                if revision is None:
                    revision = self.revisions[record.revision] = RevisionSlots(record.revision)
                pod = self.pods[record.uid] = PodSlots(record, revision)
                revision._add_member(pod)
                if revision.ring is not None:
                    revision.ring.add(pod)
            elif pod.revision.name != record.revision:
                self._move(pod, record)  # (out of rotation: re-entered below if routable)
            else:
                if pod.revision.ring is not None:
                    pod.revision.ring.change(pod, record)
                if pod.concurrency != record.concurrency and pod.routable:
                    pod._leave()  # re-levelled below with the new concurrency
            pod.record = record
            pod.concurrency = record.concurrency
            routable = record.state is PodState.READY
            if routable and excluded:
                seen_at = excluded.get(record.uid)
                if seen_at is not None:
                    if record.generation > seen_at:
                        del excluded[record.uid]  # (the writer's view moved past the failure)
                    else:
                        routable = False
            if routable and not pod.routable:
                entering.append(pod)
            elif not routable and pod.routable:
                pod._leave()
        if len(entering) > 1:
            # Routers would otherwise all see pods in the writer's order and pile onto the same one.
            self._random.shuffle(entering)
        for pod in entering:
            pod._enter()

    def _move(self, pod: PodSlots, record: PodRecord) -> None:
        """The pod's record moved to another revision (same UID): out of the old one's levels,
        members and index, into the new one's members, its in-flight requests with it (their
        releases go to the pod, so to its revision of the moment). Left out of rotation: the
        caller re-enters it if it is routable."""
        old = pod.revision
        if pod.routable:
            pod._leave()
        old._remove_member(pod)
        if old.ring is not None:
            old.ring.remove(pod)
        old.inflight_total -= pod.inflight
        revision = self.revisions.get(record.revision)
        if revision is None:
            revision = self.revisions[record.revision] = RevisionSlots(record.revision)
        elif revision.pending is not None:
            self._materialize(revision)  # (a pod with PodSlots cannot join pending records)
        pod.revision = revision
        pod.record = record
        pod.concurrency = record.concurrency
        revision.inflight_total += pod.inflight
        revision._add_member(pod)
        if revision.ring is not None:
            revision.ring.add(pod)
        self._drop_if_unused(old)

    def _leave_old_pending(self, record: PodRecord, previous: PodLookup) -> None:
        """A pod without PodSlots whose record moved revision leaves its old revision's pending
        records (else that revision, materialized, would give it PodSlots there too)."""
        before = previous.get(record.uid)
        if before is None or before.revision == record.revision:
            return
        revision = self.revisions.get(before.revision)
        if revision is not None and revision.pending is not None:
            revision.pending_by_uid().pop(record.uid, None)
            self._drop_if_unused(revision)

    def replace_all(self, records: Iterable[PodRecord]) -> None:
        """Reconcile with a whole state (resync): pods not in it are forgotten."""
        if not self.pods and not self.revisions:
            self._fill(records)
            return
        records = list(records)
        keep = {r.uid: r.revision for r in records}
        pods = self.pods
        for uid in [uid for uid in pods if uid not in keep]:
            self._forget(pods[uid])
        # A resync re-reads every pod and nearly all are as we have them: reconcile only the others
        # (a record compare is a fraction of an update; at 50k pods this was a 100 ms stall).
        records = [r for r in records if (pod := pods.get(r.uid)) is None or pod.record != r]
        for revision in list(self.revisions.values()):
            if revision.pending is not None:
                pending = revision.pending_by_uid()
                name = revision.name
                # gone, or moved to another revision (its record in ``records`` enters that one)
                for uid in [uid for uid in pending if keep.get(uid) != name]:
                    del pending[uid]
                self._drop_if_unused(revision)
        self.update(records)

    def adopt(self, by_revision: Mapping[str, list[PodRecord] | UnreadRecords]) -> None:
        """Install a whole state already grouped per revision (``SnapshotBuilder.by_revision``, or
        where to read each revision's records) into a table that knows no pod yet; they become the
        revisions' pending records as they are (the caller hands them over)."""
        if self.pods or self.revisions:
            raise RuntimeError("adopt() is for an empty slot table; use replace_all()")
        revisions = self.revisions
        for name, members in by_revision.items():
            if members:
                revision = revisions[name] = RevisionSlots(name)
                revision.pending = members

    def adopt_unread(
        self, revision_chunks: Mapping[str, list[int]], table: Callable[[], PodTableLike]
    ) -> None:
        """``adopt`` a state not decoded yet: per revision, the chunks holding its pods (the
        writer's index), read from ``table`` (the router's current pod table) when first needed."""
        self.adopt({name: UnreadRecords(name, chunks, table) for name, chunks in revision_chunks.items()})

    def _fill(self, records: Iterable[PodRecord]) -> None:
        """``update`` for a table that knows no pod yet (bootstrap): group the records per revision,
        pending until each revision is first asked for."""
        revisions = self.revisions
        removed = PodState.REMOVED
        for record in records:
            if record.state is removed:
                continue
            revision = revisions.get(record.revision)
            if revision is None:
                revision = revisions[record.revision] = RevisionSlots(record.revision)
                revision.pending = {record.uid: record}
            else:
                revision.pending_by_uid()[record.uid] = record

    def materialize_pending(self, budget: int) -> int:
        """Materialize pending revisions until about ``budget`` pods got slots (a bootstrapped
        router warms up between requests, so first requests rarely pay for it); returns how many
        pods were done, 0 when nothing is pending any more. One revision is never split."""
        done = 0
        for revision in self.revisions.values():
            if revision.pending is not None:
                done += len(revision.pending)
                self._materialize(revision)
                if done >= budget:
                    break
        return done

    def _materialize(self, revision: RevisionSlots) -> None:
        """Give a pending revision its PodSlots, its Ready pods into rotation.

        Instead of one shuffle of the entering pods, they enter rotated by a random offset: routers
        still start on different pods, and, picking in the same cyclic order, tend to stay apart."""
        if revision.pending is None:
            return
        records = revision.pending_records()
        revision.pending = None
        pods = self.pods
        members = revision.member_list
        entering: list[PodSlots] = []
        ready = PodState.READY
        for record in records:
            pod = pods[record.uid] = PodSlots(record, revision)
            pod.index = len(members)
            members.append(pod)
            if record.state is ready:
                entering.append(pod)
        if len(entering) > 1:
            cut = self._random.randrange(len(entering))
            entering = entering[cut:] + entering[:cut]
        if revision.queued:
            for pod in entering:
                pod._enter()
            return
        # (no waiters: straight into level 0, the levels grown once for the largest pod)
        levels = revision.levels
        level = levels[0]
        for pod in entering:
            pod.routable = True
            revision.capacity += pod.concurrency
            _push(level, pod)
            while len(levels) < pod.concurrency:
                levels.append(Level())

    def _update_pending(self, revision: RevisionSlots, record: PodRecord) -> None:
        pending = revision.pending_by_uid()
        if record.state is PodState.REMOVED:
            pending.pop(record.uid, None)
            self._drop_if_unused(revision)
        else:
            pending[record.uid] = record

    def _drop_if_unused(self, revision: RevisionSlots) -> None:
        if (
            not revision.member_list
            and not revision.pending
            and not revision.queued
            and not revision.affine_queued
        ):
            self.revisions.pop(revision.name, None)

    def exclude(self, uid: str) -> bool:
        """Take a pod out of rotation after a transport failure seen at its current generation.
        (A pod of a pending revision was never picked, so nothing can have failed on it.)"""
        pod = self.pods.get(uid)
        if pod is None:
            return False
        self._excluded[uid] = pod.record.generation
        if pod.routable:
            pod._leave()
        return True

    def readmit(self, uid: str) -> None:
        """Lift a local exclusion (its time is up); the pod is routable again if Ready."""
        if self._excluded.pop(uid, None) is None:
            return
        pod = self.pods.get(uid)
        if pod is not None and pod.record.state is PodState.READY and not pod.routable:
            pod._enter()

    def _forget(self, pod: PodSlots) -> None:
        if pod.routable:
            pod._leave()
        uid = pod.record.uid
        del self.pods[uid]
        self._excluded.pop(uid, None)
        revision = pod.revision
        revision._remove_member(pod)
        if revision.ring is not None:
            revision.ring.remove(pod)
        self._drop_if_unused(revision)
