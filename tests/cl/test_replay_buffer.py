"""retain.cl.ReplayBuffer: every policy against a reference simulation, uniform and prioritized
sampling by chi-square, importance weights, quantised fields, memory-mapped storage, exact resume
through several save/load cycles, atomic saves that survive a process killed mid-save, checksummed
files, two gloo processes (global sampling uniform over the union, exact 2-rank resume), bad input."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

import retain
from retain.cl import ReplayBuffer
from retain.ops.replay import reference as ref
from tests.helpers import DEVICES, assert_close
from tests.ops.replay.stats import assert_fits

FIELDS = {"x": ((3,), torch.float32), "y": ((), torch.long)}


def _items(start, n):
    ids = torch.arange(start, start + n)
    return {"x": ids[:, None].float().expand(n, 3) * torch.tensor([1.0, -1.0, 0.5]), "y": ids}


def _items_with_class(start, n):
    d = _items(start, n)
    d["c"] = d["y"] % 5
    return d


def _stream(buf, sizes, start=0, items=_items):
    for n in sizes:
        buf.add(items(start, n))
        start += n
    return start


@given(capacity=st.integers(1, 20), sizes=st.lists(st.integers(0, 15), max_size=8),
       policy=st.sampled_from(["reservoir", "ring"]), seed=st.integers(0, 1000))
def test_contents_follow_the_slots_and_the_policy(capacity, sizes, policy, seed):
    buf = ReplayBuffer(capacity, FIELDS, policy=policy, seed=seed)
    want = [None] * capacity
    gen = torch.Generator().manual_seed(seed)
    start = 0
    for n in sizes:
        slots = buf.add(_items(start, n))
        if policy == "reservoir":  # the reference's slots from the same stream
            seed_j = int(torch.randint(0, 2**63 - 1, (), generator=gen, dtype=torch.int64))
            assert torch.equal(slots, ref.reservoir_slots_ref(start, n, capacity, seed_j))
        for j, s in enumerate(slots.tolist()):
            if s >= 0:
                want[s] = start + j
        start += n
    assert len(buf) == min(start, capacity) and buf.n_seen == start
    got = buf.contents()
    assert got["y"].tolist() == want[:len(buf)]
    assert torch.equal(got["x"], _items(0, start)["x"][got["y"]]) if len(buf) else True
    if policy == "ring":
        assert sorted(want[:len(buf)]) == list(range(start - len(buf), start))  # the newest


def test_reservoir_buffer_keeps_each_item_with_probability_capacity_over_n():
    hits = torch.zeros(120, dtype=torch.int64)
    for seed in range(1500):
        buf = ReplayBuffer(12, {"y": ((), torch.long)}, seed=seed)
        for start in range(0, 120, 32):
            buf.add({"y": torch.arange(start, min(start + 32, 120))})
        hits[buf.contents()["y"]] += 1
    assert_fits(hits, torch.full((120,), 1500 * 12 / 120), "ReplayBuffer reservoir inclusion")


def test_uniform_sampling_with_and_without_replacement():
    buf = ReplayBuffer(50, FIELDS, seed=3)
    _stream(buf, [30])
    s = buf.sample(30_000)
    assert torch.equal(s["y"], s["index"])  # item i sits in slot i while filling
    assert_fits(torch.bincount(s["index"], minlength=30), torch.full((30,), 1000.0), "uniform sampling")
    s = buf.sample(30, replace=False)
    assert sorted(s["index"].tolist()) == list(range(30))
    with pytest.raises(ValueError, match=r"ReplayBuffer.sample: n must be at most the 30 items stored when drawing without replacement, got 31"):
        buf.sample(31, replace=False)


def test_class_balanced_buffer_balances_classes():
    buf = ReplayBuffer(40, {"x": ((2,), torch.float32), "label": ((), torch.long)}, policy="class_balanced",
                       label_field="label", num_classes=4, seed=0)
    g = torch.Generator().manual_seed(0)
    labels = torch.multinomial(torch.tensor([0.85, 0.1, 0.03, 0.02]), 3000, replacement=True, generator=g)
    for chunk in labels.split(100):
        buf.add({"x": torch.randn(chunk.numel(), 2, generator=g), "label": chunk})
    counts = torch.bincount(buf.contents()["label"], minlength=4)
    assert int(counts.sum()) == 40 and int(counts.max() - counts.min()) <= 1


def test_prioritized_sampling_is_proportional_and_weights_follow_per():
    buf = ReplayBuffer(64, FIELDS, policy="prioritized", alpha=0.5, beta=0.7, eps=0.0, seed=1, stratified=False)
    _stream(buf, [64])
    assert torch.equal(buf._sum[:], torch.ones(64, dtype=torch.float64))  # new items at the running max
    td = torch.arange(64, dtype=torch.float64) % 8 + 1  # |δ| in 1..8
    buf.update_priorities(torch.arange(64), td)
    p = td.sqrt()
    s = buf.sample(40_000)
    assert_fits(torch.bincount(s["index"], minlength=64), 40_000 * p / p.sum(), "prioritized sampling")
    prob = p[s["index"]] / p.sum()
    want_w = (prob / (p.min() / p.sum())).pow(-0.7).float()
    torch.testing.assert_close(s["weight"], want_w)
    assert buf.max_priority == pytest.approx(math.sqrt(8))
    _stream(buf, [1], start=64)  # a new item takes the running maximum
    assert float(buf._sum[0]) == pytest.approx(math.sqrt(8))
    batch = ReplayBuffer(8, FIELDS, policy="prioritized", weights="batch", seed=0)
    _stream(batch, [8])
    batch.update_priorities(torch.arange(8), torch.arange(1, 9, dtype=torch.float64))
    assert float(batch.sample(16)["weight"].max()) == 1.0


def test_quantised_fields_stay_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(16, {"h": ((5, 7), torch.float32, "uint8"), "logits": ((10,), torch.float32)}, seed=0)
    h = torch.randn(16, 5, 7, generator=g) * 3
    h[3] = 1.25  # a constant item: exact
    buf.add({"h": h, "logits": torch.randn(16, 10, generator=g)})
    got = buf.contents()["h"]
    step = (h.reshape(16, -1).amax(1) - h.reshape(16, -1).amin(1)) / 255
    err = (got - h).abs().reshape(16, -1).amax(1)
    assert bool((err <= step / 2 + 1e-6).all()) and torch.equal(got[3], h[3])
    assert buf._columns["h"].dtype == torch.uint8
    with pytest.raises(ValueError, match=r"ReplayBuffer.add: batch\['h'\] is quantised and must be finite"):
        buf.add({"h": torch.full((1, 5, 7), float("nan")), "logits": torch.zeros(1, 10)})


def _run(buf, steps, start, saves_at=(), path=None, fields=FIELDS, kwargs=None, items=_items):
    """A fixed schedule of adds, samples and priority updates; at each step in ``saves_at`` the buffer
    is saved and replaced by a fresh one loaded from the file."""
    drawn = []
    for step in range(steps):
        if step in saves_at:
            buf.save(path)
            buf = ReplayBuffer(buf.capacity, fields, seed=999, **(kwargs or {}))
            buf.load(path)
        start = _stream(buf, [5 + step % 4], start, items)
        s = buf.sample(6)
        drawn.append(s["index"].clone())
        if buf.policy == "prioritized":
            buf.update_priorities(s["index"], s["x"][:, 0].abs().double() + step)
    return drawn, buf


@pytest.mark.parametrize("kwargs", [dict(policy="reservoir"), dict(policy="ring"), dict(policy="prioritized"),
                                    dict(policy="class_balanced", label_field="c", num_classes=5)],
                         ids=lambda k: k["policy"])
def test_resume_is_exact_through_several_save_load_cycles(tmp_path, kwargs):
    fields = {**FIELDS, "c": ((), torch.long)}
    want, a = _run(ReplayBuffer(20, fields, seed=7, **kwargs), 12, 0, items=_items_with_class)
    got, b = _run(ReplayBuffer(20, fields, seed=7, **kwargs), 12, 0, saves_at=(2, 5, 6, 10), path=tmp_path / "c.pt",
                  fields=fields, kwargs=kwargs, items=_items_with_class)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    sa, sb = a.state_dict(), b.state_dict()
    assert torch.equal(sa["generator"], sb["generator"]) and sa["n_seen"] == sb["n_seen"]
    assert all(torch.equal(sa["columns"][c], sb["columns"][c]) for c in sa["columns"])


def test_memory_mapped_storage_on_disk(tmp_path):
    store = tmp_path / "store"
    buf = ReplayBuffer(1000, {"x": ((64,), torch.float32), "y": ((), torch.long)}, storage=store, seed=0)
    assert (store / "x.bin").stat().st_size == 1000 * 64 * 4
    _stream_wide = {"x": torch.arange(300 * 64, dtype=torch.float32).reshape(300, 64), "y": torch.arange(300)}
    buf.add(_stream_wide)
    buf.save(tmp_path / "meta.pt")
    again = ReplayBuffer(1000, {"x": ((64,), torch.float32), "y": ((), torch.long)}, storage=store, seed=5)
    assert torch.equal(again._columns["x"][:300], _stream_wide["x"])  # the rows are in the files
    again.load(tmp_path / "meta.pt")
    assert len(again) == 300 and torch.equal(again.sample(4)["x"], buf.sample(4)["x"])


_SAVER = textwrap.dedent("""
    import sys, torch
    from retain.cl import ReplayBuffer
    buf = ReplayBuffer(4096, {"x": ((4096,), torch.float32)}, seed=0)
    buf.add({"x": torch.randn(4096, 4096)})
    print("ready", flush=True)
    while True:
        buf.save(sys.argv[1])
