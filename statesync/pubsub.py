"""A receive-only Valkey pub/sub subscription as a plain asyncio Protocol: one callback per message.

Theory of operation
-------------------
A router receives hundreds of deltas a second while it serves requests on the same event loop.
valkey-py's asyncio ``PubSub`` spends ~150 µs of loop time per message (a ``get_message`` call
per message: a timeout context and its timer, a stream-reader future, a retry wrapper, a parser
round trip, a dict per message); the delta itself decodes and applies in ~5 µs. This module does
only what a subscriber needs: ``data_received`` parses the RESP2 replies of the handshake and the
pub/sub push arrays straight out of the received bytes and calls ``sink.message(payload)`` for each
``message`` array -- no task, future, timer or dict per message -- then ``sink.received()`` once:
every message that arrived together has been handed on, so the sink may act on them as one batch
(the router applies consecutive deltas in one step).

The connection parameters come from a valkey-py client (``statesync.connect.connect(url)``), so
every URL form it accepts works the same here: ``valkey://``, ACL
``user:password@`` (AUTH), db (SELECT, sent only when not 0, as valkey-py does: the role ACLs grant
no SELECT), ``valkeys://`` (the client's own SSL context, built from the URL's ssl options), and
``valkey+sentinel://`` (the master's address asked from the sentinels at subscribe time).

The handshake (AUTH, SELECT, SUBSCRIBE) is written in one go; ``+OK`` replies are counted off, an
error reply is turned into valkey-py's exception for it (``AuthenticationError``, ``NoPermissionError``,
``ResponseError``) and ends the subscription. ``sink.subscribed(count)`` is called for each
``subscribe`` confirmation, ``sink.lost(exc)`` once when the subscription ends for any reason (the
connection closed or reset, a protocol error, an exception raised by the sink, or ``close()``:
then ``exc`` is None). There is no read timeout here: silence is detected by the caller's
application heartbeat (pub/sub gives no error on a frozen server), which calls ``close()``.

A payload split over several reads waits in a buffer; the bytes still needed for the frame are
remembered, so a large delta arriving in many segments is parsed once, not once per segment.
``pause_reading``/``resume_reading`` let a busy caller push back (the data then waits in the
socket and in Valkey's output buffer, whose limits end a hopelessly slow subscriber).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol

import valkey.asyncio as avalkey
from valkey._parsers.base import BaseParser
from valkey.exceptions import ConnectionError as ValkeyConnectionError

_MESSAGE_HEAD = b"*3\r\n$7\r\nmessage\r\n$"
_SUBSCRIBE_HEAD = b"*3\r\n$9\r\nsubscribe\r\n$"
_CRLF = b"\r\n"


class PubSubProtocolError(ValkeyConnectionError):
    """The server sent something a pub/sub connection never receives (a desynchronised stream)."""


class Sink(Protocol):
    def message(self, payload: bytes) -> None: ...

    def received(self) -> None: ...

    def subscribed(self, count: int) -> None: ...

    def lost(self, exc: BaseException | None) -> None: ...


def encode_command(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class SubscriberProtocol(asyncio.Protocol):
    __slots__ = (
        "_buffer",
        "_done",
        "_frame_head",
        "_handshake",
        "_need",
        "_pending_oks",
        "sink",
        "transport",
    )

    def __init__(self, sink: Sink, handshake: bytes, pending_oks: int, channel: bytes | None = None) -> None:
        self.sink = sink
        # A message on the one channel subscribed to starts with these bytes, up to the payload's
        # length: the steady state's frames are recognised in one comparison (None: any channel).
        self._frame_head = (
            b"%s%d\r\n%s\r\n$" % (_MESSAGE_HEAD, len(channel), channel) if channel is not None else None
        )
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._need = 0  # bytes the buffered incomplete frame needs at least before parsing again
        self._pending_oks = pending_oks  # +OK replies still due (AUTH, SELECT)
        self._done = False
        self._handshake = handshake

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's are not asyncio.Transport subclasses)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self._handshake)  # type: ignore[attr-defined]  # a Transport: it writes

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._need:
                return
            data = bytes(self._buffer)
            self._buffer.clear()
        self._need = 0
        try:
            consumed = self._parse(data)
            if not self._done:
                self.sink.received()
        except Exception as exc:  # a sink's exception or a bad frame: this subscription is over
            self._finish(exc)
            return
        if consumed < len(data) and not self._done:
            self._buffer += data[consumed:] if consumed else data

    def eof_received(self) -> bool:
        self._finish(ValkeyConnectionError("Valkey closed the pub/sub connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ValkeyConnectionError("pub/sub connection lost"))

    # ---- control ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._finish(None)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._done:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._done:
            self.transport.resume_reading()

    @property
    def closed(self) -> bool:
        return self._done

    def _finish(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        if self.transport is not None:
            self.transport.abort()
        self.sink.lost(exc)

    # ---- RESP2 -----------------------------------------------------------------------------------

    def _parse(self, data: bytes) -> int:
        """Hand every complete frame in ``data`` on; return how many bytes were consumed."""
        pos = 0
        end = len(data)
        sink = self.sink
        head = self._frame_head
        skip = len(head) if head is not None else 0
        while pos < end and not self._done:
            if head is not None and data.startswith(head, pos):
                # the steady state: *3 $7 message $<n> <our channel> $<n> payload
                at = pos + skip
                eol = data.find(_CRLF, at)
                if eol < 0:
                    return pos
                start = eol + 2
                stop = start + int(data[at:eol])
                if stop + 2 > end:
                    self._need = stop + 2 - pos
                    return pos
                pos = stop + 2
                sink.message(data[start:stop])
                continue
            if data.startswith(_MESSAGE_HEAD, pos):
                # *3 $7 message $<n> channel $<n> payload: the only frame of the steady state
                at = self._skip_bulk(data, pos + len(_MESSAGE_HEAD) - 1, pos)
                if at < 0 or at >= end:
                    return pos
                if data[at : at + 1] != b"$":
                    raise PubSubProtocolError(f"unexpected pub/sub message element {data[at : at + 16]!r}")
                eol = data.find(_CRLF, at)
                if eol < 0:
                    return pos
                size = int(data[at + 1 : eol])
                start = eol + 2
                stop = start + size
                if stop + 2 > end:
                    self._need = stop + 2 - pos
                    return pos
                pos = stop + 2
                sink.message(data[start:stop])
                continue
            if data.startswith(_SUBSCRIBE_HEAD, pos):
                at = self._skip_bulk(data, pos + len(_SUBSCRIBE_HEAD) - 1, pos)
                if at < 0:
                    return pos
                eol = data.find(_CRLF, at)
                if eol < 0:
                    return pos
                if data[at : at + 1] != b":":
                    raise PubSubProtocolError(f"unexpected subscribe confirmation {data[pos:eol]!r}")
                pos = eol + 2
                sink.subscribed(int(data[at + 1 : eol]))
                continue
            eol = data.find(_CRLF, pos)
            if eol < 0:
                if end - pos > 1024:  # no header is that long
                    raise PubSubProtocolError(f"unterminated reply {data[pos : pos + 32]!r}")
                return pos
            kind = data[pos : pos + 1]
            if kind == b"+" and self._pending_oks:
                self._pending_oks -= 1
                pos = eol + 2
                continue
            if kind == b"-":
                raise BaseParser.parse_error(data[pos + 1 : eol].decode(errors="replace"))
            rest = data[pos:]
            if _MESSAGE_HEAD.startswith(rest) or _SUBSCRIBE_HEAD.startswith(rest):
                return pos  # the start of a message or confirmation: wait for its first bytes
            # unsubscribe / psubscribe confirmations, pong: never asked for here
            raise PubSubProtocolError(f"unexpected reply on a pub/sub connection: {data[pos:eol]!r}")
        return pos

    def _skip_bulk(self, data: bytes, at: int, frame: int) -> int:
        """``at`` points at ``$<n>\\r\\n<n bytes>\\r\\n`` in the frame starting at ``frame``: the
        position after it, or -1 if incomplete."""
        eol = data.find(_CRLF, at)
        if eol < 0:
            return -1
        stop = eol + 2 + int(data[at + 1 : eol]) + 2
        if stop > len(data):
            self._need = stop - frame
            return -1
        return stop


async def subscribe(
    client: avalkey.Valkey, channel: str | bytes, sink: Sink, *, connect_timeout: float | None = None
) -> SubscriberProtocol:
    """Open a new connection with ``client``'s parameters and SUBSCRIBE ``channel`` on it.

    Returns once the connection is made and the handshake written; the confirmation, errors and
    messages arrive through ``sink``."""
    pool = client.connection_pool
    conn = pool.make_connection()
    loop = asyncio.get_running_loop()
    timeout = connect_timeout if connect_timeout is not None else conn.socket_connect_timeout
    handshake = []
    oks = 0
    credentials: tuple[str, ...] | None = None
    if conn.credential_provider is not None:
        credentials = tuple(conn.credential_provider.get_credentials())
    elif conn.username or conn.password:
        credentials = (conn.username or "default", conn.password or "")
    if credentials:
        handshake.append(encode_command("AUTH", *credentials))
        oks += 1
    if conn.db:
        handshake.append(encode_command("SELECT", conn.db))
        oks += 1
    handshake.append(encode_command("SUBSCRIBE", channel))
    protocol = SubscriberProtocol(
        sink, b"".join(handshake), oks, channel if isinstance(channel, bytes) else channel.encode()
    )
    path: str | None = getattr(conn, "path", None)
    if path:
        connecting: Any = loop.create_unix_connection(lambda: protocol, path)
    else:
        host, port = conn.host, conn.port
        if hasattr(pool, "get_master_address"):  # Sentinel: ask where the master is now
            host, port = await pool.get_master_address()
        ssl_context = conn.ssl_context.get() if hasattr(conn, "ssl_context") else None
        connecting = loop.create_connection(lambda: protocol, host, port, ssl=ssl_context)
    try:
        await asyncio.wait_for(connecting, timeout)
    except TimeoutError as exc:
        raise avalkey.TimeoutError(f"pub/sub connect to {conn} timed out after {timeout}s") from exc
    return protocol
