"""Every record that crosses a process boundary or is stored in Valkey.

Theory of operation
-------------------
All wire and stored records are frozen ``msgspec.Struct`` types encoded as msgpack by the
module-level ``encode``/``decode_*`` helpers below (one encoder/decoder per type, built once at
import). Decoding is all-or-nothing: msgspec validates the whole message against the type before it
builds anything, so a bad message raises ``SchemaError`` naming the offending field
(``Expected `int`, got `str` - at `$.port```) and never yields a half-built record.

Events form one tagged union (``PodEvent | RouteChanged``, tag field ``kind``) so the writer's
stream has a single decoder. A ``PodRecord`` is what the writer stores per pod and what a delta
carries; a ``Delta`` is one committed batch, versioned by (epoch, version); a ``Heartbeat`` lets a
subscriber notice a silent pub/sub connection.
"""

from __future__ import annotations

import enum
import re
import sys
from collections.abc import Iterable
from typing import Annotated, Any, Final

import msgspec

from statesync.keys import POD_CHUNKS


class SchemaError(ValueError):
    """A message did not match its schema; the text names the field and what was wrong."""


class PodState(enum.StrEnum):
    PENDING = "pending"
    READY = "ready"
    NOT_READY = "not_ready"
    QUARANTINED = "quarantined"
    DRAINING = "draining"
    # Terminal tombstone: kept by the writer for a while so late events for the UID stay inert.
    REMOVED = "removed"


class Source(enum.StrEnum):
    """Who said it. Order of trust for readiness: SIDECAR > INFORMER."""

    SIDECAR = "sidecar"
    INFORMER = "informer"
    ROUTER = "router"
    AGENT = "agent"
    WRITER = "writer"  # the writer's own recovery checks
    OPERATOR = "operator"  # a person, through the admin API or a static routes file


class ConnectFailureKind(enum.StrEnum):
    REFUSED = "refused"
    TIMEOUT = "timeout"
    RESET = "reset"
    UNREACHABLE = "unreachable"
    # The sidecar said "full" before the app saw anything: a capacity signal, not a fault.
    BUSY_REFUSED = "busy_refused"


# Field constraints shared by several records. Kubernetes names are DNS labels/subdomains.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Concurrency = Annotated[int, msgspec.Meta(ge=1, le=100_000)]
Generation = Annotated[int, msgspec.Meta(ge=0)]
Weight = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Timestamp = Annotated[float, msgspec.Meta(ge=0)]
IPAddress = Annotated[str, msgspec.Meta(min_length=2, max_length=45, pattern=r"^[0-9A-Fa-f:.]+$")]
# A record's address was validated as an ``IPAddress`` when its event came in; records are written
# only by the writer, so reading them back checks the length alone. (The pattern is a regular
# expression run per record: at 50k pods it was 40% of a router's bootstrap decode.)
RecordAddress = Annotated[str, msgspec.Meta(min_length=2, max_length=45)]
ChunkNumber = Annotated[int, msgspec.Meta(ge=0, lt=POD_CHUNKS)]
# LoRA adapters a pod has loaded (names as the app knows them, e.g. vLLM's ``--lora-modules``).
AdapterName = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Adapters = Annotated[tuple[AdapterName, ...], msgspec.Meta(max_length=256)]


class PodRecord(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """The writer's view of one pod; what the snapshot holds and a delta carries.

    ``gc=False``: every field is a str, number, bool, enum or tuple of str, so a record can never
    be part of a reference cycle; untracked, 50k records cost the cyclic collector nothing.

    ``array_like``: encoded as a msgpack array of the field values in declaration order, not a map
    (field names were 45% of the bytes a router reads at bootstrap, and matching them a tenth of the
    decode). Fields are therefore only ever *appended*, each with a default: a reader ignores
    trailing values it does not know and fills missing trailing ones from the defaults, so older
    and newer versions read each other's records. Records in the earlier map form (written before
    this format) still decode (``_MapPodRecord``), so a new writer or router reads an old state.
    Only the writer writes records, so routers and agents are upgraded before the writer."""

    uid: Name
    namespace: Name
    revision: Name
    ip: RecordAddress
    port: Port
    concurrency: Concurrency = 1
    state: PodState = PodState.PENDING
    reason: str = ""
    source: Source = Source.INFORMER
    since: Timestamp = 0.0
    # Bumped by the state machine on every state change; observers' reports carry the generation
    # they saw, so a report about an earlier incarnation of the pod's state is dropped as stale.
    generation: Generation = 0
    # Last readiness reported by the most trusted source so far, and who that was. Quarantine
    # remembers it so a passing health check restores Ready or NotReady as the pod itself says.
    ready: bool = False
    readiness_source: Source | None = None
    # When the readiness above was reported (the reporter's clock): an older report that arrives
    # late (a claimed entry, a slow path) must not overwrite a newer one.
    readiness_at: Timestamp = 0.0
    # LoRA adapters the pod has loaded, as its sidecar reports them; a request naming one of them
    # prefers these pods (``fastproxy.affinity``). Appended last: older records read as ().
    adapters: Adapters = ()

    @property
    def routable(self) -> bool:
        return self.state is PodState.READY

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)


