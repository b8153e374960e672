"""retain.ops.feature_imitation (per-token L1 / squared L2 distance between current and reference
hidden states): hand-made cases, kernel vs reference for the loss and both gradients, masks,
hypothesis, opcheck, torch.compile, bad input; CUDA kernels when a GPU is present."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from retain import _native
from retain.ops import feature_imitation
from retain.ops.margin import reference as ref
from tests.helpers import KERNEL_DTYPES, assert_bad_input, assert_close

_ops = importlib.import_module("retain.ops.margin.feature_imitation")  # the package re-exports the function

# Kernel tests: each runs under every CPU capability this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_capability")

F64 = torch.float64
REDUCTIONS = ["mean", "sum", "none"]
CUDA = torch.cuda.is_available() and _native.has_kernel("feature_imitation", "cuda")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and a build with CUDA kernels")


def make_states(shape=(3, 4, 37), dtype=F64, seed=0, masked=True, ties=False, device="cpu", ref_grad=True):
    """h, h_ref [..., D] and a [...] mask; ``ties`` makes about a quarter of h equal to h_ref."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g, dtype=F64)
    q = torch.randn(shape, generator=g, dtype=F64)
    if ties:
        same = torch.rand(shape, generator=g) < 0.25
        h = torch.where(same, q, h)
    mask = (torch.rand(shape[:-1], generator=g) > 0.3).to(device) if masked else None
    h = h.to(dtype=dtype, device=device).requires_grad_()
    q = q.to(dtype=dtype, device=device).requires_grad_(ref_grad)
    return h, q, mask


def check(h, q, mask, p, reduction):
    got = feature_imitation(h, q, p=p, mask=mask, reduction=reduction)
    want = ref.feature_imitation_ref(h, q, p=p, mask=mask, reduction=reduction)
    assert got.dtype == (F64 if h.dtype == F64 else torch.float32) and got.device == h.device
    assert got.shape == want.shape
    assert_close(got, want)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(got.dtype).to(got.device)
    inputs = [t for t in (h, q) if t.requires_grad]
    for name, a, b in zip(("h", "h_ref"), torch.autograd.grad((got * w).sum(), inputs),
                          torch.autograd.grad((want * w).sum(), inputs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, msg=f"gradient of {name}")


def test_feature_imitation_hand_made_cases():
    h = torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, -1.0]], dtype=F64, requires_grad=True)
    q = torch.tensor([[0.0, 4.0], [0.0, 3.0], [5.0, -1.0]], dtype=F64)
    assert feature_imitation(h, q, p=1, reduction="none").tolist() == [3.0, 3.0, 0.0]
    assert feature_imitation(h, q, p=2, reduction="none").tolist() == [5.0, 9.0, 0.0]
    assert feature_imitation(h, q, p=2, reduction="sum").item() == 14.0
    assert feature_imitation(h, q, p=2).item() == 14.0 / 6  # 'mean' divides by tokens * D
    assert feature_imitation(h, q, p=1, mask=torch.tensor([False, True, True])).item() == 3.0 / 4
    (g,) = torch.autograd.grad(feature_imitation(h, q, p=1, reduction="sum"), h)
    assert g.tolist() == [[1.0, -1.0], [0.0, -1.0], [0.0, 0.0]]  # sign(0) = 0 where h == h_ref
    (g,) = torch.autograd.grad(feature_imitation(h, q, p=2, reduction="sum"), h)
    assert g.tolist() == [[2.0, -4.0], [0.0, -6.0], [0.0, 0.0]]


@pytest.mark.parametrize("p", [1, 2])
def test_feature_imitation_mean_is_torch_l1_mse_over_counted_tokens(p):
    h, q, mask = make_states((4, 6, 33), seed=2)
    torch_loss = F.l1_loss if p == 1 else F.mse_loss
    assert_close(feature_imitation(h, q, p=p), torch_loss(h, q))
    assert_close(feature_imitation(h, q, p=p, mask=mask), torch_loss(h[mask], q[mask]))
    got = torch.autograd.grad(feature_imitation(h, q, p=p, mask=mask), (h, q))
    want = torch.autograd.grad(torch_loss(h[mask], q[mask]), (h, q))
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_feature_imitation_matches_reference(dtype, p, reduction):
    h, q, mask = make_states(dtype=dtype, seed=3, ties=True)
    check(h, q, mask, p, reduction)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_feature_imitation_p1_gradient_is_zero_where_states_agree(dtype):
    h, q, _ = make_states((5, 70), dtype=dtype, seed=4, ties=True, masked=False)
    same = h.detach() == q.detach()
    assert same.any() and not same.all()
    gh, gq = torch.autograd.grad(feature_imitation(h, q, p=1, reduction="sum"), (h, q))
    assert (gh[same] == 0).all() and (gq[same] == 0).all()
    assert torch.equal(gh[~same], torch.sign(h - q).detach()[~same])
    assert torch.equal(gq, -gh)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p", [1, 2])
