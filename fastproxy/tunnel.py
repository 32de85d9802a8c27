"""WebSocket sessions: after a pod's ``101 Switching Protocols`` the router relays raw bytes both ways.

Theory of operation
-------------------
A WebSocket handshake (``exchange.RequestParser`` accepts exactly RFC 6455's: an HTTP/1.1 GET, no
body, ``Connection: upgrade``, ``Upgrade: websocket``) is routed, picked and forwarded like any
request, so everything before the pod's answer keeps the usual rules: a refused connect, a connect
timeout or a sidecar's busy refusal sends it to another pod; a non-101 answer is relayed as a normal
response (and the client connection then closes: no HTTP is read after a handshake). When the pod
answers ``101`` with ``Upgrade: websocket``, ``Exchange`` hands the two sockets to ``Tunnels.open``
and forgets them.

From then on a ``Tunnel`` owns both transports, each driven by a ``_Side`` protocol
(``transport.set_protocol``): bytes read on one side are written to the other as they come, never
parsed (the app owns the WebSocket protocol, frames included), never retried. Flow control is coupled
as on the HTTP path: when one side's write buffer is full, reading from the other pauses until it
drains. Half-close is honoured: an EOF from one side becomes a ``write_eof`` towards the other, and
the session ends when both sides have sent theirs, or when either connection is lost (then the
other is closed too: a plain TCP close, or an abort when the loss was an error). The bytes the
client sent after its handshake (held, with its reading paused, until the 101) and the ones the pod
sent after its 101 head in the same read are delivered first.

The session holds its pod's slot for its whole life: the slot the exchange took is released only
when the session ends, so a CC=1 pod with an open session is busy for every request and session,
and a sidecar (the same data plane) counts it in its own slots. The pod connection is never
returned to the pool.

Idle sessions: a sweeper (a few times per ``websocket_idle_timeout``) closes a session in which no
byte moved either way for that long. Drain: ``close_all`` closes every session (TCP close, no close
frame); a transport that cannot flush is aborted a second later, so a stuck peer cannot hold a slot.

Accounting is per revision (``SessionStats``): sessions open and opened, bytes each way and the
durations of ended sessions, with the open sessions' running byte counts added at scrape time, so
the relay itself only adds to two ints per read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import msgspec

from fastproxy.metrics import Histogram

if TYPE_CHECKING:
    from fastproxy.exchange import ResponseHead
    from fastproxy.proxy import ClientConnection, Exchange, UpstreamConnection
    from fastproxy.router import Router

log = logging.getLogger("fastproxy.tunnel")

# Seconds. Realtime sessions run from a second to an hour.
SESSION_SECONDS_BOUNDS: Final = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0)
ABORT_AFTER_CLOSE = 1.0  # a closed transport that has not flushed by then is aborted
_SWITCHED_TAIL: Final = b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
_CRLF: Final = b"\r\n"


def switching_protocols_head(response: ResponseHead) -> bytes:
    """The 101 sent to the client: the pod's end-to-end fields (Sec-WebSocket-Accept, -Protocol,
    -Extensions, ...) and the two hop-by-hop ones that say what was switched to."""
    parts = [b"HTTP/1.1 101 ", response.reason or b"Switching Protocols", _CRLF]
    for name, value in response.headers:
        parts += (name, b": ", value, _CRLF)
    parts.append(_SWITCHED_TAIL)
    return b"".join(parts)


class SessionStats:
    """One revision's sessions (ended ones summed; open ones are added at scrape time)."""

    __slots__ = ("bytes_from_clients", "bytes_from_pods", "durations", "open", "opened")

    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.bytes_from_clients = 0
        self.bytes_from_pods = 0
        self.durations = Histogram(SESSION_SECONDS_BOUNDS)


class SessionView(msgspec.Struct):
    """A revision's WebSocket sessions, as ``/v1/revisions`` shows them."""

    open: int = 0
    opened: int = 0
    bytes_from_clients: int = 0
    bytes_from_pods: int = 0
    ended: int = 0
    ended_seconds_total: float = 0.0
    longest_open_seconds: float = 0.0


