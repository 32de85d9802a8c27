"""Sans-IO HTTP/1.1 for an intermediary: parse strictly, rebuild, never forward raw bytes.

Theory of operation
-------------------
``RequestParser`` and ``ResponseParser`` wrap llhttp and are driven with bytes (compiled, they
call llhttp itself, vendored in ``fastproxy/vendor/llhttp``, through ``LLParser``; the pure form
goes through httptools, which carries the same llhttp):
``feed(data)`` appends events to the caller's list: a head (``RequestHead`` / ``ResponseHead``),
body pieces (``bytes``), and ``END`` at the end of each message. They do no I/O and know no clock,
so tests drive them byte by byte.

llhttp enforces framing (CL+TE, duplicate or malformed Content-Length, bare CR/LF, obs-fold,
chunk syntax) but not what an intermediary must also refuse (see the project notes): non-final or
unknown transfer codings, chunked on HTTP/1.0, HTTP/0.9 and HTTP/2 request lines, CONNECT and
every Upgrade but a WebSocket handshake (a smuggled request hides behind h2c), missing/duplicate/
invalid Host, oversized URL, header section and header count, unbounded chunk extensions and
trailers. Those checks live here, each raising the ``ProxyError`` whose status says what went wrong.

The one upgrade passed on is RFC 6455's opening handshake: an HTTP/1.1 GET without a body carrying
``Connection: upgrade`` and ``Upgrade: websocket`` (``_analyse_upgrade``). Its head is marked
``upgrade`` and ``keep_alive = False`` (whatever the pod answers, no further HTTP request is read on
that connection), keeps both fields for the pod, and the parser stops parsing: bytes after the
head are handed on raw (``_Upgraded``), for the tunnel to relay once the pod has answered ``101``.
A ``ResponseParser`` that meets a ``101`` upgrade likewise records it and the bytes after the head
(``upgraded``, ``upgraded_tail``); whether it was asked for is the exchange's to decide.

A response to HEAD ends at its head (``expect_no_body``), and ``ResponseParser`` stops there: what
follows in the same read is handed back in ``BytesAfterHead``, after the response's events (see
``ResponseParser``; the connection code delivers the response and drops the connection).

The parse side of a message moves through one table, ``PARSE_TRANSITIONS``: a message begins,
its head completes, its body ends. Any other order is a bug in the parser wrapper and raises.

Heads are rebuilt from the parsed form by ``build_request_head`` / ``build_response_head``:
hop-by-hop headers and those named in Connection are dropped, framing is re-derived
(Content-Length when known, otherwise chunked re-framing by ``chunk``), and forwarding headers are
set by the caller's trust policy.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Final

import httptools
import msgspec

try:  # the compiled form's helpers (Cython is only needed to build it)
    import cython
except ImportError:  # pragma: no cover - the pure form without Cython installed
    cython = None

from fastproxy.errors import (
    BadGateway,
    BadRequest,
    BytesAfterHead,
    ExpectationFailed,
    HeadersTooLarge,
    MethodNotAllowed,
    NotImplementedCoding,
    PayloadTooLarge,
    ProxyError,
    URITooLong,
    VersionNotSupported,
)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_body_bytes: int = 64 * 1024 * 1024
    # Chunk framing (sizes, extensions, trailers) may cost at most this much plus 8 bytes per body
    # byte: llhttp swallows chunk extensions silently, so this is the only bound on them.
    max_chunk_overhead_bytes: int = 16 * 1024


DEFAULT_LIMITS: Final = Limits()


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Final = _End()


class Parse(enum.IntEnum):  # IntEnum: hashed in C on the hot path (Enum hashes in Python)
    IDLE = 0  # between messages
    HEAD = 1  # request line / status line and headers arriving
    BODY = 2  # body (possibly empty) arriving


class ParseEvent(enum.IntEnum):
    BEGIN = 0
    HEAD_DONE = 1
    MESSAGE_DONE = 2


PARSE_TRANSITIONS: Final[dict[tuple[Parse, ParseEvent], Parse]] = {
    (Parse.IDLE, ParseEvent.BEGIN): Parse.HEAD,
    (Parse.HEAD, ParseEvent.HEAD_DONE): Parse.BODY,
    (Parse.BODY, ParseEvent.MESSAGE_DONE): Parse.IDLE,
}

# The states as module constants: ``Parse.IDLE`` is an attribute lookup through EnumType's
# __getattr__ (~900 instructions, several per message); these are one C global each once compiled.
PARSE_IDLE: Final = Parse.IDLE
PARSE_HEAD: Final = Parse.HEAD
PARSE_BODY: Final = Parse.BODY


def _transition(event: ParseEvent) -> tuple[Parse, Parse]:
    """The one (from, to) pair of ``event`` in the table."""
    (pair,) = [(start, to) for (start, ev), to in PARSE_TRANSITIONS.items() if ev is event]
    return pair


# Each event's legal move, read off the table: a callback compares the state with the first (one
# pointer compare) instead of building and hashing a tuple key per event.
_BEGIN_FROM, _BEGIN_TO = _transition(ParseEvent.BEGIN)
_HEAD_DONE_FROM, _HEAD_DONE_TO = _transition(ParseEvent.HEAD_DONE)
_MESSAGE_DONE_FROM, _MESSAGE_DONE_TO = _transition(ParseEvent.MESSAGE_DONE)

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)


# Header fields the router reads or drops instead of forwarding them as they are. Plain ints, as
# ``proxy.Stage``: compared per field on the hot path, where an enum member lookup costs more than
# the dict lookup that found the kind.
(
    _FIELD_HOST,
    _FIELD_TRANSFER_ENCODING,
    _FIELD_CONNECTION,
    _FIELD_CONTENT_LENGTH,
    _FIELD_EXPECT,
    _FIELD_FORWARDING,  # X-Forwarded-For/-Proto, Forwarded: kept only from a trusted hop
    _FIELD_REQUEST_ID,
    _FIELD_HOP_BY_HOP,
    _FIELD_UPGRADE,  # hop-by-hop, but read: a WebSocket handshake is forwarded (_analyse_upgrade)
) = range(1, 10)

_REQUEST_SPECIAL: Final[dict[bytes, int]] = {
    **dict.fromkeys(HOP_BY_HOP, _FIELD_HOP_BY_HOP),
    b"host": _FIELD_HOST,
    b"transfer-encoding": _FIELD_TRANSFER_ENCODING,
    b"connection": _FIELD_CONNECTION,
    b"content-length": _FIELD_CONTENT_LENGTH,
    b"expect": _FIELD_EXPECT,
    # Client-address and original-host claims: only a trusted hop may make them (Router.forwarding_headers).
    b"x-forwarded-for": _FIELD_FORWARDING,
    b"x-forwarded-proto": _FIELD_FORWARDING,
    b"x-forwarded-host": _FIELD_FORWARDING,
    b"x-forwarded-port": _FIELD_FORWARDING,
    b"x-forwarded-prefix": _FIELD_FORWARDING,
    b"x-real-ip": _FIELD_FORWARDING,
    b"x-client-ip": _FIELD_FORWARDING,
    b"true-client-ip": _FIELD_FORWARDING,
    b"forwarded": _FIELD_FORWARDING,
    b"x-request-id": _FIELD_REQUEST_ID,
    b"upgrade": _FIELD_UPGRADE,
}

# Connection options that name no forwarded field (hop-by-hop ones are dropped anyway).
_CONNECTION_OPTIONS: Final = HOP_BY_HOP | {b"close"}
# Connection values as clients and apps commonly send them, which name no field: skip the split.
_PLAIN_CONNECTION: Final = frozenset(
    {b"keep-alive", b"Keep-Alive", b"close", b"Close", b"keep-alive, close", b"Keep-Alive, Close"}
)

_RESPONSE_SPECIAL: Final[dict[bytes, int]] = {
    **dict.fromkeys(HOP_BY_HOP, _FIELD_HOP_BY_HOP),
    b"transfer-encoding": _FIELD_TRANSFER_ENCODING,
    b"connection": _FIELD_CONNECTION,
    b"content-length": _FIELD_CONTENT_LENGTH,
    b"upgrade": _FIELD_UPGRADE,
}

# A field name as it arrived -> (its lower-case form, its kind in a request, in a response; 0:
# forwarded as it is). Clients and apps send the same few dozen names in the same case every time:
# one dict lookup per field then does what lower() and two lookups would. Names are added until
# the cache is full (a client inventing names cannot grow it); the rest are classified each time.
_FIELD_NAMES: Final[dict[bytes, tuple[bytes, int, int]]] = {}
_FIELD_NAMES_MAX: Final = 2048


def _field_name(raw_name: bytes) -> tuple[bytes, int, int]:
    name = raw_name.lower()
    entry = (name, _REQUEST_SPECIAL.get(name, 0), _RESPONSE_SPECIAL.get(name, 0))
    if len(_FIELD_NAMES) < _FIELD_NAMES_MAX:
        _FIELD_NAMES[raw_name] = entry
    return entry


def _field_entry(raw_name: bytes) -> tuple[bytes, int, int]:
    """A field name's ``_FIELD_NAMES`` entry: what the parsers collect in place of the raw name."""
    entry = _FIELD_NAMES.get(raw_name)
    if entry is None:
        entry = _field_name(raw_name)
    return entry


