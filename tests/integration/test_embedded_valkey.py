"""EmbeddedValkey: a real valkey-server child that never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import wait_for

STARTER = """
import sys, time
from statesync.embedded import EmbeddedValkey
server = EmbeddedValkey().start()
print(server.process.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
async def test_server_dies_with_a_killed_starter() -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert starter.stdout is not None
        server_pid = int(starter.stdout.readline())
        assert alive(server_pid)
        starter.send_signal(signal.SIGKILL)  # no cleanup of its own can run
        starter.wait(5)
        await wait_for(lambda: not alive(server_pid), timeout=5, what="valkey-server gone with its starter")
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(5)
