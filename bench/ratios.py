"""Issue 15's ratio report: the router against nginx and HAProxy, measured side by side in one run.

Usage::

    python -m bench.ratios [--payload get|chat] [--backend auto|nginx|app] [--rates 2000,5000]
                           [--duration 5] [--repeats 3] [--sat-connections 50] [--sat-duration 3]
                           [--generator auto|wrk|python] [--sse/--no-sse] [--workers/--no-workers]
                           [--no-pin] [--no-busy-loops] [--instructions] [--json PATH] [--markdown PATH]

Theory of operation
-------------------
The issue's targets are ratios to nginx measured in the same run, so every figure here is taken
side by side, in interleaved rounds (direct, router, nginx, haproxy, direct, ...), and reported as
the median over rounds; ratios and differences are taken *within* a round, then their median.
The processes, configs and CPU accounting are ``bench.e2e``'s (``Harness``, ``measure``): every
server is a child process, CPU per request is that process's utime + stime over the run divided
by its requests, foreign load is watched and disturbed runs are run again.

As the issue measured: the proxies (router with one worker, nginx with one worker process,
HAProxy with one thread; each with upstream keep-alive and no access log) are pinned to vCPU 0,
the backend and the load generator to vCPU 1 (``taskset`` for children, ``sched_setaffinity``
for this process); SCHED_IDLE busy loops keep both vCPUs out of halt (``--no-busy-loops``);
everything measured runs at niceness -10 when root. The backend (``--backend``) is a second nginx
that answers from memory (``return 200``: a near-zero-cost backend, so saturation measures the
proxy, not the app) when nginx is there, else the stand-in app (``fastproxy.devtools.upstream``).

``--payload``: ``get`` is ``GET /`` answered with a tiny body; ``chat`` is an OpenAI-style
``POST /v1/chat/completions`` with the ~1 KB JSON body and the header fields of
``bench/bench_exchange.py`` (10 fields with Host and Content-Length) answered with ~1 KB of JSON.

1. Saturation: closed loop at ``--sat-connections`` (50, as wrk was run for the issue) for
   ``--sat-duration`` s per target after an unmeasured warm-up. ``wrk`` (apt-installed when root,
   like nginx and HAProxy) is the generator when present: a Python closed loop cannot load nginx
   to saturation from one vCPU. Reported: req/s and the proxy's CPU per request; ratios
   router / nginx and router / haproxy. Targets: CPU <= 1.5x nginx's, req/s >= 0.7x nginx's.
2. Latency: ``bench.loadgen``'s open loop (CO-corrected: from each request's scheduled time) at
   each of ``--rates``; added = target minus direct of the same round. Targets: router added p90
   <= nginx's + 30 us, router added p99 below nginx's.
3. SSE (``--sse``, the stand-in app as backend, since it must time its events): a POST with
   ``"stream":true`` answered with 100 OpenAI-style chunks 1 ms apart, ``--sse-streams`` streams
   at a time for ``--duration`` s per target. First byte: send to response head. Per event: the
   one-way delay from the app's ``monotonic_ns`` stamp in the event to its arrival here (same
   machine, same clock). Both reported added to direct's, and router minus nginx. HAProxy gets
   ``option http-no-delay`` here, as its docs tell a user proxying SSE (without it, it holds
   small events back for up to ~20 ms).
4. ``--workers``: the router with ``--workers 1`` and ``--workers 2`` (SO_REUSEPORT), nothing
   pinned (proxy workers, backend and generator share both vCPUs: with two workers there is no
   vCPU left to give the rest), the same closed loop; req/s and CPU per request summed over the
   router's processes.
5. The instruction count per in-memory exchange (``bench.instructions``): the latest result file,
   or run now with ``--instructions``.

Results: ``bench/results/ratios-latest.json`` and ``.md`` (``--json`` / ``--markdown``); the
markdown is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httptools

from bench import e2e
from bench.bench_exchange import BODY as CHAT_BODY
from bench.loadgen import run_closed_loop, run_open_loop

RESULTS_DIR = e2e.RESULTS_DIR
PROXY_CPU, REST_CPU = "0", "1"

# The targets.
CPU_RATIO_MAX = 1.5
THROUGHPUT_RATIO_MIN = 0.7
ADDED_P90_OVER_NGINX_MAX_US = 30.0

# bench_exchange's request fields, without Host and Content-Length (the generators add those).
CHAT_HEADERS = {
    "User-Agent": "openai-python/1.54.3",
    "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate",
    "Content-Type": "application/json",
    "Authorization": "Bearer sk-0123456789abcdef0123456789abcdef",
    "X-Stainless-Lang": "python",
    "X-Stainless-Retry-Count": "0",
    "Connection": "keep-alive",
}
CHAT_STREAM_BODY = CHAT_BODY.replace(b'"stream":false', b'"stream":true')
SSE_EVENTS, SSE_INTERVAL_US = 100, 1000

# Report order of the targets; the routers whose ratios are reported (key prefix in the summary).
TARGET_ORDER = ["direct", "router", "router-pure", "nginx", "haproxy"]
ROUTER_SUBJECTS = (("router", ""), ("router-pure", "pure_"))


@dataclass
class Options:
    payload: str = "get"  # get | chat
    backend: str = "auto"  # auto | nginx | app
    rates: tuple[float, ...] = (2000.0, 5000.0)
    duration: float = 5.0
    warmup: float = 0.5
    repeats: int = 3
    sat_connections: int = 50
    sat_duration: float = 3.0
    sat_warmup: float = 0.5
    generator: str = "auto"  # auto | wrk | python
    latency: bool = True
    sse: bool = True
    sse_streams: int = 8
    workers: bool = True
    pure: bool = True
    pin: bool = True
    busy_loops: bool = True
    instructions: bool = False
    install: bool = True
    pod_concurrency: int = 1024
    # bench.e2e.attempt_run's knobs: a run disturbed by other processes is run again.
    max_foreign_cpu: float = 0.3
    retries: int = 2
    retry_pause: float = 1.0
    quiet_wait: float = 15.0
    settle: float = 0.2
    nice: int | None = -10
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return "POST" if self.payload == "chat" else "GET"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.payload == "chat" else "/"

    @property
    def headers(self) -> dict[str, str] | None:
        return CHAT_HEADERS if self.payload == "chat" else None

    @property
    def body(self) -> bytes:
        return CHAT_BODY if self.payload == "chat" else b""


# ---- processes ----------------------------------------------------------------------------------

NGINX_BACKEND_CONF = """\
# generated by bench/ratios.py: a near-zero-cost backend that answers from memory
daemon off;
master_process off;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client-body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    client_body_buffer_size 16k;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{chat}';
        }}
        location / {{
            default_type application/json;
            return 200 '{{"ok":true}}';
        }}
    }}
}}
"""


class PinnedHarness(e2e.Harness):
    """``bench.e2e.Harness`` whose children start under ``taskset`` when a vCPU list is set."""

    def __init__(self, log: Callable[[str], None], pins: dict[str, str]) -> None:
        super().__init__(log)
        self.pins = pins

    def _spawn(
        self, name: str, argv: list[str], stop_signal: int = signal.SIGTERM, env: dict[str, str] | None = None
    ) -> e2e.Child:
        if env:
            argv = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]  # env execs, as taskset does
        cpus = self.pins.get(name)
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]  # taskset execs: the pid is the server's
        return super()._spawn(name, argv, stop_signal)

    def start_backend_nginx(self, binary: str) -> tuple[e2e.Child, int]:
        from fastproxy.devtools.upstream import CHAT_COMPLETION

        port = e2e.free_port()
        tmp = self.tmp / "backend"
        tmp.mkdir(exist_ok=True)
        conf = tmp / "nginx.conf"
        conf.write_text(
            NGINX_BACKEND_CONF.format(
                tmp=tmp,
                port=port,
                chat=CHAT_COMPLETION.decode(),
                user="user root;" if os.geteuid() == 0 else "",
            )
        )
        child = self._spawn(
            "backend", [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx.err")]
        )
        self._wait_http(child, port)
        return child, port

    def start_router_workers(
        self,
        app_port: int,
        workers: int,
        pod_concurrency: int,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[e2e.Child, int]:
        """``fastproxy router --workers N`` on a fixed port (each worker binds it, SO_REUSEPORT)."""
        import msgspec

        from fastproxy.config import RoutesFile
        from statesync.schema import PodRecord, PodState, Route, WeightedRevision

        pod = PodRecord(
            uid="bench-app-0", namespace="bench", revision="app-v1", ip="127.0.0.1", port=app_port,
            concurrency=pod_concurrency, state=PodState.READY, generation=1, ready=True,
        )  # fmt: skip
        route = Route(service="app", revisions=(WeightedRevision(revision="app-v1", weight=100),))
        name = name or f"router-w{workers}"
        routes = self.tmp / f"routes-{name}.json"
        routes.write_bytes(msgspec.json.encode(RoutesFile(routes=[route], pods=[pod])))
        port, admin = e2e.free_port(), e2e.free_port()
        child = self._spawn(
            name,
            [
                sys.executable, "-m", "fastproxy.cli", "router", "--listen", f"127.0.0.1:{port}",
                "--admin", f"127.0.0.1:{admin}", "--routes", str(routes), "--workers", str(workers),
                "--grace-period", "2", "--log-level", "warning",
            ],
            env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        # Counted as occurrences, not line starts: workers write to one shared log ("listening <ip>",
        # not the log's "listening on").
        while len(re.findall(r"listening \d", child.log.read_text(errors="replace"))) < workers:
            if not child.alive() or time.monotonic() > deadline:
                raise e2e.HarnessError(f"{name} did not start its {workers} workers:\n{child.tail()}")
            time.sleep(0.05)
        self._wait_http(child, port)
        return child, port


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the router's workers are children of its first process)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(x) for x in handle.read().split())
    return pids


def loaded_form(pid: int) -> str:
    """Which form of the data path the router process tree at ``pid`` runs: read from its memory
    maps (a compiled module is a mapped ``.so`` beside its source), not from what was asked for, so
    a stale extension that fell back to the pure form (``fastproxy.compiled.stale``) shows as pure."""
    from fastproxy.compiled import COMPILED

    mapped: set[str] = set()
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/maps") as handle:
            for line in handle:
                if line.rstrip().endswith(".so"):
                    mapped.add(os.path.basename(line.split()[-1]))
    compiled = [
        name for name in COMPILED if any(m.startswith(name.rsplit(".", 1)[1] + ".cpython") for m in mapped)
    ]
    if len(compiled) == len(COMPILED):
        return "compiled"
    if not compiled:
        return "pure"
    return "mixed (compiled: " + ", ".join(compiled) + ")"


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            total += e2e.cpu_seconds(p)
    return total


@contextlib.contextmanager
def affinity(cpus: set[int] | None) -> Any:
    """Run this process (the generator) on ``cpus`` for a while; None leaves it as it is."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---- generators ---------------------------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(m?s)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def wrk_script(opts: Options, path: Path) -> Path | None:
    if opts.method == "GET" and not opts.headers:
        return None
    lines = [f"wrk.method = {json.dumps(opts.method)}", f"wrk.body = {json.dumps(opts.body.decode())}"]
    for name, value in (opts.headers or {}).items():
        lines.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(
    wrk: str,
    port: int,
    opts: Options,
    duration: float,
    connections: int,
    cpus: str | None,
    script: Path | None,
) -> dict[str, Any]:
    # wrk takes whole seconds only
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}{opts.path}")
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if out.returncode != 0:
        raise e2e.HarnessError(f"wrk failed ({out.returncode}): {(out.stderr + out.stdout).strip()[-500:]}")
    total = _WRK_TOTAL.search(out.stdout)
    if total is None:
        raise e2e.HarnessError(f"cannot read wrk's output:\n{out.stdout}")
    seconds = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    non2xx = _WRK_NON2XX.search(out.stdout)
    errors = _WRK_ERRORS.search(out.stdout)
    return {
        "requests": int(total.group(1)),
        "seconds": seconds,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }


