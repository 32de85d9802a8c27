"""Helpers shared by the agent's tests and benchmarks (tests/ebpf, bench/bench_agent.py).

``require_ebpf()`` skips with the node's reasons, or fails them when ``REQUIRE_EBPF=1`` (CI machines
that must run the probe). ``AgentProcess`` runs ``fastproxy agent`` as a real child process against
a real Valkey; ``PodStore`` writes pods the way the writer commits them (HSET + version + a
published delta), so the agent follows them through its ordinary paths.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from statesync.embedded import free_port
from statesync.keys import DELTA_PREFIX, Keys
from statesync.schema import ConnectFailed, Delta, PodRecord, PodState, decode_event, encode

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def ebpf_problems() -> tuple[str, ...]:
    """Why this node cannot run the probe (empty: it can)."""
    from probes.probe import check_node

    return tuple(f"{c.name}: {c.detail}" for c in check_node() if not c.ok)


def require_ebpf() -> None:
    """Skip (or, with REQUIRE_EBPF=1, fail) when the node cannot run the probe."""
    import pytest

    problems = ebpf_problems()
    if not problems:
        return
    reason = "eBPF unavailable: " + "; ".join(problems)
    if os.environ.get("REQUIRE_EBPF") == "1":
        pytest.fail(f"REQUIRE_EBPF=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def closed_port(host: str) -> int:
    """A port nothing listens on at ``host`` (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def refused_connect(address: tuple[str, int]) -> None:
    with socket.socket() as sock:
        try:
            sock.connect(address)
        except ConnectionRefusedError:
            return
    raise AssertionError(f"connect to {address} did not fail")


def pod(uid: str, ip: str, port: int, generation: int = 1, state: PodState = PodState.READY) -> PodRecord:
    return PodRecord(
        uid=uid,
        namespace="ml",
        revision="chat-v1",
        ip=ip,
        port=port,
        state=state,
        generation=generation,
        ready=state is PodState.READY,
    )


class PodStore:
    """Writes pods as the writer commits them: HSET, a new version, a published delta."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def commit(self, pods: list[PodRecord], publish: bool = True) -> int:
        pipe = self.client.pipeline(transaction=True)
        for record in pods:
            pipe.hset(self.keys.pods, record.uid, encode(record))
        pipe.incr(self.keys.version)
        version = int(pipe.execute()[-1])
        if publish:
            delta = Delta(epoch=1, version=version, pods=tuple(pods))
            self.client.publish(self.keys.channel, DELTA_PREFIX + encode(delta))
        return version

    def remove(self, pods: list[PodRecord], publish: bool = True) -> int:
        """The writer's tombstone: state REMOVED, next generation."""
        gone = [msgspec.structs.replace(p, state=PodState.REMOVED, generation=p.generation + 1) for p in pods]
        return self.commit(gone, publish)

    def events(self, after: str = "0-0") -> list[tuple[str, ConnectFailed]]:
        out = []
        for entry_id, fields in self.client.xrange(
            self.keys.events, min=f"({after}" if after != "0-0" else "-"
        ):
            event = decode_event(fields[b"e"])
            if isinstance(event, ConnectFailed):
                out.append((entry_id.decode(), event))
        return out

    def last_id(self) -> str:
        entries = self.client.xrevrange(self.keys.events, count=1)
        return entries[0][0].decode() if entries else "0-0"


class AgentProcess:
    """``fastproxy agent`` as a child process, ready once its ready file exists."""

    def __init__(self, valkey_url: str, keys: Keys, *args: str, node: str = "test-node") -> None:
        self.keys = keys
        self.node = node
        self.metrics_port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="fastproxy-agent-")
        self.ready_file = Path(self._dir.name) / "ready"
        self.log_path = Path(self._dir.name) / "agent.log"
        self.argv = [
            sys.executable,
            "-m",
            "fastproxy.cli",
            "agent",
            "--valkey",
            valkey_url,
            "--namespace",
            keys.ns,
            "--node",
            node,
            "--metrics",
            f"127.0.0.1:{self.metrics_port}",
            "--ready-file",
            str(self.ready_file),
            *args,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def start(self, timeout: float = 45.0) -> AgentProcess:
        started = time.monotonic()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() - started > timeout:
                self.stop()
                raise RuntimeError(f"agent not ready within {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        self.startup_seconds = time.monotonic() - started
        return self

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-5000:]
        return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        """CPU time of the agent process: ns-precise from schedstat, else in clock ticks."""
        try:
            return (
                sum(
                    int(Path(task, "schedstat").read_text().split()[0])
                    for task in Path(f"/proc/{self.pid}/task").iterdir()
                )
                / 1e9
            )
        except (OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_version(self, version: int, timeout: float = 5.0) -> float:
        """Wait until the agent follows routing-state ``version`` (its watch list is then in the kernel)."""
        started = time.monotonic()
        while self.metrics()["fastproxy_agent_state_version"] < version:
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"agent did not reach state version {version} in {timeout}s:\n{self.log()}"
                )
            time.sleep(0.005)
        return time.monotonic() - started

    def stop(self) -> int:
        code = 0
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            code = self.process.returncode
            self.process = None
            self._log.close()
        return code

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
