"""retain.cl.EWC: the per-sample Fisher (diagonal, μ, c*) against a loop over single samples with a
partial last batch, the sampled (true) Fisher with the same labels on both passes, online decay and
separate anchors, both penalty forms, state dicts, torch.compile of a training step, forgetting
on a two-task problem, two gloo processes against one, and bad input."""

from __future__ import annotations

import io

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import retain
from retain.ops.fisher import reference as fisher_ref
from tests.helpers import assert_close

F64 = torch.float64


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batches(seed=1, sizes=(4, 4, 3)):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    out, s = [], 0
    for b in sizes:  # the last batch is partial
        out.append((x[s:s + b], y[s:s + b]))
        s += b
    return out


def loop_grads(model, data, labels=None):
    """Per-sample gradients [N, P] (float64) by one backward per sample."""
    params = [p for p in model.parameters()]
    rows = []
    for b, (x, y) in enumerate(data):
        y = labels[b] if labels is not None else y
        for i in range(x.shape[0]):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in params]).to(F64))
    model.zero_grad()
    return torch.stack(rows)


def flat(ts):
    return torch.cat([t.reshape(-1).to(F64) for t in ts])


def check_against_loop(ewc, G):
    a = ewc.anchors[-1]
    mu = G.mean(0)
    if ewc.mode != "rank1":
        assert_close(flat(a.diag).float(), G.square().mean(0).float())
    if ewc.mode != "diag":
        m, c = a.rank1[0]
        assert_close(flat(m).float(), mu.float())
        assert c == pytest.approx(float((G @ mu).square().mean() / mu.norm() ** 4), rel=1e-5)


class _Normed(torch.nn.Module):
    """A model with a parameter outside any nn.Linear (the layer norm's): per-sample gradients by vmap."""

    def __init__(self):
        super().__init__()
        self.body = tiny_model()
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.body(x))


@pytest.mark.parametrize("per_sample", ["auto", "vmap"])
@pytest.mark.parametrize("mode", ["diag", "rank1", "both"])
def test_per_sample_fisher_equals_a_loop_over_single_samples(mode, per_sample):
    # tiny_model is an MLP: 'auto' takes the sums from the layers' inputs and output gradients
    model, data = tiny_model(), batches()
    ewc = retain.cl.EWC(model, mode=mode, chunk_size=3, per_sample=per_sample)  # chunks cut across the batches
    ewc.consolidate(data, F.cross_entropy)
    assert ewc.anchors[0].samples == 11
    check_against_loop(ewc, loop_grads(model, data))


