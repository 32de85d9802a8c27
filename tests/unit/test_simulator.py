"""The pod simulator: scenario decoding, latency models, and every pod state change on real sockets."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fastproxy.devtools.simulator import (
    Fixed,
    KvCache,
    LogNormal,
    Phase,
    PodSimulator,
    ScenarioError,
    SharedPrefixWorkload,
    SimPod,
    Sse,
    decode_scenario,
    default_scenario_path,
    load_scenario,
    raise_fd_limit,
    sim_reply,
)
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.keys import Keys
from statesync.schema import (
    DrainStarted,
    PodDiscovered,
    PodRemoved,
    ReadinessChanged,
    RouteChanged,
    decode_event,
)
from tests.conftest import wait_for

TIMEOUT = 5.0
_next_block = iter(range(30, 250))  # each test's pods on their own 127.21.<block>.x addresses
# One port per test process: another engineer's run of this file on this machine uses another.
PORT = random.randrange(20_000, 30_000)


def scenario(**revision: Any) -> Any:
    spec = {"name": "r", "pods": 2, "concurrency": 1, "latency": {"model": "fixed", "ms": 0}} | revision
    return decode_scenario(
        {"revisions": [spec], "first_address": f"127.21.{next(_next_block)}.1", "port": PORT}
    )


@pytest.fixture
async def sims() -> AsyncIterator[list[PodSimulator]]:
    started: list[PodSimulator] = []
    yield started
    for sim in started:
        await sim.stop()


async def start(sims: list[PodSimulator], client: Any = None, **revision: Any) -> PodSimulator:
    sim = PodSimulator(scenario(**revision), client)
    sims.append(sim)
    await sim.start(churn=False, route=client is not None)
    await sim.wait_serving(TIMEOUT)
    return sim


async def request(pod: SimPod, path: str = "/v1/completions") -> tuple[int, bytes, bytes]:
    """One GET on its own connection; (status, head, body) with a chunked body decoded."""
    reader, writer = await asyncio.open_connection(pod.ip, pod.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            lower = head.lower()
            if b"transfer-encoding: chunked" in lower:
                while size := int((await reader.readline()).strip(), 16):
                    body += await reader.readexactly(size)
                    await reader.readline()
                await reader.readline()
            else:
                length = int(lower.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                body = await reader.readexactly(length)
        return int(head.split(b" ", 2)[1]), head, body
    finally:
        writer.close()


async def refused(pod: SimPod) -> bool:
    try:
        _, writer = await asyncio.open_connection(pod.ip, pod.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# ---- scenarios ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"revisions": [{"name": "a", "pods": "x"}]}, "Expected `int`, got `str` - at `$.revisions[0].pods`"),
        ({"revisions": [{"name": "a", "pods": 0}]}, "at `$.revisions[0].pods`"),
        ({"revisions": [{"name": "a", "pods": 1, "latency": {"model": "gamma"}}]}, "$.revisions[0].latency.model"),
        ({"revisions": [{"name": "a", "pods": 1, "latency": {"model": "lognormal", "sigma": -1}}]},
         "$.revisions[0].latency.sigma"),
        ({"revisions": [{"name": "a", "pods": 1, "churn": {"deaths_per_s": -1}}]},
         "$.revisions[0].churn.deaths_per_s"),
        ({"revisions": [{"name": "a", "pods": 1, "churn": {"death_mode": "maybe"}}]},
         "$.revisions[0].churn.death_mode"),
        ({"revisions": [{"name": "a", "pods": 1, "podz": 3}]}, "unknown field `podz` - at `$.revisions[0]`"),
        ({"revisions": [{"name": "a", "pods": 1}, {"name": "a", "pods": 1}]}, "revision names must be unique"),
        ({"revisions": [{"name": "a", "pods": 1}], "first_address": "10.1.2.3"}, "leave 127.0.0.0/8"),
        ({"revisions": []}, "$.revisions"),
        ({"revisions": [{"name": "a", "pods": 1}], "load": {"rate": "fast"}}, "$.load.rate"),
    ],
)  # fmt: skip
def test_bad_scenarios_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        decode_scenario(raw, "my.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("my.yaml: ")


def test_scenario_files(tmp_path: Path) -> None:
    default = load_scenario(default_scenario_path())
    assert {r.name for r in default.revisions} == {"chat-v1", "chat-v2", "realtime-v1"}
    assert [r.service for r in default.routes()] == ["chat", "realtime-v1"]  # the WebSocket revision
    assert default.load.websocket_sessions > 0
    assert load_scenario(default_scenario_path("thousands")).pod_count() >= 2000
    bad = tmp_path / "bad.yaml"
    bad.write_text("revisions: [ {name: a, pods: 1")
    with pytest.raises(ScenarioError, match=r"bad\.yaml: not YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")


def test_fd_limit_too_low_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="RLIMIT_NOFILE"):
        raise_fd_limit(1 << 40)


# ---- latency models ---------------------------------------------------------------------------


def test_latency_models() -> None:
    rng = random.Random(1)
    assert Fixed(ms=12).sample(rng) == pytest.approx(0.012)
    samples = [LogNormal(median_ms=40, sigma=0.5).sample(rng) for _ in range(4000)]
    assert statistics.median(samples) == pytest.approx(0.040, rel=0.08)
    assert max(samples) > 0.080 and min(samples) < 0.020  # a real spread, both ways
    assert LogNormal(median_ms=40, sigma=0).sample(rng) == pytest.approx(0.040)
    assert Sse(tokens=10, ms_per_token=3, first_token_ms=20).sample(rng) == pytest.approx(0.050)


async def test_fixed_latency_is_served(sims: list[PodSimulator]) -> None:
    sim = await start(sims, latency={"model": "fixed", "ms": 30})
    loop = asyncio.get_running_loop()
    began = loop.time()
    status, _, body = await request(sim.pods[0])
    assert status == 200 and b"choices" in body
    assert loop.time() - began >= 0.029
    assert sim.pods[0].served == 1


async def test_sse_streams_tokens(sims: list[PodSimulator]) -> None:
    sim = await start(sims, latency={"model": "sse", "tokens": 5, "ms_per_token": 2})
    status, head, body = await request(sim.pods[1])
    assert status == 200 and b"text/event-stream" in head
    events = [e for e in body.split(b"\n\n") if e]
    assert events[:5] == [b'data: {"token":%d}' % i for i in range(5)]
    assert events[-1] == b"data: [DONE]"


async def test_a_stall_holds_a_token_stream(sims: list[PodSimulator]) -> None:
    sim = await start(sims, latency={"model": "sse", "tokens": 20, "ms_per_token": 5})
    pod = sim.pods[0]
    loop = asyncio.get_running_loop()
    began = loop.time()
    answer = asyncio.create_task(request(pod))
    await wait_for(lambda: pod.active == 1, TIMEOUT, "stream started")
    sim.stall(pod, 250)
    status, _, body = await answer
    assert status == 200 and body.count(b"data: {") == 20
    assert loop.time() - began >= 0.25  # 100 ms of tokens could not finish through a 250 ms stall


# ---- pod life on real sockets ---------------------------------------------------------------------


async def test_addresses_in_use_are_a_clear_error(sims: list[PodSimulator]) -> None:
    first = await start(sims)
    second = PodSimulator(decode_scenario({"first_address": first.pods[0].ip, "port": PORT, "revisions": [
        {"name": "r", "pods": 1}]}), None)  # fmt: skip
    sims.append(second)
    with pytest.raises(RuntimeError, match=rf"127\.21\.\d+\.1:{PORT} is in use"):
        await second.start(churn=False, route=False)


async def test_each_pod_has_its_own_address(sims: list[PodSimulator]) -> None:
    sim = await start(sims, pods=300)
    addresses = {pod.ip for pod in sim.pods}
    assert len(addresses) == 300
    assert all(ip.startswith("127.21.") and not ip.endswith((".0", ".255")) for ip in addresses)
    status, _, _ = await request(sim.pods[-1])
    assert status == 200


async def test_a_dead_pod_refuses_and_a_restarted_one_is_a_new_generation(sims: list[PodSimulator]) -> None:
    sim = await start(sims, load_s=0.2, churn={"restart_after_s": 0.3})
    pod = sim.pods[0]
    uid, generation = pod.uid, pod.generation
    assert await sim.kill(pod)
    assert pod.phase is Phase.DEAD and pod.deaths == 1
    assert await refused(pod)  # the kernel says no: nothing listens there any more
    await wait_for(lambda: pod.phase is Phase.LOADING, TIMEOUT, "restart")
    assert pod.generation == generation + 1 and pod.uid == uid  # a container restart keeps the pod
    status, head, _ = await request(pod)  # listening, but still loading: the sidecar's refusal
    assert status == 503 and b"x-fastproxy-busy: 1" in head.lower()
    await wait_for(lambda: pod.phase is Phase.SERVING, TIMEOUT, "loaded")
    assert (await request(pod))[0] == 200


async def test_idle_death_waits_for_the_request_in_flight(sims: list[PodSimulator]) -> None:
    sim = await start(sims, latency={"model": "fixed", "ms": 150}, churn={"restart_after_s": 60})
    pod = sim.pods[0]
    answer = asyncio.create_task(request(pod))
    await wait_for(lambda: pod.active == 1, TIMEOUT, "request in flight")
    assert await sim.kill(pod, "idle")
    assert (await answer)[0] == 200  # it finished before the pod went
    assert pod.cut == 0 and await refused(pod)


async def test_crash_cuts_the_request_in_flight_and_counts_it(sims: list[PodSimulator]) -> None:
    sim = await start(sims, latency={"model": "fixed", "ms": 2000}, churn={"restart_after_s": 60})
    pod = sim.pods[0]
    answer = asyncio.create_task(request(pod))
    await wait_for(lambda: pod.active == 1, TIMEOUT, "request in flight")
    assert await sim.kill(pod, "crash")
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await answer
    assert pod.cut == 1


async def test_concurrency_violations_are_counted(sims: list[PodSimulator]) -> None:
    sim = await start(sims, concurrency=1, latency={"model": "fixed", "ms": 200})
    pod = sim.pods[0]
    assert pod.app is not None
    pod.app.sidecar_busy = False  # no sidecar in front: the app itself gets the second request
    first = asyncio.create_task(request(pod))
    await wait_for(lambda: pod.active == 1, TIMEOUT, "first in flight")
    second = asyncio.create_task(request(pod))
    assert [r[0] for r in await asyncio.gather(first, second)] == [200, 200]
    assert pod.violations == 1
    assert sim.stats()["violations"] == 1


async def test_full_pod_refuses_politely_without_a_violation(sims: list[PodSimulator]) -> None:
    sim = await start(sims, concurrency=1, latency={"model": "fixed", "ms": 200})
    pod = sim.pods[0]
    first = asyncio.create_task(request(pod))
    await wait_for(lambda: pod.active == 1, TIMEOUT, "first in flight")
    status, head, _ = await request(pod)
    assert status == 503 and b"x-fastproxy-busy: 1" in head.lower()
    assert (await first)[0] == 200
    assert pod.violations == 0


async def test_drain_finishes_in_flight_then_exits_and_is_replaced(sims: list[PodSimulator]) -> None:
    sim = await start(sims, latency={"model": "fixed", "ms": 200}, churn={"replace_after_s": 0.2})
    pod = sim.pods[0]
    old_uid = pod.uid
    answer = asyncio.create_task(request(pod))
    await wait_for(lambda: pod.active == 1, TIMEOUT, "request in flight")
    drained = asyncio.create_task(sim.drain(pod))
    await wait_for(lambda: pod.phase is Phase.DRAINING, TIMEOUT, "draining")
    assert not await refused(pod)  # still listening while it drains ...
    assert (await request(pod))[0] == 503  # ... but new work is refused (busy)
    assert (await answer)[0] == 200  # the in-flight request finished
    assert await drained
    assert pod.cut == 0 and await refused(pod)
    await wait_for(lambda: pod.phase is Phase.SERVING, TIMEOUT, "replacement")
    assert pod.uid != old_uid and pod.generation == 2  # a new pod on the recycled address


async def test_stall_blocks_answers_but_not_connects(sims: list[PodSimulator]) -> None:
    sim = await start(sims)
    pod = sim.pods[0]
    loop = asyncio.get_running_loop()
    sim.stall(pod, 300)
    began = loop.time()
    _, writer = await asyncio.open_connection(pod.ip, pod.port)  # accepted during the stall
    writer.close()
    status, _, _ = await request(pod, "/ready")  # even the readiness probe waits
    assert status == 200 and loop.time() - began >= 0.25


async def test_flap_refuses_work_and_comes_back(sims: list[PodSimulator]) -> None:
    sim = await start(sims, churn={"flap_s": 0.3})
    pod = sim.pods[1]
    assert sim.flap(pod)
    assert (await request(pod, "/ready"))[0] == 503
    assert (await request(pod))[0] == 503
    await wait_for(lambda: pod.phase is Phase.SERVING, TIMEOUT, "flap over")
    assert (await request(pod))[0] == 200 and pod.flaps == 1


# ---- reports: what the sidecar would push to the writer's stream ------------------------------


@pytest.fixture(scope="module")
def valkey_server() -> Any:
    server = EmbeddedValkey().start()
    yield server
    server.close()


async def test_every_state_change_is_reported(sims: list[PodSimulator], valkey_server: Any) -> None:
    client = connect(valkey_server.url)
    await client.flushall()
    sim = await start(sims, client, pods=2, load_s=0.05, latency={"model": "fixed", "ms": 0},
                      churn={"restart_after_s": 0.1, "flap_s": 0.1, "replace_after_s": 0.1})  # fmt: skip
    a, b = sim.pods
    assert await sim.kill(a)
    await wait_for(lambda: a.phase is Phase.SERVING, TIMEOUT, "restart")
    assert sim.flap(b)
    await wait_for(lambda: b.phase is Phase.SERVING, TIMEOUT, "flap over")
    sim.stall(b, 400)
    await wait_for(lambda: b.stall_seen, TIMEOUT, "stall probed")
    await wait_for(lambda: not b.stall_seen, TIMEOUT, "stall over")
    b_uid = b.uid
    assert await sim.drain(b)
    await wait_for(lambda: b.phase is Phase.SERVING, TIMEOUT, "replacement")
    await sim.flush()
    events = [decode_event(fields[b"e"]) for _, fields in await client.xrange(Keys().events)]
    await client.aclose()
    assert isinstance(events[0], RouteChanged)

    def story(uid: str) -> list[str]:
        out = []
        for e in events:
            if getattr(e, "uid", None) == uid:
                if isinstance(e, PodDiscovered):
                    out.append(f"discovered:{e.ready}")
                elif isinstance(e, ReadinessChanged):
                    out.append(f"ready:{e.ready}")
                elif isinstance(e, DrainStarted):
                    out.append("drain")
                elif isinstance(e, PodRemoved):
                    out.append("removed")
        return out

    # loading, loaded, died (the sidecar's probe), restarted and loaded again
    assert story(a.uid) == ["discovered:False", "ready:True", "ready:False", "ready:True"]
    # loaded, flap, back, stalled past the probe timeout, back, preempted
    assert story(b_uid) == ["discovered:False", "ready:True", "ready:False", "ready:True", "ready:False",
                            "ready:True", "drain", "removed"]  # fmt: skip
    assert story(b.uid) == ["discovered:False", "ready:True"]  # the replacement


async def test_two_thousand_pods_in_one_process(sims: list[PodSimulator]) -> None:
    sim = PodSimulator(decode_scenario({"first_address": "127.22.0.1", "port": PORT, "revisions": [
        {"name": "big", "pods": 2000, "latency": {"model": "fixed", "ms": 0}}]}), None)  # fmt: skip
    sims.append(sim)
    await sim.start(churn=False, route=False)
    await sim.wait_serving(30)
    assert len({p.ip for p in sim.pods}) == 2000 and all(p.app is not None for p in sim.pods)
    sample = [*sim.pods[::97], sim.pods[-1]]
    assert [r[0] for r in await asyncio.gather(*(request(p) for p in sample))] == [200] * len(sample)
    assert await sim.kill(sim.pods[1234], "crash")
    assert await refused(sim.pods[1234])
    assert (await request(sim.pods[1235]))[0] == 200


async def test_full_reports_again_periodically(sims: list[PodSimulator], valkey_server: Any) -> None:
    """The sidecar's anti-entropy: a Valkey that restarted empty gets every pod back."""
    client = connect(valkey_server.url)
    sim = PodSimulator(decode_scenario({"first_address": f"127.21.{next(_next_block)}.1", "port": PORT,
                                        "report_interval_s": 0.2, "revisions": [{"name": "r", "pods": 3}]}),
                       client)  # fmt: skip
    sims.append(sim)
    await sim.start(churn=False, route=False)
    await sim.wait_serving(TIMEOUT)
    await sim.flush()
    await client.flushall()  # Valkey "restarted empty"

    async def rediscovered() -> set[str]:
        entries = await client.xrange(Keys().events)
        events = [decode_event(fields[b"e"]) for _, fields in entries]
        return {e.uid for e in events if isinstance(e, PodDiscovered) and e.ready}

    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while (seen := await rediscovered()) != {p.uid for p in sim.pods}:
        assert asyncio.get_running_loop().time() < deadline, seen
        await asyncio.sleep(0.05)  # polling Valkey: there is no event to wait on
    await client.aclose()


