"""Router bootstrap: a freshly started router process reads the whole state (50k pods) from Valkey.

Usage::

    python -m bench.bootstrap [--pods 50000] [--rounds 7] [--json PATH]

Theory of operation
-------------------
The issue's figure is a router *starting*: a new process with a fresh heap, one full read. The
pytest-benchmark ``bench_follower_resync_50k`` repeats resyncs in one process, whose heap has held
and freed several 50k-pod states by then (allocations scattered over old arenas make the decode and
grouping passes slower, by 20-60% here); both are reported, neither stands in for the other.

1. A real ``valkey-server`` (``EmbeddedValkey``) gets ``--pods`` pods over 1000 revisions and a
   route per revision, committed by a real leader ``Writer`` in one batch (so ``{ns}:pod-chunks``
   is at the state's version, as in production).
2. ``--rounds`` times, one after the other, a child process (``python -m bench.bootstrap --child
   URL``) imports the router, creates a ``Router`` and a ``StateFollower`` and times one
   ``resync``: wall and CPU from the MULTI/EXEC to the snapshot installed (the router routes from
   then on; a starting router keeps the chunks packed and reads a revision's when it is first
   used), then the wall time of the first pick of a revision nobody used yet (what reading its
   chunks costs that request), and then, apart, the CPU of the background warm-up that decodes
   the rest and gives every pod its slot. It checks the state it got (pod count, version) and
   prints one JSON line.
3. The report gives the median and min/max over rounds; ``--json`` writes it
   (``bench/results/bootstrap-latest.json`` by default).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "bootstrap-latest.json"
NAMESPACE = "bench-bootstrap"


async def _seed(url: str, pods: int) -> int:
    from bench.conftest import make_pods, make_routes
    from statesync.connect import connect
    from statesync.keys import Keys
    from statesync.writer import Writer

    keys = Keys(NAMESPACE)
    client = connect(url)
    writer = Writer(client, keys=keys, writer_id="bench-bootstrap", lease_ttl=600)
    if not await writer.try_acquire():
        raise RuntimeError("the seeding writer did not get the lease")
    await writer._write(tuple(make_pods(pods)), tuple(make_routes()))
    version = int(await client.get(keys.version))
    if int(await client.get(keys.chunks_version)) != version:
        raise RuntimeError("pod-chunks are not at the state's version")
    await client.aclose()
    return version


async def _child(url: str, pods: int) -> dict[str, Any]:
    import uvloop  # noqa: F401  (the router's loop; imported before timing, as a router would)

    from fastproxy.config import RouterConfig
    from fastproxy.router import Router
    from statesync.connect import connect
    from statesync.keys import Keys
    from statesync.subscriber import StateFollower

    router = Router(RouterConfig(), asyncio.get_running_loop())
    follower = StateFollower(router, url, keys=Keys(NAMESPACE))
    client = connect(url)
    await client.ping()  # (the connection exists before timing: a router has it from its subscribe)
    wall, cpu = time.perf_counter(), time.process_time()
    await follower.resync(client)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if len(router.snapshot.pods) != pods or router.stale:
        raise RuntimeError(f"bootstrap read {len(router.snapshot.pods)} pods (stale={router.stale})")
    # The first request to a revision nobody used yet reads its chunks (a starting router keeps
    # them packed): what that costs it, once.
    revision = next(iter(router.snapshot.routes.values())).revisions[0].revision
    first = time.perf_counter()
    lease = router.slots.pick(revision)
    first = time.perf_counter() - first
    if lease is None:
        raise RuntimeError(f"no pod of {revision} to pick after the bootstrap")
    lease[0]()
    # The warm-up runs in slices between other work: a task that yields as often as it can sees
    # each slice as the gap between two of its turns (what a request would wait at most).
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    warm = time.process_time()
    await follower.warmed()
    warm = time.process_time() - warm
    ticking.cancel()
    await client.aclose()
    return {"wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3, "warm_up_cpu_ms": warm * 1e3,
            "first_pick_ms": first * 1e3, "warm_up_longest_slice_ms": max(gaps, default=0.0) * 1e3,
            "version": router.snapshot.version}  # fmt: skip


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1)}  # fmt: skip


def run(pods: int = 50_000, rounds: int = 7, json_path: Path | None = DEFAULT_JSON) -> dict[str, Any]:
    from statesync.embedded import EmbeddedValkey

    loads = [os.getloadavg()[0]]
    with EmbeddedValkey() as valkey:
        version = asyncio.run(_seed(valkey.url, pods))
        samples = []
        for _ in range(rounds):
            out = subprocess.run(
                [sys.executable, "-m", "bench.bootstrap", "--child", valkey.url, "--pods", str(pods)],
                cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"bootstrap child failed: {out.stderr.strip()[-2000:]}")
            sample = json.loads(out.stdout.strip().splitlines()[-1])
            if sample["version"] != version:
                raise RuntimeError(f"child read version {sample['version']}, expected {version}")
            samples.append(sample)
    loads.append(os.getloadavg()[0])
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {"pods": pods, "rounds": rounds, "revisions": 1000, "cpus": os.cpu_count()},
        "loadavg_1m": {"start": round(loads[0], 2), "end": round(loads[1], 2)},
        "goal_ms": 100,
        "wall_ms": _summary([s["wall_ms"] for s in samples]),
        "cpu_ms": _summary([s["cpu_ms"] for s in samples]),
        "warm_up_cpu_ms": _summary([s["warm_up_cpu_ms"] for s in samples]),
        "first_pick_ms": _summary([s["first_pick_ms"] for s in samples]),
        "warm_up_longest_slice_ms": _summary([s["warm_up_longest_slice_ms"] for s in samples]),
        "rounds_wall_ms": [round(s["wall_ms"], 1) for s in samples],
    }
    result["goal_met"] = result["wall_ms"]["median"] <= result["goal_ms"]
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    wall, cpu, warm = result["wall_ms"], result["cpu_ms"], result["warm_up_cpu_ms"]
    first = result.get("first_pick_ms", {"median": "-"})
    return (
        f"| pods | rounds | bootstrap wall median (min-max) | CPU median | first pick of an unused revision |"
        f" slot warm-up CPU after | goal |\n"
        f"|--:|--:|--:|--:|--:|--:|--:|\n"
        f"| {result['config']['pods']} | {result['config']['rounds']} | {wall['median']} ({wall['min']}-{wall['max']}) ms"
        f" | {cpu['median']} ms | {first['median']} ms | {warm['median']} ms | <= {result['goal_ms']} ms |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=50_000, help="pods in the state (default 50000)")
    parser.add_argument("--rounds", type=int, default=7, help="fresh router processes, one after another")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"result file (default {DEFAULT_JSON})"
    )
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import uvloop

        print(json.dumps(uvloop.run(_child(args.child, args.pods))), flush=True)
        return 0
    result = run(args.pods, args.rounds, args.json)
    print(markdown(result))
    print(f"load average (1 min) {result['loadavg_1m']['start']} -> {result['loadavg_1m']['end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
