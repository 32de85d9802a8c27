"""Summarise a benchmark JSON file: medians per group and the largest/smallest-scale ratio.

Usage: python -m bench.report [bench/results/latest.json | bench/results/scale-latest.json]
Prints a markdown table; flatness is judged on medians of runs made side by side in one session.
A ``bench.scale`` result (``"kind": "scale"``) is rendered as that benchmark's markdown report.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def main(path: str = "bench/results/latest.json") -> int:
    data = json.loads(Path(path).read_text())
    if data.get("kind") == "scale":
        from bench.scale import render_markdown

        print(render_markdown(data))
        return 0
    groups: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    for bench in data["benchmarks"]:
        match = re.search(r"\[(\d+)\]$", bench["name"])
        scale = int(match.group(1)) if match else 0
        groups[bench["group"] or bench["name"]].append((scale, bench["name"], bench["stats"]["median"]))
    print("| group | benchmark | median (us) |\n|---|---|---|")
    for group, rows in sorted(groups.items()):
        rows.sort()
        for _, name, median in rows:
            print(f"| {group} | {name} | {median * 1e6:.3f} |")
    print()
    for group, rows in sorted(groups.items()):
        scaled = [r for r in rows if r[0]]
        if len(scaled) > 1:
            ratio = scaled[-1][2] / scaled[0][2]
            print(f"{group}: {scaled[-1][0]}/{scaled[0][0]} median ratio = {ratio:.2f}")
    for bench in data["benchmarks"]:
        if bench.get("extra_info"):
            print(f"{bench['name']}: {bench['extra_info']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