def saturation_run(
    harness: e2e.Harness,
    target: e2e.Target,
    opts: Options,
    wrk: str | None,
    script: Path | None,
    gen_cpus: str | None,
) -> dict[str, Any]:
    """One closed-loop run at saturation with the CPU of every process of the target."""
    if wrk is not None:
        run_wrk(wrk, target.port, opts, opts.sat_warmup, opts.sat_connections, gen_cpus, script)
        before = {role: tree_cpu(child.pid) for role, child in target.procs.items()}
        ours0, sys0, kids0, t0 = harness.our_cpu(), e2e.system_cpu()[0], _children_cpu(), time.perf_counter()
        out = run_wrk(wrk, target.port, opts, opts.sat_duration, opts.sat_connections, gen_cpus, script)
        wall = time.perf_counter() - t0
        kids = _children_cpu() - kids0
        foreign = max(0.0, (e2e.system_cpu()[0] - sys0) - (harness.our_cpu() - ours0) - kids) / wall
        after = {role: tree_cpu(child.pid) for role, child in target.procs.items()}
        n = max(out["requests"], 1)
        return {
            "target": target.name,
            "generator": "wrk",
            "throughput": out["requests"] / out["seconds"],
            "requests": out["requests"],
            "errors": out["non_2xx"] + out["socket_errors"],
            "ok": out["non_2xx"] == 0 and out["socket_errors"] == 0,
            "cpu_us_per_req": {
                **{role: (after[role] - before[role]) * 1e6 / n for role in before},
                "generator": kids * 1e6 / n,
            },
            "foreign_cpu": foreign,
        }
    with affinity({int(gen_cpus)} if gen_cpus is not None else None):
        e2e._run_loop(
            run_closed_loop(
                "127.0.0.1", target.port, concurrency=opts.sat_connections, duration=opts.sat_warmup,
                path=opts.path, method=opts.method, headers=opts.headers, body=opts.body,
            )
        )  # fmt: skip
        before = {role: tree_cpu(child.pid) for role, child in target.procs.items()}
        run = e2e.measure(
            harness,
            target,
            lambda r: r.completed,
            lambda: run_closed_loop(
                "127.0.0.1", target.port, concurrency=opts.sat_connections, duration=opts.sat_duration,
                path=opts.path, method=opts.method, headers=opts.headers, body=opts.body,
            ),
        )  # fmt: skip
        after = {role: tree_cpu(child.pid) for role, child in target.procs.items()}
    # e2e.measure counts the first process only; a router with --workers N is a tree of them
    cpu = dict(run["cpu_us_per_req"])
    cpu.update({role: (after[role] - before[role]) * 1e6 / max(run["completed"], 1) for role in before})
    return {
        "target": target.name,
        "generator": "python",
        "throughput": run["throughput"],
        "requests": run["completed"],
        "errors": sum(run["errors"].values()),
        "ok": run["ok"],
        "cpu_us_per_req": cpu,
        "foreign_cpu": run["foreign_cpu"],
    }