def test_feature_imitation_all_masked_gives_zero(reduction, p):
    h, q, _ = make_states(seed=5)
    empty = torch.zeros(3, 4, dtype=torch.bool)
    loss = feature_imitation(h, q, p=p, mask=empty, reduction=reduction)
    assert not loss.isnan().any() and (loss == 0).all()
    for g in torch.autograd.grad(loss.sum(), (h, q)):
        assert not g.isnan().any() and (g == 0).all()


@pytest.mark.parametrize("p", [1, 2])
def test_feature_imitation_masked_rows_may_hold_nan_and_inf(p):
    # padding positions of stored reference states need not be finite: masked tokens are skipped,
    # forward and backward (their gradient is an exact 0, not 0 * NaN)
    h, q, mask = make_states((4, 9, 16), seed=6)
    bad_h, bad_q = h.detach().clone(), q.detach().clone()
    bad_h[~mask] = float("nan")
    bad_q[~mask] = float("inf")
    bad_h.requires_grad_()
    bad_q.requires_grad_()
    loss = feature_imitation(bad_h, bad_q, p=p, mask=mask)
    want = ref.feature_imitation_ref(h, q, p=p, mask=mask)
    assert_close(loss, want)
    got = torch.autograd.grad(loss, (bad_h, bad_q))
    for a, b in zip(got, torch.autograd.grad(want, (h, q))):
        assert (a[~mask] == 0).all()
        assert_close(a, b)


def test_feature_imitation_constant_reference_gets_no_gradient(monkeypatch):
    # h_ref is usually a stored constant: the backward kernel is then not asked for its gradient
    calls = []
    original = _ops.feature_imitation_backward_op

    def spy(grad, h, h_ref, mask, p, need_h, need_h_ref):
        calls.append((need_h, need_h_ref))
        return original(grad, h, h_ref, mask, p, need_h, need_h_ref)

    monkeypatch.setattr(_ops, "feature_imitation_backward_op", spy)
    h, q, mask = make_states(seed=7, ref_grad=False)
    check(h, q, mask, 2, "none")  # 'none': the two-pass path ('mean'/'sum' fuse the gradient into the forward)
    qq = q.detach().requires_grad_()
    check(h.detach(), qq, mask, 1, "none")  # and the reverse: only h_ref's gradient
    assert calls == [(True, False), (False, True)]
    gh, gq = original(torch.ones(12, dtype=F64), h.detach().reshape(12, 37), q.reshape(12, 37), None, 2, True, False)
    assert gh.shape == (12, 37) and gq.numel() == 0


@given(shape=st.sampled_from([(1, 1), (5, 2), (3, 129), (2, 3, 1000), (7, 255), (2, 2, 257), (1, 4097), (3, 0),
                              (0, 5), (2, 0, 4)]),
       p=st.sampled_from([1, 2]), masked=st.booleans(), ties=st.booleans(), reduction=st.sampled_from(REDUCTIONS),
       seed=st.integers(0, 2**16))
def test_feature_imitation_hypothesis(shape, p, masked, ties, reduction, seed):
    h, q, mask = make_states(shape, seed=seed, masked=masked, ties=ties)
    check(h, q, mask, p, reduction)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("p", [1, 2])
