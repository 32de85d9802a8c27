"""Propagation latency: a readiness event submitted -> applied in every router's snapshot, on loopback.

Usage::

    python -m bench.propagation [--pods 50000] [--routers 4] [--events 500] [--interval 0.01]
                                [--json PATH] [--no-probe]

Theory of operation
-------------------
Everything is a real process on this machine: a ``valkey-server`` (``EmbeddedValkey``), the writer
(``python -m fastproxy.cli writer --lease-ttl 3``) and ``--routers`` router followers, each a small
process (``python -m bench.propagation --follower ...``) running a ``Router`` and a
``StateFollower`` exactly as ``fastproxy router --valkey`` does (without listeners or the report
forwarder, which play no part in following state).

1. Seed: ``--pods`` pods (``bench.conftest.make_pods``: 1000 revisions) are submitted as sidecar
   ``PodDiscovered(ready=True)`` events, plus one route per revision; we wait until the writer
   committed them all: its consumer group delivered the last one and has nothing pending (the
   writer acknowledges only after the commit), and the pods hash holds every pod.
2. The followers start, bootstrap (full read) and say ``synced`` on stdout once they hold every pod.
3. ``--events`` readiness flips are submitted one at a time, ``--interval`` apart on a fixed
   schedule (a late one does not push the others back), each with one XADD; the submit time is
   ``time.time()`` taken right before the XADD. Flip k targets pod k * pods / events (distinct pods
   while events <= pods; beyond that the pods are flipped again, alternating ready / not ready).
   Every flip bumps the pod's generation, so (uid, generation) names the resulting record.
4. Each follower records ``time.time()`` right after ``Router.apply_delta`` (or ``install``, after a
   resync) made a watched (uid, generation) -- or a later generation of that uid -- visible in its
   snapshot, prints ``done`` when it has seen all of them, and writes its observations to a file
   on SIGTERM.
5. Per event, the latency is the slowest router's time minus the submit time; the report gives
   p50/p90/p99/max over events (and per router). An event some router never saw (within
   ``--settle`` seconds after the last submit) counts as missing and is excluded from the figures.

Optionally (on by default; ``--no-probe`` turns it off) this process also subscribes to the delta
channel and stamps each delta's arrival, which splits the latency into "submit -> published"
(writer + Valkey) and the rest (pub/sub delivery + decode + apply in the router process).

All processes share one clock (``time.time()`` on one machine). Results go to
``bench/results/propagation-latest.json`` (``--json``), and a short markdown table is printed.
Every child process is stopped on exit, on error and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "propagation-latest.json"
GOAL_P99_MS = 5.0


# ---- the follower process ----------------------------------------------------------------------


def _follower_main(args: argparse.Namespace) -> int:
    import uvloop

    return uvloop.run(_follower(args))


async def _follower(args: argparse.Namespace) -> int:
    from fastproxy.config import RouterConfig
    from fastproxy.router import Router
    from fastproxy.snapshot import RoutingSnapshot
    from statesync.keys import Keys
    from statesync.schema import Delta
    from statesync.subscriber import StateFollower

    watch: list[list[Any]] = json.loads(Path(args.watch).read_text())
    # uid -> expected generations not yet seen (ascending); (uid, generation) -> first time seen
    pending: dict[str, list[int]] = {}
    for uid, generation in watch:
        pending.setdefault(uid, []).append(int(generation))
    for gens in pending.values():
        gens.sort()
    remaining = len(watch)
    seen: dict[tuple[str, int], float] = {}
    done_said = False

    def observe(uid: str, generation: int, at: float) -> None:
        nonlocal remaining, done_said
        gens = pending.get(uid)
        if not gens or gens[0] > generation:
            return
        while gens and gens[0] <= generation:
            seen[(uid, gens.pop(0))] = at
            remaining -= 1
        if remaining == 0 and not done_said:
            done_said = True
            sys.stdout.write("done\n")
            sys.stdout.flush()

    class RecordingRouter(Router):
        def apply_delta(self, delta: Delta) -> None:
            super().apply_delta(delta)
            at = time.time()
            for record in delta.pods:
                if record.uid in pending:
                    observe(record.uid, record.generation, at)

        def apply_deltas(self, deltas: Sequence[Delta]) -> None:
            super().apply_deltas(deltas)  # (one delta: through apply_delta above)
            if len(deltas) > 1:
                at = time.time()
                for delta in deltas:
                    for record in delta.pods:
                        if record.uid in pending:
                            observe(record.uid, record.generation, at)

        def install(self, snapshot: RoutingSnapshot, *args: Any, **kwargs: Any) -> None:
            super().install(snapshot, *args, **kwargs)  # (whatever else Router.install takes)
            at = time.time()
            pods = snapshot.pods
            for uid in list(pending):
                record = pods.get(uid)
                if record is not None:
                    observe(uid, record.generation, at)

    loop = asyncio.get_running_loop()
    router = RecordingRouter(RouterConfig(instance=args.name), loop)
    follower = StateFollower(router, args.valkey, keys=Keys(args.namespace))
    router.stale = True
    task = asyncio.create_task(follower.run())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while len(router.snapshot.pods) < args.expect_pods or router.stale:
        if stop.is_set() or task.done():
            break
        await asyncio.sleep(0.01)  # polling our own state; bounded by the parent's timeout
    else:
        # (the steady state is measured: the slot warm-up that follows a bootstrap is done first)
        await follower.warmed()
        sys.stdout.write(f"synced {len(router.snapshot.pods)} {router.snapshot.version}\n")
        sys.stdout.flush()
    if task.done() and not task.cancelled() and task.exception() is not None:
        # the follower died (e.g. the Router API changed under this bench): say why, in the log
        # the parent shows, rather than hang until its timeout
        import traceback

        traceback.print_exception(task.exception())
        return 1
    await stop.wait()
    follower.stop()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    report = {
        "name": args.name,
        "seen": [[uid, gen, at] for (uid, gen), at in seen.items()],
        "resyncs": follower.resyncs,
        "gap_fills": follower.gap_fills,
        "sessions": follower.sessions,
        "stale": router.stale,
        "version": router.snapshot.version,
        "pods": len(router.snapshot.pods),
    }
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(report))
    tmp.rename(args.out)
    return 0


# ---- the measuring process ---------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values_ms, 50), 3),
        "p90": round(percentile(values_ms, 90), 3),
        "p99": round(percentile(values_ms, 99), 3),
        "max": round(max(values_ms), 3) if values_ms else float("nan"),
        "mean": round(sum(values_ms) / len(values_ms), 3) if values_ms else float("nan"),
    }


class _Child:
    """A child process whose stdout lines we follow."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.synced = asyncio.Event()
        self.done = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def follow(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if line.startswith(b"synced"):
                self.synced.set()
            elif line.startswith(b"done"):
                self.done.set()

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-2000:]
        return ""


