"""Benchmark cases of the scan family (``retain.ops.scan``) for ``retain bench``: each op's input
factory, cost model and implementations (retain, its eager reference, torch.compile and the peers
a user would pick). Optional packages are imported inside the builders."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from retain.bench.harness import Call, Unsupported, eager_impl, fresh_compile, retain_impl
from retain.bench.registry import Case, Impl, Runner, cost_model, itemsize, register
from retain.ops import delta_rule, gated_delta_rule, linear_recurrence
from retain.ops.scan.reference import delta_rule_ref, gated_delta_rule_ref, linear_recurrence_ref

# --------------------------------------------------------------------------------------------
# Peers shared by the cases: numba loops, flash-linear-attention
# --------------------------------------------------------------------------------------------

_NUMBA_KERNELS: dict[str, Any] = {}


def _use_numba(device: str, params: dict[str, Any]) -> None:
    """Give numba as many threads as torch uses; ``Unsupported`` off the CPU or for a dtype numba
    has no loop for, ``ImportError`` without numba."""
    if device != "cpu":
        raise Unsupported("numba loop runs on CPU tensors")
    if params["dtype"] not in ("float32", "float64"):
        raise Unsupported(f"numba has no {params['dtype']}")
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _numba_kernels() -> dict[str, Any]:
    """The numba loops of every case, created (not yet compiled: each JITs on its first call)
    once per process."""
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

        _NUMBA_KERNELS.update(lr_fwd=lr_fwd, lr_bwd=lr_bwd, gdr_fwd=gdr_fwd)
    return _NUMBA_KERNELS


def _fla_impl(module: str, name: str, call: Call, note: str, *, backward: bool = True) -> Impl:
    """flash-linear-attention's Triton kernel ``fla.ops.<module>.<name>`` (CUDA only; reported as
    not installed without fla), called with keyword arguments (its positional order differs)."""

    def build(inputs, params, device):
        if device != "cuda":
            raise Unsupported("flash-linear-attention's Triton kernels run on CUDA tensors")
        fn = getattr(importlib.import_module(f"fla.ops.{module}"), name)
        runner = call.runner(lambda *a: fn(**dict(zip(call.args, a)))[0], inputs)
        if not backward:
            runner.fwdbwd = None
        return runner

    return Impl(build, note, jit=True)


def load_fla_naive():
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


# --------------------------------------------------------------------------------------------
# linear_recurrence: h_t = a_t * h_{t-1} + x_t over dim 1 of [B, T, D]
# --------------------------------------------------------------------------------------------

_LR = Call(("a", "x"), grad_out="grad_h")


def _lr_inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, p["dtype"])
    gen = torch.Generator(device).manual_seed(0)
    shape = (p["B"], p["T"], p["D"])
    return {
        "a": torch.rand(shape, generator=gen, device=device).to(dtype),  # gates in [0, 1)
        "x": torch.randn(shape, generator=gen, device=device).to(dtype),
        "grad_h": torch.randn(shape, generator=gen, device=device).to(dtype),
    }


def _lr_chunk(a: torch.Tensor, x: torch.Tensor, state: torch.Tensor):
    """C steps of the recurrence; compiled as one graph (the T-loop unrolled C times)."""
    out = []
    for t in range(a.shape[1]):
        state = a[:, t] * state + x[:, t]
        out.append(state)
    return torch.stack(out, 1), state


def _lr_compile(inputs, params, device):
    step = fresh_compile(_lr_chunk, params, dynamic=False)
    chunk = min(params.get("compile_chunk", 32), params["T"])

    def scan(a, x):
        state = torch.zeros_like(x[:, 0])
        out = []
        # split (not slicing) so autograd concatenates the chunks' gradients once
        for a_c, x_c in zip(a.split(chunk, 1), x.split(chunk, 1)):
            h, state = step(a_c, x_c, state)
            out.append(h)
        return torch.cat(out, 1)

    return _LR.runner(scan, inputs)


def _lr_numba(inputs, params, device):
    _use_numba(device, params)
    k = _numba_kernels()
    a, x, g = (inputs[n].numpy() for n in ("a", "x", "grad_h"))
    fwd_k, bwd_k = k["lr_fwd"], k["lr_bwd"]

    def to_ref(out):
        if isinstance(out, tuple):
            return tuple(torch.from_numpy(o) for o in out)
        return torch.from_numpy(out)

    return Runner(lambda: fwd_k(a, x), lambda: bwd_k(a, fwd_k(a, x), g), to_ref)


def _lr_assoc_scan(inputs, params, device):
    from assoc_scan import AssocScan

    return _LR.runner(AssocScan(), inputs)


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
    runner = _LR.runner(scan, bdt)

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
        "large": {"B": 8, "T": 65536, "D": 512, "dtype": "float32", "compile_chunk": 32},  # 1 GiB each
    },
    make_inputs=_lr_inputs,
    describe=lambda p: f"B={p['B']} T={p['T']} D={p['D']} {p['dtype']}",
    # forward reads a, x and writes h; backward reads a, h, grad_h and writes grad_x, grad_a
    bytes_model=cost_model(lambda p: p["B"] * p["T"] * p["D"] * itemsize(p), fwd=3, fwdbwd=8),
    impls={
        "retain": retain_impl(linear_recurrence, _LR, "retain.ops.linear_recurrence (native kernel)",
                              kernel="linear_recurrence"),
        "eager": eager_impl(linear_recurrence_ref, _LR,
                            "reference loop linear_recurrence_ref over a.unbind(1) (linear-time autograd)"),
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
# gated_delta_rule and delta_rule (memory_scan): S_t = e^{g_t}(I - beta_t k_t k_t^T) S_{t-1}
# + beta_t k_t v_t^T, read out o_t = S_t^T q_t / sqrt(K); delta_rule is the case g = 0
# --------------------------------------------------------------------------------------------


def _output(fn, inputs, params):
    """The op's output ``o`` of its ``(o, final_state)``."""
    return lambda *a: fn(*a)[0]


