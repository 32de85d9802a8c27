"""The parsers' shortcuts give what llhttp would: the version read off the request line, the field
names classified through their cache, the status line cached per status.

Each shortcut has a slow path (ask llhttp, lower-case and look up, format); these tests feed the
cases where the shortcut must not apply, or where a wrong one would show, in both forms (make
test runs tests/unit compiled and pure).
"""

from __future__ import annotations

import pytest

from fastproxy.errors import BadRequest, ProxyError
from fastproxy.exchange import (
    END,
    PARSE_BODY,
    PARSE_HEAD,
    PARSE_IDLE,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    build_response_head,
)


def heads(events: list[object]) -> list[RequestHead]:
    return [e for e in events if type(e) is RequestHead]


@pytest.mark.parametrize(
    ("raw", "version", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"1.1", True),
        (b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", b"1.0", False),
        # leading empty lines shift the line: the offset misses and llhttp is asked
        (b"\r\nGET / HTTP/1.0\r\nHost: a\r\n\r\n", b"1.0", False),
        (b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", b"1.1", True),
        # a target that itself ends like a version must not be read as one
        (b"GET /HTTP/1.1 HTTP/1.0\r\nHost: a\r\n\r\n", b"1.0", False),
        (b"GET /?v=HTTP/1.1\r HTTP/1.0\r\nHost: a\r\n\r\n", None, False),
        # a higher minor version is answered as 1.1 (RFC 9110 section 2.5)
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", b"1.1", True),
    ],
)
def test_the_request_version_is_the_one_on_the_line(
    raw: bytes, version: bytes | None, keep_alive: bool
) -> None:
    events: list[object] = []
    parser = RequestParser(events)
    if version is None:  # a CR inside the line: llhttp refuses it before any version is read
        with pytest.raises(BadRequest):
            parser.feed(raw)
        return
    parser.feed(raw)
    (head,) = heads(events)
    assert (head.version, head.keep_alive) == (version, keep_alive)
    assert events[-1] is END and parser.state is PARSE_IDLE


def test_version_of_a_request_line_split_across_reads_and_of_a_pipelined_one() -> None:
    events: list[object] = []
    parser = RequestParser(events)
    parser.feed(b"GET / HT")
    assert parser.state is PARSE_HEAD
    parser.feed(
        b"TP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
    )
    assert [(h.target, h.version) for h in heads(events)] == [
        (b"/", b"1.0"),
        (b"/b", b"1.1"),
        (b"/c", b"1.0"),
    ]
    events.clear()
    # the second request of a read is not at its start: the first one's offsets say nothing of it
    parser.feed(b"GET /d HTTP/1.1\r\nHost: a\r\n\r\nGET /e HTTP/1.0\r\nHost: a\r\n\r\n")
    assert [(h.target, h.version) for h in heads(events)] == [(b"/d", b"1.1"), (b"/e", b"1.0")]


def test_field_names_are_lower_cased_and_classified_whatever_their_case() -> None:
    events: list[object] = []
    parser = RequestParser(events)
    for spelling in (b"Content-Length", b"CONTENT-LENGTH", b"content-length", b"cOnTeNt-LeNgTh"):
        parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nX-Mixed-Case: 1\r\n" + spelling + b": 2\r\n\r\nok")
        head = heads(events)[-1]
        assert head.content_length == 2 and events[-2:] == [b"ok", END]
        assert head.headers == [(b"x-mixed-case", b"1")]  # framing re-derived, never copied
    events.clear()
    parser.feed(b"GET / HTTP/1.1\r\nHOST: a\r\n\r\n")
    assert heads(events)[-1].host == "a"
    with pytest.raises(BadRequest, match="more than one Host"):
        parser.feed(b"GET / HTTP/1.1\r\nHOST: a\r\nhost: a\r\n\r\n")


def test_names_past_the_cache_bound_are_still_classified() -> None:
    """A client inventing names fills the cache; names new after that take the slow path."""
    events: list[object] = []
    parser = RequestParser(events)
    for batch in range(30):  # 30 x 90 new names: beyond the cache's bound
        fields = b"".join(b"X-Invented-%d-%d: v\r\n" % (batch, i) for i in range(90))
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
        assert len(heads(events)[-1].headers) == 90
        events.clear()
    # never seen before, so not cached: each still lower-cased and classified
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nConTent-LengtH: 3\r\nX-Fresh-Name: v\r\n\r\nabc")
    head = heads(events)[-1]
    assert (
        head.content_length == 3
        and head.headers == [(b"x-fresh-name", b"v")]
        and events[-2:] == [b"abc", END]
    )
    events.clear()
    with pytest.raises(ProxyError):
        parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-ENCODING: gzip, chunked\r\n\r\n")


@pytest.mark.parametrize(
    ("raw", "version"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", b"1.1"),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", b"1.0"),
    ],
)
def test_the_response_version_is_the_one_on_the_status_line(raw: bytes, version: bytes) -> None:
    for pieces in ([raw], [raw[:5], raw[5:]]):  # whole, and split inside the version
        events: list[object] = []
        parser = ResponseParser(events)
        for piece in pieces:
            parser.feed(piece)
        (head,) = [e for e in events if type(e) is ResponseHead]
        assert head.version == version and events[-1] is END and parser.state is PARSE_IDLE


def test_an_interim_response_and_its_final_one_in_one_read() -> None:
    events: list[object] = []
    parser = ResponseParser(events)
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi")
    interim, final = [e for e in events if type(e) is ResponseHead]
    assert (interim.status, interim.version) == (100, b"1.1")
    assert (final.status, final.version) == (200, b"1.0") and events[-2:] == [b"hi", END]
    assert parser.state is PARSE_IDLE


def test_a_partial_response_leaves_the_parser_in_its_body() -> None:
    events: list[object] = []
    parser = ResponseParser(events)
    parser.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
    assert parser.state is PARSE_BODY and events[-1] == b"ab"


def test_the_status_line_follows_the_reason_the_pod_gave() -> None:
    lines = []
    for reason in (b"OK", b"OK", b"Fine", b"", b"OK"):
        head = ResponseHead()
        head.status, head.reason, head.content_length = 200, reason, 0
        lines.append(build_response_head(head, chunked=False, close=False).split(b"\r\n", 1)[0])
    assert lines == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 Fine",
        b"HTTP/1.1 200 Status",
        b"HTTP/1.1 200 OK",
    ]


def test_content_lengths_beyond_a_c_integer_are_rebuilt_exactly() -> None:
    """llhttp takes lengths up to 2**64 - 1; the compiled form formats small ones in C."""
    for length in (0, 7, 2**63 - 1, 2**63, 2**64 - 1):
        events: list[object] = []
        ResponseParser(events).feed(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % length)
        head = events[0]
        assert type(head) is ResponseHead and head.content_length == length
        assert b"\r\ncontent-length: %d\r\n" % length in build_response_head(head, chunked=False, close=False)