def test_feature_imitation_same_bits_for_any_thread_count(threads, p):
    h, q, mask = make_states((4, 64, 300), dtype=torch.float32, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = feature_imitation(h, q, p=p, mask=mask, reduction="none")
        ga = torch.autograd.grad(a.sum(), (h, q))
        torch.set_num_threads(threads)
        b = feature_imitation(h, q, p=p, mask=mask, reduction="none")
        gb = torch.autograd.grad(b.sum(), (h, q))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_feature_imitation_float32_long_rows_accumulate_accurately():
    # 2^20 copies of 0.1f: a running float32 sum ends ~1% off (each add rounds the same way once the
    # sum is large); the kernel's blocked sums stay within float32 tolerance of the exact value
    h = torch.full((2, 1 << 20), 0.1, dtype=torch.float32)
    q = torch.zeros_like(h)
    got = feature_imitation(h, q, p=1, reduction="none")
    assert_close(got, h.double().sum(-1).float())
    assert_close(feature_imitation(h, q, p=2, reduction="none"), h.double().square().sum(-1).float())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_feature_imitation_gradient_fused_into_the_forward(dtype, p, reduction):
    # loss.backward() (incoming gradient exactly 1, h_ref constant): the forward's gradient is used
    h, q, mask = make_states((4, 5, 300), dtype=dtype, seed=41, ties=True, ref_grad=False)
    got = feature_imitation(h, q, p=p, mask=mask, reduction=reduction)
    got.backward()
    want = ref.feature_imitation_ref(h, q, p=p, mask=mask, reduction=reduction)
    assert_close(got, want)
    assert_close(h.grad, torch.autograd.grad(want, h)[0])
    assert (h.grad[~mask] == 0).all()


def test_feature_imitation_fused_gradient_survives_a_second_backward():
    h, q, mask = make_states((3, 4, 50), dtype=torch.float32, seed=43)
    loss = feature_imitation(h, q, p=2, mask=mask)
    (2 * loss).backward(retain_graph=True)
    first = (h.grad.clone(), q.grad.clone())
    loss.backward()
    want = torch.autograd.grad(ref.feature_imitation_ref(h, q, p=2, mask=mask), (h, q))
    for g, f, w in zip((h.grad, q.grad), first, want):
        assert_close(f, 2 * w)
        assert_close(g, 3 * w)


def test_feature_imitation_reduced_opcheck():
    h, q, mask = make_states((6, 33), dtype=torch.float32, seed=45)
    m = mask.to(torch.uint8)
    for args in ((h, q, m, 2, True, True, True), (h, q.detach(), None, 1, False, True, False)):
        torch.library.opcheck(_ops.feature_imitation_reduced_op, args)


def test_feature_imitation_opcheck():
    h, q, mask = make_states((6, 33), dtype=torch.float32, seed=11)
    m = mask.to(torch.uint8)
    for p in (1, 2):
        torch.library.opcheck(_ops.feature_imitation_op, (h, q, m, p))
        torch.library.opcheck(_ops.feature_imitation_op, (h, q, None, p))
        rows = _ops.feature_imitation_op(h, q, m, p)
        for need in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(_ops.feature_imitation_backward_op,
                                  (torch.ones_like(rows), h.detach(), q.detach(), m, p, *need))


@pytest.mark.parametrize("p", [1, 2])
def test_feature_imitation_torch_compile_fullgraph(p):
    torch._dynamo.reset()
    h, q, mask = make_states((2, 5, 24), dtype=torch.float32, seed=13)

    def model(x):
        return feature_imitation(torch.tanh(x) * 2, q.detach(), p=p, mask=mask) + x.square().mean()

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = compiled(h), model(h)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h)[0])


