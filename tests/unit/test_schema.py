"""Wire/storage schema (statesync.schema): msgpack round-trips and all-or-nothing rejection.

Covers:
- round-trips (``encode`` then the matching ``decode_*`` gives an equal object of the same type) for
  PodRecord, every member of the event union (each ConnectFailureKind), Route, Delta and Heartbeat,
  plus a hypothesis property round-trip over arbitrary valid PodRecords;
- rejection: undecodable bytes (garbage, every truncation of a valid message), wrong field types
  and out-of-range values (the SchemaError text names the field path, e.g. ``$.port``), missing
  required fields, unknown event tags, and route rules enforced in ``Route.__post_init__`` (a
  route with all weights 0, or a path_prefix not starting with "/") when decoded from bytes;
- decoders never raise anything but SchemaError, whatever bytes they are given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from statesync.schema import (
    ConnectFailed,
    ConnectFailureKind,
    Delta,
    DrainStarted,
    HealthCheckFailed,
    HealthCheckPassed,
    Heartbeat,
    PodDiscovered,
    PodRecord,
    PodRemoved,
    PodState,
    ReadinessChanged,
    Route,
    RouteChanged,
    SchemaError,
    Source,
    WeightedRevision,
    decode_delta,
    decode_event,
    decode_heartbeat,
    decode_pod,
    decode_pods,
    decode_route,
    encode,
    is_map_form,
    pack_array,
)

# ---- fixtures / builders --------------------------------------------------------------------


def make_pod(**overrides: Any) -> PodRecord:
    fields: dict[str, Any] = {
        "uid": "3f2a9c1e-0000-4000-8000-000000000001",
        "namespace": "inference",
        "revision": "llama-00042",
        "ip": "10.1.2.3",
        "port": 8080,
        "concurrency": 4,
        "state": PodState.QUARANTINED,
        "reason": "connect refused by router-7",
        "source": Source.ROUTER,
        "since": 1_700_000_000.25,
        "generation": 7,
        "ready": True,
        "readiness_source": Source.SIDECAR,
    }
    fields.update(overrides)
    return PodRecord(**fields)


def make_route(**overrides: Any) -> Route:
    fields: dict[str, Any] = {
        "service": "llama",
        "revisions": (
            WeightedRevision(revision="llama-00041", weight=10),
            WeightedRevision(revision="llama-00042", weight=90),
        ),
        "hosts": ("llama.example.com", "*.llama.internal"),
        "path_prefix": "/v1/",
    }
    fields.update(overrides)
    return Route(**fields)


def as_dict(obj: Any) -> dict[str, Any]:
    """The plain-builtins form of a record, for building deliberately broken messages."""
    result: dict[str, Any] = msgspec.to_builtins(obj)
    return result


def pack(obj: Any) -> bytes:
    """msgpack-encode arbitrary builtins, bypassing the schema (to make bad messages)."""
    return msgspec.msgpack.encode(obj)


POD_FIELDS = PodRecord.__struct_fields__
# A record is an array of its values (the current form) or, written by an earlier writer, a map of
# them; both are read, and bad input is named by field in both.
FORMS = ["array", "map"]


def pod_fields(pod: PodRecord) -> dict[str, Any]:
    # (as msgpack gives them back: a tuple field comes out as a list)
    return {field: msgspec.msgpack.decode(encode(getattr(pod, field))) for field in POD_FIELDS}


def pack_pod(fields: dict[str, Any], form: str) -> bytes:
    if form == "map":
        return pack(fields)
    return pack([fields[field] for field in POD_FIELDS])


def field_path(field: str, form: str, prefix: str = "$") -> str:
    if form == "map":
        return f"`{prefix}.{field}`"
    return f"`{prefix}[{POD_FIELDS.index(field)}]` ({field})"


UID = "3f2a9c1e-0000-4000-8000-000000000001"

ALL_EVENTS = [
    PodDiscovered(
        uid=UID,
        source=Source.INFORMER,
        at=12.5,
        namespace="inference",
        revision="llama-00042",
        ip="10.1.2.3",
        port=8080,
        concurrency=8,
    ),
    PodDiscovered(
        uid=UID,
        source=Source.SIDECAR,
        namespace="ns",
        revision="r",
        ip="fd00::1",
        port=1,
        ready=True,
    ),
    PodDiscovered(
        uid=UID,
        source=Source.INFORMER,
        namespace="ns",
        revision="r",
        ip="10.0.0.1",
        port=65535,
        ready=False,
        generation=3,
    ),
    ReadinessChanged(uid=UID, source=Source.SIDECAR, at=1.0, ready=True),
    ReadinessChanged(uid=UID, source=Source.INFORMER, ready=False, reason="probe failed"),
    *[
        ConnectFailed(
            uid=UID,
            source=Source.ROUTER,
            at=3.0,
            generation=2,
            failure=kind,
            observer="router-7",
            reason=f"{kind.value} on connect",
        )
        for kind in ConnectFailureKind
    ],
    HealthCheckPassed(uid=UID, source=Source.WRITER, at=4.0, generation=5),
    HealthCheckFailed(uid=UID, source=Source.WRITER, generation=5, reason="503"),
    DrainStarted(uid=UID, source=Source.INFORMER, reason="deletionTimestamp set"),
    PodRemoved(uid=UID, source=Source.OPERATOR, at=9.0, reason="gone"),
    RouteChanged(route=make_route(), source=Source.OPERATOR, at=5.0),
    RouteChanged(route=make_route(revisions=(WeightedRevision(revision="x", weight=0),), removed=True)),
]


def _event_id(event: Any) -> str:
    kind = type(event).__name__
    if isinstance(event, ConnectFailed):
        return f"{kind}-{event.failure.value}"
    return kind


# ---- round-trips ------------------------------------------------------------------------------


def test_pod_record_round_trip() -> None:
    pod = make_pod()
    decoded = decode_pod(encode(pod))
    assert type(decoded) is PodRecord
    assert decoded == pod


def test_pod_record_defaults_round_trip() -> None:
    pod = PodRecord(uid="u", namespace="n", revision="r", ip="::1", port=80)
    decoded = decode_pod(encode(pod))
    assert decoded == pod
    assert decoded.state is PodState.PENDING
    assert decoded.readiness_source is None


@pytest.mark.parametrize("event", ALL_EVENTS, ids=_event_id)
def test_event_round_trip(event: Any) -> None:
    decoded = decode_event(encode(event))
    assert type(decoded) is type(event)
    assert decoded == event


def test_every_event_type_and_failure_kind_is_covered() -> None:
    """Guard for the parametrization above: a new event class or failure kind must be added to it."""
    union_members = {
        PodDiscovered,
        ReadinessChanged,
        ConnectFailed,
        HealthCheckPassed,
        HealthCheckFailed,
        DrainStarted,
        PodRemoved,
        RouteChanged,
    }
    assert {type(e) for e in ALL_EVENTS} == union_members
    assert {e.failure for e in ALL_EVENTS if isinstance(e, ConnectFailed)} == set(ConnectFailureKind)


def test_event_carries_its_kind_tag_on_the_wire() -> None:
    event = ReadinessChanged(uid=UID, source=Source.SIDECAR, ready=True)
    assert msgspec.msgpack.decode(encode(event))["kind"] == "readiness_changed"


def test_route_round_trip() -> None:
    route = make_route()
    assert decode_route(encode(route)) == route


def test_delta_round_trip_with_pods_and_routes() -> None:
    delta = Delta(
        epoch=3,
        version=1234,
        pods=(make_pod(), make_pod(uid="other", ip="10.9.9.9", state=PodState.READY, readiness_source=None)),
        routes=(make_route(), make_route(service="mistral", path_prefix="/")),
    )
    decoded = decode_delta(encode(delta))
    assert type(decoded) is Delta
    assert decoded == delta
    assert all(type(p) is PodRecord for p in decoded.pods)
    assert all(type(r) is Route for r in decoded.routes)


def test_empty_delta_round_trip() -> None:
    delta = Delta(epoch=0, version=0)
    assert decode_delta(encode(delta)) == delta


def test_heartbeat_round_trip() -> None:
    beat = Heartbeat(epoch=2, version=99, at=1_700_000_123.5)
    decoded = decode_heartbeat(encode(beat))
    assert type(decoded) is Heartbeat
    assert decoded == beat


# ---- property round-trip ------------------------------------------------------------------------

names = st.text(min_size=1, max_size=253)
pod_records = st.builds(
    PodRecord,
    uid=names,
    namespace=names,
    revision=names,
    ip=st.from_regex(r"[0-9A-Fa-f:.]{2,45}", fullmatch=True),
    port=st.integers(1, 65535),
    concurrency=st.integers(1, 100_000),
    state=st.sampled_from(PodState),
    reason=st.text(),
    source=st.sampled_from(Source),
    since=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    generation=st.integers(0, 2**63 - 1),
    ready=st.booleans(),
    readiness_source=st.none() | st.sampled_from(Source),
)


@settings(max_examples=200)
@given(pod_records)
def test_pod_record_property_round_trip(pod: PodRecord) -> None:
    data = encode(pod)
    decoded = decode_pod(data)
    assert decoded == pod
    assert encode(decoded) == data


# ---- rejection: bytes that are not a message ------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\xc1\xc1\xc1garbage", b"\x00\x01\x02", b"\xff" * 16, b"not msgpack at all"],
    ids=["empty", "reserved-opcode", "reserved-opcode-garbage", "small-ints", "negative-fixints", "ascii"],
)
@pytest.mark.parametrize("decode", [decode_pod, decode_event, decode_delta, decode_heartbeat, decode_route])
def test_garbage_bytes_rejected(decode: Any, data: bytes) -> None:
    with pytest.raises(SchemaError):
        decode(data)


def test_every_truncation_of_a_pod_record_is_rejected() -> None:
    data = encode(make_pod())
    for cut in range(len(data)):
        with pytest.raises(SchemaError, match="undecodable pod record"):
            decode_pod(data[:cut])


def test_truncated_event_and_delta_rejected() -> None:
    event = encode(ALL_EVENTS[0])
    delta = encode(Delta(epoch=1, version=2, pods=(make_pod(),), routes=(make_route(),)))
    for cut in (1, len(event) // 2, len(event) - 1):
        with pytest.raises(SchemaError):
            decode_event(event[:cut])
    for cut in (1, len(delta) // 2, len(delta) - 1):
        with pytest.raises(SchemaError):
            decode_delta(delta[:cut])


@settings(max_examples=200)
@given(st.binary(max_size=64))
@example(b"\x95\xa4\x00\x00\x00\x80")  # a string that is not UTF-8 (msgspec raised UnicodeDecodeError)
@example(b"\x81\xa4kind\xa1\x80")
def test_decoders_raise_only_schema_error(data: bytes) -> None:
    """Whatever the bytes, a decoder returns a record of its type or raises SchemaError."""
    event_types = {type(e) for e in ALL_EVENTS}
    decoders: list[tuple[Callable[[bytes], object], set[type]]] = [
        (decode_pod, {PodRecord}),
        (decode_delta, {Delta}),
        (decode_heartbeat, {Heartbeat}),
        (decode_route, {Route}),
        (decode_event, event_types),
    ]
    for decode, types in decoders:
        try:
            result = decode(data)
        except SchemaError:
            continue
        assert type(result) in types


def test_schema_error_is_a_value_error() -> None:
    assert issubclass(SchemaError, ValueError)


# ---- rejection: well-formed msgpack, wrong shape --------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_wrong_type_names_the_field(form: str) -> None:
    bad = pod_fields(make_pod()) | {"port": "8080"}
    with pytest.raises(SchemaError) as info:
        decode_pod(pack_pod(bad, form))
    message = str(info.value)
    assert field_path("port", form) in message
    assert "Expected `int`, got `str`" in message


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ready", "yes"),
        ("generation", 1.5),
        ("since", "now"),
        ("state", "exploded"),
        ("source", "somebody"),
        ("readiness_source", 3),
        ("uid", 42),
    ],
)
def test_wrong_value_for_pod_field_names_it(field: str, value: Any, form: str) -> None:
    bad = pod_fields(make_pod()) | {field: value}
    with pytest.raises(SchemaError, match=r"^invalid pod record: ") as info:
        decode_pod(pack_pod(bad, form))
    assert str(info.value).endswith(field_path(field, form))


@pytest.mark.parametrize("form", FORMS)
def test_wrong_type_in_nested_record_names_the_path(form: str) -> None:
    pods = [pod_fields(make_pod()), pod_fields(make_pod(uid="second")) | {"port": "80"}]
    as_sent = [p if form == "map" else list(p.values()) for p in pods]
    with pytest.raises(SchemaError) as info:
        decode_delta(pack({"epoch": 1, "version": 1, "pods": as_sent}))
    assert field_path("port", form, prefix="$.pods[1]") in str(info.value)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("port", [0, 70000, -1, 65536])
def test_out_of_range_port_rejected(port: int, form: str) -> None:
    bad = pod_fields(make_pod()) | {"port": port}
    with pytest.raises(SchemaError) as info:
        decode_pod(pack_pod(bad, form))
    assert field_path("port", form) in str(info.value)


@pytest.mark.parametrize("port", [0, 70000])
def test_out_of_range_port_in_discovery_event_rejected(port: int) -> None:
    bad = as_dict(ALL_EVENTS[0]) | {"port": port}
    with pytest.raises(SchemaError) as info:
        decode_event(pack(bad))
    assert "`$.port`" in str(info.value)


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_are_inclusive(port: int) -> None:
    pod = make_pod(port=port)
    assert decode_pod(encode(pod)).port == port


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("concurrency", 0),
        ("concurrency", 100_001),
        ("generation", -1),
        ("since", -0.5),
        ("uid", ""),
        ("namespace", "x" * 254),
        ("ip", "1"),
        ("ip", "1" * 46),
    ],
)
def test_constraint_violations_name_the_field(field: str, value: Any, form: str) -> None:
    bad = pod_fields(make_pod()) | {field: value}
    with pytest.raises(SchemaError) as info:
        decode_pod(pack_pod(bad, form))
    assert field_path(field, form) in str(info.value)


def test_an_address_is_checked_where_it_enters_not_on_every_record_read() -> None:
    """The writer builds records from events; an event's address must look like an IP address.
    Records (written only by the writer) are read back with the length check alone: the pattern
    ran per record and was most of a router's bootstrap decode at 50k pods."""
    event = {"kind": "discovered", "uid": "u", "source": "sidecar", "namespace": "n", "revision": "r",
             "ip": "10.0.0.1; rm -rf", "port": 80}  # fmt: skip
    with pytest.raises(SchemaError) as info:
        decode_event(msgspec.msgpack.encode(event))
    assert "`$.ip`" in str(info.value)
    record = pod_fields(make_pod()) | {"ip": "10.0.0.9"}
    assert decode_pod(pack_pod(record, "array")).ip == "10.0.0.9"


