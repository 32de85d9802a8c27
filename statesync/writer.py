"""``fastproxy writer``: the only process that mutates routing state.

Theory of operation
-------------------
Sources append events to the ``events`` stream; the leader writer reads them through a consumer
group in batches, runs each through the quarantine policy and the pure ``podstate.apply``, and
commits the batch's changed records in one Lua script that first checks the lease token (the
fencing epoch) and the expected previous version. The script sets the version, writes the records
(and the pod-chunks they fall in, see ``statesync.keys``), appends the delta to the capped change log
(stream id = version), PUBLISHes it, records the ids of the entries it applied and acknowledges the
entries, all in that one step. An entry delivered twice anyway (claimed from a consumer that did
commit it) is recognised by its id and skipped: nothing is applied twice. Entries a deposed leader
read after losing its lease are claimed (XAUTOCLAIM) by the new leader at takeover and periodically
after, so none is lost.

The leader's steady state is one write and two replies per batch, on a connection of its own
(``Link``): the batch's commit (EVALSHA) goes out together with the blocking XREADGROUP for the next
batch, which Valkey runs after the commit. At one event per batch (a quiet fleet: every readiness
change its own batch) the per-batch fixed cost is the propagation latency, so it is kept to that
write, the pure apply and the script; trimming the events stream runs beside it (its own task), and
only the claim of a deposed leader's entries (once a lease term) interrupts it.

Leadership is a lease key (SET NX PX) holding ``<writer id>:<epoch>``; the epoch comes from INCR
and never goes backwards. A standby polls for the lease; on taking it, it loads the committed state
and claims the pending entries of the dead leader (XAUTOCLAIM). A leader that cannot renew, or whose
commit is fenced, steps down at once.

Quarantined pods get active recovery checks (TCP connect, or an HTTP readiness path) with
exponential backoff and jitter; the outcome goes into the same event stream (source ``writer``), so
it takes the same serialized path and survives a change of leader.

Corroboration and cap (``QuarantinePolicy``): a report that would take a revision past
``cap_fraction`` quarantined, or that comes from an observer who has recently reported a large part
of the fleet, needs a second observer's report within the window. One partitioned router or one
broken node therefore cannot quarantine a large share of the fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import valkey.asyncio as avalkey
from valkey.exceptions import NoPermissionError, NoScriptError, ResponseError

from statesync.keys import (
    APPLIED_CAP,
    CHANGES_CAP,
    DELTA_PREFIX,
    EVENTS_GROUP,
    HEARTBEAT_PREFIX,
    INDEX_MARKER_FIELD,
    REVISION_FIELD_PREFIX,
    Keys,
    pod_chunk,
    stream_id_key,
)
from statesync.podstate import Changed, Dropped, Rejected, StartRecovery, StopRecovery, apply
from statesync.schema import (
    ConnectFailed,
    ConnectFailureKind,
    Delta,
    Event,
    HealthCheckFailed,
    HealthCheckPassed,
    Heartbeat,
    PodRecord,
    PodState,
    Route,
    RouteChanged,
    SchemaError,
    Source,
    decode_event,
    decode_pod,
    decode_route,
    encode,
    is_map_form,
    pack_array,
)

log = logging.getLogger("fastproxy.writer")

# One fenced, atomic step per batch. KEYS: 1 lease, 2 version, 3 state-epoch, 4 applied, 5 pods,
# 6 routes, 7 changes, 8 events, and 9 pod-chunks, 10 chunks-version unless this writer does not keep
# pod-chunks (its ACL user may not have them). ARGV: 1 token, 2 expected version, 3 new version,
# 4 epoch ('' once this term wrote it: it changes only with the term), 5 channel, 6 message to
# publish, 7 delta (change log), 8 change log cap, 9 applied-ids cap ('' while the set is below it:
# nothing to trim), 10 consumer group, 11 records, 12 routes, 13 chunks to write (-1: no pod-chunks),
# 14 chunks to delete, 15 applied ids, 16 entries to ack, 17 the payload: one msgpack array of
# strings (``lua_strings``) holding (uid, record) pairs, (service, route or '' to delete) pairs,
# (chunk, packed records) pairs, emptied chunks, (score, id) pairs of the applied ids and the entry
# ids to acknowledge. One argument, not thousands: packing each argument of a command in Python
# cost more than everything else the writer does in a batch. Each kind of write is one command for
# up to 1000 arguments (``each``; unpack has a stack limit): a Lua redis.call costs microseconds
# whatever its size, so a 1000-event batch makes a few dozen calls, not thousands.
# Every applied entry id goes into a capped sorted set (score: the id's millisecond part), in the
# same step as the state it produced: a replayed or late-claimed entry is recognised by id. The
# entries are acknowledged in the same step too, so no crash can leave a committed batch unacked.
COMMIT_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED lease lost') end
local n, r, c, d = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local a, k = tonumber(ARGV[15]), tonumber(ARGV[16])
local P = cmsgpack.unpack(ARGV[17])
local i = 1
local function each(command, key, count, extra)
  while count > 0 do
    local m = math.min(count, 1000)
    if extra then redis.call(command, key, extra, unpack(P, i, i + m - 1))
    else redis.call(command, key, unpack(P, i, i + m - 1)) end
    i, count = i + m, count - m
  end
end
if n + r > 0 then
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  if current ~= tonumber(ARGV[2]) then
    return redis.error_reply('VERSION expected ' .. ARGV[2] .. ' found ' .. tostring(current))
  end
  redis.call('SET', KEYS[2], ARGV[3])
  if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4]) end
  each('HSET', KEYS[5], 2 * n)
  for _ = 1, r do
    if P[i + 1] == '' then redis.call('HDEL', KEYS[6], P[i]) else redis.call('HSET', KEYS[6], P[i], P[i + 1]) end
    i = i + 2
  end
  if c >= 0 then
    each('HSET', KEYS[9], 2 * c)
    each('HDEL', KEYS[9], d)
    redis.call('SET', KEYS[10], ARGV[3])
  end
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[8], ARGV[3] .. '-0', 'd', ARGV[7])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
each('ZADD', KEYS[4], 2 * a)
if a > 0 and ARGV[9] ~= '' then redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[9]) - 1) end
each('XACK', KEYS[8], k, ARGV[10])
return ARGV[3]
"""

