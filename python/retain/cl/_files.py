"""Files the strategies write: atomic saves (temporary file in the same folder, fsync, rename, so
a crash mid-save leaves the previous file intact) and the tensor file: a JSON header and raw
tensor bytes, with a checksum of the whole payload verified on load (torch.load does not check its
zip's CRCs: a flipped byte would load as other data), nothing unpickled, errors that say what is
wrong with the file."""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
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


def atomic_write(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` into a temporary file next to ``path``, fsync, rename over ``path``: a crash at
    any point leaves the previous file intact (the temporary one is removed on errors)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".retain-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
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


# The tensor file: MAGIC, the header's length (uint64 little-endian), the header (JSON: the state with
# every tensor replaced by {"tensor": i}, each tensor's dtype, shape and offset, the checksum), then
# each tensor's bytes at a 64-byte aligned offset. Written with one write() per tensor (torch.save's
# zip writer ran at a third of that on the disks measured), read by mapping the file: nothing is
# unpickled, so a file can hold nothing but tensors and JSON values.
MAGIC = b"RETAIN\x00T"
_ALIGN = 64


def _split(obj, tensors: list[Tensor]):
    """``obj`` with its tensors moved to ``tensors`` (replaced by {"tensor": index})."""
    if isinstance(obj, Tensor):
        tensors.append(obj.detach().cpu().contiguous())
        return {"tensor": len(tensors) - 1}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("tensor files hold dicts with string keys only")
        return {k: _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"tensor files hold tensors and JSON values only, got {type(obj).__name__}")


def _join(obj, tensors: list[Tensor]):
    if isinstance(obj, dict):
        if set(obj) == {"tensor"} and isinstance(obj["tensor"], int):
            return tensors[obj["tensor"]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _spec_dtype(spec) -> torch.dtype:
    """A tensor's description in a header, checked to be self-consistent (a damaged header fails
    here, not in a view or a reshape); its dtype. Raises ValueError, KeyError or TypeError."""
    dtype = getattr(torch, spec["dtype"], None)
    shape, offset, nbytes = spec["shape"], spec["offset"], spec["nbytes"]
    if not isinstance(dtype, torch.dtype) or not all(type(v) is int and v >= 0 for v in (*shape, offset, nbytes)):
        raise ValueError("a malformed tensor description")
    numel = 1
    for n in shape:
        numel *= n
    if offset % _ALIGN or nbytes != numel * dtype.itemsize:
        raise ValueError("a malformed tensor description")
    return dtype


def save_tensor_file(state: dict, path: str | os.PathLike) -> None:
    """``state`` (nested dicts and lists of tensors and JSON values) to ``path`` atomically, with the
    checksum of the whole payload."""
    tensors: list[Tensor] = []
    meta = _split(state, tensors)
    specs, offset = [], 0
    for t in tensors:
        specs.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset,
                      "nbytes": t.numel() * t.element_size()})
        offset += -(-specs[-1]["nbytes"] // _ALIGN) * _ALIGN
    header = json.dumps({"state": meta, "tensors": specs, _CHECKSUM: checksum(state)}).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for spec, t in zip(specs, tensors):
                f.seek(start + spec["offset"])
                f.write(_tensor_bytes(t))
            f.truncate(start + offset)
            f.flush()

    atomic_write(path, write)


def is_tensor_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a retain tensor file (an earlier retain wrote torch.save zips)."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def load_torch_file(path: str | os.PathLike, what: str) -> dict:
    """A dict an earlier retain wrote with torch.save: weights-only (nothing but tensors and plain
    values is unpickled), errors that say what is wrong with the file; no checksum to verify."""
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: never advise turning it off
        raise ValueError(f"{what}: {path!r} holds objects other than tensors and plain values, which retain never "
                         f"writes; refusing to load it ({str(e).splitlines()[0][:200]})") from None
    except Exception as e:  # noqa: BLE001  (torch.load of damaged bytes raises almost anything)
        raise ValueError(f"{what}: {path!r} is not a readable retain file (truncated or corrupt: "
                         f"{type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_tensor_file(path: str | os.PathLike, what: str) -> dict:
    """The state :func:`save_tensor_file` wrote, its tensors mapped from the file (copy-on-write) and
    its checksum verified; ``what`` names the caller in errors ('retain.cl.ReplayBuffer.load')."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file at {path!r}")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{what}: {path!r} is empty (an interrupted copy?)")
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{what}: {path!r} is not a retain tensor file (no retain header); retain loads only "
                             "files it wrote and never unpickles")
        (length,) = struct.unpack("<Q", head[len(MAGIC):])
        try:
            header = json.loads(f.read(length)) if length <= size else None
            meta, specs, crc = header["state"], header["tensors"], header[_CHECKSUM]
            dtypes = [_spec_dtype(s) for s in specs]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ValueError(f"{what}: {path!r} has a corrupt header (truncated or modified)") from None
    start = -(-(len(MAGIC) + 8 + length) // _ALIGN) * _ALIGN
    end = max((start + s["offset"] + s["nbytes"] for s in specs), default=start)
    if end > size:
        raise ValueError(f"{what}: {path!r} is truncated: {size} bytes, its header describes {end}")
    data = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    tensors = [data[start + s["offset"]:start + s["offset"] + s["nbytes"]].view(dtype).reshape(s["shape"])
               for s, dtype in zip(specs, dtypes)]
    try:
        state = _join(meta, tensors)
    except (IndexError, RecursionError):
        raise ValueError(f"{what}: {path!r} has a corrupt header (truncated or modified)") from None
    if crc != checksum(state):
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


class FileCheckpoint:
    """``save(path)`` / ``load(path)`` for a strategy with ``state_dict`` / ``load_state_dict``: the
    state as a retain tensor file, written atomically (temporary file, fsync, rename: a crash
    mid-save leaves the previous file intact) with a checksum of the whole payload, verified on load;
    nothing is unpickled. A truncated, corrupted or foreign file raises a ValueError naming it."""

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` (atomic, checksummed)."""
        save_tensor_file(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote to ``path``, after verifying its checksum."""
        self.load_state_dict(load_tensor_file(path, f"retain.cl.{type(self).__name__}.load"))
