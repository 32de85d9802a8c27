"""The fault suite's tools: the fault proxy (forwarding, delay, half-open, drip, idle close) and the
load generator's verdict on every kind of response."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from fastproxy.devtools.upstream import AppServer, payload
from tests.conftest import next_pod_address, wait_for
from tests.faults.faultproxy import FaultProxy
from tests.faults.loadgen import LoadGenerator, get_delay


@pytest.fixture
async def app() -> AsyncIterator[AppServer]:
    srv = AppServer()
    await srv.start(next_pod_address(), 0)
    async with srv:
        yield srv
        assert srv.errors == []


@pytest.fixture
async def proxy(app: AppServer) -> AsyncIterator[FaultProxy]:
    assert app.address is not None
    async with FaultProxy(app.address) as p:
        yield p


def url(proxy: FaultProxy, path: str) -> str:
    assert proxy.address is not None
    return f"http://{proxy.address[0]}:{proxy.address[1]}{path}"


async def test_forwards_both_ways_intact(proxy: FaultProxy, app: AppServer) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(url(proxy, "/size/300000"))
        assert r.status_code == 200 and r.content == payload(300000)
        r = await client.post(url(proxy, "/echo"), content=b"x" * 100_000)
        assert r.content == b"x" * 100_000
    assert len(app.requests) == 2


async def test_delay_holds_each_chunk_back(proxy: FaultProxy) -> None:
    proxy.delay = 0.2
    async with httpx.AsyncClient() as client:
        started = time.monotonic()
        r = await client.get(url(proxy, "/"))
        # request and response each waited at least the delay (a lower bound: a fault, not a speed)
        assert r.status_code == 200 and time.monotonic() - started >= 0.4


async def test_half_open_accepts_and_never_answers_nor_forwards(proxy: FaultProxy, app: AppServer) -> None:
    proxy.half_open = True
    assert proxy.address is not None
    reader, writer = await asyncio.open_connection(*proxy.address)  # connect succeeds
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.3)
    assert app.request_count == 0 and app.connections_accepted == 0
    writer.close()
    await wait_for(lambda: proxy.connections == 0, what="half-open connection gone after the peer left")


async def test_drip_delivers_the_response_in_small_pieces(proxy: FaultProxy) -> None:
    proxy.drip_bytes = 100
    proxy.drip_interval = 0.001
    assert proxy.address is not None
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(b"GET /size/3000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    reads = []
    while data := await asyncio.wait_for(reader.read(65536), 5):
        reads.append(data)
    writer.close()
    assert b"".join(reads).endswith(payload(3000))
    assert len(reads) >= 10 and max(len(r) for r in reads) <= 200


async def test_idle_close_ends_a_quiet_keepalive_connection(proxy: FaultProxy) -> None:
    proxy.idle_close = 0.2
    assert proxy.address is not None
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    await reader.readexactly(len(b'{"ok":true}'))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the proxy closed the idle connection
    assert proxy.idle_closed == 1


async def test_records_when_the_client_closes(proxy: FaultProxy) -> None:
    assert proxy.address is not None
    _, writer = await asyncio.open_connection(*proxy.address)
    await wait_for(lambda: proxy.connections == 1, what="proxied")
    closed = time.monotonic()
    writer.close()
    await wait_for(lambda: len(proxy.client_closed_at) == 1, what="close recorded")
    assert proxy.client_closed_at[0] >= closed
    writer.close()


# ---- the load generator's verdicts --------------------------------------------------------------


async def canned(answer: bytes, *, reset: bool = False) -> asyncio.Server:
    """A server that answers every connection with ``answer`` once the request head is in, then
    closes (or resets)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if reset:
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
        else:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("answer", "reset", "kind"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-request-id: {rid}\r\n\r\nok", False, "ok"),
        (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n", False, "502"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-request-id: {rid}\r\n\r\nok", False, "cut"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-request-id: {rid}\r\n\r\n2\r\nok\r\n",
            False,
            "cut",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-request-id: {rid}\r\n\r\nko",
            False,
            "truncated_as_complete",
        ),
        (
            b"HTTP/1.1 200 OK\r\nx-request-id: {rid}\r\n\r\no",
            False,
            "truncated_as_complete",
        ),  # close-delimited
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-request-id: someone-else\r\n\r\nok", False, "wrong_id"),
        (b"HTTP/1.1 200 OK\r\ncontent-le", False, "eof"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok", True, "reset"),
    ],
)
async def test_load_generator_classifies_every_outcome(answer: bytes, reset: bool, kind: str) -> None:
    load = LoadGenerator([0], concurrency=1, duration=0.0, mix=[get_delay(0)], run_id="t")
    rid = "t-0-0"
    server = await canned(answer.replace(b"{rid}", rid.encode()), reset=reset)
    load.ports = [server.sockets[0].getsockname()[1]]
    load.duration = 0.05
    load.think = 1.0  # one request is enough
    async with server:
        await load.run()
    assert [(o.rid, o.kind) for o in load.outcomes] == [(rid, kind)]


async def test_load_generator_refused_and_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        load = LoadGenerator([port], concurrency=1, duration=0.05, think=1.0)
        await load.run()
    assert [o.kind for o in load.outcomes] == ["refused"]
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    async with server:
        load = LoadGenerator([server.sockets[0].getsockname()[1]], 1, 0.05, request_timeout=0.2, think=1.0)
        await load.run()
    assert [o.kind for o in load.outcomes] == ["timeout"]
