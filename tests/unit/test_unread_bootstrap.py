"""A starting router installs the writer's chunks undecoded and reads a revision when first used.

Covers ``SnapshotBuilder.add_packed_chunk`` / ``PodTable`` with packed leaves (decoded on first
use, once, in place), ``SlotTable.adopt_unread`` and ``Router.install(revision_chunks=...)``:
- only the chunks of a revision that is used get decoded;
- differential: after any sequence of deltas (pods joining a revision in chunks its index does not
  name, leaving it, flipping), a router started from packed chunks has exactly the slots, states
  and routable pods of a router that decoded everything at its bootstrap;
- a chunk that does not decode is logged and its pods left out, not raised into a request;
- the record count of a packed chunk comes from its msgpack header.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator

import pytest

from fastproxy.config import RouterConfig
from fastproxy.router import Router
from fastproxy.snapshot import SnapshotBuilder, packed_length
from statesync.keys import pod_chunk
from statesync.schema import Delta, PodRecord, PodState, SchemaError, encode, pack_array


def pod(uid: str, revision: str, state: PodState = PodState.READY, gen: int = 1, cc: int = 1) -> PodRecord:
    return PodRecord(uid=uid, namespace="ml", revision=revision, ip="127.0.0.4", port=8000, state=state,
                     generation=gen, concurrency=cc)  # fmt: skip


def packed(records: list[PodRecord]) -> tuple[dict[int, bytes], dict[str, list[int]]]:
    """What the writer keeps in ``pod-chunks``: the chunks, and the revision index."""
    members: dict[int, list[bytes]] = {}
    index: dict[str, set[int]] = {}
    for record in records:
        members.setdefault(pod_chunk(record.uid), []).append(encode(record))
        index.setdefault(record.revision, set()).add(pod_chunk(record.uid))
    chunks = {number: pack_array(blobs) for number, blobs in members.items()}
    return chunks, {revision: sorted(numbers) for revision, numbers in index.items()}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def started_from_packed(loop: asyncio.AbstractEventLoop, records: list[PodRecord], seed: int = 0) -> Router:
    chunks, index = packed(records)
    builder = SnapshotBuilder()
    for number, raw in chunks.items():
        builder.add_packed_chunk(number, raw)
    router = Router(RouterConfig(), loop)
    router.slots._random.seed(seed)
    router.install(builder.finish(1, 1), revision_chunks=index)
    return router


def started_decoded(loop: asyncio.AbstractEventLoop, records: list[PodRecord], seed: int = 0) -> Router:
    builder = SnapshotBuilder()
    builder.add(records)
    router = Router(RouterConfig(), loop)
    router.slots._random.seed(seed)
    router.install(builder.finish(1, 1), builder.by_revision)
    return router


def decoded_chunks(router: Router) -> set[int]:
    outer = router.snapshot.pods._outer
    return {high * 64 + low for high, inner in enumerate(outer) for low, leaf in enumerate(inner)
            if isinstance(leaf, list) and leaf}  # fmt: skip


def test_only_the_chunks_of_a_used_revision_are_decoded(loop: asyncio.AbstractEventLoop) -> None:
    records = [pod(f"p{i}", f"r{i % 10}") for i in range(300)]
    router = started_from_packed(loop, records)
    assert len(router.snapshot.pods) == 300 and decoded_chunks(router) == set()
    lease = router.slots.pick("r3")
    assert lease is not None and lease[1].revision == "r3"
    assert decoded_chunks(router) == {pod_chunk(r.uid) for r in records if r.revision == "r3"}
    assert set(router.slots.revisions["r3"].members) == {r.uid for r in records if r.revision == "r3"}
    assert router.slots.revisions["r4"].pending is not None
    # a lookup decodes the one chunk it needs; everything else stays as read
    assert router.snapshot.pods["p4"] == records[4]
    assert pod_chunk("p4") in decoded_chunks(router)
    assert router.slots.has_prospects("r5") and len(router.slots.revisions["r5"].members) == 0


def test_a_revision_with_only_draining_pods_has_no_prospects(loop: asyncio.AbstractEventLoop) -> None:
    router = started_from_packed(loop, [pod("a", "r1", PodState.DRAINING), pod("b", "r2")])
    assert not router.slots.has_prospects("r1") and router.slots.has_prospects("r2")
    assert router.slots.pick("r1") is None


def test_packed_and_decoded_bootstraps_agree_under_any_deltas(loop: asyncio.AbstractEventLoop) -> None:
    """Differential: the same state and deltas, one router started from packed chunks, one from
    decoded records; after every delta both hold the same pods and the same routable slots."""
    rng = random.Random(11)
    records = {f"p{i}": pod(f"p{i}", f"r{i % 6}") for i in range(120)}
    lazy = started_from_packed(loop, list(records.values()))
    eager = started_decoded(loop, list(records.values()))
    states = [PodState.READY, PodState.NOT_READY, PodState.DRAINING, PodState.QUARANTINED, PodState.REMOVED]
    gen = 1
    for version in range(2, 80):
        changes = []
        for _ in range(rng.randrange(1, 6)):
            gen += 1
            uid = f"p{rng.randrange(160)}"  # some new (joining a revision in any chunk)
            old = records.get(uid)
            revision = old.revision if old else f"r{rng.randrange(7)}"  # r6: a revision new to both
            record = pod(uid, revision, rng.choice(states), gen, cc=rng.choice((1, 2)))
            changes.append(record)
            if record.state is PodState.REMOVED:
                records.pop(uid, None)
            else:
                records[uid] = record
        delta = Delta(epoch=1, version=version, pods=tuple(changes))
        lazy.apply_delta(delta)
        eager.apply_delta(delta)
        if version % 9 == 0:  # now and then, a revision is used (read) in the middle of it
            revision = f"r{rng.randrange(7)}"
            for router in (lazy, eager):
                lease = router.slots.pick(revision)
                if lease is not None:
                    lease[0]()
        assert dict(lazy.snapshot.pods.items()) == dict(eager.snapshot.pods.items()) == records
    for router in (lazy, eager):
        while router.slots.materialize_pending(50):
            pass

    def routable(router: Router) -> dict[str, set[str]]:
        return {name: {uid for uid, p in rev.members.items() if p.routable}
                for name, rev in router.slots.revisions.items() if rev.members}  # fmt: skip

    assert set(lazy.slots.pods) == set(eager.slots.pods) == set(records)
    assert {uid: p.record for uid, p in lazy.slots.pods.items()} == records
    assert routable(lazy) == routable(eager)
    assert routable(lazy) == {
        name: {uid for uid, r in records.items() if r.revision == name and r.state is PodState.READY}
        for name in {r.revision for r in records.values()}
    }


def test_the_warm_up_decodes_packed_chunks_a_slice_at_a_time(loop: asyncio.AbstractEventLoop) -> None:
    records = [pod(f"p{i}", f"r{i % 10}") for i in range(400)]
    router = started_from_packed(loop, records)
    table = router.snapshot.pods
    packed_chunks = len({pod_chunk(r.uid) for r in records})
    start, slices = 0, 0
    while (start := table.decode_packed(start, 25)) >= 0:
        slices += 1
        assert len(decoded_chunks(router)) == 25 * slices
    assert decoded_chunks(router) == {pod_chunk(r.uid) for r in records}
    assert slices == (packed_chunks - 1) // 25
    assert sorted(table.values(), key=lambda r: r.uid) == sorted(records, key=lambda r: r.uid)
    assert table.decode_packed(0, 25) == -1


def test_a_chunk_that_does_not_decode_is_left_out_and_logged(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    good = pod("good", "r1")
    bad_chunk = next(n for n in range(4096) if n != pod_chunk("good"))
    builder = SnapshotBuilder()
    builder.add_packed_chunk(pod_chunk("good"), pack_array([encode(good)]))
    builder.add_packed_chunk(bad_chunk, b"\x91\x93\xa1x\xa1y\x07")  # one "record" missing required fields
    router = Router(RouterConfig(), loop)
    router.install(builder.finish(1, 1), revision_chunks={"r1": [pod_chunk("good"), bad_chunk]})
    with caplog.at_level(logging.ERROR, logger="fastproxy.snapshot"):
        lease = router.slots.pick("r1")
    assert lease is not None and lease[1] == good
    assert "does not decode" in caplog.text


@pytest.mark.parametrize("count", [0, 1, 15, 16, 300, 70_000])
def test_a_packed_chunk_counts_its_records_from_the_header(count: int) -> None:
    raw = pack_array([b"\xc0"] * count)  # (any encoded items: only the header is read)
    assert packed_length(raw) == count


def test_a_packed_chunk_that_is_not_an_array_is_refused() -> None:
    with pytest.raises(SchemaError, match="not a msgpack array"):
        packed_length(b"\x81\xa1a\x01")
    with pytest.raises(SchemaError):
        SnapshotBuilder().add_packed_chunk(3, b"")


@pytest.mark.parametrize("start", [started_from_packed, started_decoded])
def test_a_delta_moving_a_pod_to_another_revision_moves_its_slots(
    loop: asyncio.AbstractEventLoop, start: object
) -> None:
    """Same UID, new revision: the router's pod table before the delta says where the pod was, so
    a revision still pending (not materialized) loses it too; picked where it is now, only there."""
    router = start(loop, [pod("a", "r1"), pod("b", "r1"), pod("c", "r2")])  # type: ignore[operator]
    router.apply_delta(Delta(epoch=1, version=2, pods=(pod("a", "r2", gen=2),)))
    picked_r1 = [router.slots.pick("r1") for _ in range(2)]
    assert [lease[1].uid for lease in picked_r1 if lease] == ["b"]
    picked_r2 = [router.slots.pick("r2") for _ in range(3)]
    assert sorted(lease[1].uid for lease in picked_r2 if lease) == ["a", "c"]
    assert router.slots.pods["a"].revision.name == "r2"
