"""The pod state machine (statesync.podstate): ``apply(record, event) -> Transition``.

Covers:
a) the transition table, cell by cell: the table is complete (every state, including "unknown
   pod" None, times every Signal), and for each cell a concrete record in that state fed a concrete
   event classified as that signal ends where the cell says (a state; HOLD = state unchanged;
   REJECT = Rejected effect and record unchanged; "restore" = READY if record.ready else NOT_READY).
   A state change bumps the generation by exactly 1, stamps ``since`` with ``event.at``, and emits
   StartRecovery on entering QUARANTINED / StopRecovery on leaving it.
b) the rules applied before the table: sidecar readiness outranks the informer's; quarantine holds
   until a passing health check and then restores the readiness the pod last reported; draining is
   one-way; stale observer reports are dropped; unknown UIDs and address changes are rejected;
   busy_refused never quarantines; apply is pure.
c) a hypothesis stateful test driving random event sequences for a few UIDs through apply() and
   checking the machine's invariants after every step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from statesync.podstate import (
    HOLD,
    REJECT,
    TRANSITIONS,
    Changed,
    Dropped,
    Effect,
    Rejected,
    Signal,
    StartRecovery,
    StopRecovery,
    Transition,
    apply,
    classify,
)
from statesync.schema import (
    ConnectFailed,
    ConnectFailureKind,
    DrainStarted,
    HealthCheckFailed,
    HealthCheckPassed,
    PodDiscovered,
    PodRecord,
    PodRemoved,
    PodState,
    ReadinessChanged,
    Source,
)

P, R, N, Q, D, X = (
    PodState.PENDING,
    PodState.READY,
    PodState.NOT_READY,
    PodState.QUARANTINED,
    PodState.DRAINING,
    PodState.REMOVED,
)

UID = "pod-a"
NAMESPACE = "inference"
REVISION = "llama-00042"
IP = "10.0.0.7"
PORT = 8080
AT = 500.0  # every test event happens at this time; records were last changed at SINCE
SINCE = 100.0
GENERATION = 5

# ---- builders ---------------------------------------------------------------------------------


def make_record(state: PodState = R, **overrides: Any) -> PodRecord:
    fields: dict[str, Any] = {
        "uid": UID,
        "namespace": NAMESPACE,
        "revision": REVISION,
        "ip": IP,
        "port": PORT,
        "concurrency": 2,
        "state": state,
        "reason": "setup",
        "source": Source.INFORMER,
        "since": SINCE,
        "generation": GENERATION,
        "ready": state is R,
        "readiness_source": None,
    }
    fields.update(overrides)
    return PodRecord(**fields)


def discovered(
    ready: bool | None = None, source: Source = Source.INFORMER, uid: str = UID, **overrides: Any
) -> PodDiscovered:
    fields: dict[str, Any] = {
        "uid": uid,
        "source": source,
        "at": AT,
        "namespace": NAMESPACE,
        "revision": REVISION,
        "ip": IP,
        "port": PORT,
        "concurrency": 2,
        "ready": ready,
    }
    fields.update(overrides)
    return PodDiscovered(**fields)


def readiness(ready: bool, source: Source = Source.SIDECAR, uid: str = UID) -> ReadinessChanged:
    return ReadinessChanged(uid=uid, source=source, at=AT, ready=ready, reason=f"ready={ready}")


def connect_failed(
    failure: ConnectFailureKind = ConnectFailureKind.REFUSED, generation: int | None = None, uid: str = UID
) -> ConnectFailed:
    return ConnectFailed(
        uid=uid, source=Source.ROUTER, at=AT, generation=generation, failure=failure, observer="router-1"
    )


def check_passed(generation: int | None = None, uid: str = UID) -> HealthCheckPassed:
    return HealthCheckPassed(uid=uid, source=Source.WRITER, at=AT, generation=generation)


def check_failed(generation: int | None = None, uid: str = UID) -> HealthCheckFailed:
    return HealthCheckFailed(uid=uid, source=Source.WRITER, at=AT, generation=generation, reason="503")


def drain(source: Source = Source.INFORMER, uid: str = UID) -> DrainStarted:
    return DrainStarted(uid=uid, source=source, at=AT, reason="terminating")


def removed(source: Source = Source.INFORMER, uid: str = UID) -> PodRemoved:
    return PodRemoved(uid=uid, source=source, at=AT, reason="deleted")


def kinds(effects: tuple[Effect, ...]) -> list[type[Effect]]:
    return [type(e) for e in effects]


# ---- a) the table, cell by cell ---------------------------------------------------------------

ALL_STATES: list[PodState | None] = [None, *PodState]

# One concrete event per signal. Observer reports carry the record's current generation (not stale).
# For an unknown pod, readiness can only arrive with a discovery (see test_unknown_uid_*).
KNOWN_POD_EVENTS: dict[Signal, Callable[[], Any]] = {
    Signal.DISCOVERED: lambda: discovered(ready=None),
    Signal.READY: lambda: readiness(True),
    Signal.NOT_READY: lambda: readiness(False),
    Signal.CONNECT_FAILED: lambda: connect_failed(ConnectFailureKind.TIMEOUT, generation=GENERATION),
    Signal.BUSY: lambda: connect_failed(ConnectFailureKind.BUSY_REFUSED, generation=GENERATION),
    Signal.CHECK_PASSED: lambda: check_passed(generation=GENERATION),
    Signal.CHECK_FAILED: lambda: check_failed(generation=GENERATION),
    Signal.DRAIN: lambda: drain(),
    Signal.REMOVE: lambda: removed(),
}
UNKNOWN_POD_EVENTS: dict[Signal, Callable[[], Any]] = {
    **KNOWN_POD_EVENTS,
    Signal.READY: lambda: discovered(ready=True, source=Source.SIDECAR),
    Signal.NOT_READY: lambda: discovered(ready=False, source=Source.SIDECAR),
    Signal.CONNECT_FAILED: lambda: connect_failed(ConnectFailureKind.TIMEOUT),
    Signal.BUSY: lambda: connect_failed(ConnectFailureKind.BUSY_REFUSED),
    Signal.CHECK_PASSED: lambda: check_passed(),
    Signal.CHECK_FAILED: lambda: check_failed(),
}


def test_transition_table_is_complete() -> None:
    expected = {(state, signal) for state in ALL_STATES for signal in Signal}
    assert set(TRANSITIONS) == expected
    for target in TRANSITIONS.values():
        assert isinstance(target, PodState) or target in (HOLD, REJECT, "restore")


def test_only_quarantine_restores_and_only_check_passed_does_it() -> None:
    restoring = [cell for cell, target in TRANSITIONS.items() if target == "restore"]
    assert restoring == [(Q, Signal.CHECK_PASSED)]


def _cases() -> list[Any]:
    cases = []
    for (state, signal), target in TRANSITIONS.items():
        for was_ready in (False, True) if state is not None else (False,):
            name = f"{state.value if state else 'unknown'}-{signal.value}" + (
                "-was_ready" if was_ready else ""
            )
            cases.append(pytest.param(state, signal, was_ready, target, id=name))
    return cases


@pytest.mark.parametrize(("state", "signal", "was_ready", "target"), _cases())
def test_table_cell(state: PodState | None, signal: Signal, was_ready: bool, target: Any) -> None:
    record = None if state is None else make_record(state, ready=was_ready)
    event = (UNKNOWN_POD_EVENTS if state is None else KNOWN_POD_EVENTS)[signal]()
    assert classify(event) is signal  # the test itself is feeding the right column

    result = apply(record, event)
    assert isinstance(result, Transition)
    new, effects = result

    if target is REJECT:
        assert new == record
        (rejected,) = effects
        assert isinstance(rejected, Rejected) and rejected.uid == UID
        return

    if target is HOLD:
        if state is None:  # nothing to hold: the event is inert
            assert new is None
            assert kinds(effects) == [Dropped]
            return
        assert record is not None and new is not None
        assert new.state is state
        assert new.generation == record.generation
        assert new.since == record.since
        assert not {Rejected, Dropped, StartRecovery, StopRecovery} & set(kinds(effects))
        # A hold may still remember readiness; if anything changed, the change is announced.
        if new != record:
            assert effects == (Changed(new),)
        else:
            assert effects == ()
        return

    expected = (R if was_ready else N) if target == "restore" else target
    assert isinstance(expected, PodState)
    assert new is not None
    assert new.state is expected
    assert new.generation == (record.generation if record else 0) + 1
    assert new.since == event.at
    assert new.source is event.source
    assert (new.uid, new.ip, new.port) == (UID, IP, PORT)
    assert effects[0] == Changed(new)
    assert (StartRecovery(UID, new.generation) in effects) == (expected is Q)
    assert (StopRecovery(UID) in effects) == (state is Q)
    assert not {Rejected, Dropped} & set(kinds(effects))


@pytest.mark.parametrize(
    ("ready", "state"), [(None, P), (True, R), (False, P)], ids=["no-readiness", "ready", "not-ready"]
)
def test_discovery_creates_the_record(ready: bool | None, state: PodState) -> None:
    new, effects = apply(None, discovered(ready=ready, source=Source.INFORMER, concurrency=9))
    assert new is not None
    assert new == PodRecord(
        uid=UID, namespace=NAMESPACE, revision=REVISION, ip=IP, port=PORT, concurrency=9,
        state=state, reason=new.reason, source=Source.INFORMER, since=AT, generation=1,
        ready=ready is True, readiness_source=None if ready is None else Source.INFORMER,
        readiness_at=0.0 if ready is None else AT,
    )  # fmt: skip
    assert effects == (Changed(new),)


# ---- b) rules before the table --------------------------------------------------------------------


class TestSidecarOutranksInformer:
    def test_informer_readiness_after_sidecar_is_dropped(self) -> None:
        record, _ = apply(make_record(R, ready=True, readiness_source=Source.INFORMER), readiness(False))
        assert record is not None
        assert (record.state, record.ready, record.readiness_source) == (N, False, Source.SIDECAR)

        for ready in (True, False):
            new, effects = apply(record, readiness(ready, source=Source.INFORMER))
            assert new == record
            assert kinds(effects) == [Dropped]

    def test_informer_readiness_applies_before_sidecar_speaks(self) -> None:
        record = make_record(N, ready=False, readiness_source=Source.INFORMER)
        new, _ = apply(record, readiness(True, source=Source.INFORMER))
        assert new is not None
        assert (new.state, new.ready) == (R, True)

    def test_informer_rediscovery_keeps_discovery_but_not_its_readiness(self) -> None:
        record = make_record(N, ready=False, readiness_source=Source.SIDECAR)
        new, effects = apply(record, discovered(ready=True, source=Source.INFORMER, concurrency=7))
        assert new is not None
        assert (new.state, new.ready, new.readiness_source) == (N, False, Source.SIDECAR)
        assert new.concurrency == 7  # the rest of the discovery still counts
        assert kinds(effects) == [Changed]

    @pytest.mark.parametrize(("make_event", "target"), [(drain, D), (removed, X)], ids=["drain", "remove"])
    def test_informer_lifecycle_events_still_apply(
        self, make_event: Callable[..., Any], target: PodState
    ) -> None:
        record = make_record(R, ready=True, readiness_source=Source.SIDECAR)
        new, effects = apply(record, make_event(source=Source.INFORMER))
        assert new is not None
        assert new.state is target
        assert new.generation == record.generation + 1
        assert kinds(effects) == [Changed]


@pytest.mark.parametrize("source", [Source.ROUTER, Source.AGENT, Source.OPERATOR, Source.WRITER])
def test_readiness_from_other_sources_cannot_override_the_sidecar(source: Source) -> None:
    record = make_record(N, ready=False, readiness_source=Source.SIDECAR)
    new, _ = apply(record, readiness(True, source=source))
    assert new is not None
    # Outranked like the informer's: state stays NOT_READY and the sidecar's readiness stands.
    assert new.state is N and new.ready is False


class TestQuarantine:
    def test_holds_against_sidecar_ready_until_check_passes(self) -> None:
        record: PodRecord | None = make_record(R, ready=True, readiness_source=Source.SIDECAR)
        record, effects = apply(record, connect_failed(generation=GENERATION))
        assert record is not None and record.state is Q
        assert effects[1:] == (StartRecovery(UID, record.generation),)
        quarantined_at = record.generation

        record, effects = apply(record, readiness(True))
        assert record is not None and record.state is Q
        assert record.generation == quarantined_at
        assert StopRecovery not in kinds(effects)

        record, effects = apply(record, check_failed(generation=quarantined_at))
        assert record is not None and record.state is Q

        record, effects = apply(record, check_passed(generation=quarantined_at))
        assert record is not None and record.state is R
        assert record.generation == quarantined_at + 1
        assert StopRecovery(UID) in effects

    def test_restores_readiness_the_pod_last_reported_while_quarantined(self) -> None:
        record: PodRecord | None = make_record(R, ready=True, readiness_source=Source.SIDECAR)
        record, _ = apply(record, connect_failed())
        assert record is not None and record.state is Q
        record, _ = apply(record, readiness(False))  # the pod changed its mind while quarantined
        assert record is not None and record.state is Q and record.ready is False
        record, _ = apply(record, readiness(True, source=Source.INFORMER))  # outranked: ignored
        assert record is not None and record.ready is False

        record, effects = apply(record, check_passed())
        assert record is not None and record.state is N
        assert StopRecovery(UID) in effects

    def test_stale_check_pass_does_not_release_quarantine(self) -> None:
        record = make_record(Q, ready=True, generation=8)
        new, effects = apply(record, check_passed(generation=7))
        assert new == record
        assert kinds(effects) == [Dropped]


class TestDrainingIsOneWay:
    @pytest.mark.parametrize(
        "event",
        [
            discovered(ready=True, source=Source.SIDECAR),
            readiness(True),
            readiness(False),
            connect_failed(),
            connect_failed(ConnectFailureKind.BUSY_REFUSED),
            check_passed(),
            check_failed(),
            drain(),
        ],
        ids=lambda e: classify(e).value,
    )
    def test_nothing_but_removal_leaves_draining(self, event: Any) -> None:
        record = make_record(D)
        new, _ = apply(record, event)
        assert new is not None
        assert new.state is D
        assert new.generation == record.generation

    def test_removal_leaves_draining(self) -> None:
        new, _ = apply(make_record(D), removed())
        assert new is not None and new.state is X


class TestStaleness:
    @pytest.mark.parametrize(
        "make_event",
        [
            lambda g: connect_failed(generation=g),
            lambda g: connect_failed(ConnectFailureKind.BUSY_REFUSED, generation=g),
            lambda g: check_passed(generation=g),
            lambda g: check_failed(generation=g),
        ],
        ids=["connect_failed", "busy", "check_passed", "check_failed"],
    )
    @pytest.mark.parametrize("state", [R, N, Q])
    def test_stale_observer_report_is_dropped(
        self, make_event: Callable[[int], Any], state: PodState
    ) -> None:
        record = make_record(state, generation=GENERATION)
        new, effects = apply(record, make_event(GENERATION - 1))
        assert new == record
        assert kinds(effects) == [Dropped]
        assert "stale" in effects[0].reason  # type: ignore[attr-defined]

    def test_current_report_is_not_dropped(self) -> None:
        record = make_record(R, generation=GENERATION)
        new, effects = apply(record, connect_failed(generation=GENERATION))
        assert new is not None and new.state is Q
        assert Dropped not in kinds(effects)

    def test_report_without_generation_is_current_truth(self) -> None:
        new, _ = apply(make_record(R, generation=GENERATION), connect_failed(generation=None))
        assert new is not None and new.state is Q

    def test_report_from_before_quarantine_does_not_release_it(self) -> None:
        record, effects = apply(make_record(R, generation=GENERATION), connect_failed(generation=GENERATION))
        assert record is not None and record.state is Q
        new, effects = apply(record, check_passed(generation=GENERATION))  # saw the pre-quarantine state
        assert new == record
        assert kinds(effects) == [Dropped]


class TestIdentity:
    @pytest.mark.parametrize(
        "event",
        [
            readiness(True),
            readiness(False, source=Source.INFORMER),
            connect_failed(),
            check_passed(),
            check_failed(),
            drain(),
        ],
        ids=lambda e: type(e).__name__ + "-" + classify(e).value,
    )
    def test_unknown_uid_event_other_than_discovery_is_rejected(self, event: Any) -> None:
        new, effects = apply(None, event)
        assert new is None
        assert kinds(effects) == [Rejected]

    @pytest.mark.parametrize(
        "change",
        [{"ip": "10.0.0.8"}, {"port": PORT + 1}, {"revision": "llama-00043"}],
        ids=["ip", "port", "revision"],
    )
    @pytest.mark.parametrize("state", [P, R, N, Q, D, X])
    def test_rediscovery_with_a_different_address_is_rejected(
        self, change: dict[str, Any], state: PodState
    ) -> None:
        record = make_record(state)
        new, effects = apply(record, discovered(ready=True, source=Source.SIDECAR, **change))
        assert new == record
        assert kinds(effects) == [Rejected]

    def test_event_for_another_uid_is_a_programming_error(self) -> None:
        with pytest.raises(ValueError, match="pod-b"):
            apply(make_record(R), readiness(True, uid="pod-b"))


@pytest.mark.parametrize("state", [P, R, N, Q], ids=lambda s: s.value)
@pytest.mark.parametrize("generation", [None, GENERATION])
def test_busy_refused_never_quarantines(state: PodState, generation: int | None) -> None:
    record = make_record(state)
    new, effects = apply(record, connect_failed(ConnectFailureKind.BUSY_REFUSED, generation=generation))
    assert new == record
    assert StartRecovery not in kinds(effects)


@pytest.mark.parametrize(
    "failure", [k for k in ConnectFailureKind if k is not ConnectFailureKind.BUSY_REFUSED], ids=str
)
def test_every_transport_failure_quarantines_a_ready_pod(failure: ConnectFailureKind) -> None:
    new, effects = apply(make_record(R), connect_failed(failure))
    assert new is not None and new.state is Q
    assert StartRecovery in kinds(effects)


PURITY_CASES = [
    (None, discovered(ready=True)),
    (None, readiness(True)),
    (make_record(R), connect_failed()),
    (make_record(Q, ready=True), check_passed()),
    (make_record(N, readiness_source=Source.SIDECAR), readiness(True, source=Source.INFORMER)),
    (make_record(D), readiness(True)),
    (make_record(P), discovered(concurrency=11)),
]


@pytest.mark.parametrize(("record", "event"), PURITY_CASES)
def test_apply_is_pure(record: PodRecord | None, event: Any) -> None:
    before = copy.deepcopy(record)
    first = apply(record, event)
    second = apply(record, event)
    assert first == second
    assert record == before


# ---- c) stateful: random event sequences ------------------------------------------------------------

UIDS = ("pod-a", "pod-b", "pod-c")
ADDRESSES = {uid: (f"10.0.1.{i}", 8000 + i) for i, uid in enumerate(UIDS, start=1)}
generation_choice = st.sampled_from(["none", "current", "stale", "future"])


class PodStateMachine(RuleBasedStateMachine):
    """Keeps the writer's record per UID and feeds it random events, checking every step."""

    @initialize()
    def setup(self) -> None:
        self.records: dict[str, PodRecord | None] = dict.fromkeys(UIDS)
        # Has a sidecar readiness report been accepted for this UID?
        self.sidecar_spoke: dict[str, bool] = dict.fromkeys(UIDS, False)
        self.clock = 0.0

    # -- helpers --

    def _now(self) -> float:
        self.clock += 1.0
        return self.clock

    def _generation(self, uid: str, choice: str) -> int | None:
        record = self.records[uid]
        current = record.generation if record else 0
        return {"none": None, "current": current, "stale": max(current - 1, 0), "future": current + 1}[choice]

    def _step(self, event: Any) -> None:
        uid = event.uid
        old = self.records[uid]

        new, effects = apply(old, event)
        assert apply(old, event) == (new, effects), "apply is not deterministic"
        effect_kinds = kinds(effects)
        inert = Rejected in effect_kinds or Dropped in effect_kinds

        # Inert outcomes leave the record exactly as it was.
        if inert:
            assert len(effects) == 1
            assert new == old
        # Any change is announced, and only a change is.
        assert (Changed in effect_kinds) == (new != old)
        if new is not None and new != old:
            assert effects[0] == Changed(new)

        if old is None:
            if new is not None:
                assert isinstance(event, PodDiscovered)
                assert new.generation == 1 and new.since == event.at
        else:
            assert new is not None, "a known pod never disappears"
            self._check_step(old, new, event, effects)

        if new is not None:
            assert (new.uid, new.ip, new.port) == (uid, *ADDRESSES[uid])

        reported_ready = getattr(event, "ready", None)
        if event.source is Source.SIDECAR and reported_ready is not None and not inert:
            assert new is not None and new.ready is reported_ready
            self.sidecar_spoke[uid] = True
        self.records[uid] = new

    def _check_step(self, old: PodRecord, new: PodRecord, event: Any, effects: tuple[Effect, ...]) -> None:
        changed_state = new.state is not old.state
        # generation never decreases, and increases (by one) exactly when the state changes
        assert new.generation == old.generation + (1 if changed_state else 0)
        assert new.since == (event.at if changed_state else old.since)

        # recovery starts on entering quarantine and stops on leaving it
        assert (StartRecovery(old.uid, new.generation) in effects) == (changed_state and new.state is Q)
        assert (StopRecovery(old.uid) in effects) == (changed_state and old.state is Q)

        # draining is one-way, removal is final
        if old.state is D:
            assert new.state in (D, X)
        if old.state is X:
            assert new.state is X

        # quarantine is left only by a passing check, a drain or a removal
        if old.state is Q and changed_state:
            assert isinstance(event, HealthCheckPassed | DrainStarted | PodRemoved)
            if isinstance(event, HealthCheckPassed):
                assert new.state is (R if old.ready else N)

        # a busy sidecar is a capacity signal, never a fault
        if isinstance(event, ConnectFailed) and event.failure is ConnectFailureKind.BUSY_REFUSED:
            assert new == old

        # stale observer reports change nothing
        if (
            isinstance(event, ConnectFailed | HealthCheckPassed | HealthCheckFailed)
            and event.generation is not None
            and event.generation < old.generation
        ):
            assert new == old

        # once the sidecar has spoken, the informer's readiness is ignored
        if self.sidecar_spoke[old.uid] and event.source is Source.INFORMER:
            assert new.ready == old.ready
            assert new.readiness_source is Source.SIDECAR
            if isinstance(event, ReadinessChanged):
                assert new == old

    # -- rules: one per event kind --

    @rule(
        uid=st.sampled_from(UIDS),
        source=st.sampled_from([Source.INFORMER, Source.SIDECAR]),
        ready=st.none() | st.booleans(),
        concurrency=st.integers(1, 4),
    )
    def discover(self, uid: str, source: Source, ready: bool | None, concurrency: int) -> None:
        ip, port = ADDRESSES[uid]
        self._step(
            PodDiscovered(
                uid=uid, source=source, at=self._now(), namespace=NAMESPACE, revision=REVISION,
                ip=ip, port=port, concurrency=concurrency, ready=ready,
            )
        )  # fmt: skip

    @precondition(lambda self: any(r is not None for r in self.records.values()))
    @rule(data=st.data(), move=st.sampled_from(["ip", "port", "revision"]))
    def discover_elsewhere(self, data: st.DataObject, move: str) -> None:
        """A known UID claimed at another address or revision (must be rejected)."""
        uid = data.draw(st.sampled_from([u for u, r in self.records.items() if r is not None]))
        ip, port = ADDRESSES[uid]
        fields: dict[str, Any] = {"ip": ip, "port": port, "revision": REVISION}
        fields[move] = {"ip": "10.99.0.1", "port": port + 100, "revision": "other-revision"}[move]
        before = self.records[uid]
        self._step(
            PodDiscovered(
                uid=uid, source=Source.SIDECAR, at=self._now(), namespace=NAMESPACE, ready=True, **fields
            )
        )
        assert self.records[uid] == before

    @rule(uid=st.sampled_from(UIDS), source=st.sampled_from(Source), ready=st.booleans())
    def readiness_changed(self, uid: str, source: Source, ready: bool) -> None:
        self._step(ReadinessChanged(uid=uid, source=source, at=self._now(), ready=ready))

    @rule(
        uid=st.sampled_from(UIDS),
        source=st.sampled_from([Source.ROUTER, Source.AGENT]),
        failure=st.sampled_from(ConnectFailureKind),
        generation=generation_choice,
    )
    def connect_failed(self, uid: str, source: Source, failure: ConnectFailureKind, generation: str) -> None:
        self._step(
            ConnectFailed(
                uid=uid, source=source, at=self._now(), failure=failure,
                generation=self._generation(uid, generation),
            )
        )  # fmt: skip

    @rule(uid=st.sampled_from(UIDS), passed=st.booleans(), generation=generation_choice)
    def health_check(self, uid: str, passed: bool, generation: str) -> None:
        cls = HealthCheckPassed if passed else HealthCheckFailed
        self._step(
            cls(uid=uid, source=Source.WRITER, at=self._now(), generation=self._generation(uid, generation))
        )

    @rule(uid=st.sampled_from(UIDS), source=st.sampled_from(Source))
    def drain(self, uid: str, source: Source) -> None:
        self._step(DrainStarted(uid=uid, source=source, at=self._now()))

    @rule(uid=st.sampled_from(UIDS), source=st.sampled_from(Source))
    def remove(self, uid: str, source: Source) -> None:
        self._step(PodRemoved(uid=uid, source=source, at=self._now()))

    # -- invariants over the stored records --

    @invariant()
    def records_are_well_formed(self) -> None:
        for uid, record in self.records.items():
            if record is None:
                continue
            assert record.uid == uid
            assert (record.ip, record.port, record.revision) == (*ADDRESSES[uid], REVISION)
            assert record.generation >= 1
            if self.sidecar_spoke[uid]:
                assert record.readiness_source is Source.SIDECAR


PodStateMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPodStateMachine = PodStateMachine.TestCase


def test_a_late_readiness_report_does_not_overwrite_a_newer_one() -> None:
    """A report claimed late from a deposed writer's pending entries carries its old timestamp."""
    record = make_record(N, ready=False, readiness_source=Source.SIDECAR)
    newer, _ = apply(record, ReadinessChanged(uid=UID, source=Source.SIDECAR, at=AT + 10, ready=True))
    assert newer is not None and newer.readiness_at == AT + 10 and newer.state is R
    late, effects = apply(newer, ReadinessChanged(uid=UID, source=Source.SIDECAR, at=AT + 5, ready=False))
    assert late == newer
    assert [type(e) for e in effects] == [Dropped]


def test_adapters_come_from_the_sidecars_report_and_the_informer_keeps_them() -> None:
    created, _ = apply(None, discovered(ready=True, source=Source.SIDECAR, adapters=("sql", "chat")))
    assert created is not None and created.adapters == ("sql", "chat")
    informer, effects = apply(created, discovered(ready=True, source=Source.INFORMER))
    assert informer == created and effects == ()  # None: the informer does not know adapters
    unloaded, effects = apply(created, discovered(ready=True, source=Source.SIDECAR, adapters=("sql",)))
    assert unloaded is not None and unloaded.adapters == ("sql",) and kinds(effects) == [Changed]
    assert unloaded.generation == created.generation  # not a state change: no generation bump