# ---- WebSocket sessions -----------------------------------------------------------------------------


async def test_pod_holds_a_websocket_session_in_a_slot_and_refuses_when_it_cannot_serve(
    sims: list[PodSimulator],
) -> None:
    from fastproxy.devtools.wsapp import HandshakeRefused, WsClient

    sim = await start(sims, pods=1, concurrency=1)
    (pod,) = sim.pods
    client = await WsClient.connect(pod.ip, pod.port, "/ws/echo")
    client.send(b"hello")
    assert await client.recv() == (1, b"hello")
    assert pod.active == 1 and pod.sessions == 1
    with pytest.raises(HandshakeRefused) as info:  # the only slot is the session's
        await WsClient.connect(pod.ip, pod.port, "/ws/echo")
    assert info.value.status == 503 and b"x-fastproxy-busy" in info.value.head
    await client.close()
    await wait_for(lambda: pod.active == 0, TIMEOUT, "session's slot released")
    assert sim.flap(pod)  # not ready: refused as busy, like any work
    with pytest.raises(HandshakeRefused) as info:
        await WsClient.connect(pod.ip, pod.port, "/ws/echo")
    assert info.value.status == 503
    assert pod.violations == 0


def test_revision_with_hosts_of_its_own_is_its_own_service() -> None:
    sc = decode_scenario({"revisions": [
        {"name": "chat-v1", "pods": 1},
        {"name": "realtime-v1", "pods": 1, "hosts": ["realtime.local"]},
    ]})  # fmt: skip
    shared, own = sc.routes()
    assert shared.service == "chat" and [r.revision for r in shared.revisions] == ["chat-v1"]
    assert own.service == "realtime-v1" and own.hosts == ("realtime.local",)
    with pytest.raises(ScenarioError, match="none left for service"):
        decode_scenario({"revisions": [{"name": "a", "pods": 1, "hosts": ["a.local"]}]})


