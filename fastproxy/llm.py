"""LLM-aware routing: read an OpenAI-style JSON body (bounded) before picking a pod.

Theory of operation
-------------------
Only routes with an ``llm`` section (``statesync.schema.LLMRouting``) come here; every other route
picks at once, and its requests never touch this module. For an LLM route the exchange holds the
body as it arrives (it always holds body bytes until a pod is ready), up to the route's
``max_body_bytes``, and answers ``Expect: 100-continue`` itself, since the body is needed before
any pod is chosen. When the body is complete (or over the bound) ``LLMRoute.read`` decodes it once
with a module-level msgspec decoder built per (model key, adapter key): the model and adapter as
strings, ``messages`` and ``prompt`` as ``msgspec.Raw`` -- the JSON bytes as sent, never parsed
into objects -- so the peek costs about one pass over the bytes. The held bytes then go to the pod
exactly as they came: nothing is re-encoded.

The result (``LLMRequest``): the service that serves the model (``models``; else the route's own
revisions), the affinity key and the adapter. The key, for ``policy: prefix``, is the session
header's value if the request carries it, else the first ``prefix_bytes`` of the prompt as sent
(``messages``, else ``prompt``), hashed into a 64-bit key (``word_hash``): turns of one
conversation, and conversations that share a system prompt, share those first bytes. The pick
itself is ``fastproxy.affinity``; on a route with ``affinity_wait_ms`` (or, where the route leaves
it unset, a router with ``--affinity-wait-ms``) a keyed request may be told to wait for its busy
affine pods instead (``LLMRequest.pick`` returns None and names them in ``wait_for``; the exchange
waits once, bounded, then picks any free pod). ``LLMRoute.affinity_wait`` holds the route's value
in seconds, resolved when the snapshot is built (-1: the router's flag), so the exchange finds it
beside the rest of the route.

The hash is part of what routers agree on (the same prompt must give the same key in every router,
compiled or pure, on every host), so it is defined here in a few lines rather than taken from a
library: 64-bit little-endian words, each mixed in by an xor, a multiply and a shift, then the
length and murmur3's finaliser. Compiled, that is one load, a multiply and three cheap
instructions per 8 bytes (~1k instructions for a 1 KB prompt; CRC-32 took 3.7k); pure, the same
arithmetic on Python ints (struct unpacks the words). A test holds both forms to the same values.
Routers on another hash (CRC-32, before) send a key elsewhere: upgrading moves every key once.

This module is compiled (``fastproxy.compiled``; its types in ``llm.pxd``): what the peek costs
beyond msgspec's one pass over the bytes and the hash is then a few C attribute reads and calls.

Bad bodies get a clear answer: not JSON, not an object, or a model field that is missing or not a
string -> 400 naming what was wrong; over the bound -> 413 naming the bound -- or, when the route
says ``require_model: false``, the route's own revisions without affinity. Each is logged.
"""

from __future__ import annotations

import logging
import struct
import sys
from typing import TYPE_CHECKING, Any, Final

import cython
import msgspec

from fastproxy import affinity
from fastproxy.errors import BadBody, PayloadTooLarge, ServiceUnavailable
from statesync.schema import AffinityPolicy, LLMRouting

if TYPE_CHECKING:
    from fastproxy.exchange import RequestHead
    from fastproxy.slots import Lease, PodSlots, SlotTable

log = logging.getLogger("fastproxy.llm")

_decoders: dict[tuple[str, str], msgspec.json.Decoder[Any]] = {}
_EMPTY: Final = msgspec.Raw()

# word_hash's constants (typed in llm.pxd): 2**64 - 1; the golden-ratio multiplier; the first of
# murmur3's fmix64 multipliers; an arbitrary seed (pi's fraction), so that empty data is not 0.
_M64 = (1 << 64) - 1
_MUL = 0x9E3779B97F4A7C15
_FMIX = 0xFF51AFD7ED558CCD
_SEED = 0x243F6A8885A308D3
_WORDS: Final = struct.Struct("<Q")
# The compiled form reads the words straight from memory: that is little-endian there.
_LITTLE_ENDIAN = sys.byteorder == "little"


