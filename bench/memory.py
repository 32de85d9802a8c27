"""The router's memory: RSS of a real router process holding 1 pod, 50k pods from a routes file, 50k from Valkey.

Usage::

    python -m bench.memory [--pods 50000] [--cases static-1,static,static-slots,valkey] [--rounds 1]
                           [--tracemalloc [TOP]] [--json PATH] [--markdown PATH]

Theory of operation
-------------------
The issue's target is what an operator sees: the resident set of a ``fastproxy router`` process
holding 50k pods, <= 60 MB. So every case starts the real process (``python -m fastproxy.cli
router``, one worker, ephemeral ports on loopback) and reads its ``/proc/<pid>/status``:

- ``static-1``: a routes file with one pod: the floor (interpreter, imports, listeners, metrics).
- ``static``: a routes file with ``--pods`` pods over 1000 revisions (``bench.conftest.make_pods``,
  the same pods every bench uses), one route per revision. A static router has no warm-up: a
  revision's pods get their slots (``PodSlots``, ~220 bytes a pod with their dict entries) at its
  first request, so this figure is before any; ``valkey`` is after all of them.
- ``static-slots``: the same routes file, measured after one request to every route, so that every
  revision has its slots: a static router's "50k pods, slots included". The pods' addresses are all
  on loopback, and one listener on every loopback address (``0.0.0.0``, an ephemeral port written
  into the routes file) answers each request 200 and closes, so no upstream connection is pooled.
- ``valkey``: the bootstrap path: a real ``valkey-server`` (``EmbeddedValkey``) holding the same
  pods, committed by a real leader ``Writer`` in one batch (as ``bench.bootstrap`` seeds, so the
  writer's pod-chunks and revision index are there as in production), which then stays the
  leader and publishes its heartbeat every second; the router follows it with ``--valkey URL``. It is measured once ``/readyz`` answers 200 *and* the background slot
  warm-up is over (see below), so every pod has been decoded and given its slot.

A router is *settled* when its CPU time grew by less than 50 ms over the last second (the warm-up
and the first full GC pass after it burn CPU; an idle router does not) and, for ``valkey``, its
``/readyz`` is 200; the deadline is 120 s. Then the report takes ``VmRSS`` (resident now, the
target's figure), ``VmHWM`` (the high-water mark: the peak while loading), and ``RssAnon`` /
``RssFile`` (heap versus mapped code of the interpreter and extension modules).

``--tracemalloc [TOP]`` also says where the memory is, from Python's side: the same load
(``load_routes_file`` + ``RoutingSnapshot.build`` + ``Router.install`` for ``static``, one
``StateFollower.resync`` and its warm-up for ``valkey``) in a child process under ``tracemalloc``,
the TOP (default 15) source lines by bytes still allocated at the end and the traced peak.
tracemalloc sees Python's allocations only (not the interpreter's own or a C library's), so its
total is below the RSS growth; it is an index to the code, not a second figure.

Results: ``bench/results/memory-latest.json`` and ``.md`` (or ``--json`` / ``--markdown``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
TARGET_MB = 60.0
CASES = ("static-1", "static", "static-slots", "valkey")
NAMESPACE = "bench-bootstrap"  # bench.bootstrap's seeding writes there
SETTLE_CPU_S = 0.05  # CPU s per s below which a router is idle (a follower uses ~0.02: heartbeats, sweeps)
SETTLE_TIMEOUT_S = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class MemoryBenchError(RuntimeError):
    pass


def write_routes_file(path: Path, pods: int, port: int | None = None) -> None:
    import msgspec

    from bench.conftest import make_pods, make_routes
    from fastproxy.config import RoutesFile

    routes = make_routes(min(pods, 1000))
    records = make_pods(pods, min(pods, 1000))
    if port is not None:
        records = [msgspec.structs.replace(r, port=port) for r in records]
    path.write_bytes(msgspec.json.encode(RoutesFile(routes=routes, pods=records)))


class LoopbackPods:
    """Every pod of a routes file at once: one listener on all addresses (``0.0.0.0``; the pods are
    on 127.x.y.z), in a thread, answering each request 200 with an empty body and closing."""

    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

    def __init__(self) -> None:
        import socket

        self._socket = socket.create_server(("0.0.0.0", 0))
        self.port: int = self._socket.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loopback-pods", daemon=True)

    def __enter__(self) -> LoopbackPods:
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._socket.close()

    async def _serve(self) -> None:
        await asyncio.start_server(self._answer, sock=self._socket)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.RESPONSE)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def request_every_route(listen_port: int, revisions: int) -> None:
    """One GET through the router to each route of ``make_routes(revisions)`` (each its own
    revision): afterwards every revision has its slots. Any answer but 200 is an error."""
    from bench.conftest import make_routes

    for route in make_routes(revisions):
        conn = http.client.HTTPConnection("127.0.0.1", listen_port, timeout=10)
        try:
            conn.request("GET", "/", headers={"Host": route.hosts[0]})
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise MemoryBenchError(f"GET via {route.hosts[0]}: {response.status}, not 200")


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in MB (MiB, as ``ps`` and ``top`` count)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _readyz(admin_port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


def measure_router(
    argv_tail: list[str], log_path: Path, need_ready: bool, warm: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Start a router with ``argv_tail``, wait until it is settled, read its memory, stop it.
    ``warm``: called with the router's listening port once it listens (before it settles)."""
    argv = [
        sys.executable, "-m", "fastproxy.cli", "router", "--listen", "127.0.0.1:0",
        "--admin", "127.0.0.1:0", "--workers", "1", "--log-level", "warning", *argv_tail,
    ]  # fmt: skip
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        admin_port = listen_port = 0
        deadline = started + SETTLE_TIMEOUT_S
        while admin_port == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MemoryBenchError(f"router did not start ({proc.returncode}): {_tail(log_path)}")
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("listening "):
                    listen_port = int(line.split()[1].rsplit(":", 1)[1])
                    admin_port = int(line.split()[3].rsplit(":", 1)[1])
            time.sleep(0.05)
        listening = time.monotonic() - started
        if warm is not None:
            warm(listen_port)
        ready_at = None
        last_cpu = cpu_seconds(proc.pid)
        last_check = time.monotonic()
        while True:
            time.sleep(0.25)
            if proc.poll() is not None:
                raise MemoryBenchError(f"router exited ({proc.returncode}): {_tail(log_path)}")
            now = time.monotonic()
            if now > deadline:
                raise MemoryBenchError(f"router not settled within {SETTLE_TIMEOUT_S:g} s: {_tail(log_path)}")
            if ready_at is None and (not need_ready or _readyz(admin_port) == 200):
                ready_at = now - started
                last_cpu, last_check = cpu_seconds(proc.pid), now
                continue
            if ready_at is not None and now - last_check >= 1.0:
                cpu = cpu_seconds(proc.pid)
                if (cpu - last_cpu) / (now - last_check) < SETTLE_CPU_S:
                    break
                last_cpu, last_check = cpu, now
        status = proc_status(proc.pid)
        return {
            "rss_mb": status["VmRSS"],
            "peak_mb": status["VmHWM"],
            "anon_mb": status.get("RssAnon"),
            "file_mb": status.get("RssFile"),
            "listening_s": round(listening, 2),
            "ready_s": round(ready_at or 0.0, 2),
            "settled_s": round(time.monotonic() - started, 2),
            "cpu_s": round(cpu_seconds(proc.pid), 2),
        }
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class SeededValkey:
    """``bench.bootstrap``'s seeding writer, kept alive as the leader: it publishes a heartbeat
    every second, as the writer of a real deployment does; a router that hears none marks its
    state stale and re-reads it every few seconds, so it would never settle."""

    def __init__(self, url: str, pods: int) -> None:
        self.url = url
        self.pods = pods
        self.version = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="seeder", daemon=True)

    def __enter__(self) -> SeededValkey:
        self._thread.start()
        if not self._ready.wait(300) or self._error is not None:
            self._stop.set()
            raise MemoryBenchError(f"seeding {self.pods} pods failed: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        from bench.conftest import make_pods, make_routes
        from statesync.connect import connect
        from statesync.keys import Keys
        from statesync.writer import Writer

        keys = Keys(NAMESPACE)
        client = connect(self.url)
        writer = Writer(client, keys=keys, writer_id="bench-memory", lease_ttl=600)
        if not await writer.try_acquire():
            raise MemoryBenchError("the seeding writer did not get the lease")
        await writer._write(tuple(make_pods(self.pods)), tuple(make_routes(min(self.pods, 1000))))
        self.version = int(await client.get(keys.version))
        beating = asyncio.create_task(writer._heartbeat())
        self._ready.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
        beating.cancel()
        await client.aclose()


# ---- tracemalloc children -----------------------------------------------------------------------


def _top_lines(snapshot: Any, top: int) -> list[dict[str, Any]]:
    rows = []
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        where = f"{os.path.relpath(frame.filename, ROOT) if frame.filename.startswith(str(ROOT)) else frame.filename}"
        rows.append({"where": f"{where}:{frame.lineno}", "mb": stat.size / 2**20, "blocks": stat.count})
    return rows


def traced_static(routes_path: str, top: int) -> dict[str, Any]:
    import tracemalloc

    import uvloop

    from fastproxy.config import RouterConfig, load_routes_file
    from fastproxy.router import Router
    from fastproxy.snapshot import RoutingSnapshot

    loop = uvloop.new_event_loop()
    tracemalloc.start()
    router = Router(RouterConfig(), loop)
    routes = load_routes_file(routes_path)
    router.install(RoutingSnapshot.build(0, 1, routes.pods, routes.routes))
    del routes
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    pods = len(router.snapshot.pods)
    loop.close()
    return {
        "pods": pods,
        "traced_mb": current / 2**20,
        "traced_peak_mb": peak / 2**20,
        "top": _top_lines(snapshot, top),
    }


async def _traced_valkey(url: str, top: int) -> dict[str, Any]:
    import tracemalloc

    from fastproxy.config import RouterConfig
    from fastproxy.router import Router
    from statesync.connect import connect
    from statesync.keys import Keys
    from statesync.subscriber import StateFollower

    client = connect(url)
    await client.ping()
    tracemalloc.start()
    router = Router(RouterConfig(), asyncio.get_running_loop())
    follower = StateFollower(router, url, keys=Keys(NAMESPACE))
    await follower.resync(client)
    await follower.warmed()
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    await client.aclose()
    return {
        "pods": len(router.snapshot.pods),
        "traced_mb": current / 2**20,
        "traced_peak_mb": peak / 2**20,
        "top": _top_lines(snapshot, top),
    }


def _traced_child(case: str, arg: str, top: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--trace-child", case, arg, "--tracemalloc", str(top)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise MemoryBenchError(f"tracemalloc child ({case}) failed: {out.stderr.strip()[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ---- the run ------------------------------------------------------------------------------------


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rss_mb", "peak_mb", "anon_mb", "file_mb", "ready_s", "settled_s", "cpu_s")
    return {
        **{k: round(statistics.median(s[k] for s in samples if s.get(k) is not None), 1) for k in keys},
        "rounds": [{k: s[k] for k in ("rss_mb", "peak_mb")} for s in samples],
    }


def run(pods: int, cases: list[str], rounds: int, tracemalloc_top: int, log: Any = print) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fastproxy-memory-"))
    results: dict[str, Any] = {}
    traced: dict[str, Any] = {}
    try:
        one, many = tmp / "routes-1.json", tmp / f"routes-{pods}.json"
        write_routes_file(one, 1)
        if "static" in cases:
            write_routes_file(many, pods)
        for case in cases:
            if case == "static-slots":
                with LoopbackPods() as loopback:
                    served = tmp / f"routes-{pods}-served.json"
                    write_routes_file(served, pods, port=loopback.port)
                    samples = [
                        measure_router(
                            ["--routes", str(served)],
                            tmp / f"{case}-{i}.log",
                            need_ready=False,
                            warm=lambda port: request_every_route(port, min(pods, 1000)),
                        )
                        for i in range(rounds)
                    ]
                results[case] = {"pods": pods, **_summary(samples)}
                log(f"{case}: RSS {results[case]['rss_mb']} MB, peak {results[case]['peak_mb']} MB")
                continue
            if case == "valkey":
                continue
            path = one if case == "static-1" else many
            samples = [
                measure_router(["--routes", str(path)], tmp / f"{case}-{i}.log", need_ready=False)
                for i in range(rounds)
            ]
            results[case] = {"pods": 1 if case == "static-1" else pods, **_summary(samples)}
            log(f"{case}: RSS {results[case]['rss_mb']} MB, peak {results[case]['peak_mb']} MB")
            if tracemalloc_top and case == "static":
                traced[case] = _traced_child("static", str(path), tracemalloc_top)
        if "valkey" in cases:
            from statesync.embedded import EmbeddedValkey

            with EmbeddedValkey() as valkey, SeededValkey(valkey.url, pods) as seeded:
                version = seeded.version
                samples = [
                    measure_router(
                        ["--valkey", valkey.url, "--namespace", NAMESPACE],
                        tmp / f"valkey-{i}.log",
                        need_ready=True,
                    )
                    for i in range(rounds)
                ]
                results["valkey"] = {"pods": pods, "version": version, **_summary(samples)}
                log(f"valkey: RSS {results['valkey']['rss_mb']} MB, peak {results['valkey']['peak_mb']} MB")
                if tracemalloc_top:
                    traced["valkey"] = _traced_child("valkey", valkey.url, tracemalloc_top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": sys.version.split()[0],
        "config": {"pods": pods, "rounds": rounds, "revisions": min(pods, 1000)},
        "target_mb": TARGET_MB,
        "cases": results,
        "tracemalloc": traced,
    }


def _commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


LABELS = {
    "static-1": "routes file, 1 pod",
    "static": "routes file, {pods} pods (before any request: no slots yet)",
    "static-slots": "routes file, {pods} pods, after a request to each revision (slots included)",
    "valkey": "Valkey bootstrap, {pods} pods (after warm-up)",
}


def markdown(result: dict[str, Any]) -> str:
    pods = result["config"]["pods"]
    lines = [
        "# Router memory (RSS of a `fastproxy router` process)",
        "",
        f"{result['when']} · commit {result['commit']} · Python {result['python']} · "
        f"{result['config']['rounds']} process(es) per case, medians · MB = MiB",
        "",
        "| case | RSS now | peak (VmHWM) | anon / file | ready after | settled after | CPU | target |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for case, e in result["cases"].items():
        target = f"<= {result['target_mb']:g} " + ("met" if e["rss_mb"] <= result["target_mb"] else "not met")
        lines.append(
            f"| {LABELS[case].format(pods=pods)} | **{e['rss_mb']}** | {e['peak_mb']} | {e['anon_mb']} / {e['file_mb']} "
            f"| {e['ready_s']} s | {e['settled_s']} s | {e['cpu_s']} s "
            f"| {'-' if case == 'static-1' else target} |"
        )
    for case, t in result["tracemalloc"].items():
        lines += [
            "",
            f"## Where it is (tracemalloc, {case}: {t['traced_mb']:.1f} MB traced at the end, "
            f"peak {t['traced_peak_mb']:.1f} MB)",
            "",
            "| MB | blocks | allocated at |",
            "|--:|--:|---|",
        ]
        lines += [f"| {r['mb']:.2f} | {r['blocks']} | `{r['where']}` |" for r in t["top"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pods", type=int, default=50_000, help="pods of the large cases (default 50000)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)} (default all)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="router processes per case (median reported)")
    parser.add_argument(
        "--tracemalloc", type=int, nargs="?", const=15, default=0, metavar="TOP",
        help="also list the TOP (default 15) source lines holding memory after the load",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "memory-latest.json", metavar="PATH")
    parser.add_argument("--markdown", type=Path, default=RESULTS_DIR / "memory-latest.md", metavar="PATH")
    parser.add_argument("--trace-child", nargs=2, metavar=("CASE", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trace_child:
        case, arg = args.trace_child
        if case == "static":
            out = traced_static(arg, args.tracemalloc)
        else:
            import uvloop

            out = uvloop.run(_traced_valkey(arg, args.tracemalloc))
        print(json.dumps(out), flush=True)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(
            f"unknown case(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}"
        )
    if args.pods < 1 or args.rounds < 1:
        parser.error("--pods and --rounds must be >= 1")
    try:
        result = run(args.pods, cases, args.rounds, args.tracemalloc, log=lambda m: print(m, file=sys.stderr))
    except MemoryBenchError as exc:
        print(f"bench.memory: {exc}", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    args.markdown.write_text(text)
    print(text)
    print(f"results: {args.json} {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
