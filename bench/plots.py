"""PNG plots of a scale benchmark result (``bench.scale``): added latency vs pods, and latency CDFs.

Usage: python -m bench.plots [bench/results/scale-latest.json] [--out DIR]

Theory of operation
-------------------
Pure rendering of the JSON that ``bench.scale`` wrote, with matplotlib's Agg backend (no
display): ``scale-added-latency.png`` draws the router's added p50/p90/p99 (median over rounds,
minus direct of the same round) against the number of pods in its routing state on a log x axis,
solid without churn and dashed with churn, with nginx's and haproxy's added p90 as horizontal
references and the router issue's p90 target as a dotted line. ``scale-latency-cdf.png`` draws
the latency CDF of every target (each quantile the median over rounds) with a log x axis and a
y axis stretched toward the tail (``-log10(1 - q)``), so p50 / p90 / p99 / p99.9 are evenly
spaced and the tail, where proxies differ, is readable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

ADDED_PNG = "scale-added-latency.png"
CDF_PNG = "scale-latency-cdf.png"
PERCENTILE_STYLE = {"p50": "tab:blue", "p90": "tab:orange", "p99": "tab:red"}
REFERENCE_STYLE = {"nginx": "tab:green", "haproxy": "tab:purple"}
ROUTER_COLOURS = ("tab:blue", "tab:orange", "tab:red", "tab:brown", "tab:pink", "tab:cyan")


def _subtitle(results: dict[str, Any]) -> str:
    env, opts = results["environment"], results["options"]
    return (
        f"{opts['rate']:g} req/s open loop, {opts['repeats']} interleaved rounds of {opts['duration']:g} s, "
        f"churn {opts['churn']:g} changes/s · {env['cpus']} vCPU, commit {env['commit']}"
    )


def plot_added_vs_pods(results: dict[str, Any], path: Path) -> Path:
    summary = results["summary"]
    sizes = sorted(int(n) for n in summary["sizes"])
    rows = [summary["sizes"][str(n)] for n in sizes]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for key, colour in PERCENTILE_STYLE.items():
        ax.plot(sizes, [r["added_us"][key] for r in rows], marker="o", color=colour, label=f"router {key}")
        if all("churn_added_us" in r for r in rows):
            ax.plot(
                sizes,
                [r["churn_added_us"][key] for r in rows],
                marker="s",
                linestyle="--",
                color=colour,
                alpha=0.8,
                label=f"router {key}, with churn",
            )
    for ref, colour in REFERENCE_STYLE.items():
        entry = summary["targets"].get(ref)
        if entry:
            ax.axhline(entry["added_us"]["p90"], color=colour, linewidth=1.2, label=f"{ref} p90 (no state)")
    from bench.e2e import TARGET_ADDED_P90_US

    ax.axhline(
        TARGET_ADDED_P90_US, color="grey", linestyle=":", label=f"target p90 {TARGET_ADDED_P90_US:g} us"
    )
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{n:,}" for n in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("pods in the router's routing state (log scale)")
    plotted = [y for line in ax.get_lines() for y in line.get_ydata()]
    if plotted and max(plotted) > 5000:
        # A noisy tail (hundreds of ms) would flatten p50/p90 into the axis: linear up to 1 ms,
        # logarithmic above (and below zero: an added percentile can be negative).
        ax.set_yscale("symlog", linthresh=1000, linscale=1.5)
        top = max(plotted)
        ticks = [t for t in (-1000, -500, 0, 250, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000,
                             200_000, 500_000, 1_000_000, 2_000_000, 5_000_000) if t <= top * 1.5]  # fmt: skip
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:,.0f}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(min(0.0, *plotted) * 1.2, top * 2)
        ax.set_ylabel("added latency vs direct (us; linear to 1 ms, log above)")
    else:
        ax.set_ylim(bottom=min(0.0, *plotted) if plotted else 0.0)
        ax.set_ylabel("added latency vs direct (us)")
    ratio = summary.get("p90_ratio")
    title = "Router added latency vs pods in the state"
    if ratio:
        title += f" (p90 {ratio['sizes'][1]:,}/{ratio['sizes'][0]:,} = {ratio['added']:.2f})"
    ax.set_title(title + "\n" + _subtitle(results), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _tail(q: float) -> float:
    """The y position of quantile q (percent): -log10(1 - q), so 90 -> 1, 99 -> 2, 99.9 -> 3."""
    return -math.log10(max(1e-5, 1 - q / 100))


def plot_cdfs(results: dict[str, Any], path: Path) -> Path:
    targets = results["summary"]["targets"]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    sizes = list(dict.fromkeys(n.removesuffix("+churn") for n in targets if n.startswith("router@")))
    for name, entry in targets.items():
        points = [(us, q) for q, us in entry["cdf_us"] if q < 100 and us > 0 and not math.isnan(us)]
        if not points:
            continue
        churned = name.endswith("+churn")
        if name.startswith("router@"):
            colour = ROUTER_COLOURS[sizes.index(name.removesuffix("+churn")) % len(ROUTER_COLOURS)]
        else:
            colour = {"direct": "black", "direct+churn": "black", **REFERENCE_STYLE}.get(name, "grey")
        ax.plot(
            [p[0] for p in points],
            [_tail(p[1]) for p in points],
            color=colour,
            linestyle="--" if churned else "-",
            linewidth=1.6 if not churned else 1.2,
            label=name,
        )
    ticks = [50, 90, 99, 99.9]
    ax.yaxis.set_major_locator(FixedLocator([_tail(q) for q in ticks]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"p{100 - 10**-y * 100:g}"))
    ax.set_ylim(0, _tail(99.95))
    ax.set_xscale("log")
    ax.set_xlabel("latency, scheduled send to last response byte (us, log scale)")
    ax.set_ylabel("quantile (tail-stretched)")
    ax.set_title("Latency CDFs: direct, router at each state size (dashed: with churn), references\n"
                 + _subtitle(results), fontsize=10)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_added_vs_pods(results, out_dir / ADDED_PNG), plot_cdfs(results, out_dir / CDF_PNG)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.plots", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("json", nargs="?", default="bench/results/scale-latest.json", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the JSON's)")
    args = parser.parse_args(argv)
    results = json.loads(args.json.read_text())
    for path in write_plots(results, args.out or args.json.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
