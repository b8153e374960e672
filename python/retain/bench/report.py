"""The report of a run: a JSON document (``SCHEMA``) holding the machine, its ceilings, the
configuration and one record per cell, and its markdown form (one table per op and shape, a
pivot by T for a sweep, retain per CPU capability side by side)."""

from __future__ import annotations

import json
from typing import Any

from retain.bench.harness import NOISY_CORES
from retain.bench.registry import DIRECTIONS, REGISTRY

SCHEMA = "retain-bench/1"


def add_ceiling_fractions(records: list[dict[str, Any]], ceilings: dict[str, Any]) -> None:
    for r in records:
        if "gbps" in r and ceilings.get("copy_gbps"):
            r["pct_copy"] = 100.0 * r["gbps"] / ceilings["copy_gbps"]
        if "gflops" in r and ceilings.get("matmul_gflops"):
            r["pct_matmul"] = 100.0 * r["gflops"] / ceilings["matmul_gflops"]


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _ratio(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.3g}x" if v < 100 else f"{v:,.0f}x"


def _cell_status(r: dict[str, Any]) -> str:
    other = r.get("other_cpu")
    return f"ok, noisy ({other:.1f} other cores)" if other is not None and other > NOISY_CORES else "ok"


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown: machine facts, ceilings, then one table per op and shape."""
    m, c, cfg = report["machine"], report["ceilings"], report["config"]
    lines = [
        f"# retain bench ({report['created']})",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}"
        + (f", GPU {m['gpu']} (CUDA {m.get('cuda_runtime')})" if m.get("gpu") else ""),
        f"- CPU instruction sets: {' '.join(m.get('cpu_isa') or []) or 'baseline'}; retain's CPU kernels: "
        f"`{m.get('cpu_capability')}` build (the CPU supports up to `{m.get('cpu_capability_supported')}`)"
        + ("; `<impl>@<capability>` rows use another build" if cfg.get("cpu_capabilities") else ""),
        f"- software: Python {m['python']}, torch {m['torch']}, retain {m['retain']} ({m.get('compiler')})"
        + "".join(f", {k} {m[k]}" for k in ("numba", "numpy", "assoc-scan", "accelerated-scan") if k in m),
        f"- ceilings on {cfg['device']}: copy {c['copy_gbps']:.1f} GB/s (float32 dst.copy_(src), "
        f"{c['copy_bytes'] / 2**20:.0f} MiB moved; median over {len(c['copy_gbps_allocs'])} fresh buffers, "
        f"which ranged {min(c['copy_gbps_allocs']):.1f}-{max(c['copy_gbps_allocs']):.1f} GB/s), "
        f"matmul {c['matmul_gflops']:.1f} GFLOP/s "
        f"(float32 {c['matmul_n']}x{c['matmul_n']}{', TF32' if c.get('matmul_tf32') else ''}, best call)",
        f"- ceilings before / after the run: copy {c.get('copy_gbps_before', c['copy_gbps']):.1f} / "
        f"{c.get('copy_gbps_after', c['copy_gbps']):.1f} GB/s, matmul "
        f"{c.get('matmul_gflops_before', c['matmul_gflops']):.0f} / "
        f"{c.get('matmul_gflops_after', c['matmul_gflops']):.0f} GFLOP/s",
        f"- heap: {cfg['heap']}",
        "- other processes' CPU during the run: "
        + ("unknown" if cfg.get("other_cpu") is None else f"{cfg['other_cpu']:.2f} cores on average")
        + f"; cells where it exceeded {NOISY_CORES} cores say `noisy`"
        + (" (**the machine was busy: rerun when quiet**)" if (cfg.get("other_cpu") or 0) > NOISY_CORES else ""),
        f"- timing: median of up to {cfg['reps']} calls after one warm-up call (excluded, shown as "
        f"warm-up), at most ~{cfg['budget_s']:g} s per cell (at least 3 calls); `*` = one call only "
        f"(its first call took over {cfg['max_call_s']:g} s)",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["results"]:
        groups.setdefault((r["op"], r["shape"]), []).append(r)
    for (op, shape), recs in groups.items():
        case = REGISTRY.get(op)
        base = case.baseline if case else "eager"
        ref = case.reference if case else "retain"
        # arithmetic-bound ops (a flops model, no bytes model) report GFLOP/s against the matmul rate
        flops = bool(case and case.flops_model and not case.bytes_model)
        rate, pct, rate_key, pct_key = (("GFLOP/s", "% matmul", "gflops", "pct_matmul") if flops
                                        else ("GB/s", "% copy", "gbps", "pct_copy"))
        lines += ["", f"## {op}: {shape}, {recs[0]['device']}", "",
                  f"| direction | impl | median ms | IQR ms | reps | warm-up s | speed-up vs {base} | "
                  f"time / {ref} | {rate} | {pct} | status |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        for r in recs:
            if r["status"] != "ok":
                lines.append(f"| {r['direction']} | {r['impl']} | | | | | | | | | {r['status']} |")
                continue
            star = "*" if r.get("single_call") else ""
            iqr = f"{r['q1_ms']:.3g}-{r['q3_ms']:.3g}"
            lines.append(
                f"| {r['direction']} | {r['impl']} | {r['median_ms']:.3f}{star} | {iqr} | {r['reps']} | "
                f"{r['warmup_s']:.2f} | {_ratio(r.get('speedup_vs_' + base))} | "
                f"{_ratio(r.get('time_vs_' + ref))} | {_fmt(r.get(rate_key), '.1f')} | "
                f"{_fmt(r.get(pct_key), '.0f')} | {_cell_status(r)} |")
    notes = {}
    for r in report["results"]:
        notes.setdefault(r["op"], {}).setdefault(r["impl"], r["note"])
    for op, impl_notes in notes.items():
        case = REGISTRY.get(op)
        lines += ["", f"{op} implementations:", ""]
        lines += [f"- `{k}`: {v}" for k, v in impl_notes.items()]
        if case and case.model_note:
            lines.append(f"- {case.model_note}")
    lines += _sweep_summary(report["results"])
    lines += _capability_summary(report)
    return "\n".join(lines) + "\n"


def _capability_summary(report: dict[str, Any]) -> list[str]:
    """Median ms of each retain implementation per CPU capability, side by side."""
    active = report["machine"].get("cpu_capability")
    caps = [active] + [c for c in report["config"].get("cpu_capabilities") or [] if c != active]
    if len(caps) < 2:
        return []
    cells: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for r in report["results"]:
        base, _, cap = r["impl"].partition("@")
        if base.startswith("retain") and r["status"] == "ok":
            cells.setdefault((r["op"], r["shape"], r["direction"], base), {})[cap or active] = r["median_ms"]
    lines = ["", "## retain per CPU capability (median ms; in brackets: speed as a fraction of the "
                 f"`{active}` build)", "",
             "| op | shape | direction | impl | " + " | ".join(f"`{c}`" for c in caps) + " |",
             "|---|---|---|---|" + "--:|" * len(caps)]
    for (op, shape, direction, impl), by_cap in cells.items():
        best = by_cap.get(active)
        row = [f"{by_cap[c]:.3f}" + (f" ({best / by_cap[c]:.2f})" if best and c != active else "")
               if c in by_cap else "" for c in caps]
        lines.append(f"| {op} | {shape} | {direction} | {impl} | " + " | ".join(row) + " |")
    return lines


def _sweep_summary(results: list[dict[str, Any]]) -> list[str]:
    """A pivot of median ms by T when the report holds several T of one op."""
    lines: list[str] = []
    ops = sorted({r["op"] for r in results})
    for op in ops:
        recs = [r for r in results if r["op"] == op and "T" in r["params"]]
        ts = sorted({r["params"]["T"] for r in recs})
        if len(ts) < 2:
            continue
        lines += ["", f"## {op}: median ms by T", "", "| direction | impl | " + " | ".join(f"T={t}" for t in ts)
                  + " |", "|---|---|" + "--:|" * len(ts)]
        for direction in DIRECTIONS:
            impls = list(dict.fromkeys(r["impl"] for r in recs if r["direction"] == direction))
            for impl in impls:
                cells = []
                for t in ts:
                    r = next((r for r in recs if r["direction"] == direction and r["impl"] == impl
                              and r["params"]["T"] == t), None)
                    if r is None or r["status"] != "ok":
                        cells.append("" if r is None else r["status"].split(":")[0])
                    else:
                        cells.append(f"{r['median_ms']:.3g}" + ("*" if r.get("single_call") else ""))
                lines.append(f"| {direction} | {impl} | " + " | ".join(cells) + " |")
    return lines


def write_report(report: dict[str, Any], markdown: str | None = None, json_path: str | None = None) -> str:
    """The markdown of ``report``, also written to ``markdown`` and the JSON to ``json_path`` (when
    given)."""
    text = format_report(report)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return text
