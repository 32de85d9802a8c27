"""The byte relay that bench/floor.py measures as the floor: it must relay correctly to mean anything."""

from __future__ import annotations

import asyncio

from bench.floor import ByteRelay
from fastproxy.devtools.upstream import AppServer


async def bench_relay_passes_requests_and_responses_unchanged() -> None:
    loop = asyncio.get_running_loop()
    app = AppServer()
    _, app_port = await app.start("127.0.0.1", 0)
    server = await loop.create_server(lambda: ByteRelay(loop, app_port), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        for i in range(3):  # keep-alive: the same relayed connection serves several requests
            writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
            assert f"x-app-request-index: {i}".encode() in head.lower()
        writer.close()
    finally:
        server.close()
        await app.close()