def body_decoder(model_key: str = "model", adapter_key: str = "") -> msgspec.json.Decoder[Any]:
    """The decoder of an LLM body's routing fields (one per key pair, built once)."""
    decoder = _decoders.get((model_key, adapter_key))
    if decoder is None:
        fields: list[tuple[str, Any, Any]] = [
            ("model", str | None, None),
            ("messages", msgspec.Raw, _EMPTY),
            ("prompt", msgspec.Raw, _EMPTY),
        ]
        rename = {"model": model_key}
        if adapter_key:
            fields.append(("adapter", str | None, None))
            rename["adapter"] = adapter_key
        peeked = msgspec.defstruct("PeekedBody", fields, rename=rename, frozen=True, gc=False)
        decoder = _decoders[(model_key, adapter_key)] = msgspec.json.Decoder(peeked)
    return decoder


def prompt_of(peeked: Any) -> msgspec.Raw:
    """The prompt as sent: ``messages`` (chat), else ``prompt`` (completions); empty if neither."""
    messages: msgspec.Raw = peeked.messages
    return messages if len(messages) else peeked.prompt


def word_hash(data: bytes, n: int) -> int:
    """A 64-bit hash of ``data[:n]``, the same in every router and form."""
    if n < 0 or n > len(data):
        raise ValueError(f"word_hash of {n} bytes of {len(data)}")
    h = _SEED
    i = 0
    words = n >> 3
    end = words << 3
    if cython.compiled and _LITTLE_ENDIAN:
        p = data
        q = cython.cast(cython.p_ulonglong, p)  # (ob_sval is 8-aligned; x86 and arm64 load any)
        while i < words:
            h = (h ^ q[i]) * _MUL & _M64
            h ^= h >> 32
            i += 1
        if end < n:
            w = 0
            i = n - 1
            while i >= end:
                w = w << 8 | p[i]
                i -= 1
            h = (h ^ w) * _MUL & _M64
            h ^= h >> 32
    else:
        for (w,) in _WORDS.iter_unpack(memoryview(data)[:end]):
            h = (h ^ w) * _MUL & _M64
            h ^= h >> 32
        if end < n:
            h = (h ^ int.from_bytes(data[end:n], "little")) * _MUL & _M64
            h ^= h >> 32
    h ^= n
    h = h * _FMIX & _M64
    return h ^ h >> 33


def prefix_key(data: Any, prefix_bytes: int) -> int:
    """A 64-bit ring position from the first ``prefix_bytes`` of ``data`` (bytes, or a buffer such
    as the ``msgspec.Raw`` of a prompt)."""
    if type(data) is not bytes:  # (a Raw: its bytes up to the bound, copied once, as word_hash reads bytes)
        data = bytes(data) if len(data) <= prefix_bytes else bytes(memoryview(data)[:prefix_bytes])
    n = len(data)
    return word_hash(data, n if n <= prefix_bytes else prefix_bytes)


