"""The part of a router that the data path reads on every request, as an extension type.

Theory of operation
-------------------
``Router`` (``fastproxy.router``) is the state one event loop serves from; most of it is for the
state path, the admin API and the lifecycle, which run a few times a second at most. The data path
(the compiled ``Exchange`` and ``ClientConnection`` of ``fastproxy.proxy``) reads a handful of its
fields several times per request: the snapshot, the slot table, the upstream pool, the statistics,
the clock's loop, the configuration. ``RouterBase`` holds exactly those, and ``Router`` extends it.
This module is compiled with the data path (``fastproxy.compiled``; types in ``routerbase.pxd``) and
``proxy.pxd`` types the exchange's and the connection's ``router`` as a ``RouterBase``, so each of
those reads is a C struct read instead of an attribute lookup on a Python object (a dict probe
each), and ``forwarding_headers`` is a C call. ``Router`` stays a plain Python class on top (its
instances have a ``__dict__`` for everything else; subclasses and patched methods work as before).

Every field is written by ``Router.__init__`` (and ``snapshot``/``draining`` by the state path and
the drain) and read here and by the data path; nothing here is the data path's to change but the
request-id counter.
"""

from __future__ import annotations

from typing import Any

from fastproxy.exchange import RequestHead

# The X-Forwarded-Proto pair an untrusted client gets (every request without a trusted hop).
_FORWARDED_PROTO_HTTP = (b"x-forwarded-proto", b"http")


class RouterBase:
    # config: RouterConfig, draining: bool, loop: the event loop, outliers: OutlierDetector,
    # pool: UpstreamPool, service_header: bytes (lower case), slots: SlotTable, snapshot:
    # RoutingSnapshot, stats: RouterStats; _request_prefix and _request_count make request ids;
    # write_queue: client connections with a response to write at the end of this loop iteration,
    # write_flusher: the callable that writes them (fastproxy.proxy.flush_queued_writes, bound to
    # this router), write_context: the (empty) contextvars context it runs in.
    __slots__ = (
        "_request_count",
        "_request_prefix",
        "config",
        "draining",
        "loop",
        "outliers",
        "pool",
        "service_header",
        "slots",
        "snapshot",
        "stats",
        "write_context",
        "write_flusher",
        "write_queue",
    )

    def forwarding_headers(
        self, peer_bytes: bytes, trusted: bool, head: RequestHead
    ) -> list[tuple[bytes, bytes]]:
        """X-Forwarded-*: the client's own values only from a trusted hop; the real peer appended.
        A request without an X-Request-Id gets one: this router's prefix and a counter."""
        if not trusted:
            # The common case (no trusted hop): one list literal, the proto pair a constant.
            if head.request_id is not None:
                return [(b"x-forwarded-for", peer_bytes), _FORWARDED_PROTO_HTTP]
            self._request_count += 1
            request_id = head.request_id = b"%s-%x" % (self._request_prefix, self._request_count)
            return [
                (b"x-forwarded-for", peer_bytes),
                _FORWARDED_PROTO_HTTP,
                (b"x-request-id", request_id),
            ]
        headers: list[tuple[bytes, bytes]] = []
        prior_for: Any = None
        proto = b"http"
        for name, value in head.forwarded:
            if name == b"x-forwarded-for":
                prior_for = value if prior_for is None else prior_for + b", " + value
            elif name == b"x-forwarded-proto":
                proto = value
            else:
                headers.append((name, value))
        headers.append(
            (b"x-forwarded-for", peer_bytes if prior_for is None else prior_for + b", " + peer_bytes)
        )
        headers.append((b"x-forwarded-proto", proto))
        if head.request_id is None:
            self._request_count += 1
            head.request_id = b"%s-%x" % (self._request_prefix, self._request_count)
            headers.append((b"x-request-id", head.request_id))
        return headers
