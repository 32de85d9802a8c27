"""Issue 18.1: a response broken after the request may have reached the app fails that request
only; the pod stays in rotation unless it breaks ``outlier_consecutive_failures`` exchanges in a
row, and an exclusion for failing to connect is lifted early by a re-check connect that works."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import RouterHarness, exchange, pod_record, status_of, wait_for

GET = b"GET %s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("path", [b"/eof", b"/cut/1000"])
async def test_one_broken_response_leaves_a_one_pod_revision_serving(
    harness: RouterHarness, path: bytes
) -> None:
    app = await harness.app()
    router, port = await harness.router(
        [pod_record("p1", app.address)], queue_timeout=2, exclusion_seconds=30
    )
    broken = await exchange(port, GET % path)
    if path == b"/eof":
        assert status_of(broken) == 502  # the request in flight fails as before
    else:  # the head went out: the client sees the cut, not a complete body
        assert status_of(broken) == 200 and len(broken.split(b"\r\n\r\n", 1)[1]) < 2000
    # The very next request is served at once (it waited out a 30 s exclusion, and got 503 at its
    # 2 s queue deadline, when one broken exchange excluded the pod).
    assert status_of(await exchange(port, GET % b"/", timeout=1.5)) == 200
    assert router.stats.local_exclusions == 0 and not router.reports
    assert router.stats.errors == {"upstream_lost": 1}
    assert app.request_count == 2  # nothing was sent twice


async def test_consecutive_broken_exchanges_exclude_and_a_success_ends_the_streak(
    harness: RouterHarness,
) -> None:
    app = await harness.app()
    router, port = await harness.router(
        [pod_record("p1", app.address)],
        queue_timeout=0.3,
        exclusion_seconds=30,
        outlier_consecutive_failures=3,
    )
    for path in (b"/eof", b"/eof", b"/", b"/eof", b"/eof"):  # 2, a success, 2: never 3 in a row
        await exchange(port, GET % path)
    assert router.stats.local_exclusions == 0 and router.slots.pods["p1"].routable
    assert router.outliers.failing == {"p1": 2}
    assert status_of(await exchange(port, GET % b"/eof")) == 502  # the third in a row
    assert router.stats.local_exclusions == 1 and not router.slots.pods["p1"].routable
    (report,) = router.reports
    assert report.uid == "p1" and report.failure.value == "reset" and "3 broken exchanges" in report.reason
    # An outlier accepts connections: no re-check lifts its exclusion early.
    assert status_of(await exchange(port, GET % b"/")) == 503
    assert router.stats.rechecks == {} and router.outliers.failing == {}


async def test_reset_before_any_byte_excludes_and_a_recheck_connect_readmits(harness: RouterHarness) -> None:
    app = await harness.app()
    router, port = await harness.router(
        [pod_record("p1", app.address)], queue_timeout=5, exclusion_seconds=30, recheck_interval=0.05
    )
    # A fresh connection reset before one response byte: the app never read it (connect evidence).
    assert status_of(await exchange(port, GET % b"/reset")) == 502
    assert router.stats.local_exclusions == 1 and router.reports[0].failure.value == "reset"
    # The pod accepts connections: the re-check readmits it long before the 30 s are up.
    await wait_for(lambda: router.slots.pods["p1"].routable, timeout=3, what="readmitted by a re-check")
    assert router.stats.rechecks.get("ok") == 1
    assert status_of(await exchange(port, GET % b"/")) == 200


async def test_recheck_of_a_refusing_pod_keeps_it_excluded(harness: RouterHarness) -> None:
    alive = await harness.app()
    dead = await harness.app()
    dead_address = dead.address
    await dead.close()  # refuses connections, for real
    router, port = await harness.router(
        [pod_record("dead", dead_address, concurrency=4), pod_record("alive", alive.address, concurrency=4)],
        exclusion_seconds=30, recheck_interval=0.05,
    )  # fmt: skip
    for _ in range(4):
        assert status_of(await exchange(port, GET % b"/")) == 200
    assert router.stats.local_exclusions == 1
    await wait_for(lambda: router.stats.rechecks.get("failed", 0) >= 3, timeout=5, what="3 failed re-checks")
    assert "ok" not in router.stats.rechecks and not router.slots.pods["dead"].routable


def test_cli_outlier_options_explained_and_checked() -> None:
    cli = [sys.executable, "-m", "fastproxy.cli", "router"]
    shown = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "--outlier-failures N" in shown and "--recheck-interval SECONDS" in shown
    assert "broken exchanges in a row" in " ".join(shown.split())
    for flag, value, message in (
        ("--outlier-failures", "0", "at least 1"),
        ("--recheck-interval", "-1", ">= 0"),
    ):
        bad = subprocess.run(
            [*cli, "--listen", "127.0.0.1:0", flag, value], capture_output=True, text=True, timeout=30
        )
        assert bad.returncode == 2 and flag in bad.stderr and message in bad.stderr, bad.stderr
