"""What the replay family's host-side functions share: argument checks, the seed drawn from the
caller's generator (csrc/replay/rng.h) and the native-or-reference choice (the fallback policy of
ops/_dispatch.py, for functions that are not custom ops: they take Python integers and a generator
and decide on the host)."""

from __future__ import annotations

import torch

from retain import _native


def check_generator(op: str, generator) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def draw_seed(generator: torch.Generator | None) -> int:
    """One 63-bit seed from ``generator`` (torch's default generator when None): the only state a
    call consumes, so saving the generator's state saves the sampler's."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))


def native(op: str, entry: str) -> bool:
    """True when the native ``entry`` runs; False when there is none and the reference may
    (RETAIN_FALLBACK=reference); otherwise the error saying what to set."""
    if _native.has_kernel(entry, "cpu"):
        return True
    if _native.fallback_to_reference():
        return False
    _native.lib()  # raises the load error with the rebuild hint
    raise NotImplementedError(f"{op}: this build of retain._C has no '{entry}' kernel; rebuild retain or set "
                              "RETAIN_FALLBACK=reference to run the pure-Python reference instead")
