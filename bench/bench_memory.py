"""bench.memory: it measures real router processes, holding the pods it gave them."""

from __future__ import annotations

from bench import memory


def bench_memory_measures_static_and_valkey_routers() -> None:
    result = memory.run(
        pods=300, cases=["static-1", "static", "static-slots", "valkey"], rounds=1, tracemalloc_top=3,
        log=lambda m: None,
    )  # fmt: skip
    cases = result["cases"]
    assert set(cases) == {"static-1", "static", "static-slots", "valkey"}
    for entry in cases.values():
        assert 10 < entry["rss_mb"] <= entry["peak_mb"] < 1000, entry
    assert cases["valkey"]["version"] >= 1
    # tracemalloc ran the same load in a child: it holds the pods it was given
    assert result["tracemalloc"]["static"]["pods"] == 300
    assert result["tracemalloc"]["valkey"]["pods"] == 300
    assert result["tracemalloc"]["static"]["top"], result["tracemalloc"]
    text = memory.markdown(result)
    assert "| routes file, 300 pods (before any request: no slots yet) |" in text
    # (static-slots got its 300 answers through the router: request_every_route raises on any other)
    assert "| routes file, 300 pods, after a request to each revision (slots included) |" in text