# Re-derived or set by the router itself, never copied from the client.
_REBUILT_REQUEST: Final = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"}
)
_REBUILT_RESPONSE: Final = frozenset({b"content-length"})

_HOST_RE: Final = re.compile(
    rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9\-._~]*[A-Za-z0-9])?)(?::([0-9]{1,5}))?$"
)
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


# ---- llhttp, called directly (the compiled form) ------------------------------------------------
#
# httptools wraps llhttp in callbacks that look each handler up as a Python attribute and call it
# through the interpreter, and builds a bytes object per header name and per span. Compiled, this
# module links the same llhttp (fastproxy/vendor/llhttp) and LLParser drives it itself: llhttp's C
# callbacks below cast the parser's ``data`` back to the RequestParser / ResponseParser and call its
# typed methods in C; a field is handed on when its value completes (llhttp says so), its name
# interned in ``_LL_NAMES``. LLParser keeps httptools' parser API and raises httptools' exceptions,
# so RequestParser / ResponseParser read the same either way. The pure form never creates one (its
# code calls C functions the interpreter has not got): it uses httptools.

_COMPILED: Final = not __file__.endswith(".py")

# Field names as they arrive, each with its ``_FIELD_NAMES`` entry: a client and an app send the
# same few names in the same case every time, so a name lying in the read is found here by
# (length, three of its bytes) and compared, not allocated, hashed, looked up and freed per field.
# Direct-mapped: a colliding name replaces the one in its slot; bounded (1024 names of at most 64
# bytes), names only, never values.
_LL_NAMES_SIZE: Final = 1024
_LL_NAMES_MAX_NAME: Final = 64
_LL_NAMES: Final[list[bytes | None]] = [None] * _LL_NAMES_SIZE
_LL_ENTRIES: Final[list[tuple[bytes, int, int] | None]] = [None] * _LL_NAMES_SIZE

# llhttp's method number -> its name, filled as methods are seen (llhttp_method_name aborts on a
# number it has no method for: only numbers llhttp itself set are asked for).
_METHOD_NAMES: Final[list[bytes | None]] = [None] * 256


def _ll_field(at: Any, length: int) -> tuple[bytes, int, int]:
    """The ``_FIELD_NAMES`` entry of the field name lying at ``at`` (compiled form only)."""
    if length == 0 or length > _LL_NAMES_MAX_NAME:
        return _field_entry(at[:length])
    slot = (length * 31 + at[0] * 7 + at[length - 1] * 131 + at[length >> 1]) & (_LL_NAMES_SIZE - 1)
    name = _LL_NAMES[slot]
    if name is not None and len(name) == length:  # noqa: SIM102  (memcmp only on an equal length)
        if memcmp(cython.cast(cython.p_const_char, name), at, length) == 0:  # noqa: F821
            return _LL_ENTRIES[slot]
    name = at[:length]
    entry = _field_entry(name)
    _LL_NAMES[slot] = name
    _LL_ENTRIES[slot] = entry
    return entry


