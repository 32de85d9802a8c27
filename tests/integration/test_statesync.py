"""State sync against a real valkey-server: writer, fencing, followers, gaps, freezes, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from fastproxy.config import RouterConfig
from fastproxy.router import Router
from fastproxy.slots import UnreadRecords
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.keys import (
    INDEX_MARKER_FIELD,
    Keys,
    chunk_fields,
    pod_chunk,
    revision_index_fields,
    stream_id_key,
)
from statesync.schema import (
    AffinityPolicy,
    ConnectFailed,
    ConnectFailureKind,
    LLMRouting,
    PodDiscovered,
    PodRecord,
    PodRemoved,
    PodState,
    ReadinessChanged,
    Route,
    RouteChanged,
    Source,
    WeightedRevision,
    decode_chunk_numbers,
    decode_delta,
    decode_pods,
    is_map_form,
    pack_array,
)
from statesync.subscriber import StateFollower
from statesync.writer import Fenced, Writer, submit
from tests.conftest import wait_for


@pytest.fixture
def valkey_server() -> EmbeddedValkey:
    server = EmbeddedValkey().start()
    yield server
    server.close()


def discovered(
    uid: str, ready: bool = True, revision: str = "chat-v1", ip: str = "127.0.9.1"
) -> PodDiscovered:
    return PodDiscovered(
        uid=uid, source=Source.SIDECAR, at=time.time(), namespace="ml", revision=revision, ip=ip, port=8000,
        ready=ready,
    )  # fmt: skip


ROUTE = RouteChanged(
    route=Route(service="chat", revisions=(WeightedRevision(revision="chat-v1", weight=100),))
)


class Cluster:
    """A writer task and N router followers on one Valkey, all in this event loop."""

    def __init__(self, server: EmbeddedValkey, routers: int = 1) -> None:
        self.server = server
        self.client = connect(server.url)
        self.writer = Writer(connect(server.url), writer_id="w1", lease_ttl=1.0)
        self.routers = [Router(RouterConfig(), asyncio.get_running_loop()) for _ in range(routers)]
        self.followers = [
            StateFollower(r, server.url, heartbeat_timeout=1.5, retry_delay=0.05) for r in self.routers
        ]
        self.tasks: list[asyncio.Task[None]] = []
        self.last_submitted = "0-0"

    async def start(self) -> Cluster:
        self.tasks.append(asyncio.create_task(self.writer.run()))
        await asyncio.wait_for(self.writer.became_leader.wait(), 10)
        self.tasks += [asyncio.create_task(f.run()) for f in self.followers]
        for follower in self.followers:
            await asyncio.wait_for(follower.synced.wait(), 10)
        return self

    async def submit(self, *events: object) -> None:
        ids = await submit(self.client, list(events))  # type: ignore[arg-type]
        self.last_submitted = ids[-1].decode()

    async def converged(self, timeout: float = 10.0) -> None:
        """The writer has applied everything submitted, and every router has its version."""
        target = stream_id_key(self.last_submitted)
        await wait_for(
            lambda: stream_id_key(self.writer.state.applied) >= target, timeout, "writer caught up"
        )
        await wait_for(
            lambda: all(
                r.snapshot.version == self.writer.state.version and not r.stale for r in self.routers
            ),
            timeout,
            "routers at the writer's version",
        )

    async def close(self) -> None:
        gc.unfreeze()  # (what the routers' warm-ups froze: back in the collector's sight)
        self.writer.stop()
        for follower in self.followers:
            follower.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task


@pytest.fixture
async def cluster(valkey_server: EmbeddedValkey) -> AsyncIterator[Cluster]:
    c = Cluster(valkey_server, routers=2)
    await c.start()
    yield c
    await c.close()


async def test_events_reach_every_router_in_version_order(cluster: Cluster) -> None:
    await cluster.submit(ROUTE, discovered("a"), discovered("b"), discovered("c", ready=False))
    await wait_for(lambda: all(len(r.snapshot.pods) == 3 for r in cluster.routers), what="3 pods everywhere")
    await cluster.submit(ReadinessChanged(uid="c", source=Source.SIDECAR, ready=True))
    await wait_for(
        lambda: all(r.snapshot.pods["c"].state is PodState.READY for r in cluster.routers), what="c ready"
    )
    await cluster.converged()
    for router in cluster.routers:
        assert router.slots.pick("chat-v1") is not None
        assert router.snapshot.route_table.by_service["chat"].revisions == ("chat-v1",)
    # every adopted full read ends its warm-up by freezing what it loaded (fastproxy.gcwatch)
    for follower in cluster.followers:
        await follower.warmed()
    assert gc.get_freeze_count() > 0


async def test_a_routes_affinity_wait_reaches_every_router_through_the_writer(cluster: Cluster) -> None:
    """RouteChanged with an llm section's affinity_wait_ms: the writer commits it, every router's
    compiled route carries it (seconds), and a change that unsets it hands back to the router's flag."""

    def with_wait(**wait: int) -> RouteChanged:
        llm = LLMRouting(policy=AffinityPolicy.PREFIX, session_header="x-session", **wait)
        return RouteChanged(route=msgspec.structs.replace(ROUTE.route, llm=llm))

    def waits() -> list[float]:
        return [r.snapshot.route_table.by_service["chat"].llm.affinity_wait for r in cluster.routers]  # type: ignore[union-attr]

    await cluster.submit(with_wait(affinity_wait_ms=250), discovered("a"))
    await cluster.converged()
    assert waits() == [0.25, 0.25]
    assert cluster.writer.state.routes["chat"].llm.affinity_wait_ms == 250  # type: ignore[union-attr]
    await cluster.submit(with_wait())
    await cluster.converged()
    assert waits() == [-1.0, -1.0]  # unset: each router's --affinity-wait-ms
    # a router that starts now reads the route from Valkey's whole state, not from a delta
    late = Router(RouterConfig(), asyncio.get_running_loop())
    follower = StateFollower(late, cluster.server.url, heartbeat_timeout=1.5, retry_delay=0.05)
    await cluster.submit(with_wait(affinity_wait_ms=0))
    await cluster.converged()
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.synced.wait(), 10)
        assert late.snapshot.route_table.by_service["chat"].llm.affinity_wait == 0.0  # type: ignore[union-attr]
    finally:
        follower.stop()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def test_killed_pubsub_connection_is_resynced_with_nothing_missed(cluster: Cluster) -> None:
    await cluster.submit(ROUTE, discovered("a"))
    await cluster.converged()
    admin = connect(cluster.server.url)
    await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    # Published while the subscribers are reconnecting: at-most-once pub/sub drops these.
    await cluster.submit(*(discovered(f"gap-{i}") for i in range(20)))
    await cluster.converged()
    for router in cluster.routers:
        assert {f"gap-{i}" for i in range(20)} <= set(router.snapshot.pods.keys())
    assert all(f.sessions >= 2 for f in cluster.followers)