def latency_run(
    harness: PinnedHarness, target: e2e.Target, opts: Options, rate: float, gen_cpus: str | None
) -> dict[str, Any]:
    n_warm, n_measured = round(rate * opts.warmup), max(1, round(rate * opts.duration))
    with affinity({int(gen_cpus)} if gen_cpus is not None else None):
        run = e2e.measure(
            harness,
            target,
            lambda r: n_warm + n_measured - r.error_count,
            lambda: run_open_loop(
                "127.0.0.1", target.port, rate=rate, duration=opts.duration, warmup=opts.warmup,
                path=opts.path, method=opts.method, headers=opts.headers, body=opts.body,
            ),
        )  # fmt: skip
    run["rate"] = rate
    return run


# ---- SSE ----------------------------------------------------------------------------------------


class _SseStream(asyncio.Protocol):
    """One connection carrying one streamed chat completion at a time."""

    def __init__(self, owner: _SseClient) -> None:
        self.owner = owner
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sent = 0
        self.buffer = b""
        self.events = 0
        self.status = 0
        self.done: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bool]:
        assert self.transport is not None
        self.done = loop.create_future()
        self.events = 0
        self.buffer = b""
        self.sent = time.monotonic_ns()
        self.transport.write(self.owner.request)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.arrived = time.monotonic_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._end(False)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.owner.first_byte.append((self.arrived - self.sent) / 1000)

    def on_body(self, body: bytes) -> None:
        self.buffer += body
        while b"\n\n" in self.buffer:
            event, _, self.buffer = self.buffer.partition(b"\n\n")
            if event == b"data: [DONE]":
                continue
            stamp = event.rfind(b'"t":')
            if stamp >= 0:
                self.owner.event_delay.append(
                    (self.arrived - int(event[stamp + 4 : event.rindex(b"}")])) / 1000
                )
                self.events += 1

    def on_message_complete(self) -> None:
        self._end(self.status == 200 and self.events == SSE_EVENTS)

    def _end(self, ok: bool) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(ok)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(False)


