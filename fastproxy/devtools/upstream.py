"""A small, fast HTTP/1.1 application server that stands in for an inference pod.

Theory of operation
-------------------
Tests and benchmarks drive this server *through* the proxy, so everything it does is chosen by the
request itself (path, query, one header) and everything it saw is recorded for assertions:

- ``/echo``                    200, body = request body, content-type copied from the request
- ``/size/<n>``                200, ``n`` bytes (``payload(n)``) with Content-Length
- ``/chunked/<n>/<k>``         200, ``payload(n)`` in ``k`` chunks (Transfer-Encoding: chunked)
- ``/sse/<events>/<ms>``       text/event-stream, chunked; event ``i`` (``data: <i>\\n\\n``) is sent
                               ``i * ms`` after the headers, each flushed on its own
- ``/delay/<ms>``              sleep, then 200 ``ok``
- ``/status/<code>``           that status (204 and 304 without a body)
- ``/close``                   200 with ``Connection: close``, then close
- ``/hang``                    never answer; the connection stays open (the request stays active)
- ``/reset``                   close with SO_LINGER 0 before answering: the peer sees a TCP RST
- ``/eof``                     close cleanly (FIN) without answering
- ``/cut/<n>``                 200 announcing ``2n`` bytes, sends ``n`` of them, then FIN: a
                               response broken in the middle
- ``/head-body``               a broken server: answers HEAD *with* a body (GET is answered normally)
- ``/v1/chat/completions``     an OpenAI-style chat completion: 200 with a ~1 KB JSON answer; a body
                               with ``"stream":true`` gets ``x-app-events: N`` (default 100) SSE
                               chunks, one every ``x-app-event-interval-us`` (default 1000), each
                               stamped with the app's ``time.monotonic_ns()`` when it was written
                               (``"t":...``: one-way delay, on the same machine), then ``[DONE]``
- ``/ready``                   200 while ``ready``, else 503 (what a sidecar probes)
- ``/control/ready/<0|1>``     set ``ready``; ``/control/block/<ms>`` blocks the whole app's loop
- ``/control/stats[/reset]``   the accounting as JSON (see below)
- ``/control/ids``             the ``x-request-id`` of every request executed (``record_ids`` only)
- ``/ws/echo``, ``/ws/tokens/<n>/<ms>``  a WebSocket handshake (RFC 6455) opens a session
                               (``wsapp.WsSession``: echo, or a token stream) that holds one slot
                               in ``active`` until it ends
- anything else                200 ``{"ok":true}``

``x-app-delay-ms: N`` (or the query ``?delay_ms=N``) adds latency before any of these. Every
response carries ``x-app-request-index`` (the request's global index, i.e. its position in
``AppServer.requests``) and echoes ``x-request-id``. Keep-alive is the default for HTTP/1.1; an
HTTP/1.0 request closes unless it asked for keep-alive (and streams to it are close-delimited).

Each connection is one ``asyncio.Protocol`` feeding an ``httptools.HttpRequestParser``. A complete
request whose answer needs no waiting (the default, echo, status, small sizes, ...) is answered
synchronously from the parser callback, so the common path costs no task and no loop iteration.
Anything that waits (delays, streams, large bodies under flow control, hang) goes to one task per
connection that drains the connection's FIFO of requests, so pipelined requests are answered in
order. Large and streaming bodies go out in 64 KiB pieces and wait for ``resume_writing`` when the
transport pauses, so a slow reader bounds what the server buffers.

``active`` counts requests being processed (from dispatch to the last byte written, or until the
connection dies); ``concurrency_limit`` turns ``active > limit`` into a counted violation, which is
how a test proves a proxy never overloads a pod. In ``sidecar_busy`` mode the server also plays the
sidecar's polite refusal: a request that arrives while ``active >= concurrency_limit`` gets
``503`` + ``x-fastproxy-busy: 1`` at its head, before its body is read, and is not counted as a request (its body, if the client sends it anyway, is parsed and dropped, so
the connection stays usable); an admitted one takes its slot at once and gets ``100 Continue``.
A pipelined ``Expect`` request (one arriving while an earlier one is still being answered) gets no
interim response, which RFC 9110 allows; the client sends its body after its own timeout.

Waiting in tests is condition-based: every state change wakes ``wait_until`` waiters, which
re-check their predicate under a deadline (``wait_for_requests`` is one such predicate).

Control requests (``/ready`` and ``/control/*``) operate the app; they are not its work: they
never take a slot in ``active``, are never refused, never count as violations and never end an idle
gap. An *idle gap* is the time from the moment ``active`` dropped to 0 to the next request taking a
slot (the last ``IDLE_GAPS_KEPT`` per server). ``/control/stats`` answers JSON: ``violations``,
``max_concurrent_seen``, ``request_count`` (every request), ``work_count`` (slot-taking requests),
``idle_gap_count``, ``idle_gaps_ms`` (list) and ``servers`` (each server's own figures), over all
the servers of the process; ``/control/stats/reset`` first forgets the idle gaps (an idle period in
progress then counts from the reset).

Executed request ids (``record_ids``, for fault tests that prove "no request ran twice"): every
work request the app received complete (so executed; busy refusals and control requests are not)
has its ``x-request-id`` (or ``-`` without one) remembered in ``ExecutedIds``: the most recent
``IDS_KEPT`` ids in order, plus a count of every id seen and of those seen again while still
remembered (``duplicates``), so memory stays bounded however long the process serves.
``/control/ids`` answers ``{"count", "duplicates", "dropped", "ids"}`` over the servers of the
process. With ``ids_file`` each id is also appended as one line to that file by a ``write(2)`` per
request, so the record survives the process being SIGKILLed (what the page cache holds is not lost
with the process).

Run as a process: ``python -m fastproxy.devtools.upstream --listen 127.0.0.1:9001
[--listen HOST:PORT ...] [--concurrency N] [--sidecar-busy] [--record-ids] [--ids-file PATH]``
starts one server per ``--listen`` (each its own pod with its own limit), prints ``listening
HOST:PORT [HOST:PORT ...]`` once all are bound, and exits cleanly on SIGTERM. The process does not
record requests (only, when asked, their ids, bounded), so it can serve benchmarks indefinitely.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Final, cast

import httptools
import msgspec

from fastproxy.devtools.wsapp import WsSession, is_websocket_handshake, switching_head

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency, but the tool must not need it
    uvloop = None  # type: ignore[assignment]

__all__ = ["AppServer", "ExecutedIds", "ReceivedRequest", "main", "payload"]

_BLOCK: Final = 64 * 1024
# Bodies are a repeating 64-byte pattern, so a test can check integrity and position of any byte.
_PATTERN: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-\n"
# One pattern longer than a block, so any block-sized slice can start at any pattern offset.
_PATTERN_RUN: Final = _PATTERN * (_BLOCK // len(_PATTERN) + 1)
# Bodies up to this size are written at once; beyond it they go through flow control.
_SYNC_BODY_MAX: Final = _BLOCK

_OK_JSON: Final = b'{"ok":true}'
# What an OpenAI-compatible server answers to a chat completion: ~1 KB of JSON.
CHAT_COMPLETION: Final = (
    b'{"id":"chatcmpl-8f2a41c0b7d94e0e9a6b0c1d2e3f4a5b","object":"chat.completion","created":1764000000,'
    b'"model":"llama-3.1-8b-instruct","system_fingerprint":"fp_0123456789",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"'
    + b"The text argues that small, fast routers beat queues for real-time inference. "
    * 9
    + b'"},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":212,"completion_tokens":150,"total_tokens":362}}'
)
_STREAM_REQUESTED: Final = b'"stream":true'
_BUSY: Final = b"HTTP/1.1 503 Service Unavailable\r\nx-fastproxy-busy: 1\r\ncontent-length: 0\r\n"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER_RST: Final = struct.pack("ii", 1, 0)
_NO_BODY_STATUS: Final = frozenset((204, 304))
# Routes whose answer involves waiting; they always go through the connection's task.
_ASYNC_ROUTES: Final = frozenset((b"delay", b"sse", b"chunked", b"hang"))
# Routes that operate the app rather than being its work: never counted in ``active``, never a
# violation, never the end of an idle gap (a sidecar's readiness probe is not app work).
_CONTROL_ROUTES: Final = frozenset((b"ready", b"control"))
IDLE_GAPS_KEPT: Final = 10_000  # per AppServer, the most recent ones
IDS_KEPT: Final = 200_000  # executed request ids remembered per process (the most recent ones)

_status_lines: dict[int, bytes] = {}


def _status_line(code: int) -> bytes:
    line = _status_lines.get(code)
    if line is None:
        try:
            phrase = http.HTTPStatus(code).phrase
        except ValueError:
            phrase = "Unknown"
        line = _status_lines[code] = b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode("ascii"))
    return line


def payload(n: int, offset: int = 0) -> bytes:
    """The ``n`` body bytes that start at ``offset`` of every generated body (``/size``, ``/chunked``)."""
    start = offset % len(_PATTERN)
    reps = (start + n + len(_PATTERN) - 1) // len(_PATTERN)
    return (_PATTERN * reps)[start : start + n]


class ReceivedRequest(msgspec.Struct, gc=False):
    """One complete request as the app saw it."""

    index: int  # global arrival order; the response's x-app-request-index
    conn_id: int
    conn_index: int  # position on its connection (0 = first request)
    method: str
    target: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]  # in arrival order, names lower-cased
    body: bytes
    keep_alive: bool

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]


class ExecutedIds:
    """The ``x-request-id`` of executed requests: bounded memory, optional append-only file."""

    __slots__ = ("_fd", "count", "dropped", "duplicates", "order", "seen")

    def __init__(self, path: str | None = None, kept: int = IDS_KEPT) -> None:
        self.order: collections.deque[bytes] = collections.deque(maxlen=kept)
        self.seen: set[bytes] = set()
        self.count = 0
        self.duplicates = 0  # ids seen again while still remembered
        self.dropped = 0  # ids forgotten to keep memory bounded
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None

    def add(self, rid: bytes) -> None:
        self.count += 1
        if self._fd is not None:
            os.write(self._fd, rid + b"\n")  # one write per id: survives a SIGKILL of this process
        if rid in self.seen:
            self.duplicates += 1
            return
        order = self.order
        if len(order) == order.maxlen:
            self.seen.discard(order[0])
            self.dropped += 1
        order.append(rid)
        self.seen.add(rid)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def as_json(self) -> dict[str, object]:
        return {
            "count": self.count,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "ids": [rid.decode("latin-1") for rid in self.order],
        }


class _Job:
    """A request waiting for (or getting) its answer on one connection."""

    __slots__ = ("args", "control", "delay", "req", "reserved", "route")

    def __init__(self, req: ReceivedRequest, route: bytes, args: list[bytes], delay: float) -> None:
        self.req = req
        self.route = route
        self.args = args
        self.delay = delay
        self.reserved = False  # True once it holds a slot in AppServer.active
        self.control = route in _CONTROL_ROUTES  # never takes a slot


def _plan(req: ReceivedRequest) -> _Job:
    path, _, query = req.target.partition(b"?")
    parts = path.split(b"/")
    delay_ms = 0
    raw_delay = req.header(b"x-app-delay-ms")
    try:
        if raw_delay is not None:
            delay_ms += int(raw_delay)
        if query:
            for item in query.split(b"&"):
                if item.startswith(b"delay_ms="):
                    delay_ms += int(item[9:])
    except ValueError:
        delay_ms = 0  # a malformed delay is ignored rather than failing the request
    return _Job(req, parts[1] if len(parts) > 1 else b"", parts[2:], max(delay_ms, 0) / 1000)


def _is_control(target: bytes) -> bool:
    parts = target.partition(b"?")[0].split(b"/", 2)
    return len(parts) > 1 and parts[1] in _CONTROL_ROUTES


class _AppConnection(asyncio.Protocol):
    """One client connection: parser callbacks, the per-connection FIFO and its responder task."""

    __slots__ = (
        "_body",
        "_closing",
        "_drain_waiter",
        "_expect",
        "_headers",
        "_id",
        "_index",
        "_keep_alive",
        "_loop",
        "_parser",
        "_paused",
        "_pending",
        "_raw",
        "_refused",
        "_reserved",
        "_server",
        "_task",
        "_transport",
        "_url",
        "_ws",
    )

    def __init__(self, server: AppServer, conn_id: int) -> None:
        self._server = server
        self._id = conn_id
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._raw: bytearray | None = None
        self._index = 0
        self._closing = False
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._pending: collections.deque[_Job | None] = collections.deque()  # None: answer 400, close
        self._task: asyncio.Task[None] | None = None
        self._ws: WsSession | None = None  # the session a WebSocket handshake opened
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: bytearray | None = None
        self._expect = False
        self._refused = False
        self._reserved = False
        self._keep_alive = True

    # -- transport events ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check)
        self._transport = cast(asyncio.Transport, transport)
        server = self._server
        server._conns.add(self)
        server.connections_accepted += 1
        server.open_connections += 1
        if server.record:
            self._raw = server.raw[self._id] = bytearray()
        server._notify()

    def data_received(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw += data
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The upgraded request was already dispatched (and answered with Connection: close, see
            # on_headers_complete, or with a 101: a session); what follows is not HTTP.
            self._closing = True
            session = self._ws
            if session is not None and self._transport is not None:
                self._transport.set_protocol(session)
                offset = exc.args[0] if exc.args else len(data)
                session.start(data[offset:])
        except httptools.HttpParserError:
            self._closing = True
            if self._task is None:
                self._bad_request()
            else:
                self._pending.append(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        server = self._server
        server._conns.discard(self)
        server.open_connections -= 1
        # Slots held by requests that will never run their own release: the admitted Expect
        # request whose body never came, and queued jobs the task never reached.
        if self._reserved:
            self._reserved = False
            server._end()
        for job in self._pending:
            if job is not None and job.reserved:
                server._end()
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()  # its finally releases the slot of the job in progress
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
        server._notify()

    def pause_writing(self) -> None:
        self._paused = True
        self._server.write_pauses += 1
        self._server._notify()

    def resume_writing(self) -> None:
        self._paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _drain(self) -> None:
        if self._closing:
            raise ConnectionResetError("connection closing")
        if self._paused:
            waiter = self._drain_waiter = self._loop.create_future()
            await waiter

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        self._url += url  # the parser may deliver the target in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect = True

    def on_headers_complete(self) -> None:
        if self._closing:
            return
        parser = self._parser
        # After an upgrade the stream is no longer HTTP: answer this request, then close.
        self._keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        pipelined = self._task is not None or bool(self._pending)
        server = self._server
        limit = server.concurrency_limit
        if (
            server.sidecar_busy
            and limit is not None
            and server.active >= limit
            and not pipelined
            and not _is_control(self._url)
        ):
            # Like the real sidecar: full means refused at the head, Expect or not.
            self._refused = True
            server.refused += 1
            rid = self._header(b"x-request-id")
            head = _BUSY + (b"x-request-id: " + rid + b"\r\n" if rid is not None else b"")
            if self._keep_alive:
                self._write(head + b"\r\n")
            else:
                self._write(head + b"connection: close\r\n\r\n")
                self._close()
            server._notify()
            return
        if not self._expect or parser.get_http_version() != "1.1":
            return
        if pipelined:
            return  # pipelined behind an unfinished answer: no interim response (see module doc)
        if _is_control(self._url):
            self._write(_CONTINUE)  # control requests are never refused and take no slot
            return
        server._begin()
        self._reserved = True
        self._write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._refused or self._closing:
            return  # a refused request's body is read only to keep the connection in sync
        if self._body is None:
            self._body = bytearray(body)
        else:
            self._body += body

    def on_message_complete(self) -> None:
        if self._closing:
            return
        if self._refused:
            self._reset_message()
            return
        server = self._server
        parser = self._parser
        req = ReceivedRequest(
            index=server.request_count,
            conn_id=self._id,
            conn_index=self._index,
            method=parser.get_method().decode("ascii"),
            target=self._url,
            http_version=parser.get_http_version(),
            headers=self._headers,
            body=bytes(self._body) if self._body is not None else b"",
            keep_alive=self._keep_alive,
        )
        self._index += 1
        server._record(req)
        job = _plan(req)
        job.reserved = self._reserved
        self._reserved = False
        if job.route == b"ws" and parser.should_upgrade() and self._task is None and not self._pending:
            self._open_websocket(job)
            return
        if self._task is not None:
            self._pending.append(job)  # answered in order once the current answer is done
            return
        if not job.reserved and not job.control:
            server._begin()
            job.reserved = True
        if job.delay == 0.0:
            try:
                done = self._answer_now(job)
            except Exception as exc:
                done = True
                self._fail(exc)
            if done:
                if job.reserved:
                    server._end()
                return
        self._pending.append(job)
        self._task = self._loop.create_task(self._serve())

    def _open_websocket(self, job: _Job) -> None:
        """Answer a handshake with 101; the session (``WsSession``) holds a slot until it ends."""
        key = is_websocket_handshake(self._headers)
        if key is None:
            self._simple(job.req, 400, b"not a WebSocket handshake\n", b"text/plain", close=True)
            if job.reserved:
                self._server._end()
            return
        server = self._server
        if not job.reserved:
            server._begin()
        assert self._transport is not None

        def ended() -> None:
            server._end()
            self.connection_lost(None)

        self._ws = WsSession(self._transport, job.req.target, ended, self._loop)
        self._write(switching_head(key, b"x-app-request-index: %d\r\n" % job.req.index))

    def _header(self, name: bytes) -> bytes | None:
        for key, value in self._headers:
            if key == name:
                return value
        return None

    # -- answering -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        server = self._server
        try:
            while self._pending and not self._closing:
                job = self._pending.popleft()
                if job is None:
                    self._bad_request()
                    break
                if not job.reserved and not job.control:
                    server._begin()
                    job.reserved = True
                try:
                    if job.delay:
                        await asyncio.sleep(job.delay)
                    if not self._answer_now(job):
                        await self._answer_later(job)
                finally:
                    if job.reserved:
                        server._end()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client left; connection_lost has cleaned up
        except Exception as exc:
            self._fail(exc)
        finally:
            self._task = None

    def _fail(self, exc: Exception) -> None:
        """A bug in this server: keep it visible to tests, and do not leave the client hanging."""
        self._server.errors.append(exc)
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def _close(self) -> None:
        self._closing = True
        assert self._transport is not None
        self._transport.close()  # flushes what was written, then FIN

    def _head(
        self,
        req: ReceivedRequest,
        status: int,
        *,
        length: int | None = None,
        ctype: bytes | None = None,
        chunked: bool = False,
        close: bool = False,
        extra: bytes = b"",
    ) -> tuple[bytes, bool]:
        """The response head, and whether the connection closes after this response."""
        parts = [_status_line(status)]
        if ctype is not None:
            parts.append(b"content-type: " + ctype + b"\r\n")
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"x-app-request-index: %d\r\n" % req.index)
        rid = req.header(b"x-request-id")
        if rid is not None:
            parts.append(b"x-request-id: " + rid + b"\r\n")
        if extra:
            parts.append(extra)
        close = close or not req.keep_alive
        if close:
            parts.append(b"connection: close\r\n")
        elif req.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts), close

    def _simple(
        self, req: ReceivedRequest, status: int, body: bytes, ctype: bytes | None, close: bool = False
    ) -> None:
        """A complete response with a Content-Length body (none for HEAD or 204/304)."""
        no_body = status in _NO_BODY_STATUS
        head, close = self._head(req, status, length=None if no_body else len(body), ctype=ctype, close=close)
        if no_body or req.method == "HEAD":
            self._write(head)
        else:
            self._write(head + body)
        if close:
            self._close()

    def _answer_now(self, job: _Job) -> bool:
        """Answer ``job`` at once if it needs neither waiting nor flow control; False otherwise."""
        req, route, args = job.req, job.route, job.args
        if route in _ASYNC_ROUTES:
            return False
        try:
            if route == b"echo":
                if len(req.body) > _SYNC_BODY_MAX:
                    return False
                ctype = req.header(b"content-type") or b"application/octet-stream"
                self._simple(req, 200, req.body, ctype)
            elif route == b"size":
                n = int(args[0])
                if n < 0:
                    raise ValueError(n)
                if n > _SYNC_BODY_MAX:
                    return False
                self._simple(req, 200, payload(n), b"application/octet-stream")
            elif route == b"status":
                code = int(args[0])
                if not 200 <= code <= 999:
                    raise ValueError(code)  # a 1xx as the final answer would wedge the client
                self._simple(req, code, b'{"status":%d}' % code, b"application/json")
            elif route == b"close":
                self._simple(req, 200, b"ok", b"text/plain", close=True)
            elif route == b"eof":
                self._close()
            elif route == b"cut":
                n = int(args[0])
                if n < 1:
                    raise ValueError(n)
                head, _ = self._head(req, 200, length=2 * n, ctype=b"application/octet-stream")
                self._write(head + payload(n))
                self._close()
            elif route == b"reset":
                self._reset()
            elif route == b"ready":
                # The readiness a sidecar probes: flipped with /control/ready/<0|1>.
                ready = self._server.ready
                self._simple(req, 200 if ready else 503, b"ready" if ready else b"loading", b"text/plain")
            elif route == b"control":
                if args[0] == b"stats":
                    if args[1:] == [b"reset"]:
                        for server in self._server.group:
                            server.reset_idle_gaps()
                    elif args[1:]:
                        raise ValueError(args[1])
                    stats = msgspec.json.encode(self._server.group_stats())
                    self._simple(req, 200, stats, b"application/json")
                    return True
                if args[0] == b"ids" and not args[1:]:
                    ids = self._server.executed_ids
                    if ids is None:
                        self._simple(req, 404, b"not recording ids (--record-ids)\n", b"text/plain")
                    else:
                        self._simple(req, 200, msgspec.json.encode(ids.as_json()), b"application/json")
                    return True
                if args[0] == b"ready":
                    self._server.ready = args[1] == b"1"
                elif args[0] == b"block":
                    time.sleep(int(args[1]) / 1000)  # a stall of the whole app: GC pause, model load
                else:
                    raise ValueError(args[0])
                self._simple(req, 200, b"ok", b"text/plain")
            elif route == b"v1" and args == [b"chat", b"completions"]:
                if _STREAM_REQUESTED in req.body.replace(b" ", b""):
                    return False  # streamed: _answer_later
                self._simple(req, 200, CHAT_COMPLETION, b"application/json")
            elif route == b"head-body":
                head, close = self._head(req, 200, length=len(_OK_JSON), ctype=b"application/json")
                self._write(head + _OK_JSON)  # even for HEAD: that is the point
                if close:
                    self._close()
            else:
                self._simple(req, 200, _OK_JSON, b"application/json")
        except (ValueError, IndexError):
            self._simple(req, 400, b"bad request\n", b"text/plain")
        return True

    async def _answer_later(self, job: _Job) -> None:
        req, route, args = job.req, job.route, job.args
        try:
            if route == b"delay":
                delay = int(args[0]) / 1000
                if delay < 0:
                    raise ValueError(delay)
                await asyncio.sleep(delay)
                self._simple(req, 200, b"ok", b"text/plain")
            elif route == b"hang":
                await self._loop.create_future()  # cancelled when the connection goes
            elif route == b"size":
                await self._send_generated(req, int(args[0]), 1)
            elif route == b"chunked":
                n, k = int(args[0]), int(args[1])
                if n < 0 or k < 1:
                    raise ValueError((n, k))
                await self._send_generated(req, n, k, chunked=True)
            elif route == b"sse":
                events, interval_ms = int(args[0]), int(args[1])
                if events < 0 or interval_ms < 0:
                    raise ValueError((events, interval_ms))
                await self._send_sse(req, events, interval_ms / 1000)
            elif route == b"v1":
                events = int(req.header(b"x-app-events") or b"100")
                interval_us = int(req.header(b"x-app-event-interval-us") or b"1000")
                if events < 0 or interval_us < 0:
                    raise ValueError((events, interval_us))
                await self._send_chat_stream(req, events, interval_us / 1e6)
            elif route == b"echo":
                ctype = req.header(b"content-type") or b"application/octet-stream"
                head, close = self._head(req, 200, length=len(req.body), ctype=ctype)
                self._write(head)
                if req.method != "HEAD":
                    view = memoryview(req.body)
                    for off in range(0, len(view), _BLOCK):
                        self._write(bytes(view[off : off + _BLOCK]))
                        await self._drain()
                if close:
                    self._close()
            else:  # pragma: no cover - _answer_now handles every other route
                raise AssertionError(route)
        except (ValueError, IndexError):
            self._simple(req, 400, b"bad request\n", b"text/plain")

    async def _send_generated(self, req: ReceivedRequest, n: int, k: int, *, chunked: bool = False) -> None:
        """``payload(n)`` with Content-Length (``chunked=False``) or in ``k`` near-equal chunks."""
        # An HTTP/1.0 client cannot read chunked encoding: send the bytes and close instead.
        chunked = chunked and req.http_version != "1.0"
        if chunked:
            head, close = self._head(req, 200, ctype=b"application/octet-stream", chunked=True)
        elif req.http_version == "1.0" and k > 1:
            head, close = self._head(req, 200, ctype=b"application/octet-stream", close=True)
        else:
            head, close = self._head(req, 200, length=n, ctype=b"application/octet-stream")
        self._write(head)
        if req.method != "HEAD":
            base, extra = divmod(n, k)
            offset = 0
            for i in range(k):
                size = base + (1 if i < extra else 0)
                if size == 0:
                    continue  # a zero-size chunk would end the body early
                if chunked:
                    self._write(b"%x\r\n" % size)
                await self._stream_pattern(offset, size)
                if chunked:
                    self._write(b"\r\n")
                offset += size
            if chunked:
                self._write(b"0\r\n\r\n")
        if close:
            self._close()

    async def _stream_pattern(self, offset: int, size: int) -> None:
        end = offset + size
        while offset < end:
            take = min(_BLOCK, end - offset)
            start = offset % len(_PATTERN)
            self._write(_PATTERN_RUN[start : start + take])
            offset += take
            await self._drain()

    async def _send_sse(self, req: ReceivedRequest, events: int, interval: float) -> None:
        chunked = req.http_version != "1.0"
        head, close = self._head(
            req,
            200,
            ctype=b"text/event-stream",
            chunked=chunked,
            close=not chunked,
            extra=b"cache-control: no-cache\r\n",
        )
        self._write(head)
        if req.method != "HEAD":
            loop = self._loop
            start = loop.time()
            for i in range(events):
                if i:
                    # Absolute schedule, so a slow write does not push every later event back.
                    await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
                event = b"data: %d\n\n" % i
                self._write(b"%x\r\n%b\r\n" % (len(event), event) if chunked else event)
                await self._drain()
            if chunked:
                self._write(b"0\r\n\r\n")
        if close:
            self._close()

    async def _send_chat_stream(self, req: ReceivedRequest, events: int, interval: float) -> None:
        """OpenAI-style streaming: one ``chat.completion.chunk`` per token, then ``[DONE]``."""
        head, close = self._head(
            req, 200, ctype=b"text/event-stream", chunked=True, extra=b"cache-control: no-cache\r\n"
        )
        self._write(head)
        loop = self._loop
        start = loop.time()
        for i in range(events):
            if i:
                await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
            event = (
                b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"llama-3.1-8b-instruct",'
                b'"choices":[{"index":0,"delta":{"content":"tok%d "}}],"i":%d,"t":%d}\n\n'
                % (i, i, time.monotonic_ns())
            )
            self._write(b"%x\r\n%b\r\n" % (len(event), event))
            await self._drain()
        done = b"data: [DONE]\n\n"
        self._write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        if close:
            self._close()

    def _reset(self) -> None:
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes close() send RST instead of FIN: the peer sees "connection reset".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self._closing = True
        self._transport.abort()

    def _bad_request(self) -> None:
        self._write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self._close()


class AppServer:
    """The stand-in inference app; see the module docstring for the routes and the accounting."""

    def __init__(
        self,
        *,
        concurrency_limit: int | None = None,
        sidecar_busy: bool = False,
        record: bool = True,
        executed_ids: ExecutedIds | None = None,
    ) -> None:
        self.concurrency_limit = concurrency_limit
        self.sidecar_busy = sidecar_busy
        self.ready = True  # what /ready answers; /control/ready/<0|1> flips it
        # Benchmarks that run for long turn recording off; the counters still work.
        self.record = record
        # Ids of executed requests (shared by the servers of one process); None: not recorded.
        self.executed_ids = executed_ids
        self.violations = 0
        self.max_concurrent_seen = 0
        self.active = 0
        self.refused = 0  # busy refusals (sidecar_busy); these are not in `requests`
        self.request_count = 0  # every request received (control ones included)
        self.work_count = 0  # requests that took a slot: the app's work (control ones excluded)
        self.requests: list[ReceivedRequest] = []
        self.raw: dict[int, bytearray] = {}
        self.connections_accepted = 0
        self.open_connections = 0
        self.write_pauses = 0  # how often a slow reader made a transport push back
        self.errors: list[Exception] = []  # exceptions inside the server itself; tests assert none
        self._conns: set[_AppConnection] = set()
        self._next_conn_id = 0
        self._server: asyncio.Server | None = None
        self._waiters: set[asyncio.Event] = set()
        self.address: tuple[str, int] | None = None
        # Idle gaps: from the moment ``active`` dropped to 0 to the next request taking a slot
        # (seconds, the most recent IDLE_GAPS_KEPT); the time before the first request is none.
        self.idle_gaps: collections.deque[float] = collections.deque(maxlen=IDLE_GAPS_KEPT)
        self.idle_gap_count = 0  # all gaps ever recorded (since the last reset), kept or not
        self._idle_since: float | None = None
        # The servers of one process (``/control/stats`` reports them all); just this one by default.
        self.group: list[AppServer] = [self]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_connection, host, port, backlog=1024)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    async def close(self) -> None:
        """Stop listening and drop every connection (hanging ones included)."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            if conn._transport is not None:
                conn._transport.abort()
        await self._server.wait_closed()
        tasks = [conn._task for conn in list(self._conns) if conn._task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.wait_until(lambda: self.open_connections == 0, timeout=5.0)
        self._server = None

    def buffered_bytes(self) -> int:
        """Response bytes written but not yet taken by the kernel, over all connections."""
        return sum(c._transport.get_write_buffer_size() for c in self._conns if c._transport is not None)

    async def __aenter__(self) -> AppServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds, re-checked at every state change; TimeoutError at ``timeout``."""
        if predicate():
            return
        event = asyncio.Event()
        self._waiters.add(event)
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    event.clear()
                    await event.wait()
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout}s") from None
        finally:
            self._waiters.discard(event)

    async def wait_for_requests(self, n: int, timeout: float) -> list[ReceivedRequest]:
        """Wait until ``n`` requests were received; return the first ``n`` (empty when not recording)."""
        try:
            await self.wait_until(lambda: self.request_count >= n, timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.request_count} of {n} requests within {timeout}s") from None
        return self.requests[:n]

    # -- accounting (called by connections) ------------------------------------------------------

    def _make_connection(self) -> _AppConnection:
        conn_id = self._next_conn_id
        self._next_conn_id += 1
        return _AppConnection(self, conn_id)

    def _notify(self) -> None:
        for event in self._waiters:
            event.set()

    def _record(self, req: ReceivedRequest) -> None:
        self.request_count += 1
        if self.record:
            self.requests.append(req)
        ids = self.executed_ids
        if ids is not None and not _is_control(req.target):
            ids.add(req.header(b"x-request-id") or b"-")
        self._notify()

    def _begin(self) -> None:
        self.work_count += 1
        active = self.active = self.active + 1
        if active == 1 and self._idle_since is not None:
            self.idle_gaps.append(time.perf_counter() - self._idle_since)
            self.idle_gap_count += 1
            self._idle_since = None
        if active > self.max_concurrent_seen:
            self.max_concurrent_seen = active
        limit = self.concurrency_limit
        if limit is not None and active > limit:
            self.violations += 1

    def _end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle_since = time.perf_counter()
        if self._waiters:
            self._notify()

    # -- statistics (``/control/stats``) ---------------------------------------------------------

    def reset_idle_gaps(self) -> None:
        """Forget the gaps so far; an idle period in progress counts from now."""
        self.idle_gaps.clear()
        self.idle_gap_count = 0
        self._idle_since = time.perf_counter() if self.active == 0 else None

    def stats(self) -> dict[str, object]:
        """This server's accounting (its idle gaps summarised; the list is in ``group_stats``)."""
        return {
            "address": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "violations": self.violations,
            "max_concurrent_seen": self.max_concurrent_seen,
            "request_count": self.request_count,
            "work_count": self.work_count,
            "refused": self.refused,
            "active": self.active,
            "idle_gap_count": self.idle_gap_count,
            "idle_gap_max_ms": max(self.idle_gaps, default=0.0) * 1000,
        }

    def group_stats(self) -> dict[str, object]:
        """What ``/control/stats`` answers: totals over ``group`` plus each server's own figures.

        ``request_count`` counts every request received, control ones included (it is also the
        ``x-app-request-index`` sequence); ``work_count`` only those that took a slot.
        """
        servers = [server.stats() for server in self.group]
        gaps = [gap * 1000 for server in self.group for gap in server.idle_gaps]
        return {
            "violations": sum(server.violations for server in self.group),
            "max_concurrent_seen": max(server.max_concurrent_seen for server in self.group),
            "request_count": sum(server.request_count for server in self.group),
            "work_count": sum(server.work_count for server in self.group),
            "idle_gap_count": sum(server.idle_gap_count for server in self.group),
            "idle_gaps_ms": gaps,
            "servers": servers,
        }


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def _serve_forever(
    listen: list[tuple[str, int]],
    concurrency: int | None,
    sidecar_busy: bool,
    record_ids: bool = False,
    ids_file: str | None = None,
) -> None:
    """One ``AppServer`` per address (each its own pod, with its own limit), all in this process."""
    ids = ExecutedIds(ids_file) if record_ids or ids_file else None
    servers = [
        AppServer(concurrency_limit=concurrency, sidecar_busy=sidecar_busy, record=False, executed_ids=ids)
        for _ in listen
    ]
    try:
        bound = [await server.start(host, port) for server, (host, port) in zip(servers, listen, strict=True)]
        for server in servers:
            server.group = servers
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("listening " + " ".join(f"{h}:{p}" for h, p in bound), flush=True)
        await stop.wait()
    finally:
        for server in servers:
            await server.close()
        if ids is not None:
            ids.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastproxy.devtools.upstream", description="Stand-in inference app server."
    )
    parser.add_argument(
        "--listen",
        type=_parse_listen,
        action="append",
        metavar="HOST:PORT",
        help="address of one app server (repeatable: one server per address; default 127.0.0.1:9001)",
    )
    parser.add_argument("--concurrency", type=int, default=None, help="count requests beyond N in flight")
    parser.add_argument(
        "--sidecar-busy", action="store_true", help="refuse Expect: 100-continue requests when full"
    )
    parser.add_argument(
        "--record-ids",
        action="store_true",
        help="remember executed x-request-ids (bounded); GET /control/ids",
    )
    parser.add_argument(
        "--ids-file", metavar="PATH", help="append each executed x-request-id to PATH (implies --record-ids)"
    )
    args = parser.parse_args(argv)
    coro = _serve_forever(
        args.listen or [("127.0.0.1", 9001)],
        args.concurrency,
        args.sidecar_busy,
        args.record_ids,
        args.ids_file,
    )
    if uvloop is not None:
        uvloop.run(coro)
    else:  # pragma: no cover
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
