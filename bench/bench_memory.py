"""bench.memory: it measures real router processes, holding the pods it gave them."""

from __future__ import annotations

from bench import memory


def bench_memory_measures_static_and_valkey_routers() -> None:
    result = memory.run(
        pods=300, cases=["static-1", "static", "valkey"], rounds=1, tracemalloc_top=3, log=lambda m: None
    )
    cases = result["cases"]
    assert set(cases) == {"static-1", "static", "valkey"}
    for entry in cases.values():
        assert 10 < entry["rss_mb"] <= entry["peak_mb"] < 1000, entry
    assert cases["valkey"]["version"] >= 1
    # tracemalloc ran the same load in a child: it holds the pods it was given
    assert result["tracemalloc"]["static"]["pods"] == 300
    assert result["tracemalloc"]["valkey"]["pods"] == 300
    assert result["tracemalloc"]["static"]["top"], result["tracemalloc"]
    assert "| routes file, 300 pods |" in memory.markdown(result)
