"""Child processes for the process-level tests: started, drained, waited on, signalled, reaped.

Theory of operation
-------------------
``Proc`` wraps an ``asyncio.subprocess.Process`` whose stdout and stderr are read continuously into a
bounded list of lines, so a chatty child never blocks on a full pipe and a failing test can show
its last lines. ``wait_line`` waits for a line matching a predicate under a deadline (no sleeps);
``kill`` resumes a stopped child first so SIGKILL is delivered, then reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable

START = 30.0  # a Python process starting on a loaded 2-core machine; bounds a wait, asserts nothing


class Proc:
    """A child process; stdout and stderr are drained into ``lines`` (the last 400) so a full pipe
    never blocks it, and a test can wait for a line under a deadline."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        assert process.stdout is not None and process.stderr is not None
        self._drains = [asyncio.create_task(self._drain(s)) for s in (process.stdout, process.stderr)]

    @classmethod
    async def start(cls, name: str, *argv: str) -> Proc:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(name, process)

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            del self.lines[:-400]
            self._changed.set()
        self._changed.set()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def output(self) -> str:
        return f"--- {self.name} ---\n" + "\n".join(self.lines[-40:])

    async def wait_line(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        seen = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.lines[seen:]:
                        if predicate(line):
                            return line
                    seen = len(self.lines)
                    if all(d.done() for d in self._drains):
                        raise AssertionError(f"{self.name} closed its output before {what}:\n{self.output}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{self.name}: {what} not seen within {timeout}s:\n{self.output}") from None

    async def listening(self, timeout: float = START) -> list[str]:
        """The ``listening HOST:PORT [admin HOST:PORT]`` line, split into words."""
        line = await self.wait_line(lambda s: s.startswith("listening "), timeout, "its 'listening' line")
        return line.split()

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def stop(self) -> None:
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL (after SIGCONT, in case it is stopped) and reap."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                self.process.kill()
        await asyncio.wait_for(self.process.wait(), 15)

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            await self.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._drains, return_exceptions=True), 5)
