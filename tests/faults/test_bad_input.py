"""Bad input at scale against one in-process router, while a good client keeps a fixed rate.

Theory of operation
-------------------
Each scenario runs in three steps inside one test, so the comparison is side by side on the same
(noisy, 2-core) machine: a *quiet* run of the good client alone, then the same good client while
an attacker child process (this module run as ``python -m tests.faults.test_bad_input``, with its own
event loop, so the attack's own CPU does not stall the router's loop) misbehaves, then the
attacker's report. The attacker prints ``ready`` once its connections are open and, at the end,
one JSON line: what each bad connection got (``"408"``, ``"431"``, ``"400"``, ``"closed"``,
``"reset"``, ``"open"`` for one still waiting) and its own count of violations.

Invariants checked per scenario:

- the good client's p99 under attack is within 2x of its quiet p99 (with a floor of a few ms: a
  quiet p99 of 0.4 ms doubled is below the scheduling noise of a shared machine);
- no good request fails;
- every bad connection got its right status or was closed (none still hanging on at the end);
- router memory stays bounded: the test process's RSS (the router is in it) grows by less than a
  fixed bound, and nothing is left in the router's connection table afterwards;
- the pod saw only the requests it should (good ones, and the valid pipelined ones).

The quick variants run in ``make test``; ``faults_long`` runs the same scenarios bigger and longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.faults.conftest import FaultReport

GOOD_REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: good\r\n\r\n"
P99_FLOOR = 0.005  # seconds: below this, a doubled p99 is scheduling noise, not the attack
RSS_BOUND = 64 * 1024 * 1024  # growth of the test process (router included) under attack


def raise_fd_limit() -> None:
    """1,000 bad connections need more descriptors than a default soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# ---- the attacker (a child process) -------------------------------------------------------------


@dataclass
class AttackResult:
    outcomes: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    requests: int = 0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


async def read_outcome(reader: asyncio.StreamReader, timeout: float) -> str:
    """What the router did with this connection: its first status, or how it ended."""
    try:
        async with asyncio.timeout(timeout):
            line = await reader.readline()
            if not line:
                return "closed"
            status = line.split(b" ", 2)[1].decode() if line.startswith(b"HTTP/1.1 ") else "garbage"
            await reader.read(-1)  # and it must close after an error answer
            return status
    except TimeoutError:
        return "open"
    except (ConnectionError, OSError):
        return "reset"


async def open_many(
    port: int, n: int, batch: int = 100
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for first in range(0, n, batch):
        conns += await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(min(batch, n - first)))
        )
    return conns


async def slowloris(port: int, n: int, seconds: float, result: AttackResult) -> None:
    conns = await open_many(port, n)
    for _, writer in conns:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    print("ready", flush=True)
    outcomes = [asyncio.create_task(read_outcome(reader, seconds)) for reader, _ in conns]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    # One byte per connection every 100 ms, spread over the interval: always trickling, never done.
    while loop.time() < deadline and not all(task.done() for task in outcomes):
        for (_, writer), task in zip(conns, outcomes, strict=True):
            if not task.done() and not writer.is_closing():
                with contextlib.suppress(ConnectionError, OSError):
                    writer.write(b"a")
            await asyncio.sleep(0.1 / n)
    for task in outcomes:
        outcome = await task
        result.count(outcome)
        if outcome not in ("408", "closed", "reset"):
            result.violations.append(f"slowloris connection: {outcome}")
    result.requests += n
    for _, writer in conns:
        writer.close()


