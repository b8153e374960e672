"""Multi-query associative recall (MQAR, as in Zoology / "Based") on CPU: does memory caching
(``retain.nn.CachedMemory(memory='delta', mode='gated')``) recall more key-value pairs than the
same delta-rule memory without caching (``mode=None``) when the pairs exceed what one per-head
``K x V`` memory holds?

A sequence lists N key-value pairs ``k_1 v_1 ... k_N v_N`` (keys distinct, drawn from a key
vocabulary; values from a disjoint value vocabulary), then queries every key once in a random
order, each followed by its value: ``k_p(1) v_p(1) ... k_p(N) v_p(N)``, T = 4N tokens. The loss
(cross-entropy over the whole vocabulary) and the accuracy are taken only at the query keys'
positions, whose target is the paired value. With ``segment_len`` L the pairs fill 2N / L segments,
each cached by the caching arm.

Both arms are the same model: token embedding, ``--layers`` blocks of [pre-norm, causal short
convolution over T (width 2, dense over channels: a token shift, the role of Zoology's / Based's
short conv — a pair's key and value meet at the value token, where the memory writes them; a
depthwise one learned far slower here), CachedMemory, residual; pre-norm MLP (``--mlp`` x d,
GELU), residual], final RMS norm, linear head (applied at the query positions only). The caching arm's router projection u (``D -> H K`` per layer) is its only extra parameter;
every shared parameter starts from the same values (copied), both arms see the same training
batches (fresh sequences each step from one seeded generator) and the same held-out sequences
(another generator), with the same optimiser and schedule.

Defaults (chosen on both arms alike, seed 0; lr 1e-3 / 3e-3 / 1e-2 tried for both, 3e-3 best for
both): N = 32 pairs, T = 128, L = 16 (4 segments of pairs, 8 in all), 1 layer, d = 64, 2 heads of
K = V = 8 (one head's memory holds about 8 associations, the two about 16 < 32), 64 keys + 64
values, batch 32, AdamW lr 3e-3 (5% warm-up, cosine to 10%), weight decay 0.1, grad clip 1, 2000
steps; 512 held-out sequences. About a minute per arm on 2 idle cores (T = 128: ~30 ms a step).
``--quick``: N = 8, T = 32, L = 4, 400 steps, 128 held-out sequences (a smoke run, ~15 s).

    python bench/cache/recall.py [--quick] [--seed 0 [1 ...]] [--steps N] [--json PATH] [--md PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import retain
from retain.nn import CachedMemory

IGNORE = -100


# ----------------------------------------------------------------------------------------- data
def mqar_batch(gen: torch.Generator, batch: int, pairs: int, num_keys: int, num_values: int):
    """(tokens [B, 4N], targets [B, 4N] with IGNORE except at query keys, pair_index [B, 4N]: the
    queried pair's position in the listing, -1 elsewhere). Keys are tokens [0, num_keys), values
    [num_keys, num_keys + num_values)."""
    keys = torch.rand(batch, num_keys, generator=gen).argsort(1)[:, :pairs]          # distinct keys
    values = torch.randint(num_keys, num_keys + num_values, (batch, pairs), generator=gen)
    order = torch.rand(batch, pairs, generator=gen).argsort(1)                       # query order
    qk, qv = keys.gather(1, order), values.gather(1, order)
    listing = torch.stack([keys, values], 2).reshape(batch, 2 * pairs)
    queries = torch.stack([qk, qv], 2).reshape(batch, 2 * pairs)
    tokens = torch.cat([listing, queries], 1)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, 2 * pairs::2] = qv                                   # at k_q: predict its value
    pair_index = torch.full_like(tokens, -1)
    pair_index[:, 2 * pairs::2] = order
    return tokens, targets, pair_index


# ---------------------------------------------------------------------------------------- model
class ShortConv(nn.Module):
    """Causal convolution over T (width w; depthwise, or dense over channels), [B, T, D] -> [B, T, D]."""

    def __init__(self, d: int, width: int = 4, depthwise: bool = True):
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(d, d, width, groups=d if depthwise else 1, padding=width - 1)

    def forward(self, x):
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, segment_len: int, mode: str | None, mlp: int,
                 conv_width: int = 4, conv_dense: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.conv = ShortConv(d, conv_width, depthwise=not conv_dense)
        self.mixer = CachedMemory(d, heads, head_dim, memory="delta", segment_len=segment_len, mode=mode)
        self.mlp = nn.Sequential(nn.Linear(d, mlp * d), nn.GELU(), nn.Linear(mlp * d, d))

    def forward(self, x):
        x = x + self.mixer(self.conv(self.norm1(x)))[0]
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, head_dim: int, segment_len: int,
                 mode: str | None, mlp: int = 2, conv_width: int = 4, conv_dense: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, head_dim, segment_len, mode, mlp, conv_width, conv_dense) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens, at=None):
        """Logits [B, T, vocab], or [n, vocab] at the positions of the mask ``at`` only (the loss's)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x if at is None else x[at]))


def build_pair(cfg, seed: int) -> dict[str, Model]:
    """The caching arm and the plain arm, every shared parameter equal (copied from the first)."""
    vocab = cfg.num_keys + cfg.num_values
    torch.manual_seed(seed)
    cached = Model(vocab, cfg.d_model, cfg.layers, cfg.heads, cfg.head_dim, cfg.segment_len, "gated", cfg.mlp,
                   cfg.conv_width, cfg.conv_dense)
    plain = Model(vocab, cfg.d_model, cfg.layers, cfg.heads, cfg.head_dim, cfg.segment_len, None, cfg.mlp,
                  cfg.conv_width, cfg.conv_dense)
    missing, unexpected = plain.load_state_dict(cached.state_dict(), strict=False)
    assert not missing and all(".u_proj." in k for k in unexpected), (missing, unexpected)
    return {"cached (mode='gated')": cached, "plain (mode=None)": plain}


# ------------------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))   # cosine to 10%


@torch.no_grad()
def evaluate(model, data, cfg):
    """Query accuracy over held-out batches, overall and by the queried pair's listing segment."""
    model.eval()
    L, nseg = cfg.segment_len, max(1, 2 * cfg.pairs // cfg.segment_len)
    correct, total = torch.zeros(nseg), torch.zeros(nseg)
    loss_sum, n = 0.0, 0
    for tokens, targets, pair_index in data:
        m = targets != IGNORE
        logits = model(tokens, at=m)
        loss_sum += F.cross_entropy(logits, targets[m], reduction="sum").item()
        n += int(m.sum())
        hit = (logits.argmax(-1) == targets[m]).float()
        seg = ((2 * pair_index[m]) // L).clamp(max=nseg - 1)
        correct.index_add_(0, seg, hit)
        total.index_add_(0, seg, torch.ones_like(hit))
    model.train()
    return {"acc": float(correct.sum() / total.sum()), "loss": loss_sum / n,
            "acc_by_segment": (correct / total).tolist()}


def train(model, cfg, seed: int, eval_data) -> dict:
    gen = torch.Generator().manual_seed(10_000 + seed)                # the training stream
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    warmup = max(1, int(0.05 * cfg.steps))
    losses, curve = [], []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, warmup)
        tokens, targets, _ = mqar_batch(gen, cfg.batch, cfg.pairs, cfg.num_keys, cfg.num_values)
        m = targets != IGNORE
        loss = F.cross_entropy(model(tokens, at=m), targets[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"non-finite loss at step {step}")
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            ev = evaluate(model, eval_data[: max(1, len(eval_data) // 4)], cfg)
            curve.append({"step": step + 1, "train_loss": sum(losses[-cfg.log_every:]) / cfg.log_every,
                          "heldout_acc": ev["acc"], "seconds": time.perf_counter() - t0})
            print(f"    step {step + 1:5d}  loss {curve[-1]['train_loss']:.3f}  held-out acc (quarter) "
                  f"{ev['acc']:.3f}  {curve[-1]['seconds']:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    tail = max(1, min(50, cfg.steps // 10))
    ev = evaluate(model, eval_data, cfg)
    return {"final_train_loss": sum(losses[-tail:]) / tail, "train_loss_tail_steps": tail,
            "heldout_acc": ev["acc"], "heldout_loss": ev["loss"], "heldout_acc_by_segment": ev["acc_by_segment"],
            "train_s": train_s, "total_s": time.perf_counter() - t0, "curve": curve}


# ------------------------------------------------------------------------------------------ main
def machine() -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "retain": retain.__version__,
             "torch_threads": torch.get_num_threads()}
    try:
        from retain.bench.machine import machine_facts
        f = machine_facts("cpu")
        facts.update(cpu=f["cpu"], cpu_capability=f["cpu_capability"], avx512f="avx512f" in f["cpu_isa"],
                     logical_cpus=f["logical_cpus"])
    except Exception as e:  # pragma: no cover - the report still runs
        facts["machine_facts_error"] = repr(e)
    return facts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (under a minute)")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds, each a full comparison")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=None, help="N key-value pairs (T = 4N)")
    ap.add_argument("--segment-len", type=int, default=None, help="L (default 16; --quick: 4)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=8, help="K = V per head")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--mlp", type=int, default=2, help="MLP hidden width as a multiple of d")
    ap.add_argument("--conv-width", type=int, default=2)
    ap.add_argument("--conv-depthwise", action="store_true",
                    help="a depthwise short convolution (default: dense over channels; depthwise learned far slower)")
    ap.add_argument("--num-keys", type=int, default=64)
    ap.add_argument("--num-values", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-seqs", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    cfg = ap.parse_args(argv)
    if cfg.quick:
        cfg.steps = cfg.steps or 400
        cfg.pairs = cfg.pairs or 8
        cfg.segment_len = cfg.segment_len or 4
        cfg.eval_seqs = cfg.eval_seqs or 128
    cfg.steps = cfg.steps or 2000
    cfg.pairs = cfg.pairs or 32
    cfg.segment_len = cfg.segment_len or 16
    cfg.conv_dense = not cfg.conv_depthwise
    cfg.eval_seqs = cfg.eval_seqs or 512
    cfg.log_every = cfg.log_every if cfg.log_every is not None else max(1, cfg.steps // 6)
    torch.set_num_threads(cfg.threads)
    try:  # a training loop's steady state: freed blocks reused, not re-mmapped (see retain.bench.machine)
        from retain.bench.machine import warm_heap
        heap = warm_heap()
    except Exception:  # pragma: no cover
        heap = False
    T = 4 * cfg.pairs
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0].split("/work/main/")[-1], *sys.argv[1:]])
    print(f"MQAR: N={cfg.pairs} pairs, T={T}, segment_len={cfg.segment_len} ({2 * cfg.pairs // cfg.segment_len} "
          f"segments of pairs, {T // cfg.segment_len} in all), {cfg.layers} layers, d={cfg.d_model}, "
          f"{cfg.heads} heads x K=V={cfg.head_dim}, vocab {cfg.num_keys}+{cfg.num_values}, batch {cfg.batch}, "
          f"{cfg.steps} steps, lr {cfg.lr}, threads {torch.get_num_threads()}, warm heap {heap}", flush=True)

    runs = []
    t_all = time.perf_counter()
    for seed in cfg.seed:
        g_eval = torch.Generator().manual_seed(777_000 + seed)          # held out: another stream
        eval_data = [mqar_batch(g_eval, min(64, cfg.eval_seqs), cfg.pairs, cfg.num_keys, cfg.num_values)
                     for _ in range(max(1, cfg.eval_seqs // 64))]
        for name, model in build_pair(cfg, seed).items():
            params = sum(p.numel() for p in model.parameters())
            print(f"  seed {seed}: {name}, {params:,} parameters", flush=True)
            r = train(model, cfg, seed, eval_data)
            r.update(model=name, seed=seed, params=params, steps=cfg.steps)
            runs.append(r)
            print(f"  -> final train loss {r['final_train_loss']:.3f}, held-out acc {r['heldout_acc']:.4f} "
                  f"(by listing segment {' '.join(f'{a:.2f}' for a in r['heldout_acc_by_segment'])}), "
                  f"{r['total_s']:.0f}s", flush=True)
    wall = time.perf_counter() - t_all

    header = ("| model | seed | parameters | train steps | final train loss | held-out query acc | "
              "acc by listing segment (first / ... / last, %) | time (s) |")
    lines = [header, "|---|--:|--:|--:|--:|--:|---|--:|"]
    for r in runs:
        lines.append(f"| {r['model']} | {r['seed']} | {r['params']:,} | {r['steps']} | {r['final_train_loss']:.3f} | "
                     f"{100 * r['heldout_acc']:.1f}% | {' / '.join(f'{100 * a:.0f}' for a in r['heldout_acc_by_segment'])}"
                     f" | {r['total_s']:.0f} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\ntotal wall time {wall:.0f}s")
    facts = machine()
    config = {k: v for k, v in vars(cfg).items() if k not in ("json", "md")}
    config.update(T=T, eval_seqs_used=64 * max(1, cfg.eval_seqs // 64) if cfg.eval_seqs >= 64 else cfg.eval_seqs)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"command": command, "config": config, "machine": facts, "warm_heap": heap,
                       "wall_s": wall, "runs": runs}, f, indent=1)
    if cfg.md:
        with open(cfg.md, "w") as f:
            f.write(f"Command: `{command}`\n\n"
                    f"- {facts.get('cpu')}, AVX-512F {facts.get('avx512f')}, torch {facts['torch']}, "
                    f"threads {facts['torch_threads']}, retain CPU kernels `{facts.get('cpu_capability')}`\n"
                    f"- N={cfg.pairs} pairs, T={T}, segment_len {cfg.segment_len}, {cfg.layers} layers, "
                    f"d={cfg.d_model}, {cfg.heads} heads x K=V={cfg.head_dim}, vocab {cfg.num_keys}+{cfg.num_values}, "
                    f"batch {cfg.batch}, lr {cfg.lr}, {cfg.steps} steps, {config['eval_seqs_used']} held-out sequences\n"
                    f"- total wall time {wall:.0f} s\n\n{table}\n")


if __name__ == "__main__":
    main()
