"""A short run of the WebSocket benchmark (bench/websocket.py): proves the harness, asserts no timing.

The real run is ``python -m bench.websocket`` (nginx beside the router); this one starts the app
and the router processes, runs one round of a few sessions, and checks that every message came
back intact and that the report's figures came out. Timing is reported, never asserted.
"""

from __future__ import annotations

import math

import pytest

from bench.websocket import Options, render_markdown, run_benchmark


@pytest.mark.timeout(90)
def test_websocket_bench_short_run_is_correct_and_reports() -> None:
    opts = Options(
        rounds=1,
        sessions=3,
        messages=400,  # ~1200 relayed messages: enough CPU for the 10 ms ticks of /proc/PID/stat
        size=32,
        nginx=False,
        install=False,
        max_foreign_cpu=0.0,
        quiet_wait=0,
    )
    results = run_benchmark(opts, lambda _line: None)
    assert [r["target"] for r in results["runs"]] == ["direct", "router"]
    for run in results["runs"]:
        assert run["errors"] == 0 and run["messages"] == 1200, run
    assert results["ok"]
    router = results["summary"]["router"]
    assert all(math.isfinite(router[k]) and router[k] > 0 for k in ("p50", "p90", "p99"))
    assert router["cpu_us_per_message"] is not None and router["cpu_us_per_message"] > 0
    assert "| router |" in render_markdown(results)
