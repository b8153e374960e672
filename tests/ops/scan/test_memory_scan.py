"""retain.ops.memory_scan and its named ops (linear_attn, delta_rule, gated_delta_rule,
titans_linear): kernel vs reference for the forward and every gradient, chunk and checkpoint
boundaries, varlen, cached states, dtypes, opcheck, torch.compile, bad input."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import retain
from retain import _native
from retain.ops import delta_rule, gated_delta_rule, linear_attn, memory_scan, titans_linear
from retain.ops.scan import reference as ref
from tests.helpers import KERNEL_DTYPES, assert_bad_input, assert_close

_ops = importlib.import_module("retain.ops.scan.memory_scan")  # the package re-exports the function

# Kernel tests: each runs under every CPU capability this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_capability")

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


CUDA = torch.cuda.is_available() and _native.has_kernel("memory_scan", "cuda")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a GPU and retain built with CUDA kernels (RETAIN_CUDA=ON)")


def make_case(B=2, T=13, H=2, K=5, V=3, *, dtype=F64, gate=None, momentum=False, initial=False, seed=0,
              requires_grad=True, device="cpu"):
    """Inputs of memory_scan in float64, rounded to ``dtype`` and moved to ``device``: keys scaled so
    the delta rule stays stable, gates in (0, 1) as log values, beta and eta in [0, 1)."""
    g_ = gen(seed)
    t = lambda *s, scale=1.0: (torch.randn(s, generator=g_, dtype=F64) * scale)  # noqa: E731
    u = lambda *s: torch.rand(s, generator=g_, dtype=F64)  # noqa: E731
    case = dict(q=t(B, T, H, K), k=t(B, T, H, K, scale=0.4), v=t(B, T, H, V), beta=u(B, T, H) * 0.5)
    if gate == "head":
        case["g"] = -u(B, T, H) * 0.5
    elif gate == "key":
        case["g"] = -u(B, T, H, K) * 0.5
    if momentum:
        case["eta"] = u(B, T, H) * 0.9
    leaf = lambda x: x.to(dtype).to(device).requires_grad_(requires_grad)  # noqa: E731
    case = {name: leaf(x) for name, x in case.items()}
    if initial:  # in the state dtype: float32, float64 for float64 inputs
        state = lambda: t(B, H, K, V).to(_ops.acc_dtype(dtype)).to(device).requires_grad_(requires_grad)  # noqa: E731
        S0 = state()
        case["initial_state"] = (S0, state()) if momentum else S0
    return case


def leaves(case):
    out = []
    for x in case.values():
        out.extend(x if isinstance(x, tuple) else [x])
    return [x for x in out if isinstance(x, torch.Tensor) and x.requires_grad]


def scalar_loss(o, final, states):
    """A loss that weighs every output element differently, so every gradient path is exercised."""
    w = torch.cos(torch.arange(o.numel(), dtype=torch.float64, device=o.device)).reshape(o.shape).to(o.dtype)
    loss = (o * w).sum()
    finals = final if isinstance(final, tuple) else (final,)
    for i, f in enumerate(x for x in finals if x is not None):
        loss = loss + (f * f).sum() * (0.3 + 0.1 * i)
    if states is not None:
        loss = loss + (states * 0.7).sum()
    return loss


def check_memory_scan(case, **kwargs):
    """memory_scan vs memory_scan_ref: o, final state(s), cached states, every input's gradient."""
    args = [case[n] for n in ("q", "k", "v", "beta")]
    extra = {n: case[n] for n in ("g", "eta", "initial_state") if n in case}
    got = memory_scan(*args, **extra, output_final_state=True, **kwargs)
    want = ref.memory_scan_ref(*args, **extra, output_final_state=True, **kwargs)
    assert torch.isfinite(want[0]).all(), "the test case diverges: pick gentler inputs"
    assert got[0].dtype == case["q"].dtype
    assert_close(got[0], want[0], msg="o")
    for a, b in zip(got[1] if isinstance(got[1], tuple) else (got[1],),
                    want[1] if isinstance(want[1], tuple) else (want[1],)):
        assert_close(a, b, msg="final state")
    if kwargs.get("states_every"):
        assert_close(got[2], want[2], msg="states")
    inputs = leaves(case)
    if not inputs:
        return
    g_got = torch.autograd.grad(scalar_loss(*got), inputs, allow_unused=True)
    g_want = torch.autograd.grad(scalar_loss(*want), inputs, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        if b is None:
            assert a is None or not a.any()
            continue
        assert_close(a, b, msg=f"gradient of input {i}")


CONFIGS = list(itertools.product(["dot", "l2", "lp", "huber"], [None, "head", "key"], [False, True], [False, True]))


@pytest.mark.parametrize("objective,gate,momentum,retention_first", CONFIGS,
                         ids=["-".join(map(str, c)) for c in CONFIGS])
def test_memory_scan_matches_reference_float64(objective, gate, momentum, retention_first):
    case = make_case(gate=gate, momentum=momentum, initial=True, seed=len(objective))
    check_memory_scan(case, objective=objective, p=3.0, delta=0.4, retention_first=retention_first)


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_memory_scan_l2norm_and_scale(use_qk_l2norm, scale):
    case = make_case(gate="head", momentum=True, initial=True, seed=3)
    check_memory_scan(case, use_qk_l2norm=use_qk_l2norm, scale=scale)


def test_memory_scan_l2norm_epsilon_is_the_references():
    # |q|^2 and |k|^2 of a few 1e-6: the kernel's epsilon (C++) must be the reference's L2NORM_EPS
    case = make_case(K=4, seed=7)
    with torch.no_grad():
        case["q"].mul_(1e-3)
        case["k"].mul_(1e-3)
    assert case["q"][0, 0, 0].square().sum() < 10 * ref.L2NORM_EPS
    check_memory_scan(case, use_qk_l2norm=True)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_memory_scan_checkpoint_boundaries(T):
    # checkpoints every 64 steps for this K*V: the backward recomputes chunk by chunk
    assert _ops.checkpoint_every(5, 3, F64) == 64
    case = make_case(B=1, T=T, H=1, gate="key", momentum=True, initial=True, seed=T)
    check_memory_scan(case, states_every=7)


def test_memory_scan_small_checkpoint_interval_for_large_heads():
    K = V = 256  # 256*256*8 bytes per state: chunks of 4 states
    C = _ops.checkpoint_every(K, V, F64)
    assert C == 4
    case = make_case(B=1, T=2 * C + 3, H=1, K=K, V=V, gate="head", momentum=True, seed=5)
    check_memory_scan(case)


@given(
    B=st.integers(1, 2), T=st.sampled_from([1, 2, 7, 33]), H=st.integers(1, 2),
    K=st.sampled_from([1, 4, 17, 65]), V=st.sampled_from([1, 3, 16, 33]),
    objective=st.sampled_from(["dot", "l2", "lp", "huber"]), gate=st.sampled_from([None, "head", "key"]),
    momentum=st.booleans(), initial=st.booleans(), retention_first=st.booleans(), l2norm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_memory_scan_hypothesis(B, T, H, K, V, objective, gate, momentum, initial, retention_first, l2norm, seed):
    case = make_case(B, T, H, K, V, gate=gate, momentum=momentum, initial=initial, seed=seed)
    check_memory_scan(case, objective=objective, p=1.5, delta=0.3, retention_first=retention_first,
                      use_qk_l2norm=l2norm, states_every=3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("momentum", [False, True])
def test_memory_scan_low_precision(dtype, momentum, device):
    case = make_case(B=1, T=20, H=2, K=8, V=8, dtype=dtype, gate="head", momentum=momentum, initial=True, seed=7,
                     device=device)
    check_memory_scan(case)
    o, S, _ = memory_scan(case["q"], case["k"], case["v"], case["beta"], output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32 and o.device.type == device


def test_memory_scan_gates_at_extremes():
    # beta = 0 leaves the memory untouched; g -> -inf wipes it every step; eta = 0 is no momentum
    case = make_case(B=1, T=9, H=1, initial=True, seed=11)
    q, k, v, beta, S0 = case["q"], case["k"], case["v"], case["beta"], case["initial_state"]
    _, S, _ = memory_scan(q, k, v, torch.zeros_like(beta), initial_state=S0, output_final_state=True)
    assert_close(S, S0)
    g = torch.full(beta.shape, float("-inf"), dtype=F64)
    o, S, _ = memory_scan(q, k, v, beta, g=g, objective="dot", initial_state=S0, output_final_state=True)
    kv_last = beta[:, -1, :, None, None] * k[:, -1, :, :, None] * v[:, -1, :, None, :]
    assert_close(S, kv_last)
    o0, S0_, _ = memory_scan(q, k, v, beta, eta=0.0, output_final_state=True)
    o1, S1, _ = memory_scan(q, k, v, beta, output_final_state=True)
    assert_close(o0, o1)
    assert_close(S0_[0], S1)
    check_memory_scan(dict(case, beta=torch.zeros_like(beta).requires_grad_()))


def test_memory_scan_varlen_equals_separate_sequences():
    lengths = [5, 0, 9, 1]
    T = sum(lengths)
    case = make_case(B=1, T=T, H=2, gate="key", momentum=True, seed=13)
    N = len(lengths)
    S0 = torch.randn(N, 2, 5, 3, dtype=F64, requires_grad=True)
    Z0 = torch.randn(N, 2, 5, 3, dtype=F64, requires_grad=True)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)))
    case["initial_state"] = (S0, Z0)
    check_memory_scan(case, cu_seqlens=cu, states_every=2)
    o, (S, Z), st_ = memory_scan(case["q"], case["k"], case["v"], case["beta"], g=case["g"], eta=case["eta"],
                                 initial_state=(S0, Z0), output_final_state=True, cu_seqlens=cu, states_every=2)
    assert st_.shape == (1, sum(n // 2 for n in lengths), 2, 5, 3)
    for n in range(N):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        cut = {name: case[name][:, sl] for name in ("q", "k", "v", "beta", "g", "eta")}
        o_n, (S_n, Z_n), _ = memory_scan(cut.pop("q"), cut.pop("k"), cut.pop("v"), cut.pop("beta"), **cut,
                                         initial_state=(S0[n:n + 1], Z0[n:n + 1]), output_final_state=True)
        assert_close(o[:, sl], o_n)
        assert_close(S[n:n + 1], S_n)
        assert_close(Z[n:n + 1], Z_n)


def test_memory_scan_split_with_state_passing_equals_one_call():
    case = make_case(B=2, T=20, gate="head", momentum=True, seed=17, requires_grad=False)
    full_o, full_final, _ = memory_scan(case["q"], case["k"], case["v"], case["beta"], g=case["g"],
                                        eta=case["eta"], output_final_state=True)
    half = {n: (x[:, :11], x[:, 11:]) for n, x in case.items()}
    o1, st1, _ = memory_scan(*(half[n][0] for n in ("q", "k", "v", "beta")), g=half["g"][0], eta=half["eta"][0],
                             output_final_state=True)
    o2, st2, _ = memory_scan(*(half[n][1] for n in ("q", "k", "v", "beta")), g=half["g"][1], eta=half["eta"][1],
                             initial_state=st1, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), full_o)
    assert_close(st2[0], full_final[0])
    assert_close(st2[1], full_final[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_memory_scan_same_bits_for_any_thread_count(threads):
    case = make_case(B=2, T=70, H=3, K=16, V=16, dtype=torch.float32, gate="head", momentum=True, seed=19)
    args = [case[n] for n in ("q", "k", "v", "beta")]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o1 = memory_scan(*args, g=case["g"], eta=case["eta"])[0]
        g1 = torch.autograd.grad(o1.sum(), args)
        torch.set_num_threads(threads)
        o2 = memory_scan(*args, g=case["g"], eta=case["eta"])[0]
        g2 = torch.autograd.grad(o2.sum(), args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_memory_scan_empty_sequence(device):
    case = make_case(B=2, T=0, initial=True, seed=23, device=device)
    o, S, _ = memory_scan(case["q"], case["k"], case["v"], case["beta"], initial_state=case["initial_state"],
                          output_final_state=True)
    assert o.shape == (2, 0, 2, 3)
    assert_close(S, case["initial_state"])
    (gS,) = torch.autograd.grad((S * 2).sum(), case["initial_state"])
    assert_close(gS, torch.full_like(gS, 2.0))


NAMED = [
    ("linear_attn", lambda c: linear_attn(c["q"], c["k"], c["v"], g=c.get("g"), output_final_state=True),
     lambda c: ref.linear_attn_ref(c["q"], c["k"], c["v"], g=c.get("g"), output_final_state=True)),
    ("delta_rule", lambda c: delta_rule(c["q"], c["k"], c["v"], c["beta"], output_final_state=True),
     lambda c: ref.delta_rule_ref(c["q"], c["k"], c["v"], c["beta"], output_final_state=True)),
    ("gated_delta_rule",
     lambda c: gated_delta_rule(c["q"], c["k"], c["v"], c["g"], c["beta"], output_final_state=True,
                                use_qk_l2norm=True),
     lambda c: ref.gated_delta_rule_ref(c["q"], c["k"], c["v"], c["g"], c["beta"], output_final_state=True,
                                        use_qk_l2norm=True)),
    ("titans_linear",
     lambda c: titans_linear(c["q"], c["k"], c["v"], c["beta"], 1 - c["g"].exp(), c["eta"], output_final_state=True),
     lambda c: ref.titans_linear_ref(c["q"], c["k"], c["v"], c["beta"], 1 - c["g"].exp(), c["eta"],
                                     output_final_state=True)),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("name,op,op_ref", NAMED, ids=[n[0] for n in NAMED])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_named_ops_match_their_references(name, op, op_ref, dtype, device):
    case = make_case(B=2, T=11, H=2, K=6, V=4, dtype=dtype, gate="head", momentum=True, seed=29, device=device)
    got, want = op(case), op_ref(case)
    assert_close(got[0], want[0])
    flat = lambda s: list(s) if isinstance(s, tuple) else [s]  # noqa: E731
    for a, b in zip(flat(got[1]), flat(want[1])):
        assert_close(a, b)
    inputs = leaves(case)
    g_got = torch.autograd.grad(scalar_loss(got[0], got[1], None), inputs, allow_unused=True)
    g_want = torch.autograd.grad(scalar_loss(want[0], want[1], None), inputs, allow_unused=True)
    for a, b in zip(g_got, g_want):
        if b is not None:
            assert_close(a, b)


def test_titans_alpha_one_wipes_memory_with_finite_gradient():
    case = make_case(B=1, T=6, H=1, momentum=True, seed=31)
    alpha = torch.ones(1, 6, 1, dtype=F64, requires_grad=True)
    o, (S, Z), = titans_linear(case["q"], case["k"], case["v"], case["beta"], alpha, case["eta"],
                               output_final_state=True)[:1] + (titans_linear(
                                   case["q"], case["k"], case["v"], case["beta"], alpha, case["eta"],
                                   output_final_state=True)[1],)
    assert_close(S, Z)
    (g_alpha,) = torch.autograd.grad(scalar_loss(o, (S, Z), None), alpha)
    assert torch.isfinite(g_alpha).all()


def test_delta_rule_recalls_orthonormal_keys():
    K = 8
    keys = torch.linalg.qr(torch.randn(K, K, generator=gen(37), dtype=F64))[0]
    k = keys[:6].reshape(1, 6, 1, K)
    v = torch.randn(1, 6, 1, 4, generator=gen(38), dtype=F64)
    _, S = delta_rule(k, k, v, 1.0, output_final_state=True)
    assert_close(torch.einsum("kv,tk->tv", S[0, 0], k[0, :, 0]), v[0, :, 0])


@pytest.mark.parametrize("momentum", [False, True])
def test_memory_scan_opcheck(momentum):
    c = make_case(B=1, T=5, H=2, K=3, V=2, gate="key", momentum=momentum, initial=True, seed=41)
    S0, Z0 = c["initial_state"] if momentum else (c["initial_state"], None)
    args = (c["q"], c["k"], c["v"], c["beta"], c["g"], c.get("eta"), S0, Z0, None, 1, 3.0, 1.0, 0.5, True, False,
            True, 2, 2, True)
    torch.library.opcheck(_ops.memory_scan_op, args)
    o, S, Z, states, ckS, ckZ = _ops.memory_scan_op(*args)
    d = lambda x: None if x is None else x.detach()  # noqa: E731
    bargs = (torch.randn_like(o), torch.randn_like(S), torch.randn_like(Z) if momentum else None,
             torch.randn_like(states), *(d(x) for x in args[:9]), ckS, ckZ, 1, 3.0, 1.0, 0.5, True, False, True, 2, 2)
    torch.library.opcheck(_ops.memory_scan_backward_op, bargs)


def test_memory_scan_torch_compile_fullgraph():
    torch._dynamo.reset()

    def model(q, k, v, beta_logit, g, eta):
        o, (S, Z), states = memory_scan(q, k, v, torch.sigmoid(beta_logit), g=g, eta=eta,
                                        output_final_state=True, states_every=4)
        return o.square().mean() + S.sum() * 0.1 + states.mean()

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    c = make_case(B=1, T=12, H=2, K=4, V=4, dtype=torch.float32, gate="head", momentum=True, seed=43)
    args = (c["q"], c["k"], c["v"], c["beta"], c["g"], c["eta"])
    got, want = compiled(*args), model(*args)
    assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        assert_close(a, b)


def _bad(**over):
    c = make_case(B=1, T=4, H=2, K=3, V=2, seed=53, requires_grad=False)
    c.update(over)
    return c


BAD_INPUTS = [
    ("q not 4-D", dict(q=torch.zeros(1, 4, 3)), ValueError, "q must have 4 dimensions"),
    ("k shape", dict(k=torch.zeros(1, 4, 2, 4, dtype=F64)), ValueError, r"k must have shape \(1, 4, 2, 3\)"),
    ("v shape", dict(v=torch.zeros(1, 5, 2, 2, dtype=F64)), ValueError,
     r"v must have shape \(1, 4, H, V\) with H a multiple of q's 2 heads .*got \(1, 5, 2, 2\)"),
    ("v heads", dict(v=torch.zeros(1, 4, 3, 2, dtype=F64)), ValueError,
     r"v must have shape \(1, 4, H, V\) with H a multiple of q's 2 heads .*got \(1, 4, 3, 2\)"),
    ("dtype mix", dict(v=torch.zeros(1, 4, 2, 2)), TypeError, "v must have q's dtype float64, got float32"),
    ("integer q", dict(q=torch.zeros(1, 4, 2, 3, dtype=torch.long)), TypeError, "q must be a floating tensor"),
    ("beta shape", dict(beta=torch.zeros(1, 4, 3, dtype=F64)), ValueError, r"beta must have shape \(1, 4, 2\)"),
    ("g shape", dict(g=torch.zeros(1, 4, 2, 2, dtype=F64)), ValueError, r"g must have shape \(1, 4, 2\) \(per head\)"),
    ("eta device", dict(eta=torch.zeros(1, 4, 2, dtype=F64, device="meta")), ValueError,
     "eta must be on q's device cpu, got meta"),
    ("objective", dict(objective="l3"), ValueError, "objective must be one of"),
    ("lp p", dict(objective="lp", p=0.5), ValueError, "p must be >= 1"),
    ("huber delta", dict(objective="huber", delta=0.0), ValueError, "delta must be > 0"),
    ("initial shape", dict(initial_state=torch.zeros(1, 2, 3, 3)), ValueError,
     r"initial_state must have shape \(1, 2, 3, 2\)"),
    ("Z0 without eta", dict(initial_state=(torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, 2))), ValueError,
     "initial_state has a momentum state Z0 but eta is None"),
    ("cu_seqlens B", dict(q=torch.zeros(2, 4, 2, 3, dtype=F64), k=torch.zeros(2, 4, 2, 3, dtype=F64),
                          v=torch.zeros(2, 4, 2, 2, dtype=F64), beta=torch.zeros(2, 4, 2, dtype=F64),
                          cu_seqlens=torch.tensor([0, 4])), ValueError, "cu_seqlens requires B == 1"),
    ("cu_seqlens end", dict(cu_seqlens=torch.tensor([0, 2, 3])), ValueError,
     r"cu_seqlens must start at 0, never decrease and end at T = 4, got \[0, 2, 3\]"),
    ("cu_seqlens order", dict(cu_seqlens=torch.tensor([0, 3, 2, 4])), ValueError, r"cu_seqlens must start at 0, never decrease.*got \[0, 3, 2, 4\]"),
    ("cu_seqlens dtype", dict(cu_seqlens=torch.tensor([0.0, 4.0])), TypeError, "cu_seqlens must be int32 or int64"),
    ("states_every", dict(states_every=0), ValueError, "states_every must be >= 1, got 0"),
    ("states_every float", dict(states_every=2.0), TypeError, "states_every must be an integer, got float 2.0"),
    ("beta None", dict(beta=None), TypeError, "beta .the step size. must be a tensor .B, T, H. or a Python number, got None"),
    ("beta string", dict(beta="0.5"), TypeError, "beta must be a real number, got str '0.5'"),
    ("integer beta", dict(beta=torch.zeros(1, 4, 2, dtype=torch.long)), TypeError, "beta must be a floating tensor"),
    ("objective list", dict(objective=["l2"]), ValueError, r"objective must be one of .*got \['l2'\] \(list\)"),
    ("p string", dict(objective="lp", p="3"), TypeError, "p must be a real number, got str '3'"),
    ("p nan", dict(objective="lp", p=float("nan")), ValueError, "p must be finite, got nan"),
    ("scale string", dict(scale="half"), TypeError, "scale must be a real number, got str 'half'"),
    ("l2norm string", dict(use_qk_l2norm="yes"), TypeError, "use_qk_l2norm must be True or False, got str 'yes'"),
    ("cu_seqlens meta", dict(cu_seqlens=torch.tensor([0, 4], device="meta")), ValueError,
     "cu_seqlens must hold offsets .* got a tensor on the meta device"),
    ("head dim", dict(q=torch.zeros(1, 4, 2, 1025, dtype=F64), k=torch.zeros(1, 4, 2, 1025, dtype=F64)), ValueError,
     r"head dimension K must be in \[1, 1024\], got 1025"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_memory_scan_bad_input(case):
    assert_bad_input("retain.ops.memory_scan", lambda q, k, v, beta, **kw: memory_scan(q, k, v, beta, **kw),
                     _bad(), case)


def test_named_op_errors_name_the_named_op():
    c = _bad()
    with pytest.raises(ValueError, match=r"retain\.ops\.gated_delta_rule: g must have shape"):
        gated_delta_rule(c["q"], c["k"], c["v"], torch.zeros(3, dtype=F64), c["beta"])


def test_titans_errors_name_theta_and_alpha():
    """titans_linear's step size and forgetting gate are named as the caller passed them, not as
    memory_scan's beta and g."""
    c = _bad()
    ok, bad = torch.zeros(1, 4, 2, dtype=F64), torch.zeros(1, 3, 2, dtype=F64)
    for args, name in (((bad, ok, ok), "theta"), ((ok, bad, ok), "alpha"), ((ok, ok, bad), "eta")):
        with pytest.raises(ValueError, match=rf"retain\.ops\.titans_linear: {name} must have shape"):
            titans_linear(c["q"], c["k"], c["v"], *args)
    with pytest.raises(TypeError, match=r"retain\.ops\.titans_linear: alpha must be a real number, got str"):
        titans_linear(c["q"], c["k"], c["v"], 0.5, "0.1", 0.0)


@pytest.mark.parametrize("shape", [(0, 4, 2, 3), (1, 4, 0, 3)], ids=["B=0", "H=0"])
def test_empty_batch_or_heads_with_grad(shape):
    """No rows to scan: the forward and backward run and every gradient is empty (the backward
    used to ask for checkpoints an empty forward has none of)."""
    q = torch.randn(*shape, dtype=F64, requires_grad=True)
    k, v = torch.randn(*shape, dtype=F64), torch.randn(*shape[:3], 2, dtype=F64, requires_grad=True)
    o, _ = gated_delta_rule(q, k, v, torch.zeros(shape[:3], dtype=F64), torch.full(shape[:3], 0.5, dtype=F64))
    o.sum().backward()
    assert o.shape == (*shape[:3], 2) and q.grad.shape == q.shape and v.grad.shape == v.shape


# CUDA kernel (memory_scan_cuda.cu) --------------------------------------------------------------


def cuda_case(*args, **kwargs):
    return make_case(*args, device="cuda", **kwargs)


@cuda_only
def test_memory_scan_cuda_is_listed():
    assert "cuda" in retain.capabilities()["kernels"]["memory_scan"]


@cuda_only
@pytest.mark.parametrize("objective,gate,momentum,retention_first", CONFIGS,
                         ids=["-".join(map(str, c)) for c in CONFIGS])
def test_memory_scan_cuda_matches_reference_float64(objective, gate, momentum, retention_first):
    case = cuda_case(gate=gate, momentum=momentum, initial=True, seed=len(objective))
    check_memory_scan(case, objective=objective, p=3.0, delta=0.4, retention_first=retention_first, states_every=4)


# K and V across the kernel's geometries: rows per thread 8/16/32, threads per column 1..8, one or
# several V tiles with ghost columns in the last, chunks of 64 and of 16 steps (K = V = 128 in float64)
CUDA_SHAPES = [(1, 1), (5, 3), (8, 33), (17, 100), (64, 64), (65, 40), (128, 128), (129, 7), (256, 20)]


@cuda_only
@pytest.mark.parametrize("K,V", CUDA_SHAPES, ids=[f"K{k}-V{v}" for k, v in CUDA_SHAPES])
@pytest.mark.parametrize("objective", ["l2", "lp"])
def test_memory_scan_cuda_head_dims(K, V, objective):
    case = cuda_case(B=2, T=70, H=2, K=K, V=V, gate="key", momentum=True, initial=True, seed=K + V)
    check_memory_scan(case, objective=objective, p=2.5, use_qk_l2norm=True, states_every=5)


@cuda_only
@pytest.mark.parametrize("use_qk_l2norm", [False, True])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_memory_scan_cuda_l2norm_and_scale(use_qk_l2norm, scale):
    case = cuda_case(gate="head", momentum=True, initial=True, seed=3)
    check_memory_scan(case, use_qk_l2norm=use_qk_l2norm, scale=scale)


@cuda_only
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_memory_scan_cuda_checkpoint_boundaries(T):
    case = cuda_case(B=1, T=T, H=1, gate="key", momentum=True, initial=True, seed=T)
    check_memory_scan(case, states_every=7)


@cuda_only
@pytest.mark.parametrize("momentum", [False, True])
def test_memory_scan_cuda_varlen(momentum):
    lengths = [5, 0, 9, 1, 70]  # an empty sequence, one step, one across a checkpoint
    T = sum(lengths)
    case = cuda_case(B=1, T=T, H=2, K=6, V=40, gate="head", momentum=momentum, seed=13)
    N = len(lengths)
    state = lambda: torch.randn(N, 2, 6, 40, dtype=F64, device="cuda", requires_grad=True)  # noqa: E731
    case["initial_state"] = (state(), state()) if momentum else state()
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), device="cuda")
    check_memory_scan(case, cu_seqlens=cu, states_every=2, retention_first=True, use_qk_l2norm=True)


def _run_all(case, **kwargs):
    """Outputs and every gradient of one memory_scan call (for comparing runs)."""
    args = [case[n] for n in ("q", "k", "v", "beta")]
    extra = {n: case[n] for n in ("g", "eta", "initial_state") if n in case}
    o, final, states = memory_scan(*args, **extra, output_final_state=True, **kwargs)
    grads = torch.autograd.grad(scalar_loss(o, final, states), leaves(case))
    finals = final if isinstance(final, tuple) else (final,)
    return [o, *finals, *([states] if states is not None else []), *grads]


@cuda_only
def test_memory_scan_cuda_matches_cpu_kernel():
    kw = dict(B=2, T=150, H=3, K=32, V=48, gate="key", momentum=True, initial=True, seed=59)
    opts = dict(use_qk_l2norm=True, retention_first=True, states_every=16, objective="huber", delta=0.5)
    for a, b in zip(_run_all(cuda_case(**kw), **opts), _run_all(make_case(**kw), **opts)):
        assert_close(a, b)


@cuda_only
def test_memory_scan_cuda_same_bits_every_run_and_stream():
    case = cuda_case(B=2, T=100, H=2, K=64, V=64, dtype=torch.float32, gate="key", momentum=True, seed=61)
    first = _run_all(case, states_every=10)
    again = _run_all(case, states_every=10)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = _run_all(case, states_every=10)
    torch.cuda.current_stream().wait_stream(side)
    for a, b, c in zip(first, again, on_side):
        assert torch.equal(a, b) and torch.equal(a, c)


@cuda_only
def test_memory_scan_cuda_opcheck_and_compile():
    c = cuda_case(B=1, T=5, H=2, K=3, V=2, gate="key", momentum=True, initial=True, seed=41)
    S0, Z0 = c["initial_state"]
    args = (c["q"], c["k"], c["v"], c["beta"], c["g"], c["eta"], S0, Z0, None, 1, 3.0, 1.0, 0.5, True, False,
            True, 2, 2, True)
    torch.library.opcheck(_ops.memory_scan_op, args)
    torch._dynamo.reset()

    def model(q, k, v, beta, g, eta):
        o, (S, Z), states = memory_scan(q, k, v, beta, g=g, eta=eta, output_final_state=True, states_every=2)
        return o.square().mean() + S.sum() * 0.1 + states.mean()

    args = (c["q"], c["k"], c["v"], c["beta"], c["g"], c["eta"])
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = compiled(*args), model(*args)
    assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        assert_close(a, b)


@cuda_only
def test_memory_scan_cuda_head_dim_limit():
    q = torch.zeros(1, 2, 1, 257, device="cuda")
    v = torch.zeros(1, 2, 1, 4, device="cuda")
    with pytest.raises(ValueError, match=r"retain\.ops\.memory_scan: head dimension K must be <= 256 for CUDA "
                                         r"tensors .*got 257"):
        memory_scan(q, q, v, 0.5)


def grouped_case(HK=2, r=2, **kwargs):
    """make_case with H = r * HK value heads and q, k cut to HK key heads (grouped value heads)."""
    c = make_case(H=HK * r, **kwargs)
    for name in ("q", "k"):
        c[name] = c[name].detach()[:, :, :HK].clone().requires_grad_(c[name].requires_grad)
    return c


@pytest.mark.parametrize("gate,momentum,l2norm,r", [(None, False, False, 2), ("head", False, True, 2),
                                                     ("key", True, False, 3), ("head", True, True, 4)])
def test_memory_scan_grouped_value_heads_match_the_reference(gate, momentum, l2norm, r):
    """Value head h reads key head h // r (fla's grouped value heads); the gradients of q and k sum
    over each key head's group."""
    c = grouped_case(HK=2, r=r, T=23, gate=gate, momentum=momentum, initial=True, seed=61)
    check_memory_scan(c, use_qk_l2norm=l2norm, states_every=5)


def test_memory_scan_grouped_value_heads_equal_repeated_keys():
    c = grouped_case(HK=1, r=3, B=1, T=70, gate="head", seed=62)
    args = [c[n] for n in ("q", "k", "v", "beta")]
    o, S, _ = memory_scan(*args, g=c["g"], output_final_state=True)
    rep = [c["q"].repeat_interleave(3, 2), c["k"].repeat_interleave(3, 2), c["v"], c["beta"]]
    o2, S2, _ = memory_scan(*rep, g=c["g"], output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(S, S2)
    grads = torch.autograd.grad(scalar_loss(o, S, None), args)
    grads2 = torch.autograd.grad(scalar_loss(o2, S2, None), [c["q"], c["k"], c["v"], c["beta"]])
    for a, b in zip(grads, grads2):
        assert_close(a, b)


def test_memory_scan_grouped_value_heads_varlen():
    c = grouped_case(HK=2, r=2, B=1, T=17, gate="key", seed=63)
    check_memory_scan(c, cu_seqlens=torch.tensor([0, 5, 5, 17]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_memory_scan_float32_gates_with_16_bit_data(dtype):
    """transformers and fla pass float32 g and beta with bfloat16 q, k, v: the gates are read as
    given (no rounding to 16 bits), their gradients come back in float32."""
    c = make_case(B=1, T=19, H=2, K=4, V=3, gate="head", seed=64)
    data = {n: c[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v")}
    gates = {n: c[n].detach().float().requires_grad_() for n in ("beta", "g")}
    o, S, _ = memory_scan(data["q"], data["k"], data["v"], gates["beta"], g=gates["g"], output_final_state=True)
    want, S_want, _ = ref.memory_scan_ref(*(data[n].double() for n in ("q", "k", "v")), gates["beta"].double(),
                                       g=gates["g"].double(), output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert_close(o, want.to(dtype))
    assert_close(S, S_want.float())
    o.float().square().sum().backward()
    assert gates["beta"].grad.dtype == gates["g"].grad.dtype == torch.float32
    assert data["q"].grad.dtype == dtype
    assert torch.isfinite(gates["g"].grad).all() and gates["g"].grad.abs().sum() > 0


def test_memory_scan_opcheck_grouped_value_heads_and_float32_gates():
    c = grouped_case(HK=1, r=2, B=1, T=5, K=3, V=2, gate="head", seed=65)
    q, k, v = (c[n].detach().bfloat16().requires_grad_() for n in ("q", "k", "v"))
    beta, g = (c[n].detach().float().requires_grad_() for n in ("beta", "g"))
    args = (q, k, v, beta, g, None, None, None, None, 1, 3.0, 1.0, 0.5, True, False, True, 0, 0, True)
    torch.library.opcheck(_ops.memory_scan_op, args)


def test_titans_number_alpha_with_grouped_heads_and_16_bit_data():
    """A Python-number alpha is one gate per value head, in the state dtype: with bfloat16 data a
    small alpha still forgets (1 - 0.001 is not rounded to 1)."""
    c = grouped_case(HK=1, r=2, B=1, T=30, K=4, V=3, seed=66, requires_grad=False)
    q, k, v = (c[n].bfloat16() for n in ("q", "k", "v"))
    o, (S, _) = titans_linear(q, k, v, 0.5, 0.001, 0.1, output_final_state=True)
    alpha = torch.full(v.shape[:3], 0.001, dtype=torch.float32)
    o2, (S2, _) = titans_linear(q, k, v, 0.5, alpha, 0.1, output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(S, S2)
