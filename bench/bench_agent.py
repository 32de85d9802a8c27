"""The eBPF node agent's cost: what every connect() on the node pays, and the agent's CPU in a storm.

Goals: a connect() to an address that is not watched (a watch-list miss: what almost every connect
on a node is) pays <= 1 us more with the probe attached; a connect storm to one watched pod costs
the agent ~no CPU (the in-kernel rate limit turns it into a handful of records) and loses nothing.

Two measures of the per-connect cost, because a 2-vCPU shared machine makes wall-clock differences
of a fraction of a microsecond noisy:
- in-kernel: the probe programs' own run time (BPF_ENABLE_STATS, bpf_prog_info.run_time_ns) per
  connect; exact for the programs, and an upper bound (other connects on the node are included),
  but it leaves out the tracepoint's own dispatch;
- wall clock: refused connects (one socket, ``connect_ex`` in a loop) with the probe attached vs
  detached, in interleaved pairs of blocks; the median of the paired differences.

Skips like tests/ebpf when eBPF is unavailable, fails under REQUIRE_EBPF=1. Under
``--benchmark-disable`` each benchmark runs once with short blocks (a few seconds in all).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import socket
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
import valkey

from probes.probe import Probe, addr16
from probes.testing import AgentProcess, PodStore, closed_port, pod, require_ebpf
from statesync.embedded import EmbeddedValkey
from statesync.keys import Keys

MISS_IP = "127.72.0.1"  # never watched
WATCHED = [f"127.71.{i // 250}.{1 + i % 250}" for i in range(1000)]  # a realistic trie


@pytest.fixture(scope="module")
def ebpf_ready() -> None:
    require_ebpf()


def connect_block(sock: socket.socket, address: tuple[str, int], n: int) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) per refused connect() over n attempts on one socket."""
    connect = sock.connect_ex
    cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
    for _ in range(n):
        connect(address)
    return (time.thread_time_ns() - cpu) / n / 1e9, (time.perf_counter_ns() - wall) / n / 1e9


@pytest.fixture(scope="module")
def probe(ebpf_ready: None) -> Iterator[Probe]:
    probe = Probe(window=1.0, burst=1)
    probe.load()
    probe.set_watch({addr16(ip): 8012 for ip in WATCHED})
    yield probe
    probe.close()


