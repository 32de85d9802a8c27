"""The Kubernetes informer: EndpointSlices (and Pods, for their metadata) -> pod events for the writer.

Theory of operation
-------------------
Two layers, so the part that decides what to say is tested without a network:

``SliceCache`` (pure: no I/O, the clock is a parameter) holds the EndpointSlices in scope and what it
knows about each pod (revision label, ``fastproxy.io/concurrency`` annotation). It takes a list result
(``slices_listed`` / ``pods_listed``) or one watch event (``slice_event`` / ``pod_event``), recomputes
the view of every pod that input touched, and returns the events that turn the view the writer was
last told into the new one. A pod is its UID (``endpoint.targetRef.uid``); an endpoint that appears in
several slices (a Service has many; the controller moves endpoints between them) is one pod, taken
from the slice of the first Service by name, the most recently changed slice of it. Its revision is
the pod's ``fastproxy.io/revision`` (or ``serving.knative.dev/revision``) label, else the slice's
(the Service's labels), else the Service's name; its node (``nodeName``) is kept in the view and
named in the events' reasons (the event schema has no node field).

=====================================================  =============================================
what the slices say about a pod UID                    event (source ``informer``)
=====================================================  =============================================
appears, ready                                         ``PodDiscovered(ready=True)``
appears, not ready                                     ``PodDiscovered(ready=False)``
appears already terminating                            ``PodDiscovered(ready=False)`` + ``DrainStarted``
ready <-> not ready                                    ``ReadinessChanged``
starts terminating (serving or not)                    ``DrainStarted``
pod annotation changes its concurrency                 ``PodDiscovered`` (the writer takes it over)
gone from every slice                                  ``PodRemoved``
=====================================================  =============================================

A relist (after ``410 Gone``) replaces the slices wholesale but the cache is never emptied first: the
new list is diffed against the old, so a pod present in both gets no event at all, never a
``PodRemoved`` followed by a ``PodDiscovered``. An endpoint whose pod the cache has not seen yet is
held back (nothing is said about it) until the pod arrives by the pod watch or, after
``pod_fetch_delay``, by a GET; if the pod cannot be read, the slice's labels and defaults are used.

``ListWatch`` is the thin loop, one per resource, with kopf's watch discipline: list (paginated) and
hand the whole result to the cache, then watch from the list's resourceVersion with
``allowWatchBookmarks`` and a server-side ``timeoutSeconds``; every event and bookmark advances the
resourceVersion, and when the watch ends (server timeout, or the client's read timeout: a watch that
went silent must not hang forever) the next one starts from it. ``410 Gone`` (as the response or as
an ``ERROR`` event) means relist. ``401``/``403`` reload the credentials. Other errors back off
exponentially with jitter. The kubernetes client is blocking: its calls run in a small private
thread pool; a watch stream is read by one thread that hands lines to the event loop.

``Informer`` runs both watches (pods first, so slices rarely wait for pod metadata), fetches missing
pods, and sends the events through ``statesync.writer.submit`` from an ordered outbox. After a
failed submit (Valkey down, or restarted empty) the queue is replaced by a full resync, the current
view superseding it, sent after a backoff with jitter; a periodic resync is the anti-entropy.

In ``fastproxy writer --kubernetes`` every writer replica runs an informer (its cache stays warm),
but only the leader's submits (``active`` returns the leadership term: falsy on a standby, the epoch
on the leader). In every new term the informer first submits its whole view, including recent
removals, so nothing said during a hand-over, or lost with a Valkey that restarted empty, stays
missing.

RBAC: ``API_CALLS`` is every (API group, resource, verb) this module calls, collected from the
``@api_call`` decorators on ``KubeApi``; the Role in ``k8s/base`` grants exactly these.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, ParamSpec, TypeVar

from statesync.keys import Keys
from statesync.schema import DrainStarted, Event, PodDiscovered, PodRemoved, ReadinessChanged, Source

log = logging.getLogger("fastproxy.informer")

SERVICE_LABEL: Final = "kubernetes.io/service-name"
# The revision a pod serves: the pod's label first, then its slice's (the Service's labels are copied
# onto its EndpointSlices), then the Service's name.
REVISION_LABELS: Final = ("fastproxy.io/revision", "serving.knative.dev/revision")
CONCURRENCY_ANNOTATION: Final = "fastproxy.io/concurrency"
DEFAULT_LABEL_SELECTOR: Final = "fastproxy.io/managed=true"
MAX_CONCURRENCY: Final = 100_000
RECENT_REMOVALS: Final = 10_000  # removed UIDs repeated by a resync (a lost PodRemoved heals)

# ---- the pure part ---------------------------------------------------------------------------


class Endpoint(NamedTuple):
    uid: str
    namespace: str
    pod: str
    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    node: str


class SliceEntry(NamedTuple):
    resource_version: str
    seq: int  # when this cache last saw it change: the newest slice wins for a duplicated endpoint
    service: str
    revision: str | None
    endpoints: dict[str, Endpoint]


class PodMeta(NamedTuple):
    revision: str | None
    concurrency: int | None


class PodView(NamedTuple):
    """What the informer last told the writer about one pod."""

    uid: str
    namespace: str
    pod: str
    revision: str
    ip: str
    port: int
    concurrency: int
    ready: bool
    serving: bool
    terminating: bool
    node: str


SliceKey = tuple[str, str]  # (namespace, name)
_MISSING: Final = object()  # the pod's metadata is not known yet


def _revision_label(labels: Mapping[str, str]) -> str | None:
    for key in REVISION_LABELS:
        if labels.get(key):
            return labels[key]
    return None


def _pick_port(ports: Iterable[Mapping[str, Any]], port_name: str | None) -> int | None:
    for port in ports:
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            continue
        if port_name:
            if port.get("name") == port_name:
                return number
        elif port.get("protocol") in (None, "TCP"):
            return number
    return None


def parse_slice(obj: Mapping[str, Any], port_name: str | None = None) -> SliceEntry:
    """An EndpointSlice (raw JSON) -> its pod endpoints, by pod UID. Anything unusable is skipped."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or ""
    labels = meta.get("labels") or {}
    endpoints: dict[str, Endpoint] = {}
    port = _pick_port(obj.get("ports") or [], port_name)
    if port is not None and obj.get("addressType") in ("IPv4", "IPv6"):
        for ep in obj.get("endpoints") or []:
            ref = ep.get("targetRef") or {}
            uid, addresses = ref.get("uid"), ep.get("addresses") or []
            if not uid or ref.get("kind", "Pod") != "Pod" or not addresses:
                continue
            cond = ep.get("conditions") or {}
            # API semantics: an unset ready means ready; unset serving means as ready.
            ready = cond.get("ready") is not False
            serving = ready if cond.get("serving") is None else bool(cond["serving"])
            endpoints[uid] = Endpoint(
                uid=uid,
                namespace=ref.get("namespace") or namespace,
                pod=ref.get("name") or "",
                ip=addresses[0],
                port=port,
                ready=ready,
                serving=serving,
                terminating=bool(cond.get("terminating")),
                node=ep.get("nodeName") or "",
            )
    return SliceEntry(
        resource_version=meta.get("resourceVersion") or "",
        seq=0,
        service=labels.get(SERVICE_LABEL) or meta.get("name") or "",
        revision=_revision_label(labels),
        endpoints=endpoints,
    )