async def test_frozen_valkey_routers_serve_stale_then_converge(cluster: Cluster) -> None:
    await cluster.submit(ROUTE, discovered("a"))
    await cluster.converged()
    cluster.server.pause()
    try:
        await wait_for(lambda: all(r.stale for r in cluster.routers), timeout=10, what="routers stale")
        for router in cluster.routers:
            assert router.snapshot.pods["a"].state is PodState.READY  # still serving the last snapshot
            assert router.slots.pick("chat-v1") is not None
    finally:
        cluster.server.resume()
    await cluster.submit(discovered("after-freeze"))
    await wait_for(lambda: all("after-freeze" in r.snapshot.pods for r in cluster.routers), timeout=15,
                   what="new pod after freeze")  # fmt: skip
    await cluster.converged(timeout=15)


FREEZE_SECONDS = 10.0


@pytest.mark.slow
async def test_valkey_frozen_10s_routers_keep_serving_then_converge(cluster: Cluster) -> None:
    """SIGSTOP for 10 s: longer than the heartbeat timeout, the writer's lease and the clients'
    socket timeout, so every session and the leadership lapse and must be re-established."""
    await cluster.submit(ROUTE, *(discovered(f"p{i}", ip=f"127.0.9.{i + 1}") for i in range(4)))
    await cluster.converged()
    epoch_before = cluster.writer.epoch
    sessions_before = [f.sessions for f in cluster.followers]
    loop = asyncio.get_running_loop()
    cluster.server.pause()
    frozen_at = loop.time()
    picks = 0
    try:
        await wait_for(lambda: all(r.stale for r in cluster.routers), timeout=5, what="routers stale")
        while loop.time() - frozen_at < FREEZE_SECONDS:
            for router in cluster.routers:
                assert router.stale
                assert len(router.snapshot.pods) == 4
                lease = router.slots.pick("chat-v1")  # still serving from the last snapshot
                assert lease is not None
                release, record = lease
                assert record.state is PodState.READY
                release()
                picks += 1
            await asyncio.sleep(0.2)  # the freeze's length is the scenario, not a synchronisation
    finally:
        cluster.server.resume()
    assert picks >= 2 * len(cluster.routers) * 10
    # After SIGCONT: the sessions are new ones, and a change made now reaches every router.
    await cluster.submit(ReadinessChanged(uid="p0", source=Source.SIDECAR, ready=False), discovered("after"))
    await wait_for(
        lambda: all("after" in r.snapshot.pods and r.snapshot.pods["p0"].state is PodState.NOT_READY
                    for r in cluster.routers),
        timeout=20, what="changes after the freeze reached every router",
    )  # fmt: skip
    await cluster.converged(timeout=20)
    assert cluster.writer.epoch > epoch_before  # the lease lapsed during the freeze
    for router in cluster.routers:
        assert not router.stale
        assert router.snapshot.epoch == cluster.writer.epoch
        assert router.slots.pick("chat-v1") is not None
    assert all(f.sessions > before for f, before in zip(cluster.followers, sessions_before, strict=True))


