"""The pod state machine: every allowed transition in one table, and a pure ``apply``.

Theory of operation
-------------------
``apply(record, event) -> Transition(record, effects)`` is a pure function; only the writer calls
it, and it persists ``Transition.record`` and carries out ``Transition.effects``.

An event is first put through four guards, in this order, each of which can end the step with no
state change:

1. identity: a pod is its UID; an event for a UID we do not know is only meaningful if it
   discovers the pod. A UID never changes address; a ``PodDiscovered`` that tries is rejected.
2. staleness: an observer's report carries the pod generation it saw; a report older than the
   record's generation describes a state the pod has already left, and is dropped.
3. trust: the sidecar's readiness outranks every other source's; once a sidecar has spoken for a
   pod, readiness from anyone else (the informer above all) is ignored; their lifecycle events,
   drain and removal, still count.
4. order: a readiness report stamped earlier than the one the record holds (from the same
   source) arrived late, e.g. claimed from a deposed writer's pending entries, and is dropped.

What remains is classified into a ``Signal`` and looked up in ``TRANSITIONS[(state, signal)]``:
a target state, ``HOLD`` (legal, nothing to do but remember the readiness), or ``REJECT``
(illegal: counted, never applied). Every state change bumps the generation and stamps ``since``.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple

import msgspec

from statesync.schema import (
    ConnectFailed,
    ConnectFailureKind,
    DrainStarted,
    HealthCheckFailed,
    HealthCheckPassed,
    PodDiscovered,
    PodEvent,
    PodRecord,
    PodRemoved,
    PodState,
    ReadinessChanged,
    Source,
)


class Signal(enum.Enum):
    DISCOVERED = "discovered"  # no readiness given
    READY = "ready"
    NOT_READY = "not_ready"
    CONNECT_FAILED = "connect_failed"
    BUSY = "busy"
    CHECK_PASSED = "check_passed"
    CHECK_FAILED = "check_failed"
    DRAIN = "drain"
    REMOVE = "remove"


class _Verdict(enum.Enum):
    HOLD = "hold"  # legal; state unchanged (readiness may be remembered)
    REJECT = "reject"  # illegal; counted, never applied


HOLD: Final = _Verdict.HOLD
REJECT: Final = _Verdict.REJECT

# "Check passed" leaves quarantine for whatever readiness the pod last reported.
_RESTORE: Final = "restore"

Target = PodState | _Verdict | str

P, R, N, Q, D, X = (
    PodState.PENDING,
    PodState.READY,
    PodState.NOT_READY,
    PodState.QUARANTINED,
    PodState.DRAINING,
    PodState.REMOVED,
)
S = Signal

# The whole state machine. Row: current state (None = pod unknown). Column: signal.
# Read it as: "a pod in <row> that receives <column> goes to <cell>".
TRANSITIONS: Final[dict[tuple[PodState | None, Signal], Target]] = {
    # unknown pod: only discovery creates it; removal of an unknown pod is a harmless repeat
    (None, S.DISCOVERED): P, (None, S.READY): R, (None, S.NOT_READY): P,
    (None, S.CONNECT_FAILED): REJECT, (None, S.BUSY): HOLD, (None, S.CHECK_PASSED): REJECT,
    (None, S.CHECK_FAILED): REJECT, (None, S.DRAIN): REJECT, (None, S.REMOVE): HOLD,
    # pending: discovered, never servable yet
    (P, S.DISCOVERED): HOLD, (P, S.READY): R, (P, S.NOT_READY): HOLD,
    (P, S.CONNECT_FAILED): HOLD, (P, S.BUSY): HOLD, (P, S.CHECK_PASSED): HOLD,
    (P, S.CHECK_FAILED): HOLD, (P, S.DRAIN): D, (P, S.REMOVE): X,
    # ready: the only routable state
    (R, S.DISCOVERED): HOLD, (R, S.READY): HOLD, (R, S.NOT_READY): N,
    (R, S.CONNECT_FAILED): Q, (R, S.BUSY): HOLD, (R, S.CHECK_PASSED): HOLD,
    (R, S.CHECK_FAILED): HOLD, (R, S.DRAIN): D, (R, S.REMOVE): X,
    # not ready: alive, said it cannot serve; a transport failure still means "check before reuse"
    (N, S.DISCOVERED): HOLD, (N, S.READY): R, (N, S.NOT_READY): HOLD,
    (N, S.CONNECT_FAILED): Q, (N, S.BUSY): HOLD, (N, S.CHECK_PASSED): HOLD,
    (N, S.CHECK_FAILED): HOLD, (N, S.DRAIN): D, (N, S.REMOVE): X,
    # quarantined: holds (remembering readiness) until an active check passes
    (Q, S.DISCOVERED): HOLD, (Q, S.READY): HOLD, (Q, S.NOT_READY): HOLD,
    (Q, S.CONNECT_FAILED): HOLD, (Q, S.BUSY): HOLD, (Q, S.CHECK_PASSED): _RESTORE,
    (Q, S.CHECK_FAILED): HOLD, (Q, S.DRAIN): D, (Q, S.REMOVE): X,
    # draining: one-way; only removal leaves it
    (D, S.DISCOVERED): REJECT, (D, S.READY): REJECT, (D, S.NOT_READY): REJECT,
    (D, S.CONNECT_FAILED): HOLD, (D, S.BUSY): HOLD, (D, S.CHECK_PASSED): HOLD,
    (D, S.CHECK_FAILED): HOLD, (D, S.DRAIN): HOLD, (D, S.REMOVE): X,
    # removed: a tombstone; the UID never comes back
    (X, S.DISCOVERED): REJECT, (X, S.READY): REJECT, (X, S.NOT_READY): REJECT,
    (X, S.CONNECT_FAILED): HOLD, (X, S.BUSY): HOLD, (X, S.CHECK_PASSED): HOLD,
    (X, S.CHECK_FAILED): HOLD, (X, S.DRAIN): HOLD, (X, S.REMOVE): HOLD,
}  # fmt: skip


# ---- effects: what the writer must do besides storing the record -----------------------------


class Effect(msgspec.Struct, frozen=True, tag=True):
    pass


class Changed(Effect, frozen=True):
    """The record changed: persist it and put it in the delta."""

    record: PodRecord


class StartRecovery(Effect, frozen=True):
    """Begin active health checks for a quarantined pod (at this generation)."""

    uid: str
    generation: int


class StopRecovery(Effect, frozen=True):
    uid: str


class Rejected(Effect, frozen=True):
    """An illegal transition or an event for an unknown pod: counted, not applied."""

    uid: str
    reason: str


class Dropped(Effect, frozen=True):
    """A legal but inert event (stale report, outranked source): counted, not applied."""

    uid: str
    reason: str


class Transition(NamedTuple):
    record: PodRecord | None
    effects: tuple[Effect, ...]


_OBSERVER_SIGNALS: Final = frozenset({S.CONNECT_FAILED, S.BUSY, S.CHECK_PASSED, S.CHECK_FAILED})
_READINESS_SIGNALS: Final = frozenset({S.DISCOVERED, S.READY, S.NOT_READY})


def classify(event: PodEvent) -> Signal:
    if isinstance(event, ReadinessChanged):
        return S.READY if event.ready else S.NOT_READY
    if isinstance(event, PodDiscovered):
        if event.ready is None:
            return S.DISCOVERED
        return S.READY if event.ready else S.NOT_READY
    if isinstance(event, ConnectFailed):
        return S.BUSY if event.failure is ConnectFailureKind.BUSY_REFUSED else S.CONNECT_FAILED
    if isinstance(event, HealthCheckPassed):
        return S.CHECK_PASSED
    if isinstance(event, HealthCheckFailed):
        return S.CHECK_FAILED
    if isinstance(event, DrainStarted):
        return S.DRAIN
    if isinstance(event, PodRemoved):
        return S.REMOVE
    raise TypeError(f"not a pod event: {type(event).__name__}")  # pragma: no cover


def _reason(event: PodEvent, signal: Signal) -> str:
    text = getattr(event, "reason", "")
    if isinstance(event, ConnectFailed):
        observer = f" by {event.observer}" if event.observer else ""
        return f"connect {event.failure.value}{observer}" + (f": {text}" if text else "")
    return text or signal.value


def apply(record: PodRecord | None, event: PodEvent) -> Transition:
    """One step of the pod state machine. Pure: same inputs, same outputs; no I/O, no clock."""
    signal = classify(event)
    uid = event.uid
    if record is not None and record.uid != uid:
        raise ValueError(f"event for {uid!r} applied to record {record.uid!r}")

    # 1. identity
    if (
        record is not None
        and isinstance(event, PodDiscovered)
        and ((event.ip, event.port) != (record.ip, record.port) or event.revision != record.revision)
    ):
        return Transition(record, (Rejected(uid, "a pod UID never changes address or revision"),))

    # 2. staleness: observer reports are about a generation; older than ours means stale
    if (
        record is not None
        and event.generation is not None
        and signal in _OBSERVER_SIGNALS
        and event.generation < record.generation
    ):
        return Transition(
            record, (Dropped(uid, f"stale report: generation {event.generation} < {record.generation}"),)
        )

    # 3. trust: the sidecar's readiness beats the informer's
    if (
        record is not None
        and signal in (S.READY, S.NOT_READY)
        and event.source is not Source.SIDECAR
        and record.readiness_source is Source.SIDECAR
    ):
        if isinstance(event, PodDiscovered):
            signal = S.DISCOVERED  # keep the discovery, drop its readiness
        else:
            return Transition(
                record, (Dropped(uid, f"{event.source.value} readiness outranked by the sidecar"),)
            )

    # 4. order: a readiness report older than the one the record holds arrived late; drop it.
    if (
        record is not None
        and signal in (S.READY, S.NOT_READY)
        and event.at
        and event.at < record.readiness_at
        and event.source is record.readiness_source
    ):
        return Transition(record, (Dropped(uid, "readiness report older than the one applied"),))

    state = record.state if record is not None else None
    target = TRANSITIONS[(state, signal)]

    if target is REJECT:
        what = "unknown pod" if state is None else f"illegal transition {state.value} -> {signal.value}"
        return Transition(record, (Rejected(uid, what),))

    if record is None:
        if target is HOLD:
            return Transition(None, (Dropped(uid, f"{signal.value} for an unknown pod"),))
        if not isinstance(event, PodDiscovered):  # readiness for a pod nobody discovered
            return Transition(None, (Rejected(uid, "unknown pod"),))
        created = PodRecord(
            uid=uid,
            namespace=event.namespace,
            revision=event.revision,
            ip=event.ip,
            port=event.port,
            concurrency=event.concurrency,
            state=target if isinstance(target, PodState) else PodState.PENDING,
            reason=_reason(event, signal),
            source=event.source,
            since=event.at,
            generation=1,
            ready=event.ready is True,
            readiness_source=event.source if event.ready is not None else None,
            readiness_at=event.at if event.ready is not None else 0.0,
            adapters=event.adapters or (),
        )
        return Transition(created, (Changed(created),))

    # Remember what the pod says about its readiness, whatever the state does with it.
    updates: dict[str, object] = {}
    if signal in _READINESS_SIGNALS and signal is not S.DISCOVERED and state is not X:
        ready = signal is S.READY
        outranked = record.readiness_source is Source.SIDECAR and event.source is not Source.SIDECAR
        if (ready != record.ready or record.readiness_source is not event.source) and not outranked:
            updates["ready"] = ready
            updates["readiness_source"] = event.source
        if event.at > record.readiness_at and "ready" in updates:
            updates["readiness_at"] = event.at
    if isinstance(event, PodDiscovered) and event.concurrency != record.concurrency and state is not X:
        updates["concurrency"] = event.concurrency
    if (
        isinstance(event, PodDiscovered)
        and event.adapters is not None
        and event.adapters != record.adapters
        and state is not X
    ):
        updates["adapters"] = event.adapters  # what the pod has loaded now (its sidecar says)

    if target is _RESTORE:
        target = R if record.ready else N

    effects: list[Effect] = []
    if target is HOLD or target == state:
        if not updates:
            return Transition(record, ())
        updated = msgspec.structs.replace(record, **updates)
        return Transition(updated, (Changed(updated),))

    assert isinstance(target, PodState)
    updated = msgspec.structs.replace(
        record,
        **updates,
        state=target,
        reason=_reason(event, signal),
        source=event.source,
        since=event.at,
        generation=record.generation + 1,
    )
    effects.append(Changed(updated))
    if target is Q:
        effects.append(StartRecovery(uid, updated.generation))
    elif state is Q:
        effects.append(StopRecovery(uid))
    return Transition(updated, tuple(effects))
