"""One transport write per message where head and body arrive together, on both sides.

The router with one pod on in-memory transports (bench_exchange.InMemoryExchange), whose calls to
``write``/``writelines`` are counted: a socket write is a syscall, and a request or response
split over two is a syscall more per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from bench.bench_exchange import BODY, REQUEST, RESPONSE, RESPONSE_BODY, InMemoryExchange, MemoryTransport


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
        rig.upstream.data_received(RESPONSE)
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
    rig.upstream.data_received(RESPONSE)
    assert client_side.take().endswith(RESPONSE_BODY) and rig.client.exchange is None
    assert rig.client.pending_body is None
