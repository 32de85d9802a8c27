"""``fastproxy agent``: the eBPF node agent. The kernel sees every failed connect on the node; the
agent turns the ones to pods into ``ConnectFailed`` events for the writer.

Theory of operation
-------------------
The probe (``probes/connect_failures.bpf.c``, loaded by ``probes.probe``) watches the addresses in
an LPM trie, classifies each failed connect in the kernel (refused / timeout / reset / unreachable,
plus SYN retransmits as an early warning), remembers who called ``connect()`` (pid, comm, cgroup,
netns) and rate-limits per (address, port, kind) with a cumulative suppressed count, so a connect
storm costs the agent a handful of records. Records arrive on a ring buffer whose fd sits in the
event loop (``add_reader``): no thread, no polling.

The watch list follows the routing state: a full read of ``{ns}:pods`` at start, every delta from
the writer's pub/sub channel, and a poll of ``{ns}:version`` every ``--refresh`` seconds (a full
re-read when it moved or a delta went missing). Every pod (``--all-pods``) or the pods inside
``--watch`` CIDRs become /128 trie entries (IPv4 as ::ffff:a.b.c.d, with the pod's port).

Attribution is by pod UID and generation, never by address alone: ``PodIndex`` keeps a short
history per ip:port of which (uid, generation) held it since when (agent clock = the kernel's
CLOCK_MONOTONIC), and a failure is charged to the holder at the time its ``connect()`` *started*.
A failure on a recycled IP therefore goes to the pod the caller meant (a removed UID, which the
writer ignores), never to the new pod; a failure from before a state change carries the older
generation, which the writer drops as stale.

``Threshold``: ``--threshold`` failures of a pod (records plus suppressed counts) within
``--window`` seconds make one ``ConnectFailed`` (source agent, observer = node name); the pod is
then quiet for a window unless its generation changes. The kernel's burst is the threshold, so the
records alone cross it without waiting for a sweep. A pod that is pending, draining or already
quarantined is not reported (the writer would hold it; counted per state). Events go out in
batches: whatever is pending when the flusher runs is one pipeline of XADDs; while Valkey is
unreachable they wait (bounded).

A sweep every ``--sweep`` seconds accounts suppressed counts that no record carried yet (it walks
the rate-limit map only when the kernel's suppressed counter moved). ``--metrics HOST:PORT``
serves Prometheus text (records, suppressed, failures, events, ring-buffer drops, kernel counters,
report latency); ``--ready-file`` is written once the probe is attached and the first watch list
is in the kernel. Where eBPF cannot run, the agent says why and exits non-zero (``fastproxy agent
--check`` says so without starting anything).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastproxy.metrics import Histogram as BaseHistogram
from probes.probe import (
    K_OTHER,
    K_REFUSED,
    K_RESET,
    K_RETRANSMIT,
    K_TIMEOUT,
    K_UNREACHABLE,
    KIND_NAMES,
    Probe,
    ProbeUnavailable,
    Record,
    addr16,
    addr_text,
    check_node,
)
from statesync.keys import DELTA_PREFIX, Keys
from statesync.schema import (
    ConnectFailed,
    ConnectFailureKind,
    PodRecord,
    PodState,
    SchemaError,
    Source,
    decode_delta,
    decode_pod,
)

log = logging.getLogger("fastproxy.agent")

FAILURE_KINDS = {
    K_REFUSED: ConnectFailureKind.REFUSED,
    K_TIMEOUT: ConnectFailureKind.TIMEOUT,
    K_RESET: ConnectFailureKind.RESET,
    K_UNREACHABLE: ConnectFailureKind.UNREACHABLE,
    K_OTHER: ConnectFailureKind.UNREACHABLE,  # another errno at SYN_SENT->CLOSE: the pod is not reachable
}
LATENCY_BOUNDS = (0.5e-3, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0, 5.0)
OUTBOX_MAX = 10_000
REPORTABLE = frozenset({PodState.READY, PodState.NOT_READY})  # where ConnectFailed can quarantine


# ---- pods: who holds which address, since when --------------------------------------------------

AddrKey = tuple[bytes, int]  # (16-byte address, port)


class PodIndex:
    """ip:port -> (uid, generation) over time, for the pods the agent watches."""

    HISTORY_NS = 30_000_000_000  # how far back a connect start can be attributed

    def __init__(
        self,
        cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
        clock: Any = time.monotonic_ns,
    ) -> None:
        self.cidrs = cidrs or None  # None: every pod
        self.clock = clock
        self.records: dict[str, PodRecord] = {}  # watched uid -> record
        self._where: dict[str, AddrKey] = {}
        self._holders: dict[AddrKey, list[str]] = {}  # live claimants, latest last
        self._history: dict[AddrKey, list[tuple[int, str | None, int]]] = {}  # (since, uid|None, gen)
        self.version = -1  # routing-state version this index reflects

    def wants(self, pod: PodRecord) -> bool:
        if pod.state is PodState.REMOVED:
            return False
        if self.cidrs is None:
            return True
        try:
            ip = ipaddress.ip_address(pod.ip)
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in self.cidrs)

    def replace(self, pods: Iterable[PodRecord]) -> None:
        """A full read: exactly these pods."""
        now = self.clock()
        incoming = {p.uid: p for p in pods if self.wants(p)}
        for uid in [u for u in self.records if u not in incoming]:
            self._drop(uid, now)
        for pod in incoming.values():
            self._put(pod, now)

    def update(self, pods: Iterable[PodRecord]) -> None:
        """A delta: these records changed (REMOVED or out of scope means gone)."""
        now = self.clock()
        for pod in pods:
            if self.wants(pod):
                self._put(pod, now)
            elif pod.uid in self.records:
                self._drop(pod.uid, now)

    def _put(self, pod: PodRecord, now: int) -> None:
        try:
            key = (addr16(pod.ip), pod.port)
        except ValueError:
            log.warning("pod %s has an unparsable ip %r; not watched", pod.uid, pod.ip)
            return
        previous = self._where.get(pod.uid)
        if previous is not None and previous != key:
            self._leave(previous, pod.uid, now)
        self.records[pod.uid] = pod
        self._where[pod.uid] = key
        holders = self._holders.setdefault(key, [])
        if pod.uid not in holders:
            holders.append(pod.uid)
        self._refresh(key, now)

    def _drop(self, uid: str, now: int) -> None:
        self.records.pop(uid, None)
        key = self._where.pop(uid, None)
        if key is not None:
            self._leave(key, uid, now)

    def _leave(self, key: AddrKey, uid: str, now: int) -> None:
        holders = self._holders.get(key)
        if holders and uid in holders:
            holders.remove(uid)
            if not holders:
                del self._holders[key]
        self._refresh(key, now)

    def _refresh(self, key: AddrKey, now: int) -> None:
        holders = self._holders.get(key)
        top: tuple[str | None, int] = (
            (holders[-1], self.records[holders[-1]].generation) if holders else (None, 0)
        )
        history = self._history.setdefault(key, [])
        if history and (history[-1][1], history[-1][2]) == top:
            return
        history.append((now, *top))
        cutoff = now - self.HISTORY_NS
        while len(history) > 1 and history[1][0] <= cutoff:
            history.pop(0)

    def prune(self) -> None:
        """Forget addresses vacated longer ago than HISTORY_NS."""
        cutoff = self.clock() - self.HISTORY_NS
        for key in [k for k, h in self._history.items() if h[-1][1] is None and h[-1][0] <= cutoff]:
            del self._history[key]

    def lookup(self, addr: bytes, port: int, at_ns: int) -> tuple[str, int] | str:
        """(uid, generation) that held addr:port at ``at_ns``, or why none did."""
        history = self._history.get((addr, port))
        if not history:
            return "no_pod"
        for since, uid, generation in reversed(history):
            if since <= at_ns:
                return (uid, generation) if uid is not None else "removed"
        return "before_known"

    def watch_list(self) -> dict[bytes, int]:
        """Trie entries: address -> port (0 when several watched pods share the address)."""
        out: dict[bytes, int] = {}
        for addr, port in self._holders:
            out[addr] = port if out.get(addr, port) == port else 0
        return out


# ---- threshold -----------------------------------------------------------------------------------


class Threshold:
    """N failures of a pod within a window -> one report; then quiet for a window (per generation)."""

    def __init__(self, n: int, window: float) -> None:
        self.n = max(1, n)
        self.window_ns = int(window * 1e9)
        self._hits: dict[str, deque[tuple[int, int]]] = {}
        self._sums: dict[str, int] = {}
        self._reported: dict[str, tuple[int, int]] = {}  # uid -> (time, generation)
        self.held = 0  # failures that did not (yet) make a report

    def add(self, uid: str, generation: int, ts_ns: int, count: int) -> int:
        """Returns the failure count that crossed the threshold (0: no report now)."""
        hits = self._hits.setdefault(uid, deque())
        hits.append((ts_ns, count))
        total = self._sums.get(uid, 0) + count
        horizon = ts_ns - self.window_ns
        while hits and hits[0][0] <= horizon:
            total -= hits.popleft()[1]
        self._sums[uid] = total
        if total < self.n:
            self.held += count
            return 0
        last = self._reported.get(uid)
        if last is not None and last[1] == generation and ts_ns - last[0] < self.window_ns:
            self.held += count
            return 0
        self._reported[uid] = (ts_ns, generation)
        hits.clear()
        self._sums[uid] = 0
        return total

    def prune(self, now_ns: int) -> None:
        horizon = now_ns - self.window_ns
        for uid in [u for u, h in self._hits.items() if not h or h[-1][0] <= horizon]:
            del self._hits[uid]
            self._sums.pop(uid, None)
        for uid in [u for u, (t, _) in self._reported.items() if t <= horizon]:
            del self._reported[uid]


# ---- metrics -------------------------------------------------------------------------------------


class Histogram(BaseHistogram):
    """The router's histogram (fastproxy.metrics), rendered as Prometheus text lines."""

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{le}"}} {total}' for le, total in self.cumulative()]
        out += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


