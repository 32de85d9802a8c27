"""SYN blackholes in network namespaces the tests create: one pod, and one router toward all pods.

Needs root, ``ip netns`` and iptables (skips with the precise reason otherwise; ``make test`` as
root installs iproute2 and iptables through scripts/prepare-ebpf.sh).

1. *SYN blackhole to a pod*: a router and two pods run inside a fresh namespace; iptables there
   drops every SYN to pod A. Each request the router sends toward A waits out the connect timeout,
   A is excluded locally and the request goes to B: no client error, every request within its
   deadline, each executed exactly once (B records the ids it executed), A executed nothing.
2. *One router fails toward every pod*: the fleet (Valkey, the real writer, 12 pods and a healthy
   router) lives in the host's loopback; a second router runs in a partitioned namespace where
   every pod address is dead (half blackholed: connect timeouts; half nothing listening: refused)
   and reaches Valkey through a loopback bridge into that namespace. It reports every pod. The
   writer's noisy-observer rule must keep the fleet serving: at no version were more than
   ``observer_fraction`` of the pods quarantined, the few admitted recover, and the healthy router
   answered every request with 200 throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import valkey

from fastproxy.config import RouterConfig, RoutesFile
from fastproxy.proxy import ClientConnection
from fastproxy.router import Router
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.keys import Keys
from statesync.schema import PodDiscovered, PodState, RouteChanged, Source, decode_delta
from statesync.subscriber import ReportForwarder, StateFollower
from statesync.writer import QuarantinePolicy, Writer, submit
from tests.conftest import chat_route, next_pod_address, pod_record, wait_for
from tests.faults.conftest import FaultReport
from tests.faults.netns import NetNS, http_request, netns_problems

PY = sys.executable
REPO = str(Path(__file__).resolve().parent.parent.parent)
TOKEN = "syn-admin"


@pytest.fixture
def netns() -> Iterator[Any]:
    problems = netns_problems()
    if problems:
        pytest.skip("network namespaces unavailable: " + "; ".join(problems))
    made: list[NetNS] = []

    def make() -> NetNS:
        ns = NetNS().create()
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in made:
            ns.delete()


class Children:
    """Child processes that print ``listening HOST:PORT ...`` first; all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, argv: list[str]) -> list[str]:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=REPO
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("listening "), f"{argv[-8:]}: {line!r}"
        return line.split()

    async def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def address(word: str) -> tuple[str, int]:
    host, port = word.rsplit(":", 1)
    return host, int(port)