BAD = [
    ("h 0-D", dict(h=torch.tensor(1.0, dtype=F64)), ValueError, "h must have at least 1 dimensions"),
    ("h int", dict(h=torch.zeros(3, 4, 37, dtype=torch.long)), TypeError, "h must be a floating tensor"),
    ("h_ref list", dict(q=[0.0] * 37), TypeError, "h_ref must be a torch.Tensor, got list"),
    ("shape", dict(q=torch.zeros(3, 4, 36, dtype=F64)), ValueError, r"h_ref must have h's shape \(3, 4, 37\)"),
    ("dtype", dict(q=torch.zeros(3, 4, 37)), TypeError, "h_ref must have h's dtype float64, got float32"),
    ("device", dict(q=torch.zeros(3, 4, 37, dtype=F64, device="meta")), ValueError,
     "h_ref must be on h's device cpu, got meta"),
    ("p 3", dict(p=3), ValueError, "p must be 1 or 2, got 3"),
    ("p bool", dict(p=True), ValueError, "p must be 1 or 2, got True"),
    ("p 1.5", dict(p=1.5), ValueError, "p must be 1 or 2, got 1.5"),
    ("mask shape", dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(3, 4\)"),
    ("mask float", dict(mask=torch.ones(3, 4)), TypeError, "mask must be bool"),
    ("mask device", dict(mask=torch.ones(3, 4, dtype=torch.bool, device="meta")), ValueError,
     "mask must be on h's device cpu, got meta"),
    ("reduction", dict(reduction="max"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'max'"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_feature_imitation_bad_input(case):
    h, q, mask = make_states()
    assert_bad_input("retain.ops.feature_imitation", lambda h, q, **kw: feature_imitation(h, q, **kw),
                     dict(h=h, q=q, mask=mask, p=2, reduction="mean"), case)


# CUDA ------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_feature_imitation_cuda_matches_reference(dtype, p, reduction):
    h, q, mask = make_states(dtype=dtype, seed=3, ties=True, device="cuda")
    check(h, q, mask, p, reduction)


@requires_cuda
@pytest.mark.parametrize("D", [1, 31, 32, 33, 255, 256, 257, 2047, 2049, 4097])
@pytest.mark.parametrize("p", [1, 2])
def test_feature_imitation_cuda_row_lengths(D, p):
    # block sizes 32..256 threads by D; rows shorter and longer than the block, odd tails
    for dtype in (F64, torch.float32):
        h, q, mask = make_states((3, 5, D), dtype=dtype, seed=D, device="cuda")
        check(h, q, mask, p, "none")
        check(h, q, None, p, "mean")


@requires_cuda
@pytest.mark.parametrize("p", [1, 2])
def test_feature_imitation_cuda_agrees_with_cpu_and_is_deterministic(p):
    h, q, mask = make_states((8, 33, 1000), dtype=torch.float32, seed=17, ties=True)
    cpu = feature_imitation(h, q, p=p, mask=mask, reduction="none")
    g_cpu = torch.autograd.grad(cpu.sum(), (h, q))
    hc, qc = (t.detach().cuda().requires_grad_() for t in (h, q))
    runs = []
    for _ in range(2):
        out = feature_imitation(hc, qc, p=p, mask=mask.cuda(), reduction="none")
        runs.append((out, *torch.autograd.grad(out.sum(), (hc, qc))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # fixed reduction order: the same bits every run
    assert_close(runs[0][0], cpu)
    for a, b in zip(runs[0][1:], g_cpu):
        assert torch.equal(a.cpu(), b)  # g * sign / g * 2x: the same rounding on both devices


@requires_cuda
@pytest.mark.parametrize("p", [1, 2])
def test_feature_imitation_cuda_masked_rows_and_side_stream(p):
    h, q, mask = make_states((4, 9, 300), seed=19, device="cuda")
    bad_h = h.detach().clone()
    bad_h[~mask] = float("nan")
    bad_h.requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loss = feature_imitation(bad_h, q, p=p, mask=mask)
        gh, gq = torch.autograd.grad(loss, (bad_h, q))
    torch.cuda.current_stream().wait_stream(stream)
    want = ref.feature_imitation_ref(h, q, p=p, mask=mask)
    assert_close(loss, want)
    for a, b in zip((gh, gq), torch.autograd.grad(want, (h, q))):
        assert (a[~mask] == 0).all()
        assert_close(a, b)


@requires_cuda
def test_feature_imitation_cuda_opcheck_and_compile():
    h, q, mask = make_states((6, 33), dtype=torch.float32, seed=21, device="cuda")
    m = mask.to(torch.uint8)
    for p in (1, 2):
        torch.library.opcheck(_ops.feature_imitation_op, (h, q, m, p))
        rows = _ops.feature_imitation_op(h, q, m, p)
        torch.library.opcheck(_ops.feature_imitation_backward_op,
                              (torch.ones_like(rows), h.detach(), q.detach(), m, p, True, True))
    torch._dynamo.reset()

    def model(x):
        return feature_imitation(x * 2, q.detach(), p=1, mask=mask)

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = compiled(h), model(h)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h)[0])