async def header_flood(port: int, n: int, seconds: float, result: AttackResult) -> None:
    """Waves of connections sending endless headers (many small, or one without end)."""
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    lines = b"".join(b"X-Flood-%d: %s\r\n" % (i, b"f" * 90) for i in range(40))

    async def one(kind: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        outcome_task = asyncio.create_task(read_outcome(reader, seconds + 5))
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n" + (b"" if kind == 0 else b"X-Long: "))
        with contextlib.suppress(ConnectionError, OSError):
            for _ in range(256):  # up to ~1 MB of header section
                if outcome_task.done():
                    break
                writer.write(lines if kind == 0 else b"L" * 4000)
                await writer.drain()
        outcome = await outcome_task
        result.count(outcome)
        result.requests += 1
        if outcome not in ("431", "closed", "reset"):
            result.violations.append(f"header flood ({'many' if kind == 0 else 'one long'}): {outcome}")
        writer.close()

    wave = 0
    while loop.time() < deadline:
        await asyncio.gather(*(one((wave + i) % 2) for i in range(n)))
        wave += 1


async def chunk_extensions(port: int, n: int, seconds: float, result: AttackResult) -> None:
    """Chunked bodies whose chunk extensions never end, or come with every one-byte chunk."""
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    head = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    small = b"".join(b"1;ext-%d=%s\r\nx\r\n" % (i, b"e" * 400) for i in range(10))

    async def one(kind: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        outcome_task = asyncio.create_task(read_outcome(reader, 10))
        writer.write(head + (b"1;" if kind == 0 else b""))
        with contextlib.suppress(ConnectionError, OSError):
            for _ in range(256):
                if outcome_task.done():
                    break
                writer.write(b"e" * 4096 if kind == 0 else small)
                await writer.drain()
        outcome = await outcome_task
        result.count(outcome)
        result.requests += 1
        if outcome not in ("400", "413", "closed", "reset"):
            result.violations.append(
                f"chunk extensions ({'endless' if kind == 0 else 'per chunk'}): {outcome}"
            )
        writer.close()

    wave = 0
    while loop.time() < deadline:
        await asyncio.gather(*(one((wave + i) % 2) for i in range(n)))
        wave += 1


async def pipelining(port: int, n: int, seconds: float, result: AttackResult) -> None:
    """Connections that pipeline thousands of requests at once and do not read for a while."""
    per_conn = 2000
    conns = await open_many(port, n)
    burst = b"".join(b"GET /size/64 HTTP/1.1\r\nHost: a\r\nX-Seq: %d\r\n\r\n" % i for i in range(per_conn))
    for _, writer in conns:
        writer.write(burst)
    print("ready", flush=True)
    await asyncio.sleep(min(1.0, seconds / 2))  # nobody reads: the router must stop reading, not buffer

    async def drain(reader: asyncio.StreamReader) -> None:
        got = 0
        try:
            async with asyncio.timeout(seconds + 20):
                while got < per_conn:
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        result.violations.append(f"pipelined answer {got}: {head[:20]!r}")
                        break
                    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                    await reader.readexactly(length)
                    got += 1
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            result.violations.append(f"pipelining connection ended after {got}/{per_conn}: {exc!r}")
        result.outcomes["200"] = result.outcomes.get("200", 0) + got

    await asyncio.gather(*(drain(reader) for reader, _ in conns))
    result.requests += n * per_conn
    for _, writer in conns:
        writer.close()


def malformed_requests() -> list[tuple[bytes, int]]:
    from tests.integration.test_router_http import BAD_REQUESTS

    # The body-size case depends on a lowered body limit in that test; every other one is absolute.
    return [case for name, case in sorted(BAD_REQUESTS.items()) if name != "body-too-large-by-cl"]


async def malformed_flood(port: int, n: int, seconds: float, result: AttackResult) -> None:
    cases = malformed_requests()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker(offset: int) -> None:
        i = offset
        while loop.time() < deadline:
            data, expected = cases[i % len(cases)]
            i += 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(data)
            outcome = await read_outcome(reader, 10)
            writer.close()
            result.count(outcome)
            result.requests += 1
            if outcome != str(expected) and outcome not in ("closed", "reset"):
                result.violations.append(f"malformed {data[:30]!r}: {outcome}, expected {expected}")

    await asyncio.gather(*(worker(i) for i in range(n)))


ATTACKS = {
    "slowloris": slowloris,
    "header-flood": header_flood,
    "chunk-extensions": chunk_extensions,
    "pipelining": pipelining,
    "malformed-flood": malformed_flood,
}


async def attack_main(name: str, port: int, n: int, seconds: float) -> None:
    result = AttackResult()
    await ATTACKS[name](port, n, seconds, result)
    print(json.dumps({"outcomes": result.outcomes, "violations": result.violations[:20],
                      "violation_count": len(result.violations), "requests": result.requests}), flush=True)  # fmt: skip


# ---- the good client and the measurement ----------------------------------------------------------


class GoodClient:
    """One keep-alive connection, one request every ``interval`` seconds, latencies kept."""

    def __init__(self, port: int, interval: float = 0.005) -> None:
        self.port = port
        self.interval = interval
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    async def run(self, seconds: float) -> list[float]:
        latencies: list[float] = []
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        start = loop.time()
        i = 0
        try:
            while loop.time() - start < seconds:
                delay = start + i * self.interval - loop.time()
                i += 1
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.perf_counter()
                try:
                    writer.write(GOOD_REQUEST)
                    async with asyncio.timeout(10):
                        head = await reader.readuntil(b"\r\n\r\n")
                        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                        await reader.readexactly(length)
                except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, IndexError) as exc:
                    self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    continue
                if not head.startswith(b"HTTP/1.1 200"):
                    key = head[9:12].decode()
                    self.errors[key] = self.errors.get(key, 0) + 1
                latencies.append(time.perf_counter() - sent)
        finally:
            writer.close()
        self.latencies += latencies
        return latencies


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss_bytes())