class _SseClient:
    def __init__(self, port: int) -> None:
        self.port = port
        headers = "".join(f"{k}: {v}\r\n" for k, v in CHAT_HEADERS.items())
        self.request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{headers}"
            f"x-app-events: {SSE_EVENTS}\r\nx-app-event-interval-us: {SSE_INTERVAL_US}\r\n"
            f"content-length: {len(CHAT_STREAM_BODY)}\r\n\r\n"
        ).encode() + CHAT_STREAM_BODY
        self.first_byte: list[float] = []
        self.event_delay: list[float] = []
        self.streams = 0
        self.failed = 0

    async def run(self, concurrency: int, duration: float, warmup: float) -> None:
        loop = asyncio.get_running_loop()

        async def worker(end: float) -> None:
            _, conn = await loop.create_connection(lambda: _SseStream(self), "127.0.0.1", self.port)
            while time.monotonic() < end:
                if await asyncio.wait_for(conn.start(loop), 10):
                    self.streams += 1
                else:
                    self.failed += 1
                    return
            assert conn.transport is not None
            conn.transport.close()

        await asyncio.gather(*(worker(time.monotonic() + warmup) for _ in range(concurrency)))
        self.first_byte.clear()
        self.event_delay.clear()
        self.streams = self.failed = 0
        await asyncio.gather(*(worker(time.monotonic() + duration) for _ in range(concurrency)))


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def sse_run(
    harness: PinnedHarness, target: e2e.Target, opts: Options, gen_cpus: str | None
) -> dict[str, Any]:
    client = _SseClient(target.port)
    before = {role: e2e.cpu_seconds(child.pid) for role, child in target.procs.items()}
    ours0, sys0, t0 = harness.our_cpu(), e2e.system_cpu()[0], time.perf_counter()
    with affinity({int(gen_cpus)} if gen_cpus is not None else None):
        e2e._run_loop(client.run(opts.sse_streams, opts.duration, opts.warmup))  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    foreign = max(0.0, (e2e.system_cpu()[0] - sys0) - (harness.our_cpu() - ours0)) / wall
    after = {role: e2e.cpu_seconds(child.pid) for role, child in target.procs.items()}
    events = max(len(client.event_delay), 1)
    return {
        "target": target.name,
        "streams": client.streams,
        "failed": client.failed,
        "events": len(client.event_delay),
        "ok": client.failed == 0 and client.streams > 0,
        "first_byte_us": {k: _pct(client.first_byte, p) for k, p in (("p50", 50), ("p90", 90), ("p99", 99))},
        "event_delay_us": {
            k: _pct(client.event_delay, p) for k, p in (("p50", 50), ("p90", 90), ("p99", 99))
        },
        "cpu_us_per_event": {role: (after[role] - before[role]) * 1e6 / events for role in before},
        "foreign_cpu": foreign,
    }


# ---- the run ------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


class Runner:
    """Rounds of runs over the targets, each kept or run again as ``bench.e2e.attempt_run`` does."""

    def __init__(self, harness: PinnedHarness, opts: Options, log: Callable[[str], None]) -> None:
        self.harness, self.opts, self.log = harness, opts, log
        self.runs: list[dict[str, Any]] = []
        self.discarded: list[dict[str, Any]] = []

    def attempt(self, make: Callable[[], dict[str, Any]], **labels: Any) -> dict[str, Any]:
        return e2e.attempt_run(self.harness, self.opts, make, self.runs, self.discarded, self.log, **labels)  # type: ignore[arg-type]


def start_proxies(
    harness: PinnedHarness,
    opts: Options,
    binaries: dict[str, str | None],
    backend: e2e.Child,
    port: int,
    streaming: bool = False,
) -> list[e2e.Target]:
    router, router_port = harness.start_router(port, opts.pod_concurrency)
    targets = [
        e2e.Target("direct", port, {"app": backend}),
        e2e.Target("router", router_port, {"proxy": router, "app": backend}),
    ]
    if opts.pure and not streaming:
        pure, pure_port = harness.start_router_workers(
            port, 1, opts.pod_concurrency, name="router-pure", env={"FASTPROXY_PURE": "1"}
        )
        targets.append(e2e.Target("router-pure", pure_port, {"proxy": pure, "app": backend}))
    if binaries.get("nginx"):
        nginx, nginx_port = harness.start_nginx(binaries["nginx"], port)  # type: ignore[arg-type]
        targets.append(e2e.Target("nginx", nginx_port, {"proxy": nginx, "app": backend}))
    if binaries.get("haproxy"):
        hap, hap_port = harness.start_haproxy(binaries["haproxy"], port, no_delay=streaming)  # type: ignore[arg-type]
        targets.append(e2e.Target("haproxy", hap_port, {"proxy": hap, "app": backend}))
    return targets