# ---- the KV-cache model and the shared-prefix workload --------------------------------------------


async def post_chat(pod: SimPod, body: bytes) -> tuple[float, bytes]:
    """(time to the response head, the head) of one POST on its own connection."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(pod.ip, pod.port)
    try:
        began = loop.time()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            ttft = loop.time() - began
            await reader.readuntil(b"\r\n0\r\n\r\n")
        return ttft, head
    finally:
        writer.close()


def test_kv_cache_hits_only_a_cached_prefix_and_evicts_least_recent() -> None:
    kv = KvCache(blocks=4, block_bytes=16)
    cache: collections.OrderedDict[int, None] = collections.OrderedDict()
    a = b"A" * 16 + b"B" * 16 + b"C" * 16
    assert kv.prefill(cache, a) == (0, 3)
    assert kv.prefill(cache, a + b"D" * 8) == (3, 4)
    assert kv.prefill(cache, b"X" * 16 + b"B" * 16) == (0, 2)  # same block, other prefix: a miss
    assert len(cache) == 4
    assert kv.prefill(cache, a) == (0, 3)  # its first blocks were the least recent: evicted


async def test_kv_pod_answers_a_repeated_prefix_sooner(sims: list[PodSimulator]) -> None:
    kv = {"blocks": 64, "block_bytes": 64, "prefill_ms_per_block": 4, "first_token_ms": 1, "tokens": 2,
          "ms_per_token": 1}  # fmt: skip
    sim = await start(sims, kv_cache=kv)
    workload = SharedPrefixWorkload(
        system_prompts=1, system_bytes=1024, turns=2, user_bytes=64, reply_bytes=64
    )
    first, second = workload.conversation(random.Random(1), workload.systems())
    cold, head = await post_chat(sim.pods[0], first)
    assert b"text/event-stream" in head and b"x-sim-kv-hit: 0/" in head
    warm, head = await post_chat(sim.pods[0], second)
    assert b"x-sim-kv-hit: 0/" not in head
    assert warm < cold - 0.02  # ~17 blocks of 4 ms saved
    other, _ = await post_chat(sim.pods[1], second)  # the other pod has nothing cached
    assert other > warm + 0.02
    pod = sim.pods[0]
    assert pod.kv_hit_blocks > 0 and pod.kv_blocks > pod.kv_hit_blocks and pod.busy_s > 0


async def test_kv_pod_caches_its_answer_so_the_next_turn_misses_only_the_new_message(
    sims: list[PodSimulator],
) -> None:
    kv = {"blocks": 256, "block_bytes": 64, "prefill_ms_per_block": 1, "first_token_ms": 1, "tokens": 2,
          "ms_per_token": 1, "reply_bytes": 256}  # fmt: skip
    sim = await start(sims, kv_cache=kv)
    workload = SharedPrefixWorkload(
        system_prompts=1, system_bytes=1024, turns=3, user_bytes=64, reply_bytes=256
    )
    bodies = workload.conversation(random.Random(3), workload.systems())
    for turn, body in enumerate(bodies):
        _, head = await post_chat(sim.pods[0], body)
        hit, total = map(int, head.split(b"x-sim-kv-hit: ", 1)[1].split(b"\r\n", 1)[0].split(b"/"))
        if turn:
            # the answer (256 bytes: 4 blocks) was cached: only the new user message's ~2 blocks
            # (and the one it shares with the answer's end) are prefilled
            assert total - hit <= 3, (turn, hit, total)
    assert workload.reply_bytes == 256 and len(sim_reply(b"[]", 256)) == 256


def test_shared_prefix_workload_turns_extend_each_other() -> None:
    workload = SharedPrefixWorkload(system_prompts=3, turns=4)
    systems = workload.systems()
    assert len(set(systems)) == 3 and all(len(s) == 4096 for s in systems)
    bodies = workload.conversation(random.Random(2), systems)
    assert len(bodies) == 4
    prompts = [msgspec.json.encode(msgspec.json.decode(b)["messages"]) for b in bodies]
    for earlier, later in itertools.pairwise(prompts):
        assert later[: len(earlier) - 1] == earlier[:-1]  # (all but the closing bracket)
    assert msgspec.json.decode(bodies[0])["messages"][0]["content"] in systems
    # each turn resends the server's answer to the turn before (what a pod caches with reply_bytes)
    for turn, prompt in enumerate(prompts[:-1]):
        answer = msgspec.json.decode(bodies[turn + 1])["messages"][-2]
        assert answer == {"role": "assistant", "content": sim_reply(prompt, workload.reply_bytes)}
