"""Plot a ``retain bench --json`` report: median time against T for each implementation, one panel
per direction (fwd, fwd+bwd), log-log, error bars from the quartiles. Cells that were not ok are
left out; one-call cells (``*`` in the table) are drawn hollow.

    python bench/plot.py bench/results/linear_recurrence_cpu_sweep.json -o bench/results/linear_recurrence_cpu.png

A report from ``retain bench --sweep-T ...`` gives one point per T; a plain report gives one.
"""

from __future__ import annotations

import argparse
import json
import sys

DIRECTIONS = ("fwd", "fwd+bwd")
STYLE = {  # stable colours per implementation across plots; others get matplotlib's cycle
    "retain": ("tab:red", "o"), "eager": ("tab:gray", "s"), "fla-naive": ("tab:brown", "s"),
    "compile": ("tab:blue", "^"), "numba": ("tab:green", "D"), "assoc-scan": ("tab:purple", "v"),
    "accelerated-scan": ("tab:orange", "P"),
}


def plot_report(report: dict, out: str, op: str | None = None, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r["status"] == "ok" and "T" in r["params"]]
    ops = sorted({r["op"] for r in results})
    op = op or (ops[0] if ops else None)
    if op is None:
        raise SystemExit("plot.py: no ok results with a T parameter in the report")
    results = [r for r in results if r["op"] == op]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, direction in zip(axes, DIRECTIONS):
        recs = [r for r in results if r["direction"] == direction]
        for impl in dict.fromkeys(r["impl"] for r in recs):
            pts = sorted((r["params"]["T"], r) for r in recs if r["impl"] == impl)
            ts = [t for t, _ in pts]
            med = [r["median_ms"] for _, r in pts]
            err = [[max(0.0, r["median_ms"] - r.get("q1_ms", r["median_ms"])) for _, r in pts],
                   [max(0.0, r.get("q3_ms", r["median_ms"]) - r["median_ms"]) for _, r in pts]]
            colour, marker = STYLE.get(impl, (None, "o"))
            line = ax.errorbar(ts, med, yerr=err, label=impl, color=colour, marker=marker, capsize=2, lw=1.4)
            single = [(t, r["median_ms"]) for t, r in pts if r.get("single_call")]
            if single:
                ax.scatter(*zip(*single), s=80, facecolors="white", edgecolors=line[0].get_color(), zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (sequence length)")
        ax.set_title(direction)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time per call (ms)")
    # one legend for both panels: an implementation may run in only one direction (numba: fwd)
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[1].legend(handles.values(), handles.keys(), loc="upper left", fontsize=8)
    shape = {k: v for k, v in results[0]["params"].items() if k not in ("T", "compile_chunk")} if results else {}
    m, cfg = report.get("machine", {}), report.get("config", {})
    fig.suptitle(title or (
        f"{op} on {results[0]['device'] if results else '?'}: "
        + " ".join(f"{k}={v}" for k, v in shape.items())
        + f"  ({m.get('gpu') or m.get('cpu', '?')}, {m.get('torch_threads', '?')} threads, "
        f"{cfg.get('heap_mode', '?')} heap)"), fontsize=10)
    fig.text(0.01, 0.01, "error bars: quartiles; hollow marker: one call only (first call over --max-call-s); "
             "missing points: not run (skipped after exceeding --max-call-s, or not ok)", fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="JSON written by `retain bench --json`")
    parser.add_argument("-o", "--out", required=True, help="image file to write (.png, .svg, ...)")
    parser.add_argument("--op", help="op to plot (default: the first in the report)")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    plot_report(report, args.out, op=args.op, title=args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
