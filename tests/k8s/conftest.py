"""A stateful Kubernetes API for the informer tests, served by kmock over real HTTP.

kmock's built-in emulator keeps objects but has no resourceVersions (lists say ``"..."``, a watch
replays everything as ``ADDED`` whatever ``resourceVersion`` it is given). The informer's whole point
is resourceVersion discipline, so ``FakeKube`` is one kmock reaction implementing the part of the
API server it needs, the way kube-apiserver does it:

- every change gets the next resourceVersion and is kept in a history (the watch cache);
- list: namespace, label selector, ``limit``/``continue`` (a consistent snapshot), the list's RV;
- watch: events after the given RV from the history, then live; ``allowWatchBookmarks``;
  ``timeoutSeconds`` ends the stream; an RV older than the compaction point gets an ``ERROR`` event
  with code 410 (as the watch cache answers) and the stream ends;
- get pod; bearer tokens (401 for others).

Faults are injected from the test: end every watch, expire (compact) the history, make the next
watches silent (connection open, nothing ever sent), change objects without telling the watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock as kmock_lib
import pytest
from kubernetes import client

from statesync.schema import Event

GROUPS = {"endpointslices": ("discovery.k8s.io", "v1", "EndpointSlice"), "pods": ("", "v1", "Pod")}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (what the informer uses): k=v, k==v, k!=v, k, !k."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class Watcher:
    def __init__(self, plural: str, namespace: str | None, selector: str, bookmarks: bool) -> None:
        self.plural, self.namespace, self.selector, self.bookmarks = plural, namespace, selector, bookmarks
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.silent = False

    def wants(self, plural: str, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (
            plural == self.plural
            and (self.namespace is None or meta.get("namespace") == self.namespace)
            and selector_matches(self.selector, meta.get("labels") or {})
        )


class FakeKube:
    def __init__(self) -> None:
        self.rv = 1000
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, plural, type, object)
        self.compacted = 0  # a watch from an RV below this gets 410
        self.watchers: list[Watcher] = []
        self.tokens = {"good-token"}
        self.requests: list[dict[str, Any]] = []  # every request: verb, resource, params, status
        self.snapshots: dict[str, list[dict[str, Any]]] = {}
        self.closed = asyncio.Event()
        self.silent_watches: dict[str, int] = {}  # plural -> how many next watches stay silent
        self._tokens = itertools.count()

    # ---- the server side (a kmock reaction) ----------------------------------------------------

    def install(self, kmock: kmock_lib.RawHandler) -> None:
        kmock << self.handle

    def handle(self, request: kmock_lib.Request) -> Any:
        resource = request.resource
        params = dict(request.params)
        plural = resource.plural if resource is not None else None
        if plural not in GROUPS or resource is None or resource.group != GROUPS[plural][0]:
            return self._reply(
                request, "unknown", plural, params, 404, status(404, "NotFound", request.url.path)
            )
        watch = params.get("watch") in ("true", "True", "1")
        verb = "watch" if watch else ("get" if request.name else "list")
        if request.headers.get("Authorization") not in {f"Bearer {t}" for t in self.tokens}:
            return self._reply(
                request, verb, plural, params, 401, status(401, "Unauthorized", "Unauthorized")
            )
        if verb == "get":
            obj = self.objects.get((plural, request.namespace or "", request.name or ""))
            if obj is None:
                return self._reply(request, verb, plural, params, 404, status(404, "NotFound", "not found"))
            return self._reply(request, verb, plural, params, 200, obj)
        if verb == "list":
            return self._reply(
                request, verb, plural, params, 200, self._list(plural, request.namespace, params)
            )
        return self._watch(request, plural, params)

    def _reply(
        self,
        request: kmock_lib.Request,
        verb: str,
        plural: str | None,
        params: dict[str, str],
        code: int,
        payload: Any,
    ) -> kmock_lib.Response:
        rv = payload.get("metadata", {}).get("resourceVersion") if isinstance(payload, dict) else None
        self.requests.append(
            {
                "verb": verb,
                "resource": plural,
                "params": params,
                "status": code,
                "namespace": request.namespace,
                "rv": rv,
            }
        )
        return kmock_lib.Response(status=code, payload=payload)

    def _selected(self, plural: str, namespace: str | None, selector: str) -> list[dict[str, Any]]:
        return [
            obj
            for (p, ns, _), obj in sorted(self.objects.items())
            if p == plural
            and (namespace is None or ns == namespace)
            and selector_matches(selector, obj["metadata"].get("labels") or {})
        ]

    def _list(self, plural: str, namespace: str | None, params: dict[str, str]) -> dict[str, Any]:
        token = params.get("continue")
        if token:
            rv, offset, snapshot = token.split(":", 2)[0], int(token.split(":", 2)[1]), self.snapshots[token]
        else:
            rv, offset = str(self.rv), 0
            snapshot = json.loads(
                json.dumps(self._selected(plural, namespace, params.get("labelSelector", "")))
            )
        limit = int(params.get("limit") or 0) or len(snapshot) or 1
        page = snapshot[offset : offset + limit]
        meta: dict[str, Any] = {"resourceVersion": rv}
        if offset + limit < len(snapshot):
            meta["continue"] = f"{rv}:{offset + limit}:{next(self._tokens)}"
            self.snapshots[meta["continue"]] = snapshot
        group, version, kind = GROUPS[plural]
        return {
            "kind": f"{kind}List",
            "apiVersion": f"{group}/{version}".lstrip("/"),
            "metadata": meta,
            "items": page,
        }

    def _watch(self, request: kmock_lib.Request, plural: str, params: dict[str, str]) -> kmock_lib.Response:
        since = int(params.get("resourceVersion") or 0)
        watcher = Watcher(
            plural,
            request.namespace,
            params.get("labelSelector", ""),
            params.get("allowWatchBookmarks") in ("true", "True"),
        )
        if self.silent_watches.get(plural):
            self.silent_watches[plural] -= 1
            watcher.silent = True
        timeout = float(params.get("timeoutSeconds") or 3600)
        gone = since < self.compacted
        if gone:
            watcher.queue.put_nowait(
                {
                    "type": "ERROR",
                    "object": status(410, "Expired", f"too old resource version: {since} ({self.compacted})"),
                }
            )
            watcher.queue.put_nowait(None)
        else:
            for rv, p, kind, obj in self.history:
                if rv > since and watcher.wants(p, obj):
                    watcher.queue.put_nowait({"type": kind, "object": obj})
            self.watchers.append(watcher)
        reply = self._reply(request, "watch", plural, params, 200, self._stream(watcher, timeout))
        return reply

    async def _stream(self, watcher: Watcher, timeout: float) -> AsyncIterator[Any]:
        yield b""  # send the headers now, as the API server does
        deadline = time.monotonic() + timeout
        try:
            while not self.closed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return  # timeoutSeconds: the server ends the watch
                if watcher.silent:  # a dropped connection nobody noticed: open, and nothing comes
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self.closed.wait()
                    return
                try:
                    async with asyncio.timeout(min(remaining, 0.2)):
                        item = await watcher.queue.get()
                except TimeoutError:
                    continue
                if item is None:
                    return
                if watcher.silent:
                    continue
                yield item
        finally:
            with contextlib.suppress(ValueError):
                self.watchers.remove(watcher)

    # ---- the test side ------------------------------------------------------------------------

    def put(self, plural: str, obj: dict[str, Any], *, notify: bool = True) -> dict[str, Any]:
        """Create or replace an object: the next RV, a history entry, the watchers told."""
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "ml")
        key = (plural, meta["namespace"], meta["name"])
        old = self.objects.get(key)
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        group, version, kind = GROUPS[plural]
        obj.setdefault("apiVersion", f"{group}/{version}".lstrip("/"))
        obj.setdefault("kind", kind)
        self.objects[key] = obj
        self._record(plural, "MODIFIED" if old else "ADDED", obj, notify)
        return obj

    def delete(self, plural: str, name: str, namespace: str = "ml", *, notify: bool = True) -> None:
        obj = self.objects.pop((plural, namespace, name))
        self.rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        self._record(plural, "DELETED", obj, notify)

    def _record(self, plural: str, kind: str, obj: dict[str, Any], notify: bool) -> None:
        if not notify:
            self.compacted = self.rv  # the change is not in the watch cache: only a relist shows it
            return
        self.history.append((self.rv, plural, kind, obj))
        for watcher in list(self.watchers):
            if watcher.wants(plural, obj):
                watcher.queue.put_nowait({"type": kind, "object": obj})

    def bookmark(self) -> str:
        """Time passes elsewhere in etcd; every watch that asked for bookmarks gets the new RV."""
        self.rv += 5
        for watcher in self.watchers:
            if watcher.bookmarks:
                watcher.queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": GROUPS[watcher.plural][2],
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(self.rv)},
                        },
                    }
                )
        return str(self.rv)

    def end_watches(self) -> None:
        for watcher in list(self.watchers):
            watcher.queue.put_nowait(None)

    def expire(self) -> None:
        """Compact the history: every open watch gets 410 and ends; older RVs are gone."""
        self.compacted = self.rv
        self.history.clear()
        for watcher in list(self.watchers):
            watcher.queue.put_nowait(
                {"type": "ERROR", "object": status(410, "Expired", "too old resource version")}
            )
            watcher.queue.put_nowait(None)

    def go_silent(self, plural: str, watches: int = 1) -> None:
        """The next watches of this resource are accepted, then nothing is ever sent on them: a
        connection dropped somewhere on the way, which neither end notices."""
        self.silent_watches[plural] = watches

    def watch_requests(self, plural: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["verb"] == "watch" and r["resource"] == plural]

    def list_requests(self, plural: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["verb"] == "list" and r["resource"] == plural]


# ---- object builders ------------------------------------------------------------------------------


def pod(
    name: str,
    uid: str,
    *,
    revision: str | None = "chat-v1",
    concurrency: int | str | None = None,
    labels: dict[str, str] | None = None,
    namespace: str = "ml",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid, "labels": dict(labels or {})}
    if revision:
        meta["labels"]["fastproxy.io/revision"] = revision
    if concurrency is not None:
        meta["annotations"] = {"fastproxy.io/concurrency": str(concurrency)}
    return {"metadata": meta, "spec": {"containers": [{"name": "app", "image": "app"}]}}


def endpoint(
    name: str,
    uid: str,
    ip: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    node: str = "node-a",
    namespace: str = "ml",
) -> dict[str, Any]:
    conditions = {
        k: v
        for k, v in {"ready": ready, "serving": serving, "terminating": terminating}.items()
        if v is not None
    }
    return {
        "addresses": [ip],
        "conditions": conditions,
        "nodeName": node,
        "targetRef": {"kind": "Pod", "name": name, "namespace": namespace, "uid": uid},
    }


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[dict[str, Any]],
    *,
    managed: bool = True,
    namespace: str = "ml",
    port: int = 8012,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    all_labels = {"kubernetes.io/service-name": service, **(labels or {})}
    if managed:
        all_labels["fastproxy.io/managed"] = "true"
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def fake_kube(kmock: kmock_lib.RawHandler) -> AsyncIterator[FakeKube]:
    fake = FakeKube()
    fake.install(kmock)
    try:
        yield fake
    finally:
        fake.closed.set()
        await asyncio.sleep(0.25)  # let the streams see it and end


def api_config(kmock: kmock_lib.RawHandler, token: str = "good-token") -> client.Configuration:
    cfg = client.Configuration(
        host=str(kmock.url).rstrip("/"),
        api_key={"BearerToken": token},
        api_key_prefix={"BearerToken": "Bearer"},
    )
    cfg.retries = 0  # urllib3 retries would hide the faults under test
    return cfg


class Collected:
    """A submit() stand-in: the events the informer would append to the writer's stream."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.batches = 0

    async def __call__(self, events: list[Event]) -> None:
        self.events.extend(events)
        self.batches += 1

    def kinds(self, uid: str | None = None) -> list[str]:
        return [type(e).__name__ for e in self.events if uid is None or e.uid == uid]  # type: ignore[union-attr]

    def of(self, cls: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def clear(self) -> None:
        self.events.clear()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.01)
