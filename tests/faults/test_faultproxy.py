"""The fault proxy's own behaviour: forwarding, delay, half-open, drip, idle close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from fastproxy.devtools.upstream import AppServer, payload
from tests.conftest import next_pod_address, wait_for
from tests.faults.faultproxy import FaultProxy


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
