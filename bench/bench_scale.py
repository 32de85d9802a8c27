"""A tiny run of the scale benchmark (bench/scale.py): proves the harness, asserts no timing.

The real run is ``python -m bench.scale`` (1k / 10k / 50k pods, minutes). This one starts the same
processes -- valkey-server, a writer, a router following it through Valkey, the app, the state
agent -- with 200 pods, churns 100 changes/s for about a second while serving 300 req/s, and
checks what the figures rest on: the router held every pod before measuring, the churn reached
the router as deltas while it served (its snapshot version moved by about one per change, and
its pods end up exactly as the agent left them), and every request was answered 200. It also
renders the markdown and the PNGs. Timing is reported, never asserted: this machine is shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scale import APP_UID, ScaleHarness, ScaleOptions, _run_scale, write_results

PODS = 200
CHURN = 100.0


@pytest.mark.timeout(90)
def bench_scale_tiny_run_holds_the_pods_applies_churn_and_serves(tmp_path: Path) -> None:
    opts = ScaleOptions(
        pods=(PODS,),
        churn=CHURN,
        rate=300,
        duration=1.0,
        warmup=0.2,
        repeats=1,
        settle=0.05,
        max_foreign_cpu=0.0,  # no re-runs: a correctness check, not a measurement
        install=False,
        nice=None,
        sync_timeout=30.0,
        saturation=0.5,  # (wrk when installed, else the Python closed loop)
        sat_connections=8,
        pin=True,  # (the open-loop runs too: the proxy alone on one vCPU)
    )
    lines: list[str] = []
    with ScaleHarness(lines.append) as harness:
        results = _run_scale(harness, opts, lines.append, {"date": "-"}, {}, [])
        fleet = results["fleets"][str(PODS)]
        fleet_processes = harness.fleets[PODS]
        router_pods = harness.admin_get(fleet_processes.admin_port, "/v1/pods")
        assert harness.agent is not None
        agent_model = harness.agent.call(cmd="model", ns=fleet["namespace"])["ready"]

    # The router held every pod (the real one included) before any run was measured.
    assert fleet["seeded"]["pods"] == PODS
    assert fleet["synced"]["pods"] == PODS and not fleet["synced"]["stale"]

    runs = {run["target"]: run for run in results["runs"]}
    assert list(runs) == ["direct", "direct+churn", f"router@{PODS}", f"router@{PODS}+churn"]
    for run in runs.values():
        assert run["errors"] == {}, run
        assert run["status"] == {"200": run["sent"]}, run
        assert run["completed"] == run["sent"] == 300, run
    assert results["ok"]

    # Churn while serving: the agent sent about rate x run time, the writer committed them, and the
    # router followed delta by delta up to the writer's version (about one version per change: the
    # writer may batch changes into one commit, and may add a commit of its own now and then).
    churn = runs[f"router@{PODS}+churn"]["churn"]
    assert 0.5 * CHURN <= churn["events"] <= 4 * CHURN, churn
    assert churn["flip"] > 0 and churn["remove"] > 0 and churn["add"] > 0, churn
    applied = churn["version_after"] - churn["version_before"]
    assert 0.5 * churn["events"] <= applied <= churn["events"] + 3, churn
    assert churn["router_version_after"] >= churn["version_after"], churn
    assert runs[f"router@{PODS}+churn"]["router_state_before"]["version"] == churn["version_before"]

    # The router's pods are exactly the agent's model: every flip, removal and addition arrived.
    router_ready = {p["uid"]: p["state"] == "ready" for p in router_pods if p["uid"] != APP_UID}
    assert router_ready == agent_model
    assert any(not ready for ready in router_ready.values())  # some flips stuck at "not ready"

    # Saturation: every proxy target once per round, with and without churn, all answered; the
    # proxy's own CPU measured; the scale line computed from them.
    sat = {run["target"]: run for run in results["saturation_runs"]}
    assert list(sat) == [f"router@{PODS}", f"router@{PODS}+churn"]
    for run in sat.values():
        assert run["ok"] and run["errors"] == 0 and run["requests"] > 0, run
        assert run["cpu_us_per_req"]["proxy"] > 0, run
    assert sat[f"router@{PODS}+churn"]["churn"]["events"] > 0
    assert results["saturation"]["targets"][f"router@{PODS}"]["throughput"] > 0

    # The report and the plots come out of these results.
    results["environment"] = {"date": "-", "cpus": 2, "cpu_model": "-", "kernel": "-", "python": "-",
                              "commit": "-", "loadavg": (0, 0, 0)}  # fmt: skip
    markdown = write_results(results, tmp_path / "s.json", tmp_path / "s.md", tmp_path)
    assert f"| {PODS} |" in markdown and "router p99 change" in markdown
    assert "## Saturation" in markdown and f"| router@{PODS}+churn |" in markdown
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["sizes"][str(PODS)]["added_us"]
    for png in ("scale-added-latency.png", "scale-latency-cdf.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
