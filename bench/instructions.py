"""Instructions per in-memory exchange, counted by callgrind: the figure that noise cannot move.

Usage::

    python -m bench.instructions [--exchanges 1000] [--warmup 200] [--repeats 1]
                                 [--annotate [TOP]] [--calls [TOP]] [--json PATH] [--markdown PATH]

Theory of operation
-------------------
On this shared 2-vCPU VM wall-clock figures move by 20% between runs; the number of instructions
the CPU retires for one request does not. This script counts them for the router's own work on
one realistic request (the OpenAI-style chat completion of ``bench/bench_exchange.py``: ~10
request fields, a 1 KB JSON body, a 1 KB JSON answer): parse, route, pick, pool checkout, head
rebuild, the pod's response parsed and rebuilt, slot given back. The sockets are the in-memory
transports of ``bench_exchange.InMemoryExchange`` (so the kernel and the event loop's epoll are
not in it; they are in ``bench.e2e``'s CPU per request).

A child process (``python -m bench.instructions --child N``) builds that rig, checks one exchange
end to end (the pod got the rebuilt request, the client the whole answer, the slot came back, the
pod connection went back to the pool), runs ``--warmup`` exchanges (caches, specialisation of the
interpreter's bytecode, free lists) and then ``N`` exchanges, and checks that all ``N`` were
answered 200. It runs under ``valgrind --tool=callgrind`` twice: with ``N`` and with ``2N``
exchanges. Everything else the process does (interpreter start, imports, the rig, exit) is the
same in both, so ``(Ir(2N) - Ir(N)) / N`` is the instruction count of one exchange. Both runs
start with ``PYTHONHASHSEED=0`` so dict and set layouts are the same in both; the garbage
collector stays on (a router has it on), its collections fall into both runs in proportion.

The router is whatever ``fastproxy.proxy`` imports to: the pure-Python modules today, their
compiled form once it is built (the report says which file each hot module was loaded from).

``--annotate [TOP]`` also prints where the instructions go: ``callgrind_annotate`` of both runs,
per function (self cost, not inclusive), subtracted and divided by ``N``, the ``TOP`` (default 30)
largest. A pure-Python router shows up there as interpreter functions
(``_PyEval_EvalFrameDefault``, dict and object allocation...), a compiled one as its own C
functions beside them. ``--calls [TOP]`` says which *Python* functions those are: the child once
more, without valgrind, under cProfile, with the calls per exchange of each function (exact
counts; its time shares are the profiler's and only indicative).

Results go to ``bench/results/instructions-latest.json`` and ``.md``; the per-exchange figure is
printed on stdout. The issue's baseline is ~231k instructions; its target <= 60k.

``--route llm-prefix`` runs the same exchange on an LLM route with ``policy: prefix`` (issue 17:
the body is held and peeked, the prompt hashed, the pick walks the Maglev table): its figure less
the plain route's is what the peek adds to a request (results in ``instructions-llm-prefix.*``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
TARGET_PER_EXCHANGE = 60_000
BASELINE_PER_EXCHANGE = 231_000  # the figure when it was filed


# ---- the child: N in-memory exchanges -----------------------------------------------------------


ROUTES: dict[str, dict[str, Any] | None] = {"plain": None, "llm-prefix": {"policy": "prefix"}}


def run_child(exchanges: int, warmup: int, calls: int = 0, route: str = "plain") -> dict[str, Any]:
    """Build the rig, check it, warm up, run ``exchanges``; a summary as a dict.

    ``calls``: profile the ``exchanges`` with cProfile and add the ``calls`` functions called most
    per exchange (deterministic counts; the profiler's times are not, they are only a share)."""
    import msgspec
    import uvloop

    import fastproxy.exchange
    import fastproxy.proxy
    from bench.bench_exchange import BODY, REQUEST, RESPONSE, RESPONSE_BODY, InMemoryExchange
    from statesync.schema import Route

    llm = ROUTES[route]
    loop = uvloop.new_event_loop()  # as in the router: its clock and handles are C
    try:
        if llm is None:
            rig = InMemoryExchange(loop)
        else:
            raw = {"service": "chat", "hosts": ["chat.inference.example.com"],
                   "revisions": [{"revision": "chat-v1"}], "llm": llm}  # fmt: skip
            rig = InMemoryExchange(loop, msgspec.convert(raw, Route))
        rig.client.data_received(REQUEST)
        sent = rig.pod_side.take()
        if not (sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and sent.endswith(BODY)):
            raise SystemExit(f"the pod did not get the rebuilt request: {sent[:200]!r}")
        rig.respond(RESPONSE)
        answer = rig.client_side.take()
        if not (answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(RESPONSE_BODY)):
            raise SystemExit(f"the client did not get the response: {answer[:200]!r}")
        if rig.router.slots.pods["pod-a"].inflight != 0 or rig.router.pool.idle_count != 1:
            raise SystemExit("the slot or the pod connection was not given back")
        one = rig.one
        for _ in range(warmup):
            one()
        before = rig.router.stats.responses[200]
        profile = None
        if calls:
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        for _ in range(exchanges):
            one()
        if profile is not None:
            profile.disable()
        answered = rig.router.stats.responses[200] - before
        if answered != exchanges or rig.client_side.closed:
            raise SystemExit(f"{answered} of {exchanges} exchanges answered 200")
        # One more, outside the count, to say what each side's socket was given (its transports
        # are C callables, which cProfile does not see when compiled code calls them).
        rig.client.data_received(REQUEST)
        pod_bytes = len(rig.pod_side.take())
        rig.respond(RESPONSE)
        client_bytes = len(rig.client_side.take())
    finally:
        loop.close()
    out: dict[str, Any] = {"exchanges": exchanges, "route": route, "pod_bytes": pod_bytes,
                           "client_bytes": client_bytes}  # fmt: skip
    if profile is not None:
        out["python_calls"] = _profile_table(profile, exchanges, calls)
    return {
        **out,
        "modules": {
            "fastproxy.proxy": fastproxy.proxy.__file__,
            "fastproxy.exchange": fastproxy.exchange.__file__,
        },
    }


def _profile_table(profile: Any, exchanges: int, top: int) -> list[dict[str, Any]]:
    import pstats

    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in stats.values()) or 1.0
    rows = []
    for (filename, line, function), (_primitive, ncalls, tottime, _cumtime, _callers) in stats.items():
        where = function if filename == "~" else f"{Path(filename).name}:{line}:{function}"
        rows.append(
            {"function": where, "calls_per_exchange": ncalls / exchanges, "self_share": tottime / total}
        )
    rows.sort(key=lambda r: (-r["self_share"], -r["calls_per_exchange"]))
    return [
        {
            "function": "(all)",
            "calls_per_exchange": sum(r["calls_per_exchange"] for r in rows),
            "self_share": 1.0,
        },
        *rows[:top],
    ]


