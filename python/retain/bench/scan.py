"""Benchmark cases of the scan family for `retain bench` (python/retain/bench/): each op's
input factory, cost model and implementations (retain, its eager reference, torch.compile and the
peers a user would pick). Optional packages are imported inside the builders."""

from __future__ import annotations

from typing import Any

import torch

from retain.bench.harness import Unsupported, autograd_runner
from retain.bench.registry import Case, Impl, Runner, itemsize, register


# --------------------------------------------------------------------------------------------
# linear_recurrence: h_t = a_t * h_{t-1} + x_t over dim 1 of [B, T, D]
# --------------------------------------------------------------------------------------------


def _lr_inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, p["dtype"])
    gen = torch.Generator(device).manual_seed(0)
    shape = (p["B"], p["T"], p["D"])
    return {
        "a": torch.rand(shape, generator=gen, device=device).to(dtype),  # gates in [0, 1)
        "x": torch.randn(shape, generator=gen, device=device).to(dtype),
        "grad_h": torch.randn(shape, generator=gen, device=device).to(dtype),
    }


def _lr_numel(p: dict[str, Any]) -> int:
    return p["B"] * p["T"] * p["D"]


def _lr_retain(inputs, params, device):
    from retain.ops import linear_recurrence

    return autograd_runner(linear_recurrence, inputs, ("a", "x"), "grad_h")


def _lr_eager(inputs, params, device):
    from retain.ops.scan.reference import linear_recurrence_ref

    return autograd_runner(linear_recurrence_ref, inputs, ("a", "x"), "grad_h")


def _lr_chunk(a: torch.Tensor, x: torch.Tensor, state: torch.Tensor):
    """C steps of the recurrence; compiled as one graph (the T-loop unrolled C times)."""
    out = []
    for t in range(a.shape[1]):
        state = a[:, t] * state + x[:, t]
        out.append(state)
    return torch.stack(out, 1), state


def _lr_compile(inputs, params, device):
    import torch._dynamo

    torch._dynamo.reset()  # a fresh compile per build: honest warm-up times, no recompile limit
    step = torch.compile(_lr_chunk, dynamic=False, fullgraph=True, backend=params.get("compile_backend", "inductor"))
    chunk = min(params.get("compile_chunk", 32), params["T"])

    def scan(a, x):
        state = torch.zeros_like(x[:, 0])
        out = []
        # split (not slicing) so autograd concatenates the chunks' gradients once
        for a_c, x_c in zip(a.split(chunk, 1), x.split(chunk, 1)):
            h, state = step(a_c, x_c, state)
            out.append(h)
        return torch.cat(out, 1)

    return autograd_runner(scan, inputs, ("a", "x"), "grad_h")


_NUMBA_KERNELS: dict[str, Any] = {}


def _numba_kernels():
    """The numba forward and backward loops, created (not yet compiled) once per process."""
    if not _NUMBA_KERNELS:
        import numba
        import numpy as np

        @numba.njit(parallel=True)
        def lr_fwd(a, x):
            B, T, D = x.shape
            h = np.empty_like(x)
            for b in numba.prange(B):
                for d in range(D):
                    h[b, 0, d] = x[b, 0, d]
                for t in range(1, T):
                    for d in range(D):
                        h[b, t, d] = a[b, t, d] * h[b, t - 1, d] + x[b, t, d]
            return h

        @numba.njit(parallel=True)
        def lr_bwd(a, h, gh):
            # lam_t = gh_t + a_{t+1} lam_{t+1};  grad_x = lam;  grad_a_t = lam_t h_{t-1} (0 at t = 0)
            B, T, D = h.shape
            gx = np.empty_like(h)
            ga = np.empty_like(h)
            for b in numba.prange(B):
                for d in range(D):
                    gx[b, T - 1, d] = gh[b, T - 1, d]
                for t in range(T - 2, -1, -1):
                    for d in range(D):
                        gx[b, t, d] = gh[b, t, d] + a[b, t + 1, d] * gx[b, t + 1, d]
                        ga[b, t + 1, d] = gx[b, t + 1, d] * h[b, t, d]
                for d in range(D):
                    ga[b, 0, d] = 0.0
            return ga, gx

        _NUMBA_KERNELS.update(fwd=lr_fwd, bwd=lr_bwd, numba=numba)
    return _NUMBA_KERNELS


