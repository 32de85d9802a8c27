"""A response to HEAD ends at its head; whatever the pod sends after it is a protocol violation.

The parser is driven with bytes in both forms (make test runs tests/unit compiled and pure):
compiled, llhttp itself ends the message at its head and pauses; pure, httptools is stopped from
its callback and the head's end is found in the read. Either way the response is delivered whole
(its head, END, no body) and the bytes after it come back in ``BytesAfterHead``, wherever the
reads split the head, with interim responses before it or not; bytes that come in a later read are
parsed as a new response, with an error that says what preceded them.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastproxy.errors import BadGateway, BytesAfterHead, ProxyError
from fastproxy.exchange import END, PARSE_IDLE, ResponseHead, ResponseParser

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
EMPTY_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
SECOND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

# (the pod's bytes up to the end of the answer to HEAD, what it sent after them in the same read)
CASES = {
    "the body its length announces": (HEAD, b"hello"),
    "the body and a second response": (HEAD, b"hello" + SECOND),
    "a second response": (EMPTY_HEAD, SECOND),
    "a chunked body": (CHUNKED_HEAD, b"5\r\nhello\r\n0\r\n\r\n"),
    "garbage": (EMPTY_HEAD, b"\x00garbage\r\n\r\n"),
    "empty lines": (EMPTY_HEAD, b"\r\n\r\n"),
    "one byte": (HEAD, b"h"),
    "after an interim response": (b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD, b"hello"),
    "after empty lines before the response": (b"\r\n\r\n" + HEAD, b"hello"),
}


def splits(head: bytes, tail: bytes) -> list[list[bytes]]:
    """The head whole, cut at every byte, and byte by byte; the tail always in the last read."""
    cuts = [[head[:i], head[i:] + tail] for i in range(1, len(head))]
    return [[head + tail], *cuts, [bytes([b]) for b in head[:-1]] + [head[-1:] + tail]]


def finals(events: list[object]) -> list[ResponseHead]:
    return [e for e in events if type(e) is ResponseHead and e.status >= 200]


@pytest.mark.parametrize(("head", "tail"), CASES.values(), ids=CASES.keys())
def test_bytes_after_an_answer_to_head_come_back_once_it_is_delivered(head: bytes, tail: bytes) -> None:
    for pieces in splits(head, tail):
        events: list[object] = []
        parser = ResponseParser(events)
        parser.expect_no_body()
        for piece in pieces[:-1]:
            parser.feed(piece)
        with pytest.raises(BytesAfterHead) as raised:
            parser.feed(pieces[-1])
        assert raised.value.tail == tail, pieces
        assert isinstance(raised.value, BadGateway)
        assert f"{len(tail)} bytes after a HEAD response" in raised.value.reason
        # The response itself: its head and its end, nothing of what followed.
        (final,) = finals(events)
        assert final.status == 200 and events[-1] is END, pieces
        assert not [e for e in events if type(e) is bytes], pieces
        assert parser.state is PARSE_IDLE and parser.after_head


def test_bytes_in_a_later_read_are_named_as_following_a_head_response() -> None:
    events: list[object] = []
    parser = ResponseParser(events)
    parser.expect_no_body()
    parser.feed(HEAD)  # the read ends with the head: nothing wrong yet
    assert events[-1] is END and parser.state is PARSE_IDLE and parser.after_head
    with pytest.raises(BadGateway, match=r"after a HEAD response"):
        parser.feed(b"hello")
    # A connection's next answer parsed in full clears it.
    events.clear()
    parser = ResponseParser(events)
    parser.expect_no_body()
    parser.feed(HEAD)
    parser.feed(SECOND)
    assert [e.status for e in finals(events)] == [200, 404] and not parser.after_head


@settings(max_examples=300, deadline=None)
@given(
    head=st.sampled_from([HEAD, CHUNKED_HEAD, EMPTY_HEAD]),
    after=st.binary(max_size=80) | st.sampled_from([SECOND, b"hello" + SECOND, b"0\r\n\r\n" + SECOND]),
    cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=4),
)
@example(head=EMPTY_HEAD, after=SECOND + b"HTTP/1.1 204 No Content\r\n\r\n", cuts=[len(EMPTY_HEAD) + 5])
@example(head=HEAD, after=b"hello" + SECOND, cuts=[len(HEAD), len(HEAD) + 5])
def test_whatever_follows_an_answer_to_head_only_a_proxy_error_escapes(
    head: bytes, after: bytes, cuts: list[int]
) -> None:
    """Fed on after the violation (a caller that ignored it), in any reads, the parser raises
    nothing but ProxyError: never a wrapper bug (RuntimeError "parser bug") or an llhttp exception."""
    data = head + after
    bounds = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    events: list[object] = []
    parser = ResponseParser(events)
    parser.expect_no_body()
    delivered = None
    for start, end in itertools.pairwise(bounds):
        with contextlib.suppress(ProxyError):  # anything else fails the test
            parser.feed(data[start:end])
        if delivered is None and END in events:
            delivered = events[: events.index(END) + 1]
    assert delivered is not None
    assert [type(e) for e in delivered] == [ResponseHead, type(END)]
