"""Writers, a router and app pods as real processes against a real valkey-server.

Every actor here is a child process started with ``sys.executable -m ...``: two ``fastproxy writer``
replicas (leader and standby), a ``fastproxy router`` following the state, and app servers
(``fastproxy.devtools.upstream``) standing in for pods. The test process only appends events to the
writers' stream (what every source does), kills/pauses/resumes processes with real signals, and
observes through Valkey and the router's admin API. Waiting is always for a condition under a
deadline (output lines are event-driven; Valkey and the admin API are polled at a short interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import valkey.asyncio as avalkey

from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.keys import Keys
from statesync.schema import (
    Delta,
    PodDiscovered,
    PodRecord,
    PodState,
    Route,
    RouteChanged,
    Source,
    WeightedRevision,
    decode_delta,
    decode_event,
    decode_pod,
)
from statesync.writer import submit
from tests.procs import START, Proc

FASTPROXY = [sys.executable, "-m", "fastproxy.cli"]
UPSTREAM = [sys.executable, "-m", "fastproxy.devtools.upstream"]
KEYS = Keys()
T = TypeVar("T")

# Generous deadlines: the machine is small and shared; these bound a wait, they assert no timing.
TAKEOVER = 15.0  # lease ttl 1 s + standby poll (ttl/3) + load


class Procs:
    """Every process a test started, killed in its ``finally``."""

    def __init__(self) -> None:
        self.all: list[Proc] = []

    async def start(self, name: str, *argv: str) -> Proc:
        proc = await Proc.start(name, *argv)
        self.all.append(proc)
        return proc

    async def writer(self, url: str, writer_id: str, *extra: str) -> Proc:
        return await self.start(writer_id, *FASTPROXY, "writer", "--valkey", url, "--id", writer_id, *extra)

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.all), return_exceptions=True)


@pytest.fixture
async def valkey_server() -> AsyncIterator[EmbeddedValkey]:
    server = EmbeddedValkey().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def client(valkey_server: EmbeddedValkey) -> AsyncIterator[avalkey.Valkey]:
    c = connect(valkey_server.url)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
async def procs() -> AsyncIterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        await p.close()


# ---- helpers -----------------------------------------------------------------------------------


async def poll(
    check: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.01, detail: Any = None
) -> T:
    """Call ``check`` until it returns something truthy (returned), at a short interval, under a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            extra = detail() if callable(detail) else detail
            if asyncio.iscoroutine(extra):
                extra = await extra
            raise AssertionError(f"{what}: not within {timeout}s" + (f"\n{extra}" if extra else ""))
        await asyncio.sleep(interval)


async def lease_holder(client: avalkey.Valkey) -> tuple[str, int] | None:
    raw = await client.get(KEYS.lease)
    if raw is None:
        return None
    writer_id, _, epoch = raw.decode().rpartition(":")
    return writer_id, int(epoch)


async def exists_calls(client: avalkey.Valkey) -> int:
    stats = await client.info("commandstats")
    entry = stats.get("cmdstat_exists") or {}
    return int(entry.get("calls", 0))


async def both_writers_running(client: avalkey.Valkey) -> None:
    """Each writer's first step is ``EXISTS lease``; the leader never asks again, so two calls prove
    the standby is up too (a standby then asks every ttl/3)."""
    await poll(lambda: _at_least(exists_calls(client), 2), START, "both writers polling the lease")


async def _at_least(value: Awaitable[int], n: int) -> bool:
    return await value >= n


async def change_log(client: avalkey.Valkey) -> list[Delta]:
    entries = await client.xrange(KEYS.changes, min="-", max="+")
    return [decode_delta(fields[b"d"]) for _, fields in entries]


async def pod_count(client: avalkey.Valkey) -> int:
    return int(await client.hlen(KEYS.pods))


async def stored_pod(client: avalkey.Valkey, uid: str) -> PodRecord | None:
    raw = await client.hget(KEYS.pods, uid)
    return decode_pod(raw) if raw is not None else None