def metric(text: bytes, name: str) -> float:
    match = re.search(rb"^" + name.encode() + rb" ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_syn_blackhole_to_one_pod(netns: Any, tmp_path: Path, fault_report: FaultReport) -> None:
    ns: NetNS = netns()
    children = Children()
    connect_timeout = 0.25
    try:
        ip_a, ip_b = next_pod_address(), next_pod_address()
        upstream = [PY, "-m", "fastproxy.devtools.upstream", "--record-ids", "--listen"]
        pod_a = address((await children.start(ns.cmd(*upstream, f"{ip_a}:0")))[1])
        pod_b = address((await children.start(ns.cmd(*upstream, f"{ip_b}:0")))[1])
        routes = tmp_path / "routes.json"
        pods = [pod_record("a", pod_a, concurrency=8), pod_record("b", pod_b, concurrency=8)]
        routes.write_bytes(msgspec.json.encode(RoutesFile(routes=[chat_route()], pods=pods)))
        (tmp_path / "token").write_text(TOKEN)
        blackhole = ("OUTPUT", "-p", "tcp", "--syn", "-d", ip_a, "-j", "DROP")
        ns.iptables("-A", *blackhole)
        words = await children.start(ns.cmd(
            PY, "-m", "fastproxy.cli", "router", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--routes", str(routes), "--admin-token-file", str(tmp_path / "token"), "--log-level", "error",
            "--connect-timeout", str(connect_timeout), "--exclusion-seconds", "0.5",
        ))  # fmt: skip
        router, admin = address(words[1]), address(words[3])

        # Six keep-alive clients, 2 s of requests: A is tried again after each 0.5 s exclusion.
        sent: list[str] = []
        outcomes: dict[str, int] = {}
        latencies: list[float] = []

        async def client(worker: int) -> None:
            reader, writer = await ns.open_connection(*router)
            try:
                deadline = time.monotonic() + 2.0
                i = 0
                while time.monotonic() < deadline:
                    rid = f"syn-{worker}-{i}"
                    i += 1
                    sent.append(rid)
                    started = time.monotonic()
                    writer.write(f"GET /delay/10 HTTP/1.1\r\nHost: a\r\nX-Request-Id: {rid}\r\n\r\n".encode())
                    try:
                        async with asyncio.timeout(5):
                            head = await reader.readuntil(b"\r\n\r\n")
                            length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
                            await reader.readexactly(length)
                        kind = head[9:12].decode()
                    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
                        kind = type(exc).__name__
                        outcomes[kind] = outcomes.get(kind, 0) + 1
                        return
                    outcomes[kind] = outcomes.get(kind, 0) + 1
                    latencies.append(time.monotonic() - started)
            finally:
                writer.close()

        await asyncio.gather(*(client(w) for w in range(6)))
        _, metrics = await http_request((ns, *admin), "/metrics", f"Authorization: Bearer {TOKEN}\r\n")
        _, ids_b = await http_request((ns, *pod_b), "/control/ids")
        ns.iptables("-D", *blackhole)  # to ask A what it executed
        _, stats_a = await http_request((ns, *pod_a), "/control/stats")
    finally:
        await children.close()
    executed_b = json.loads(ids_b)
    executed_a = json.loads(stats_a)["work_count"]
    exclusions = metric(metrics, "fastproxy_local_exclusions_total")
    timeouts = metric(metrics, 'fastproxy_retries_total{kind="timeout"}')
    violations = []
    errors = {k: v for k, v in outcomes.items() if k != "200"}
    if errors:
        violations.append(f"client errors: {errors}")
    if max(latencies, default=0) > connect_timeout + 1.0:  # one timeout, then B (10 ms) on a busy box
        violations.append(f"slowest request {max(latencies):.2f}s: more than one connect timeout")
    if executed_b["duplicates"] or sorted(executed_b["ids"]) != sorted(sent):
        violations.append(
            f"B executed {executed_b['count']} ({executed_b['duplicates']} twice) of {len(sent)} sent"
        )
    if executed_a:
        violations.append(f"A executed {executed_a} requests behind a SYN blackhole")
    if exclusions < 1:
        violations.append("the router never excluded A")
    notes = (f"A excluded {exclusions:.0f}x (connect timeouts {timeouts:.0f}), slowest "
             f"{max(latencies, default=0) * 1e3:.0f} ms, B ran {executed_b['count']}")  # fmt: skip
    fault_report.add("SYN blackhole to one pod", len(sent), errors, len(violations), notes)
    assert violations == []


class Fleet:
    """Valkey, the real writer, ``size`` pods and a healthy router, all on the host's loopback."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def start(self, harness: Any) -> Fleet:
        self.valkey = EmbeddedValkey().start()
        self.admin = valkey.Valkey(host=self.valkey.host, port=self.valkey.port)
        self.keys = Keys("fpsyn")
        loop = asyncio.get_running_loop()
        self.policy = QuarantinePolicy()
        self.writer = Writer(connect(self.valkey.url), keys=self.keys, writer_id="w-syn", lease_ttl=2,
                             policy=self.policy)  # fmt: skip
        self.router = Router(RouterConfig(instance="healthy-router", queue_timeout=5), loop)
        self.follower = StateFollower(self.router, self.valkey.url, keys=self.keys)
        self.tasks = [asyncio.create_task(t) for t in (self.writer.run(), self.follower.run(),
                      ReportForwarder(self.router, self.valkey.url, keys=self.keys).run())]  # fmt: skip
        self.server = await loop.create_server(lambda: ClientConnection(self.router), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.apps = [await harness.app() for _ in range(self.size)]
        events: list[Any] = [RouteChanged(route=chat_route(), at=time.time())]
        events += [
            PodDiscovered(uid=f"pod-{i}", source=Source.SIDECAR, at=time.time(), namespace="ml", revision="chat-v1",
                          ip=app.address[0], port=app.address[1], concurrency=4, ready=True)
            for i, app in enumerate(self.apps)
        ]  # fmt: skip
        await submit(self.writer.client, events, self.keys)
        await wait_for(
            lambda: self.ready() == self.size, timeout=15, what="the fleet ready in the healthy router"
        )
        return self

    def ready(self) -> int:
        return sum(1 for p in self.router.snapshot.pods.values() if p.state is PodState.READY)

    def events_added(self) -> int:
        """Entries ever appended to the events stream (trimming does not lower it)."""
        info = self.admin.xinfo_stream(self.keys.events)
        return int(info["entries-added"])

    def events_consumed(self, at_least: int) -> bool:
        """At least this many entries appended, and the writers' group has read and acked all."""
        if self.events_added() < at_least:
            return False
        (group,) = self.admin.xinfo_groups(self.keys.events)
        return int(group["pending"]) == 0 and int(group["lag"] or 0) == 0

    def quarantine_history(self) -> tuple[int, int]:
        """(most pods quarantined at any committed version, quarantines committed), from the log."""
        client = self.admin
        state: dict[str, PodState] = {}
        most = total = 0
        for _, fields in client.xrange(self.keys.changes):
            for record in decode_delta(fields[b"d"]).pods:
                if record.state is PodState.QUARANTINED and state.get(record.uid) is not PodState.QUARANTINED:
                    total += 1
                state[record.uid] = record.state
            most = max(most, sum(1 for s in state.values() if s is PodState.QUARANTINED))
        return most, total

    async def close(self) -> None:
        self.follower.stop()
        self.writer.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.server.close()
        for conn in list(self.router.connections):
            conn.abort()
        self.router.pool.close_all()
        self.admin.close()
        self.valkey.close()


async def test_one_router_failing_toward_all_pods_does_not_quarantine_the_fleet(
    netns: Any, harness: Any, tmp_path: Path, fault_report: FaultReport
) -> None:
    await one_router_fails_toward_all(netns, harness, tmp_path, fault_report, fleet_size=12)


@pytest.mark.faults_long
async def test_one_router_failing_toward_all_pods_large_fleet(
    netns: Any, harness: Any, tmp_path: Path, fault_report: FaultReport
) -> None:
    await one_router_fails_toward_all(netns, harness, tmp_path, fault_report, fleet_size=100)


async def one_router_fails_toward_all(
    netns: Any, harness: Any, tmp_path: Path, fault_report: FaultReport, fleet_size: int
) -> None:
    partitioned: NetNS = netns()
    (tmp_path / "token").write_text(TOKEN)
    fleet = await Fleet(fleet_size).start(harness)
    children = Children()
    bridge = None
    try:
        # Inside the partition, half the pod addresses swallow SYNs, the other half refuse.
        for app in fleet.apps[: fleet_size // 2]:
            partitioned.iptables("-A", "OUTPUT", "-p", "tcp", "--syn", "-d", app.address[0], "-j", "DROP")
        bridge, valkey_port = await partitioned.bridge((fleet.valkey.host, fleet.valkey.port))
        words = await children.start(partitioned.cmd(
            PY, "-m", "fastproxy.cli", "router", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--valkey", f"valkey://127.0.0.1:{valkey_port}/0", "--namespace", fleet.keys.ns,
            "--instance", "partitioned-router", "--connect-timeout", "0.2", "--exclusion-seconds", "30",
            "--max-attempts", "4", "--queue-timeout", "1", "--admin-token-file", str(tmp_path / "token"),
            "--log-level", "error",
        ))  # fmt: skip
        bad_router = address(words[1])

        async def bad_router_synced() -> bool:
            status, _ = await http_request((partitioned, *address(words[3])), "/readyz")
            return status == 200

        deadline = time.monotonic() + 15
        while not await bad_router_synced():
            assert time.monotonic() < deadline, "the partitioned router never read the routing state"
            await asyncio.sleep(0.05)

        # The healthy router's clients: a fixed rate for the whole storm, and after it.
        healthy: dict[str, int] = {}
        storm_over = asyncio.Event()

        async def healthy_client() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
            try:
                while not storm_over.is_set():
                    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                    try:
                        async with asyncio.timeout(5):
                            head = await reader.readuntil(b"\r\n\r\n")
                            length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
                            await reader.readexactly(length)
                        kind = head[9:12].decode()
                    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
                        kind = type(exc).__name__
                    healthy[kind] = healthy.get(kind, 0) + 1
                    if kind != "200":
                        return
                    await asyncio.sleep(0.005)
            finally:
                writer.close()

        clients = [asyncio.create_task(healthy_client()) for _ in range(4)]
        # The storm: every request to the partitioned router fails toward up to 4 pods.
        bad: dict[str, int] = {}

        async def bad_request() -> None:
            try:
                status, _ = await http_request((partitioned, *bad_router), "/", timeout=10)
                kind = str(status)
            except (OSError, TimeoutError) as exc:
                kind = type(exc).__name__
            bad[kind] = bad.get(kind, 0) + 1

        events_before = fleet.events_added()
        await asyncio.gather(*(bad_request() for _ in range(fleet_size)))
        _, metrics = await http_request(
            (partitioned, *address(words[3])), "/metrics", f"Authorization: Bearer {TOKEN}\r\n"
        )
        # Every report it made reaches the stream, and the writer has read and acknowledged them all.
        reported = int(metric(metrics, "fastproxy_local_exclusions_total"))
        await wait_for(lambda: fleet.events_consumed(events_before + reported), timeout=15,
                       what="the partitioned router's reports processed by the writer")  # fmt: skip
        await wait_for(lambda: fleet.ready() == fleet_size, timeout=15, what="every pod ready again")
        after = sum(healthy.values()) + 100  # and the healthy router keeps serving after it
        await wait_for(
            lambda: sum(healthy.values()) >= after, timeout=10, what="healthy requests after the storm"
        )
        storm_over.set()
        await asyncio.gather(*clients)
    finally:
        if bridge is not None:
            bridge.close()
        await children.close()
        most, total = fleet.quarantine_history()
        held = fleet.policy.held
        await fleet.close()
    served = sum(1 for app in fleet.apps if app.requests)
    cap = int(
        QuarantinePolicy().observer_fraction * fleet_size
    )  # the shipped default, not the one under test
    violations = []
    errors = {k: v for k, v in healthy.items() if k != "200"}
    if errors:
        violations.append(f"healthy router's clients saw errors: {errors}")
    if most > cap:
        violations.append(f"{most} of {fleet_size} pods quarantined at once on one router's word (cap {cap})")
    if held < fleet_size - cap - 1:
        violations.append(f"only {held} reports held back: the noisy-observer rule did not engage")
    notes = (f"partitioned router: {dict(sorted(bad.items()))}, excluded "
             f"{metric(metrics, 'fastproxy_local_exclusions_total'):.0f} pods; writer held {held} reports, "
             f"quarantined {total} (at most {most} at once, cap {cap}); healthy router served {served}/{fleet_size} pods")  # fmt: skip
    fault_report.add(f"one router fails toward all {fleet_size} pods", sum(healthy.values()) + sum(bad.values()), errors,
                     len(violations), notes)  # fmt: skip
    print("\n" + notes)
    assert violations == []