class LLParser:
    """llhttp driven directly, with httptools' parser API (compiled form only; see above)."""

    __slots__ = ("_c", "_error", "_name", "_name_length", "_request", "_settings", "_value")

    def __init__(self, owner: Any, request: bool) -> None:
        settings = cython.address(self._settings)
        llhttp_settings_init(settings)  # noqa: F821
        settings.on_message_begin = _ll_on_message_begin
        settings.on_header_field = _ll_on_header_field
        settings.on_header_value = _ll_on_header_value
        settings.on_header_value_complete = _ll_on_header_value_complete
        settings.on_headers_complete = _ll_on_headers_complete
        settings.on_body = _ll_on_body
        settings.on_message_complete = _ll_on_message_complete
        if request:
            settings.on_url = _ll_on_url
        else:
            settings.on_status = _ll_on_status
        c = cython.address(self._c)
        llhttp_init(c, HTTP_REQUEST if request else HTTP_RESPONSE, settings)  # noqa: F821
        c.data = cython.cast(cython.p_void, self)
        # Borrowed: the owner holds this parser and outlives it (no reference cycle to collect).
        self._owner = cython.cast(cython.p_void, owner)
        self._request = request
        self._error = None
        self._name_at = cython.NULL
        self._name_length = 0
        self._name = None
        self._value = None

    def set_dangerous_leniencies(self, lenient_version: bool = False) -> None:
        llhttp_set_lenient_version(cython.address(self._c), lenient_version)  # noqa: F821

    def feed_data(self, data: bytes) -> None:
        c = cython.address(self._c)
        buffer = cython.cast(cython.p_const_char, data)
        error = llhttp_execute(c, buffer, len(data))  # noqa: F821
        if self._name_at != cython.NULL:
            # A field name ended this read without its value: keep it past the read.
            self._name = self._name_at[: self._name_length]
            self._name_at = cython.NULL
        if error == HPE_OK:  # noqa: F821
            return
        if error == HPE_PAUSED:  # noqa: F821
            # A response to HEAD ended at its head and llhttp paused there (_ll_on_message_complete):
            # the rest of this read, if any, is not part of it (ResponseParser.feed says so). The
            # next read starts a fresh message, as a fresh httptools parser does in the pure form.
            offset = llhttp_get_error_pos(c) - buffer  # noqa: F821
            llhttp_reset(c)  # noqa: F821
            if offset < len(data):
                raise _HeadEnded(offset)
            return
        if c.upgrade == 1 and error == HPE_PAUSED_UPGRADE:  # noqa: F821
            offset = llhttp_get_error_pos(c) - buffer  # noqa: F821
            llhttp_resume_after_upgrade(c)  # noqa: F821
            raise httptools.HttpParserUpgrade(offset)
        reason = llhttp_get_error_reason(c).decode("latin-1")  # noqa: F821
        if error in (
            HPE_CB_MESSAGE_BEGIN,  # noqa: F821
            HPE_CB_HEADERS_COMPLETE,  # noqa: F821
            HPE_CB_MESSAGE_COMPLETE,  # noqa: F821
            HPE_CB_CHUNK_HEADER,  # noqa: F821
            HPE_CB_CHUNK_COMPLETE,  # noqa: F821
            HPE_USER,  # noqa: F821
        ):
            exc = httptools.HttpParserCallbackError(reason)
            exc.__context__ = self._error
            self._error = None
            raise exc
        if error == HPE_INVALID_STATUS:  # noqa: F821
            raise httptools.HttpParserInvalidStatusError(reason)
        if error == HPE_INVALID_METHOD:  # noqa: F821
            raise httptools.HttpParserInvalidMethodError(reason)
        if error == HPE_INVALID_URL:  # noqa: F821
            raise httptools.HttpParserInvalidURLError(reason)
        raise httptools.HttpParserError(reason)

    def get_method(self) -> bytes:
        number = self._c.method
        name = _METHOD_NAMES[number]
        if name is None:
            name = _METHOD_NAMES[number] = llhttp_method_name(number)  # noqa: F821
        return name

    def get_http_version(self) -> str:
        major = self._c.http_major
        minor = self._c.http_minor
        if major == 1:
            if minor == 1:
                return "1.1"
            if minor == 0:
                return "1.0"
        return f"{major}.{minor}"

    def should_keep_alive(self) -> bool:
        return llhttp_should_keep_alive(cython.address(self._c)) != 0  # noqa: F821

    def get_status_code(self) -> int:
        return self._c.status_code

    def content_length(self) -> int | None:
        """The Content-Length llhttp read (valid in on_headers_complete), None if there was none."""
        if self._c.flags & F_CONTENT_LENGTH:  # noqa: F821
            return self._c.content_length
        return None


# llhttp's callbacks: each hands an event to the RequestParser / ResponseParser that owns the
# LLParser. An exception cannot cross C: it is kept (``_error``) and llhttp told to stop; feed_data
# raises it as httptools would (HttpParserCallbackError, the exception as its context).


def _ll_on_message_begin(c: Any) -> int:
    ll = cython.cast(LLParser, c.data)
    try:
        if ll._request:
            cython.cast(RequestParser, ll._owner).on_message_begin()
        else:
            cython.cast(ResponseParser, ll._owner).on_message_begin()
    except BaseException as exc:
        ll._error = exc
        return -1
    return 0


def _ll_on_url(c: Any, at: Any, length: int) -> int:
    ll = cython.cast(LLParser, c.data)
    try:
        cython.cast(RequestParser, ll._owner).on_url(at[:length])
    except BaseException as exc:
        ll._error = exc
        llhttp_set_error_reason(c, b"`on_url` callback error")  # noqa: F821
        return HPE_USER  # noqa: F821
    return 0


def _ll_on_status(c: Any, at: Any, length: int) -> int:
    ll = cython.cast(LLParser, c.data)
    try:
        cython.cast(ResponseParser, ll._owner).on_status(at[:length])
    except BaseException as exc:
        ll._error = exc
        llhttp_set_error_reason(c, b"`on_status` callback error")  # noqa: F821
        return HPE_USER  # noqa: F821
    return 0


def _ll_on_header_field(c: Any, at: Any, length: int) -> int:
    ll = cython.cast(LLParser, c.data)
    if ll._name is None and ll._name_at == cython.NULL:
        ll._name_at = at  # the common case: the whole name in this read; interned when used
        ll._name_length = length
        return 0
    try:
        # The rest of a name split across reads (llhttp gives one span per read: the first part
        # was copied to ``_name`` when its read ended).
        ll._name = (b"" if ll._name is None else ll._name) + at[:length]
    except BaseException as exc:
        ll._error = exc
        llhttp_set_error_reason(c, b"`on_header_field` callback error")  # noqa: F821
        return HPE_USER  # noqa: F821
    return 0


def _ll_on_header_value(c: Any, at: Any, length: int) -> int:
    ll = cython.cast(LLParser, c.data)
    try:
        if ll._value is None:
            ll._value = at[:length]
        else:
            ll._value = ll._value + at[:length]  # a value split across reads
    except BaseException as exc:
        ll._error = exc
        llhttp_set_error_reason(c, b"`on_header_value` callback error")  # noqa: F821
        return HPE_USER  # noqa: F821
    return 0


def _ll_on_header_value_complete(c: Any) -> int:
    ll = cython.cast(LLParser, c.data)
    try:
        if ll._name_at != cython.NULL:
            entry = _ll_field(ll._name_at, ll._name_length)
            ll._name_at = cython.NULL
        else:
            entry = _field_entry(ll._name)
            ll._name = None
        value = ll._value
        if value is None:
            value = b""
        else:
            ll._value = None
        # What on_header does, without the call: the entry and the value, appended.
        if ll._request:
            raw_headers = cython.cast(RequestParser, ll._owner)._raw_headers
        else:
            raw_headers = cython.cast(ResponseParser, ll._owner)._raw_headers
        raw_headers.append(entry)
        raw_headers.append(value)
    except BaseException as exc:
        ll._error = exc
        return -1
    return 0


def _ll_on_headers_complete(c: Any) -> int:
    ll = cython.cast(LLParser, c.data)
    try:
        if ll._request:
            cython.cast(RequestParser, ll._owner).on_headers_complete()
        else:
            response = cython.cast(ResponseParser, ll._owner)
            response.on_headers_complete()
            if response._head_only:
                return 1  # llhttp's "no body": the message ends at its head (an answer to HEAD)
    except BaseException as exc:
        ll._error = exc
        return -1
    return 1 if c.upgrade else 0  # as httptools: an upgrade has no body; llhttp pauses after it


def _ll_on_body(c: Any, at: Any, length: int) -> int:
    ll = cython.cast(LLParser, c.data)
    try:
        if ll._request:
            cython.cast(RequestParser, ll._owner).on_body(at[:length])
        else:
            cython.cast(ResponseParser, ll._owner).on_body(at[:length])
    except BaseException as exc:
        ll._error = exc
        llhttp_set_error_reason(c, b"`on_body` callback error")  # noqa: F821
        return HPE_USER  # noqa: F821
    return 0


def _ll_on_message_complete(c: Any) -> int:
    ll = cython.cast(LLParser, c.data)
    try:
        if ll._request:
            cython.cast(RequestParser, ll._owner).on_message_complete()
        else:
            response = cython.cast(ResponseParser, ll._owner)
            response.on_message_complete()
            if response._head_only:
                # An answer to HEAD, ended at its head: pause, so that llhttp does not go on to
                # parse what follows in this read as another response (LLParser.feed_data).
                response._head_only = False
                response.after_head = True
                return HPE_PAUSED  # noqa: F821
    except BaseException as exc:
        ll._error = exc
        return -1
    return 0