def parse_pod(obj: Mapping[str, Any]) -> tuple[str, PodMeta] | None:
    meta = obj.get("metadata") or {}
    uid = meta.get("uid")
    if not uid:
        return None
    raw = (meta.get("annotations") or {}).get(CONCURRENCY_ANNOTATION)
    concurrency: int | None = None
    if raw is not None:
        try:
            concurrency = min(max(int(str(raw).strip()), 1), MAX_CONCURRENCY)
        except ValueError:
            log.warning(
                "pod %s: %s=%r is not an integer; using 1", meta.get("name"), CONCURRENCY_ANNOTATION, raw
            )
    return uid, PodMeta(revision=_revision_label(meta.get("labels") or {}), concurrency=concurrency)


def _key(obj: Mapping[str, Any]) -> SliceKey:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


class SliceCache:
    """EndpointSlices + pod metadata in, pod events out. No I/O; see the module docstring."""

    def __init__(self, *, port_name: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.port_name = port_name
        self.clock = clock
        self.slices: dict[SliceKey, SliceEntry] = {}
        self.views: dict[str, PodView] = {}  # uid -> what the writer was told
        self.missing: dict[str, tuple[str, str]] = {}  # uid -> (namespace, pod name) awaiting metadata
        self._where: dict[str, set[SliceKey]] = {}  # uid -> slices listing it
        self._meta: dict[str, PodMeta] = {}
        self._live_pods: set[str] = set()  # UIDs the pod list/watch shows (not deleted)
        self._removed: collections.deque[str] = collections.deque(maxlen=RECENT_REMOVALS)
        self._seq = 0

    # -- slices

    def slices_listed(self, items: Iterable[Mapping[str, Any]]) -> list[Event]:
        """A full list (initial, or the relist after 410): diffed against what is cached."""
        new: dict[SliceKey, SliceEntry] = {}
        for obj in items:
            key = _key(obj)
            new[key] = self._stamp(key, parse_slice(obj, self.port_name))
        touched = {uid for entry in self.slices.values() for uid in entry.endpoints}
        self.slices = {}
        self._where = {}
        for key, entry in new.items():
            self._put(key, entry)
            touched.update(entry.endpoints)
        return self._refresh(touched)

    def slice_event(self, kind: str, obj: Mapping[str, Any]) -> list[Event]:
        key = _key(obj)
        touched: set[str] = set()
        old = self.slices.get(key)
        if old is not None:
            touched.update(old.endpoints)
            self._drop(key)
        if kind != "DELETED":
            entry = self._stamp(key, parse_slice(obj, self.port_name))
            self._put(key, entry)
            touched.update(entry.endpoints)
        return self._refresh(touched)

    def _stamp(self, key: SliceKey, entry: SliceEntry) -> SliceEntry:
        old = self.slices.get(key)
        if old is not None and old.resource_version == entry.resource_version and entry.resource_version:
            return entry._replace(seq=old.seq)
        self._seq += 1
        return entry._replace(seq=self._seq)

    def _put(self, key: SliceKey, entry: SliceEntry) -> None:
        self.slices[key] = entry
        for uid in entry.endpoints:
            self._where.setdefault(uid, set()).add(key)

    def _drop(self, key: SliceKey) -> None:
        entry = self.slices.pop(key)
        for uid in entry.endpoints:
            keys = self._where.get(uid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._where[uid]

    # -- pods (metadata only)

    def pods_listed(self, items: Iterable[Mapping[str, Any]]) -> list[Event]:
        fresh: dict[str, PodMeta] = {}
        for obj in items:
            parsed = parse_pod(obj)
            if parsed is not None:
                fresh[parsed[0]] = parsed[1]
        # Keep what is known about pods the slices still list (deleted pods linger there briefly).
        kept = {uid: meta for uid, meta in self._meta.items() if uid in self._where and uid not in fresh}
        changed = {uid for uid, meta in fresh.items() if self._meta.get(uid) != meta}
        self._meta = {**kept, **fresh}
        self._live_pods = set(fresh)
        return self._refresh(changed & self._where.keys())

    def pod_event(self, kind: str, obj: Mapping[str, Any]) -> list[Event]:
        parsed = parse_pod(obj)
        if parsed is None:
            return []
        uid, meta = parsed
        if kind == "DELETED":
            self._live_pods.discard(uid)
            if uid not in self._where:
                self._meta.pop(uid, None)
            return []
        self._live_pods.add(uid)
        return self.pod_known(uid, meta)

    def pod_known(self, uid: str, meta: PodMeta) -> list[Event]:
        """Metadata for one pod (a pod watch event or a GET)."""
        if self._meta.get(uid) == meta:
            return []
        self._meta[uid] = meta
        return self._refresh({uid}) if uid in self._where else []

    def pod_unavailable(self, uid: str) -> list[Event]:
        """The pod could not be read: go on with the slice's labels and the defaults."""
        if uid in self._meta:
            return []
        return self.pod_known(uid, PodMeta(revision=None, concurrency=None))

    # -- views and events

    def _resolve(self, uid: str) -> PodView | object | None:
        keys = self._where.get(uid)
        if not keys:
            return None
        key = min(keys, key=lambda k: (self.slices[k].service, -self.slices[k].seq, k))
        entry = self.slices[key]
        ep = entry.endpoints[uid]
        meta = self._meta.get(uid)
        if meta is None:
            return _MISSING
        return PodView(
            uid=uid,
            namespace=ep.namespace,
            pod=ep.pod,
            revision=meta.revision or entry.revision or entry.service or key[1],
            ip=ep.ip,
            port=ep.port,
            concurrency=meta.concurrency or 1,
            ready=ep.ready and not ep.terminating,
            serving=ep.serving,
            terminating=ep.terminating,
            node=ep.node,
        )

    def _refresh(self, uids: Iterable[str]) -> list[Event]:
        events: list[Event] = []
        for uid in sorted(uids):
            new = self._resolve(uid)
            old = self.views.get(uid)
            if new is _MISSING:
                ep = next(self.slices[k].endpoints[uid] for k in self._where[uid])
                self.missing[uid] = (ep.namespace, ep.pod)
                continue  # nothing is said about a pod until its metadata is known
            self.missing.pop(uid, None)
            if new is None:
                if uid not in self._live_pods:
                    self._meta.pop(uid, None)
                if old is not None:
                    del self.views[uid]
                    self._removed.append(uid)
                    events.append(
                        PodRemoved(
                            uid=uid,
                            source=Source.INFORMER,
                            at=self.clock(),
                            reason=f"gone from every EndpointSlice{_on(old.node)}",
                        )
                    )
                continue
            assert isinstance(new, PodView)
            events += self._diff(old, new)
            if old is not None:  # the writer keeps the identity it first accepted
                new = new._replace(ip=old.ip, port=old.port, revision=old.revision)
            self.views[uid] = new
        return events

    def _diff(self, old: PodView | None, new: PodView) -> list[Event]:
        now = self.clock()
        if old is None:
            events: list[Event] = [self._discovered(new, now)]
            if new.terminating:
                events.append(self._drain(new, now))
            return events
        events = []
        if (old.ip, old.port, old.revision) != (new.ip, new.port, new.revision):
            # A UID never changes address or revision; the writer would reject a rediscovery. Only say
            # what else changed (a relabelled pod, a Service whose port changed).
            log.warning(
                "pod %s/%s (%s): %s:%d %s -> %s:%d %s; a pod UID keeps its address and revision, ignored",
                new.namespace, new.pod, new.uid, old.ip, old.port, old.revision, new.ip, new.port,
                new.revision,
            )  # fmt: skip
        elif new.concurrency != old.concurrency:
            events.append(self._discovered(new, now))
        if new.terminating and not old.terminating:
            events.append(self._drain(new, now))
        elif not new.terminating and new.ready != old.ready:
            reason = f"endpointslice: {'ready' if new.ready else 'not ready'}{_on(new.node)}"
            events.append(
                ReadinessChanged(uid=new.uid, source=Source.INFORMER, at=now, ready=new.ready, reason=reason)
            )
        return events

    @staticmethod
    def _discovered(view: PodView, now: float) -> PodDiscovered:
        return PodDiscovered(
            uid=view.uid,
            source=Source.INFORMER,
            at=now,
            namespace=view.namespace,
            revision=view.revision,
            ip=view.ip,
            port=view.port,
            concurrency=view.concurrency,
            ready=view.ready,
        )

    @staticmethod
    def _drain(view: PodView, now: float) -> DrainStarted:
        serving = "serving" if view.serving else "not serving"
        return DrainStarted(
            uid=view.uid,
            source=Source.INFORMER,
            at=now,
            reason=f"endpointslice: terminating, {serving}{_on(view.node)}",
        )

    def resync(self) -> list[Event]:
        """The whole view as events (anti-entropy; a new leader; Valkey restarted empty)."""
        now = self.clock()
        events: list[Event] = []
        for view in self.views.values():
            events.append(self._discovered(view, now))
            if view.terminating:
                events.append(self._drain(view, now))
        events += [
            PodRemoved(uid=uid, source=Source.INFORMER, at=now, reason="gone from every EndpointSlice")
            for uid in self._removed
            if uid not in self.views
        ]
        return events


def _on(node: str) -> str:
    return f" (node {node})" if node else ""


# ---- the Kubernetes API: every call this module makes ------------------------------------------

API_CALLS: set[tuple[str, str, str]] = set()  # (API group, resource, verb); filled by @api_call
_P = ParamSpec("_P")
_R = TypeVar("_R")


def api_call(group: str, resource: str, verb: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Declare the RBAC a KubeApi method needs; the manifests' Role is tested against API_CALLS."""
    API_CALLS.add((group, resource, verb))

    def mark(func: Callable[_P, _R]) -> Callable[_P, _R]:
        return func

    return mark


class Gone(Exception):
    """410: the resourceVersion (or a list's continue token) is too old; relist."""


class WatchError(Exception):
    """An ERROR event in a watch stream other than 410."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"watch error {status}: {message}")
        self.status = status


def config_loader(kubeconfig: str | None = None) -> Callable[[], Any]:
    """Credentials: in-cluster (service account) unless a kubeconfig is given or we are outside."""

    def load() -> Any:
        from kubernetes import client, config

        cfg = client.Configuration()
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)
        return cfg

    return load


@dataclass(frozen=True)
class Resource:
    group: str
    plural: str


ENDPOINTSLICES: Final = Resource("discovery.k8s.io", "endpointslices")
PODS: Final = Resource("", "pods")


class KubeApi:
    """The blocking kubernetes client, raw JSON in and out (the cache works on dicts)."""

    def __init__(self, load_config: Callable[[], Any]) -> None:
        self._load_config = load_config
        self._lock = threading.Lock()
        self.reload()

    def reload(self) -> None:
        """(Re)read the credentials: a rotated service-account token, a changed kubeconfig."""
        from kubernetes import client

        api_client = client.ApiClient(self._load_config())
        with self._lock:
            self.discovery = client.DiscoveryV1Api(api_client)
            self.core = client.CoreV1Api(api_client)

    @staticmethod
    def _json(resp: Any) -> Any:
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()

    def _list_method(self, resource: Resource, namespace: str | None) -> Callable[..., Any]:
        with self._lock:
            if resource is ENDPOINTSLICES:
                if namespace is None:
                    return self.discovery.list_endpoint_slice_for_all_namespaces
                return self.discovery.list_namespaced_endpoint_slice
            if namespace is None:
                return self.core.list_pod_for_all_namespaces
            return self.core.list_namespaced_pod

    def _call(self, resource: Resource, namespace: str | None, **kwargs: Any) -> Any:
        method = self._list_method(resource, namespace)
        if namespace is not None:
            kwargs["namespace"] = namespace
        return method(_preload_content=False, **{k: v for k, v in kwargs.items() if v is not None})

    @api_call("discovery.k8s.io", "endpointslices", "list")
    @api_call("", "pods", "list")
    def list(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        label_selector: str | None,
        limit: int,
        continue_: str | None,
        timeout: tuple[float, float],
    ) -> Any:
        return self._json(
            self._call(
                resource,
                namespace,
                label_selector=label_selector or None,
                limit=limit,
                _continue=continue_,
                _request_timeout=timeout,
            )
        )

    @api_call("discovery.k8s.io", "endpointslices", "watch")
    @api_call("", "pods", "watch")
    def watch(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        label_selector: str | None,
        resource_version: str,
        timeout_seconds: int,
        timeout: tuple[float, float],
    ) -> Any:
        """Open a watch; returns the streaming urllib3 response (the caller reads and closes it)."""
        return self._call(
            resource,
            namespace,
            label_selector=label_selector or None,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_seconds,
            _request_timeout=timeout,
        )

    @api_call("", "pods", "get")
    def get_pod(self, namespace: str, name: str, *, timeout: tuple[float, float]) -> Any:
        with self._lock:
            read = self.core.read_namespaced_pod
        return self._json(read(name, namespace, _preload_content=False, _request_timeout=timeout))


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


# ---- the loop --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InformerSettings:
    namespace: str | None = "default"  # None: all namespaces
    label_selector: str = DEFAULT_LABEL_SELECTOR  # EndpointSlices (they carry their Service's labels)
    pod_label_selector: str = ""
    port_name: str | None = None  # the slice port routers use (the sidecar's); default: the first TCP port
    watch_timeout: int = 300  # server-side timeoutSeconds, jittered up to +10%
    read_timeout: float = 90.0  # client: a silent watch ends after this (> the ~60 s bookmark interval)
    connect_timeout: float = 10.0
    list_timeout: float = 60.0
    page_size: int = 500
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    pod_sync_timeout: float = 10.0  # slices wait this long for the first pod list
    pod_fetch_delay: float = 1.0  # an endpoint's pod unknown this long is fetched by GET
    resync_interval: float = 300.0  # full anti-entropy resubmission; 0 disables
    outbox_limit: int = 100_000  # beyond this, drop the backlog and resync once Valkey is back
    submit_batch: int = 500


class Backoff:
    """Exponential, with jitter (x0.5..1.5), capped."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self.delay = initial

    def next(self) -> float:
        delay = self.delay * (0.5 + random.random())
        self.delay = min(self.delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.delay = self.initial


_END: Final = object()


class ListWatch:
    """List, then watch from the list's resourceVersion, forever (see the module docstring)."""

    def __init__(
        self,
        api: KubeApi,
        resource: Resource,
        settings: InformerSettings,
        label_selector: str,
        on_list: Callable[[list[dict[str, Any]]], Awaitable[None]],
        on_event: Callable[[str, dict[str, Any]], Awaitable[None]],
        executor: concurrent.futures.Executor,
    ) -> None:
        self.api = api
        self.resource = resource
        self.settings = settings
        self.label_selector = label_selector
        self.on_list = on_list
        self.on_event = on_event
        self.executor = executor
        self.resource_version: str | None = None
        self.synced = asyncio.Event()  # the first list is in the cache
        self.stats: collections.Counter[str] = collections.Counter()
        self._response: Any = None

    async def blocking(self, func: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: func(*args, **kwargs))

    async def run(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        gone_in_a_row = 0
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    backoff.reset()
                started = time.monotonic()
                if await self._watch():
                    backoff.reset()
                elif time.monotonic() - started < 1.0:
                    await asyncio.sleep(backoff.next())  # ended at once with nothing: do not spin
                gone_in_a_row = 0
            except Gone as exc:
                self.stats["relists"] += 1
                log.info("%s: %s; relisting (the cache is kept and diffed)", self.resource.plural, exc)
                self.resource_version = None
                gone_in_a_row += 1
                if gone_in_a_row > 1:
                    await asyncio.sleep(backoff.next())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status = _status(exc)
                self.stats["errors"] += 1
                if status in (401, 403):
                    self.stats["reloads"] += 1
                    log.warning(
                        "%s: %d from the API server; reloading credentials", self.resource.plural, status
                    )
                    with contextlib.suppress(Exception):
                        await self.blocking(self.api.reload)
                else:
                    log.warning(
                        "%s: %s: %s",
                        self.resource.plural,
                        type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "",
                    )
                await asyncio.sleep(backoff.next())

    async def _list(self) -> None:
        items: list[dict[str, Any]] = []
        continue_: str | None = None
        s = self.settings
        while True:
            try:
                page = await self.blocking(
                    self.api.list,
                    self.resource,
                    s.namespace,
                    label_selector=self.label_selector,
                    limit=s.page_size,
                    continue_=continue_,
                    timeout=(s.connect_timeout, s.list_timeout),
                )
            except Exception as exc:
                if _status(exc) == 410:
                    raise Gone("list continue token expired") from None
                raise
            items += page.get("items") or []
            meta = page.get("metadata") or {}
            continue_ = meta.get("continue") or None
            if continue_ is None:
                break
        self.stats["lists"] += 1
        await self.on_list(items)
        self.resource_version = meta.get("resourceVersion") or ""
        self.synced.set()

    async def _watch(self) -> bool:
        """One watch request. Returns whether it delivered anything; raises Gone for a relist."""
        s = self.settings
        timeout_seconds = int(s.watch_timeout * (1 + random.random() / 10)) or 1
        assert self.resource_version is not None
        try:
            resp = await self.blocking(
                self.api.watch,
                self.resource,
                s.namespace,
                label_selector=self.label_selector,
                resource_version=self.resource_version,
                timeout_seconds=timeout_seconds,
                timeout=(s.connect_timeout, s.read_timeout),
            )
        except Exception as exc:
            if _status(exc) == 410:
                raise Gone("watch: resourceVersion too old") from None
            raise
        self.stats["watches"] += 1
        lines: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        reader = loop.run_in_executor(self.executor, _read_lines, resp, loop, lines)
        self._response = resp
        delivered = False
        try:
            while True:
                line = await lines.get()
                if line is _END:
                    return delivered
                if isinstance(line, BaseException):
                    if _is_read_timeout(line):
                        self.stats["read_timeouts"] += 1
                        log.info(
                            "%s: watch silent for %.0f s; reconnecting from %s",
                            self.resource.plural,
                            s.read_timeout,
                            self.resource_version,
                        )
                        return delivered
                    raise line
                delivered = True
                await self._handle(json.loads(line))
        finally:
            self._response = None
            if not reader.done():
                with contextlib.suppress(Exception):
                    resp.shutdown()  # unblocks the reading thread, which then closes the response

    async def _handle(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            status = obj.get("code") or 0
            if status == 410:
                raise Gone(f"watch: {obj.get('message') or 'resourceVersion too old'}")
            raise WatchError(status, obj.get("message") or obj.get("reason") or "")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.stats["bookmarks"] += 1
        elif kind in ("ADDED", "MODIFIED", "DELETED"):
            self.stats["events"] += 1
            await self.on_event(kind, obj)
        else:
            log.warning("%s: unknown watch event type %r", self.resource.plural, kind)
            return
        if rv:
            self.resource_version = rv


def _is_read_timeout(exc: BaseException) -> bool:
    import urllib3.exceptions

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _read_lines(resp: Any, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[Any]) -> None:
    """In a pool thread: every line of a watch stream to the event loop, then _END or the error."""
    from kubernetes.watch.watch import iter_resp_lines

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(lines.put_nowait, item)

    try:
        for line in iter_resp_lines(resp):
            if line:
                put(line)
        put(_END)
    except BaseException as exc:
        put(exc)
    finally:
        with contextlib.suppress(Exception):
            resp.close()
            resp.release_conn()


Submit = Callable[[list[Event]], Awaitable[Any]]


class Informer:
    """Slices and pods watched into one SliceCache; its events submitted to the writer's stream."""

    def __init__(
        self,
        api: KubeApi,
        submit: Submit,
        settings: InformerSettings | None = None,
        *,
        active: Callable[[], object] = lambda: True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.settings = settings = settings or InformerSettings()
        self.submit = submit
        self.active = active
        self.cache = SliceCache(port_name=settings.port_name, clock=clock)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="informer")
        self.pods = ListWatch(
            api,
            PODS,
            settings,
            settings.pod_label_selector,
            self._pods_listed,
            self._pod_event,
            self.executor,
        )
        self.slices = ListWatch(
            api,
            ENDPOINTSLICES,
            settings,
            settings.label_selector,
            self._slices_listed,
            self._slice_event,
            self.executor,
        )
        self.stats: collections.Counter[str] = collections.Counter()
        self._outbox: collections.deque[Event] = collections.deque()
        self._wakeup = asyncio.Event()
        self._resync_due = False
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._gets = asyncio.Semaphore(2)  # pod GETs at once (the watches need the pool's threads)

    # -- cache inputs

    async def _pods_listed(self, items: list[dict[str, Any]]) -> None:
        self._emit(self.cache.pods_listed(items))

    async def _pod_event(self, kind: str, obj: dict[str, Any]) -> None:
        self._emit(self.cache.pod_event(kind, obj))

    async def _slices_listed(self, items: list[dict[str, Any]]) -> None:
        self._emit(self.cache.slices_listed(items))

    async def _slice_event(self, kind: str, obj: dict[str, Any]) -> None:
        self._emit(self.cache.slice_event(kind, obj))

    def _emit(self, events: list[Event]) -> None:
        for uid, (namespace, name) in self.cache.missing.items():
            if uid not in self._fetching:
                self._fetching[uid] = asyncio.get_running_loop().create_task(
                    self._fetch_pod(uid, namespace, name)
                )
        if not events:
            return
        self.stats["events"] += len(events)
        if len(self._outbox) + len(events) > self.settings.outbox_limit:
            log.warning(
                "informer: %d events waiting for Valkey; dropping them for a full resync", len(self._outbox)
            )
            self._outbox.clear()
            self._resync_due = True
        else:
            self._outbox.extend(events)
        self._wakeup.set()

    async def _fetch_pod(self, uid: str, namespace: str, name: str) -> None:
        try:
            s = self.settings
            await asyncio.sleep(s.pod_fetch_delay)
            with contextlib.suppress(TimeoutError):  # the pod list may still be coming: no GET storm
                async with asyncio.timeout(s.pod_sync_timeout):
                    await self.pods.synced.wait()
            if uid not in self.cache.missing:
                return  # the pod watch delivered it meanwhile
            try:
                async with self._gets:
                    self.stats["pod_gets"] += 1
                    obj = await self.slices.blocking(
                        self.api.get_pod, namespace, name, timeout=(s.connect_timeout, s.list_timeout)
                    )
                parsed = parse_pod(obj)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pod %s/%s: cannot read it (%s); using the slice's labels", namespace, name, exc)
                parsed = None
            if parsed is not None and parsed[0] == uid:
                self._emit(self.cache.pod_known(uid, parsed[1]))
            else:
                self._emit(self.cache.pod_unavailable(uid))
        finally:
            self._fetching.pop(uid, None)

    # -- the loop

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self.pods.run(), name="informer-pods"),
            asyncio.create_task(self._run_slices(), name="informer-slices"),
            asyncio.create_task(self._publish(), name="informer-publish"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, *self._fetching.values()]:
                task.cancel()
            for lw in (self.pods, self.slices):
                with contextlib.suppress(Exception):
                    if lw._response is not None:
                        lw._response.shutdown()
            await asyncio.gather(*tasks, *self._fetching.values(), return_exceptions=True)
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _run_slices(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.pod_sync_timeout):
                await self.pods.synced.wait()
        await self.slices.run()

    async def _publish(self) -> None:
        s = self.settings
        backoff = Backoff(s.backoff_initial, s.backoff_max)
        term: object = None  # the leadership term the view was last submitted in
        last_resync = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._wakeup.wait()
            self._wakeup.clear()
            current = self.active()
            if not current:
                self._outbox.clear()  # a standby keeps its cache warm but says nothing
                term = None
                continue
            now = time.monotonic()
            if current != term or self._resync_due:
                # A new term (leader, epoch) or a failed submit: the writer may lack anything said
                # before. The whole current view (and recent removals) supersedes what is queued.
                self._outbox.clear()
                self._outbox.extend(self.cache.resync())
                term, self._resync_due, last_resync = current, False, now
            elif s.resync_interval and now - last_resync > s.resync_interval:
                self.stats["resyncs"] += 1
                self._outbox.extend(self.cache.resync())
                last_resync = now
            while self._outbox:
                batch = [self._outbox[i] for i in range(min(len(self._outbox), s.submit_batch))]
                try:
                    await self.submit(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats["submit_errors"] += 1
                    log.warning("informer: submitting %d events failed: %s", len(batch), exc)
                    self._resync_due = True
                    await asyncio.sleep(backoff.next())
                    break
                for _ in batch:
                    self._outbox.popleft()
                self.stats["submitted"] += len(batch)
                backoff.reset()


# ---- fastproxy writer --kubernetes -------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--kubernetes`` flags of ``fastproxy writer``."""
    group = parser.add_argument_group("Kubernetes informer (--kubernetes)")
    group.add_argument(
        "--kubernetes",
        action="store_true",
        help="also run the EndpointSlice informer: pods discovered, ready, draining, removed",
    )
    scope = group.add_mutually_exclusive_group()
    scope.add_argument(
        "--kube-namespace",
        default=None,
        help="namespace to watch; unset: $POD_NAMESPACE, else the service account's, else 'default' ("
        "--namespace is the writer's Valkey key prefix)",
    )
    scope.add_argument(
        "--all-namespaces", action="store_true", help="watch every namespace (needs a ClusterRole)"
    )
    group.add_argument(
        "--label-selector",
        default=DEFAULT_LABEL_SELECTOR,
        help="EndpointSlices to follow (they carry their Service's labels)",
    )
    group.add_argument(
        "--pod-label-selector",
        default="",
        help="pods whose metadata (revision label, concurrency annotation) is watched",
    )
    group.add_argument(
        "--endpoint-port",
        default=None,
        help="name of the Service port routers use; unset: the first TCP port",
    )
    group.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file; unset: the in-cluster service account, else ~/.kube/config",
    )


def _default_namespace() -> str:
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    with contextlib.suppress(OSError), open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
        return f.read().strip() or "default"
    return "default"


def informer_from_args(
    args: argparse.Namespace, client: Any, keys: Keys, *, active: Callable[[], object]
) -> Informer:
    """The informer ``fastproxy writer --kubernetes`` runs beside ``Writer.run()``."""
    from statesync.writer import submit

    settings = InformerSettings(
        namespace=None if args.all_namespaces else (args.kube_namespace or _default_namespace()),
        label_selector=args.label_selector,
        pod_label_selector=args.pod_label_selector,
        port_name=args.endpoint_port,
    )

    async def to_stream(events: list[Event]) -> None:
        await submit(client, events, keys)

    log.info(
        "informer: EndpointSlices %s in %s",
        settings.label_selector or "(all)",
        "all namespaces" if settings.namespace is None else settings.namespace,
    )
    return Informer(KubeApi(config_loader(args.kubeconfig)), to_stream, settings, active=active)
