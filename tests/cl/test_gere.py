"""retain.cl.GeRe: the replay anchor (statistics, thresholds, packed labels) built from a small
transformer, its TM loss, persistence, the total-loss helper and a distributed build."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch import nn

from retain.cl import GeRe, forward_with_hidden, gere_total_loss
from retain.cl._files import save_tensor_file
from retain.ops import activation_stats, unpack_tm_labels
from retain.ops.margin import ActivationStats
from retain.ops.margin import reference
from tests.helpers import assert_close

VOCAB, WIDTH = 50, 24


class TinyLM(nn.Module):
    """A one-layer causal transformer LM: embedding, encoder layer, final norm, head."""

    def __init__(self, vocab=VOCAB, d=WIDTH, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x, attention_mask=None):
        L = x.shape[1]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), 1)
        pad = None if attention_mask is None else ~attention_mask.bool()
        return self.head(self.norm(self.layer(self.emb(x), src_mask=causal, src_key_padding_mask=pad)))


class HFStyle(nn.Module):
    """A model answering output_hidden_states=True like Hugging Face models (a dict output)."""

    def __init__(self):
        super().__init__()
        self.lm = TinyLM()

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        h0 = self.lm.emb(input_ids)
        pad = None if attention_mask is None else ~attention_mask.bool()
        h1 = self.lm.norm(self.lm.layer(h0, src_key_padding_mask=pad))
        return {"logits": self.lm.head(h1), "hidden_states": (h0, h1) if output_hidden_states else None}


def replay_set(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g) for _ in range(n)]


def hidden_of(model, samples, i):
    with torch.no_grad():
        _, h = forward_with_hidden(model, samples[i][None], torch.ones(1, samples[i].shape[0], dtype=torch.bool),
                                   layer="norm")
    return h[0]


def test_anchor_matches_the_formula():
    model, samples = TinyLM(), replay_set()
    gere = GeRe.build(model, samples, layer="norm", k=1.0, batch_size=3)
    refs = [hidden_of(model, samples, i) for i in range(len(samples))]
    whole = torch.cat(refs).double()
    assert gere.stats[0].count.item() == whole.shape[0]
    # float32 forwards batched differently: compare at float32 precision
    assert_close(gere.stats[0].mean.float(), whole.mean(0).float())
    std = whole.std(0)
    assert_close(gere.pos_thr[0], (whole.mean(0) + std).float())
    assert_close(gere.neg_thr[0], (whole.mean(0) - std).float())
    for i, r in enumerate(refs):
        rows = unpack_tm_labels(gere.labels[gere.offsets[i]:gere.offsets[i + 1]], WIDTH)
        want = reference.tm_labels_ref(r, gere.pos_thr[0], gere.neg_thr[0])
        # the batched forward may differ from the single-sample one in the last bit: allow only
        # elements within 1e-5 of a threshold to disagree
        near = ((r - gere.pos_thr[0]).abs() < 1e-5) | ((r - gere.neg_thr[0]).abs() < 1e-5)
        assert torch.equal(rows[~near], want[~near])
    assert gere.num_samples == len(samples) and torch.equal(gere.lengths, torch.tensor([len(s) for s in samples]))
    assert {-1, 0, 1} <= set(unpack_tm_labels(gere.labels, WIDTH).unique().tolist())


def test_loss_is_zero_at_the_base_model_and_grows_when_hidden_moves():
    model, samples = TinyLM(), replay_set()
    gere = GeRe.build(model, samples, layer="norm", batch_size=4)
    ids = torch.tensor([4, 0, 6])
    x, mask = gere.batch(ids, samples)
    _, h = gere.forward(model, x, mask)
    assert gere.loss(h, ids, mask).item() == 0.0
    moved = h.detach() + 3.0 * torch.randn_like(h)
    moved.requires_grad_(True)
    loss = gere.loss(moved, ids, mask)
    assert loss.item() > 0
    loss.backward()
    # the gradient is +-1/#violations on violating elements, 0 on padding
    g = moved.grad
    nz = g[g != 0].abs()
    assert torch.allclose(nz, nz[0].expand_as(nz))
    assert (g[~mask] == 0).all()


def test_loss_equals_tm_loss_of_the_reference_labels():
    model, samples = TinyLM(), replay_set()
    gere = GeRe.build(model, samples, layer="norm")
    ids = torch.tensor([1, 3])
    x, mask = gere.batch(ids, samples)
    h = torch.randn(2, x.shape[1], WIDTH, dtype=torch.float32)
    labels = torch.zeros(2, x.shape[1], WIDTH, dtype=torch.int8)
    for b, i in enumerate(ids.tolist()):
        n = len(samples[i])
        labels[b, :n] = unpack_tm_labels(gere.labels[gere.offsets[i]:gere.offsets[i + 1]], WIDTH)
    for reduction in ("violations", "mean", "sum"):
        want = reference.tm_loss_ref(h.double(), labels, gere.pos_thr[0].double(), gere.neg_thr[0].double(),
                                     mask=mask, reduction=reduction)
        assert_close(gere.loss(h, ids, mask, reduction=reduction), want.float())


def test_positions_beyond_a_samples_length_do_not_count():
    model, samples = TinyLM(), replay_set()
    gere = GeRe.build(model, samples, layer="norm")
    i = 2
    n = len(samples[i])
    h = torch.randn(1, n + 6, WIDTH) * 5
    full = gere.loss(h, [i], None, reduction="sum")
    cut = gere.loss(h[:, :n], [i], None, reduction="sum")
    assert full.item() == cut.item() > 0


def test_per_group_thresholds():
    model, samples = TinyLM(), replay_set(8)
    groups = [0, 1, 0, 1, 1, 0, 0, 1]
    gere = GeRe.build(model, samples, layer="norm", groups=groups)
    assert gere.pos_thr.shape == (2, WIDTH)
    for g in (0, 1):
        h = torch.cat([hidden_of(model, samples, i) for i in range(8) if groups[i] == g]).double()
        assert_close(gere.pos_thr[g], (h.mean(0) + h.std(0)).float())
    ids = torch.tensor([0, 1])
    x, mask = gere.batch(ids, samples)
    _, hb = gere.forward(model, x, mask)
    assert gere.loss(hb, ids, mask).item() == 0.0


def test_output_hidden_states_models():
    model, samples = HFStyle(), replay_set()
    gere = GeRe.build(model, samples)          # layer=None: outputs['hidden_states'][-1]
    ids = torch.tensor([0, 5])
    x, mask = gere.batch(ids, samples)
    out, h = gere.forward(model, x, mask)
    assert out["logits"].shape == (2, x.shape[1], VOCAB)
    assert gere.loss(h, ids, mask).item() == 0.0


def test_build_restores_training_mode_and_needs_no_grad():
    model = TinyLM().train()
    GeRe.build(model, replay_set(), layer="norm")
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def train(model, gere, samples, steps, use_gere, seed=0):
    """Fine-tune on a new task (predict token + 1) with or without the replay TM term."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ce = nn.CrossEntropyLoss()
    for step in range(steps):
        x = torch.randint(0, VOCAB - 1, (8, 12))
        task_ce = ce(model(x).reshape(-1, VOCAB), (x + 1).reshape(-1))
        ids = torch.tensor([step % gere.num_samples, (step + 3) % gere.num_samples])
        xr, mask = gere.batch(ids, samples)
        logits, h = gere.forward(model, xr, mask)
        replay_ce = ce(logits[:, :-1][mask[:, 1:]], xr[:, 1:][mask[:, 1:]])
        tm = gere.loss(h, ids, mask) if use_gere else None
        loss = gere_total_loss(task_ce, replay_ce, tm, w=10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def replay_tm(model, gere, samples):
    ids = torch.arange(gere.num_samples)
    x, mask = gere.batch(ids, samples)
    with torch.no_grad():
        _, h = gere.forward(model, x, mask)
        return gere.loss(h, ids, mask, reduction="mean").item()


def test_gere_keeps_replay_activations_closer_to_the_base_model():
    samples = replay_set()
    base = TinyLM()
    gere = GeRe.build(base, samples, layer="norm")
    plain, guarded = TinyLM(), TinyLM()
    train(plain, gere, samples, 40, use_gere=False)
    train(guarded, gere, samples, 40, use_gere=True)
    drift_plain, drift_gere = replay_tm(plain, gere, samples), replay_tm(guarded, gere, samples)
    assert drift_plain > 0
    assert drift_gere < 0.1 * drift_plain, (drift_gere, drift_plain)


def test_save_and_load_round_trip(tmp_path):
    gere = GeRe.build(TinyLM(), replay_set(), layer="norm", groups=[0, 1, 0, 0, 1, 1, 0])
    path = tmp_path / "anchor.pt"
    gere.save(path)
    assert os.listdir(tmp_path) == ["anchor.pt"], "no temporary file left behind"
    back = GeRe.load(path, dim=WIDTH)
    for name in ("labels", "offsets", "groups", "pos_thr", "neg_thr"):
        assert torch.equal(getattr(back, name), getattr(gere, name)), name
    for a, b in zip(back.stats, gere.stats):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2) and torch.equal(a.count, b.count)
    assert back.k == gere.k and back.layer == "norm"


