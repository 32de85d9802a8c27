"""bench.ratios: its SSE client, wrk driver and ratio lines measure what they say (no timing asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from bench import e2e, ratios
from fastproxy.devtools.upstream import AppServer


async def bench_sse_client_times_every_stamped_event() -> None:
    async with AppServer() as app:
        assert app.address is not None
        client = ratios._SseClient(app.address[1])
        await client.run(concurrency=2, duration=0.3, warmup=0.05)
    assert client.failed == 0 and client.streams >= 2
    # every stream brought all its events, each with a one-way delay from the app's stamp
    assert len(client.event_delay) == client.streams * ratios.SSE_EVENTS
    assert len(client.first_byte) >= client.streams
    assert all(0 < d < 5_000_000 for d in client.event_delay), max(client.event_delay)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def bench_wrk_posts_the_chat_request_and_is_read_back(tmp_path) -> None:
    opts = ratios.Options(payload="chat")
    with e2e.Harness(log=lambda m: None) as harness:
        _app, port = harness.start_app()
        out = ratios.run_wrk(
            shutil.which("wrk"), port, opts, 1, 4, None, ratios.wrk_script(opts, tmp_path / "r.lua")
        )  # type: ignore[arg-type]
        stats = subprocess.run(
            [sys.executable, "-c", f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/control/stats').read().decode())"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    assert out["requests"] > 10 and out["non_2xx"] == 0 and out["socket_errors"] == 0
    assert json.loads(stats)["request_count"] >= out["requests"]  # the app answered every one


def _run(phase: str, target: str, rnd: int, **fields) -> dict:
    return {"phase": phase, "target": target, "round": rnd, "ok": True, "disturbed": False, **fields}


def bench_ratio_lines_are_medians_of_per_round_ratios() -> None:
    runs = []
    for rnd, (router_cpu, nginx_cpu) in enumerate([(60.0, 20.0), (45.0, 30.0), (40.0, 40.0)]):
        for name, cpu, rps in (
            ("direct", None, 50000.0),
            ("router", router_cpu, 20000.0),
            ("nginx", nginx_cpu, 40000.0),
        ):
            per = {"app": 5.0, **({"proxy": cpu} if cpu else {})}
            runs.append(_run("saturation", name, rnd, throughput=rps, cpu_us_per_req=per))
        for name, p90, p99 in (("direct", 100.0, 300.0), ("router", 150.0, 500.0), ("nginx", 110.0, 900.0)):
            lat = {"p50": 80.0, "p90": p90, "p99": p99}
            runs.append(_run("latency", name, rnd, rate=2000.0, latency_us=lat))
    opts = ratios.Options(rates=(2000.0,))
    summary = ratios.summarise(runs, opts)
    # per-round ratios 3.0, 1.5, 1.0: the median is 1.5 (the ratio of medians would be 1.67)
    assert summary["saturation"]["cpu_ratio_nginx"] == pytest.approx(1.5)
    assert summary["saturation"]["throughput_ratio_nginx"] == pytest.approx(0.5)
    assert summary["latency"]["2000"]["router_minus_nginx"]["p90"] == pytest.approx(40.0)
    lines = {
        what: verdict
        for what, _, _, verdict in ratios.target_lines({"summary": summary, "forms": {"router": "compiled"}})
    }
    assert lines["CPU per request at saturation, router (compiled) / nginx"] == "**met**"
    assert lines["saturation req/s on one core, router (compiled) / nginx"] == "**not met**"
    assert lines["added p90 at 2000 req/s: router (compiled) / nginx / haproxy"] == "**not met**"  # +40 > +30
    assert (
        lines["added p99 at 2000 req/s: router (compiled) / nginx / haproxy"] == "**met**"
    )  # router below nginx