@pytest.mark.parametrize("field", ["uid", "namespace", "revision", "ip", "port"])
def test_missing_required_pod_field_is_named(field: str) -> None:
    """In the earlier map form a field can be missing by name; in the array form, by a record
    cut short before it (every required field comes first)."""
    bad = pod_fields(make_pod())
    del bad[field]
    with pytest.raises(SchemaError, match=f"missing required field `{field}`"):
        decode_pod(pack(bad))
    short = list(pod_fields(make_pod()).values())[: POD_FIELDS.index(field)]
    with pytest.raises(SchemaError, match="Expected `array` of at least length 5"):
        decode_pod(pack(short))


# ---- the record's array form: order fixed, fields only appended, the map form still read ----------

# The wire order of a record's fields. Appending a field (with a default) is the only allowed change:
# a reordering or a removal would make every stored record and every other version misread.
RECORD_FIELDS_IN_WIRE_ORDER = (
    "uid", "namespace", "revision", "ip", "port", "concurrency", "state", "reason", "source", "since",
    "generation", "ready", "readiness_source", "readiness_at", "adapters",
)  # fmt: skip


def test_a_record_is_an_array_of_its_values_in_a_fixed_order() -> None:
    assert POD_FIELDS[: len(RECORD_FIELDS_IN_WIRE_ORDER)] == RECORD_FIELDS_IN_WIRE_ORDER
    pod = make_pod()
    assert msgspec.msgpack.decode(encode(pod)) == list(pod_fields(pod).values())
    required = len(POD_FIELDS) - len(PodRecord.__struct_defaults__)
    assert required == 5, "a new field must come last and have a default"


