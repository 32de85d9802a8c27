"""The routing snapshot: an immutable, versioned view of all pods and routes.

Theory of operation
-------------------
A ``RoutingSnapshot`` is never mutated. A router holds exactly one reference to the current
snapshot and replaces it with one assignment; a request reads that reference once and uses the
object it got, so it never sees half of a change.

Deltas from the writer are applied with ``apply(delta)``, which returns a *new* snapshot that shares
structure with the old one. Pods live in a ``PodTable``: the writer's own packing of pods into
``POD_CHUNKS`` chunks (``statesync.keys.pod_chunk``), as two levels of 64-entry lists over small
per-chunk dicts. One changed pod costs a copy of its chunk's dict (about a dozen pods) and of the
two short lists above it, not a copy of the table; and a whole state read from ``{ns}:pod-chunks``
becomes a table with one dict per chunk and no per-pod hashing or tree insertion (the point: a
router bootstraps 50k pods in tens of milliseconds). Routes change rarely; the compiled
``RouteTable`` is rebuilt only when a delta carries route changes.

The snapshot keeps no per-revision index: the router's ``SlotTable`` groups pods per revision for
the request path (lazily, per revision), and ``revisions`` builds the grouping on first use for
views (admin, dashboard).

A delta applies only on top of the version just before it (``version == self.version + 1``);
anything else raises ``VersionGap`` and the caller (the subscriber) fills the gap or resyncs.
REMOVED records are tombstones in the writer; the snapshot simply forgets those pods.

A whole state (bootstrap, resync) is assembled by a ``SnapshotBuilder`` from chunks (or records)
added in slices, so the caller may yield to its event loop between them. A starting router may
also give it the chunks *as read* (``add_packed_chunk``): a chunk then stays the bytes the writer
packed until something reads it (a lookup, a delta, a revision's first use, the background warm-up),
and is decoded then, once, in place -- the decoded list replaces the bytes in the table (and in any
snapshot sharing that part of it): the same records either way, so no reader can tell.

The module is compiled with the data path (``fastproxy.compiled``; types in ``snapshot.pxd``): the
compiled ``Exchange`` calls ``RouteTable.match`` and ``ServiceRoute.choose_revision`` as C calls
and reads the snapshot's and the route table's fields as C struct fields.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from random import random as _random
from typing import Final

import immutables

from fastproxy.llm import LLMRoute
from statesync.keys import POD_CHUNKS, pod_chunk
from statesync.schema import Delta, PodRecord, PodState, Route, SchemaError, decode_pods

log = logging.getLogger("fastproxy.snapshot")
Leaf = list[PodRecord] | bytes  # a chunk: its records, or still as the writer packed them


def chunk_digest(raw: bytes) -> int:
    """What a chunk read as ``raw`` is remembered by: its 64-bit hash (SipHash, keyed per process),
    not the bytes themselves (6.8 MB at 50k pods, kept only to be compared). Two different chunks
    compare equal with a chance of 2**-64; a cryptographic digest cost a running router's re-read
    15x more (a re-read compares all 4096 chunks: ~2 ms this way, ~15 ms with BLAKE2b)."""
    return hash(raw)


class ReadChunk(list):  # type: ignore[type-arg]  # (a list[PodRecord]; Cython needs the bare base)
    """A chunk's records as decoded from a full read, with the digest of the bytes they were decoded
    from. A later full read that finds the same bytes for the chunk keeps this very list (no decode,
    nothing to reconcile); a delta replaces the chunk with a plain list, so ``digest`` never
    outlives its truth."""

    __slots__ = ("digest",)

    def __init__(self, records: list[PodRecord], raw: bytes) -> None:
        super().__init__(records)
        self.digest: int = chunk_digest(raw)


def _read_leaf(raw: bytes) -> list[PodRecord]:
    """Decode a chunk kept packed since the bootstrap. The bytes were read in one consistent read
    of the writer's state; should they not decode, the chunk's pods are left out (and said so)
    rather than failing whatever request or delta got here first."""
    try:
        records = decode_pods(raw)
    except SchemaError as exc:
        log.error("a pod chunk read at bootstrap does not decode (%s): its pods are left out until "
                  "the next full read", exc)  # fmt: skip
        return []
    removed = PodState.REMOVED
    if any(r.state is removed for r in records):  # (the writer keeps none there)
        records = [r for r in records if r.state is not removed]
    return ReadChunk(records, raw)


def packed_length(raw: bytes) -> int:
    """The number of records in a packed chunk, from its msgpack array header alone."""
    first = raw[0] if raw else 0
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(raw) >= 3:
        return int.from_bytes(raw[1:3], "big")
    if first == 0xDD and len(raw) >= 5:
        return int.from_bytes(raw[1:5], "big")
    raise SchemaError(f"a pod chunk is not a msgpack array (starts with {raw[:1]!r})")


class VersionGap(Exception):
    """The delta does not follow this snapshot's version."""

    def __init__(self, have: tuple[int, int], got: tuple[int, int]) -> None:
        super().__init__(f"delta epoch/version {got} does not follow snapshot {have}")
        self.have = have
        self.got = got