async def pending_summary(client: avalkey.Valkey) -> str:
    summary = await client.xpending(KEYS.events, "writers")
    consumers = {c["name"].decode(): c["pending"] for c in summary.get("consumers", [])}
    text = f"events stream: {summary['pending']} entries read but never acknowledged, by consumer {consumers}"
    for entry in await client.xpending_range(KEYS.events, "writers", min="-", max="+", count=10):
        event = [decode_event(f[b"e"]) for _, f in await client.xrange(KEYS.events, entry["message_id"],
                                                                       entry["message_id"])]  # fmt: skip
        text += (f"\n  {entry['message_id'].decode()} held by {entry['consumer'].decode()}, "
                 f"delivered {entry['times_delivered']}x, idle {entry['time_since_delivered']} ms: "
                 f"{event}")  # fmt: skip
    return text


async def lost(client: avalkey.Valkey, old: Proc, uids: list[str] | None = None) -> str:
    text = ""
    if uids is not None:
        stored = {k.decode() for k in await client.hkeys(KEYS.pods)}
        missing = [u for u in uids if u not in stored]
        text = f"{len(missing)} of {len(uids)} events never applied: {missing[:10]}\n"
    return f"{text}{await pending_summary(client)}\n{old.name} (deposed leader) log:\n{old.output}"


class EventsLost(AssertionError):
    """Submitted events that the leader never applied."""


def discovered(uid: str, ip: str = "127.0.9.1", port: int = 8000, revision: str = "chat-v1") -> PodDiscovered:
    return PodDiscovered(
        uid=uid, source=Source.SIDECAR, at=time.time(), namespace="ml", revision=revision, ip=ip, port=port,
        ready=True,
    )  # fmt: skip


