"""Open-loop (constant-rate) and closed-loop HTTP/1.1 load generator.

Theory of operation
-------------------
Open loop: request ``i`` is *scheduled* at ``t0 + i / rate`` whatever happened to earlier requests,
and its latency runs from that scheduled time to the last byte of its response. A slow server (or
a slow generator) therefore shows up as latency instead of silently lowering the offered load: the
"coordinated omission" fix. The scheduler sleeps until the next due time and then submits every
request that is due, so timer granularity turns into small bursts, never into lost requests; how
late it ran is reported as ``max_send_lag``.

Each request takes an idle keep-alive connection (most recently used first, so the pool stays as
small as the load allows). A connection carries one request at a time (no pipelining). When all
are busy a new one is opened, up to ``max_connections``; beyond that the request waits in a FIFO
backlog with its clock already running, and ``pool_exhausted`` counts how often that happened.
Responses are parsed with ``httptools.HttpResponseParser`` (Content-Length, chunked, and
close-delimited bodies; interim 1xx responses are skipped). A watchdog fails requests (in flight
or in the backlog) older than ``timeout`` and drops their connections.

The first ``warmup`` seconds run at the same rate but are not measured; then ``duration``
seconds are. Every measured request ends up completed or counted under one error kind, so
``sent == completed + sum(errors.values())``.

Closed loop (``run_closed_loop``): ``concurrency`` workers, each with its own connection, send
the next request as soon as the previous one is answered; this measures saturation throughput,
and its latencies are per request (send to last byte), not queueing-corrected.

CLI: ``python -m bench.loadgen --target 127.0.0.1:8080 --rate 2000 --duration 5 [--path /]
[--json]`` (``--concurrency N`` instead of ``--rate`` runs the closed loop).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import sys
import time
from typing import Any, Final, cast

import httptools
import msgspec

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

__all__ = ["LoadResult", "main", "run_closed_loop", "run_open_loop"]

ERROR_KINDS: Final = ("connect", "reset", "eof", "timeout", "parse")
_PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)

_now = time.perf_counter  # loop.time() is millisecond-grained on uvloop: too coarse for latency


class LoadResult(msgspec.Struct):
    """The outcome of one run; counts and latencies cover the measured window only."""

    mode: str  # "open" or "closed"
    target: str
    rate: float  # offered requests/s (open loop); 0 for closed loop
    concurrency: int  # workers (closed loop); 0 for open loop
    duration: float  # measured window, seconds
    sent: int
    completed: int
    errors: dict[str, int]
    status: dict[int, int]
    latencies: list[float]  # seconds, completed requests only, ascending
    connections_opened: int = 0
    pool_exhausted: int = 0  # requests that found every connection busy with the cap reached
    max_backlog: int = 0
    max_send_lag: float = 0.0  # worst lateness of the scheduler itself, seconds
    bytes_received: int = 0

    def percentile(self, p: float) -> float:
        """Latency at percentile ``p`` (0..100, linear interpolation), in seconds; NaN if none."""
        lat = self.latencies
        if not lat:
            return math.nan
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile {p} outside 0..100")
        rank = (len(lat) - 1) * p / 100.0
        low = int(rank)
        high = min(low + 1, len(lat) - 1)
        return lat[low] + (lat[high] - lat[low]) * (rank - low)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        """Completed requests per second of the measured window."""
        return self.completed / self.duration if self.duration > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Everything but the raw latencies, with latency percentiles in milliseconds."""
        latency_ms = {f"p{p:g}": self.percentile(p) * 1000 for p in _PERCENTILES}
        latency_ms["max"] = self.latencies[-1] * 1000 if self.latencies else math.nan
        latency_ms["mean"] = sum(self.latencies) / len(self.latencies) * 1000 if self.latencies else math.nan
        out = msgspec.to_builtins(self)
        del out["latencies"]
        out["latency_ms"] = latency_ms
        out["throughput"] = self.throughput
        return cast(dict[str, Any], out)