class ServiceRoute:
    """A route compiled for matching: its revisions with a cumulative weight table."""

    __slots__ = ("cumulative", "llm", "prefix", "revisions", "route", "service", "total")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.service = route.service
        # An LLM route reads the body before it picks (fastproxy.llm); None for every other route.
        self.llm = LLMRoute(route.service, route.llm) if route.llm is not None else None
        self.prefix = route.path_prefix
        live = [r for r in route.revisions if r.weight > 0]
        self.revisions: tuple[str, ...] = tuple(r.revision for r in live)
        self.cumulative: tuple[int, ...] = tuple(itertools.accumulate(r.weight for r in live))
        self.total: int = self.cumulative[-1] if self.cumulative else 0

    def choose_revision(self, draw: float) -> str:
        """Pick a revision by weight; ``draw`` is uniform in [0, 1)."""
        revisions = self.revisions
        if len(revisions) == 1:
            return revisions[0]
        return revisions[bisect.bisect_right(self.cumulative, draw * self.total)]

    def pick_revision(self) -> str:
        """``choose_revision`` with a fresh draw; a route with one revision (most) draws none."""
        revisions = self.revisions
        if len(revisions) == 1:
            return revisions[0]
        return self.choose_revision(_random())


def _by_longest_prefix(routes: list[ServiceRoute]) -> tuple[ServiceRoute, ...]:
    return tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))


class RouteTable:
    """Host (exact, then ``*.suffix`` wildcard, then any) and longest path prefix, or a service
    named directly by header. Hosts are matched lower-case and without a port."""

    __slots__ = ("any_host", "by_service", "exact", "wildcard")

    def __init__(self, routes: Iterable[Route]) -> None:
        exact: dict[str, list[ServiceRoute]] = {}
        wildcard: dict[str, list[ServiceRoute]] = {}
        any_host: list[ServiceRoute] = []
        self.by_service: dict[str, ServiceRoute] = {}
        for route in routes:
            if route.removed:
                continue
            compiled = ServiceRoute(route)
            self.by_service[route.service] = compiled
            if not route.hosts:
                any_host.append(compiled)
            for host in route.hosts:
                host = host.lower()
                if host.startswith("*."):
                    wildcard.setdefault(host[1:], []).append(compiled)  # key ".example.com"
                else:
                    exact.setdefault(host, []).append(compiled)
        self.exact = {h: _by_longest_prefix(rs) for h, rs in exact.items()}
        self.wildcard = {h: _by_longest_prefix(rs) for h, rs in wildcard.items()}
        self.any_host = _by_longest_prefix(any_host)

    def match(self, host: str, path: str) -> ServiceRoute | None:
        candidates = self.exact.get(host)
        if candidates is not None:
            found = _first_prefix(candidates, path)
            if found is not None:
                return found
        if self.wildcard:
            dot = host.find(".")
            while dot != -1:
                candidates = self.wildcard.get(host[dot:])
                if candidates is not None:
                    found = _first_prefix(candidates, path)
                    if found is not None:
                        return found
                dot = host.find(".", dot + 1)
        return _first_prefix(self.any_host, path)


def _first_prefix(candidates: tuple[ServiceRoute, ...], path: str) -> ServiceRoute | None:
    for candidate in candidates:
        prefix = candidate.prefix
        if path.startswith(prefix):
            length = len(prefix)
            if len(path) == length or prefix.endswith("/") or path[length] in "/?":
                return candidate
    return None