# A new leader found pod-chunks behind the version (a writer that predates them committed): rewrite
# them all from the records it loaded, fenced, at the version they describe. ARGV: token, version,
# then (chunk, packed records) pairs.
REPACK_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED lease lost') end
local current = redis.call('GET', KEYS[2]) or '0'
if current ~= ARGV[2] then return redis.error_reply('VERSION expected ' .. ARGV[2] .. ' found ' .. current) end
redis.call('DEL', KEYS[3])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[4], ARGV[2])
return 1
"""

RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def lua_strings(items: list[bytes]) -> bytes:
    """A msgpack array of strings, for ``cmsgpack.unpack`` in a script (which knows no bin type)."""
    parts = [b"\xdd" + len(items).to_bytes(4, "big")]
    append = parts.append
    for item in items:
        size = len(item)
        if size < 32:
            append(bytes((0xA0 | size,)))
        elif size < 0x100:
            append(b"\xd9" + bytes((size,)))
        elif size < 0x10000:
            append(b"\xda" + size.to_bytes(2, "big"))
        else:
            append(b"\xdb" + size.to_bytes(4, "big"))
        append(item)
    return b"".join(parts)


_CHANGES_CAP = b"%d" % CHANGES_CAP
_APPLIED_CAP = b"%d" % APPLIED_CAP
_GROUP = EVENTS_GROUP.encode()
READ_BLOCK_MS = 200  # a leader's blocked read returns this often to look at its stop flag and timers


def resp(args: list[bytes]) -> bytes:
    """One command in the Valkey protocol (RESP), from arguments that are already bytes."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args])


def stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """XREADGROUP's raw reply for one stream as (entry id, fields) pairs, as valkey-py gives them."""
    if not reply:
        return []
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]  # RESP3 / RESP2
    return [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True)) if fields else None)
            for entry_id, fields in entries]  # fmt: skip


class _Commit:
    """One batch ready to commit: the script's arguments and what to do once it succeeded."""

    __slots__ = ("applied", "args", "changes", "count", "recovery", "version")

    def __init__(self, version: int, changes: bool, applied: list[str], count: int, args: list[bytes],
                 recovery: list[tuple[str, bool, int]]) -> None:  # fmt: skip
        self.version = version
        self.changes = changes
        self.applied = applied
        self.count = count
        self.args = args
        self.recovery = recovery


class Link:
    """The leader's own connection for its serialized path: read a batch, commit it, read the next.

    Why not the client's commands: valkey-py spends ~100 us of CPU on each (a retry wrapper, a pool
    checkout that probes the socket, a task per write for the socket timeout, a timer per read),
    and the leader runs two per batch -- at one event per batch, most of its CPU. Here a command is
    packed once (``resp``), written, and its reply read under one timer. It also lets the commit and
    the next XREADGROUP leave in one write: Valkey runs them in order, so the read still comes after
    the commit. The connection is made by the client's pool (TLS, ACL user, Sentinel discovery, the
    handshake) but never returned to it; one that owes replies when its owner gives up is closed."""

    __slots__ = ("conn", "owed", "timeout")

    def __init__(self, conn: Any, timeout: float | None) -> None:
        self.conn = conn
        self.owed = 0  # replies sent for and not yet read
        self.timeout = timeout

    @classmethod
    async def open(cls, client: avalkey.Valkey) -> Link:
        conn = client.connection_pool.make_connection()
        timeout = conn.socket_timeout
        conn.socket_timeout = None  # no per-write task and per-read timer: ``read`` times whole replies
        await conn.connect()
        return cls(conn, timeout)

    async def send(self, packed: bytes, replies: int = 1) -> None:
        await self.conn.send_packed_command(packed, check_health=False)
        self.owed += replies

    async def read(self, block: float = 0.0) -> Any:
        """The next reply (a ResponseError for an error reply). ``block``: how long the command may
        legitimately take in Valkey (a blocking read), on top of the socket timeout."""
        self.owed -= 1  # read, or the connection is closed (valkey-py closes it on any failure)
        if self.timeout is None:
            return await self.conn.read_response()
        async with asyncio.timeout(self.timeout + block):
            return await self.conn.read_response()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.disconnect()


