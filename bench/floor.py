"""The floor under any Python proxy on uvloop: a byte relay, measured beside the router and nginx.

Usage::

    python -m bench.floor [--duration 3] [--rounds 3] [--concurrency 16] [--rate 2000]
                          [--json PATH]
    python -m bench.floor --serve-relay LISTEN_PORT UPSTREAM_PORT    (the relay itself)

Theory of operation
-------------------
The router's targets (added p90 <= 110 us at 2k req/s, <= 25 us CPU per request at saturation)
are set against nginx. Before optimising the router's Python further, this measures what *no*
Python proxy on uvloop can beat: ``ByteRelay``, two ``asyncio.Protocol``s that copy bytes between a
client connection and one upstream connection opened for it, with no parsing, no routing, no
pool, no accounting. Per request it makes exactly the router's four socket operations (read the
request, write it upstream, read the response, write it back) and runs one Python callback per
read, which is the least a Python proxy can do.

One run starts the app (``fastproxy.devtools.upstream``), the router (static routes, one worker),
the relay and, when installed, nginx (bench/e2e.py's ``Harness``), then interleaves, per round:
a closed-loop saturation run against each target (CPU per request from /proc of that process) and
an open-loop run at ``--rate`` (added latency = target percentile minus direct of the same
round). It reports medians over rounds. The relay's figures are the floor: the router's CPU minus
the relay's is what routing, HTTP parsing and rebuilding, slots and pools cost on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from typing import Any

import uvloop


class _RelaySide(asyncio.Protocol):
    __slots__ = ("buffer", "peer", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _RelaySide | None = None
        self.buffer: list[bytes] = []  # what arrived before the other side connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.buffer.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class ByteRelay(_RelaySide):
    """The client side: opens its own upstream connection, then copies bytes both ways."""

    def __init__(self, loop: asyncio.AbstractEventLoop, upstream_port: int) -> None:
        super().__init__()
        self.loop = loop
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        _, upstream = await self.loop.create_connection(_RelaySide, "127.0.0.1", self.upstream_port)
        upstream.peer = self
        self.peer = upstream
        for data in self.buffer:
            upstream.transport.write(data)  # type: ignore[union-attr]
        self.buffer.clear()


async def serve_relay(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ByteRelay(loop, upstream_port), "127.0.0.1", listen_port)
    print(f"listening 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def run(opts: argparse.Namespace) -> dict[str, Any]:
    from bench.e2e import Harness, _run_loop, cpu_times, find_or_install
    from bench.loadgen import run_closed_loop, run_open_loop

    results: dict[str, Any] = {"saturation": {}, "latency": {}}
    with Harness(log=lambda s: None) as harness:
        _app, app_port = harness.start_app()
        router, router_port = harness.start_router(app_port, 1024)
        relay = harness._spawn(
            "relay", [sys.executable, "-m", "bench.floor", "--serve-relay", "0", str(app_port)]
        )
        relay_port = int(harness._wait_line(relay, "listening ").split()[1].rsplit(":", 1)[1])
        targets: dict[str, tuple[int, Any]] = {
            "direct": (app_port, None),
            "relay": (relay_port, relay),
            "router": (router_port, router),
        }
        nginx = find_or_install(["nginx"], install=False, log=lambda s: None).get("nginx")
        if nginx:
            nginx_child, nginx_port = harness.start_nginx(nginx, app_port)
            targets["nginx"] = (nginx_port, nginx_child)
        sat: dict[str, list[float]] = {name: [] for name in targets}
        rps: dict[str, list[float]] = {name: [] for name in targets}
        lat: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p90": [], "p99": []} for name in targets}
        for _ in range(opts.rounds):
            for name, (port, child) in targets.items():
                _run_loop(run_closed_loop("127.0.0.1", port, concurrency=opts.concurrency, duration=0.5))
                before = sum(cpu_times(child.pid)) if child else 0.0
                result = _run_loop(
                    run_closed_loop("127.0.0.1", port, concurrency=opts.concurrency, duration=opts.duration)
                )
                assert result.error_count == 0, f"{name}: {result.error_count} errors"
                if child:
                    sat[name].append((sum(cpu_times(child.pid)) - before) * 1e6 / result.completed)
                rps[name].append(result.completed / opts.duration)
            round_lat = {}
            for name, (port, _child) in targets.items():
                result = _run_loop(
                    run_open_loop("127.0.0.1", port, rate=opts.rate, duration=opts.duration, warmup=0.5)
                )
                assert result.error_count == 0, f"{name}: {result.error_count} errors"
                round_lat[name] = {p: result.percentile(int(p[1:])) * 1e6 for p in ("p50", "p90", "p99")}
            for name in targets:
                for p in ("p50", "p90", "p99"):
                    lat[name][p].append(round_lat[name][p] - round_lat["direct"][p])
        for name in targets:
            results["saturation"][name] = {
                "req_per_s": statistics.median(rps[name]),
                "cpu_us_per_req": statistics.median(sat[name]) if sat[name] else None,
            }
            if name != "direct":
                results["latency"][name] = {p: statistics.median(v) for p, v in lat[name].items()}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-relay", nargs=2, type=int, metavar=("LISTEN_PORT", "UPSTREAM_PORT"))
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="saturation connections (default 16)")
    parser.add_argument("--rate", type=float, default=2000, help="open-loop req/s (default 2000)")
    parser.add_argument("--json", help="write the results here too")
    opts = parser.parse_args(argv)
    if opts.serve_relay:
        uvloop.run(serve_relay(*opts.serve_relay))
        return 0
    results = run(opts)
    print(f"saturation, {opts.concurrency} connections (median of {opts.rounds} rounds):")
    for name, row in results["saturation"].items():
        cpu = row["cpu_us_per_req"]
        print(f"  {name:7s} {row['req_per_s']:8.0f} req/s   " + (f"{cpu:6.1f} us CPU/req" if cpu else ""))
    print(f"added latency at {opts.rate:g} req/s (target minus direct, same round; median):")
    for name, row in results["latency"].items():
        print(f"  {name:7s} p50 {row['p50']:+6.0f}  p90 {row['p90']:+6.0f}  p99 {row['p99']:+7.0f} us")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