class PodTable:
    """uid -> PodRecord, immutable, stored the way the writer packs pods (``statesync.keys``).

    Two levels of plain lists over the writer's ``POD_CHUNKS`` chunks (64 x 64), each chunk the
    short list of its records (about 12 at 50k pods), found by a scan. A whole state is assembled
    from the chunks as they are read and decoded -- the decoder's lists are the chunks, with no
    per-pod hashing or insertion; ``with_changes`` copies only the chunks a delta touched and the
    two 64-entry lists above them. Nothing in a published table is ever mutated: a copy is made
    before any write."""

    __slots__ = ("_count", "_outer")

    def __init__(self, outer: list[list[Leaf]], count: int) -> None:
        self._outer = outer
        self._count = count

    @classmethod
    def empty(cls) -> PodTable:
        return cls([_EMPTY_INNER] * _FANOUT, 0)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def chunk(self, chunk: int) -> list[PodRecord]:
        """The records of one of the writer's chunks (decoded now if still packed)."""
        inner = self._outer[chunk >> _SHIFT]
        leaf = inner[chunk & _MASK]
        if type(leaf) is bytes:
            leaf = inner[chunk & _MASK] = _read_leaf(leaf)
        return leaf  # type: ignore[return-value]

    def same_as_read(self, chunk: int, raw: bytes) -> Leaf | None:
        """This table's chunk if it holds exactly what ``raw`` packs (it was read as these very
        bytes and no delta touched it since), else None."""
        leaf = self._outer[chunk >> _SHIFT][chunk & _MASK]
        if type(leaf) is bytes:
            return leaf if leaf == raw else None
        if type(leaf) is ReadChunk and leaf.digest == chunk_digest(raw):
            return leaf
        return None

    def occupied_chunks(self) -> Iterator[int]:
        """The numbers of the chunks that hold pods (or are still packed)."""
        for high, inner in enumerate(self._outer):
            if inner is not _EMPTY_INNER:
                for low, leaf in enumerate(inner):
                    if leaf:
                        yield high << _SHIFT | low

    def decode_packed(self, start: int, budget: int) -> int:
        """Decode up to ``budget`` chunks still packed, from chunk ``start`` on; the chunk to go on
        from, or -1 when none is left packed (a background warm-up, a slice at a time)."""
        outer = self._outer
        for chunk in range(start, POD_CHUNKS):
            inner = outer[chunk >> _SHIFT]
            if inner is _EMPTY_INNER:
                continue
            leaf = inner[chunk & _MASK]
            if type(leaf) is bytes:
                if budget <= 0:
                    return chunk
                inner[chunk & _MASK] = _read_leaf(leaf)
                budget -= 1
        return -1

    def get(self, uid: str, default: PodRecord | None = None) -> PodRecord | None:
        for record in self.chunk(pod_chunk(uid)):
            if record.uid == uid:
                return record
        return default

    def __getitem__(self, uid: str) -> PodRecord:
        record = self.get(uid)
        if record is None:
            raise KeyError(uid)
        return record

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, str) and self.get(uid) is not None

    def values(self) -> Iterator[PodRecord]:
        for inner in self._outer:
            if inner is not _EMPTY_INNER:
                for at, leaf in enumerate(inner):
                    if type(leaf) is bytes:
                        leaf = inner[at] = _read_leaf(leaf)
                    yield from leaf  # type: ignore[misc]

    def keys(self) -> Iterator[str]:
        for record in self.values():
            yield record.uid

    def __iter__(self) -> Iterator[str]:  # (a def: an extension type's iteration slot needs one)
        return self.keys()

    def items(self) -> Iterator[tuple[str, PodRecord]]:
        for record in self.values():
            yield record.uid, record

    def with_changes(self, records: Iterable[PodRecord]) -> PodTable:
        """A new table with ``records`` set (REMOVED ones forgotten); shares every untouched chunk."""
        outer = list(self._outer)
        copied: dict[int, list[PodRecord]] = {}
        inners: set[int] = set()
        count = self._count
        removed = PodState.REMOVED
        for record in records:
            uid = record.uid
            chunk = pod_chunk(uid)
            leaf = copied.get(chunk)
            if leaf is None:
                high = chunk >> _SHIFT
                if high not in inners:
                    inners.add(high)
                    outer[high] = list(outer[high])
                inner = outer[high]
                was = inner[chunk & _MASK]
                leaf = copied[chunk] = inner[chunk & _MASK] = list(
                    _read_leaf(was) if type(was) is bytes else was  # type: ignore[arg-type]
                )
            for at, old in enumerate(leaf):
                if old.uid == uid:
                    if record.state is removed:
                        del leaf[at]
                        count -= 1
                    else:
                        leaf[at] = record
                    break
            else:
                if record.state is not removed:
                    leaf.append(record)
                    count += 1
        return PodTable(outer, count)


