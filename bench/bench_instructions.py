"""bench.instructions: its child really runs exchanges, and its callgrind parsing finds the costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import instructions
from bench.bench_exchange import BODY, RESPONSE_BODY


def bench_child_runs_checked_exchanges() -> None:
    out = instructions.run_child(exchanges=50, warmup=5, calls=200)
    assert out["exchanges"] == 50
    assert out["modules"]["fastproxy.proxy"].startswith(str(Path(instructions.ROOT / "fastproxy")))
    calls = {row["function"]: row["calls_per_exchange"] for row in out["python_calls"]}
    # the rig ran 50 exchanges, not one: its step once per exchange; and an exchange gives the pod
    # a whole rebuilt request and the client a whole response (head and body on each side)
    assert any(name.endswith(":one") and rate == 1.0 for name, rate in calls.items()), calls
    assert out["pod_bytes"] > len(BODY) + len(b"POST /v1/chat/completions HTTP/1.1\r\n"), out
    assert out["client_bytes"] > len(RESPONSE_BODY) + len(b"HTTP/1.1 200 OK\r\n"), out
    if out["modules"]["fastproxy.exchange"].endswith(".py"):
        # pure form: the parsers' feeds and the router's per-request side are Python calls
        assert any(name.endswith(":feed") for name in calls), calls
        assert any(name.endswith(":forwarding_headers") and rate == 1.0 for name, rate in calls.items()), (
            calls
        )
    else:
        # compiled form: the compiled modules' methods are C calls, invisible to cProfile
        compiled_sources = ("exchange.py:", "snapshot.py:", "metrics.py:", "routerbase.py:")
        assert not any(name.startswith(compiled_sources) for name in calls), calls


def bench_function_keys_merge_inlined_code_and_recursion() -> None:
    costs = {
        "/build/Python/ceval.c:_PyEval_EvalFrameDefault [/venv/lib/libpython3.11.so.1.0]": 100,
        "/build/Python/ceval.c:_PyEval_EvalFrameDefault'2 [/venv/lib/libpython3.11.so.1.0]": 20,
        "/build/./Include/object.h:_PyEval_EvalFrameDefault": 3,
        "/src/llhttp.c:llhttp__internal__run [/venv/httptools/parser.so]": 7,
    }
    assert instructions._merge(costs) == {
        "_PyEval_EvalFrameDefault [libpython3.11.so.1.0]": 123,
        "llhttp__internal__run [parser.so]": 7,
    }


def bench_annotate_lines_parse(tmp_path: Path) -> None:
    line = " 1,234,567 (12.34%)  /src/ceval.c:_PyEval_EvalFrameDefault [/lib/libpython3.11.so]"
    match = instructions._ANNOTATE_LINE.match(line)
    assert match is not None and match.group(1) == "1,234,567"
    assert match.group(2) == "/src/ceval.c:_PyEval_EvalFrameDefault [/lib/libpython3.11.so]"
    out = tmp_path / "callgrind.out"
    out.write_bytes(b"events: Ir\nfn=main\n0 5\nsummary: 987654\n")
    assert instructions._total(out) == 987654
    out.write_bytes(b"events: Ir\n")
    with pytest.raises(instructions.InstructionsError):
        instructions._total(out)
