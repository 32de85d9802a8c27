"""Deltas received together are applied as one batch: against a real valkey-server.

A router follows a namespace whose deltas this test publishes itself (as the writer would: each
also in the change log, stream id = version), so it controls exactly what arrives in one read: the
follower's pub/sub socket is paused, the deltas are published in one pipeline, the test waits
until the kernel holds all of their bytes in that socket (FIONREAD), and reading resumes -- one
``data_received`` with all of them. Every batched outcome is compared with a second router that
applied the same deltas one by one (``Router.apply_delta``): same version, same records, same slot
table. And the report forwarder: asleep until a report is queued, then one pipeline per batch.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import random
import socket
import termios
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from bench.conftest import make_pods, make_routes
from fastproxy.config import RouterConfig
from fastproxy.router import Router
from fastproxy.snapshot import RoutingSnapshot
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.keys import DELTA_PREFIX, Keys
from statesync.schema import Delta, PodRecord, PodState, Route, WeightedRevision, decode_event, encode
from statesync.subscriber import ReportForwarder, StateFollower
from tests.conftest import wait_for

KEYS = Keys("batch-test")
PODS = make_pods(200)
ROUTES = make_routes(20)


@pytest.fixture(scope="module")
def valkey_server() -> Any:
    server = EmbeddedValkey().start()
    yield server
    server.close()


def fresh_router() -> Router:
    router = Router(RouterConfig(), asyncio.get_running_loop())
    router.install(RoutingSnapshot.build(1, 0, PODS, ROUTES))
    return router


class Followed:
    """A router following KEYS on the real Valkey (no state there: it keeps its own, v0)."""

    def __init__(self, server: EmbeddedValkey, coalesce: float = 0.0) -> None:
        self.server = server
        self.client = connect(server.url)
        self.router = fresh_router()
        self.follower = StateFollower(
            self.router, server.url, keys=KEYS, heartbeat_timeout=30, coalesce=coalesce
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.delete(KEYS.changes, KEYS.version, KEYS.state_epoch)
        self.task = asyncio.create_task(self.follower.run())
        await asyncio.wait_for(self.follower.synced.wait(), 10)
        await wait_for(lambda: self.follower.session is not None and not self.follower.session.busy,
                       timeout=10, what="session in its steady state")  # fmt: skip

    async def stop(self) -> None:
        self.follower.stop()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.client.aclose()

    def pending_bytes(self) -> int:
        session = self.follower.session
        assert session is not None and session.subscription is not None
        transport = session.subscription.transport
        assert transport is not None
        sock: socket.socket = transport.get_extra_info("socket")
        buf = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return buf[0]

    async def arrive_together(self, deltas: list[Delta], *, publish: list[Delta] | None = None) -> None:
        """Log every delta (as the writer's commit does), publish ``publish`` (default: all) in one
        pipeline while the follower does not read, then let it read them in one go."""
        session = self.follower.session
        assert session is not None and session.subscription is not None
        async with self.client.pipeline(transaction=False) as pipe:
            for delta in deltas:
                pipe.xadd(KEYS.changes, {"d": encode(delta)}, id=f"{delta.version}-0")
            await pipe.execute()
        sent = publish if publish is not None else deltas
        payloads = [DELTA_PREFIX + encode(delta) for delta in sent]
        channel = KEYS.channel.encode() if isinstance(KEYS.channel, str) else KEYS.channel
        # the frame the subscriber receives per message: *3 $7 message $<channel> $<payload>
        frames = sum(len(f"*3\r\n$7\r\nmessage\r\n${len(channel)}\r\n\r\n${len(p)}\r\n\r\n") + len(channel) + len(p)
                     for p in payloads)  # fmt: skip
        session.subscription.pause_reading()
        async with self.client.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.publish(KEYS.channel, payload)
            await pipe.execute()
        await wait_for(lambda: self.pending_bytes() >= frames, timeout=10, what="every delta in the socket")
        session.subscription.resume_reading()

    async def publish(self, deltas: list[Delta]) -> None:
        """Log and publish ``deltas`` in one pipeline (as the writer's commit does), reading as usual."""
        async with self.client.pipeline(transaction=False) as pipe:
            for delta in deltas:
                pipe.xadd(KEYS.changes, {"d": encode(delta)}, id=f"{delta.version}-0")
                pipe.publish(KEYS.channel, DELTA_PREFIX + encode(delta))
            await pipe.execute()


@pytest.fixture
async def followed(valkey_server: EmbeddedValkey) -> AsyncIterator[Followed]:
    f = Followed(valkey_server)
    await f.start()
    yield f
    await f.stop()


def churn(count: int, first_version: int = 1, seed: int = 7) -> list[Delta]:
    """Consecutive deltas: readiness flips (some pods several times), removals, additions, routes."""
    rng = random.Random(seed)
    live = {p.uid: p for p in PODS}
    added = 0
    out = []
    for version in range(first_version, first_version + count):
        kind = rng.choice(("flip", "flip", "flip", "remove", "add", "route"))
        pods: tuple[PodRecord, ...] = ()
        routes: tuple[Route, ...] = ()
        if kind == "flip":
            uid = rng.choice(sorted(live)[:5])  # a few pods, so the batch repeats uids
            old = live[uid]
            state = PodState.NOT_READY if old.state is PodState.READY else PodState.READY
            live[uid] = msgspec.structs.replace(old, state=state, generation=old.generation + 1)
            pods = (live[uid],)
        elif kind == "remove":
            uid = rng.choice(sorted(live)[5:])
            pods = (msgspec.structs.replace(live.pop(uid), state=PodState.REMOVED),)
        elif kind == "add":
            added += 1
            template = PODS[added]
            record = msgspec.structs.replace(template, uid=f"added-{version}-{added}", generation=1)
            live[record.uid] = record
            pods = (record,)
        else:
            service = ROUTES[rng.randrange(len(ROUTES))].service
            routes = (
                Route(
                    service=service,
                    revisions=(WeightedRevision(revision=PODS[version].revision, weight=100),),
                ),
            )
        out.append(Delta(epoch=1, version=version, pods=pods, routes=routes))
    return out


def one_by_one(deltas: list[Delta]) -> Router:
    router = fresh_router()
    for delta in deltas:
        router.apply_delta(delta)
    return router


def assert_same_state(batched: Router, sequential: Router) -> None:
    a, b = batched.snapshot, sequential.snapshot
    assert (a.epoch, a.version) == (b.epoch, b.version)
    assert dict(a.pods.items()) == dict(b.pods.items())
    assert dict(a.routes) == dict(b.routes)
    routable = {uid for uid, pod in batched.slots.pods.items() if pod.routable}
    assert routable == {uid for uid, pod in sequential.slots.pods.items() if pod.routable}
    assert set(batched.slots.pods) == set(sequential.slots.pods)


async def test_deltas_read_together_are_applied_as_one_batch_in_order(followed: Followed) -> None:
    deltas = churn(40)
    await followed.arrive_together(deltas)
    await wait_for(lambda: followed.router.snapshot.version == 40, timeout=10, what="version 40")
    follower = followed.follower
    # 40 deltas, one read (a read is at most 256 KiB; these are ~8 KiB): one batch, one swap.
    assert (follower.delta_batches, follower.deltas_batched) == (1, 40)
    assert follower.gap_fills == 0 and follower.resyncs == 1  # (the session's first read only)
    assert_same_state(followed.router, one_by_one(deltas))


async def test_duplicates_within_and_after_a_batch_are_not_applied_twice(followed: Followed) -> None:
    deltas = churn(12)
    first = deltas[:8]
    # a publisher retrying: 1-8, then 5-8 again and 9-12 with 10 twice, all in one read
    published = first + deltas[4:8] + deltas[8:10] + deltas[9:10] + deltas[10:]
    await followed.arrive_together(deltas, publish=published)
    await wait_for(lambda: followed.router.snapshot.version == 12, timeout=10, what="version 12")
    assert followed.follower.deltas_batched == 12  # each version once
    assert followed.follower.gap_fills == 0
    assert_same_state(followed.router, one_by_one(deltas))


async def test_a_gap_inside_a_read_applies_what_precedes_it_then_fills_from_the_log(
    followed: Followed,
) -> None:
    deltas = churn(10)
    applied: list[tuple[int, int]] = []
    apply_deltas = followed.router.apply_deltas

    def recording(batch: list[Delta]) -> None:
        applied.append((batch[0].version, batch[-1].version))
        apply_deltas(batch)

    followed.router.apply_deltas = recording  # type: ignore[method-assign]
    # version 5 was committed (it is in the change log) but its publish never reached us
    await followed.arrive_together(deltas, publish=deltas[:4] + deltas[5:])
    await wait_for(lambda: followed.router.snapshot.version == 10, timeout=10, what="version 10")
    assert applied[0] == (1, 4)  # the batch before the gap, whole, before the gap fill
    assert followed.follower.gap_fills == 1
    assert_same_state(followed.router, one_by_one(deltas))


async def test_batches_across_reads_continue_from_the_last_one(followed: Followed) -> None:
    deltas = churn(30)
    for start in range(0, 30, 10):
        await followed.arrive_together(deltas[start : start + 10])
        await wait_for(lambda v=start + 10: followed.router.snapshot.version == v, timeout=10, what="version")
    assert (followed.follower.delta_batches, followed.follower.deltas_batched) == (3, 30)
    assert_same_state(followed.router, one_by_one(deltas))


COALESCE = 1.0  # seconds: far longer than the test's three publishes take, so they share one window


@pytest.fixture
async def coalescing(valkey_server: EmbeddedValkey) -> AsyncIterator[Followed]:
    f = Followed(valkey_server, coalesce=COALESCE)
    await f.start()
    yield f
    await f.stop()


async def test_coalescing_reads_what_arrives_in_the_window_at_once_after_it(coalescing: Followed) -> None:
    deltas = churn(7)
    loop = asyncio.get_running_loop()
    applied: list[tuple[int, int, float]] = []
    apply_deltas = coalescing.router.apply_deltas

    def recording(batch: list[Delta]) -> None:
        applied.append((batch[0].version, batch[-1].version, loop.time()))
        apply_deltas(batch)

    coalescing.router.apply_deltas = recording  # type: ignore[method-assign]
    # a change after a quiet spell: applied at the end of its read, at once
    await coalescing.publish(deltas[:1])
    await wait_for(lambda: coalescing.router.snapshot.version == 1, timeout=5, what="version 1")
    session = coalescing.follower.session
    assert session is not None and session.coalesce_timer is not None  # the window is open
    # three more publishes in the window: they wait in the socket, unread
    for start in (1, 3, 5):
        await coalescing.publish(deltas[start : start + 2])
    await wait_for(lambda: coalescing.pending_bytes() > 0, timeout=5, what="deltas in the socket")
    assert coalescing.router.snapshot.version == 1
    # the window ends: one read, one batch, one swap
    await wait_for(lambda: coalescing.router.snapshot.version == 7, timeout=10, what="version 7")
    assert [(a, b) for a, b, _ in applied] == [(1, 1), (2, 7)]
    assert applied[1][2] - applied[0][2] >= COALESCE - 0.005  # not read before the window ended
    assert (coalescing.follower.delta_batches, coalescing.follower.deltas_batched) == (2, 7)
    assert_same_state(coalescing.router, one_by_one(deltas))


async def test_without_coalescing_each_read_is_applied_and_reading_goes_on(followed: Followed) -> None:
    deltas = churn(4)
    await followed.publish(deltas[:2])
    await wait_for(lambda: followed.router.snapshot.version == 2, timeout=5, what="version 2")
    session = followed.follower.session
    assert session is not None and session.coalesce_timer is None
    await followed.publish(deltas[2:])
    await wait_for(lambda: followed.router.snapshot.version == 4, timeout=5, what="version 4")
    assert_same_state(followed.router, one_by_one(deltas))


async def test_the_report_forwarder_sleeps_until_a_report_then_sends_them_in_one_pipeline(
    valkey_server: EmbeddedValkey,
) -> None:
    client = connect(valkey_server.url)
    keys = Keys("batch-test-reports")
    await client.delete(keys.events)
    router = fresh_router()
    while router.slots.materialize_pending(1_000):
        pass  # (every pod given its slots: only a pod with slots can be excluded)
    forwarder = ReportForwarder(router, valkey_server.url, keys=keys)
    task = asyncio.create_task(forwarder.run())
    try:
        # idle: parked on the queue's future (no timer: nothing wakes it until a report)
        await wait_for(lambda: forwarder.reports.waiter is not None, timeout=5, what="forwarder parked")
        assert router.reports is forwarder.reports
        for pod in PODS[:3]:  # three exclusions in one go: one pipeline
            router.exclude_pod(pod, "refused", "test", recheck=False)
        await wait_for(lambda: forwarder.sent == 3, timeout=5, what="3 reports sent")
        assert forwarder.batches == 1
        entries = await client.xrange(keys.events)
        assert [decode_event(fields[b"e"]).uid for _, fields in entries] == [p.uid for p in PODS[:3]]
        await wait_for(lambda: forwarder.reports.waiter is not None, timeout=5, what="parked again")
        router.exclude_pod(PODS[3], "refused", "test", recheck=False)
        await wait_for(lambda: forwarder.sent == 4, timeout=5, what="4th report sent")
        assert forwarder.batches == 2 and not router.reports
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()
