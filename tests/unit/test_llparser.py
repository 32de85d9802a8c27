"""The compiled form's direct llhttp binding (``LLParser``) parses exactly as httptools does.

Compiled, ``fastproxy.exchange`` drives llhttp itself; the pure form goes through httptools (the
same llhttp). Each message below, valid or not, is fed to a RequestParser / ResponseParser of the
module as imported and to one of the module loaded from its .py, whole, split at every byte, and
one byte at a time: the events (every attribute of every head, every body piece, END) and the
error (its class and message) must be the same. In the pure form both sides are the pure module
and the comparison holds trivially; ``make test`` runs this file compiled first.
"""

from __future__ import annotations

import contextlib

import pytest

from fastproxy import compiled, exchange
from fastproxy.errors import ProxyError
from tests.unit.test_compiled import pure_module

PURE = pure_module("fastproxy.exchange")

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /v1/models?x=1 HTTP/1.1\r\nHost: api.example.com:8080\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
    b"Content-Length: 17\r\nAuthorization: Bearer x\r\nX-Request-Id: r-1\r\n\r\n"
    b'{"model":"m","x"}',
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer-One: 1\r\nTrailer-Two: 2\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
    b"GET http://b.example:81/p?q HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Spaces:   v  \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep: 2\r\n\r\n",
    b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x05hello",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\nX: bare-lf\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /#frag HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi",
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\nokHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
]


def _event(event: object) -> object:
    """An event as plain data: a head as the values of all its attributes."""
    if isinstance(event, bytes):
        return event
    if type(event).__name__ in ("RequestHead", "ResponseHead"):
        return (type(event).__name__, {name: getattr(event, name) for name in type(event).__slots__})
    return repr(event)  # END


def _run(module: object, cls_name: str, pieces: list[bytes], *, eof: bool = False, head: bool = False):
    events: list[object] = []
    parser = getattr(module, cls_name)(events)
    if head:
        parser.expect_no_body()
    outcome: object = None
    try:
        for piece in pieces:
            parser.feed(piece)
        if eof:
            outcome = ("eof", parser.feed_eof())
    except ProxyError as exc:
        outcome = (type(exc).__name__, str(exc))
    except Exception as exc:  # a wrapper bug (RuntimeError) must be the same bug in both forms
        outcome = ("bug", type(exc).__name__, str(exc), repr(exc.__context__))
    state = (parser.state, getattr(parser, "upgraded", None), getattr(parser, "upgraded_tail", None))
    return [_event(e) for e in events], outcome, state


def _splits(data: bytes) -> list[list[bytes]]:
    return [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))] + [[bytes([b]) for b in data]]


@pytest.mark.parametrize("data", REQUESTS, ids=range(len(REQUESTS)))
def test_requests_parse_alike_in_both_forms(data: bytes) -> None:
    for pieces in _splits(data):
        assert _run(exchange, "RequestParser", pieces) == _run(PURE, "RequestParser", pieces), pieces


@pytest.mark.parametrize("data", RESPONSES, ids=range(len(RESPONSES)))
@pytest.mark.parametrize("head", [False, True], ids=["get", "head"])
def test_responses_parse_alike_in_both_forms(data: bytes, head: bool) -> None:
    for pieces in _splits(data):
        ours = _run(exchange, "ResponseParser", pieces, eof=True, head=head)
        assert ours == _run(PURE, "ResponseParser", pieces, eof=True, head=head), pieces


def test_a_field_split_across_reads_keeps_its_whole_name_and_value() -> None:
    """Names are interned from the read they lie in; one cut by a read's end is copied before the
    read's buffer goes away."""
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Long-Field-Name: some-value\r\n\r\n"
    cut = data.index(b"Field")
    events: list[object] = []
    parser = exchange.RequestParser(events)
    parser.feed(bytes(data[:cut]))
    parser.feed(bytes(data[cut:]))
    assert events[0].headers == [(b"x-long-field-name", b"some-value")]  # type: ignore[attr-defined]


def test_the_compiled_form_calls_llhttp_itself() -> None:
    if not compiled.is_compiled(exchange):
        pytest.skip("the pure form uses httptools")
    parser = exchange.RequestParser([])
    assert type(parser._parser).__name__ == "LLParser"  # type: ignore[attr-defined]
    assert type(PURE.RequestParser([])._parser).__module__.startswith("httptools")


def _heads(module: object, cls_name: str, data: bytes) -> list[object]:
    events: list[object] = []
    with contextlib.suppress(ProxyError):
        getattr(module, cls_name)(events).feed(data)
    return [e for e in events if type(e).__name__ == cls_name.replace("Parser", "Head")]


EXTRA = [(b"x-forwarded-for", b"10.1.2.3"), (b"x-request-id", b"r-42"), (b"x-empty", b"")]


@pytest.mark.parametrize("data", REQUESTS, ids=range(len(REQUESTS)))
def test_request_heads_are_rebuilt_alike_in_both_forms(data: bytes) -> None:
    """Compiled, a head is assembled in one allocation; the pure form joins: same bytes."""
    for ours, theirs in zip(
        _heads(exchange, "RequestParser", data), _heads(PURE, "RequestParser", data), strict=True
    ):
        for expect_continue in (False, True):
            for extra in ([], EXTRA):
                built = exchange.build_request_head(ours, extra, expect_continue=expect_continue)
                assert built == PURE.build_request_head(theirs, extra, expect_continue=expect_continue)
                assert built.endswith(b"\r\n\r\n") and built.count(b"\r\n\r\n") == 1


@pytest.mark.parametrize("data", RESPONSES, ids=range(len(RESPONSES)))
def test_response_heads_are_rebuilt_alike_in_both_forms(data: bytes) -> None:
    for ours, theirs in zip(
        _heads(exchange, "ResponseParser", data), _heads(PURE, "ResponseParser", data), strict=True
    ):
        for chunked, close, http10 in [
            (False, False, False),
            (True, False, False),
            (False, True, False),
            (False, False, True),
        ]:
            built = exchange.build_response_head(ours, chunked=chunked, close=close, http10_keep_alive=http10)
            assert built == PURE.build_response_head(
                theirs, chunked=chunked, close=close, http10_keep_alive=http10
            )


def test_a_field_that_is_not_a_pair_of_bytes_is_refused_before_anything_is_copied() -> None:
    events: list[object] = []
    exchange.RequestParser(events).feed(REQUESTS[1])
    head = events[0]
    for bad in (
        [(b"x-a", "str")],
        [("x-a", b"v")],
        [(b"x-a",)],
        [(b"x-a", b"v", b"w")],
        [None],
        [(b"x-a", None)],
    ):
        with pytest.raises(TypeError):
            exchange.build_request_head(head, bad)  # type: ignore[arg-type]
