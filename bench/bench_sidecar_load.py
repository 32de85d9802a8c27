"""A short run of the sidecar load benchmark (bench/sidecar_load.py): correctness, not timing.

The real run is ``python -m bench.sidecar_load`` (4 routers, 20 pods, 20 s). This one starts the
same processes at a smaller scale (Valkey, writer, one app process, 4 sidecars, 2 routers), offers
1.3x the capacity for 5 s, then flips readiness 3 times, and checks what must hold whatever the
machine: no app call was double-booked (the app counts concurrency violations) and every request
was answered 200 while the queue deadline (30 s) held. The idle-gap and flip figures are reported,
never asserted: this machine is shared. The flip's stages are checked for coherence only (each
present, in causal order, the routers' change times known to within a poll's round trip).

"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import uvloop

from bench.sidecar_load import Options, render_markdown, run_benchmark, write_results


@pytest.mark.timeout(60)
def bench_sidecar_load_smoke(tmp_path: Path) -> None:
    opts = Options(
        routers=2, pods=4, duration=5.0, warmup=0.5, queue_timeout=30.0, start_timeout=30.0, flips=3
    )
    lines: list[str] = []
    results = uvloop.run(run_benchmark(opts, lines.append))
    print("\n".join(lines))
    markdown = render_markdown(results)
    print(markdown)
    write_results(results, tmp_path / "sidecar-load.json")
    assert json.loads((tmp_path / "sidecar-load.json").read_text())["options"]["pods"] == 4

    # The figures are there (reported, not judged).
    client, app, idle = results["client"], results["app"], results["idle_gap_ms"]
    assert client["sent"] == 520  # 104 req/s (1.3 x 4 pods / 50 ms) for 5 s, warm-up excluded
    assert idle["count"] > 0 and math.isfinite(idle["p99"])
    assert app["work_count"] >= client["status"].get("200", 0)  # each 200 was served by the app
    assert len(results["routers"]) == 2 and "| double-booked app calls |" in markdown
    flips = results["readiness_flips"]
    assert flips["flips"] == 3 and all(
        math.isfinite(flips[key]["p99"]) and flips[key]["p50"] > 0
        for key in ("gate_closed_ms", "routers_stopped_ms", "gate_open_ms", "routers_routable_ms")
    )

    # Where a flip's time goes (sidecar -> Valkey -> writer's delta -> routers): every stage is
    # there, in causal order, and a router's change time is known to within the poll's round trip.
    for suffix in ("", "_open"):
        event, delta = flips[f"stage_event_in_valkey{suffix}_ms"], flips[f"stage_delta_published{suffix}_ms"]
        assert math.isfinite(flips[f"stage_routers_after_delta{suffix}_ms"]["p50"])
        assert 0 < event["p50"] <= delta["p50"], (event, delta)
    assert 0 < flips["state_round_trip_ms"]["p50"] < flips["routers_stopped_ms"]["p50"]

    # What must hold.
    assert app["violations"] == 0 and app["max_concurrent_seen"] == 1, app
    assert client["errors"] == {}, client
    assert client["status"] == {"200": client["sent"]}, client
