"""WebSocket benchmark: the router's added latency per message, against direct and nginx, in one run.

Usage::

    python -m bench.websocket [--rounds 5] [--sessions 8] [--messages 500] [--size 64]
                              [--no-nginx] [--no-install] [--max-foreign-cpu 0.3] [--quiet-wait 10]
                              [--json PATH] [--markdown PATH]

Theory of operation
-------------------
Separate processes, started with ``bench/e2e.py``'s ``Harness``: the stand-in app
(``fastproxy.devtools.upstream``, whose ``/ws/echo`` is a WebSocket echo session), the router
(``fastproxy router``, one worker, a static routes file with the app as its only pod, concurrency
1024 so nothing queues) and nginx configured for WebSocket proxying (``proxy_http_version 1.1``,
``Upgrade`` / ``Connection`` passed on, no buffering; found or installed by ``find_or_install``,
as ``bench.e2e`` does). The three targets serve the same app process.

A run against one target: ``--sessions`` sessions open at once (the handshake is not timed), each
then sends ``--messages`` messages of ``--size`` bytes one after the other, each timed from the send
to the arrival of its complete echo (``time.perf_counter``; the client is ``wsapp.WsClient``, a
small masked-frame client, cheaper per message than a full library on the shared vCPUs); the
payload is checked. Rounds interleave the targets -- direct, router, nginx, direct, ... -- so a
noisy machine's drift hits them alike. Per round, a target's added latency at a percentile is its
percentile minus direct's of the same round; the report gives medians over rounds, and router
minus nginx per round. The CPU of each proxy process over its run (``/proc``) divided by the
messages gives its CPU per relayed message (both directions). Before each run the harness waits
(``--quiet-wait``) for other sessions' CPU to drop below ``--max-foreign-cpu``; the foreign load
measured during each run is reported.

Results go to ``bench/results/websocket-latest.json`` and ``.md`` (or ``--json`` / ``--markdown``);
the markdown is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench.e2e import (
    NGINX_MAIN,
    REPO_ROOT,
    Child,
    Harness,
    HarnessError,
    cpu_seconds,
    find_or_install,
    free_port,
    program_version,
)
from fastproxy.devtools.wsapp import OP_BINARY, WsClient

RESULTS = REPO_ROOT / "bench" / "results"

NGINX_WS_CONF = (
    NGINX_MAIN.format(
        name="nginx-ws", generator="bench/websocket.py", what="one process, WebSocket proxying, no buffering"
    )
    + """\
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://127.0.0.1:{app_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
            tcp_nodelay on;
        }}
    }}
}}
"""
)


@dataclass
class Options:
    rounds: int = 5
    sessions: int = 8
    messages: int = 500
    size: int = 64
    nginx: bool = True
    install: bool = True
    max_foreign_cpu: float = 0.3
    quiet_wait: float = 10.0


def start_nginx_ws(harness: Harness, binary: str, app_port: int) -> tuple[Child, int]:
    port = free_port()
    conf = harness.tmp / "nginx-ws.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_WS_CONF.format(tmp=harness.tmp, port=port, app_port=app_port, user=user))
    child = harness._spawn(
        "nginx", [binary, "-p", str(harness.tmp), "-c", str(conf), "-e", str(harness.tmp / "nginx.err")]
    )
    harness._wait_http(child, port)
    return child, port


async def _ping_pong(client: WsClient, opts: Options, samples: list[float]) -> int:
    payload = os.urandom(opts.size)
    errors = 0
    perf = time.perf_counter
    for _ in range(opts.messages):
        sent = perf()
        client.send(payload, OP_BINARY)
        opcode, echoed = await client.recv()
        samples.append(perf() - sent)
        if opcode != OP_BINARY or echoed != payload:
            errors += 1
    return errors


async def _run_target(port: int, opts: Options) -> tuple[list[float], int]:
    """Every session's handshake first (untimed), then all of them ping-pong at once."""
    clients = await asyncio.gather(
        *(WsClient.connect("127.0.0.1", port, "/ws/echo", authority="ws.bench") for _ in range(opts.sessions))
    )
    samples: list[float] = []
    try:
        errors = sum(await asyncio.gather(*(_ping_pong(c, opts, samples) for c in clients)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return samples, errors


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[rank]


def run_benchmark(opts: Options, log: Any = print) -> dict[str, Any]:
    results: dict[str, Any] = {"options": asdict(opts), "runs": [], "versions": {}}
    with Harness(log) as harness:
        app, app_port = harness.start_app()
        router, router_port = harness.start_router(app_port, pod_concurrency=1024)
        targets: list[tuple[str, int, Child | None]] = [
            ("direct", app_port, None),
            ("router", router_port, router),
        ]
        if opts.nginx:
            binary = find_or_install(["nginx"], opts.install, log).get("nginx")
            if binary:
                nginx, nginx_port = start_nginx_ws(harness, binary, app_port)
                targets.append(("nginx", nginx_port, nginx))
                results["versions"]["nginx"] = program_version(binary, "-v")
        for round_index in range(opts.rounds):
            for name, port, proc in targets:
                foreign_before = harness.wait_quiet(opts.max_foreign_cpu, opts.quiet_wait)
                cpu0 = cpu_seconds(proc.pid) if proc else 0.0
                app0 = cpu_seconds(app.pid)
                t0 = time.perf_counter()
                samples, errors = uvloop.run(_run_target(port, opts))
                wall = time.perf_counter() - t0
                cpu = (cpu_seconds(proc.pid) - cpu0) if proc else 0.0
                samples.sort()
                run = {
                    "round": round_index,
                    "target": name,
                    "messages": len(samples),
                    "errors": errors,
                    "p50_us": percentile(samples, 50) * 1e6,
                    "p90_us": percentile(samples, 90) * 1e6,
                    "p99_us": percentile(samples, 99) * 1e6,
                    "mean_us": statistics.fmean(samples) * 1e6 if samples else float("nan"),
                    "proxy_cpu_us_per_message": cpu / len(samples) * 1e6 if proc and samples else None,
                    "app_cpu_us_per_message": (cpu_seconds(app.pid) - app0) / max(1, len(samples)) * 1e6,
                    "wall_s": wall,
                    "foreign_cpu_before": foreign_before,
                }
                results["runs"].append(run)
                log(
                    f"round {round_index} {name:7s} p50 {run['p50_us']:7.1f} us  p99 {run['p99_us']:7.1f} us"
                    f"  ({len(samples)} messages, {errors} errors)"
                )
    results["summary"] = summarise(results["runs"], [t[0] for t in targets])
    results["ok"] = all(
        r["errors"] == 0 and r["messages"] == opts.sessions * opts.messages for r in results["runs"]
    )
    return results


def summarise(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["target"]] = run
    summary: dict[str, Any] = {}
    for name in names:
        rows = [r[name] for r in by_round.values() if name in r]
        entry: dict[str, Any] = {
            q: statistics.median(row[f"{q}_us"] for row in rows) for q in ("p50", "p90", "p99")
        }
        if name != "direct":
            for q in ("p50", "p90", "p99"):
                entry[f"added_{q}_us"] = statistics.median(
                    r[name][f"{q}_us"] - r["direct"][f"{q}_us"] for r in by_round.values() if name in r
                )
            cpu = [
                row["proxy_cpu_us_per_message"] for row in rows if row["proxy_cpu_us_per_message"] is not None
            ]
            entry["cpu_us_per_message"] = statistics.median(cpu) if cpu else None
        summary[name] = entry
    if "nginx" in names:
        summary["router_minus_nginx"] = {
            q: statistics.median(
                r["router"][f"{q}_us"] - r["nginx"][f"{q}_us"] for r in by_round.values() if "nginx" in r
            )
            for q in ("p50", "p90", "p99")
        }
    return summary


def render_markdown(results: dict[str, Any]) -> str:
    opts = results["options"]
    summary = results["summary"]
    lines = [
        "# WebSocket: added latency per message (bench.websocket)",
        "",
        f"{opts['sessions']} concurrent sessions x {opts['messages']} ping-pong messages of {opts['size']} B "
        f"per run, {opts['rounds']} interleaved rounds; medians over rounds. Added = target minus direct "
        "of the same round. CPU: the proxy process's, per message relayed (both directions).",
        "",
        "| target | p50 us | p90 us | p99 us | added p50 us | added p90 us | added p99 us | proxy CPU us/msg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("direct", "router", "nginx"):
        entry = summary.get(name)
        if entry is None:
            continue
        added = [entry.get(f"added_{q}_us") for q in ("p50", "p90", "p99")]
        cpu = entry.get("cpu_us_per_message")
        lines.append(
            f"| {name} | {entry['p50']:.1f} | {entry['p90']:.1f} | {entry['p99']:.1f} | "
            + " | ".join("-" if a is None else f"{a:+.1f}" for a in added)
            + f" | {'-' if cpu is None else f'{cpu:.1f}'} |"
        )
    diff = summary.get("router_minus_nginx")
    if diff:
        lines += ["", f"router minus nginx (per round, median): p50 {diff['p50']:+.1f} us, "
                      f"p90 {diff['p90']:+.1f} us, p99 {diff['p99']:+.1f} us"]  # fmt: skip
    foreign = [r["foreign_cpu_before"] for r in results["runs"]]
    lines += [
        "",
        f"errors: {sum(r['errors'] for r in results['runs'])}; ok: {results['ok']}; "
        f"foreign CPU before runs: median {statistics.median(foreign):.2f} vCPU (max {max(foreign):.2f}); "
        f"{results['versions'].get('nginx', 'nginx: not run')}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.websocket", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=Options.rounds)
    parser.add_argument("--sessions", type=int, default=Options.sessions, help="concurrent sessions per run")
    parser.add_argument("--messages", type=int, default=Options.messages, help="messages per session")
    parser.add_argument("--size", type=int, default=Options.size, help="bytes per message")
    parser.add_argument("--no-nginx", action="store_true", help="direct and router only")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install nginx")
    parser.add_argument("--max-foreign-cpu", type=float, default=Options.max_foreign_cpu)
    parser.add_argument("--quiet-wait", type=float, default=Options.quiet_wait)
    parser.add_argument("--json", type=Path, default=RESULTS / "websocket-latest.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "websocket-latest.md")
    args = parser.parse_args(argv)
    opts = Options(
        rounds=args.rounds, sessions=args.sessions, messages=args.messages, size=args.size,
        nginx=not args.no_nginx, install=not args.no_install, max_foreign_cpu=args.max_foreign_cpu,
        quiet_wait=args.quiet_wait,
    )  # fmt: skip
    try:
        results = run_benchmark(opts)
    except HarnessError as exc:
        print(f"bench.websocket: {exc}", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    markdown = render_markdown(results)
    args.markdown.write_text(markdown)
    print(markdown)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