def test_records_of_newer_and_older_writers_read() -> None:
    pod = make_pod()
    values = list(pod_fields(pod).values())
    newer = pack([*values, "a field a later version appended", 17])
    assert decode_pod(newer) == pod
    older = pack(values[:5])  # a writer that knew only the required fields
    assert decode_pod(older) == PodRecord(uid=pod.uid, namespace=pod.namespace, revision=pod.revision,
                                          ip=pod.ip, port=pod.port)  # fmt: skip


def test_records_in_the_earlier_map_form_still_read() -> None:
    """A state, chunk or change log written by a writer of the earlier map form: a new writer or
    router reads it as it is (records come out as ``PodRecord``, equal to the array-form ones)."""
    pods = [make_pod(), make_pod(uid="other", ip="10.9.9.9", state=PodState.READY, readiness_source=None)]
    maps = [pack(pod_fields(p)) for p in pods]
    assert all(is_map_form(raw) for raw in maps)
    assert not any(is_map_form(encode(p)) for p in pods)
    single = decode_pod(maps[0])
    assert type(single) is PodRecord and single == pods[0]
    chunk = decode_pods(pack_array(maps))
    assert chunk == pods and all(type(p) is PodRecord for p in chunk)
    delta = decode_delta(
        pack({"epoch": 2, "version": 9, "pods": [pod_fields(p) for p in pods], "routes": []})
    )
    assert delta == Delta(epoch=2, version=9, pods=tuple(pods))
    assert all(type(p) is PodRecord for p in delta.pods)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (ReadinessChanged(uid=UID, source=Source.SIDECAR, ready=True), "ready"),
        (ReadinessChanged(uid=UID, source=Source.SIDECAR, ready=True), "uid"),
        (ReadinessChanged(uid=UID, source=Source.SIDECAR, ready=True), "source"),
        (ConnectFailed(uid=UID, source=Source.ROUTER, failure=ConnectFailureKind.RESET), "failure"),
        (ALL_EVENTS[0], "ip"),
    ],
)
def test_missing_required_event_field_is_named(event: Any, field: str) -> None:
    bad = as_dict(event)
    del bad[field]
    with pytest.raises(SchemaError, match=f"missing required field `{field}`"):
        decode_event(pack(bad))