_GDR = Call(("q", "k", "v", "g", "beta"), grad_out="grad_o", bind=_output)
_DR = Call(("q", "k", "v", "beta"), grad_out="grad_o", bind=_output)
_MEMORY_SCAN_SIZES = {
    "default": {"B": 2, "T": 2048, "H": 4, "K": 64, "V": 64, "dtype": "float32"},
    "small": {"B": 1, "T": 64, "H": 2, "K": 16, "V": 16, "dtype": "float32"},
    # compute-bound whatever the size (the state stays in cache): 256 MiB each of q, k, v
    "large": {"B": 8, "T": 32768, "H": 4, "K": 64, "V": 64, "dtype": "float32"},
}
# multiply-adds of K x V per token and head: 3 forward (error, update, readout), 11 fwd+bwd
_MEMORY_SCAN_FLOPS = cost_model(lambda p: p["K"] * p["V"] * p["B"] * p["T"] * p["H"], fwd=6, fwdbwd=22)


def _describe_memory_scan(p: dict[str, Any]) -> str:
    return f"B={p['B']} T={p['T']} H={p['H']} K={p['K']} V={p['V']} {p['dtype']}"


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


def _gdr_fla_naive(inputs, params, device):
    naive = load_fla_naive()
    # fla's argument order is (q, k, v, beta, g)
    return _GDR.runner(lambda q, k, v, g, beta: naive(q, k, v, beta, g)[0], inputs)


def _gdr_step(S, q_t, k_t, v_t, a_t, b_t, scale: float):
    """One step of the gated delta rule on [B, H, K, V] states (compiled as one graph)."""
    S = S * a_t[..., None, None]
    e = torch.einsum("bhkv,bhk->bhv", S, k_t) - v_t
    S = S - b_t[..., None, None] * k_t[..., :, None] * e[..., None, :]
    return S, torch.einsum("bhkv,bhk->bhv", S, q_t * scale)


