"""Route transformers' gated-delta-rule model families to retain's kernels on the CPU (and on CUDA
where retain was built with CUDA kernels), the convention of Liger-Kernel's
``apply_liger_kernel_to_*``::

    >>> from retain.integrations.transformers import apply_retain_kernels, revert
    >>> patched = apply_retain_kernels()          # every family transformers has, or families=["qwen3_next"]
    >>> ...                                      # train or generate as usual
    >>> revert()

transformers computes Gated DeltaNet with ``torch_chunk_gated_delta_rule`` (prefill, training) and
``torch_recurrent_gated_delta_rule`` (one-token decode), module functions of each family's
``modeling_*.py`` that use flash-linear-attention when it runs on the inputs' device and otherwise a
pure-PyTorch fallback ("correct but much slower"). The patch replaces both names in the family's
module with a function that calls :func:`retain.fla.chunk_gated_delta_rule` for tensors retain has
kernels for (grouped value heads, float32 gates with 16-bit q, k, v, ``initial_state`` and the
final state as transformers' cache keeps them) and the original function for any other device, so
other devices' paths are untouched. Nothing is downloaded; importing this module does not import
transformers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable

import torch

from retain import _native
from retain.fla import chunk_gated_delta_rule

# transformers' model families with a Gated DeltaNet token mixer (their modeling modules)
FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "lara_mini", "qwen4_exp")
FUNCTIONS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")

_originals: dict[tuple[str, str], Callable] = {}


def _module(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def _served(device) -> bool:
    """Whether retain has the gated delta rule's kernels for this device."""
    return device.type == "cpu" or _native.has_kernel("memory_scan", device.type)


def _retain_version(original: Callable) -> Callable:
    """``original``'s drop-in: its arguments bound by its own signature, retain's kernel for the
    devices retain serves, ``original`` itself for the others."""
    # transformers with the `kernels` package installed wraps these functions in an nn.Module whose
    # forward is the function: the arguments are the forward's.
    function = original.forward if isinstance(original, torch.nn.Module) else original
    signature = inspect.signature(function)

    @functools.wraps(function)
    def gated_delta_rule(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        query = a["query"]
        if not _served(query.device):
            return original(*args, **kwargs)
        extra = a.get("kwargs", {})
        return chunk_gated_delta_rule(query, a["key"], a["value"], a["g"], a["beta"],
                                      initial_state=a.get("initial_state"),
                                      output_final_state=bool(a.get("output_final_state", False)),
                                      use_qk_l2norm_in_kernel=bool(a.get("use_qk_l2norm_in_kernel", False)),
                                      cu_seqlens=extra.get("cu_seqlens"))

    gated_delta_rule.__wrapped__ = original  # what revert() restores, the module itself where it is one
    gated_delta_rule.__signature__ = signature
    gated_delta_rule.retain_patched = True
    return gated_delta_rule


def apply_retain_kernels(families: Iterable[str] | None = None) -> list[str]:
    """Patch the gated-delta-rule functions of ``families`` (default: every family in
    :data:`FAMILIES` this transformers has); returns the families patched. Calling it twice is
    harmless; :func:`revert` undoes it. Raises ValueError for an unknown family name and
    ImportError when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("retain.integrations.transformers.apply_retain_kernels: transformers is not installed "
                          "(pip install transformers)")
    wanted = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in wanted if f not in FAMILIES]
    if unknown:
        raise ValueError(f"retain.integrations.transformers.apply_retain_kernels: families must be among {FAMILIES}, "
                         f"got {unknown}")
    patched = []
    for family in wanted:
        try:
            module = _module(family)
        except ImportError:
            if families is not None:
                raise
            continue  # this transformers predates the family
        for name in FUNCTIONS:
            current = getattr(module, name, None)
            if current is None or getattr(current, "retain_patched", False):
                continue
            _originals[(family, name)] = current
            setattr(module, name, _retain_version(current))
        patched.append(family)
    return patched


def revert() -> None:
    """Restore every function :func:`apply_retain_kernels` replaced."""
    for (family, name), original in list(_originals.items()):
        setattr(_module(family), name, original)
        del _originals[(family, name)]