_SHIFT: Final = 6
_FANOUT: Final = POD_CHUNKS >> _SHIFT
_MASK: Final = (1 << _SHIFT) - 1
assert _FANOUT << _SHIFT == POD_CHUNKS and _FANOUT == 64
_EMPTY_LEAF: Final[list[PodRecord]] = []  # shared; never written (writes copy first)
_EMPTY_INNER: Final[list[Leaf]] = [_EMPTY_LEAF] * _FANOUT


class SnapshotBuilder:
    """A whole state assembled from records added in any number of slices, then ``finish``.

    ``add_chunk`` takes a chunk of ``{ns}:pod-chunks`` as decoded: the decoder's list becomes the
    table's chunk as it is (the writer keeps only live records there, and the records already
    belong to that chunk). ``add`` takes records from anywhere. Both also group the records per
    revision into ``by_revision`` (fresh lists the builder hands over: ``Router.install`` gives
    them to its ``SlotTable`` as they are) while the records are still in the CPU's caches -- a
    second pass over 50k records scattered in memory costs several times as much. (Lists, not
    dicts: inserting into a dict hashes each uid, one more cache miss per pod.)"""

    __slots__ = ("_count", "_group", "_outer", "by_revision")

    def __init__(self, *, group: bool = True) -> None:
        """``group=False``: do not group per revision (a running router reconciles its slots with
        the snapshot's pods instead, and the grouping was a fifth of a resync)."""
        self._outer: list[list[Leaf]] = [[_EMPTY_LEAF] * _FANOUT for _ in range(_FANOUT)]
        self._count = 0
        self._group = group
        self.by_revision: collections.defaultdict[str, list[PodRecord]] = collections.defaultdict(list)

    def add_unchanged(self, chunk: int, leaf: Leaf) -> None:
        """Take a chunk of the current table as it is (``PodTable.same_as_read`` found it unchanged)."""
        inner = self._outer[chunk >> _SHIFT]
        if inner[chunk & _MASK]:
            raise ValueError(f"pod chunk {chunk} added twice")
        inner[chunk & _MASK] = leaf
        self._count += packed_length(leaf) if type(leaf) is bytes else len(leaf)

    def add_chunk(self, chunk: int, records: list[PodRecord], raw: bytes | None = None) -> None:
        """Take the decoded chunk ``chunk`` (the list is handed over, not copied); ``raw``, the bytes
        it was decoded from, lets a later full read recognise it unchanged."""
        if not 0 <= chunk < POD_CHUNKS:
            raise ValueError(f"pod chunk {chunk} outside 0..{POD_CHUNKS - 1}")
        inner = self._outer[chunk >> _SHIFT]
        if inner[chunk & _MASK]:
            self.add(records)  # (the chunk came twice: take the general path)
            return
        by_revision = self.by_revision
        removed = PodState.REMOVED
        kept = records
        if not self._group:
            if any(record.state is removed for record in records):
                kept = []  # (the writer keeps none there; should one be, skip it)
        else:
            for record in records:
                if record.state is removed:
                    kept = []
                    continue
                by_revision[record.revision].append(record)
        if kept is not records:
            kept = [r for r in records if r.state is not removed]
        elif raw is not None:
            kept = ReadChunk(records, raw)
        inner[chunk & _MASK] = kept
        self._count += len(kept)

    def add_packed_chunk(self, chunk: int, raw: bytes) -> None:
        """Take chunk ``chunk`` as the writer packed it, undecoded (decoded on first use; not
        grouped into ``by_revision``: the caller has the writer's revision index instead)."""
        if not 0 <= chunk < POD_CHUNKS:
            raise ValueError(f"pod chunk {chunk} outside 0..{POD_CHUNKS - 1}")
        count = packed_length(raw)
        inner = self._outer[chunk >> _SHIFT]
        if inner[chunk & _MASK]:
            self.add(decode_pods(raw))  # (the chunk came twice: take the general path)
            return
        inner[chunk & _MASK] = raw
        self._count += count

    def add(self, records: Iterable[PodRecord]) -> None:
        """Records in any order and chunk; a later record of a uid replaces the earlier one."""
        outer = self._outer
        replaced = False
        for record in records:
            uid = record.uid
            chunk = pod_chunk(uid)
            inner = outer[chunk >> _SHIFT]
            leaf = inner[chunk & _MASK]
            if leaf is _EMPTY_LEAF:
                leaf = inner[chunk & _MASK] = []
            elif type(leaf) is bytes:
                leaf = inner[chunk & _MASK] = _read_leaf(leaf)
            assert type(leaf) is list
            for at, old in enumerate(leaf):
                if old.uid == uid:
                    del leaf[at]
                    self._count -= 1
                    replaced = True
                    break
            if record.state is not PodState.REMOVED:
                leaf.append(record)
                self._count += 1
                if self._group:
                    self.by_revision[record.revision].append(record)
        if replaced and self._group:  # (rare: regroup so that by_revision holds only the records kept)
            self.by_revision.clear()
            for inner in outer:
                for at, leaf in enumerate(inner):
                    if isinstance(leaf, bytes):
                        leaf = inner[at] = _read_leaf(leaf)
                    for record in leaf:
                        self.by_revision[record.revision].append(record)

    def __len__(self) -> int:
        return self._count

    def finish(self, epoch: int, version: int, routes: Iterable[Route] = ()) -> RoutingSnapshot:
        outer = [inner if any(inner) else _EMPTY_INNER for inner in self._outer]
        return RoutingSnapshot(
            epoch,
            version,
            PodTable(outer, self._count),
            immutables.Map({r.service: r for r in routes if not r.removed}),
        )


