"""What every public op must satisfy, run over the registry of ops (tests/ops/registry.py): forward
and every gradient against its reference, opcheck of every custom op it calls,
torch.compile(fullgraph=True) forward and backward, torch.export, the fallback policy, every
output written (NaN-poisoned buffers), NaN in gives NaN out, results independent of the thread
count, double backward refused by name (never a silent constant), errors that name the op, and the
docstring's examples. The per-op files test what is particular to each op."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import retain
from retain import _native
from retain.ops import _dispatch
from tests.helpers import assert_close
from tests.ops.registry import CASES, HOST, TYPES, tensors_of

IDS = [c.name for c in CASES]
NATIVE = [c for c in CASES if c.native]
DIFFERENTIABLE = [c for c in CASES if c.grads]


def _leaf(t):
    return t.detach().clone().requires_grad_()


def inputs(case, seed=0, requires_grad=True):
    d = case.make(seed)
    if requires_grad:
        for name in case.grads:  # a tensor or a list of tensors (the multi-tensor ops)
            d[name] = [_leaf(t) for t in d[name]] if isinstance(d[name], list) else _leaf(d[name])
    return d


def leaves(case, d):
    """The tensors that get gradients, lists flattened."""
    return [t for n in case.grads for t in (d[n] if isinstance(d[n], list) else [d[n]])]


def run(case, fn, d, seed=1):
    """Outputs and the gradients of a random linear function of them (one per case and seed)."""
    outs = [t for t in tensors_of(fn(**d)) if t.is_floating_point() or not case.grads]
    wrt = leaves(case, d)
    if not wrt:
        return outs, []
    g = torch.Generator().manual_seed(seed)
    float_outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in float_outs)
    return outs, list(torch.autograd.grad(loss, wrt))


def assert_same_results(got, want):
    (go, gg), (wo, wg) = got, want
    assert len(go) == len(wo) and len(gg) == len(wg)
    for a, b in zip(go + gg, wo + wg):
        assert a.shape == b.shape, (a.shape, b.shape)
        if a.is_floating_point():
            assert_close(a, b)
        else:
            assert torch.equal(a, b)


def test_the_registry_has_every_public_op():
    assert {c.name for c in CASES} == set(retain.ops.__all__) - TYPES - HOST
    assert len(IDS) == len(set(IDS))


@pytest.mark.parametrize("case", [c for c in CASES if c.reference is not None], ids=lambda c: c.name)
def test_forward_and_every_gradient_match_the_reference(case):
    d = inputs(case)
    assert_same_results(run(case, case.call, d), run(case, case.reference, d))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_output_element_is_written(case):
    # tests/conftest.py fills every fresh kernel output with NaN: finite inputs must give finite
    # outputs and gradients, or the kernel left an element unwritten
    assert _native.poison_outputs and torch.isnan(_native.empty_like(torch.zeros(3))).all()
    outs, grads = run(case, case.call, inputs(case))
    for t in outs + grads:
        assert (torch.isfinite(t).all() if t.is_floating_point() else True), case.name


@pytest.mark.parametrize("case", [c for c in CASES if c.nan_input], ids=lambda c: c.name)
def test_nan_in_gives_nan_out(case):
    d = inputs(case, requires_grad=False)
    if isinstance(d[case.nan_input], list):  # a multi-tensor op: the first element of its first tensor
        d[case.nan_input] = [t.clone() for t in d[case.nan_input]]
        d[case.nan_input][0].view(-1)[0] = float("nan")
    else:
        d[case.nan_input] = d[case.nan_input].clone()
        d[case.nan_input].view(-1)[0] = float("nan")  # the first token: never masked in the registry
    outs = [t for t in tensors_of(case.call(**d)) if t.is_floating_point()]
    assert any(torch.isnan(t).any() for t in outs)


class _CustomOpCalls(TorchDispatchMode):
    """Records the first call of every retain:: custom op."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "retain" and func not in self.calls:
            self.calls[func] = (args, kwargs or {})
        return func(*args, **(kwargs or {}))


