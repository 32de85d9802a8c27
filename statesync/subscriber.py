"""The router's side of state sync: follow the writer's deltas, and report what the router saw.

Theory of operation
-------------------
``StateFollower.run`` is a trivial loop around ``_session``: any error ends the session, marks the
router stale (it keeps serving its last snapshot), and after a short backoff a new session starts
on a *fresh* connection. A session:

1. subscribes to the delta channel first (so nothing published after the read below is missed),
   on its own connection through ``statesync.pubsub`` (a thin asyncio Protocol; the valkey-py
   client of the session does the full read and the gap fills). Messages are handled inside the
   protocol's ``data_received``: the steady state (the next delta, an old one, a heartbeat that
   asks for nothing) applies right there, without a task, future or timer per message, and the
   deltas that arrived in one read are applied as one batch (one snapshot swap: a delta's cost is
   mostly the event-loop wakeup and the cold caches it finds, so what arrives together is paid
   for once). Anything
   that must await Valkey goes to the session's backlog, and every message after it too until the
   session task has worked through it, so messages are always handled in the order received
   (``_Session``). Nothing is applied before the subscription is confirmed and the state read.
2. reads the whole state in one MULTI/EXEC (version, epoch, pod-chunks, routes) and installs it,
   unless it is older than what the router has or empty (Valkey restarted without state: keep
   serving). The pods come packed (``statesync.keys``: a few thousand chunks, each one msgpack
   array of records), beside the writer's revision index (per revision, the chunks holding its
   pods). A *starting* router (no pods yet) keeps every chunk packed: the table counts its records
   from the array header, each revision gets its chunks from the index (``SlotTable.adopt_unread``),
   and the router routes from there -- a revision's chunks are decoded when it is first used, or
   when the background warm-up gets to it (``_warm_slots``, slices between other work, right
   after). At 50k pods that install is the Valkey read (~10-20 ms) and a few ms more; the decode
   (~40 ms of CPU) moves to first uses and the warm-up. A *running* router (a reconnect, a new
   term) keeps every chunk whose bytes are the ones it read (compared by hash) or kept packed and
   no delta touched since (``PodTable.same_as_read``), decodes the others, and reconciles only the pods that differ
   (``Router.install(changed=...)``): the slots of unchanged pods, in-flight counts included, stay
   as they are. A starting router without a current index (a writer that predates it) decodes
   every chunk (``SnapshotBuilder.add_chunk``: each decoded chunk becomes the snapshot's chunk as
   it is, grouped per revision on the way).
   Decoding is done in slices of about ``SLICE_RECORDS`` records with a yield to the event loop
   between slices, so requests keep flowing on the old snapshot meanwhile; the new snapshot is
   installed in one step at the end. The cyclic garbage collector is paused from the first
   decoded chunk to the install: nothing built forms cycles worth collecting early, and a
   collection started by the allocation bursts would walk every live object, the old snapshot
   included; the collector resumes right after. Once the warm-up after an adopted read is done,
   ``Router.after_bulk_load`` collects once and freezes the survivors (``fastproxy.gcwatch``), so
   later collections walk only what changed since. If the chunks are not at the state's version (a
   writer that predates them) or this router's ACL user may not read them, the per-pod hash is
   read instead.
3. applies each delta only if it is of the snapshot's epoch (the leader's term) and its version is
   exactly one more than the snapshot's; anything newer is a gap, filled from the capped change
   log, and if the log no longer reaches back, re-read whole; anything older or equal is ignored.
   A delta or heartbeat of a *newer* epoch is never applied on top: a new term may have restarted
   its versions (a standby that took over a Valkey restarted empty starts again from 1), so it is
   adopted only through a full, consistent read. State is ordered by (epoch, version) and never
   goes backwards; a newer term's read with no pods while we have some is not adopted (the writer
   is still rebuilding from its sources) -- the router keeps serving, flagged stale.
4. expects a heartbeat {epoch, version} every second; three missed (and nothing at all received
   for a poll interval) means the connection is silent or frozen (pub/sub gives no error then), so
   the session ends and the next one resyncs; a subscription not confirmed within that time ends it
   too. A heartbeat ahead of the snapshot triggers gap filling; a new epoch triggers a full re-read.
   A lost connection, an error reply (AUTH, NOPERM) or an undecodable message ends the session.

``ReportForwarder`` drains the router's local exclusions into the writer's event stream; while
Valkey is unreachable they wait in the router's bounded deque (oldest dropped and counted). It
sleeps until a report is queued (``ReportQueue`` wakes it on append): an idle router has no timer
of its own running here but the session's heartbeat poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import valkey.asyncio as avalkey
from valkey.exceptions import NoPermissionError

from fastproxy.snapshot import SnapshotBuilder, VersionGap
from statesync.keys import DELTA_PREFIX, HEARTBEAT_PREFIX, INDEX_MARKER_FIELD, REVISION_FIELD_PREFIX, Keys
from statesync.pubsub import SubscriberProtocol, subscribe
from statesync.schema import (
    Delta,
    Heartbeat,
    PodRecord,
    PodState,
    Route,
    SchemaError,
    decode_chunk_numbers,
    decode_delta,
    decode_heartbeat,
    decode_pod,
    decode_pods,
    decode_route,
    encode,
)

if TYPE_CHECKING:
    from fastproxy.router import Router

log = logging.getLogger("fastproxy.statesync")

_VALKEY_ERRORS = (OSError, avalkey.ConnectionError, avalkey.TimeoutError)
SLICE_RECORDS = 5_000  # records decoded and added to the new snapshot between two yields (~5 ms)
WARM_SLICE_PODS = 1_000  # pods given their slots between two yields after a bootstrap (~2-3 ms)
WARM_SLICE_CHUNKS = 100  # packed chunks decoded between two yields after a bootstrap (~1-2 ms)


class SessionEnded(Exception):
    pass


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside the block (unless the collector was off already)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class StateFollower:
    def __init__(
        self,
        router: Router,
        url: str,
        *,
        keys: Keys | None = None,
        heartbeat_timeout: float = 3.0,
        retry_delay: float = 0.2,
        coalesce: float = 0.0,
    ) -> None:
        self.router = router
        # Seconds the channel stays unread after a read that brought deltas, so a burst comes in
        # one read and is applied as one batch (0: off). See _Session.
        self.coalesce = coalesce
        self.url = url
        self.keys = keys or Keys()
        self.heartbeat_timeout = heartbeat_timeout
        self.retry_delay = retry_delay
        self.resyncs = 0
        self._told_waiting = False  # "no state yet" said once, not on every read until it comes
        self.gap_fills = 0
        self.sessions = 0
        self.delta_batches = 0  # batches of deltas applied in the steady state (``_Session.received``)
        self.deltas_batched = 0  # the deltas in them
        self.session: _Session | None = None  # the current one (for tests and benchmarks)
        self.synced = asyncio.Event()  # set after each successful full read
        self._chunks_readable = True
        self._stop = False
        self._warming: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while not self._stop:
            try:
                await self._session()
            except (*_VALKEY_ERRORS, SessionEnded, SchemaError) as exc:
                if not self.router.stale:
                    log.warning("state sync lost (%s); serving the last snapshot (version %d), marked stale",
                                exc, self.router.snapshot.version)  # fmt: skip
                self.router.stale = True
            except avalkey.ResponseError as exc:
                # NOPERM, a wrong password, a read-only replica: configuration, not a passing fault.
                # Say so every time, keep serving, and keep trying (it may be fixed under us).
                log.error("state sync refused by Valkey: %s (check the router's Valkey user and its ACL: "
                          "python -m statesync.acl); serving the last snapshot, marked stale", exc)  # fmt: skip
                self.router.stale = True
            await asyncio.sleep(self.retry_delay)

    def stop(self) -> None:
        self._stop = True
        if self._warming is not None:
            self._warming.cancel()

    async def _warm_slots(self) -> None:
        """After a bootstrap: decode the chunks still packed, then give every revision its slots,
        a slice at a time, between requests and deltas (a revision nobody asked for yet would
        otherwise make its first request pay). Decoding first keeps the slices even: a revision's
        chunks hold other revisions' pods too, so the first revisions read would decode most."""
        chunk = 0
        while (chunk := self.router.snapshot.pods.decode_packed(chunk, WARM_SLICE_CHUNKS)) >= 0:
            await asyncio.sleep(0)
        while self.router.slots.materialize_pending(WARM_SLICE_PODS):
            await asyncio.sleep(0)
        self.router.after_bulk_load("the routing state's full read and warm-up")

    async def warmed(self) -> None:
        """Wait until the warm-up after the last bootstrap is done (for tests and benchmarks)."""
        if self._warming is not None:
            await self._warming

    async def _session(self) -> None:
        from statesync.connect import connect

        self.sessions += 1
        client = connect(self.url, socket_timeout=self.heartbeat_timeout)
        session = self.session = _Session(self, asyncio.get_running_loop())
        subscription: SubscriberProtocol | None = None
        try:
            subscription = await subscribe(
                client, self.keys.channel, session, connect_timeout=self.heartbeat_timeout
            )
            session.subscription = subscription
            await session.run(client)
        finally:
            if subscription is not None:
                subscription.close()
            with contextlib.suppress(Exception):
                await client.aclose()

    async def resync(self, client: avalkey.Valkey) -> None:
        """Read the whole state consistently and adopt it if it is not older or empty."""
        keys = self.keys
        chunks: dict[bytes, bytes] | None = None
        pods_raw: list[bytes] = []
        if self._chunks_readable:
            try:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.get(keys.version)
                    pipe.get(keys.state_epoch)
                    pipe.get(keys.chunks_version)
                    pipe.hgetall(keys.pod_chunks)  # (chunk number -> its packed records)
                    pipe.hgetall(keys.routes)
                    version_raw, epoch_raw, chunks_at, chunks, routes_raw = await pipe.execute()
            except avalkey.ResponseError as exc:
                if not isinstance(exc, NoPermissionError) and "NOPERM" not in str(exc):
                    raise
                log.warning("may not read %s (%s): bootstrapping from %s", keys.pod_chunks, exc, keys.pods)
                self._chunks_readable = False
            else:
                if chunks_at != version_raw:
                    chunks = None  # behind the state (or no state): the per-pod hash is the truth
        if chunks is None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(keys.version)
                pipe.get(keys.state_epoch)
                pipe.hgetall(keys.pods)  # (not HVALS: a router's ACL user before pod-chunks had no HVALS)
                pipe.hgetall(keys.routes)
                version_raw, epoch_raw, pods_by_uid, routes_raw = await pipe.execute()
            pods_raw = list(pods_by_uid.values())
        self.resyncs += 1
        current = self.router.snapshot
        if version_raw is None:
            if current.version > 0:
                # The state was there and is gone (Valkey restarted empty): worth a warning.
                log.warning("Valkey holds no routing state; keeping version %d until the writer rebuilds it",
                            current.version)  # fmt: skip
            elif not self._told_waiting:
                # A fresh start: the writer has not committed yet. Normal, and said once.
                self._told_waiting = True
                log.info("no routing state in Valkey yet: waiting for the writer's first commit")
            self.router.stale = current.version > 0
            self.synced.set()
            return
        version = int(version_raw)
        epoch = int(epoch_raw or 0)
        if self._not_newer(epoch, version, 1):  # (the pod count is known once decoded, below)
            self.synced.set()
            return  # never go backwards
        routes = [decode_route(raw) for raw in routes_raw.values()]
        if chunks is None:
            pods = await self._install_decoded(epoch, version, None, pods_raw, routes)
        else:
            indexed_at = chunks.pop(INDEX_MARKER_FIELD, None)
            index = {}
            for field in [field for field in chunks if not field.isdigit()]:
                value = chunks.pop(field)  # (the index; any field a later writer adds is ignored)
                if field.startswith(REVISION_FIELD_PREFIX):
                    index[field] = value
            if not self.router.fresh:
                pods = await self._reread(epoch, version, chunks, routes)
            elif indexed_at == version_raw:
                pods = self._install_packed(epoch, version, chunks, index, routes)
            else:
                pods = await self._install_decoded(epoch, version, chunks, [], routes)
        if pods is None:  # (not adopted: older than ours, or a new term still empty)
            self.synced.set()
            return
        if self._warming is None or self._warming.done():
            self._warming = asyncio.get_running_loop().create_task(self._warm_slots())
        self.router.stale = False
        self.synced.set()
        log.info("routing state read whole: epoch %d version %d, %d pods", epoch, version, pods)

    def _install_packed(
        self,
        epoch: int,
        version: int,
        chunks: dict[bytes, bytes],
        index: dict[bytes, bytes],
        routes: list[Route],
    ) -> int | None:
        """A starting router: keep the chunks packed, give each revision its chunks (the index)."""
        skip = len(REVISION_FIELD_PREFIX)
        revision_chunks = {field[skip:].decode(): decode_chunk_numbers(raw) for field, raw in index.items()}
        builder = SnapshotBuilder(group=False)
        for number, chunk in chunks.items():
            builder.add_packed_chunk(int(number), chunk)
        if self._not_newer(epoch, version, len(builder)):
            return None
        self.router.install(builder.finish(epoch, version, routes), revision_chunks=revision_chunks)
        return len(builder)

    async def _install_decoded(
        self,
        epoch: int,
        version: int,
        chunks: dict[bytes, bytes] | None,
        pods_raw: list[bytes],
        routes: list[Route],
    ) -> int | None:
        """Decode every chunk (or every record of the per-pod hash), in slices, grouped per revision."""
        builder = SnapshotBuilder(group=self.router.fresh)
        added = 0
        with gc_paused():
            if chunks is not None:
                for number, chunk in chunks.items():
                    records = decode_pods(chunk)
                    builder.add_chunk(int(number), records)
                    added += len(records)
                    if added >= SLICE_RECORDS:
                        added = 0
                        await asyncio.sleep(0)
            else:
                for start in range(0, len(pods_raw), SLICE_RECORDS):
                    builder.add([decode_pod(raw) for raw in pods_raw[start : start + SLICE_RECORDS]])
                    await asyncio.sleep(0)
            if self._not_newer(epoch, version, len(builder)):
                return None
            self.router.install(builder.finish(epoch, version, routes), builder.by_revision)
        return len(builder)

    async def _reread(
        self, epoch: int, version: int, chunks: dict[bytes, bytes], routes: list[Route]
    ) -> int | None:
        """A running router's full read: a chunk whose bytes are those it was read (or kept) as,
        untouched since, is taken as it is; only the others are decoded, and only the pods that
        differ are reconciled (``Router.install(changed=...)``), instead of 50k."""
        current = self.router.snapshot.pods
        builder = SnapshotBuilder(group=False)
        changed: list[PodRecord] = []
        seen: set[int] = set()
        decoded = 0
        with gc_paused():
            for field, raw in chunks.items():
                number = int(field)
                seen.add(number)
                leaf = current.same_as_read(number, raw)
                if leaf is not None:
                    builder.add_unchanged(number, leaf)
                    continue
                records = decode_pods(raw)
                builder.add_chunk(number, records, raw)
                before = {r.uid: r for r in current.chunk(number)}
                for record in records:
                    if before.pop(record.uid, None) != record:
                        changed.append(record)
                changed += [msgspec.structs.replace(r, state=PodState.REMOVED) for r in before.values()]
                decoded += len(records)
                if decoded >= SLICE_RECORDS:
                    decoded = 0
                    await asyncio.sleep(0)
            for number in current.occupied_chunks():
                if number not in seen:  # (a chunk the writer emptied)
                    changed += [
                        msgspec.structs.replace(r, state=PodState.REMOVED) for r in current.chunk(number)
                    ]
            if self._not_newer(epoch, version, len(builder)):
                return None
            self.router.install(builder.finish(epoch, version, routes), changed=changed)
        log.debug("re-read the routing state: %d of %d pods changed", len(changed), len(builder))
        return len(builder)

    def _not_newer(self, epoch: int, version: int, pods: int) -> bool:
        """Is a whole state read at (epoch, version) with ``pods`` pods not to be adopted?"""
        current = self.router.snapshot
        if (epoch, version) <= (current.epoch, current.version):
            self.router.stale = False  # we have it, or something newer
            return True
        if epoch > current.epoch and pods == 0 and current.pods:
            # A new term with nothing in it yet (Valkey lost its data; the writer rebuilds from its
            # sources): serving nothing would be worse than serving what we had.
            log.warning("epoch %d holds no pods yet; keeping epoch %d version %d (stale)", epoch,
                        current.epoch, current.version)  # fmt: skip
            self.router.stale = True
            return True
        return False

    async def on_delta(self, client: avalkey.Valkey, delta: Delta) -> None:
        snapshot = self.router.snapshot
        if delta.epoch != snapshot.epoch:
            if delta.epoch > snapshot.epoch:
                await self.resync(client)  # a new term: adopted only by a full read
            return  # else a deposed leader's (fenced: it cannot have committed it)
        if delta.version <= snapshot.version:
            return  # already have it (or older)
        if delta.version == snapshot.version + 1:
            self.router.apply_delta(delta)
            return
        await self.catch_up(client)

    async def on_heartbeat(self, client: avalkey.Valkey, beat: Heartbeat) -> None:
        snapshot = self.router.snapshot
        if beat.epoch > snapshot.epoch:
            await self.resync(client)
        elif beat.epoch == snapshot.epoch and beat.version > snapshot.version:
            await self.catch_up(client)
        snapshot = self.router.snapshot
        if self.router.stale and (snapshot.epoch, snapshot.version) >= (beat.epoch, beat.version):
            self.router.stale = False

    async def catch_up(self, client: avalkey.Valkey) -> None:
        """Fill a gap from the change log; re-read everything if the log no longer reaches back."""
        self.gap_fills += 1
        while True:
            have = self.router.snapshot.version
            entries = await client.xrange(self.keys.changes, min=f"{have + 1}-0", max="+", count=1000)
            if not entries:
                return
            first = decode_delta(entries[0][1][b"d"])
            if first.version != have + 1 or first.epoch != self.router.snapshot.epoch:
                await self.resync(client)
                return
            for _, fields in entries:
                delta = decode_delta(fields[b"d"])
                if delta.epoch != self.router.snapshot.epoch:
                    await self.resync(client)  # the log crosses into a new term
                    return
                try:
                    self.router.apply_delta(delta)
                except VersionGap:
                    await self.resync(client)
                    return
            if len(entries) < 1000:
                return


