"""Lists of tensors for the fisher family's tests: parameter shapes at the kernels' chunk
boundaries, and random lists in any data/state dtype."""

from __future__ import annotations

import torch

from retain import _native

F64 = torch.float64
CHUNK = _native.lib().fisher_chunk
# a matrix, a scalar, an empty tensor, and vectors on either side of one and two chunks
BOUNDARY_SHAPES = [(3, 5), (), (0, 4), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2, CHUNK + 3)]
DATA_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.float64]


def randn_list(shapes, dtype=F64, seed=0, samples=None, scale=1.0, positive=False):
    """One tensor per shape (``(samples, *shape)`` when samples is not None), made in float64 and
    rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        shape = tuple(s) if samples is None else (samples, *s)
        t = torch.randn(shape, generator=g, dtype=F64) * scale
        out.append((t.abs() if positive else t).to(dtype))
    return out


def clones(ts):
    return [t.clone() for t in ts]