def _for_opcheck(func, args, kwargs):
    """The recorded arguments, copied (lists of tensors too); floating tensors require grad for
    forward ops that mutate nothing, so opcheck also checks their autograd registration."""
    grad = "backward" not in func.__name__ and not func._schema.is_mutable

    def copy(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().clone()
            return x.requires_grad_() if grad and x.is_floating_point() else x
        if isinstance(x, list):
            return [copy(t) for t in x]
        return x

    return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("case", NATIVE, ids=lambda c: c.name)
def test_opcheck_of_every_custom_op_it_calls(case):
    with _CustomOpCalls() as rec:
        run(case, case.call, inputs(case))
    assert rec.calls, f"{case.name} called no retain:: custom op"
    for func, (args, kwargs) in rec.calls.items():
        torch.library.opcheck(func, *_for_opcheck(func, args, kwargs))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_compile_fullgraph_forward_and_backward(case):
    torch._dynamo.reset()
    compiled = torch.compile(lambda **kw: case.call(**kw), fullgraph=True)
    d = inputs(case)
    assert_same_results(run(case, compiled, d), run(case, case.call, d))


@pytest.mark.parametrize("case", [c for c in CASES if all(isinstance(v, torch.Tensor) for v in c.make(0).values())],
                         ids=lambda c: c.name)
def test_torch_export(case):
    d = inputs(case, requires_grad=False)
    names = list(d)

    class Op(torch.nn.Module):
        def forward(self, *ts):
            return tuple(tensors_of(case.call(**dict(zip(names, ts)))))

    ep = torch.export.export(Op(), tuple(d.values()))
    for a, b in zip(ep.module()(*d.values()), tensors_of(case.call(**d))):
        assert_close(a, b) if a.is_floating_point() else torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", NATIVE, ids=lambda c: c.name)
def test_fallback_policy(case, monkeypatch):
    # on a device without a kernel (here: the CPU kernels disabled), an op raises an error that
    # says what to set, and with RETAIN_FALLBACK=reference runs its pure-PyTorch body: the same
    # results, forward and backward
    want = run(case, case.call, inputs(case))
    with _dispatch.kernels_disabled("cpu"):
        monkeypatch.delenv("RETAIN_FALLBACK", raising=False)
        with pytest.raises(NotImplementedError, match=r"retain::\w+: no kernel for device 'cpu'.*"
                                                      r"RETAIN_FALLBACK=reference"):
            run(case, case.call, inputs(case))
        monkeypatch.setenv("RETAIN_FALLBACK", "reference")
        assert_same_results(run(case, case.call, inputs(case)), want)
    assert all(_dispatch.served(op, "cpu") for op, devices in _dispatch._REGISTERED.items() if "cpu" in devices)


@pytest.mark.parametrize("case", NATIVE, ids=lambda c: c.name)
def test_results_do_not_depend_on_the_thread_count(case):
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(case, case.call, inputs(case)))
    finally:
        torch.set_num_threads(before)
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1 + g1, o2 + g2):
        assert torch.equal(a, b), case.name


@pytest.mark.parametrize("case", DIFFERENTIABLE, ids=lambda c: c.name)
def test_double_backward_is_refused_by_name(case):
    d = inputs(case)
    outs = [t for t in tensors_of(case.call(**d)) if t.is_floating_point() and t.requires_grad]
    wrt = leaves(case, d)
    names = [n for n in case.grads for _ in (d[n] if isinstance(d[n], list) else [d[n]])]
    first = torch.autograd.grad(sum(o.sum() for o in outs), wrt, create_graph=True, allow_unused=True)
    # every first-order gradient is part of a graph (none is silently a constant), except those
    # the case declares piecewise constant; backward through the graph is refused by name
    graphed = [g for n, g in zip(names, first) if n not in case.constant_grads]
    assert graphed and all(g is not None and g.requires_grad for g in graphed), case.name
    with pytest.raises(RuntimeError, match=r"retain[.:]+\w+backward\w*.*no autograd formula"):
        torch.autograd.grad(sum(g.square().sum() for g in graphed), wrt, allow_unused=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_bad_first_argument_is_an_error_naming_the_op(case):
    d = inputs(case, requires_grad=False)
    first = next(iter(d))
    d[first] = [1.0, 2.0]
    with pytest.raises(TypeError, match=rf"retain\.ops\.{case.name}: {first} must be"):
        case.call(**d)


@pytest.mark.parametrize("name", IDS + sorted(HOST) + ["MinTree", "SumTree"])
def test_docstring_examples_run(name):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(getattr(retain.ops, name), name, globs={"torch": torch, "retain": retain}):
        runner.run(test)
    assert runner.tries >= 1, f"retain.ops.{name} has no example in its docstring"
    assert runner.failures == 0