@pytest.mark.benchmark(group="agent-connect-cost")
def bench_connect_cost_on_a_watch_list_miss(benchmark, probe: Probe) -> None:
    """Extra time per connect() to an unwatched address with the probe attached vs detached."""
    miss = (MISS_IP, closed_port(MISS_IP))
    hit = (WATCHED[0], closed_port(WATCHED[0]))
    probe.set_watch({**probe.watching, addr16(WATCHED[0]): 0})
    pairs, block = (24, 8000) if benchmark.enabled else (5, 2000)
    sock = socket.socket()
    assert sock.connect_ex(miss) != 0

    # in-kernel run time of the probe programs per connect: miss, and a rate-limited hit. The
    # programs also run for every other TCP state change on the node meanwhile (other tenants), so
    # the figure is the mean run time per invocation times the 2 state changes of a refused connect
    # (CLOSE->SYN_SENT, SYN_SENT->CLOSE); ``ours_share`` says how much of the sample was ours.
    kernel_ns, ours_share = {}, {}
    n = block * 2
    with probe.run_time_stats():
        for name, target in (("miss", miss), ("hit_rate_limited", hit)):
            before = probe.run_time()
            for _ in range(n):
                sock.connect_ex(target)
            after = probe.run_time()
            key = "sock__inet_sock_set_state"
            runs = after[key][1] - before[key][1]
            kernel_ns[name] = 2 * (after[key][0] - before[key][0]) / max(runs, 1)
            ours_share[name] = round(2 * n / max(runs, 1), 2)
    counters = probe.counters()
    assert counters["ringbuf_drops"] == 0 and counters["watched_connects"] == n

    # the caller's side: interleaved pairs of blocks, attached/detached in alternating order. Thread
    # CPU time is the figure (it includes the probe and the tracepoint dispatch, which run inside
    # connect(), and it does not count time this thread spent waiting for a shared vCPU); wall
    # clock is reported too, but other tenants make it noisy.
    gc.disable()
    try:
        cpu_diffs, wall_diffs, cpu_with, cpu_without = [], [], [], []
        for i in range(pairs):
            order = (True, False) if i % 2 else (False, True)
            result = {}
            for attached in order:
                probe.attach() if attached else probe.detach()
                result[attached] = connect_block(sock, miss, block)
            cpu_diffs.append(result[True][0] - result[False][0])
            wall_diffs.append(result[True][1] - result[False][1])
            cpu_with.append(result[True][0])
            cpu_without.append(result[False][0])
    finally:
        gc.enable()
        probe.attach()
    benchmark.pedantic(connect_block, args=(sock, miss, block), rounds=3 if benchmark.enabled else 1)
    sock.close()

    def us(value: float) -> float:
        return round(value * 1e6, 3)

    figures = {
        "kernel_ns_per_connect_miss": round(kernel_ns["miss"]),
        "kernel_ns_per_connect_hit_rate_limited": round(kernel_ns["hit_rate_limited"]),
        "kernel_sample_ours_share": ours_share,
        "cpu_us_per_connect_without": us(statistics.median(cpu_without)),
        "cpu_us_per_connect_with": us(statistics.median(cpu_with)),
        "cpu_extra_us_median_paired": us(statistics.median(cpu_diffs)),
        "cpu_extra_us_p25_p75": [us(q) for q in statistics.quantiles(cpu_diffs, n=4)[::2]],
        "wall_extra_us_median_paired": us(statistics.median(wall_diffs)),
        "pairs_x_block": f"{pairs}x{block}",
        "load_average_1m": round(os.getloadavg()[0], 1),
        "goal_extra_us": 1.0,
    }
    benchmark.extra_info.update(figures)
    print(f"\nprobe cost per connect: {figures}")
    assert kernel_ns["miss"] <= 1000, figures  # the goal, on the part that can be measured exactly
    assert statistics.median(cpu_diffs) <= 5e-6, figures  # the caller's CPU: a sanity bound (shared vCPUs)


@pytest.fixture(scope="module")
def storm_agent(ebpf_ready: None, probe: Probe) -> Iterator[tuple[AgentProcess, PodStore]]:
    probe.close()  # one probe on the node at a time: the agent's own
    server = EmbeddedValkey().start()
    client = valkey.Valkey.from_url(server.url)
    store = PodStore(client, Keys("fpt-bench"))
    agent = AgentProcess(
        server.url,
        store.keys,
        "--all-pods",
        "--threshold",
        "1",
        "--window",
        "1",
        "--refresh",
        "0.5",
        "--sweep",
        "1",
        "--log-level",
        "warning",
    )
    try:
        agent.start()
        yield agent, store
    finally:
        agent.close()
        client.close()
        server.close()