async def test_valkey_restarted_empty_never_moves_routers_backwards(cluster: Cluster) -> None:
    await cluster.submit(ROUTE, discovered("a"), discovered("b"))
    await cluster.converged()
    before = [(r.snapshot.epoch, r.snapshot.version) for r in cluster.routers]
    first_epoch = cluster.writer.epoch
    cluster.server.restart_empty()
    # While Valkey is empty and the writer is re-establishing itself, routers keep what they have.
    await asyncio.sleep(0)  # let callbacks run once; the checks below wait on conditions
    await wait_for(
        lambda: cluster.writer.leader and cluster.writer.epoch > first_epoch, timeout=15, what="writer re-led"
    )
    await wait_for(
        lambda: all(r.snapshot.epoch == cluster.writer.epoch and not r.stale for r in cluster.routers),
        timeout=15, what="routers on the new epoch",
    )  # fmt: skip
    for router, old in zip(cluster.routers, before, strict=True):
        assert (router.snapshot.epoch, router.snapshot.version) > old  # a new term: ordered first by epoch
        assert set(router.snapshot.pods.keys()) == {"a", "b"}
    # The writer re-committed everything, its revision index too: a router starting now uses it.
    starting = Router(RouterConfig(), asyncio.get_running_loop())
    client = connect(cluster.server.url)
    await StateFollower(starting, cluster.server.url).resync(client)
    assert isinstance(starting.slots.revisions["chat-v1"].pending, UnreadRecords)
    assert set(starting.snapshot.pods.keys()) == {"a", "b"}
    assert starting.slots.pick("chat-v1") is not None
    await client.aclose()