def _lr_numba(inputs, params, device):
    if device != "cpu":
        raise Unsupported("numba loop runs on CPU tensors")
    if params["dtype"] not in ("float32", "float64"):
        raise Unsupported(f"numba has no {params['dtype']}")
    k = _numba_kernels()
    numba = k["numba"]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    a, x, g = (inputs[n].numpy() for n in ("a", "x", "grad_h"))
    fwd_k, bwd_k = k["fwd"], k["bwd"]

    def to_ref(out):
        if isinstance(out, tuple):
            return tuple(torch.from_numpy(o) for o in out)
        return torch.from_numpy(out)

    return Runner(lambda: fwd_k(a, x), lambda: bwd_k(a, fwd_k(a, x), g), to_ref)


def _lr_assoc_scan(inputs, params, device):
    from assoc_scan import AssocScan

    return autograd_runner(AssocScan(), inputs, ("a", "x"), "grad_h")


def _lr_accelerated_scan(inputs, params, device):
    T = params["T"]
    if T & (T - 1):
        raise Unsupported("accelerated-scan needs T a power of two")
    if device == "cpu":
        from accelerated_scan.ref import scan
    else:
        from accelerated_scan.scalar import scan  # Triton kernel
    # its layout is [B, D, T]: transpose once here, untimed (a user would keep that layout)
    bdt = {k: v.transpose(1, 2).contiguous() for k, v in inputs.items()}
    runner = autograd_runner(scan, bdt, ("a", "x"), "grad_h")

    def to_ref(out):
        if isinstance(out, tuple):
            return tuple(o.transpose(1, 2) for o in out)
        return out.transpose(1, 2)

    runner.to_ref = to_ref
    return runner


register(Case(
    name="linear_recurrence",
    family="scan",
    sizes={
        "default": {"B": 8, "T": 4096, "D": 512, "dtype": "float32", "compile_chunk": 32},
        "small": {"B": 2, "T": 256, "D": 64, "dtype": "float32", "compile_chunk": 8},
    },
    make_inputs=_lr_inputs,
    describe=lambda p: f"B={p['B']} T={p['T']} D={p['D']} {p['dtype']}",
    # forward reads a, x and writes h; backward reads a, h, grad_h and writes grad_x, grad_a
    bytes_model={
        "fwd": lambda p: 3 * _lr_numel(p) * itemsize(p),
        "fwd+bwd": lambda p: 8 * _lr_numel(p) * itemsize(p),
    },
    impls={
        "retain": Impl(_lr_retain, "retain.ops.linear_recurrence (native kernel)"),
        "eager": Impl(_lr_eager, "reference loop linear_recurrence_ref over a.unbind(1) (linear-time autograd)"),
        "compile": Impl(_lr_compile, "torch.compile(fullgraph, inductor) of the reference loop over a chunk "
                                     "of C steps (C = 32; 8 at --size small), a Python loop over the T/C "
                                     "chunks; warm-up = cold compile", jit=True),
        "numba": Impl(_lr_numba, "@njit(parallel=True) loops, prange over B, fresh np.empty outputs; "
                                 "fwd+bwd = numba fwd + fused reverse loop; warm-up = JIT", jit=True),
        "assoc-scan": Impl(_lr_assoc_scan, "assoc_scan.AssocScan() (titans-pytorch), torch ops, autograd"),
        "accelerated-scan": Impl(_lr_accelerated_scan, "accelerated_scan.ref.scan on CPU (scalar/Triton on "
                                                       "CUDA), inputs pre-transposed to [B, D, T] untimed"),
    },
    grad_names=("grad_a", "grad_x"),
    model_note="GB/s from the bytes model: fwd reads a, x and writes h (3 x numel x itemsize); fwd+bwd adds "
               "reading a, h, grad_h and writing grad_x, grad_a (8 x numel x itemsize)",
))


