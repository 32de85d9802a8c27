"""The sidecar under load: many routers, CC=1 pods behind sidecars, offered load above capacity.

Usage::

    python -m bench.sidecar_load [--routers 4] [--pods 20] [--duration 20] [--rate R]
                                 [--work-ms 50] [--load-factor 1.3] [--busy-backoff S]
                                 [--flips 50] [--json PATH]

Goal (issue "Sidecar"): with 4 router processes and 20 CC=1 pods behind sidecars, load above
capacity gives 0 double-booked app calls (the app counts them), 0 client errors while the queue
deadline holds, and an idle-pod-while-requests-wait time p99 <= 10 ms. And: an app that flips to
not ready gets no new request within <= 100 ms (p99, probe interval included), and is routable
again as fast when it flips back (``--flips``).

Theory of operation
-------------------
Everything is a real process on this machine, on loopback:

- a ``valkey-server`` (``EmbeddedValkey``) and one writer (``python -m fastproxy.cli writer``);
- one app process (``python -m fastproxy.devtools.upstream``) with one ``--listen`` per pod, each
  its own ``AppServer`` with concurrency limit 1, on the pod's own loopback address;
- one sidecar per pod (``fastproxy sidecar --concurrency 1 --readiness-path /ready``) in front of
  its app server, reporting to the writer;
- ``RouteChanged`` for service ``chat`` -> revision ``chat-v1``, submitted to the writer's stream;
- ``--routers`` routers (``fastproxy router --valkey URL --sidecar-protocol --queue-timeout 30
  --max-queued 100000``: the queue deadline, not the queue's count bound, is what limits waiting).

Once every router's admin ``/v1/pods`` shows every pod ready (and not excluded), one open-loop
generator per router (``bench.loadgen.run_open_loop``, all in this process) offers
``rate / routers`` requests/s each: ``POST /delay/<work-ms>`` with a small body, so every request
takes the ``Expect: 100-continue`` path between router and sidecar. ``--rate`` defaults to
``load-factor * capacity``, capacity being ``pods * 1000 / work-ms`` requests/s. Requests are
measured after ``--warmup`` seconds, for ``--duration`` seconds; the generators' timeout is beyond
the routers' queue deadline, so a request that waits is counted as waiting, not as lost.

When the measured window starts, the app's idle gaps are reset (``/control/stats/reset``). An idle
gap is the time from one pod's app finishing its request to it starting the next (with 1.3x the
capacity offered, requests are waiting somewhere all along, so every gap is a pod idle while
requests wait); gaps end being recorded when the last queued request has started. After the load
the figures are collected: the generators' statuses and errors, the app's ``/control/stats``
(violations, max concurrency seen, idle gaps), each router's ``/metrics`` (busy refusals, retries,
queue rejections), and CPU time per process group over the window (this machine is shared: the
CPU used by other processes is reported too).

Readiness flips (``--flips N``, after the load, once every queued request was served): N times,
one pod's app (pods in turn) is flipped to not ready (``/control/ready/0``) and, once that is seen
everywhere, back (``/control/ready/1``). From the moment the flip request is sent, this process
polls the pod's sidecar (its admin ``/v1/pods``: the sidecar's own gate, which refuses every new
request the moment its probe sees the app not ready) and every router's ``/v1/pods`` (the pod not
``ready`` = no router picks it; back ``ready`` and not excluded = routable) until each shows the
change. Polling only says *that* it changed; *when* comes from the processes' own wall clocks
(one machine, one clock): the sidecar's record carries ``since`` (set when its gate moved) and a
router's ``/v1/state`` its snapshot age (read right after ``/v1/pods``, so the change time derived
from it is, if anything, late: a later delta would only make it later). The age is turned into a
time with the moment its reply was *received*, so the figure is late by up to that request's round
trip: the polls are raw GETs on kept-alive connections, one at a time (``AdminPoller``; sub-ms),
and the round trips are reported. (They were httpx requests, all at once: their replies were
parsed one after the other in this process, ~10 ms late each at p50 and up to a poll round, ~30
ms, in the tail -- the bench's own delay, charged to the routers.) Flips start at a random
phase of the probe interval, so the probe's wait is included as it would be in production.
Polling starts 100 ms after the flip and pauses 20 ms between rounds, so that
it takes little CPU from the processes it times. Reported: p50/p99/max of flip -> gate closed at
the sidecar, and flip -> the last router stopped picking it (and the same for flipping back); and
where the time between goes (``StageTracer``): the sidecar's event arriving in Valkey (its stream
id is Valkey's clock), the writer's delta as a subscriber here receives it, the routers after that
delta. A markdown table is printed and everything goes to
``bench/results/sidecar-load-latest.json`` (``--json``). Every child process is stopped on exit,
on error and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import LoadResult, run_open_loop

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "sidecar-load-latest.json"
GOAL_IDLE_GAP_P99_MS = 10.0
REVISION = "chat-v1"
SERVICE = "chat"
PY = sys.executable


@dataclasses.dataclass
class Options:
    routers: int = 4
    pods: int = 20
    duration: float = 20.0
    rate: float | None = None  # default: load_factor * capacity
    work_ms: int = 50
    load_factor: float = 1.3
    warmup: float = 1.0
    queue_timeout: float = 30.0
    body_bytes: int = 64
    max_connections: int = 1024  # per generator (router); beyond it requests wait in the generator
    busy_backoff: float | None = None  # router --busy-backoff (None: the router's default)
    router_args: tuple[str, ...] = ()  # more flags for every router
    sidecar_args: tuple[str, ...] = ()  # more flags for every sidecar
    start_timeout: float = 60.0
    log_dir: str | None = None  # child processes' stderr; a temporary directory if None
    flips: int = 0  # readiness flips measured after the load (each: to not ready and back)

    @property
    def capacity(self) -> float:
        return self.pods * 1000.0 / self.work_ms

    @property
    def offered_rate(self) -> float:
        return self.rate if self.rate is not None else self.load_factor * self.capacity


def pod_address(index: int) -> str:
    """A loopback address per pod (all of 127.0.0.0/8 is local), apart from the tests' ones."""
    return f"127.0.{200 + index // 250}.{index % 250 + 1}"


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


