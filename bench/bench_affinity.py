"""What LLM-aware routing costs per request: the affine pick at 50k pods, and the body peek.

Theory of operation
-------------------
Targets (issue 17): the pick stays <= 2 us at 50k pods, and the body peek adds <= 5 us per request.

- ``pick``: ``affinity.pick`` plus the release, keys cycling through 4096 random prompts, 70% of
  the revision's pods busy (so walks meet busy pods and spill as at 70% load). On the routing
  state the other suites use (``bench.conftest``: 1k and 50k pods over 1000 revisions, a quarter
  of them CC=4) -- the target -- and on the worst case, one revision of all 50k pods (a Maglev
  table of 1M entries: the key's entry is a cache miss), beside the plain least-in-flight pick of
  one revision of 1k and of 50k pods; and ``affinity.pick_or_wait`` (a router that may wait for
  a busy affine pod) in the target's state at 50k pods.
- ``peek``: ``LLMRoute.read`` alone on bench_exchange's 1 KB chat completion (decode the model and
  the raw prompt, hash the prompt's first 1 KB); and one whole request in memory through a real
  router (bench_exchange's rig) on a plain route and on an LLM route with ``policy: prefix``:
  their difference is what the peek adds to a request (holding the body, reading it, the ring
  walk instead of the level pick), in three interleaved rounds. ``python -m bench.instructions
  --route llm-prefix`` against ``--route plain`` is the same difference in instructions.
"""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest
import uvloop

from bench.bench_exchange import BODY, REQUEST, RESPONSE, RESPONSE_BODY, InMemoryExchange
from bench.conftest import make_pods
from fastproxy import affinity
from fastproxy.exchange import RequestHead
from fastproxy.llm import LLMRoute
from fastproxy.slots import SlotTable
from statesync.schema import LLMRouting, PodRecord, PodState, Route

BUSY = 0.7


def revision_of(n_pods: int) -> tuple[SlotTable, list[int]]:
    table = SlotTable(seed=1)
    table.update(
        PodRecord(
            uid=f"6f1c2d3e-{i:08x}-4a5b-9c8d",
            namespace="ml",
            revision="big",
            ip="127.0.0.2",
            port=8000,
            concurrency=1,
            state=PodState.READY,
            generation=1,
        )
        for i in range(n_pods)
    )
    rng = random.Random(7)
    for _ in range(int(n_pods * BUSY)):  # (a pick that stays: 70% of the pods busy)
        assert affinity.pick(table, "big", rng.getrandbits(64), None, 0.25) is not None
    return table, [rng.getrandbits(64) for _ in range(4096)]


