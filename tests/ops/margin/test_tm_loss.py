"""retain.ops.tm_loss (GeRe's threshold margin loss): hand-made cases, kernel vs reference for the
loss and every gradient, int8 vs packed labels, the slope-bit backward, hypothesis, opcheck,
torch.compile, bad input, CUDA. What every op must satisfy is in tests/ops/test_contract.py."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain import _native
from retain.ops import tm_loss
from retain.ops import _dispatch
from retain.ops._dispatch import acc_dtype
from retain.ops.margin import reference as ref
from tests.helpers import KERNEL_DTYPES, assert_bad_input, assert_close

tm_loss_module = importlib.import_module("retain.ops.margin.tm_loss")  # the package re-exports the function

# Kernel tests: each runs under every CPU capability this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_capability")

F64 = torch.float64
REDUCTIONS = ["violations", "mean", "sum"]


def make_case(B=2, L=5, D=11, *, dtype=F64, per_sample=False, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, D, generator=g, dtype=F64).to(dtype).requires_grad_()
    labels = torch.randint(-1, 2, (B, L, D), generator=g, dtype=torch.int8)
    shape = (B, D) if per_sample else (D,)
    thr = acc_dtype(dtype)  # thresholds in the dtype the loss is computed in
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("where", [0, 63, 64, 130])  # in the 64-wide AVX-512 blocks, a 16/8/4-lane vector, the tail
@pytest.mark.parametrize("packed", [False, True])
def test_tm_loss_nan_activation_gives_nan_and_infinities_the_references_loss(dtype, where, packed):
    h, labels, pos, neg, _ = make_case(B=1, L=2, D=131, dtype=dtype, seed=where)
    labels = ref.pack_tm_labels_ref(labels) if packed else labels
    x = h.detach().clone()
    x[0, 1, where] = float("nan")
    for reduction in REDUCTIONS:
        assert tm_loss(x, labels, pos, neg, reduction=reduction).isnan(), reduction
    # +-inf under every label: each element's loss is 0 or inf as relu gives it, never NaN
    for value in (float("inf"), -float("inf")):
        y = h.detach().clone()
        y[0, 1, where] = value
        assert_close(tm_loss(y, labels, pos, neg, reduction="sum"), ref.tm_loss_ref(y, labels, pos, neg, reduction="sum"))


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


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("D", [7, 64, 100])
def test_tm_loss_infinite_upstream_gradient_keeps_zero_slopes_zero(D, dtype):
    # a non-finite incoming gradient (fp16 overflow upstream) gives +-inf where the slope is +-1 and
    # 0 where it is 0, in every build and path (slope-bit lanes are masks, not 0/1 multiplied in)
    h, labels, pos, neg, mask = make_case(B=2, L=6, D=D, dtype=dtype, seed=12)
    pos, neg = pos.detach(), neg.detach()
    (grad,) = torch.autograd.grad(tm_loss(h, labels, pos, neg, mask=mask) * torch.inf, h)
    (want,) = torch.autograd.grad(ref.tm_loss_ref(h, labels, pos, neg, mask=mask) * torch.inf, h)
    rows_in = mask[..., None].expand_as(grad)  # the reference multiplies masked rows by 0: inf * 0 there
    assert torch.equal(grad[rows_in], want[rows_in])  # autograd of the reference agrees (relu's backward selects)
    assert (grad[~rows_in] == 0).all()
    assert (grad[rows_in] == 0).any() and torch.isinf(grad[rows_in]).any()  # both kinds of slope occur


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


def test_tm_loss_opcheck():
    h, labels, pos, neg, mask = make_case(B=2, L=3, D=6, dtype=torch.float32, seed=13)
    args = (h, labels, pos.detach().float(), neg.detach().float(), mask.to(torch.uint8), 0)
    torch.library.opcheck(tm_loss_module.tm_loss_op, args)
    torch.library.opcheck(tm_loss_module.tm_loss_op, (*args, True))
    loss, denom, bits = tm_loss_module.tm_loss_op(*args, True)
    assert bits.shape == (6, 2) and bits.dtype == torch.int16
    torch.library.opcheck(tm_loss_module.tm_loss_backward_op, (torch.ones(()), denom, h.detach(), *args[1:5]))
    torch.library.opcheck(tm_loss_module.tm_loss_backward_bits_op, (torch.ones(()), denom, bits, h.detach()))
    # h gives the gradient's shape only: with strided h the fake must still say "contiguous"
    strided = h.detach().transpose(0, 1).contiguous().transpose(0, 1)
    torch.library.opcheck(tm_loss_module.tm_loss_backward_bits_op, (torch.ones(()), denom, bits, strided))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [5, 16, 64, 200])
@pytest.mark.parametrize("packed", [False, True])
def test_tm_loss_backward_from_slope_bits_equals_the_two_pass_backward(dtype, D, packed):
    # the gradient written from the forward's slope bits is the one the backward kernel computes
    # from h and the labels, bit for bit (blocks of 64, of 16 and a tail; masked rows)
    h, labels, pos, neg, mask = make_case(B=3, L=5, D=D, dtype=dtype, seed=D)
    labels = ref.pack_tm_labels_ref(labels) if packed else labels
    args = (h.detach(), labels, pos.detach().float(), neg.detach().float(), mask.to(torch.uint8), 0)
    _, denom, bits = tm_loss_module.tm_loss_op(*args, True)
    g = torch.tensor(0.75)
    from_bits = tm_loss_module.tm_loss_backward_bits_op(g, denom, bits, h.detach())
    two_pass = tm_loss_module.tm_loss_backward_op(g, denom, *args[:5])
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
    ("reduction list", dict(reduction=["sum"]), ValueError, r"reduction must be one of .*got \['sum'\] \(list\)"),
    ("mask list", dict(mask=[[True] * 5] * 2), TypeError, "mask must be a torch.Tensor, got list"),
    ("label 2", dict(labels=torch.full((2, 5, 11), 2, dtype=torch.int8)), ValueError,
     r"labels must be int8 in \{-1, 0, 1\}, got 2 at \[0, 0, 0\]"),
    ("label -128", dict(labels=torch.full((2, 5, 11), -128, dtype=torch.int8)), ValueError,
     r"labels must be int8 in \{-1, 0, 1\}, got -128"),
    ("packed code 3", dict(labels=torch.full((2, 5, 3), 0b11, dtype=torch.uint8)), ValueError,
     "packed labels must hold codes 0, 1, 2 .from pack_tm_labels., got code 3"),
]


@pytest.mark.parametrize("fallback", [False, True], ids=["kernel", "fallback"])
def test_invalid_labels_are_refused_on_counted_rows_only(fallback, monkeypatch):
    """A label outside {-1, 0, 1} (or packed code 3) is refused by the kernel as it reads it, and by
    the PyTorch path (fallback, CUDA) in one pass; on a masked-out row it is never read."""
    monkeypatch.setenv("RETAIN_FALLBACK", "reference")
    with _dispatch.kernels_disabled("cpu") if fallback else contextlib.nullcontext():
        _check_invalid_labels()


def _check_invalid_labels():
    h, labels, pos, neg, _ = make_case()
    bad = labels.clone()
    bad[1, 3, 7] = 5
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"retain\.ops\.tm_loss: labels must be int8 in \{-1, 0, 1\}, got 5 at \[1, 3, 7\]"):
        tm_loss(h, bad, pos, neg, mask=mask)
    mask[1, 3] = False
    assert_close(tm_loss(h, bad, pos, neg, mask=mask), tm_loss(h, labels, pos, neg, mask=mask))


def test_nan_activation_gives_nan_loss_and_zero_slope():
    """NaN in, NaN out: a NaN activation makes the loss NaN; it has no slope, so its gradient is 0
    in the kernel and in the reference alike (the other elements' gradients are unchanged)."""
    h, labels, pos, neg, _ = make_case()
    h = h.detach().clone()
    h[0, 1, 2] = float("nan")
    for fn in (tm_loss, ref.tm_loss_ref):
        x = h.clone().requires_grad_()
        loss = fn(x, labels, pos, neg, reduction="sum")
        loss.backward()
        assert loss.isnan() and x.grad[0, 1, 2] == 0
        x2 = h.nan_to_num(0.0).requires_grad_()
        fn(x2, labels, pos, neg, reduction="sum").backward()
        keep = torch.ones_like(h, dtype=torch.bool)
        keep[0, 1, 2] = False
        assert torch.equal(x.grad[keep], x2.grad[keep])


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_tm_loss_bad_input(case):
    h, labels, pos, neg, mask = make_case()
    assert_bad_input("retain.ops.tm_loss", lambda h, labels, pos, neg, **kw: tm_loss(h, labels, pos, neg, **kw),
                     dict(h=h, labels=labels, pos=pos, neg=neg, mask=mask, reduction="violations"), case)


# CUDA: tm_loss against its reference on the GPU ----------------------------

CUDA = torch.cuda.is_available() and _native.has_kernel("tm_loss", "cuda")
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
            torch.library.opcheck(tm_loss_module.tm_loss_op, args)
            _, denom, _ = tm_loss_module.tm_loss_op(*args)
            assert denom.device == h.device
            torch.library.opcheck(tm_loss_module.tm_loss_backward_op,
                                  (torch.ones((), device="cuda"), denom, h.detach(), *args[1:5]))
    torch._dynamo.reset()

    def model(x):
        return tm_loss(torch.tanh(x) * 2, labels, pos.detach(), neg.detach(), mask=mask, reduction="mean")

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = compiled(h), model(h)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h)[0])
