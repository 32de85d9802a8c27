"""The eBPF node agent: real kernel probes, a real ``fastproxy agent`` process, a real valkey-server.

Failures are produced on loopback only: refused = a closed port on a 127.x pod address; reset = a
server that closes with SO_LINGER 0; SYN timeout = iptables dropping SYNs inside a network
namespace this test creates (and deletes). The first tests are pure Python (attribution, threshold,
early warning) and run everywhere; the rest need the probe (see conftest: skip, or fail under
REQUIRE_EBPF=1).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import valkey

from probes.agent import Agent, PodIndex, Threshold
from probes.probe import K_REFUSED, K_RETRANSMIT, RECORD, Probe, Record, addr16, addr_text
from probes.testing import AgentProcess, PodStore, closed_port, pod, refused_connect
from statesync.schema import ConnectFailed, ConnectFailureKind, PodState, Source, decode_event
from tests.ebpf.conftest import FIGURES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---- pure Python: attribution, threshold, early warning (no kernel needed) -----------------------


class FakeProbe:
    bpf = None
    attached = False
    load_seconds = 0.0

    def __init__(self) -> None:
        self.watching: dict[bytes, int] = {}

    def set_watch(self, wanted: dict[bytes, int]) -> tuple[int, int]:
        self.watching = dict(wanted)
        return len(wanted), 0


def agent_args(**overrides: Any) -> argparse.Namespace:
    args = dict(
        namespace="fpt",
        node="node-a",
        watch=None,
        threshold=1,
        window=1.0,
        abort_min=0.2,
        early_warning=0,
        refresh=1.0,
        sweep=1.0,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def record(
    ip: str,
    port: int,
    kind: int = K_REFUSED,
    *,
    ts: int,
    start: int | None = None,
    suppressed: int = 0,
    retrans: int = 0,
) -> Record:
    return Record(
        ts_ns=ts,
        start_ns=ts if start is None else start,
        suppressed=suppressed,
        cgroup=1,
        pid=42,
        tid=42,
        netns=4026531840,
        retrans=retrans,
        err=111 if kind == K_REFUSED else 0,
        dport=port,
        sport=40000,
        daddr=addr16(ip),
        saddr=addr16("127.0.0.1"),
        kind=kind,
        oldstate=2,
        comm="client",
    )


def make_agent(**overrides: Any) -> Agent:
    agent = Agent(agent_args(**overrides), probe=FakeProbe())  # type: ignore[arg-type]
    agent.index.clock = lambda: 0  # pods known since time 0 (records below use small timestamps)
    return agent


def reported(agent: Agent) -> list[ConnectFailed]:
    return [event for event, _ in agent._outbox]


def test_record_layout_matches_the_c_struct() -> None:
    with open(os.path.join(REPO, "probes", "connect_failures.bpf.c")) as handle:
        source = handle.read()
    assert RECORD.size == 112 and "u8 pad[6];" in source and "char comm[16];" in source
    raw = RECORD.pack(1, 2, 3, 4, 5, 6, 7, 8, -9, 80, 81, addr16("10.1.2.3"), addr16("::1"), 1, 2, b"curl\0")
    rec = Record.decode(raw)
    assert (rec.pid, rec.err, rec.dport, rec.comm, rec.kind_name) == (5, -9, 80, "curl", "refused")


def test_a_recycled_ip_never_charges_the_new_pod() -> None:
    clock = [1_000]
    index = PodIndex(clock=lambda: clock[0])
    old = pod("old-pod", "10.0.0.7", 8012, generation=4)
    index.replace([old])
    clock[0] = 2_000
    index.update([pod("old-pod", "10.0.0.7", 8012, generation=5, state=PodState.REMOVED)])
    clock[0] = 3_000
    index.update([pod("new-pod", "10.0.0.7", 8012, generation=1)])
    key = addr16("10.0.0.7")
    assert index.lookup(key, 8012, 500) == "before_known"
    assert index.lookup(key, 8012, 1_500) == ("old-pod", 4)
    assert index.lookup(key, 8012, 2_500) == "removed"
    assert index.lookup(key, 8012, 3_500) == ("new-pod", 1)
    assert index.lookup(key, 9999, 3_500) == "no_pod"
    # Through the agent: a connect that started while the old pod held the address and failed after
    # the new pod arrived is charged to the old UID (which the writer ignores), never the new one.
    agent = Agent(agent_args(), probe=FakeProbe())  # type: ignore[arg-type]
    agent.index = index
    agent.handle(record("10.0.0.7", 8012, ts=3_600, start=1_800))
    agent.handle(record("10.0.0.7", 8012, ts=3_700, start=3_650))
    assert [(e.uid, e.generation) for e in reported(agent)] == [("old-pod", 4), ("new-pod", 1)]


def test_threshold_counts_suppressed_failures_and_stays_quiet_per_generation() -> None:
    second = 1_000_000_000
    agent = make_agent(threshold=3, window=1.0)
    agent.index.replace([pod("p1", "10.0.0.8", 80, generation=2)])
    agent.handle(record("10.0.0.8", 80, ts=1 * second))
    agent.handle(record("10.0.0.8", 80, ts=1 * second + 10))
    assert reported(agent) == []
    agent.handle(record("10.0.0.8", 80, ts=1 * second + 20))  # third failure within the window
    (event,) = reported(agent)
    assert (event.uid, event.generation, event.failure, event.source, event.observer) == (
        "p1",
        2,
        ConnectFailureKind.REFUSED,
        Source.AGENT,
        "node-a",
    )
    assert "pid=42 comm=client" in event.reason and "3 failures" in event.reason
    # the in-kernel rate limit's cumulative suppressed count is carried by the next record
    agent.handle(record("10.0.0.8", 80, ts=1 * second + 30, suppressed=500))
    assert len(reported(agent)) == 1  # quiet for a window at the same generation
    assert agent.failures["refused"] == 504 and agent.suppressed["refused"] == 500
    agent.index.update([pod("p1", "10.0.0.8", 80, generation=3)])  # recovered, a new generation
    for i in range(3):
        agent.handle(record("10.0.0.8", 80, ts=2 * second + i))
    assert [e.generation for e in reported(agent)] == [2, 3]
    threshold = Threshold(2, 1.0)
    assert threshold.add("x", 1, 0, 1) == 0 and threshold.add("x", 1, 2 * second, 1) == 0  # window expired


def test_no_report_where_the_writer_would_hold_it() -> None:
    agent = make_agent()
    agent.index.replace([pod("q", "10.0.0.10", 80, generation=6, state=PodState.QUARANTINED)])
    agent.handle(record("10.0.0.10", 80, ts=10))
    assert reported(agent) == [] and agent.not_reported == {"quarantined": 1}
    agent.index.update([pod("q", "10.0.0.10", 80, generation=7, state=PodState.READY)])  # recovered
    agent.handle(record("10.0.0.10", 80, ts=20))
    assert [(e.uid, e.generation) for e in reported(agent)] == [("q", 7)]


def test_early_warning_reports_a_timeout_after_n_syn_retransmits() -> None:
    agent = make_agent(early_warning=2)
    agent.index.replace([pod("slow", "10.0.0.9", 80, generation=7)])
    agent.handle(record("10.0.0.9", 80, K_RETRANSMIT, ts=10, retrans=1))
    assert reported(agent) == [] and agent.early_warnings == 1
    agent.handle(record("10.0.0.9", 80, K_RETRANSMIT, ts=20, retrans=2))
    (event,) = reported(agent)
    assert event.failure is ConnectFailureKind.TIMEOUT and "early warning" in event.reason
    quiet = make_agent()
    quiet.index.replace([pod("slow", "10.0.0.9", 80)])
    quiet.handle(record("10.0.0.9", 80, K_RETRANSMIT, ts=10, retrans=5))
    assert reported(quiet) == [] and quiet.early_warnings == 1


def test_watch_list_scope_and_shared_addresses() -> None:
    import ipaddress

    index = PodIndex([ipaddress.ip_network("10.1.0.0/16")])
    index.replace(
        [
            pod("a", "10.1.0.1", 80),
            pod("b", "10.1.0.1", 81),
            pod("c", "10.2.0.1", 80),
            pod("d", "10.1.0.2", 90),
            pod("e", "10.1.0.3", 90, state=PodState.REMOVED),
        ]
    )
    assert index.watch_list() == {addr16("10.1.0.1"): 0, addr16("10.1.0.2"): 90}
    assert set(index.records) == {"a", "b", "d"}


# ---- with the probe -------------------------------------------------------------------------------


def wait_events(store: PodStore, after: str, predicate: Any, timeout: float = 5.0) -> list[ConnectFailed]:
    deadline = time.monotonic() + timeout
    while True:
        events = [e for _, e in store.events(after) if predicate(e)]
        if events:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching event within {timeout}s; stream has {store.events(after)}")
        time.sleep(0.01)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def thread_comm() -> str:
    with open("/proc/thread-self/comm") as handle:
        return handle.read().strip()


def test_refused_connect_is_reported_for_the_right_pod_within_milliseconds(
    agent: AgentProcess, store: PodStore, valkey_server: Any
) -> None:
    pods = []
    for i in range(200):
        ip = f"127.70.{1 + i // 250}.{1 + i % 250}"
        pods.append(pod(f"latency-{i:03d}", ip, closed_port(ip), generation=3))
    agent.wait_version(store.commit(pods))
    reader = valkey.Valkey.from_url(valkey_server.url)
    latencies = []
    last = store.last_id()
    for target in pods:
        refused_connect((target.ip, target.port))
        failed = time.perf_counter()
        reply = reader.xread({store.keys.events: last}, block=2000, count=10)
        latencies.append(time.perf_counter() - failed)
        assert reply, f"no event for {target.uid}"
        entries = reply[0][1]
        last = entries[-1][0].decode()
        assert [decode_event(fields[b"e"]).uid for _, fields in entries] == [target.uid]
    reader.close()
    events = {e.uid: e for _, e in store.events("0-0") if e.uid.startswith("latency-")}
    assert set(events) == {p.uid for p in pods}
    comm = thread_comm()
    for event in events.values():
        assert event.failure is ConnectFailureKind.REFUSED and event.source is Source.AGENT
        assert event.generation == 3 and event.observer == "test-node"
        assert f"pid={os.getpid()} comm={comm} " in event.reason and "errno 111" in event.reason
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    FIGURES["refused connect() -> ConnectFailed in Valkey (200 pods)"] = (
        f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, max {max(latencies) * 1e3:.2f} ms "
        "(goal p99 <= 10 ms)"
    )
    metrics = agent.metrics()
    assert metrics["fastproxy_agent_ringbuf_drops_total"] == 0
    assert p50 <= 0.010, latencies
    assert p99 <= 0.050, latencies  # the goal is 10 ms; a shared 2-vCPU machine gets some slack


def test_unwatched_addresses_report_nothing(agent: AgentProcess, store: PodStore) -> None:
    outside = pod("outside-cidr", "127.200.0.1", closed_port("127.200.0.1"))
    inside = pod("unwatched-port", "127.70.8.1", closed_port("127.70.8.1"))
    agent.wait_version(store.commit([outside, inside]))
    before = agent.metrics()
    last = store.last_id()
    refused_connect((outside.ip, outside.port))  # a pod, but outside --watch
    refused_connect(("127.70.9.9", closed_port("127.70.9.9")))  # inside the CIDR, but no pod there
    refused_connect((inside.ip, closed_port(inside.ip)))  # a pod's address, another port
    time.sleep(0.3)
    after = agent.metrics()
    for name in (
        "fastproxy_agent_kernel_watched_connects_total",
        "fastproxy_agent_kernel_emitted_total",
        'fastproxy_agent_records_total{kind="refused"}',
    ):
        assert after[name] == before[name], name
    assert store.events(last) == []
    assert after["fastproxy_agent_watched_pods"] >= 1
    refused_connect((inside.ip, inside.port))  # the control: the pod itself is watched
    wait_events(store, last, lambda e: e.uid == "unwatched-port")


def test_reset_by_peer_is_reported_as_reset(agent: AgentProcess, store: PodStore) -> None:
    ip = "127.70.10.1"
    with socket.socket() as server:
        server.bind((ip, 0))
        server.listen()
        target = pod("reset-pod", ip, server.getsockname()[1], generation=2)
        agent.wait_version(store.commit([target]))
        last = store.last_id()
        client = socket.create_connection((ip, target.port))
        conn, _ = server.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        client.close()
    (event,) = wait_events(store, last, lambda e: e.uid == "reset-pod")
    assert event.failure is ConnectFailureKind.RESET and event.generation == 2
    assert "errno 104" in event.reason and f"pid={os.getpid()} " in event.reason


def test_connect_storm_makes_a_handful_of_events_and_counts_the_rest(
    agent: AgentProcess, store: PodStore
) -> None:
    ip = "127.70.11.1"
    target = pod("storm-pod", ip, closed_port(ip))
    agent.wait_version(store.commit([target]))
    before = agent.metrics()
    last = store.last_id()
    storm = 2000
    started = time.perf_counter()
    for _ in range(storm):
        refused_connect((ip, target.port))
    duration = time.perf_counter() - started
    name = 'fastproxy_agent_failures_total{kind="refused"}'
    deadline = time.monotonic() + 5
    while (after := agent.metrics())[name] - before[name] < storm and time.monotonic() < deadline:
        time.sleep(0.05)

    def delta(metric: str) -> float:
        return after[metric] - before[metric]

    records = delta('fastproxy_agent_records_total{kind="refused"}')
    suppressed = delta('fastproxy_agent_suppressed_total{kind="refused"}')
    events = [e for _, e in store.events(last) if e.uid == "storm-pod"]
    assert delta(name) == storm, (delta(name), after)
    assert 1 <= records <= 2 + duration, records  # burst 1 per 1 s window
    assert records + suppressed == storm
    assert delta("fastproxy_agent_kernel_suppressed_total") == suppressed
    assert delta("fastproxy_agent_kernel_emitted_total") == records
    assert after["fastproxy_agent_ringbuf_drops_total"] == 0
    assert 1 <= len(events) <= records
    assert all(e.failure is ConnectFailureKind.REFUSED for e in events)
    FIGURES["connect storm"] = (
        f"{storm} refused connects in {duration * 1e3:.0f} ms ({storm / duration:,.0f}/s): "
        f"{records:.0f} ring "
        f"records, {len(events)} event(s), {suppressed:.0f} suppressed in the kernel, 0 ring-buffer drops"
    )


def test_a_uvloop_client_like_the_router_is_seen_too(agent: AgentProcess, store: PodStore) -> None:
    """The router connects the non-blocking way (uvloop: connect, poll, SO_ERROR)."""
    import asyncio

    import uvloop

    ip = "127.70.16.1"
    target = pod("uvloop-pod", ip, closed_port(ip), generation=4)
    agent.wait_version(store.commit([target]))
    last = store.last_id()

    async def connect() -> None:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(ip, target.port)

    uvloop.run(connect())
    (event,) = wait_events(store, last, lambda e: e.uid == "uvloop-pod")
    assert event.failure is ConnectFailureKind.REFUSED and event.generation == 4
    assert f"pid={os.getpid()} " in event.reason


def test_pid_and_comm_of_the_connecting_process(agent: AgentProcess, store: PodStore) -> None:
    ip = "127.70.12.1"
    target = pod("whoami-pod", ip, closed_port(ip))
    agent.wait_version(store.commit([target]))
    last = store.last_id()
    code = (
        "import ctypes, socket\n"
        "ctypes.CDLL(None).prctl(15, b'fp-conn-test', 0, 0, 0)\n"
        f"s = socket.socket()\ntry:\n    s.connect(({ip!r}, {target.port}))\nexcept ConnectionRefusedError:\n"
        "    print('refused')\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert child.stdout.strip() == "refused", child.stderr
    (event,) = wait_events(store, last, lambda e: e.uid == "whoami-pod")
    # a pid recorded inside connect() (the caller's context), not the softirq that saw the RST
    assert " comm=fp-conn-test " in event.reason
    pid = int(event.reason.split("pid=")[1].split()[0])
    assert pid != os.getpid() and pid > 0
    # and from a thread of this process: the tgid is reported, with the thread's comm
    target2 = pod("whoami-thread", ip, closed_port(ip))
    agent.wait_version(store.commit([target2]))

    def connect_named() -> None:
        import ctypes

        ctypes.CDLL(None).prctl(15, b"fp-thread", 0, 0, 0)
        refused_connect((ip, target2.port))

    thread = threading.Thread(target=connect_named)
    thread.start()
    thread.join()
    (event2,) = wait_events(store, last, lambda e: e.uid == "whoami-thread")
    assert f"pid={os.getpid()} comm=fp-thread " in event2.reason


@pytest.fixture
def netns() -> Any:
    if shutil.which("ip") is None or shutil.which("iptables") is None:
        pytest.skip("ip / iptables not installed")
    name = f"fpt-agent-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_netns(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, capture_output=True)


def test_syn_blackhole_and_icmp_unreachable_in_a_netns(
    agent: AgentProcess, store: PodStore, netns: str
) -> None:
    """Inside a network namespace the test owns, at once: one pod's SYNs are dropped (the client
    gives up after 1.5 s); two pods' SYNs are answered with ICMP host unreachable, one to a
    blocking connect() (the kernel closes the socket with EHOSTUNREACH at the 1 s retransmit) and
    one to a non-blocking connect with poll + SO_ERROR, as asyncio and uvloop do (the caller takes
    the error and closes the socket itself)."""
    ip, port, blocking, polling = "127.70.13.1", 4999, 4998, 4997
    in_netns(netns, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(port), "--syn", "-j", "DROP")
    for rejected in (blocking, polling):
        in_netns(
            netns,
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            str(rejected),
            "--syn",
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-host-unreachable",
        )
    pods = [
        pod("blackhole-pod", ip, port, generation=5),
        pod("icmp-blocking-pod", ip, blocking, generation=2),
        pod("icmp-polling-pod", ip, polling, generation=3),
    ]
    agent.wait_version(store.commit(pods))
    before = agent.metrics()
    last = store.last_id()
    code = (
        "import socket, sys\ns = socket.socket()\n"
        "s.settimeout(float(sys.argv[3]) if sys.argv[3] != 'block' else None)\n"
        "try:\n    s.connect((sys.argv[1], int(sys.argv[2])))\nexcept TimeoutError:\n    sys.exit(10)\n"
        "except OSError as exc:\n    sys.exit(exc.errno)\nsys.exit(0)\n"
    )
    started = time.monotonic()
    run = ["ip", "netns", "exec", netns, sys.executable, "-c", code, ip]
    client = subprocess.Popen([*run, str(port), "1.5"])
    blocking_client = subprocess.Popen([*run, str(blocking), "block"])
    polling_client = subprocess.Popen([*run, str(polling), "5"])
    clients = (client, blocking_client, polling_client)
    try:
        name = "fastproxy_agent_early_warnings_total"
        while agent.metrics()[name] == before[name]:
            assert time.monotonic() - started < 3, "no SYN retransmit early warning"
            time.sleep(0.02)
        warned = time.monotonic() - started
        # the warning comes while the client still waits: nothing reported for it yet
        assert client.poll() is None and not [e for _, e in store.events(last) if e.uid == "blackhole-pod"]
        assert client.wait(10) == 10  # TimeoutError
        assert blocking_client.wait(10) == errno.EHOSTUNREACH
        assert polling_client.wait(10) == errno.EHOSTUNREACH
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
    (event,) = wait_events(store, last, lambda e: e.uid == "blackhole-pod")
    reported_after = time.monotonic() - started
    assert event.failure is ConnectFailureKind.TIMEOUT and event.generation == 5
    assert f"netns={os.stat(f'/run/netns/{netns}').st_ino} " in event.reason
    assert f"pid={client.pid} " in event.reason and "retrans=1" in event.reason
    assert "the client gave up" in event.reason
    (icmp,) = wait_events(store, last, lambda e: e.uid == "icmp-blocking-pod")
    assert icmp.failure is ConnectFailureKind.UNREACHABLE and icmp.generation == 2
    assert "errno 113" in icmp.reason and f"pid={blocking_client.pid} " in icmp.reason
    (icmp,) = wait_events(store, last, lambda e: e.uid == "icmp-polling-pod")
    assert icmp.failure is ConnectFailureKind.UNREACHABLE and icmp.generation == 3
    assert "ICMP error" in icmp.reason and f"pid={polling_client.pid} " in icmp.reason
    FIGURES["SYN blackhole (netns, client timeout 1.5 s)"] = (
        f"retransmit early warning at {warned:.2f} s, timeout event at {reported_after:.2f} s"
    )


def test_probe_without_btf_classifies_by_rst_also_over_ipv6(ebpf: None) -> None:
    """The fallback for kernels without BTF (sk_err unreadable: tcp_receive_reset marks the socket),
    driven in-process through ``Probe``; IPv6 and IPv4-mapped destinations on the way."""
    probe = Probe(use_btf=False, window=0.001, burst=100)
    probe.load()
    try:
        assert probe.degraded and (b"tcp:tcp_receive_reset", b"tracepoint__tcp__tcp_receive_reset") in (
            probe.tracepoints()
        )
        records: list[Record] = []
        probe.open(lambda raw: records.append(Record.decode(raw)))
        v4_ip = "127.70.15.1"
        v4_port = closed_port(v4_ip)
        with socket.socket(socket.AF_INET6) as server:
            server.bind(("::1", 0))
            server.listen()
            server_port = server.getsockname()[1]
            with socket.socket(socket.AF_INET6) as probe_port:
                probe_port.bind(("::1", 0))
                v6_closed = probe_port.getsockname()[1]
            probe.set_watch({addr16("::1"): 0, addr16(v4_ip): v4_port})
            with socket.socket(socket.AF_INET6) as sock:
                assert sock.connect_ex(("::1", v6_closed)) == errno.ECONNREFUSED
            with socket.socket(socket.AF_INET6) as sock:  # an IPv6 socket to an IPv4 address
                assert sock.connect_ex((f"::ffff:{v4_ip}", v4_port)) == errno.ECONNREFUSED
            client = socket.create_connection(("::1", server_port))
            conn, _ = server.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            with pytest.raises(ConnectionResetError):
                client.recv(1)
            client.close()
        deadline = time.monotonic() + 3
        while len(records) < 3 and time.monotonic() < deadline:
            probe.poll(50)
        got = [(r.kind_name, addr_text(r.daddr), r.dport, r.err, r.netns, r.pid) for r in records]
        pid = os.getpid()
        assert got == [
            ("refused", "::1", v6_closed, -1, 0, pid),
            ("refused", v4_ip, v4_port, -1, 0, pid),
            ("reset", "::1", server_port, -1, 0, pid),
        ], got
        assert probe.counters()["ringbuf_drops"] == 0
    finally:
        probe.close()


def test_watch_list_follows_pod_churn(agent: AgentProcess, store: PodStore) -> None:
    ip = "127.70.14.1"
    port = closed_port(ip)
    first = pod("churn-a", ip, port, generation=1)
    delta_seconds = agent.wait_version(store.commit([first]))
    last = store.last_id()
    refused_connect((ip, port))
    wait_events(store, last, lambda e: e.uid == "churn-a")

    # removed: the address leaves the kernel's watch list
    agent.wait_version(store.remove([first]))
    before = agent.metrics()
    last = store.last_id()
    time.sleep(1.05)  # past the quiet window, so only the watch list can keep it silent
    refused_connect((ip, port))
    time.sleep(0.3)
    after = agent.metrics()
    assert (
        after["fastproxy_agent_kernel_watched_connects_total"]
        == before["fastproxy_agent_kernel_watched_connects_total"]
    )
    assert store.events(last) == []

    # the IP is recycled by a new pod: reports name the new UID and its generation
    second = pod("churn-b", ip, port, generation=1)
    agent.wait_version(store.commit([second]))
    refused_connect((ip, port))
    (event,) = wait_events(store, last, lambda e: e.uid.startswith("churn-"))
    assert (event.uid, event.generation) == ("churn-b", 1)

    # a new generation (state change) is reported again at once, with that generation
    agent.wait_version(store.commit([pod("churn-b", ip, port, generation=2, state=PodState.NOT_READY)]))
    refused_connect((ip, port))
    events = wait_events(store, last, lambda e: e.uid == "churn-b" and e.generation == 2)
    assert len(events) == 1

    # without a published delta (missed pub/sub), the version poll catches up
    third_ip = "127.70.14.2"
    third = pod("churn-c", third_ip, closed_port(third_ip))
    poll_seconds = agent.wait_version(store.commit([third], publish=False))
    refused_connect((third_ip, third.port))
    wait_events(store, last, lambda e: e.uid == "churn-c")
    FIGURES["watch list follows a commit"] = (
        f"{delta_seconds * 1e3:.1f} ms via the delta, "
        f"{poll_seconds * 1e3:.0f} ms via the version poll (0.1 s)"
    )


def test_end_to_end_the_writer_quarantines_the_pod(ebpf: None, valkey_server: Any) -> None:
    """A real writer and a second agent in their own key namespace: pods discovered through the
    event stream, one refused connect, the pod quarantined with the node as observer. The writer's
    recovery checks then fail against the same closed port; the agent sees them but does not
    report a pod that is already quarantined."""
    from statesync.keys import Keys
    from statesync.schema import PodDiscovered, decode_pod, encode

    keys = Keys("fpt-e2e")
    client = valkey.Valkey.from_url(valkey_server.url)
    ips = [f"127.70.17.{i}" for i in (1, 2, 3)]
    ports = [closed_port(ip) for ip in ips]
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastproxy.cli",
            "writer",
            "--valkey",
            valkey_server.url,
            "--namespace",
            keys.ns,
            "--lease-ttl",
            "2",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
    )
    agent = AgentProcess(valkey_server.url, keys, "--all-pods", "--refresh", "0.1", node="node-e2e")
    try:
        for i, (ip, port) in enumerate(zip(ips, ports, strict=True)):
            discovered = PodDiscovered(
                uid=f"e2e-{i}",
                source=Source.INFORMER,
                namespace="ml",
                revision="chat-v1",
                ip=ip,
                port=port,
                ready=True,
            )
            client.xadd(keys.events, {"e": encode(discovered)})

        def state(uid: str) -> Any:
            raw = client.hget(keys.pods, uid)
            return decode_pod(raw) if raw else None

        deadline = time.monotonic() + 10
        while not all((r := state(f"e2e-{i}")) and r.state is PodState.READY for i in range(3)):
            assert time.monotonic() < deadline and writer.poll() is None, "writer did not apply the pods"
            time.sleep(0.02)
        agent.start()
        agent.wait_version(int(client.get(keys.version)))
        refused_connect((ips[0], ports[0]))
        deadline = time.monotonic() + 5
        while (record := state("e2e-0")).state is not PodState.QUARANTINED:
            assert time.monotonic() < deadline, f"not quarantined: {record}\n{agent.log()}"
            time.sleep(0.01)
        assert "connect refused by node-e2e" in record.reason, record.reason
        assert state("e2e-1").state is PodState.READY and state("e2e-2").state is PodState.READY
        deadline = time.monotonic() + 5  # the writer's first recovery check is refused too
        while not agent.metrics().get('fastproxy_agent_not_reported_total{state="quarantined"}'):
            assert time.monotonic() < deadline, "the recovery check's failure was not seen"
            time.sleep(0.05)
        events = [e for _, e in PodStore(client, keys).events() if e.uid == "e2e-0"]
        assert len(events) == 1 and events[0].observer == "node-e2e"
    finally:
        agent.close()
        writer.terminate()
        writer.wait(10)
        client.close()


# ---- fastproxy agent --check and unavailable eBPF ------------------------------------------------


def fastproxy(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> Any:
    """Start ``fastproxy ARGS`` (not waited for: several run at once, each costs an interpreter)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "fastproxy.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(proc: Any) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