@pytest.mark.benchmark(group="agent-storm")
def bench_agent_cpu_under_a_connect_storm(benchmark, storm_agent: tuple[AgentProcess, PodStore]) -> None:
    """Refused connects to one watched pod as fast as one Python loop goes: agent CPU, records, events."""
    agent, store = storm_agent
    ip = "127.73.0.1"
    target = pod("storm-bench", ip, closed_port(ip))
    agent.wait_version(store.commit([target]))
    seconds = 3.0 if benchmark.enabled else 1.0
    results = {}

    def storm() -> None:
        before = agent.metrics()
        cpu = agent.cpu_seconds()
        sock = socket.socket()
        connects = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            connects += 1000
            connect_block(sock, (ip, target.port), 1000)
        elapsed = time.perf_counter() - started
        sock.close()
        agent_cpu = agent.cpu_seconds() - cpu
        deadline = time.monotonic() + 5
        name = 'fastproxy_agent_failures_total{kind="refused"}'
        while (after := agent.metrics())[name] - before[name] < connects and time.monotonic() < deadline:
            time.sleep(0.05)
        results.update(connects=connects, elapsed=elapsed, agent_cpu=agent_cpu, before=before, after=after)

    idle_cpu = agent.cpu_seconds()
    time.sleep(0.5)
    idle_pct = (agent.cpu_seconds() - idle_cpu) / 0.5 * 100
    benchmark.pedantic(storm, rounds=1)
    before, after = results["before"], results["after"]

    def delta(metric: str) -> int:
        return round(after[metric] - before[metric])

    connects = results["connects"]
    records = delta('fastproxy_agent_records_total{kind="refused"}')
    suppressed = delta('fastproxy_agent_suppressed_total{kind="refused"}')
    events = len([e for _, e in store.events() if e.uid == "storm-bench"])
    figures = {
        "connects": connects,
        "connects_per_s": round(connects / results["elapsed"]),
        "agent_cpu_pct_storm": round(results["agent_cpu"] / results["elapsed"] * 100, 3),
        "agent_cpu_pct_idle": round(idle_pct, 3),
        "ring_records": records,
        "events": events,
        "suppressed_in_kernel": suppressed,
        "ringbuf_drops": round(after["fastproxy_agent_ringbuf_drops_total"]),
    }
    benchmark.extra_info.update(figures)
    print(f"\nagent under a connect storm: {figures}")
    assert delta('fastproxy_agent_failures_total{kind="refused"}') == connects
    assert records + suppressed == connects and figures["ringbuf_drops"] == 0
    assert 1 <= events <= records <= 2 + results["elapsed"]


