"""One transport write per message where head and body arrive together, on both sides.

The router with one pod on in-memory transports (bench_exchange.InMemoryExchange), whose calls to
``write``/``writelines`` are counted: a socket write is a syscall, and a request or response
split over two is a syscall more per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from bench.bench_exchange import BODY, REQUEST, RESPONSE, RESPONSE_BODY, InMemoryExchange, MemoryTransport
from fastproxy.proxy import flush_queued_writes


class CountingTransport(MemoryTransport):
    __slots__ = ("calls",)

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__(peer)
        self.calls = 0
        write, writelines = self.write, self.writelines  # the base's bound C callables

        def counted_write(data: bytes) -> None:
            self.calls += 1
            write(data)

        def counted_writelines(data: list[bytes]) -> None:
            self.calls += 1
            writelines(data)

        self.write = counted_write  # type: ignore[assignment]
        self.writelines = counted_writelines  # type: ignore[assignment]

    def can_write_eof(self) -> bool:
        return False  # a rejected client is then closed at once (ClientConnection._linger)


@pytest.fixture
def rig() -> Iterator[tuple[InMemoryExchange, CountingTransport, CountingTransport]]:
    loop = uvloop.new_event_loop()
    try:
        rig = InMemoryExchange(loop)
        pod_side, client_side = CountingTransport(("127.0.0.2", 8000)), CountingTransport(("10.1.2.3", 40000))
        rig.upstream.connection_made(pod_side)  # type: ignore[arg-type]
        rig.client.connection_made(client_side)  # type: ignore[arg-type]
        yield rig, pod_side, client_side
    finally:
        loop.close()


def test_a_whole_request_and_a_whole_response_are_one_write_each(rig: Any) -> None:
    rig, pod_side, client_side = rig
    for _ in range(3):  # the first on a fresh pooled connection, then reused ones
        rig.client.data_received(REQUEST)
        sent = pod_side.take()
        assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and sent.endswith(
            b"\r\n\r\n" + BODY
        )
        assert pod_side.calls == 1
        rig.respond(RESPONSE)
        answer = client_side.take()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(RESPONSE_BODY)
        assert client_side.calls == 1
        pod_side.calls = client_side.calls = 0
    assert rig.router.slots.pods["pod-a"].inflight == 0 and rig.router.pool.idle_count == 1


def test_a_body_in_a_later_read_follows_the_head(rig: Any) -> None:
    rig, pod_side, client_side = rig
    split = REQUEST.index(b"\r\n\r\n") + 4 + 10
    rig.client.data_received(REQUEST[:split])
    assert pod_side.calls == 1  # the head with the body's first bytes: the pod is ready
    assert pod_side.written[-1] == BODY[:10]
    rig.client.data_received(REQUEST[split:])
    assert pod_side.calls == 2 and pod_side.take().endswith(b"\r\n\r\n" + BODY)
    rig.respond(RESPONSE)
    assert client_side.take().endswith(RESPONSE_BODY) and rig.client.exchange is None
    assert rig.client.pending_body is None


def test_a_response_is_written_when_the_loop_has_handled_its_poll(rig: Any) -> None:
    """Responses are queued while the loop handles the sockets one poll reported, then written
    back to back (flush_queued_writes, run by the loop before it polls again): a client process
    asleep is woken once for them, not once per response with our own work in between."""
    rig, pod_side, client_side = rig
    rig.client.data_received(REQUEST)
    pod_side.take()
    rig.upstream.data_received(RESPONSE)
    assert client_side.calls == 0 and rig.router.write_queue == [rig.client]  # queued, not written
    assert rig.client.exchange is None and rig.router.slots.pods["pod-a"].inflight == 0  # all else done
    flush_queued_writes(rig.router)
    assert client_side.calls == 1 and client_side.take().endswith(RESPONSE_BODY)
    assert rig.router.write_queue == [] and not rig.client.flush_queued


def test_a_queued_response_goes_out_before_an_error_written_directly(rig: Any) -> None:
    """A response still queued when the same client's next bytes break the protocol: the 400 is
    written at once, so the queued response is flushed first: the client reads them in order."""
    rig, pod_side, client_side = rig
    rig.client.data_received(REQUEST)
    pod_side.take()
    rig.upstream.data_received(RESPONSE)
    rig.client.data_received(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")  # not a method llhttp knows
    answer = client_side.take()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    first_end = answer.index(RESPONSE_BODY) + len(RESPONSE_BODY)
    assert answer[first_end:].startswith(b"HTTP/1.1 400 ")
    flush_queued_writes(rig.router)  # the loop's turn: nothing is written twice
    assert client_side.take() == b""


async def test_the_loop_writes_what_was_queued_without_being_asked() -> None:
    """On a running loop nothing calls flush_queued_writes by hand: the first queued response
    scheduled it (call_soon)."""
    rig = InMemoryExchange(asyncio.get_running_loop())
    rig.client.data_received(REQUEST)
    rig.pod_side.take()
    rig.upstream.data_received(RESPONSE)
    assert rig.client_side.take() == b""
    await asyncio.sleep(0)
    assert rig.client_side.take().endswith(RESPONSE_BODY)
