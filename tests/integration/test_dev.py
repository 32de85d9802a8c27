"""``fastproxy dev`` end to end, as a real child process: the whole system comes up, traffic flows
through churn (deaths, restarts, flaps, stalls, drains), nobody sees an error caused by a pod dying,
and no pod ever runs more requests than its concurrency."""

from __future__ import annotations

import json
import os
import queue
import random
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Churn fast enough that every kind happens within a few seconds, on a small fleet.
SCENARIO = """
service: chat
hosts: [chat.local]
revisions:
  - name: chat-v1
    pods: 16
    weight: 80
    latency: {model: lognormal, median_ms: 10, sigma: 0.4}
    load_s: 0.5
    churn: {deaths_per_s: 2, flaps_per_s: 2, stalls_per_s: 2, drains_per_s: 1,
            restart_after_s: 0.5, flap_s: 0.5, stall_ms: 300, replace_after_s: 0.3, max_unavailable: 0.4}
  - name: chat-v2
    pods: 6
    concurrency: 2
    weight: 20
    latency: {model: sse, tokens: 4, ms_per_token: 3}
    churn: {deaths_per_s: 1, flaps_per_s: 1, restart_after_s: 0.5, flap_s: 0.5}
load: {concurrency: 12}
"""


def run_dev(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # Pods on a block of their own: another engineer's run on this machine may hold the default.
    first, port = f"127.23.{random.randrange(256)}.1", str(random.randrange(20_000, 30_000))
    return subprocess.run([sys.executable, "-m", "fastproxy.cli", "dev", "--listen", "127.0.0.1:0",
                           "--admin", "127.0.0.1:0", "--first-address", first, "--pod-port", port, *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_dev_serves_through_churn_with_no_errors_from_deaths(tmp_path: Path) -> None:
    scenario = tmp_path / "churn.yaml"
    scenario.write_text(SCENARIO)
    result = run_dev("--scenario", str(scenario), "--duration", "5", "--json", "--routers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["pods"] == 22 and summary["routers"] == 2
    assert summary["requests"] > 500  # traffic flowed
    churn = summary["churn"]
    assert churn["deaths"] >= 2 and churn["restarts"] >= 1 and churn["flaps"] >= 2 and churn["drains"] >= 1
    assert churn["stalls"] >= 1
    assert summary["snapshot_version"] > 30  # the routers followed the writer through the churn
    assert summary["cut_by_crash"] == 0  # idle deaths never cut a request the app had started
    assert summary["violations"] == 0
    # Pods die between requests, close pooled connections as routers reuse them, drain, flap: no
    # client ever sees an error for it (a request the app never read is sent again).
    assert summary["errors"] == {} and summary["user_errors_from_pod_deaths"] == 0, summary["errors"]
    assert summary["ok"] == summary["requests"]
    assert set(summary["pod_states"]) == {"chat-v1", "chat-v2"}


def test_dev_default_scenario_prints_how_to_curl_and_a_summary() -> None:
    result = run_dev("--duration", "3", "--routers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "curl" in result.stdout and "-H 'Host: chat.local'" in result.stdout
    summary = json.loads(result.stdout.rsplit("summary: ", 1)[1])
    assert summary["requests"] > 100 and summary["pods"] == 54
    assert summary["violations"] == 0 and summary["cut_by_crash"] == 0
    assert summary["user_errors_from_pod_deaths"] == 0 and summary["errors"] == {}, summary["errors"]
    # The WebSocket revision: sessions opened through the router, every message echoed.
    websocket = summary["websocket"]
    assert websocket["opened"] >= 4 and websocket["sessions_completed"] >= 1, websocket
    assert websocket["errors"] == {}, websocket
    assert "realtime-v1" in summary["pod_states"]


@pytest.mark.parametrize(("content", "message"), [
    ("revisions: [{name: a, pods: -1}]", "$.revisions[0].pods"),
    ("revisions: [{name: a, pods: 1, churn: {deaths_per_s: fast}}]", "$.revisions[0].churn.deaths_per_s"),
])  # fmt: skip
def test_dev_bad_scenario_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(content)
    result = run_dev("--scenario", str(scenario), "--duration", "1", "--json", timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and "bad.yaml" in result.stderr


def test_dev_thousands_of_pods_by_name() -> None:
    result = run_dev("--scenario", "thousands", "--duration", "2", "--json", "--routers", "1", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["pods"] >= 2000 and summary["scenario"].endswith("thousands.yaml")
    assert summary["requests"] > 100 and summary["violations"] == 0 and summary["cut_by_crash"] == 0
    assert sum(sum(states.values()) for states in summary["pod_states"].values()) >= 2000
    assert summary["user_errors_from_pod_deaths"] == 0 and summary["errors"] == {}, summary["errors"]


def test_dev_prints_a_status_line_that_reads_each_running_router(tmp_path: Path) -> None:
    """Issue 18.4: each dev router has an admin listener and a token; the printed line works."""
    first, port = f"127.24.{random.randrange(256)}.1", str(random.randrange(20_000, 30_000))
    stderr = (tmp_path / "dev.stderr").open("w+")
    dev = subprocess.Popen(
        [sys.executable, "-m", "fastproxy.cli", "dev", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--first-address", first, "--pod-port", port, "--routers", "2", "--duration", "12"],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    # Drained all along, so a full pipe never stalls the dev process's event loop.
    threading.Thread(target=lambda: [lines.put(line) for line in dev.stdout or ()], daemon=True).start()
    try:
        commands: list[str] = []
        deadline = time.monotonic() + 90
        while len(commands) < 2:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                stderr.seek(0)
                assert dev.poll() is None, (
                    f"dev exited {dev.returncode} before its status lines: {stderr.read()[-2000:]}"
                )
                assert time.monotonic() < deadline, "no status lines within 90 s"
                continue
            if "fastproxy status " in line:
                commands.append(line[line.index("fastproxy status ") :].strip())
        assert commands[0] != commands[1], commands
        env = {k: v for k, v in os.environ.items() if k != "FASTPROXY_ADMIN_TOKEN"}  # the line carries it all
        for command in commands:
            argv = shlex.split(command)
            assert argv[:2] == ["fastproxy", "status"]
            cli = [sys.executable, "-m", "fastproxy.cli", *argv[1:]]
            shown = subprocess.run(
                cli, capture_output=True, text=True, timeout=30, env={**env, "COLUMNS": "200"}
            )
            assert shown.returncode == 0, shown.stderr
            assert (
                "chat-v1" in shown.stdout
                and "realtime-v1" in shown.stdout
                and "added latency" in shown.stdout
            )
            report = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30,
                                               env=env, check=True).stdout)  # fmt: skip
            assert {r["revision"] for r in report["revisions"]} >= {"chat-v1", "realtime-v1"}
            # 54 in the scenario; churn replaces dead pods, so a few may be between removal and replacement.
            assert 45 <= len(report["pods"]) <= 60 and report["state"]["instance"].startswith("dev-router-")
            assert {p["revision"] for p in report["pods"]} == {"chat-v1", "chat-v2", "realtime-v1"}
        token_file = Path(shlex.split(commands[0])[-1])
        assert token_file.stat().st_mode & 0o077 == 0  # only its owner reads the token
        assert dev.wait(timeout=90) == 0, stderr.seek(0) or stderr.read()[-3000:]
        assert not token_file.exists()  # removed with the run
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
        stderr.close()
