"""``fastproxy router``: the process that owns one snapshot, one slot table and the listeners.

Theory of operation
-------------------
``Router`` is the state one event loop serves from: the current ``RoutingSnapshot`` (one reference,
replaced whole), the ``SlotTable`` beside it, the upstream pool and the statistics. The fields the
data path reads on every request (those, the loop, the configuration) are declared by its base,
``fastproxy.routerbase.RouterBase``: an extension type in the compiled form, read as C fields. The state path
calls ``install`` (a whole state: bootstrap, resync, a static routes file), ``apply_delta`` (one
committed change, O(changed pods)) or ``apply_deltas`` (consecutive changes received together, as
one: one snapshot swap); the data path only reads the snapshot and counts. After a
whole state is loaded and warmed, ``after_bulk_load`` freezes it out of the cyclic collector's
sight (``fastproxy.gcwatch``: later collections walk only what changed since; their pauses are on
``/metrics``) and trims the heap.

When a request meets a transport failure that proves a pod cannot serve, the data path calls
``exclude_pod``: the pod leaves this router's rotation at once and a ``ConnectFailed`` report is
queued for the writer (bounded; the oldest is dropped and counted when nobody drains it). The
exclusion lifts when the writer's view of the pod moves past the failure, after
``exclusion_seconds`` so a router without state sync recovers on its own, or earlier when an
active re-check (a TCP connect every ``recheck_interval``) finds the pod accepting connections
again. A connection lost after the request may have reached the app is reported with
``upstream_lost``; ``fastproxy.outlier`` decides what it proves: a reset of a fresh connection
before any response byte excludes, any other loss counts towards ``outlier_consecutive_failures``
broken exchanges in a row, and only that streak excludes (without re-checks).

WebSocket sessions (``fastproxy.tunnel``) live in ``tunnels`` once the pod has switched protocols;
each holds its pod's slot until it ends.

``serve`` runs listeners until SIGTERM/SIGINT, then drains: stop accepting, close idle keep-alive
connections, let in-flight requests and open WebSocket sessions finish within the grace period,
then abort the requests and close the sessions.
``--workers N`` starts N such processes sharing the port with SO_REUSEPORT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextvars
import functools
import ipaddress
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastproxy import affinity, gcwatch
from fastproxy.compiled import describe as describe_form
from fastproxy.config import ConfigError, RouterConfig, RoutesFile, load_routes_file
from fastproxy.exchange import Limits
from fastproxy.heap import release_free_memory
from fastproxy.metrics import RouterStats
from fastproxy.outlier import MAX_RECHECKS, Evidence, OutlierDetector, classify, connect_ok
from fastproxy.proxy import ClientConnection, UpstreamPool, flush_queued_writes
from fastproxy.routerbase import RouterBase
from fastproxy.slots import SlotTable
from fastproxy.snapshot import RoutingSnapshot, VersionGap
from fastproxy.tunnel import ABORT_AFTER_CLOSE, Tunnels
from statesync.schema import ConnectFailed, ConnectFailureKind, Delta, PodRecord, PodState, Route, Source

log = logging.getLogger("fastproxy.router")

MAX_PENDING_REPORTS = 10_000


class Router(RouterBase):
    """One event loop's router; the fields the data path reads per request are ``RouterBase``'s
    (an extension type in the compiled form, so the compiled data path reads them as C fields)."""

    def __init__(self, config: RouterConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.snapshot = RoutingSnapshot.empty()
        self.snapshot_changed_at = time.time()
        self.stale = False  # set by the state-sync subscriber when it loses the writer
        self.state_follower: Any = None
        self.slots = SlotTable(max_queued=config.max_queued, max_queue_bytes=config.max_queue_bytes)
        self.pool = UpstreamPool(
            loop,
            config.limits,
            idle_timeout=config.pool_idle_timeout,
            max_idle_per_pod=config.pool_max_idle_per_pod,
        )
        self.stats = RouterStats()
        # Responses written at the end of each loop iteration (fastproxy.proxy.flush_queued_writes).
        self.write_queue: list[Any] = []
        self.write_flusher = functools.partial(flush_queued_writes, self)
        self.write_context = contextvars.Context()
        self.connections: set[ClientConnection] = set()
        self.tunnels = Tunnels(self)  # open WebSocket sessions
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_interval = min(1.0, config.header_timeout / 4, config.idle_timeout / 4)
        self.draining = False
        self.service_header = config.service_header.lower().encode()
        self._trusted = config.trusted_networks()
        self._trusted_cache: dict[str, bool] = {}
        self._excluded_until: dict[str, float] = {}
        self.outliers = OutlierDetector(config.outlier_consecutive_failures)
        self._rechecks: set[asyncio.Task[None]] = set()  # re-check connects in flight
        # Reports for the writer (state sync drains this); bounded, oldest dropped.
        self.reports: collections.deque[ConnectFailed] = collections.deque(maxlen=MAX_PENDING_REPORTS)
        self.reports_dropped = 0
        self._request_count = 0  # request ids: the prefix and this counter (RouterBase.forwarding_headers)
        self._request_prefix = f"{config.instance}-{os.getpid():x}-{int(time.time()):x}".encode()

    # ---- the state path ---------------------------------------------------------------------

    def install(
        self,
        snapshot: RoutingSnapshot,
        by_revision: Mapping[str, list[PodRecord]] | None = None,
        *,
        revision_chunks: Mapping[str, list[int]] | None = None,
        changed: Sequence[PodRecord] | None = None,
    ) -> None:
        """Adopt a whole state (bootstrap, resync, static file). ``by_revision``: the same pods
        grouped per revision (``SnapshotBuilder.by_revision``, handed over), which a router that
        has no pods yet takes as they are instead of grouping them again. ``revision_chunks``: the
        writer's revision index, for a snapshot whose chunks are still packed (a ``fresh`` router):
        each revision's records are read from the current snapshot when first needed. ``changed``:
        the records that differ from the current snapshot's (new or changed ones, and REMOVED ones
        for pods it no longer holds), when the caller has worked them out (a running router's
        resync): only those are reconciled, as a delta's would be."""
        if changed is not None and not self.fresh:
            self._reconcile(changed)
        elif revision_chunks is not None and self.fresh:
            self.slots.adopt_unread(revision_chunks, lambda: self.snapshot.pods)
        elif by_revision is not None and self.fresh:
            self.slots.adopt(by_revision)
        else:
            self.slots.replace_all(snapshot.pods.values())
        self.snapshot = snapshot
        self.snapshot_changed_at = time.time()

    def after_bulk_load(self, what: str) -> None:
        """A whole state is in place (a routes file, a bootstrap's warm-up, a resync): collect what
        loading it left behind and freeze the survivors (``gcwatch.settle``, unless configured
        off), then give the freed heap back to the OS."""
        if self.config.gc_freeze:
            frozen = gcwatch.settle()
            log.debug("after %s: %d objects frozen out of the collector's sight", what, frozen)
        release_free_memory(what)

    def _reconcile(self, records: Sequence[PodRecord]) -> None:
        self.slots.update(records, self.snapshot.pods)  # (still the snapshot before the change)
        for record in records:
            if record.state is PodState.REMOVED:
                self.pool.drop_pod(record.uid)
                self._excluded_until.pop(record.uid, None)
                self.outliers.forget(record.uid)

    @property
    def fresh(self) -> bool:
        """No pod known yet (nothing installed, or only empty states)."""
        return not self.slots.pods and not self.slots.revisions

    def apply_delta(self, delta: Delta) -> None:
        """Adopt one committed change; raises ``VersionGap`` if it does not follow."""
        snapshot = self.snapshot.apply(delta)
        self._reconcile(delta.pods)
        self.snapshot = snapshot
        self.snapshot_changed_at = time.time()

    def apply_deltas(self, deltas: Sequence[Delta]) -> None:
        """Adopt consecutive committed changes in one step, as if applied one by one: each pod and
        route takes its last record of the batch, the slot table reconciles each once, and the
        snapshot is swapped once, to the last delta's version. Raises ``VersionGap`` (nothing
        applied) unless the batch follows the snapshot without a gap, all of its epoch."""
        if len(deltas) == 1:
            self.apply_delta(deltas[0])
            return
        first, last = deltas[0], deltas[-1]
        pods: dict[str, PodRecord] = {}
        routes: dict[str, Route] = {}
        version = first.version
        for delta in deltas:
            if delta.version != version or delta.epoch != first.epoch:
                raise VersionGap((first.epoch, version - 1), (delta.epoch, delta.version))
            version += 1
            for record in delta.pods:
                pods[record.uid] = record  # (a uid repeated in the batch: the later record wins)
            for route in delta.routes:
                routes[route.service] = route
        changed = tuple(pods.values())
        # (the merged change at the first version passes apply's check; the swap carries the last)
        merged = self.snapshot.apply(Delta(epoch=first.epoch, version=first.version, pods=changed,
                                           routes=tuple(routes.values())))  # fmt: skip
        snapshot = RoutingSnapshot(last.epoch, last.version, merged.pods, merged.routes, merged.route_table)
        self._reconcile(changed)
        self.snapshot = snapshot
        self.snapshot_changed_at = time.time()

    # ---- reports from the data path -----------------------------------------------------------

    def exclude_pod(self, pod: PodRecord, kind: str, reason: str, recheck: bool = True) -> None:
        """Out of rotation for ``exclusion_seconds``, reported to the writer. ``recheck``: the
        evidence was a failure to connect, so a connect that works lifts the exclusion early."""
        if not self.slots.exclude(pod.uid):
            return
        self.stats.local_exclusions += 1
        self.pool.drop_pod(pod.uid)
        self.outliers.forget(pod.uid)
        self._exclude_for(pod.uid, self.config.exclusion_seconds)
        log.warning("pod %s (%s:%d, %s) excluded: %s", pod.uid, pod.ip, pod.port, pod.revision, reason)
        if recheck and self.config.recheck_interval > 0:
            self.loop.call_later(self.config.recheck_interval, self._recheck, pod)
        if len(self.reports) == self.reports.maxlen:
            self.reports_dropped += 1
        self.reports.append(
            ConnectFailed(
                uid=pod.uid,
                source=Source.ROUTER,
                at=time.time(),
                generation=pod.generation,
                failure=ConnectFailureKind(kind),
                observer=self.config.instance,
                reason=reason[:200],
            )
        )

    def upstream_lost(
        self,
        pod: PodRecord,
        exc: Exception | None,
        reset: bool,
        fresh_connection: bool,
        response_started: bool,
    ) -> None:
        """The connection to ``pod`` was lost with a request on it (that request fails either way):
        exclude the pod, or count one broken exchange (``fastproxy.outlier``)."""
        reason = f"connection lost mid-exchange: {exc or 'EOF'}"
        if classify(reset, fresh_connection, response_started) is Evidence.CONNECT:
            self.exclude_pod(pod, "reset", f"{reason} (fresh connection reset before any response byte)")
            return
        streak = self.outliers.failed(pod.uid)
        limit = self.outliers.consecutive
        if streak >= limit:
            self.exclude_pod(
                pod, "reset", f"{streak} broken exchanges in a row, the last: {reason}", recheck=False
            )
            return
        log.warning(
            "pod %s (%s:%d, %s) %s; still in rotation (%d of %d broken exchanges in a row exclude it)",
            pod.uid, pod.ip, pod.port, pod.revision, reason, streak, limit,
        )  # fmt: skip

    def _recheck(self, pod: PodRecord) -> None:
        if pod.uid not in self._excluded_until or self.draining:
            return  # lifted (or removed) meanwhile
        if len(self._rechecks) >= MAX_RECHECKS:
            return  # a mass failure: these exclusions run their full time
        task = self.loop.create_task(self._recheck_connect(pod))
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def _recheck_connect(self, pod: PodRecord) -> None:
        ok = await connect_ok(pod.ip, pod.port, self.config.connect_timeout)
        result = "ok" if ok else "failed"
        self.stats.rechecks[result] = self.stats.rechecks.get(result, 0) + 1
        until = self._excluded_until.get(pod.uid)
        if until is None:
            return
        if ok:
            del self._excluded_until[pod.uid]
            self.slots.readmit(pod.uid)
            log.info(
                "pod %s (%s:%d) accepts connections again: exclusion lifted early", pod.uid, pod.ip, pod.port
            )
        elif self.loop.time() + self.config.recheck_interval < until:
            self.loop.call_later(self.config.recheck_interval, self._recheck, pod)

    def skip_busy_pod(self, pod: PodRecord) -> None:
        """A sidecar said "full": our optimistic count was behind. Skip it briefly, no report."""
        if self.slots.exclude(pod.uid):
            self._exclude_for(pod.uid, self.config.busy_backoff_seconds)

    def _exclude_for(self, uid: str, seconds: float) -> None:
        until = self.loop.time() + seconds
        if until > self._excluded_until.get(uid, 0.0):
            self._excluded_until[uid] = until
            self.loop.call_at(until, self._maybe_readmit, uid)

    def _maybe_readmit(self, uid: str) -> None:
        until = self._excluded_until.get(uid)
        if until is None or self.loop.time() + 1e-3 < until:
            return
        del self._excluded_until[uid]
        self.slots.readmit(uid)

    # ---- per-request helpers ------------------------------------------------------------------

    def is_trusted(self, peer: str) -> bool:
        """Is this client address a configured trusted hop? (Once per connection, cached.)"""
        trusted = self._trusted_cache.get(peer)
        if trusted is None:
            trusted = self._is_trusted(peer)
            if len(self._trusted_cache) < 65536:
                self._trusted_cache[peer] = trusted
        return trusted

    def _is_trusted(self, peer: str) -> bool:
        if not self._trusted or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    # ---- lifecycle ----------------------------------------------------------------------------

    def track(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_interval, self.sweep_timeouts)

    def sweep_timeouts(self) -> None:
        """Header and idle timeouts for every client connection, a few times per timeout; and the
        affinity tables that are due for a rebuild (so that no request pays for one)."""
        self._sweeper = None
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        affinity.rebuild_due(self.slots)
        if self.connections:
            self._sweeper = self.loop.call_later(self._sweep_interval, self.sweep_timeouts)

    async def drain(self, grace: float) -> None:
        """Finish in-flight requests and WebSocket sessions within ``grace`` seconds; then cut the
        requests left and close the sessions left (TCP close: the app owns the WebSocket close)."""
        self.draining = True
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + grace
        while (self.connections or self.tunnels.open) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)  # polling sets that only shrink; bounded by the grace
        for conn in list(self.connections):
            conn.abort()
        self.tunnels.close_all(f"still open after the {grace:g}s grace period")
        await self.tunnels.wait_closed(2 * ABORT_AFTER_CLOSE)
        self.pool.close_all()


