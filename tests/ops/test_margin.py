"""retain.ops.tm_loss (GeRe's threshold margin loss), its 2-bit labels and the mergeable
activation statistics: hand-made cases, kernel vs reference for the loss and every gradient,
hypothesis, opcheck, torch.compile, bad input."""

from __future__ import annotations

import doctest
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import retain
from retain import _native
from retain.ops import activation_stats, pack_tm_labels, tm_loss, tm_thresholds, unpack_tm_labels
from retain.ops.margin import _ops
from retain.ops.margin import reference as ref
from tests.helpers import KERNEL_DTYPES, assert_close

# Kernel tests: each runs under every CPU capability this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_capability")

F64 = torch.float64
REDUCTIONS = ["violations", "mean", "sum"]


def make_case(B=2, L=5, D=11, *, dtype=F64, per_sample=False, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, D, generator=g, dtype=F64).to(dtype).requires_grad_()
    labels = torch.randint(-1, 2, (B, L, D), generator=g, dtype=torch.int8)
    shape = (B, D) if per_sample else (D,)
    thr = _ops.acc_dtype(dtype)  # thresholds in the dtype the loss is computed in
    pos = (0.2 + torch.rand(shape, generator=g, dtype=F64)).to(thr).requires_grad_()
    neg = (-0.2 - torch.rand(shape, generator=g, dtype=F64)).to(thr).requires_grad_()
    mask = torch.rand(B, L, generator=g) > 0.3 if masked else None
    return h, labels, pos, neg, mask


def check(h, labels, pos, neg, mask, reduction):
    got = tm_loss(h, labels, pos, neg, mask=mask, reduction=reduction)
    want = ref.tm_loss_ref(h, labels, pos, neg, mask=mask, reduction=reduction)
    assert got.dtype == (F64 if h.dtype == F64 else torch.float32)
    assert_close(got, want)
    inputs = [t for t in (h, pos, neg) if t.requires_grad]
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        assert_close(a, b)


def test_tm_loss_hand_made_cases():
    h = torch.tensor([[[0.5, -2.0, 3.0, 0.0, 2.0, -3.0]]], dtype=F64)
    labels = torch.tensor([[[1, -1, 0, 0, 1, -1]]], dtype=torch.int8)
    pos, neg = torch.ones(6, dtype=F64), -torch.ones(6, dtype=F64)
    # losses: 0.5 (below pos), 0 (below neg, fine), 2 (above pos), 0 (inside), 0 (above pos, fine), 0
    assert tm_loss(h, labels, pos, neg, reduction="sum").item() == pytest.approx(2.5)
    assert tm_loss(h, labels, pos, neg, reduction="mean").item() == pytest.approx(2.5 / 6)
    assert tm_loss(h, labels, pos, neg).item() == pytest.approx(2.5 / (2 + 1e-8))
    h2 = torch.tensor([[[-2.0]]], dtype=F64)
    assert tm_loss(h2, torch.zeros(1, 1, 1, dtype=torch.int8), pos[:1], neg[:1], reduction="sum").item() == 1.0
    h3 = torch.tensor([[[0.0]]], dtype=F64)
    assert tm_loss(h3, -torch.ones(1, 1, 1, dtype=torch.int8), pos[:1], neg[:1], reduction="sum").item() == 1.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tm_loss_all_masked_and_no_violations_give_zero(reduction):
    h, labels, pos, neg, _ = make_case()
    empty = torch.zeros(2, 5, dtype=torch.bool)
    loss = tm_loss(h, labels, pos, neg, mask=empty, reduction=reduction)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, h)
    assert not g.isnan().any() and (g == 0).all()
    inside = torch.zeros_like(h, requires_grad=True)  # 0 sits between the thresholds: label 0 holds
    loss = tm_loss(inside, torch.zeros_like(labels), pos, neg, reduction=reduction)
    assert loss.item() == 0.0


