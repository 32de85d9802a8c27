"""A short run of the end-to-end benchmark (bench/e2e.py): proves the harness, asserts no timing.

The real run is ``python -m bench.e2e --nginx`` (minutes); this one starts the same processes
(app server, router), runs one interleaved round of the open loop at a low rate and a one-second
saturation run, and checks that every request was answered 200 and that the figures the report
is built from came out (finite, positive, and in a sane relation to each other). Timing is
reported, never asserted: this machine is shared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.e2e import Options, render_markdown, run_benchmark, write_results


@pytest.mark.timeout(60)
def test_e2e_short_run_is_correct_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts = Options(
        rate=500,
        duration=1.0,
        warmup=0.2,
        repeats=1,
        sat_concurrency=(8,),
        sat_duration=1.0,
        sat_warmup=0.1,
        settle=0.05,
        max_foreign_cpu=0.0,  # no re-runs: this is a correctness check, not a measurement
        install=False,
        nice=None,
    )
    lines: list[str] = []
    results = run_benchmark(opts, lines.append)

    # Correctness first: every run complete, 200 only, nothing lost or failed.
    runs = results["runs"]
    assert [(r["phase"], r["target"]) for r in runs] == [
        ("latency", "direct"),
        ("latency", "router"),
        ("saturation", "direct"),
        ("saturation", "router"),
    ]
    for run in runs:
        assert run["errors"] == {}, run
        assert run["status"] == {"200": run["sent"]}, run
        assert run["completed"] == run["sent"], run
        assert run["ok"]
    for run in runs[:2]:
        assert run["sent"] == 500  # 500 req/s for 1 s, warm-up excluded
        assert run["pool_exhausted"] == 0
    assert results["ok"]
    assert all(r["sent"] > 0 for r in runs[2:])

    # The figures are there and make sense (no thresholds: timing is only reported).
    summary = results["summary"]["plain"]
    direct, router = summary["latency"]["direct"], summary["latency"]["router"]
    for entry in (direct, router):
        lat = entry["latency_us"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 10e6
        assert entry["errors"] == 0 and entry["completed"] == entry["sent"] == 500
    added = router["added_us"]
    assert all(math.isfinite(added[k]) for k in ("p50", "p90", "p99", "max"))
    assert added["p50"] == pytest.approx(router["latency_us"]["p50"] - direct["latency_us"]["p50"])
    assert router["cpu_us_per_req"]["proxy"] > 0 and router["cpu_us_per_req"]["app"] > 0
    sat = summary["saturation"]
    assert set(sat) == {"direct@8", "router@8"}
    for entry in sat.values():
        assert entry["throughput"] > 0 and entry["errors"] == 0 and entry["ok"]
        assert entry["cpu_us_per_req"]["app"] > 0
    assert sat["router@8"]["cpu_us_per_req"]["proxy"] > 0

    # The report: JSON round-trips, the markdown names every target and the targets.
    json_path, md_path = tmp_path / "e2e.json", tmp_path / "e2e.md"
    markdown = write_results(results, json_path, md_path)
    assert json.loads(json_path.read_text())["ok"] is True
    assert md_path.read_text() == markdown == render_markdown(results)
    assert "| router |" in markdown and "| direct |" in markdown
    assert "router added p90 <= 110 us" in markdown and "router CPU <= 25 us/request" in markdown

    # Every process the harness started is gone.
    for run in runs:
        assert run["address"].startswith("127.0.0.1:")
    for pid_line in [line for line in lines if line.startswith("targets:")]:
        for item in pid_line.split("pids: ", 1)[1].split(", "):
            pid = int(item.split("=", 1)[1])
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), item

    with capsys.disabled():  # the figures, for whoever runs this by hand
        lat = router["latency_us"]
        print(
            f"\ne2e short run: router p50 {lat['p50']:.0f} us p90 {lat['p90']:.0f} us "
            f"(added p50 {added['p50']:+.0f}, p90 {added['p90']:+.0f}); "
            f"router saturation {sat['router@8']['throughput']:.0f} req/s, "
            f"{sat['router@8']['cpu_us_per_req']['proxy']:.0f} us CPU/req"
        )


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return True


def test_e2e_cli_rejects_bad_arguments() -> None:
    from bench.e2e import parse_args

    opts, json_path, md_path = parse_args(["--rate", "100", "--sat-concurrency", "16,64", "--busy-loops"])
    assert opts.rate == 100 and opts.sat_concurrency == (16, 64) and opts.conditions == [True]
    assert json_path.name == "e2e-latest.json" and md_path.name == "e2e-latest.md"
    assert parse_args(["--busy-loops", "both"])[0].conditions == [False, True]
    for bad in (["--rate", "0"], ["--repeats", "0"], ["--sat-concurrency", "x"], ["--busy-loops", "maybe"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