class _HeadEnded(Exception):  # a signal inside the parser, never seen outside it
    """A response to HEAD ended at its head and the parser stopped there: raised by LLParser's
    feed_data with the offset in the read where it stopped when bytes follow (compiled), or by
    ResponseParser.on_headers_complete to stop httptools (pure). ResponseParser.feed turns it
    into ``BytesAfterHead`` when bytes follow the head."""


def _parser_bug(event: ParseEvent, state: Parse) -> RuntimeError:
    """An event in a state the table has no move for: a bug in the parser wrapper."""
    return RuntimeError(f"parser bug: {event.name} in state {state.name}")


def find_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a (lower-case) header name."""
    for key, value in headers:
        if key == name:
            return value
    return None


def _split_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class RequestHead:
    """A parsed, validated request head. ``headers`` excludes hop-by-hop and rebuilt ones."""

    __slots__ = (
        "authority",
        "chunked",
        "content_length",
        "expect_continue",
        "forwarded",
        "headers",
        "host",
        "keep_alive",
        "method",
        "path",
        "request_id",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""  # origin-form target forwarded upstream
        self.path = ""  # decoded path for routing (no query)
        self.host = ""  # lower-case, no port: what routes match
        self.authority = b""  # Host as the client sent it (or absolute-form authority)
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.forwarded: list[tuple[bytes, bytes]] = []  # client's X-Forwarded-*/Forwarded
        self.request_id: bytes | None = None
        self.upgrade = False  # a WebSocket opening handshake (RFC 6455), checked by _analyse_upgrade

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def idempotent(self) -> bool:
        return self.method in _IDEMPOTENT

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)


class RequestParser:
    """Strict HTTP/1.1 request parsing for the client side of the router."""

    __slots__ = (
        "_begin_offset",
        "_body_bytes",
        "_connection_tokens",
        "_events",
        "_feed_body",
        "_feed_chunked",
        "_feed_consumed",
        "_feed_messages",
        "_framing_budget",
        "_head",
        "_head_bytes",
        "_head_raw",
        "_host_authority",
        "_host_name",
        "_host_raw",
        "_hosts",
        "_limits",
        "_ll",
        "_max_body_bytes",
        "_max_chunk_overhead_bytes",
        "_max_header_bytes",
        "_max_headers",
        "_max_url_bytes",
        "_parser",
        "_raw_headers",
        "_te",
        "_upgrade",
        "_url",
        "_url_pieces",
        "_whole_feed",
        "state",
    )

    def __init__(self, events: list[object], limits: Limits = DEFAULT_LIMITS) -> None:
        self._events = events
        self._limits = limits
        # The limits as plain ints: read per feed and per field (C ints once compiled).
        self._max_url_bytes = limits.max_url_bytes
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._max_body_bytes = limits.max_body_bytes
        self._max_chunk_overhead_bytes = limits.max_chunk_overhead_bytes
        # llhttp itself when compiled (LLParser), through httptools in the pure form.
        self._ll: LLParser | None = LLParser(self, True) if _COMPILED else None
        self._parser: Any = self._ll if _COMPILED else httptools.HttpRequestParser(self)
        # llhttp refuses HTTP/1.2 and the like; RFC 9110 (2.5, 6.2) says a recipient accepts a
        # higher minor version and answers as 1.1. Versions are then judged here (on_headers_complete).
        self._parser.set_dangerous_leniencies(lenient_version=True)
        self.state = PARSE_IDLE
        self._feed_consumed = 0
        self._feed_body = 0
        self._feed_chunked = False
        self._feed_messages = 0
        self._begin_offset = 0
        self._whole_feed: bytes | None = None
        # The last Host value validated on this connection and what it gave: a keep-alive client
        # sends the same one every time, so the check runs once per connection, not per request.
        self._host_raw: bytes | None = None
        self._host_authority = b""
        self._host_name = ""
        self._reset()

    def _reset(self) -> None:
        self._head = RequestHead()
        self._url = b""
        self._url_pieces: list[bytes] | None = None  # a target split across reads (rare)
        # name's _FIELD_NAMES entry, value, entry, value...: two appends per field (read pairwise
        # at the head); the entry says the name's lower-case form and kind, looked up once.
        self._raw_headers: list[object] = []
        self._head_bytes = 0  # exact: URL and header fields seen so far
        self._head_raw = 0  # raw bytes fed while the head was incomplete (llhttp's own buffer)
        # Created only when such a field comes (most requests have neither TE nor a Connection
        # naming other fields): no empty lists allocated per request.
        self._hosts: list[bytes] | None = None
        self._te: list[bytes] | None = None
        self._connection_tokens: list[bytes] | None = None
        self._upgrade: bytes | None = None  # the Upgrade field's value(s), when there is one
        self._body_bytes = 0
        self._framing_budget = 0

    # ---- driving --------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse ``data``; events go to the list given at construction. Raises ``ProxyError``."""
        state_before = self.state
        self._feed_consumed = 0
        self._feed_body = 0
        self._feed_messages = 0
        self._feed_chunked = state_before is PARSE_BODY and self._head.chunked
        self._whole_feed = data if state_before is PARSE_IDLE else None
        ll = self._ll  # a local reference: the parser must outlive its own feed_data
        try:
            if ll is not None:
                ll.feed_data(data)  # a C call
            else:
                self._parser.feed_data(data)
            self._whole_feed = None
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProxyError):
                raise cause from None
            raise
        except httptools.HttpParserUpgrade as exc:
            self._whole_feed = None
            self._on_upgrade(data, exc.args[0] if exc.args else len(data))
            return
        except httptools.HttpParserInvalidMethodError as exc:
            raise BadRequest(f"invalid method: {exc}") from None
        except httptools.HttpParserError as exc:
            raise BadRequest(f"malformed request: {exc}") from None
        state = self.state
        if state is PARSE_HEAD:
            # llhttp buffers a header line until it ends: bound what it may hold for us. Bytes of
            # messages that completed earlier in this feed are roughly known and not counted.
            if state_before is PARSE_HEAD:
                self._head_raw += len(data)
            else:
                self._head_raw = len(data) - self._begin_offset
            if self._head_raw > 2 * self._max_header_bytes:
                raise HeadersTooLarge(f"request head exceeds {self._max_header_bytes} bytes")
            if len(self._raw_headers) > 2 * self._max_headers:
                raise HeadersTooLarge(f"more than {self._max_headers} header fields")
        elif state is PARSE_BODY and self._head.chunked:
            self._framing_budget -= len(data)
            if self._framing_budget + 8 * self._body_bytes < 0:
                raise BadRequest("chunk framing overhead (extensions, trailers) exceeds its limit")
        if self._feed_chunked and state is not PARSE_BODY:
            # A chunked message ended inside this read: bound its framing by what the read held
            # beyond its fields and body (an over-estimate when several messages share a read).
            framing = len(data) - self._feed_consumed - 64 * self._feed_messages
            if framing > self._max_chunk_overhead_bytes + 8 * self._feed_body:
                raise BadRequest("chunk framing overhead (extensions, trailers) exceeds its limit")

    # ---- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state is not _BEGIN_FROM:
            raise _parser_bug(ParseEvent.BEGIN, self.state)
        self.state = _BEGIN_TO
        self._begin_offset = self._feed_consumed
        self._feed_messages += 1
        if self._feed_messages > 1:
            self._whole_feed = None  # only the first message of a read starts at its first byte

    def on_url(self, url: bytes) -> None:
        self._feed_consumed += len(url) + 16
        if not self._url:
            self._url = url
            size = len(url)
        else:
            pieces = self._url_pieces
            if pieces is None:
                pieces = self._url_pieces = [self._url]
            pieces.append(url)
            size = sum(map(len, pieces))
        if size > self._max_url_bytes:
            raise URITooLong(f"request target longer than {self._max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called once per field: only collect. Limits are checked after each feed (``feed``: a
        # read of at most a few hundred KiB bounds what one call can collect) and exactly when the
        # head completes (``_analyse_headers``). Trailers land here too, after the head was
        # analysed: they are never merged, bounded by the framing budget, and dropped at _reset.
        raw_headers = self._raw_headers
        raw_headers.append(_field_entry(name))
        raw_headers.append(value)

    def on_headers_complete(self) -> None:
        head = self._head
        ll = self._ll
        if ll is not None:  # compiled: llhttp's own fields, read in C
            method = ll.get_method()
            version = ll.get_http_version()
            keep_alive = ll.should_keep_alive()
        else:
            parser = self._parser
            method = parser.get_method()
            version = "1.1" if self._is_http11(method) else parser.get_http_version()
            keep_alive = parser.should_keep_alive()
        head.method = method
        if version == "1.1":
            head.version = b"1.1"
        elif version == "1.0":
            head.version = b"1.0"
        else:
            if version.startswith("0."):
                raise BadRequest("HTTP/0.9 requests are not supported")
            if not version.startswith("1."):
                raise VersionNotSupported(f"HTTP/{version} on an HTTP/1 connection")
            head.version = b"1.1"  # HTTP/1.2 and up: handled, forwarded and answered as 1.1
        if method == b"CONNECT":
            raise MethodNotAllowed("CONNECT is not supported by this proxy")
        head.keep_alive = keep_alive  # before the analysis: an upgrade clears it
        self._analyse_headers(head)
        self._analyse_target(head, self._url if self._url_pieces is None else b"".join(self._url_pieces))
        if self.state is not _HEAD_DONE_FROM:
            raise _parser_bug(ParseEvent.HEAD_DONE, self.state)
        self.state = _HEAD_DONE_TO
        self._framing_budget = self._max_chunk_overhead_bytes
        self._feed_chunked = self._feed_chunked or head.chunked
        self._events.append(head)

    def _is_http11(self, method: bytes) -> bool:
        """Does the request line say HTTP/1.1? httptools' get_http_version() formats a str per call
        (~5k instructions); the read holds the line when this message starts it. Its version is
        then at ``len(method) + len(url) + 2`` if one space separates each part, and further on
        if more do; "HTTP/1.1\r\n" found there is the line's end (llhttp refused a CR or LF
        inside the line). Anything else (leading empty lines, another version, a line split
        across reads): False, and llhttp is asked."""
        data = self._whole_feed
        if data is None or self._url_pieces is not None:
            return False
        offset = len(method) + len(self._url) + 2
        return data[offset : offset + 10] == b"HTTP/1.1\r\n"

    def on_body(self, body: bytes) -> None:
        self._feed_consumed += len(body) + 8
        self._feed_body += len(body)
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body_bytes:
            raise PayloadTooLarge(f"request body exceeds {self._max_body_bytes} bytes")
        self._framing_budget += len(body)
        self._events.append(body)

    def on_message_complete(self) -> None:
        if self.state is not _MESSAGE_DONE_FROM:
            raise _parser_bug(ParseEvent.MESSAGE_DONE, self.state)
        self.state = _MESSAGE_DONE_TO
        self._events.append(END)
        self._reset()

    # ---- validation ---------------------------------------------------------------------------

    def _analyse_headers(self, head: RequestHead) -> None:
        raw_headers = self._raw_headers
        count = len(raw_headers) // 2
        if count > self._max_headers:
            raise HeadersTooLarge(f"more than {self._max_headers} header fields")
        kept: list[tuple[bytes, bytes]] = []
        size = 4 * count
        for i in range(0, 2 * count, 2):
            entry = raw_headers[i]
            value = raw_headers[i + 1]
            name = entry[0]
            kind = entry[1]
            size += len(name) + len(value)
            if kind == 0:  # the common case: one dict lookup per field
                kept.append((name, value))
            elif kind == _FIELD_HOST:
                if self._hosts is None:
                    self._hosts = [value]
                else:
                    self._hosts.append(value)
            elif kind == _FIELD_TRANSFER_ENCODING:
                if self._te is None:
                    self._te = []
                self._te.extend(_split_tokens(value))
            elif kind == _FIELD_CONNECTION:
                if value not in _PLAIN_CONNECTION:  # "keep-alive" / "close" name no field
                    if self._connection_tokens is None:
                        self._connection_tokens = []
                    self._connection_tokens.extend(_split_tokens(value))
            elif kind == _FIELD_CONTENT_LENGTH:
                # llhttp has checked digits and duplicates, and read the number (compiled: taken).
                ll = self._ll
                head.content_length = int(value) if ll is None else ll.content_length()
            elif kind == _FIELD_EXPECT:
                if value.strip().lower() != b"100-continue":
                    raise ExpectationFailed(f"unsupported Expect: {value[:64]!r} (only 100-continue)")
                head.expect_continue = True
            elif kind == _FIELD_FORWARDING:
                head.forwarded.append((name, value))
            elif kind == _FIELD_REQUEST_ID:
                head.request_id = value
                kept.append((name, value))
            elif kind == _FIELD_UPGRADE:
                self._upgrade = value if self._upgrade is None else self._upgrade + b"," + value
            # else _FIELD_HOP_BY_HOP: dropped
        if size > self._max_header_bytes:
            raise HeadersTooLarge(f"header section exceeds {self._max_header_bytes} bytes")
        self._head_bytes = size
        self._feed_consumed += size
        if self._connection_tokens:
            # "keep-alive" / "close" name no field we kept: only other names cost a filtering pass.
            listed = set(self._connection_tokens).difference(_CONNECTION_OPTIONS)
            if listed:
                kept = [(n, v) for n, v in kept if n not in listed]
        head.headers = kept

        if self._te:
            if self._te != [b"chunked"]:
                raise NotImplementedCoding(
                    f"unsupported Transfer-Encoding {b', '.join(self._te).decode(errors='replace')!r}"
                )
            if head.version == b"1.0":
                raise BadRequest("chunked transfer coding on an HTTP/1.0 request")
            head.chunked = True
        if head.content_length is not None and head.content_length > self._max_body_bytes:
            raise PayloadTooLarge(f"Content-Length {head.content_length} exceeds {self._max_body_bytes}")

        hosts = self._hosts
        if hosts is None:
            if head.version == b"1.1":
                raise BadRequest("missing Host header")
        elif len(hosts) > 1:
            raise BadRequest("more than one Host header")
        elif hosts[0] == self._host_raw:
            head.authority = self._host_authority
            head.host = self._host_name
        else:
            host = hosts[0].strip()
            match = _HOST_RE.match(host)
            if match is None or (match.group(1) is not None and int(match.group(1)) > 65535):
                raise BadRequest(f"invalid Host header {host[:64]!r}")
            head.authority = host
            head.host = _strip_port(host).decode("ascii").lower()
            self._host_raw = hosts[0]
            self._host_authority = head.authority
            self._host_name = head.host
        if self._upgrade is not None:
            self._analyse_upgrade(head)

    def _analyse_upgrade(self, head: RequestHead) -> None:
        """An Upgrade field: without ``Connection: upgrade`` it asks for nothing (and is dropped as
        hop-by-hop); with it, only a WebSocket handshake is accepted (RFC 6455 section 4.1), and
        anything else is refused before a byte of it reaches a pod."""
        tokens = self._connection_tokens
        if tokens is None or b"upgrade" not in tokens:
            return
        assert self._upgrade is not None
        protocols = _split_tokens(self._upgrade)
        if protocols != [b"websocket"]:
            shown = b", ".join(protocols).decode("latin-1")[:64]
            if any(p.startswith(b"h2c") for p in protocols):
                raise BadRequest(f"h2c upgrade (HTTP/2 over cleartext) is not supported (Upgrade: {shown})")
            raise BadRequest(f"Upgrade to {shown!r} is not supported; only websocket is")
        if head.method != b"GET":
            raise BadRequest(f"a WebSocket handshake must be a GET, not {head.method.decode('latin-1')}")
        if head.version != b"1.1":
            raise BadRequest("a WebSocket handshake needs HTTP/1.1")
        if head.chunked or head.content_length:
            raise BadRequest("Upgrade on a request with a body is not supported")
        head.upgrade = True
        head.keep_alive = False  # whatever the pod answers, no further request is read here
        # Hop-by-hop fields, so dropped above; the pod needs both to switch protocols.
        head.headers += _UPGRADE_FIELDS

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        """llhttp stopped after an upgrade request's head (it has emitted head and END). Only an
        accepted WebSocket handshake gets here (every other one raised at its head); from now on
        the connection's bytes are not HTTP: they are handed on as they come."""
        events = self._events
        if not any(type(e) is RequestHead and e.upgrade for e in events):  # pragma: no cover - defensive
            raise BadRequest("protocol upgrade is not supported")
        self._parser = _Upgraded(events)
        self._ll = None
        if offset < len(data):
            events.append(data[offset:])

    def _analyse_target(self, head: RequestHead, target: bytes) -> None:
        if target.startswith(b"/"):
            pass
        elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            # absolute-form: the authority replaces Host (RFC 9112 section 3.2.2)
            rest = target.split(b"://", 1)[1]
            slash = rest.find(b"/")
            authority, target = (rest, b"/") if slash == -1 else (rest[:slash], rest[slash:])
            if b"@" in authority or _HOST_RE.match(authority) is None:
                raise BadRequest("invalid authority in absolute-form request target")
            head.authority = authority
            head.host = _strip_port(authority).decode("ascii").lower()
        else:
            raise BadRequest(f"unsupported request target form {target[:64]!r}")
        if b"#" in target:
            raise BadRequest("fragment in request target")
        head.target = target
        query = target.find(b"?")
        path = target if query == -1 else target[:query]
        head.path = path.decode("latin-1")


_UPGRADE_FIELDS: Final = ((b"connection", b"upgrade"), (b"upgrade", b"websocket"))


class _Upgraded:
    """Stands in for llhttp after a WebSocket handshake: every read is one raw ``bytes`` event
    (the client should wait for the 101, RFC 6455 section 4.1; what it sends early is kept, and
    the connection's reading pauses behind the pending request, as for a pipelined one)."""

    __slots__ = ("_events",)

    def __init__(self, events: list[object]) -> None:
        self._events = events

    def feed_data(self, data: bytes) -> None:
        self._events.append(data)


def _strip_port(host: bytes) -> bytes:
    if host.startswith(b"["):
        return host[: host.index(b"]") + 1]
    colon = host.rfind(b":")
    return host if colon == -1 else host[:colon]


# ---- responses ----------------------------------------------------------------------------------


class ResponseHead:
    __slots__ = (
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "reason",
        "status",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade = b""  # the Upgrade field of a 101 (hop-by-hop: not in ``headers``)

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)


class ResponseParser:
    """Strict parsing of one pod's responses. ``expect_no_body()`` before a HEAD request.

    A response to HEAD ends at its head whatever its framing says (RFC 9112 section 6.3), and the
    parser stops there: bytes after it in the same read are no part of it, nor of a response the
    pod may send (it has one request at a time). ``feed`` then delivers the response's events and
    raises ``BytesAfterHead`` with those bytes; the connection cannot be trusted with another
    request. Compiled, llhttp ends the message itself (on_headers_complete's "no body") and pauses
    after it; httptools cannot be told either, so the pure form stops it by raising inside its
    callback, starts a fresh one, and finds where the head ended in the read (``_head_end``).
    ``after_head``: the last response ended at its head and no head was parsed since, so bytes
    arriving on the idle connection are bytes after a HEAD response (proxy.UpstreamConnection)."""

    __slots__ = (
        "_carry",
        "_connection_tokens",
        "_events",
        "_feed_events",
        "_head",
        "_head_bytes",
        "_head_only",
        "_http11",
        "_limits",
        "_ll",
        "_max_header_bytes",
        "_max_headers",
        "_no_body",
        "_parser",
        "_raw_headers",
        "_te",
        "_whole_feed",
        "after_head",
        "state",
        "upgraded",
        "upgraded_tail",
    )

    def __init__(self, events: list[object], limits: Limits = DEFAULT_LIMITS) -> None:
        self._events = events
        self._limits = limits
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._ll: LLParser | None = LLParser(self, False) if _COMPILED else None
        self._parser: Any = self._ll if _COMPILED else httptools.HttpResponseParser(self)
        self.state = PARSE_IDLE
        self._no_body = False
        self._head_only = False  # compiled: the message whose head just completed ends there
        self.after_head = False
        # The pure form, while an answer to HEAD is awaited (see _head_end): the events list's
        # length when the read began, and the read before's last 3 bytes (None: this read starts
        # a message).
        self._feed_events = 0
        self._carry: bytes | None = None
        self._whole_feed: bytes | None = None
        self.upgraded = False  # the pod switched protocols (a 101 with Upgrade): no longer HTTP
        self.upgraded_tail = b""  # bytes the pod sent after its 101 head, in the same read
        self._reset()

    def _reset(self) -> None:
        self._head = ResponseHead()
        self._raw_headers: list[object] = []  # entry, value, entry, value... (as in RequestParser)
        self._te: list[bytes] | None = None  # created when such a field comes (see RequestParser)
        self._connection_tokens: list[bytes] | None = None
        self._head_bytes = 0
        self._http11 = False  # the status line says HTTP/1.1 (on_message_begin)

    def expect_no_body(self) -> None:
        """The next response answers HEAD: it ends with its head whatever its framing says."""
        self._no_body = True
        self._carry = None

    def feed(self, data: bytes) -> None:
        """Parse ``data``; events go to the list given at construction. Raises ``ProxyError``:
        ``BytesAfterHead`` after delivering a complete answer to HEAD that bytes followed."""
        self._whole_feed = data if self.state is PARSE_IDLE else None
        ll = self._ll
        try:
            if ll is not None:
                ll.feed_data(data)
            elif self._no_body:
                self._feed_events = len(self._events)
                if self.state is PARSE_IDLE:
                    self._carry = None
                self._parser.feed_data(data)  # (bound: the parser outlives its own feed_data)
                self._carry = (data if self._carry is None else self._carry + data)[-3:]
            else:
                self._parser.feed_data(data)
            self._whole_feed = None
        except _HeadEnded as exc:  # compiled: llhttp stopped at the head's end, bytes follow
            self._whole_feed = None
            raise BytesAfterHead(data[exc.args[0] :]) from None
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProxyError):
                raise cause from None
            if type(cause) is _HeadEnded:  # pure: httptools stopped at the head's end
                self._whole_feed = None
                end = self._head_end(data)
                if end < len(data):
                    raise BytesAfterHead(data[end:]) from None
                return
            raise
        except httptools.HttpParserUpgrade as exc:
            # The 101 head is in the events; the exchange refuses it unless it asked for it.
            self._whole_feed = None
            self.upgraded = True
            offset = exc.args[0] if exc.args else len(data)
            self.upgraded_tail = data[offset:]
            return
        except httptools.HttpParserError as exc:
            if self.after_head:  # no head parsed since an answer to HEAD: what followed it?
                raise BadGateway(f"malformed response from pod (after a HEAD response): {exc}") from None
            raise BadGateway(f"malformed response from pod: {exc}") from None
        if self.state is PARSE_HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > 2 * self._max_header_bytes:
                raise BadGateway("response head from pod too large")
        if len(self._raw_headers) > 8 * self._max_headers:  # a head, or endless trailers: 4x fields
            raise BadGateway("response head or trailers from pod too large")

    def _head_end(self, data: bytes) -> int:
        """Where in ``data`` the head of the answer to HEAD ended (pure form). httptools says no
        position; the heads completed in this read are the events added since it began, all but
        the last interim (1xx, no body), and llhttp ends each at CRLF CRLF (it refuses bare LF): so
        it is the end of the last of theirs, counted from where the first began -- in an earlier
        read when ``_carry`` holds that read's last bytes (a CRLF CRLF may straddle the two)."""
        carry = self._carry
        buffer = data if carry is None else carry + data
        heads = 0
        for event in self._events[self._feed_events :]:
            if type(event) is ResponseHead:
                heads += 1
        at = 0
        for n in range(heads):
            if n or carry is None:
                while at < len(buffer) and buffer[at] in b"\r\n":
                    at += 1  # empty lines llhttp skips before a message
            at = buffer.index(b"\r\n\r\n", at) + 4
        return at - (0 if carry is None else len(carry))

    def feed_eof(self) -> bool:
        """The pod closed the connection. True if that ends a close-delimited body."""
        if self.state is PARSE_BODY and self._head.content_length is None and not self._head.chunked:
            self._events.append(END)
            self.state = PARSE_IDLE
            return True
        return self.state is PARSE_IDLE

    def on_message_begin(self) -> None:
        if self.state is not _BEGIN_FROM:
            raise _parser_bug(ParseEvent.BEGIN, self.state)
        self.state = _BEGIN_TO
        data = self._whole_feed
        if data is not None:
            # The first response of this read starts it: its status line says the version (as in
            # RequestParser._is_http11; get_http_version() formats a str per call).
            self._whole_feed = None
            self._http11 = data[:9] == b"HTTP/1.1 "

    def on_status(self, reason: bytes) -> None:
        self._head.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only collect (limits: after each feed and when the head completes). Trailers land here
        # too, after the head was analysed, and are dropped at _reset.
        raw_headers = self._raw_headers
        raw_headers.append(_field_entry(name))
        raw_headers.append(value)

    def on_headers_complete(self) -> None:
        head = self._head
        ll = self._ll
        if ll is not None:
            head.status = ll.get_status_code()
            version = ll.get_http_version()
            keep_alive = ll.should_keep_alive()
        else:
            parser = self._parser
            head.status = parser.get_status_code()
            version = "1.1" if self._http11 else parser.get_http_version()
            keep_alive = parser.should_keep_alive()
        if version == "1.1":
            head.version = b"1.1"
        elif version == "1.0":
            head.version = b"1.0"
        else:
            raise BadGateway(f"pod answered with HTTP/{version}")
        raw_headers = self._raw_headers
        count = len(raw_headers) // 2
        if count > 4 * self._max_headers:
            raise BadGateway("response head from pod too large")
        kept: list[tuple[bytes, bytes]] = []
        size = 4 * count
        for i in range(0, 2 * count, 2):
            entry = raw_headers[i]
            value = raw_headers[i + 1]
            name = entry[0]
            kind = entry[2]
            size += len(name) + len(value)
            if kind == 0:
                kept.append((name, value))
            elif kind == _FIELD_TRANSFER_ENCODING:
                if self._te is None:
                    self._te = []
                self._te.extend(_split_tokens(value))
            elif kind == _FIELD_CONNECTION:
                if value not in _PLAIN_CONNECTION:
                    if self._connection_tokens is None:
                        self._connection_tokens = []
                    self._connection_tokens.extend(_split_tokens(value))
            elif kind == _FIELD_CONTENT_LENGTH:
                head.content_length = int(value) if ll is None else ll.content_length()
            elif kind == _FIELD_UPGRADE:
                head.upgrade = value.strip().lower()
            # else _FIELD_HOP_BY_HOP: dropped
        if size > self._max_header_bytes:
            raise BadGateway("response head from pod too large")
        if self._connection_tokens:
            # "keep-alive" / "close" name no field we kept: only other names cost a filtering pass.
            listed = set(self._connection_tokens).difference(_CONNECTION_OPTIONS)
            if listed:
                kept = [(n, v) for n, v in kept if n not in listed]
        head.headers = kept
        if self._te:
            if self._te != [b"chunked"]:
                raise BadGateway(f"pod used unsupported Transfer-Encoding {b','.join(self._te)!r}")
            head.chunked = True
            head.content_length = None
        head.keep_alive = keep_alive
        if self.state is not _HEAD_DONE_FROM:
            raise _parser_bug(ParseEvent.HEAD_DONE, self.state)
        self.state = _HEAD_DONE_TO
        self.after_head = False
        self._events.append(head)
        if self._no_body and head.status >= 200:
            # An answer to HEAD: it ends here, whatever its framing says.
            self._no_body = False
            if self._ll is not None:
                self._head_only = True  # llhttp ends it and pauses (_ll_on_headers_complete)
                return
            # httptools would wait for the body: end the message here, and stop that parser
            # (raising in its callback is the only way) for a fresh one; feed finds the head's end.
            self.state = PARSE_IDLE
            self._events.append(END)
            self._parser = httptools.HttpResponseParser(self)
            self._reset()
            self.after_head = True
            raise _HeadEnded()

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def on_message_complete(self) -> None:
        if self.state is not _MESSAGE_DONE_FROM:
            raise _parser_bug(ParseEvent.MESSAGE_DONE, self.state)
        self.state = _MESSAGE_DONE_TO
        if self._head.status >= 200:  # an interim (1xx) response is a head only; the final one follows
            self._events.append(END)
        self._reset()


