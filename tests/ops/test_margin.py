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
    # a 563 x 4096 GeRe sample: 16x smaller than its float32 activations
    if D == 4097:
        per_sample_bytes = 563 * ((4096 + 3) // 4)
        assert 563 * 4096 * 4 / per_sample_bytes == 16


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tm_loss_matches_reference(dtype, per_sample, reduction):
    h, labels, pos, neg, mask = make_case(B=3, L=6, D=37, dtype=dtype, per_sample=per_sample, seed=7)
    check(h, labels, pos, neg, mask, reduction)


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
    loss, denom = _ops.tm_loss_op(*args)
    torch.library.opcheck(_ops.tm_loss_backward_op, (torch.ones(()), denom, h.detach(), *args[1:5]))


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
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(got.dtype)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (z, q)), torch.autograd.grad((want * w).sum(), (z, q))):
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
