"""The pod simulator's own cost, to show it is not the bottleneck of what it is used to measure.

Two measurements:

1. ``bench_*`` (pytest-benchmark, in one process): one request round trip to a simulated pod
   (``SimulatedApp``, fixed 0 ms) beside the same to the plain stand-in app (``AppServer``), on
   one keep-alive connection; the difference is what the simulator's pod machinery adds.
2. ``python -m bench.bench_simulator`` (processes): Valkey, a writer, the simulator
   (``python -m fastproxy.devtools.simulator``, thousands of pods) and a router, each its own
   process, under an open-loop load (``bench.loadgen``) through the router; the CPU seconds each
   process used (from /proc) per request, measured side by side in the same window. The simulator
   must cost clearly less per request than the router it feeds, or a benchmark through it would
   measure the simulator. ``test_overhead_short_run`` runs it small, checks every request was
   answered and the figures came out; timing is reported, never asserted (the machine is shared).

    python -m bench.bench_simulator [--pods 2000] [--rate 1000] [--duration 10] [--model fixed|sse]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from bench.e2e import cpu_seconds, cpu_times, free_port
from bench.loadgen import run_open_loop
from fastproxy.devtools.simulator import PodSimulator, decode_scenario
from fastproxy.devtools.upstream import AppServer
from statesync.embedded import EmbeddedValkey

_REQUEST = b"GET /v1/completions HTTP/1.1\r\nHost: bench\r\n\r\n"
# One port per process: another engineer's run on this machine uses another.
PORT = random.randrange(30_000, 40_000)

# ---- 1. one round trip in process -------------------------------------------------------------


def _round_trips(address: tuple[str, int], n: int) -> Any:
    """A callable doing ``n`` request/response round trips on one connection, in a fresh loop."""
    loop = uvloop.new_event_loop()
    reader, writer = loop.run_until_complete(asyncio.open_connection(*address))

    async def go() -> None:
        for _ in range(n):
            writer.write(_REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)

    return loop, writer, lambda: loop.run_until_complete(go())


def _serve_in_thread(make_server: Any) -> Any:
    """Run a server's loop in a thread so the benchmark's client loop is separate (as over a network)."""
    import threading

    ready = threading.Event()
    state: dict[str, Any] = {}

    def main() -> None:
        loop = uvloop.new_event_loop()
        state["loop"] = loop
        asyncio.set_event_loop(loop)
        state["server"] = loop.run_until_complete(make_server())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(10)
    return state, thread


@pytest.mark.parametrize("kind", ["simulated_pod", "plain_app"])
def bench_round_trip(benchmark: Any, kind: str) -> None:
    async def make() -> Any:
        if kind == "plain_app":
            app = AppServer(concurrency_limit=1, sidecar_busy=True, record=False)
            await app.start("127.24.1.1", PORT)
            return app
        sim = PodSimulator(decode_scenario({"first_address": "127.24.2.1", "port": PORT, "revisions": [
            {"name": "b", "pods": 1, "latency": {"model": "fixed", "ms": 0}}]}), None)  # fmt: skip
        await sim.start(churn=False, route=False)
        await sim.wait_serving(5)
        return sim

    state, thread = _serve_in_thread(make)
    server = state["server"]
    address = ("127.24.1.1", PORT) if kind == "plain_app" else (server.pods[0].ip, server.pods[0].port)
    loop, writer, run = _round_trips(address, 100)
    try:
        benchmark(run)  # 100 round trips per round
    finally:
        writer.close()
        loop.close()
        stop = server.close() if kind == "plain_app" else server.stop()
        asyncio.run_coroutine_threadsafe(stop, state["loop"]).result(10)
        state["loop"].call_soon_threadsafe(state["loop"].stop)
        thread.join(10)
    if kind == "simulated_pod":
        assert server.pods[0].served >= 100 and server.stats()["violations"] == 0


# ---- 2. CPU per request, simulator process vs router process -------------------------------------


def _scenario(pods: int, model: str) -> dict[str, Any]:
    latency = (
        {"model": "fixed", "ms": 5} if model == "fixed" else {"model": "sse", "tokens": 16, "ms_per_token": 2}
    )
    return {"service": "bench", "hosts": [], "first_address": "127.25.0.1", "port": PORT,
            "revisions": [{"name": "bench-v1", "pods": pods, "concurrency": 1, "latency": latency}]}  # fmt: skip


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            raise RuntimeError(f"child exited ({proc.returncode}) before printing {prefix!r}")
    raise TimeoutError(f"no {prefix!r} within {timeout}s")


async def _until_served(port: int, pods: int, timeout: float) -> None:
    """Until the router answers 200 (it followed the writer to the simulator's pods)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await run_open_loop("127.0.0.1", port, rate=50, duration=0.2, warmup=0, max_connections=4)
        if result.status.get(200) == result.sent > 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"router not serving the {pods} pods within {timeout}s: {result.status}")


