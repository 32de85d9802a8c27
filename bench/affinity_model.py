"""``python -m bench.affinity_model``: bench.affinity's workload in virtual time, for what a policy could reach.

Theory of operation
-------------------
``bench.affinity`` measures real routers; this replays its workload and its pods' TTFT model in
virtual time with none of what the real run adds (two routers counting optimistically, busy
refusals, sockets, a shared machine), so its figures are an upper bound on what a policy can do,
and the policies can be compared at no cost -- including one no router can be: ``oracle``.

The same parts as the real run: ``SharedPrefixWorkload`` (conversations start as a Poisson process
at the rate ``bench.affinity`` offers, each turn after the previous answer plus an exponential
think time); each pod's ``KvCache`` (LRU of block hashes: ``prefill`` on arrival, the answer
``remember``-ed when it ends, TTFT = ``first_token_ms`` + ``prefill_ms_per_block`` per uncached
block, then ``tokens - 1`` more at ``ms_per_token``); the real ``SlotTable`` with its Maglev table
and the real policies (``affinity.pick``, ``affinity.pick_or_wait`` and ``SlotTable.wait_for_pods``,
the key from ``llm.prefix_key`` as ``LLMRoute.read`` makes it). One router, exact counts. Policies:

- ``least-inflight``: the free pod idle longest.
- ``prefix``: Maglev with bounded loads (today's router).
- ``prefix-wait:MS``: the same on a router with ``--affinity-wait-ms MS``.
- ``oracle[:MS]``: the pod that served the conversation's previous turn (so it holds all of the
  prompt but the new message) when it is free, waiting up to MS for it when it is not; else
  ``prefix``. A router cannot know that pod without being told (turns reach different routers; a
  spilled turn went to whichever pod was free then): this is the bound for any placement memory.
- ``least-of:K``: the least loaded of the key's first K pods that are free and within the bound
  (the "least loaded among affine candidates" refinement), else ``prefix``; not in the router.
- ``memory[:MS]``: what a router *can* know: each of ``--routers`` remembers where it placed each
  conversation's turns itself (each turn reaches one of them at random, as in bench.affinity) and
  uses that pod as ``oracle`` does; a turn the other router placed is invisible to it.

Reported per policy (medians over ``--seeds``): TTFT p50/p90/mean, the share of requests within
``--fast-ms`` (what a p50 target needs more than half of), the KV hit ratio, and for the waiting
ones how often they waited, how long, and how often the wait ended with the pod they waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import heapq
import itertools
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.affinity import least_inflight_service_s, percentile
from fastproxy import affinity
from fastproxy.devtools.simulator import KvCache, SharedPrefixWorkload, continued, sim_reply
from fastproxy.llm import body_decoder, prefix_key, prompt_of
from fastproxy.slots import SlotTable
from statesync.schema import PodRecord, PodState

_decode = body_decoder().decode


def simulate(policy: str, opts: argparse.Namespace, seed: int) -> dict[str, Any]:
    name, _, wait_arg = policy.partition(":")
    wait_s = float(wait_arg or 0) / 1000 if name != "least-of" else 0.0
    loop = asyncio.new_event_loop()  # (never run: futures only, for the slot table's hand-over)
    try:
        return _simulate(name, wait_arg, wait_s, opts, seed, loop)
    finally:
        loop.close()


def _simulate(
    name: str, wait_arg: str, wait_s: float, opts: argparse.Namespace, seed: int, loop: Any
) -> dict[str, Any]:
    rng = random.Random(seed)
    kv = KvCache(blocks=opts.kv_blocks, block_bytes=opts.block_bytes, prefill_ms_per_block=opts.prefill_ms,
                 first_token_ms=opts.first_token_ms, tokens=opts.tokens, ms_per_token=opts.ms_per_token,
                 reply_bytes=opts.reply_bytes)  # fmt: skip
    workload = SharedPrefixWorkload(system_prompts=opts.system_prompts, system_bytes=opts.system_bytes,
                                    turns=opts.turns, user_bytes=opts.user_bytes, reply_bytes=opts.reply_bytes)  # fmt: skip
    systems = workload.systems()
    table = SlotTable(seed=seed)
    table.update(PodRecord(uid=f"sim-{i:03d}", namespace="sim", revision="llm", ip="127.0.0.1", port=8000 + i,
                           concurrency=opts.concurrency, state=PodState.READY, generation=1)
                 for i in range(opts.pods))  # fmt: skip
    revision = table.revisions["llm"]
    caches = {uid: collections.OrderedDict() for uid in table.pods}
    request_rate = opts.load * opts.pods * opts.concurrency / least_inflight_service_s(kv, workload)
    session_rate = request_rate / workload.turns
    end = opts.warmup + opts.duration
    events: list[tuple[float, int, str, Any]] = []
    order = itertools.count()
    now = 0.0

    def at(when: float, kind: str, data: Any) -> None:
        heapq.heappush(events, (when, next(order), kind, data))

    last_pod: dict[int, str] = {}  # conversation -> the pod of its latest turn (oracle only)
    memories: list[dict[int, str]] = [{} for _ in range(opts.routers)]  # (memory: each router's own)
    ttft: list[float] = []
    hit_blocks = all_blocks = waits = waited_for = 0
    wait_times: list[float] = []

    def start(lease: Any, request: dict[str, Any]) -> None:
        nonlocal hit_blocks, all_blocks
        release, record = lease
        prompt = request["prompt"]
        hit, total = kv.prefill(caches[record.uid], prompt)
        first = (kv.first_token_ms + (total - hit) * kv.prefill_ms_per_block) / 1000
        if request["t0"] >= opts.warmup:
            ttft.append((now - request["t0"] + first) * 1000)
            hit_blocks += hit
            all_blocks += total
        last_pod[request["conversation"]] = record.uid
        memories[request["router"]][request["conversation"]] = record.uid
        at(now + first + (kv.tokens - 1) * kv.ms_per_token / 1000, "done", (release, record.uid, request))

    def pick(request: dict[str, Any], may_wait: bool) -> Any:
        key = request["key"]
        if name == "least-inflight":
            return table.pick("llm")
        if name in ("oracle", "memory"):
            known = last_pod if name == "oracle" else memories[request["router"]]
            home = table.pods.get(known.get(request["conversation"], ""))
            if home is not None and home.routable:
                if home.inflight < home.concurrency:
                    affinity.take(home)
                    return (home.release, home.record)
                if may_wait and wait_s > 0 and affinity._any_free(revision):
                    return [home]
            return affinity.pick(table, "llm", key, None, opts.epsilon)
        if name == "least-of":
            maglev = affinity.maglev_of(revision)
            bound = (1 + opts.epsilon) * (revision.inflight_total + 1) / revision.capacity
            first = [maglev.entries[(key + i) % maglev.size] for i in range(int(wait_arg))]
            free = [
                p
                for p in first
                if p.routable and p.inflight < p.concurrency and p.inflight < bound * p.concurrency
            ]
            if free:
                chosen = min(free, key=lambda p: p.inflight)  # (ties: the earlier entry)
                affinity.take(chosen)
                return (chosen.release, chosen.record)
            return affinity.pick(table, "llm", key, None, opts.epsilon)
        if may_wait and wait_s > 0:
            return affinity.pick_or_wait(table, "llm", key, None, opts.epsilon)
        return affinity.pick(table, "llm", key, None, opts.epsilon)

    def arrive(request: dict[str, Any]) -> None:
        nonlocal waits
        found = pick(request, True)
        if type(found) is list:
            waiter = table.wait_for_pods("llm", found, 0, loop)
            if waiter is not None:
                waits += 1
                request["waiter"], request["since"], request["for"] = waiter, now, {p.uid for p in found}
                at(now + wait_s, "expire", request)
                return
            found = pick(request, False)
        if found is None:
            request["waiter"] = table.enqueue("llm", 0, loop)
            request["since"], request["for"] = now, None
            return
        start(found, request)

    def served_waiters() -> None:
        """Waiters a release just handed a slot to (the slot table's hand-over is synchronous)."""
        nonlocal waited_for
        for request in [r for r in pending if r["waiter"].done() and not r["waiter"].cancelled()]:
            pending.remove(request)
            lease = request["waiter"].result()
            table.leave_queue("llm", request["waiter"], 0)
            if request["for"] is not None:
                wait_times.append((now - request["since"]) * 1000)
                waited_for += 1
            start(lease, request)

    pending: list[dict[str, Any]] = []
    at(rng.expovariate(session_rate), "conversation", None)
    while events:
        now, _, kind, data = heapq.heappop(events)
        if now > end and kind == "conversation":
            continue
        if kind == "conversation":
            bodies = workload.conversation(rng, systems)
            conversation = next(order)
            at(now, "turn", (conversation, bodies, 0))
            at(now + rng.expovariate(session_rate), "conversation", None)
        elif kind == "turn":
            conversation, bodies, turn = data
            prompt = bytes(prompt_of(_decode(bodies[turn])))
            request = {"conversation": conversation, "bodies": bodies, "turn": turn, "prompt": prompt, "t0": now,
                       "key": prefix_key(prompt, opts.prefix_bytes), "waiter": None,
                       "router": rng.randrange(opts.routers)}  # fmt: skip
            arrive(request)
            if request["waiter"] is not None:
                pending.append(request)
        elif kind == "expire":
            request = data
            if request in pending and not request["waiter"].done():
                pending.remove(request)
                table.leave_queue("llm", request["waiter"], 0)
                wait_times.append((now - request["since"]) * 1000)
                request["waiter"] = None
                found = pick(request, False)
                if found is None:
                    request["waiter"], request["since"], request["for"] = (
                        table.enqueue("llm", 0, loop),
                        now,
                        None,
                    )
                    pending.append(request)
                else:
                    start(found, request)
        elif kind == "done":
            release, uid, request = data
            if kv.reply_bytes:
                kv.remember(
                    caches[uid], continued(request["prompt"], sim_reply(request["prompt"], kv.reply_bytes))
                )
            release()
            served_waiters()
            if request["turn"] + 1 < len(request["bodies"]) and now < end:
                think = rng.expovariate(1 / opts.think_s)
                at(now + think, "turn", (request["conversation"], request["bodies"], request["turn"] + 1))
    return {
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "ttft_mean": statistics.mean(ttft),
        "ttft": ttft,
        "kv_hit_ratio": hit_blocks / all_blocks,
        "waits_per_request": waits / max(1, len(ttft)),
        "wait_ms_mean": statistics.mean(wait_times) if wait_times else 0.0,
        "waits_served_by_their_pod": waited_for / waits if waits else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.affinity_model", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--policies", default="least-inflight,prefix,prefix-wait:25,prefix-wait:100,memory,oracle,oracle:25")
    add("--seeds", type=int, default=3)
    add("--out", default="", help="also write the table to this markdown file")
    add("--routers", type=int, default=2, help="routers the turns are spread over (memory only)")
    add("--duration", type=float, default=300.0, help="virtual seconds measured per run")
    add(
        "--fast-ms",
        type=float,
        default=0.0,
        help="the 'fast' line (0: 60%% of least-in-flight's p50, the target)",
    )
    # bench.affinity's defaults (its --help says what each is)
    for flag, value in (("pods", 16), ("concurrency", 1), ("load", 0.7), ("warmup", 10.0), ("prefix-bytes", 4352),
                        ("epsilon", 0.25), ("system-prompts", 8), ("system-bytes", 4096), ("turns", 6),
                        ("user-bytes", 512), ("reply-bytes", 512), ("think-s", 1.0), ("kv-blocks", 512),
                        ("block-bytes", 256), ("prefill-ms", 6.0), ("first-token-ms", 20.0), ("tokens", 20),
                        ("ms-per-token", 8.0)):  # fmt: skip
        add(f"--{flag}", type=type(value), default=value)
    opts = parser.parse_args(argv)
    policies = [p.strip() for p in opts.policies.split(",") if p.strip()]
    results = {p: [simulate(p, opts, seed) for seed in range(opts.seeds)] for p in policies}
    base = (
        statistics.median(r["ttft_p50"] for r in results["least-inflight"])
        if "least-inflight" in results
        else 0
    )
    if not opts.fast_ms:
        opts.fast_ms = 0.6 * base
    for runs in results.values():
        for r in runs:
            ttft = r.pop("ttft")
            r["fast_share"] = sum(1 for t in ttft if t <= opts.fast_ms) / len(ttft)
    lines = [
        "# `"
        + " ".join(["python -m bench.affinity_model", *(argv if argv is not None else sys.argv[1:])])
        + "`",
        "",
        f"{opts.pods} pods x CC={opts.concurrency}, load {opts.load:.0%}, one router with exact counts, "
        f"{opts.seeds} seeds x {opts.duration:g} virtual s (medians); 'fast' = TTFT <= {opts.fast_ms:.1f} ms "
        "(60% of least-in-flight's p50: the target line).",
        "",
        "| policy | TTFT p50 ms | vs least-inflight | p90 | mean | fast share | KV hit | waits/request | "
        "mean wait ms | waits ending on their pod |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, runs in results.items():
        m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        change = f"{m['ttft_p50'] / base - 1:+.0%}" if base else "-"
        lines.append(f"| {policy} | {m['ttft_p50']:.1f} | {change} | {m['ttft_p90']:.1f} | {m['ttft_mean']:.1f} | "
                     f"{m['fast_share']:.3f} | {m['kv_hit_ratio']:.3f} | {m['waits_per_request']:.3f} | "
                     f"{m['wait_ms_mean']:.1f} | {m['waits_served_by_their_pod']:.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if opts.out:
        Path(opts.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
