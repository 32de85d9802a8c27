"""The leader's steady state (``Writer.run``: its own connection, the commit and the next read in one
write, the commit script's multi-argument writes) against a real valkey-server.

What must hold whatever the batch shape: Valkey ends up holding exactly the writer's memory (pods,
pod-chunks, versions, applied ids), every delivered entry is acknowledged, a flushed script cache
is survived without losing the lead, and a stopping leader leaves nothing delivered unapplied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.keys import (
    EVENTS_GROUP,
    INDEX_MARKER_FIELD,
    Keys,
    chunk_fields,
    pod_chunk,
    revision_index_fields,
    stream_id_key,
)
from statesync.schema import (
    PodDiscovered,
    PodRemoved,
    PodState,
    ReadinessChanged,
    Source,
    decode_chunk_numbers,
    decode_delta,
    decode_pod,
    decode_pods,
    encode,
)
from statesync.writer import Writer, submit
from tests.conftest import wait_for


@pytest.fixture
def valkey_server() -> EmbeddedValkey:
    server = EmbeddedValkey().start()
    yield server
    server.close()


def discovered(i: int) -> PodDiscovered:
    return PodDiscovered(
        uid=f"pod-{i:05d}", source=Source.SIDECAR, at=time.time(), namespace="ml", revision=f"rev-{i % 7}",
        ip=f"127.0.{i // 250}.{i % 250 + 1}", port=8000, ready=True,
    )  # fmt: skip


@pytest.fixture
async def leader(valkey_server: EmbeddedValkey) -> AsyncIterator[Writer]:
    writer = Writer(connect(valkey_server.url), writer_id="w1", lease_ttl=2.0)
    task = asyncio.create_task(writer.run())
    await asyncio.wait_for(writer.became_leader.wait(), 10)
    yield writer
    writer.stop()
    await asyncio.wait_for(task, 10)
    await writer.client.aclose()


async def submitted_and_applied(
    writer: Writer, events: list[PodDiscovered | PodRemoved | ReadinessChanged]
) -> None:
    ids = await submit(writer.client, events, writer.keys)  # type: ignore[arg-type]
    target = stream_id_key(ids[-1])
    await wait_for(lambda: stream_id_key(writer.state.applied) >= target, 10, "writer applied the events")


async def assert_valkey_mirrors(writer: Writer) -> None:
    client, keys, state = writer.client, writer.keys, writer.state
    stored = {uid.decode(): decode_pod(raw) for uid, raw in (await client.hgetall(keys.pods)).items()}
    assert stored == state.pods
    live = {uid: p for uid, p in state.pods.items() if p.state is not PodState.REMOVED}
    stored_hash = await client.hgetall(keys.pod_chunks)
    chunks = chunk_fields(stored_hash)
    # one field per chunk that has live pods (emptied chunks deleted), each holding exactly them
    assert set(chunks) == {pod_chunk(uid) for uid in live}
    assert {p.uid: p for blob in chunks.values() for p in decode_pods(blob)} == live
    # the revision index: per revision with live pods, exactly the chunks holding them, at the version
    index = {
        revision: decode_chunk_numbers(raw) for revision, raw in revision_index_fields(stored_hash).items()
    }
    expected: dict[str, set[int]] = {}
    for uid, pod in live.items():
        expected.setdefault(pod.revision, set()).add(pod_chunk(uid))
    assert index == {revision: sorted(numbers) for revision, numbers in expected.items()}
    assert stored_hash[INDEX_MARKER_FIELD] == b"%d" % state.version
    assert int(await client.get(keys.version)) == state.version
    assert int(await client.get(keys.chunks_version)) == state.version
    assert int(await client.get(keys.state_epoch)) == writer.epoch
    applied = {member.decode() for member in await client.zrange(keys.applied, 0, -1)}
    assert applied == state.applied_ids
    pending = await client.xpending(keys.events, EVENTS_GROUP)
    assert pending["pending"] == 0  # everything delivered was acknowledged with its commit


async def test_big_batches_and_emptied_chunks_are_committed_exactly(leader: Writer) -> None:
    """Batches of up to 1000 events: every multi-argument write (pods, chunks, applied ids, acks) is
    split under the script's argument limit and lands whole; removals empty chunks, which go."""
    await submitted_and_applied(leader, [discovered(i) for i in range(2500)])
    assert len(leader.state.pods) == 2500
    await assert_valkey_mirrors(leader)
    # remove most of the fleet in one go: many chunks empty, others shrink
    await submitted_and_applied(
        leader, [PodRemoved(uid=f"pod-{i:05d}", source=Source.INFORMER, at=time.time()) for i in range(2300)]
    )
    assert sum(p.state is not PodState.REMOVED for p in leader.state.pods.values()) == 200
    await assert_valkey_mirrors(leader)


async def test_single_events_each_publish_one_delta_in_order(leader: Writer) -> None:
    """One event at a time (the propagation path): one commit and one delta per event, versions
    consecutive, every delta of this term's epoch."""
    await submitted_and_applied(leader, [discovered(i) for i in range(20)])
    pubsub = leader.client.pubsub()
    await pubsub.subscribe(leader.keys.channel)
    start = leader.state.version
    for i in range(20):
        await submitted_and_applied(
            leader, [ReadinessChanged(uid=f"pod-{i:05d}", source=Source.SIDECAR, at=time.time(), ready=False)]
        )
    deltas = []
    while len(deltas) < 20:
        message = await pubsub.get_message(timeout=5.0)
        assert message is not None, f"only {len(deltas)} deltas published"
        if message["type"] == "message" and message["data"][:1] == b"D":
            deltas.append(decode_delta(message["data"][1:]))
    await pubsub.aclose()
    assert [d.version for d in deltas] == list(range(start + 1, start + 21))
    assert {d.epoch for d in deltas} == {leader.epoch}
    assert [d.pods[0].uid for d in deltas] == [f"pod-{i:05d}" for i in range(20)]
    await assert_valkey_mirrors(leader)


async def test_a_flushed_script_cache_does_not_cost_the_lead(leader: Writer) -> None:
    await submitted_and_applied(leader, [discovered(i) for i in range(3)])
    epoch = leader.epoch
    await leader.client.script_flush()
    await submitted_and_applied(leader, [discovered(i) for i in range(3, 6)])
    assert leader.leader and leader.epoch == epoch
    assert len(leader.state.pods) == 6
    await assert_valkey_mirrors(leader)


async def test_a_stopping_leader_leaves_nothing_delivered_unapplied(valkey_server: EmbeddedValkey) -> None:
    """Stop while events keep arriving: whatever the leader's reads took (including the read that
    went out with its last commit) is applied and acknowledged before it returns."""
    client = connect(valkey_server.url)
    writer = Writer(client, writer_id="w1", lease_ttl=2.0)
    task = asyncio.create_task(writer.run())
    await asyncio.wait_for(writer.became_leader.wait(), 10)
    keys = Keys()
    for i in range(200):
        await client.xadd(keys.events, {"e": encode(discovered(i))})
        if i == 150:
            writer.stop()
    await asyncio.wait_for(task, 10)
    pending = await client.xpending(keys.events, EVENTS_GROUP)
    assert pending["pending"] == 0
    groups = await client.xinfo_groups(keys.events)
    delivered = stream_id_key(groups[0]["last-delivered-id"])
    entries = await client.xrange(keys.events)
    taken = {eid.decode() for eid, _ in entries if stream_id_key(eid) <= delivered}
    assert taken <= writer.state.applied_ids  # every entry the group handed out was applied
    await client.aclose()