async def _spawn(name: str, args: list[str], log_path: Path, stdout_pipe: bool) -> _Child:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_path, "wb")  # noqa: SIM115 (the child holds it; closed when we stop it)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args,
        stdout=asyncio.subprocess.PIPE if stdout_pipe else log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
        cwd=str(ROOT), env=env, start_new_session=True,
    )  # fmt: skip
    log.close()
    child = _Child(name, proc, log_path)
    if stdout_pipe:
        child.reader = asyncio.create_task(child.follow())
    return child


async def _stop(children: list[_Child], timeout: float = 5.0) -> None:
    for child in children:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    for child in children:
        try:
            await asyncio.wait_for(child.proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
        if child.reader is not None:
            child.reader.cancel()
            with contextlib.suppress(BaseException):
                await child.reader


async def _wait_all(events: list[asyncio.Event], timeout: float) -> bool:
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout)
    except TimeoutError:
        return False
    return True


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0.0 where /proc is unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _seed_committed(client: Any, keys: Any, target: tuple[int, int], pods: int) -> bool:
    from statesync.keys import EVENTS_GROUP, stream_id_key

    groups = await client.xinfo_groups(keys.events)
    group = next((g for g in groups if g["name"] in (EVENTS_GROUP, EVENTS_GROUP.encode())), None)
    if group is None or group["pending"] or stream_id_key(group["last-delivered-id"]) < target:
        return False
    return int(await client.hlen(keys.pods)) >= pods