def test_missing_required_field_in_delta_is_named() -> None:
    with pytest.raises(SchemaError, match="missing required field `version`"):
        decode_delta(pack({"epoch": 1}))


def test_unknown_event_kind_rejected() -> None:
    bad = as_dict(ReadinessChanged(uid=UID, source=Source.SIDECAR, ready=True)) | {"kind": "exploded"}
    with pytest.raises(SchemaError) as info:
        decode_event(pack(bad))
    assert "`$.kind`" in str(info.value)


def test_event_without_kind_tag_rejected() -> None:
    bad = as_dict(ReadinessChanged(uid=UID, source=Source.SIDECAR, ready=True))
    del bad["kind"]
    with pytest.raises(SchemaError, match="kind"):
        decode_event(pack(bad))


def test_heartbeat_is_not_an_event() -> None:
    with pytest.raises(SchemaError):
        decode_event(encode(Heartbeat(epoch=1, version=1)))


def test_unknown_connect_failure_kind_rejected() -> None:
    bad = as_dict(ALL_EVENTS[5]) | {"failure": "on_fire"}
    with pytest.raises(SchemaError) as info:
        decode_event(pack(bad))
    assert "`$.failure`" in str(info.value)


# ---- rejection: route rules from Route.__post_init__ ------------------------------------------------

ZERO_WEIGHTS = {
    "service": "llama",
    "revisions": [{"revision": "a", "weight": 0}, {"revision": "b", "weight": 0}],
}
NO_REVISIONS = {"service": "llama", "revisions": []}
RELATIVE_PREFIX = {
    "service": "llama",
    "revisions": [{"revision": "a", "weight": 1}],
    "path_prefix": "v1/",
}
BAD_ROUTES = pytest.mark.parametrize(
    "route",
    [ZERO_WEIGHTS, NO_REVISIONS, RELATIVE_PREFIX],
    ids=["all-weights-0", "no-revisions", "relative-prefix"],
)


@BAD_ROUTES
def test_bad_route_rejected_by_decode_route(route: dict[str, Any]) -> None:
    with pytest.raises(SchemaError, match="invalid route"):
        decode_route(pack(route))


@BAD_ROUTES
def test_bad_route_rejected_inside_route_changed(route: dict[str, Any]) -> None:
    with pytest.raises(SchemaError) as info:
        decode_event(pack({"kind": "route_changed", "route": route}))
    assert "`$.route`" in str(info.value)


@BAD_ROUTES
def test_bad_route_rejected_inside_delta(route: dict[str, Any]) -> None:
    good = as_dict(make_route())
    with pytest.raises(SchemaError) as info:
        decode_delta(pack({"epoch": 1, "version": 2, "routes": [good, route]}))
    assert "`$.routes[1]`" in str(info.value)


def test_removed_route_may_have_zero_weights() -> None:
    route = {**ZERO_WEIGHTS, "removed": True}
    decoded = decode_route(pack(route))
    assert decoded.removed is True
    assert all(r.weight == 0 for r in decoded.revisions)


def test_route_constructor_enforces_the_same_rules() -> None:
    with pytest.raises(ValueError, match="path_prefix"):
        make_route(path_prefix="v1")
    with pytest.raises(ValueError, match="weight > 0"):
        make_route(revisions=(WeightedRevision(revision="a", weight=0),))


def test_negative_weight_rejected() -> None:
    route = {"service": "llama", "revisions": [{"revision": "a", "weight": -1}]}
    with pytest.raises(SchemaError) as info:
        decode_route(pack(route))
    assert "`$.revisions[0].weight`" in str(info.value)