def test_load_rejects_other_files(tmp_path):
    gere = GeRe.build(TinyLM(), replay_set(), layer="norm")
    state = gere.state_dict()
    cases = [
        ({**state, "version": 99}, "format version 99 is not supported"),
        ({**state, "format": "other"}, "is not a GeRe anchor"),
        ({**state, "mean": state["mean"][:, :5]}, r"mean must have shape \(1, 24\)"),
        ({**state, "labels": state["labels"][:, :2]}, r"labels must be packed uint8 \[tokens, ceil\(D/4\) = 6\]"),
        ({**state, "offsets": state["offsets"] + 1}, "offsets must rise from 0"),
    ]
    cases.append(({k: v for k, v in state.items() if k != "dim"}, r"the anchor lacks \['dim'\]"))
    for i, (bad, match) in enumerate(cases):
        for write in (save_tensor_file, torch.save):  # the file format, and an earlier version's torch.save zip
            p = tmp_path / f"bad{i}.pt"
            write(bad, p)
            with pytest.raises(ValueError, match=match):
                GeRe.load(p)
    p = tmp_path / "ok.pt"
    gere.save(p)
    with pytest.raises(ValueError, match="the anchor's hidden size is 24, the model's 32"):
        GeRe.load(p, dim=32)


def test_damaged_anchor_files_are_refused_and_old_ones_still_load(tmp_path):
    gere = GeRe.build(TinyLM(), replay_set(), layer="norm")
    path = tmp_path / "anchor.pt"
    gere.save(path)
    data = path.read_bytes()
    labels = gere.labels.numpy().tobytes()
    at = data.find(labels)
    assert at > 0
    flipped = bytearray(data)
    flipped[at + 3] ^= 0x01  # one bit of one 2-bit label
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"GeRe.load: .*fails its checksum"):
        GeRe.load(tmp_path / "flip.pt")
    (tmp_path / "cut.pt").write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"GeRe.load: .*is truncated"):
        GeRe.load(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"GeRe.load: .*is empty"):
        GeRe.load(tmp_path / "empty.pt")
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # a broken zip of an earlier version
    with pytest.raises(ValueError, match=r"GeRe.load: .*not a readable retain file \(truncated or corrupt") as e:
        GeRe.load(tmp_path / "zip.pt")
    assert "weights_only=False" not in str(e.value)
    torch.save(gere.state_dict(), tmp_path / "old.pt")  # an anchor an earlier retain wrote
    assert torch.equal(GeRe.load(tmp_path / "old.pt").labels, gere.labels)