# ---- rebuilding heads ---------------------------------------------------------------------------

_CRLF: Final = b"\r\n"
# status -> (reason, status line) as last built: a pod gives a status the same reason every time.
# llhttp reads three digits, so this holds at most 900 entries.
_STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {}


def _status_line(status: int, reason: bytes) -> bytes:
    cached = _STATUS_LINES.get(status)
    if cached is not None and cached[0] == reason:
        return cached[1]
    line = b"HTTP/1.1 %d %s\r\n" % (status, reason or b"Status")
    _STATUS_LINES[status] = (reason, line)
    return line


_SSIZE_MAX: Final = 2**63 - 1


def _decimal(number: int) -> bytes:
    """A Content-Length value. Compiled, an f-string of a C integer is formatted in C: a fraction
    of what b"%d" % number costs. llhttp takes lengths up to 2**64 - 1: those beyond a C integer
    are formatted as Python ints."""
    if number > _SSIZE_MAX:
        return b"%d" % number
    small = number
    return f"{small}".encode("ascii")


def _append_fields(parts: list[bytes], fields: list[tuple[bytes, bytes]]) -> None:
    # Four appends, not ``parts += (name, b": ", value, _CRLF)``: compiled, each is an inlined
    # C append on the typed list (a bound ``append`` would be a Python call) and no tuple is built.
    for name, value in fields:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(_CRLF)


