"""retain.ops.cached_readout's kernel against the materialising reference, beyond the contract test:
every dtype and mode, shapes at the kernel's boundaries (T not a multiple of L, one segment, L = 1,
token chunks of the state pass, head dimensions that are not whole vectors), hypothesis over shapes
and top_k, causality of every mode, the gradients of states no token reads, sparse top-1 by hand,
NaN, and every bad-input error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retain.ops import cached_readout, segment_mean
from retain.ops.cache.reference import cached_readout_ref
from tests.helpers import KERNEL_DTYPES, assert_bad_input, assert_close, cuda_kernels_usable

pytestmark = pytest.mark.usefixtures("cpu_capability")

F64 = torch.float64
NAMES = ("q", "u", "states", "seg_keys", "o_online", "online_keys")
MODES = [("residual", None), ("gated", None), ("soup", None), ("sparse", 1), ("sparse", 2), ("sparse", 50)]


def make(seed, B=2, T=11, H=2, K=5, V=4, L=3, extra=0, dtype=F64):
    """Inputs by name: NS = the states the tokens read + `extra` that nothing reads."""
    g = torch.Generator().manual_seed(seed)
    ns = max(-(-T // L) - 1, 0) + extra
    k = torch.randn(B, T, H, K, generator=g, dtype=F64)

    def r(*shape, s=1.0):
        return (torch.randn(shape, generator=g, dtype=F64) * s).to(dtype)

    return dict(q=r(B, T, H, K), u=r(B, T, H, K), states=r(B, ns, H, K, V, s=0.5),
                seg_keys=segment_mean(k, L)[:, :ns].contiguous().to(dtype) if ns <= -(-T // L) else r(B, ns, H, K),
                o_online=r(B, T, H, V), online_keys=segment_mean(k, L, causal=True).to(dtype))


def call(fn, d, L, mode, top_k):
    return fn(d["q"], d["u"], d["states"], d["seg_keys"], d["o_online"], online_keys=d["online_keys"],
              segment_len=L, mode=mode, top_k=top_k)


def outputs_and_grads(fn, d, L, mode, top_k, seed=7, w_dtype=None):
    """y and the gradients of <w, y> for a random w (rounded to ``w_dtype``, so a 16-bit kernel and
    its float64 reference get the same w)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in d.items()}
    y = call(fn, leaves, L, mode, top_k)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    w = w.to(w_dtype or y.dtype).to(y.dtype)
    grads = torch.autograd.grad((y * w).sum(), list(leaves.values()), allow_unused=True)
    return y, dict(zip(leaves, grads))


def check_against_reference(d, L, mode, top_k):
    """The kernel's output and gradients in d's dtype against the reference in float64 of the same
    (rounded) inputs, compared at d's dtype's tolerance."""
    y, grads = outputs_and_grads(cached_readout, d, L, mode, top_k)
    d64 = {n: t.to(F64) for n, t in d.items()}
    y_ref, grads_ref = outputs_and_grads(cached_readout_ref, d64, L, mode, top_k, w_dtype=d["q"].dtype)
    dtype = d["q"].dtype
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref.to(dtype), msg=f"y ({mode})")
    for n in NAMES:
        want = grads_ref[n]
        if mode == "residual" and n in ("u", "seg_keys", "online_keys"):
            assert grads[n] is None, n  # residual reads neither router nor summaries
            continue
        if want is None:  # the reference never touched it (e.g. no state is read)
            want = torch.zeros_like(d64[n])
        assert grads[n] is not None and grads[n].dtype == dtype, n
        assert_close(grads[n], want.to(dtype), msg=f"grad {n} ({mode})")


SHAPES = [
    dict(B=2, T=11, H=2, K=5, V=4, L=3),            # T not a multiple of L, tiny heads
    dict(B=1, T=40, H=3, K=20, V=19, L=8, extra=2),  # heads not whole vectors, states nobody reads
    dict(B=1, T=33, H=1, K=64, V=64, L=4),           # whole vectors, many segments
    dict(B=1, T=7, H=2, K=3, V=5, L=1),              # every token its own segment
    dict(B=2, T=5, H=1, K=4, V=4, L=8),              # one segment: nothing cached (NS = 0)
    dict(B=1, T=600, H=1, K=8, V=16, L=50),          # many segments and states
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s.values()))
@pytest.mark.parametrize("mode,top_k", MODES, ids=lambda m: str(m))
def test_every_mode_matches_the_reference_at_the_kernel_boundaries(shape, mode, top_k):
    check_against_reference(make(0, **shape), shape["L"], mode, top_k)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("mode,top_k", [("residual", None), ("gated", None), ("sparse", 2)], ids=str)
