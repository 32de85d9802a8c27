"""The router's per-request Python cost, without the kernel: parsing, rebuilding, one full exchange.

Theory of operation
-------------------
The end-to-end benchmark (bench/e2e.py) measures what a user sees, but on this shared 2-vCPU VM its
figures move by 20% from run to run, and half of the router's CPU there is the kernel's. These
suites time only what our Python does per request, so an optimisation of the hot path shows up
as a clear, repeatable difference:

- ``parse``: ``RequestParser.feed`` of a realistic inference request (an OpenAI-style chat
  completion: 10 header fields, a 1 KB JSON body) and ``ResponseParser.feed`` of its answer.
- ``rebuild``: ``build_request_head`` / ``build_response_head`` from the parsed forms.
- ``exchange``: one whole request through the real ``ClientConnection``, ``Exchange``,
  ``SlotTable`` pick, ``UpstreamPool`` checkout and ``UpstreamConnection`` of a real ``Router``,
  with in-memory transports standing in for the two sockets: the client's bytes are fed to
  ``data_received``, the rebuilt request is what the pod transport received, the pod's answer is
  fed back, and the client transport receives the response. This is the router's user-space
  cost per request minus the event loop's own (epoll, read/write syscalls).

Every benchmark first checks the result is right (the pod got the rebuilt request, the client
the complete response, the slot was given back), then times it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop

from fastproxy.config import RouterConfig
from fastproxy.exchange import (
    RequestParser,
    ResponseParser,
    build_request_head,
    build_response_head,
)
from fastproxy.proxy import ClientConnection, UpstreamConnection, flush_queued_writes
from fastproxy.router import Router
from fastproxy.snapshot import RoutingSnapshot
from statesync.schema import PodRecord, PodState, Route, WeightedRevision

BODY = (
    b'{"model":"llama-3.1-8b-instruct","stream":false,"max_tokens":256,"temperature":0.7,'
    b'"messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"' + b"Summarise the following text. " * 28 + b'"}]}'
)
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    b"Host: chat.inference.example.com\r\n"
    b"User-Agent: openai-python/1.54.3\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Content-Type: application/json\r\n"
    b"Authorization: Bearer sk-0123456789abcdef0123456789abcdef\r\n"
    b"X-Stainless-Lang: python\r\n"
    b"X-Stainless-Retry-Count: 0\r\n"
    b"Connection: keep-alive\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY
RESPONSE_BODY = (
    b'{"id":"chatcmpl-123","object":"chat.completion","created":1764000000,"model":"llama-3.1-8b-instruct",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"A short summary."},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":212,"completion_tokens":5,"total_tokens":217}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"date: Wed, 25 Nov 2026 20:00:00 GMT\r\n"
    b"server: uvicorn\r\n"
    b"content-type: application/json\r\n"
    b"x-request-id: r-1\r\n"
    b"content-length: %d\r\n\r\n" % len(RESPONSE_BODY)
) + RESPONSE_BODY


class MemoryTransport:
    """Collects what the protocol writes; the one piece standing in for a socket.

    The router binds a transport's ``write``, ``writelines`` and ``is_closing`` once per
    connection and calls them per message: here they are C callables bound per instance (the
    list's own append / extend, the length of a list ``close`` fills), so the rig's counts hold
    the router's work and not the harness's own Python frames, as uvloop's C transport would."""

    __slots__ = ("_closes", "is_closing", "peer", "write", "writelines", "written")

    def __init__(self, peer: tuple[str, int]) -> None:
        self.written: list[bytes] = []
        self.write = self.written.append
        self.writelines = self.written.extend
        self._closes: list[bool] = []
        self.is_closing = self._closes.__len__  # 0 until closed: falsy, as is_closing() -> False
        self.peer = peer

    @property
    def closed(self) -> bool:
        return bool(self._closes)

    def close(self) -> None:
        if not self._closes:
            self._closes.append(True)

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def take(self) -> bytes:
        data = b"".join(self.written)
        self.written.clear()
        return data


@pytest.mark.benchmark(group="parse")
def bench_parse_request(benchmark) -> None:
    events: list[object] = []
    parser = RequestParser(events)
    parser.feed(REQUEST)
    head = events[0]
    assert head.method == b"POST" and head.content_length == len(BODY) and events[1] == BODY  # type: ignore[attr-defined]

    def parse() -> None:
        parser.feed(REQUEST)
        events.clear()

    benchmark(parse)


@pytest.mark.benchmark(group="parse")
def bench_parse_response(benchmark) -> None:
    events: list[object] = []
    parser = ResponseParser(events)
    parser.feed(RESPONSE)
    assert events[0].status == 200 and events[1] == RESPONSE_BODY  # type: ignore[attr-defined]

    def parse() -> None:
        parser.feed(RESPONSE)
        events.clear()

    benchmark(parse)


@pytest.mark.benchmark(group="rebuild")
def bench_build_request_head(benchmark) -> None:
    events: list[object] = []
    RequestParser(events).feed(REQUEST)
    head = events[0]
    extra = [(b"x-forwarded-for", b"10.1.2.3"), (b"x-forwarded-proto", b"http")]
    data = build_request_head(head, extra)  # type: ignore[arg-type]
    assert data.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: chat.inference.example.com\r\n")
    assert b"connection" not in data and b"content-length: %d\r\n" % len(BODY) in data
    benchmark(build_request_head, head, extra)


@pytest.mark.benchmark(group="rebuild")
def bench_build_response_head(benchmark) -> None:
    events: list[object] = []
    ResponseParser(events).feed(RESPONSE)
    head = events[0]
    data = build_response_head(head, chunked=False, close=False)  # type: ignore[arg-type]
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: %d\r\n" % len(RESPONSE_BODY) in data
    benchmark(build_response_head, head, chunked=False, close=False)


class InMemoryExchange:
    """A real router with one pod, whose two sockets are ``MemoryTransport``s."""

    def __init__(self, loop: asyncio.AbstractEventLoop, route: Route | None = None) -> None:
        pod = PodRecord(
            uid="pod-a", namespace="ml", revision="chat-v1", ip="127.0.0.2", port=8000,
            concurrency=1, state=PodState.READY, generation=1, ready=True,
        )  # fmt: skip
        if route is None:
            route = Route(
                service="chat",
                hosts=("chat.inference.example.com",),
                revisions=(WeightedRevision(revision="chat-v1", weight=100),),
            )
        self.router = Router(RouterConfig(), loop)
        self.router.install(RoutingSnapshot.build(1, 1, [pod], [route]))
        self.upstream = UpstreamConnection(self.router.pool, pod.uid, pod.concurrency)
        self.pod_side = MemoryTransport(("127.0.0.2", 8000))
        self.upstream.connection_made(self.pod_side)  # type: ignore[arg-type]
        self.router.pool.checkin(self.upstream)
        self.client = ClientConnection(self.router)
        self.client_side = MemoryTransport(("10.1.2.3", 40000))
        self.client.connection_made(self.client_side)  # type: ignore[arg-type]

    def respond(self, data: bytes) -> None:
        """The pod's bytes arrive, then what the loop does once it has handled its poll's sockets:
        the responses queued for the clients are written (fastproxy.proxy.flush_queued_writes).
        (Each exchange here is a poll of its own: the write queue's call_soon is counted in full.)"""
        self.upstream.data_received(data)
        flush_queued_writes(self.router)

    def one(self) -> None:
        self.client.data_received(REQUEST)
        self.respond(RESPONSE)
        self.pod_side.written.clear()
        self.client_side.written.clear()


@pytest.mark.benchmark(group="exchange")
def bench_exchange_in_memory(benchmark) -> None:
    loop = uvloop.new_event_loop()  # as in the router: its clock and handles are C
    try:
        rig = InMemoryExchange(loop)
        rig.client.data_received(REQUEST)
        sent = rig.pod_side.take()
        assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: chat.inference.example.com\r\n")
        assert sent.endswith(BODY) and b"x-forwarded-for: 10.1.2.3\r\n" in sent
        assert rig.router.slots.pods["pod-a"].inflight == 1
        rig.respond(RESPONSE)
        answer = rig.client_side.take()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(RESPONSE_BODY)
        assert rig.router.slots.pods["pod-a"].inflight == 0 and rig.client.exchange is None
        assert rig.router.pool.idle_count == 1  # the pod connection went back to the pool
        benchmark(rig.one)
        assert rig.router.stats.responses[200] >= 2 and not rig.client_side.closed
    finally:
        loop.close()
