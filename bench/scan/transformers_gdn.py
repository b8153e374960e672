"""transformers' Gated DeltaNet on the CPU: retain (``retain.fla.chunk_gated_delta_rule``, what
``retain.integrations.transformers.apply_retain_kernels`` routes to) against transformers' own CPU
fallback ``torch_chunk_gated_delta_rule`` for the same call, and the training step of a whole small
Qwen3-Next-style model unpatched and patched. Median of timed calls after a warm-up call.

    python bench/scan/transformers_gdn.py [--out bench/results/transformers_gdn_cpu.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def core_inputs(dtype, B=2, T=2048, H=2, HV=4, K=64, V=64):
    """As Qwen3NextGatedDeltaNet passes them: q, k, v in the model dtype, g float32 (computed in
    float32 from A_log), beta = sigmoid(b) in the model dtype."""
    torch.manual_seed(0)
    q = torch.randn(B, T, H, K).to(dtype).requires_grad_()
    k = torch.randn(B, T, H, K).to(dtype).requires_grad_()
    v = torch.randn(B, T, HV, V).to(dtype).requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, HV) + 3).requires_grad_()
    beta = torch.rand(B, T, HV).to(dtype).requires_grad_()
    return q, k, v, g, beta


def bench_core(fn, dtype, backward: bool, reps: int) -> float:
    q, k, v, g, beta = core_inputs(dtype)

    def step():
        o, _ = fn(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
        if backward:
            o.float().sum().backward()
            for x in (q, k, v, g, beta):
                x.grad = None
    with torch.no_grad() if not backward else torch.enable_grad():
        return timed(step, reps)


def small_model():
    import transformers

    cfg = transformers.Qwen3NextConfig(
        vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=512, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=64,
        linear_value_head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
        shared_expert_intermediate_size=256, max_position_embeddings=4096,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"])
    torch.manual_seed(0)
    return transformers.Qwen3NextForCausalLM(cfg)


def bench_model(reps: int) -> tuple[float, float]:
    from retain.integrations.transformers import apply_retain_kernels, revert

    model = small_model().float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (2, 1024))

    def step():
        opt.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        opt.step()
    revert()
    before = timed(step, reps)
    apply_retain_kernels(["qwen3_next"])
    after = timed(step, reps)
    revert()
    return before, after


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/transformers_gdn_cpu.md")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import transformers
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    from retain.bench.machine import machine_facts
    from retain.fla import chunk_gated_delta_rule

    fallback = m.torch_chunk_gated_delta_rule
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for backward in (False, True):
            t_hf = bench_core(fallback, dtype, backward, args.reps)
            t_rt = bench_core(chunk_gated_delta_rule, dtype, backward, args.reps)
            rows.append((str(dtype).removeprefix("torch."), "fwd+bwd" if backward else "fwd", t_hf, t_rt))
    before, after = bench_model(args.reps)
    facts = machine_facts("cpu")
    lines = [
        "# transformers' Gated DeltaNet on the CPU: retain vs transformers' own fallback",
        "",
        f"Command: `python bench/scan/transformers_gdn.py --out {args.out}`  ",
        f"CPU: {facts['cpu']}, retain's `{facts['cpu_capability']}` build, {facts['torch_threads']} threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; median of {args.reps} calls after a warm-up.",
        "",
        "## The GatedDeltaNet core (B=2, T=2048, 4 value heads over 2 key heads, K=V=64, l2-normalised q/k)",
        "",
        "Same call, same inputs (q, k, v and beta in the model dtype, g float32, as Qwen3NextGatedDeltaNet "
        "passes them): transformers' `torch_chunk_gated_delta_rule` (its CPU path without flash-linear-attention) "
        "against `retain.fla.chunk_gated_delta_rule`.",
        "",
        "| dtype | direction | transformers fallback ms | retain ms | speed-up |",
        "|---|---|--:|--:|--:|",
    ]
    lines += [f"| {d} | {dirn} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" for d, dirn, a, b in rows]
    lines += [
        "",
        "## A small Qwen3-Next-style model's training step (4 layers, 3 Gated DeltaNet + 1 attention, hidden 256,"
        " MoE 4 experts; B=2, T=1024, float32, AdamW)",
        "",
        "| model | step ms | speed-up |",
        "|---|--:|--:|",
        f"| unpatched (transformers' fallback) | {before:.0f} | 1x |",
        f"| `apply_retain_kernels()` | {after:.0f} | {before / after:.2f}x |",
        "",
    ]
    open(args.out, "w").write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