def test_tm_loss_gradient_is_plus_minus_one_over_count():
    h, labels, pos, neg, mask = make_case(B=3, L=7, D=9, seed=3)
    loss = tm_loss(h, labels, pos, neg, mask=mask)
    (g,) = torch.autograd.grad(loss, h)
    ell = ref.tm_elementwise_ref(h.detach(), labels, pos.detach(), neg.detach()) * mask[..., None]
    count = int((ell > 0).sum())
    assert count > 0
    violating = ell > 0
    assert torch.equal(g[violating].abs(), torch.full((count,), 1.0 / (count + 1e-8), dtype=F64))
    assert (g[~violating] == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_packed_and_int8_labels_give_identical_results(reduction, per_sample):
    h, labels, pos, neg, mask = make_case(D=13, per_sample=per_sample, seed=5)
    packed = ref.pack_tm_labels_ref(labels)
    a = tm_loss(h, labels, pos, neg, mask=mask, reduction=reduction)
    b = tm_loss(h, packed, pos, neg, mask=mask, reduction=reduction)
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a, h)[0], torch.autograd.grad(b, h)[0])


@pytest.mark.parametrize("D", [1, 3, 4, 5, 8, 4097])
def test_pack_unpack_roundtrip_and_storage(D):
    g = torch.Generator().manual_seed(D)
    refs = torch.randn(2, 3, D, generator=g)
    pos, neg = torch.full((D,), 0.5), torch.full((D,), -0.5)
    packed = pack_tm_labels(refs, pos, neg)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, (D + 3) // 4)
    labels = unpack_tm_labels(packed, D)
    assert torch.equal(labels, ref.tm_labels_ref(refs, pos, neg))


def test_packed_labels_of_a_gere_sample_are_16x_smaller_than_its_activations():
    # a 563-token x 4096-feature reference, packed as GeRe stores it
    refs = torch.randn(563, 4096, generator=torch.Generator().manual_seed(1))
    pos, neg = refs.mean(0) + refs.std(0), refs.mean(0) - refs.std(0)
    packed = pack_tm_labels(refs, pos, neg)
    assert packed.nbytes == 576_512
    assert refs.nbytes == 16 * packed.nbytes
    assert torch.equal(unpack_tm_labels(packed, 4096), ref.tm_labels_ref(refs, pos, neg))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("D", [37, 200])
def test_tm_loss_matches_reference(dtype, per_sample, reduction, D):
    # D = 200: three blocks of 64 (the AVX-512 loop, where the CPU has it), 16-wide vectors, a tail
    h, labels, pos, neg, mask = make_case(B=3, L=6, D=D, dtype=dtype, per_sample=per_sample, seed=7)
    check(h, labels, pos, neg, mask, reduction)


@pytest.mark.parametrize("packed", [False, True])
def test_tm_loss_streamed_gradient(packed):
    # a 16 MiB float32 gradient: rows are written with streaming stores past the caches
    h, labels, pos, neg, mask = make_case(B=2, L=512, D=4096, dtype=torch.float32, seed=8)
    check(h, ref.pack_tm_labels_ref(labels) if packed else labels, pos.detach(), neg.detach(), mask, "violations")


@given(B=st.integers(1, 3), L=st.integers(1, 9), D=st.sampled_from([1, 2, 4, 7, 63, 64, 65, 130]),
       per_sample=st.booleans(), masked=st.booleans(), packed=st.booleans(),
       reduction=st.sampled_from(REDUCTIONS), seed=st.integers(0, 2**16))
def test_tm_loss_hypothesis(B, L, D, per_sample, masked, packed, reduction, seed):
    h, labels, pos, neg, mask = make_case(B, L, D, per_sample=per_sample, masked=masked, seed=seed)
    check(h, ref.pack_tm_labels_ref(labels) if packed else labels, pos, neg, mask, reduction)