class _MapPodRecord(PodRecord, frozen=True, kw_only=True, array_like=False, gc=False):
    """A record in the earlier map form: read (and converted to ``PodRecord``) only, never written."""


# Public name of the map form, for records a person writes (a static routes file).
MapPodRecord = _MapPodRecord


def _name_field(message: str) -> str:
    """A record's error path ends in its field's index (``$[4]``); say which field that is."""
    match = _FIELD_AT_END.search(message)
    if match is None or int(match.group(1)) >= len(PodRecord.__struct_fields__):
        return message
    return f"{message} ({PodRecord.__struct_fields__[int(match.group(1))]})"


def _from_map(record: PodRecord) -> PodRecord:
    if type(record) is PodRecord:
        return record
    return PodRecord(**msgspec.structs.asdict(record))


# ---- events: one tagged union, tag field "kind" -------------------------------------------------


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    uid: Name
    source: Source
    at: Timestamp = 0.0
    # None: a statement of current truth (sidecar, informer). An int: the pod generation the
    # observer saw; older than the record's generation means stale, and the event is dropped.
    generation: Generation | None = None


class PodDiscovered(_Event, frozen=True, kw_only=True, tag="discovered"):
    namespace: Name
    revision: Name
    ip: IPAddress
    port: Port
    concurrency: Concurrency = 1
    ready: bool | None = None
    # The LoRA adapters loaded in the pod (the sidecar knows; the informer does not: None keeps
    # what the record has).
    adapters: Adapters | None = None


class ReadinessChanged(_Event, frozen=True, kw_only=True, tag="readiness_changed"):
    ready: bool
    reason: str = ""


class ConnectFailed(_Event, frozen=True, kw_only=True, tag="connect_failed"):
    failure: ConnectFailureKind
    observer: str = ""  # router/agent instance id, for corroboration
    reason: str = ""


class HealthCheckPassed(_Event, frozen=True, kw_only=True, tag="health_check_passed"):
    pass


class HealthCheckFailed(_Event, frozen=True, kw_only=True, tag="health_check_failed"):
    reason: str = ""


class DrainStarted(_Event, frozen=True, kw_only=True, tag="drain_started"):
    reason: str = ""


class PodRemoved(_Event, frozen=True, kw_only=True, tag="removed"):
    reason: str = ""


PodEvent = (
    PodDiscovered
    | ReadinessChanged
    | ConnectFailed
    | HealthCheckPassed
    | HealthCheckFailed
    | DrainStarted
    | PodRemoved
)

# ---- routes ----------------------------------------------------------------------------------


class WeightedRevision(msgspec.Struct, frozen=True, kw_only=True):
    revision: Name
    weight: Weight = 100


class AffinityPolicy(enum.StrEnum):
    """How a route's requests pick among a revision's free pods (``fastproxy.affinity``)."""

    LEAST_INFLIGHT = "least-inflight"  # the pod with the fewest in flight (idle longest first)
    PREFIX = "prefix"  # the prompt's (or session's) pod on a hash ring, with bounded loads


JsonKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# A route's affinity wait, at most (ms): far above any wait that pays (a prefill saved), far below
# a request's patience.
MAX_AFFINITY_WAIT_MS: Final = 10_000
# The prompt fields the body peek reads; a model or adapter key cannot be one of them.
PROMPT_KEYS: Final = ("messages", "prompt")
_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")