def routing_state(n_pods: int) -> tuple[SlotTable, str, list[int]]:
    pods = make_pods(n_pods)
    table = SlotTable(seed=7)
    table.replace_all(pods)
    table.materialize_pending(n_pods)
    name = pods[n_pods // 2].revision
    revision = table.revisions[name]
    rng = random.Random(7)
    while revision.inflight_total < BUSY * revision.capacity:
        assert affinity.pick(table, name, rng.getrandbits(64), None, 0.25) is not None
    return table, name, [rng.getrandbits(64) for _ in range(4096)]


@pytest.mark.benchmark(group="affinity-pick")
@pytest.mark.parametrize("n_pods", [1000, 50_000])
def bench_prefix_pick(benchmark, n_pods: int) -> None:
    """One affine pick plus its release in the routing state of ``n_pods`` over 1000 revisions."""
    table, name, keys = routing_state(n_pods)
    revision = table.revisions[name]
    busy = revision.inflight_total
    pick = affinity.pick
    state = {"i": 0}

    def pick_and_release() -> None:
        i = state["i"] = (state["i"] + 1) & 4095
        lease = pick(table, name, keys[i], None, 0.25)
        lease[0]()  # type: ignore[index]

    pick_and_release()
    benchmark(pick_and_release)
    assert revision.inflight_total == busy


@pytest.mark.benchmark(group="affinity-pick")
@pytest.mark.parametrize("n_pods", [50_000])
def bench_prefix_pick_or_wait(benchmark, n_pods: int) -> None:
    """``affinity.pick_or_wait`` (a router with --affinity-wait-ms) plus the release of what it
    took, in the same state: about half the keys find both candidates full and get them named
    (no slot taken), the others a pod."""
    table, name, keys = routing_state(n_pods)
    revision = table.revisions[name]
    busy = revision.inflight_total
    pick_or_wait = affinity.pick_or_wait
    state = {"i": 0, "waits": 0}

    def pick_and_release() -> None:
        i = state["i"] = (state["i"] + 1) & 4095
        found = pick_or_wait(table, name, keys[i], None, 0.25)
        if type(found) is tuple:
            found[0]()
        else:
            state["waits"] += 1

    benchmark(pick_and_release)
    assert revision.inflight_total == busy and state["waits"] > 0


@pytest.mark.benchmark(group="affinity-pick")
def bench_prefix_pick_one_revision_of_50k_pods(benchmark) -> None:
    """The worst case: one revision of 50k CC=1 pods, 70% busy."""
    table, keys = revision_of(50_000)
    revision = table.revisions["big"]
    busy = revision.inflight_total
    lease = affinity.pick(table, "big", keys[0], None, 0.25)
    assert lease is not None and revision.inflight_total == busy + 1
    lease[0]()
    state = {"i": 0}
    pick = affinity.pick

    def pick_and_release() -> None:
        i = state["i"] = (state["i"] + 1) & 4095
        lease = pick(table, "big", keys[i], None, 0.25)
        lease[0]()  # type: ignore[index]

    benchmark(pick_and_release)
    assert revision.inflight_total == busy


@pytest.mark.benchmark(group="affinity-pick")
@pytest.mark.parametrize("n_pods", [1000, 50_000])
def bench_least_inflight_pick_one_revision(benchmark, n_pods: int) -> None:
    """The plain least-in-flight pick plus its release in one revision of ``n_pods`` CC=1 pods, 70%
    busy: the idle ones churn through level 0 (issue 17: <= 2 us at 50k, whatever the churn)."""
    table, _ = revision_of(n_pods)
    revision = table.revisions["big"]
    busy = revision.inflight_total

    def pick_and_release() -> None:
        table.pick("big")[0]()  # type: ignore[index]

    benchmark(pick_and_release)
    assert revision.inflight_total == busy


@pytest.mark.benchmark(group="peek")
def bench_peek_read(benchmark) -> None:
    route = LLMRoute("chat", msgspec.convert({"policy": "prefix"}, LLMRouting))
    head = RequestHead()
    request = route.begin()
    route.read(request, BODY, True, head)
    assert request.model == "llama-3.1-8b-instruct" and request.key is not None

    def read() -> None:
        route.read(route.begin(), BODY, True, head)

    benchmark(read)


class Rig(InMemoryExchange):
    """bench_exchange's in-memory router with one pod, on a plain or an LLM route."""

    def __init__(self, loop: asyncio.AbstractEventLoop, llm: dict[str, object] | None) -> None:
        raw: dict[str, object] = {"service": "chat", "hosts": ["chat.inference.example.com"],
                                  "revisions": [{"revision": "chat-v1"}]}  # fmt: skip
        if llm is not None:
            raw["llm"] = llm
        super().__init__(loop, msgspec.convert(raw, Route))


# Plain and LLM routes in turn, three times each, in one run: on this shared machine the load
# moves between suites, so the peek's cost is the difference of neighbouring rounds' medians.
INTERLEAVED = [(route, round_) for round_ in (1, 2, 3) for route in ("plain", "llm-prefix")]


@pytest.mark.benchmark(group="peek")
@pytest.mark.parametrize(("route", "round_"), INTERLEAVED, ids=[f"{r}-{i}" for r, i in INTERLEAVED])
def bench_exchange_with_and_without_peek(benchmark, route: str, round_: int) -> None:
    loop = uvloop.new_event_loop()
    try:
        rig = Rig(loop, None if route == "plain" else {"policy": "prefix"})
        rig.client.data_received(REQUEST)
        sent = rig.pod_side.take()
        assert sent.endswith(BODY)  # the body went to the pod as the client sent it
        rig.respond(RESPONSE)
        assert rig.client_side.take().endswith(RESPONSE_BODY)
        assert rig.router.slots.pods["pod-a"].inflight == 0 and rig.client.exchange is None
        benchmark(rig.one)
        assert not rig.client_side.closed and rig.router.stats.responses[200] >= 2
    finally:
        loop.close()


def bench_affinity_model_runs_the_real_policies_in_virtual_time() -> None:
    """``bench.affinity_model`` (no timing; it runs once under ``make test``): a few virtual seconds
    of each kind of policy on a small fleet, the waiting ones waiting through the real slot table."""
    import argparse

    from bench import affinity_model

    opts = argparse.Namespace(pods=4, concurrency=1, load=0.7, warmup=1.0, duration=4.0, prefix_bytes=4352,
                              epsilon=0.25, system_prompts=2, system_bytes=4096, turns=3, user_bytes=512,
                              reply_bytes=512, think_s=0.5, kv_blocks=512, block_bytes=256, prefill_ms=6.0,
                              first_token_ms=20.0, tokens=20, ms_per_token=8.0, routers=2)  # fmt: skip
    for policy in ("least-inflight", "prefix", "prefix-wait:50", "oracle:50", "memory", "least-of:2"):
        result = affinity_model.simulate(policy, opts, 0)
        assert result["ttft"] and 0 < result["kv_hit_ratio"] <= 1, policy
        assert (result["waits_per_request"] > 0) == policy.endswith(":50"), policy
