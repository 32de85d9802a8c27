"""The stand-in app server: routes, accounting, recording, sidecar refusal, flow control, process mode."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable

import httptools
import httpx
import pytest
import uvloop

from fastproxy.devtools.upstream import AppServer, ExecutedIds, payload

TIMEOUT = 5.0  # every wait below is bounded by this; none is expected to come close


@pytest.fixture
async def server() -> AsyncIterator[AppServer]:
    async with AppServer() as srv:
        yield srv
        assert srv.errors == []


def url(srv: AppServer, path: str) -> str:
    assert srv.address is not None
    return f"http://{srv.address[0]}:{srv.address[1]}{path}"


async def connect(srv: AppServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert srv.address is not None
    return await asyncio.open_connection(*srv.address)


class Response:
    """One parsed response, keeping what a proxy test cares about."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.chunks = 0


class Responses:
    """The responses arriving on one raw connection, in order (pipelining-safe)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.parser = httptools.HttpResponseParser(self)
        self.current = Response()
        self.complete: collections.deque[Response] = collections.deque()

    def on_message_begin(self) -> None:
        self.current = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_chunk_header(self) -> None:
        self.current.chunks += 1

    def on_message_complete(self) -> None:
        self.complete.append(self.current)

    async def next(self) -> Response:
        async with asyncio.timeout(TIMEOUT):
            while not self.complete:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("connection closed mid-response")
                self.parser.feed_data(data)
        return self.complete.popleft()


async def read_response(reader: asyncio.StreamReader) -> Response:
    """Read one response off a connection that carries exactly one."""
    return await Responses(reader).next()


async def test_default_echo_and_recording(server: AppServer) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(url(server, "/anything?x=1"), headers={"x-request-id": "req-7"})
        assert r.status_code == 200
        assert r.json() == {"ok": True}
        assert r.headers["x-request-id"] == "req-7"
        assert r.headers["x-app-request-index"] == "0"
        r = await client.post(
            url(server, "/echo"), content=b"hello world", headers={"content-type": "text/x-t"}
        )
        assert r.status_code == 200
        assert r.content == b"hello world"
        assert r.headers["content-type"] == "text/x-t"
        assert r.headers["x-app-request-index"] == "1"
        assert "x-request-id" not in r.headers
    first, second = await server.wait_for_requests(2, TIMEOUT)
    assert (first.method, first.target, first.http_version, first.body) == (
        "GET",
        b"/anything?x=1",
        "1.1",
        b"",
    )
    assert first.path == b"/anything"
    assert first.header(b"x-request-id") == b"req-7"
    assert all(name == name.lower() for name, _ in first.headers)
    assert (second.method, second.body, second.index) == ("POST", b"hello world", 1)
    # httpx kept the connection alive: both requests came on one connection, in order.
    assert first.conn_id == second.conn_id
    assert (first.conn_index, second.conn_index) == (0, 1)
    assert server.connections_accepted == 1


async def test_size_and_chunked_bodies(server: AppServer) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(url(server, "/size/200000"))
        assert r.headers["content-length"] == "200000"
        assert r.content == payload(200000)
        r = await client.get(url(server, "/size/0"))
        assert r.content == b""
    reader, writer = await connect(server)
    writer.write(b"GET /chunked/100000/7 HTTP/1.1\r\nhost: x\r\n\r\n")
    resp = await read_response(reader)
    assert resp.headers[b"transfer-encoding"] == b"chunked"
    assert b"content-length" not in resp.headers
    assert resp.chunks == 8  # seven data chunks and the terminating zero-size one
    assert bytes(resp.body) == payload(100000)
    # The chunked body's pattern continues across chunk boundaries, like a sliced payload.
    assert payload(10, offset=60) == payload(70)[60:]
    writer.close()


async def test_sse_events_arrive_separately_over_time(server: AppServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /sse/3/100 HTTP/1.1\r\nhost: x\r\n\r\n")
    seen: list[float] = []
    received = b""
    async with asyncio.timeout(TIMEOUT):
        while not received.endswith(b"0\r\n\r\n"):
            data = await reader.read(65536)
            assert data, "closed before the stream ended"
            received += data
            while f"data: {len(seen)}\n\n".encode() in received:
                seen.append(time.monotonic())
    assert b"content-type: text/event-stream" in received
    assert b"transfer-encoding: chunked" in received
    assert len(seen) == 3
    # Each event was flushed on its own, an interval after the previous one, not in one burst.
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert all(gap >= 0.08 for gap in gaps), gaps
    writer.close()


async def test_chat_completion_answers_1kb_json_and_streams_stamped_chunks(server: AppServer) -> None:
    import json

    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    reader, writer = await connect(server)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )
    resp = await read_response(reader)
    assert resp.status == 200 and resp.headers[b"content-type"] == b"application/json"
    answer = json.loads(bytes(resp.body))
    assert answer["object"] == "chat.completion" and 900 <= len(resp.body) <= 1200
    stream = b'{"model":"m","stream": true,"messages":[]}'
    sent = time.monotonic_ns()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-app-events: 5\r\n"
        b"x-app-event-interval-us: 20000\r\ncontent-length: %d\r\n\r\n%b" % (len(stream), stream)
    )
    resp = await read_response(reader)
    assert resp.status == 200 and resp.headers[b"content-type"] == b"text/event-stream"
    events = [e for e in bytes(resp.body).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and len(events) == 6
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert [c["i"] for c in chunks] == list(range(5))
    stamps = [c["t"] for c in chunks]
    # stamped when written, on the schedule: the i-th 20 ms * i after the first, never early (the
    # app keeps to its schedule, so one written late is followed by one sooner than 20 ms after it)
    assert stamps[0] >= sent and all(s - stamps[0] >= i * 18_000_000 for i, s in enumerate(stamps)), stamps
    writer.close()


async def test_status_204_has_no_body_and_connection_stays_in_sync(server: AppServer) -> None:
    reader, writer = await connect(server)
    # Pipelined: if the 204 carried a body, the second response would not start right after it.
    writer.write(b"GET /status/204 HTTP/1.1\r\nhost: x\r\n\r\nGET /status/418 HTTP/1.1\r\nhost: x\r\n\r\n")
    received = b""
    async with asyncio.timeout(TIMEOUT):
        while received.count(b"HTTP/1.1") < 2 or not received.endswith(b'{"status":418}'):
            received += await reader.read(65536)
    first, _, second = received.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert b"content-length" not in first
    assert second.startswith(b"HTTP/1.1 418 I'm a Teapot\r\n")
    writer.close()
    async with httpx.AsyncClient() as client:
        r = await client.get(url(server, "/status/304"))
        assert (r.status_code, r.content) == (304, b"")
        r = await client.get(url(server, "/status/abc"))
        assert r.status_code == 400


async def test_reset_is_a_tcp_reset_and_eof_is_clean(server: AppServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /reset HTTP/1.1\r\nhost: x\r\n\r\n")
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(TIMEOUT):
            while await reader.read(65536):
                pass
    writer.close()
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.TransportError):
            await client.get(url(server, "/reset"))
    reader, writer = await connect(server)
    writer.write(b"GET /eof HTTP/1.1\r\nhost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        assert await reader.read() == b""  # FIN, no bytes, no reset
    writer.close()
    await server.wait_until(lambda: server.open_connections == 0, TIMEOUT)
    assert server.request_count == 3  # each was received in full before the server walked away


async def test_concurrency_violation_counting() -> None:
    async with AppServer(concurrency_limit=1) as srv, httpx.AsyncClient() as client:
        await client.get(url(srv, "/delay/10"))
        await client.get(url(srv, "/delay/10"))
        assert (srv.violations, srv.max_concurrent_seen) == (0, 1)  # one after the other is fine
        r1, r2 = await asyncio.gather(client.get(url(srv, "/delay/200")), client.get(url(srv, "/delay/200")))
        assert r1.text == r2.text == "ok"
        assert srv.violations == 1
        assert srv.max_concurrent_seen == 2
        await srv.wait_until(lambda: srv.active == 0, TIMEOUT)
        assert srv.errors == []


async def test_delay_header_adds_latency(server: AppServer) -> None:
    async with httpx.AsyncClient() as client:
        start = time.monotonic()
        r = await client.get(url(server, "/size/10"), headers={"x-app-delay-ms": "150"})
        assert time.monotonic() - start >= 0.14
        assert r.content == payload(10)
        start = time.monotonic()
        await client.get(url(server, "/?delay_ms=100"))
        assert time.monotonic() - start >= 0.09


async def test_busy_refusal_with_expect_continue() -> None:
    async with AppServer(concurrency_limit=1, sidecar_busy=True) as srv:
        # Occupy the only slot.
        _, hang_w = await connect(srv)
        hang_w.write(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
        await srv.wait_until(lambda: srv.active == 1, TIMEOUT)

        reader, writer = await connect(srv)
        writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            refusal = await reader.readuntil(b"\r\n\r\n")
        assert refusal == (
            b"HTTP/1.1 503 Service Unavailable\r\nx-fastproxy-busy: 1\r\ncontent-length: 0\r\n\r\n"
        )
        assert (srv.refused, srv.request_count, srv.violations) == (1, 1, 0)
        # A client that sends the body anyway keeps the connection usable: the body is dropped.
        writer.write(b"hello")
        writer.write(b"GET /size/3 HTTP/1.1\r\nhost: x\r\n\r\n")
        responses = Responses(reader)
        resp = await responses.next()
        assert resp.status == 503  # refused at its head too: full means refused, Expect or not
        assert srv.violations == 0 and srv.refused == 2
        assert [r.target for r in srv.requests] == [b"/hang"]

        # Free the slot; an Expect request is now admitted, holds its slot before its body comes.
        hang_w.close()
        await srv.wait_until(lambda: srv.active == 0, TIMEOUT)
        writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert srv.active == 1
        writer.write(b"howdy")
        resp = await responses.next()
        assert (resp.status, bytes(resp.body)) == (200, b"howdy")
        assert srv.refused == 2
        await srv.wait_until(lambda: srv.active == 0, TIMEOUT)
        writer.close()
        assert srv.errors == []


async def test_raw_bytes_recorded_exactly(server: AppServer) -> None:
    sent = (
        b"POST /echo?q=1 HTTP/1.1\r\nHost: x\r\nX-Custom: A\r\nx-custom: b\r\ncontent-length: 3\r\n\r\nabc"
        b"PUT /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n3\r\nyou\r\n0\r\n\r\n"
    )
    reader, writer = await connect(server)
    writer.write(sent[:20])  # arbitrary split points: the parser must not care
    writer.write(sent[20:90])
    writer.write(sent[90:])
    first, second = await server.wait_for_requests(2, TIMEOUT)
    assert bytes(server.raw[first.conn_id]) == sent
    assert first.headers == [
        (b"host", b"x"),
        (b"x-custom", b"A"),
        (b"x-custom", b"b"),
        (b"content-length", b"3"),
    ]
    assert (first.target, first.body, second.method, second.body) == (b"/echo?q=1", b"abc", "PUT", b"hiyou")
    assert (first.conn_index, second.conn_index) == (0, 1)
    responses = Responses(reader)
    r1 = await responses.next()
    r2 = await responses.next()
    assert (bytes(r1.body), bytes(r2.body)) == (b"abc", b"hiyou")
    writer.close()


async def test_close_hang_and_http10(server: AppServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /close HTTP/1.1\r\nhost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        data = await reader.read()  # to EOF: the server closes after the answer
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close\r\n" in data
    writer.close()

    reader, writer = await connect(server)
    writer.write(b"GET /size/4 HTTP/1.0\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        data = await reader.read()
    assert data.endswith(b"\r\n\r\nabcd") and b"connection: close" in data
    writer.close()

    reader, writer = await connect(server)
    writer.write(b"GET /size/4 HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
    resp = await read_response(reader)  # (nothing else is in flight on this connection)
    assert resp.headers[b"connection"] == b"keep-alive"
    writer.write(b"GET /chunked/10/2 HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        data = await reader.read()  # HTTP/1.0 cannot take chunks: close-delimited instead
    assert data.endswith(b"\r\n\r\n" + payload(10)) and b"transfer-encoding" not in data
    writer.close()

    reader, writer = await connect(server)
    writer.write(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
    await server.wait_until(lambda: server.active == 1 and server.request_count == 5, TIMEOUT)
    assert server.open_connections >= 1
    writer.close()
    await server.wait_until(lambda: server.active == 0 and server.open_connections == 0, TIMEOUT)


async def test_head_and_head_body(server: AppServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"HEAD /size/10 HTTP/1.1\r\nhost: x\r\n\r\nHEAD /head-body HTTP/1.1\r\nhost: x\r\n\r\n")
    received = b""
    async with asyncio.timeout(TIMEOUT):
        while not received.endswith(b'{"ok":true}'):
            received += await reader.read(65536)
    first, second = received.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert b"content-length: 10\r\n" in first and first.endswith(b"\r\n\r\n")  # no body
    assert second.endswith(b'\r\n\r\n{"ok":true}')  # the broken server's body after a HEAD
    writer.close()


async def test_slow_reader_bounds_server_buffering(server: AppServer) -> None:
    size = 16 * 1024 * 1024
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # so the kernel cannot soak it up
    sock.setblocking(False)
    assert server.address is not None
    await asyncio.get_running_loop().sock_connect(sock, server.address)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /size/%d HTTP/1.1\r\nhost: x\r\n\r\n" % size)
    await server.wait_until(lambda: server.write_pauses >= 1, TIMEOUT)
    # Paused, not piling up: at most the transport's high-water mark plus one block.
    assert server.buffered_bytes() <= 256 * 1024
    resp = await read_response(reader)
    assert len(resp.body) == size and bytes(resp.body[-100:]) == payload(100, offset=size - 100)
    writer.close()


@pytest.mark.parametrize(
    "loop_factory", [asyncio.SelectorEventLoop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_on_both_loops(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """The server on an explicitly chosen loop, whatever policy the rest of the suite runs under."""

    async def scenario() -> None:
        async with AppServer(concurrency_limit=1) as srv, httpx.AsyncClient() as client:
            r = await client.post(url(srv, "/echo"), content=b"x" * 100_000)
            assert r.content == b"x" * 100_000
            r = await client.get(url(srv, "/chunked/1000/3"))
            assert r.content == payload(1000)
            reader, writer = await connect(srv)
            writer.write(b"GET /reset HTTP/1.1\r\nhost: x\r\n\r\n")
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(TIMEOUT):
                    while await reader.read(65536):
                        pass
            writer.close()
            assert srv.violations == 0 and srv.errors == []

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


async def test_process_mode_prints_address_and_exits_on_sigterm() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastproxy.devtools.upstream",
        "--listen",
        "127.0.0.1:0",
        "--concurrency",
        "4",
        stdout=asyncio.subprocess.PIPE,
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        word, _, address = line.decode().strip().partition(" ")
        assert word == "listening"
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://{address}/echo")
            assert r.status_code == 200 and r.headers["x-app-request-index"] == "0"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_executed_ids_recorded_once_each_bounded_and_control_excluded(tmp_path: object) -> None:
    ids = ExecutedIds(kept=3)
    async with AppServer(executed_ids=ids, record=False) as srv, httpx.AsyncClient() as client:
        for rid in ("a", "b", "a"):
            r = await client.get(url(srv, "/echo"), headers={"x-request-id": rid})
            assert r.headers["x-request-id"] == rid
        await client.get(url(srv, "/control/stats"), headers={"x-request-id": "control"})
        r = await client.get(url(srv, "/control/ids"))
        assert r.json() == {"count": 3, "duplicates": 1, "dropped": 0, "ids": ["a", "b"]}
        for rid in ("c", "d", "e"):
            await client.get(url(srv, "/"), headers={"x-request-id": rid})
        body = (await client.get(url(srv, "/control/ids"))).json()
        assert body["ids"] == ["c", "d", "e"] and body["dropped"] == 2 and body["count"] == 6
    async with AppServer() as srv, httpx.AsyncClient() as client:
        assert (await client.get(url(srv, "/control/ids"))).status_code == 404  # not recording


async def test_busy_refusal_is_not_an_executed_id() -> None:
    ids = ExecutedIds()
    async with AppServer(concurrency_limit=1, sidecar_busy=True, executed_ids=ids) as srv:
        _reader, writer = await connect(srv)
        writer.write(b"GET /hang HTTP/1.1\r\nhost: x\r\nx-request-id: slow\r\n\r\n")
        await srv.wait_until(lambda: srv.active == 1, TIMEOUT)
        async with httpx.AsyncClient() as client:
            r = await client.get(url(srv, "/"), headers={"x-request-id": "refused"})
            assert r.status_code == 503 and r.headers["x-fastproxy-busy"] == "1"
        writer.close()
        assert list(ids.order) == [b"slow"]


async def test_process_ids_file_survives_sigkill(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "ids")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastproxy.devtools.upstream", "--listen", "127.0.0.1:0", "--ids-file", path,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        address = line.decode().split()[1]
        async with httpx.AsyncClient() as client:
            for i in range(5):
                await client.get(f"http://{address}/", headers={"x-request-id": f"r{i}"})
            assert (await client.get(f"http://{address}/control/ids")).json()["count"] == 5
        proc.kill()
        await proc.wait()
        with open(path, "rb") as f:
            assert f.read().split() == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