# --------------------------------------------------------------------------------------------
# memory_scan: the gated delta rule, S_t = e^{g_t}(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
# --------------------------------------------------------------------------------------------


def _gdr_inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, p["dtype"])
    gen = torch.Generator(device).manual_seed(0)
    B, T, H, K, V = p["B"], p["T"], p["H"], p["K"], p["V"]
    rn = lambda *s: torch.randn(s, generator=gen, device=device)  # noqa: E731
    k = torch.nn.functional.normalize(rn(B, T, H, K), dim=-1)  # unit keys, as with use_qk_l2norm
    return {
        "q": rn(B, T, H, K).to(dtype), "k": k.to(dtype), "v": rn(B, T, H, V).to(dtype),
        "g": (-0.1 * torch.rand(B, T, H, generator=gen, device=device)).to(dtype),  # log decay in (-0.1, 0]
        "beta": torch.rand(B, T, H, generator=gen, device=device).to(dtype),
        "grad_o": rn(B, T, H, V).to(dtype),
    }


_GDR_ARGS = ("q", "k", "v", "g", "beta")


def _gdr_retain(inputs, params, device):
    from retain import _native
    from retain.ops import gated_delta_rule

    if not _native.has_kernel("memory_scan", device):
        raise Unsupported(f"no memory_scan kernel for {device} in this build")

    return autograd_runner(lambda *a: gated_delta_rule(*a)[0], inputs, _GDR_ARGS, "grad_o")


def _gdr_eager(inputs, params, device):
    from retain.ops.scan.reference import gated_delta_rule_ref

    return autograd_runner(lambda *a: gated_delta_rule_ref(*a)[0], inputs, _GDR_ARGS, "grad_o")


