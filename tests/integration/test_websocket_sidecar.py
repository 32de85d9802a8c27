"""WebSocket sessions through the sidecar, with real processes: Valkey, the writer, two routers
following it, and a CC=1 pod (the stand-in app process behind a ``fastproxy sidecar`` process).

The app counts sessions and requests in one concurrency account (``/control/stats``), so "a CC=1
pod never gets a second session or request while one is open, across two routers" is its own
``violations`` and ``work_count``; the clients are the ``websockets`` library.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fastproxy.config import RouterConfig
from fastproxy.proxy import ClientConnection
from fastproxy.router import Router
from statesync.schema import PodState
from statesync.subscriber import StateFollower
from tests.conftest import status_of, wait_for
from tests.integration.test_sidecar import ADMIN_TOKEN, PodUnderTest, System, wait_for_app_busy


class SecondRouter:
    """Another router on the same state (its own slot table: it knows nothing of the first's)."""

    async def start(self, system: System, **config: object) -> SecondRouter:
        loop = asyncio.get_running_loop()
        self.router = Router(RouterConfig(**({"sidecar_protocol": True} | config)), loop)  # type: ignore[arg-type]
        self.follower = StateFollower(self.router, system.valkey.url)
        self.task = asyncio.create_task(self.follower.run())
        self.server = await loop.create_server(lambda: ClientConnection(self.router), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.follower.stop()
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        self.server.close()
        self.router.tunnels.close_all("test over")
        for conn in list(self.router.connections):
            conn.abort()
        self.router.pool.close_all()


@pytest.fixture
async def system() -> AsyncIterator[System]:
    s = await System(queue_timeout=1.0).start()
    try:
        yield s
    finally:
        s.router.tunnels.close_all("test over")
        await s.close()


async def sidecar_revision(pod: PodUnderTest) -> dict[str, object]:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"http://{pod.sidecar_admin}/v1/revisions", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        )
    (revision,) = response.json()
    return revision  # type: ignore[no-any-return]


async def test_cc1_pod_behind_a_sidecar_never_gets_a_second_session_or_request_across_two_routers(
    system: System,
) -> None:
    other = await SecondRouter().start(system, queue_timeout=1.0)
    try:
        pod = await system.pod("ws-cc1", 1)
        await wait_for(
            lambda: (r := other.router.snapshot.pods.get("ws-cc1")) is not None and r.state is PodState.READY,
            10, "second router sees the pod",
        )  # fmt: skip
        async with connect(f"ws://127.0.0.1:{system.port}/ws/echo", compression=None) as ws:
            await ws.send("one")
            assert await ws.recv() == "one"
            sidecar_view = await sidecar_revision(pod)
            assert sidecar_view["inflight"] == 1 and sidecar_view["free_slots"] == 0
            assert sidecar_view["websocket"]["open"] == 1  # type: ignore[index]
            # The second router thinks the pod is free: the sidecar refuses (busy), it re-picks,
            # waits, and gives up at its queue deadline. Nothing reaches the app.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{other.port}", timeout=10) as client:
                assert (await client.get("/")).status_code == 503
                assert (await client.post("/echo", content=b"x")).status_code == 503
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"ws://127.0.0.1:{other.port}/ws/echo", compression=None, open_timeout=10):
                    pass
            assert info.value.response.status_code == 503
            assert other.router.stats.busy_refusals >= 1
            # The first router knows its own session holds the slot: its request waits, then 503.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.port}", timeout=10) as client:
                assert (await client.get("/")).status_code == 503
            await ws.send("still here")
            assert await ws.recv() == "still here"
            stats = await pod.stats()
            assert stats["work_count"] == 1 and stats["violations"] == 0
            assert stats["servers"][0]["active"] == 1  # type: ignore[index]
        # The session is over: the slot is free everywhere, and the other router's session gets it.
        await wait_for(lambda: system.router.slots.pods["ws-cc1"].inflight == 0, 2, "router slot freed")
        async with connect(f"ws://127.0.0.1:{other.port}/ws/echo", compression=None, open_timeout=10) as ws:
            await ws.send("two")
            assert await ws.recv() == "two"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.port}", timeout=10) as client:
            assert (await client.get("/")).status_code == 200
        stats = await pod.stats()
        assert stats["violations"] == 0 and stats["max_concurrent_seen"] == 1
        assert stats["work_count"] == 3  # two sessions and one request, never two at once
    finally:
        await other.close()


async def test_sidecar_drain_waits_for_an_open_session_then_closes_it(system: System) -> None:
    grace = 2.0
    pod = await system.pod("ws-drain", 1, "--grace-period", str(grace), "--drain-notice", "0.2")
    loop = asyncio.get_running_loop()
    async with connect(f"ws://127.0.0.1:{system.port}/ws/echo", compression=None, ping_interval=None) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        pod.sidecar.send_signal(signal.SIGTERM)
        sent_at = loop.time()
        await wait_for(lambda: system.state("ws-drain") is PodState.DRAINING, 10, "draining")
        # Within the grace period the session goes on as before.
        for i in range(5):
            await ws.send(f"during {i}")
            assert await ws.recv() == f"during {i}"
        assert pod.sidecar.returncode is None
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(grace + 5):
                await ws.recv()  # the sidecar closes it when the grace period is over
        closed_after = loop.time() - sent_at
    assert grace * 0.9 <= closed_after <= grace + 3, closed_after
    assert ws.close_code in (None, 1006)  # a TCP close, no close frame from the router or sidecar
    assert await asyncio.wait_for(pod.sidecar.wait(), 10) == 0
    await wait_for(lambda: system.router.slots.pods["ws-drain"].inflight == 0, 2, "router slot freed")


async def test_sidecar_drain_ends_early_when_the_session_does(system: System) -> None:
    pod = await system.pod("ws-drain-early", 1, "--grace-period", "30", "--drain-notice", "0.2")
    loop = asyncio.get_running_loop()
    async with connect(f"ws://127.0.0.1:{system.port}/ws/echo", compression=None) as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        pod.sidecar.send_signal(signal.SIGTERM)
        await wait_for(lambda: system.state("ws-drain-early") is PodState.DRAINING, 10, "draining")
        await asyncio.sleep(0.5)  # the session outlives the drain notice: the sidecar must wait for it
        assert pod.sidecar.returncode is None
    closed_at = loop.time()
    assert await asyncio.wait_for(pod.sidecar.wait(), 10) == 0
    assert loop.time() - closed_at < 5  # not the 30 s grace period


async def test_handshake_to_a_full_sidecar_goes_to_the_free_pod(system: System) -> None:
    """Before the 101 the usual rules hold: a busy refusal re-picks another pod."""
    first = await system.pod("ws-busy-a", 1)
    second = await system.pod("ws-busy-b", 1)
    # A request sent straight to the first sidecar (as another router would) holds its slot.
    hog = asyncio.create_task(
        first.to_sidecar(b"GET /delay/1500 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    await wait_for_app_busy(first)
    for _ in range(3):
        async with connect(f"ws://127.0.0.1:{system.port}/ws/echo", compression=None, open_timeout=10) as ws:
            await ws.send("y")
            assert await ws.recv() == "y"
    assert (await second.stats())["work_count"] == 3
    assert status_of(await hog) == 200
    assert (await first.stats())["violations"] == 0