@pytest.mark.parametrize("threads", [1, 2])
def test_tm_loss_same_bits_for_any_thread_count(threads):
    h, labels, pos, neg, mask = make_case(B=4, L=64, D=300, dtype=torch.float32, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = tm_loss(h, labels, pos, neg, mask=mask)
        torch.set_num_threads(threads)
        b = tm_loss(h, labels, pos, neg, mask=mask)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


def test_activation_stats_merge_is_exact():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(40, 6, 16, generator=g, dtype=F64) * 3 + 100  # a large mean: the unstable case
    mask = torch.rand(40, 6, generator=g) > 0.2
    whole = activation_stats(h, mask)
    parts = [activation_stats(h[i:j], mask[i:j]) for i, j in ((0, 7), (7, 8), (8, 8), (8, 40))]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    x = h[mask].to(F64)
    assert merged.count.item() == whole.count.item() == x.shape[0]
    assert_close(merged.mean, x.mean(0))
    assert_close(merged.m2, ((x - x.mean(0)) ** 2).sum(0))
    pos, neg = tm_thresholds(merged, k=1.5)
    assert_close(pos, (x.mean(0) + 1.5 * x.std(0)).float())
    assert_close(neg, (x.mean(0) - 1.5 * x.std(0)).float())


def test_tm_loss_opcheck():
    h, labels, pos, neg, mask = make_case(B=2, L=3, D=6, dtype=torch.float32, seed=13)
    args = (h, labels, pos.detach().float(), neg.detach().float(), mask.to(torch.uint8), 0)
    torch.library.opcheck(_ops.tm_loss_op, args)
    torch.library.opcheck(_ops.tm_loss_op, (*args, True))
    loss, denom, bits = _ops.tm_loss_op(*args, True)
    assert bits.shape == (6, 2) and bits.dtype == torch.int16
    torch.library.opcheck(_ops.tm_loss_backward_op, (torch.ones(()), denom, h.detach(), *args[1:5]))
    torch.library.opcheck(_ops.tm_loss_backward_bits_op, (torch.ones(()), denom, bits, h.detach()))
    # h gives the gradient's shape only: with strided h the fake must still say "contiguous"
    strided = h.detach().transpose(0, 1).contiguous().transpose(0, 1)
    torch.library.opcheck(_ops.tm_loss_backward_bits_op, (torch.ones(()), denom, bits, strided))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [5, 16, 64, 200])
@pytest.mark.parametrize("packed", [False, True])
def test_tm_loss_backward_from_slope_bits_equals_the_two_pass_backward(dtype, D, packed):
    # the gradient written from the forward's slope bits is the one the backward kernel computes
    # from h and the labels, bit for bit (blocks of 64, of 16 and a tail; masked rows)
    h, labels, pos, neg, mask = make_case(B=3, L=5, D=D, dtype=dtype, seed=D)
    labels = ref.pack_tm_labels_ref(labels) if packed else labels
    args = (h.detach(), labels, pos.detach().float(), neg.detach().float(), mask.to(torch.uint8), 0)
    _, denom, bits = _ops.tm_loss_op(*args, True)
    g = torch.tensor(0.75)
    from_bits = _ops.tm_loss_backward_bits_op(g, denom, bits, h.detach())
    two_pass = _ops.tm_loss_backward_op(g, denom, *args[:5])
    assert torch.equal(from_bits, two_pass)
    assert (from_bits[~mask] == 0).all() and (from_bits != 0).any()


def test_tm_loss_torch_compile_fullgraph():
    torch._dynamo.reset()
    h, labels, pos, neg, mask = make_case(B=2, L=4, D=8, dtype=torch.float32, seed=17)
    packed = ref.pack_tm_labels_ref(labels)

    def model(x):
        return tm_loss(torch.tanh(x) * 2, packed, pos.detach(), neg.detach(), mask=mask) + x.square().mean()

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = compiled(h), model(h)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h)[0])


def test_tm_loss_fallback_policy(monkeypatch):
    h, labels, pos, neg, mask = make_case(seed=19)
    monkeypatch.setattr(_native, "has_kernel", lambda op, device: False)
    monkeypatch.delenv("RETAIN_FALLBACK", raising=False)
    with pytest.raises(NotImplementedError, match=r"retain::tm_loss: no kernel for device 'cpu'"):
        tm_loss(h, labels, pos, neg)
    monkeypatch.setenv("RETAIN_FALLBACK", "reference")
    check(h, labels, pos, neg, mask, "violations")


def test_margin_docstring_examples():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for fn in (tm_loss, activation_stats):
        for test in finder.find(fn, globs={"torch": torch, "retain": retain}):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 2