async def measure(
    *, pods: int, routers: int, events: int, interval: float, probe: bool = True, settle: float = 5.0
) -> dict[str, Any]:
    from bench.conftest import make_pods, make_routes
    from statesync.connect import connect
    from statesync.embedded import EmbeddedValkey
    from statesync.keys import DELTA_PREFIX, Keys, stream_id_key
    from statesync.schema import PodDiscovered, ReadinessChanged, RouteChanged, Source, decode_delta, encode

    keys = Keys("fastproxy")
    load_start = round(os.getloadavg()[0], 2)
    server = EmbeddedValkey().start()
    children: list[_Child] = []
    tmpdir = tempfile.TemporaryDirectory(prefix="fastproxy-propagation-")
    tmp = Path(tmpdir.name)
    client = connect(server.url)
    probe_protocol: Any = None
    timings: dict[str, float] = {}
    try:
        # 1. the writer, and the seed state
        writer = await _spawn(
            "writer",
            ["-m", "fastproxy.cli", "writer", "--valkey", server.url, "--lease-ttl", "3",
             "--log-level", "warning", "--id", "bench-writer"],
            tmp / "writer.log", stdout_pipe=False,
        )  # fmt: skip
        children.append(writer)
        deadline = time.monotonic() + 20
        while not await client.exists(keys.lease):
            if writer.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"writer did not take the lease:\n{writer.tail()}")
            await asyncio.sleep(0.02)  # the lease key has no notification

        t0 = time.perf_counter()
        records = make_pods(pods)
        now = time.time()
        seed: list[Any] = [RouteChanged(route=r, at=now) for r in make_routes(min(1000, pods))]
        seed += [
            PodDiscovered(uid=p.uid, source=Source.SIDECAR, at=now, namespace=p.namespace,
                          revision=p.revision, ip=p.ip, port=p.port, concurrency=p.concurrency, ready=True)
            for p in records
        ]  # fmt: skip
        last_id = b"0-0"
        for start in range(0, len(seed), 5000):
            async with client.pipeline(transaction=False) as pipe:
                for event in seed[start : start + 5000]:
                    pipe.xadd(keys.events, {"e": encode(event)})
                last_id = (await pipe.execute())[-1]
        # Committed = the writer's group has delivered the last seed entry and acknowledged every
        # entry (it acks only after the commit), and the pods hash holds every pod.
        target = stream_id_key(last_id)
        deadline = time.monotonic() + 300
        while not await _seed_committed(client, keys, target, pods):
            if writer.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"writer did not commit the seed:\n{writer.tail()}")
            await asyncio.sleep(0.05)  # no notification for "acknowledged"
        timings["seed_s"] = round(time.perf_counter() - t0, 3)
        seeded_version = int(await client.get(keys.version))

        # 2. the plan (which pod, which way, which generation) and the followers
        stride = max(1, pods // events) if events <= pods else 1
        generation = {p.uid: 1 for p in records}  # discovered ready by the sidecar: generation 1, READY
        readiness = {p.uid: True for p in records}
        plan: list[tuple[str, bool, int]] = []
        for k in range(events):
            uid = records[(k * stride) % pods].uid
            readiness[uid] = not readiness[uid]
            generation[uid] += 1
            plan.append((uid, readiness[uid], generation[uid]))
        watch_path = tmp / "watch.json"
        watch_path.write_text(json.dumps([[uid, gen] for uid, _, gen in plan]))

        t0 = time.perf_counter()
        followers: list[_Child] = []
        for i in range(routers):
            name = f"router-{i}"
            child = await _spawn(
                name,
                ["-m", "bench.propagation", "--follower", "--valkey", server.url, "--name", name,
                 "--watch", str(watch_path), "--out", str(tmp / f"{name}.json"), "--expect-pods", str(pods)],
                tmp / f"{name}.log", stdout_pipe=True,
            )  # fmt: skip
            followers.append(child)
            children.append(child)
        if not await _wait_all([f.synced for f in followers], 120):
            late = [f for f in followers if not f.synced.is_set()]
            raise RuntimeError(f"followers not synced: {[f.name for f in late]}\n{late[0].tail()}")
        timings["followers_start_and_bootstrap_s"] = round(time.perf_counter() - t0, 3)

        # the probe: when was each delta published (as seen by one more subscriber). It receives
        # the way a router does (``statesync.pubsub``: a plain protocol, one callback per message)
        # and only stamps the arrival; decoding waits until the end. It shares the 2 CPUs with
        # everything it measures, so it must cost them as little as possible.
        published: dict[tuple[str, int], float] = {}
        arrivals: list[tuple[float, bytes]] = []
        if probe:
            from statesync.pubsub import subscribe

            probe_subscribed = asyncio.Event()

            class ProbeSink:
                def message(self, payload: bytes) -> None:
                    arrivals.append((time.time(), payload))

                def received(self) -> None:
                    pass

                def subscribed(self, count: int) -> None:
                    probe_subscribed.set()

                def lost(self, exc: BaseException | None) -> None:
                    pass

            probe_protocol = await subscribe(client, keys.channel, ProbeSink())
            await asyncio.wait_for(probe_subscribed.wait(), 10)
        await asyncio.sleep(0.3)  # let the followers' first heartbeats and any GC settle

        # 3. the flips, on a fixed schedule
        submitted: list[float] = []
        measured = {"valkey": server.process.pid if server.process else 0, "writer": writer.proc.pid}
        measured.update({f.name: f.proc.pid for f in followers})
        cpu_before = {name: _cpu_seconds(pid) for name, pid in measured.items()}
        flips_started = time.perf_counter()
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        for k, (uid, ready, _) in enumerate(plan):
            delay = start + k * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            blob = encode(ReadinessChanged(uid=uid, source=Source.SIDECAR, at=time.time(), ready=ready,
                                           reason="bench flip"))  # fmt: skip
            at = time.time()
            await client.xadd(keys.events, {"e": blob})
            submitted.append(at)
        all_done = await _wait_all([f.done for f in followers], settle)
        flips_wall = time.perf_counter() - flips_started
        cpu_used = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in measured.items()}
        final_version = int(await client.get(keys.version))

        # 4. collect
        await _stop(followers)
        reports: dict[str, dict[str, Any]] = {}
        for child in followers:
            out = tmp / f"{child.name}.json"
            if not out.exists():
                raise RuntimeError(
                    f"{child.name} wrote no report (exit {child.proc.returncode}):\n{child.tail()}"
                )
            reports[child.name] = json.loads(out.read_text())
    finally:
        if probe_protocol is not None:
            probe_protocol.close()
        await _stop(children)
        with contextlib.suppress(Exception):
            await client.aclose()
        server.close()
        tmpdir.cleanup()

    # 5. figures
    for at, payload in arrivals:
        if payload.startswith(DELTA_PREFIX):
            for record in decode_delta(payload[1:]).pods:
                published.setdefault((record.uid, record.generation), at)
    seen = {name: {(uid, gen): at for uid, gen, at in r["seen"]} for name, r in reports.items()}
    worst: list[float] = []
    to_publish: list[float] = []
    per_router: dict[str, list[float]] = {name: [] for name in reports}
    missing = 0
    for (uid, _, gen), sent in zip(plan, submitted, strict=True):
        times = []
        for name, observed in seen.items():
            at = observed.get((uid, gen))
            if at is not None:
                per_router[name].append((at - sent) * 1e3)
                times.append(at)
        if len(times) < len(seen):
            missing += 1
            continue
        worst.append((max(times) - sent) * 1e3)
        if probe and (pub := published.get((uid, gen))) is not None:
            to_publish.append((pub - sent) * 1e3)
    latency = summary(worst)
    result: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {
            "pods": pods,
            "routers": routers,
            "events": events,
            "interval_s": interval,
            "probe": probe,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        # a shared machine: the 1-minute load average before and after, to judge the figures by
        "loadavg_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "latency_ms": latency,
        "goal_p99_ms": GOAL_P99_MS,
        "goal_met": bool(worst) and latency["p99"] <= GOAL_P99_MS and missing == 0,
        "events_measured": len(worst),
        "missing": missing,
        "all_followers_done": all_done,
        "submit_to_published_ms": summary(to_publish) if to_publish else None,
        "per_router": {
            name: {
                **summary(values),
                "seen": len(values),
                "resyncs": reports[name]["resyncs"],
                "gap_fills": reports[name]["gap_fills"],
                "sessions": reports[name]["sessions"],
                "stale_at_end": reports[name]["stale"],
                "version_at_end": reports[name]["version"],
            }
            for name, values in per_router.items()
        },
        "versions": {"seeded": seeded_version, "final": final_version},
        "timings": timings,
        # CPU per submitted event during the flip phase (includes idle work: heartbeats, polls);
        # a contention-independent view of what each hop costs
        "cpu_ms_per_event": {name: round(used * 1e3 / events, 3) for name, used in cpu_used.items()},
        "flip_phase_s": round(flips_wall, 3),
    }
    return result


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"propagation: {c['pods']} pods, {c['routers']} routers, {c['events']} events every "
        f"{c['interval_s'] * 1e3:g} ms ({result['events_measured']} measured, {result['missing']} missing; "
        f"load average {result['loadavg_1m']['start']} -> {result['loadavg_1m']['end']} on {c['cpus']} CPUs)",
        "",
        "| latency (ms) | p50 | p90 | p99 | max | mean |",
        "|---|---|---|---|---|---|",
    ]

    def row(label: str, s: dict[str, float]) -> str:
        cells = " | ".join(f"{s[k]:.3f}" for k in ("p50", "p90", "p99", "max", "mean"))
        return f"| {label} | {cells} |"

    lines.append(row("event -> every router (max over routers)", result["latency_ms"]))
    if result.get("submit_to_published_ms"):
        lines.append(row("event -> published (probe subscriber)", result["submit_to_published_ms"]))
    for name, stats in result["per_router"].items():
        lines.append(row(f"event -> {name}", stats))
    cpu = ", ".join(f"{name} {ms:.3f}" for name, ms in result["cpu_ms_per_event"].items())
    lines += ["", f"CPU ms per event: {cpu}"]
    verdict = "met" if result["goal_met"] else "NOT met"
    lines.append("")
    lines.append(f"goal p99 <= {result['goal_p99_ms']} ms: {verdict}")
    return "\n".join(lines)


