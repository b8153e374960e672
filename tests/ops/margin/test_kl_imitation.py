"""retain.ops.kl_imitation: kernel vs reference for the loss and both gradients, the gradient
fused into the forward, extreme logits, hypothesis, opcheck, bad input, CUDA. What every op must
satisfy is in tests/ops/test_contract.py."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain import _native
from retain.ops import kl_imitation
from retain.ops.margin import reference as ref
from tests.helpers import KERNEL_DTYPES, assert_bad_input, assert_close

from tests.ops.margin.test_tm_loss import check, make_case, on_cuda

kl_module = importlib.import_module("retain.ops.margin.kl_imitation")  # the package re-exports the function

# Kernel tests: each runs under every CPU capability this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_capability")

F64 = torch.float64
CUDA = torch.cuda.is_available() and _native.has_kernel("kl_imitation", "cuda")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and a build with CUDA kernels")




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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_kl_imitation_opcheck_and_compile(device):
    z, q, mask = (t.detach().to(device).requires_grad_(t.requires_grad) for t in make_logits((6, 33), dtype=torch.float32,
                                                                                                 seed=25))
    m = mask.to(torch.uint8)
    torch.library.opcheck(kl_module.kl_imitation_op, (z, q, m, 0.5))
    loss, lse, lse_ref = kl_module.kl_imitation_op(z, q, m, 0.5)
    torch.library.opcheck(kl_module.kl_imitation_backward_op, (torch.ones(6, dtype=F64, device=device), loss.detach(),
                                                               lse, lse_ref, z.detach(), q.detach(), 0.5, True, True))
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


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_kl_imitation_rows_past_the_exp_range(temperature):
    # rows whose logits span more than 86 / T take the clamped loop, the others the unclamped one
    # (kl_row_range): both agree with the reference, row by row, forward and gradient
    z, q, _ = make_logits((6, 100), dtype=torch.float32, seed=5)
    z, q = z.detach().clone(), q.detach().clone()
    z[0, 3] = -90.0  # student row past the range
    q[2, 7] = -120.0  # reference row past the range
    z[4, :] = z[4, :] * 40.0  # a wide row of both
    q[4, :] = q[4, :] * 40.0
    z.requires_grad_()
    got = kl_imitation(z, q, temperature=temperature, reduction="none")
    want = ref.kl_imitation_ref(z, q, temperature=temperature, reduction="none")
    assert_close(got, want)
    assert_close(torch.autograd.grad(got.sum(), z)[0], torch.autograd.grad(want.sum(), z)[0])


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
        torch.library.opcheck(kl_module.kl_imitation_reduced_op, args)


KL_BAD = [
    ("shape", dict(q=torch.zeros(3, 4, 36, dtype=F64)), ValueError, r"z_ref must have z's shape \(3, 4, 37\)"),
    ("dtype", dict(q=torch.zeros(3, 4, 37)), TypeError, "z_ref must have z's dtype float64, got float32"),
    ("int", dict(z=torch.zeros(3, 4, 37, dtype=torch.long)), TypeError, "z must be a floating tensor"),
    ("temperature", dict(temperature=0.0), ValueError, "temperature must be > 0"),
    ("temperature string", dict(temperature="hot"), TypeError, "temperature must be a real number, got str .hot."),
    ("temperature nan", dict(temperature=float("nan")), ValueError, "temperature must be finite, got nan"),
    ("mask shape", dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(3, 4\)"),
    ("reduction", dict(reduction="max"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'max'"),
    ("empty vocab", dict(z=torch.zeros(3, 0, dtype=F64), q=torch.zeros(3, 0, dtype=F64), mask=None), ValueError,
     r"the vocabulary \(last\) dimension of z must not be empty"),
]


@pytest.mark.parametrize("case", KL_BAD, ids=[c[0] for c in KL_BAD])
def test_kl_imitation_bad_input(case):
    z, q, mask = make_logits()
    assert_bad_input("retain.ops.kl_imitation", lambda z, q, **kw: kl_imitation(z, q, **kw),
                     dict(z=z, q=q, mask=mask, temperature=1.0, reduction="mean"), case)


# CUDA: kl_imitation against its reference on the GPU ---------------------------------------

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


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_margin_cuda_kernels_run_on_the_tensors_gpu():
    # the current device is GPU 0, the tensors live on GPU 1: the launch must go to GPU 1
    h, labels, pos, neg, mask = make_case(B=2, L=3, D=40, dtype=torch.float32, seed=33)
    on1 = tuple(None if t is None else t.detach().to("cuda:1").requires_grad_(t.requires_grad)
                for t in (h, labels, pos, neg, mask))
    check(*on1, "violations")
    z, q, m = make_logits((4, 50), dtype=torch.float32, seed=35)
    check_kl(*(t.detach().to("cuda:1").requires_grad_(t.requires_grad) for t in (z, q)), m.to("cuda:1"), 1.0, "mean")