class _Side(asyncio.Protocol):
    """One socket of a session: what it reads goes to the other side's transport."""

    __slots__ = ("bytes", "eof", "lost", "peer", "peer_transport", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, transport: Any) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _Side = self
        self.peer_transport: Any = None
        self.bytes = 0  # read on this side, written to the other
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.peer_transport.write(data)

    def eof_received(self) -> bool:
        if self.eof:
            return True  # reading resumed after the EOF (a peer's resume_writing): told once
        self.eof = True
        if self.peer.eof:
            self.tunnel.end()  # both directions are done
            return True
        peer_transport = self.peer_transport
        if not peer_transport.is_closing():
            if peer_transport.can_write_eof():
                peer_transport.write_eof()  # half-close: the other direction goes on
            else:  # pragma: no cover - TCP transports can always half-close
                self.tunnel.end()
        return True  # keep this transport open for what the other side still sends

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.side_lost(self, exc)

    def pause_writing(self) -> None:
        peer_transport = self.peer_transport
        if not self.peer.eof and not peer_transport.is_closing():
            peer_transport.pause_reading()

    def resume_writing(self) -> None:
        peer_transport = self.peer_transport
        if not self.peer.eof and not peer_transport.is_closing():
            peer_transport.resume_reading()


class Tunnel:
    """One WebSocket session: two sides, the pod's slot, and its accounting."""

    __slots__ = (
        "client",
        "ended",
        "idle_mark",
        "idle_since",
        "pod",
        "pod_uid",
        "release",
        "revision",
        "started",
        "started_mono",
        "tunnels",
    )

    def __init__(
        self, tunnels: Tunnels, revision: str, pod_uid: str, release: Callable[[], None] | None
    ) -> None:
        self.tunnels = tunnels
        self.revision = revision
        self.pod_uid = pod_uid
        self.release = release
        self.started = time.time()
        self.started_mono = tunnels.loop.time()
        self.idle_mark = -1
        self.idle_since = self.started_mono
        self.ended = False
        self.client: _Side
        self.pod: _Side

    def end(self) -> None:
        """Both directions finished, or the session must stop: close both sockets (TCP close)."""
        for side in (self.client, self.pod):
            if not side.lost and not side.transport.is_closing():
                side.transport.close()
        self.tunnels.loop.call_later(ABORT_AFTER_CLOSE, self._abort_leftovers)

    def _abort_leftovers(self) -> None:
        for side in (self.client, self.pod):
            if not side.lost:
                side.transport.abort()  # could not flush to a peer that does not read

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        other = side.peer
        if not other.lost:
            if exc is None:
                if not other.transport.is_closing():
                    other.transport.close()
                    self.tunnels.loop.call_later(ABORT_AFTER_CLOSE, self._abort_leftovers)
            else:
                other.transport.abort()
        self.tunnels.session_ended(self, exc)


