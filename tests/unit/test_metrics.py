"""The added-latency histogram: figures within 5% from 10 us to 10 s, a bounded /metrics exposition."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fastproxy import metrics
from fastproxy.exposition import HistogramMetricFamily
from fastproxy.metrics import RouterStats


def exact(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@pytest.mark.parametrize("median", [12e-6, 37e-6, 180e-6, 2.3e-3, 0.4, 7.0])
def test_quantiles_are_figures_within_5_percent(median: float) -> None:
    rng = random.Random(int(median * 1e9))
    samples = [min(9.9, max(10.1e-6, rng.lognormvariate(math.log(median), 0.3))) for _ in range(20_000)]
    hist = RouterStats().added_latency  # the one the router uses
    for value in samples:
        hist.observe(value)
    assert hist.count == len(samples) and hist.sum == pytest.approx(sum(samples))
    for q in (0.5, 0.9, 0.99):
        want, got = exact(samples, q), hist.quantile(q)
        assert abs(got - want) <= 0.05 * want, (q, want, got)


def test_one_value_reads_back_within_5_percent_across_the_range() -> None:
    for exponent in range(-50, 10):  # 10 us .. 10 s in steps of ~1.26x, edges and middles alike
        value = 10 ** (exponent / 10)
        if not 10e-6 <= value <= 10.0:
            continue
        hist = metrics.LatencyHistogram()
        hist.observe(value)
        assert abs(hist.quantile(0.5) - value) <= 0.05 * value, value


def test_out_of_range_values_are_counted_not_lost() -> None:
    hist = metrics.LatencyHistogram()
    for value in (0.0, -1e-6, 3e-6, 50.0, 1e9):
        hist.observe(value)
    assert hist.count == 5 and sum(hist.buckets) == 5
    assert hist.buckets[0] == 3 and hist.buckets[-1] == 2
    assert hist.quantile(0.99) == hist.bounds[-1] and hist.quantile(0.1) <= 10e-6
    assert metrics.LatencyHistogram().quantile(0.5) == 0.0


def test_buckets_are_5_percent_wide_and_cover_10us_to_10s() -> None:
    hist = metrics.LatencyHistogram()
    assert hist.bounds[0] == pytest.approx(10e-6) and hist.bounds[-1] >= 10.0
    ratios = [b / a for a, b in itertools.pairwise(hist.bounds)]
    assert max(ratios) <= 1.05 + 1e-9 and len(hist.buckets) < 300


def test_merge_of_routers_and_bad_merge() -> None:
    a, b = metrics.LatencyHistogram(), metrics.LatencyHistogram()
    for _ in range(90):
        a.observe(40e-6)
    for _ in range(10):
        b.observe(2e-3)
    p50, p90, p99 = metrics.merged_quantiles([a, b])
    assert p50 == pytest.approx(40e-6, rel=0.05) and p99 == pytest.approx(2e-3, rel=0.05)
    assert p90 == pytest.approx(40e-6, rel=0.05)
    with pytest.raises(ValueError, match="different buckets"):
        a.merge(metrics.LatencyHistogram(growth=1.1))


def test_exposition_keeps_every_other_edge_and_is_cumulative() -> None:
    hist = metrics.LatencyHistogram()
    for value in (15e-6, 15e-6, 1e-3, 20.0):
        hist.observe(value)
    buckets = hist.cumulative(metrics.LATENCY_EXPORT_STRIDE)
    edges = [float(le) for le, _ in buckets[:-1]]
    assert buckets[-1] == ("+Inf", 4) and len(buckets) < 150
    assert max(b / a for a, b in itertools.pairwise(edges)) <= 1.05**2 + 1e-9
    assert edges[-1] == hist.bounds[-1]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-2] == 3
    # what /metrics renders from it
    family = HistogramMetricFamily("x", "x", buckets=buckets, sum_value=hist.sum)
    assert len(family.samples) == len(buckets) + 2
