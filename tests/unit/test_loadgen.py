"""The open-loop load generator against the stand-in app server: counts, latency, honesty, errors."""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import Awaitable, Callable

import msgspec
import pytest
import uvloop

from bench.loadgen import LoadResult, run_closed_loop, run_open_loop
from fastproxy.devtools.upstream import AppServer

# Explicit factories: asyncio.new_event_loop would follow whatever loop policy a conftest set.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop_name: str, scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await scenario()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())


def check_consistent(result: LoadResult) -> None:
    assert result.sent == result.completed + result.error_count
    assert len(result.latencies) == result.completed
    assert result.latencies == sorted(result.latencies)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_open_loop_at_200_per_second(loop_name: str) -> None:
    async def scenario() -> None:
        async with AppServer(record=False) as srv:
            assert srv.address is not None
            result = await run_open_loop(*srv.address, rate=200, duration=1.0, warmup=0.2)
            check_consistent(result)
            assert result.sent == 200
            assert result.completed == 200
            assert result.errors == {}
            assert result.status == {200: 200}
            # Warmup requests were sent too, but not counted.
            assert srv.request_count == 240
            p50, p90, p99 = (result.percentile(p) for p in (50, 90, 99))
            assert 0 < result.latencies[0] <= p50 <= p90 <= p99 <= result.latencies[-1]
            assert p50 < 0.05  # loopback, trivial handler: anything near this is broken
            assert result.throughput == pytest.approx(200)
            assert result.connections_opened >= 1 and result.pool_exhausted == 0

    run_on(loop_name, scenario)


async def test_latency_includes_server_delay() -> None:
    async with AppServer(record=False) as srv:
        assert srv.address is not None
        result = await run_open_loop(
            *srv.address, rate=50, duration=0.5, warmup=0.0, headers={"x-app-delay-ms": "50"}
        )
        check_consistent(result)
        assert result.completed == 25 and result.errors == {}
        assert result.percentile(0) >= 0.049
        assert result.percentile(50) < 0.5
        # A 50 ms answer at 50 req/s overlaps: more than one connection was needed.
        assert result.connections_opened >= 2


async def test_queueing_is_not_hidden() -> None:
    """One connection, 20 ms answers, 100 req/s offered: the backlog must show up as latency."""
    async with AppServer(record=False) as srv:
        assert srv.address is not None
        result = await run_open_loop(
            *srv.address, rate=100, duration=0.5, warmup=0.0, path="/delay/20", max_connections=1
        )
        check_consistent(result)
        assert result.completed == 50 and result.errors == {}
        assert result.connections_opened == 1
        assert result.pool_exhausted > 0 and result.max_backlog > 1
        # Serving takes >= 1 s for 0.5 s of schedule: the last requests waited ~0.5 s. A generator
        # timing from the actual send would report ~20 ms for every one of them.
        assert result.latencies[-1] >= 0.3
        assert srv.max_concurrent_seen == 1


async def test_errors_are_counted_by_kind() -> None:
    async with AppServer(record=False) as srv:
        assert srv.address is not None
        host, port = srv.address
        result = await run_open_loop(host, port, rate=100, duration=0.2, warmup=0.0, path="/reset")
        check_consistent(result)
        assert result.completed == 0 and result.errors == {"reset": 20}
        result = await run_open_loop(host, port, rate=100, duration=0.2, warmup=0.0, path="/eof")
        assert result.errors == {"eof": 20}
        result = await run_open_loop(
            host, port, rate=100, duration=0.2, warmup=0.0, path="/hang", timeout=0.2, max_connections=4
        )
        check_consistent(result)
        assert result.errors == {"timeout": 20}
        result = await run_open_loop(host, port, rate=100, duration=0.2, warmup=0.0, path="/status/503")
        assert result.status == {503: 20} and result.errors == {}  # an HTTP status is not an error
    # Nobody listens there any more.
    result = await run_open_loop(host, port, rate=100, duration=0.2, warmup=0.0, timeout=1.0)
    check_consistent(result)
    assert result.errors == {"connect": 20}


async def test_streamed_head_and_close_responses() -> None:
    async with AppServer(record=False) as srv:
        assert srv.address is not None
        host, port = srv.address
        result = await run_open_loop(host, port, rate=100, duration=0.2, warmup=0.0, path="/chunked/5000/5")
        assert result.completed == 20 and result.errors == {}
        assert result.bytes_received > 20 * 5000
        result = await run_open_loop(host, port, rate=50, duration=0.2, warmup=0.0, path="/sse/3/10")
        assert result.completed == 10 and result.errors == {}
        assert result.percentile(0) >= 0.018  # the last event comes two intervals in
        result = await run_open_loop(
            host, port, rate=100, duration=0.2, warmup=0.0, method="HEAD", path="/size/999"
        )
        assert result.completed == 20 and result.errors == {}
        result = await run_open_loop(
            host, port, rate=100, duration=0.2, warmup=0.0, method="HEAD", path="/status/204"
        )
        assert result.status == {204: 20} and result.errors == {}
        result = await run_open_loop(host, port, rate=100, duration=0.2, warmup=0.0, path="/close")
        assert result.completed == 20 and result.errors == {}
        assert result.connections_opened == 20  # every answer closed its connection
        result = await run_open_loop(
            host,
            port,
            rate=100,
            duration=0.2,
            warmup=0.0,
            method="POST",
            path="/echo",
            body=b"x" * 1000,
            headers={"expect": "100-continue"},
        )
        assert result.completed == 20 and result.errors == {} and result.status == {200: 20}


async def test_closed_loop() -> None:
    async with AppServer(record=False) as srv:
        assert srv.address is not None
        result = await run_closed_loop(*srv.address, concurrency=4, duration=0.5)
        check_consistent(result)
        assert result.errors == {} and result.completed > 100
        assert result.connections_opened == 4
        assert srv.max_concurrent_seen <= 4
        assert result.throughput == pytest.approx(result.completed / 0.5)


def test_percentile_math() -> None:
    result = LoadResult(
        mode="open",
        target="t",
        rate=1,
        concurrency=0,
        duration=1,
        sent=5,
        completed=5,
        errors={},
        status={200: 5},
        latencies=[0.001, 0.002, 0.003, 0.004, 0.005],
    )
    assert result.percentile(0) == 0.001
    assert result.percentile(100) == 0.005
    assert result.percentile(50) == 0.003
    assert result.percentile(90) == pytest.approx(0.0046)
    with pytest.raises(ValueError):
        result.percentile(101)
    empty = msgspec.structs.replace(result, latencies=[], completed=0)
    assert math.isnan(empty.percentile(50))
    summary = result.summary()
    assert summary["latency_ms"]["p50"] == pytest.approx(3.0) and "latencies" not in summary
    msgspec.json.encode(summary)


async def test_cli_json() -> None:
    async with AppServer(record=False) as srv:
        assert srv.address is not None
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.loadgen",
            "--target",
            f"{srv.address[0]}:{srv.address[1]}",
            "--rate",
            "100",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "--path",
            "/size/10",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            cwd=root,
        )
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
        assert proc.returncode == 0
        summary = msgspec.json.decode(out)
        assert summary["sent"] == summary["completed"] == 30
        assert summary["latency_ms"]["p99"] > 0