# Heads are sent as one bytes object. The pure form joins a list of pieces; compiled, the sizes are
# summed first and the pieces copied into one bytes object allocated at that size (bytes.join
# would build the list, take a buffer of every piece and copy: ~4k instructions a head more).


def _fields_size(fields: list[tuple[bytes, bytes]]) -> int:
    """The bytes ``fields`` take in a head; checks each is a (bytes, bytes) pair first, so that
    the compiled form's copy (_put_fields, unchecked) can rely on it."""
    size = 0
    for field in fields:  # compiled: a field that is not a tuple raises TypeError here
        if type(field) is not tuple or len(field) != 2:
            raise TypeError(f"a header field is a (name, value) pair of bytes, not {field!r}")
        name = field[0]  # compiled: bytes or None, else TypeError
        value = field[1]
        if type(name) is not bytes or type(value) is not bytes:
            raise TypeError(f"a header field is a (name, value) pair of bytes, not {field!r}")
        size += len(name) + len(value) + 4  # name ": " value CRLF
    return size


def _put(at: Any, piece: bytes) -> Any:
    """Copies ``piece`` to ``at`` and returns where the next piece goes (compiled form only)."""
    size = len(piece)
    memcpy(at, cython.cast(cython.p_const_char, piece), size)  # noqa: F821
    return at + size


