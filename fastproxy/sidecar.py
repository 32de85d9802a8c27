"""``fastproxy sidecar``: the pod-local gate that knows, within milliseconds, whether its app can serve.

Theory of operation
-------------------
The sidecar is the router's own data plane pointed at one pod: a ``Router`` whose static snapshot
holds a single route to a single "pod", the app on ``--app``, with the pod's concurrency. So it
proxies with the same exchange and the same strictness, and holds the pod's slots authoritatively.
It runs in ``refuse_when_full`` mode. When every slot is taken, the app is not ready, or the
sidecar is draining, it answers ``503`` + ``x-fastproxy-busy: 1`` before reading the body (routers
send ``Expect: 100-continue`` with ``--sidecar-protocol``, so the body is still with them) and the
router picks another pod. With concurrency 1 the app never runs two requests at once, whatever the
number of routers, and no request runs twice (a refused request never reached it).

Parking: a request that has already waited in its router (it carries ``x-fastproxy-park: 1``)
and finds the ready app full is parked instead (at most ``--park`` of them, each at most
``--park-timeout``, then refused as busy). When the app finishes a request, the oldest parked one
gets the slot at once, inside this process: a pod under load is not left idle for the time a
router needs to learn that the slot is free (a refusal, its backoff, another try). A fresh request
is never parked (another pod may be free now), and nothing is parked while the app is not ready
or the sidecar drains: those transitions refuse the parked requests at once. The park timeout
stays below the routers' 100-continue wait (1 s), so a parked body is still the router's to send
elsewhere. Three places by default: every router counts only its own requests, so under load each
of them sends a full CC=1 pod one request (its slot looks free to it) and retries it each busy
backoff; with R routers, R - 1 places take them all. With one place, the router whose request just
finished refilled it at once and every other router's retry was refused: 4 routers x 20 pods at
1.3x capacity made ~1,000 refusals a second, a third of the routers' and sidecars' CPU, and on a
busy machine that CPU is what lengthens the pod's idle gaps (the handoff itself is one loop turn
here). With three: ~100 in the whole run. A parked request waits for at most the requests ahead
of it (or the park timeout, then goes back to its router).

A probe loop checks the app every ``--probe-interval`` (default 50 ms): an HTTP GET of
``--readiness-path`` (2xx = ready; on a kept-alive connection, renewed every second) or a TCP
connect, each with a short timeout, so an app that blocks its event loop (model loading, a GC
pause) reads as not ready. 50 ms, not less: a probe cycle costs an idle sidecar ~0.3 ms of CPU
and the app ~0.12 ms (20 sidecars: 0.13 + 0.05 cores at 50 ms, 0.26 + 0.09 at 25 ms), CPU that
loaded pods' idle gaps pay for, while the readiness goal (<= 100 ms p99 to every router) is met at
50 ms: the probe's wait plus ~5 ms for Valkey, the writer and the routers. Every transition is applied
to the local snapshot at once and pushed to the writer's stream as a ``ReadinessChanged`` event;
a full ``PodDiscovered`` report is re-sent periodically as anti-entropy (Valkey restarted empty,
a lost event).

WebSocket sessions pass through as on a router (``fastproxy.tunnel``): a session holds one of the
app's slots until it ends, so a CC=1 app with an open session refuses every other request and
session as busy.

SIGTERM or SIGUSR1 (a preemption notice): push ``DrainStarted`` first, refuse new requests
(busy, then that connection closes), let in-flight ones and open WebSocket sessions finish within
``--grace-period``, then close the sessions left (a TCP close, no close frame: the app owns the
WebSocket protocol) and exit 0. Idle router connections are left open until then, and for at least ``--drain-notice`` seconds:
closing one while a router that has not yet seen the drain writes a request on it would lose that
request (a 502 nobody could retry), whereas a request that arrives is refused as busy and goes to
another pod. ``/healthz`` on the admin
port is the sidecar's own liveness (the app's readiness is not the sidecar's liveness); its
``/metrics`` carry the pod's in-flight count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from typing import Any

import msgspec

from fastproxy.config import RouterConfig
from fastproxy.errors import SidecarBusy
from fastproxy.proxy import ClientConnection, Stage
from fastproxy.router import Router, parse_address
from fastproxy.snapshot import RoutingSnapshot
from fastproxy.tunnel import ABORT_AFTER_CLOSE
from statesync.keys import Keys
from statesync.schema import (
    Delta,
    DrainStarted,
    Event,
    PodDiscovered,
    PodRecord,
    PodState,
    ReadinessChanged,
    Route,
    Source,
    WeightedRevision,
    encode,
)

log = logging.getLogger("fastproxy.sidecar")

APP = "app"  # the one revision and pod of the sidecar's own snapshot
PROBE_RECONNECT_EVERY = 20  # probes on one kept-alive connection (1 s at the default interval)
_CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*(\d+)")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


class Sidecar:
    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.args = args
        self.loop = loop
        config = RouterConfig(
            max_queued=0,  # nothing parked until the app is ready (set_ready)
            queue_timeout=args.park_timeout,
            refuse_when_full=True,
            exclusion_seconds=args.probe_interval,  # the probe decides readiness, not exclusions
            trusted_proxies=("0.0.0.0/0", "::/0"),  # only routers reach a sidecar (NetworkPolicy)
            first_byte_timeout=args.first_byte_timeout,
            grace_period=args.grace_period,
            websocket_idle_timeout=args.websocket_idle_timeout,
            instance=f"sidecar-{args.pod_uid}",
        )
        self.router = Router(config, loop)
        app_host, app_port = args.app
        self.app_record = PodRecord(
            uid=APP, namespace=args.namespace, revision=APP, ip=app_host, port=app_port,
            concurrency=args.concurrency, state=PodState.NOT_READY, generation=1,
        )  # fmt: skip
        route = Route(service=APP, revisions=(WeightedRevision(revision=APP, weight=100),))
        self.router.install(RoutingSnapshot.build(0, 1, [self.app_record], [route]))
        self.ready = False
        self.reason = "not probed yet"
        self.transitions = 0
        self.client: Any = None
        self.outbox: list[Event] = []  # events waiting for Valkey (bounded)
        self.outbox_ready = asyncio.Event()
        self.draining = False
        self.bound_port = args.listen[1]
        self._probe_conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._probe_uses = 0
        self._probe_request = (
            f"GET {args.readiness_path} HTTP/1.1\r\nHost: {args.app[0]}\r\nUser-Agent: fastproxy-sidecar\r\n\r\n"
        ).encode()

    # ---- readiness ---------------------------------------------------------------------------

    async def probe(self) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(self.args.probe_timeout):
                if not self.args.readiness_path:
                    _, writer = await asyncio.open_connection(*self.args.app)
                    writer.close()
                    return True, "tcp connect ok"
                status = await self._probe_http()
                ok = status[:1] == b"2"
                return ok, "probe ok" if ok else f"probe answered {status.decode(errors='replace')}"
        except TimeoutError:
            self._close_probe()
            return False, f"probe timed out after {self.args.probe_timeout * 1000:.0f} ms (app blocked?)"
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self._close_probe()
            return False, f"probe failed: {getattr(exc, 'strerror', None) or exc or type(exc).__name__}"

    async def _probe_http(self) -> bytes:
        """GET the readiness path on a kept-alive connection: 20 probes a second would otherwise cost
        the app and the sidecar a connection each (most of an idle sidecar's CPU). A fresh
        connection every PROBE_RECONNECT_EVERY probes still checks that the app accepts new ones."""
        conn = self._probe_conn
        if conn is None or conn[1].is_closing() or self._probe_uses >= PROBE_RECONNECT_EVERY:
            self._close_probe()
            conn = self._probe_conn = await asyncio.open_connection(*self.args.app)
        reader, writer = conn
        self._probe_uses += 1
        writer.write(self._probe_request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1."):
            raise EOFError("not an HTTP response")
        lowered = head.lower()
        length = _CONTENT_LENGTH.search(lowered)
        if length is None or b"\nconnection: close" in lowered or b"\ntransfer-encoding:" in lowered:
            self._close_probe()  # no way (or no leave) to reuse it: a fresh one next time
        elif int(length.group(1)):
            await reader.readexactly(int(length.group(1)))
        return head[9:12]

    def _close_probe(self) -> None:
        if self._probe_conn is not None:
            self._probe_conn[1].close()
            self._probe_conn = None
        self._probe_uses = 0

    def set_ready(self, ready: bool, reason: str) -> None:
        self.reason = reason
        if ready == self.ready:
            return
        self.ready = ready
        self.transitions += 1
        record = self.router.snapshot.pods[APP]
        changed = msgspec.structs.replace(
            record, state=PodState.READY if ready else PodState.NOT_READY, generation=record.generation + 1,
            reason=reason, since=time.time(),
        )  # fmt: skip
        snapshot = self.router.snapshot
        self.router.apply_delta(Delta(epoch=snapshot.epoch, version=snapshot.version + 1, pods=(changed,)))
        self.router.slots.max_queued = self.args.park if ready and not self.draining else 0
        if not ready:
            self.router.slots.readmit(APP)
            self.refuse_parked("app not ready")
        log.info("app %s: %s", "ready" if ready else "NOT ready", reason)
        self.push(ReadinessChanged(uid=self.args.pod_uid, source=Source.SIDECAR, at=time.time(), ready=ready,
                                   reason=reason[:200]))  # fmt: skip

    def refuse_parked(self, reason: str) -> None:
        """Send every parked request back to its router now (it will pick another pod)."""
        for conn in list(self.router.connections):
            exchange = conn.exchange
            if exchange is not None and exchange.stage == Stage.QUEUED:
                exchange.fail(SidecarBusy(reason))

    async def probe_loop(self) -> None:
        interval = self.args.probe_interval
        while not self.draining:
            started = self.loop.time()
            ok, reason = await self.probe()
            if not self.draining:
                self.set_ready(ok, reason)
            await asyncio.sleep(max(0.0, interval - (self.loop.time() - started)))

    # ---- reports -----------------------------------------------------------------------------

    def discovered(self) -> PodDiscovered:
        args = self.args
        return PodDiscovered(
            uid=args.pod_uid, source=Source.SIDECAR, at=time.time(), namespace=args.namespace,
            revision=args.revision, ip=args.pod_ip, port=args.advertise_port or self.bound_port,
            concurrency=args.concurrency, ready=self.ready, adapters=tuple(args.adapter),
        )  # fmt: skip

    def push(self, event: Event) -> None:
        if len(self.outbox) >= 1000:
            del self.outbox[0]
        self.outbox.append(event)
        self.outbox_ready.set()

    async def report_loop(self) -> None:
        if not self.args.valkey:
            return
        from statesync.connect import connect

        keys = Keys(self.args.namespace_prefix)
        self.client = connect(self.args.valkey)
        self.push(self.discovered())
        last_full = self.loop.time()
        while True:
            self.outbox_ready.clear()
            if self.loop.time() - last_full > self.args.report_interval:
                self.push(self.discovered())
                last_full = self.loop.time()
            if not self.outbox:
                wait = last_full + self.args.report_interval - self.loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.outbox_ready.wait(), max(wait, 0.001))
                continue
            if self.outbox:
                batch = list(self.outbox)
                try:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for event in batch:
                            pipe.xadd(keys.events, {"e": encode(event)})
                        await pipe.execute()
                    del self.outbox[: len(batch)]
                except Exception as exc:  # any Valkey trouble: keep the events, try again
                    log.warning("cannot reach Valkey (%s); %d events waiting", exc, len(self.outbox))
                    await asyncio.sleep(0.5)
                    continue

    async def flush(self, timeout: float = 2.0) -> None:
        deadline = self.loop.time() + timeout
        while self.outbox and self.loop.time() < deadline:
            await asyncio.sleep(0.01)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def drain(self, notice_until: float, grace: float) -> None:
        """In-flight requests and WebSocket sessions finish (within ``grace``); idle connections stay
        open meanwhile and at least until ``notice_until``, so a request a router sends before it
        learns of the drain is refused politely (and its connection then closed) instead of
        meeting a closed socket. Sessions still open at the end are closed (TCP close)."""
        router = self.router
        for conn in list(router.connections):
            conn.closing = True  # each connection closes after its current (or next, refused) answer
        deadline = self.loop.time() + grace
        while self.loop.time() < deadline:
            now = self.loop.time()
            if (
                now >= notice_until
                and not router.tunnels.open
                and not any(conn.exchange is not None for conn in router.connections)
            ):
                break
            await asyncio.sleep(0.05)  # polling a set that only shrinks; bounded by the grace
        for conn in list(router.connections):
            if conn.exchange is None and conn.transport is not None:
                conn.transport.close()  # idle: a FIN, which a router sees before reusing it
            else:
                conn.abort()  # still in flight after the grace period: cut
        router.tunnels.close_all(f"sidecar drain: still open after the {grace:g}s grace period")
        await router.tunnels.wait_closed(2 * ABORT_AFTER_CLOSE)
        router.pool.close_all()

    async def serve(self) -> int:
        from fastproxy.admin import start_admin

        args = self.args
        host, port = args.listen
        server = await self.loop.create_server(
            lambda: ClientConnection(self.router), host, port, backlog=1024
        )
        self.bound_port = server.sockets[0].getsockname()[1]
        admin_host, admin_port = args.admin
        admin = await start_admin(
            self.router, admin_host, admin_port, os.environ.get("FASTPROXY_ADMIN_TOKEN")
        )
        tasks = [asyncio.create_task(self.probe_loop()), asyncio.create_task(self.report_loop())]
        bound = server.sockets[0].getsockname()
        print(
            f"listening {bound[0]}:{bound[1]} admin {admin_host}:{admin.sockets[0].getsockname()[1]}",
            flush=True,
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self.loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # Drain: tell the writer first, so routers stop picking us; refuse anything that still comes.
        self.draining = True
        self.router.draining = True
        self.router.slots.max_queued = 0
        self.refuse_parked("draining")
        self.push(
            DrainStarted(uid=args.pod_uid, source=Source.SIDECAR, at=time.time(), reason="sidecar draining")
        )
        notice_until = self.loop.time() + args.drain_notice
        await self.flush()
        await self.drain(notice_until, args.grace_period)
        server.close()
        for task in tasks:
            task.cancel()
        admin.close()
        return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    missing = [name for name in ("pod_uid", "revision", "pod_ip") if not getattr(args, name)]
    if args.valkey and missing:
        print(f"fastproxy sidecar: --{missing[0].replace('_', '-')} is required with --valkey", flush=True)
        return 2
    if args.park < 0 or not 0 < args.park_timeout < 1.0:
        # Routers send the body anyway after 1 s without 100 Continue; a request parked longer
        # could no longer be refused and replayed elsewhere.
        print("fastproxy sidecar: --park must be >= 0 and 0 < --park-timeout < 1", flush=True)
        return 2
    import uvloop

    async def main() -> int:
        sidecar = Sidecar(args, asyncio.get_running_loop())
        return await sidecar.serve()

    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(main())
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sidecar",
        help="the pod-local gate: concurrency slots, fast readiness probing, readiness pushes",
        description=(
            "Runs next to an inference app: holds its concurrency slots (refusing politely when full), "
            "probes its readiness every 50 ms and pushes every change to the writer. Every flag can also "
            "be set from the environment (Downward API)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--listen", type=parse_address, default=_env("FASTPROXY_SIDECAR_LISTEN", "0.0.0.0:8012"),
                        help="HOST:PORT routers connect to [FASTPROXY_SIDECAR_LISTEN]")  # fmt: skip
    parser.add_argument("--advertise-port", type=int, default=int(_env("FASTPROXY_ADVERTISE_PORT", "0") or 0),
                        help="port routers should use, if not the listen port [FASTPROXY_ADVERTISE_PORT]")  # fmt: skip
    parser.add_argument("--admin", type=parse_address, default=_env("FASTPROXY_SIDECAR_ADMIN", "0.0.0.0:9091"),
                        help="admin HOST:PORT (/healthz, /metrics) [FASTPROXY_SIDECAR_ADMIN]")  # fmt: skip
    parser.add_argument("--app", type=parse_address, default=_env("FASTPROXY_APP", "127.0.0.1:8000"),
                        help="the app's HOST:PORT [FASTPROXY_APP]")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=int(_env("FASTPROXY_CONCURRENCY", "1") or 1),
                        help="requests the app serves at once [FASTPROXY_CONCURRENCY]")  # fmt: skip
    parser.add_argument("--adapter", action="append", metavar="NAME",
                        default=[a for a in _env("FASTPROXY_ADAPTERS", "").split(",") if a],
                        help="a LoRA adapter the app has loaded, advertised to routers so requests naming "
                             "it prefer this pod (repeatable) [FASTPROXY_ADAPTERS, comma-separated]")  # fmt: skip
    parser.add_argument("--readiness-path", default=_env("FASTPROXY_READINESS_PATH", "/ready"),
                        help="HTTP path probed for readiness; empty for a TCP probe [FASTPROXY_READINESS_PATH]")  # fmt: skip
    parser.add_argument("--probe-interval", type=float, default=float(_env("FASTPROXY_PROBE_INTERVAL", "0.05") or 0.05),
                        help="seconds between probes [FASTPROXY_PROBE_INTERVAL]")  # fmt: skip
    parser.add_argument("--probe-timeout", type=float, default=float(_env("FASTPROXY_PROBE_TIMEOUT", "0.2") or 0.2),
                        help="a probe slower than this means not ready [FASTPROXY_PROBE_TIMEOUT]")  # fmt: skip
    parser.add_argument("--park", type=int, default=int(_env("FASTPROXY_PARK", "3") or 0),
                        help="requests that already waited in a router, parked while the app is full "
                             "(0: refuse them all; routers - 1 avoids refusals under load) "
                             "[FASTPROXY_PARK]")  # fmt: skip
    parser.add_argument("--park-timeout", type=float, default=float(_env("FASTPROXY_PARK_TIMEOUT", "0.25") or 0.25),
                        help="seconds a parked request waits for the app before it is refused as busy; "
                             "below the routers' 1 s 100-continue wait [FASTPROXY_PARK_TIMEOUT]")  # fmt: skip
    parser.add_argument("--valkey", default=_env("FASTPROXY_VALKEY"), help="Valkey URL [FASTPROXY_VALKEY]")
    parser.add_argument("--namespace-prefix", default=_env("FASTPROXY_KEY_PREFIX", "fastproxy"),
                        help="Valkey key prefix [FASTPROXY_KEY_PREFIX]")  # fmt: skip
    parser.add_argument("--pod-uid", default=_env("POD_UID"), help="this pod's UID [POD_UID]")
    parser.add_argument("--pod-ip", default=_env("POD_IP"), help="this pod's IP [POD_IP]")
    parser.add_argument("--namespace", default=_env("POD_NAMESPACE", "default"), help="[POD_NAMESPACE]")
    parser.add_argument(
        "--revision", default=_env("FASTPROXY_REVISION"), help="revision [FASTPROXY_REVISION]"
    )
    parser.add_argument("--report-interval", type=float, default=10.0, help="seconds between full reports")
    parser.add_argument("--first-byte-timeout", type=float, default=600.0, help="seconds to the app's answer")
    parser.add_argument("--grace-period", type=float, default=float(_env("FASTPROXY_GRACE_PERIOD", "30") or 30),
                        help="drain: seconds for in-flight requests [FASTPROXY_GRACE_PERIOD]")  # fmt: skip
    parser.add_argument("--websocket-idle-timeout", type=float,
                        default=float(_env("FASTPROXY_WEBSOCKET_IDLE_TIMEOUT", "600") or 600),
                        help="seconds a WebSocket session may pass no byte either way before it is "
                             "closed (it holds an app slot meanwhile) [FASTPROXY_WEBSOCKET_IDLE_TIMEOUT]")  # fmt: skip
    parser.add_argument("--drain-notice", type=float, default=float(_env("FASTPROXY_DRAIN_NOTICE", "1") or 1),
                        help="drain: seconds idle router connections stay open after the drain is "
                             "announced (routers learn of it meanwhile) [FASTPROXY_DRAIN_NOTICE]")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)
