"""The routing snapshot: an immutable, versioned view of all pods and routes.

Theory of operation
-------------------
A ``RoutingSnapshot`` is never mutated. A router holds exactly one reference to the current
snapshot and replaces it with one assignment; a request reads that reference once and uses the
object it got, so it never sees half of a change.

Deltas from the writer are applied with ``apply(delta)``, which returns a *new* snapshot that shares
structure with the old one: pods live in an ``immutables.Map`` (a HAMT), so one changed pod costs
O(log32 n) new nodes, not a copy. Pods are also grouped per revision in small per-revision Maps, and
only the revisions a delta touched are rebuilt. Routes change rarely; the compiled ``RouteTable``
is rebuilt only when a delta carries route changes.

A delta applies only on top of the version just before it (``version == self.version + 1``);
anything else raises ``VersionGap`` and the caller (the subscriber) fills the gap or resyncs.
REMOVED records are tombstones in the writer; the snapshot simply forgets those pods.

A whole state (bootstrap, resync) is assembled by a ``SnapshotBuilder`` in one pass over the
records: the pod Map is filled through its mutation API (in place, no intermediate dict), the
per-revision groups are plain dicts frozen into Maps once at the end. The records can be added in
slices, so the caller may yield to its event loop between them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from typing import Final

import immutables

from statesync.schema import Delta, PodRecord, PodState, Route

EMPTY_MAP: Final[immutables.Map[str, PodRecord]] = immutables.Map()


class VersionGap(Exception):
    """The delta does not follow this snapshot's version."""

    def __init__(self, have: tuple[int, int], got: tuple[int, int]) -> None:
        super().__init__(f"delta epoch/version {got} does not follow snapshot {have}")
        self.have = have
        self.got = got


class ServiceRoute:
    """A route compiled for matching: its revisions with a cumulative weight table."""

    __slots__ = ("cumulative", "prefix", "revisions", "route", "service", "total")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.service = route.service
        self.prefix = route.path_prefix
        live = [r for r in route.revisions if r.weight > 0]
        self.revisions: tuple[str, ...] = tuple(r.revision for r in live)
        self.cumulative: tuple[int, ...] = tuple(itertools.accumulate(r.weight for r in live))
        self.total: int = self.cumulative[-1] if self.cumulative else 0

    def choose_revision(self, draw: float) -> str:
        """Pick a revision by weight; ``draw`` is uniform in [0, 1)."""
        if len(self.revisions) == 1:
            return self.revisions[0]
        return self.revisions[bisect.bisect_right(self.cumulative, draw * self.total)]


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
        if path.startswith(prefix) and (
            len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] in "/?"
        ):
            return candidate
    return None


class SnapshotBuilder:
    """A whole state assembled from records added in any number of slices, then ``finish``."""

    __slots__ = ("_by_revision", "_pods")

    def __init__(self) -> None:
        self._pods: immutables.MapMutation[str, PodRecord] = EMPTY_MAP.mutate()
        self._by_revision: dict[str, dict[str, PodRecord]] = {}

    def add(self, records: Iterable[PodRecord]) -> None:
        pods = self._pods
        by_revision = self._by_revision
        for record in records:
            if record.state is PodState.REMOVED:
                continue
            uid = record.uid
            pods[uid] = record
            members = by_revision.get(record.revision)
            if members is None:
                by_revision[record.revision] = {uid: record}
            else:
                members[uid] = record

    def __len__(self) -> int:
        return len(self._pods)

    def finish(self, epoch: int, version: int, routes: Iterable[Route] = ()) -> RoutingSnapshot:
        revisions = immutables.Map(
            {rev: immutables.Map(members) for rev, members in self._by_revision.items()}
        )
        return RoutingSnapshot(
            epoch,
            version,
            self._pods.finish(),
            revisions,
            immutables.Map({r.service: r for r in routes if not r.removed}),
        )


class RoutingSnapshot:
    __slots__ = ("epoch", "pods", "revisions", "route_table", "routes", "version")

    def __init__(
        self,
        epoch: int,
        version: int,
        pods: immutables.Map[str, PodRecord],
        revisions: immutables.Map[str, immutables.Map[str, PodRecord]],
        routes: immutables.Map[str, Route],
        route_table: RouteTable | None = None,
    ) -> None:
        self.epoch = epoch
        self.version = version
        self.pods = pods
        self.revisions = revisions
        self.routes = routes
        self.route_table = route_table if route_table is not None else RouteTable(routes.values())

    @classmethod
    def empty(cls) -> RoutingSnapshot:
        return cls(0, 0, immutables.Map(), immutables.Map(), immutables.Map())

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
        pods = self.pods
        revisions = self.revisions
        if delta.pods:
            pods_mutation = pods.mutate()
            revisions_mutation = revisions.mutate()
            for record in delta.pods:
                members = revisions_mutation.get(record.revision, EMPTY_MAP)
                if record.state is PodState.REMOVED:
                    pods_mutation.pop(record.uid, None)
                    if record.uid in members:
                        members = members.delete(record.uid)
                        if members:
                            revisions_mutation[record.revision] = members
                        else:
                            del revisions_mutation[record.revision]
                else:
                    pods_mutation[record.uid] = record
                    revisions_mutation[record.revision] = members.set(record.uid, record)
            pods = pods_mutation.finish()
            revisions = revisions_mutation.finish()
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
        return RoutingSnapshot(delta.epoch, delta.version, pods, revisions, routes, route_table)

    def revision_pods(self, revision: str) -> immutables.Map[str, PodRecord]:
        return self.revisions.get(revision, EMPTY_MAP)

    def has_prospects(self, revision: str) -> bool:
        """Is any pod of the revision servable now or possibly soon (not draining/removed)?"""
        return any(p.state is not PodState.DRAINING for p in self.revision_pods(revision).values())
