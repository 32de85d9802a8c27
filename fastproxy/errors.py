"""One error tree for the data path, each error carrying the HTTP status it maps to.

Theory of operation
-------------------
Everything that can go wrong with a request for a *known* reason is a ``ProxyError`` subclass with a
``status``; the connection code turns it into that response (or, once response bytes went out, into
an aborted connection) and logs ``reason``. Any other exception escaping the data path is a bug: it
is logged with its traceback as one and answered 500 if nothing was sent yet.

``UpstreamUnavailable`` is the one error the router recovers from by itself: the pod could not have
seen the request (refused, connect timeout, closed before we wrote, sidecar busy), so the request
goes to a different pod. ``retryable`` says so; nothing else is ever retried.
"""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    reason_phrase = "Internal Server Error"
    # Close the client connection after answering (the request stream cannot be trusted).
    close = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(ProxyError):
    status = 400
    reason_phrase = "Bad Request"
    close = True


class BadBody(BadRequest):
    """Well-formed HTTP whose body a route cannot route by (an LLM route's JSON: not JSON, no model
    field). The body was read to its end, so the connection stays usable."""

    close = False


class NotFound(ProxyError):
    status = 404
    reason_phrase = "Not Found"


class MethodNotAllowed(ProxyError):
    status = 405
    reason_phrase = "Method Not Allowed"
    close = True


class RequestTimeout(ProxyError):
    status = 408
    reason_phrase = "Request Timeout"
    close = True


class PayloadTooLarge(ProxyError):
    status = 413
    reason_phrase = "Content Too Large"
    close = True


class URITooLong(ProxyError):
    status = 414
    reason_phrase = "URI Too Long"
    close = True


class HeadersTooLarge(ProxyError):
    status = 431
    reason_phrase = "Request Header Fields Too Large"
    close = True


class NotImplementedCoding(ProxyError):
    status = 501
    reason_phrase = "Not Implemented"
    close = True


class ExpectationFailed(ProxyError):
    """An Expect other than 100-continue (RFC 9110 section 10.1.1)."""

    status = 417
    reason_phrase = "Expectation Failed"
    close = True


class VersionNotSupported(ProxyError):
    status = 505
    reason_phrase = "HTTP Version Not Supported"
    close = True


class BadGateway(ProxyError):
    """The pod's answer was broken, or the pod went away after it may have seen the request."""

    status = 502
    reason_phrase = "Bad Gateway"


class BytesAfterHead(BadGateway):
    """The pod sent bytes after its response to a HEAD request (which ends at its head, RFC 9112
    section 6.3): a body it must not send, garbage, or a response nobody asked for. The response
    itself is complete and good (the parser delivered it before raising); ``tail`` is what
    followed it in the same read. The connection is what is broken: never reused."""

    def __init__(self, tail: bytes) -> None:
        super().__init__(f"{len(tail)} bytes after a HEAD response (first: {tail[:32]!r})")
        self.tail = tail


class ServiceUnavailable(ProxyError):
    """No pod can serve now: queue full, queue deadline passed, or none exists."""

    status = 503
    reason_phrase = "Service Unavailable"

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class SidecarBusy(ServiceUnavailable):
    """The sidecar's polite refusal: the app saw nothing; a router picks another pod."""

    extra_headers = b"x-fastproxy-busy: 1\r\n"

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retry_after=0)


class GatewayTimeout(ProxyError):
    status = 504
    reason_phrase = "Gateway Timeout"


class UpstreamUnavailable(ProxyError):
    """The pod cannot have seen the request; another pod may serve it. ``kind`` is one of the
    ``ConnectFailureKind`` values (refused, timeout, reset, busy_refused, unreachable)."""

    status = 502
    reason_phrase = "Bad Gateway"
    retryable = True

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind
