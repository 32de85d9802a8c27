"""Router configuration and the static routing file.

Theory of operation
-------------------
``RouterConfig`` gathers every knob of the data path with production defaults; the CLI fills it
from flags. ``load_routes_file`` reads a static routing state (pods and routes, JSON or YAML) with
msgspec, so a mistake is reported with the path of the offending field and nothing half-loaded is
ever used. The static file is how a router runs before (or without) the state-sync writer.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Final

import msgspec

from fastproxy.exchange import Limits
from statesync.schema import MapPodRecord, PodRecord, PodState, Route, share_values


class RouterConfig(msgspec.Struct, kw_only=True):
    limits: Limits = Limits()
    header_timeout: float = 10.0  # whole request head must arrive within this (408)
    idle_timeout: float = 60.0  # idle keep-alive client connection is closed
    connect_timeout: float = 1.0  # upstream connect; on expiry another pod is tried
    first_byte_timeout: float = 300.0  # request fully sent -> response head (504)
    queue_timeout: float = 10.0  # max wait for a free slot (503 + Retry-After)
    # LLM routes with policy: prefix: a request whose affine pods are full while another pod is
    # free may wait this long for one of them (fastproxy.affinity.pick_or_wait), then takes any
    # free pod. 0: never (the default). At most queue_timeout.
    affinity_wait_ms: float = 0.0
    # A router following Valkey: after a read that brought state changes, the next read waits
    # this long, so a burst is read and applied together (statesync.subscriber._Session.received):
    # less CPU per change under load, up to that much more propagation delay. 0: off (default).
    delta_coalesce_ms: float = 0.0
    continue_timeout: float = 1.0  # wait for 100 Continue before sending the body anyway
    max_queued: int = 1000  # waiters per revision
    max_queue_bytes: int = 64 * 1024 * 1024  # buffered request bytes of waiters per revision
    max_attempts: int = 4  # pods tried for one request (connect failures, busy refusals)
    exclusion_seconds: float = 5.0  # local exclusion of a failed pod before it is tried again
    # Broken exchanges (EOF / reset after the request may have reached the app) in a row that
    # exclude a pod; one alone only fails its own request (fastproxy.outlier).
    outlier_consecutive_failures: int = 5
    # A pod excluded for failing to connect is re-checked with a TCP connect this often; one that
    # connects is readmitted before exclusion_seconds is up. 0 turns re-checks off.
    recheck_interval: float = 0.5
    busy_backoff_seconds: float = 0.05  # a pod that said "busy" is skipped locally this long
    pool_idle_timeout: float = 2.0  # below typical app keep-alive timeouts (uvicorn: 5 s)
    pool_max_idle_per_pod: int = 16
    service_header: str = "x-fastproxy-service"
    # Pods run behind the fastproxy sidecar: it refuses with 503 + x-fastproxy-busy before the app
    # sees anything, and bodies are held back behind Expect: 100-continue until it admits them.
    sidecar_protocol: bool = False
    # Sidecar mode: never queue; when no slot is free (or while draining) answer 503 +
    # x-fastproxy-busy before reading the body, so the router re-picks another pod.
    refuse_when_full: bool = False
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-* we keep (and extend)
    grace_period: float = 30.0  # SIGTERM: time for in-flight requests (and WebSocket sessions) to finish
    # A WebSocket session in which no byte moved either way for this long is closed (its pod's slot
    # is held meanwhile). Generous: a realtime voice session may be silent for minutes.
    websocket_idle_timeout: float = 600.0
    # After loading a whole state, freeze what survives out of the cyclic collector's sight
    # (fastproxy.gcwatch.settle): its passes then walk only what changed since, not 50k pods.
    gc_freeze: bool = True
    instance: str = "router"

    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(cidr, strict=False) for cidr in self.trusted_proxies]


class RoutesFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A static routing state: ``routes`` and the ``pods`` behind their revisions."""

    routes: list[Route]
    pods: list[PodRecord] = []


class _RoutesFileAsWritten(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``RoutesFile`` as a person writes it: each pod a map of its fields (a ``PodRecord`` is
    stored as an array of its values, which nobody writes by hand); an array still reads."""

    routes: list[Route]
    pods: list[dict[str, Any] | list[Any]] = []


class _RoutesFileAsRead(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A JSON routes file with its pods left as their bytes: each is decoded straight into its
    record (map or array form), one at a time, so 50k pods never exist twice (issue 15: the peak
    while loading)."""

    routes: list[Route]
    pods: list[msgspec.Raw] = []


_pod_array_json: Final = msgspec.json.Decoder(PodRecord)
_pod_map_json: Final = msgspec.json.Decoder(MapPodRecord)
_ARRAY: Final = ord("[")
_MAP: Final = ord("{")


class ConfigError(ValueError):
    pass


def _pod_of(raw: dict[str, Any] | list[Any] | msgspec.Raw) -> PodRecord:
    if isinstance(raw, msgspec.Raw):
        # (a Raw spans exactly its value: it starts with its bracket)
        first = memoryview(raw)[0]
        if first == _ARRAY:
            record: PodRecord = _pod_array_json.decode(raw)
        elif first != _MAP:
            raise msgspec.ValidationError("Expected a map of the pod's fields (or an array of them)")
        else:
            record = PodRecord(**msgspec.structs.asdict(_pod_map_json.decode(raw)))
    elif isinstance(raw, list):
        record = msgspec.convert(raw, PodRecord)
    else:
        record = PodRecord(**msgspec.structs.asdict(msgspec.convert(raw, MapPodRecord)))
    # A static file states what exists; a pod listed there without a state is meant to serve.
    if record.state is PodState.PENDING:
        record = msgspec.structs.replace(record, state=PodState.READY, generation=max(record.generation, 1))
    return record


def load_routes_file(path: str | Path) -> RoutesFile:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read routes file {path}: {exc.strerror}") from None
    written: _RoutesFileAsWritten | _RoutesFileAsRead
    try:
        if path.suffix in (".yaml", ".yml"):
            written = msgspec.yaml.decode(data, type=_RoutesFileAsWritten)
        else:
            written = msgspec.json.decode(data, type=_RoutesFileAsRead)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"routes file {path}: {exc}") from None
    del data
    raw_pods: list[Any] = written.pods
    written.pods = []
    pods: list[PodRecord] = []
    uids: set[str] = set()
    for index, raw in enumerate(raw_pods):
        try:
            record = _pod_of(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ConfigError(f"routes file {path}: pods[{index}]: {exc}") from None
        if record.uid in uids:
            raise ConfigError(f"routes file {path}: pods[{index}]: duplicate pod uid {record.uid!r}")
        uids.add(record.uid)
        # (one at a time: the copies it drops are freed while the next pod reuses their memory;
        # shared after the last pod, 50k pods' worth of holes stayed in the heap, ~10 MB)
        share_values((record,))
        pods.append(record)
        raw_pods[index] = None  # (a YAML pod's map goes now, not after the last pod)
    del raw_pods, uids
    return RoutesFile(routes=written.routes, pods=pods)