# ---- the agent -----------------------------------------------------------------------------------


class Agent:
    def __init__(self, args: argparse.Namespace, probe: Probe | None = None) -> None:
        self.args = args
        self.keys = Keys(args.namespace)
        self.node = args.node
        cidrs = [ipaddress.ip_network(c, strict=False) for c in (args.watch or [])]
        self.index = PodIndex(cidrs or None)
        self.threshold = Threshold(args.threshold, args.window)
        self.probe = probe or Probe(
            window=args.window, burst=max(1, args.threshold), abort_min=args.abort_min
        )
        self.client: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._inbox: list[bytes] = []
        self._outbox: deque[tuple[ConnectFailed, int]] = deque()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._full_read_wanted = True
        self._lower_reads = 0
        self._suppressed_seen: dict[tuple[bytes, int, int], int] = {}
        self._swept_at = 0  # the kernel's suppressed counter at the last map walk
        self._state_lost = False
        self.sweeps = 0
        self.ready = False
        # counters
        kinds = list(KIND_NAMES.values())
        self.records = dict.fromkeys(kinds, 0)
        self.suppressed = dict.fromkeys(kinds, 0)
        self.failures = dict.fromkeys(kinds, 0)
        self.unmapped: dict[str, int] = {"no_pod": 0, "removed": 0, "before_known": 0}
        self.not_reported: dict[str, int] = {}  # pod state -> failures not sent (writer would hold)
        self.submitted = {k.value: 0 for k in ConnectFailureKind}
        self.submit_errors = 0
        self.outbox_dropped = 0
        self.early_warnings = 0
        self.full_reads = 0
        self.deltas = 0
        self.watch_updates = 0
        self.latency = Histogram(LATENCY_BOUNDS)

    # ---- records from the kernel

    def _on_data(self, raw: bytes) -> None:  # inside ring_buffer_consume (a ctypes callback)
        self._inbox.append(raw)

    def _on_readable(self) -> None:
        self.drain_ring()

    def drain_ring(self) -> None:
        self.probe.consume()
        if not self._inbox:
            return
        inbox, self._inbox = self._inbox, []
        for raw in inbox:
            try:
                self.handle(Record.decode(raw))
            except Exception:  # one bad record must not stop the agent
                log.exception("record dropped")

    def _account_suppressed(self, addr: bytes, port: int, kind: int, cumulative: int) -> int:
        key = (addr, port, kind)
        previous = self._suppressed_seen.get(key, 0)
        if cumulative <= previous:
            return 0
        self._suppressed_seen[key] = cumulative
        delta = cumulative - previous
        self.suppressed[KIND_NAMES[kind]] += delta
        return delta

    def handle(self, rec: Record) -> None:
        name = rec.kind_name
        self.records[name] = self.records.get(name, 0) + 1
        count = 1 + self._account_suppressed(rec.daddr, rec.dport, rec.kind, rec.suppressed)
        self.failures[name] = self.failures.get(name, 0) + count
        pod = self.index.lookup(rec.daddr, rec.dport, rec.start_ns or rec.ts_ns)
        if isinstance(pod, str):
            self.unmapped[pod] = self.unmapped.get(pod, 0) + count
            return
        uid, generation = pod
        if rec.kind == K_RETRANSMIT:
            self.early_warnings += count
            log.info(
                "SYN retransmit to %s:%d (pod %s, by pid %d %s): no answer yet",
                addr_text(rec.daddr),
                rec.dport,
                uid,
                rec.pid,
                rec.comm,
            )
            early = self.args.early_warning
            if not early or rec.retrans < early:
                return
            failure = ConnectFailureKind.TIMEOUT
        else:
            failure = FAILURE_KINDS[rec.kind]
        if not self._reportable(uid, generation, count):
            return
        total = self.threshold.add(uid, generation, rec.ts_ns, count)
        if total:
            self.report(uid, generation, failure, rec.ts_ns, self._reason(rec, failure, total))

    def _reportable(self, uid: str, generation: int, count: int) -> bool:
        """Only a Ready or NotReady pod can be quarantined; for a pod that is pending, draining or
        already quarantined the writer would hold the report, so it is counted, not sent."""
        record = self.index.records.get(uid)
        if record is not None and record.generation == generation and record.state not in REPORTABLE:
            self.not_reported[record.state.value] = self.not_reported.get(record.state.value, 0) + count
            return False
        return True

    def _reason(self, rec: Record, failure: ConnectFailureKind, total: int) -> str:
        if rec.kind == K_RETRANSMIT:
            what = "SYN retransmitted (early warning)"
        elif rec.kind == K_UNREACHABLE and rec.err == 0:
            what = "ICMP error, its errno taken by the caller"
        elif rec.err == 0:
            what = "errno 0: the client gave up"
        else:
            what = f"errno {rec.err}"
        return (
            f"{failure.value} {addr_text(rec.daddr)}:{rec.dport} ({what}) by pid={rec.pid} comm={rec.comm} "
            f"netns={rec.netns} cgroup={rec.cgroup} retrans={rec.retrans}; "
            f"{total} failures in {self.args.window:g}s"
        )

    def report(self, uid: str, generation: int, failure: ConnectFailureKind, ts_ns: int, reason: str) -> None:
        at = time.time() - max(0, time.monotonic_ns() - ts_ns) / 1e9
        event = ConnectFailed(
            uid=uid,
            source=Source.AGENT,
            at=at,
            generation=generation,
            failure=failure,
            observer=self.node,
            reason=reason[:500],
        )
        if len(self._outbox) >= OUTBOX_MAX:
            self._outbox.popleft()
            self.outbox_dropped += 1
        self._outbox.append((event, ts_ns))
        self._wake.set()
        log.info("report %s %s (generation %d): %s", failure.value, uid, generation, reason)

    def sweep(self, force: bool = False) -> None:
        """Account suppressed counts no record carried yet (a storm that ended inside a window).
        The rate-limit map is walked only when the kernel's suppressed counter moved: a walk costs
        milliseconds (bcc allocates arrays for the whole map), a counter read microseconds."""
        self.drain_ring()
        now = time.monotonic_ns()
        self.threshold.prune(now)
        self.index.prune()
        kernel_suppressed = self.probe.counter("suppressed")
        if kernel_suppressed == self._swept_at and not force:
            return
        self._swept_at = kernel_suppressed
        self.sweeps += 1
        present = set()
        for addr, port, kind, cumulative in self.probe.ratelimit_entries():
            present.add((addr, port, kind))
            delta = self._account_suppressed(addr, port, kind, cumulative)
            if not delta:
                continue
            name = KIND_NAMES.get(kind, str(kind))
            self.failures[name] = self.failures.get(name, 0) + delta
            pod = self.index.lookup(addr, port, now)
            if isinstance(pod, str):
                self.unmapped[pod] = self.unmapped.get(pod, 0) + delta
                continue
            if kind == K_RETRANSMIT:
                self.early_warnings += delta
                continue
            if not self._reportable(pod[0], pod[1], delta):
                continue
            total = self.threshold.add(pod[0], pod[1], now, delta)
            if total:
                failure = FAILURE_KINDS.get(kind, ConnectFailureKind.UNREACHABLE)
                self.report(
                    pod[0],
                    pod[1],
                    failure,
                    now,
                    f"{failure.value} {addr_text(addr)}:{port}; {total} failures in "
                    f"{self.args.window:g}s ({delta} suppressed in the kernel)",
                )
        for key in [k for k in self._suppressed_seen if k not in present]:
            del self._suppressed_seen[key]  # evicted from the LRU: a new entry counts from 0

    # ---- watch list from the routing state

    def install_watch(self) -> None:
        added, removed = self.probe.set_watch(self.index.watch_list())
        if added or removed:
            self.watch_updates += 1
            log.debug("watch list: +%d -%d (%d addresses)", added, removed, len(self.probe.watching))

    async def full_read(self) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.version)
            pipe.hgetall(self.keys.pods)
            version_raw, pods_raw = await pipe.execute()
        version = int(version_raw or 0)
        if version < self.index.version and self._lower_reads < 2:
            self._lower_reads += 1  # a delta newer than this read was applied meanwhile (or a reset)
            return
        self._lower_reads = 0
        pods = []
        for raw in pods_raw.values():
            try:
                pods.append(decode_pod(raw))
            except SchemaError as exc:
                log.warning("pod record skipped: %s", exc)
        self.index.replace(pods)
        self.index.version = version
        self.full_reads += 1
        self._full_read_wanted = False
        self.install_watch()

    def on_delta(self, data: bytes) -> None:
        try:
            delta = decode_delta(data)
        except SchemaError as exc:
            log.warning("delta skipped: %s", exc)
            self._full_read_wanted = True
            return
        if delta.version <= self.index.version:
            return
        if delta.version != self.index.version + 1:
            self._full_read_wanted = True  # a gap: the next poll re-reads everything
        self.index.update(delta.pods)
        self.index.version = delta.version
        self.deltas += 1
        self.install_watch()

    async def follow(self) -> None:
        """Deltas as they are published, plus a version poll every --refresh seconds."""
        from statesync.connect import connect

        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.client.pubsub()
                await pubsub.subscribe(self.keys.channel)
                last_poll = time.monotonic()
                while not self._stop.is_set():
                    message = await pubsub.get_message(timeout=self.args.refresh)
                    if message is not None and message["type"] == "message":
                        data: bytes = message["data"]
                        if data.startswith(DELTA_PREFIX):
                            self.on_delta(data[1:])
                    elif message is not None and message["type"] == "subscribe":
                        await self.full_read()  # (re)subscribed: anything may have been missed
                        self.mark_ready()
                        if self._state_lost:
                            log.info("routing state reachable again (version %d)", self.index.version)
                            self._state_lost = False
                    if time.monotonic() - last_poll >= self.args.refresh:
                        last_poll = time.monotonic()
                        version = int(await self.client.get(self.keys.version) or 0)
                        if self._full_read_wanted or version != self.index.version:
                            await self.full_read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._state_lost:  # once per outage
                    log.warning("routing state unreachable (%s); keeping the last watch list", exc)
                self._state_lost = True
                with contextlib.suppress(Exception):
                    await self.client.aclose()
                self.client = connect(self.args.valkey)
                await asyncio.sleep(0.5)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()

    def mark_ready(self) -> None:
        if self.ready or self.index.version < 0:
            return
        self.ready = True
        path = self.args.ready_file
        if path:
            tmp = f"{path}.tmp"
            Path(tmp).write_text(f"pid {os.getpid()}\nwatching {len(self.probe.watching)} addresses\n")
            os.replace(tmp, path)
        log.info(
            "ready: probe attached (%.2fs to load), watching %d pods at %d addresses",
            self.probe.load_seconds,
            len(self.index.records),
            len(self.probe.watching),
        )

    # ---- reports to the writer

    async def flush_loop(self) -> None:
        from statesync.writer import submit

        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch = list(self._outbox)[:500]
                try:
                    await submit(self.client, [event for event, _ in batch], self.keys)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.submit_errors += 1
                    if backoff == 0.1:  # the first failure of an outage
                        log.warning("cannot reach Valkey (%s); %d events waiting", exc, len(self._outbox))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.1
                now = time.monotonic_ns()
                for _ in batch:
                    event, ts_ns = self._outbox.popleft()
                    self.submitted[event.failure.value] += 1
                    self.latency.observe(max(0, now - ts_ns) / 1e9)

    async def sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.sweep)
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")

    # ---- metrics

    def metrics_text(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value}")

        def by(label: str, values: dict[str, int]) -> list[tuple[str, float]]:
            return [(f'{{{label}="{k}"}}', v) for k, v in sorted(values.items())]

        kernel = self.probe.counters() if self.probe.bpf is not None else {}
        family(
            "fastproxy_agent_records_total",
            "counter",
            "ring-buffer records received",
            by("kind", self.records),
        )
        family(
            "fastproxy_agent_suppressed_total",
            "counter",
            "failures suppressed by the in-kernel rate limit, as accounted by the agent",
            by("kind", self.suppressed),
        )
        family(
            "fastproxy_agent_failures_total",
            "counter",
            "failed connects to watched addresses (records + suppressed)",
            by("kind", self.failures),
        )
        family(
            "fastproxy_agent_unmapped_total",
            "counter",
            "failures not attributable to a current pod",
            by("reason", self.unmapped),
        )
        family(
            "fastproxy_agent_not_reported_total",
            "counter",
            "failures of pods in a state where a report changes nothing (pending, draining, quarantined)",
            by("state", self.not_reported),
        )
        family(
            "fastproxy_agent_events_total",
            "counter",
            "ConnectFailed events written to Valkey",
            by("kind", self.submitted),
        )
        family(
            "fastproxy_agent_early_warnings_total",
            "counter",
            "SYN retransmits to watched pods",
            [("", self.early_warnings)],
        )
        family(
            "fastproxy_agent_below_threshold_total",
            "counter",
            "failures that did not make a report (under the threshold or within the quiet window)",
            [("", self.threshold.held)],
        )
        family(
            "fastproxy_agent_submit_errors_total",
            "counter",
            "failed XADD batches",
            [("", self.submit_errors)],
        )
        family(
            "fastproxy_agent_outbox_dropped_total",
            "counter",
            "events dropped while Valkey was unreachable",
            [("", self.outbox_dropped)],
        )
        family("fastproxy_agent_outbox", "gauge", "events waiting for Valkey", [("", len(self._outbox))])
        family(
            "fastproxy_agent_ringbuf_drops_total",
            "counter",
            "records lost because the ring buffer was full",
            [("", kernel.get("ringbuf_drops", 0))],
        )
        for name in ("emitted", "suppressed", "watched_connects", "abandoned", "tracked_closes", "other",
                     "icmp_errors"):  # fmt: skip
            family(
                f"fastproxy_agent_kernel_{name}_total",
                "counter",
                f"in-kernel counter {name}",
                [("", kernel.get(name, 0))],
            )
        family(
            "fastproxy_agent_watched_pods", "gauge", "pods in the watch list", [("", len(self.index.records))]
        )
        family(
            "fastproxy_agent_watched_addresses",
            "gauge",
            "entries in the kernel's watch trie",
            [("", len(self.probe.watching))],
        )
        family(
            "fastproxy_agent_state_version",
            "gauge",
            "routing-state version followed",
            [("", self.index.version)],
        )
        family(
            "fastproxy_agent_watch_updates_total",
            "counter",
            "changes written to the kernel's watch trie",
            [("", self.watch_updates)],
        )
        family(
            "fastproxy_agent_suppressed_sweeps_total",
            "counter",
            "walks of the in-kernel rate-limit map",
            [("", self.sweeps)],
        )
        family(
            "fastproxy_agent_state_reads_total",
            "counter",
            "full reads and deltas of the routing state",
            [('{how="full"}', self.full_reads), ('{how="delta"}', self.deltas)],
        )
        family(
            "fastproxy_agent_attached",
            "gauge",
            "1 while the probe is attached",
            [("", 1 if self.probe.attached else 0)],
        )
        family(
            "fastproxy_agent_probe_load_seconds",
            "gauge",
            "compile + load + attach time",
            [("", round(self.probe.load_seconds, 4))],
        )
        usage = resource.getrusage(resource.RUSAGE_SELF)
        family(
            "process_cpu_seconds_total", "counter", "agent CPU time", [("", usage.ru_utime + usage.ru_stime)]
        )
        lines.append("# HELP fastproxy_agent_report_latency_seconds failure in the kernel -> event in Valkey")
        lines.append("# TYPE fastproxy_agent_report_latency_seconds histogram")
        lines += self.latency.lines("fastproxy_agent_report_latency_seconds")
        return "\n".join(lines) + "\n"

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            while await asyncio.wait_for(reader.readline(), 5.0) not in (b"\r\n", b"\n", b""):
                pass  # headers: not needed
            path = request.split(b" ")[1].split(b"?")[0] if request.count(b" ") >= 2 else b""
            status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
            if path == b"/metrics":
                if self.probe.bpf is not None:
                    self.sweep()
                status, body = "200 OK", self.metrics_text().encode()
                ctype = "text/plain; version=0.0.4"
            elif path == b"/healthz":
                status, body = "200 OK", b"ok\n"
            elif path == b"/readyz":
                ok = self.ready and self.probe.attached
                status, body = ("200 OK", b"ready\n") if ok else ("503 Service Unavailable", b"not ready\n")
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, IndexError):
            pass
        finally:
            writer.close()

    # ---- lifecycle

    async def serve(self) -> int:
        from statesync.connect import connect

        self.loop = loop = asyncio.get_running_loop()
        try:
            seconds = await load_with_deadline(self.probe, self.args.attach_timeout)
        except ProbeUnavailable as exc:
            print(f"fastproxy agent: cannot run the eBPF probe: {exc}", file=sys.stderr, flush=True)
            return 1
        log.info("probe loaded and attached in %.2fs", seconds)
        if self.probe.degraded:
            log.warning("probe degraded: %s", self.probe.degraded)
        fd = self.probe.open(self._on_data)
        loop.add_reader(fd, self._on_readable)
        metrics_server = None
        if self.args.metrics:
            host, port = self.args.metrics
            metrics_server = await asyncio.start_server(self._serve_http, host, port)
            bound = metrics_server.sockets[0].getsockname()
            print(f"metrics {bound[0]}:{bound[1]}", flush=True)
        self.client = connect(self.args.valkey)
        tasks = [
            asyncio.create_task(self.follow()),
            asyncio.create_task(self.flush_loop()),
            asyncio.create_task(self.sweep_loop()),
        ]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._stop.wait()
        finally:
            loop.remove_reader(fd)
            with contextlib.suppress(Exception):
                self.sweep(force=True)
            deadline = time.monotonic() + 2.0
            while self._outbox and time.monotonic() < deadline and not any(t.done() for t in tasks[1:2]):
                await asyncio.sleep(0.01)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if metrics_server is not None:
                metrics_server.close()
            self.probe.close()
            if self.args.ready_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.args.ready_file)
            with contextlib.suppress(Exception):
                await self.client.aclose()
        return 0

    def stop(self) -> None:
        self._stop.set()


