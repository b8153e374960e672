"""Per-sample consolidation throughput (samples/s): retain.cl.EWC.consolidate (an MLP's sums
from its layers' inputs and output gradients, other models' per-sample gradients by vmap ∘ grad in
chunks summed by the fisher kernels; c* from a second pass of forward-mode directional derivatives)
against the rank-1 Fisher paper's form — a loop over batch-1 samples, one backward each, the
gradient flattened to float64 and accumulated, and a second loop for c* — and against the same
batch-1 loop kept in float32 with retain's fisher_accumulate_ for the sums. The same model, data
and mode ('both': diagonal, μ and c*) for all; results are checked against each other.

    python bench/fisher/consolidation.py [--model cnn|mlp] [--samples 512] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

import retain
from retain.bench.machine import machine_facts


def make_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "cnn":  # MNIST-sized: 28×28×1 → 10 classes, 0.08M parameters (per-sample gradients by vmap)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
                                   torch.nn.ReLU(), torch.nn.MaxPool2d(4), torch.nn.Flatten(),
                                   torch.nn.Linear(32 * 6 * 6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    # 0.27M parameters, all in nn.Linear layers (EWC's sums without per-sample gradients)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


def make_data(n: int, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def batch1_loop(model, data, dtype=torch.float64, accumulate=None):
    """The paper's form: per sample a backward, the flattened gradient accumulated (two passes)."""
    params = [p for p in model.parameters()]
    samples = [(x[i:i + 1], y[i:i + 1]) for x, y in data for i in range(x.shape[0])]

    def grad_of(x, y):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return [p.grad for p in params]

    n = len(samples)
    if accumulate is None:  # float64 flattened vectors, as the paper's code
        mu = diag = 0
        for x, y in samples:
            g = torch.cat([t.reshape(-1) for t in grad_of(x, y)]).to(dtype)
            mu, diag = mu + g, diag + g * g
        mu, diag = mu / n, diag / n
        num = sum(float(torch.cat([t.reshape(-1) for t in grad_of(x, y)]).to(dtype) @ mu) ** 2 for x, y in samples)
        return diag, mu, num / n / float(mu @ mu) ** 2
    mu = [torch.zeros_like(p) for p in params]
    diag = [torch.zeros_like(p) for p in params]
    for x, y in samples:  # float32, the sums by retain's kernels
        accumulate(mu, diag, grad_of(x, y))
    for t in mu + diag:
        t.div_(n)
    num = sum(float(retain.ops.rank1_coefficient(mu, grad_of(x, y))) for x, y in samples)
    norm4 = float(retain.ops.rank1_coefficient(mu, mu))
    return torch.cat([t.reshape(-1) for t in diag]), torch.cat([t.reshape(-1) for t in mu]), num / n / norm4


def retain_ewc(model, data):
    ewc = retain.cl.EWC(model, mode="both")
    ewc.consolidate(data, F.cross_entropy)
    a = ewc.anchors[0]
    return torch.cat([t.reshape(-1) for t in a.diag]), torch.cat([t.reshape(-1) for t in a.rank1[0][0]]), a.rank1[0][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, data = make_model(args.model), make_data(args.samples)
    n_params = sum(p.numel() for p in model.parameters())
    impls = {
        "retain.cl.EWC": lambda: retain_ewc(model, data),
        "batch-1 loop, float64 vectors (rank-1 paper)": lambda: batch1_loop(model, data),
        "batch-1 loop, float32 + retain.ops sums": lambda: batch1_loop(
            model, data, accumulate=lambda mu, sq, g: retain.ops.rank1_accumulate_(mu, sq, g)),
    }
    rows, results = [], {}
    for name, fn in impls.items():
        fn()  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            results[name] = fn()
            times.append(time.perf_counter() - t0)
        rows.append((name, sorted(times)[1]))
    ref = results[next(iter(impls))]
    for name, (diag, mu, c) in results.items():  # every form computes the same Fisher
        torch.testing.assert_close(diag.double(), ref[0].double(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(mu.double(), ref[1].double(), rtol=1e-4, atol=1e-8)
        assert abs(c - ref[2]) <= 1e-4 * abs(ref[2]), (name, c, ref[2])
    base = rows[1][1]
    facts = machine_facts("cpu")
    lines = [f"# EWC consolidation throughput ({time.strftime('%Y-%m-%d')})", "",
             f"- machine: {facts['cpu']}, {facts['logical_cpus']} logical CPUs, torch threads {facts['torch_threads']}; "
             f"Python {platform.python_version()}, torch {torch.__version__}, CPU kernels `{facts['cpu_capability']}`",
             f"- model: {args.model}, {n_params / 1e6:.2f}M parameters; {args.samples} samples in batches of 64; "
             "mode 'both' (diagonal, μ, c*: two passes over the samples); median of 3 runs after a warm-up",
             f"- command: `python bench/fisher/consolidation.py --model {args.model} --samples {args.samples}`", "",
             "| implementation | seconds | samples/s | vs the batch-1 loop |", "|---|--:|--:|--:|"]
    for name, t in rows:
        lines.append(f"| {name} | {t:.3f} | {args.samples / t:,.0f} | {base / t:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
