"""Peak memory of forward+backward for the gated delta rule: retain's checkpointed kernel vs
autograd through the loop references. Each implementation runs in a fresh process; the figure
is the growth of peak RSS over the RSS after the inputs were made.

    python bench/scan/peak_memory.py [--T 8192] [--out bench/results/gated_delta_rule_peak_memory.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, torch
impl, B, T, H, K, V = sys.argv[1], *map(int, sys.argv[2:7])
torch.manual_seed(0)
q = torch.randn(B, T, H, K, requires_grad=True)
k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
v = torch.randn(B, T, H, V, requires_grad=True)
g = (-0.1 * torch.rand(B, T, H)).requires_grad_()
beta = torch.rand(B, T, H, requires_grad=True)
if impl == "retain":
    from retain.ops import gated_delta_rule as fn
    run = lambda: fn(q, k, v, g, beta)[0]
elif impl == "eager":
    from retain.ops.scan.reference import gated_delta_rule_ref as fn
    run = lambda: fn(q, k, v, g, beta)[0]
else:
    from retain.bench.scan import load_fla_naive
    naive = load_fla_naive()
    run = lambda: naive(q, k, v, beta, g)[0]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
o = run()
o.backward(torch.ones_like(o))
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"impl": impl, "peak_mib": (peak - base) / 1024, "seconds": dt}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--impls", default="retain,eager,fla-naive")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for impl in args.impls.split(","):
        cmd = [sys.executable, "-c", CHILD, impl, *map(str, (args.B, args.T, args.H, args.K, args.V))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"impl": impl, "error": proc.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    retain_peak = next((r["peak_mib"] for r in rows if r.get("impl") == "retain" and "peak_mib" in r), None)
    lines = [
        f"# gated delta rule forward+backward peak memory ({time.strftime('%Y-%m-%d')})",
        "",
        f"- command: `python bench/scan/peak_memory.py --T {args.T}`",
        f"- shape: B={args.B} T={args.T} H={args.H} K={args.K} V={args.V} float32, CPU; growth of peak RSS over "
        "the RSS after the inputs were made, one fresh process per implementation",
        "",
        "| impl | peak MiB | x retain | fwd+bwd s |",
        "|---|--:|--:|--:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error']} | | |")
            continue
        ratio = r["peak_mib"] / retain_peak if retain_peak else float("nan")
        lines.append(f"| {r['impl']} | {r['peak_mib']:.0f} | {ratio:.1f}x | {r['seconds']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
