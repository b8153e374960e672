"""Files the strategies write: atomic saves (temporary file in the same folder, fsync, rename, so
a crash mid-save leaves the previous file intact), a checksum of the whole payload verified on
load (torch.load does not check the zip's CRCs: a flipped byte would load as other data), and
weights-only loading with errors that say what is wrong with the file."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

_BLOCK = 64 << 20  # bytes per CRC block: blocks are hashed in parallel (zlib releases the GIL)
_CHECKSUM = "checksum"


def _leaves(obj, prefix=""):
    """(name, value) for every leaf of nested dicts and lists, in a fixed order."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def checksum(state: dict) -> list[int]:
    """CRC-32 of every leaf (tensor bytes, or the repr of anything else) in 64 MiB blocks: names,
    shapes and dtypes are hashed with the data, so a renamed or reshaped tensor also fails."""
    pieces: list[memoryview | bytes] = []
    for name, value in _leaves({k: v for k, v in state.items() if k != _CHECKSUM}):
        if isinstance(value, Tensor):
            pieces.append(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            data = _tensor_bytes(value)
            pieces.extend(data[i:i + _BLOCK] for i in range(0, len(data), _BLOCK))
        else:
            pieces.append(f"{name}={value!r}".encode())
    workers = min(len(pieces), max(1, torch.get_num_threads()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(zlib.crc32, pieces))


def atomic_save(state: dict, path: str | os.PathLike, *, with_checksum: bool = True) -> None:
    """``torch.save(state)`` to ``path`` atomically; with the payload's checksum under 'checksum'."""
    path = os.fspath(path)
    if with_checksum:
        state = {**state, _CHECKSUM: checksum(state)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".retain-", suffix=".tmp", dir=folder)
    # the zip's own CRC-32s cost a second pass over the data and torch.load never checks them; our
    # checksum covers the payload instead (without one, keep torch's)
    crc = torch.serialization.get_crc32_options()
    try:
        torch.serialization.set_crc32_options(not with_checksum)
        os.close(fd)
        torch.save(state, tmp)  # by path: torch's C++ writer, no Python-side copy of the data
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        torch.serialization.set_crc32_options(crc)


def load_verified(path: str | os.PathLike, what: str, *, mmap: bool = False) -> dict:
    """The dict :func:`atomic_save` wrote, its checksum verified; ``what`` names the caller in
    errors ('retain.cl.ReplayBuffer.load'). Never unpickles arbitrary objects (weights_only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file at {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what}: {path!r} is empty (an interrupted copy?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # weights_only refused an object: say so, never advise turning it off
        raise ValueError(f"{what}: {path!r} holds objects other than tensors and plain values, which retain never "
                         f"writes; refusing to load it ({str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{what}: {path!r} is not a readable retain file (truncated or corrupt: "
                         f"{type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or _CHECKSUM not in state:
        raise ValueError(f"{what}: {path!r} has no checksum: not a file retain wrote")
    if state[_CHECKSUM] != checksum(state):
        raise ValueError(f"{what}: {path!r} fails its checksum: the file was modified or corrupted after it was "
                         "written")
    return state


def check_header(state, where: str, what: str, fmt: str, version: int, hint: str = "") -> None:
    """``state`` is a dict of format ``fmt`` at ``version``; else a ValueError from ``where`` saying
    it is not ``what`` (or of which version it is), with ``hint`` on what to do."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: state is not {what} (format {fmt!r}), got {got!r}")
    if state.get("version") != version:
        raise ValueError(f"{where}: format version {state.get('version')} is not supported (this retain reads "
                         f"version {version}){hint}")