class LLMRouting(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """How a route reads an OpenAI-style JSON body before it picks a pod (``fastproxy.llm``).

    The body is read up to ``max_body_bytes`` (only for routes that have this), then streamed to
    the pod unchanged. Its ``model_key`` field names the model: a model listed in ``models`` goes
    to that service's route (its revisions; this route's policy), any other to this route's own
    revisions. A body without the field, not a JSON object, or over the bound is refused (400 /
    413) when ``require_model``, else served by this route's own revisions without affinity.
    ``adapter_key`` names the LoRA adapter field ("": the model value names it, as vLLM does);
    pods advertising that adapter are preferred. ``policy: prefix`` keys the pick by the
    ``session_header`` value when the request has one, else by the first ``prefix_bytes`` of the
    prompt (``messages``, else ``prompt``, as sent); ``epsilon`` bounds an affine pod's load to
    (1 + epsilon) times the revision's average. ``affinity_wait_ms`` (``policy: prefix`` only): a
    request whose affine pods are full while another pod is free waits up to this long for one of
    them (0: never; ``fastproxy.affinity.pick_or_wait``); unset (None), the router's
    ``--affinity-wait-ms`` holds. Every router caps it at its own queue timeout.

    Fields left at their defaults are not encoded (``omit_defaults``): a router that predates a
    field (it refuses unknown ones) still reads every section that does not set it, so a new
    writer can roll out before the routers -- set a new field only once they all know it."""

    policy: AffinityPolicy = AffinityPolicy.LEAST_INFLIGHT
    model_key: JsonKey = "model"
    models: dict[Annotated[str, msgspec.Meta(min_length=1, max_length=253)], Name] = {}
    require_model: bool = True
    adapter_key: str = ""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=256, le=64 * 1024 * 1024)] = 1024 * 1024
    prefix_bytes: Annotated[int, msgspec.Meta(ge=16, le=1024 * 1024)] = 1024
    session_header: str = ""
    epsilon: Annotated[float, msgspec.Meta(gt=0, le=100)] = 0.25
    affinity_wait_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_AFFINITY_WAIT_MS)] | None = None

    def __post_init__(self) -> None:
        if self.model_key in PROMPT_KEYS:
            raise ValueError(f"model_key {self.model_key!r} is a prompt field; name the model field")
        if self.adapter_key and (self.adapter_key in PROMPT_KEYS or self.adapter_key == self.model_key):
            raise ValueError(
                f"adapter_key {self.adapter_key!r} must differ from model_key and the prompt fields "
                f'(leave it "" when the model field names the adapter)'
            )
        if self.session_header:
            if not _HEADER_NAME.match(self.session_header):
                raise ValueError(f"session_header {self.session_header!r}: a lower-case header name")
            if self.policy is not AffinityPolicy.PREFIX:
                raise ValueError("session_header is used only by policy: prefix")
        if self.affinity_wait_ms is not None and self.policy != AffinityPolicy.PREFIX:
            raise ValueError(
                "affinity_wait_ms is used only by policy: prefix (a request of another policy has no "
                "affine pod to wait for)"
            )


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """Requests matching (any of ``hosts``, or any host if empty) and ``path_prefix``, or carrying
    the service header with value ``service``, go to ``service``, split over ``revisions`` by
    weight. ``hosts`` entries are exact names or ``*.suffix`` wildcards. ``llm``: read the JSON
    body first (model routing, prefix and adapter affinity; see ``LLMRouting``)."""

    service: Name
    revisions: tuple[WeightedRevision, ...]
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"
    removed: bool = False
    llm: LLMRouting | None = None

    def __post_init__(self) -> None:
        if not self.path_prefix.startswith("/"):
            raise ValueError(f"route {self.service!r}: path_prefix must start with '/'")
        if not self.removed and not any(r.weight > 0 for r in self.revisions):
            raise ValueError(f"route {self.service!r}: needs at least one revision with weight > 0")


class RouteChanged(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="route_changed"):
    route: Route
    source: Source = Source.OPERATOR
    at: Timestamp = 0.0


Event = PodEvent | RouteChanged

# ---- committed state -------------------------------------------------------------------------


class Delta(msgspec.Struct, frozen=True, kw_only=True):
    """One committed batch. A subscriber applies it only if version == its version + 1."""

    epoch: Generation
    version: Generation
    pods: tuple[PodRecord, ...] = ()
    routes: tuple[Route, ...] = ()


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="heartbeat"):
    epoch: Generation
    version: Generation
    at: Timestamp = 0.0


# ---- codecs (module level: built once) -------------------------------------------------------

_encoder: Final = msgspec.msgpack.Encoder()
_event_decoder: Final = msgspec.msgpack.Decoder(Event)
_pod_decoder: Final = msgspec.msgpack.Decoder(PodRecord)
_pods_decoder: Final = msgspec.msgpack.Decoder(list[PodRecord])
_delta_decoder: Final = msgspec.msgpack.Decoder(Delta)


class _MapDelta(Delta, frozen=True, kw_only=True):
    pods: tuple[_MapPodRecord, ...] = ()


# Readers of the earlier, map-form records (a state or change log left by an older writer). Tried
# only after the current decoder refused the bytes as not an array, so current data never pays.
_legacy_pod_decoder: Final = msgspec.msgpack.Decoder(_MapPodRecord)
_legacy_pods_decoder: Final = msgspec.msgpack.Decoder(list[_MapPodRecord])
_legacy_delta_decoder: Final = msgspec.msgpack.Decoder(_MapDelta)
_NOT_AN_ARRAY = "Expected `array`, got `object`"
_FIELD_AT_END: Final = re.compile(r"\[(\d+)\]`$")
_heartbeat_decoder: Final = msgspec.msgpack.Decoder(Heartbeat)
_route_decoder: Final = msgspec.msgpack.Decoder(Route)
_chunk_numbers_decoder: Final = msgspec.msgpack.Decoder(list[ChunkNumber])