class Fenced(Exception):
    """This writer is no longer the leader (its lease token is gone or replaced)."""


class QuarantinePolicy:
    """Corroboration and cap for transport-failure reports (router and agent observers)."""

    def __init__(
        self,
        *,
        cap_fraction: float = 0.5,
        observer_fraction: float = 0.2,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap_fraction = cap_fraction
        self.observer_fraction = observer_fraction
        self.window = window
        self.clock = clock
        self._reports: dict[str, deque[tuple[float, str]]] = {}  # uid -> (time, observer)
        self._by_observer: dict[str, deque[tuple[float, str]]] = {}  # observer -> (time, uid)
        self.held = 0  # reports held back for lack of corroboration

    def admit(self, event: ConnectFailed, pods: dict[str, PodRecord], counts: FleetCounts) -> bool:
        """May this report quarantine its pod now?"""
        now = self.clock()
        horizon = now - self.window
        observer = event.observer or event.source.value
        reports = self._reports.setdefault(event.uid, deque())
        reports.append((now, observer))
        while reports and reports[0][0] < horizon:
            reports.popleft()
        mine = self._by_observer.setdefault(observer, deque())
        mine.append((now, event.uid))
        while mine and mine[0][0] < horizon:
            mine.popleft()
        if len({o for _, o in reports}) >= 2:
            return True  # corroborated by a second observer
        pod = pods.get(event.uid)
        if pod is None:
            return True  # apply() rejects it anyway
        members = counts.members.get(pod.revision, 0)
        quarantined = counts.quarantined.get(pod.revision, 0)
        fleet = counts.fleet
        suspects = len({uid for _, uid in mine})
        over_cap = members > 1 and (quarantined + 1) / members > self.cap_fraction
        noisy_observer = fleet >= 10 and suspects > self.observer_fraction * fleet
        if over_cap or noisy_observer:
            self.held += 1
            return False
        return True


class FleetCounts:
    """Pods per revision, quarantined per revision, and the fleet size, kept as records change,
    so the quarantine policy costs O(1) per report whatever the fleet size."""

    def __init__(self) -> None:
        self.members: dict[str, int] = {}
        self.quarantined: dict[str, int] = {}
        self.fleet = 0

    def account(self, old: PodRecord | None, new: PodRecord | None) -> None:
        for record, sign in ((old, -1), (new, 1)):
            if record is None or record.state is PodState.REMOVED:
                continue
            self.fleet += sign
            self.members[record.revision] = self.members.get(record.revision, 0) + sign
            if record.state is PodState.QUARANTINED:
                self.quarantined[record.revision] = self.quarantined.get(record.revision, 0) + sign


class WriterState:
    """The committed state as the leader holds it in memory."""

    def __init__(self) -> None:
        self.counts = FleetCounts()
        self.pods: dict[str, PodRecord] = {}
        self.routes: dict[str, Route] = {}
        self.version = 0
        # pod-chunks as committed: chunk -> uid -> the live record's encoding (what ``pods`` stores)
        self.chunks: dict[int, dict[str, bytes]] = {}
        # Records loaded in the earlier map form (an older writer's state): their chunks need repacking.
        self.map_form_records = 0
        # The revision index packed beside the chunks: revision -> chunk -> live members there, and
        # each live pod's revision (a pod's old revision must be known when it leaves a chunk).
        self.revision_chunks: dict[str, dict[int, int]] = {}
        self.live_revision: dict[str, str] = {}
        # Ids of the entries applied most recently (mirrors the capped set in Valkey).
        self.applied_ids: set[str] = set()
        self._applied_order: deque[str] = deque()

    def remember(self, entry_id: str) -> None:
        if entry_id not in self.applied_ids:
            self.applied_ids.add(entry_id)
            self._applied_order.append(entry_id)
            if len(self._applied_order) > APPLIED_CAP:
                self.applied_ids.discard(self._applied_order.popleft())

    def pack(self, records: list[tuple[PodRecord, bytes]], version: int) -> tuple[list[bytes], list[bytes]]:
        """Put encoded records into their chunks; (field, value) pairs for every chunk they touched
        that still has members and for every revision whose set of chunks changed, plus the index
        marker at ``version``; and the fields they emptied (see ``statesync.keys``)."""
        chunks = self.chunks
        touched: set[int] = set()
        reindexed: set[str] = set()
        for record, blob in records:
            uid = record.uid
            chunk = pod_chunk(uid)
            touched.add(chunk)
            members = chunks.get(chunk)
            was = self.live_revision.get(uid)
            if record.state is PodState.REMOVED:
                if members is not None:
                    members.pop(uid, None)
                if was is not None:
                    del self.live_revision[uid]
                    self._unindex(was, chunk, reindexed)
                continue
            if members is None:
                chunks[chunk] = {uid: blob}
            else:
                members[uid] = blob
            if was != record.revision:
                if was is not None:
                    self._unindex(was, chunk, reindexed)
                self.live_revision[uid] = record.revision
                self._index(record.revision, chunk, reindexed)
        pairs: list[bytes] = []
        emptied: list[bytes] = []
        for chunk in touched:
            members = chunks.get(chunk)
            if members:
                pairs += (b"%d" % chunk, pack_array(list(members.values())))
            else:
                chunks.pop(chunk, None)
                emptied.append(b"%d" % chunk)
        for revision in reindexed:
            field = REVISION_FIELD_PREFIX + revision.encode()
            if revision in self.revision_chunks:
                pairs += (field, encode(sorted(self.revision_chunks[revision])))
            else:
                emptied.append(field)
        pairs += (INDEX_MARKER_FIELD, b"%d" % version)
        return pairs, emptied

    def _index(self, revision: str, chunk: int, reindexed: set[str]) -> None:
        counts = self.revision_chunks.get(revision)
        if counts is None:
            counts = self.revision_chunks[revision] = {}
        held = counts.get(chunk, 0)
        counts[chunk] = held + 1
        if not held:
            reindexed.add(revision)

    def _unindex(self, revision: str, chunk: int, reindexed: set[str]) -> None:
        counts = self.revision_chunks[revision]
        held = counts[chunk] - 1
        if held:
            counts[chunk] = held
            return
        del counts[chunk]
        if not counts:
            del self.revision_chunks[revision]
        reindexed.add(revision)

    def index_pairs(self) -> list[bytes]:
        """Every revision's field of the index (a repack writes them all)."""
        pairs: list[bytes] = []
        for revision, counts in self.revision_chunks.items():
            pairs += (REVISION_FIELD_PREFIX + revision.encode(), encode(sorted(counts)))
        return pairs

    @property
    def applied(self) -> str:
        """The newest applied entry id (for tests and status)."""
        return max(self._applied_order, key=stream_id_key, default="0-0")


class Writer:
    def __init__(
        self,
        client: avalkey.Valkey,
        *,
        keys: Keys | None = None,
        writer_id: str | None = None,
        lease_ttl: float = 3.0,
        batch: int = 1000,
        check_path: str | None = None,
        policy: QuarantinePolicy | None = None,
        heartbeat_interval: float = 1.0,
    ) -> None:
        self.client = client
        self.keys = keys or Keys()
        self.id = writer_id or f"writer-{socket.gethostname()}-{os.getpid()}"
        self.lease_ttl = lease_ttl
        self.batch = batch
        self.check_path = check_path
        self.policy = policy or QuarantinePolicy()
        self.heartbeat_interval = heartbeat_interval
        self.state = WriterState()
        self.epoch = 0
        self.token = ""
        self.leader = False
        self.stats: dict[str, int] = {"applied": 0, "commits": 0, "rejected": 0, "dropped": 0, "bad": 0}
        # Keep pod-chunks (routers' fast bootstrap)? Off only when our ACL user may not write them.
        self.packing = True
        self._token = b""
        self._epoch_written = False  # state-epoch holds this term's epoch (written by its first commit)
        self._channel = self.keys.channel.encode()
        self._commit = client.register_script(COMMIT_SCRIPT)
        self._repack = client.register_script(REPACK_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self.became_leader = asyncio.Event()

    # ---- leadership -------------------------------------------------------------------------

    async def try_acquire(self) -> bool:
        keys = self.keys
        if await self.client.exists(keys.lease):
            return False
        epoch = int(await self.client.incr(keys.epoch))
        # Epochs never go backwards, even when Valkey lost its counter (restarted empty): a writer
        # that never led does not know the last epoch, but the clock does. Milliseconds since the
        # epoch floor it, so a new term always outranks every term before it in the routers.
        floor = max(self.epoch + 1, time.time_ns() // 1_000_000)
        if epoch < floor:
            epoch = floor
            await self.client.set(keys.epoch, epoch)
        token = f"{self.id}:{epoch}"
        if not await self.client.set(keys.lease, token, nx=True, px=int(self.lease_ttl * 1000)):
            return False
        self.epoch = epoch
        self.token = token
        self._token = token.encode()
        self._epoch_written = False
        await self._load_state()
        await self._sync_chunks()
        self.leader = True
        self.became_leader.set()
        log.info("%s is leader: epoch %d, version %d, %d pods", self.id, epoch, self.state.version,
                 len(self.state.pods))  # fmt: skip
        return True

    async def _load_state(self) -> None:
        keys = self.keys
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.get(keys.version)
            pipe.zrange(keys.applied, 0, -1)
            pipe.hgetall(keys.pods)
            pipe.hgetall(keys.routes)
            version, applied, pods, routes = await pipe.execute()
        if version is None and self.state.version:
            # Valkey came back empty; our memory is the freshest truth. Re-commit it whole.
            log.warning("Valkey has no state; re-committing %d pods from memory", len(self.state.pods))
            await self._recommit_all()
            return
        state = WriterState()
        state.version = int(version or 0)
        for entry_id in applied:
            state.remember(entry_id.decode())
        state.pods = {}
        chunks = state.chunks
        for raw in pods.values():
            record = decode_pod(raw)
            if is_map_form(raw):
                raw = encode(record)  # (pod-chunks hold the current form; ``pods`` catches up per change)
                state.map_form_records += 1
            state.pods[record.uid] = record
            state.counts.account(None, record)
            if record.state is not PodState.REMOVED:
                chunk = pod_chunk(record.uid)
                chunks.setdefault(chunk, {})[record.uid] = raw
                state.live_revision[record.uid] = record.revision
                counts = state.revision_chunks.setdefault(record.revision, {})
                counts[chunk] = counts.get(chunk, 0) + 1
        state.routes = {}
        for raw in routes.values():
            route = decode_route(raw)
            state.routes[route.service] = route
        self.state = state

    async def _sync_chunks(self) -> None:
        """At takeover: make pod-chunks describe the loaded version if they do not (a writer that
        predates them led), or stop keeping them if our ACL user may not touch them."""
        keys = self.keys
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(keys.chunks_version)
                pipe.hget(keys.pod_chunks, INDEX_MARKER_FIELD.decode())
                at, indexed_at = await pipe.execute()
            current = str(self.state.version).encode()
            if at == current and indexed_at == current and not self.state.map_form_records:
                self.packing = True
                return
            if self.state.map_form_records:
                log.warning("%s: %d pod records are in the earlier map form (an older writer's); "
                            "repacking pod-chunks in the current form", self.id,
                            self.state.map_form_records)  # fmt: skip
            elif at == current:
                log.info("%s: pod-chunks carry no revision index at version %s: repacking", self.id, current)
            pairs: list[Any] = []
            for chunk, members in self.state.chunks.items():
                pairs += (chunk, pack_array(list(members.values())))
            pairs += self.state.index_pairs()
            pairs += (INDEX_MARKER_FIELD, current)
            await self._repack(keys=[keys.lease, keys.version, keys.pod_chunks, keys.chunks_version],
                               args=[self.token, self.state.version, *pairs])  # fmt: skip
            self.packing = True
        except NoPermissionError as exc:
            if self.packing:
                log.warning("%s may not write %s (%s): routers bootstrap from %s instead", self.id,
                            keys.pod_chunks, exc, keys.pods)  # fmt: skip
            self.packing = False
        except ResponseError as exc:
            if "FENCED" in str(exc) or "VERSION" in str(exc):
                self.step_down(f"repack refused ({exc})")
                raise Fenced(str(exc)) from None
            raise

    async def _recommit_all(self) -> None:
        keys = self.keys
        previous = self.state.version
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(keys.version, 0)
            await pipe.execute()
        self.state.version = 0
        # Everything is written anew: every chunk and every revision's index field, as for new pods.
        self.state.chunks, self.state.revision_chunks, self.state.live_revision = {}, {}, {}
        pods = tuple(self.state.pods.values())
        routes = tuple(self.state.routes.values())
        await self._write(pods, routes, new_version=previous + 1)

    async def renew(self) -> bool:
        ok = await self._renew(keys=[self.keys.lease], args=[self.token, int(self.lease_ttl * 1000)])
        return bool(ok)

    def step_down(self, why: str) -> None:
        if self.leader:
            log.warning("%s steps down (epoch %d): %s", self.id, self.epoch, why)
        self.leader = False
        self.became_leader.clear()
        for task in self._checks.values():
            task.cancel()
        self._checks.clear()

    # ---- the serialized path ------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.keys.events, EVENTS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_batch(
        self, block_ms: int = READ_BLOCK_MS, pending_first: bool = False
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        streams = {self.keys.events: "0" if pending_first else ">"}
        reply = await self.client.xreadgroup(
            EVENTS_GROUP, self.id, streams, count=self.batch, block=None if pending_first else block_ms
        )
        if not reply:
            return []
        return list(reply[0][1])

    async def claim_pending(self, min_idle_ms: int = 0) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries another consumer (a dead or deposed leader) read but never acknowledged."""
        claimed: list[tuple[bytes, dict[bytes, bytes]]] = []
        start = "0-0"
        while True:
            reply = await self.client.xautoclaim(
                self.keys.events,
                EVENTS_GROUP,
                self.id,
                min_idle_time=min_idle_ms,
                start_id=start,
                count=self.batch,
            )
            next_id, entries = reply[0], reply[1]
            claimed.extend(e for e in entries if e and e[1] is not None)
            if next_id in (b"0-0", "0-0") or not entries:
                break
            start = next_id
        return claimed

    async def trim_events(self) -> None:
        """Drop stream entries every consumer has acknowledged (the stream would grow forever)."""
        pending = await self.client.xpending(self.keys.events, EVENTS_GROUP)
        if pending and pending.get("pending"):
            floor = pending["min"]
        else:
            groups = await self.client.xinfo_groups(self.keys.events)
            floor = next((g["last-delivered-id"] for g in groups if g["name"] in (EVENTS_GROUP,
                          EVENTS_GROUP.encode())), None)  # fmt: skip
        if floor:
            await self.client.xtrim(self.keys.events, minid=floor, approximate=True)

    async def process(self, entries: Sequence[tuple[bytes, dict[bytes, bytes] | None]]) -> int:
        """Apply a batch, commit it fenced, then acknowledge it. Returns the records changed."""
        if not entries:
            return 0
        commit = self._prepare(entries)
        await self._run(commit)
        self._committed(commit)
        return commit.count

    def _prepare(self, entries: Sequence[tuple[bytes, dict[bytes, bytes] | None]]) -> _Commit:
        """The pure part of a batch: apply its events to the in-memory state; the commit to run."""
        state = self.state
        changed: dict[str, PodRecord] = {}
        route_changes: dict[str, Route] = {}
        applied: list[str] = []
        seen: set[str] = set()
        recovery: list[tuple[str, bool, int]] = []
        for entry_id, fields in entries:
            entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if entry in state.applied_ids or entry in seen:
                continue  # replayed after a crash between commit and ack: already applied
            applied.append(entry)
            seen.add(entry)
            raw = fields.get(b"e") if fields else None
            try:
                if raw is None:
                    raise SchemaError("stream entry has no 'e' field")
                event = decode_event(raw)
            except SchemaError as exc:
                self.stats["bad"] += 1
                log.warning("event %s dropped: %s", entry, exc)
                continue
            self._apply_event(event, changed, route_changes, recovery)
        # Also with nothing applied (all replays): the commit acknowledges the entries, fenced.
        return self._build(tuple(changed.values()), tuple(route_changes.values()), applied=applied,
                           acknowledge=[e[0] for e in entries], recovery=recovery)  # fmt: skip

    def _apply_event(
        self,
        event: Event,
        changed: dict[str, PodRecord],
        route_changes: dict[str, Route],
        recovery: list[tuple[str, bool, int]],
    ) -> None:
        state = self.state
        if isinstance(event, RouteChanged):
            route = event.route
            route_changes[route.service] = route
            if route.removed:
                state.routes.pop(route.service, None)
            else:
                state.routes[route.service] = route
            return
        if (
            isinstance(event, ConnectFailed)
            and event.failure is not ConnectFailureKind.BUSY_REFUSED
            and event.source in (Source.ROUTER, Source.AGENT)
            and (record := state.pods.get(event.uid)) is not None
            and record.state in (PodState.READY, PodState.NOT_READY)
            and not self.policy.admit(event, state.pods, state.counts)
        ):
            self.stats["dropped"] += 1
            return
        record, effects = apply(state.pods.get(event.uid), event)
        for effect in effects:
            if isinstance(effect, Changed):
                state.counts.account(state.pods.get(effect.record.uid), effect.record)
                state.pods[effect.record.uid] = effect.record
                changed[effect.record.uid] = effect.record
                self.stats["applied"] += 1
            elif isinstance(effect, StartRecovery):
                recovery.append((effect.uid, True, effect.generation))
            elif isinstance(effect, StopRecovery):
                recovery.append((effect.uid, False, 0))
            elif isinstance(effect, Rejected):
                self.stats["rejected"] += 1
                log.debug("rejected %s: %s", effect.uid, effect.reason)
            elif isinstance(effect, Dropped):
                self.stats["dropped"] += 1

    async def _write(
        self,
        pods: tuple[PodRecord, ...],
        routes: tuple[Route, ...],
        *,
        applied: list[str] | None = None,
        acknowledge: list[bytes] | None = None,
        new_version: int = 0,
    ) -> None:
        """One fenced, atomic step: the records (and their pod-chunks), the version, the change log,
        the publish, the ids of the entries applied and their acknowledgement. With no records it
        only records the ids and acknowledges (still fenced)."""
        commit = self._build(pods, routes, applied=applied, acknowledge=acknowledge, new_version=new_version)
        await self._run(commit)
        self._committed(commit)

    def _build(
        self,
        pods: tuple[PodRecord, ...],
        routes: tuple[Route, ...],
        *,
        applied: list[str] | None = None,
        acknowledge: list[bytes] | None = None,
        new_version: int = 0,
        recovery: list[tuple[str, bool, int]] | None = None,
    ) -> _Commit:
        """The commit script's arguments for a batch (see ``COMMIT_SCRIPT``), all bytes."""
        state = self.state
        applied = applied or []
        acknowledge = acknowledge or []
        changes = bool(pods or routes)
        version = (new_version or state.version + 1) if changes else state.version
        blob = encode(Delta(epoch=self.epoch, version=version, pods=pods, routes=routes)) if changes else b""
        encoded = [(pod, encode(pod)) for pod in pods]
        chunk_pairs, emptied = state.pack(encoded, version) if self.packing and changes else ([], [])
        payload: list[bytes] = []
        for pod, pod_blob in encoded:
            payload += (pod.uid.encode(), pod_blob)
        for route in routes:
            payload += (route.service.encode(), b"" if route.removed else encode(route))
        payload += chunk_pairs
        payload += emptied
        for entry_id in applied:
            payload += (entry_id.partition("-")[0].encode(), entry_id.encode())
        payload += acknowledge
        # The applied-ids set is trimmed only once it can exceed its cap (our memory mirrors it).
        trim = len(state.applied_ids) + len(applied) > APPLIED_CAP
        args = [
            self._token, b"%d" % state.version, b"%d" % version, b"" if self._epoch_written else b"%d" % self.epoch,
            self._channel, DELTA_PREFIX + blob, blob, _CHANGES_CAP, _APPLIED_CAP if trim else b"", _GROUP,
            b"%d" % len(pods), b"%d" % len(routes), b"%d" % (len(chunk_pairs) // 2) if self.packing else b"-1",
            b"%d" % len(emptied), b"%d" % len(applied), b"%d" % len(acknowledge), lua_strings(payload),
        ]  # fmt: skip
        return _Commit(version, changes, applied, len(pods) + len(routes), args, recovery or [])

    async def _run(self, commit: _Commit) -> None:
        """Run a commit through the client (valkey-py's script call: loads the script if needed)."""
        try:
            await self._commit(keys=self._script_keys(), args=commit.args)
        except ResponseError as exc:
            self._refused(exc)

    def _script_keys(self) -> list[str]:
        keys = self.keys
        script_keys = [keys.lease, keys.version, keys.state_epoch, keys.applied, keys.pods, keys.routes,
                       keys.changes, keys.events]  # fmt: skip
        if self.packing:
            script_keys += (keys.pod_chunks, keys.chunks_version)
        return script_keys

    def _refused(self, exc: ResponseError) -> NoReturn:
        text = str(exc)
        if "FENCED" in text:
            self.step_down("commit fenced: lease lost")
            raise Fenced(text) from None
        if "VERSION" in text:
            self.step_down(f"version mismatch ({text})")
            raise Fenced(text) from None
        if isinstance(exc, NoPermissionError) and self.packing:
            # pod-chunks became forbidden under us: the next term finds out and stops keeping them
            self.step_down(f"commit refused: {text}")
        raise exc

    def _committed(self, commit: _Commit) -> None:
        """After the commit script succeeded: our memory follows, recovery checks start or stop."""
        state = self.state
        state.version = commit.version
        for entry_id in commit.applied:
            state.remember(entry_id)
        if commit.changes:
            self.stats["commits"] += 1
            self._epoch_written = True
        for uid, start, generation in commit.recovery:
            if start:
                self._start_check(uid, generation)
            else:
                task = self._checks.pop(uid, None)
                if task is not None:
                    task.cancel()

    # ---- recovery checks ---------------------------------------------------------------------

    def _start_check(self, uid: str, generation: int) -> None:
        if uid in self._checks:
            self._checks[uid].cancel()
        self._checks[uid] = asyncio.get_running_loop().create_task(self._recover(uid, generation))

    async def _recover(self, uid: str, generation: int) -> None:
        delay = 0.05
        while self.leader:
            pod = self.state.pods.get(uid)
            if pod is None or pod.state is not PodState.QUARANTINED:
                return
            ok, reason = await self._check(pod)
            event: Event
            if ok:
                event = HealthCheckPassed(
                    uid=uid, source=Source.WRITER, at=time.time(), generation=generation
                )
            else:
                event = HealthCheckFailed(
                    uid=uid, source=Source.WRITER, at=time.time(), generation=generation, reason=reason
                )
            if ok:
                await self.client.xadd(self.keys.events, {"e": encode(event)})
                self._checks.pop(uid, None)
                return
            await asyncio.sleep(delay * (0.5 + random.random()))  # backoff with jitter
            delay = min(delay * 2, 5.0)

    async def _check(self, pod: PodRecord) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(0.5):
                reader, writer = await asyncio.open_connection(pod.ip, pod.port)
                try:
                    if self.check_path is None:
                        return True, ""
                    writer.write(
                        f"GET {self.check_path} HTTP/1.1\r\nHost: {pod.ip}\r\nConnection: close\r\n\r\n".encode()
                    )
                    line = await reader.readline()
                    return line.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")), line[:64].decode(errors="replace")
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            return False, f"check failed: {exc}"

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Stand by, lead, step down on loss, repeat until stopped."""
        await self.ensure_group()
        while not self._stop.is_set():
            try:
                if not await self.try_acquire():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.lease_ttl / 3):
                            await self._stop.wait()
                    continue
                await self._lead()
            except Fenced:
                continue
            except (OSError, avalkey.ConnectionError, avalkey.TimeoutError, ResponseError) as exc:
                # ResponseError: e.g. NOGROUP after Valkey restarted empty; the next term recreates it.
                self.step_down(f"Valkey unreachable or reset: {exc}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._stop.wait()

    async def _lead(self) -> None:
        for uid, pod in self.state.pods.items():
            if pod.state is PodState.QUARANTINED:
                self._start_check(uid, pod.generation)
        await self.ensure_group()
        await self.process(await self.read_batch(pending_first=True))
        await self.process(await self.claim_pending())
        tasks = [asyncio.create_task(self._keep_lease()), asyncio.create_task(self._heartbeat()),
                 asyncio.create_task(self._keep_trimmed())]  # fmt: skip
        loop = asyncio.get_running_loop()
        next_claim = loop.time() + self.lease_ttl
        link: Link | None = None
        try:
            # The steady state runs on a connection of its own (``Link``): per batch one write (this
            # batch's commit + the next blocking read) and two replies, nothing else.
            link = await Link.open(self.client)
            await self.client.script_load(COMMIT_SCRIPT)  # EVALSHA on the link needs it in Valkey
            sha = self._commit.sha.encode()
            keys = [key.encode() for key in self._script_keys()]
            read = resp([b"XREADGROUP", b"GROUP", _GROUP, self.id.encode(), b"COUNT", b"%d" % self.batch,
                         b"BLOCK", b"%d" % READ_BLOCK_MS, b"STREAMS", self.keys.events.encode(), b">"])  # fmt: skip
            while self.leader and not self._stop.is_set():
                if not link.owed:
                    await link.send(read)
                entries = stream_entries(await link.read(block=READ_BLOCK_MS / 1000))
                due = loop.time() >= next_claim
                if entries:
                    commit = self._prepare(entries)
                    # the next read rides with the commit, unless something else comes first
                    pipelined = not due and self.leader and not self._stop.is_set()
                    evalsha = resp([b"EVALSHA", sha, b"%d" % len(keys), *keys, *commit.args])
                    await link.send(evalsha + read if pipelined else evalsha, 2 if pipelined else 1)
                    try:
                        await link.read()
                    except NoScriptError:  # flushed under us: the client's script call loads it again
                        await self._run(commit)
                    except ResponseError as exc:
                        self._refused(exc)
                    self._committed(commit)
                if due:
                    # A deposed leader's blocked read may have taken entries after we took over;
                    # they sit unacknowledged in its consumer: take them over too.
                    next_claim = loop.time() + self.lease_ttl
                    await self.process(await self.claim_pending(min_idle_ms=int(self.lease_ttl * 2000)))
            if link.owed and self.leader:
                # stopping: the read that went out with the last commit may hold entries; apply them
                # now rather than leave them pending for the next leader's claim
                await self.process(stream_entries(await link.read(block=READ_BLOCK_MS / 1000)))
        finally:
            if link is not None:
                await link.close()
            for task in tasks:
                task.cancel()
            self.step_down("stopped" if self._stop.is_set() else "lost leadership")

    async def _keep_lease(self) -> None:
        while self.leader:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                if not await self.renew():
                    self.step_down("lease renewal refused")
                    return
            except (OSError, avalkey.ConnectionError, avalkey.TimeoutError) as exc:
                log.warning("lease renewal failed: %s", exc)

    async def _keep_trimmed(self) -> None:
        """Trim the events stream once a lease term, beside the serialized path rather than in it
        (three round trips that would hold up the batch behind them). Safe alongside it: the trim
        stops below the oldest entry still pending or not yet delivered, and later entries only
        come after that."""
        while self.leader:
            await asyncio.sleep(self.lease_ttl)
            try:
                await self.trim_events()
            except (OSError, avalkey.ConnectionError, avalkey.TimeoutError, ResponseError) as exc:
                log.warning("trimming the events stream failed: %s", exc)  # next term, or next time

    async def _heartbeat(self) -> None:
        while self.leader:
            beat = Heartbeat(epoch=self.epoch, version=self.state.version, at=time.time())
            with contextlib.suppress(OSError, avalkey.ConnectionError, avalkey.TimeoutError):
                await self.client.publish(self.keys.channel, HEARTBEAT_PREFIX + encode(beat))
            await asyncio.sleep(self.heartbeat_interval)

    def stop(self) -> None:
        self._stop.set()


async def submit(client: avalkey.Valkey, events: list[Event], keys: Keys | None = None) -> list[bytes]:
    """Append events to the writer's stream (what every source does)."""
    keys = keys or Keys()
    async with client.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(keys.events, {"e": encode(event)})
        ids: list[bytes] = await pipe.execute()
    return ids


async def _serve(args: argparse.Namespace) -> int:
    from statesync.connect import connect

    client = connect(args.valkey)
    writer = Writer(client, writer_id=args.id or None, lease_ttl=args.lease_ttl, check_path=args.check_path,
                    keys=Keys(args.namespace))  # fmt: skip
    if args.routes:
        from fastproxy.config import load_routes_file

        routes_file = load_routes_file(args.routes)
        events: list[Event] = [RouteChanged(route=r, at=time.time()) for r in routes_file.routes]
        await submit(client, events, writer.keys)
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, writer.stop)
    # --kubernetes: the EndpointSlice informer runs as a task beside Writer.run(); only the leader's
    # submits, and it resubmits its whole view in each new term (epoch)
    informer = None
    if args.kubernetes:
        from statesync.informer import informer_from_args

        term = lambda: writer.epoch if writer.leader else None  # noqa: E731
        informer = asyncio.create_task(informer_from_args(args, client, writer.keys, active=term).run())
    try:
        await writer.run()
    finally:
        if informer is not None:
            informer.cancel()
            await asyncio.gather(informer, return_exceptions=True)
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    import uvloop

    return uvloop.run(_serve(args))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "writer",
        help="the single writer of routing state (leader election, events -> state machine -> Valkey)",
        description=(
            "Reads events (readiness, connect failures, discovery) from the Valkey stream, applies the pod "
            "state machine, commits each batch atomically and fenced, publishes deltas, and runs recovery "
            "checks for quarantined pods. Run 2+ replicas: one leads, the others stand by."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--valkey", default=os.environ.get("FASTPROXY_VALKEY", "valkey://127.0.0.1:6379/0"),
                        help="Valkey URL (valkey://, valkeys:// for TLS, user:password@ for ACL)")  # fmt: skip
    parser.add_argument("--namespace", default="fastproxy", help="key prefix")
    parser.add_argument("--id", default="", help="writer id (default: writer-HOST-PID)")
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="leader lease seconds")
    parser.add_argument(
        "--check-path", default=None, help="HTTP path for recovery checks (default: TCP connect)"
    )
    parser.add_argument("--routes", help="routes file whose routes are submitted at start")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from statesync.informer import add_arguments as add_kubernetes_arguments  # --kubernetes and its flags

    add_kubernetes_arguments(parser)
    parser.set_defaults(func=run)
