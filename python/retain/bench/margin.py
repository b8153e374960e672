"""Benchmark cases of the margin family for `retain bench` (python/retain/bench/)."""

from __future__ import annotations

from typing import Any

import torch

from retain.bench.harness import Unsupported
from retain.bench.registry import Case, Impl, Runner, itemsize, register


def _tm_inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    B, L, D = p["B"], p["L"], p["D"]
    h = torch.randn(B, L, D, generator=gen, device=device).to(getattr(torch, p["dtype"]))
    labels = torch.randint(-1, 2, (B, L, D), generator=gen, device=device, dtype=torch.int8)
    return {
        "h": h, "labels": labels,
        "pos": 0.5 + torch.rand(D, generator=gen, device=device),
        "neg": -0.5 - torch.rand(D, generator=gen, device=device),
        "mask": torch.rand(B, L, generator=gen, device=device) > 0.1,
    }


def _tm_runner(fn, inputs) -> Runner:
    """fwd: the loss; fwd+bwd: its gradient with respect to h."""
    h = inputs["h"]
    leaf = h.detach().requires_grad_()

    def fwdbwd():
        return torch.autograd.grad(fn(leaf), leaf)

    return Runner(lambda: fn(h), fwdbwd)


def _tm_retain(packed: bool):
    def build(inputs, params, device):
        from retain import _native
        from retain.ops import tm_loss
        from retain.ops.margin.reference import pack_tm_labels_ref

        if not _native.has_kernel("tm_loss", device):
            raise Unsupported(f"no tm_loss kernel for {device} in this build")
        labels = pack_tm_labels_ref(inputs["labels"]) if packed else inputs["labels"]
        pos, neg, mask = inputs["pos"], inputs["neg"], inputs["mask"]
        return _tm_runner(lambda h: tm_loss(h, labels, pos, neg, mask=mask), inputs)
    return build


def _tm_eager(inputs, params, device):
    from retain.ops.margin.reference import tm_loss_ref

    labels, pos, neg, mask = inputs["labels"], inputs["pos"], inputs["neg"], inputs["mask"]
    return _tm_runner(lambda h: tm_loss_ref(h, labels, pos, neg, mask=mask), inputs)


def _tm_compile(inputs, params, device):
    import torch._dynamo

    from retain.ops.margin.reference import tm_loss_ref

    torch._dynamo.reset()
    labels, pos, neg, mask = inputs["labels"], inputs["pos"], inputs["neg"], inputs["mask"]
    compiled = torch.compile(lambda h: tm_loss_ref(h, labels, pos, neg, mask=mask), fullgraph=True)
    return _tm_runner(compiled, inputs)


def _tm_numel(p):
    return p["B"] * p["L"] * p["D"]


register(Case(
    name="tm_loss",
    family="margin",
    sizes={
        "default": {"B": 8, "L": 512, "D": 4096, "dtype": "float32"},
        "small": {"B": 2, "L": 16, "D": 64, "dtype": "float32"},
    },
    make_inputs=_tm_inputs,
    describe=lambda p: f"B={p['B']} L={p['L']} D={p['D']} {p['dtype']}, int8 labels, 'violations'",
    # the bytes the op must move: h and int8 labels in; for fwd+bwd also the gradient out
    bytes_model={
        "fwd": lambda p: 5 * _tm_numel(p),
        "fwd+bwd": lambda p: 9 * _tm_numel(p),
    },
    impls={
        "retain": Impl(_tm_retain(False), "retain.ops.tm_loss with int8 labels (native kernel)"),
        "retain-packed": Impl(_tm_retain(True), "retain.ops.tm_loss with packed 2-bit labels"),
        "eager": Impl(_tm_eager, "reference tm_loss_ref (eager PyTorch, as GeRe computes it)"),
        "compile": Impl(_tm_compile, "tm_loss_ref under torch.compile(fullgraph, inductor); warm-up = compile",
                        jit=True),
    },
    grad_names=("grad_h",),
    model_note="GB/s from the bytes the op must move: fwd reads h (4 B) and an int8 label (1 B) per element; "
               "fwd+bwd also writes the gradient (9 B per element). With h requiring grad retain's forward also "
               "writes 2 bits of slope sign per element, which its backward reads instead of h and the labels "
               "(9.5 B moved per element for fwd+bwd; `retain-packed` reads 0.25 B labels instead of 1 B)",
    rtol=1e-4, atol=1e-6,
))


def _kl_inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    N, V = p["N"], p["V"]
    dtype = getattr(torch, p["dtype"])
    return {"z": torch.randn(N, V, generator=gen, device=device).to(dtype) * 2,
            "z_ref": torch.randn(N, V, generator=gen, device=device).to(dtype) * 2}


def _kl_runner(fn, inputs) -> Runner:
    z, q = inputs["z"], inputs["z_ref"]
    leaf = z.detach().requires_grad_()
    return Runner(lambda: fn(z, q), lambda: torch.autograd.grad(fn(leaf, q), leaf))


def _kl_retain(inputs, params, device):
    from retain import _native
    from retain.ops import kl_imitation

    if not _native.has_kernel("kl_imitation", device):
        raise Unsupported(f"no kl_imitation kernel for {device} in this build")
    return _kl_runner(lambda z, q: kl_imitation(z, q, temperature=2.0), inputs)