class _Conv(torch.nn.Module):
    """Convolutions, a linear layer on [B, T, in] inputs and one on [B, in]: every layer form of the
    per-layer sums (inputs [B, 5] reshaped to 1×5×5 images would be too small: built from 2×6×6)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.conv2 = torch.nn.Conv2d(3, 4, 2, bias=False, dilation=1)
        self.seq = torch.nn.Linear(2, 5)
        self.head = torch.nn.Linear(5 * 8, 3)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.relu(self.conv(x))))  # [B, 4, 2, 2]
        h = torch.tanh(self.seq(h.reshape(h.shape[0], 8, 2)))  # [B, 8 positions, 5]
        return self.head(h.reshape(h.shape[0], -1))


def image_batches(sizes=(4, 4, 3)):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(b, 2, 6, 6, generator=g), torch.randint(0, 3, (b,), generator=g)) for b in sizes]


@pytest.mark.parametrize("mode", ["diag", "both"])
def test_convolutions_and_sequence_inputs_use_the_layer_sums(mode, monkeypatch):
    from retain.cl import _per_sample

    monkeypatch.setattr(_per_sample, "per_sample_grads", lambda *a, **k: pytest.fail("vmap path taken"))
    model, data = _Conv(), image_batches()
    ewc = retain.cl.EWC(model, mode=mode)
    ewc.consolidate(data, F.cross_entropy)
    check_against_loop(ewc, loop_grads(model, data))
    monkeypatch.undo()
    mas = retain.cl.MAS(model)
    mas.consolidate(data)
    ref = retain.cl.MAS(model, per_sample="vmap")
    ref.consolidate(data)
    for a, b in zip(mas.importance, ref.importance):
        assert_close(a, b)


def test_a_model_beyond_linear_layers_uses_vmap(monkeypatch):
    from retain.cl import _per_sample

    calls = []
    orig = _per_sample.per_sample_grads
    monkeypatch.setattr(_per_sample, "per_sample_grads", lambda *a, **k: calls.append(1) or orig(*a, **k))
    model, data = _Normed(), batches()
    ewc = retain.cl.EWC(model, mode="both")
    ewc.consolidate(data, F.cross_entropy)
    assert len(calls) == len(data)
    check_against_loop(ewc, loop_grads(model, data))


def test_sampled_fisher_draws_labels_from_the_model_and_reuses_them_for_c():
    model, data = tiny_model(), batches()
    ewc = retain.cl.EWC(model, mode="both", fisher="sampled", generator=torch.Generator().manual_seed(7))
    ewc.consolidate(data, F.cross_entropy)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        labels = [torch.multinomial(torch.softmax(model(x).to(F64), -1), 1, generator=g)[:, 0] for x, _ in data]
    assert any(not torch.equal(lab, y) for lab, (_, y) in zip(labels, data))  # not the data's labels
    check_against_loop(ewc, loop_grads(model, data, labels))


def test_online_decay_keeps_one_anchor():
    model, data = tiny_model(), batches()
    ewc = retain.cl.EWC(model, mode="both", online_gamma=0.5)
    ewc.consolidate(data, F.cross_entropy)
    first = [t.clone() for t in ewc.anchors[0].diag]
    c1 = ewc.anchors[0].rank1[0][1]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    fresh = retain.cl.EWC(model, mode="both")
    fresh.consolidate(data, F.cross_entropy)
    ewc.consolidate(data, F.cross_entropy)
    (a,) = ewc.anchors
    for got, f1, f2 in zip(a.diag, first, fresh.anchors[0].diag):
        assert_close(got, 0.5 * f1 + f2)
    assert [c for _, c in a.rank1] == pytest.approx([0.5 * c1, fresh.anchors[0].rank1[0][1]])
    assert all(torch.equal(t, p) for t, p in zip(a.params, model.parameters())) and a.samples == 22


def test_separate_anchors_sum_their_penalties_and_both_forms_agree():
    model, data = tiny_model(), batches()
    ewc = retain.cl.EWC(model, mode="both", lam=3.0)
    ewc.consolidate(data, F.cross_entropy)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ewc.consolidate(data, F.cross_entropy)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.3)
    params = list(model.parameters())
    want = sum(fisher_ref.ewc_penalty_ref(params, a.params, diag=a.diag, mu=a.rank1[0][0], c=a.rank1[0][1], lam=3.0)
               for a in ewc.anchors)
    value = ewc.penalty()
    assert_close(value.float(), want.float())
    value.backward()
    autograd = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    assert_close(ewc.apply_penalty_grad_().float(), want.float())
    for p, g in zip(params, autograd):
        assert_close(p.grad, g)


def test_state_dict_round_trip_through_a_weights_only_load():
    model, data = tiny_model(), batches()
    ewc = retain.cl.EWC(model, mode="both", lam=2.0)
    ewc.consolidate(data, F.cross_entropy)
    buf = io.BytesIO()
    torch.save(ewc.state_dict(), buf)
    buf.seek(0)
    other = retain.cl.EWC(tiny_model(seed=3), mode="diag")
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.mode == "both" and other.lam == 2.0
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.model.parameters()):
            q.copy_(p + 0.1)
            p.add_(0.1)
    assert_close(other.penalty(), ewc.penalty())
    with pytest.raises(ValueError, match=r"retain\.cl\.EWC\.load_state_dict: the state was saved for parameters"):
        retain.cl.EWC(torch.nn.Linear(5, 3)).load_state_dict(ewc.state_dict())


def test_a_compiled_training_step_with_the_penalty():
    model, data = tiny_model(), batches()
    ewc = retain.cl.EWC(model, mode="both", lam=5.0)
    ewc.consolidate(data, F.cross_entropy)
    x, y = data[0]

    def loss_fn():
        return F.cross_entropy(model(x), y) + ewc.penalty()

    results = []
    torch._dynamo.reset()
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    assert_close(l2, l1)
    for a, b in zip(g2, g1):
        assert_close(a, b)


class _Shuffled:
    """A re-iterable that gives its batches in a new order each time (like a shuffling loader)."""

    def __init__(self, data):
        self.data, self.calls = data, 0

    def __iter__(self):
        self.calls += 1
        return iter(self.data if self.calls % 2 else self.data[::-1])


def test_a_rank1_mode_needs_the_same_batches_twice():
    model, data = tiny_model(), batches()
    with pytest.raises(ValueError, match=r"retain\.cl\.EWC\.consolidate: data gave different batches on its second"):
        retain.cl.EWC(model, mode="rank1").consolidate(_Shuffled(data), F.cross_entropy)
    with pytest.raises(TypeError, match=r"reads the data twice .* not an iterator"):
        retain.cl.EWC(model, mode="both").consolidate(iter(data), F.cross_entropy)
    retain.cl.EWC(model, mode="diag").consolidate(iter(data), F.cross_entropy)  # one pass: an iterator is fine


def _task(seed, half, n=512):
    """Binary labels from a random direction of 4 input features; the other 4 features are 0 (task
    A uses the first half, task B the second: both can be solved by one network)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, generator=g)
    z = torch.randn(n, 4, generator=g)
    y = (z @ w > 0.5).long()
    x = torch.zeros(n, 8)
    x[:, 4 * half:4 * half + 4] = z
    return x, y