def measure_overhead(pods: int, rate: float, duration: float, model: str = "fixed") -> dict[str, Any]:
    """CPU µs per request of the simulator and of the router at the same offered load."""
    python = sys.executable
    valkey = EmbeddedValkey().start()
    children: list[subprocess.Popen[str]] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "text": True}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scenario = Path(tmp) / "bench.json"  # JSON is YAML
            scenario.write_text(json.dumps(_scenario(pods, model)))
            children.append(subprocess.Popen([python, "-m", "fastproxy.cli", "writer", "--valkey", valkey.url,
                                              "--log-level", "warning"], **quiet))  # fmt: skip
            sim = subprocess.Popen([python, "-m", "fastproxy.devtools.simulator", "--scenario", str(scenario),
                                    "--valkey", valkey.url, "--no-churn"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
            children.append(sim)
            _wait_for_line(sim, "serving ", 120)
            port = free_port()
            router = subprocess.Popen([python, "-m", "fastproxy.cli", "router", "--valkey", valkey.url,
                                       "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0",
                                       "--sidecar-protocol", "--log-level", "warning"], **quiet)  # fmt: skip
            children.append(router)

            async def drive() -> Any:
                await _until_served(port, pods, 60)
                await run_open_loop(
                    "127.0.0.1", port, rate=rate, duration=min(1.0, duration), warmup=0, max_connections=256
                )
                before = {"simulator": cpu_seconds(sim.pid), "router": cpu_seconds(router.pid)}
                user_before = {"simulator": cpu_times(sim.pid)[0], "router": cpu_times(router.pid)[0]}
                result = await run_open_loop("127.0.0.1", port, rate=rate, duration=duration, warmup=0,
                                             max_connections=256)  # fmt: skip
                after = {"simulator": cpu_seconds(sim.pid), "router": cpu_seconds(router.pid)}
                user = {"simulator": cpu_times(sim.pid)[0] - user_before["simulator"],
                        "router": cpu_times(router.pid)[0] - user_before["router"]}  # fmt: skip
                return result, before, after, user

            result, before, after, user = uvloop.run(drive())
            sim.send_signal(15)
            stats = json.loads(sim.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(10)
            if child.poll() is None:
                child.kill()
        valkey.close()
    # Per answered request: an overloaded load generator times out requests that never reached a pod.
    per_request = {
        name: (after[name] - before[name]) / result.completed * 1e6 if result.completed else float("nan")
        for name in before
    }
    return {
        "pods": pods,
        "model": model,
        "rate": rate,
        "duration": duration,
        "sent": result.sent,
        "completed": result.completed,
        "status": {str(k): v for k, v in result.status.items()},
        "errors": result.errors,
        "latency_ms_p50_p99": [
            round(result.percentile(50) * 1000, 2),
            round(result.percentile(99) * 1000, 2),
        ],
        "cpu_us_per_request": {k: round(v, 1) for k, v in per_request.items()},
        "simulator_to_router_ratio": round(per_request["simulator"] / per_request["router"], 3),
        # User-space only: on loopback the sender's system time includes delivering to the receiver.
        "user_cpu_us_per_request": {
            k: round(v / result.completed * 1e6, 1) if result.completed else float("nan")
            for k, v in user.items()
        },
        "cpu_utilisation": {k: round((after[k] - before[k]) / duration, 3) for k in before},
        "simulator_violations": stats["violations"],
        "simulator_served": stats["served"],
    }


@pytest.mark.timeout(120)
def test_overhead_short_run() -> None:
    figures = measure_overhead(pods=200, rate=300, duration=0.5)
    print(json.dumps(figures))
    assert figures["errors"] == {} and figures["status"] == {"200": figures["sent"]}
    assert figures["sent"] == figures["completed"] == 150
    assert figures["simulator_violations"] == 0 and figures["simulator_served"] >= figures["sent"]
    assert figures["cpu_us_per_request"]["router"] > 0 and figures["cpu_us_per_request"]["simulator"] > 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_simulator", description=__doc__)
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--model", choices=["fixed", "sse"], default="fixed")
    parser.add_argument("--repeats", type=int, default=1, help="runs; the median ratio is reported")
    args = parser.parse_args(argv)
    runs = [measure_overhead(args.pods, args.rate, args.duration, args.model) for _ in range(args.repeats)]
    for run in runs:
        print(json.dumps(run), flush=True)
    ratios = sorted(r["simulator_to_router_ratio"] for r in runs)
    print(f"median simulator/router CPU per request: {ratios[len(ratios) // 2]} over {len(runs)} run(s) "
          f"(pid {os.getpid()})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
