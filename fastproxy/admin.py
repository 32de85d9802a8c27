"""The admin listener: health, readiness, Prometheus metrics and the routing tables as JSON.

Theory of operation
-------------------
A separate port, never reachable through the proxy listener (the proxy has no admin routes at all;
nothing there dispatches on these paths). Requests are parsed by the same strict sans-IO parser as
the data path. ``/healthz`` and ``/readyz`` answer without credentials (a kubelet probes them);
everything else needs ``Authorization: Bearer <token>`` and answers 401 without it. With no token
configured, only the probes answer.

``/v1/routes`` shows each route as the router holds it (its ``llm`` section with the fields it
sets), and for a ``policy: prefix`` route the affinity wait it runs with: the route's
``affinity_wait_ms`` if set, else the router's ``--affinity-wait-ms`` (``affinity_wait_from``).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import TYPE_CHECKING, Any

import msgspec

from fastproxy.errors import ProxyError
from fastproxy.exchange import END, RequestHead, RequestParser, error_response
from fastproxy.exposition import MetricSource, render
from fastproxy.gcwatch import PAUSES
from fastproxy.metrics import RouterCollector
from fastproxy.tunnel import SessionView
from statesync.schema import Route

if TYPE_CHECKING:
    from fastproxy.router import Router

_json = msgspec.json.Encoder()


class PodView(msgspec.Struct):
    uid: str
    namespace: str
    revision: str
    address: str
    state: str
    reason: str
    source: str
    since: float
    generation: int
    concurrency: int
    inflight: int
    excluded: bool


class RevisionView(msgspec.Struct):
    revision: str
    pods: dict[str, int]
    inflight: int  # WebSocket sessions included: each holds its pod's slot
    queued: int
    free_slots: int
    websocket: SessionView = msgspec.field(default_factory=SessionView)


class RouteView(msgspec.Struct):
    route: Route
    # policy: prefix only: the wait its requests may make for busy affine pods (ms; 0: none),
    # and whose setting that is ("route", or "router" when the route leaves it unset).
    affinity_wait_ms: float | None = None
    affinity_wait_from: str = ""


def routes_view(router: Router) -> list[RouteView]:
    out = []
    by_service = router.snapshot.route_table.by_service
    for name in sorted(by_service):
        compiled = by_service[name]
        view = RouteView(route=compiled.route)
        llm = compiled.llm
        if llm is not None and llm.prefix:
            if llm.affinity_wait >= 0:
                view.affinity_wait_ms, view.affinity_wait_from = llm.affinity_wait * 1000.0, "route"
            else:
                view.affinity_wait_ms, view.affinity_wait_from = router.config.affinity_wait_ms, "router"
        out.append(view)
    return out


def pods_view(router: Router) -> list[PodView]:
    out = []
    for pod in router.snapshot.pods.values():
        slot = router.slots.pods.get(pod.uid)
        out.append(
            PodView(
                uid=pod.uid,
                namespace=pod.namespace,
                revision=pod.revision,
                address=f"{pod.ip}:{pod.port}",
                state=pod.state.value,
                reason=pod.reason,
                source=pod.source.value,
                since=pod.since,
                generation=pod.generation,
                concurrency=pod.concurrency,
                inflight=slot.inflight if slot else 0,
                excluded=bool(slot and pod.state.value == "ready" and not slot.routable),
            )
        )
    return out


def revisions_view(router: Router) -> list[RevisionView]:
    out = []
    for name, members in router.snapshot.revisions.items():
        counts: dict[str, int] = {}
        for pod in members.values():
            counts[pod.state.value] = counts.get(pod.state.value, 0) + 1
        slots = router.slots.revisions.get(name)
        out.append(
            RevisionView(
                revision=name,
                pods=counts,
                inflight=slots.inflight if slots else 0,
                queued=slots.queued if slots else 0,
                free_slots=slots.free_slots if slots else 0,
                websocket=router.tunnels.view(name),
            )
        )
    return out


class AdminConnection(asyncio.Protocol):
    def __init__(self, router: Router, token: str | None, registry: MetricSource) -> None:
        self.router = router
        self.token = token.encode() if token else None
        self.registry = registry
        self.events: list[object] = []
        self.parser = RequestParser(self.events)
        self.transport: asyncio.Transport | None = None
        self.head: RequestHead | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed(data)
        except ProxyError as exc:
            self.transport.write(error_response(exc, close=True))
            self.transport.close()
            return
        for event in self.events:
            if isinstance(event, RequestHead):
                self.head = event
            elif event is END and self.head is not None:
                self.respond(self.head)
                self.head = None
        self.events.clear()

    def respond(self, head: RequestHead) -> None:
        status, content_type, body = self.dispatch(head)
        assert self.transport is not None
        reason = {200: b"OK", 401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed",
                  503: b"Service Unavailable"}.get(status, b"Error")  # fmt: skip
        extra = b"www-authenticate: Bearer\r\n" if status == 401 else b""
        close = not head.keep_alive
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\ncache-control: no-store\r\n%s%s\r\n"
            % (status, reason, content_type, len(body), extra, b"connection: close\r\n" if close else b"")
            + body
        )
        if close:
            self.transport.close()

    def dispatch(self, head: RequestHead) -> tuple[int, bytes, bytes]:
        router = self.router
        path = head.path
        text = b"text/plain; charset=utf-8"
        if head.method not in (b"GET", b"HEAD"):
            return 405, text, b"only GET\n"
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/readyz":
            problems = []
            if router.draining:
                problems.append("draining")
            if router.snapshot.version == 0:
                problems.append("no routing state yet")
            if router.stale:
                problems.append(
                    "routing state is stale (writer unreachable); still serving the last snapshot"
                )
            if problems and not (router.stale and router.snapshot.version and not router.draining):
                return 503, text, ("not ready: " + "; ".join(problems) + "\n").encode()
            return 200, text, ("ready" + (" (stale)" if router.stale else "") + "\n").encode()
        if not self.authorized(head):
            return 401, text, b"missing or wrong bearer token\n"
        if path == "/metrics":
            return 200, b"text/plain; version=0.0.4; charset=utf-8", render(self.registry.collect())
        if path == "/v1/pods":
            return 200, b"application/json", _json.encode(pods_view(router))
        if path == "/v1/revisions":
            return 200, b"application/json", _json.encode(revisions_view(router))
        if path == "/v1/routes":
            return 200, b"application/json", _json.encode(routes_view(router))
        if path == "/v1/state":
            snapshot = router.snapshot
            return (
                200,
                b"application/json",
                _json.encode(
                    {
                        "instance": router.config.instance,
                        "epoch": snapshot.epoch,
                        "version": snapshot.version,
                        "stale": router.stale,
                        "snapshot_age_seconds": time.time() - router.snapshot_changed_at,
                        "pods": len(snapshot.pods),
                        "connections": len(router.connections),
                        # Leak checks (the fault suite): asyncio tasks of this process right now.
                        "tasks": len(asyncio.all_tasks()),
                        "requests": router.stats.requests,
                        "added_latency_p50": router.stats.added_latency.quantile(0.5),
                        "added_latency_p90": router.stats.added_latency.quantile(0.9),
                        "added_latency_p99": router.stats.added_latency.quantile(0.99),
                        "gc": PAUSES.as_dict(),
                    }
                ),
            )
        return 404, text, b"no such admin path\n"

    def authorized(self, head: RequestHead) -> bool:
        if self.token is None:
            return False
        value = head.header(b"authorization") or b""
        scheme, _, credentials = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)


async def start_admin(router: Router, host: str, port: int, token: str | None) -> Any:
    collector = RouterCollector(router)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AdminConnection(router, token, collector), host, port)