def _train(model, task, ewc=None, steps=300):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = task
    for s in range(steps):
        i = torch.arange(s * 64, s * 64 + 64) % len(x)
        loss = F.cross_entropy(model(x[i]), y[i]) + (ewc.penalty() if ewc is not None else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _forgetting(mode):
    """(increase of task A's loss while learning task B, task B's accuracy)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    A, B = _task(1, 0), _task(2, 1)
    _train(model, A)
    with torch.no_grad():
        before = F.cross_entropy(model(A[0]), A[1]).item()
    ewc = None
    if mode is not None:
        ewc = retain.cl.EWC(model, mode=mode, lam=100.0)
        ewc.consolidate([(A[0][i:i + 64], A[1][i:i + 64]) for i in range(0, 512, 64)], F.cross_entropy)
    _train(model, B, ewc)
    with torch.no_grad():
        after = F.cross_entropy(model(A[0]), A[1]).item()
        acc_b = (model(B[0]).argmax(1) == B[1]).float().mean().item()
    return after - before, acc_b


def test_ewc_reduces_forgetting_on_two_tasks():
    naive, naive_b = _forgetting(None)
    assert naive > 0.02 and naive_b > 0.95  # plain fine-tuning forgets task A
    for mode in ("diag", "both"):
        forgot, acc_b = _forgetting(mode)
        assert forgot < naive / 5, (mode, forgot, naive)  # at least 5x less (measured: about 30x)
        assert acc_b > 0.95, (mode, acc_b)  # and still learns task B


def _consolidate_on_rank(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        model, data = tiny_model(), batches(sizes=(4, 4, 3, 2))
        ewc = retain.cl.EWC(model, mode="both")
        ewc.consolidate(data[rank::world], F.cross_entropy)  # each rank its own shard of the batches
        torch.save(ewc.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_fisher(tmp_path):
    mp.spawn(_consolidate_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "state")), nprocs=2, join=True)
    model, data = tiny_model(), batches(sizes=(4, 4, 3, 2))
    single = retain.cl.EWC(model, mode="both")
    single.consolidate(data, F.cross_entropy)
    want = single.state_dict()["anchors"][0]
    for rank in range(2):
        got = torch.load(tmp_path / f"state.{rank}", weights_only=True)["anchors"][0]
        assert got["samples"] == want["samples"] == 13
        for a, b in zip(got["diag"] + got["rank1"][0][0], want["diag"] + want["rank1"][0][0]):
            assert_close(a, b)
        assert got["rank1"][0][1] == pytest.approx(want["rank1"][0][1], rel=1e-5)


BAD = [
    (dict(mode="full"), ValueError, r"mode must be one of \('diag', 'rank1', 'both'\), got 'full'"),
    (dict(fisher="true"), ValueError, r"fisher must be one of \('empirical', 'sampled'\), got 'true'"),
    (dict(dtype=torch.bfloat16), TypeError, r"dtype must be torch.float32 or torch.float64"),
    (dict(online_gamma=1.5), ValueError, r"online_gamma must be None or a number in \[0, 1\], got 1.5"),
    (dict(lam="big"), TypeError, r"lam must be a real number, got 'big'"),
]


@pytest.mark.parametrize("kwargs, exc, pattern", BAD)
def test_bad_arguments_name_the_class_and_argument(kwargs, exc, pattern):
    with pytest.raises(exc, match=r"retain\.cl\.EWC: " + pattern):
        retain.cl.EWC(tiny_model(), **kwargs)


def test_bad_data_names_the_method():
    ewc = retain.cl.EWC(tiny_model())
    with pytest.raises(TypeError, match=r"retain\.cl\.EWC\.consolidate: data must yield \(inputs, targets\) pairs"):
        ewc.consolidate([torch.zeros(2, 5)], F.cross_entropy)
    with pytest.raises(ValueError, match=r"retain\.cl\.EWC\.consolidate: data held no samples"):
        ewc.consolidate([], F.cross_entropy)
    with pytest.raises(TypeError, match=r"retain\.cl\.EWC\.consolidate: loss_fn must be callable"):
        ewc.consolidate(batches(), "ce")
