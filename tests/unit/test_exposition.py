"""Our Prometheus text exposition writes the bytes prometheus_client writes, and the router never
imports prometheus_client (it costs ~4.7 MB of RSS).

The reference is prometheus_client itself (a test dependency): the same ``RouterCollector`` code runs
once with our families and once with prometheus_client's, and ``render`` must equal
``generate_latest`` byte for byte.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import prometheus_client
import prometheus_client.core as reference
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastproxy import exposition, metrics
from fastproxy.exposition import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, render
from fastproxy.metrics import RouterCollector
from tests.conftest import RouterHarness, chat_route, exchange, pod_record, status_of


class _Collected:
    """A prometheus_client collector replaying families built by ``build``."""

    def __init__(self, build: Any) -> None:
        self.build = build

    def collect(self) -> Iterator[Any]:
        return iter(self.build())


def generate_latest(build: Any) -> bytes:
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(_Collected(build))
    return prometheus_client.generate_latest(registry)


def with_reference_families(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CounterMetricFamily", "GaugeMetricFamily", "HistogramMetricFamily"):
        monkeypatch.setattr(metrics, name, getattr(reference, name))


async def test_router_metrics_render_as_prometheus_client_renders_them(
    harness: RouterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = await harness.app()
    router, port = await harness.router(
        [pod_record("p1", app.address), pod_record("p2", ("127.0.0.1", 1), revision="chat-v2")],
        [chat_route(("chat-v1", 100), hosts=("chat.example.com",))],
        instance="router-a",
    )
    for _ in range(5):
        ok = await exchange(port, b"GET / HTTP/1.1\r\nHost: chat.example.com\r\nConnection: close\r\n\r\n")
        assert status_of(ok) == 200
    assert (
        status_of(await exchange(port, b"GET / HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n")) == 404
    )
    assert status_of(await exchange(port, b"BAD\r\n\r\n")) == 400
    # Ended WebSocket sessions as the tunnel records them: the labelled histogram family.
    sessions = router.tunnels.stats_for("chat-v1")
    sessions.opened += 2
    for seconds in (0.5, 12.0, 4000.0):
        sessions.durations.observe(seconds)
    router.stats.count_error('odd "cause" \\ with\nnewline')  # every character label escaping handles
    assert router.stats.requests >= 6 and router.stats.added_latency.count >= 5

    now = 1_700_000_000.0
    ours = render(RouterCollector(router, now=lambda: now).collect())
    with_reference_families(monkeypatch)
    theirs = generate_latest(lambda: RouterCollector(router, now=lambda: now).collect())
    monkeypatch.undo()

    assert ours == theirs
    text = ours.decode()
    assert 'fastproxy_responses_total{status="200"} 5.0' in text
    assert 'fastproxy_errors_total{cause="odd \\"cause\\" \\\\ with\\nnewline"} 1.0' in text
    assert 'fastproxy_websocket_session_seconds_bucket{le="+Inf",revision="chat-v1"} 3.0' in text
    assert text.count("fastproxy_added_latency_seconds_bucket{") == 144


def families() -> list[Any]:
    """Every shape and edge case the renderer handles, built from whichever family classes are
    current in this module's globals (ours, or prometheus_client's under ``use_reference``)."""
    counter = CounterMetricFamily("odd_total", "help with \\ and\nnewline", labels=["b", "a"])
    counter.add_metric(['quote " back \\ new\n', "é ünïcode"], 3)
    counter.add_metric(["", ""], 0.1 + 0.2)
    gauge = GaugeMetricFamily("values", 'doc "quoted"', labels=["v"])
    for value in (math.inf, -math.inf, math.nan, 0, -0.0, 1e6, 1234567.0, 123456.0, 1e-7, 2**53, -5e20, True):
        gauge.add_metric([repr(value)], value)
    negative = HistogramMetricFamily("negative_edges", "no count or sum", labels=["x"])
    negative.add_metric(["y"], [("-1.0", 1), ("+Inf", 2)], 3.0)
    return [
        counter,
        gauge,
        GaugeMetricFamily("plain", "", value=7),
        CounterMetricFamily("bare", "no labels", value=2.5),
        HistogramMetricFamily("h", "h", buckets=[("0.1", 1), ("1e+06", 4), ("+Inf", 5)], sum_value=9.25),
        HistogramMetricFamily("no_sum", "h", buckets=[("1.0", 1), ("+Inf", 1)]),
        negative,
        CounterMetricFamily("empty", "labelled, nothing added", labels=["a"]),
    ]


def test_escaping_and_float_formats_match_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = render(families())
    module = sys.modules[__name__]
    for name in ("CounterMetricFamily", "GaugeMetricFamily", "HistogramMetricFamily"):
        monkeypatch.setattr(module, name, getattr(reference, name))
    assert ours == generate_latest(families)
    text = ours.decode()
    assert "# HELP odd_total help with \\\\ and\\nnewline\n# TYPE odd_total counter\n" in text
    assert 'odd_total{a="é ünïcode",b="quote \\" back \\\\ new\\n"} 3.0\n' in text
    for line in ('v="inf"} +Inf', 'v="-inf"} -Inf', 'v="nan"} NaN', 'v="1000000.0"} 1e+06', "plain 7.0"):
        assert line in text
    assert "negative_edges_count" not in text and "no_sum_sum" not in text
    # and prometheus' own parser reads our escapes back to the values given
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    labels = [s.labels for s in parsed["odd"].samples]
    assert labels[0] == {"b": 'quote " back \\ new\n', "a": "é ünïcode"}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GaugeMetricFamily("bad-name", "x", value=1), "invalid metric name"),
        (lambda: GaugeMetricFamily("x", "x", labels=["le-x"]), "invalid label name"),
        (lambda: GaugeMetricFamily("x", "x", labels=["a", "a"]), "duplicate label names"),
        (lambda: GaugeMetricFamily("x", "x", value=1, labels=["a"]), "not both"),
        (lambda: GaugeMetricFamily("x", "x", labels=["a"]).add_metric([], 1), "got values"),
        (lambda: HistogramMetricFamily("x", "x", sum_value=1.0), "a sum needs buckets"),
        (lambda: HistogramMetricFamily("x", "x", buckets=[("1.0", 1)]), "must end with"),
    ],
)
def test_bad_families_are_refused_when_built(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_the_router_process_does_not_import_prometheus_client() -> None:
    code = (
        "import sys\n"
        "import fastproxy.cli, fastproxy.router, fastproxy.admin, fastproxy.metrics\n"
        "try:\n"
        "    fastproxy.cli.main(['router', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "leaked = sorted(m for m in sys.modules if m.startswith('prometheus_client'))\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert exposition.__name__ == "fastproxy.exposition"