def _build_request(
    host: str, port: int, method: str, path: str, headers: dict[str, str] | None, body: bytes
) -> bytes:
    """The request bytes, built once: every request of a run is identical."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
    names = set()
    for name, value in (headers or {}).items():
        names.add(name.lower())
        lines.append(f"{name}: {value}")
    # Methods that normally carry a body announce even an empty one, as clients do.
    wants_length = body or method not in ("GET", "HEAD", "DELETE", "OPTIONS")
    if wants_length and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Conn(asyncio.Protocol):
    """One client connection carrying at most one request at a time."""

    __slots__ = (
        "_framed",
        "_headers_done",
        "_reset_parser",
        "busy",
        "closed",
        "owner",
        "parser",
        "scheduled",
        "transport",
    )

    def __init__(self, owner: _Driver) -> None:
        self.owner = owner
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.scheduled = 0.0  # the latency clock's start for the request in flight
        self._headers_done = False
        self._framed = False  # the response declared its length (Content-Length or chunked)
        self._reset_parser = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport

    def send(self, scheduled: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.scheduled = scheduled
        self._headers_done = False
        self._framed = False
        self.transport.write(self.owner.request)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        owner.bytes_received += len(data)
        if not self.busy:
            # Bytes nobody asked for (e.g. a body after a HEAD answer): the stream is out of
            # sync, so this connection must not carry another request.
            self._drop()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.busy:
                self.busy = False
                owner.on_failure(self, self.scheduled, "parse")
            self._drop()
            return
        if self._reset_parser:
            # A HEAD answer ended at its headers; the parser would wait for the announced body.
            self._reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            return  # interim (100 Continue, 103 Early Hints): the final answer follows
        self._headers_done = True
        if self.owner.is_head and self.busy:
            self._reset_parser = True
            self._finish(status, self.parser.should_keep_alive())

    def on_message_complete(self) -> None:
        # A HEAD answer finished at its headers, and the next request may already be in flight on
        # this connection: this callback (for a bodiless HEAD answer) must not complete that one.
        if not self.busy or self.owner.is_head:
            return
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            self._framed = False
            return
        self._finish(status, self.parser.should_keep_alive())

    def _finish(self, status: int, keep_alive: bool) -> None:
        self.busy = False
        if not keep_alive:
            self._drop()
        self.owner.on_response(self, self.scheduled, status)

    def _drop(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        owner = self.owner
        if self.busy:
            self.busy = False
            if exc is None and self._headers_done and not self._framed:
                # A close-delimited body ends at EOF: that is a complete response.
                owner.on_response(self, self.scheduled, self.parser.get_status_code())
            else:
                owner.on_failure(self, self.scheduled, "eof" if exc is None else "reset")
        owner.on_lost(self)


class _Driver:
    """State shared by both loops: the target, counters, connections and the timeout watchdog."""

    __slots__ = (
        "all_lost",
        "bytes_received",
        "completed",
        "connections_opened",
        "conns",
        "errors",
        "host",
        "is_head",
        "latencies",
        "loop",
        "measure_from",
        "port",
        "request",
        "sent",
        "status",
        "timeout",
    )

    def __init__(self, host: str, port: int, request: bytes, is_head: bool, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.request = request
        self.is_head = is_head
        self.timeout = timeout
        self.conns: set[_Conn] = set()
        self.all_lost: asyncio.Event | None = None  # set by close_all, fired when conns empties
        self.measure_from = math.inf  # set when the schedule is known; nothing counts before
        self.sent = 0
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.status: dict[int, int] = {}
        self.latencies: list[float] = []
        self.connections_opened = 0
        self.bytes_received = 0

    def record_ok(self, started: float, status: int) -> None:
        if started >= self.measure_from:
            self.completed += 1
            self.latencies.append(_now() - started)
            self.status[status] = self.status.get(status, 0) + 1

    def record_error(self, started: float, kind: str) -> None:
        if started >= self.measure_from:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    async def connect(self) -> _Conn:
        _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        self.connections_opened += 1
        # Joined only now, so a connection being opened is never counted twice against the cap.
        if not conn.closed:
            self.conns.add(conn)
        return conn

    def expire(self, now: float) -> None:
        """Fail requests in flight for longer than the timeout, dropping their connections."""
        limit = now - self.timeout
        for conn in list(self.conns):
            if conn.busy and conn.scheduled < limit:
                conn.busy = False
                conn.abort()
                self.on_failure(conn, conn.scheduled, "timeout")

    async def watchdog(self) -> None:
        tick = min(0.05, self.timeout / 4)
        while True:
            await asyncio.sleep(tick)
            self.expire(_now())

    async def close_all(self) -> None:
        if not self.conns:
            return
        self.all_lost = asyncio.Event()
        for conn in list(self.conns):
            conn.abort()
        # connection_lost runs on a later loop iteration; wait for it so no transport outlives
        # the run, but never hang on it.
        try:
            async with asyncio.timeout(1.0):
                await self.all_lost.wait()
        except TimeoutError:
            pass

    # Connection callbacks, specialised by each loop.
    def on_response(self, conn: _Conn, started: float, status: int) -> None:
        raise NotImplementedError

    def on_failure(self, conn: _Conn, started: float, kind: str) -> None:
        raise NotImplementedError

    def on_lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if not self.conns and self.all_lost is not None:
            self.all_lost.set()


class _OpenLoop(_Driver):
    __slots__ = (
        "backlog",
        "connecting",
        "connects",
        "done",
        "idle",
        "max_backlog",
        "max_connections",
        "max_send_lag",
        "outstanding",
        "pool_exhausted",
        "scheduling",
    )

    def __init__(
        self, host: str, port: int, request: bytes, is_head: bool, timeout: float, max_connections: int
    ) -> None:
        super().__init__(host, port, request, is_head, timeout)
        self.max_connections = max_connections
        self.idle: list[_Conn] = []  # a stack: the most recently used connection goes first
        self.backlog: collections.deque[float] = collections.deque()  # scheduled times, oldest first
        self.connecting = 0
        self.connects: set[asyncio.Task[None]] = set()
        self.outstanding = 0  # scheduled and not yet completed or failed (warmup included)
        self.pool_exhausted = 0
        self.max_backlog = 0
        self.max_send_lag = 0.0
        self.scheduling = True
        self.done = asyncio.Event()

    def submit(self, scheduled: float) -> None:
        self.outstanding += 1
        if scheduled >= self.measure_from:
            self.sent += 1
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.send(scheduled)
                return
        self.backlog.append(scheduled)
        if len(self.backlog) > self.max_backlog:
            self.max_backlog = len(self.backlog)
        if len(self.conns) + self.connecting >= self.max_connections:
            self.pool_exhausted += int(scheduled >= self.measure_from)
        elif self.connecting < len(self.backlog):
            self._open()

    def _open(self) -> None:
        self.connecting += 1
        task = self.loop.create_task(self._connect())
        self.connects.add(task)
        task.add_done_callback(self.connects.discard)

    async def _connect(self) -> None:
        try:
            conn = await self.connect()
        except OSError:
            self.connecting -= 1
            # Without a server every connect fails: fail a waiting request per failed attempt,
            # or the backlog would only drain through timeouts.
            if self.backlog:
                self._settle()
                self.record_error(self.backlog.popleft(), "connect")
            return
        self.connecting -= 1
        if conn.closed:
            # Dropped before it joined the pool, while still counted as connecting: re-check now.
            self.on_lost(conn)
            return
        self._next(conn)

    def _next(self, conn: _Conn) -> None:
        """Give a free connection the oldest waiting request, or park it."""
        if conn.closed:
            return
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def _settle(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and not self.scheduling:
            self.done.set()

    def on_response(self, conn: _Conn, started: float, status: int) -> None:
        self._settle()
        self.record_ok(started, status)
        self._next(conn)

    def on_failure(self, conn: _Conn, started: float, kind: str) -> None:
        self._settle()
        self.record_error(started, kind)

    def on_lost(self, conn: _Conn) -> None:
        super().on_lost(conn)
        # Waiting requests may have been counting on this connection.
        if (
            self.backlog
            and self.connecting < len(self.backlog)
            and len(self.conns) + self.connecting < self.max_connections
        ):
            self._open()

    def expire(self, now: float) -> None:
        super().expire(now)
        limit = now - self.timeout
        backlog = self.backlog
        while backlog and backlog[0] < limit:
            self._settle()
            self.record_error(backlog.popleft(), "timeout")

    async def run(self, rate: float, warmup: float, duration: float) -> None:
        interval = 1.0 / rate
        n_warm = round(rate * warmup)
        total = n_warm + max(1, round(rate * duration))
        t0 = _now()
        # Half an interval of slack absorbs float error in t0 + i * interval.
        self.measure_from = t0 + (n_warm - 0.5) * interval if n_warm else t0 - 1.0
        max_lag = 0.0
        i = 0
        while i < total:
            now = _now()
            due = t0 + i * interval
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while i < total and due <= now:
                lag = now - due
                if lag > max_lag and i >= n_warm:
                    max_lag = lag
                self.submit(due)
                i += 1
                due = t0 + i * interval
        self.scheduling = False
        if self.outstanding == 0:
            self.done.set()
        # The watchdog settles everything by `timeout` after the last send; the margin only guards
        # against a bug turning into a hang.
        async with asyncio.timeout(self.timeout + 5.0):
            await self.done.wait()
        self.max_send_lag = max_lag


async def run_open_loop(
    host: str,
    port: int,
    *,
    rate: float,
    duration: float,
    path: str = "/",
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes = b"",
    max_connections: int = 256,
    warmup: float = 0.5,
    timeout: float = 10.0,
) -> LoadResult:
    """Offer ``rate`` requests/s for ``warmup + duration`` seconds; measure the last ``duration``.

    Latency runs from each request's scheduled send time to the last byte of its response.
    """
    if rate <= 0 or duration <= 0 or max_connections < 1 or timeout <= 0:
        raise ValueError("rate, duration, timeout and max_connections must be positive")
    method = method.upper()
    request = _build_request(host, port, method, path, headers, body)
    driver = _OpenLoop(host, port, request, method == "HEAD", timeout, max_connections)
    watchdog = asyncio.get_running_loop().create_task(driver.watchdog())
    try:
        await driver.run(rate, warmup, duration)
    finally:
        watchdog.cancel()
        for task in list(driver.connects):
            task.cancel()
        await asyncio.gather(watchdog, *driver.connects, return_exceptions=True)
        await driver.close_all()
    driver.latencies.sort()
    return LoadResult(
        mode="open",
        target=f"{host}:{port}",
        rate=float(rate),
        concurrency=0,
        duration=float(duration),
        sent=driver.sent,
        completed=driver.completed,
        errors=driver.errors,
        status=driver.status,
        latencies=driver.latencies,
        connections_opened=driver.connections_opened,
        pool_exhausted=driver.pool_exhausted,
        max_backlog=driver.max_backlog,
        max_send_lag=driver.max_send_lag,
        bytes_received=driver.bytes_received,
    )


class _ClosedLoop(_Driver):
    __slots__ = ("waiters",)

    def __init__(self, host: str, port: int, request: bytes, is_head: bool, timeout: float) -> None:
        super().__init__(host, port, request, is_head, timeout)
        self.waiters: dict[_Conn, asyncio.Future[bool]] = {}

    def _wake(self, conn: _Conn, reusable: bool) -> None:
        waiter = self.waiters.pop(conn, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reusable)

    def on_response(self, conn: _Conn, started: float, status: int) -> None:
        self.record_ok(started, status)
        self._wake(conn, not conn.closed)

    def on_failure(self, conn: _Conn, started: float, kind: str) -> None:
        self.record_error(started, kind)
        self._wake(conn, False)

    async def worker(self, end: float) -> None:
        conn: _Conn | None = None
        while _now() < end:
            if conn is None or conn.closed:
                started = _now()
                try:
                    conn = await self.connect()
                    if conn.closed:  # accepted, then dropped before it could carry anything
                        raise ConnectionResetError
                except OSError:
                    if started >= self.measure_from:
                        self.sent += 1
                    self.record_error(started, "connect")
                    conn = None
                    continue
            started = _now()
            if started >= self.measure_from:
                self.sent += 1
            waiter = self.waiters[conn] = self.loop.create_future()
            conn.send(started)
            if not await waiter:
                conn = None
        if conn is not None:
            conn.abort()


async def run_closed_loop(
    host: str,
    port: int,
    *,
    concurrency: int,
    duration: float,
    path: str = "/",
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes = b"",
    warmup: float = 0.0,
    timeout: float = 10.0,
) -> LoadResult:
    """``concurrency`` workers, each sending its next request when the last is answered."""
    if concurrency < 1 or duration <= 0 or timeout <= 0:
        raise ValueError("concurrency, duration and timeout must be positive")
    method = method.upper()
    request = _build_request(host, port, method, path, headers, body)
    driver = _ClosedLoop(host, port, request, method == "HEAD", timeout)
    loop = asyncio.get_running_loop()
    watchdog = loop.create_task(driver.watchdog())
    start = _now()
    driver.measure_from = start + warmup
    end = driver.measure_from + duration
    workers = [loop.create_task(driver.worker(end)) for _ in range(concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        watchdog.cancel()
        await asyncio.gather(watchdog, *workers, return_exceptions=True)
        await driver.close_all()
    # Requests still in flight at `end` finish after it; the window they are counted against is
    # the measured one, so throughput stays completed / duration.
    driver.latencies.sort()
    return LoadResult(
        mode="closed",
        target=f"{host}:{port}",
        rate=0.0,
        concurrency=concurrency,
        duration=float(duration),
        sent=driver.sent,
        completed=driver.completed,
        errors=driver.errors,
        status=driver.status,
        latencies=driver.latencies,
        connections_opened=driver.connections_opened,
        bytes_received=driver.bytes_received,
    )


def format_result(result: LoadResult) -> str:
    """A few human-readable lines."""
    s = result.summary()
    lat = s["latency_ms"]
    if result.mode == "open":
        head = f"{result.target} open loop: {result.rate:g} req/s offered for {result.duration:g}s"
    else:
        head = f"{result.target} closed loop: {result.concurrency} workers for {result.duration:g}s"
    return "\n".join(
        (
            head,
            f"sent {result.sent}  completed {result.completed}  errors {result.error_count} {result.errors}"
            f"  status {result.status}",
            "latency ms  "
            + "  ".join(f"{k} {v:.3f}" for k, v in lat.items() if k != "mean")
            + f"  mean {lat['mean']:.3f}",
            f"throughput {result.throughput:.1f}/s  connections {result.connections_opened}"
            f"  pool_exhausted {result.pool_exhausted}  max_backlog {result.max_backlog}"
            f"  max_send_lag {result.max_send_lag * 1000:.3f} ms",
        )
    )


def _parse_target(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _parse_header(value: str) -> tuple[str, str]:
    name, sep, val = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {value!r}")
    return name.strip(), val.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=_parse_target, required=True, metavar="HOST:PORT")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: requests per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: workers")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured seconds first")
    parser.add_argument("--path", default="/")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--header", "-H", type=_parse_header, action="append", default=[])
    parser.add_argument("--body", default="", help="request body (UTF-8)")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    host, port = args.target
    headers = dict(args.header)
    body = args.body.encode()

    async def go() -> LoadResult:
        if args.rate is not None:
            return await run_open_loop(
                host,
                port,
                rate=args.rate,
                duration=args.duration,
                path=args.path,
                headers=headers,
                method=args.method,
                body=body,
                max_connections=args.max_connections,
                warmup=0.5 if args.warmup is None else args.warmup,
                timeout=args.timeout,
            )
        return await run_closed_loop(
            host,
            port,
            concurrency=args.concurrency,
            duration=args.duration,
            path=args.path,
            headers=headers,
            method=args.method,
            body=body,
            warmup=0.0 if args.warmup is None else args.warmup,
            timeout=args.timeout,
        )

    result = uvloop.run(go()) if uvloop is not None else asyncio.run(go())
    if args.json:
        print(msgspec.json.encode(result.summary()).decode())
    else:
        print(format_result(result))
    return 0 if result.error_count == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
