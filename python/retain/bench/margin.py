"""Benchmark cases of the margin family (``retain.ops.margin``) for ``retain bench``: GeRe's
threshold margin loss and the imitation losses, each against its eager reference and that
reference under torch.compile."""

from __future__ import annotations

from typing import Any

import torch

from retain.bench.harness import Call, compile_impl, eager_impl, retain_impl, standard_impls
from retain.bench.registry import Case, cost_model, itemsize, register
from retain.ops import feature_imitation, kl_imitation, tm_loss
from retain.ops.margin.reference import feature_imitation_ref, kl_imitation_ref, pack_tm_labels_ref, tm_loss_ref


def _numel(p: dict[str, Any]) -> int:
    """Elements of the [B, L, D] hidden states."""
    return p["B"] * p["L"] * p["D"]


# --------------------------------------------------------------------------------------------
# tm_loss: GeRe's threshold margin loss of hidden states h against int8 (or packed) labels
# --------------------------------------------------------------------------------------------


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


def _tm_call(packed: bool) -> Call:
    """fwd: the loss of h; fwd+bwd: its gradient with respect to h. With ``packed`` the labels are
    packed to 2 bits first (untimed)."""

    def bind(fn, inputs, params):
        labels = pack_tm_labels_ref(inputs["labels"]) if packed else inputs["labels"]
        pos, neg, mask = inputs["pos"], inputs["neg"], inputs["mask"]
        return lambda h: fn(h, labels, pos, neg, mask=mask)

    return Call(("h",), bind=bind)


_TM = _tm_call(packed=False)

register(Case(
    name="tm_loss",
    family="margin",
    sizes={
        "default": {"B": 8, "L": 512, "D": 4096, "dtype": "float32"},
        "small": {"B": 2, "L": 16, "D": 64, "dtype": "float32"},
        "large": {"B": 8, "L": 8192, "D": 4096, "dtype": "float32"},  # h 1 GiB
    },
    make_inputs=_tm_inputs,
    describe=lambda p: f"B={p['B']} L={p['L']} D={p['D']} {p['dtype']}, int8 labels, 'violations'",
    # the bytes the op must move: h and int8 labels in; for fwd+bwd also the gradient out
    bytes_model=cost_model(_numel, fwd=5, fwdbwd=9),
    impls={
        "retain": retain_impl(tm_loss, _TM, "retain.ops.tm_loss with int8 labels (native kernel)", kernel="tm_loss"),
        "retain-packed": retain_impl(tm_loss, _tm_call(packed=True), "retain.ops.tm_loss with packed 2-bit labels",
                                     kernel="tm_loss"),
        "eager": eager_impl(tm_loss_ref, _TM, "reference tm_loss_ref (eager PyTorch, as GeRe computes it)"),
        "compile": compile_impl(tm_loss_ref, _TM),
    },
    grad_names=("grad_h",),
    model_note="GB/s from the bytes the op must move: fwd reads h (4 B) and an int8 label (1 B) per element; "
               "fwd+bwd also writes the gradient (9 B per element). With h requiring grad retain's forward also "
               "writes 2 bits of slope sign per element, which its backward reads instead of h and the labels "
               "(9.5 B moved per element for fwd+bwd; `retain-packed` reads 0.25 B labels instead of 1 B)",
    rtol=1e-4, atol=1e-6,
))


# --------------------------------------------------------------------------------------------
# kl_imitation: per-token KL of the model's logits z against the stored z_ref, temperature 2
# --------------------------------------------------------------------------------------------


def _kl_inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    N, V = p["N"], p["V"]
    dtype = getattr(torch, p["dtype"])
    return {"z": torch.randn(N, V, generator=gen, device=device).to(dtype) * 2,
            "z_ref": torch.randn(N, V, generator=gen, device=device).to(dtype) * 2}


# fwd+bwd: the gradient with respect to z (z_ref is a stored constant)
_KL = Call(("z", "z_ref"), wrt=("z",), bind=lambda fn, inputs, params: lambda z, q: fn(z, q, temperature=2.0))

register(Case(
    name="kl_imitation",
    family="margin",
    sizes={
        "default": {"N": 4096, "V": 32000, "dtype": "float32"},
        "small": {"N": 16, "V": 128, "dtype": "float32"},
        "large": {"N": 8192, "V": 32000, "dtype": "float32"},  # 1 GiB each of logits and reference
    },
    make_inputs=_kl_inputs,
    describe=lambda p: f"N={p['N']} tokens V={p['V']} {p['dtype']}, T=2, 'mean'",
    # the bytes it must move: both logits in (fwd); fwd+bwd also the gradient out
    bytes_model=cost_model(lambda p: p["N"] * p["V"] * itemsize(p), fwd=2, fwdbwd=3),
    impls=standard_impls(kl_imitation, kl_imitation_ref, _KL, kernel="kl_imitation",
                         retain="retain.ops.kl_imitation (fused native kernel)",
                         eager="kl_imitation_ref: log_softmax of both, materialised [N, V] probabilities"),
    grad_names=("grad_z",),
    model_note="GB/s from the bytes it must move: z and z_ref in (fwd); fwd+bwd also the gradient out. "
               "retain's forward reads each row twice (the second time from L2); with z requiring grad it also "
               "writes the gradient there and the backward only hands it out",
    rtol=1e-4, atol=1e-6,
))


# --------------------------------------------------------------------------------------------
# feature_imitation: per-token L1 / squared L2 distance of hidden states h to the stored h_ref
# --------------------------------------------------------------------------------------------


def _fi_inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    B, L, D = p["B"], p["L"], p["D"]
    dtype = getattr(torch, p["dtype"])
    return {"h": torch.randn(B, L, D, generator=gen, device=device).to(dtype),
            "h_ref": torch.randn(B, L, D, generator=gen, device=device).to(dtype),
            "mask": torch.rand(B, L, generator=gen, device=device) > 0.1}


# fwd+bwd: the gradient with respect to h (h_ref is a stored constant)
_FI = Call(("h", "h_ref", "mask"), wrt=("h",),
           bind=lambda fn, inputs, params: lambda h, q, m: fn(h, q, p=params["p"], mask=m))

register(Case(
    name="feature_imitation",
    family="margin",
    sizes={
        "default": {"B": 8, "L": 512, "D": 4096, "p": 2, "dtype": "float32"},
        "small": {"B": 2, "L": 16, "D": 64, "p": 2, "dtype": "float32"},
        "large": {"B": 8, "L": 8192, "D": 4096, "p": 2, "dtype": "float32"},  # 1 GiB each
    },
    make_inputs=_fi_inputs,
    describe=lambda p: f"B={p['B']} L={p['L']} D={p['D']} p={p['p']} {p['dtype']}, 90% of tokens masked in, 'mean'",
    # the bytes it must move: h and h_ref in (fwd); fwd+bwd also the gradient of h out
    bytes_model=cost_model(lambda p: _numel(p) * itemsize(p), fwd=2, fwdbwd=3),
    impls=standard_impls(feature_imitation, feature_imitation_ref, _FI, kernel="feature_imitation",
                         retain="retain.ops.feature_imitation (fused native kernel)",
                         eager="feature_imitation_ref: materialised [B, L, D] difference (eager PyTorch)"),
    grad_names=("grad_h",),
    model_note="GB/s from the bytes it must move: h and h_ref in (fwd); fwd+bwd also the gradient of h out. "
               "with h requiring grad and a 'mean'/'sum' loss retain's forward writes the gradient and the "
               "backward hands it out (3 element transfers for fwd+bwd; the two-pass form, for 'none', moves 5)",
    rtol=1e-4, atol=1e-6,
))
