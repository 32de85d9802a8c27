"""WebSocket pass-through, with a real WebSocket library (``websockets``) on both ends.

The pods are ``websockets`` servers (or the project's own ``AppServer``) on their own loopback
addresses; the clients are ``websockets`` clients or raw sockets. Every test asserts what crossed
the router, and what the pod's slot did: a session holds it for its whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fastproxy.router import Router
from tests.conftest import RouterHarness, exchange, next_pod_address, pod_record, status_of, wait_for


class WsPod:
    """A ``websockets`` echo server standing in for an inference pod, counting its sessions."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.sessions = 0
        self.handshakes: list[Any] = []  # the request each session's handshake carried
        self.server: Any = None
        self.address: tuple[str, int] = ("", 0)
        self.connections: set[ServerConnection] = set()

    async def handler(self, ws: ServerConnection) -> None:
        self.active += 1
        self.sessions += 1
        self.max_active = max(self.max_active, self.active)
        self.handshakes.append(ws.request)
        self.connections.add(ws)
        try:
            path = ws.request.path if ws.request else "/"
            if path.startswith("/tokens/"):
                count = int(path.rsplit("/", 1)[1])
                for i in range(count):
                    await ws.send(f"token {i}")
                await ws.close()
                return
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(ws)
            self.active -= 1

    async def start(self) -> WsPod:
        self.server = await serve(self.handler, next_pod_address(), 0, compression=None)
        self.address = self.server.sockets[0].getsockname()[:2]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)


@pytest.fixture
async def ws_pods() -> AsyncIterator[list[WsPod]]:
    pods: list[WsPod] = []
    try:
        yield pods
    finally:
        for pod in pods:
            await pod.close()


async def ws_router(
    harness: RouterHarness, ws_pods: list[WsPod], count: int = 1, concurrency: int = 1, **config: Any
) -> tuple[Router, int, list[WsPod]]:
    pods = [await WsPod().start() for _ in range(count)]
    ws_pods.extend(pods)
    records = [pod_record(f"ws{i}", pod.address, concurrency=concurrency) for i, pod in enumerate(pods)]
    router, port = await harness.router(records, **config)
    return router, port, pods


def inflight(router: Router, revision: str = "chat-v1") -> int:
    return router.slots.revisions[revision].inflight


def uri(port: int, path: str = "/") -> str:
    return f"ws://127.0.0.1:{port}{path}"


# ---- the handshake and the relay ------------------------------------------------------------------


async def test_echo_through_the_router_holds_the_slot_for_the_session(
    harness: RouterHarness, ws_pods: list[WsPod]
) -> None:
    router, port, (pod,) = await ws_router(harness, ws_pods)
    async with connect(uri(port, "/v1/realtime?model=x"), compression=None) as ws:
        for i in range(20):
            text = f"hello {i}"
            await ws.send(text)
            assert await ws.recv() == text
        big = bytes(range(256)) * 4096  # 1 MiB binary message: many reads each way
        await ws.send(big)
        assert await ws.recv() == big
        assert inflight(router) == 1  # the session holds the pod's slot
        assert len(router.tunnels.open) == 1
        view = router.tunnels.view("chat-v1")
        assert view.open == 1 and view.bytes_from_clients > len(big) and view.bytes_from_pods > len(big)
    await wait_for(lambda: inflight(router) == 0, 2, "slot released after the session")
    assert not router.tunnels.open
    (request,) = pod.handshakes
    assert request.path == "/v1/realtime?model=x"
    headers = request.headers
    assert headers["Upgrade"].lower() == "websocket" and "upgrade" in headers["Connection"].lower()
    assert headers["Sec-WebSocket-Key"] and headers["Sec-WebSocket-Version"] == "13"
    assert headers["X-Forwarded-For"] == "127.0.0.1" and headers["X-Request-Id"]
    stats = router.tunnels.by_revision["chat-v1"]
    assert stats.opened == 1 and stats.open == 0 and stats.durations.count == 1
    assert router.stats.responses.get(101) == 1
    assert router.pool.idle_count == 0  # the session's connection never went back to the pool


async def test_token_stream_and_the_pods_close_reach_the_client(
    harness: RouterHarness, ws_pods: list[WsPod]
) -> None:
    router, port, _ = await ws_router(harness, ws_pods)
    async with connect(uri(port, "/tokens/500"), compression=None) as ws:
        tokens = [message async for message in ws]
        assert tokens == [f"token {i}" for i in range(500)]
        assert ws.close_code == 1000  # the pod's close frame, relayed untouched
    await wait_for(lambda: inflight(router) == 0, 2, "slot released")