class RoutingSnapshot:
    __slots__ = ("_revisions", "epoch", "pods", "route_table", "routes", "version")

    def __init__(
        self,
        epoch: int,
        version: int,
        pods: PodTable,
        routes: immutables.Map[str, Route],
        route_table: RouteTable | None = None,
    ) -> None:
        self.epoch = epoch
        self.version = version
        self.pods = pods
        self.routes = routes
        self.route_table = route_table if route_table is not None else RouteTable(routes.values())
        self._revisions: dict[str, dict[str, PodRecord]] | None = None

    @classmethod
    def empty(cls) -> RoutingSnapshot:
        return cls(0, 0, PodTable.empty(), immutables.Map())

    @classmethod
    def build(
        cls, epoch: int, version: int, pods: Iterable[PodRecord], routes: Iterable[Route] = ()
    ) -> RoutingSnapshot:
        """A whole state read at once (bootstrap, resync, a static routes file)."""
        builder = SnapshotBuilder()
        builder.add(pods)
        return builder.finish(epoch, version, routes)

    def apply(self, delta: Delta) -> RoutingSnapshot:
        """A new snapshot with ``delta`` applied; costs O(changed pods)."""
        if delta.version != self.version + 1 or delta.epoch < self.epoch:
            raise VersionGap((self.epoch, self.version), (delta.epoch, delta.version))
        pods = self.pods.with_changes(delta.pods) if delta.pods else self.pods
        routes = self.routes
        route_table: RouteTable | None = self.route_table
        if delta.routes:
            routes_mutation = routes.mutate()
            for route in delta.routes:
                if route.removed:
                    routes_mutation.pop(route.service, None)
                else:
                    routes_mutation[route.service] = route
            routes = routes_mutation.finish()
            route_table = None  # recompiled by the constructor
        return RoutingSnapshot(delta.epoch, delta.version, pods, routes, route_table)

    @property
    def revisions(self) -> Mapping[str, Mapping[str, PodRecord]]:
        """The pods grouped per revision: built on first use, O(pods), for views (admin, dev, tests).

        The request path never needs it: the router's ``SlotTable`` keeps its own per-revision
        view, so a bootstrap or a delta never pays for this grouping."""
        revisions = self._revisions
        if revisions is None:
            revisions = {}
            for uid, record in self.pods.items():
                members = revisions.get(record.revision)
                if members is None:
                    revisions[record.revision] = {uid: record}
                else:
                    members[uid] = record
            self._revisions = revisions
        return revisions

    def revision_pods(self, revision: str) -> Mapping[str, PodRecord]:
        return self.revisions.get(revision, _NO_PODS)

    def has_prospects(self, revision: str) -> bool:
        """Is any pod of the revision servable now or possibly soon (not draining/removed)?
        (O(pods) the first time per snapshot; the router asks its ``SlotTable`` instead.)"""
        return any(p.state is not PodState.DRAINING for p in self.revision_pods(revision).values())


_NO_PODS: Final[Mapping[str, PodRecord]] = immutables.Map()