encode: Final = _encoder.encode


def _decode(decoder: msgspec.msgpack.Decoder[Any], data: bytes, what: str) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SchemaError(f"invalid {what}: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"undecodable {what}: {exc}") from None


def decode_event(data: bytes) -> Event:
    result: Event = _decode(_event_decoder, data, "event")
    return result


def _decode_either_form(decoder: Any, map_decoder: Any, data: bytes, what: str, from_map: Any) -> Any:
    """Records in the current (array) form; if the bytes hold the earlier map form instead, read
    them with ``map_decoder`` and convert. Errors name the record's field either way."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        if _NOT_AN_ARRAY in str(exc):
            return from_map(_decode(map_decoder, data, what))
        raise SchemaError(f"invalid {what}: {_name_field(str(exc))}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"undecodable {what}: {exc}") from None


def _delta_from_map(legacy: Delta) -> Delta:
    pods = tuple(_from_map(pod) for pod in legacy.pods)
    return Delta(epoch=legacy.epoch, version=legacy.version, pods=pods, routes=legacy.routes)


# ---- shared values: what 50k records hold in common is held once -------------------------------

_intern: Final = sys.intern
_set_field: Final = msgspec.structs.force_setattr
_ZERO: Final = 0.0
_PORTS: dict[int, int] = {}  # (ints above 256 are objects of their own; at most 65535 entries)


def share_values(records: Iterable[PodRecord]) -> None:
    """Make freshly decoded ``records`` hold the values most pods have in common as one shared
    object each: namespace, revision and reason strings (interned), the port, a zero timestamp.

    A decoder makes a new object per value; at 50k pods that is ~200 bytes a pod of copies of the
    same few strings (issue 15: a router holding 50k pods in <= 60 MB). Equal values either way,
    so no reader can tell. The records must be fresh from the decoder (a frozen record's fields are
    set in place): nobody else can have seen them yet. Interned strings are freed when no record
    uses them any more, so a churning state does not grow the interned set."""
    intern = _intern
    set_field = _set_field
    ports = _PORTS
    for record in records:
        set_field(record, "namespace", intern(record.namespace))
        set_field(record, "revision", intern(record.revision))
        if record.reason:
            set_field(record, "reason", intern(record.reason))
        port = record.port
        set_field(record, "port", ports.setdefault(port, port))
        if not record.readiness_at:
            set_field(record, "readiness_at", _ZERO)
        if not record.since:
            set_field(record, "since", _ZERO)


def decode_pod(data: bytes) -> PodRecord:
    result: PodRecord = _decode_either_form(_pod_decoder, _legacy_pod_decoder, data, "pod record", _from_map)
    share_values([result])
    return result


def is_map_form(data: bytes) -> bool:
    """Is this encoded record in the earlier map form (a msgpack map rather than an array)?"""
    first = data[0] if data else 0
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def decode_pods(data: bytes) -> list[PodRecord]:
    """A msgpack array of pod records (a chunk of ``{ns}:pod-chunks``), in one decoder call."""
    result: list[PodRecord] = _decode_either_form(
        _pods_decoder, _legacy_pods_decoder, data, "pod records", lambda pods: [_from_map(p) for p in pods]
    )
    share_values(result)
    return result


def pack_array(items: list[bytes]) -> bytes:
    """A msgpack array from already encoded items: the array header, then the items as they are."""
    count = len(items)
    if count < 16:
        header = bytes((0x90 | count,))
    elif count < 0x10000:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return header + b"".join(items)


def decode_delta(data: bytes) -> Delta:
    try:  # (the router's receive path: one decoder call, no frame in between, for current data)
        result: Delta = _delta_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        # the earlier map form, or bytes that are no delta: the general path converts or names it
        result = _decode_either_form(_delta_decoder, _legacy_delta_decoder, data, "delta", _delta_from_map)
    share_values(result.pods)
    return result


def decode_heartbeat(data: bytes) -> Heartbeat:
    result: Heartbeat = _decode(_heartbeat_decoder, data, "heartbeat")
    return result


def decode_chunk_numbers(data: bytes) -> list[int]:
    """A revision's field of the writer's revision index: the chunks that hold its pods."""
    result: list[int] = _decode(_chunk_numbers_decoder, data, "revision index entry")
    return result


def decode_route(data: bytes) -> Route:
    result: Route = _decode(_route_decoder, data, "route")
    return result
