"""``python -m bench.affinity``: least-in-flight vs prefix affinity on a shared-prefix LLM workload.

Theory of operation
-------------------
Targets (issue 17): with prefix affinity, time to first token p50 at least 40% lower than with
least-in-flight, at 70% load, with the load spread (max/min time-averaged in-flight across pods)
<= 1.25, no CC=1 pod ever running two requests, and no more errors than least-in-flight.

One run per policy, interleaved (``--rounds`` of each, in turn, so all meet the same machine;
``--policies``: least-inflight first, then ``prefix`` and/or ``prefix-wait[:MS]``, prefix affinity on
routers started with ``--affinity-wait-ms MS``, so several waits run side by side, and/or
``route-wait[:MS]``, the same wait set by the route's ``llm.affinity_wait_ms`` on routers without the
flag):

- the pods: ``--pods`` simulated LLM servers (``fastproxy.devtools.simulator`` with a ``kv_cache``:
  a per-pod LRU of prompt blocks; time to first token = ``first_token_ms`` + ``prefill_ms`` per
  uncached block), each on its own loopback address, playing the sidecar (a full pod refuses with
  503 + ``x-fastproxy-busy`` before the app sees anything, and counts a concurrency violation if
  it ever runs more than its concurrency). Every run starts with cold caches. A pod caches its
  answers' blocks too (``--cache-replies``, as vLLM/SGLang do), so a turn that finds its pod misses
  only its new user message. ``--concurrency 1`` is the strict case (the affine pod is busy ~70% of
  the time, so most turns spill); LLM servers batch several requests at once (``--concurrency 4``,
  with ``--kv-blocks`` scaled to the batch: a real GPU holds far more than 512 blocks).
- the routers: ``--routers`` real ``fastproxy router`` processes on a static routes file listing
  the pods, ``--sidecar-protocol``; the route's ``llm`` section sets the policy. Each turn of a
  conversation goes to a router chosen at random, as behind a load balancer: for its prefix to
  find its pod, the routers must agree on the ring without talking.
- the load: conversations (``SharedPrefixWorkload``: one of a few shared system prompts, turns
  that each resend the conversation so far) start as a Poisson process; each turn waits for the
  previous answer plus an exponential think time. The start rate is set so that the offered work
  is ``--load`` of the fleet's capacity *as least-in-flight would see it* (every request paying
  prefill for all but its system prompt); the measured utilization of both runs is reported.
- measured: the turns started in the ``--duration`` window after ``--warmup``: time to first token
  (send -> response head, which the pod sends with its first token), latency to the last byte,
  completions per second, errors (any non-200 answer, a connection failure, a timeout), the pods'
  busy seconds in the window (-> time-averaged in-flight per pod -> spread max/min), the pods'
  KV hit ratio, busy refusals and concurrency violations ("double-booked").

Results: a table on stdout, ``bench/results/affinity-latest.json`` and ``.md``; the targets are
judged for each affine policy against least-inflight (the exit status: the last one's).
``bench.affinity_model`` replays the same workload and TTFT model in virtual time, one router with
exact counts: what a policy could reach at best, and what a policy no router can run would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from fastproxy.devtools.simulator import KvCache, PodSimulator, SharedPrefixWorkload, decode_scenario

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# "prefix-wait": prefix affinity on routers started with --affinity-wait-ms (the option's value, or
# N in "prefix-wait:N", so that several waits run side by side); "route-wait[:N]": the same wait
# set by the route (llm.affinity_wait_ms: N, whole ms), the routers without the flag.
ALL_POLICIES = ("least-inflight", "prefix", "prefix-wait", "route-wait")
POLICIES = ("least-inflight", "prefix")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Client:
    """Keep-alive connections to the routers; one request per connection at a time."""

    def __init__(self, routers: list[tuple[str, int]], timeout: float) -> None:
        self.routers = routers
        self.idle: dict[int, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
            i: [] for i in range(len(routers))
        }
        self.timeout = timeout

    async def post(self, router: int, body: bytes) -> tuple[int, float, float]:
        """(status, seconds to the response head, seconds to its last byte)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        idle = self.idle[router]
        if idle:
            reader, writer = idle.pop()
        else:
            reader, writer = await asyncio.open_connection(*self.routers[router])
        keep = False
        try:
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: chat.local\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                first = loop.time() - began
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    await reader.readuntil(b"\r\n0\r\n\r\n")
                elif b"content-length:" in lower:
                    length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    await reader.readexactly(length)
            keep = b"connection: close" not in lower
            return int(head.split(b" ", 2)[1]), first, loop.time() - began
        finally:
            if keep:
                idle.append((reader, writer))
            else:
                writer.close()

    def close(self) -> None:
        for conns in self.idle.values():
            for _, writer in conns:
                writer.close()
            conns.clear()