async def produce(
    client: avalkey.Valkey, uids: list[str], interval: float, marks: dict[int, asyncio.Event] | None = None
) -> None:
    """Submit one PodDiscovered per uid at a steady pace (event i due at start + i * interval); when
    behind schedule, everything due goes out in one pipeline. ``marks[k]`` is set once k are in."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    marks = marks or {}
    sent = 0
    while sent < len(uids):
        due = min(len(uids), int((loop.time() - start) / interval) + 1)
        if due > sent:
            await submit(client, [discovered(uid) for uid in uids[sent:due]])
            sent = due
            for k, event in marks.items():
                if sent >= k:
                    event.set()
        await asyncio.sleep(max(0.0, start + sent * interval - loop.time()))


def check_no_duplicates(deltas: list[Delta]) -> None:
    """No pod record was written twice: each event was applied at most once."""
    seen = Counter(pod.uid for delta in deltas for pod in delta.pods)
    twice = {u: n for u, n in seen.items() if n > 1}
    assert not twice, f"applied more than once: {dict(list(twice.items())[:5])}"
    for delta in deltas:
        for pod in delta.pods:
            assert pod.generation == 1 and pod.state is PodState.READY, (delta.version, pod)


def check_exactly_once(deltas: list[Delta], uids: list[str]) -> None:
    """Every uid was created exactly once (generation 1, Ready) and never touched again."""
    seen: Counter[str] = Counter()
    for delta in deltas:
        for pod in delta.pods:
            seen[pod.uid] += 1
            assert pod.generation == 1 and pod.state is PodState.READY, (delta.version, pod)
    missing = [u for u in uids if seen[u] == 0]
    twice = {u: n for u, n in seen.items() if n > 1}
    assert not missing, f"{len(missing)} events lost, e.g. {missing[:5]}"
    assert not twice, f"applied more than once: {dict(list(twice.items())[:5])}"
    assert set(seen) == set(uids)


def check_versions(deltas: list[Delta]) -> None:
    versions = [d.version for d in deltas]
    assert all(a < b for a, b in itertools.pairwise(versions)), versions
    epochs = [d.epoch for d in deltas]
    assert epochs == sorted(epochs), "an older epoch committed after a newer one"


# ---- 1. the leader is SIGKILLed while events stream in ------------------------------------------


async def test_leader_sigkill_under_event_stream(
    valkey_server: EmbeddedValkey, client: avalkey.Valkey, procs: Procs, record_property: Any
) -> None:
    n = 600
    writers = {wid: await procs.writer(valkey_server.url, wid, "--lease-ttl", "1") for wid in ("wa", "wb")}
    first_id, first_epoch = await poll(lambda: lease_holder(client), START, "a writer holds the lease")
    leader = writers[first_id]
    standby_id = next(w for w in writers if w != first_id)
    await both_writers_running(client)

    uids = [f"pod-{i:04d}" for i in range(n)]
    third = asyncio.Event()
    producer = asyncio.create_task(produce(client, uids, 0.002, {n // 3: third}))
    try:
        await asyncio.wait_for(third.wait(), 30)
        # The first leader has committed part of the stream before it dies.
        await poll(lambda: pod_count(client), 10, "the first leader committing")
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        leader.signal(signal.SIGKILL)

        async def new_epoch_committed() -> int:
            raw = await client.get(KEYS.state_epoch)
            return int(raw) if raw is not None and int(raw) > first_epoch else 0

        new_epoch = await poll(new_epoch_committed, TAKEOVER, "a commit by a new leader", interval=0.002)
        takeover = loop.time() - killed_at
        await asyncio.wait_for(producer, 30)
    finally:
        producer.cancel()
        with contextlib.suppress(BaseException):
            await producer
    print(f"\ntakeover after SIGKILL of {first_id} (epoch {first_epoch}): {takeover:.3f}s to the first "
          f"commit by {standby_id} (epoch {new_epoch})")  # fmt: skip
    record_property("takeover_seconds", round(takeover, 3))

    await poll(lambda: _at_least(pod_count(client), n), 30, f"all {n} pods committed",
               detail=lambda: pending_summary(client))  # fmt: skip
    assert await lease_holder(client) == (standby_id, new_epoch)
    await writers[standby_id].wait_line(lambda s: f"{standby_id} is leader: epoch {new_epoch}" in s, 10,
                                        "the standby taking the lead")  # fmt: skip

    stored = await client.hgetall(KEYS.pods)
    assert set(stored) == {u.encode() for u in uids}
    deltas = await change_log(client)
    check_exactly_once(deltas, uids)
    check_versions(deltas)
    assert deltas[0].epoch == first_epoch
    assert deltas[-1].epoch == new_epoch > first_epoch
    assert int(await client.get(KEYS.version)) == deltas[-1].version
    assert {d.epoch for d in deltas} == {first_epoch, new_epoch}


# ---- 2. the leader is paused past its lease, then resumes ---------------------------------------


async def test_deposed_leader_sigstop_cannot_write(
    valkey_server: EmbeddedValkey, client: avalkey.Valkey, procs: Procs
) -> None:
    writers = {wid: await procs.writer(valkey_server.url, wid, "--lease-ttl", "1") for wid in ("wa", "wb")}
    old_id, old_epoch = await poll(lambda: lease_holder(client), START, "a writer holds the lease")
    old = writers[old_id]
    new_id = next(w for w in writers if w != old_id)
    await both_writers_running(client)

    before = [f"before-{i:03d}" for i in range(50)]
    await submit(client, [discovered(u) for u in before])
    await poll(lambda: _at_least(pod_count(client), 50), 20, "the first batch committed by the leader")

    old.signal(signal.SIGSTOP)
    try:

        async def standby_leads() -> tuple[str, int] | None:
            holder = await lease_holder(client)
            return holder if holder is not None and holder[0] == new_id else None

        _, new_epoch = await poll(standby_leads, TAKEOVER, f"{new_id} taking the lease from stopped {old_id}")
        assert new_epoch > old_epoch
        during = [f"during-{i:03d}" for i in range(50)]
        await submit(client, [discovered(u) for u in during])
        await poll(lambda: _at_least(pod_count(client), 100), 20, "events committed by the new leader",
                   detail=lambda: pending_summary(client))  # fmt: skip
    finally:
        old.signal(signal.SIGCONT)
    deltas = await change_log(client)
    takeover_version = min(d.version for d in deltas if d.epoch == new_epoch)
    assert all(d.epoch == old_epoch for d in deltas if d.version < takeover_version)

    # The old leader wakes up believing it leads (its blocking read and its lease renewal are both
    # due); events keep coming while it finds out, and for a while after it says it stepped down.
    after = [f"after-{i:03d}" for i in range(450)]
    resumed = asyncio.create_task(produce(client, after[:300], 0.002))
    try:
        stepped = await old.wait_line(lambda s: "steps down" in s, 15, "the old leader stepping down")
        await asyncio.wait_for(resumed, 20)
    finally:
        resumed.cancel()
        with contextlib.suppress(BaseException):
            await resumed
    assert f"{old_id} steps down (epoch {old_epoch})" in stepped, stepped
    await produce(client, after[300:], 0.002)  # > the 200 ms a read it had issued may still block
    ids = await submit(client, [discovered("last")])
    uids = [*before, *during, *after, "last"]

    async def new_leader_caught_up() -> bool:
        # The commit records every applied entry id in a capped sorted set.
        return await client.zscore(KEYS.applied, ids[-1]) is not None

    await poll(
        new_leader_caught_up, 20, "the new leader applying the last event", detail=lambda: lost(client, old)
    )

    # Fencing: the paused leader wrote nothing after the takeover; versions and epochs only go up.
    assert await lease_holder(client) == (new_id, new_epoch)
    assert int(await client.get(KEYS.state_epoch)) == new_epoch
    deltas = await change_log(client)
    check_versions(deltas)
    assert all(d.epoch == new_epoch for d in deltas if d.version >= takeover_version)
    assert not [d.version for d in deltas if d.epoch == old_epoch and d.version >= takeover_version]
    check_no_duplicates(deltas)
    assert not any(f"{old_id} is leader" in line for line in old.lines[1:]), old.output

    # Nothing lost: every event the old leader read after it woke up must still be applied.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15  # a deposed leader's entries are claimed once idle 2 lease ttls
    while await pod_count(client) < len(uids):
        if loop.time() > deadline:
            raise EventsLost(await lost(client, old, uids))
        await asyncio.sleep(0.01)
    deltas = await change_log(client)
    check_exactly_once(deltas, uids)
    check_versions(deltas)


# ---- 3. a pod process dies, is quarantined, comes back and is readmitted -------------------------


def random_pod_addresses(n: int) -> list[str]:
    """Distinct loopback addresses, away from the ones conftest hands out in-process."""
    picked: set[str] = set()
    while len(picked) < n:
        picked.add(f"127.0.{random.randint(100, 249)}.{random.randint(2, 250)}")
    return sorted(picked)


async def start_pod(procs: Procs, name: str, ip: str, port: int = 0) -> tuple[Proc, int]:
    proc = await procs.start(name, *UPSTREAM, "--listen", f"{ip}:{port}")
    words = await proc.listening()
    bound_ip, _, bound_port = words[1].rpartition(":")
    assert bound_ip == ip, words
    return proc, int(bound_port)


async def test_quarantine_recovery_readmission_with_real_pod_process(
    valkey_server: EmbeddedValkey, client: avalkey.Valkey, procs: Procs, tmp_path: Path
) -> None:
    ip_a, ip_b = random_pod_addresses(2)
    pod_a, port_a = await start_pod(procs, "pod-a", ip_a)
    _, port_b = await start_pod(procs, "pod-b", ip_b)
    await procs.writer(valkey_server.url, "w1", "--lease-ttl", "1")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    router = await procs.start(
        "router", *FASTPROXY, "router", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--valkey", valkey_server.url, "--admin-token-file", str(token), "--instance", "router-1",
    )  # fmt: skip
    words = await router.listening()
    port = int(words[1].rsplit(":", 1)[1])
    admin = f"http://127.0.0.1:{int(words[3].rsplit(':', 1)[1])}"
    await poll(lambda: lease_holder(client), START, "the writer holds the lease")

    route = Route(service="chat", revisions=(WeightedRevision(revision="chat-v1", weight=100),))
    await submit(client, [
        RouteChanged(route=route, at=time.time()),
        discovered("a", ip=ip_a, port=port_a),
        discovered("b", ip=ip_b, port=port_b),
    ])  # fmt: skip

    async with httpx.AsyncClient(timeout=15) as http:
        auth = {"Authorization": "Bearer s3cret"}

        async def router_pods() -> dict[str, dict[str, Any]]:
            response = await http.get(f"{admin}/v1/pods", headers=auth)
            assert response.status_code == 200, response.text
            return {p["uid"]: p for p in response.json()}

        def in_router(
            predicate: Callable[[dict[str, dict[str, Any]]], bool],
        ) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return predicate(await router_pods())

            return check

        def ready(p: dict[str, Any] | None) -> bool:
            return p is not None and p["state"] == "ready" and not p["excluded"]

        await poll(in_router(lambda pods: ready(pods.get("a")) and ready(pods.get("b"))), 20,
                   "the router seeing both pods ready", detail=router_pods)  # fmt: skip
        # No request went through the router yet: it holds no pooled connection to A, so the next
        # request for A meets a refused connect (which it may retry elsewhere), never a dead keep-alive.
        await pod_a.kill()

        hit_a = False
        for _ in range(10):
            response = await http.get(f"http://127.0.0.1:{port}/", headers={"Host": "chat.example"})
            assert response.status_code == 200, (response.status_code, response.text)
            pods = await router_pods()
            if not ready(pods["a"]):
                hit_a = True
                break
        assert hit_a, "no request was ever sent to pod A (the router alternates between free pods)"

        async def a_quarantined() -> PodRecord | None:
            record = await stored_pod(client, "a")
            return record if record is not None and record.state is PodState.QUARANTINED else None

        quarantined = await poll(a_quarantined, 15, "the writer quarantining A",
                                 detail=lambda: stored_pod(client, "a"))  # fmt: skip
        assert "refused" in quarantined.reason and quarantined.source is Source.ROUTER, quarantined
        await poll(in_router(lambda pods: pods["a"]["state"] == "quarantined"), 15,
                   "the router seeing A quarantined", detail=router_pods)  # fmt: skip
        assert (await stored_pod(client, "b")).state is PodState.READY  # type: ignore[union-attr]
        # While A is away every request goes to B and succeeds.
        for _ in range(5):
            response = await http.get(f"http://127.0.0.1:{port}/", headers={"Host": "chat.example"})
            assert response.status_code == 200, (response.status_code, response.text)

        await start_pod(procs, "pod-a-again", ip_a, port_a)

        async def a_recovered() -> PodRecord | None:
            record = await stored_pod(client, "a")
            return record if record is not None and record.state is PodState.READY else None

        recovered = await poll(a_recovered, 20, "the writer's recovery check readmitting A",
                               detail=lambda: stored_pod(client, "a"))  # fmt: skip
        assert recovered.source is Source.WRITER and recovered.generation > quarantined.generation, recovered
        readmitted = in_router(
            lambda pods: ready(pods["a"]) and pods["a"]["generation"] == recovered.generation
        )
        await poll(readmitted, 15, "the router readmitting A", detail=router_pods)

        for _ in range(20):
            response = await http.get(f"http://127.0.0.1:{port}/", headers={"Host": "chat.example"})
            assert response.status_code == 200, (response.status_code, response.text)
        # Had a request to A failed, the router would have excluded and reported it again.
        pods = await router_pods()
        assert ready(pods["a"]) and ready(pods["b"]), pods
        assert await stored_pod(client, "a") == recovered

        # A really serves again: each pod has one slot, so of two slow requests in flight at once,
        # one must be at A.
        slow = [
            asyncio.create_task(
                http.get(f"http://127.0.0.1:{port}/delay/3000", headers={"Host": "chat.example"})
            )
            for _ in range(2)
        ]
        try:
            await poll(in_router(lambda pods: pods["a"]["inflight"] == 1 and pods["b"]["inflight"] == 1), 10,
                       "one slow request in flight at each pod", detail=router_pods)  # fmt: skip
            assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        finally:
            for task in slow:
                task.cancel()
            await asyncio.gather(*slow, return_exceptions=True)