_SUBSCRIBED: Any = object()  # in a session's backlog: the subscription is confirmed, read the whole state
BACKLOG_PAUSE = 2_000  # messages waiting for the session task: stop reading the socket ...
BACKLOG_RESUME = 200  # ... until it has worked the backlog down to this


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Session:
    """One subscription: the pub/sub protocol's sink, and the task side that does what must await.

    ``message`` runs inside the protocol's ``data_received``. The steady state -- the next delta
    of the snapshot's epoch, an old one, a heartbeat that asks for nothing -- is handled right
    there, synchronously. Anything that needs Valkey (a full read, a gap fill) is appended to
    ``backlog`` and the session task is woken; from then until the task has emptied the backlog
    (``busy``), every message goes to the backlog too, so messages are handled strictly in the
    order received, as if read one by one. ``busy`` starts true: nothing is applied before the
    subscription is confirmed and the whole state read.

    The next deltas are not applied one by one but gathered (``batch``: each must follow the one
    before) and applied together in ``received``, which the protocol calls once it has handed on
    everything that arrived in one read, and which runs before anything that must see the snapshot
    up to date (a heartbeat, a deferral): one snapshot swap and one slot reconciliation per pod for
    all of them (``Router.apply_deltas``). Versions stay in order, a gap still defers (after the
    batch before it is applied), a delta already in the batch is not gathered twice, and a batch
    is applied whole or, if the subscription ends while it is gathered, not at all.

    With ``coalesce`` (the router's ``--delta-coalesce-ms``), a read that brought deltas is applied
    at once as above, and then the socket is not read for ``coalesce`` seconds: whatever arrives
    meanwhile waits in the kernel and comes in one read, one batch. Why: under load a delta's cost
    is its cache misses -- its code (parse, decode, apply) and the records it touches are cold
    after serving (``bench_router_decode_apply_delta_50k_cold``: 116 us alone, 21 us each in
    sixteens) -- and those are paid per read more than per delta. A change after a quiet spell
    takes effect at once; one in a burst, up to ``coalesce`` later. Heartbeats wait the same (the
    heartbeat timeout is seconds). The backlog's own pause (``paused``) is kept apart: reading
    resumes only when neither holds it.
    """

    __slots__ = (
        "backlog",
        "batch",
        "batch_version",
        "busy",
        "coalesce",
        "coalesce_timer",
        "confirmed",
        "error",
        "follower",
        "last_beat",
        "last_heard",
        "loop",
        "paused",
        "router",
        "subscription",
        "waiter",
    )  # fmt: skip

    def __init__(self, follower: StateFollower, loop: asyncio.AbstractEventLoop) -> None:
        self.follower = follower
        self.router = follower.router
        self.loop = loop
        self.subscription: SubscriberProtocol | None = None
        self.backlog: deque[Any] = deque()  # payloads (bytes), and _SUBSCRIBED
        self.batch: list[Delta] = []  # consecutive deltas received together, not applied yet
        self.batch_version = 0  # the last one's version (0: none gathered)
        self.coalesce = follower.coalesce
        self.coalesce_timer: asyncio.TimerHandle | None = None  # (pending while reading waits)
        self.busy = True
        self.confirmed = False
        self.last_beat = self.last_heard = loop.time()
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # ---- the protocol's sink (called from data_received) ----------------------------------------

    def subscribed(self, count: int) -> None:
        if self.confirmed:
            raise SessionEnded("resubscribed: messages may have been lost")
        self.confirmed = True
        self._defer(_SUBSCRIBED)

    def message(self, payload: bytes) -> None:
        self.last_heard = now = self.loop.time()
        if payload.startswith(HEARTBEAT_PREFIX):
            self.last_beat = now
            self.apply_batch()  # (the deltas before it first: it is compared with the snapshot)
            if self.busy:
                self._defer(payload)
                return
            beat = decode_heartbeat(payload[1:])
            snapshot = self.router.snapshot
            if beat.epoch > snapshot.epoch or (
                beat.epoch == snapshot.epoch and beat.version > snapshot.version
            ):
                self._defer(payload)  # behind: a gap fill or a full read
            elif self.router.stale:
                self.router.stale = False  # (snapshot.epoch, version) >= the beat's
            return
        if self.busy:
            self._defer(payload)
            return
        if payload.startswith(DELTA_PREFIX):
            delta = decode_delta(payload[1:])
            snapshot = self.router.snapshot
            if delta.epoch == snapshot.epoch:
                # (compared with the version the snapshot has once the batch so far is applied)
                version = self.batch_version or snapshot.version
                if delta.version == version + 1:
                    self.batch.append(delta)
                    self.batch_version = delta.version
                    return
                if delta.version <= version:
                    return  # already have it (or older), or it is in the batch already
            elif delta.epoch < snapshot.epoch:
                return  # a deposed leader's (fenced: it cannot have committed it)
            self._defer(payload)  # a gap, or a new term

    def received(self) -> None:
        """The end of what arrived together: apply the consecutive deltas gathered since as one
        step (``Router.apply_deltas``); coalescing, then leave the socket unread for the window."""
        if not self.batch:
            return
        self.apply_batch()
        if self.coalesce > 0 and self.coalesce_timer is None and self.subscription is not None:
            self.subscription.pause_reading()
            self.coalesce_timer = self.loop.call_later(self.coalesce, self._window_over)

    def _window_over(self) -> None:
        self.coalesce_timer = None
        if not self.paused and self.subscription is not None:  # (else the backlog resumes it)
            self.subscription.resume_reading()

    def apply_batch(self) -> None:
        """Apply what is gathered now (the end of a read, or a message that must see the
        snapshot up to date)."""
        batch = self.batch
        if batch:
            self.batch = []
            self.batch_version = 0
            follower = self.follower
            follower.delta_batches += 1
            follower.deltas_batched += len(batch)
            self.router.apply_deltas(batch)

    def lost(self, exc: BaseException | None) -> None:
        # A batch still gathered is dropped, not applied: the subscription ended in the middle of
        # what it was reading (a bad frame, the connection lost), and the next session re-reads.
        self.batch = []
        self.batch_version = 0
        if self.coalesce_timer is not None:
            self.coalesce_timer.cancel()
            self.coalesce_timer = None
        if self.error is None:
            self.error = exc or SessionEnded("pub/sub subscription closed")
        if self.waiter is not None:
            _wake(self.waiter)

    def _defer(self, payload: Any) -> None:
        self.apply_batch()  # (what was gathered before it precedes it)
        self.backlog.append(payload)
        self.busy = True
        if len(self.backlog) >= BACKLOG_PAUSE and not self.paused and self.subscription is not None:
            self.paused = True
            self.subscription.pause_reading()
        if self.waiter is not None:
            _wake(self.waiter)

    # ---- the session task ------------------------------------------------------------------------

    async def run(self, client: avalkey.Valkey) -> None:
        follower = self.follower
        loop = self.loop
        timeout = follower.heartbeat_timeout
        poll = min(0.25, timeout / 4)
        while not follower._stop:
            if self.error is not None:
                raise self.error
            if self.backlog:
                await self._work_backlog(client)
                continue
            now = loop.time()
            if now - self.last_beat > timeout and now - self.last_heard >= poll:
                if not self.confirmed:
                    raise SessionEnded(f"no subscribe confirmation within {now - self.last_beat:.1f}s")
                raise SessionEnded(f"no heartbeat for {now - self.last_beat:.1f}s")
            # One future per wait (woken by a deferred message, the end of the subscription, or the
            # poll timer), never one per message.
            self.waiter = waiter = loop.create_future()
            timer = loop.call_later(poll, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None

    async def _work_backlog(self, client: avalkey.Valkey) -> None:
        follower = self.follower
        backlog = self.backlog
        while backlog:
            if self.error is not None:
                raise self.error
            payload = backlog.popleft()
            if payload is _SUBSCRIBED:
                await follower.resync(client)
                self.last_beat = self.loop.time()
            elif payload.startswith(DELTA_PREFIX):
                await follower.on_delta(client, decode_delta(payload[1:]))
            elif payload.startswith(HEARTBEAT_PREFIX):
                await follower.on_heartbeat(client, decode_heartbeat(payload[1:]))
            if self.paused and len(backlog) <= BACKLOG_RESUME and self.subscription is not None:
                self.paused = False
                if self.coalesce_timer is None:  # (else the window's end resumes it)
                    self.subscription.resume_reading()
        self.busy = False  # (no await since the last check: nothing can have slipped in between)


class ReportQueue(deque[Any]):
    """The router's bounded deque of reports, which also wakes whoever waits for one.

    ``Router.exclude_pod`` appends to ``router.reports``; ``ReportForwarder`` puts one of these in
    its place (same bound, same contents), so an append wakes the forwarder at once instead of the
    forwarder polling the deque (it used to look every 5 ms: ~200 loop wakeups a second on an idle
    router, ~17% of its Python samples)."""

    __slots__ = ("waiter",)

    def __init__(self, items: Any = (), maxlen: int | None = None) -> None:
        super().__init__(items, maxlen)
        self.waiter: asyncio.Future[None] | None = None

    def append(self, item: Any) -> None:
        super().append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            _wake(waiter)


class ReportForwarder:
    """Local exclusions -> the writer's stream, batched; kept (bounded) while Valkey is away.

    Asleep until a report is queued (``ReportQueue``); then everything queued by then goes out in
    one pipeline, and whatever was queued while that was in flight goes in the next one."""

    def __init__(
        self, router: Router, url: str, *, keys: Keys | None = None, retry_delay: float = 0.5
    ) -> None:
        self.router = router
        self.url = url
        self.keys = keys or Keys()
        self.retry_delay = retry_delay
        self.sent = 0
        self.batches = 0  # pipelines sent
        reports = router.reports
        if not isinstance(reports, ReportQueue):
            reports = router.reports = ReportQueue(reports, reports.maxlen)
        self.reports: ReportQueue = reports

    async def run(self) -> None:
        from statesync.connect import connect

        client = connect(self.url)
        reports = self.reports
        loop = asyncio.get_running_loop()
        while True:
            if not reports:
                reports.waiter = waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    if reports.waiter is waiter:
                        reports.waiter = None
                continue
            batch = list(reports)
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for event in batch:
                        pipe.xadd(self.keys.events, {"e": encode(event)})
                    await pipe.execute()
            except _VALKEY_ERRORS:
                await asyncio.sleep(self.retry_delay)
                continue
            for _ in batch:
                if reports:
                    reports.popleft()
            self.sent += len(batch)
            self.batches += 1


def start_state_sync(router: Router, url: str, keys: Keys | None = None) -> list[asyncio.Task[Any]]:
    follower = StateFollower(router, url, keys=keys, coalesce=router.config.delta_coalesce_ms / 1000)
    forwarder = ReportForwarder(router, url, keys=keys)
    router.stale = True  # until the first full read
    router.state_follower = follower
    return [asyncio.create_task(follower.run()), asyncio.create_task(forwarder.run())]