async def spawn_router(
    routes: Path, index: int, log_dir: Path, extra: tuple[str, ...] = ()
) -> tuple[asyncio.subprocess.Process, tuple[str, int]]:
    with open(log_dir / f"router-{index}.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastproxy.cli", "router", "--routes", str(routes), "--listen", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", "--sidecar-protocol", "--instance", f"bench-affinity-{index}",
            "--log-level", "warning", "--queue-timeout", "30", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=log, cwd=ROOT, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(
            f"router {index} did not start: {line!r}: {(log_dir / f'router-{index}.log').read_text()[-2000:]}"
        )
    host, port = line.split()[1].rsplit(":", 1)
    return proc, (host, int(port))


def least_inflight_service_s(kv: KvCache, workload: SharedPrefixWorkload) -> float:
    """A request's mean service time if only its system prompt is cached (least-in-flight's case)."""
    per_turn = workload.user_bytes + workload.reply_bytes
    mean_extra_bytes = statistics.mean(t * per_turn + workload.user_bytes for t in range(workload.turns))
    blocks = mean_extra_bytes / kv.block_bytes + 1
    return (kv.first_token_ms + blocks * kv.prefill_ms_per_block + (kv.tokens - 1) * kv.ms_per_token) / 1000


def wait_ms(policy: str, opts: argparse.Namespace) -> float:
    return float(policy.split(":", 1)[1]) if ":" in policy else float(opts.affinity_wait_ms)


async def run_policy(policy: str, opts: argparse.Namespace, run: int, log_dir: Path) -> dict[str, Any]:
    kv = {"blocks": opts.kv_blocks, "block_bytes": opts.block_bytes, "prefill_ms_per_block": opts.prefill_ms,
          "first_token_ms": opts.first_token_ms, "tokens": opts.tokens, "ms_per_token": opts.ms_per_token,
          "reply_bytes": opts.reply_bytes if opts.cache_replies else 0}  # fmt: skip
    scenario = decode_scenario({
        "revisions": [{"name": "llm", "pods": opts.pods, "concurrency": opts.concurrency, "kv_cache": kv}],
        "first_address": f"127.23.{1 + run % 200}.1", "port": opts.port, "report_interval_s": 0,
    })  # fmt: skip
    workload = SharedPrefixWorkload(system_prompts=opts.system_prompts, system_bytes=opts.system_bytes,
                                    turns=opts.turns, user_bytes=opts.user_bytes, reply_bytes=opts.reply_bytes)  # fmt: skip
    sim = PodSimulator(scenario, None)
    procs: list[asyncio.subprocess.Process] = []
    client: Client | None = None
    try:
        await sim.start(churn=False, route=False)
        await sim.wait_serving(30)
        llm: dict[str, Any] = {"policy": "least-inflight" if policy == "least-inflight" else "prefix",
                               "require_model": True}  # fmt: skip
        if policy != "least-inflight":
            llm |= {"prefix_bytes": opts.prefix_bytes, "epsilon": opts.epsilon}
        if policy.startswith("route-wait"):
            llm["affinity_wait_ms"] = round(wait_ms(policy, opts))
        routes = {
            "routes": [{"service": "chat", "hosts": ["chat.local"], "revisions": [{"revision": "llm"}], "llm": llm}],
            "pods": [{"uid": p.uid, "namespace": "sim", "revision": "llm", "ip": p.ip, "port": p.port,
                      "concurrency": opts.concurrency} for p in sim.pods],
        }  # fmt: skip
        routes_file = log_dir / f"routes-{run}.json"
        routes_file.write_bytes(msgspec.json.encode(routes))
        addresses = []
        extra = (
            ("--affinity-wait-ms", f"{wait_ms(policy, opts):g}") if policy.startswith("prefix-wait") else ()
        )
        for index in range(opts.routers):
            proc, address = await spawn_router(routes_file, index, log_dir, extra)
            procs.append(proc)
            addresses.append(address)
        client = Client(addresses, opts.timeout)
        return await drive(sim, client, workload, opts, KvCache(**kv))
    finally:
        if client is not None:
            client.close()
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
            if proc.returncode is None:
                proc.kill()
        await sim.stop()


async def drive(
    sim: PodSimulator, client: Client, workload: SharedPrefixWorkload, opts: argparse.Namespace, kv: KvCache
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    rng = random.Random(opts.seed)
    systems = workload.systems()
    service_s = least_inflight_service_s(kv, workload)
    request_rate = opts.load * opts.pods * opts.concurrency / service_s
    session_rate = request_rate / workload.turns
    t0 = loop.time()
    window = (t0 + opts.warmup, t0 + opts.warmup + opts.duration)
    samples: list[tuple[int, float, float]] = []
    errors: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    marks: dict[str, Any] = {}

    async def conversation(bodies: list[bytes], session_rng: random.Random) -> None:
        for body in bodies:
            started = loop.time()
            if started >= window[1]:
                return
            measured = started >= window[0]
            try:
                status, first, total = await client.post(session_rng.randrange(len(client.routers)), body)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                if measured:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if measured:
                if status == 200:
                    samples.append((status, first, total))
                else:
                    errors[f"http_{status}"] = errors.get(f"http_{status}", 0) + 1
            await asyncio.sleep(session_rng.expovariate(1 / opts.think_s))

    def snapshot() -> dict[str, Any]:
        return {p.uid: (p.busy_s, p.kv_hit_blocks, p.kv_blocks) for p in sim.pods}

    async def mark_at(when: float, name: str) -> None:
        await asyncio.sleep(max(0.0, when - loop.time()))
        marks[name] = snapshot()

    markers = [loop.create_task(mark_at(window[0], "start")), loop.create_task(mark_at(window[1], "end"))]
    while loop.time() < window[1]:
        await asyncio.sleep(rng.expovariate(session_rate))
        task = loop.create_task(
            conversation(workload.conversation(rng, systems), random.Random(rng.random()))
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*markers)
    # the turns started in the window finish (bounded by the client's timeout)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(opts.timeout + 5):
            await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        task.cancel()
    start, end = marks["start"], marks["end"]
    busy = {uid: end[uid][0] - start[uid][0] for uid in end}
    inflight = [b / opts.duration for b in busy.values()]
    hit = sum(end[u][1] - start[u][1] for u in end)
    blocks = sum(end[u][2] - start[u][2] for u in end)
    ttft = [s[1] * 1000 for s in samples]
    latency = [s[2] * 1000 for s in samples]
    stats = sim.stats()
    return {
        "offered_requests_per_s": round(request_rate, 1),
        "completed": len(samples),
        "throughput_per_s": round(len(samples) / opts.duration, 1),
        "ttft_ms": {
            "p50": round(percentile(ttft, 50), 1),
            "p90": round(percentile(ttft, 90), 1),
            "p99": round(percentile(ttft, 99), 1),
        },
        "latency_ms": {"p50": round(percentile(latency, 50), 1), "p90": round(percentile(latency, 90), 1)},
        "errors": errors,
        "error_count": sum(errors.values()),
        "utilization": round(statistics.mean(inflight) / opts.concurrency, 3),
        "inflight_per_pod": {"max": round(max(inflight), 3), "min": round(min(inflight), 3)},
        "spread": round(max(inflight) / min(inflight), 3) if min(inflight) > 0 else float("inf"),
        "kv_hit_ratio": round(hit / blocks, 3) if blocks else 0.0,
        "double_booked": stats["violations"],
        "busy_refusals": stats["refused_busy"],
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    policies = tuple(runs)

    def med(policy: str, *path: str) -> float:
        values = []
        for run in runs[policy]:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    summary: dict[str, Any] = {}
    for policy in policies:
        summary[policy] = {
            "ttft_p50_ms": med(policy, "ttft_ms", "p50"), "ttft_p90_ms": med(policy, "ttft_ms", "p90"),
            "throughput_per_s": med(policy, "throughput_per_s"), "spread": med(policy, "spread"),
            "utilization": med(policy, "utilization"), "kv_hit_ratio": med(policy, "kv_hit_ratio"),
            "errors": sum(r["error_count"] for r in runs[policy]),
            "double_booked": sum(r["double_booked"] for r in runs[policy]),
        }  # fmt: skip
    base = summary["least-inflight"]
    by_policy = {}
    for policy in policies[1:]:
        affine = summary[policy]
        reduction = 1 - affine["ttft_p50_ms"] / base["ttft_p50_ms"]
        by_policy[policy] = {
            "ttft_p50_reduction": round(reduction, 3),
            "ttft_p50_reduction_met": reduction >= 0.40,
            "spread_met": affine["spread"] <= 1.25,
            "no_double_booking_met": base["double_booked"] == 0 and affine["double_booked"] == 0,
            "no_extra_errors_met": affine["errors"] <= base["errors"],
        }
    # (the targets are the last policy's: prefix-wait when it ran, else prefix)
    summary["targets"] = by_policy[policies[-1]]
    summary["targets_by_policy"] = by_policy
    return summary


def render_markdown(result: dict[str, Any]) -> str:
    opts, summary = result["options"], result["summary"]
    lines = [
        "# Prefix affinity vs least-in-flight (`python -m bench.affinity`)",
        "",
        f"{result['date']}, {opts['pods']} pods x CC={opts['concurrency']}, {opts['routers']} routers, "
        f"load {opts['load']:.0%} (of least-in-flight's capacity), answers cached: "
        f"{'yes' if opts.get('cache_replies', True) else 'no'}, {opts['rounds']} round(s) of "
        f"{opts['duration']:g} s measured after {opts['warmup']:g} s, machine load before: {result['loadavg']}.",
        "",
        "| policy | TTFT p50 ms | TTFT p90 ms | throughput /s | utilization | spread max/min | KV hit | errors | double-booked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in opts.get("policies", POLICIES):
        s = summary[policy]
        lines.append(
            f"| {policy} | {s['ttft_p50_ms']} | {s['ttft_p90_ms']} | {s['throughput_per_s']} | {s['utilization']} | "
            f"{s['spread']} | {s['kv_hit_ratio']} | {s['errors']} | {s['double_booked']} |"
        )
    if "prefix-wait" in summary:
        lines += ["", f"prefix-wait: routers with `--affinity-wait-ms {opts['affinity_wait_ms']:g}`."]
    if any(p.startswith("prefix-wait:") for p in summary):
        lines += ["", "prefix-wait:N: routers with `--affinity-wait-ms N`."]
    if any(p.startswith("route-wait") for p in summary):
        lines += ["", "route-wait[:N]: the route's `llm.affinity_wait_ms: N`, routers without the flag."]
    for policy, t in summary.get("targets_by_policy", {"prefix": summary["targets"]}).items():
        lines += [
            "",
            f"{policy}: TTFT p50 reduction: {t['ttft_p50_reduction']:.1%} (target >= 40%: {'met' if t['ttft_p50_reduction_met'] else 'NOT met'}); "
            f"spread <= 1.25: {'met' if t['spread_met'] else 'NOT met'}; 0 double-booked: "
            f"{'met' if t['no_double_booking_met'] else 'NOT met'}; no extra errors: {'met' if t['no_extra_errors_met'] else 'NOT met'}.",
        ]
    lines += ["", "Per run: see the `.json` beside this file."]
    return "\n".join(lines) + "\n"


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    policies = tuple(opts.policies)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    loadavg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fastproxy-affinity-") as tmp:
        log_dir = Path(opts.log_dir) if opts.log_dir else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        run = 0
        for round_ in range(opts.rounds):
            for policy in policies if round_ % 2 == 0 else tuple(reversed(policies)):
                result = await run_policy(policy, opts, run, log_dir)
                run += 1
                runs[policy].append(result)
                print(f"round {round_ + 1} {policy}: {json.dumps(result)}", flush=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "loadavg": round(loadavg, 2),
        "options": vars(opts),
        "runs": runs,
        "summary": summarize(runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add = parser.add_argument
    add("--pods", type=int, default=16, help="simulated LLM pods")
    add("--concurrency", type=int, default=1, help="requests each pod serves at once")
    add("--routers", type=int, default=2, help="router processes (each turn goes to a random one)")
    add("--load", type=float, default=0.7, help="offered work as a fraction of least-in-flight's capacity")
    add("--duration", type=float, default=30.0, help="measured seconds per run")
    add("--warmup", type=float, default=10.0, help="seconds before measuring (caches fill)")
    add("--rounds", type=int, default=1, help="runs of each policy, interleaved")
    add("--prefix-bytes", type=int, default=4352, help="the route's prefix_bytes (system prompt + a little)")
    add("--epsilon", type=float, default=0.25, help="the route's bounded-load epsilon")
    add("--policies", default=",".join(POLICIES),
        help=f"comma-separated, least-inflight first, of {', '.join(ALL_POLICIES)} (or prefix-wait:MS, route-wait:MS)")  # fmt: skip
    add("--affinity-wait-ms", type=float, default=20.0,
        help="the prefix-wait routers' --affinity-wait-ms (and the route-wait route's affinity_wait_ms)")  # fmt: skip
    add("--system-prompts", type=int, default=8, help="shared system prompts")
    add("--system-bytes", type=int, default=4096)
    add("--turns", type=int, default=6, help="turns per conversation")
    add("--user-bytes", type=int, default=512)
    add("--reply-bytes", type=int, default=512)
    add(
        "--cache-replies",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pods cache their answers' KV blocks, as vLLM/SGLang prefix caching does",
    )
    add("--think-s", type=float, default=1.0, help="mean think time between turns")
    add("--kv-blocks", type=int, default=512, help="KV cache blocks per pod (LRU)")
    add("--block-bytes", type=int, default=256, help="prompt bytes per KV block")
    add("--prefill-ms", type=float, default=6.0, help="prefill time per uncached block")
    add("--first-token-ms", type=float, default=20.0)
    add("--tokens", type=int, default=20, help="tokens per answer")
    add("--ms-per-token", type=float, default=8.0)
    add("--timeout", type=float, default=30.0, help="per-request timeout")
    add("--port", type=int, default=8000 + random.randrange(1000), help="the pods' port")
    add("--seed", type=int, default=5)
    add("--log-dir", default="", help="keep the routers' logs and routes files here")
    add("--out", default=str(RESULTS / "affinity-latest"), help="results path without extension ('' : none)")
    opts = parser.parse_args(argv)
    opts.policies = [p.strip() for p in opts.policies.split(",") if p.strip()]
    known = {p.split(":", 1)[0] for p in opts.policies}
    if opts.policies[:1] != ["least-inflight"] or len(opts.policies) < 2 or not known <= set(ALL_POLICIES):
        parser.error(f"--policies: least-inflight first, then one or more of {', '.join(ALL_POLICIES[1:])}")
    import uvloop

    result = uvloop.run(main_async(opts))
    text = render_markdown(result)
    print(text)
    if opts.out:
        Path(opts.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(opts.out + ".md").write_text(text)
    return 0 if all(result["summary"]["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
