"""Router.apply_deltas and the session's batch, without Valkey: whole or nothing.

(The batch path against a real valkey-server -- order, duplicates, gaps -- is in
tests/integration/test_delta_batches.py.)"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from bench.conftest import make_pods, make_routes
from fastproxy.config import RouterConfig
from fastproxy.router import Router
from fastproxy.snapshot import RoutingSnapshot, VersionGap
from statesync.keys import DELTA_PREFIX
from statesync.pubsub import SubscriberProtocol
from statesync.schema import Delta, PodState, encode
from statesync.subscriber import StateFollower, _Session
from tests.unit.test_pubsub import FakeTransport, message

PODS = make_pods(50)


def router() -> Router:
    r = Router(RouterConfig(), asyncio.get_running_loop())
    r.install(RoutingSnapshot.build(1, 0, PODS, make_routes(5)))
    return r


def flip(version: int, index: int = 0, epoch: int = 1) -> Delta:
    state = PodState.NOT_READY if version % 2 else PodState.READY
    record = msgspec.structs.replace(PODS[index], state=state, generation=10 + version)
    return Delta(epoch=epoch, version=version, pods=(record,))


async def test_apply_deltas_equals_one_by_one_and_swaps_once() -> None:
    batched, sequential = router(), router()
    deltas = [flip(v, v % 3) for v in range(1, 8)]
    before = batched.snapshot
    batched.apply_deltas(deltas)
    for delta in deltas:
        sequential.apply_delta(delta)
    assert batched.snapshot is not before and batched.snapshot.version == 7
    assert dict(batched.snapshot.pods.items()) == dict(sequential.snapshot.pods.items())
    for i in range(3):  # each pod took its last record of the batch
        assert batched.snapshot.pods[PODS[i].uid].generation == 10 + max(v for v in range(1, 8) if v % 3 == i)


@pytest.mark.parametrize(
    "versions, epochs",
    [([2, 3], [1, 1]), ([1, 3], [1, 1]), ([1, 2], [1, 2]), ([1, 1], [1, 1])],
    ids=["not-next", "gap-inside", "epoch-change-inside", "repeated"],
)
async def test_apply_deltas_that_do_not_follow_apply_nothing(versions: list[int], epochs: list[int]) -> None:
    r = router()
    before = r.snapshot
    with pytest.raises(VersionGap):
        r.apply_deltas([flip(v, epoch=e) for v, e in zip(versions, epochs, strict=True)])
    assert r.snapshot is before


async def test_a_read_that_ends_in_a_bad_frame_applies_none_of_its_deltas() -> None:
    r = router()
    follower = StateFollower(r, "valkey://127.0.0.1:1/0")
    session = _Session(follower, asyncio.get_running_loop())
    session.busy = False  # (the steady state: subscribed and read)
    proto = SubscriberProtocol(session, b"", 0)
    proto.connection_made(FakeTransport())  # type: ignore[arg-type]
    good = b"".join(message(DELTA_PREFIX + encode(flip(v))) for v in (1, 2, 3))
    proto.data_received(good + b"*3\r\n$7\r\nmessage\r\n$x\r\n")  # a desynchronised stream
    assert proto.closed and session.error is not None
    assert r.snapshot.version == 0 and follower.delta_batches == 0  # not half-applied
    # the same deltas on a sound read: one batch
    session2 = _Session(follower, asyncio.get_running_loop())
    session2.busy = False
    proto2 = SubscriberProtocol(session2, b"", 0)
    proto2.connection_made(FakeTransport())  # type: ignore[arg-type]
    proto2.data_received(good)
    assert r.snapshot.version == 3 and (follower.delta_batches, follower.deltas_batched) == (1, 3)
