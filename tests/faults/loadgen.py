"""The fault suite's load generator: fixed concurrency and duration, every outcome recorded.

Theory of operation
-------------------
``LoadGenerator`` runs ``concurrency`` closed-loop clients for ``duration`` seconds against one or
more router ports (client ``i`` uses port ``i % len(ports)``). Each client keeps a keep-alive
connection and sends requests drawn in turn from ``mix``; every request carries a unique
``x-request-id`` (``<run>-<client>-<n>``), so the pods' records of executed ids can be joined with
what the clients saw.

Responses are read with their own framing (Content-Length, chunked, or close-delimited) by a small
reader of our own (not an HTTP client library, which would hide a short body or retry silently).
Every request ends in exactly one ``Outcome`` kind:

- ``ok``                      2xx, framing complete, body equal to the expected body, id echoed
- ``"<status>"``              an explicit error status (``"502"``, ``"503"``, ``"504"``, ...)
- ``refused``                 the router refused the connection (it is not listening)
- ``reset``                   the connection was reset (before or during the response)
- ``eof``                     the connection closed before a complete response head
- ``cut``                     the head came, the body ended short of its framing: visibly aborted
- ``truncated_as_complete``   framing complete but the body is not the expected one (a violation)
- ``wrong_id``                the response echoes another request's id (a violation)
- ``timeout``                 no complete answer within ``request_timeout`` (a violation: a client
                              must get an answer, an error or an aborted connection)

``VIOLATION_KINDS`` are the kinds no fault may ever produce; the rest are errors the table counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastproxy.devtools.upstream import payload

VIOLATION_KINDS = frozenset(("truncated_as_complete", "wrong_id", "timeout"))
_runs = itertools.count(1)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One kind of request in the mix, and the body a correct 2xx answer must carry."""

    method: str
    path: str
    body: bytes = b""
    expected: bytes = b""


def get_size(n: int) -> RequestSpec:
    return RequestSpec("GET", f"/size/{n}", expected=payload(n))


def get_chunked(n: int, k: int) -> RequestSpec:
    return RequestSpec("GET", f"/chunked/{n}/{k}", expected=payload(n))


def get_delay(ms: int) -> RequestSpec:
    return RequestSpec("GET", f"/delay/{ms}", expected=b"ok")


def post_echo(n: int) -> RequestSpec:
    body = payload(n, offset=7)
    return RequestSpec("POST", "/echo", body=body, expected=body)


def get_sse(events: int, ms: int) -> RequestSpec:
    return RequestSpec(
        "GET", f"/sse/{events}/{ms}", expected=b"".join(b"data: %d\n\n" % i for i in range(events))
    )


DEFAULT_MIX = (get_size(2000), get_delay(20), post_echo(3000), get_chunked(20_000, 4), get_delay(5))


@dataclass(slots=True)
class Outcome:
    rid: str
    spec: RequestSpec
    kind: str
    status: int = 0
    started: float = 0.0
    ended: float = 0.0


class _Cut(Exception):
    """The response body ended before its framing said it would."""