def test_every_dtype(dtype, mode, top_k):
    check_against_reference(make(1, B=1, T=26, H=2, K=16, V=24, L=5, dtype=dtype), 5, mode, top_k)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 2), T=st.integers(1, 20), H=st.integers(1, 2),
       K=st.integers(1, 9), V=st.integers(1, 9), L=st.integers(1, 6), extra=st.integers(0, 2),
       mode=st.sampled_from(["residual", "gated", "sparse"]), top_k=st.integers(1, 4))
def test_hypothesis_shapes_and_top_k(seed, B, T, H, K, V, L, extra, mode, top_k):
    check_against_reference(make(seed, B=B, T=T, H=H, K=K, V=V, L=L, extra=extra), L, mode,
                            top_k if mode == "sparse" else None)


@pytest.mark.parametrize("mode,top_k", MODES, ids=str)
def test_causal_a_later_token_or_state_never_changes_an_earlier_output(mode, top_k):
    L, T = 3, 13
    d = make(2, T=T, L=L)
    y = call(cached_readout, d, L, mode, top_k)
    for t in (0, 4, 9, 12):  # a token's own inputs reach outputs t' >= t only
        e = {n: v.clone() for n, v in d.items()}
        for n in ("q", "u", "o_online", "online_keys"):
            e[n][:, t] += 10.0
        changed = call(cached_readout, e, L, mode, top_k)
        assert torch.equal(changed[:, :t], y[:, :t]), t
        assert not torch.equal(changed[:, t], y[:, t]), t
    for i in range(d["states"].shape[1]):  # state i reaches the segments after i only
        e = {n: v.clone() for n, v in d.items()}
        e["states"][:, i] += 10.0
        e["seg_keys"][:, i] += 1.0
        changed = call(cached_readout, e, L, mode, top_k)
        assert torch.equal(changed[:, :(i + 1) * L], y[:, :(i + 1) * L]), i


@pytest.mark.parametrize("mode,top_k", [("residual", None), ("gated", None), ("sparse", 1)], ids=str)
def test_states_no_token_reads_get_zero_gradients(mode, top_k):
    d = make(3, T=10, L=4, extra=3)  # 3 segments read states 0, 1; states 2..4 are read by nobody
    _, grads = outputs_and_grads(cached_readout, d, 4, mode, top_k)
    assert grads["states"][:, 2:].abs().sum() == 0 and grads["states"][:, :2].abs().sum() > 0
    if mode != "residual":
        assert grads["seg_keys"][:, 2:].abs().sum() == 0 and grads["seg_keys"][:, :2].abs().sum() > 0


def test_sparse_top_1_reads_the_best_cached_segment_by_hand():
    L = 2
    d = make(4, B=1, T=9, H=1, K=3, V=2, L=L)
    y = call(cached_readout, d, L, "sparse", 1)
    q, u, S, c, o, ok = (d[n][0, :, 0] if d[n].dim() == 4 else d[n][0, :, 0] for n in NAMES)
    for t in range(9):
        s = t // L
        if s == 0:
            assert_close(y[0, t, 0], o[t])
            continue
        best = int(torch.argmax(c[:s] @ u[t]))
        z = torch.stack([c[best] @ u[t], ok[t] @ u[t]])
        gam = torch.softmax(z, 0)
        want = gam[0] * (S[best].T @ (q[t] * 3 ** -0.5)) + gam[1] * o[t]
        assert_close(y[0, t, 0], want)


