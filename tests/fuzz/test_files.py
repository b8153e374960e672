"""Damaged files (hypothesis over which bytes are flipped, where a file is cut, what is appended):
every file the library writes (GeRe anchors, replay buffers, EWC/SI/MAS states) either loads exactly
what was saved (a flip in alignment padding changes nothing) or is refused with a ValueError that
names the loader and the file; never another exception, never different data."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import retain
from tests.cl.test_ewc import batches, tiny_model
from tests.fuzz.cases import _gere


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _ewc():
    model = tiny_model()
    ewc = retain.cl.EWC(model, mode="both")
    ewc.consolidate(batches(), F.cross_entropy)
    return ewc, lambda: retain.cl.EWC(tiny_model())


def _buffer():
    buf = retain.cl.ReplayBuffer(6, {"x": ((3,), torch.float32), "y": ((), torch.int64)}, policy="prioritized")
    buf.add({"x": torch.randn(4, 3), "y": torch.arange(4)})
    return buf, lambda: retain.cl.ReplayBuffer(6, {"x": ((3,), torch.float32), "y": ((), torch.int64)},
                                               policy="prioritized")


# (what writes the file, how a fresh object loads it and returns its state, the loader's name)
WRITERS = {
    "GeRe": (lambda: (_gere(), None), lambda fresh, path: retain.cl.GeRe.load(path).state_dict(), "retain.cl.GeRe.load"),
    "ReplayBuffer": (_buffer, lambda fresh, path: (fresh.load(path), fresh.state_dict())[1],
                     "retain.cl.ReplayBuffer.load"),
    "EWC": (_ewc, lambda fresh, path: (fresh.load(path), fresh.state_dict())[1], "retain.cl.EWC.load"),
}


@functools.lru_cache(maxsize=None)
def _saved(kind: str, folder: str) -> tuple[bytes, dict]:
    obj = WRITERS[kind][0]()[0]
    path = f"{folder}/{kind}.retain"
    obj.save(path)
    return open(path, "rb").read(), obj.state_dict()


def _check_damaged(kind, tmp_path_factory, damage):
    folder = str(tmp_path_factory.getbasetemp())
    data, state = _saved(kind, folder)
    make, load, where = WRITERS[kind]
    path = f"{folder}/{kind}-damaged.retain"
    with open(path, "wb") as f:
        f.write(damage(data))
    fresh = make()[1]
    try:
        loaded = load(fresh() if fresh else None, path)
    except ValueError as e:
        assert str(e).startswith(where + ":") and path in str(e), str(e)
        return
    assert _equal(state, loaded), "a damaged file loaded as different data"


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("kind", list(WRITERS))
@SETTINGS
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), count=st.integers(1, 3))
def test_flipped_bits(kind, tmp_path_factory, where, bit, count):
    def damage(data):
        out = bytearray(data)
        at = int(where * len(data))
        for i in range(count):
            out[min(at + i, len(data) - 1)] ^= 1 << bit
        return bytes(out)
    _check_damaged(kind, tmp_path_factory, damage)


@pytest.mark.parametrize("kind", list(WRITERS))
@SETTINGS
@given(keep=st.floats(0, 1, exclude_max=True), tail=st.binary(max_size=80))
def test_cut_or_extended(kind, tmp_path_factory, keep, tail):
    _check_damaged(kind, tmp_path_factory, lambda data: data[:int(keep * len(data))] + tail)