# ---- CPU accounting ------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one process, children excluded; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / _TICK, total / _TICK


# ---- the system ----------------------------------------------------------------------------------


class Child:
    def __init__(self, name: str, group: str, proc: asyncio.subprocess.Process, words: list[str]) -> None:
        self.name, self.group, self.proc, self.words = name, group, proc, words


class System:
    """Valkey, writer, app, sidecars and routers as processes; ``close`` stops them all."""

    def __init__(self, opts: Options, say: Any) -> None:
        self.opts = opts
        self.say = say
        self.token = secrets.token_hex(16)
        self.children: list[Child] = []
        self.valkey: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if opts.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fastproxy-sidecar-load-")
            self.log_dir = Path(self._tmp.name)
        else:
            self.log_dir = Path(opts.log_dir)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.app_addresses: list[str] = []
        self.sidecar_admins: list[str] = []
        self.routers: list[tuple[str, str]] = []  # (proxy address, admin address)

    async def spawn(self, name: str, group: str, *args: str, wait_line: bool = True) -> Child:
        env = dict(os.environ, FASTPROXY_ADMIN_TOKEN=self.token, PYTHONUNBUFFERED="1")
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                PY,
                *args,
                stdout=asyncio.subprocess.PIPE if wait_line else asyncio.subprocess.DEVNULL,
                stderr=log,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        child = Child(name, group, proc, [])
        self.children.append(child)
        if wait_line:
            assert proc.stdout is not None
            try:
                line = (await asyncio.wait_for(proc.stdout.readline(), self.opts.start_timeout)).decode()
            except TimeoutError:
                raise RuntimeError(f"{name} did not start within {self.opts.start_timeout:g}s") from None
            if not line.startswith("listening "):
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not start: {line!r}\n{tail}")
            child.words = line.split()[1:]
        return child

    async def start(self) -> None:
        from statesync.connect import connect
        from statesync.embedded import EmbeddedValkey
        from statesync.schema import Route, RouteChanged, WeightedRevision
        from statesync.writer import submit

        opts = self.opts
        started = time.perf_counter()
        self.valkey = EmbeddedValkey().start()
        url = self.valkey.url
        await self.spawn(
            "writer",
            "writer",
            "-m",
            "fastproxy.cli",
            "writer",
            "--valkey",
            url,
            "--lease-ttl",
            "2",
            "--log-level",
            "warning",
            wait_line=False,
        )
        client = connect(url)
        try:
            await submit(
                client,
                [
                    RouteChanged(
                        route=Route(
                            service=SERVICE, revisions=(WeightedRevision(revision=REVISION, weight=100),)
                        ),
                        at=time.time(),
                    )
                ],
            )
        finally:
            await client.aclose()
        listen = [arg for i in range(opts.pods) for arg in ("--listen", f"{pod_address(i)}:0")]
        app = await self.spawn(
            "app", "app", "-m", "fastproxy.devtools.upstream", *listen, "--concurrency", "1"
        )
        self.app_addresses = app.words
        if len(self.app_addresses) != opts.pods:
            raise RuntimeError(f"app listens on {app.words}, expected {opts.pods} addresses")

        async def sidecar(i: int) -> Child:
            ip = pod_address(i)
            return await self.spawn(
                f"sidecar-{i:02d}",
                "sidecars",
                "-m",
                "fastproxy.cli",
                "sidecar",
                "--listen",
                f"{ip}:0",
                "--admin",
                f"{ip}:0",
                "--app",
                self.app_addresses[i],
                "--concurrency",
                "1",
                "--readiness-path",
                "/ready",
                "--valkey",
                url,
                "--pod-uid",
                f"pod-{i:02d}",
                "--pod-ip",
                ip,
                "--revision",
                REVISION,
                "--grace-period",
                "2",
                "--log-level",
                "warning",
                *opts.sidecar_args,
            )

        async def router(i: int) -> Child:
            extra = [] if opts.busy_backoff is None else ["--busy-backoff", f"{opts.busy_backoff:g}"]
            return await self.spawn(
                f"router-{i}",
                "routers",
                "-m",
                "fastproxy.cli",
                "router",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--valkey",
                url,
                "--sidecar-protocol",
                "--queue-timeout",
                f"{opts.queue_timeout:g}",
                "--max-queued",
                "100000",
                "--instance",
                f"router-{i}",
                "--grace-period",
                "2",
                "--log-level",
                "warning",
                *extra,
                *opts.router_args,
            )

        sidecars = await asyncio.gather(*(sidecar(i) for i in range(opts.pods)))
        self.sidecar_admins = [child.words[2] for child in sidecars]
        routers = await asyncio.gather(*(router(i) for i in range(opts.routers)))
        self.routers = [(r.words[0], r.words[2]) for r in routers]
        self.say(
            f"started {len(self.children)} processes in {time.perf_counter() - started:.1f}s; "
            f"waiting for {opts.pods} ready pods in every router"
        )
        await self.wait_all_ready()
        elapsed = time.perf_counter() - started
        self.say(f"all {opts.routers} routers see {opts.pods} ready pods after {elapsed:.1f}s")

    async def admin_get(self, client: httpx.AsyncClient, admin: str, path: str) -> httpx.Response:
        return await client.get(f"http://{admin}{path}", headers={"authorization": f"Bearer {self.token}"})

    async def wait_all_ready(self) -> None:
        deadline = time.monotonic() + self.opts.start_timeout
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                counts = []
                for _, admin in self.routers:
                    pods = (await self.admin_get(client, admin, "/v1/pods")).json()
                    counts.append(sum(1 for p in pods if p["state"] == "ready" and not p["excluded"]))
                if all(c == self.opts.pods for c in counts):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ready pods per router {counts} after {self.opts.start_timeout:g}s")
                for child in self.children:
                    if child.proc.returncode is not None:
                        raise RuntimeError(f"{child.name} exited with {child.proc.returncode}")
                await asyncio.sleep(0.1)  # polling other processes' state; bounded by the deadline

    async def app_stats(self, reset: bool = False) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            path = "/control/stats/reset" if reset else "/control/stats"
            response = await client.get(f"http://{self.app_addresses[0]}{path}")
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats

    async def router_metrics(self) -> list[dict[str, Any]]:
        out = []
        async with httpx.AsyncClient(timeout=10) as client:
            for i, (_, admin) in enumerate(self.routers):
                text = (await self.admin_get(client, admin, "/metrics")).text
                out.append({"router": f"router-{i}", **parse_metrics(text)})
        return out

    async def sidecar_metrics(self) -> dict[str, int]:
        """Summed over the sidecars: requests admitted, parked ones that got the app, refusals."""
        out = {"requests": 0, "parked_served": 0, "refused_busy": 0}
        async with httpx.AsyncClient(timeout=10) as client:
            for admin in self.sidecar_admins:
                figures = parse_metrics((await self.admin_get(client, admin, "/metrics")).text)
                out["requests"] += figures["requests"]
                out["parked_served"] += figures["queue_waited"]
                out["refused_busy"] += figures["queue_rejections"]
        return out

    def cpu(self) -> dict[str, float]:
        groups: dict[str, float] = {"bench (load generators)": _proc_cpu(os.getpid())}
        for child in self.children:
            groups[child.group] = groups.get(child.group, 0.0) + _proc_cpu(child.proc.pid)
        if self.valkey is not None and self.valkey.process is not None:
            groups["valkey"] = _proc_cpu(self.valkey.process.pid)
        return groups

    async def close(self) -> None:
        for child in self.children:
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                await asyncio.wait_for(child.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
        if self.valkey is not None:
            self.valkey.close()
        if self._tmp is not None:
            self._tmp.cleanup()


_METRIC = re.compile(r"^(fastproxy_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$")


def parse_metrics(text: str) -> dict[str, Any]:
    """The few router counters this benchmark reports, from Prometheus text."""
    out: dict[str, Any] = {
        "busy_refusals": 0,
        "retries": {},
        "queue_rejections": 0,
        "responses": {},
        "requests": 0,
        "queue_waited": 0,
    }
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name == "fastproxy_busy_refusals_total":
            out["busy_refusals"] = int(value)
        elif name == "fastproxy_queue_rejections_total":
            out["queue_rejections"] = int(value)
        elif name == "fastproxy_requests_total":
            out["requests"] += int(value)
        elif name == "fastproxy_queue_wait_seconds_count":
            out["queue_waited"] = int(value)
        elif name == "fastproxy_retries_total":
            kind = re.search(r'kind="([^"]*)"', labels)
            out["retries"][kind.group(1) if kind else "?"] = int(value)
        elif name == "fastproxy_responses_total":
            status = re.search(r'(?:status|code)="([^"]*)"', labels)
            out["responses"][status.group(1) if status else "?"] = int(value)
    return out


# ---- the run ------------------------------------------------------------------------------------


async def run_benchmark(opts: Options, say: Any = print) -> dict[str, Any]:
    system = System(opts, say)
    try:
        await system.start()
        return await _measure(system, opts, say)
    finally:
        await system.close()


async def _measure(system: System, opts: Options, say: Any) -> dict[str, Any]:
    rate = opts.offered_rate
    per_router = rate / opts.routers
    body = b"x" * opts.body_bytes
    say(
        f"offering {rate:.0f} req/s ({rate / opts.capacity:.2f}x capacity {opts.capacity:.0f} req/s) "
        f"for {opts.warmup:g}s warm-up + {opts.duration:g}s over {opts.routers} routers"
    )
    generators = []
    for proxy, _ in system.routers:
        host, _, port = proxy.rpartition(":")
        generators.append(
            asyncio.create_task(
                run_open_loop(
                    host,
                    int(port),
                    rate=per_router,
                    duration=opts.duration,
                    warmup=opts.warmup,
                    path=f"/delay/{opts.work_ms}",
                    method="POST",
                    body=body,
                    headers={"x-fastproxy-service": SERVICE, "content-type": "application/octet-stream"},
                    max_connections=opts.max_connections,
                    timeout=opts.queue_timeout + 10.0,
                )
            )
        )
    await asyncio.sleep(opts.warmup)
    start_stats = await system.app_stats(reset=True)
    cpu_start, machine_start, wall_start = system.cpu(), _machine_cpu(), time.perf_counter()
    await asyncio.sleep(opts.duration)
    window_stats = await system.app_stats()
    cpu_end, machine_end, wall_end = system.cpu(), _machine_cpu(), time.perf_counter()
    say("load window over; waiting for the queued requests to be served")
    results: list[LoadResult] = await asyncio.gather(*generators)
    drained = time.perf_counter() - wall_end
    app = await system.app_stats()
    metrics = await system.router_metrics()
    sidecars = await system.sidecar_metrics()
    flips = await measure_flips(system, opts, say) if opts.flips else None
    report = _report(
        opts,
        results,
        start_stats,
        window_stats,
        app,
        metrics,
        cpu_start,
        cpu_end,
        machine_start,
        machine_end,
        wall_end - wall_start,
        drained,
    )
    # App requests that started from a park (the slot handed over inside the sidecar: no round
    # trip through a router) against all the sidecars admitted; and their refusals.
    report["sidecars"] = sidecars
    if flips is not None:
        report["readiness_flips"] = flips
        report["checks"]["flip_p99"] = flips["ok"]
        report["ok"] = all(report["checks"].values())
    return report


class AdminPoller:
    """GETs on one kept-alive connection to an admin port, with the wall-clock times of send and
    receive: a few hundred microseconds per request on an idle loopback (httpx costs milliseconds
    of this process's time per reply, which made every router look that much later)."""

    def __init__(self, address: str, token: str) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> tuple[float, float, bytes]:
        if self.conn is None:
            self.conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.conn
        sent = time.time()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n".encode() + self.auth + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if not head.startswith(b"HTTP/1.1 200") or match is None:
            raise RuntimeError(f"admin {self.host}:{self.port}{path}: {head[:200]!r}")
        body = await asyncio.wait_for(reader.readexactly(int(match.group(1))), 5)
        return sent, time.time(), body

    async def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


class StageTracer:
    """Watches Valkey during the flips: when each sidecar readiness event arrived there (its stream
    id is Valkey's millisecond clock) and when this process received the writer's delta for it."""

    def __init__(self, url: str) -> None:
        from statesync.connect import connect

        self.client = connect(url, socket_timeout=None)
        self.events: dict[tuple[str, bool], float] = {}  # (uid, ready) -> arrival (wall clock)
        self.deltas: dict[tuple[str, bool], float] = {}  # (uid, ready) -> received (wall clock)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        from statesync.keys import Keys

        keys = Keys("fastproxy")
        self.pubsub = self.client.pubsub()
        await self.pubsub.subscribe(keys.channel)
        self.tasks = [
            asyncio.create_task(self._events(keys.events)),
            asyncio.create_task(self._deltas()),
        ]

    async def _events(self, stream: str) -> None:
        from statesync.schema import ReadinessChanged, decode_event

        last = "$"
        while True:
            reply = await self.client.xread({stream: last}, block=0)
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    event = decode_event(fields[b"e"])
                    if isinstance(event, ReadinessChanged):
                        self.events[(event.uid, event.ready)] = int(entry_id.split(b"-")[0]) / 1000

    async def _deltas(self) -> None:
        from statesync.keys import DELTA_PREFIX
        from statesync.schema import PodState, decode_delta

        async for message in self.pubsub.listen():
            now = time.time()
            data = message.get("data")
            if message.get("type") != "message" or not data.startswith(DELTA_PREFIX):
                continue
            for pod in decode_delta(data[len(DELTA_PREFIX) :]).pods:
                self.deltas[(pod.uid, pod.state is PodState.READY)] = now

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.pubsub.aclose()
        await self.client.aclose()


GOAL_FLIP_P99_MS = 100.0
FLIP_QUIET = 0.1  # seconds after a flip before polling starts
FLIP_POLL_PAUSE = 0.02  # seconds between polling rounds


async def measure_flips(system: System, opts: Options, say: Any) -> dict[str, Any]:
    """App flip -> sidecar gate and -> every router, both ways, ``opts.flips`` times (see above)."""
    import random

    say(f"measuring {opts.flips} readiness flips (to not ready and back)")
    samples: dict[str, list[float]] = {
        "gate_closed": [],
        "routers_stopped": [],
        "gate_open": [],
        "routers_routable": [],
    }
    rounds: list[float] = []
    round_trips: list[float] = []  # /v1/state requests: the uncertainty of a router's change time
    # Where the time goes between the sidecar's gate and the routers (per flip, from the flip):
    # the event's arrival in Valkey (its stream id is Valkey's clock) and the writer's delta as a
    # subscriber in this process receives it (as the routers' subscriptions do).
    stages: dict[str, list[float]] = {
        f"{stage}{suffix}": []
        for suffix in ("", "_open")
        for stage in ("event_in_valkey", "delta_published", "routers_after_delta")
    }
    tracer = StageTracer(system.valkey.url)
    await tracer.start()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(tracer.close)
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=5))

        pollers: dict[str, AdminPoller] = {}

        def poller(admin: str) -> AdminPoller:
            if admin not in pollers:
                pollers[admin] = AdminPoller(admin, system.token)
                stack.push_async_callback(pollers[admin].close)
            return pollers[admin]

        async def sidecar_gate(index: int) -> tuple[bool, float]:
            """(is the gate open, when the sidecar last changed it: its own wall clock)"""
            _, _, body = await poller(system.sidecar_admins[index]).get("/v1/pods")
            app = json.loads(body)[0]
            return app["state"] == "ready", app["since"]

        async def router_view(admin: str, uid: str) -> tuple[bool, float]:
            """(is the pod routable, when the router's snapshot last changed: its wall clock)"""
            _, _, body = await poller(admin).get("/v1/pods")
            sent, received, state = await poller(admin).get("/v1/state")
            # The router computed the age between our send and receive: the change was at least
            # ``sent - age`` and at most ``received - age`` (taken: late, if anything; and a later
            # delta would only make it later). The round trip is the measurement's uncertainty.
            round_trips.append(received - sent)
            changed_at = received - json.loads(state)["snapshot_age_seconds"]
            pod = next(p for p in json.loads(body) if p["uid"] == uid)
            return pod["state"] == "ready" and not pod["excluded"], changed_at

        async def flip(index: int, ready: bool) -> tuple[float, float]:
            await asyncio.sleep(random.uniform(0, 0.1))  # a random phase of the probe interval
            uid = f"pod-{index:02d}"
            tracer.events.pop((uid, ready), None)
            tracer.deltas.pop((uid, ready), None)
            started = time.time()
            reply = await client.get(f"http://{system.app_addresses[index]}/control/ready/{int(ready)}")
            reply.raise_for_status()
            gate_at = math.nan
            routers_at = [math.nan] * len(system.routers)
            # The times come from the processes' clocks, not from when a poll sees the change: so
            # poll gently (polling flat out would take CPU from the very processes being timed).
            await asyncio.sleep(FLIP_QUIET)
            while time.time() - started < 10:
                await asyncio.sleep(FLIP_POLL_PAUSE)
                before = time.perf_counter()
                # One at a time: each reply is read at once, so a round trip stays short.
                views = [await sidecar_gate(index)]
                for _, admin in system.routers:
                    views.append(await router_view(admin, uid))
                rounds.append(time.perf_counter() - before)
                gate, since = views[0]
                if gate == ready and math.isnan(gate_at):
                    gate_at = since - started
                for i, (routable, changed_at) in enumerate(views[1:]):
                    if routable == ready and math.isnan(routers_at[i]):
                        routers_at[i] = changed_at - started
                if not math.isnan(gate_at) and not any(map(math.isnan, routers_at)):
                    suffix = "" if not ready else "_open"
                    event_at = tracer.events.pop((uid, ready), math.nan) - started
                    delta_at = tracer.deltas.pop((uid, ready), math.nan) - started
                    stages["event_in_valkey" + suffix].append(event_at)
                    stages["delta_published" + suffix].append(delta_at)
                    stages["routers_after_delta" + suffix].append(max(routers_at) - delta_at)
                    return gate_at, max(routers_at)
            raise RuntimeError(f"{uid}: flip to {'ready' if ready else 'not ready'} not seen within 10 s")

        for n in range(opts.flips):
            index = n % opts.pods
            closed, stopped = await flip(index, False)
            opened, routable = await flip(index, True)
            samples["gate_closed"].append(closed)
            samples["routers_stopped"].append(stopped)
            samples["gate_open"].append(opened)
            samples["routers_routable"].append(routable)
    out: dict[str, Any] = {
        "flips": opts.flips,
        "poll_round_ms_p50": percentile(sorted(rounds), 50) * 1000,
        "state_round_trip_ms": {
            "p50": percentile(sorted(round_trips), 50) * 1000,
            "p99": percentile(sorted(round_trips), 99) * 1000,
            "max": max(round_trips, default=math.nan) * 1000,
        },
    }
    for name, values in (samples | {"stage_" + k: v for k, v in stages.items()}).items():
        ordered = sorted(v for v in values if not math.isnan(v))
        if not ordered:
            continue
        out[name + "_ms"] = {
            "p50": percentile(ordered, 50) * 1000,
            "p99": percentile(ordered, 99) * 1000,
            "max": ordered[-1] * 1000,
        }
    out["ok"] = all(
        out[k + "_ms"]["p99"] <= GOAL_FLIP_P99_MS for k in ("routers_stopped", "routers_routable")
    )
    return out