@pytest.mark.parametrize("mode,top_k", [("residual", None), ("gated", None), ("sparse", 1)], ids=str)
def test_nan_in_a_token_gives_nan_out_there_only(mode, top_k):
    d = make(5, T=9, L=3)
    d["q"][0, 7, 1, 0] = float("nan")
    y = call(cached_readout, d, 3, mode, top_k)
    assert y[0, 7, 1].isnan().all()  # token 7 (segment 2) reads states through q
    y[0, 7, 1] = 0
    assert not y.isnan().any()
    d = make(5, T=9, L=3)
    d["states"][0, 0, 0, 1, 2] = float("nan")  # state 0: read by segments 1 and 2 (residual, gated)
    y = call(cached_readout, d, 3, mode, top_k)
    assert not y[:, :3].isnan().any() and not y[1].isnan().any()  # segment 0 and batch 1 read no NaN
    if mode != "sparse":
        assert y[0, 3:, 0, 2].isnan().all()
    else:  # top-1: exactly the tokens of head 0 whose pick is state 0 see it
        z = torch.einsum("thk,ihk->tih", d["u"][0], d["seg_keys"][0])[:, :, 0]  # [T, NS] logits of head 0
        picks_0 = torch.tensor([t >= 3 and int(z[t, :t // 3].argmax()) == 0 for t in range(9)])
        assert torch.equal(y[0, :, 0, 2].isnan(), picks_0)


def test_soup_is_gated():
    d = make(6, T=17, L=4)
    assert torch.equal(call(cached_readout, d, 4, "soup", None), call(cached_readout, d, 4, "gated", None))


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_ties_go_to_the_lower_segment_in_kernel_and_reference(top_k):
    d = make(13, B=1, T=16, H=1, K=3, V=2, L=4)  # 3 cached states, equal summaries: every logit ties
    d["seg_keys"] = d["seg_keys"][:, :1].expand_as(d["seg_keys"]).contiguous()
    y = call(cached_readout, d, 4, "sparse", top_k)
    assert_close(y, call(cached_readout_ref, {**d}, 4, "sparse", top_k))
    first = {**d, "states": torch.cat([d["states"][:, :top_k], d["states"][:, top_k:] + 100.0], 1)}
    assert torch.equal(call(cached_readout, first, 4, "sparse", top_k), y)  # the later ones are never read


def _base():
    d = make(8, B=1, T=6, H=2, K=3, V=4, L=2)
    return dict(**d, segment_len=2, mode="gated")


def _op(q, u, states, seg_keys, o_online, **kw):
    return cached_readout(q, u, states, seg_keys, o_online, **kw)


BAD = [
    ("q not a tensor", dict(q=[1.0]), TypeError, r"q must be a torch.Tensor"),
    ("q 3-D", dict(q=torch.zeros(1, 6, 3, dtype=F64)), ValueError, r"q must have 4 dimensions"),
    ("q int", dict(q=torch.zeros(1, 6, 2, 3, dtype=torch.int64)), TypeError, r"q must be a floating tensor"),
    ("mode", dict(mode="mean"), ValueError, r"mode must be one of \('residual', 'gated', 'soup', 'sparse'\)"),
    ("mode list", dict(mode=["gated"]), ValueError, r"mode must be one of"),
    ("segment_len 0", dict(segment_len=0), ValueError, r"segment_len must be an int >= 1, got 0"),
    ("segment_len float", dict(segment_len=2.0), ValueError, r"segment_len must be an int >= 1, got 2.0"),
    ("o_online shape", dict(o_online=torch.zeros(1, 5, 2, 4, dtype=F64)), ValueError,
     r"o_online must have shape \(1, 6, 2, 4\)"),
    ("states 4-D", dict(states=torch.zeros(1, 2, 2, 3, dtype=F64)), ValueError, r"states must have 5 dimensions"),
    ("states K", dict(states=torch.zeros(1, 2, 2, 4, 4, dtype=F64)), ValueError, r"states must have shape \(1, 2, 2, 3, 4\)"),
    ("too few states", dict(states=torch.zeros(1, 1, 2, 3, 4, dtype=F64), seg_keys=torch.zeros(1, 1, 2, 3, dtype=F64)),
     ValueError, r"states must hold the 2 cached states that T = 6 tokens in segments of 2 read .* got NS = 1"),
    ("u missing", dict(u=None), ValueError, r"mode 'gated' needs u \[B, T, H, K\], got None"),
    ("online_keys missing", dict(online_keys=None), ValueError, r"mode 'gated' needs online_keys"),
    ("seg_keys missing", dict(seg_keys=None), ValueError, r"mode 'gated' needs seg_keys \[B, NS, H, K\]"),
    ("seg_keys shape", dict(seg_keys=torch.zeros(1, 2, 2, 4, dtype=F64)), ValueError, r"seg_keys must have shape \(1, 2, 2, 3\)"),
    ("u shape", dict(u=torch.zeros(1, 6, 2, 4, dtype=F64)), ValueError, r"u must have shape \(1, 6, 2, 3\)"),
    ("dtype mix", dict(states=torch.zeros(1, 2, 2, 3, 4)), TypeError, r"states must have q's dtype float64, got float32"),
    ("top_k for gated", dict(top_k=2), ValueError, r"top_k is for mode 'sparse', got top_k=2 with mode 'gated'"),
    ("sparse without top_k", dict(mode="sparse"), ValueError, r"mode 'sparse' needs top_k"),
    ("top_k 0", dict(mode="sparse", top_k=0), ValueError, r"top_k must be an int >= 1, got 0"),
    ("top_k float", dict(mode="sparse", top_k=1.5), ValueError, r"top_k must be an int >= 1, got 1.5"),
    ("scale string", dict(scale="half"), TypeError, r"scale must be a number, got str"),
    ("K too big", dict(q=torch.zeros(1, 6, 2, 1025, dtype=F64)), ValueError, r"head dimension K must be in \[1, 1024\]"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    assert_bad_input("retain.ops.cached_readout", _op, _base(), case)


def test_residual_takes_no_router():
    d = make(9, T=8, L=3)
    y = cached_readout(d["q"], None, d["states"], None, d["o_online"], segment_len=3)
    assert_close(y, cached_readout_ref(d["q"], None, d["states"], None, d["o_online"], None, segment_len=3))


def test_empty_sequences_and_batches():
    for shape in (dict(B=0, T=4), dict(B=1, T=0), dict(B=1, T=4, H=0)):
        d = make(10, **{**dict(B=1, T=4, H=2, K=3, V=2, L=2), **shape})
        y, grads = outputs_and_grads(cached_readout, d, 2, "gated", None)
        assert y.numel() == 0
        assert all(g is None or g.abs().sum() == 0 for g in grads.values())


requires_cuda = pytest.mark.skipif(not cuda_kernels_usable(), reason="needs a GPU and a build with CUDA kernels")


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("mode,top_k", MODES, ids=str)
def test_cuda_matches_the_reference_and_the_cpu_kernel(dtype, mode, top_k):
    for shape in (dict(B=2, T=45, H=3, K=20, V=33, L=8, extra=1), dict(B=1, T=70, H=2, K=300, V=64, L=16)):
        d = {n: t.cuda() for n, t in make(11, **shape, dtype=dtype).items()}
        check_against_reference(d, shape["L"], mode, top_k)
        y, grads = outputs_and_grads(cached_readout, d, shape["L"], mode, top_k)
        y2, grads2 = outputs_and_grads(cached_readout, d, shape["L"], mode, top_k)
        assert torch.equal(y, y2) and all(a is None or torch.equal(a, b) for a, b in zip(grads.values(),
                                                                                        grads2.values()))
        yc, _ = outputs_and_grads(cached_readout, {n: t.cpu() for n, t in d.items()}, shape["L"], mode, top_k)
        assert_close(y.cpu(), yc)


@requires_cuda
def test_cuda_opcheck_and_compile():
    d = {n: t.cuda() for n, t in make(12, T=20, L=4).items()}
    from retain.ops.cache.cached_readout import cached_readout_op

    for mode, top_k in (("residual", 0), ("gated", 0), ("sparse", 1)):
        u, c, ok = (None, None, None) if mode == "residual" else (d["u"], d["seg_keys"], d["online_keys"])
        args = (d["q"].requires_grad_(), u, d["states"], c, d["o_online"], ok, 4, mode, top_k, 0.5)
        torch.library.opcheck(cached_readout_op, args)
    torch._dynamo.reset()
    f = torch.compile(lambda *xs: cached_readout(*xs[:5], online_keys=xs[5], segment_len=4, mode="gated"),
                      fullgraph=True)
    xs = [d[n] for n in NAMES]
    assert_close(f(*xs), cached_readout(*xs[:5], online_keys=xs[5], segment_len=4, mode="gated"))


@pytest.mark.parametrize("mode,top_k", MODES)
def test_same_bits_for_any_thread_count(mode, top_k):
    """Two heads: 1 and 2 threads run the fused backward (one pass per head), 3 the token pass
    over (b, h, segment) units and then the state pass; every output and gradient has the same bits
    (T not a multiple of L, two states nobody reads)."""
    d = make(5, B=1, T=150, H=2, K=64, V=48, L=16, extra=2, dtype=torch.float32)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(outputs_and_grads(cached_readout, d, 16, mode, top_k))
    finally:
        torch.set_num_threads(before)
    (y1, g1), *others = runs
    for y, g in others:
        assert torch.equal(y, y1)
        for n in NAMES:
            assert (g[n] is None) == (g1[n] is None), n
            if g[n] is not None:
                assert torch.equal(g[n], g1[n]), n
