"""retain.cl.SI and retain.cl.MAS: SI's path integral and importance against the formulas over
plain SGD steps, MAS's importance against a loop over single samples, penalties in both forms,
state dicts, forgetting on two tasks, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retain
from tests.cl.test_ewc import _task, batches, flat, tiny_model
from tests.helpers import assert_close

F64 = torch.float64


def _sgd_steps(model, si, data, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    omega = [torch.zeros_like(p, dtype=F64) for p in model.parameters()]
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]
        si.before_step()
        si.apply_penalty_grad_()
        opt.step()
        si.after_step()
        for w, g, b, p in zip(omega, grads, before, model.parameters()):
            w -= g.to(F64) * (p.detach().to(F64) - b.to(F64))
    return omega


def test_si_path_integral_importance_and_penalty():
    model, data = tiny_model(), batches()
    si = retain.cl.SI(model, c=0.5, xi=0.01)
    start = [p.detach().clone() for p in model.parameters()]
    omega = _sgd_steps(model, si, data)
    for got, want in zip(si.omega, omega):
        assert_close(got, want.float())
    si.consolidate()
    for big, w, p, s in zip(si.importance, omega, model.parameters(), start):
        assert_close(big, (w / ((p.detach().to(F64) - s.to(F64)).square() + 0.01)).float())
    assert all((w == 0).all() for w in si.omega) and si.tasks == 1
    assert all(torch.equal(a, p) for a, p in zip(si.anchor, model.parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2)
    params = list(model.parameters())
    want = 0.5 * sum((big.to(F64) * (p.detach().to(F64) - a.to(F64)).square()).sum()
                     for big, p, a in zip(si.importance, params, si.anchor))
    value = si.penalty()
    assert_close(value.float(), want.float())
    model.zero_grad(set_to_none=True)
    value.backward()
    autograd = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    assert_close(si.apply_penalty_grad_().float(), want.float())
    for p, g in zip(params, autograd):
        assert_close(p.grad, g)


def test_si_state_dict_round_trip_and_call_order_errors():
    model, data = tiny_model(), batches()
    si = retain.cl.SI(model)
    _sgd_steps(model, si, data)
    si.consolidate()
    other = retain.cl.SI(tiny_model(seed=4))
    other.load_state_dict(si.state_dict())
    assert other.tasks == 1 and all(torch.equal(a, b) for a, b in zip(other.importance, si.importance))
    with pytest.raises(RuntimeError, match=r"retain\.cl\.SI\.after_step: call before_step\(\) before"):
        other.after_step()
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"retain\.cl\.SI\.before_step: parameters without \.grad"):
        si.before_step()
    with pytest.raises(ValueError, match=r"retain\.cl\.SI: xi must be a number > 0, got 0"):
        retain.cl.SI(model, xi=0)


@pytest.mark.parametrize("per_sample", ["auto", "vmap"])
def test_mas_importance_equals_a_loop_over_single_samples(per_sample):
    model, data = tiny_model(), batches()
    mas = retain.cl.MAS(model, lam=2.0, alpha=0.25, chunk_size=3, per_sample=per_sample)
    mas.consolidate(data)
    params = list(model.parameters())
    rows = []
    for x, _ in data:
        for i in range(x.shape[0]):
            model.zero_grad()
            model(x[i:i + 1]).square().sum().backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in params]).to(F64).abs())
    first = torch.stack(rows).mean(0)
    assert_close(flat(mas.importance).float(), first.float())
    mas.consolidate([x for x, _ in data])  # bare input batches; second task: α·Ω + (1 − α)·Ω_new
    assert_close(flat(mas.importance).float(), first.float())  # same data and parameters: Ω_new = Ω
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    want = 2.0 * sum((w.to(F64) * 0.01).sum() for w in mas.importance)
    assert_close(mas.penalty().float(), want.float())
    model.zero_grad(set_to_none=True)
    assert_close(mas.apply_penalty_grad_().float(), want.float())
    for p, w in zip(params, mas.importance):
        assert_close(p.grad, 2 * 2.0 * w * 0.1)


def _forgetting(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    A, B = _task(1, 0), _task(2, 1)
    strategy = make(model) if make else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(task):
        x, y = task
        for s in range(300):
            i = torch.arange(s * 64, s * 64 + 64) % len(x)
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            if isinstance(strategy, retain.cl.SI):
                strategy.before_step()
            if strategy is not None:
                strategy.apply_penalty_grad_()
            opt.step()
            if isinstance(strategy, retain.cl.SI):
                strategy.after_step()

    train(A)
    with torch.no_grad():
        before = F.cross_entropy(model(A[0]), A[1]).item()
    if isinstance(strategy, retain.cl.SI):
        strategy.consolidate()
    elif strategy is not None:
        strategy.consolidate([A[0][i:i + 64] for i in range(0, 512, 64)])
    train(B)
    with torch.no_grad():
        after = F.cross_entropy(model(A[0]), A[1]).item()
        acc_b = (model(B[0]).argmax(1) == B[1]).float().mean().item()
    return after - before, acc_b


@pytest.mark.parametrize("name, make", [("SI", lambda m: retain.cl.SI(m, c=1.0)),
                                        ("MAS", lambda m: retain.cl.MAS(m, lam=0.1))])
def test_si_and_mas_reduce_forgetting_on_two_tasks(name, make):
    naive, _ = _forgetting(None)
    forgot, acc_b = _forgetting(make)
    assert forgot < naive / 5, (name, forgot, naive)  # measured: SI 18x less, MAS 200x less
    assert acc_b > 0.95, (name, acc_b)