""")


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    buf = ReplayBuffer(8, FIELDS, seed=0)
    _stream(buf, [8])
    buf.save(path)
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while not any(p.name.startswith(".retain-") for p in tmp_path.iterdir()):  # a save under way
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    # the file is the first checkpoint or a complete later one, never a half-written one
    probe = ReplayBuffer(8, FIELDS, seed=1)
    try:
        probe.load(path)
        assert torch.equal(probe.contents()["y"], torch.arange(8))
    except ValueError as e:  # a complete save of the child's (another buffer) is refused by name
        assert "the saved buffer's capacity is 4096" in str(e)


def test_damaged_and_foreign_files_are_refused_with_a_reason(tmp_path):
    buf = ReplayBuffer(8, FIELDS, seed=0)
    _stream(buf, [8])
    path = tmp_path / "ckpt.pt"
    buf.save(path)
    data = bytearray(path.read_bytes())
    fresh = ReplayBuffer(8, FIELDS)
    # a flipped byte inside a tensor's payload: the zip still reads, the checksum does not match
    x = buf._columns["x"].numpy().tobytes()
    at = bytes(data).find(x)
    assert at > 0
    flipped = bytearray(data)
    flipped[at + 5] ^= 0x10
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"ReplayBuffer.load: .*fails its checksum"):
        fresh.load(tmp_path / "flip.pt")
    (tmp_path / "cut.pt").write_bytes(bytes(data[:len(data) // 2]))
    with pytest.raises(ValueError, match=r"ReplayBuffer.load: .* is truncated: \d+ bytes, its header describes \d+"):
        fresh.load(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ReplayBuffer.load: .* is empty"):
        fresh.load(tmp_path / "empty.pt")
    torch.save({"evil": _Evil()}, tmp_path / "evil.pt")  # a pickle: refused before anything is read from it
    with pytest.raises(ValueError, match=r"is not a retain tensor file \(no retain header\); retain loads only "
                                         r"files it wrote and never unpickles") as e:
        fresh.load(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(e.value)
    header = bytearray(data)
    header[20] ^= 0xFF  # inside the JSON header
    (tmp_path / "header.pt").write_bytes(bytes(header))
    with pytest.raises(ValueError, match=r"has a corrupt header|fails its checksum"):
        fresh.load(tmp_path / "header.pt")
    with pytest.raises(ValueError, match=r"the saved buffer's capacity is 8, this buffer's 9"):
        ReplayBuffer(9, FIELDS).load(path)
    with pytest.raises(ValueError, match=r"the saved buffer's fields is"):
        ReplayBuffer(8, {"x": ((4,), torch.float32), "y": ((), torch.long)}).load(path)
    with pytest.raises(FileNotFoundError, match=r"ReplayBuffer.load: no file at"):
        fresh.load(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


BAD_INIT = [
    (dict(capacity=0), ValueError, r"capacity must be an int >= 1, got 0"),
    (dict(fields={}), TypeError, r"fields must be a non-empty dict"),
    (dict(fields={"x": 3}), TypeError, r"fields\['x'\] must be \(shape, dtype\)"),
    (dict(fields={"x": ((3,), "float")}), TypeError, r"fields\['x'\] dtype must be a torch.dtype"),
    (dict(fields={"y": ((), torch.long, "uint8")}), TypeError, r"fields\['y'\] is quantised, so its dtype must be floating"),
    (dict(policy="fifo"), ValueError, r"policy must be one of \('reservoir', 'ring', 'class_balanced', 'prioritized'\)"),
    (dict(policy="class_balanced"), ValueError, r"policy 'class_balanced' needs label_field"),
    (dict(policy="class_balanced", label_field="x", num_classes=2), ValueError, r"label_field 'x' must be a scalar integer"),
    (dict(policy="class_balanced", label_field="y"), ValueError, r"policy .class_balanced. needs num_classes >= 1, got None"),
    (dict(beta=1.5), ValueError, r"beta must be a number in \[0, 1\], got 1.5"),
    (dict(weights="max"), ValueError, r"weights must be 'buffer' or 'batch'"),
    (dict(storage="/tmp/x", device="meta"), ValueError, r"memory-mapped storage lives on the CPU"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", BAD_INIT)
def test_bad_construction(kwargs, exc, pattern):
    args = dict(capacity=4, fields=FIELDS) | kwargs
    with pytest.raises(exc, match=r"retain.cl.ReplayBuffer: " + pattern):
        ReplayBuffer(args.pop("capacity"), args.pop("fields"), **args)


@pytest.mark.parametrize("batch,exc,pattern", [
    ({"x": torch.zeros(2, 3)}, ValueError, r"batch must hold every field of the buffer \['x', 'y'\], got no \['y'\]"),
    ({"x": torch.zeros(2, 3), "y": torch.zeros(2, dtype=torch.long), "z": torch.zeros(2)}, ValueError,
     r"batch must hold the buffer's fields \['x', 'y'\], got unknown field\(s\) \['z'\]"),
    ({"x": torch.zeros(2, 4), "y": torch.zeros(2, dtype=torch.long)}, ValueError,
     r"batch\['x'\] must have shape \(batch, \*\(3,\)\), got \(2, 4\)"),
    ({"x": torch.zeros(2, 3, dtype=torch.float64), "y": torch.zeros(2, dtype=torch.long)}, TypeError,
     r"batch\['x'\] must have dtype float32, got float64"),
    ({"x": torch.zeros(2, 3), "y": torch.zeros(3, dtype=torch.long)}, ValueError, r"every field must have the same batch size; 'y' has 3, the first field 2"),
    ([1, 2], TypeError, r"batch must be a dict of tensors, got list"),
])
def test_bad_add(batch, exc, pattern):
    with pytest.raises(exc, match=r"retain.cl.ReplayBuffer.add: " + pattern):
        ReplayBuffer(4, FIELDS).add(batch)


def test_bad_sample_and_priorities():
    buf = ReplayBuffer(4, FIELDS, policy="prioritized")
    with pytest.raises(ValueError, match=r"ReplayBuffer.sample: the buffer is empty"):
        buf.sample(1)
    _stream(buf, [3])
    for p, pattern in ((torch.tensor([-1.0]), r"priority must be finite and >= 0, got -1.0"),
                       (torch.tensor([float("nan")]), r"priority must be finite and >= 0, got nan")):
        with pytest.raises(ValueError, match=r"ReplayBuffer.update_priorities: " + pattern):
            buf.update_priorities(torch.tensor([0]), p)
    with pytest.raises(IndexError, match=r"update_priorities: index must be in \[0, 3\)"):
        buf.update_priorities(torch.tensor([3]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"ReplayBuffer.sample: n must be >= 0, got -2"):
        buf.sample(-2)
    with pytest.raises(ValueError, match=r"the buffer's policy is 'reservoir', not 'prioritized'"):
        ReplayBuffer(4, FIELDS).update_priorities(torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"scope='global' needs an initialised|scope must be"):
        ReplayBuffer(4, FIELDS).sample(1, scope="everywhere")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["reservoir", "ring", "prioritized"])
def test_every_policy_on_every_device_matches_the_cpu(device, policy):
    runs = {}
    for dev in ("cpu", device):
        buf = ReplayBuffer(16, {**FIELDS, "h": ((4,), torch.float32, "uint8")}, policy=policy, device=dev, seed=2)
        drawn = []
        for step in range(5):
            items = _items(8 * step, 8)
            items["h"] = items["x"][:, :1].expand(8, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])
            buf.add(items)
            s = buf.sample(5)
            assert s["x"].device.type == torch.device(dev).type
            drawn.append({k: v.cpu() for k, v in s.items()})
            if policy == "prioritized":
                buf.update_priorities(s["index"], s["y"].double().to(dev) % 3)
        runs[dev] = (drawn, {k: v.cpu() for k, v in buf.contents().items()})
    (a, ca), (b, cb) = runs["cpu"], runs[device]
    for want, got in [(x[k], y[k]) for x, y in zip(a, b) for k in x] + [(ca[k], cb[k]) for k in ca]:
        assert_close(got, want) if want.is_floating_point() else torch.testing.assert_close(got, want)


def test_iteration_and_repr():
    buf = ReplayBuffer(5, FIELDS, policy="ring")
    _stream(buf, [7])
    items = list(buf)
    assert [int(i["y"]) for i in items] == [5, 6, 2, 3, 4] and items[0]["x"].shape == (3,)
    assert "size=5, seen=7, policy='ring'" in repr(buf)


def _distributed_worker(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        sizes = (40, 60)  # shards of different sizes: uniform over the union is not uniform per shard
        buf = ReplayBuffer(100, FIELDS, seed=rank)
        offset = sum(sizes[:rank])
        buf.add(_items(offset, sizes[rank]))
        counts = torch.zeros(100, dtype=torch.int64)
        for _ in range(50):
            s = buf.sample(200, scope="global")
            assert torch.equal(s["y"], s["index"]), "a row from the wrong place"
            assert torch.equal(s["x"], _items(0, 100)["x"][s["index"]])
            counts += torch.bincount(s["index"], minlength=100)
        torch.save(counts, f"{out}.counts.{rank}")
        # exact 2-rank resume: save both shards, continue; reload and continue again
        buf.save(f"{out}.ckpt.{rank}")
        after = [buf.sample(32, scope="global")["index"] for _ in range(3)]
        again = ReplayBuffer(100, FIELDS, seed=123)
        again.load(f"{out}.ckpt.{rank}")
        resumed = [again.sample(32, scope="global")["index"] for _ in range(3)]
        torch.save(all(torch.equal(a, b) for a, b in zip(after, resumed)), f"{out}.resume.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_sample_uniformly_over_the_union_and_resume_exactly(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    counts = sum(torch.load(tmp_path / f"out.counts.{r}", weights_only=True) for r in range(2))
    assert int(counts.sum()) == 2 * 50 * 200
    assert_fits(counts, torch.full((100,), 2 * 50 * 200 / 100), "global sampling over two shards")
    assert all(torch.load(tmp_path / f"out.resume.{r}", weights_only=True) for r in range(2))


def test_the_docstring_example_runs():
    import doctest

    import retain.cl.replay_buffer as module

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module.ReplayBuffer, "ReplayBuffer", globs={"torch": torch, "retain": retain}):
        runner.run(test)
    assert runner.tries >= 1 and runner.failures == 0
