"""Fixtures for the eBPF node agent tests: one real ``fastproxy agent`` process per module, following
pods in a real valkey-server (``EmbeddedValkey``).

Without root, bcc, tracefs (or any other prerequisite ``fastproxy agent --check`` looks at), every
test that needs the probe skips with the reason; with ``REQUIRE_EBPF=1`` it fails instead. Figures
measured by the tests (latencies, storm counts) are printed in the terminal summary.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import valkey

from probes.testing import AgentProcess, PodStore, require_ebpf
from statesync.embedded import EmbeddedValkey
from statesync.keys import Keys

FIGURES: dict[str, Any] = {}

# Pods the module's agent watches live in 127.64.0.0/10 (127.64.x.x - 127.127.x.x); 127.200.x.x is
# outside it. Nothing else in the repository uses these loopback ranges.
WATCHED_CIDR = "127.64.0.0/10"


@pytest.fixture(scope="session")
def ebpf() -> None:
    require_ebpf()


@pytest.fixture(scope="module")
def valkey_server() -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def store(valkey_server: EmbeddedValkey) -> Iterator[PodStore]:
    client = valkey.Valkey.from_url(valkey_server.url)
    yield PodStore(client, Keys("fpt-ebpf"))
    client.close()


@pytest.fixture(scope="module")
def agent(ebpf: None, valkey_server: EmbeddedValkey, store: PodStore) -> Iterator[AgentProcess]:
    proc = AgentProcess(
        valkey_server.url,
        store.keys,
        "--watch",
        WATCHED_CIDR,
        "--threshold",
        "1",
        "--window",
        "1",
        "--refresh",
        "0.1",
        "--sweep",
        "0.2",
        "--log-level",
        "info",
    )
    proc.start()
    FIGURES["agent start -> ready (compile, load, attach, first watch list)"] = (
        f"{proc.startup_seconds:.2f} s"
    )
    try:
        yield proc
    finally:
        code = proc.stop()
        ready_left = proc.ready_file.exists()
        log = proc.log()
        proc.close()
        assert code == 0, f"agent exited with {code}:\n{log}"
        assert not ready_left, "the agent left its ready file behind"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("eBPF agent figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