async def test_an_empty_valkey_at_start_is_one_info_line_not_a_warning(
    valkey_server: EmbeddedValkey, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh start (no writer commit yet) is normal: said once at INFO, however often it is read."""
    router = Router(RouterConfig(), asyncio.get_running_loop())
    follower = StateFollower(router, valkey_server.url)
    client = connect(valkey_server.url)
    with caplog.at_level("INFO", logger="fastproxy.statesync"):
        for _ in range(3):
            await follower.resync(client)
    await client.aclose()
    said = [r for r in caplog.records if "routing state" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        ("INFO", "no routing state in Valkey yet: waiting for the writer's first commit")
    ]
    assert not router.stale and router.snapshot.version == 0


async def test_replayed_entries_are_not_applied_twice(valkey_server: EmbeddedValkey) -> None:
    client = connect(valkey_server.url)
    writer = Writer(connect(valkey_server.url), writer_id="w1")
    await writer.ensure_group()
    assert await writer.try_acquire()
    await submit(client, [discovered("a"), ReadinessChanged(uid="a", source=Source.SIDECAR, ready=False)])
    entries = await writer.read_batch()
    await writer.process(entries)
    version = writer.state.version
    # A crash after the commit but before the ack would replay the same entries:
    await writer.process(entries)
    assert writer.state.version == version
    assert writer.state.pods["a"].state is PodState.NOT_READY
    changes = await client.xrange(Keys().changes)
    assert len(changes) == 1


async def test_deposed_leader_cannot_write(valkey_server: EmbeddedValkey) -> None:
    client = connect(valkey_server.url)
    old = Writer(connect(valkey_server.url), writer_id="old", lease_ttl=0.3)
    new = Writer(connect(valkey_server.url), writer_id="new", lease_ttl=5)
    await old.ensure_group()
    assert await old.try_acquire()
    await submit(client, [discovered("a")])
    await old.process(await old.read_batch())
    # The old leader pauses past its lease; the new one takes over.
    await asyncio.sleep(0.5)  # the lease must expire by wall clock; nothing to wait on
    assert await new.try_acquire()
    assert new.epoch > old.epoch
    await submit(client, [discovered("b")])
    entries = await old.read_batch()
    with pytest.raises(Fenced):
        await old.process(entries)
    assert not old.leader
    stored = await client.hgetall(Keys().pods)
    assert b"b" not in stored  # the fenced write left nothing behind
    await new.process(await new.claim_pending())
    assert b"b" in await client.hgetall(Keys().pods)
    versions = [decode_delta(f[b"d"]).version for _, f in await client.xrange(Keys().changes)]
    assert versions == sorted(set(versions))


async def test_quarantine_corroboration_and_cap(valkey_server: EmbeddedValkey) -> None:
    client = connect(valkey_server.url)
    writer = Writer(connect(valkey_server.url), writer_id="w1")
    await writer.ensure_group()
    assert await writer.try_acquire()
    await submit(client, [discovered(f"p{i}", ip=f"127.0.9.{i + 1}") for i in range(4)])
    await writer.process(await writer.read_batch())

    def failed(uid: str, observer: str) -> ConnectFailed:
        return ConnectFailed(uid=uid, source=Source.ROUTER, generation=1, failure=ConnectFailureKind.REFUSED,
                             observer=observer)  # fmt: skip

    # One observer reports every pod: only up to half of the revision is quarantined on its word.
    await submit(client, [failed(f"p{i}", "router-a") for i in range(4)])
    await writer.process(await writer.read_batch())
    states = [writer.state.pods[f"p{i}"].state for i in range(4)]
    assert states.count(PodState.QUARANTINED) == 2
    # A second observer corroborates p3: now it is quarantined too.
    await submit(client, [failed("p3", "router-b")])
    await writer.process(await writer.read_batch())
    assert writer.state.pods["p3"].state is PodState.QUARANTINED
    assert writer.policy.held >= 2


async def test_acknowledged_events_are_trimmed_from_the_stream(valkey_server: EmbeddedValkey) -> None:
    client = connect(valkey_server.url)
    writer = Writer(connect(valkey_server.url), writer_id="w1")
    await writer.ensure_group()
    assert await writer.try_acquire()
    await submit(client, [discovered(f"p{i}") for i in range(200)])
    await writer.process(await writer.read_batch())
    assert await client.xlen(Keys().events) == 200
    await writer.trim_events()
    assert await client.xlen(Keys().events) <= 101  # approximate trim: whole macro nodes go
    # Unacknowledged entries are never trimmed.
    await submit(client, [discovered("late")])
    entries = await writer.read_batch()  # read but not processed, so not acknowledged
    await writer.trim_events()
    assert any(e[0] == entries[0][0] for e in await client.xrange(Keys().events))


async def leading_writer(url: str, writer_id: str = "w1") -> Writer:
    writer = Writer(connect(url), writer_id=writer_id)
    await writer.ensure_group()
    assert await writer.try_acquire()
    return writer


async def committed(writer: Writer, events: list[Any]) -> None:
    """Submit ``events`` and have ``writer`` apply and commit all of them."""
    await submit(writer.client, events)
    while entries := await writer.read_batch(block_ms=50):
        await writer.process(entries)


async def test_pod_chunks_mirror_live_records_and_stale_chunks_are_never_used(
    valkey_server: EmbeddedValkey,
) -> None:
    client = connect(valkey_server.url)
    keys = Keys()
    writer = await leading_writer(valkey_server.url)
    await committed(writer, [discovered(f"p{i}", ip=f"127.0.9.{i + 1}") for i in range(40)]
                    + [PodRemoved(uid="p3", source=Source.INFORMER), PodRemoved(uid="p7", source=Source.INFORMER)])  # fmt: skip

    async def chunked() -> dict[str, PodRecord]:
        stored = chunk_fields(await client.hgetall(keys.pod_chunks))
        return {p.uid: p for blob in stored.values() for p in decode_pods(blob)}

    live = {uid: r for uid, r in writer.state.pods.items() if r.state is not PodState.REMOVED}
    assert len(live) == 38 and await chunked() == live
    assert int(await client.get(keys.chunks_version)) == writer.state.version

    router = Router(RouterConfig(), asyncio.get_running_loop())
    await StateFollower(router, valkey_server.url).resync(client)
    assert dict(router.snapshot.pods.items()) == live
    # every chunk became the snapshot's chunk of the same number; the slot table warms up after
    assert all(router.snapshot.pods._outer[pod_chunk(uid) >> 6][pod_chunk(uid) & 63] for uid in live)
    await wait_for(lambda: len(router.slots.pods) == 38, what="every revision's slots after the bootstrap")
    assert all(r.pending is None for r in router.slots.revisions.values())
    assert router.slots.pick(live["p0"].revision) is not None

    # Chunks behind the version (as a writer that predates them leaves them): a router reads the
    # per-pod hash instead, and the next leader repacks them at takeover.
    await client.hdel(keys.pod_chunks, *await client.hkeys(keys.pod_chunks))
    await client.set(keys.chunks_version, writer.state.version - 1)
    other = Router(RouterConfig(), asyncio.get_running_loop())
    await StateFollower(other, valkey_server.url).resync(client)
    assert dict(other.snapshot.pods.items()) == live
    await client.delete(keys.lease)
    successor = Writer(connect(valkey_server.url), writer_id="w2")
    assert await successor.try_acquire()
    assert await chunked() == live
    assert int(await client.get(keys.chunks_version)) == successor.state.version


async def test_a_state_left_in_the_earlier_map_form_is_read_and_repacked(
    valkey_server: EmbeddedValkey,
) -> None:
    """Records were msgpack maps before they became arrays. A router reads a state an older writer
    left (per-pod hash and chunks of maps); a new leader taking over repacks every chunk in the
    array form, even though the chunks are at the state's version, and carries on from there."""
    client = connect(valkey_server.url)
    keys = Keys()
    writer = await leading_writer(valkey_server.url)
    await committed(writer, [discovered(f"p{i}", ip=f"127.0.9.{i + 1}") for i in range(30)])
    live = dict(writer.state.pods)

    def map_form(record: PodRecord) -> bytes:
        return msgspec.msgpack.encode(msgspec.structs.asdict(record))

    # What a writer of the earlier form leaves: every stored record a map.
    await client.hset(keys.pods, mapping={uid: map_form(r) for uid, r in live.items()})
    chunks: dict[int, list[bytes]] = {}
    for record in live.values():
        chunks.setdefault(pod_chunk(record.uid), []).append(map_form(record))
    await client.delete(keys.pod_chunks)
    await client.hset(keys.pod_chunks, mapping={n: pack_array(members) for n, members in chunks.items()})
    assert int(await client.get(keys.chunks_version)) == writer.state.version
    writer.leader = False
    await client.delete(keys.lease)

    router = Router(RouterConfig(), asyncio.get_running_loop())
    await StateFollower(router, valkey_server.url).resync(client)
    assert dict(router.snapshot.pods.items()) == live

    successor = Writer(connect(valkey_server.url), writer_id="w2")
    assert await successor.try_acquire()
    assert successor.state.pods == live
    repacked = chunk_fields(await client.hgetall(keys.pod_chunks))
    for blob in repacked.values():
        assert all(isinstance(record, list) for record in msgspec.msgpack.decode(blob))
    assert {p.uid: p for blob in repacked.values() for p in decode_pods(blob)} == live

    # The new leader's commits (array form) land beside the remaining map-form records.
    await committed(
        successor, [ReadinessChanged(uid="p4", source=Source.SIDECAR, ready=False, at=time.time())]
    )
    await StateFollower(router, valkey_server.url).catch_up(client)
    assert router.snapshot.pods["p4"].state is PodState.NOT_READY
    assert router.snapshot.version == successor.state.version
    stored = await client.hgetall(keys.pods)
    assert not is_map_form(stored[b"p4"]) and is_map_form(stored[b"p5"])
    fresh = Router(RouterConfig(), asyncio.get_running_loop())
    follower = StateFollower(fresh, valkey_server.url)
    follower._chunks_readable = False  # the per-pod hash, mixed forms
    await follower.resync(client)
    assert dict(fresh.snapshot.pods.items()) == successor.state.pods


async def test_without_a_current_revision_index_a_starting_router_decodes_everything(
    valkey_server: EmbeddedValkey,
) -> None:
    """A writer that predates the revision index keeps the chunks but not the index (its ``@index``
    stays behind): a starting router then decodes every chunk, and the next leader rewrites the
    index at takeover."""
    client = connect(valkey_server.url)
    keys = Keys()
    writer = await leading_writer(valkey_server.url)
    await committed(
        writer, [discovered(f"p{i}", revision=f"rev-{i % 3}", ip=f"127.0.9.{i + 1}") for i in range(30)]
    )
    live = dict(writer.state.pods)
    index_fields = [f for f in await client.hkeys(keys.pod_chunks) if not f.isdigit()]
    assert INDEX_MARKER_FIELD in index_fields and len(index_fields) == 4
    await client.hdel(keys.pod_chunks, *index_fields)
    await client.hset(keys.pod_chunks, "a-field-of-a-later-version", b"\x07")  # (ignored by readers)
    writer.leader = False
    await client.delete(keys.lease)

    router = Router(RouterConfig(), asyncio.get_running_loop())
    await StateFollower(router, valkey_server.url).resync(client)
    assert dict(router.snapshot.pods.items()) == live
    assert all(isinstance(r.pending, list) for r in router.slots.revisions.values())  # decoded

    successor = Writer(connect(valkey_server.url), writer_id="w2")
    assert await successor.try_acquire()
    stored = await client.hgetall(keys.pod_chunks)
    assert stored[INDEX_MARKER_FIELD] == b"%d" % successor.state.version
    index = {rev: decode_chunk_numbers(raw) for rev, raw in revision_index_fields(stored).items()}
    assert index == {f"rev-{k}": sorted({pod_chunk(f"p{i}") for i in range(k, 30, 3)}) for k in range(3)}
    await client.hset(keys.pod_chunks, "a-field-of-a-later-version", b"\x07")
    starting = Router(RouterConfig(), asyncio.get_running_loop())
    await StateFollower(starting, valkey_server.url).resync(client)
    assert all(isinstance(r.pending, UnreadRecords) for r in starting.slots.revisions.values())
    assert dict(starting.snapshot.pods.items()) == live


async def test_a_running_routers_full_read_reconciles_only_what_changed(
    valkey_server: EmbeddedValkey,
) -> None:
    """A router that follows the state and reads it whole again (a reconnect) keeps every chunk
    whose bytes did not change as it is, decodes the others, and reconciles only the pods that
    differ: the pods it has in flight keep their counts, removed ones go, new ones come."""
    client = connect(valkey_server.url)
    writer = await leading_writer(valkey_server.url)
    await committed(writer, [discovered(f"p{i}", revision=f"rev-{i % 3}", ip=f"127.0.{9 + i // 250}.{1 + i % 250}")
                     for i in range(600)])  # fmt: skip
    by_chunk: dict[int, list[str]] = {}
    for i in range(600):
        by_chunk.setdefault(pod_chunk(f"p{i}"), []).append(f"p{i}")
    shares = next(uids[0] for uids in by_chunk.values() if len(uids) > 1 and "p1" not in uids)
    alone = next(uids[0] for uids in by_chunk.values() if len(uids) == 1 and uids[0] != "p1")
    router = Router(RouterConfig(), asyncio.get_running_loop())
    follower = StateFollower(router, valkey_server.url)
    await follower.resync(client)
    await follower.warmed()
    lease = router.slots.pick("rev-0")
    assert lease is not None
    held = lease[1].uid
    before = router.snapshot.pods
    # Changes the router does not hear of (no subscription here), then a full read.
    await committed(writer, [
        ReadinessChanged(uid="p1", source=Source.SIDECAR, ready=False, at=time.time()),
        PodRemoved(uid=shares, source=Source.INFORMER),  # (its chunk keeps other pods)
        PodRemoved(uid=alone, source=Source.INFORMER),  # (its chunk is emptied)
        discovered("p700", revision="rev-1", ip="127.0.20.1"),
        discovered("p701", revision="rev-new", ip="127.0.20.2"),
    ])  # fmt: skip
    await follower.resync(client)
    after = router.snapshot.pods
    live = {uid: r for uid, r in writer.state.pods.items() if r.state is not PodState.REMOVED}
    assert dict(after.items()) == live and router.snapshot.version == writer.state.version
    touched = {pod_chunk(uid) for uid in ("p1", shares, alone, "p700", "p701")}
    for number in before.occupied_chunks():
        if number not in touched:
            assert after._outer[number >> 6][number & 63] is before._outer[number >> 6][number & 63]
    slots = router.slots
    assert slots.pods[held].inflight == 1  # (the same PodSlots: reconciled, not rebuilt)
    assert shares not in slots.pods and alone not in slots.pods and not slots.pods["p1"].routable
    assert slots.pods["p700"].routable and slots.pick("rev-new") is not None
    # The same state read by a starting router gives the same routable pods.
    other = Router(RouterConfig(), asyncio.get_running_loop())
    other_follower = StateFollower(other, valkey_server.url)
    await other_follower.resync(client)
    await other_follower.warmed()
    lease[0]()

    def routable(r: Router) -> set[str]:
        return {uid for uid, p in r.slots.pods.items() if p.routable}

    assert (
        routable(router) == routable(other) == {uid for uid, r in live.items() if r.state is PodState.READY}
    )
