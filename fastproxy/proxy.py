"""The data path's I/O: client and pod connections, the upstream pool, and one exchange.

Theory of operation
-------------------
Two thin ``asyncio.Protocol`` classes do the I/O; the sans-IO parsers of ``exchange.py`` do the
HTTP; an ``Exchange`` carries one request from its parsed head to the end of its response.

``ClientConnection`` parses what the client sends and hands the events of one request at a time to
its current ``Exchange``; the events of pipelined requests wait (bounded: reading pauses) until the
response before them is complete, so responses go out in order.

``Exchange`` routes (snapshot read once), picks a pod from the slot table (or waits in the
revision's FIFO, with a deadline; or, on an LLM prefix route with ``affinity_wait_ms`` -- the
route's, else the router's ``--affinity-wait-ms`` -- briefly for its busy affine pods:
``_wait_affine``, each wait's outcome and time counted), takes a pooled
connection or opens one, writes the rebuilt head
and streams the body. Body bytes that arrive before a pod is ready are held (reading pauses past a
bound), so a request whose pod refuses the connection, times out connecting, or (sidecar protocol)
answers "busy" before the app saw anything, goes to a *different* pod with nothing lost: the pod is
excluded locally at once and reported. Once a byte of the request may have reached an app, the
request is never retried (RFC 9110 section 9.2.2); a failure then is 502, or 504 at the first-byte
deadline.

Flow control is coupled across the two sockets: when the pod's socket cannot take more, reading
from the client pauses, and when the client's socket cannot take more, reading from the pod
pauses. Pause and resume are idempotent and keyed by reason. Nothing is accumulated beyond one
socket read plus the bounded pre-connect hold, so SSE and hour-long responses stream through.

A pod connection carries one request at a time, so bytes from the pod after the response's end
are no part of anything: a body after an answer to HEAD (``BytesAfterHead``: that response ends at
its head), a second response, garbage, or bytes on an idle pooled connection. The response, whole
before the violation, goes to the client as the pod gave it (for HEAD: its head; the client asked
for nothing more and cannot tell, so a 502 would only lose a good answer); the connection, whose
framing can no longer be trusted, is closed and never reused, with a warning naming the pod, its
address and what it sent (``UpstreamConnection.broken``). Bytes that come after the connection
went back to the pool and was taken for the next request cannot be told from that request's
response: it fails 502 as malformed, its log saying what came before (``after a HEAD response``).

WebSocket: a handshake is an exchange like any other until the pod answers; a ``101`` to it turns
the two connections into a session of ``fastproxy.tunnel`` (``Exchange._switching_protocols``,
``ClientConnection.hand_over``), which holds the pod's slot until the session ends.

Timers: each connection owns one ``Deadline`` whose ``TimerHandle`` is rescheduled lazily, so
per-request deadlines do not create and cancel a timer per request.

Writes to clients: a response is queued on its connection and the connection on the router's
``write_queue``; the loop writes them all once it has handled every socket its poll reported
(``flush_queued_writes``, one ``call_soon`` per poll), so a client process asleep is woken once for
a poll's worth of responses. Whatever writes to or closes a client's transport directly flushes
that client first, so bytes leave in the order they were produced.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from asyncio.trsock import TransportSocket
from collections.abc import Callable
from time import perf_counter  # (a global, not time.perf_counter: no attribute lookup per read)
from typing import TYPE_CHECKING, Any, Final

try:  # the compiled form's helpers (Cython is only needed to build it)
    import cython
except ImportError:  # pragma: no cover - the pure form without Cython installed
    cython = None

from fastproxy.errors import (
    BadGateway,
    BytesAfterHead,
    GatewayTimeout,
    NotFound,
    ProxyError,
    RequestTimeout,
    ServiceUnavailable,
    SidecarBusy,
    UpstreamUnavailable,
)
from fastproxy.exchange import (
    END,
    LAST_CHUNK,
    PARSE_IDLE,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    build_request_head,
    build_response_head,
    chunk,
    error_response,
)
from fastproxy.llm import LLMRequest, LLMRoute, target_unavailable
from fastproxy.slots import QueueFull
from statesync.schema import PodRecord

if TYPE_CHECKING:
    from fastproxy.router import Router
    from fastproxy.routerbase import RouterBase

log = logging.getLogger("fastproxy.proxy")

# Reasons for pausing a socket's reading; reading resumes when none is left.
PAUSE_PEER_FULL = 1  # the other socket's write buffer is full
PAUSE_HOLDING = 2  # body bytes held while no pod is ready, or pipelined requests waiting
PAUSE_SHUTDOWN = 4

HOLD_LIMIT = 256 * 1024  # body bytes held before a pod is ready, per request
# Sidecar protocol: a request complete and at most this big goes with its body at once (no
# Expect: 100-continue round trip); a copy is kept so a busy refusal can still re-pick.
REPLAY_LIMIT = 64 * 1024
BUSY_HEADER = b"x-fastproxy-busy"
# A rejected client's remaining bytes are read and dropped (a lingering close) up to this much or
# this long, so its error response is not destroyed by a RST.
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 1.0
# How a pod's kernel says it discarded bytes of ours unread (see Exchange.on_upstream_lost).
_UNREAD_BY_PEER = frozenset({ConnectionResetError, BrokenPipeError})
# Sidecar protocol: a request that has already waited (in this router's queue, or refused as busy
# once) carries this header; a sidecar whose pod is full then parks it (bounded count and time)
# instead of refusing, and hands it the slot the moment the app finishes: no idle gap spent on a
# round trip through a router. A fresh request is refused at once: another pod may be free.
PARK_HEADER = b"x-fastproxy-park"
PARK_FIELD = (PARK_HEADER, b"1")
_TCP_ESTABLISHED = 1  # tcpi_state in struct tcp_info (linux/tcp.h, enum TCP_ESTABLISHED)
_IPPROTO_TCP = socket.IPPROTO_TCP  # (module constants: no attribute lookup per probe)
_TCP_INFO = socket.TCP_INFO
# the sockets a transport may hand out that are cheap to ask (uvloop's PseudoSocket is not: see
# UpstreamConnection.connection_made)
_STDLIB_SOCKETS = (socket.socket, TransportSocket)

_COMPILED: Final = not __file__.endswith(".py")


def _monotonic() -> float:
    """``perf_counter()`` (CLOCK_MONOTONIC on Linux), the clock of the added-latency samples: four
    readings per request. Compiled, it is read in C: no call through Python and no float object
    per reading. (Deadlines and idle times keep the loop's own, injectable clock.)"""
    if _COMPILED:
        clock_gettime(CLOCK_MONOTONIC, cython.address(now))  # noqa: F821
        return now.tv_sec + now.tv_nsec * 1e-9  # noqa: F821
    return perf_counter()


class Deadline:
    """One reusable timer. ``set`` moves the deadline; the handle is rescheduled only when it
    fires early, so moving a deadline forward per request costs no timer allocation."""

    __slots__ = ("_callback", "_handle", "_handle_when", "_loop", "_time", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._time = loop.time  # (bound once: read per request by set_after)
        self._callback = callback
        self._when: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._handle_when = 0.0  # when the handle fires (kept here: handle.when() is a call)

    def set(self, when: float) -> None:
        self._when = when
        handle = self._handle
        if handle is None:
            self._handle = self._loop.call_at(when, self._fire)
            self._handle_when = when
        elif self._handle_when > when:
            handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)
            self._handle_when = when

    def set_after(self, delay: float) -> None:
        """``set`` to ``delay`` seconds from now (the loop's time)."""
        self.set(self._time() + delay)

    def clear(self) -> None:
        self._when = None

    def cancel(self) -> None:
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self._when
        if when is None:
            return
        if self._time() < when:
            self._handle = self._loop.call_at(when, self._fire)
            self._handle_when = when
            return
        self._when = None
        self._callback()


# ---- upstream -----------------------------------------------------------------------------------


class UpstreamConnection:  # an asyncio.Protocol (duck-typed: compiled, it is an extension type)
    """One connection to one pod; serves one exchange at a time, then goes back to the pool."""

    __slots__ = (
        "_events",
        "_paused",
        "closed",
        "deadline",
        "exchange",
        "idle_cap",
        "parser",
        "pod_uid",
        "pool",
        "reusable",
        "socket",
        "socket_fd",
        "socket_getsockopt",
        "socket_wrapped",
        "transport",
        "transport_is_closing",
        "transport_write",
        "transport_writelines",
        "used",
    )

    def __init__(self, pool: UpstreamPool, pod_uid: str, concurrency: int = 1) -> None:
        self.pool = pool
        self.pod_uid = pod_uid
        # Keep as many idle connections as the pod can use at once (a pod serving 64 at a time
        # needs 64 connections), at least the pool's floor.
        self.idle_cap = max(pool.max_idle_per_pod, concurrency)
        self.transport: asyncio.Transport | None = None
        self.socket: Any = None  # the transport's socket, for TCP state (peer_closed)
        self.socket_getsockopt: Callable[..., Any] | None = None  # its bound getsockopt
        self.socket_fd = -1  # its fd, asked directly when compiled (-1: no socket)
        self.socket_wrapped = False  # self.socket wraps the transport's fd: detach, never close
        # The transport's methods used per request, bound once in connection_made: a call by name
        # on an untyped object is a method lookup each time (see ClientConnection.connection_made).
        self.transport_write: Callable[[bytes], None] | None = None
        self.transport_writelines: Callable[[list[bytes]], None] | None = None
        self.transport_is_closing: Callable[[], bool] | None = None
        self._events: list[object] = []
        self.parser = ResponseParser(self._events, pool.limits)
        self.exchange: Exchange | None = None
        self.closed = False
        self.reusable = True
        self.used = 0  # requests sent on this connection
        self._paused = 0
        self.deadline = Deadline(pool.loop, self._on_deadline)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.transport_write = transport.write  # type: ignore[attr-defined]
        self.transport_writelines = transport.writelines  # type: ignore[attr-defined]
        self.transport_is_closing = transport.is_closing
        sock = transport.get_extra_info("socket")
        if sock is not None and not isinstance(sock, _STDLIB_SOCKETS):
            # uvloop's PseudoSocket builds a socket.socket around the fd (a getsockname included)
            # on every getsockopt: a tenth of the router's CPU per request went there. Wrap the
            # fd once; the transport owns it, so connection_lost detaches the wrapper, and
            # peer_closed is never asked once the transport is closing (the fd may be reused).
            sock = socket.socket(fileno=sock.fileno())
            self.socket_wrapped = True
        self.socket = sock
        self.socket_getsockopt = None if sock is None else sock.getsockopt
        self.socket_fd = -1 if sock is None else sock.fileno()

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes nobody asked for (the pod has no request of ours): the next response would be
            # misattributed. Closed, never reused.
            self.broken(
                f"{len(data)} bytes after a HEAD response, on the idle connection"
                if self.parser.after_head
                else f"{len(data)} unsolicited bytes on an idle connection"
            )
            self.close()
            return
        events = self._events
        try:
            self.parser.feed(data)
        except ProxyError as exc:
            if END not in events:
                events.clear()
                self.reusable = False
                exchange.on_upstream_error(exc)
                return
            # The response ended before the bytes that broke the protocol (a body after an answer
            # to HEAD: BytesAfterHead; garbage after a whole response): it is whole and goes to the
            # client; the connection is what the pod broke, closed when it ends (on_response_end).
            del events[events.index(END) + 1 :]
            if type(exc) is BytesAfterHead:
                self.broken(exc.reason)
            else:
                self.broken(f"bytes after a complete response: {exc.reason}")
        if not events:
            return
        client = exchange.client
        last = len(events) - 1
        for i in range(last + 1):
            if self.exchange is not exchange:
                break
            event = events[i]
            if type(event) is bytes:
                exchange.on_response_body(event)
            elif event is END:
                if (i < last or self.parser.state is not PARSE_IDLE) and self.reusable:
                    # More after the response's end: another response (whole or begun), unasked.
                    self.broken("bytes after a complete response: another response, unasked")
                exchange.on_response_end(self)
            else:
                exchange.on_response_head(event)  # type: ignore[arg-type]
        events.clear()
        # One write for everything this read produced (head + body + end), made when the loop has
        # handled every socket its poll reported (flush_queued_writes).
        client.flush_soon()

    def broken(self, reason: str) -> None:
        """The pod broke the protocol on this connection: never reuse it, and say so (a pod that
        does this every time is misbehaving, not one request going wrong)."""
        self.reusable = False
        exchange = self.exchange
        if exchange is not None:
            exchange.router.stats.count_error("pod_protocol_violation")
        peer = None if self.transport is None else self.transport.get_extra_info("peername")
        log.warning(
            "pod %s at %s: %s; its connection is closed, not reused",
            self.pod_uid, "?" if peer is None else f"{peer[0]}:{peer[1]}", reason,
        )  # fmt: skip

    def eof_received(self) -> bool:
        exchange = self.exchange
        if exchange is not None and self.parser.feed_eof() and self._events:
            self._events.clear()
            self.reusable = False
            exchange.on_response_end(self)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.release_socket()
        self.closed = True
        # (the bound methods hold the transport; is_usable is False from here on, and no write
        # is made on a closed connection: the exchange is told below)
        self.transport_write = self.transport_writelines = self.transport_is_closing = None
        self.deadline.cancel()
        self.pool.forget(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.on_upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.pause_reading(PAUSE_PEER_FULL)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.resume_reading(PAUSE_PEER_FULL)

    # used by the exchange

    def pause_reading(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _on_deadline(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.on_first_byte_timeout(self)

    def release_socket(self) -> None:
        """Let go of the fd wrapper: when the connection ends, or before its transport goes to
        another protocol (a WebSocket tunnel), after which connection_lost never comes here. A
        wrapper dropped undetached would close the transport's fd behind its back (libuv aborts)."""
        if self.socket_wrapped:
            self.socket_wrapped = False
            self.socket.detach()
        self.socket = None
        self.socket_getsockopt = None
        self.socket_fd = -1

    def peer_closed(self) -> bool:
        """Has the pod closed this idle connection, its FIN already in our socket but not yet seen
        by the loop? A request sent now would meet a closed socket: the pod never reads it, and we
        could not prove that afterwards (RFC 9110 section 9.2.2 would forbid sending it again). So
        reused connections are checked before each request: one getsockopt, ~1 us.

        Why every reuse, even of a connection whose response ended a moment ago (no cheaper test
        holds; checked against libuv, which uvloop reads through): libuv's uv__read returns after
        a read that did not fill its buffer without reading again, so a FIN that arrived with or
        just after the response's last bytes stays in the socket, unseen, until the next poll
        reports the fd -- and a request can take the connection before that: a waiter handed the
        slot runs in uvloop's ready callbacks (libuv's idle phase, before the poll), and a client's
        read reported by the same poll may be handled before the pod's fd. Nor does "idle for less
        than X" help: a pod that dies or shuts down closes its idle connections at any moment, not
        after a keep-alive timeout. What the loop has seen (``is_usable``: the transport closing)
        is checked first, free; the kernel is asked only about a connection the loop thinks open.
        Compiled, getsockopt(2) is called on the fd itself (no argument parsing, no bytes object);
        only the first byte of struct tcp_info, tcpi_state, is asked for."""
        if _COMPILED:
            if self.socket_fd < 0:
                return False
            length = 1
            fd = self.socket_fd
            if c_getsockopt(fd, _IPPROTO_TCP, _TCP_INFO, cython.address(tcp_state), cython.address(length)):  # noqa: F821
                return True
            return tcp_state != _TCP_ESTABLISHED  # noqa: F821
        getsockopt = self.socket_getsockopt
        if getsockopt is None:
            return False  # no socket behind the transport (the benchmarks' in-memory ones)
        try:
            state = getsockopt(_IPPROTO_TCP, _TCP_INFO, 1)[0]
        except (OSError, IndexError):
            return True  # a socket we cannot ask about is not one to send a request on
        return state != _TCP_ESTABLISHED

    @property
    def usable(self) -> bool:
        return self.is_usable()

    def is_usable(self) -> bool:
        """``usable`` as a method: a C call from the pool (a property is a Python lookup)."""
        is_closing = self.transport_is_closing
        return not self.closed and self.reusable and is_closing is not None and not is_closing()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per pod (by UID: a recycled IP never inherits connections)."""

    __slots__ = (
        "_idle_since",
        "_sweeper",
        "clock",
        "idle",
        "idle_timeout",
        "limits",
        "loop",
        "max_idle_per_pod",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        limits: Any,
        *,
        idle_timeout: float = 2.0,
        max_idle_per_pod: int = 16,
    ) -> None:
        self.loop = loop
        self.clock = loop.time  # the loop's time, bound once (read per request)
        self.limits = limits
        self.idle: dict[str, list[UpstreamConnection]] = {}
        self._idle_since: dict[UpstreamConnection, float] = {}
        self.idle_timeout = idle_timeout
        self.max_idle_per_pod = max_idle_per_pod
        self._sweeper: asyncio.TimerHandle | None = None

    def checkout(self, uid: str) -> UpstreamConnection | None:
        conns = self.idle.get(uid)
        while conns:
            conn = conns.pop()
            self._idle_since.pop(conn, None)
            if conn.is_usable() and not conn.peer_closed():
                return conn
            conn.close()
        return None

    def checkin(self, conn: UpstreamConnection, now: float = -1.0) -> None:
        """Back to the pool, idle since ``now`` (loop time; read here if not given)."""
        if not conn.is_usable():
            conn.close()
            return
        conns = self.idle.get(conn.pod_uid)
        if conns is None:  # (setdefault would build a list per call)
            conns = self.idle[conn.pod_uid] = []
        if len(conns) >= conn.idle_cap:
            conn.close()
            return
        conns.append(conn)
        self._idle_since[conn] = now if now >= 0 else self.clock()
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        if self._idle_since.pop(conn, None) is not None:
            conns = self.idle.get(conn.pod_uid)
            if conns is not None and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self.idle[conn.pod_uid]

    def drop_pod(self, uid: str) -> None:
        for conn in self.idle.pop(uid, []):
            self._idle_since.pop(conn, None)
            conn.close()

    def _sweep(self) -> None:
        """Close connections idle longer than the timeout (kept below the apps' own)."""
        self._sweeper = None
        horizon = self.loop.time() - self.idle_timeout
        for conn, since in list(self._idle_since.items()):
            if since <= horizon:
                self.forget(conn)
                conn.close()
        if self._idle_since:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

    def close_all(self) -> None:
        for uid in list(self.idle):
            self.drop_pod(uid)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    @property
    def idle_count(self) -> int:
        return len(self._idle_since)


# ---- one request --------------------------------------------------------------------------------


class Stage:
    """Where an exchange is. Plain ints: compared on the hot path."""

    ROUTING = 0  # head parsed, looking for a pod
    QUEUED = 1  # waiting for a free slot
    CONNECTING = 2  # slot held, connection being opened
    AWAIT_CONTINUE = 3  # head sent with Expect: 100-continue, body held back
    SENT = 4  # request bytes handed to the pod: never retried from here
    RESPONDING = 5  # response head forwarded to the client
    DONE = 6


# The stages as module constants: ``Stage.SENT`` is a class attribute looked up per use (a type
# getattr and a dict lookup); these are C ints once compiled, as ``Exchange.stage`` is.
_ROUTING: Final = Stage.ROUTING
_QUEUED: Final = Stage.QUEUED
_CONNECTING: Final = Stage.CONNECTING
_AWAIT_CONTINUE: Final = Stage.AWAIT_CONTINUE
_SENT: Final = Stage.SENT
_RESPONDING: Final = Stage.RESPONDING
_DONE: Final = Stage.DONE


class Exchange:
    __slots__ = (
        "_continue_timer",
        "_waiter",
        "_waiter_timer",
        "attempts",
        "busy_refused",
        "client",
        "continue_sent",
        "head",
        "hold",
        "hold_bytes",
        "llm",
        "out_chunked",
        "pod",
        "queue_deadline",
        "release",
        "replay",
        "replay_bytes",
        "request_complete",
        "request_sent",
        "request_side",
        "response_close",
        "revision",
        "router",
        "stage",
        "status",
        "t_head",
        "t_response",
        "upstream",
    )

    def __init__(self, client: ClientConnection, head: RequestHead) -> None:
        self.client = client
        self.router = client.router
        self.head = head
        self.stage = _ROUTING
        self.revision = ""
        self.pod: PodRecord | None = None
        self.release: Callable[[], None] | None = None
        self.upstream: UpstreamConnection | None = None
        self.hold: list[bytes] = []  # body pieces not yet written to a pod
        self.hold_bytes = 0
        self.request_complete = False  # the client sent the whole request
        self.request_sent = False  # ... and it was all written to the pod
        self.out_chunked = False
        self.response_close = False
        self.attempts = 0
        self.queue_deadline = 0.0  # loop time; set at the first wait or busy refusal
        self.busy_refused = False
        self.replay: list[bytes] | None = None  # a copy of the body, to send it again (bounded)
        self.replay_bytes = 0
        self.continue_sent = False
        self.status = 0
        self.t_head = _monotonic()
        self.t_response = 0.0
        self.request_side = 0.0  # the router's own time from the head to the pod (no queueing)
        self._waiter: asyncio.Future[Any] | None = None
        self._waiter_timer: asyncio.TimerHandle | None = None
        self._continue_timer: asyncio.TimerHandle | None = None
        self.llm: LLMRequest | None = None  # an LLM route's body peek and affinity (fastproxy.llm)

    # ---- routing and picking ------------------------------------------------------------------

    def start(self) -> None:
        router = self.router
        snapshot = router.snapshot  # the one read of the snapshot for this request
        head = self.head
        if router.draining and router.config.refuse_when_full:
            self.fail(SidecarBusy("draining: no new requests"))
            return
        table = snapshot.route_table
        route = None
        service = head.header(router.service_header)
        if service is not None:
            route = table.by_service.get(service.decode("latin-1"))
        if route is None:
            route = table.match(head.host, head.path)
        if route is None:
            self.fail(NotFound(f"no route for host {head.host!r} path {head.path!r}"))
            return
        if route.llm is not None:
            self._start_peek(route.llm)
            return
        self.revision = route.pick_revision()
        self._acquire()

    # An LLM route reads its (bounded) body before it picks; see fastproxy.llm.

    def _start_peek(self, llm: LLMRoute) -> None:
        request = self.llm = llm.begin()
        if self.head.expect_continue and not self.continue_sent:
            self.continue_sent = True  # the body is needed before any pod is chosen
            self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The body must arrive within the header timeout (from the head's start): no pod is held
        # meanwhile, and without a deadline a client trickling a body would hold this exchange for
        # ever. The router's sweeper checks it (``check_peek``): no timer per request.
        request.deadline = self.client.head_since + self.router.config.header_timeout

    def check_peek(self, now: float) -> None:
        """The sweeper's check of a body being peeked (ClientConnection.check_timeouts)."""
        request = self.llm
        if request is None or not request.peeking or self.stage == _DONE or now <= request.deadline:
            return
        request.peeking = False
        timeout = self.router.config.header_timeout
        log.info("client %s: request body for route %r not received within %gs",
                 self.client.peer, request.route.service, timeout)  # fmt: skip
        self.fail(RequestTimeout(f"request body not received within {timeout:g}s"))

    def _end_peek(self) -> None:
        request = self.llm
        assert request is not None
        request.peeking = False
        route = request.route
        hold = self.hold
        body = hold[0] if len(hold) == 1 else b"".join(hold)
        try:
            route.read(request, body, self.request_complete, self.head)
        except ProxyError as exc:
            log.info("%s %s -> %d: %s", self.head.method.decode(), self.head.target[:200].decode("latin-1"),
                     exc.status, exc.reason)  # fmt: skip
            self.fail(exc)
            return
        target = None
        table = self.router.snapshot.route_table
        if request.service is not None:
            target = table.by_service.get(request.service)
            if target is None:
                self.fail(target_unavailable(request.model or "", request.service))
                return
        if target is None:
            target = table.by_service.get(route.service)
            if target is None:  # (the route went away while the body arrived)
                self.fail(NotFound(f"route {route.service!r} is gone"))
                return
        self.revision = target.pick_revision()
        if self.hold_bytes > HOLD_LIMIT and not self.request_complete:
            self.client.pause_reading(PAUSE_HOLDING)
        self._acquire()

    def _acquire(self) -> None:
        router = self.router
        llm = self.llm
        if llm is None:
            lease = router.slots.pick(self.revision)
        else:
            # The route's affinity wait (seconds; resolved at snapshot build), else the router's.
            wait = llm.route.affinity_wait
            if wait < 0.0:
                wait = router.config.affinity_wait_ms / 1000.0
            lease = llm.pick(router.slots, self.revision, wait > 0.0)
            if lease is None and llm.wait_for is not None:
                self._wait_affine(llm, wait)
                return
        if lease is not None:
            self._on_lease(lease)
            return
        if not router.slots.has_prospects(self.revision):
            self.fail(ServiceUnavailable(f"revision {self.revision} has no pods", retry_after=5))
            return
        if router.config.refuse_when_full and self.head.header(PARK_HEADER) is None:
            # Sidecar: only a request that has already waited elsewhere is parked here.
            router.stats.queue_rejections += 1
            self.fail(SidecarBusy(f"all {self.revision} slots busy"))
            return
        try:
            # A request refused as busy was already at the head of the line: it keeps its place.
            requeue = self.queue_deadline > 0
            waiter = router.slots.enqueue(self.revision, self.hold_bytes, router.loop, front=requeue)
        except QueueFull as exc:
            router.stats.queue_rejections += 1
            if router.config.refuse_when_full:
                self.fail(SidecarBusy(f"all {self.revision} slots busy"))
            else:
                self.fail(ServiceUnavailable(str(exc), retry_after=1))
            return
        self.stage = _QUEUED
        self._waiter = waiter
        if not self.queue_deadline:
            self.queue_deadline = router.loop.time() + router.config.queue_timeout
        self._waiter_timer = router.loop.call_at(self.queue_deadline, self._queue_deadline)
        waiter.add_done_callback(self._on_waiter_done)

    def _wait_affine(self, llm: LLMRequest, wait: float) -> None:
        """Wait for one of the request's affine pods (``llm.wait_for``; they are full, another
        pod is free: ``fastproxy.affinity.pick_or_wait``) for ``wait`` seconds (the route's
        ``affinity_wait_ms``, else the router's) at most, never past the request's queue
        deadline; then pick any free pod at once (``_affine_expired``). A freed slot of one of
        them is handed over exactly, as to a FIFO waiter (``_on_affine_done``). How the wait
        ends is counted (``RouterStats.affinity_waits``)."""
        router = self.router
        pods = llm.wait_for
        llm.wait_for = None
        llm.waited = True  # (once: the next pick takes any free pod)
        loop = router.loop
        now = loop.time()
        config = router.config
        until = now + min(wait, config.queue_timeout)
        if self.queue_deadline and self.queue_deadline < until:
            until = self.queue_deadline
        waiter = (
            router.slots.wait_for_pods(self.revision, pods, self.hold_bytes, loop) if until > now else None
        )
        if waiter is None:  # (a bound: nothing to wait for)
            self._acquire()
            return
        self.stage = _QUEUED
        self._waiter = waiter
        llm.wait_began = now  # (non-zero while it waits: _leave_queue counts a wait abandoned)
        self._waiter_timer = loop.call_at(until, self._affine_expired)
        waiter.add_done_callback(self._on_affine_done)

    def _on_affine_done(self, waiter: asyncio.Future[Any]) -> None:
        """An affine wait handed a slot of one of its pods (the FIFO's ``_on_waiter_done`` then)."""
        llm = self.llm
        if not waiter.cancelled() and self._waiter is waiter and llm is not None and llm.wait_began:
            self.router.stats.affinity_wait_affine.observe(self.router.loop.time() - llm.wait_began)
            llm.wait_began = 0.0
        self._on_waiter_done(waiter)

    def _affine_expired(self) -> None:
        self._waiter_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        llm = self.llm
        began = 0.0
        if llm is not None:  # (always: only an LLM request waits for affine pods)
            began = llm.wait_began
            llm.wait_began = 0.0  # (not abandoned: it ends here)
        self._leave_queue()
        self.stage = _ROUTING
        attempts = self.attempts
        self._acquire()
        stats = self.router.stats
        waited = self.router.loop.time() - began
        if self.attempts > attempts:  # (_on_lease counts each pod it is given)
            stats.affinity_wait_other_pod.observe(waited)
        else:  # no pod free: the revision's FIFO, or its refusal
            stats.affinity_wait_queue.observe(waited)

    def _leave_queue(self, taking: bool = False) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        if self._waiter_timer is not None:
            self._waiter_timer.cancel()
            self._waiter_timer = None
        self.router.slots.leave_queue(self.revision, waiter, self.hold_bytes)
        llm = self.llm
        if llm is not None and llm.wait_began:  # an affine wait ends with nothing handed over
            self.router.stats.affinity_wait_abandoned.observe(self.router.loop.time() - llm.wait_began)
            llm.wait_began = 0.0
        if not taking and waiter.done() and not waiter.cancelled():
            # It was handed a slot, and it ends (client gone, failed) before its callback took it
            # (the hand-over and the end in one loop iteration): the slot goes back, or it leaks.
            waiter.result()[0]()

    def _on_waiter_done(self, waiter: asyncio.Future[Any]) -> None:
        if waiter.cancelled() or self._waiter is not waiter:
            return
        self._leave_queue(True)
        now = _monotonic()
        self.router.stats.queue_wait.observe(now - self.t_head)
        self.t_head = now  # added latency counts the router's own time, not the wait for a slot
        self._on_lease(waiter.result())

    def _queue_deadline(self) -> None:
        self._waiter_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        self._leave_queue()
        self.router.stats.queue_rejections += 1
        if self.router.config.refuse_when_full:
            # Sidecar: the parked request goes back to its router, which tries another pod.
            self.fail(SidecarBusy(f"no slot freed within {self.router.config.queue_timeout:g}s"))
            return
        self.fail(
            ServiceUnavailable(
                f"no free slot in revision {self.revision} within {self.router.config.queue_timeout:g}s",
                retry_after=1,
            )
        )

    def _on_lease(self, lease: tuple[Callable[[], None], PodRecord]) -> None:
        self.release, self.pod = lease
        self.attempts += 1
        pool = self.router.pool  # (typed in proxy.pxd: checkout is a C call)
        conn = pool.checkout(self.pod.uid)
        if conn is not None:
            self._send(conn)
            return
        self.stage = _CONNECTING
        self.router.loop.create_task(self._connect(self.pod))

    async def _connect(self, pod: PodRecord) -> None:
        router = self.router
        try:
            async with asyncio.timeout(router.config.connect_timeout):
                _, conn = await router.loop.create_connection(
                    lambda: UpstreamConnection(router.pool, pod.uid, pod.concurrency), pod.ip, pod.port
                )
        except TimeoutError:
            failure = UpstreamUnavailable(f"connect to {pod.ip}:{pod.port} timed out", "timeout")
        except ConnectionRefusedError:
            failure = UpstreamUnavailable(f"connect to {pod.ip}:{pod.port} refused", "refused")
        except OSError as exc:
            kind = "unreachable" if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) else "reset"
            failure = UpstreamUnavailable(f"connect to {pod.ip}:{pod.port} failed: {exc.strerror}", kind)
        else:
            if self.stage != _CONNECTING or self.pod is not pod:
                router.pool.checkin(conn)  # the client left meanwhile; the connection is fresh
                return
            if not conn.closed:
                self._send(conn)
                return
            # (lost between connection_made and this task resuming: nothing was sent on it)
            failure = UpstreamUnavailable(f"{pod.ip}:{pod.port} closed a new connection at once", "reset")
        if self.stage == _CONNECTING and self.pod is pod:
            self._unavailable(failure)

    def _unavailable(self, failure: UpstreamUnavailable) -> None:
        """The pod cannot have seen this request: exclude it, report it, try another."""
        router = self.router
        pod = self.pod
        assert pod is not None
        self.pod = None
        stats = router.stats
        stats.retries[failure.kind] = stats.retries.get(failure.kind, 0) + 1
        # Out of rotation first, then the slot goes back: else it is handed straight to the oldest
        # waiter, who would send to the very pod that just refused or failed.
        if failure.kind == "busy_refused":
            stats.busy_refusals += 1
            if self.replay is not None:
                self.hold = list(self.replay)
                self.hold_bytes = sum(map(len, self.hold))
            router.skip_busy_pod(pod)
            self._give_back_slot()
            # Not an attempt: nothing reached the app. The queue deadline bounds the retries.
            self.attempts -= 1
            now = router.loop.time()
            if not self.queue_deadline:
                self.queue_deadline = now + router.config.queue_timeout
            elif now >= self.queue_deadline:
                self.fail(
                    ServiceUnavailable(
                        f"no free slot in revision {self.revision} within {router.config.queue_timeout:g}s",
                        retry_after=1,
                    )
                )
                return
        elif failure.kind == "stale_connection":
            if self._continue_timer is not None:
                self._continue_timer.cancel()
                self._continue_timer = None
            if self.replay is not None:  # else the body is still held (AWAIT_CONTINUE) or none
                self.hold = list(self.replay)
                self.hold_bytes = sum(map(len, self.hold))
            self.replay = None
            self._give_back_slot()
        else:
            router.exclude_pod(pod, failure.kind, failure.reason)
            self._give_back_slot()
        if self.attempts >= router.config.max_attempts:
            self.fail(BadGateway(f"{failure.reason}; gave up after {self.attempts} attempts"))
            return
        self.stage = _ROUTING
        self._acquire()

    # ---- sending ----------------------------------------------------------------------------

    def _send(self, conn: UpstreamConnection) -> None:
        router = self.router
        head = self.head
        client = self.client
        if client.pending_body is not None:
            # The whole request came in the read being handled (ClientConnection._process_events):
            # its body joins the hold, so head and body go to the pod in one write.
            self.hold.append(client.pending_body)
            self.hold_bytes += len(client.pending_body)
            client.pending_body = None
        self.upstream = conn
        conn.exchange = self
        conn.used += 1
        if head.method == b"HEAD":
            conn.parser.expect_no_body()
        write = conn.transport_write
        assert write is not None  # (a checked-out or just-connected connection is open)
        if head.expect_continue and not self.request_complete and not self.continue_sent:
            self.continue_sent = True
            self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # a pod is ready: send the body
        hold_back = router.config.sidecar_protocol and head.has_body
        if hold_back and self.request_complete and self.hold_bytes <= REPLAY_LIMIT:
            hold_back = False
            self.replay = list(self.hold)
        elif not hold_back and conn.used > 1 and self.hold_bytes <= REPLAY_LIMIT:
            # A reused connection: the pod may reset it unread (on_upstream_lost); keep the body
            # (bounded) to send it again then.
            self.replay = list(self.hold)
            self.replay_bytes = self.hold_bytes
        extra = self.client.forwarding_headers(head)
        if self.queue_deadline and router.config.sidecar_protocol:
            extra.append(PARK_FIELD)  # this request has waited: a full sidecar may park it
        data = build_request_head(head, extra, expect_continue=hold_back)
        if hold_back:
            write(data)
            self.stage = _AWAIT_CONTINUE
            self._continue_timer = router.loop.call_later(router.config.continue_timeout, self._send_body)
        else:
            self.stage = _SENT
            if self.hold:
                self._flush_hold(conn, data)
            else:
                write(data)
            if self.request_complete:
                self._request_fully_sent()
        conn.deadline.set_after(router.config.first_byte_timeout)
        # One added-latency sample per request, observed with the response head: this side's
        # share now, the response side's there.
        self.request_side = _monotonic() - self.t_head

    def _flush_hold(self, conn: UpstreamConnection, head_bytes: bytes | None) -> None:
        pieces: list[bytes] = [] if head_bytes is None else [head_bytes]
        if self.head.chunked:
            for piece in self.hold:
                pieces += chunk(piece)
        else:
            pieces += self.hold
        if self.request_complete and self.head.chunked:
            pieces.append(LAST_CHUNK)
        conn.transport_writelines(pieces)  # type: ignore[misc]
        self.hold.clear()
        self.hold_bytes = 0
        self.client.resume_reading(PAUSE_HOLDING)

    def _send_body(self) -> None:
        """100 Continue arrived (or its wait ran out): the body may go now."""
        self._continue_timer = None
        if self.stage != _AWAIT_CONTINUE or self.upstream is None:
            return
        self.stage = _SENT
        self._flush_hold(self.upstream, None)
        if self.request_complete:
            self._request_fully_sent()

    def _request_fully_sent(self) -> None:
        self.request_sent = True

    def request_body(self, data: bytes) -> None:
        if self.stage == _SENT:
            if self.replay is not None:
                self.replay_bytes += len(data)
                if self.replay_bytes <= REPLAY_LIMIT:
                    self.replay.append(data)
                else:
                    self.replay = None  # too big to keep: this request cannot be sent again
            conn = self.upstream
            assert conn is not None
            if self.head.chunked:
                conn.transport_writelines(chunk(data))  # type: ignore[misc]
            else:
                conn.transport_write(data)  # type: ignore[misc]
            return
        if self.stage >= _RESPONDING:
            return  # an early response was given; the rest of the body is dropped
        self.hold.append(data)
        self.hold_bytes += len(data)
        llm = self.llm
        if llm is not None and llm.peeking:
            if self.hold_bytes > llm.route.max_body_bytes:
                self._end_peek()
            return
        if self.hold_bytes > HOLD_LIMIT:
            self.client.pause_reading(PAUSE_HOLDING)

    def request_end(self) -> None:
        self.request_complete = True
        if self.stage == _SENT:
            if self.head.chunked:
                self.upstream.transport_write(LAST_CHUNK)  # type: ignore[union-attr,misc]
            self._request_fully_sent()
        elif self.stage == _DONE:
            self.client.exchange_finished(self)
        elif self.llm is not None and self.llm.peeking:
            self._end_peek()

    # ---- the pod's answer ---------------------------------------------------------------------

    def on_response_head(self, response: ResponseHead) -> None:
        status = response.status
        if status < 200:
            if status == 100 and self.stage == _AWAIT_CONTINUE:
                if self._continue_timer is not None:
                    self._continue_timer.cancel()
                self._send_body()
            elif status == 101:
                self._switching_protocols(response)
            return  # other interim responses are not forwarded
        conn = self.upstream
        assert conn is not None
        conn.deadline.clear()
        if not response.keep_alive:
            # "Connection: close": the pod will not read another request on this connection. Back
            # in the pool, the next request could be written before its FIN arrives and be lost
            # (a 502 that nothing could retry).
            conn.reusable = False
        if (
            status == 503
            and self.router.config.sidecar_protocol
            and self.stage in (_AWAIT_CONTINUE, _SENT)
            and (self.stage == _AWAIT_CONTINUE or not self.head.has_body or self.replay is not None)
            and response.header(BUSY_HEADER) is not None
        ):
            # The sidecar refused before the app saw anything: not an error; once the refusal
            # has been read to its end, another pod is tried (on_response_end).
            self.busy_refused = True
            if self._continue_timer is not None:
                self._continue_timer.cancel()
                self._continue_timer = None
            return
        self.status = status
        self.t_response = _monotonic()
        self.stage = _RESPONDING
        client = self.client
        head = self.head
        no_body = head.method == b"HEAD" or status in (204, 304)
        http10 = head.version == b"1.0"
        if no_body or response.content_length is not None:
            self.out_chunked = False
            close = client.closing or not head.keep_alive
        elif http10:
            self.out_chunked = False
            close = True  # close-delimited for an HTTP/1.0 client
        else:
            self.out_chunked = True
            close = client.closing or not head.keep_alive
        if not self.request_complete:
            close = True  # answered before the request ended: the rest of it is not read
        self.response_close = close
        client.queue(
            build_response_head(
                response, chunked=self.out_chunked, close=close, http10_keep_alive=http10 and not close
            )
        )
        stats = self.router.stats  # (typed in proxy.pxd: observe is a C call)
        stats.added_latency.observe(self.request_side + _monotonic() - self.t_response)

    def _switching_protocols(self, response: ResponseHead) -> None:
        """A 101. With ``Upgrade: websocket`` in answer to a WebSocket handshake, the exchange ends
        here and its two connections (and the pod's slot) become a session (fastproxy.tunnel)."""
        conn = self.upstream
        assert conn is not None
        if not conn.parser.upgraded:
            return  # a 101 that switches nothing: an interim response like any other
        if not self.head.upgrade or response.upgrade != b"websocket" or self.stage != _SENT:
            what = response.upgrade.decode("latin-1")[:32] or "?"
            self.on_upstream_error(
                BadGateway(f"pod switched protocols (101, Upgrade: {what}) unasked")
                if not self.head.upgrade
                else BadGateway(f"pod switched to {what!r} in answer to a WebSocket handshake")
            )
            return
        self.t_response = _monotonic()
        conn.deadline.cancel()
        conn.exchange = None
        conn.reusable = False  # never back to the pool: it carries the session
        self.upstream = None
        self.stage = _DONE
        self.status = 101
        release = self.release
        self.release = None  # the session holds the slot now
        router = self.router
        router.stats.responses[101] = router.stats.responses.get(101, 0) + 1
        router.tunnels.open_session(self, self.client, conn, response, release)
        router.stats.added_latency.observe(self.request_side + _monotonic() - self.t_response)

    def on_response_body(self, data: bytes) -> None:
        if self.stage != _RESPONDING:
            return
        if self.out_chunked:
            self.client.queue_many(chunk(data))
        else:
            self.client.queue(data)

    def on_response_end(self, conn: UpstreamConnection) -> None:
        router = self.router
        conn.exchange = None
        conn.deadline.clear()
        self.upstream = None
        if self.busy_refused:
            self.busy_refused = False
            if self.head.has_body and self.replay is None:
                conn.close()  # a body was announced and never sent: the connection is ambiguous
            else:
                router.pool.checkin(conn)
            self._unavailable(UpstreamUnavailable("pod's sidecar is at capacity", "busy_refused"))
            return
        if self.out_chunked:
            self.client.queue(LAST_CHUNK)
        # One clock read for both ends of this moment: the pod's connection idle since now, and
        # the client's (its keep-alive timeout starts with the response's end).
        pool = router.pool  # (typed in proxy.pxd: checkin is a C call)
        now = pool.clock()
        if conn.reusable and self.request_sent:
            pool.checkin(conn, now)
        else:
            conn.close()
        self._give_back_slot()
        stats = router.stats
        responses = stats.responses
        responses[self.status] = responses.get(self.status, 0) + 1
        outliers = router.outliers
        if outliers.failing:  # a pod with broken exchanges on record answered in full: streak over
            outliers.succeeded(self.pod.uid)
        self.stage = _DONE
        self.client.exchange_finished(self, now)

    def on_upstream_error(self, exc: ProxyError) -> None:
        """The pod's response broke the protocol."""
        conn = self.upstream
        if conn is not None:
            conn.exchange = None
            conn.abort()
        self.upstream = None
        self.router.stats.count_error("bad_response")
        log.warning("pod %s: %s", self.pod.uid if self.pod else "?", exc.reason)
        self._give_back_slot()
        self.fail(exc)

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        self.upstream = None
        pod = self.pod
        if (
            type(exc) in _UNREAD_BY_PEER
            and conn.used > 1
            and conn.parser.state is PARSE_IDLE
            and self.request_complete
            and (self.replay is not None or not self.head.has_body or self.stage == _AWAIT_CONTINUE)
            and not self.busy_refused
        ):
            # A reused connection reset before one byte of the response: the pod's kernel threw
            # away bytes of ours that its app never read (a socket closed with unread data sends
            # a RST; one closed after reading everything sends a FIN). The pod closed the idle
            # connection just as we reused it -- its keep-alive timeout, or its death between
            # requests. Send the request again; the pod is not at fault, so no exclusion.
            self._unavailable(
                UpstreamUnavailable(f"pod reset a reused connection unread: {exc}", "stale_connection")
            )
            return
        self._give_back_slot()
        if self.busy_refused:  # lost while the busy refusal was being read
            self.busy_refused = False
            self._unavailable(UpstreamUnavailable("pod's sidecar is at capacity", "busy_refused"))
            return
        if pod is not None:
            # This request may have reached the app: it is not retried. Whether the loss proves
            # the pod cannot serve others (exclude it) or was one broken exchange is the router's
            # call (fastproxy.outlier): the data path reports what it saw.
            self.router.upstream_lost(
                pod, exc, type(exc) in _UNREAD_BY_PEER, conn.used == 1, conn.parser.state is not PARSE_IDLE
            )
        self.router.stats.count_error("upstream_lost")
        self.fail(BadGateway(f"pod {pod.uid if pod else '?'} closed the connection before answering"))

    def on_first_byte_timeout(self, conn: UpstreamConnection) -> None:
        conn.exchange = None
        conn.abort()
        self.upstream = None
        self._give_back_slot()
        self.router.stats.count_error("first_byte_timeout")
        self.fail(GatewayTimeout(f"pod did not answer within {self.router.config.first_byte_timeout:g}s"))

    # ---- endings ------------------------------------------------------------------------------

    def _give_back_slot(self) -> None:
        release = self.release
        if release is not None:
            self.release = None
            release()

    def fail(self, exc: ProxyError) -> None:
        """Answer with an error if nothing was sent yet; otherwise abort the client connection."""
        self._leave_queue()
        self._give_back_slot()
        if self.upstream is not None:
            self.upstream.exchange = None
            self.upstream.abort()
            self.upstream = None
        client = self.client
        if self.stage == _RESPONDING:
            # Part of the response went out: cutting the connection is the only honest signal.
            self.stage = _DONE
            client.abort()
            return
        self.stage = _DONE
        # A body still arriving is read and dropped so the connection survives (request_body),
        # unless the client waits for 100 Continue before sending it: then it never comes.
        close = (
            exc.close
            or client.closing
            or not self.head.keep_alive
            or (not self.request_complete and self.head.expect_continue)
        )
        self.response_close = close
        client.write(error_response(exc, close=close, request_id=self.head.request_id))
        self.router.stats.responses[exc.status] = self.router.stats.responses.get(exc.status, 0) + 1
        if exc.status >= 500:
            log.info("%s %s -> %d: %s", self.head.method.decode(), self.head.target[:200].decode("latin-1"),
                     exc.status, exc.reason)  # fmt: skip
        client.exchange_finished(self)

    def _finish(self) -> None:
        self.stage = _DONE
        self.client.exchange_finished(self)

    def client_gone(self) -> None:
        """The client closed or reset its connection: free everything this request holds."""
        if self.stage == _DONE:
            return
        self.router.stats.client_aborts += 1
        self._leave_queue()
        if self._continue_timer is not None:
            self._continue_timer.cancel()
        conn = self.upstream
        if conn is not None:
            conn.exchange = None
            conn.abort()  # the app should stop generating for nobody
            self.upstream = None
        self._give_back_slot()
        self.stage = _DONE


# ---- the client side ----------------------------------------------------------------------------


def flush_queued_writes(router: RouterBase) -> None:
    """Write every response queued by ``ClientConnection.flush_soon`` since the loop's last poll.

    A write to a socket whose reader sleeps wakes that reader (on another CPU: an IPI, costly in a
    VM); written one at a time, ~10 us of our own work apart, each response found its client asleep
    again and paid a wake-up. Queued, the responses of one poll go out back to back at the end of
    it (uvloop runs ``call_soon`` callbacks before it polls again), so a client process serving
    many connections is woken once for them. The first queued response schedules this; what it
    writes is in the same order as it was queued, per connection exactly as ``flush`` would have.
    Anything that writes to or closes a client's transport directly flushes that client first."""
    queue = router.write_queue
    if not queue:
        return
    router.write_queue = []
    for client in queue:
        client.flush_queued = False
        client.flush()


class ClientConnection:  # an asyncio.Protocol (duck-typed, as UpstreamConnection)
    __slots__ = (
        "_events",
        "_out",
        "_paused",
        "closing",
        "exchange",
        "flush_queued",
        "head_since",
        "linger_budget",
        "linger_since",
        "parser",
        "peer",
        "peer_bytes",
        "pending_body",
        "router",
        "transport",
        "transport_is_closing",
        "transport_write",
        "transport_writelines",
        "trusted",
        "waiting_since",
    )

    def __init__(self, router: Router) -> None:
        self.router = router
        self.transport: asyncio.Transport | None = None
        # The transport's methods called per request, bound once (connection_made): uvloop's
        # transports are untyped objects to the compiled code, so each ``transport.write(...)`` was
        # a method lookup by name (_PyObject_GetMethod, _PyType_Lookup) before the call.
        self.transport_write: Callable[[bytes], None] | None = None
        self.transport_writelines: Callable[[list[bytes]], None] | None = None
        self.transport_is_closing: Callable[[], bool] | None = None
        self._events: list[object] = []
        self.parser = RequestParser(self._events, router.config.limits)
        self.exchange: Exchange | None = None
        self.closing = False  # answer the current request, then close
        self._paused = 0
        self.peer = ""
        self.peer_bytes = b""
        self.trusted = False  # the peer is a configured trusted hop (X-Forwarded-* kept)
        self._out: list[bytes] = []  # response bytes of the current pod read, flushed once
        self.flush_queued = False  # in the router's write_queue (flush_soon)
        self.pending_body: bytes | None = None  # a whole request's body, while its exchange starts
        # Header and idle timeouts are checked by the router's sweeper (Router.sweep_timeouts)
        # against these two times: no timer is armed or cancelled per request.
        self.waiting_since = router.loop.time()
        self.head_since = 0.0
        self.linger_budget = 0  # > 0: rejected, draining what the client still sends (_linger)
        self.linger_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.transport_write = transport.write  # type: ignore[attr-defined]
        self.transport_writelines = transport.writelines  # type: ignore[attr-defined]
        self.transport_is_closing = transport.is_closing
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.peer_bytes = self.peer.encode()
        self.trusted = self.router.is_trusted(self.peer)
        self.router.track(self)
        if self.router.draining:
            self.closing = True

    def data_received(self, data: bytes) -> None:
        if self.linger_budget:
            self.linger_budget -= len(data)
            if self.linger_budget <= 0 and self.transport is not None:
                self.transport.close()
            return  # a rejected client's remaining bytes: read and dropped
        if self.exchange is None and self.parser.state is PARSE_IDLE:
            # A new request is starting: its head must complete within the header timeout.
            self.head_since = self.router.loop.time()
        try:
            self.parser.feed(data)
        except ProxyError as exc:
            # Nothing of a read that broke the protocol is forwarded: its events may complete the
            # faulty request (a chunk-extension flood ending in a valid last chunk, an Upgrade
            # request), which a pod would then run although the client is told 400. An exchange
            # in progress is cut (_reject): the pod sees a truncated request, never a whole one.
            self._reject(exc)
            return
        self._process_events()

    def _process_events(self) -> None:
        # Each event leaves the list *before* it is handled: handling may finish the exchange
        # (an early answer, then the request's END), and exchange_finished processes what is
        # left re-entrantly; it must never see an event twice.
        events = self._events
        count = len(events)
        if (
            self.exchange is None
            and (count == 2 or (count == 3 and type(events[1]) is bytes))
            and events[count - 1] is END
        ):
            # The common read: one whole request, its body (if any) in one piece. Its events
            # leave the list together (nothing else is in it to be seen twice), handled in order.
            head = events[0]
            if type(head) is not RequestHead:  # pragma: no cover - the parser orders events
                raise RuntimeError(f"event {head!r} outside a request")
            if count == 3:
                # Offered to a pod picked at once (Exchange._send takes it: one write for head and
                # body); else handed on as any body piece, once the start is done.
                self.pending_body = events[1]
            events.clear()
            self.router.stats.requests += 1
            self.exchange = exchange = Exchange(self, head)
            exchange.start()
            if count == 3:
                body = self.pending_body
                self.pending_body = None
                if body is not None:
                    exchange.request_body(body)
            exchange.request_end()
            return
        while events:
            event = events[0]
            exchange = self.exchange
            if exchange is None:
                if type(event) is not RequestHead:  # pragma: no cover - the parser orders events
                    raise RuntimeError(f"event {event!r} outside a request")
                del events[0]
                self.router.stats.requests += 1
                self.exchange = exchange = Exchange(self, event)
                if events and type(events[0]) is bytes:
                    self.pending_body = events.pop(0)  # as above: with the head if a pod is ready
                exchange.start()
                body = self.pending_body
                if body is not None:
                    self.pending_body = None
                    exchange.request_body(body)
                continue
            if exchange.request_complete:
                break  # a pipelined request waits for the response before it
            del events[0]
            if event is END:
                exchange.request_end()
            else:
                exchange.request_body(event)  # type: ignore[arg-type]
        if events:
            self.pause_reading(PAUSE_HOLDING)

    def _reject(self, exc: ProxyError) -> None:
        """The client's bytes broke the protocol or a limit."""
        self.router.stats.count_error(type(exc).__name__)
        log.info("client %s: %d %s", self.peer, exc.status, exc.reason)
        self._events.clear()
        exchange = self.exchange
        if exchange is not None and exchange.stage != _DONE:
            if exchange.stage == _RESPONDING:
                exchange.client_gone()
                self.abort()
                return
            exchange.client_gone()
        if self.transport is not None and not self.transport.is_closing():
            self.flush()  # a previous response still queued goes out before this one
            self.transport.write(error_response(exc, close=True))
            self.router.stats.responses[exc.status] = self.router.stats.responses.get(exc.status, 0) + 1
            self._linger()

    def _linger(self) -> None:
        """A lingering close (RFC 9112 section 9.6): closing at once with the client's bytes still
        unread would make the kernel answer them with a RST, which can destroy the error response
        before the client reads it. So: half-close after the response, then read and drop what
        the client still sends, up to ``LINGER_BYTES`` or ``LINGER_SECONDS`` (the sweeper), then close."""
        transport = self.transport
        assert transport is not None
        if not transport.can_write_eof():
            transport.close()
            return
        self.linger_budget = LINGER_BYTES
        self.linger_since = self.router.loop.time()
        transport.write_eof()
        if self._paused:
            self._paused = 0
            transport.resume_reading()

    def exchange_finished(self, exchange: Exchange, now: float = -1.0) -> None:
        """``exchange`` is done (its response, or the request too); ``now``: the loop's time if
        the caller has just read it (else read here, when the connection goes idle)."""
        self.flush_soon()
        if self.exchange is not exchange:
            return
        if not exchange.request_complete and not exchange.response_close:
            return  # the response is done; the rest of the request is still arriving
        self.exchange = None
        transport = self.transport
        is_closing = self.transport_is_closing
        if is_closing is None or is_closing() or exchange.response_close or self.closing:
            # Whatever the client sent after this request (the rest of its body, pipelined
            # requests) will not be answered on a closing connection: drop it unprocessed.
            self._events.clear()
            if transport is not None:
                self.flush()  # (the response first: close() does not wait for what is queued here)
                transport.close()
            return
        self.waiting_since = now if now >= 0 else self.router.loop.time()
        if self._events:
            self.resume_reading(PAUSE_HOLDING)
            self._process_events()

    def check_timeouts(self, now: float) -> None:
        """Called by the router's sweeper: idle keep-alive and request-head deadlines."""
        transport = self.transport
        if self.linger_budget:
            if now - self.linger_since > LINGER_SECONDS and transport is not None:
                transport.close()
            return
        exchange = self.exchange
        if exchange is not None or transport is None or transport.is_closing():
            if exchange is not None and exchange.llm is not None:
                exchange.check_peek(now)  # an LLM route's body, read before any pod is picked
            return  # a request is being served; its own deadlines apply
        config = self.router.config
        if self.parser.state is PARSE_IDLE:
            if now - self.waiting_since > config.idle_timeout:
                self.flush()
                transport.close()  # idle keep-alive connection
        elif now - self.head_since > config.header_timeout:
            self._reject(RequestTimeout(f"request head not received within {config.header_timeout:g}s"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.connections.discard(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()
        self._events.clear()
        self._out.clear()
        # (the bound methods hold the transport, which holds this protocol: break the cycle; the
        # writers below then write nothing, as on a closing transport)
        self.transport_write = self.transport_writelines = self.transport_is_closing = None

    def eof_received(self) -> bool | None:
        if self.linger_budget:
            return False  # the rejected client is done sending: close now
        exchange = self.exchange
        if (
            exchange is not None
            and exchange.stage >= _CONNECTING
            and exchange.stage != _DONE
            and exchange.request_complete
        ):
            # Half-close after a complete request that a pod is already handling is legal: keep
            # the write side open for the response, then close. A request still waiting for a
            # slot is dropped instead (a departed client should not cost a GPU slot).
            self.closing = True
            return True
        return False

    # flow control

    def pause_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause_reading(PAUSE_PEER_FULL)

    def resume_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.resume_reading(PAUSE_PEER_FULL)

    def pause_reading(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # writing

    def queue(self, data: bytes) -> None:
        self._out.append(data)

    def flush_soon(self) -> None:
        """``flush`` once the loop has handled every socket its poll reported: the writes of one
        poll's worth of responses then go out back to back (see flush_queued_writes)."""
        if self._out and not self.flush_queued:
            self.flush_queued = True
            router = self.router
            queue = router.write_queue
            if not queue:
                # (a callable and an empty context made once: no args tuple, no context copy)
                router.loop.call_soon(router.write_flusher, context=router.write_context)
            queue.append(self)

    def queue_many(self, data: list[bytes]) -> None:
        self._out += data

    def flush(self) -> None:
        out = self._out
        if out:
            is_closing = self.transport_is_closing
            if is_closing is not None and not is_closing():
                self.transport_write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[misc]
            out.clear()

    def write(self, data: bytes) -> None:
        if self._out:
            self.flush()
        is_closing = self.transport_is_closing
        if is_closing is not None and not is_closing():
            self.transport_write(data)  # type: ignore[misc]

    def writelines(self, data: list[bytes]) -> None:
        is_closing = self.transport_is_closing
        if is_closing is not None and not is_closing():
            self.transport_writelines(data)  # type: ignore[misc]

    def abort(self) -> None:
        self._out.clear()
        if self.transport is not None:
            self.transport.abort()

    def forwarding_headers(self, head: RequestHead) -> list[tuple[bytes, bytes]]:
        return self.router.forwarding_headers(self.peer_bytes, self.trusted, head)

    def hand_over(self) -> list[bytes]:
        """This connection becomes one side of a WebSocket session (fastproxy.tunnel takes its
        transport): what the client sent after its handshake, and this protocol out of the
        router's connections (their timeouts and drain no longer apply to it)."""
        self.flush()
        early = [event for event in self._events if type(event) is bytes]
        self._events.clear()
        self.exchange = None
        self._paused = 0
        self.router.connections.discard(self)
        return early

    def shutdown(self) -> None:
        """SIGTERM: idle connections close now; busy ones after their current response."""
        self.closing = True
        if self.exchange is None and self.transport is not None:
            self.flush()  # the last response may still be queued (flush_queued_writes)
            self.transport.close()