_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def instance_name(text: str) -> str:
    """``--instance``: it becomes the prefix of every request id this router sends to pods (a
    header value), the observer named in its reports and a label in /metrics, so only characters
    that are safe in all three are taken; anything else is refused at the command line (exit 2),
    not discovered as 400s from the pods."""
    if _INSTANCE_RE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} is not an instance name: 1-64 of letters, digits and . _ : - "
            "(starting with a letter or digit); it goes into request ids and metric labels"
        )
    return text


def parse_address(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return (host.strip("[]") or default_host, int(port))


def read_token(path: str | None) -> str | None:
    if path:
        with open(path) as handle:
            token = handle.read().strip()
        if not token:
            raise ConfigError(f"admin token file {path} is empty")
        return token
    return os.environ.get("FASTPROXY_ADMIN_TOKEN") or None


async def serve(
    args: argparse.Namespace,
    config: RouterConfig,
    ready: asyncio.Event | None = None,
    routes: RoutesFile | None = None,
) -> int:
    """Run a router until signalled. ``routes``: ``args.routes`` already loaded (``run`` reads it
    before binding anything; reading 50k pods twice would leave the first copy's pages behind)."""
    from fastproxy.admin import start_admin

    gcwatch.install()
    loop = asyncio.get_running_loop()
    router = Router(config, loop)
    if args.routes:
        if routes is None:
            routes = load_routes_file(args.routes)
        router.install(RoutingSnapshot.build(0, 1, routes.pods, routes.routes))
        router.after_bulk_load("the static routes file")
        log.info(
            "static routes from %s: %d routes, %d pods", args.routes, len(routes.routes), len(routes.pods)
        )
    sync_tasks = []
    if args.valkey:
        from statesync.keys import Keys
        from statesync.subscriber import start_state_sync

        sync_tasks = start_state_sync(router, args.valkey, Keys(args.namespace))
    host, port = args.listen
    server = await loop.create_server(
        lambda: ClientConnection(router), host, port, reuse_port=args.reuse_port, backlog=4096
    )
    admin_host, admin_port = args.admin
    admin_port += args.worker_index
    token = read_token(args.admin_token_file)
    admin = await start_admin(router, admin_host, admin_port, token)
    bound = server.sockets[0].getsockname()
    admin_port = admin.sockets[0].getsockname()[1]  # the bound one (a configured 0 is any port)
    log.info(
        "router %s listening on %s:%d, admin on %s:%d%s; %s",
        config.instance, bound[0], bound[1], admin_host, admin_port,
        "" if token else " (no admin token: only /healthz and /readyz answer)", describe_form(),
    )  # fmt: skip
    # One write of the whole line: workers share stdout, and print's separate "\n" write can land
    # after another worker's line when stdout is unbuffered (PYTHONUNBUFFERED), gluing two together.
    sys.stdout.write(f"listening {bound[0]}:{bound[1]} admin {admin_host}:{admin_port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: %d connections, grace %.0fs", len(router.connections), config.grace_period)
    server.close()
    await router.drain(config.grace_period)
    for task in sync_tasks:
        task.cancel()
    admin.close()
    return 0


MAX_DELTA_COALESCE_MS = 100.0  # (a readiness change later than this is a stale router, not a cheap one)


def _config_from_args(args: argparse.Namespace) -> RouterConfig:
    if args.outlier_failures < 1:
        raise ConfigError(f"--outlier-failures must be at least 1, got {args.outlier_failures}")
    if args.recheck_interval < 0:
        raise ConfigError(f"--recheck-interval must be >= 0 seconds (0: off), got {args.recheck_interval:g}")
    if not 0 <= args.affinity_wait_ms <= args.queue_timeout * 1000:
        raise ConfigError(
            f"--affinity-wait-ms must be between 0 (off) and --queue-timeout ({args.queue_timeout * 1000:g} ms), "
            f"got {args.affinity_wait_ms:g}"
        )
    if not 0 <= args.delta_coalesce_ms <= MAX_DELTA_COALESCE_MS:
        raise ConfigError(
            f"--delta-coalesce-ms must be between 0 (off) and {MAX_DELTA_COALESCE_MS:g} ms, got {args.delta_coalesce_ms:g}"
        )
    return RouterConfig(
        limits=Limits(max_body_bytes=args.max_body_bytes),
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        connect_timeout=args.connect_timeout,
        first_byte_timeout=args.first_byte_timeout,
        queue_timeout=args.queue_timeout,
        affinity_wait_ms=args.affinity_wait_ms,
        delta_coalesce_ms=args.delta_coalesce_ms,
        max_queued=args.max_queued,
        max_attempts=args.max_attempts,
        exclusion_seconds=args.exclusion_seconds,
        outlier_consecutive_failures=args.outlier_failures,
        recheck_interval=args.recheck_interval,
        busy_backoff_seconds=args.busy_backoff,
        service_header=args.service_header,
        sidecar_protocol=args.sidecar_protocol,
        trusted_proxies=tuple(args.trusted_proxy),
        grace_period=args.grace_period,
        websocket_idle_timeout=args.websocket_idle_timeout,
        gc_freeze=args.gc_freeze,
        instance=args.instance or f"router-{os.uname().nodename}-{args.worker_index}",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.workers > 1 and args.worker_index == 0 and not args.reuse_port:
        return _run_workers(args)
    try:
        config = _config_from_args(args)
        # (read here to fail fast, before binding anything; serve installs this very copy)
        routes = load_routes_file(args.routes) if args.routes else None
    except ConfigError as exc:
        print(f"fastproxy router: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        return uvloop.run(serve(args, config, routes=routes))
    except OSError as exc:
        print(f"fastproxy router: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1


def _run_workers(args: argparse.Namespace) -> int:
    """N processes sharing the port (SO_REUSEPORT), admin ports ADMIN_PORT + worker index."""
    argv = [a for a in sys.argv[1:]]
    children = []
    for index in range(args.workers):
        cmd = [sys.executable, "-m", "fastproxy.cli", *argv, "--reuse-port", "--worker-index", str(index)]
        children.append(subprocess.Popen(cmd))

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "router",
        help="run the data plane: HTTP/1.1 in, pick a pod that can serve now, stream to it and back",
        description=(
            "The fastproxy data plane. Routes each request by Host / path prefix / service header to a "
            "revision (weighted split), picks a Ready pod with a free slot (or queues, bounded, with a "
            "deadline), and streams request and response with flow control. A pod that refuses or "
            "times out on connect is excluded at once and the request goes to another pod."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--listen", type=parse_address, default=("0.0.0.0", 8080), help="proxy HOST:PORT")
    parser.add_argument("--admin", type=parse_address, default=("127.0.0.1", 9090),
                        help="admin HOST:PORT (/healthz /readyz /metrics /v1/pods /v1/revisions /v1/routes)")  # fmt: skip
    parser.add_argument(
        "--admin-token-file", help="bearer token for the admin API (else $FASTPROXY_ADMIN_TOKEN)"
    )
    parser.add_argument("--routes", help="static routing file (JSON or YAML): routes and pods")
    parser.add_argument("--valkey", default=os.environ.get("FASTPROXY_VALKEY"),
                        help="follow the writer's state in Valkey (URL; else $FASTPROXY_VALKEY)")  # fmt: skip
    parser.add_argument("--namespace", default="fastproxy", help="Valkey key prefix")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--instance", type=instance_name, default=None,
                        help="name in request ids, reports and metrics: letters, digits, . _ : - "
                             "(default: router-HOST-N)")  # fmt: skip
    parser.add_argument("--service-header", default="x-fastproxy-service", help="header naming the service")
    parser.add_argument("--sidecar-protocol", action="store_true",
                        help="pods run behind the fastproxy sidecar (busy refusals, Expect: 100-continue)")  # fmt: skip
    parser.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                        help="peers whose X-Forwarded-* are kept (repeatable)")  # fmt: skip
    parser.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request head (408)")
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="idle keep-alive client seconds")
    parser.add_argument("--connect-timeout", type=float, default=1.0, help="upstream connect seconds")
    parser.add_argument(
        "--first-byte-timeout", type=float, default=300.0, help="seconds to response head (504)"
    )
    parser.add_argument(
        "--queue-timeout", type=float, default=10.0, help="max seconds waiting for a slot (503)"
    )
    parser.add_argument("--max-queued", type=int, default=1000, help="waiting requests per revision")
    parser.add_argument(
        "--affinity-wait-ms", type=float, default=0.0, metavar="MS",
        help="LLM prefix routes that do not set llm.affinity_wait_ms: ms a request may wait for its busy "
        "affine pod while another is free (0: never)",
    )  # fmt: skip
    parser.add_argument(
        "--delta-coalesce-ms", type=float, default=0.0, metavar="MS",
        help="with --valkey: after reading state changes, wait this many ms before reading more, so a burst is "
        "applied together (less CPU per change under load; a change in a burst takes effect up to that much later; "
        f"0: off; at most {MAX_DELTA_COALESCE_MS:g})",
    )  # fmt: skip
    parser.add_argument("--max-attempts", type=int, default=4, help="pods tried per request")
    parser.add_argument(
        "--exclusion-seconds", type=float, default=5.0,
        help="seconds a pod is excluded locally after it failed to connect (refused, connect timeout, "
             "a fresh connection reset before any response byte) or after --outlier-failures",
    )  # fmt: skip
    parser.add_argument(
        "--outlier-failures", type=int, default=RouterConfig().outlier_consecutive_failures, metavar="N",
        help="broken exchanges in a row (EOF or reset after the request may have reached the app, no "
             "complete response between them) that exclude a pod; fewer only fail their own requests",
    )  # fmt: skip
    parser.add_argument(
        "--recheck-interval", type=float, default=RouterConfig().recheck_interval, metavar="SECONDS",
        help="a pod excluded for failing to connect is re-checked with a TCP connect this often and "
             "readmitted early when it connects (0: no re-checks)",
    )  # fmt: skip
    parser.add_argument("--busy-backoff", type=float, default=RouterConfig().busy_backoff_seconds,
                        help="seconds a pod whose sidecar said busy is skipped by this router")  # fmt: skip
    parser.add_argument(
        "--max-body-bytes", type=int, default=64 * 1024 * 1024, help="request body limit (413)"
    )
    parser.add_argument(
        "--grace-period", type=float, default=30.0,
        help="SIGTERM: seconds for in-flight requests and WebSocket sessions to finish",
    )  # fmt: skip
    parser.add_argument(
        "--websocket-idle-timeout", type=float, default=RouterConfig().websocket_idle_timeout,
        help="seconds a WebSocket session may pass no byte either way before it is closed "
             "(it holds its pod's slot meanwhile)",
    )  # fmt: skip
    parser.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="leave a loaded state in the cyclic collector's sight (every full pass walks it)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)