def test_bad_input_errors():
    model, samples = TinyLM(), replay_set()
    gere = GeRe.build(model, samples, layer="norm")
    h = torch.randn(2, 5, WIDTH)
    with pytest.raises(ValueError, match="hidden size D must be the anchor's 24, got 7"):
        gere.loss(torch.randn(2, 5, 7), [0, 1])
    with pytest.raises(ValueError, match=r"sample_ids must hold one id per row of hidden \(2\), got 3"):
        gere.loss(h, [0, 1, 2])
    with pytest.raises(ValueError, match=r"sample_ids must be in \[0, 7\)"):
        gere.loss(h, [0, 7])
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\)"):
        gere.loss(h, [0, 1], torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"GeRe\.loss: sample_ids must be integers, got float32 values"):
        gere.loss(h, torch.tensor([0.0, 2.7]))
    with pytest.raises(TypeError, match=r"GeRe\.batch: sample_ids must be integers, got float32 values"):
        gere.batch([0.0, 2.7], samples)
    with pytest.raises(ValueError, match="layer 'nrom' is not a submodule of TinyLM"):
        GeRe.build(model, samples, layer="nrom")
    with pytest.raises(ValueError, match="takes no output_hidden_states"):
        GeRe.build(model, samples)
    with pytest.raises(ValueError, match="samples is empty"):
        GeRe.build(model, [], layer="norm")
    with pytest.raises(ValueError, match=r"samples\[1\] must be a non-empty tensor"):
        GeRe.build(model, [samples[0], torch.zeros(0, dtype=torch.long)], layer="norm")


