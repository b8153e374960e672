"""``retain demo``: the training stream, its numbers, the table and the plot."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from retain.cl.metrics import backward_transfer, forgetting, min_acc
from retain.demo.data import make_domains
from retain.demo.methods import METHODS, Trainer, lm_loss
from retain.demo.model import TinyLM


@dataclass(frozen=True)
class Config:
    """Every setting of a run (``--quick`` and the default are two of these)."""

    steps: int = 160               # optimizer steps per domain
    batch_size: int = 16           # task windows per step (replay adds as many)
    seq_len: int = 64              # bytes per window
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    mode: str = "gated_delta"      # MemoryLayer mode
    lr: float = 2e-3
    clip: float = 1.0
    chars: int = 200_000           # characters per domain
    n_eval: int = 32               # held-out windows per domain
    eval_every: int = 20           # steps between evaluations
    replay_capacity: int = 256     # windows the reservoir keeps
    fisher_samples: int = 32       # windows EWC's Fisher is estimated on, per domain
    ewc_lam: float = 1000.0
    gere_max_w: float = 100.0      # cap on GeRe's dynamic TM weight
    seed: int = 0


QUICK = Config(steps=40, d_model=64, num_heads=2, chars=40_000, n_eval=16, eval_every=10, replay_capacity=128,
               fisher_samples=16)


def _progress(total: int, desc: str, enabled: bool):
    """tqdm's bar when tqdm is installed (the ``demo`` extra) and wanted; None otherwise."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(model, evals: list[torch.Tensor]) -> list[float]:
    """Mean next-byte loss (nats) of ``model`` on every domain's held-out windows."""
    was = model.training
    model.eval()
    out = [float(lm_loss(model(w[:, :-1]), w[:, 1:])) for w in evals]
    model.train(was)
    return out


def run_method(name: str, cfg: Config, domains, device: torch.device, progress: bool = True) -> dict:
    """Train a fresh model (the same initial weights for every method) on the domains in order."""
    spec = METHODS[name]
    torch.manual_seed(cfg.seed)
    model = TinyLM(d_model=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                   head_dim=cfg.head_dim, mode=cfg.mode).to(device)
    trainer = Trainer(spec, model, cfg, device)
    evals = [d.eval.to(device) for d in domains]
    steps, curve, task_of_step, R = [0], [evaluate(model, evals)], [0], []
    train_seconds, step = 0.0, 0
    bar = _progress(cfg.steps * len(domains), f"{name:12s}", progress)
    for i, domain in enumerate(domains):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)
        for batch in domain.batches(cfg.steps, cfg.batch_size, cfg.seq_len, gen):
            t0 = time.perf_counter()
            trainer.step(batch.to(device), i)
            train_seconds += time.perf_counter() - t0
            step += 1
            if bar is not None:
                bar.update()
            if step % cfg.eval_every == 0 or step == cfg.steps * (i + 1):
                steps.append(step)
                curve.append(evaluate(model, evals))
                task_of_step.append(i)
        R.append(curve[-1])
        if i + 1 < len(domains):
            t0 = time.perf_counter()
            fisher_windows = next(domain.batches(1, cfg.fisher_samples, cfg.seq_len, gen)).to(device)
            trainer.end_domain(fisher_windows)
            train_seconds += time.perf_counter() - t0
    if bar is not None:
        bar.close()
    # The stability gap: each earlier domain's worst loss at any evaluation after it was learned
    # (min-ACC over negated losses), averaged over the earlier domains, at the end of the stream.
    worst = -float(min_acc([[-v for v in row] for row in curve], task_of_step)[-1]) if len(domains) > 1 else math.nan
    return dict(method=name, label=spec.label, final=dict(zip([d.name for d in domains], R[-1])),
                R=R, forgetting=forgetting(R, lower_is_better=True), bwt=backward_transfer(R, lower_is_better=True),
                worst_case=worst, seconds=train_seconds, curve=dict(step=steps, loss=curve, task=task_of_step))


def table(results: list[dict], names: list[str]) -> str:
    """The results as a Markdown table."""
    head = ["method", *names, "mean", "forgetting", "worst earlier", "time s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
    for r in results:
        final = [r["final"][n] for n in names]
        cells = [r["label"], *(f"{v:.3f}" for v in final), f"{sum(final) / len(final):.3f}",
                 f"{r['forgetting']:.3f}", f"{r['worst_case']:.3f}", f"{r['seconds']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: list[dict], names: list[str], cfg: Config, path: str) -> None:
    """Every domain's held-out loss over the training steps, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), sharey=True)
    for j, (ax, name) in enumerate(zip(axes, names)):
        for r in results:
            ax.plot(r["curve"]["step"], [row[j] for row in r["curve"]["loss"]], label=r["label"], lw=1.4)
        for b in range(1, len(names)):
            ax.axvline(b * cfg.steps, color="grey", ls="--", lw=0.8)
        ax.set_title(f"{name} (learned {j + 1}{'st' if j == 0 else 'nd' if j == 1 else 'rd'})")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats/byte)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("retain demo: " + " -> ".join(names) + f" ({cfg.steps} steps each, dashed: domain changes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (under a minute on "
                        "2 CPU cores)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per domain")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--plot", default="retain-demo.png", help="where the PNG goes ('' for none)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="the numbers as JSON: to PATH (and the table as usual), or alone to stdout without a path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(args) -> int:
    cfg = QUICK if args.quick else Config()
    if args.steps is not None:
        if args.steps < 1:
            print(f"retain demo: --steps must be >= 1, got {args.steps}", file=sys.stderr)
            return 2
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        print(f"retain demo: --methods must be a comma-separated list of {', '.join(METHODS)}, got {args.methods!r}",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("retain demo: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    log = sys.stderr if args.json == "-" else sys.stdout
    t0 = time.perf_counter()
    domains = make_domains(chars=cfg.chars, seq_len=cfg.seq_len, n_eval=cfg.n_eval, seed=cfg.seed)
    print(f"retain demo: {' -> '.join(d.name for d in domains)}, {cfg.steps} steps each, batch {cfg.batch_size} x "
          f"{cfg.seq_len} bytes, a {cfg.num_layers}-layer {cfg.mode} MemoryLayer model (d={cfg.d_model}) on "
          f"{device}, torch threads {torch.get_num_threads()}", file=log)
    results = [run_method(m, cfg, domains, device, progress=not args.no_progress) for m in names]
    total = time.perf_counter() - t0
    names_d = [d.name for d in domains]
    if args.json is not None:
        numbers = dict(config=asdict(cfg), device=str(device), domains=names_d, seconds=total, methods=results)
        if args.json == "-":
            json.dump(numbers, sys.stdout, indent=1)
            print()
        else:
            with open(args.json, "w") as fh:
                json.dump(numbers, fh, indent=1)
    if args.json != "-":
        print(f"\nheld-out loss after the stream (nats/byte; a uniform guess: {math.log(256):.2f}); forgetting: mean "
              "rise of an earlier domain's loss from its best; worst earlier: mean over earlier domains of each one's "
              "highest loss after it was learned (the stability gap)\n")
        print(table(results, names_d))
    if args.plot:
        try:
            plot(results, names_d, cfg, args.plot)
        except ImportError:
            print("retain demo: no plot (matplotlib is not installed: pip install 'retain[demo]')", file=log)
        else:
            print(f"plot: {os.path.abspath(args.plot)}", file=log)
    print(f"total {total:.0f} s", file=log)
    return 0