def _kl_eager(inputs, params, device):
    from retain.ops.margin.reference import kl_imitation_ref

    return _kl_runner(lambda z, q: kl_imitation_ref(z, q, temperature=2.0), inputs)


def _kl_compile(inputs, params, device):
    import torch._dynamo

    from retain.ops.margin.reference import kl_imitation_ref

    torch._dynamo.reset()
    fn = torch.compile(lambda z, q: kl_imitation_ref(z, q, temperature=2.0), fullgraph=True)
    return _kl_runner(fn, inputs)


register(Case(
    name="kl_imitation",
    family="margin",
    sizes={
        "default": {"N": 4096, "V": 32000, "dtype": "float32"},
        "small": {"N": 16, "V": 128, "dtype": "float32"},
    },
    make_inputs=_kl_inputs,
    describe=lambda p: f"N={p['N']} tokens V={p['V']} {p['dtype']}, T=2, 'mean'",
    # the bytes it must move: both logits in (fwd); fwd+bwd also the gradient out
    bytes_model={
        "fwd": lambda p: 2 * p["N"] * p["V"] * itemsize(p),
        "fwd+bwd": lambda p: 3 * p["N"] * p["V"] * itemsize(p),
    },
    impls={
        "retain": Impl(_kl_retain, "retain.ops.kl_imitation (fused native kernel)"),
        "eager": Impl(_kl_eager, "kl_imitation_ref: log_softmax of both, materialised [N, V] probabilities"),
        "compile": Impl(_kl_compile, "kl_imitation_ref under torch.compile(fullgraph, inductor); warm-up = compile",
                        jit=True),
    },
    grad_names=("grad_z",),
    model_note="GB/s from the bytes it must move: z and z_ref in (fwd); fwd+bwd also the gradient out. "
               "retain's forward reads each row twice (the second time from L2); with z requiring grad it also "
               "writes the gradient there and the backward only hands it out",
    rtol=1e-4, atol=1e-6,
))


def _fi_inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    B, L, D = p["B"], p["L"], p["D"]
    dtype = getattr(torch, p["dtype"])
    return {"h": torch.randn(B, L, D, generator=gen, device=device).to(dtype),
            "h_ref": torch.randn(B, L, D, generator=gen, device=device).to(dtype),
            "mask": torch.rand(B, L, generator=gen, device=device) > 0.1}


def _fi_runner(fn, inputs) -> Runner:
    """fwd: the loss; fwd+bwd: its gradient with respect to h (h_ref is a stored constant)."""
    h, q, mask = inputs["h"], inputs["h_ref"], inputs["mask"]
    leaf = h.detach().requires_grad_()
    return Runner(lambda: fn(h, q, mask), lambda: torch.autograd.grad(fn(leaf, q, mask), leaf))


def _fi_retain(inputs, params, device):
    from retain import _native
    from retain.ops import feature_imitation

    if not _native.has_kernel("feature_imitation", device):
        raise Unsupported(f"no feature_imitation kernel for {device} in this build")
    return _fi_runner(lambda h, q, m: feature_imitation(h, q, p=params["p"], mask=m), inputs)


def _fi_eager(inputs, params, device):
    from retain.ops.margin.reference import feature_imitation_ref

    return _fi_runner(lambda h, q, m: feature_imitation_ref(h, q, p=params["p"], mask=m), inputs)


def _fi_compile(inputs, params, device):
    import torch._dynamo

    from retain.ops.margin.reference import feature_imitation_ref

    torch._dynamo.reset()
    fn = torch.compile(lambda h, q, m: feature_imitation_ref(h, q, p=params["p"], mask=m), fullgraph=True)
    return _fi_runner(fn, inputs)


def _fi_numel(p):
    return p["B"] * p["L"] * p["D"]


register(Case(
    name="feature_imitation",
    family="margin",
    sizes={
        "default": {"B": 8, "L": 512, "D": 4096, "p": 2, "dtype": "float32"},
        "small": {"B": 2, "L": 16, "D": 64, "p": 2, "dtype": "float32"},
    },
    make_inputs=_fi_inputs,
    describe=lambda p: f"B={p['B']} L={p['L']} D={p['D']} p={p['p']} {p['dtype']}, 90% of tokens masked in, 'mean'",
    # the bytes it must move: h and h_ref in (fwd); fwd+bwd also the gradient of h out
    bytes_model={
        "fwd": lambda p: 2 * _fi_numel(p) * itemsize(p),
        "fwd+bwd": lambda p: 3 * _fi_numel(p) * itemsize(p),
    },
    impls={
        "retain": Impl(_fi_retain, "retain.ops.feature_imitation (fused native kernel)"),
        "eager": Impl(_fi_eager, "feature_imitation_ref: materialised [B, L, D] difference (eager PyTorch)"),
        "compile": Impl(_fi_compile, "feature_imitation_ref under torch.compile(fullgraph, inductor); "
                        "warm-up = compile", jit=True),
    },
    grad_names=("grad_h",),
    model_note="GB/s from the bytes it must move: h and h_ref in (fwd); fwd+bwd also the gradient of h out. "
               "with h requiring grad and a 'mean'/'sum' loss retain's forward writes the gradient and the "
               "backward hands it out (3 element transfers for fwd+bwd; the two-pass form, for 'none', moves 5)",
    rtol=1e-4, atol=1e-6,
))