BAD = [
    ("h 2-D", dict(h=torch.zeros(2, 5)), ValueError, "h must have 3 dimensions"),
    ("h int", dict(h=torch.zeros(2, 5, 11, dtype=torch.long)), TypeError, "h must be a floating tensor"),
    ("labels dtype", dict(labels=torch.zeros(2, 5, 11)), TypeError, "labels must be int8"),
    ("labels shape", dict(labels=torch.zeros(2, 5, 10, dtype=torch.int8)), ValueError,
     r"labels \(int8\) must have shape \(2, 5, 11\)"),
    ("packed shape", dict(labels=torch.zeros(2, 5, 11, dtype=torch.uint8)), ValueError,
     r"labels \(uint8\) must have shape \(2, 5, 3\)"),
    ("thr shape", dict(pos=torch.zeros(10, dtype=F64)), ValueError, r"pos_thr must have shape \(11,\) or \(2, 11\)"),
    ("thr dtype", dict(neg=torch.zeros(11, dtype=torch.long)), TypeError, "neg_thr must be a floating tensor"),
    ("mask shape", dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 5\)"),
    ("mask float", dict(mask=torch.ones(2, 5)), TypeError, "mask must be bool"),
    ("mask device", dict(mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError,
     "mask must be on h's device cpu, got meta"),
    ("reduction", dict(reduction="max"), ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_tm_loss_bad_input(case):
    _, over, exc, pattern = case
    h, labels, pos, neg, mask = make_case()
    kw = dict(h=h, labels=labels, pos=pos, neg=neg, mask=mask, reduction="violations")
    kw.update(over)
    with pytest.raises(exc, match=re.escape("retain.ops.tm_loss") + ": " + pattern):
        tm_loss(kw["h"], kw["labels"], kw["pos"], kw["neg"], mask=kw["mask"], reduction=kw["reduction"])


# kl_imitation ---------------------------------------------------------------------------------

from retain.ops import kl_imitation  # noqa: E402


def make_logits(shape=(3, 4, 37), dtype=F64, scale=3.0, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()
    q = (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()
    mask = torch.rand(shape[:-1], generator=g) > 0.3 if masked else None
    return z, q, mask


def check_kl(z, q, mask, temperature, reduction):
    got = kl_imitation(z, q, temperature=temperature, mask=mask, reduction=reduction)
    want = ref.kl_imitation_ref(z, q, temperature=temperature, mask=mask, reduction=reduction)
    assert_close(got, want)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(got.dtype).to(got.device)
    inputs = [t for t in (z, q) if t.requires_grad]
    for a, b in zip(torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((want * w).sum(), inputs)):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_imitation_matches_reference(dtype, reduction, temperature):
    z, q, mask = make_logits(dtype=dtype, seed=21)
    check_kl(z, q, mask, temperature, reduction)


@given(shape=st.sampled_from([(1, 1), (5, 2), (3, 129), (2, 3, 1000)]), masked=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
def test_kl_imitation_hypothesis(shape, masked, reduction, seed):
    z, q, mask = make_logits(shape, seed=seed, masked=masked)
    check_kl(z, q, mask, 1.5, reduction)


def test_kl_imitation_extreme_logits_and_identity():
    z, _, _ = make_logits((4, 50), scale=1e4, seed=23)
    # the reference's argmax is another token in every row: both softmaxes are one-hot and the
    # gradient is +-1/T there, 0 elsewhere (equal argmaxes would leave a 1 - 1 cancellation whose
    # rounding is order-dependent at 1e4 * eps)
    q = torch.roll(z.detach(), 1, -1).requires_grad_()
    loss = kl_imitation(z, q, reduction="none")
    assert torch.isfinite(loss).all()
    check_kl(z, q, None, 1.0, "sum")
    same = kl_imitation(z.detach(), z.detach(), reduction="none")
    assert_close(same, torch.zeros_like(same))


def test_kl_imitation_opcheck_and_compile():
    z, q, mask = make_logits((6, 33), dtype=torch.float32, seed=25)
    m = mask.to(torch.uint8)
    torch.library.opcheck(_ops.kl_imitation_op, (z, q, m, 0.5))
    loss, lse, lse_ref = _ops.kl_imitation_op(z, q, m, 0.5)
    torch.library.opcheck(_ops.kl_imitation_backward_op,
                          (torch.ones(6, dtype=F64), loss.detach(), lse, lse_ref, z.detach(), q.detach(), 0.5, True, True))
    torch._dynamo.reset()

    def model(x):
        return kl_imitation(x * 2, q.detach(), temperature=2.0, mask=mask)

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = compiled(z), model(z)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("V", [7, 64, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_imitation_gradient_fused_into_the_forward(dtype, V, reduction):
    # loss.backward() on a reduced loss takes the gradient the forward computed (incoming gradient
    # exactly 1, only z requires grad: the common training case); rows past the last full vector
    # of 16 run the scalar tail
    z, q, mask = make_logits((5, 3, V), dtype=dtype, seed=V)
    q = q.detach()
    got = kl_imitation(z, q, temperature=1.7, mask=mask, reduction=reduction)
    got.backward()
    want = ref.kl_imitation_ref(z, q, temperature=1.7, mask=mask, reduction=reduction)
    assert_close(got, want)
    assert_close(z.grad, torch.autograd.grad(want, z)[0])
    assert (z.grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_kl_imitation_minus_inf_reference_logits(dtype):
    # a -inf reference logit (a token the teacher rules out) is a zero probability: it adds 0 to
    # the KL and gets gradient 0, and the student's gradient there is p (pushed down)
    z, q, _ = make_logits((3, 40), dtype=dtype, seed=33)
    q = q.detach().clone()
    q[:, ::3] = -torch.inf
    q_leaf = q.clone().requires_grad_()
    for reduction in ("mean", "none"):
        got = kl_imitation(z, q_leaf, reduction=reduction)
        want = ref.kl_imitation_ref(z, q, reduction=reduction)
        assert torch.isfinite(got).all() and torch.isfinite(want).all()
        assert_close(got, want)
    loss = kl_imitation(z, q_leaf)
    gz, gq = torch.autograd.grad(loss, (z, q_leaf))
    assert_close(gz, torch.autograd.grad(ref.kl_imitation_ref(z, q), z)[0])
    assert torch.isfinite(gq).all() and (gq[:, ::3] == 0).all()
    gz2, gq2 = torch.autograd.grad(kl_imitation(z, q_leaf, reduction="none").sum(), (z, q_leaf))  # two-pass backward
    assert_close(gz2, gz * 3)
    assert torch.isfinite(gq2).all() and (gq2[:, ::3] == 0).all()


def test_kl_imitation_fused_gradient_large_rows():
    # a 16 MiB float32 gradient written in place row by row, masked rows in between, a row count
    # that does not split evenly over threads
    z, q, mask = make_logits((513, 8192), dtype=torch.float32, seed=35)
    q = q.detach()
    got = kl_imitation(z, q, mask=mask)
    got.backward()
    want = ref.kl_imitation_ref(z, q, mask=mask)
    assert_close(got, want)
    assert_close(z.grad, torch.autograd.grad(want, z)[0])


def test_kl_imitation_fused_gradient_survives_a_second_backward():
    z, q, mask = make_logits((4, 3, 40), dtype=torch.float32, seed=31)
    loss = kl_imitation(z, q, mask=mask)
    (3 * loss).backward(retain_graph=True)   # first: the forward's gradient, scaled by 3 in place
    first = (z.grad.clone(), q.grad.clone())
    loss.backward()                           # second: recomputed by the backward kernel
    want = torch.autograd.grad(ref.kl_imitation_ref(z, q, mask=mask), (z, q))
    for g, f, w in zip((z.grad, q.grad), first, want):
        assert_close(f, 3 * w.float())
        assert_close(g, 4 * w.float())


def test_kl_imitation_reduced_opcheck():
    z, q, mask = make_logits((6, 33), dtype=torch.float32, seed=27)
    m = mask.to(torch.uint8)
    for args in ((z, q, m, 0.5, True, True, True), (z, q.detach(), None, 2.0, False, True, False)):
        torch.library.opcheck(_ops.kl_imitation_reduced_op, args)


KL_BAD = [
    ("shape", dict(q=torch.zeros(3, 4, 36, dtype=F64)), ValueError, r"z_ref must have z's shape \(3, 4, 37\)"),
    ("dtype", dict(q=torch.zeros(3, 4, 37)), TypeError, "z_ref must have z's dtype float64, got float32"),
    ("int", dict(z=torch.zeros(3, 4, 37, dtype=torch.long)), TypeError, "z must be a floating tensor"),
    ("temperature", dict(temperature=0.0), ValueError, "temperature must be > 0"),
    ("mask shape", dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(3, 4\)"),
    ("reduction", dict(reduction="max"), ValueError, "reduction must be 'mean', 'sum' or 'none'"),
    ("empty vocab", dict(z=torch.zeros(3, 0, dtype=F64), q=torch.zeros(3, 0, dtype=F64), mask=None), ValueError,
     r"the vocabulary \(last\) dimension of z must not be empty"),
]


@pytest.mark.parametrize("case", KL_BAD, ids=[c[0] for c in KL_BAD])
def test_kl_imitation_bad_input(case):
    _, over, exc, pattern = case
    z, q, mask = make_logits()
    kw = dict(z=z, q=q, mask=mask, temperature=1.0, reduction="mean")
    kw.update(over)
    with pytest.raises(exc, match=re.escape("retain.ops.kl_imitation") + ": " + pattern):
        kl_imitation(kw["z"], kw["q"], temperature=kw["temperature"], mask=kw["mask"], reduction=kw["reduction"])


# CUDA: tm_loss and kl_imitation against their references on the GPU ----------------------------

CUDA = (torch.cuda.is_available() and _native.has_kernel("tm_loss", "cuda")
        and _native.has_kernel("kl_imitation", "cuda"))
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and a build with CUDA kernels")


def on_cuda(*tensors):
    """Copies on the GPU, leaves again where the original required grad."""
    return tuple(None if t is None else t.detach().cuda().requires_grad_(t.requires_grad) for t in tensors)


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("packed", [False, True])
def test_tm_loss_cuda_matches_reference(dtype, per_sample, reduction, packed):
    h, labels, pos, neg, mask = make_case(B=3, L=6, D=37, dtype=dtype, per_sample=per_sample, seed=7)
    h, labels, pos, neg, mask = on_cuda(h, labels, pos, neg, mask)
    check(h, ref.pack_tm_labels_ref(labels) if packed else labels, pos, neg, mask, reduction)


@requires_cuda
@pytest.mark.parametrize("D", [1, 3, 31, 32, 33, 255, 256, 257, 2049, 4097])
@pytest.mark.parametrize("packed", [False, True])
def test_tm_loss_cuda_row_lengths_and_masks(D, packed):
    # block sizes 32..256 threads by D, odd packed tails (D % 4 != 0), per-sample thresholds
    h, labels, pos, neg, mask = on_cuda(*make_case(B=2, L=5, D=D, per_sample=True, seed=D))
    labels = ref.pack_tm_labels_ref(labels) if packed else labels
    for reduction in REDUCTIONS:
        check(h, labels, pos, neg, mask, reduction)
        empty = torch.zeros_like(mask)
        loss = tm_loss(h, labels, pos, neg, mask=empty, reduction=reduction)
        (g,) = torch.autograd.grad(loss, h)
        assert loss.item() == 0.0 and (g == 0).all()


@requires_cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tm_loss_cuda_gradient_equals_cpu_and_runs_on_the_callers_stream(reduction):
    # the gradient is scale * (-1, 0 or 1) on both devices: the same bits; the violation count is
    # exact, so the 'violations' loss differs from the CPU's by rounding of the sum only
    h, labels, pos, neg, mask = make_case(B=4, L=33, D=1000, dtype=torch.float32, seed=27)
    cpu = tm_loss(h, labels, pos, neg, mask=mask, reduction=reduction)
    (g_cpu,) = torch.autograd.grad(cpu, h)
    hc, lc, pc, nc, mc = on_cuda(h, labels, pos, neg, mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        runs = []
        for _ in range(2):
            loss = tm_loss(hc, lc, pc, nc, mask=mc, reduction=reduction)
            runs.append((loss, *torch.autograd.grad(loss, hc)))
    torch.cuda.current_stream().wait_stream(stream)
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # deterministic
    assert_close(runs[0][0], cpu)
    assert torch.equal(runs[0][1].cpu(), g_cpu)


@requires_cuda
def test_tm_loss_cuda_opcheck_and_compile():
    h, labels, pos, neg, mask = on_cuda(*make_case(B=2, L=3, D=6, dtype=torch.float32, seed=13))
    for lab in (labels, ref.pack_tm_labels_ref(labels)):
        for reduction in (0, 1, 2):
            args = (h, lab, pos.detach(), neg.detach(), mask.to(torch.uint8), reduction)
            torch.library.opcheck(_ops.tm_loss_op, args)
            _, denom, _ = _ops.tm_loss_op(*args)
            assert denom.device == h.device
            torch.library.opcheck(_ops.tm_loss_backward_op,
                                  (torch.ones((), device="cuda"), denom, h.detach(), *args[1:5]))
    torch._dynamo.reset()

    def model(x):
        return tm_loss(torch.tanh(x) * 2, labels, pos.detach(), neg.detach(), mask=mask, reduction="mean")

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = compiled(h), model(h)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h)[0])


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_imitation_cuda_matches_reference(dtype, reduction, temperature):
    z, q, mask = on_cuda(*make_logits(dtype=dtype, seed=21))
    check_kl(z, q, mask, temperature, reduction)


@requires_cuda
@pytest.mark.parametrize("V", [1, 2, 31, 33, 257, 4097, 32001])
@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_kl_imitation_cuda_row_lengths_and_orders(V, order):
    # ascending rows raise each thread's running max at every element (the rescaling branch),
    # descending ones never after the first; float64 so that only the algorithm can fail
    z, q, mask = make_logits((3, V), seed=V)
    if order != "random":
        z = z.detach().sort(-1, descending=order == "descending").values.requires_grad_()
        q = q.detach().sort(-1, descending=order == "descending").values.requires_grad_()
    z, q, mask = on_cuda(z, q, mask)
    check_kl(z, q, mask, 1.0, "none")
    check_kl(z, q, None, 0.7, "mean")


@requires_cuda
def test_kl_imitation_cuda_extreme_logits_masks_and_one_sided_gradients():
    z, _, _ = make_logits((4, 50), scale=1e4, seed=23)
    q = torch.roll(z.detach(), 1, -1).requires_grad_()
    z, q = on_cuda(z, q)
    assert torch.isfinite(kl_imitation(z, q, reduction="none")).all()
    check_kl(z, q, None, 1.0, "sum")
    same = kl_imitation(z.detach(), z.detach(), reduction="none")
    assert_close(same, torch.zeros_like(same))
    z, q, mask = on_cuda(*make_logits((5, 300), dtype=torch.float32, seed=29))
    loss = kl_imitation(z, q, mask=torch.zeros_like(mask))
    assert loss.item() == 0.0 and all((g == 0).all() for g in torch.autograd.grad(loss, (z, q)))
    for frozen in ("z", "z_ref"):  # only one side requires grad: the other is not computed
        zz = z.detach().requires_grad_(frozen != "z")
        qq = q.detach().requires_grad_(frozen != "z_ref")
        check_kl(zz, qq, mask, 1.3, "mean")


@requires_cuda
def test_kl_imitation_cuda_agrees_with_cpu_deterministic_and_on_the_callers_stream():
    z, q, mask = make_logits((64, 3000), dtype=torch.float32, seed=31)
    cpu = kl_imitation(z, q, mask=mask, reduction="none")
    g_cpu = torch.autograd.grad(cpu.sum(), (z, q))
    zc, qc, mc = on_cuda(z, q, mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        runs = []
        for _ in range(2):
            out = kl_imitation(zc, qc, mask=mc, reduction="none")
            runs.append((out, *torch.autograd.grad(out.sum(), (zc, qc))))
    torch.cuda.current_stream().wait_stream(stream)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    for a, b in zip(runs[0], (cpu, *g_cpu)):
        assert_close(a, b)


@requires_cuda
def test_kl_imitation_cuda_opcheck_and_compile():
    z, q, mask = on_cuda(*make_logits((6, 33), dtype=torch.float32, seed=25))
    m = mask.to(torch.uint8)
    torch.library.opcheck(_ops.kl_imitation_op, (z, q, m, 0.5))
    loss, lse, lse_ref = _ops.kl_imitation_op(z, q, m, 0.5)
    torch.library.opcheck(_ops.kl_imitation_backward_op,
                          (torch.ones(6, dtype=F64, device="cuda"), loss.detach(), lse, lse_ref, z.detach(), q.detach(),
                           0.5, True, True))
    torch._dynamo.reset()

    def model(x):
        return kl_imitation(x * 2, q.detach(), temperature=2.0, mask=mask)

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = compiled(z), model(z)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_margin_cuda_kernels_run_on_the_tensors_gpu():
    # the current device is GPU 0, the tensors live on GPU 1: the launch must go to GPU 1
    h, labels, pos, neg, mask = make_case(B=2, L=3, D=40, dtype=torch.float32, seed=33)
    on1 = tuple(None if t is None else t.detach().to("cuda:1").requires_grad_(t.requires_grad)
                for t in (h, labels, pos, neg, mask))
    check(*on1, "violations")
    z, q, m = make_logits((4, 50), dtype=torch.float32, seed=35)
    check_kl(*(t.detach().to("cuda:1").requires_grad_(t.requires_grad) for t in (z, q)), m.to("cuda:1"), 1.0, "mean")
