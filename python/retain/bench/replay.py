"""Benchmark cases of the replay family (``retain.ops.replay``) for ``retain bench``: reading and
writing a batch of rows of a replay buffer (CIFAR-sized images, labels and DER logits), against
the way it is written today — a torch indexing op per field (``eager``) — and that under
torch.compile. The buffer is far larger than the last-level cache and every call touches another
set of 256 random rows (64 sets, drawn once), so the figures are DRAM traffic, not cache hits.

The SumTree and the ReplayBuffer's insertion, sampling and checkpoints are compared with cpprb,
torchrl and a Mammoth-style loop in bench/replay/workloads.py (their random streams differ from
retain's, so they are timed side by side rather than checked against one result here).
"""

from __future__ import annotations

from typing import Any

import torch

from retain import _native
from retain.bench.harness import Unsupported, fresh_compile
from retain.bench.registry import Case, Impl, Runner, register
from retain.ops import gather_rows, scatter_rows_

_SIZES = {
    # 100k CIFAR images (1.2 GB of float32), their labels and 10 logits each; 256 rows per call
    "default": {"capacity": 100_000, "row": (3, 32, 32), "classes": 10, "k": 256, "dtype": "float32"},
    "small": {"capacity": 2_000, "row": (3, 8, 8), "classes": 10, "k": 64, "dtype": "float32"},
    "large": {"capacity": 100_000, "row": (3, 32, 32), "classes": 10, "k": 4096, "dtype": "float32"},
}
_SETS = 64  # index sets cycled through, so repeated calls do not re-read cached rows


def _row_bytes(p: dict[str, Any]) -> int:
    n = 1
    for d in p["row"]:
        n *= d
    return 4 * n + 8 + 4 * p["classes"]


def _inputs(p: dict[str, Any], device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    cap, k = p["capacity"], p["k"]
    fields = [torch.randn(cap, *p["row"], generator=g).to(device), torch.randint(0, 10, (cap,), generator=g).to(device),
              torch.randn(cap, p["classes"], generator=g).to(device)]
    sets = [torch.randperm(cap, generator=g)[:k].to(device) for _ in range(_SETS)]  # distinct inside a set
    values = [f[:k].clone() + 1 for f in fields]
    return {"fields": fields, "sets": sets, "values": values}


def _cycling(fn, sets):
    """fwd = fn(next index set); the first call uses set 0 (what the check compares)."""
    state = {"i": 0}

    def call():
        idx = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(idx)

    return call


def _eager_gather(fields, idx):
    return [f[idx] for f in fields]


def _gather_impl(kind):
    def build(inputs, params, device):
        if kind == "retain" and not _native.has_kernel("rows_copy", device):
            raise Unsupported(f"no rows_copy kernel for {device} in this build")
        fields = inputs["fields"]
        fn = {"retain": gather_rows, "eager": _eager_gather,
              "compile": fresh_compile(_eager_gather, params) if kind == "compile" else None}[kind]
        return Runner(fwd=_cycling(lambda idx: fn(fields, idx), inputs["sets"]))

    return build


register(Case(
    name="gather_rows",
    family="replay",
    sizes=_SIZES,
    make_inputs=_inputs,
    describe=lambda p: (f"{p['k']} random rows of a {p['capacity']}-item buffer: x {tuple(p['row'])} float32, "
                        f"int64 label, {p['classes']} float32 logits ({_row_bytes(p) * p['capacity'] / 1e9:.2f} GB)"),
    bytes_model={"fwd": lambda p: 2 * p["k"] * _row_bytes(p)},  # each row read and written once
    impls={
        "retain": Impl(_gather_impl("retain"), "retain.ops.gather_rows: every field in one native call"),
        "eager": Impl(_gather_impl("eager"), "[f[idx] for f in fields]: an index_select per field"),
        "compile": Impl(_gather_impl("compile"), "the same under torch.compile(fullgraph, inductor); warm-up = compile",
                        jit=True),
    },
    model_note="GB/s from the bytes it must move: each sampled row read from the buffer and written to the batch",
    rtol=0, atol=0,
))


def _eager_scatter(fields, idx, values):
    for f, v in zip(fields, values):
        f[idx] = v
    return fields


def _scatter_impl(kind):
    def build(inputs, params, device):
        if kind == "retain" and not _native.has_kernel("rows_copy", device):
            raise Unsupported(f"no rows_copy kernel for {device} in this build")
        fields = [f.clone() for f in inputs["fields"]]  # its own storage
        values = inputs["values"]
        fn = {"retain": scatter_rows_, "eager": _eager_scatter,
              "compile": fresh_compile(_eager_scatter, params) if kind == "compile" else None}[kind]
        first = inputs["sets"][0]
        return Runner(fwd=_cycling(lambda idx: fn(fields, idx, values), inputs["sets"]),
                      to_ref=lambda out: [f[first].clone() for f in fields])

    return build


register(Case(
    name="scatter_rows_",
    family="replay",
    sizes=_SIZES,
    make_inputs=_inputs,
    describe=lambda p: (f"{p['k']} rows written at random slots of a {p['capacity']}-item buffer: x "
                        f"{tuple(p['row'])} float32, int64 label, {p['classes']} float32 logits"),
    bytes_model={"fwd": lambda p: 2 * p["k"] * _row_bytes(p)},
    impls={
        "retain": Impl(_scatter_impl("retain"), "retain.ops.scatter_rows_: every field in one native call"),
        "eager": Impl(_scatter_impl("eager"), "f[idx] = v per field (index_put_)"),
        "compile": Impl(_scatter_impl("compile"), "the same under torch.compile(fullgraph, inductor); warm-up = compile",
                        jit=True),
    },
    model_note="GB/s from the bytes it must move: each row read from the batch and written to the buffer",
    rtol=0, atol=0,
))