async def load_with_deadline(probe: Probe, timeout: float) -> float:
    """Compile + load + attach on a daemon thread (ctypes releases the GIL), with a deadline: on a
    loaded machine one compile took 11 s. A compile that never ends cannot be cancelled, but the
    daemon thread does not keep the process alive."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[float] = loop.create_future()

    def settle(result: float | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or 0.0)

    def work() -> None:
        try:
            result = probe.load()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="bpf-load", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        raise ProbeUnavailable(f"compiling and attaching the probe took more than {timeout:g}s") from None


# ---- command line --------------------------------------------------------------------------------


def run_check() -> int:
    checks = check_node()
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<{width}}  {check.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"this node cannot run the eBPF probe: {'; '.join(f'{c.name}: {c.detail}' for c in failed)}")
        return 1
    probe = Probe()
    try:
        seconds = probe.load(check=False)
    except ProbeUnavailable as exc:
        print(f"FAIL  {'load':<{width}}  {exc}")
        print(f"this node cannot run the eBPF probe: {exc}")
        return 1
    finally:
        probe.close()
    print(
        f"ok    {'load':<{width}}  compiled, loaded and attached in {seconds:.2f}s (then detached)"
        f"{'; degraded: ' + probe.degraded if probe.degraded else ''}"
    )
    print("this node can run the eBPF probe")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.check:
        return run_check()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.window <= 0 or args.threshold < 1 or args.refresh <= 0 or args.sweep <= 0:
        print(
            "fastproxy agent: --window, --refresh and --sweep must be > 0 and --threshold >= 1",
            file=sys.stderr,
        )
        return 2
    import uvloop

    async def main() -> int:
        return await Agent(args).serve()

    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(main())
    return 0


def _cidr(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def register(subparsers: Any) -> None:
    from fastproxy.router import parse_address

    parser = subparsers.add_parser(
        "agent",
        help="the eBPF node agent: failed connects to pods, seen in the kernel, reported to the writer",
        description=(
            "Attaches tracepoint probes (bcc) that classify every failed connect on this node to a watched "
            "pod (refused, timeout, reset, unreachable; SYN retransmits as an early warning), and reports "
            "them as ConnectFailed events keyed by pod UID and generation. Needs root or CAP_BPF + "
            "CAP_PERFMON, kernel headers, tracefs and Debian's python3-bpfcc; `--check` says whether this "
            "node has them."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only say whether this node can run the probe (and why not); exit 1 if not",
    )
    parser.add_argument(
        "--valkey",
        default=os.environ.get("FASTPROXY_VALKEY", "valkey://127.0.0.1:6379/0"),
        help="Valkey URL [FASTPROXY_VALKEY]",
    )
    parser.add_argument("--namespace", default="fastproxy", help="key prefix")
    parser.add_argument(
        "--node",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node's name, the events' observer [NODE_NAME]",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--watch",
        action="append",
        type=_cidr,
        metavar="CIDR",
        help="watch only pods inside these CIDRs (repeatable)",
    )
    scope.add_argument(
        "--all-pods", action="store_true", help="watch every pod (the default without --watch)"
    )
    parser.add_argument(
        "--threshold", type=int, default=1, help="failures of a pod within --window that make a report"
    )
    parser.add_argument(
        "--window",
        type=float,
        default=1.0,
        help="seconds: threshold window, quiet time after a report, in-kernel rate-limit window",
    )
    parser.add_argument(
        "--early-warning",
        type=int,
        default=0,
        metavar="N",
        help="also report a timeout once a connect had N SYN retransmits (0: only count them)",
    )
    parser.add_argument(
        "--abort-min",
        type=float,
        default=0.2,
        help="seconds: a connect the client abandons after this long (or after a SYN "
        "retransmit) counts as a timeout; sooner, it is not a failure",
    )
    parser.add_argument(
        "--refresh", type=float, default=1.0, help="seconds between routing-state version polls"
    )
    parser.add_argument(
        "--sweep", type=float, default=1.0, help="seconds between reads of the in-kernel suppressed counts"
    )
    parser.add_argument(
        "--metrics",
        type=lambda t: parse_address(t, "127.0.0.1"),
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics (and /healthz, /readyz) here",
    )
    parser.add_argument("--ready-file", default=None, help="written once the probe is attached and watching")
    parser.add_argument(
        "--attach-timeout",
        type=float,
        default=60.0,
        help="seconds allowed for compiling and attaching the probe",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)