def run_ratios(opts: Options, log: Callable[[str], None]) -> dict[str, Any]:
    env = e2e.environment()
    binaries = e2e.find_or_install(["nginx", "haproxy"], opts.install, log)
    wrk = None
    if opts.generator in ("auto", "wrk"):
        wrk = e2e.find_or_install(["wrk"], opts.install, log).get("wrk")
        if wrk is None and opts.generator == "wrk":
            raise e2e.HarnessError("wrk is not installed (and could not be)")
    versions = {name: e2e.program_version(path, "-v") for name, path in binaries.items() if path is not None}
    if wrk:
        versions["wrk"] = e2e.program_version(wrk, "--version")
    pin = opts.pin and (os.cpu_count() or 1) >= 2
    pins = {
        "router": PROXY_CPU,
        "router-pure": PROXY_CPU,
        "nginx": PROXY_CPU,
        "haproxy": PROXY_CPU,
        "app": REST_CPU,
        "backend": REST_CPU,
    }
    gen_cpus = REST_CPU if pin else None
    backend_kind = opts.backend
    if backend_kind == "auto":
        backend_kind = "nginx" if binaries.get("nginx") else "app"
    if backend_kind == "nginx" and not binaries.get("nginx"):
        raise e2e.HarnessError("--backend nginx: nginx is not installed")
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if opts.nice is not None and opts.nice != niceness:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, opts.nice)
    env["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    env["pinning"] = (
        f"proxies on vCPU {PROXY_CPU}; backend, generator (this process{', wrk' if wrk else ''}) on vCPU {REST_CPU}"
        if pin
        else "none"
    )
    results: dict[str, Any] = {
        "environment": env,
        "options": asdict(opts),
        "versions": versions,
        "backend": backend_kind,
        "generator": "wrk" if wrk else "python",
        "skipped": [name for name, path in binaries.items() if path is None],
        "forms": {},  # router target -> the data path's form its processes run (their memory maps)
    }

    def note_forms(targets: list[e2e.Target], phase: str) -> None:
        for t in targets:
            if t.name.startswith("router"):
                form = loaded_form(t.procs["proxy"].pid)
                results["forms"].setdefault(t.name, form)
                if results["forms"][t.name] != form:
                    results["forms"][t.name] += f"; {form} in the {phase} phase"
                log(f"{t.name}: data path {form} ({phase} phase)")

    all_runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    try:
        # 1 + 2: saturation and latency, the payload of --payload, behind the chosen backend
        with PinnedHarness(log, pins if pin else {}) as harness:
            if opts.busy_loops:
                harness.start_busy_loops()
            if backend_kind == "nginx":
                backend, port = harness.start_backend_nginx(binaries["nginx"])  # type: ignore[arg-type]
            else:
                backend, port = harness.start_app()
            targets = start_proxies(harness, opts, binaries, backend, port)
            note_forms(targets, "saturation/latency")
            log(
                f"targets: {', '.join(f'{t.name}=:{t.port}' for t in targets)}; backend {backend_kind}; {env['pinning']}"
            )
            runner = Runner(harness, opts, log)
            script = wrk_script(opts, harness.tmp / "request.lua") if wrk else None
            for rnd in range(opts.repeats):
                for target in targets:
                    run = runner.attempt(
                        functools.partial(saturation_run, harness, target, opts, wrk, script, gen_cpus),
                        phase="saturation", round=rnd,
                    )  # fmt: skip
                    log(
                        f"[saturation r{rnd + 1}] {target.name:8} {run['throughput']:8.0f} req/s  proxy "
                        f"{run['cpu_us_per_req'].get('proxy', math.nan):6.1f} us/req  backend "
                        f"{run['cpu_us_per_req']['app']:5.1f}  errors {run['errors']}  foreign {run['foreign_cpu']:.2f}"
                    )
                for rate in opts.rates if opts.latency else ():
                    for target in targets:
                        run = runner.attempt(
                            functools.partial(latency_run, harness, target, opts, rate, gen_cpus),
                            phase="latency", round=rnd,
                        )  # fmt: skip
                        lat = run["latency_us"]
                        log(
                            f"[latency r{rnd + 1} {rate:g}/s] {target.name:8} p50 {lat['p50']:6.0f} p90 "
                            f"{lat['p90']:6.0f} p99 {lat['p99']:7.0f} us  errors {sum(run['errors'].values())}  "
                            f"foreign {run['foreign_cpu']:.2f}"
                        )
            harness.stop_busy_loops()
            all_runs += runner.runs
            discarded += runner.discarded
        # 3: SSE through each proxy to the stand-in app
        if opts.sse:
            with PinnedHarness(log, pins if pin else {}) as harness:
                if opts.busy_loops:
                    harness.start_busy_loops()
                app, port = harness.start_app()
                targets = start_proxies(harness, opts, binaries, app, port, streaming=True)
                note_forms(targets, "sse")
                runner = Runner(harness, opts, log)
                for rnd in range(opts.repeats):
                    for target in targets:
                        run = runner.attempt(
                            functools.partial(sse_run, harness, target, opts, gen_cpus),
                            phase="sse",
                            round=rnd,
                        )
                        log(
                            f"[sse r{rnd + 1}] {target.name:8} streams {run['streams']} first byte p50 "
                            f"{run['first_byte_us']['p50']:6.0f} us  event delay p50 {run['event_delay_us']['p50']:5.0f} "
                            f"p99 {run['event_delay_us']['p99']:6.0f} us  failed {run['failed']}"
                        )
                all_runs += runner.runs
                discarded += runner.discarded
        # 4: --workers 1 vs 2, nothing pinned
        if opts.workers:
            with PinnedHarness(log, {}) as harness:
                if opts.busy_loops:
                    harness.start_busy_loops()
                if backend_kind == "nginx":
                    backend, port = harness.start_backend_nginx(binaries["nginx"])  # type: ignore[arg-type]
                else:
                    backend, port = harness.start_app()
                script = wrk_script(opts, harness.tmp / "request.lua") if wrk else None
                targets = []
                for workers in (1, 2):
                    router, router_port = harness.start_router_workers(port, workers, opts.pod_concurrency)
                    targets.append(
                        e2e.Target(f"router-w{workers}", router_port, {"proxy": router, "app": backend})
                    )
                note_forms(targets, "workers")
                runner = Runner(harness, opts, log)
                for rnd in range(opts.repeats):
                    for target in targets:
                        run = runner.attempt(
                            functools.partial(saturation_run, harness, target, opts, wrk, script, None),
                            phase="workers", round=rnd,
                        )  # fmt: skip
                        log(
                            f"[workers r{rnd + 1}] {target.name:9} {run['throughput']:8.0f} req/s  router "
                            f"{run['cpu_us_per_req']['proxy']:6.1f} us/req"
                        )
                all_runs += runner.runs
                discarded += runner.discarded
    finally:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
    results["instructions"] = instruction_count(opts.instructions, log)
    results["runs"] = all_runs
    results["discarded_runs"] = discarded
    results["ok"] = all(r["ok"] for r in all_runs)
    results["summary"] = summarise(all_runs, opts)
    return results


def instruction_count(fresh: bool, log: Callable[[str], None]) -> dict[str, Any] | None:
    path = RESULTS_DIR / "instructions-latest.json"
    if fresh:
        log("instructions per in-memory exchange (callgrind) ...")
        subprocess.run(
            [sys.executable, "-m", "bench.instructions"], cwd=e2e.REPO_ROOT, check=True, capture_output=True
        )
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return {k: data.get(k) for k in ("per_exchange", "commit", "when", "form", "target")} | {"fresh": fresh}


