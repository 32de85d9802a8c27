"""``fastproxy dev`` end to end: the whole system comes up, traffic flows through churn."""

from __future__ import annotations

import json
import subprocess
import sys


def test_dev_runs_and_serves_through_churn() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastproxy.cli", "dev", "--duration", "6", "--json", "--listen", "127.0.0.1:0",
         "--pods", "10", "--churn-interval", "0.5"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["requests"] > 100
    assert summary["status"].get("200", 0) > 0.95 * summary["requests"]
    assert summary["snapshot_version"] > 2  # the router followed the writer through the churn
    assert not summary["client_connection_failures"]