def python_calls(exchanges: int, warmup: int, top: int, route: str = "plain") -> list[dict[str, Any]]:
    """The child once, without valgrind, under cProfile: Python-level calls per exchange."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--child", str(exchanges), "--warmup", str(warmup),
         "--calls", str(top), "--route", route],
        cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise InstructionsError(f"profiled run failed:\n{out.stderr.strip()[-2000:]}")
    return list(json.loads(out.stdout.strip().splitlines()[-1])["python_calls"])


# ---- the parent: two callgrind runs and their difference ----------------------------------------


_SUMMARY = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.M)
# callgrind_annotate lines: "1,234,567 (12.34%)  file:function [object]" (3.19 prints the percent)
_ANNOTATE_LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([\s\d.]+%\)\s+)?(\S.*?)\s*$")


class InstructionsError(RuntimeError):
    pass


def _callgrind(exchanges: int, warmup: int, out: Path, route: str = "plain") -> subprocess.Popen[bytes]:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise InstructionsError("valgrind is not installed (apt-get install valgrind)")
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONMALLOC", None)  # pymalloc, as a router runs (valgrind copes with it)
    argv = [
        valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no",
        sys.executable, "-m", "bench.instructions", "--child", str(exchanges), "--warmup", str(warmup),
        "--route", route,
    ]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _total(out: Path) -> int:
    match = _SUMMARY.search(out.read_bytes())
    if match is None:
        raise InstructionsError(f"no summary line in {out}")
    return int(match.group(1))


def per_function(out: Path) -> dict[str, int]:
    """Self instructions per function of one callgrind output (callgrind_annotate, no threshold)."""
    annotate = shutil.which("callgrind_annotate")
    if annotate is None:
        raise InstructionsError("callgrind_annotate is not installed (it comes with valgrind)")
    text = subprocess.run(
        [annotate, "--inclusive=no", "--threshold=100", str(out)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    costs: dict[str, int] = {}
    # Only the function table: it ends at its first blank line. What follows (the auto-annotated
    # sources) has call lines, "=> file:function (2,201x)", whose costs are *inclusive*: read as
    # functions, they made callers look larger than the whole exchange.
    body = text.split("file:function", 1)[-1].split("\n", 2)[-1]
    for line in body.splitlines():
        if not line.strip():
            break
        match = _ANNOTATE_LINE.match(line)
        if match and ":" in match.group(2) and not match.group(2).startswith("=>"):
            name = match.group(2)
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    return costs


def _function_key(name: str) -> str:
    """``function [object]`` of callgrind_annotate's ``file:function [object]``.

    The source file is dropped (code inlined from a header is listed under that header's name, and
    without its object: it is the same function), and so is callgrind's recursion-depth suffix
    (``_PyEval_EvalFrameDefault'2`` is the interpreter re-entered from C)."""
    where, _, obj = name.partition(" [")
    function = re.sub(r"'\d+$", "", where.rpartition(":")[2])
    return f"{function} [{Path(obj.rstrip(']')).name}]" if obj else function


def _merge(costs: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    objects: dict[str, str] = {}
    for name, cost in costs.items():
        key = _function_key(name)
        function, _, obj = key.partition(" [")
        if obj:
            objects.setdefault(function, key)
        merged[function] = merged.get(function, 0) + cost
    return {objects.get(function, function): cost for function, cost in merged.items()}


def measure(exchanges: int, warmup: int, annotate: int = 0, route: str = "plain") -> dict[str, Any]:
    """One N / 2N pair under callgrind (run side by side: the counts do not depend on timing)."""
    with tempfile.TemporaryDirectory(prefix="fastproxy-callgrind-") as tmp:
        outs = {n: Path(tmp) / f"callgrind.{n}.out" for n in (exchanges, 2 * exchanges)}
        procs = {n: _callgrind(n, warmup, path, route) for n, path in outs.items()}
        children: dict[int, dict[str, Any]] = {}
        for n, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                tail = stderr.decode(errors="replace").strip().splitlines()[-15:]
                raise InstructionsError(f"callgrind run of {n} exchanges failed:\n" + "\n".join(tail))
            children[n] = json.loads(stdout.decode().strip().splitlines()[-1])
        totals = {n: _total(path) for n, path in outs.items()}
        result: dict[str, Any] = {
            "exchanges": exchanges,
            "warmup": warmup,
            "total_instructions": {str(n): t for n, t in totals.items()},
            "per_exchange": (totals[2 * exchanges] - totals[exchanges]) / exchanges,
            "fixed_cost": 2 * totals[exchanges] - totals[2 * exchanges],
            "modules": children[exchanges]["modules"],
        }
        if annotate:
            small = _merge(per_function(outs[exchanges]))
            large = _merge(per_function(outs[2 * exchanges]))
            diff = {name: (large.get(name, 0) - small.get(name, 0)) / exchanges for name in large}
            top = sorted(diff.items(), key=lambda kv: kv[1], reverse=True)[:annotate]
            result["top_functions"] = [{"function": name, "per_exchange": round(cost)} for name, cost in top]
    return result


def run(
    exchanges: int, warmup: int, repeats: int, annotate: int, calls: int = 0, route: str = "plain"
) -> dict[str, Any]:
    rounds = [measure(exchanges, warmup, annotate if i == 0 else 0, route) for i in range(repeats)]
    per = [r["per_exchange"] for r in rounds]
    compiled = [m for m in rounds[0]["modules"].values() if not m.endswith(".py")]
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": platform.python_version(),
        "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        "form": "compiled" if compiled else "pure Python",
        "route": route,
        "modules": rounds[0]["modules"],
        "exchanges": exchanges,
        "warmup": warmup,
        "per_exchange": statistics.median(per),
        "per_exchange_rounds": per,
        "baseline": BASELINE_PER_EXCHANGE,
        "target": TARGET_PER_EXCHANGE,
        "target_met": statistics.median(per) <= TARGET_PER_EXCHANGE,
        "rounds": rounds,
        "top_functions": rounds[0].get("top_functions", []),
        "python_calls": python_calls(exchanges, warmup, calls, route) if calls else [],
    }


def _commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def markdown(result: dict[str, Any]) -> str:
    per = result["per_exchange"]
    lines = [
        "# Instructions per in-memory exchange (callgrind)",
        "",
        f"{result['when']} · commit {result['commit']} · Python {result['python']} · {result['valgrind']} · "
        f"router: {result['form']} · route: {result.get('route', 'plain')}",
        "",
        f"One OpenAI-style POST (10 fields, 1 KB JSON) and its 1 KB answer through parse, route, pick, "
        f"rebuild and response; (Ir({2 * result['exchanges']}) - Ir({result['exchanges']})) / "
        f"{result['exchanges']} after {result['warmup']} warm-up exchanges.",
        "",
        "| instructions per exchange | rounds | issue's baseline | target |",
        "|--:|---|--:|--:|",
        f"| **{per:,.0f}** | {', '.join(f'{p:,.0f}' for p in result['per_exchange_rounds'])} "
        f"| ~{result['baseline']:,} | <= {result['target']:,} ({'met' if result['target_met'] else 'not met'}) |",
    ]
    if result["top_functions"]:
        lines += [
            "",
            "## Where they go (self cost per exchange)",
            "",
            "| instructions | function |",
            "|--:|---|",
        ]
        lines += [f"| {f['per_exchange']:,} | `{f['function']}` |" for f in result["top_functions"]]
    if result["python_calls"]:
        lines += [
            "",
            "## Python-level calls per exchange (cProfile, no valgrind; the share of the profiler's "
            "self time is indicative only)",
            "",
            "| calls | self share | function |",
            "|--:|--:|---|",
        ]
        lines += [
            f"| {f['calls_per_exchange']:.2f} | {f['self_share'] * 100:.1f}% | `{f['function']}` |"
            for f in result["python_calls"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--exchanges", type=int, default=1000, help="N: runs of N and 2N exchanges (default 1000)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured exchanges first (default 200)")
    parser.add_argument("--repeats", type=int, default=1, help="N/2N pairs; the median is reported")
    parser.add_argument(
        "--annotate", type=int, nargs="?", const=30, default=0, metavar="TOP",
        help="also print the TOP (default 30) functions by self instructions per exchange",
    )  # fmt: skip
    parser.add_argument(
        "--calls", type=int, nargs="?", const=40, default=0, metavar="TOP",
        help="also list the TOP (default 40) Python functions by self time, with calls per exchange (cProfile)",
    )  # fmt: skip
    parser.add_argument(
        "--route", choices=sorted(ROUTES), default="plain",
        help="plain (default) or llm-prefix: an LLM route with prefix affinity (the body peek)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="default bench/results/instructions-latest.json"
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help="default bench/results/instructions-latest.md"
    )
    parser.add_argument("--child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(args.child, args.warmup, args.calls, args.route)), flush=True)
        return 0
    stem = "instructions-latest" if args.route == "plain" else f"instructions-{args.route}"
    args.json = args.json or RESULTS_DIR / f"{stem}.json"
    args.markdown = args.markdown or RESULTS_DIR / f"{stem}.md"
    if args.exchanges < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--exchanges and --repeats must be >= 1, --warmup >= 0")
    try:
        result = run(args.exchanges, args.warmup, args.repeats, args.annotate, args.calls, args.route)
    except (InstructionsError, subprocess.CalledProcessError) as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    args.markdown.write_text(text)
    print(text)
    print(f"results: {args.json} {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