def _report(
    opts: Options,
    results: list[LoadResult],
    start_stats: dict[str, Any],
    window_stats: dict[str, Any],
    app: dict[str, Any],
    metrics: list[dict[str, Any]],
    cpu_start: dict[str, float],
    cpu_end: dict[str, float],
    machine_start: tuple[float, float],
    machine_end: tuple[float, float],
    wall: float,
    drained: float,
) -> dict[str, Any]:
    errors: dict[str, int] = {}
    status: dict[str, int] = {}
    latencies: list[float] = []
    for result in results:
        for kind, n in result.errors.items():
            errors[kind] = errors.get(kind, 0) + n
        for code, n in result.status.items():
            status[str(code)] = status.get(str(code), 0) + n
        latencies += result.latencies
    latencies.sort()
    sent = sum(r.sent for r in results)
    completed = sum(r.completed for r in results)
    gaps = sorted(app["idle_gaps_ms"])
    idle = {
        "count": app["idle_gap_count"],
        "kept": len(gaps),
        "p50": percentile(gaps, 50),
        "p90": percentile(gaps, 90),
        "p99": percentile(gaps, 99),
        "max": gaps[-1] if gaps else math.nan,
        "over_10ms": sum(1 for g in gaps if g > GOAL_IDLE_GAP_P99_MS),
        "total_ms": sum(gaps),
        # gaps per bucket: "<=1" counts gaps up to 1 ms, "<=2" those in (1, 2], ...
        "histogram": _histogram(gaps),
    }
    served_in_window = window_stats["work_count"] - start_stats["work_count"]
    cpu = {group: cpu_end.get(group, 0.0) - cpu_start.get(group, 0.0) for group in cpu_end}
    ours = sum(cpu.values())
    busy = machine_end[0] - machine_start[0]
    cpu_summary = {
        "seconds": {k: round(v, 3) for k, v in cpu.items()},
        "cores_used": {k: round(v / wall, 3) for k, v in cpu.items()},
        "machine_busy_cores": round(busy / wall, 3),
        "foreign_cores": round(max(0.0, busy - ours) / wall, 3),
        "cpus": os.cpu_count(),
    }
    bad_status = sum(n for code, n in status.items() if code != "200")
    checks = {
        "no_client_errors": not errors and bad_status == 0 and completed == sent,
        "no_double_booking": app["violations"] == 0 and app["max_concurrent_seen"] <= 1,
        "idle_gap_p99": bool(gaps) and idle["p99"] <= GOAL_IDLE_GAP_P99_MS,
    }
    return {
        "benchmark": "sidecar_load",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"node": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "options": dataclasses.asdict(opts) | {"capacity": opts.capacity, "offered_rate": opts.offered_rate},
        "client": {
            "sent": sent,
            "completed": completed,
            "failed": sum(errors.values()) + bad_status,
            "errors": errors,
            "status": status,
            "latency_ms": {
                "p50": percentile(latencies, 50) * 1000,
                "p99": percentile(latencies, 99) * 1000,
                "max": latencies[-1] * 1000 if latencies else math.nan,
            },
            "per_router": [
                {
                    "target": r.target,
                    "sent": r.sent,
                    "completed": r.completed,
                    "errors": r.errors,
                    "pool_exhausted": r.pool_exhausted,
                    "max_backlog": r.max_backlog,
                    "max_send_lag_ms": r.max_send_lag * 1000,
                }
                for r in results
            ],
            "drain_seconds": drained,
        },
        "app": {
            "violations": app["violations"],
            "max_concurrent_seen": app["max_concurrent_seen"],
            "work_count": app["work_count"],
            "served_in_window": served_in_window,
            "throughput": served_in_window / wall,
            "utilisation": served_in_window / wall / opts.capacity,
            "per_pod_work": [s["work_count"] for s in app["servers"]],
        },
        "idle_gap_ms": idle,
        "routers": metrics,
        "busy_refusals": sum(m["busy_refusals"] for m in metrics),
        "cpu": cpu_summary,
        "checks": checks,
        "ok": all(checks.values()),
    }