def _load_fla_naive():
    """flash-linear-attention's naive recurrence, loaded by file: its package __init__ needs Triton,
    the naive module only torch and einops."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'fla' (pip install fla-core)")
    path = os.path.join(spec.submodule_search_locations[0], "ops", "gated_delta_rule", "naive.py")
    mod_spec = importlib.util.spec_from_file_location("_fla_gdr_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.naive_recurrent_gated_delta_rule


def _gdr_fla_naive(inputs, params, device):
    naive = _load_fla_naive()
    # fla's argument order is (q, k, v, beta, g)
    return autograd_runner(lambda q, k, v, g, beta: naive(q, k, v, beta, g)[0], inputs, _GDR_ARGS, "grad_o")


def _gdr_step(S, q_t, k_t, v_t, a_t, b_t, scale: float):
    """One step of the gated delta rule on [B, H, K, V] states (compiled as one graph)."""
    S = S * a_t[..., None, None]
    e = torch.einsum("bhkv,bhk->bhv", S, k_t) - v_t
    S = S - b_t[..., None, None] * k_t[..., :, None] * e[..., None, :]
    return S, torch.einsum("bhkv,bhk->bhv", S, q_t * scale)


def _gdr_compile(inputs, params, device):
    import torch._dynamo

    torch._dynamo.reset()
    step = torch.compile(_gdr_step, dynamic=False, fullgraph=True, backend="inductor")
    scale = params["K"] ** -0.5

    def scan(q, k, v, g, beta):
        B, T, H, K = q.shape
        S = q.new_zeros(B, H, K, v.shape[-1])
        a = g.exp()
        out = []
        for q_t, k_t, v_t, a_t, b_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), a.unbind(1), beta.unbind(1)):
            S, o_t = step(S, q_t, k_t, v_t, a_t, b_t, scale)
            out.append(o_t)
        return torch.stack(out, 1)

    return autograd_runner(scan, inputs, _GDR_ARGS, "grad_o")


_NUMBA_GDR: dict[str, Any] = {}


def _gdr_numba(inputs, params, device):
    if device != "cpu":
        raise Unsupported("numba loop runs on CPU tensors")
    if params["dtype"] not in ("float32", "float64"):
        raise Unsupported(f"numba has no {params['dtype']}")
    if not _NUMBA_GDR:
        import numba
        import numpy as np

        @numba.njit(parallel=True, fastmath=True)
        def gdr_fwd(q, k, v, g, beta, scale):
            B, T, H, K = q.shape
            V = v.shape[3]
            o = np.empty((B, T, H, V), dtype=q.dtype)
            for bh in numba.prange(B * H):
                b, h = bh // H, bh % H
                S = np.zeros((K, V), dtype=q.dtype)
                e = np.empty(V, dtype=q.dtype)
                for t in range(T):
                    a = np.exp(g[b, t, h])
                    for j in range(V):
                        e[j] = -v[b, t, h, j]
                    for i in range(K):
                        c = a * k[b, t, h, i]
                        for j in range(V):
                            e[j] += S[i, j] * c
                    for j in range(V):
                        o[b, t, h, j] = 0.0
                    for i in range(K):
                        c = -beta[b, t, h] * k[b, t, h, i]
                        qi = q[b, t, h, i] * scale
                        for j in range(V):
                            S[i, j] = a * S[i, j] + c * e[j]
                            o[b, t, h, j] += S[i, j] * qi
            return o

        _NUMBA_GDR.update(fwd=gdr_fwd, numba=numba)
    numba = _NUMBA_GDR["numba"]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    arrays = [inputs[n].numpy() for n in _GDR_ARGS]
    scale = params["K"] ** -0.5
    fwd = _NUMBA_GDR["fwd"]
    return Runner(lambda: fwd(*arrays, scale), None, torch.from_numpy)


def _fla_cuda(device: str):
    """flash-linear-attention's Triton kernels: CUDA only; ImportError (reported as not installed)
    when fla is missing."""
    if device != "cuda":
        raise Unsupported("flash-linear-attention's Triton kernels run on CUDA tensors")
    import fla.ops  # noqa: F401


def _gdr_fla_fused_recurrent(inputs, params, device):
    _fla_cuda(device)
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    runner = autograd_runner(lambda q, k, v, g, beta: fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta)[0],
                             inputs, _GDR_ARGS, "grad_o")
    runner.fwdbwd = None  # fla implements no backward for its fused recurrent gated delta rule
    return runner


def _gdr_fla_chunk(inputs, params, device):
    _fla_cuda(device)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return autograd_runner(lambda q, k, v, g, beta: chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta)[0],
                           inputs, _GDR_ARGS, "grad_o")


def _gdr_tokens(p):
    return p["B"] * p["T"] * p["H"]


register(Case(
    name="gated_delta_rule",
    family="scan",
    sizes={
        "default": {"B": 2, "T": 2048, "H": 4, "K": 64, "V": 64, "dtype": "float32"},
        "small": {"B": 1, "T": 64, "H": 2, "K": 16, "V": 16, "dtype": "float32"},
    },
    make_inputs=_gdr_inputs,
    describe=lambda p: f"B={p['B']} T={p['T']} H={p['H']} K={p['K']} V={p['V']} {p['dtype']}",
    flops_model={
        "fwd": lambda p: 6 * p["K"] * p["V"] * _gdr_tokens(p),
        "fwd+bwd": lambda p: 22 * p["K"] * p["V"] * _gdr_tokens(p),
    },
    impls={
        "retain": Impl(_gdr_retain, "retain.ops.gated_delta_rule (native memory_scan kernel)"),
        "eager": Impl(_gdr_eager, "reference loop gated_delta_rule_ref (retain.ops.scan.reference)"),
        "fla-naive": Impl(_gdr_fla_naive, "flash-linear-attention's naive_recurrent_gated_delta_rule (fla-core)"),
        "compile": Impl(_gdr_compile, "torch.compile(fullgraph, inductor) of one step, a Python loop over T; "
                                      "warm-up = cold compile", jit=True),
        "numba": Impl(_gdr_numba, "@njit(parallel=True, fastmath=True) loop, prange over B*H, forward only; "
                                  "warm-up = JIT", jit=True),
        "fla-fused-recurrent": Impl(_gdr_fla_fused_recurrent, "flash-linear-attention's "
                                    "fused_recurrent_gated_delta_rule (Triton, CUDA; forward only)", jit=True),
        "fla-chunk": Impl(_gdr_fla_chunk, "flash-linear-attention's chunk_gated_delta_rule (Triton, CUDA, "
                                          "chunked WY form on tensor cores)", jit=True),
    },
    grad_names=("grad_q", "grad_k", "grad_v", "grad_g", "grad_beta"),
    model_note="GFLOP/s from the flops model: 6*K*V per token and head forward (error, update, readout: three "
               "K x V multiply-adds); fwd+bwd 22*K*V (eight more K x V multiply-adds in the backward; the "
               "kernel's recomputation of states is not counted)",
    rtol=2e-3, atol=2e-3,
))


# --------------------------------------------------------------------------------------------
# delta_rule: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T (the gated case without g)
# --------------------------------------------------------------------------------------------

_DR_ARGS = ("q", "k", "v", "beta")


def _dr_retain(inputs, params, device):
    from retain import _native
    from retain.ops import delta_rule

    if not _native.has_kernel("memory_scan", device):
        raise Unsupported(f"no memory_scan kernel for {device} in this build")
    return autograd_runner(lambda *a: delta_rule(*a)[0], inputs, _DR_ARGS, "grad_o")


def _dr_eager(inputs, params, device):
    from retain.ops.scan.reference import delta_rule_ref

    return autograd_runner(lambda *a: delta_rule_ref(*a)[0], inputs, _DR_ARGS, "grad_o")


def _dr_fla_fused_recurrent(inputs, params, device):
    _fla_cuda(device)
    from fla.ops.delta_rule import fused_recurrent_delta_rule

    return autograd_runner(lambda q, k, v, beta: fused_recurrent_delta_rule(q=q, k=k, v=v, beta=beta)[0],
                           inputs, _DR_ARGS, "grad_o")


def _dr_fla_chunk(inputs, params, device):
    _fla_cuda(device)
    from fla.ops.delta_rule import chunk_delta_rule

    return autograd_runner(lambda q, k, v, beta: chunk_delta_rule(q=q, k=k, v=v, beta=beta)[0],
                           inputs, _DR_ARGS, "grad_o")


register(Case(
    name="delta_rule",
    family="scan",
    sizes={
        "default": {"B": 2, "T": 2048, "H": 4, "K": 64, "V": 64, "dtype": "float32"},
        "small": {"B": 1, "T": 64, "H": 2, "K": 16, "V": 16, "dtype": "float32"},
    },
    make_inputs=lambda p, device: {n: x for n, x in _gdr_inputs(p, device).items() if n != "g"},
    describe=lambda p: f"B={p['B']} T={p['T']} H={p['H']} K={p['K']} V={p['V']} {p['dtype']}",
    flops_model={
        "fwd": lambda p: 6 * p["K"] * p["V"] * _gdr_tokens(p),
        "fwd+bwd": lambda p: 22 * p["K"] * p["V"] * _gdr_tokens(p),
    },
    impls={
        "retain": Impl(_dr_retain, "retain.ops.delta_rule (native memory_scan kernel)"),
        "eager": Impl(_dr_eager, "reference loop delta_rule_ref (retain.ops.scan.reference)"),
        "fla-fused-recurrent": Impl(_dr_fla_fused_recurrent, "flash-linear-attention's fused_recurrent_delta_rule "
                                                             "(Triton, CUDA)", jit=True),
        "fla-chunk": Impl(_dr_fla_chunk, "flash-linear-attention's chunk_delta_rule (Triton, CUDA, chunked WY "
                                         "form on tensor cores)", jit=True),
    },
    grad_names=("grad_q", "grad_k", "grad_v", "grad_beta"),
    model_note="GFLOP/s from the flops model, as gated_delta_rule: 6*K*V per token and head forward, 22*K*V "
               "fwd+bwd",
    rtol=2e-3, atol=2e-3,
))