def test_non_finite_statistics_are_refused(tmp_path):
    """A model that emits NaN (or inf) hidden states would give NaN thresholds and then a loss of
    0 or NaN for ever: build refuses it, and load refuses an anchor whose statistics are not finite."""
    model, samples = TinyLM(), replay_set()
    with torch.no_grad():
        model.norm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"GeRe\.build: the activation statistics of group 0 must be finite, got a "
                                         r"non-finite mean \(did the model emit NaN or inf hidden states\?\)"):
        GeRe.build(model, samples, layer="norm")
    state = GeRe.build(TinyLM(), samples, layer="norm").state_dict()
    state["m2"][0, 5] = float("inf")
    with pytest.raises(ValueError, match=r"GeRe\.load: the activation statistics of group 0 must be finite, got a "
                                         "non-finite m2"):
        GeRe.from_state_dict(state)


def test_label_storage_of_a_563_token_sample_of_a_4096_wide_model():
    D, L = 4096, 563
    stats = ActivationStats(torch.tensor(2.0, dtype=torch.float64), torch.zeros(D, dtype=torch.float64),
                            torch.ones(D, dtype=torch.float64))
    gere = GeRe(stats=[stats], labels=torch.zeros(L, D // 4, dtype=torch.uint8),
                offsets=torch.tensor([0, L]), groups=torch.zeros(1, dtype=torch.int64))
    assert gere.nbytes == 576_512
    assert L * D * 4 == 16 * gere.nbytes


def test_total_loss():
    task, replay = torch.tensor(2.0, requires_grad=True), torch.tensor(4.0, requires_grad=True)
    tm = torch.tensor(0.5, requires_grad=True)
    total = gere_total_loss(task, replay, tm, w="dy")
    assert total.item() == pytest.approx(3.0 + 3.0 / (0.5 + 1e-8) * 0.5)
    total.backward()
    assert tm.grad.item() == pytest.approx(3.0 / (0.5 + 1e-8))   # w is detached: d/dTM = w
    assert task.grad.item() == pytest.approx(0.5)
    assert gere_total_loss(task, None, tm, w=100).item() == pytest.approx(2.0 + 50.0)
    assert gere_total_loss(None, replay).item() == 4.0
    assert gere_total_loss(task, replay, torch.tensor(1e-9), w="dy", max_w=10.0).item() == pytest.approx(3.0 + 1e-8)
    with pytest.raises(ValueError, match="w must be 'dy' or a number"):
        gere_total_loss(task, replay, tm, w="static")
    with pytest.raises(ValueError, match="needs task_ce or replay_ce"):
        gere_total_loss(None, None, tm)


def test_sampler_indexes_replay_samples_first():
    gere = GeRe.build(TinyLM(), replay_set(), layer="norm")
    s = gere.sampler(20, micro_batch_size=4, replay_per_batch=1)
    idx = list(s)
    assert sum(i < gere.num_samples for i in idx) == len(idx) // 4


def test_stats_combine_equals_the_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=g, dtype=torch.float64) * 2 + 1e4
    parts = [activation_stats(x[a:b]) for a, b in ((0, 10), (10, 11), (11, 60), (60, 90))]
    whole = activation_stats(x)
    both = ActivationStats.combine(parts)
    assert both.count.item() == 90
    assert_close(both.mean, whole.mean)
    assert_close(both.m2, whole.m2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(10 + 7 * rank, 6, generator=g, dtype=torch.float64) + 50
        reduced = activation_stats(x).all_reduce()
        gere = GeRe.build(TinyLM(), replay_set(), layer="norm", batch_size=1)
        torch.save({"stats": (reduced.count, reduced.mean, reduced.m2), "anchor": gere.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_build_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_distributed_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    xs = [torch.randn(10 + 7 * r, 6, generator=torch.Generator().manual_seed(r), dtype=torch.float64) + 50
          for r in range(world)]
    whole = activation_stats(torch.cat(xs))
    single = GeRe.build(TinyLM(), replay_set(), layer="norm", batch_size=1).state_dict()
    for r in range(world):
        n, mean, m2 = got[r]["stats"]
        assert n.item() == whole.count.item()
        assert_close(mean, whole.mean)
        assert_close(m2, whole.m2)
        anchor = got[r]["anchor"]
        assert torch.equal(anchor["labels"], single["labels"])   # batches of one sample: bitwise the same forwards
        assert torch.equal(anchor["offsets"], single["offsets"])
        assert_close(anchor["mean"], single["mean"])
        assert_close(anchor["m2"], single["m2"])