class Tunnels:
    """The open sessions of one router (or sidecar), their per-revision figures, idle sweeps."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.loop = router.loop
        self.open: set[Tunnel] = set()
        self.by_revision: dict[str, SessionStats] = {}
        self.idle_closes = 0
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def idle_timeout(self) -> float:
        return self.router.config.websocket_idle_timeout

    def stats_for(self, revision: str) -> SessionStats:
        stats = self.by_revision.get(revision)
        if stats is None:
            stats = self.by_revision[revision] = SessionStats()
        return stats

    def open_session(
        self,
        exchange: Exchange,
        client: ClientConnection,
        conn: UpstreamConnection,
        response: ResponseHead,
        release: Callable[[], None] | None,
    ) -> None:
        """The pod switched protocols: take both transports from the exchange's protocols."""
        client_transport = client.transport
        pod_transport = conn.transport
        early = client.hand_over()
        tail = conn.parser.upgraded_tail
        conn.parser.upgraded_tail = b""
        pod = exchange.pod
        tunnel = Tunnel(self, exchange.revision, pod.uid if pod else "?", release)
        if client_transport is None or pod_transport is None or client_transport.is_closing():
            if pod_transport is not None:
                pod_transport.abort()
            if release is not None:
                release()
            return
        client_side = tunnel.client = _Side(tunnel, client_transport)
        pod_side = tunnel.pod = _Side(tunnel, pod_transport)
        client_side.peer, client_side.peer_transport = pod_side, pod_transport
        pod_side.peer, pod_side.peer_transport = client_side, client_transport
        conn.release_socket()  # the pod's transport is the tunnel's from here on
        client_transport.set_protocol(client_side)
        pod_transport.set_protocol(pod_side)
        client_transport.write(switching_protocols_head(response))
        if tail:
            pod_side.bytes += len(tail)
            client_transport.write(tail)
        for piece in early:
            client_side.bytes += len(piece)
            pod_transport.write(piece)
        # Either protocol may have paused its reading (held early bytes, a full peer): the
        # session starts with both reading.
        client_transport.resume_reading()
        pod_transport.resume_reading()
        self.open.add(tunnel)
        stats = self.stats_for(tunnel.revision)
        stats.open += 1
        stats.opened += 1
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)
        log.debug("websocket session to pod %s (%s) open", tunnel.pod_uid, tunnel.revision)

    def session_ended(self, tunnel: Tunnel, exc: Exception | None) -> None:
        if tunnel.ended:
            return
        tunnel.ended = True
        release = tunnel.release
        if release is not None:
            tunnel.release = None
            release()  # the pod's slot is free again (a waiter, if any, gets it now)
        self.open.discard(tunnel)
        stats = self.stats_for(tunnel.revision)
        stats.open -= 1
        stats.bytes_from_clients += tunnel.client.bytes
        stats.bytes_from_pods += tunnel.pod.bytes
        seconds = self.loop.time() - tunnel.started_mono
        stats.durations.observe(seconds)
        log.debug(
            "websocket session to pod %s (%s) ended after %.1fs: %d bytes in, %d out%s",
            tunnel.pod_uid, tunnel.revision, seconds, tunnel.client.bytes, tunnel.pod.bytes,
            f" ({exc})" if exc else "",
        )  # fmt: skip

    def _sweep_interval(self) -> float:
        return max(0.05, min(self.idle_timeout / 4, 5.0))

    def _sweep(self) -> None:
        """Close sessions in which nothing moved for the idle timeout."""
        self._sweeper = None
        now = self.loop.time()
        timeout = self.idle_timeout
        for tunnel in list(self.open):
            moved = tunnel.client.bytes + tunnel.pod.bytes
            if moved != tunnel.idle_mark:
                tunnel.idle_mark = moved
                tunnel.idle_since = now
            elif now - tunnel.idle_since >= timeout:
                self.idle_closes += 1
                log.info(
                    "websocket session to pod %s (%s) idle for %.0fs: closed",
                    tunnel.pod_uid, tunnel.revision, now - tunnel.idle_since,
                )  # fmt: skip
                tunnel.end()
        if self.open:
            self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)

    def close_all(self, why: str) -> None:
        """Drain's end: every session is closed (TCP close; the app owns the WebSocket close)."""
        if self.open:
            log.info("closing %d websocket sessions: %s", len(self.open), why)
        for tunnel in list(self.open):
            tunnel.end()

    async def wait_closed(self, timeout: float) -> None:
        """Until every closed session's sockets are gone (flushed, or aborted after
        ``ABORT_AFTER_CLOSE``), at most ``timeout`` seconds: a process about to exit."""
        deadline = self.loop.time() + timeout
        while self.open and self.loop.time() < deadline:
            await asyncio.sleep(0.01)  # a set that only shrinks, bounded by the timeout

    # ---- figures ----------------------------------------------------------------------------

    def running_bytes(self, revision: str) -> tuple[int, int]:
        """Bytes of the revision's sessions, ended and open: (from clients, from pods)."""
        stats = self.by_revision.get(revision)
        inbound = stats.bytes_from_clients if stats else 0
        outbound = stats.bytes_from_pods if stats else 0
        for tunnel in self.open:
            if tunnel.revision == revision:
                inbound += tunnel.client.bytes
                outbound += tunnel.pod.bytes
        return inbound, outbound

    def view(self, revision: str) -> SessionView:
        stats = self.by_revision.get(revision)
        if stats is None:
            return SessionView()
        inbound, outbound = self.running_bytes(revision)
        now = self.loop.time()
        longest = max((now - t.started_mono for t in self.open if t.revision == revision), default=0.0)
        return SessionView(
            open=stats.open,
            opened=stats.opened,
            bytes_from_clients=inbound,
            bytes_from_pods=outbound,
            ended=stats.durations.count,
            ended_seconds_total=round(stats.durations.sum, 3),
            longest_open_seconds=round(longest, 3),
        )

    def items(self) -> Iterator[tuple[str, SessionStats]]:
        return iter(sorted(self.by_revision.items()))
