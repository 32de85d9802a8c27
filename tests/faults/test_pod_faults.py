"""Faults around one router with real pod processes: stop, kill mid-response, slowloris.

Invariants checked: no request executed twice, a client never gets a truncated body presented as
complete, slots are given back, and good clients keep being served while bad ones misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import httpx

from tests.conftest import RouterHarness, next_pod_address, pod_record, status_of, wait_for


async def app_process(concurrency: int = 1) -> tuple[asyncio.subprocess.Process, tuple[str, int]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastproxy.devtools.upstream", "--listen", f"{next_pod_address()}:0",
        "--concurrency", str(concurrency), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    host, port = line.split()[1].rsplit(":", 1)
    return proc, (host, int(port))


async def test_stopped_pod_gives_504_at_deadline_no_replay_slot_freed(harness: RouterHarness) -> None:
    proc, address = await app_process()
    try:
        router, port = await harness.router([pod_record("p1", address)], first_byte_timeout=0.5)
        os.kill(proc.pid, signal.SIGSTOP)  # connect still succeeds (the kernel accepts); the app hangs
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        response = await asyncio.wait_for(reader.read(-1), 10)
        assert status_of(response) == 504
        assert 0.4 < time.monotonic() - started < 5
        assert router.slots.pods["p1"].inflight == 0
        assert router.stats.retries == {}  # the request may have reached the app: never replayed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        await proc.wait()


async def test_pod_killed_mid_response_never_looks_complete(harness: RouterHarness) -> None:
    router, port = await harness.router([])
    routes = list(router.snapshot.routes.values())
    for generation, path in enumerate((b"/size/50000000", b"/chunked/50000000/1000"), start=2):
        proc, address = await app_process()
        try:
            router.install(router.snapshot.build(1, generation, [pod_record("p1", address, generation=generation)],
                                                 routes))  # fmt: skip
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(100_000)
            proc.kill()  # mid-response
            await proc.wait()
            rest = b""
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                rest = await asyncio.wait_for(reader.read(-1), 10)
            if b"content-length: 50000000" in head.lower():
                assert 100_000 + len(rest) < 50_000_000  # short of its Content-Length: visibly cut
            else:
                assert not rest.endswith(b"0\r\n\r\n")  # no terminating chunk: visibly cut
            writer.close()
            await wait_for(lambda: router.slots.pods["p1"].inflight == 0, what="slot freed")
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def test_slowloris_does_not_starve_good_clients(harness: RouterHarness) -> None:
    app = await harness.app()
    router, port = await harness.router([pod_record("p1", app.address, concurrency=100)], header_timeout=2.0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        quiet = []
        for _ in range(50):
            started = time.perf_counter()
            assert (await client.get("/")).status_code == 200
            quiet.append(time.perf_counter() - started)
        # 300 connections trickling a request head one byte at a time.
        trickles = []
        for _ in range(300):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHo")
            trickles.append(w)
        loud = []
        for _ in range(50):
            started = time.perf_counter()
            assert (await client.get("/")).status_code == 200
            loud.append(time.perf_counter() - started)
            for w in trickles[:50]:
                w.write(b"s")
        quiet.sort()
        loud.sort()
        print(f"\ngood-client p50 quiet {quiet[25] * 1e3:.2f} ms, under slowloris {loud[25] * 1e3:.2f} ms")
        assert loud[25] < max(4 * quiet[25], 0.02)
        # The header deadline closes every trickling connection.
        await wait_for(lambda: len(router.connections) <= 1, timeout=10, what="slowloris connections closed")
        for w in trickles:
            w.close()
    assert len(app.requests) == 100


async def test_header_flood_is_refused_and_memory_stays_bounded(harness: RouterHarness) -> None:
    app = await harness.app()
    _, port = await harness.router([pod_record("p1", app.address)])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
    statuses = []
    with contextlib.suppress(ConnectionError):
        for _ in range(2000):
            writer.write(b"X-Flood: " + b"f" * 100 + b"\r\n")
            await writer.drain()
    with contextlib.suppress(ConnectionError):
        data = await asyncio.wait_for(reader.read(-1), 10)
        statuses.append(status_of(data))
    assert statuses in ([431], [])  # refused, or the connection was cut while we still wrote
    assert app.requests == []
