"""A minimal RFC 6455 WebSocket endpoint for the stand-in apps, and a small client for the dev load.

Theory of operation
-------------------
The stand-in apps (``upstream.AppServer`` and the simulator's pods) must hold WebSocket sessions the
way a realtime inference app does, without a dependency the package does not have. So this module
does the little of RFC 6455 they need: the handshake's ``Sec-WebSocket-Accept``, unfragmented and
fragmented data frames (echoed frame by frame, so fragmentation is kept), ping (answered with pong)
and the closing handshake. ``WsSession`` is an ``asyncio.Protocol`` that takes the app connection's
transport after its ``101`` (``transport.set_protocol``); what it does is chosen by the request path:

- ``/ws/echo``                    every data frame back as it came
- ``/ws/tokens/<n>/<ms>``         ``n`` text frames ``token <i>``, one every ``ms``, then a close (1000)

A session holds one of its app's slots (``AppServer.active``) for its whole life, so the app's
concurrency accounting (violations, max concurrent) covers sessions and requests alike. Frames over
``MAX_FRAME`` close the session with 1009; a client frame that is not masked closes it with 1002.

``WsClient`` is the other end for ``fastproxy dev``'s load and the simulator tests: connect, send the
handshake (through the router, so with ``Host``), check the 101, send masked frames, read frames.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any, Final

GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_FRAME: Final = 16 * 1024 * 1024
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False) -> bytes:
    """One frame; ``mask`` for a client's (RFC 6455 section 5.3)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _unmask(payload, key)


def _unmask(payload: bytes | bytearray, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


class FrameReader:
    """Frames out of a byte stream: ``feed`` returns (fin, opcode, payload) for each complete one."""

    __slots__ = ("_buffer", "require_mask")

    def __init__(self, *, require_mask: bool) -> None:
        self._buffer = bytearray()
        self.require_mask = require_mask

    def feed(self, data: bytes) -> list[tuple[bool, int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length = second & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    break
                length = struct.unpack_from("!H", buffer, 2)[0]
                offset = 4
            elif length == 127:
                if len(buffer) < 10:
                    break
                length = struct.unpack_from("!Q", buffer, 2)[0]
                offset = 10
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            masked = bool(second & 0x80)
            if masked != self.require_mask:
                raise ValueError("client frame not masked" if self.require_mask else "server frame masked")
            key = b""
            if masked:
                if len(buffer) < offset + 4:
                    break
                key = bytes(buffer[offset : offset + 4])
                offset += 4
            if len(buffer) < offset + length:
                break
            payload = bytes(buffer[offset : offset + length])
            del buffer[: offset + length]
            frames.append((bool(first & 0x80), first & 0x0F, _unmask(payload, key) if masked else payload))
        return frames


class WsSession(asyncio.Protocol):
    """The app side of one session, on the transport its HTTP connection had."""

    def __init__(
        self, transport: Any, target: bytes, on_end: Callable[[], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.transport = transport
        self.reader = FrameReader(require_mask=True)
        self.on_end = on_end
        self.loop = loop
        self.closing = False
        self.task: asyncio.Task[None] | None = None
        self.messages = 0
        parts = target.partition(b"?")[0].split(b"/")  # ["", "ws", mode, args...]
        self.mode = parts[2] if len(parts) > 2 else b"echo"
        self.args = parts[3:]

    def start(self, early: bytes) -> None:
        if self.mode == b"tokens":
            count = int(self.args[0]) if self.args else 10
            interval = int(self.args[1]) / 1000 if len(self.args) > 1 else 0.02
            self.task = self.loop.create_task(self._tokens(count, interval))
        if early:
            self.data_received(early)

    async def _tokens(self, count: int, interval: float) -> None:
        for i in range(count):
            if self.closing:
                return
            self.transport.write(frame(OP_TEXT, b"token %d" % i))
            await asyncio.sleep(interval)
        self._close(1000)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ValueError as exc:
            self._close(1009 if "exceeds" in str(exc) else 1002)
            return
        for fin, opcode, payload in frames:
            if opcode == OP_CLOSE:
                if not self.closing:
                    self.closing = True
                    self.transport.write(frame(OP_CLOSE, payload[:2]))
                self.transport.close()  # the server closes the TCP connection first (section 7.1.1)
                return
            if opcode == OP_PING:
                self.transport.write(frame(OP_PONG, payload))
            elif opcode in (OP_TEXT, OP_BINARY, OP_CONT) and self.mode == b"echo" and not self.closing:
                self.messages += fin
                self.transport.write(frame(opcode, payload, fin=fin))

    def _close(self, code: int) -> None:
        if not self.closing:
            self.closing = True
            self.transport.write(frame(OP_CLOSE, struct.pack("!H", code)))
        # The client answers with its close and we then close; a client that never does is cut.
        self.loop.call_later(2.0, self.transport.abort)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.task is not None:
            self.task.cancel()
        self.on_end()


def is_websocket_handshake(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The Sec-WebSocket-Key of an RFC 6455 handshake (lower-case header names), else None."""
    upgrade = connection = key = None
    for name, value in headers:
        if name == b"upgrade":
            upgrade = value.strip().lower()
        elif name == b"connection":
            connection = value.lower()
        elif name == b"sec-websocket-key":
            key = value
    if upgrade == b"websocket" and connection is not None and b"upgrade" in connection and key:
        return key
    return None


def switching_head(key: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
        b"sec-websocket-accept: " + accept_key(key) + b"\r\n" + extra + b"\r\n"
    )


class HandshakeRefused(Exception):
    def __init__(self, status: int, head: bytes) -> None:
        super().__init__(f"handshake answered {status}")
        self.status = status
        self.head = head


class WsClient:
    """A small client (masked frames, no extensions) for the dev load and tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader(require_mask=False)
        self.pending: list[tuple[bool, int, bytes]] = []
        self.closing = False  # our close frame is sent

    @classmethod
    async def connect(cls, host: str, port: int, path: str = "/ws/echo", authority: str = "ws") -> WsClient:
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (path.encode(), authority.encode(), key)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101 or accept_key(key) not in head:
            writer.close()
            raise HandshakeRefused(status, head)
        return cls(reader, writer)

    def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        self.writer.write(frame(opcode, payload, mask=True))

    async def recv(self) -> tuple[int, bytes]:
        """The next frame's (opcode, payload); a close frame is answered and returned."""
        while not self.pending:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError("connection closed without a close frame")
            self.pending += self.frames.feed(data)
        _, opcode, payload = self.pending.pop(0)
        if opcode == OP_CLOSE and not self.closing:
            self.closing = True
            self.writer.write(frame(OP_CLOSE, payload[:2], mask=True))
        return opcode, payload

    async def close(self, code: int = 1000) -> None:
        try:
            if not self.closing:
                self.closing = True
                self.writer.write(frame(OP_CLOSE, struct.pack("!H", code), mask=True))
            while True:
                opcode, _ = await asyncio.wait_for(self.recv(), 2)
                if opcode == OP_CLOSE:
                    break
        except (EOFError, OSError, TimeoutError):
            pass
        finally:
            self.writer.close()
