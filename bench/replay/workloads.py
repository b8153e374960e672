"""Replay workloads side by side in one run, with the machine's ceilings measured in the same run:

1. prioritized replay at capacity 1M: sample 256 with importance weights + update their 256
   priorities — retain's SumTree/MinTree, retain.cl.ReplayBuffer('prioritized'), cpprb's
   PrioritizedReplayBuffer (C++), torchrl's PrioritizedSampler (where its C++ tree loads);
2. ReplayBuffer.add with the reservoir policy (batches of 128 CIFAR images into a full 5000-item
   buffer) against a Mammoth-style per-example Python loop, and torchrl's ReplayBuffer(LazyTensorStorage)
   extend (ring writer: torchrl has no reservoir writer);
3. sampling 256 rows from a 100k × 3×32×32 float32 buffer (1.2 GB), as GB/s against the measured
   copy bandwidth, against torchrl's ReplayBuffer(LazyTensorStorage).sample;
4. save + load of a 1 GB buffer (atomic, checksummed) against the disk's sequential write and read
   of a 1 GB file measured alike (write + fsync; read of the file just written).

    python bench/replay/workloads.py [--quick] [--out bench/results/replay_workloads_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

import retain
from retain.bench.machine import machine_facts, measure_ceilings
from retain.cl import ReplayBuffer
from retain.ops import MinTree, SumTree, importance_weights


def median_ms(fn, reps: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


# -- 1. prioritized replay ----------------------------------------------------------------------

def prioritized(capacity: int, k: int, reps: int) -> list[tuple[str, str, str]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    init = torch.rand(capacity, generator=g, dtype=torch.float64) + 0.01
    new = [torch.rand(k, generator=g, dtype=torch.float64) + 0.01 for _ in range(16)]
    it = {"i": 0}

    def next_p():
        it["i"] += 1
        return new[it["i"] % 16]

    s, m = SumTree(capacity), MinTree(capacity)
    s.update(torch.arange(capacity), init)
    m.update(torch.arange(capacity), init)

    def trees():
        idx, prob = s.sample(k, generator=g)
        importance_weights(prob, beta=0.4, min_prob=m.root() / s.root())
        p = next_p()
        s.update(idx, p)
        m.update(idx, p)

    rows.append(("retain SumTree + MinTree", f"{median_ms(trees, reps):.3f}",
                 "stratified sample, weights from the buffer-wide minimum, both trees updated"))

    buf = ReplayBuffer(capacity, {"obs": ((1,), torch.float32)}, policy="prioritized", seed=0)
    buf.add({"obs": torch.zeros(capacity, 1)})
    buf.update_priorities(torch.arange(capacity), init)

    def rbuf():
        b = buf.sample(k)
        buf.update_priorities(b["index"], next_p())

    rows.append(("retain ReplayBuffer('prioritized')", f"{median_ms(rbuf, reps):.3f}",
                 "the same through the buffer: rows gathered, (|δ|+ε)^α, running max, checks"))
    try:
        import cpprb

        rb = cpprb.PrioritizedReplayBuffer(capacity, {"obs": {"shape": 1}}, alpha=0.6)
        rb.add(obs=torch.zeros(capacity, 1).numpy(), priorities=init.numpy())
        newn = [p.numpy() for p in new]

        def cp():
            b = rb.sample(k, beta=0.4)
            rb.update_priorities(b["indexes"], newn[it["i"] % 16])
            it["i"] += 1

        rows.append((f"cpprb {getattr(cpprb, '__version__', '')} PrioritizedReplayBuffer".replace("  ", " "),
                     f"{median_ms(cp, reps):.3f}", "C++ sum/min segment trees (float32), sample + weights + update"))
    except ImportError as e:
        rows.append(("cpprb PrioritizedReplayBuffer", "—", f"not installed ({e})"))
    try:
        import torchrl
        from torchrl.data import PrioritizedSampler
        from torchrl.data.replay_buffers.storages import LazyTensorStorage

        st = LazyTensorStorage(capacity)
        st.set(torch.arange(capacity), torch.zeros(capacity, 1))
        ps = PrioritizedSampler(capacity, alpha=0.6, beta=0.4)
        ps.update_priority(torch.arange(capacity), init)

        def trl():
            idx, info = ps.sample(st, k)
            ps.update_priority(idx, next_p())

        rows.append((f"torchrl {torchrl.__version__} PrioritizedSampler", f"{median_ms(trl, reps):.3f}",
                     "C++ sum tree, i.i.d. sample + update"))
    except Exception as e:  # noqa: BLE001 - report why it could not run
        msg = str(e).splitlines()[0][:160]
        rows.append(("torchrl PrioritizedSampler", "—", f"could not run: {type(e).__name__}: {msg}"))
    return rows


# -- 2. reservoir add ---------------------------------------------------------------------------

class MammothStyleBuffer:
    """A per-example reservoir insert loop as Mammoth's Buffer.add_data does it (Python's random
    per example, a tensor row assignment per kept example)."""

    def __init__(self, capacity, shape):
        self.capacity, self.num_seen = capacity, 0
        self.examples = torch.zeros(capacity, *shape)
        self.labels = torch.zeros(capacity, dtype=torch.long)
        self.rng = random.Random(0)

    def _slot(self):
        if self.num_seen < self.capacity:
            return self.num_seen
        r = self.rng.randint(0, self.num_seen)
        return r if r < self.capacity else -1

    def add_data(self, x, y):
        for i in range(x.shape[0]):
            index = self._slot()
            self.num_seen += 1
            if index >= 0:
                self.examples[index] = x[i]
                self.labels[index] = y[i]


def reservoir_add(capacity: int, batch: int, reps: int, shape: tuple[int, ...]) -> list[tuple[str, str, str]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    buf = ReplayBuffer(capacity, {"x": (shape, torch.float32), "y": ((), torch.long)}, seed=0)
    for _ in range(capacity // batch + 1):
        buf.add({"x": x, "y": y})
    mam = MammothStyleBuffer(capacity, shape)
    for _ in range(capacity // batch + 1):
        mam.add_data(x, y)
    rows = [("retain ReplayBuffer.add (reservoir)", f"{median_ms(lambda: buf.add({'x': x, 'y': y}), reps):.3f}",
             "native slots, one multi-field scatter"),
            ("Mammoth-style per-example loop", f"{median_ms(lambda: mam.add_data(x, y), reps):.3f}",
             "Python random + a row assignment per example")]
    fresh = MammothStyleBuffer(capacity, shape)
    rows.append(("Mammoth-style loop while filling", f"{median_ms(lambda: fresh.add_data(x, y), 3, warm=0):.3f}",
                 "every example stored (first 3 batches)"))
    try:
        import torchrl
        from tensordict import TensorDict
        from torchrl.data import ReplayBuffer as TrlBuffer
        from torchrl.data.replay_buffers.storages import LazyTensorStorage

        trb = TrlBuffer(storage=LazyTensorStorage(capacity), batch_size=256)
        td = TensorDict({"x": x, "y": y}, batch_size=[batch])
        for _ in range(capacity // batch + 1):
            trb.extend(td)
        rows.append((f"torchrl {torchrl.__version__} ReplayBuffer(LazyTensorStorage).extend",
                     f"{median_ms(lambda: trb.extend(td), reps):.3f}", "ring writer (no reservoir writer in torchrl)"))
    except Exception as e:  # noqa: BLE001
        rows.append(("torchrl ReplayBuffer.extend", "—", f"could not run: {type(e).__name__}: {str(e)[:120]}"))
    return rows


# -- 3. sampling bandwidth ----------------------------------------------------------------------

def sampling(capacity: int, k: int, reps: int, copy_gbps: float) -> list[tuple[str, str, str, str]]:
    shape = (3, 32, 32)
    row_bytes = 3 * 32 * 32 * 4 + 8
    buf = ReplayBuffer(capacity, {"x": (shape, torch.float32), "y": ((), torch.long)}, seed=0)
    chunk = 10_000
    for start in range(0, capacity, chunk):
        n = min(chunk, capacity - start)
        buf.add({"x": torch.randn(n, *shape), "y": torch.randint(0, 10, (n,))})
    moved = 2 * k * row_bytes / 1e9  # each row read from the buffer and written to the batch

    def gbps(ms):
        return f"{moved / (ms / 1e3):.1f} ({100 * moved / (ms / 1e3) / copy_gbps:.0f}% of copy)"

    ms = median_ms(lambda: buf.sample(k), reps)
    rows = [("retain ReplayBuffer.sample", f"{ms:.3f}", gbps(ms), "randint + one multi-field gather")]
    try:
        import torchrl
        from tensordict import TensorDict
        from torchrl.data import ReplayBuffer as TrlBuffer
        from torchrl.data.replay_buffers.storages import LazyTensorStorage

        trb = TrlBuffer(storage=LazyTensorStorage(capacity), batch_size=k)
        trb.extend(TensorDict({"x": buf._columns["x"], "y": buf._columns["y"]}, batch_size=[capacity]))
        ms = median_ms(lambda: trb.sample(), reps)
        rows.append((f"torchrl {torchrl.__version__} ReplayBuffer(LazyTensorStorage).sample", f"{ms:.3f}", gbps(ms),
                     "RandomSampler, TensorDict indexing"))
    except Exception as e:  # noqa: BLE001
        rows.append(("torchrl ReplayBuffer.sample", "—", "—", f"could not run: {type(e).__name__}: {str(e)[:120]}"))
    return rows


# -- 4. checkpoints -----------------------------------------------------------------------------

def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def checkpoints(nbytes: int, folder: str) -> list[tuple[str, str, str, str]]:
    shape = (3, 32, 32)
    capacity = nbytes // (3 * 32 * 32 * 4)
    buf = ReplayBuffer(capacity, {"x": (shape, torch.float32)}, seed=0)
    for start in range(0, capacity, 8192):
        n = min(8192, capacity - start)
        buf.add({"x": torch.randn(n, *shape)})
    size = buf._columns["x"].nbytes / 1e9
    raw = os.path.join(folder, "raw.bin")
    data = buf._columns["x"].numpy()

    def write_raw():  # what any atomic save must do: a fresh file, fsync, rename over the last one
        tmp = raw + ".tmp"
        with open(tmp, "wb") as f:
            f.write(memoryview(data).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, raw)

    def read_raw():
        with open(raw, "rb") as f:
            while f.read(64 << 20):
                pass

    ckpt = os.path.join(folder, "buf.pt")
    other = ReplayBuffer(capacity, {"x": (shape, torch.float32)}, seed=1)
    results: dict[str, list[float]] = {}

    def timed(name, fn, cold=False):
        os.sync()  # no other write-back in flight: each write meets the same disk
        if cold:
            _drop_caches()
        t = time.perf_counter()
        fn()
        results.setdefault(name, []).append(time.perf_counter() - t)

    for r in range(5):  # alternated, in both orders, so a slow phase of the VM's disk hits both
        pair = [("write", write_raw), ("save", lambda: buf.save(ckpt))]
        for name, fn in pair if r % 2 == 0 else pair[::-1]:
            timed(name, fn)
    for r in range(5):
        pair = [("read", read_raw), ("load", lambda: other.load(ckpt))]
        for name, fn in pair if r % 2 == 0 else pair[::-1]:
            timed(name, fn)
    if _drop_caches():
        for r in range(5):
            pair = [("read (cold cache)", read_raw), ("load (cold cache)", lambda: other.load(ckpt))]
            for name, fn in pair if r % 2 == 0 else pair[::-1]:
                timed(name, fn, cold=True)
    best = {k: min(v) for k, v in results.items()}
    results = {k: statistics.median(v) for k, v in results.items()}
    assert torch.equal(other._columns["x"], buf._columns["x"])
    def cell(name):
        return f"{size / results[name]:.2f} (best {size / best[name]:.2f})", f"{results[name]:.2f}"

    rows = [("disk: the buffer's bytes to a fresh file + fsync + rename", *cell("write"), "the ceiling"),
            ("ReplayBuffer.save", *cell("save"),
             f"{100 * results['write'] / results['save']:.0f}% of the disk's write, best "
             f"{100 * best['write'] / best['save']:.0f}% (checksum + header + one write per tensor + fsync + rename)")]
    for suffix in ("", " (cold cache)"):
        if "read" + suffix in results:
            rows.append((f"disk: read the file{suffix}", *cell("read" + suffix), "the ceiling"))
            rows.append((f"ReplayBuffer.load{suffix}", *cell("load" + suffix),
                         f"{100 * results['read' + suffix] / results['load' + suffix]:.0f}% of the disk's read "
                         "(map the file + checksum + copy into the storage)"))
    return rows


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--only", default="prioritized,add,sample,checkpoint",
                    help="comma-separated sections to run (default: all four)")
    args = ap.parse_args()
    q = args.quick
    facts = machine_facts("cpu")
    ceil = measure_ceilings("cpu", quick=q)
    reps = 20 if q else 200
    opts = (" --quick" if q else "") + (f" --only {args.only}" if args.only != ap.get_default("only") else "")
    parts = [f"# Replay workloads (CPU)\n\n`python bench/replay/workloads.py{opts}`\n",
             f"- CPU: {facts['cpu']} ({facts['cpu_isa']}), {facts['logical_cpus']} logical CPUs; "
             f"retain {retain.__version__}, torch {torch.__version__}, "
             f"CPU capability {retain._native.cpu_capability()}, {torch.get_num_threads()} threads",
             f"- measured copy bandwidth: {ceil['copy_gbps']:.1f} GB/s (median over allocations, best "
             f"{ceil['copy_gbps_best']:.1f})\n"]
    only = set(args.only.split(","))
    cap = 20_000 if q else 1_000_000
    parts += [] if "prioritized" not in only else [f"## Prioritized replay: sample 256 + update their priorities, capacity {cap:,}\n",
              table(["implementation", "median ms", "what"], prioritized(cap, 256, reps)), ""]
    cap = 1_000 if q else 5_000
    for shape, what, batch in (((3, 32, 32), "CIFAR images (3×32×32 float32)", 128),
                               ((64,), "64-float features", 128), ((64,), "64-float features", 1024)):
        if "add" not in only:
            break
        rows = reservoir_add(cap, batch, reps, shape)
        ratio = float(rows[1][1]) / float(rows[0][1])
        parts += [f"## Reservoir insertion: add {batch} {what} + labels to a full {cap}-item buffer\n",
                  table(["implementation", "median ms", "what"], rows),
                  f"\nretain is {ratio:.1f}x the Mammoth-style loop.\n"]
    cap = 5_000 if q else 100_000
    parts += [] if "sample" not in only else [f"## Sampling 256 rows from a {cap:,} × 3×32×32 float32 buffer ({cap * 12296 / 1e9:.2f} GB)\n",
              table(["implementation", "median ms", "GB/s", "what"], sampling(cap, 256, reps, ceil["copy_gbps"])), ""]
    nbytes = (64 << 20) if q else 1_000_000_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("RETAIN_BENCH_DIR", os.getcwd())) as folder:
        parts += [] if "checkpoint" not in only else [f"## Save + load of a {nbytes / 1e9:.2f} GB buffer (median of 5 alternations in both orders, after a sync; "
                  f"disk of {folder.rsplit('/', 1)[0]})\n",
                  table(["operation", "GB/s", "seconds", "vs the disk"], checkpoints(nbytes, folder)), ""]
    report = "\n".join(parts)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