def _put_fields(at: Any, fields: list[tuple[bytes, bytes]]) -> Any:
    for field in fields:
        at = _put(at, field[0])
        at[0] = 58  # ':'
        at[1] = 32  # ' '
        at = _put(at + 2, field[1])
        at[0] = 13  # CR
        at[1] = 10  # LF
        at += 2
    return at


def build_request_head(
    head: RequestHead,
    extra: list[tuple[bytes, bytes]],
    *,
    expect_continue: bool = False,
) -> bytes:
    """The request head sent to a pod: HTTP/1.1, keep-alive, framing re-derived."""
    headers = head.headers
    length = None
    if head.chunked:
        framing = b"transfer-encoding: chunked\r\n"
    elif head.content_length is not None:
        framing = b"content-length: "
        length = _decimal(head.content_length)
    else:
        framing = b""
    expect = b"expect: 100-continue\r\n" if expect_continue and (head.chunked or head.content_length) else b""
    fields_size = _fields_size(headers) + _fields_size(extra)  # checks them, in both forms
    if not _COMPILED:
        parts = [head.method, b" ", head.target, b" HTTP/1.1\r\nhost: ", head.authority, _CRLF]
        _append_fields(parts, headers)
        _append_fields(parts, extra)
        parts.append(framing)
        if length is not None:
            parts.append(length)
            parts.append(_CRLF)
        parts.append(expect)
        parts.append(_CRLF)
        return b"".join(parts)
    method = head.method
    target = head.target
    authority = head.authority
    size = len(method) + len(target) + len(authority) + 20 + fields_size
    size += len(framing) + len(expect) + 2
    if length is not None:
        size += len(length) + 2
    out = PyBytes_FromStringAndSize(cython.NULL, size)  # noqa: F821
    at = PyBytes_AS_STRING(out)  # noqa: F821
    at = _put(at, method)
    at = _put(at, b" ")
    at = _put(at, target)
    at = _put(at, b" HTTP/1.1\r\nhost: ")
    at = _put(at, authority)
    at = _put(at, _CRLF)
    at = _put_fields(at, headers)
    at = _put_fields(at, extra)
    at = _put(at, framing)
    if length is not None:
        at = _put(at, length)
        at = _put(at, _CRLF)
    at = _put(at, expect)
    _put(at, _CRLF)
    return out