def summarise(runs: list[dict[str, Any]], opts: Options) -> dict[str, Any]:
    by_round: dict[tuple[str, float, int], dict[str, dict[str, Any]]] = {}
    for run in runs:
        key = (run["phase"], run.get("rate", 0.0), run["round"])
        by_round.setdefault(key, {})[run["target"]] = run

    def rounds(phase: str, rate: float = 0.0) -> list[dict[str, dict[str, Any]]]:
        return [v for (p, r, _), v in sorted(by_round.items()) if p == phase and r == rate]

    out: dict[str, Any] = {}
    sat = rounds("saturation")
    if sat:
        names = sorted({n for r in sat for n in r}, key=TARGET_ORDER.index)
        out["saturation"] = {
            name: {
                "throughput": _median([r[name]["throughput"] for r in sat if name in r]),
                "cpu_us_per_req": _median(
                    [r[name]["cpu_us_per_req"].get("proxy", math.nan) for r in sat if name in r]
                ),
                "backend_cpu_us_per_req": _median(
                    [r[name]["cpu_us_per_req"]["app"] for r in sat if name in r]
                ),
            }
            for name in names
        }
        for subject, prefix in ROUTER_SUBJECTS:
            for ref in ("nginx", "haproxy"):
                pairs = [r for r in sat if subject in r and ref in r]
                if pairs:
                    out["saturation"][f"{prefix}cpu_ratio_{ref}"] = _median(
                        [
                            r[subject]["cpu_us_per_req"]["proxy"] / r[ref]["cpu_us_per_req"]["proxy"]
                            for r in pairs
                        ]
                    )
                    out["saturation"][f"{prefix}throughput_ratio_{ref}"] = _median(
                        [r[subject]["throughput"] / r[ref]["throughput"] for r in pairs]
                    )
    out["latency"] = {}
    for rate in opts.rates:
        lat = rounds("latency", rate)
        if not lat:
            continue
        entry: dict[str, Any] = {}
        for name in ("router", "router-pure", "nginx", "haproxy"):
            rows = [r for r in lat if name in r and "direct" in r]
            if rows:
                entry[name] = {
                    k: _median([r[name]["latency_us"][k] - r["direct"]["latency_us"][k] for r in rows])
                    for k in ("p50", "p90", "p99")
                }
        for subject, _ in ROUTER_SUBJECTS:
            for ref in ("nginx", "haproxy"):
                rows = [r for r in lat if subject in r and ref in r]
                if rows:
                    entry[f"{subject}_minus_{ref}"] = {
                        k: _median([r[subject]["latency_us"][k] - r[ref]["latency_us"][k] for r in rows])
                        for k in ("p50", "p90", "p99")
                    }
        entry["direct"] = {
            k: _median([r["direct"]["latency_us"][k] for r in lat]) for k in ("p50", "p90", "p99")
        }
        out["latency"][str(int(rate))] = entry
    sse = rounds("sse")
    if sse:
        entry = {}
        for name in ("direct", "router", "nginx", "haproxy"):
            rows = [r for r in sse if name in r and "direct" in r]
            if not rows:
                continue
            e: dict[str, Any] = {}
            for metric in ("first_byte_us", "event_delay_us"):
                e[metric] = {k: _median([r[name][metric][k] for r in rows]) for k in ("p50", "p90", "p99")}
                if name != "direct":
                    e[f"added_{metric}"] = {
                        k: _median([r[name][metric][k] - r["direct"][metric][k] for r in rows])
                        for k in ("p50", "p90", "p99")
                    }
            if "proxy" in rows[0][name]["cpu_us_per_event"]:
                e["proxy_cpu_us_per_event"] = _median([r[name]["cpu_us_per_event"]["proxy"] for r in rows])
            entry[name] = e
        rows = [r for r in sse if "router" in r and "nginx" in r]
        if rows:
            entry["router_minus_nginx"] = {
                metric: {
                    k: _median([r["router"][metric][k] - r["nginx"][metric][k] for r in rows])
                    for k in ("p50", "p99")
                }
                for metric in ("first_byte_us", "event_delay_us")
            }
        out["sse"] = entry
    workers = rounds("workers")
    if workers:
        out["workers"] = {
            name: {
                "throughput": _median([r[name]["throughput"] for r in workers if name in r]),
                "cpu_us_per_req": _median([r[name]["cpu_us_per_req"]["proxy"] for r in workers if name in r]),
            }
            for name in ("router-w1", "router-w2")
            if any(name in r for r in workers)
        }
        pairs = [r for r in workers if "router-w1" in r and "router-w2" in r]
        if pairs:
            out["workers"]["scaling"] = _median(
                [r["router-w2"]["throughput"] / r["router-w1"]["throughput"] for r in pairs]
            )
    return out


# ---- the report ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**not met**")


