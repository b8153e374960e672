"""What ``retain bench`` measures: one :class:`Case` per op, its :class:`Impl` implementations,
and ``REGISTRY``, which the family modules (``retain.bench.<family>``) fill with
:func:`register`. Imports torch only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

DIRECTIONS = ("fwd", "fwd+bwd")


@dataclass
class Runner:
    """One implementation bound to one set of inputs.

    ``fwd()`` returns the forward output; ``fwdbwd()`` runs forward and backward and returns the
    gradients (in the order of ``Case.grad_names``). ``to_ref`` maps either result to torch
    tensors in the reference layout (untimed, for the correctness check).
    """

    fwd: Callable[[], Any]
    fwdbwd: Callable[[], Any] | None = None
    to_ref: Callable[[Any], Any] = lambda out: out


@dataclass(frozen=True)
class Impl:
    """An implementation: ``build(inputs, params, device) -> Runner``.

    ``build`` does its optional imports itself; an ``ImportError`` there is reported as
    ``not installed (<module>)``, ``harness.Unsupported`` as ``unsupported: <reason>``.
    """

    build: Callable[[dict[str, torch.Tensor], dict[str, Any], str], Runner]
    note: str = ""
    jit: bool = False  # the first call compiles: a long warm-up says nothing about later calls


@dataclass(frozen=True)
class Case:
    """One op to benchmark.

    ``sizes`` maps a size name (``small``, ``default``, ``large``) to parameters; ``make_inputs(params,
    device)`` builds the input tensors; ``bytes_model[direction](params)`` and
    ``flops_model[direction](params)`` give the minimal traffic and arithmetic of one call.
    ``impls`` are run in order; ``reference`` is the one every other is checked against and
    compared with, ``baseline`` the one speed-ups are quoted against.
    """

    name: str
    family: str
    sizes: dict[str, dict[str, Any]]
    make_inputs: Callable[[dict[str, Any], str], dict[str, torch.Tensor]]
    impls: dict[str, Impl]
    describe: Callable[[dict[str, Any]], str]
    bytes_model: dict[str, Callable[[dict[str, Any]], int]] = field(default_factory=dict)
    flops_model: dict[str, Callable[[dict[str, Any]], int]] = field(default_factory=dict)
    reference: str = "retain"
    baseline: str = "eager"
    grad_names: tuple[str, ...] = ()
    model_note: str = ""  # how the bytes/flops models count, for the report
    rtol: float = 1e-3
    atol: float = 1e-3


# every case has each (``retain bench --size``): small, a smoke run in seconds; default, the shapes
# of the committed tables; large, a working set of 1 GiB or more, past the last-level cache of
# any current CPU (servers have up to ~500 MiB of L3), where bandwidth-bound kernels meet DRAM
SIZES = ("small", "default", "large")
REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    """Add ``case`` to ``REGISTRY``. A second case of the same name, a size missing, a
    reference or baseline that is not one of its implementations, or a model for an unknown
    direction is a ``ValueError`` (at import of the family module, not in the middle of a run)."""
    problems = []
    if case.name in REGISTRY:
        problems.append(f"a case of that name is already registered (family {REGISTRY[case.name].family})")
    problems += [f"no {s!r} size" for s in SIZES if s not in case.sizes]
    problems += [f"{role} {name!r} is not one of its impls" for role, name in
                 (("reference", case.reference), ("baseline", case.baseline)) if name not in case.impls]
    problems += [f"{model} for unknown direction {d!r}" for model in ("bytes_model", "flops_model")
                 for d in getattr(case, model) if d not in DIRECTIONS]
    if not (case.bytes_model or case.flops_model):
        problems.append("neither a bytes_model nor a flops_model")
    if problems:
        raise ValueError(f"retain bench: case {case.name!r}: " + "; ".join(problems))
    REGISTRY[case.name] = case
    return case


def itemsize(params: dict[str, Any]) -> int:
    """Bytes per element of the case's ``dtype`` parameter (for bytes models)."""
    return torch.empty(0, dtype=getattr(torch, params["dtype"])).element_size()


def cost_model(unit: Callable[[dict[str, Any]], int], fwd: int,
               fwdbwd: int) -> dict[str, Callable[[dict[str, Any]], int]]:
    """A bytes or flops model of ``fwd`` units for a forward call and ``fwdbwd`` units for forward
    and backward, each unit ``unit(params)`` (e.g. the bytes of one tensor)."""
    return {"fwd": lambda p: fwd * unit(p), "fwd+bwd": lambda p: fwdbwd * unit(p)}