@pytest.mark.benchmark(group="agent-quarantine")
def bench_refused_connect_to_router_snapshot(benchmark, storm_agent: tuple[AgentProcess, PodStore]) -> None:
    """A refused connect() to a watched pod -> the agent's event -> a real writer quarantines the pod
    -> a router following the writer (StateFollower) has it QUARANTINED in its snapshot.

    Goal: p99 <= 10 ms from the failed connect(). The writer and the router (with its follower) run
    in-process on one uvloop loop, on this module's Valkey and agent (key namespace ``fpt-bench``;
    pods here are discovered through the writer, so nothing else commits meanwhile). Pods are
    sequential: one connect, wait until the router has the pod quarantined, the next. The writer's
    recovery checks of the pods already quarantined keep failing (and being seen) meanwhile.

    The writer's default QuarantinePolicy applies, so the layout keeps it from holding the node's
    reports back: each target pod has its own revision with ``BYSTANDERS`` Ready pods that are never
    connected to (the 50% revision cap: 1 of 1 + BYSTANDERS), and those also make the fleet large
    enough that one node reporting all the targets stays under the noisy-observer share (20%)."""
    import asyncio

    import uvloop

    from fastproxy.config import RouterConfig
    from fastproxy.router import Router
    from statesync.connect import connect
    from statesync.schema import PodDiscovered, PodState, Source, encode
    from statesync.subscriber import StateFollower
    from statesync.writer import Writer

    agent, store = storm_agent
    keys = store.keys
    n = 100 if benchmark.enabled else 20
    bystanders = 5  # per target: fleet ~6n, n reports from one node < 20% of it
    targets = [(f"q-{i}", f"127.74.{i // 250}.{1 + i % 250}") for i in range(n)]
    ports = {uid: closed_port(ip) for uid, ip in targets}
    results: dict[str, Any] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client = connect(agent_url)
        writer = Writer(connect(agent_url), keys=keys, writer_id="bench-writer", lease_ttl=1.0)
        router = Router(RouterConfig(), loop)
        follower = StateFollower(router, agent_url, keys=keys, heartbeat_timeout=3.0, retry_delay=0.05)
        changed = asyncio.Event()
        apply_delta, apply_deltas, install = router.apply_delta, router.apply_deltas, router.install

        def on_delta(delta: object) -> None:
            apply_delta(delta)  # type: ignore[arg-type]
            changed.set()

        def on_deltas(deltas: object) -> None:
            apply_deltas(deltas)  # type: ignore[arg-type]
            changed.set()

        def on_install(snapshot: object, *grouped: object, **index: object) -> None:
            install(snapshot, *grouped, **index)  # type: ignore[arg-type]
            changed.set()

        router.apply_delta, router.install = on_delta, on_install  # type: ignore[method-assign]
        router.apply_deltas = on_deltas  # type: ignore[method-assign]
        tasks = [asyncio.create_task(writer.run())]
        try:
            await asyncio.wait_for(writer.became_leader.wait(), 10)
            tasks.append(asyncio.create_task(follower.run()))
            await asyncio.wait_for(follower.synced.wait(), 10)
            async with client.pipeline(transaction=False) as pipe:
                for i, (uid, ip) in enumerate(targets):
                    revision = f"bench-q{i}"
                    pipe.xadd(keys.events, {"e": encode(PodDiscovered(
                        uid=uid, source=Source.INFORMER, namespace="ml", revision=revision, ip=ip,
                        port=ports[uid], ready=True))})  # fmt: skip
                    for b in range(bystanders):
                        pipe.xadd(keys.events, {"e": encode(PodDiscovered(
                            uid=f"{uid}-b{b}", source=Source.INFORMER, namespace="ml", revision=revision,
                            ip=f"127.75.{i // 250}.{1 + i % 250}", port=20000 + b, ready=True))})  # fmt: skip
                await pipe.execute()
            deadline = loop.time() + 20
            while not all(
                (p := router.snapshot.pods.get(uid)) is not None and p.state is PodState.READY
                for uid, _ in targets
            ):
                assert loop.time() < deadline, "the router did not get the pods as Ready"
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.5)
            await asyncio.to_thread(agent.wait_version, router.snapshot.version, 10.0)

            latencies: list[float] = []
            missed: list[str] = []
            for uid, ip in targets:
                await asyncio.sleep(0.02)  # let the previous pod's recovery checks etc. settle a bit
                changed.clear()
                with socket.socket() as sock:
                    err = sock.connect_ex((ip, ports[uid]))
                    failed_at = time.perf_counter()
                assert err == errno.ECONNREFUSED, (uid, err)
                deadline = loop.time() + 5
                while router.snapshot.pods[uid].state is not PodState.QUARANTINED:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        missed.append(uid)
                        break
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), remaining)
                else:
                    latencies.append(time.perf_counter() - failed_at)
            quarantined = [
                uid for uid, _ in targets if router.snapshot.pods[uid].state is PodState.QUARANTINED
            ]
            results.update(
                latencies=latencies,
                missed=missed,
                quarantined=quarantined,
                held=writer.policy.held,
                reasons={router.snapshot.pods[uid].reason for uid in quarantined},
            )
        finally:
            writer.stop()
            follower.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            await client.aclose()
            await writer.client.aclose()

    agent_url = agent.argv[agent.argv.index("--valkey") + 1]

    def run() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())

    benchmark.pedantic(run, rounds=1)
    latencies: list[float] = sorted(results["latencies"])
    assert not results["missed"], f"not quarantined within 5 s: {results['missed']}\n{agent.log()}"
    assert sorted(results["quarantined"]) == sorted(uid for uid, _ in targets)
    assert results["held"] == 0, "the quarantine policy held reports back"

    def ms(q: float) -> float:
        return round(float(latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]) * 1e3, 2)

    figures = {
        "pods": n,
        "fleet": n * (1 + bystanders),
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "max_ms": round(latencies[-1] * 1e3, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1e3, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "goal_p99_ms": 10.0,
    }
    benchmark.extra_info.update(figures)
    print(f"\nrefused connect -> quarantined in a router's snapshot: {figures}")
    reasons: set[str] = results["reasons"]
    assert all(f"connect refused by {agent.node}" in r for r in reasons), reasons