class LLMRoute:
    """A route's ``llm`` section compiled for the request path."""

    __slots__ = (
        "adapter_key",
        "affinity_wait",
        "config",
        "decoder",
        "epsilon",
        "max_body_bytes",
        "model_key",
        "models",
        "prefix",
        "prefix_bytes",
        "require_model",
        "service",
        "session_header",
    )

    def __init__(self, service: str, config: LLMRouting) -> None:
        self.service = service
        self.config = config
        self.decoder = body_decoder(config.model_key, config.adapter_key)
        self.model_key = config.model_key
        self.adapter_key = config.adapter_key
        self.models = dict(config.models)
        self.require_model = config.require_model
        self.max_body_bytes = config.max_body_bytes
        self.prefix = config.policy == AffinityPolicy.PREFIX
        self.prefix_bytes = config.prefix_bytes
        self.session_header = config.session_header.encode() if config.session_header else None
        self.epsilon = config.epsilon
        # The route's affinity wait in seconds, resolved here once per snapshot so the exchange
        # reads one C field per request; -1.0: unset, the router's --affinity-wait-ms holds.
        wait_ms = config.affinity_wait_ms
        self.affinity_wait = wait_ms / 1000.0 if wait_ms is not None else -1.0

    def begin(self) -> LLMRequest:
        return LLMRequest(self)

    def read(self, request: LLMRequest, body: bytes, complete: bool, head: RequestHead) -> None:
        """Fill ``request`` from the held body (``complete``: all of it). Raises ``BadBody`` (400)
        or ``PayloadTooLarge`` (413) when the body cannot be routed and the route requires it."""
        if not complete:
            if self.require_model:
                raise PayloadTooLarge(
                    f"route {self.service!r} reads the body to route it, up to {self.max_body_bytes} "
                    f"bytes; this one is larger"
                )
            return  # the route's own revisions, without affinity
        try:
            peeked = self.decoder.decode(body)
        except msgspec.ValidationError as exc:
            if self.require_model:
                raise BadBody(f"request body: {_what(exc, self.model_key)}") from None
            return
        except msgspec.DecodeError as exc:
            if self.require_model:
                what = "empty" if not body else f"not JSON ({exc})"
                raise BadBody(f"request body is {what}; route {self.service!r} routes by its JSON") from None
            return
        model = peeked.model
        if model is None:
            if self.require_model:
                raise BadBody(f"request body has no {self.model_key!r} field (a string naming the model)")
            return
        request.model = model
        if self.models:
            request.service = self.models.get(model)
        request.adapter = peeked.adapter if self.adapter_key else model
        if self.prefix:
            session = head.header(self.session_header) if self.session_header is not None else None
            if session is not None:
                request.key = prefix_key(session, self.prefix_bytes)
            else:
                prompt = prompt_of(peeked)
                if len(prompt):
                    request.key = prefix_key(prompt, self.prefix_bytes)


def _what(exc: msgspec.ValidationError, model_key: str) -> str:
    text = str(exc)
    if text.startswith("Expected `object`"):
        return f"not a JSON object ({text})"
    return text


class LLMRequest:
    """What the body peek found for one request; ``peeking`` until the body is read."""

    __slots__ = (
        "adapter", "deadline", "key", "model", "peeking", "route", "service", "wait_began", "wait_for", "waited",
    )  # fmt: skip

    def __init__(self, route: LLMRoute) -> None:
        self.route = route
        self.peeking = True
        self.model: str | None = None
        self.service: str | None = None  # the model's service (``models``); None: the route's own
        self.key: int | None = None
        self.adapter: str | None = None
        self.deadline = 0.0  # loop time by which the body must have arrived (the router's sweeper)
        # The affine pods to wait for, when ``pick`` (with ``wait``) returned None for that; and
        # whether it did already (a request waits for its affine pods once at most).
        self.wait_for: list[PodSlots] | None = None
        self.waited = False
        # Loop time the affine wait began, while it lasts (0 otherwise): the wait's metrics.
        self.wait_began = 0.0

    def pick(self, table: SlotTable, revision: str, wait: bool = False) -> Lease | None:
        """The pod for this request. With ``wait`` (the route's wait, or the router's, is set), a
        prefix-keyed request whose affine pods are full while another is free gets None and the
        pods in ``wait_for``: the caller waits for one of them, then picks again (``waited``)."""
        key = self.key
        if key is None and self.adapter is None:
            return table.pick(revision)
        if wait and key is not None and not self.waited:
            found = affinity.pick_or_wait(table, revision, key, self.adapter, self.route.epsilon)
            if type(found) is list:
                self.wait_for = found
                return None
            return found  # type: ignore[return-value]
        return affinity.pick(table, revision, key, self.adapter, self.route.epsilon)


def target_unavailable(model: str, service: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"model {model!r} is served by service {service!r}, which has no route")
