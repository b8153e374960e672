"""The cached readout against the number of cached segments: forward+backward time per token of
retain's fused kernel (gated, sparse top_k=2, residual) and of the materialising reference (eager
and under torch.compile) for NS = 2 ... 32 segments of L = 256 tokens, and the peak memory each
adds over its inputs (fresh process per measurement; times with the warm heap of `retain bench`,
memory with the peak RSS reset through /proc/self/clear_refs and malloc's mmap threshold fixed so
freed buffers leave the process).

    python bench/cache/readout.py --md bench/results/cache_readout_cpu.md --png bench/results/cache_readout_cpu.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

IMPLS = {  # name: (function, mode, top_k)
    "retain gated": ("retain", "gated", None),
    "retain sparse top_k=2": ("retain", "sparse", 2),
    "retain residual": ("retain", "residual", None),
    "eager gated": ("eager", "gated", None),
    "compile gated": ("compile", "gated", None),
    "eager sparse top_k=2": ("eager", "sparse", 2),
}


def _child(impl: str, NS: int, L: int, reps: int, memory: bool) -> dict:
    import torch

    from retain.bench.cache import _inputs
    from retain.ops import cached_readout
    from retain.ops.cache.reference import cached_readout_ref

    torch.set_num_threads(2)
    if not memory:  # timing as retain bench does: freed memory kept for reuse (no page faults per call)
        from retain.bench.machine import warm_heap

        warm_heap()
    kind, mode, top_k = IMPLS[impl]
    p = {"B": 2, "T": NS * L, "H": 4, "K": 64, "V": 64, "L": L, "dtype": "float32"}
    d = _inputs(p, "cpu")
    grad = d.pop("grad_y")
    names = ("q", "u", "states", "seg_keys", "o_online", "online_keys")
    xs = [d[n].requires_grad_() for n in names]
    kw = dict(segment_len=L, mode=mode, top_k=top_k)
    if kind == "retain":
        def f(q, u, S, c, o, ok):
            return cached_readout(q, u, S, c, o, online_keys=ok, **kw)
    else:
        def f(q, u, S, c, o, ok):
            return cached_readout_ref(q, u, S, c, o, ok, **kw)
        if kind == "compile":
            f = torch.compile(f, fullgraph=True)
    wrt = [x for n, x in zip(names, xs) if mode != "residual" or n in ("q", "states", "o_online")]

    def step():
        y = f(*xs)
        return torch.autograd.grad(y, wrt, grad)

    step()  # warm-up (compile)
    if memory:
        with open("/proc/self/status") as s:
            rss = next(int(line.split()[1]) for line in s if line.startswith("VmRSS"))
        with open("/proc/self/clear_refs", "w") as c:
            c.write("5")  # reset the peak RSS
        grads = step()  # held until the peak is read: the gradients are part of the call's memory
        with open("/proc/self/status") as s:
            hwm = next(int(line.split()[1]) for line in s if line.startswith("VmHWM"))
        assert len(grads) == len(wrt)
        return {"peak_extra_mib": (hwm - rss) / 1024}
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps}


def _run(impl: str, NS: int, L: int, reps: int, memory: bool) -> dict:
    # memory: big blocks mapped and unmapped per call, so the peak RSS is the call's; timing: warm heap
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if memory else dict(os.environ)
    cmd = [sys.executable, __file__, "--child", impl, str(NS), str(L), str(reps), str(int(memory))]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        return f"{model}, AVX-512 {'yes' if 'avx512f' in info else 'no'}"
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--ns", default="2,4,8,16,32")
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--impl", action="append", help="implementations to run (default: all)")
    ap.add_argument("--md"), ap.add_argument("--png"), ap.add_argument("--json")
    a = ap.parse_args()
    if a.child:
        impl, NS, L, reps, memory = a.child
        print(json.dumps(_child(impl, int(NS), int(L), int(reps), bool(int(memory)))))
        return
    import torch

    impls = a.impl or list(IMPLS)
    rows = []
    for NS in (int(n) for n in a.ns.split(",")):
        for impl in impls:
            if impl.startswith(("eager", "compile")) and NS > 32:
                continue
            t = _run(impl, NS, a.L, a.reps, memory=False)
            m = _run(impl, NS, a.L, 1, memory=True) if NS == 16 else {}
            rows.append({"impl": impl, "NS": NS, "T": NS * a.L, **t, **m})
            us = t.get("median_s", float("nan")) * 1e6 / (2 * NS * a.L)
            print(f"NS={NS:3d} {impl:24s} {us:9.3f} us/token  {m.get('peak_extra_mib', '')}", flush=True)
    lines = ["# Cached readout: forward+backward time per token against the number of cached segments", "",
             f"Command: `python bench/cache/readout.py --md {a.md} --png {a.png}`  ",
             f"CPU: {_cpu()}, 2 threads; torch {torch.__version__}; float32, B=2, H=4, K=V=64, L={a.L}, "
             f"T = NS x L; median of {a.reps} calls (after a warm-up call) in a fresh process each, warm heap "
             "(glibc keeps freed memory, as `retain bench`).", "",
             "| NS | T | " + " | ".join(impls) + " |", "|--:|--:|" + "--:|" * len(impls)]
    for NS in sorted({r["NS"] for r in rows}):
        cells = []
        for impl in impls:
            r = next((r for r in rows if r["NS"] == NS and r["impl"] == impl), None)
            cells.append("" if r is None or "median_s" not in r else f"{r['median_s'] * 1e3:.1f} ms "
                         f"({r['median_s'] * 1e6 / (2 * r['T']):.2f} us/token)")
        lines.append(f"| {NS} | {NS * a.L} | " + " | ".join(cells) + " |")
    mem = [r for r in rows if "peak_extra_mib" in r]
    if mem:
        lines += ["", "Peak memory added by one forward+backward over its inputs (NS = 16, T = 4096; peak RSS):", "",
                  "| implementation | peak extra MiB |", "|---|--:|"]
        lines += [f"| {r['impl']} | {r['peak_extra_mib']:.1f} |" for r in mem]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": _cpu(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl in impls:
            pts = sorted((r["NS"], r["median_s"] * 1e6 / (2 * r["T"])) for r in rows
                         if r["impl"] == impl and "median_s" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached segments NS (L = 256, T = NS x L)")
        ax.set_ylabel("forward+backward time per token (us)")
        ax.set_title(f"cached_readout, float32, B=2 H=4 K=V=64\n{_cpu()}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)


if __name__ == "__main__":
    main()
