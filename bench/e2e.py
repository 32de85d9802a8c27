"""End-to-end benchmark: the router's added latency against direct, saturation and CPU per request.

Usage::

    python -m bench.e2e [--rate 2000] [--duration 10] [--repeats 3] [--nginx] [--haproxy]
                        [--busy-loops [on|off|both]] [--sat-concurrency 64[,16...]] [--sat-duration 3]
                        [--max-foreign-cpu 0.15] [--quiet-wait 20] [--retries 2] [--nice -10|keep]
                        [--json PATH] [--markdown PATH]

Theory of operation
-------------------
Every server is a separate process started here: the stand-in app (``fastproxy.devtools.upstream``),
the router (``fastproxy.cli router``, one worker, a static routes file with the app as its only
pod) and, on request, nginx and/or haproxy as reference proxies in front of the same app (single
process, upstream keep-alive, configs generated in a temporary directory; when one is missing and
we are root, ``apt-get install`` is tried once; otherwise it is reported as skipped). The load
generator (``bench.loadgen``) runs in this process, one fresh uvloop per run, with the garbage
collector off during a run so its pauses do not show up as latency.

Latency phase: ``--repeats`` rounds; each round runs the open-loop (constant-rate) generator
against every target in turn -- direct, router, nginx, haproxy, direct, router, ... -- so slow
drift of a shared, noisy machine hits every target alike. Latency of a request runs from its
*scheduled* send time to the last byte of its response (no coordinated omission). The added
latency of a target is its percentile minus the direct percentile *of the same round*; the
report gives the median over rounds, and likewise router minus nginx per round.

Saturation phase: closed loop with ``--sat-concurrency`` connections for ``--sat-duration``
seconds per target (after a short unmeasured warm-up run), again interleaved over the rounds.
CPU seconds of each server process come from ``/proc/<pid>/stat`` (utime + stime) read just
before and after a run, so CPU per request is ``cpu / requests`` of that process alone; the
generator's own CPU (``getrusage``) is reported too, since it shares the machine's vCPUs, and so
is the kernel's share of each server's CPU (stime / total: on loopback the sender of a segment
pays for the receiver's TCP path and wake-up). Note that the open loop busy-polls between sends
(uvloop timers have millisecond granularity, so a sub-millisecond sleep returns at once): at
2k req/s the generator keeps about one vCPU busy, which is why its CPU per request is large.

A shared machine: other sessions' work is measured as *foreign CPU* (machine busy time from
``/proc/stat`` minus this process, its children and any SCHED_IDLE process), in vCPUs. Before
each run the harness waits (up to ``--quiet-wait`` s) for it to drop below ``--max-foreign-cpu``;
a run during which it exceeded that is run again (``--retries``) and the least disturbed attempt
is kept; every attempt is in the JSON and the report counts them. As root, every process started
here runs at niceness ``--nice`` (default -10; children inherit it), so other sessions' work
takes less from the measured processes; it is the same for every target.

``--busy-loops``: on a VM, waking an idle vCPU costs tens of microseconds per hop; one
``SCHED_IDLE`` busy loop per vCPU, started from this session beside the measured processes,
keeps every vCPU awake without taking time from them (SCHED_IDLE only runs when nothing else
wants the CPU). ``both`` runs every round with and without them, back to back.

The router is given the app with ``concurrency`` 1024 (``--pod-concurrency``): it enforces a
pod's concurrency by queueing, and the stand-in app has no limit, so a low figure would measure
the router's queue instead of its overhead.

Results go to ``bench/results/e2e-latest.json`` and ``e2e-latest.md`` (or ``--json`` /
``--markdown``); the markdown is printed at the end. Every child process is stopped on exit,
on Ctrl-C and on SIGTERM. Correctness first: each run records errors, status codes and
``sent == completed``; a run with errors is flagged in the report (``ok: false`` in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import http.client
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.loadgen import LoadResult, run_closed_loop, run_open_loop

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SBIN_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"))

# Targets from the issue, for the verdict lines (reported, never asserted by the unit run).
TARGET_ADDED_P90_US = 110.0
TARGET_VS_NGINX_P90_US = 15.0
TARGET_CPU_US_PER_REQ = 25.0

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))
PROXIES = ("router", "nginx", "haproxy")


@dataclass
class Options:
    rate: float = 2000.0
    duration: float = 10.0
    warmup: float = 0.5
    repeats: int = 3
    nginx: bool = False
    haproxy: bool = False
    busy_loops: str = "off"  # off | on | both
    sat_concurrency: tuple[int, ...] = (64,)
    sat_duration: float = 3.0
    sat_warmup: float = 0.3
    pod_concurrency: int = 1024
    path: str = "/"
    install: bool = True  # apt-get install missing reference proxies when root
    settle: float = 0.2  # pause between runs
    # A run during which other processes used more than this many vCPUs is run again (up to
    # `retries` times, after a pause); every attempt stays in the JSON. 0 disables.
    max_foreign_cpu: float = 0.15
    retries: int = 2
    retry_pause: float = 1.0
    quiet_wait: float = 20.0  # before each run, wait up to this long for foreign load to drop
    # Niceness of every process started here (root only; children inherit it): on a shared
    # machine, other sessions' work then takes less from the measured processes. None: unchanged.
    nice: int | None = -10

    @property
    def conditions(self) -> list[bool]:
        return {"off": [False], "on": [True], "both": [False, True]}[self.busy_loops]


# ---- processes ----------------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rpartition(b")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class HarnessError(RuntimeError):
    pass


class Harness:
    """Owns the temporary directory and every child process; ``close`` stops them all."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.tmp = Path(tempfile.mkdtemp(prefix="fastproxy-e2e-"))
        self.children: list[Child] = []
        self.busy: list[Child] = []

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop_busy_loops()
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                self.log(f"could not stop {child.name} (pid {child.pid}): {exc}")
        self.children.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _spawn(self, name: str, argv: list[str], stop_signal: int = signal.SIGTERM) -> Child:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        child = Child(name, popen, log, stop_signal)
        self.children.append(child)
        return child

    def _wait_line(self, child: Child, prefix: str, timeout: float = 30.0) -> str:
        """The first log line starting with ``prefix`` (the process's readiness announcement)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in child.log.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            if not child.alive():
                raise HarnessError(f"{child.name} exited ({child.popen.returncode}):\n{child.tail()}")
            time.sleep(0.02)
        raise HarnessError(f"{child.name} not ready within {timeout}s:\n{child.tail()}")

    def _wait_http(self, child: Child, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not child.alive():
                raise HarnessError(f"{child.name} exited ({child.popen.returncode}):\n{child.tail()}")
            try:
                check_get("127.0.0.1", port, "/")
                return
            except (OSError, HarnessError, http.client.HTTPException) as exc:
                last = exc
                time.sleep(0.05)
        raise HarnessError(
            f"{child.name} not answering on {port} within {timeout}s ({last}):\n{child.tail()}"
        )

    # -- the servers ------------------------------------------------------------------------------

    def start_app(self) -> tuple[Child, int]:
        child = self._spawn(
            "app", [sys.executable, "-m", "fastproxy.devtools.upstream", "--listen", "127.0.0.1:0"]
        )
        line = self._wait_line(child, "listening ")
        port = int(line.split()[1].rsplit(":", 1)[1])
        return child, port

    def start_router(self, app_port: int, pod_concurrency: int) -> tuple[Child, int]:
        from fastproxy.config import RoutesFile
        from statesync.schema import PodRecord, PodState, Route, WeightedRevision

        pod = PodRecord(
            uid="bench-app-0",
            namespace="bench",
            revision="app-v1",
            ip="127.0.0.1",
            port=app_port,
            concurrency=pod_concurrency,
            state=PodState.READY,
            generation=1,
            ready=True,
        )
        route = Route(service="app", revisions=(WeightedRevision(revision="app-v1", weight=100),))
        routes = self.tmp / "routes.json"
        routes.write_bytes(msgspec.json.encode(RoutesFile(routes=[route], pods=[pod])))
        child = self._spawn(
            "router",
            [
                sys.executable, "-m", "fastproxy.cli", "router",
                "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--routes", str(routes),
                "--workers", "1", "--grace-period", "2", "--log-level", "warning",
            ],
        )  # fmt: skip
        line = self._wait_line(child, "listening ")
        port = int(line.split()[1].rsplit(":", 1)[1])
        self._wait_http(child, port)
        return child, port

    def start_nginx(self, binary: str, app_port: int) -> tuple[Child, int]:
        port = free_port()
        tmp = self.tmp
        conf = tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=tmp, port=port, app_port=app_port, user="user root;" if os.geteuid() == 0 else ""
            )
        )
        # -e: errors before the config is read go here, not to /var/log/nginx (1.19.5+).
        child = self._spawn("nginx", [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx.err")])
        self._wait_http(child, port)
        return child, port

    def start_haproxy(self, binary: str, app_port: int, no_delay: bool = False) -> tuple[Child, int]:
        port = free_port()
        conf = self.tmp / "haproxy.cfg"
        option = "option http-no-delay" if no_delay else ""
        conf.write_text(HAPROXY_CONF.format(port=port, app_port=app_port, no_delay_option=option))
        # SIGUSR1 is haproxy's graceful stop; SIGTERM is its immediate one. Either ends it.
        child = self._spawn("haproxy", [binary, "-f", str(conf), "-db"])
        self._wait_http(child, port)
        return child, port

    # -- busy loops -------------------------------------------------------------------------------

    def start_busy_loops(self, n: int | None = None) -> None:
        if self.busy:
            return
        code = (
            "import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True:\n    pass\n"
        )
        for i in range(n or os.cpu_count() or 1):
            log = self.tmp / f"busy-{i}.log"
            with open(log, "wb") as out:
                popen = subprocess.Popen(
                    [sys.executable, "-S", "-c", code], stdin=subprocess.DEVNULL, stdout=out, stderr=out
                )
            self.busy.append(Child(f"busy-{i}", popen, log, signal.SIGKILL))
        time.sleep(0.3)  # let them reach their loop (and fail, if SCHED_IDLE is refused)
        for child in self.busy:
            if not child.alive():
                tail = child.tail()
                self.stop_busy_loops()
                raise HarnessError(f"busy loop exited: {tail}")

    def stop_busy_loops(self) -> None:
        for child in self.busy:
            child.stop()
        self.busy.clear()

    def foreign_cpu(self, window: float) -> float:
        """vCPUs used by processes other than ours over the next ``window`` seconds."""
        busy0, ours0, t0 = system_cpu()[0], self.our_cpu(), time.perf_counter()
        time.sleep(window)
        busy1, ours1, t1 = system_cpu()[0], self.our_cpu(), time.perf_counter()
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0)

    def wait_quiet(self, threshold: float, max_wait: float) -> float:
        """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` vCPU."""
        deadline = time.monotonic() + max_wait
        foreign = self.foreign_cpu(0.5)
        while foreign >= threshold and time.monotonic() < deadline:
            foreign = self.foreign_cpu(0.5)
        return foreign

    def our_cpu(self) -> float:
        """CPU seconds not to count as foreign load: this process, every child (servers and busy
        loops), and any other SCHED_IDLE process (another session's busy loops take no CPU anyone
        else wants)."""
        total = _self_cpu()
        ours = {child.pid for child in (*self.children, *self.busy)}
        for child in (*self.children, *self.busy):
            with contextlib.suppress(OSError, ValueError):
                total += child.cpu()
        return total + idle_policy_cpu(exclude=ours | {os.getpid()})


# One nginx process as the benchmarks run it (no daemon, no master, its files in the run's tmp);
# each benchmark appends its own http body: NGINX_MAIN.format(name=, generator=, what=) + body.
NGINX_MAIN = """\
# generated by {generator}: {what}
daemon off;
master_process off;
worker_processes 1;
{{user}}
pid {{tmp}}/{name}.pid;
error_log {{tmp}}/{name}-error.log warn;
events {{{{
    worker_connections 8192;
}}}}
http {{{{
    access_log off;
    client_body_temp_path {{tmp}}/nginx-client-body;
    proxy_temp_path {{tmp}}/nginx-proxy;
    fastcgi_temp_path {{tmp}}/nginx-fastcgi;
    uwsgi_temp_path {{tmp}}/nginx-uwsgi;
    scgi_temp_path {{tmp}}/nginx-scgi;
"""

NGINX_CONF = (
    NGINX_MAIN.format(
        name="nginx",
        generator="bench/e2e.py",
        what="one process, upstream keep-alive, streaming (no buffering)",
    )
    + """\
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    upstream app {{
        server 127.0.0.1:{app_port};
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-Id $request_id;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""
)

HAPROXY_CONF = """\
# generated by bench/e2e.py: one thread, upstream keep-alive, no logging; the same request
# rewriting as the router and nginx here (X-Forwarded-For/-Proto, a request id).
# "option http-no-delay" only when asked: HAProxy's docs keep it for interactive streams such
# as SSE, where a user proxying them sets it; elsewhere it trades CPU for latency.
global
    nbthread 1
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option forwardfor
    http-reuse always
    {no_delay_option}
frontend fe
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Request-Id %[uuid]
    default_backend be
backend be
    server app 127.0.0.1:{app_port}
"""


def check_get(host: str, port: int, path: str) -> None:
    """One request; raises unless it is answered 200 with the app's body."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or not body:
        raise HarnessError(f"GET {path} on {host}:{port}: {response.status} {body[:200]!r}")


def find_or_install(names: list[str], install: bool, log: Callable[[str], None]) -> dict[str, str | None]:
    """Binary path per program; missing ones are apt-get installed (root only, one attempt)."""
    found = {name: shutil.which(name, path=SBIN_PATH) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", *missing]
        ok = subprocess.run(cmd, env=env, capture_output=True).returncode == 0
        if not ok:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            ok = subprocess.run(cmd, env=env, capture_output=True).returncode == 0
        if not ok:
            log(f"apt-get install {' '.join(missing)} failed")
        found = {name: shutil.which(name, path=SBIN_PATH) for name in names}
    for name, path in found.items():
        if path is None:
            why = "" if os.geteuid() == 0 else " (not root: not installing)"
            log(f"{name} is not installed{why}: skipped")
    return found


def program_version(binary: str, flag: str) -> str:
    try:
        out = subprocess.run([binary, flag], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"


# ---- measuring ----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    procs: dict[str, Child]  # role ("proxy", "app") -> process whose CPU is measured


def _run_loop(coro: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    if uvloop is not None:
        return uvloop.run(coro)
    import asyncio  # pragma: no cover

    return asyncio.run(coro)  # pragma: no cover


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


SCHED_IDLE_POLICY = 5


def idle_policy_cpu(exclude: set[int]) -> float:
    """CPU seconds used so far by the SCHED_IDLE processes of the machine (but ``exclude``)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 38 and int(fields[38]) == SCHED_IDLE_POLICY:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all vCPUs, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def measure(
    harness: Harness,
    target: Target,
    requests_total: Callable[[LoadResult], int],
    coro: Callable[[], Coroutine[Any, Any, LoadResult]],
    extra: Callable[[LoadResult], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One load run with the CPU of every process involved; a dict ready for the JSON.

    ``extra(result)`` adds keys of the caller's own (``bench.scale`` keeps a latency CDF)."""
    for child in target.procs.values():
        if not child.alive():
            raise HarnessError(f"{child.name} died (exit {child.popen.returncode}):\n{child.tail()}")
    gc.collect()
    gc.disable()
    try:
        before = {role: cpu_times(child.pid) for role, child in target.procs.items()}
        ours_before = harness.our_cpu()
        system_before, steal_before = system_cpu()
        gen_before = _self_cpu()
        wall = time.perf_counter()
        result = _run_loop(coro())
        wall = time.perf_counter() - wall
        gen_cpu = _self_cpu() - gen_before
        after = {role: cpu_times(child.pid) for role, child in target.procs.items()}
        system_after, steal_after = system_cpu()
        ours = harness.our_cpu() - ours_before
    finally:
        gc.enable()
    # Whatever else ran on the machine meanwhile (other sessions' tests, daemons), in vCPUs.
    foreign = max(0.0, (system_after - system_before) - ours) / wall
    cpu = {role: sum(after[role]) - sum(before[role]) for role in before}
    # The kernel's share: on loopback the sender pays for the receiver's TCP path and wake-up.
    sys_share = {
        role: (after[role][1] - before[role][1]) / cpu[role] if cpu[role] > 0 else math.nan for role in before
    }
    n = max(requests_total(result), 1)
    summary = result.summary()
    lat = summary.pop("latency_ms")
    latency_us = {
        **{name: result.percentile(p) * 1e6 for name, p in PERCENTILES},
        "p99.9": result.percentile(99.9) * 1e6,
        "max": lat["max"] * 1000,
        "mean": lat["mean"] * 1000,
    }
    return {
        **summary,
        "target": target.name,
        "address": summary["target"],
        "status": {str(k): v for k, v in result.status.items()},
        "latency_us": latency_us,
        "ok": result.error_count == 0 and result.completed == result.sent and set(result.status) == {200},
        "requests_for_cpu": n,
        "wall_s": wall,
        "cpu_s": {**cpu, "generator": gen_cpu},
        "cpu_us_per_req": {**{role: s * 1e6 / n for role, s in cpu.items()}, "generator": gen_cpu * 1e6 / n},
        "sys_share": sys_share,
        "foreign_cpu": foreign,
        "steal_cpu": (steal_after - steal_before) / wall,
        **(extra(result) if extra is not None else {}),
    }


def open_loop_run(
    harness: Harness,
    target: Target,
    opts: Options,
    extra: Callable[[LoadResult], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    n_warm = round(opts.rate * opts.warmup)
    n_measured = max(1, round(opts.rate * opts.duration))
    return measure(
        harness,
        target,
        # CPU covers the warm-up requests too; all are scheduled at the same rate.
        lambda r: n_warm + n_measured - r.error_count,
        lambda: run_open_loop(
            "127.0.0.1",
            target.port,
            rate=opts.rate,
            duration=opts.duration,
            warmup=opts.warmup,
            path=opts.path,
        ),
        extra,
    )


def closed_loop_run(harness: Harness, target: Target, opts: Options, concurrency: int) -> dict[str, Any]:
    if opts.sat_warmup > 0:  # unmeasured: connections, pools and caches warm
        _run_loop(
            run_closed_loop("127.0.0.1", target.port, concurrency=concurrency, duration=opts.sat_warmup)
        )
    return measure(
        harness,
        target,
        lambda r: r.completed,
        lambda: run_closed_loop(
            "127.0.0.1", target.port, concurrency=concurrency, duration=opts.sat_duration, path=opts.path
        ),
    )


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def aggregate(runs: list[dict[str, Any]], targets: list[str], conditions: list[bool]) -> dict[str, Any]:
    """Medians over rounds: absolute, minus direct (same round), router minus each reference."""
    out: dict[str, Any] = {}
    keys = ("p50", "p90", "p99", "p99.9", "max", "mean")
    for busy in conditions:
        cond = "busy-loops" if busy else "plain"
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for run in runs:
            if run["phase"] == "latency" and run["busy_loops"] == busy:
                by_round.setdefault(run["round"], {})[run["target"]] = run
        per_target: dict[str, Any] = {}
        for name in targets:
            rows = [r[name] for r in by_round.values() if name in r]
            if not rows:
                continue
            entry: dict[str, Any] = {
                "rounds": len(rows),
                "latency_us": {k: _median([r["latency_us"][k] for r in rows]) for k in keys},
                "cpu_us_per_req": {
                    role: _median([r["cpu_us_per_req"][role] for r in rows])
                    for role in rows[0]["cpu_us_per_req"]
                },
                "sys_share": {
                    role: _median([r["sys_share"][role] for r in rows]) for role in rows[0]["sys_share"]
                },
                "errors": sum(sum(r["errors"].values()) for r in rows),
                "sent": sum(r["sent"] for r in rows),
                "completed": sum(r["completed"] for r in rows),
                "ok": all(r["ok"] for r in rows),
                "max_send_lag_us": max(r["max_send_lag"] for r in rows) * 1e6,
            }
            if name != "direct":
                entry["added_us"] = {
                    k: _median(
                        [
                            r[name]["latency_us"][k] - r["direct"]["latency_us"][k]
                            for r in by_round.values()
                            if name in r
                        ]
                    )
                    for k in keys
                }
            per_target[name] = entry
        for ref in ("nginx", "haproxy"):
            if "router" in per_target and ref in per_target:
                per_target["router"][f"minus_{ref}_us"] = {
                    k: _median(
                        [
                            r["router"]["latency_us"][k] - r[ref]["latency_us"][k]
                            for r in by_round.values()
                            if "router" in r and ref in r
                        ]
                    )
                    for k in keys
                }
        sat: dict[str, Any] = {}
        for run in runs:
            if run["phase"] == "saturation" and run["busy_loops"] == busy:
                sat.setdefault(f"{run['target']}@{run['concurrency']}", []).append(run)
        sat_out = {}
        for key, rows in sat.items():
            sat_out[key] = {
                "target": rows[0]["target"],
                "concurrency": rows[0]["concurrency"],
                "rounds": len(rows),
                "throughput": _median([r["throughput"] for r in rows]),
                "latency_us": {k: _median([r["latency_us"][k] for r in rows]) for k in ("p50", "p99")},
                "cpu_us_per_req": {
                    role: _median([r["cpu_us_per_req"][role] for r in rows])
                    for role in rows[0]["cpu_us_per_req"]
                },
                "sys_share": {
                    role: _median([r["sys_share"][role] for r in rows]) for role in rows[0]["sys_share"]
                },
                "errors": sum(sum(r["errors"].values()) for r in rows),
                "ok": all(r["ok"] for r in rows),
            }
        out[cond] = {"latency": per_target, "saturation": sat_out}
    return out


def environment() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "uvloop": getattr(uvloop, "__version__", None),
        "commit": commit + ("+dirty" if dirty else ""),
        "loadavg": os.getloadavg(),
    }


def attempt_run(
    harness: Harness,
    opts: Options,
    make: Callable[[], dict[str, Any]],
    runs: list[dict[str, Any]],
    discarded: list[dict[str, Any]],
    log: Callable[[str], None],
    **labels: Any,
) -> dict[str, Any]:
    """One run; again while it was disturbed by foreign load (the least disturbed stays).

    The kept run goes to ``runs``, the other attempts to ``discarded``; ``labels`` are added to
    every attempt (phase, round, target...)."""
    tries: list[dict[str, Any]] = []
    for i in range(opts.retries + 1):
        time.sleep(opts.settle if i == 0 else opts.retry_pause)
        if opts.max_foreign_cpu > 0 and opts.quiet_wait > 0:
            waited = time.monotonic()
            before = harness.wait_quiet(opts.max_foreign_cpu, opts.quiet_wait)
            waited = time.monotonic() - waited
            if waited > 1.0:
                log(f"  (waited {waited:.0f} s for other processes to calm down: {before:.2f} vCPU)")
        run = make()
        run.update(labels, attempt=i + 1)
        run["disturbed"] = 0 < opts.max_foreign_cpu < run["foreign_cpu"]
        tries.append(run)
        if not run["disturbed"]:
            break
        if i < opts.retries:
            log(f"  (other processes used {run['foreign_cpu']:.2f} vCPU during that run: again)")
    best = min(tries, key=lambda r: r["foreign_cpu"])
    discarded.extend(r for r in tries if r is not best)
    runs.append(best)
    return best


def run_benchmark(opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start everything, measure, stop everything; the results as a JSON-ready dict."""
    env = environment()
    wanted = [name for name, on in (("nginx", opts.nginx), ("haproxy", opts.haproxy)) if on]
    binaries = find_or_install(wanted, opts.install, log) if wanted else {}
    skipped = [name for name in wanted if binaries.get(name) is None]
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []  # attempts run again because of foreign load
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if opts.nice is not None and opts.nice != niceness:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, opts.nice)
        except PermissionError:
            log(f"cannot set niceness {opts.nice} (not root): left at {niceness}")
    env["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        return _run_benchmark(opts, log, env, binaries, skipped, runs, discarded)
    finally:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, niceness)


def _run_benchmark(
    opts: Options,
    log: Callable[[str], None],
    env: dict[str, Any],
    binaries: dict[str, str | None],
    skipped: list[str],
    runs: list[dict[str, Any]],
    discarded: list[dict[str, Any]],
) -> dict[str, Any]:
    with Harness(log) as harness:
        app, app_port = harness.start_app()
        router, router_port = harness.start_router(app_port, opts.pod_concurrency)
        targets = [
            Target("direct", app_port, {"app": app}),
            Target("router", router_port, {"proxy": router, "app": app}),
        ]
        versions = {}
        if binaries.get("nginx"):
            nginx, port = harness.start_nginx(binaries["nginx"], app_port)  # type: ignore[arg-type]
            targets.append(Target("nginx", port, {"proxy": nginx, "app": app}))
            versions["nginx"] = program_version(binaries["nginx"], "-v")  # type: ignore[arg-type]
        if binaries.get("haproxy"):
            hap, port = harness.start_haproxy(binaries["haproxy"], app_port)  # type: ignore[arg-type]
            targets.append(Target("haproxy", port, {"proxy": hap, "app": app}))
            versions["haproxy"] = program_version(binaries["haproxy"], "-v")  # type: ignore[arg-type]
        for target in targets:
            check_get("127.0.0.1", target.port, opts.path)
        log(
            f"targets: {', '.join(f'{t.name}=127.0.0.1:{t.port}' for t in targets)}; "
            f"pids: {', '.join(f'{c.name}={c.pid}' for c in harness.children)}"
        )

        def set_busy(busy: bool) -> None:
            if busy:
                harness.start_busy_loops()
            else:
                harness.stop_busy_loops()

        def attempt(make: Callable[[], dict[str, Any]], **labels: Any) -> dict[str, Any]:
            return attempt_run(harness, opts, make, runs, discarded, log, **labels)

        # Latency: open loop, interleaved target by target within each round.
        for rnd in range(opts.repeats):
            for busy in opts.conditions:
                set_busy(busy)
                for target in targets:
                    run = attempt(
                        functools.partial(open_loop_run, harness, target, opts),
                        phase="latency",
                        round=rnd,
                        busy_loops=busy,
                    )
                    lat = run["latency_us"]
                    log(
                        f"[latency r{rnd + 1}/{opts.repeats}{' busy' if busy else ''}] {target.name:8} "
                        f"p50 {lat['p50']:7.0f}  p90 {lat['p90']:7.0f}  p99 {lat['p99']:7.0f}  "
                        f"max {lat['max']:8.0f} us  sent {run['sent']} errors {run['errors'] or 0} "
                        f"status {run['status']}  foreign {run['foreign_cpu']:.2f} vCPU"
                    )
        # Saturation: closed loop, same interleaving.
        if opts.sat_duration > 0:
            for rnd in range(opts.repeats):
                for busy in opts.conditions:
                    set_busy(busy)
                    for concurrency in opts.sat_concurrency:
                        for target in targets:
                            run = attempt(
                                functools.partial(closed_loop_run, harness, target, opts, concurrency),
                                phase="saturation",
                                round=rnd,
                                busy_loops=busy,
                            )
                            cpu = run["cpu_us_per_req"]
                            log(
                                f"[saturation r{rnd + 1}/{opts.repeats}{' busy' if busy else ''} "
                                f"c={concurrency}] {target.name:8} {run['throughput']:8.0f} req/s  "
                                f"proxy {cpu.get('proxy', math.nan):6.1f}  app {cpu['app']:6.1f} us/req  "
                                f"errors {run['errors'] or 0}  foreign {run['foreign_cpu']:.2f} vCPU"
                            )
        set_busy(False)
        names = [t.name for t in targets]
    return {
        "environment": env,
        "options": asdict(opts),
        "versions": versions,
        "skipped": skipped,
        "targets": names,
        "ok": all(run["ok"] for run in runs),
        "summary": aggregate(runs, names, opts.conditions),
        "runs": runs,
        "discarded_runs": discarded,
    }


# ---- the report ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cpu(entry: dict[str, Any], role: str) -> str:
    """CPU us/request with the kernel's share, e.g. ``120.5 (61%)``."""
    us = entry["cpu_us_per_req"].get(role)
    if us is None:
        return "-"
    share = entry["sys_share"].get(role, math.nan)
    return f"{us:.1f}" + ("" if math.isnan(share) else f" ({share * 100:.0f}%)")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render_markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    opts = results["options"]
    lines = [
        "# fastproxy end-to-end benchmark",
        "",
        f"{env['date']} · {env['cpus']} vCPU {env['cpu_model']} · kernel {env['kernel']} · "
        f"Python {env['python']} · uvloop {env['uvloop']} · commit {env['commit']} · "
        f"nice {env.get('nice')} · "
        f"load before {', '.join(f'{x:.2f}' for x in env['loadavg'])}",
        "",
        f"Open loop {opts['rate']:g} req/s for {opts['duration']:g} s "
        f"(+{opts['warmup']:g} s warm-up) per run; "
        f"{opts['repeats']} interleaved round(s); figures are medians over rounds; "
        "added = target minus direct of the same round. Latencies in microseconds.",
    ]
    if results["versions"]:
        lines.append("References: " + "; ".join(f"{k}: {v}" for k, v in results["versions"].items()) + ".")
    if results["skipped"]:
        lines.append(f"Skipped (not installed): {', '.join(results['skipped'])}.")
    disturbed = sum(1 for run in results["runs"] if run["disturbed"])
    lines.append(
        f"Runs repeated because other processes used > {opts['max_foreign_cpu']:g} vCPU meanwhile: "
        f"{len(results['discarded_runs'])}; runs kept although disturbed: {disturbed}."
    )
    if not results["ok"]:
        lines.append("")
        lines.append("**WARNING: some runs had errors, non-200 answers or lost requests (see JSON `runs`).**")
    for cond, data in results["summary"].items():
        lat = data["latency"]
        lines += [
            "",
            f"## Latency at {opts['rate']:g} req/s, "
            + ("with SCHED_IDLE busy loops" if cond != "plain" else "no busy loops"),
            "",
            "| target | p50 | p90 | p99 | max | added p50 | added p90 | added p99 | added max "
            "| proxy CPU us/req (kernel %) | app CPU us/req | sent | errors |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for name, e in lat.items():
            la, add, cpu = e["latency_us"], e.get("added_us", {}), e["cpu_us_per_req"]
            lines.append(
                f"| {name} | {_f(la['p50'])} | {_f(la['p90'])} | {_f(la['p99'])} | {_f(la['max'])} "
                f"| {_f(add.get('p50'), signed=True)} | {_f(add.get('p90'), signed=True)} "
                f"| {_f(add.get('p99'), signed=True)} | {_f(add.get('max'), signed=True)} "
                f"| {_cpu(e, 'proxy')} | {_f(cpu.get('app'), 1)} | {e['sent']} | {e['errors']} |"
            )
        router = lat.get("router")
        if router:
            for ref in ("nginx", "haproxy"):
                diff = router.get(f"minus_{ref}_us")
                if diff:
                    lines.append("")
                    lines.append(
                        f"router minus {ref} (same round, median): p50 {_f(diff['p50'], signed=True)}, "
                        f"p90 {_f(diff['p90'], signed=True)}, p99 {_f(diff['p99'], signed=True)}, "
                        f"max {_f(diff['max'], signed=True)} us"
                    )
            lines.append("")
            added90 = router["added_us"]["p90"]
            lines.append(
                f"- target: router added p90 <= {TARGET_ADDED_P90_US:g} us at {opts['rate']:g} req/s: "
                f"{_f(added90, 1)} us -> **{_verdict(added90 <= TARGET_ADDED_P90_US)}**"
            )
            diff = router.get("minus_nginx_us")
            if diff:
                lines.append(
                    f"- target: router added p90 <= nginx added p90 + {TARGET_VS_NGINX_P90_US:g} us: "
                    f"router - nginx = {_f(diff['p90'], 1, signed=True)} us -> "
                    f"**{_verdict(diff['p90'] <= TARGET_VS_NGINX_P90_US)}**"
                )
        sat = data["saturation"]
        if sat:
            lines += [
                "",
                f"### Saturation (closed loop, {opts['sat_duration']:g} s per run), {cond}",
                "",
                "| target | connections | req/s | p50 us | p99 us | proxy CPU us/req (kernel %) "
                "| app CPU us/req | generator CPU us/req | errors |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
            ]
            for e in sat.values():
                cpu = e["cpu_us_per_req"]
                lines.append(
                    f"| {e['target']} | {e['concurrency']} | {_f(e['throughput'])} "
                    f"| {_f(e['latency_us']['p50'])} | {_f(e['latency_us']['p99'])} "
                    f"| {_cpu(e, 'proxy')} | {_f(cpu.get('app'), 1)} "
                    f"| {_f(cpu.get('generator'), 1)} | {e['errors']} |"
                )
            lines.append("")
            for e in sat.values():
                if e["target"] == "router":
                    cpu = e["cpu_us_per_req"]["proxy"]
                    lines.append(
                        f"- target: router CPU <= {TARGET_CPU_US_PER_REQ:g} us/request at saturation "
                        f"({e['concurrency']} connections): {_f(cpu, 1)} us -> "
                        f"**{_verdict(cpu <= TARGET_CPU_US_PER_REQ)}**"
                    )
    lines += [
        "",
        "## Runs",
        "",
        "| phase | round | busy | target | conc | p50 | p90 | p99 | max | req/s | sent | completed | errors "
        "| max send lag us | generator CPU us/req | foreign vCPU | attempt |",
        "|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in results["runs"]:
        la = run["latency_us"]
        lines.append(
            f"| {run['phase']} | {run['round'] + 1} | {'y' if run['busy_loops'] else 'n'} | {run['target']} "
            f"| {run['concurrency'] or '-'} | {_f(la['p50'])} | {_f(la['p90'])} | {_f(la['p99'])} "
            f"| {_f(la['max'])} "
            f"| {_f(run['throughput'])} | {run['sent']} | {run['completed']} | {sum(run['errors'].values())} "
            f"| {_f(run['max_send_lag'] * 1e6)} | {_f(run['cpu_us_per_req']['generator'])} "
            f"| {run['foreign_cpu']:.2f}{' (disturbed)' if run['disturbed'] else ''} | {run['attempt']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], json_path: Path, md_path: Path) -> str:
    markdown = render_markdown(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    md_path.write_text(markdown)
    return markdown


# ---- command line -------------------------------------------------------------------------------


def _concurrencies(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[,N...], got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive N[,N...], got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> tuple[Options, Path, Path]:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop requests/s")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per open-loop run")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="unmeasured seconds before each open-loop run"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--nginx", action="store_true", help="add nginx as a reference proxy")
    parser.add_argument("--haproxy", action="store_true", help="add haproxy as a reference proxy")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install nginx/haproxy")
    parser.add_argument(
        "--busy-loops", nargs="?", const="on", default="off", choices=("off", "on", "both"),
        help="SCHED_IDLE busy loop per vCPU during the runs; 'both' measures with and without",
    )  # fmt: skip
    parser.add_argument(
        "--sat-concurrency", type=_concurrencies, default=(64,), help="closed-loop connections, N[,N]"
    )
    parser.add_argument(
        "--sat-duration", type=float, default=3.0, help="seconds per saturation run (0: skip)"
    )
    parser.add_argument(
        "--pod-concurrency", type=int, default=1024, help="the app's concurrency in the routes file"
    )
    parser.add_argument("--path", default="/", help="request path (the app's fast path by default)")
    parser.add_argument(
        "--max-foreign-cpu", type=float, default=0.15, metavar="VCPUS",
        help="run again a run during which other processes used more CPU than this (0: never)",
    )  # fmt: skip
    parser.add_argument(
        "--retries", type=int, default=2, help="attempts beyond the first for a disturbed run"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=20.0, metavar="SECONDS",
        help="before each run, wait up to this long for other processes to use < --max-foreign-cpu",
    )  # fmt: skip
    parser.add_argument(
        "--nice", default=-10, type=lambda v: v if v == "keep" else int(v),
        help="niceness of the measured processes and the generator (root only), or 'keep'",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "e2e-latest.json", metavar="PATH")
    parser.add_argument("--markdown", type=Path, default=RESULTS_DIR / "e2e-latest.md", metavar="PATH")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.repeats < 1 or args.warmup < 0:
        parser.error("--rate and --duration must be positive, --repeats >= 1, --warmup >= 0")
    opts = Options(
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        repeats=args.repeats,
        nginx=args.nginx,
        haproxy=args.haproxy,
        busy_loops=args.busy_loops,
        sat_concurrency=args.sat_concurrency,
        sat_duration=args.sat_duration,
        pod_concurrency=args.pod_concurrency,
        path=args.path,
        install=not args.no_install,
        max_foreign_cpu=args.max_foreign_cpu,
        retries=max(0, args.retries),
        quiet_wait=args.quiet_wait,
        nice=None if args.nice == "keep" else args.nice,
    )
    return opts, args.json, args.markdown


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind the whole run, so the harness stops its children on the way out.

    An own SIGINT handler also keeps ``uvloop.run`` (asyncio.Runner) from installing its own,
    which only cancels the generator's task: the load generator can absorb that cancellation
    and return a partial result, so the benchmark would go on after a Ctrl-C.
    """

    def on_sigint(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    def on_sigterm(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous_int = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


def main(argv: list[str] | None = None) -> int:
    opts, json_path, md_path = parse_args(argv)
    try:
        with _signals_unwind():
            results = run_benchmark(opts, _log)
    except KeyboardInterrupt:
        _log("interrupted: child processes stopped")
        return 130
    except HarnessError as exc:
        _log(f"benchmark failed: {exc}")
        return 1
    markdown = write_results(results, json_path, md_path)
    print(markdown)
    _log(f"results: {json_path} {md_path}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