@dataclass(slots=True)
class LoadGenerator:
    ports: Sequence[int]
    concurrency: int
    duration: float
    mix: Sequence[RequestSpec] = DEFAULT_MIX
    request_timeout: float = 15.0
    think: float = 0.0  # seconds a client waits between its requests (keep-alive stays open)
    think_cycle: Sequence[float] = ()  # or these pauses in turn (overrides ``think``)
    host: str = "chat.example"
    outcomes: list[Outcome] = field(default_factory=list)
    run_id: str = ""
    stopping: bool = False
    # Called with each finished outcome (scenarios use it to trigger a fault at the right moment).
    on_outcome: Callable[[Outcome], None] | None = None
    _writers: dict[int, asyncio.StreamWriter | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_id = self.run_id or f"r{next(_runs)}-{int(time.time() * 1000) % 10**8}"

    async def run(self) -> list[Outcome]:
        deadline = asyncio.get_running_loop().time() + self.duration
        await asyncio.gather(*(self._client(i, deadline) for i in range(self.concurrency)))
        return self.outcomes

    def stop(self) -> None:
        self.stopping = True

    # -- results ---------------------------------------------------------------------------------

    def kinds(self) -> Counter[str]:
        return Counter(o.kind for o in self.outcomes)

    def errors(self) -> dict[str, int]:
        return {k: n for k, n in self.kinds().items() if k != "ok"}

    def violations(self) -> list[str]:
        return [
            f"{o.kind}: {o.spec.method} {o.spec.path} id={o.rid}"
            for o in self.outcomes
            if o.kind in VIOLATION_KINDS
        ]

    def ids(self, kind: str | None = None) -> set[str]:
        return {o.rid for o in self.outcomes if kind is None or o.kind == kind}

    # -- one client ------------------------------------------------------------------------------

    async def _client(self, index: int, deadline: float) -> None:
        self._writers[index] = None
        try:
            await self._client_loop(index, deadline)
        finally:
            # Also on cancellation: the client leaving is a fault some scenarios inject on purpose.
            writer = self._writers.pop(index)
            if writer is not None:
                writer.transport.abort()

    async def _client_loop(self, index: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        port = self.ports[index % len(self.ports)]
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        for n in itertools.count():
            if self.stopping or loop.time() >= deadline:
                break
            spec = self.mix[(index + n) % len(self.mix)]
            outcome = Outcome(f"{self.run_id}-{index}-{n}", spec, "timeout", started=time.monotonic())
            keep = False
            try:
                async with asyncio.timeout(self.request_timeout):
                    if writer is None:
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        self._writers[index] = writer
                    assert reader is not None
                    keep = await self._exchange(reader, writer, outcome)
            except TimeoutError:
                outcome.kind = "timeout"
            except ConnectionRefusedError:
                outcome.kind = "refused"
            except ConnectionResetError:
                outcome.kind = "reset"
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                outcome.kind = outcome.kind if outcome.kind == "cut" else "eof"
            except _Cut:
                outcome.kind = "cut"
            outcome.ended = time.monotonic()
            self.outcomes.append(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            if not keep and writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                reader = writer = self._writers[index] = None
            pause = self.think_cycle[n % len(self.think_cycle)] if self.think_cycle else self.think
            if pause:
                # The client's pace, part of the scenario (never past the end of the run). A pause
                # that reaches the end ends the client: the loop's timers may fire a little early,
                # and a request started "at" the deadline would be one more than the run allows.
                remaining = deadline - loop.time()
                if pause >= remaining:
                    await asyncio.sleep(max(0.0, remaining))
                    break
                await asyncio.sleep(pause)
            elif outcome.kind in ("refused", "reset", "eof") and loop.time() < deadline:
                await asyncio.sleep(0.01)  # a refused/closed router: do not spin on reconnects
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._writers[index] = None

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, outcome: Outcome
    ) -> bool:
        """One request and its response; returns whether the connection can be reused."""
        spec = outcome.spec
        head = (
            f"{spec.method} {spec.path} HTTP/1.1\r\nHost: {self.host}\r\nx-request-id: {outcome.rid}\r\n"
            f"content-length: {len(spec.body)}\r\n\r\n"
        ).encode()
        writer.write(head + spec.body)
        outcome.kind = "eof"  # until a full head arrives
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = outcome.status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        outcome.kind = "cut"  # until the body is complete by its framing
        close = "close" in headers.get("connection", "").lower()
        if status in (204, 304) or spec.method == "HEAD":
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            try:
                body = await reader.readexactly(int(headers["content-length"]))
            except asyncio.IncompleteReadError:
                raise _Cut from None
        else:
            body = await reader.read(-1)  # close-delimited: only the content can tell
            close = True
        rid = headers.get("x-request-id")
        if rid is not None and rid != outcome.rid:
            outcome.kind = "wrong_id"
        elif 200 <= status < 300:
            outcome.kind = "ok" if body == spec.expected and rid == outcome.rid else "truncated_as_complete"
        else:
            outcome.kind = str(status)
        return not close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise _Cut
    except (asyncio.IncompleteReadError, ValueError):
        raise _Cut from None
