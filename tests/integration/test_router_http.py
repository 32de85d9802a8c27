"""The router as an HTTP/1.1 intermediary, over real sockets to real app servers.

Every rejection test asserts both the status the client got and that the pod saw nothing; every
forwarding test asserts what the pod actually received on the wire.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from fastproxy.router import Router
from tests.conftest import (
    RouterHarness,
    chat_route,
    exchange,
    next_pod_address,
    pod_record,
    status_of,
    wait_for,
)


async def one_pod(harness: RouterHarness, **config: object) -> tuple[object, int]:
    app = await harness.app()
    _, port = await harness.router([pod_record("p1", app.address)], **config)  # type: ignore[arg-type]
    return app, port


# ---- forwarding -----------------------------------------------------------------------------------


async def test_get_is_rebuilt_hop_by_hop_stripped_and_forwarding_headers_set(harness: RouterHarness) -> None:
    app, port = await one_pod(harness)
    response = await exchange(
        port,
        b"GET /v1/models?x=1 HTTP/1.1\r\nHost: Chat.Example.com:8080\r\nConnection: close, x-secret\r\n"
        b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nAccept: */*\r\n\r\n",
    )
    assert status_of(response) == 200
    assert b"connection: close" in response.lower()
    (request,) = app.requests
    names = [name for name, _ in request.headers]
    assert request.target == b"/v1/models?x=1"
    assert request.header(b"host") == b"Chat.Example.com:8080"
    assert request.header(b"accept") == b"*/*"
    assert request.header(b"x-forwarded-for") == b"127.0.0.1"  # the spoofed value is gone
    assert request.header(b"x-forwarded-proto") == b"http"
    assert request.header(b"x-request-id")
    for hop in (b"x-secret", b"keep-alive", b"te", b"proxy-authorization", b"forwarded"):
        assert hop not in names
    assert names.count(b"x-forwarded-for") == 1


async def test_trusted_proxy_keeps_and_extends_x_forwarded_for(harness: RouterHarness) -> None:
    app, port = await one_pod(harness, trusted_proxies=("127.0.0.0/8",))
    await exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.1.2.3\r\nX-Request-Id: abc\r\nConnection: close\r\n\r\n",
    )
    (request,) = app.requests
    assert request.header(b"x-forwarded-for") == b"10.1.2.3, 127.0.0.1"
    assert request.header(b"x-request-id") == b"abc"


async def test_bodies_stream_both_framings(harness: RouterHarness) -> None:
    app, port = await one_pod(harness)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        body = bytes(range(256)) * 1000
        r = await client.post("/echo", content=body)
        assert r.status_code == 200 and r.content == body

        async def chunks():
            for i in range(5):
                yield b"piece-%d;" % i

        r = await client.post("/echo", content=chunks())
        assert r.status_code == 200 and r.content == b"piece-0;piece-1;piece-2;piece-3;piece-4;"
        r = await client.get("/chunked/100000/7")
        assert r.status_code == 200 and len(r.content) == 100000
    chunked_request = app.requests[1]
    assert chunked_request.header(b"transfer-encoding") == b"chunked"
    assert chunked_request.body == b"piece-0;piece-1;piece-2;piece-3;piece-4;"
    assert app.requests[0].header(b"content-length") == b"256000"


async def test_pipelined_requests_answered_in_order(harness: RouterHarness) -> None:
    _, port = await one_pod(harness)
    response = await exchange(
        port,
        b"GET /delay/50 HTTP/1.1\r\nHost: a\r\nX-Request-Id: first\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: second\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: a\r\nX-Request-Id: third\r\nConnection: close\r\n\r\n",
    )
    assert response.count(b"HTTP/1.1 ") == 3
    assert response.index(b"first") < response.index(b"second") < response.index(b"third")


async def test_http10_client_gets_close_delimited_stream(harness: RouterHarness) -> None:
    _, port = await one_pod(harness)
    response = await exchange(port, b"GET /chunked/3000/3 HTTP/1.0\r\nHost: a\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_of(response) == 200
    assert b"transfer-encoding" not in head.lower()
    assert len(body) == 3000


async def test_head_and_204_have_no_body(harness: RouterHarness) -> None:
    _, port = await one_pod(harness)
    response = await exchange(
        port,
        b"HEAD /size/5000 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /size/3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    parts = response.split(b"HTTP/1.1 ")
    assert [p[:3] for p in parts[1:]] == [b"200", b"204", b"200"]
    assert b"content-length: 5000" in parts[1].lower()
    assert parts[1].endswith(b"\r\n\r\n")  # nothing after the HEAD response head


async def test_client_expect_100_continue(harness: RouterHarness) -> None:
    app, port = await one_pod(harness)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.readuntil(b"hello"), 5)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()
    assert app.requests[0].header(b"expect") is None


async def test_sse_passes_through_without_buffering(harness: RouterHarness) -> None:
    _, port = await one_pod(harness)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /sse/3/300 HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await asyncio.wait_for(reader.readuntil(b"data: 0\n\n"), 5)
    # The first event arrives long before the stream ends (3 events, 300 ms apart).
    assert loop.time() - started < 0.25, first
    await asyncio.wait_for(reader.readuntil(b"data: 2\n\n"), 5)
    writer.close()


async def test_slow_reader_keeps_router_memory_bounded(harness: RouterHarness) -> None:
    app = await harness.app()
    router, port = await harness.router([pod_record("p1", app.address)])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /size/200000000 HTTP/1.1\r\nHost: a\r\n\r\n")
    await reader.readexactly(1024)
    # The client reads nothing more: backpressure must reach the pod.
    await app.wait_until(lambda: app.write_pauses > 0, timeout=10)

    def router_buffered() -> int:
        return sum(c.transport.get_write_buffer_size() for c in router.connections if c.transport)

    assert router_buffered() < 4 * 1024 * 1024
    writer.close()


# ---- bad input: the status, and nothing reaches the pod ---------------------------------------------

BAD_REQUESTS = {
    "cl-and-te": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate-cl": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "bad-cl": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3x\r\n\r\nabc", 400),
    "te-not-final": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "te-non-chunked-coding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "bare-cr": (b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
    "bad-chunk-size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "missing-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "duplicate-host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "invalid-host": (b"GET / HTTP/1.1\r\nHost: a/b@c\r\n\r\n", 400),
    "http09": (b"GET /\r\n\r\n", 400),
    "http2-line": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "connect": (b"CONNECT pod:443 HTTP/1.1\r\nHost: pod:443\r\n\r\n", 405),
    "h2c-upgrade-smuggling": (
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
    ),
    "fragment": (b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "asterisk": (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "chunked-on-http10": (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "url-too-long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "header-too-large": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
    "too-many-headers": (
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n",
        431,
    ),
    "body-too-large-by-cl": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\n\r\n", 413),
    "chunk-extension-flood": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;"
        + b"e" * 60000
        + b"\r\nx\r\n0\r\n\r\n",
        400,
    ),
    "unsupported-expect": (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 417),
    "expect-on-a-body": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 200-ok\r\n\r\nabc",
        417,
    ),
    "http3-line": (b"GET / HTTP/3.1\r\nHost: a\r\n\r\n", 505),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
async def test_bad_request_rejected_and_never_forwarded(harness: RouterHarness, name: str) -> None:
    app, port = await one_pod(
        harness, limits=__import__("fastproxy.exchange").exchange.Limits(max_body_bytes=10**6)
    )
    data, status = BAD_REQUESTS[name]
    response = await exchange(port, data)
    assert status_of(response) == status, response[:200]
    assert b"connection: close" in response.lower()
    assert app.requests == [] and all(len(raw) == 0 for raw in app.raw.values())


@pytest.mark.parametrize("version", [b"1.2", b"1.9"])
async def test_a_higher_minor_version_is_served_as_http11(harness: RouterHarness, version: bytes) -> None:
    """RFC 9110 2.5 / 6.2: a recipient accepts HTTP/1.x for x > 1 and answers as 1.1."""
    app, port = await one_pod(harness)
    response = await exchange(port, b"GET /v HTTP/" + version + b"\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    (request,) = app.requests
    assert request.target == b"/v"
    raw = bytes(next(iter(app.raw.values())))
    assert raw.startswith(b"GET /v HTTP/1.1\r\n")


async def test_trailers_are_not_merged_into_headers(harness: RouterHarness) -> None:
    app, port = await one_pod(harness)
    response = await exchange(
        port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Injected: 1\r\nHost: evil\r\n\r\n",
    )
    assert status_of(response) == 200
    (request,) = app.requests
    assert request.body == b"abc"
    assert request.header(b"x-injected") is None
    assert b"x-injected" not in bytes(next(iter(app.raw.values()))).lower()


async def test_header_timeout_is_408(harness: RouterHarness) -> None:
    app, port = await one_pod(harness, header_timeout=0.2)
    response = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n")  # head never finishes
    assert status_of(response) == 408
    assert app.requests == []


# ---- routing ---------------------------------------------------------------------------------------


async def test_no_route_is_404_and_no_pods_is_503(harness: RouterHarness) -> None:
    app = await harness.app()
    routes = [
        chat_route(hosts=("chat.example.com",)),
        chat_route(("empty-v1", 100), hosts=("empty.example.com",)).__class__(
            service="empty", hosts=("empty.example.com",), revisions=chat_route(("empty-v1", 100)).revisions
        ),
    ]
    _, port = await harness.router([pod_record("p1", app.address)], routes)
    assert (
        status_of(await exchange(port, b"GET / HTTP/1.1\r\nHost: other.org\r\nConnection: close\r\n\r\n"))
        == 404
    )
    response = await exchange(port, b"GET / HTTP/1.1\r\nHost: empty.example.com\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 503 and b"retry-after" in response.lower()
    ok = await exchange(port, b"GET / HTTP/1.1\r\nHost: chat.example.com\r\nConnection: close\r\n\r\n")
    assert status_of(ok) == 200
    # The admin API is not reachable through the proxy port, whatever the Host or target form.
    for target in (b"/metrics", b"/v1/pods", b"http://127.0.0.1:9090/metrics"):
        r = await exchange(
            port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nConnection: close\r\n\r\n"
        )
        assert status_of(r) == 404


async def test_service_header_and_weighted_split(harness: RouterHarness) -> None:
    stable = await harness.app()
    canary = await harness.app()
    routes = [chat_route(("chat-v1", 75), ("chat-v2", 25), hosts=("chat.example.com",))]
    pods = [
        pod_record("s", stable.address, "chat-v1", concurrency=100),
        pod_record("c", canary.address, "chat-v2", concurrency=100),
    ]
    _, port = await harness.router(pods, routes)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(200):
            r = await client.get("/", headers={"x-fastproxy-service": "chat"})
            assert r.status_code == 200
    assert len(stable.requests) + len(canary.requests) == 200
    assert 25 <= len(canary.requests) <= 80  # 25% expected; loose bound for randomness


# ---- failures -------------------------------------------------------------------------------------


async def test_dead_pod_between_requests_costs_no_client_error(harness: RouterHarness) -> None:
    alive = await harness.app()
    dead = await harness.app()
    dead_address = dead.address
    await dead.close()  # its address now refuses connections, for real
    router, port = await harness.router(
        [pod_record("dead", dead_address, concurrency=4), pod_record("alive", alive.address, concurrency=4)]
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        statuses = [(await client.get("/")).status_code for _ in range(20)]
    assert statuses == [200] * 20
    assert router.stats.local_exclusions == 1
    (report,) = router.reports
    assert report.uid == "dead" and report.failure.value == "refused"


async def test_request_sent_to_a_pod_that_dies_is_502_and_not_replayed(harness: RouterHarness) -> None:
    app = await harness.app()
    other = await harness.app()
    _, port = await harness.router([pod_record("p1", app.address), pod_record("p2", other.address)])
    for path in (b"/reset", b"/eof"):
        response = await exchange(
            port,
            b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        assert status_of(response) == 502
    assert len(app.requests) + len(other.requests) == 2  # each reached exactly one pod, once


async def test_cc1_pod_never_sees_two_requests_at_once(harness: RouterHarness) -> None:
    pods = [await harness.app(concurrency_limit=1) for _ in range(3)]
    _, port = await harness.router(
        [pod_record(f"p{i}", app.address) for i, app in enumerate(pods)], queue_timeout=10
    )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=30)
    ) as c:
        results = await asyncio.gather(*(c.get("/delay/20") for _ in range(30)))
    assert [r.status_code for r in results] == [200] * 30
    assert sum(app.violations for app in pods) == 0
    assert max(app.max_concurrent_seen for app in pods) == 1


async def test_queue_deadline_and_bound(harness: RouterHarness) -> None:
    app = await harness.app(concurrency_limit=1)
    router, port = await harness.router([pod_record("p1", app.address)], queue_timeout=0.3, max_queued=1)
    busy = asyncio.create_task(
        exchange(port, b"GET /delay/1500 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    await app.wait_until(lambda: app.active == 1, timeout=5)
    waiting = asyncio.create_task(exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    await wait_for(lambda: router.slots.revisions["chat-v1"].queued == 1, what="one queued")
    overflow = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_of(overflow) == 503  # queue bound
    late = await waiting
    assert status_of(late) == 503 and b"retry-after: 1" in late.lower()  # queue deadline
    assert status_of(await busy) == 200
    assert router.slots.revisions["chat-v1"].queued == 0
    assert app.request_count == 1


async def test_queued_request_is_served_when_a_slot_frees(harness: RouterHarness) -> None:
    app = await harness.app(concurrency_limit=1)
    router, port = await harness.router([pod_record("p1", app.address)], queue_timeout=5)
    first = asyncio.create_task(
        exchange(port, b"GET /delay/200 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    await app.wait_until(lambda: app.active == 1, timeout=5)
    second = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_of(second) == 200 and status_of(await first) == 200
    assert app.violations == 0
    assert router.stats.queue_wait.count == 1


async def test_queued_client_leaving_frees_its_place(harness: RouterHarness) -> None:
    app = await harness.app(concurrency_limit=1)
    router, port = await harness.router([pod_record("p1", app.address)], queue_timeout=5)
    busy = asyncio.create_task(
        exchange(port, b"GET /delay/500 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    await app.wait_until(lambda: app.active == 1, timeout=5)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await wait_for(lambda: router.slots.revisions["chat-v1"].queued == 1, what="queued")
    writer.close()
    await wait_for(lambda: router.slots.revisions["chat-v1"].queued == 0, what="queue emptied")
    assert status_of(await busy) == 200
    assert app.request_count == 1  # the departed client's request never reached the pod


async def test_first_byte_timeout_is_504_and_frees_the_slot(harness: RouterHarness) -> None:
    app = await harness.app()
    router, port = await harness.router([pod_record("p1", app.address)], first_byte_timeout=0.3)
    response = await exchange(port, b"GET /hang HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 504
    assert router.slots.pods["p1"].inflight == 0
    assert app.request_count == 1


async def test_client_abort_mid_stream_closes_upstream_and_frees_slot(harness: RouterHarness) -> None:
    app = await harness.app()
    router, port = await harness.router([pod_record("p1", app.address)])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /sse/100/50 HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"data: 1\n\n"), 5)
    assert router.slots.pods["p1"].inflight == 1
    writer.transport.abort()
    await wait_for(lambda: router.slots.pods["p1"].inflight == 0, timeout=1, what="slot freed")
    await app.wait_until(lambda: app.open_connections == 0, timeout=1)


async def test_broken_upstream_framing_is_502_and_connection_not_reused(harness: RouterHarness) -> None:
    app = await harness.app()
    _router, port = await harness.router([pod_record("p1", app.address)])
    response = await exchange(
        port,
        b"HEAD /head-body HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    # The HEAD answer is fine; the stray body bytes after it poison that pod connection.
    assert response.count(b"HTTP/1.1 200") == 2
    await wait_for(lambda: app.connections_accepted == 2, what="a fresh pod connection")


async def test_sidecar_busy_refusal_repicks_without_error(harness: RouterHarness) -> None:
    full = await harness.app(concurrency_limit=1, sidecar_busy=True)
    free = await harness.app(concurrency_limit=1, sidecar_busy=True)
    router, port = await harness.router(
        [pod_record("full", full.address), pod_record("free", free.address)], sidecar_protocol=True
    )
    # Another router's request occupies "full" (the pod's own count is authoritative).
    other = asyncio.create_task(
        exchange(full.address[1] and port, b"GET /delay/10 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    await other
    _hog_reader, hog_writer = await asyncio.open_connection(*full.address)
    hog_writer.write(b"GET /delay/2000 HTTP/1.1\r\nHost: a\r\n\r\n")
    await full.wait_until(lambda: full.active == 1, timeout=5)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        results = [await client.post("/echo", content=b"x" * 10) for _ in range(4)]
    assert [r.status_code for r in results] == [200] * 4
    assert full.violations == 0 and free.violations == 0
    assert full.refused >= 1
    assert router.stats.busy_refusals >= 1 and router.stats.local_exclusions == 0
    hog_writer.close()


async def test_early_answer_with_body_in_the_same_packet_is_answered_once(harness: RouterHarness) -> None:
    """A 404 decided at the head while the body sits in the same read: one answer, connection usable."""
    app = await harness.app()
    _, port = await harness.router([pod_record("p1", app.address)], [chat_route(hosts=("a",))])
    response = await exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: nowhere.example\r\nContent-Length: 5\r\n\r\nhello"
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert response.count(b"HTTP/1.1 404") == 1
    assert response.count(b"HTTP/1.1 200") == 1


class RawPod:
    """A pod made of plain sockets, so the test decides to the syscall when a connection closes."""

    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((next_pod_address(), 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.requests: list[bytes] = []

    async def serve_one(self) -> socket.socket:
        """Accept one connection, answer one request on it, keep it open (keep-alive)."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self.listener)
        conn.setblocking(False)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await loop.sock_recv(conn, 65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(find_header_value(head, b"content-length") or 0)
        while len(body) < length:
            body += await loop.sock_recv(conn, 65536)
        self.requests.append(head + b"\r\n\r\n" + body)
        await loop.sock_sendall(conn, self.RESPONSE)
        return conn


def find_header_value(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


REQUESTS = {
    "GET": b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "POST": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
}


async def race_on_a_pooled_connection(
    harness: RouterHarness, request: bytes, *, pod_closes_first: bool
) -> tuple[RawPod, Router, bytes]:
    """One request through a router to a RawPod (its connection goes back to the pool), then, in one
    synchronous step before the loop can poll, the pod closes that idle connection and the router
    gets the same request again -- in one order or the other. Returns the second response."""
    pod = RawPod()
    router, port = await harness.router([pod_record("p1", pod.address)])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    first = asyncio.create_task(pod.serve_one())
    writer.write(request)
    assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
    pod_side = await first
    await wait_for(lambda: router.pool.idle_count == 1, what="connection back in the pool")
    (client,) = router.connections
    second = asyncio.create_task(pod.serve_one())
    await asyncio.sleep(0)  # the second accept is waiting
    if pod_closes_first:
        pod_side.close()  # its FIN reaches the router's socket at once on loopback
        client.data_received(request)
    else:
        client.data_received(request)  # written at once on the pooled connection...
        pod_side.close()  # ...which the pod closes with it unread: RST
    response = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
    await asyncio.wait_for(second, 5)
    writer.close()
    pod.listener.close()
    return pod, router, response


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_pooled_connection_closed_by_pod_just_before_reuse_is_not_used(
    harness: RouterHarness, method: str
) -> None:
    """The pod closes an idle keep-alive connection at the instant the router would reuse it: the
    pod's FIN is already in the router's socket, not yet seen by the loop, when the next request
    comes. Sent there, the request would meet a closed socket (never read, but unprovably so: a 502
    for nothing). The router checks the connection's TCP state first and opens a new one."""
    pod, router, response = await race_on_a_pooled_connection(
        harness, REQUESTS[method], pod_closes_first=True
    )
    assert response.startswith(b"HTTP/1.1 200"), response
    assert [r.split(b" ", 1)[0] for r in pod.requests] == [method.encode()] * 2  # each request once
    assert router.stats.retries == {} and router.stats.local_exclusions == 0 and not router.reports
    assert router.slots.pods["p1"].inflight == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_reused_connection_reset_with_the_request_unread_is_sent_again(
    harness: RouterHarness, method: str
) -> None:
    """The FIN-crossing-our-request race: the router has already written the request on a pooled
    connection when the pod closes that connection with the request still unread in its socket.
    The pod's kernel answers with a RST (a socket closed after reading everything sends a FIN), so
    the app cannot have seen it: the router sends it again, and the client sees no error."""
    pod, router, response = await race_on_a_pooled_connection(
        harness, REQUESTS[method], pod_closes_first=False
    )
    assert response.startswith(b"HTTP/1.1 200"), response
    assert [r.split(b" ", 1)[0] for r in pod.requests] == [method.encode()] * 2  # the app read each once
    assert router.stats.retries == {"stale_connection": 1}
    assert router.stats.local_exclusions == 0 and not router.reports
    assert router.slots.pods["p1"].inflight == 0


async def test_pod_that_read_the_request_then_closed_is_502_not_resent(harness: RouterHarness) -> None:
    """The counterpart: the pod reads the request and closes (FIN, no RST): it may have acted on
    it, so the router must not send it again."""
    pod = RawPod()
    router, port = await harness.router([pod_record("p1", pod.address)])
    loop = asyncio.get_running_loop()

    async def read_then_close() -> None:
        conn = await pod.serve_one()  # first request answered on this connection
        data = await loop.sock_recv(conn, 65536)  # the second request: read, then closed
        pod.requests.append(data)
        conn.close()

    serving = asyncio.create_task(read_then_close())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    await asyncio.wait_for(reader.readuntil(b"ok"), 5)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    response = await asyncio.wait_for(reader.read(-1), 5)
    await serving
    assert status_of(response) == 502
    assert len(pod.requests) == 2 and router.stats.retries == {}
    pod.listener.close()


# ---- a pod that sends bytes after its answer to HEAD ----------------------------------------------


def proxy_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "fastproxy.proxy" and r.levelname == "WARNING"
    ]


HEAD_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n"
AFTER_HEAD = b"hello" + b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"  # a body, then a response


@pytest.mark.parametrize("when", ["same_read", "later_read"])
async def test_bytes_after_a_head_answer_drop_the_pod_connection_not_the_clients_answer(
    harness: RouterHarness, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """A pod answers HEAD with a head and then a body it must not send (and more), in the same
    write or once the router's connection to it is idle in the pool. The client gets the HEAD
    response as the pod gave it (head only: a response to HEAD ends there) and its connection
    stays good; the pod connection is closed, never reused, and a warning names the pod's address
    and what it did. The next request goes to the pod on a new connection."""
    pod = RawPod()
    # (idle connections outlive the test: only the router's decision can close this one)
    router, port = await harness.router([pod_record("p1", pod.address)], pool_idle_timeout=60.0)
    loop = asyncio.get_running_loop()

    async def misbehave() -> socket.socket:
        conn, _ = await loop.sock_accept(pod.listener)
        conn.setblocking(False)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await loop.sock_recv(conn, 65536)
        pod.requests.append(data)
        if when == "same_read":
            await loop.sock_sendall(conn, HEAD_ANSWER + AFTER_HEAD)
        else:
            await loop.sock_sendall(conn, HEAD_ANSWER)
            await wait_for(lambda: router.pool.idle_count == 1, what="the connection idle in the pool")
            await loop.sock_sendall(conn, AFTER_HEAD)
        return conn

    serving = asyncio.create_task(misbehave())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /file HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5\r\n" in head.lower()
    pod_side = await asyncio.wait_for(serving, 5)
    # The router closes its end of that pod connection: the pod reads EOF (with a deadline).
    assert await asyncio.wait_for(loop.sock_recv(pod_side, 65536), 5) == b""
    pod_side.close()
    await wait_for(lambda: router.pool.idle_count == 0, what="the connection out of the pool")

    # The client's connection is intact: its next request is answered next, by a fresh connection.
    second = asyncio.create_task(pod.serve_one())
    writer.write(b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(-1), 5)
    await asyncio.wait_for(second, 5)
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"\r\n\r\nok"), rest
    assert rest.count(b"HTTP/1.1") == 1  # nothing of the pod's stray bytes reached the client
    assert [r.split(b" ", 2)[:2] for r in pod.requests] == [[b"HEAD", b"/file"], [b"GET", b"/next"]]
    warnings = proxy_warnings(caplog)
    address = f"{pod.address[0]}:{pod.address[1]}"
    assert any(address in m and "bytes after a HEAD response" in m for m in warnings), warnings
    assert router.slots.pods["p1"].inflight == 0
    writer.close()
    pod.listener.close()


async def test_a_response_after_a_complete_one_drops_the_pod_connection(
    harness: RouterHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """The same rule for a GET: a pod that writes a second, unasked response right after its
    answer has broken the connection's framing. The client gets the first; the pod connection is
    closed with a warning, not put back in the pool for the next request to read that response."""
    pod = RawPod()
    pod.RESPONSE = RawPod.RESPONSE + b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    # (idle connections outlive the test: only the router's decision can close this one)
    router, port = await harness.router([pod_record("p1", pod.address)], pool_idle_timeout=60.0)
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(pod.serve_one())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    response = await asyncio.wait_for(reader.read(-1), 5)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"\r\n\r\nok"), response
    pod_side = await asyncio.wait_for(serving, 5)
    assert await asyncio.wait_for(loop.sock_recv(pod_side, 65536), 5) == b""  # closed, not pooled
    assert router.pool.idle_count == 0
    warnings = proxy_warnings(caplog)
    assert any("bytes after a complete response" in m for m in warnings), warnings
    pod_side.close()
    writer.close()
    pod.listener.close()