def target_lines(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, figure, target, verdict) for each of the issue's targets this run measured."""
    s = results["summary"]
    lines: list[tuple[str, str, str, str]] = []
    sat = s.get("saturation", {})
    forms = results.get("forms", {})
    for subject, pre in ROUTER_SUBJECTS:
        if subject not in sat and subject not in next(iter(s.get("latency", {}).values()), {}):
            continue
        who = f"{subject} ({forms.get(subject, 'form not recorded')})"
        if f"{pre}cpu_ratio_nginx" in sat:
            r, n = sat[subject], sat["nginx"]
            lines.append((
                f"CPU per request at saturation, {who} / nginx",
                f"{sat[pre + 'cpu_ratio_nginx']:.2f}x ({r['cpu_us_per_req']:.1f} / {n['cpu_us_per_req']:.1f} us)",
                f"<= {CPU_RATIO_MAX}x", _verdict(sat[pre + "cpu_ratio_nginx"] <= CPU_RATIO_MAX),
            ))  # fmt: skip
        if f"{pre}cpu_ratio_haproxy" in sat:
            h = sat["haproxy"]
            lines.append((
                f"CPU per request at saturation, {who} / haproxy",
                f"{sat[pre + 'cpu_ratio_haproxy']:.2f}x ({sat[subject]['cpu_us_per_req']:.1f} / {h['cpu_us_per_req']:.1f} us)",
                f"<= {CPU_RATIO_MAX}x (as for nginx)", _verdict(sat[pre + "cpu_ratio_haproxy"] <= CPU_RATIO_MAX),
            ))  # fmt: skip
        if f"{pre}throughput_ratio_nginx" in sat:
            lines.append((
                f"saturation req/s on one core, {who} / nginx",
                f"{sat[pre + 'throughput_ratio_nginx']:.2f}x ({sat[subject]['throughput']:.0f} / {sat['nginx']['throughput']:.0f})",
                f">= {THROUGHPUT_RATIO_MIN}x", _verdict(sat[pre + "throughput_ratio_nginx"] >= THROUGHPUT_RATIO_MIN),
            ))  # fmt: skip
        if f"{pre}throughput_ratio_haproxy" in sat:
            lines.append((
                f"saturation req/s on one core, {who} / haproxy",
                f"{sat[pre + 'throughput_ratio_haproxy']:.2f}x ({sat[subject]['throughput']:.0f} / {sat['haproxy']['throughput']:.0f})",
                "-", "-",
            ))  # fmt: skip
        for rate, e in s.get("latency", {}).items():
            if subject not in e or "nginx" not in e:
                continue
            d90 = e[f"{subject}_minus_nginx"]["p90"]
            lines.append((
                f"added p90 at {rate} req/s: {who} / nginx / haproxy",
                f"{_f(e[subject]['p90'], signed=True)} / {_f(e['nginx']['p90'], signed=True)} / "
                f"{_f(e.get('haproxy', {}).get('p90'), signed=True)} us ({subject} - nginx {_f(d90, signed=True)})",
                f"router <= nginx + {ADDED_P90_OVER_NGINX_MAX_US:g} us", _verdict(d90 <= ADDED_P90_OVER_NGINX_MAX_US),
            ))  # fmt: skip
            d99 = e[f"{subject}_minus_nginx"]["p99"]
            lines.append((
                f"added p99 at {rate} req/s: {who} / nginx / haproxy",
                f"{_f(e[subject]['p99'], signed=True)} / {_f(e['nginx']['p99'], signed=True)} / "
                f"{_f(e.get('haproxy', {}).get('p99'), signed=True)} us ({subject} - nginx {_f(d99, signed=True)})",
                "router < nginx", _verdict(d99 < 0),
            ))  # fmt: skip
    instr = results.get("instructions")
    if instr:
        lines.append((
            "instructions per in-memory exchange (callgrind)",
            f"{instr['per_exchange']:,.0f} ({instr['form']}, commit {instr['commit']}"
            f"{', this run' if instr['fresh'] else ', from instructions-latest.json'})",
            f"<= {instr['target']:,}", _verdict(instr["per_exchange"] <= instr["target"]),
        ))  # fmt: skip
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    env, opts, s = results["environment"], results["options"], results["summary"]
    lines = [
        "# Router vs nginx and HAProxy (issue 15's ratios)",
        "",
        f"{env['date']} · {env['cpus']} vCPU {env['cpu_model']} · kernel {env['kernel']} · Python {env['python']} · "
        f"commit {env['commit']} · nice {env['nice']} · load before {', '.join(f'{x:.2f}' for x in env['loadavg'])}",
        "",
        f"Payload `{opts['payload']}` "
        f"({'POST /v1/chat/completions, 1 KB JSON, 10 fields' if opts['payload'] == 'chat' else 'GET /'}); "
        f"backend: {results['backend']}; saturation generator: {results['generator']} at {opts['sat_connections']} "
        f"connections, {opts['sat_duration']:g} s; open loop {opts['duration']:g} s per run; {opts['repeats']} "
        f"interleaved rounds, medians of per-round figures. Pinning: {env['pinning']}. "
        f"Busy loops: {'on' if opts['busy_loops'] else 'off'}.",
    ]
    if results.get("forms"):
        lines.append(
            "Data path form of each router (read from its processes' memory maps): "
            + "; ".join(f"{k}: {v}" for k, v in results["forms"].items())
            + "."
        )
    if results["versions"]:
        lines.append("Versions: " + "; ".join(f"{k}: {v}" for k, v in results["versions"].items()) + ".")
    if results["skipped"]:
        lines.append(f"Skipped (not installed): {', '.join(results['skipped'])}.")
    lines.append(
        f"Runs repeated because other processes used > {opts['max_foreign_cpu']:g} vCPU: "
        f"{len(results['discarded_runs'])}; kept although disturbed: {sum(1 for r in results['runs'] if r['disturbed'])}."
    )
    if not results["ok"]:
        lines += ["", "**WARNING: some runs had errors or non-200 answers (see the JSON's `runs`).**"]
    lines += ["", "## The issue's targets", "", "| what | figure | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in target_lines(results)]
    if "saturation" in s:
        lines += [
            "",
            "## Saturation",
            "",
            "| target | req/s | proxy CPU us/req | backend CPU us/req |",
            "|---|--:|--:|--:|",
        ]
        for name, e in s["saturation"].items():
            if isinstance(e, dict):
                lines.append(
                    f"| {name} | {_f(e['throughput'])} | {_f(e['cpu_us_per_req'], 1)} | {_f(e['backend_cpu_us_per_req'], 1)} |"
                )
    for rate, e in s.get("latency", {}).items():
        lines += [
            "",
            f"## Added latency at {rate} req/s (target minus direct, same round; us)",
            "",
            f"direct: p50 {_f(e['direct']['p50'])} / p90 {_f(e['direct']['p90'])} / p99 {_f(e['direct']['p99'])}",
            "",
            "| target | added p50 | added p90 | added p99 |",
            "|---|--:|--:|--:|",
        ]
        for name in ("router", "router-pure", "nginx", "haproxy"):
            if name in e:
                a = e[name]
                lines.append(
                    f"| {name} | {_f(a['p50'], signed=True)} | {_f(a['p90'], signed=True)} | {_f(a['p99'], signed=True)} |"
                )
    if "sse" in s:
        lines += [
            "",
            f"## SSE: {SSE_EVENTS} chat-completion chunks {SSE_INTERVAL_US} us apart per stream, stand-in app backend (us)",
            "",
            "| target | first byte p50 / p99 | added | event delay p50 / p99 | added | proxy CPU us/event |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for name, e in s["sse"].items():
            if name == "router_minus_nginx":
                continue
            fb, ev = e["first_byte_us"], e["event_delay_us"]
            afb, aev = e.get("added_first_byte_us", {}), e.get("added_event_delay_us", {})
            lines.append(
                f"| {name} | {_f(fb['p50'])} / {_f(fb['p99'])} | {_f(afb.get('p50'), signed=True)} / "
                f"{_f(afb.get('p99'), signed=True)} | {_f(ev['p50'])} / {_f(ev['p99'])} | "
                f"{_f(aev.get('p50'), signed=True)} / {_f(aev.get('p99'), signed=True)} | "
                f"{_f(e.get('proxy_cpu_us_per_event'), 1)} |"
            )
        diff = s["sse"].get("router_minus_nginx")
        if diff:
            lines += [
                "",
                f"router minus nginx: first byte p50 {_f(diff['first_byte_us']['p50'], signed=True)}, "
                f"p99 {_f(diff['first_byte_us']['p99'], signed=True)}; per event p50 "
                f"{_f(diff['event_delay_us']['p50'], signed=True)}, p99 {_f(diff['event_delay_us']['p99'], signed=True)} us",
            ]
    if "workers" in s:
        w = s["workers"]
        lines += [
            "",
            "## `--workers 1` vs `--workers 2` (SO_REUSEPORT; nothing pinned: the router's workers, the backend "
            "and the generator share both vCPUs)",
            "",
            "| router | req/s | CPU us/req (all its processes) |",
            "|---|--:|--:|",
        ]
        for name in ("router-w1", "router-w2"):
            if name in w:
                lines.append(f"| {name} | {_f(w[name]['throughput'])} | {_f(w[name]['cpu_us_per_req'], 1)} |")
        if "scaling" in w:
            lines += ["", f"2 workers / 1 worker: {w['scaling']:.2f}x req/s"]
    return "\n".join(lines) + "\n"


# ---- command line -------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[,N...], got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive N[,N...], got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> tuple[Options, Path, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ratios",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module's theory of operation (python -m pydoc bench.ratios) for what is measured how.",
    )
    parser.add_argument(
        "--payload", choices=("get", "chat"), default="get", help="GET / or the OpenAI-style POST"
    )
    parser.add_argument(
        "--backend", choices=("auto", "nginx", "app"), default="auto",
        help="nginx answering from memory (auto: when installed) or the stand-in app",
    )  # fmt: skip
    parser.add_argument("--rates", type=_floats, default=(2000.0, 5000.0), help="open-loop req/s, N[,N]")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="measured seconds per open-loop / SSE run"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--sat-connections", type=int, default=50, help="closed-loop connections")
    parser.add_argument("--sat-duration", type=float, default=3.0, help="seconds per saturation run")
    parser.add_argument(
        "--generator", choices=("auto", "wrk", "python"), default="auto",
        help="saturation load: wrk (auto: when installed or installable) or the Python closed loop",
    )  # fmt: skip
    parser.add_argument(
        "--latency", action=argparse.BooleanOptionalAction, default=True, help="the open-loop latency phase"
    )
    parser.add_argument("--sse", action=argparse.BooleanOptionalAction, default=True, help="the SSE phase")
    parser.add_argument("--sse-streams", type=int, default=8, help="concurrent SSE streams")
    parser.add_argument(
        "--workers", action=argparse.BooleanOptionalAction, default=True, help="the --workers 1 vs 2 phase"
    )
    parser.add_argument(
        "--pure", action=argparse.BooleanOptionalAction, default=True,
        help="also a router in the pure form (FASTPROXY_PURE=1) in the saturation and latency rounds",
    )  # fmt: skip
    parser.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    parser.add_argument("--no-busy-loops", action="store_true", help="no SCHED_IDLE busy loops")
    parser.add_argument(
        "--instructions", action="store_true", help="run bench.instructions now (else its last result)"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get install nginx / haproxy / wrk"
    )
    parser.add_argument("--max-foreign-cpu", type=float, default=0.3, metavar="VCPUS",
                        help="run again a run during which other processes used more CPU (0: never)")  # fmt: skip
    parser.add_argument("--quiet-wait", type=float, default=15.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to calm down")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.repeats < 1 or args.sat_duration <= 0 or args.sat_connections < 1:
        parser.error("--duration, --sat-duration positive; --repeats, --sat-connections >= 1")
    opts = Options(
        payload=args.payload, backend=args.backend, rates=args.rates, duration=args.duration, repeats=args.repeats,
        sat_connections=args.sat_connections, sat_duration=args.sat_duration, generator=args.generator,
        latency=args.latency, sse=args.sse, sse_streams=args.sse_streams, workers=args.workers, pure=args.pure, pin=not args.no_pin,
        busy_loops=not args.no_busy_loops, instructions=args.instructions, install=not args.no_install,
        max_foreign_cpu=args.max_foreign_cpu, quiet_wait=args.quiet_wait,
    )  # fmt: skip
    stem = "ratios-latest" if args.payload == "get" else "ratios-chat-latest"
    return opts, args.json or RESULTS_DIR / f"{stem}.json", args.markdown or RESULTS_DIR / f"{stem}.md"


def main(argv: list[str] | None = None) -> int:
    opts, json_path, md_path = parse_args(argv)
    log = e2e._log
    try:
        with e2e._signals_unwind():
            results = run_ratios(opts, log)
    except KeyboardInterrupt:
        log("interrupted: child processes stopped")
        return 130
    except (e2e.HarnessError, subprocess.CalledProcessError) as exc:
        log(f"benchmark failed: {exc}")
        return 1
    markdown = render_markdown(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    md_path.write_text(markdown)
    print(markdown)
    log(f"results: {json_path} {md_path}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