def build_response_head(
    head: ResponseHead, *, chunked: bool, close: bool, http10_keep_alive: bool = False
) -> bytes:
    """The response head sent to the client. ``chunked``: we re-frame the body as chunks."""
    status_line = _status_line(head.status, head.reason)
    headers = head.headers
    length = None
    if chunked:
        framing = b"transfer-encoding: chunked\r\n"
    elif head.content_length is not None:
        framing = b"content-length: "
        length = _decimal(head.content_length)
    else:
        framing = b""
    if close:
        connection = b"connection: close\r\n"
    elif http10_keep_alive:
        connection = b"connection: keep-alive\r\n"
    else:
        connection = b""
    fields_size = _fields_size(headers)
    if not _COMPILED:
        parts = [status_line]
        _append_fields(parts, headers)
        parts.append(framing)
        if length is not None:
            parts.append(length)
            parts.append(_CRLF)
        parts.append(connection)
        parts.append(_CRLF)
        return b"".join(parts)
    size = len(status_line) + fields_size + len(framing) + len(connection) + 2
    if length is not None:
        size += len(length) + 2
    out = PyBytes_FromStringAndSize(cython.NULL, size)  # noqa: F821
    at = PyBytes_AS_STRING(out)  # noqa: F821
    at = _put(at, status_line)
    at = _put_fields(at, headers)
    at = _put(at, framing)
    if length is not None:
        at = _put(at, length)
        at = _put(at, _CRLF)
    at = _put(at, connection)
    _put(at, _CRLF)
    return out


def chunk(data: bytes) -> list[bytes]:
    """One chunk of a re-framed body, as pieces for ``transport.writelines``."""
    return [b"%x\r\n" % len(data), data, _CRLF]


LAST_CHUNK: Final = b"0\r\n\r\n"


def error_response(exc: ProxyError, *, close: bool, request_id: bytes | None = None) -> bytes:
    """A small plain-text response the router answers itself."""
    body = f"{exc.status} {exc.reason_phrase}: {exc.reason}\n".encode("utf-8", "replace")
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (exc.status, exc.reason_phrase.encode()),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        b"cache-control: no-store\r\n",
    ]
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        lines.append(b"retry-after: %d\r\n" % retry_after)
    lines.append(getattr(exc, "extra_headers", b""))
    if request_id:
        lines.append(b"x-request-id: " + request_id + _CRLF)
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(_CRLF)
    lines.append(body)
    return b"".join(lines)