GAP_BUCKETS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


def _histogram(sorted_gaps: list[float]) -> dict[str, int]:
    out: dict[str, int] = {}
    low = 0
    for bound in GAP_BUCKETS_MS:
        high = bisect.bisect_right(sorted_gaps, bound)
        out[f"<={bound:g}"] = high - low
        low = high
    out[f">{GAP_BUCKETS_MS[-1]:g}"] = len(sorted_gaps) - low
    return out


def render_markdown(results: dict[str, Any]) -> str:
    opts, client, app, idle = results["options"], results["client"], results["app"], results["idle_gap_ms"]
    checks = results["checks"]

    def mark(ok: bool) -> str:
        return "yes" if ok else "**NO**"

    refusals = ", ".join(str(m["busy_refusals"]) for m in results["routers"])
    rows = [
        (
            "setup",
            f"{opts['routers']} routers, {opts['pods']} CC=1 pods behind sidecars, "
            f"POST /delay/{opts['work_ms']} ({opts['body_bytes']} B body)",
            "",
            "",
        ),
        (
            "offered",
            f"{opts['offered_rate']:.0f} req/s = {opts['offered_rate'] / opts['capacity']:.2f}x "
            f"capacity {opts['capacity']:.0f} req/s, {opts['duration']:g}s",
            "",
            "",
        ),
        (
            "client errors (non-200 or no answer)",
            f"{client['failed']} (non-200: {client['failed'] - sum(client['errors'].values())}, "
            f"no answer: {sum(client['errors'].values())} {client['errors'] or ''})",
            "0",
            mark(checks["no_client_errors"]),
        ),
        (
            "statuses",
            ", ".join(f"{k}: {v}" for k, v in sorted(client["status"].items()))
            + f" ({client['completed']}/{client['sent']} completed)",
            "all 200",
            mark(checks["no_client_errors"]),
        ),
        (
            "double-booked app calls",
            f"{app['violations']} (max concurrent {app['max_concurrent_seen']})",
            "0",
            mark(checks["no_double_booking"]),
        ),
        (
            "idle gap p50 / p90 / p99",
            f"{idle['p50']:.2f} / {idle['p90']:.2f} / {idle['p99']:.2f} ms",
            f"p99 <= {GOAL_IDLE_GAP_P99_MS:g} ms",
            mark(checks["idle_gap_p99"]),
        ),
        (
            "idle gap max, count > 10 ms",
            f"{idle['max']:.1f} ms, {idle['over_10ms']} of {idle['kept']}",
            "",
            "",
        ),
        ("idle gaps per bucket (ms)", " ".join(f"{k}: {v}" for k, v in idle["histogram"].items()), "", ""),
        ("busy refusals (per router)", f"{results['busy_refusals']} ({refusals})", "", ""),
        (
            "sidecars: admitted, of them parked first",
            f"{results['sidecars']['requests']}, {results['sidecars']['parked_served']}",
            "",
            "",
        ),
        (
            "throughput (app, in window)",
            f"{app['throughput']:.0f} req/s = {app['utilisation'] * 100:.1f}% of capacity",
            "",
            "",
        ),
        (
            "client latency p50 / p99",
            f"{client['latency_ms']['p50']:.0f} / {client['latency_ms']['p99']:.0f} ms (queueing included)",
            "",
            "",
        ),
        (
            "CPU (cores)",
            ", ".join(f"{k} {v:.2f}" for k, v in results["cpu"]["cores_used"].items())
            + f"; machine {results['cpu']['machine_busy_cores']:.2f} of {results['cpu']['cpus']}, "
            f"other processes {results['cpu']['foreign_cores']:.2f}",
            "",
            "",
        ),
    ]
    flips = results.get("readiness_flips")
    if flips:
        for key, label in (
            ("gate_closed", "app not ready -> its sidecar refuses (no new app request)"),
            ("routers_stopped", "app not ready -> no router picks it (all routers)"),
            ("gate_open", "app ready -> its sidecar admits"),
            ("routers_routable", "app ready -> routable in all routers"),
        ):
            figures = flips[key + "_ms"]
            goal = key.startswith("routers")
            rows.append(
                (
                    f"{label}, p50 / p99 / max",
                    f"{figures['p50']:.1f} / {figures['p99']:.1f} / {figures['max']:.1f} ms "
                    f"({flips['flips']} flips; one poll round ~{flips['poll_round_ms_p50']:.0f} ms)",
                    f"p99 <= {GOAL_FLIP_P99_MS:g} ms" if goal else "",
                    mark(figures["p99"] <= GOAL_FLIP_P99_MS) if goal else "",
                )
            )
    if flips and "stage_event_in_valkey_ms" in flips:
        for suffix, label in (("", "not ready"), ("_open", "ready")):

            def stage(name: str, suffix: str = suffix) -> str:
                figures = flips[f"stage_{name}{suffix}_ms"]
                return f"{figures['p50']:.1f} / {figures['p99']:.1f}"

            rows.append(
                (
                    f"flip to {label}: event in Valkey, writer's delta out (from the flip); "
                    "routers after the delta, p50 / p99",
                    f"{stage('event_in_valkey')}; {stage('delta_published')}; "
                    f"{stage('routers_after_delta')} ms (a router's time is late by at most the "
                    f"poll round trip, p99 {flips['state_round_trip_ms']['p99']:.1f} ms)",
                    "",
                    "",
                )
            )
    lines = ["| metric | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sidecar_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--routers", type=int, default=4)
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument(
        "--rate", type=float, default=None, help="offered req/s (default: load-factor x capacity)"
    )
    parser.add_argument(
        "--load-factor", type=float, default=1.3, help="offered load / capacity, without --rate"
    )
    parser.add_argument("--work-ms", type=int, default=50, help="app time per request")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--queue-timeout", type=float, default=30.0, help="routers' --queue-timeout")
    parser.add_argument("--busy-backoff", type=float, default=None, help="routers' --busy-backoff (seconds)")
    parser.add_argument(
        "--router-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for every router (repeatable; --router-arg=--flag)",
    )
    parser.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for every sidecar (repeatable; --sidecar-arg=--flag)",
    )
    parser.add_argument("--max-connections", type=int, default=1024, help="client connections per router")
    parser.add_argument("--log-dir", default=None, help="keep the child processes' stderr here")
    parser.add_argument(
        "--flips", type=int, default=50, help="readiness flips measured after the load (0: none)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    args = parser.parse_args(argv)
    opts = Options(
        routers=args.routers,
        pods=args.pods,
        duration=args.duration,
        rate=args.rate,
        work_ms=args.work_ms,
        load_factor=args.load_factor,
        warmup=args.warmup,
        queue_timeout=args.queue_timeout,
        busy_backoff=args.busy_backoff,
        max_connections=args.max_connections,
        log_dir=args.log_dir,
        flips=args.flips,
        router_args=tuple(args.router_arg),
        sidecar_args=tuple(args.sidecar_arg),
    )

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    import uvloop

    async def go() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)  # cancellation runs the cleanup
        return await run_benchmark(opts, say)

    try:
        results = uvloop.run(go())
    except asyncio.CancelledError:
        say("interrupted; every child process was stopped")
        return 130
    write_results(results, args.json)
    print(render_markdown(results))
    say(f"results in {args.json}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