def run(
    *, pods: int, routers: int, events: int, interval: float = 0.01, probe: bool = True,
    json_path: str | Path | None = DEFAULT_JSON, settle: float = 5.0,
) -> dict[str, Any]:  # fmt: skip
    import uvloop

    result = uvloop.run(
        measure(pods=pods, routers=routers, events=events, interval=interval, probe=probe, settle=settle)
    )
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.rename(path)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=50_000)
    parser.add_argument("--routers", type=int, default=4)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between submitted events")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait for stragglers at the end")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="results file")
    parser.add_argument("--no-probe", action="store_true", help="no extra subscriber in this process")
    # the follower role (internal)
    parser.add_argument("--follower", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--valkey", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", default="fastproxy", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="router", help=argparse.SUPPRESS)
    parser.add_argument("--watch", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--expect-pods", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.follower:
        return _follower_main(args)
    if args.pods < 1 or args.routers < 1 or args.events < 1:
        parser.error("--pods, --routers and --events must be >= 1")

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through measure()'s cleanup

    signal.signal(signal.SIGTERM, on_term)
    result = run(pods=args.pods, routers=args.routers, events=args.events, interval=args.interval,
                 probe=not args.no_probe, json_path=args.json, settle=args.settle)  # fmt: skip
    print(markdown(result))
    print(f"\nresults: {args.json}")
    return 0 if result["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