# (connections or workers, seconds of attack) per scenario, quick and long
HEADER_TIMEOUT = (2.0, 4.0)
SCALE: dict[str, tuple[tuple[int, float], tuple[int, float]]] = {
    "slowloris": ((1000, HEADER_TIMEOUT[0] + 2), (3000, HEADER_TIMEOUT[1] + 4)),
    "header-flood": ((40, 2.5), (100, 10.0)),
    "chunk-extensions": ((40, 2.5), (100, 10.0)),
    "pipelining": ((10, 2.0), (40, 6.0)),
    "malformed-flood": ((20, 2.5), (50, 10.0)),
}


async def run_scenario(harness: Any, fault_report: FaultReport, name: str, long: bool) -> None:
    from tests.conftest import pod_record, wait_for

    raise_fd_limit()
    n, seconds = SCALE[name][long]
    header_timeout = HEADER_TIMEOUT[long]
    app = await harness.app()
    router, port = await harness.router([pod_record("p1", app.address, concurrency=1000)],
                                        header_timeout=header_timeout)  # fmt: skip
    good = GoodClient(port)
    await good.run(0.3)  # warm up: connections, caches, the allocator
    quiet = await good.run(3.0 if long else 1.5)
    rss_before = rss_bytes()
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.faults.test_bad_input", name, str(port), str(n), str(seconds),
        stdout=asyncio.subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )  # fmt: skip
    assert attacker.stdout is not None
    try:
        line = await asyncio.wait_for(attacker.stdout.readline(), 60)
        assert line == b"ready\n", line
        with RssSampler() as rss:
            loud = await good.run(seconds)
            report_line = await asyncio.wait_for(attacker.stdout.readline(), seconds + 60)
        await attacker.wait()
    finally:
        if attacker.returncode is None:
            attacker.kill()
            await attacker.wait()
    report = json.loads(report_line)
    await wait_for(lambda: len(router.connections) == 0, timeout=header_timeout + 5,
                   what="every bad connection gone from the router")  # fmt: skip
    good_requests = len(good.latencies) + sum(good.errors.values())
    pipelined = report["outcomes"].get("200", 0) if name == "pipelining" else 0

    quiet_p50, quiet_p99 = percentile(quiet, 0.5), percentile(quiet, 0.99)
    loud_p50, loud_p99 = percentile(loud, 0.5), percentile(loud, 0.99)
    bound = 2 * max(quiet_p99, P99_FLOOR)
    growth = rss.peak - rss_before
    violations = list(report["violations"])
    extra = report["violation_count"] - len(violations)
    if loud_p99 > bound:
        violations.append(
            f"good p99 {loud_p99 * 1e3:.2f} ms > 2 x max(quiet p99, floor) = {bound * 1e3:.2f} ms"
        )
    if good.errors:
        violations.append(f"good client errors: {good.errors}")
    if growth > RSS_BOUND:
        violations.append(f"RSS grew {growth / 2**20:.1f} MiB > {RSS_BOUND / 2**20:.0f} MiB")
    if len(app.requests) != good_requests + pipelined:
        violations.append(f"the pod saw {len(app.requests)} requests, expected {good_requests + pipelined}")
    notes = (f"good p50/p99 quiet {quiet_p50 * 1e3:.2f}/{quiet_p99 * 1e3:.2f} ms, under attack "
             f"{loud_p50 * 1e3:.2f}/{loud_p99 * 1e3:.2f} ms ({len(quiet)}/{len(loud)} samples); "
             f"RSS +{growth / 2**20:.1f} MiB; {n} bad conns/workers")  # fmt: skip
    print(f"\n{name}: {notes}; outcomes {report['outcomes']}")
    errors = {k: v for k, v in report["outcomes"].items() if not (name == "pipelining" and k == "200")}
    fault_report.add(f"bad input: {name}{' (long)' if long else ''}", report["requests"] + good_requests, errors,
                     len(violations) + extra, notes)  # fmt: skip
    assert violations == []


SCENARIOS = list(ATTACKS)


@pytest.mark.parametrize("name", SCENARIOS)
async def test_bad_input_at_scale(harness: Any, fault_report: FaultReport, name: str) -> None:
    await run_scenario(harness, fault_report, name, long=False)


@pytest.mark.faults_long
@pytest.mark.parametrize("name", SCENARIOS)
async def test_bad_input_at_scale_long(harness: Any, fault_report: FaultReport, name: str) -> None:
    await run_scenario(harness, fault_report, name, long=True)


if __name__ == "__main__":
    import uvloop

    raise_fd_limit()
    uvloop.run(attack_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