def _gdr_compile(inputs, params, device):
    step = fresh_compile(_gdr_step, params, dynamic=False)
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

    return _GDR.runner(scan, inputs)


def _gdr_numba(inputs, params, device):
    _use_numba(device, params)
    fwd = _numba_kernels()["gdr_fwd"]
    arrays = [inputs[n].numpy() for n in _GDR.args]
    scale = params["K"] ** -0.5
    return Runner(lambda: fwd(*arrays, scale), None, torch.from_numpy)


register(Case(
    name="gated_delta_rule",
    family="scan",
    sizes=_MEMORY_SCAN_SIZES,
    make_inputs=_gdr_inputs,
    describe=_describe_memory_scan,
    flops_model=_MEMORY_SCAN_FLOPS,
    impls={
        "retain": retain_impl(gated_delta_rule, _GDR, "retain.ops.gated_delta_rule (native memory_scan kernel)",
                              kernel="memory_scan"),
        "eager": eager_impl(gated_delta_rule_ref, _GDR,
                            "reference loop gated_delta_rule_ref (retain.ops.scan.reference)"),
        "fla-naive": Impl(_gdr_fla_naive, "flash-linear-attention's naive_recurrent_gated_delta_rule (fla-core)"),
        "compile": Impl(_gdr_compile, "torch.compile(fullgraph, inductor) of one step, a Python loop over T; "
                                      "warm-up = cold compile", jit=True),
        "numba": Impl(_gdr_numba, "@njit(parallel=True, fastmath=True) loop, prange over B*H, forward only; "
                                  "warm-up = JIT", jit=True),
        # fla implements no backward for its fused recurrent gated delta rule
        "fla-fused-recurrent": _fla_impl("gated_delta_rule", "fused_recurrent_gated_delta_rule", _GDR,
                                         "flash-linear-attention's fused_recurrent_gated_delta_rule (Triton, "
                                         "CUDA; forward only)", backward=False),
        "fla-chunk": _fla_impl("gated_delta_rule", "chunk_gated_delta_rule", _GDR,
                               "flash-linear-attention's chunk_gated_delta_rule (Triton, CUDA, chunked WY form "
                               "on tensor cores)"),
    },
    grad_names=("grad_q", "grad_k", "grad_v", "grad_g", "grad_beta"),
    model_note="GFLOP/s from the flops model: 6*K*V per token and head forward (error, update, readout: three "
               "K x V multiply-adds); fwd+bwd 22*K*V (eight more K x V multiply-adds in the backward; the "
               "kernel's recomputation of states is not counted)",
    rtol=2e-3, atol=2e-3,
))

register(Case(
    name="delta_rule",
    family="scan",
    sizes=_MEMORY_SCAN_SIZES,
    make_inputs=lambda p, device: {n: x for n, x in _gdr_inputs(p, device).items() if n != "g"},
    describe=_describe_memory_scan,
    flops_model=_MEMORY_SCAN_FLOPS,
    impls={
        "retain": retain_impl(delta_rule, _DR, "retain.ops.delta_rule (native memory_scan kernel)",
                              kernel="memory_scan"),
        "eager": eager_impl(delta_rule_ref, _DR, "reference loop delta_rule_ref (retain.ops.scan.reference)"),
        "fla-fused-recurrent": _fla_impl("delta_rule", "fused_recurrent_delta_rule", _DR,
                                         "flash-linear-attention's fused_recurrent_delta_rule (Triton, CUDA)"),
        "fla-chunk": _fla_impl("delta_rule", "chunk_delta_rule", _DR,
                               "flash-linear-attention's chunk_delta_rule (Triton, CUDA, chunked WY form on "
                               "tensor cores)"),
    },
    grad_names=("grad_q", "grad_k", "grad_v", "grad_beta"),
    model_note="GFLOP/s from the flops model, as gated_delta_rule: 6*K*V per token and head forward, 22*K*V "
               "fwd+bwd",
    rtol=2e-3, atol=2e-3,
))