async def test_early_client_bytes_and_the_pods_101_fields_are_relayed(
    harness: RouterHarness, ws_pods: list[WsPod]
) -> None:
    """A raw client that sends a frame right behind its handshake (before the 101): the router
    holds it and delivers it after the switch; the pod's 101 fields (Sec-WebSocket-Accept) reach
    the client."""
    _, port, _ = await ws_router(harness, ws_pods)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    frame = (
        bytes([0x81, 0x80 | 5])
        + b"\x01\x02\x03\x04"
        + bytes(b ^ m for b, m in zip(b"early", b"\x01\x02\x03\x04" * 2, strict=False))
    )
    writer.write(
        (f"GET /x HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode() + frame
    )  # fmt: skip
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
        assert b"upgrade: websocket" in head.lower() and b"connection: upgrade" in head.lower()
        echoed = await reader.readexactly(7)
    assert echoed == bytes([0x81, 5]) + b"early"
    writer.close()


# ---- what is refused ------------------------------------------------------------------------------

REFUSED = {
    "h2c": (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n", 400, b"h2c"),
    "other-protocol": (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: IRC/6.9\r\nConnection: Upgrade\r\n\r\n", 400, b"only websocket"),
    "websocket-with-body": (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 5\r\n\r\nhello", 400, b"with a body"),
    "websocket-chunked-body": (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, b"with a body"),
    "websocket-post": (b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400, b"must be a GET"),
    "websocket-http10": (b"GET / HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400, b"HTTP/1.1"),
    "connect": (b"CONNECT pod:443 HTTP/1.1\r\nHost: pod:443\r\n\r\n", 405, b"CONNECT"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_refused_upgrades_never_reach_a_pod(harness: RouterHarness, name: str) -> None:
    app = await harness.app()
    _, port = await harness.router([pod_record("p1", app.address)])
    data, status, why = REFUSED[name]
    response = await exchange(port, data)
    assert status_of(response) == status, response[:300]
    assert why in response
    assert b"connection: close" in response.lower()
    assert app.requests == [] and all(len(raw) == 0 for raw in app.raw.values())


async def test_non_101_answer_is_relayed_as_a_response_and_the_connection_closes(
    harness: RouterHarness,
) -> None:
    """An app that does not speak WebSocket answers the handshake with a plain response: relayed
    as it is, and then the client connection closes (no HTTP is read after a handshake)."""
    app = await harness.app()
    router, port = await harness.router([pod_record("p1", app.address)])
    response = await exchange(
        port,
        b"GET /status/426 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        b"GET /never HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert status_of(response) == 426
    assert b"connection: close" in response.lower()
    (request,) = app.requests  # the bytes after the handshake were never parsed as a request
    assert request.header(b"upgrade") == b"websocket" and request.header(b"connection") == b"upgrade"
    assert request.header(b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    await wait_for(lambda: inflight(router) == 0, 2, "slot released")
    assert not router.tunnels.open


async def test_websockets_client_sees_a_non_101_as_a_refused_handshake(harness: RouterHarness) -> None:
    app = await harness.app()
    router, port = await harness.router([pod_record("p1", app.address)])
    with pytest.raises(InvalidStatus) as info:
        async with connect(uri(port, "/status/403")):
            pass
    assert info.value.response.status_code == 403
    await wait_for(lambda: inflight(router) == 0, 2, "slot released")


async def test_unasked_101_is_a_502(harness: RouterHarness) -> None:
    """A pod that switches protocols in answer to a plain request is broken: 502, not a tunnel."""
    loop = asyncio.get_running_loop()

    class Rogue(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nxx"
            )

    address = next_pod_address()
    server = await loop.create_server(Rogue, address, 0)
    try:
        router, port = await harness.router([pod_record("p1", (address, server.sockets[0].getsockname()[1]))])
        response = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert status_of(response) == 502 and b"unasked" in response
        assert not router.tunnels.open
        await wait_for(lambda: inflight(router) == 0, 2, "slot released")
    finally:
        server.close()


# ---- retries before the 101, never after ----------------------------------------------------------


async def test_handshake_to_a_dead_pod_goes_to_another(harness: RouterHarness, ws_pods: list[WsPod]) -> None:
    pod = await WsPod().start()
    ws_pods.append(pod)
    dead = (next_pod_address(), 9)  # nothing listens: connection refused
    router, port = await harness.router(
        [pod_record("dead", dead, concurrency=1), pod_record("live", pod.address, concurrency=1)]
    )
    sessions = 0
    while not router.stats.retries.get("refused") and sessions < 20:
        async with connect(uri(port), compression=None) as ws:  # every one reaches the live pod
            await ws.send("x")
            assert await ws.recv() == "x"
        sessions += 1
    assert router.stats.retries.get("refused") == 1  # the dead pod was picked once, then excluded
    assert pod.sessions == sessions
    assert not router.stats.errors


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_pod_connection_torn_down_mid_session_client_sees_the_close_and_the_slot_frees(
    harness: RouterHarness, ws_pods: list[WsPod], how: str
) -> None:
    """The pod's socket goes away under the session without a close frame: closed (FIN, what a
    killed process's kernel sends) or reset (RST, SO_LINGER 0)."""
    router, port, (pod,) = await ws_router(harness, ws_pods)
    async with connect(uri(port), compression=None) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        assert inflight(router) == 1
        for conn in list(pod.connections):
            if how == "rst":
                sock = conn.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.transport.abort()
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(1.0):
                await ws.recv()
        assert ws.close_code is None or ws.close_code == 1006  # abnormal: no close frame
        await wait_for(lambda: inflight(router) == 0, 1.0, "slot freed within 1 s of the pod's death")
        assert time.monotonic() - started < 1.0
    assert not router.tunnels.open
    assert router.tunnels.by_revision["chat-v1"].open == 0


async def test_cc1_pod_gets_no_request_or_second_session_while_one_is_open(
    harness: RouterHarness, ws_pods: list[WsPod]
) -> None:
    _, port, (pod,) = await ws_router(harness, ws_pods, queue_timeout=0.3)
    async with connect(uri(port), compression=None) as ws:
        await ws.send("a")
        assert await ws.recv() == "a"
        # A plain request waits for the slot and times out: the pod is busy with the session.
        response = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert status_of(response) == 503
        with pytest.raises(InvalidStatus) as info:
            async with connect(uri(port), compression=None, open_timeout=5):
                pass
        assert info.value.response.status_code == 503
        assert pod.sessions == 1 and pod.max_active == 1
    async with connect(uri(port), compression=None) as ws:  # the slot is free again
        await ws.send("b")
        assert await ws.recv() == "b"
    assert pod.max_active == 1 and pod.sessions == 2


async def test_half_close_from_the_client_lets_the_pod_finish(harness: RouterHarness) -> None:
    """Raw TCP after the switch: the client's FIN reaches the pod as a FIN, and the pod can still
    answer on the other direction before it closes."""
    loop = asyncio.get_running_loop()
    got_eof = asyncio.Event()

    class HalfCloseApp(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer and not self.buffer.startswith(b"done"):
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                )
                self.buffer = b"done"

        def eof_received(self) -> bool:
            got_eof.set()
            self.transport.write(b"after-your-eof")
            self.transport.close()
            return True

    address = next_pod_address()
    server = await loop.create_server(HalfCloseApp, address, 0)
    try:
        router, port = await harness.router([pod_record("p1", (address, server.sockets[0].getsockname()[1]))])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            writer.write_eof()
            await got_eof.wait()
            assert await reader.read() == b"after-your-eof"
        writer.close()
        await wait_for(lambda: inflight(router) == 0, 2, "slot released")
    finally:
        server.close()


async def test_idle_session_is_closed_after_the_idle_timeout(
    harness: RouterHarness, ws_pods: list[WsPod]
) -> None:
    router, port, _ = await ws_router(harness, ws_pods, websocket_idle_timeout=0.4)
    async with connect(uri(port), compression=None, ping_interval=None) as ws:
        for _ in range(4):  # traffic keeps it open past the timeout
            await asyncio.sleep(0.2)
            await ws.send("keep")
            assert await ws.recv() == "keep"
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(3):
                await ws.recv()  # silence: the router closes it
    await wait_for(lambda: inflight(router) == 0, 2, "slot released")
    assert router.tunnels.idle_closes == 1


# ---- many sessions --------------------------------------------------------------------------------


async def test_200_concurrent_sessions(harness: RouterHarness, ws_pods: list[WsPod]) -> None:
    router, port, pods = await ws_router(harness, ws_pods, count=4, concurrency=50)

    async def session(i: int) -> int:
        async with connect(uri(port, f"/s/{i}"), compression=None, open_timeout=20) as ws:
            for j in range(5):
                text = f"{i}:{j}"
                await ws.send(text)
                assert await ws.recv() == text
            await opened.wait()  # all 200 open at once before any closes
            return i

    opened = asyncio.Event()
    tasks = [asyncio.create_task(session(i)) for i in range(200)]
    await wait_for(
        lambda: len(router.tunnels.open) == 200 or any(t.done() for t in tasks), 30, "200 sessions open"
    )
    assert len(router.tunnels.open) == 200
    assert inflight(router) == 200
    assert all(pod.active == 50 for pod in pods)
    opened.set()
    assert sorted(await asyncio.gather(*tasks)) == list(range(200))
    await wait_for(lambda: inflight(router) == 0, 5, "every slot released")
    assert router.tunnels.by_revision["chat-v1"].opened == 200
    assert max(pod.max_active for pod in pods) == 50


async def long_session(harness: RouterHarness, ws_pods: list[WsPod], seconds: float) -> dict[str, Any]:
    """1000 messages spread over ``seconds``: every one echoed, in order, while the session holds
    the pod's slot throughout. Returns what was seen (for the fault report)."""
    router, port, _ = await ws_router(harness, ws_pods)
    interval = seconds / 1000
    loop = asyncio.get_running_loop()
    started = loop.time()
    echoed = 0
    async with connect(uri(port), compression=None) as ws:
        for i in range(1000):
            await ws.send(f"message {i}")
            assert await ws.recv() == f"message {i}"
            echoed += 1
            assert inflight(router) == 1
            delay = started + (i + 1) * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the client's pace, not a synchronisation
    lasted = loop.time() - started
    assert lasted >= seconds * 0.99
    await wait_for(lambda: inflight(router) == 0, 2, "slot released")
    view = router.tunnels.view("chat-v1")
    assert view.ended == 1 and view.ended_seconds_total >= seconds * 0.99
    return {"echoed": echoed, "seconds": lasted, "view": view}


async def test_session_of_1000_messages_over_3s(harness: RouterHarness, ws_pods: list[WsPod]) -> None:
    """The suite's short version; the 60 s one is ``tests/faults/test_websocket_long.py``."""
    seen = await long_session(harness, ws_pods, 3.0)
    assert seen["echoed"] == 1000


async def test_sessions_counted_in_metrics_and_v1_revisions(
    harness: RouterHarness, ws_pods: list[WsPod]
) -> None:
    import httpx

    from fastproxy.admin import start_admin

    router, port, _ = await ws_router(harness, ws_pods)
    admin = await start_admin(router, "127.0.0.1", 0, "t0ken")
    base = f"http://127.0.0.1:{admin.sockets[0].getsockname()[1]}"
    auth = {"authorization": "Bearer t0ken"}
    try:
        async with httpx.AsyncClient(base_url=base, headers=auth) as admin_client:
            async with connect(uri(port), compression=None) as ws:
                await ws.send("x" * 1000)
                assert await ws.recv() == "x" * 1000
                (revision,) = (await admin_client.get("/v1/revisions")).json()
                assert revision["inflight"] == 1 and revision["free_slots"] == 0
                assert revision["websocket"]["open"] == 1 and revision["websocket"]["opened"] == 1
                assert revision["websocket"]["bytes_from_clients"] > 1000
                metrics = (await admin_client.get("/metrics")).text
                assert 'fastproxy_websocket_sessions{revision="chat-v1"} 1.0' in metrics
            await wait_for(lambda: inflight(router) == 0, 2, "slot released")
            metrics = (await admin_client.get("/metrics")).text
            assert 'fastproxy_websocket_sessions{revision="chat-v1"} 0.0' in metrics
            assert 'fastproxy_websocket_sessions_opened_total{revision="chat-v1"} 1.0' in metrics
            assert 'fastproxy_websocket_session_seconds_count{revision="chat-v1"} 1.0' in metrics
            assert 'fastproxy_websocket_bytes_total{direction="client_to_pod",revision="chat-v1"}' in metrics
            (revision,) = (await admin_client.get("/v1/revisions")).json()
            assert revision["websocket"]["open"] == 0 and revision["websocket"]["ended"] == 1
    finally:
        admin.close()


async def test_pod_process_killed_mid_session(harness: RouterHarness) -> None:
    """The app process (the stand-in app, serving a token stream) is SIGKILLed mid-session: the
    client sees the connection close, and the pod's slot is free within a second."""
    import signal

    from tests.integration.test_sidecar import spawn

    proc, address, _ = await spawn(
        "-m", "fastproxy.devtools.upstream", "--listen", f"{next_pod_address()}:0", "--concurrency", "1"
    )
    try:
        host, _, app_port = address.rpartition(":")
        router, port = await harness.router([pod_record("killed", (host, int(app_port)))])
        async with connect(uri(port, "/ws/tokens/100000/5"), compression=None) as ws:
            assert (await ws.recv()).startswith("token ")
            assert inflight(router) == 1
            proc.send_signal(signal.SIGKILL)
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(1.0):
                    while True:
                        await ws.recv()  # tokens already in flight, then the close
            await wait_for(lambda: inflight(router) == 0, 1.0, "slot freed within 1 s of the kill")
            assert loop.time() - killed_at < 1.0
        assert not router.tunnels.open
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@pytest.mark.parametrize("session_ends_first", [True, False])
async def test_router_drain_waits_for_open_sessions_within_the_grace_period(
    harness: RouterHarness, ws_pods: list[WsPod], session_ends_first: bool
) -> None:
    router, port, _ = await ws_router(harness, ws_pods)
    loop = asyncio.get_running_loop()
    async with connect(uri(port), compression=None, ping_interval=None) as ws:
        await ws.send("a")
        assert await ws.recv() == "a"
        started = loop.time()
        drain = asyncio.create_task(router.drain(grace=1.0 if session_ends_first else 0.5))
        await ws.send("during the drain")
        assert await ws.recv() == "during the drain"
        assert not drain.done()
        if session_ends_first:
            await ws.close()
            await asyncio.wait_for(drain, 1.0)
            assert loop.time() - started < 1.0  # the drain did not wait out its grace period
        else:
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(3):
                    await ws.recv()  # closed by the router at the end of the grace period
            assert loop.time() - started >= 0.5
            await asyncio.wait_for(drain, 3)
    assert inflight(router) == 0 and not router.tunnels.open


async def test_slow_client_pauses_the_pod_side_memory_stays_bounded(harness: RouterHarness) -> None:
    """A pod that streams as fast as it may into a session whose client does not read: the router's
    write buffer toward the client fills, reading from the pod pauses, the pod's own transport
    pushes back. What the router holds stays bounded; nothing is lost once the client reads."""
    loop = asyncio.get_running_loop()
    piece = bytes(range(256)) * 256  # 64 KiB
    total = 64 * 1024 * 1024
    state = {"sent": 0, "paused": 0}
    resumed = asyncio.Event()

    class FloodApp(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.switched = False
            self.paused = False

        def data_received(self, data: bytes) -> None:
            if not self.switched and b"\r\n\r\n" in data:
                self.switched = True
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                )
                self.pump()

        def pump(self) -> None:
            while not self.paused and state["sent"] < total:
                self.transport.write(piece)
                state["sent"] += len(piece)
            if state["sent"] >= total:
                self.transport.write_eof()

        def pause_writing(self) -> None:
            self.paused = True
            state["paused"] += 1

        def resume_writing(self) -> None:
            self.paused = False
            resumed.set()
            self.pump()

    address = next_pod_address()
    server = await loop.create_server(FloodApp, address, 0)
    try:
        router, port = await harness.router([pod_record("p1", (address, server.sockets[0].getsockname()[1]))])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        await wait_for(lambda: state["paused"] >= 1, 5, "the pod's writes pushed back")
        await wait_for(lambda: len(router.tunnels.open) == 1, 5, "session open")
        (tunnel,) = router.tunnels.open
        # The client reads nothing: whatever it waits, the router's buffer toward it stays small
        # and the pod stays paused, far from the 64 MiB it wants to send.
        for _ in range(20):
            await asyncio.sleep(0.01)  # time passing while nobody reads; no condition to wait for
            assert tunnel.client.transport.get_write_buffer_size() <= 1024 * 1024
        assert state["sent"] < 24 * 1024 * 1024, state
        received = 0
        digest = hashlib.sha256()
        async with asyncio.timeout(60):
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
                received += len(chunk)
        assert received == total
        expected = hashlib.sha256()
        for _ in range(total // len(piece)):
            expected.update(piece)
        assert digest.digest() == expected.digest()  # every byte, in order
        writer.close()
        await wait_for(lambda: not router.tunnels.open, 5, "session ended")
    finally:
        server.close()