def test_check_says_this_node_can_run_the_probe(ebpf: None) -> None:
    code, stdout, stderr = finish(fastproxy("agent", "--check"))
    assert code == 0, stdout + stderr
    lines = stdout.splitlines()
    for name in ("privileges", "bpf()", "BTF", "headers", "tracefs", "bcc", "load"):
        assert any(line.startswith("ok") and f" {name} " in line for line in lines), (name, stdout)
    assert lines[-1] == "this node can run the eBPF probe"


def test_check_and_agent_explain_what_is_missing(ebpf: None) -> None:
    missing_bcc = {"FASTPROXY_BCC_DIR": "/nonexistent/bcc"}
    dropped = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")  # uid 0 without capabilities
    unprivileged = shutil.which("setpriv") is not None
    runs = [
        fastproxy("agent", "--check", env=missing_bcc),
        fastproxy("agent", "--valkey", "valkey://127.0.0.1:1/0", env=missing_bcc),
    ]
    if unprivileged:
        runs += [
            fastproxy("agent", "--check", prefix=dropped),
            fastproxy("agent", "--valkey", "valkey://127.0.0.1:1/0", prefix=dropped),
        ]
    results = [finish(run) for run in runs]
    code, stdout, _ = results[0]
    assert code == 1
    assert "FAIL  bcc" in stdout and "bcc missing" in stdout and "python3-bpfcc" in stdout
    assert "this node cannot run the eBPF probe: bcc:" in stdout
    code, _, stderr = results[1]
    assert code == 1 and "cannot run the eBPF probe: bcc: bcc missing" in stderr
    if unprivileged:
        code, stdout, _ = results[2]
        assert code == 1
        assert "FAIL  privileges" in stdout and "FAIL  bpf()" in stdout, stdout
        code, _, stderr = results[3]
        assert code == 1 and "cannot run the eBPF probe: privileges:" in stderr
