"""An asyncio TCP fault proxy: delay, jitter, half-open connections, slow drip, idle close.

Theory of operation
-------------------
``tc netem`` is not available on these kernels, so network faults between a router and a pod are
played by this proxy, listening on its own loopback address in front of the pod. Each accepted
connection gets one upstream connection and two pumps (client->pod, pod->client). The faults are
plain attributes read by the pumps at every chunk, so a test can change them while traffic flows:

- ``delay`` / ``jitter``   seconds added before each chunk is forwarded (uniform extra up to jitter)
- ``half_open``            new connections are accepted and then neither forwarded nor answered:
                           the peer's connect succeeds and nothing ever comes back
- ``drip_bytes`` / ``drip_interval``  responses (pod->client) go out this many bytes per interval
- ``idle_close``           a connection with no bytes either way for this long is closed by the
                           proxy (FIN both ways): a pod's own keep-alive timeout, placed where a
                           test wants it relative to the router's pool idle timeout

``connections`` counts open proxied connections (half-open ones included); ``accepted`` every one;
``idle_closed`` those ended by ``idle_close``; ``client_closed_at`` when each client closed its side.
``close()`` aborts everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time


class FaultProxy:
    __slots__ = (
        "_conns",
        "_server",
        "accepted",
        "address",
        "client_closed_at",
        "delay",
        "drip_bytes",
        "drip_interval",
        "half_open",
        "idle_close",
        "idle_closed",
        "jitter",
        "target",
    )

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.jitter = 0.0
        self.half_open = False
        self.drip_bytes = 0  # 0: no drip
        self.drip_interval = 0.01
        self.idle_close: float | None = None
        self.accepted = 0
        self.idle_closed = 0  # connections the idle close ended
        # time.monotonic() at which each client (the router) closed or reset its side: an exact
        # time for "the router closed the upstream connection", taken when it happened, not polled
        self.client_closed_at: list[float] = []
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_ProxiedConnection] = set()

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, host, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        tasks = [t for c in list(self._conns) for t in c.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _ProxiedConnection(self, writer)
        self._conns.add(conn)
        try:
            await conn.run(reader)
        finally:
            self._conns.discard(conn)

    def _pause(self) -> float:
        return self.delay + (random.uniform(0, self.jitter) if self.jitter else 0.0)


class _ProxiedConnection:
    __slots__ = ("activity", "client", "idle", "proxy", "tasks", "upstream")

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.activity = asyncio.Event()
        self.idle = False  # closed by the idle timeout: forward nothing more

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()

    async def run(self, client_reader: asyncio.StreamReader) -> None:
        proxy = self.proxy
        try:
            if proxy.half_open:
                await client_reader.read(-1)  # swallow everything, answer nothing, until the peer goes
                return
            up_reader, self.upstream = await asyncio.open_connection(*proxy.target)
            self.tasks = [
                asyncio.create_task(self._pump(client_reader, self.upstream, drip=False)),
                asyncio.create_task(self._pump(up_reader, self.client, drip=True)),
            ]
            if proxy.idle_close is not None:
                self.tasks.append(asyncio.create_task(self._idle_watch(proxy.idle_close)))
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
            # Both pumps end on their own (EOF both ways); the idle watch ends by closing.
            await asyncio.gather(*self.tasks[:2], return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for task in self.tasks:
                task.cancel()
            for writer in (self.client, self.upstream):
                if writer is not None:
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, drip: bool) -> None:
        proxy = self.proxy
        try:
            while data := await reader.read(65536):
                if self.idle:
                    break
                self.activity.set()
                pause = proxy._pause()
                if pause:
                    await asyncio.sleep(pause)
                step = proxy.drip_bytes if drip else 0
                if step:
                    for off in range(0, len(data), step):
                        writer.write(data[off : off + step])
                        await writer.drain()
                        await asyncio.sleep(proxy.drip_interval)
                else:
                    writer.write(data)
                    await writer.drain()
            if not drip:
                proxy.client_closed_at.append(time.monotonic())
            if writer.can_write_eof():
                writer.write_eof()  # half-close forwarded as such
        except (OSError, RuntimeError):
            if not drip:
                proxy.client_closed_at.append(time.monotonic())
            self.abort()

    async def _idle_watch(self, idle: float) -> None:
        while True:
            self.activity.clear()
            try:
                await asyncio.wait_for(self.activity.wait(), idle)
            except TimeoutError:
                if self.activity.is_set():
                    continue  # bytes came in the same loop iteration: not idle after all
                # The "pod" closes its idle keep-alive connection: FIN to both sides. Like a real
                # server, nothing that arrives after this decision is forwarded (or executed).
                self.idle = True
                self.proxy.idle_closed += 1
                for writer in (self.client, self.upstream):
                    if writer is not None:
                        writer.close()
                return
