"""Measuring one case: the runners implementations are built from, each implementation checked
against the reference (retain) before it is timed, the clock, and the load meter.

Timing protocol, per (op, size, direction, implementation):

1. build the implementation (untimed: layout changes such as numpy views or transposes);
2. one warm-up call, timed separately (JIT/compile time), whose output is checked against
   retain's with a loose tolerance, so a wrong peer is never timed;
3. one more call to estimate the cost, then ``--reps`` calls at most, fewer when a cell would
   exceed ``--budget`` seconds (at least 3), timed with ``time.perf_counter`` (after
   ``torch.cuda.synchronize`` on CUDA); median, quartiles and minimum are reported. A warm-up
   call longer than ``--max-call-s`` is the only sample (``reps = 1``, marked), unless the
   implementation compiles on its first call. The CPU time other processes used meanwhile is
   recorded (``noisy`` cells; ``--retry-noisy`` measures them again).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from retain import _native
from retain.bench.registry import DIRECTIONS, Case, Impl, Runner

NOISY_CORES = 0.15  # a cell during which other processes used more CPU than this is flagged


class Unsupported(Exception):
    """Raised by an implementation's ``build`` when it cannot run here (device, shape, dtype)."""


class WrongResult(Exception):
    """An implementation's output differs from the reference's."""


def autograd_runner(fn: Callable[..., Any], inputs: dict[str, torch.Tensor], args: Sequence[str],
                    grad_out: str | None = None, wrt: Sequence[str] | None = None) -> Runner:
    """Runner for a differentiable torch function ``fn(*inputs[args])``: fwd without autograd,
    fwd+bwd as ``torch.autograd.grad`` of the output with respect to the inputs named in ``wrt``
    (default: every arg; the others are passed as they are) against ``inputs[grad_out]`` (None:
    the output is a scalar loss)."""
    wrt = tuple(args) if wrt is None else tuple(wrt)
    plain = [inputs[k] for k in args]
    called = [inputs[k].detach().requires_grad_() if k in wrt else inputs[k] for k in args]
    leaves = [t for k, t in zip(args, called) if k in wrt]
    g = None if grad_out is None else inputs[grad_out]

    def fwd():
        return fn(*plain)

    def fwdbwd():
        return torch.autograd.grad(fn(*called), leaves, g)

    return Runner(fwd, fwdbwd)


Bind = Callable[[Callable[..., Any], dict[str, torch.Tensor], dict[str, Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Call:
    """How a case calls its op, the op's reference and any peer with the same signature.

    ``bind(fn, inputs, params)`` returns the callable that is timed (default: ``fn`` itself;
    untimed work such as packing labels or fixing keyword arguments goes there), called as
    ``f(*inputs[args])``; fwd+bwd takes its gradient with respect to ``wrt`` (default: every
    arg) against ``inputs[grad_out]`` (None: a scalar loss), as :func:`autograd_runner`.
    """

    args: tuple[str, ...]
    grad_out: str | None = None
    wrt: tuple[str, ...] | None = None
    bind: Bind | None = None

    def bound(self, fn: Callable[..., Any], inputs: dict[str, torch.Tensor], params: dict[str, Any]):
        return fn if self.bind is None else self.bind(fn, inputs, params)

    def runner(self, f: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> Runner:
        """The runner of ``f``, already bound (a peer's own callable with this signature)."""
        return autograd_runner(f, inputs, self.args, self.grad_out, self.wrt)


def retain_impl(op: Callable[..., Any], call: Call, note: str, *, kernel: str) -> Impl:
    """retain's ``op`` (``retain.ops.<name>``); ``unsupported`` where this build has no native
    ``kernel`` for the device (no silent fallback to the reference is timed as retain)."""

    def build(inputs, params, device):
        if not _native.has_kernel(kernel, device):
            raise Unsupported(f"no {kernel} kernel for {device} in this build")
        return call.runner(call.bound(op, inputs, params), inputs)

    return Impl(build, note)


def eager_impl(ref: Callable[..., Any], call: Call, note: str) -> Impl:
    """The op's pure-PyTorch reference (``retain.ops.<family>.reference``), eager."""
    return Impl(lambda inputs, params, device: call.runner(call.bound(ref, inputs, params), inputs), note)


def fresh_compile(fn: Callable[..., Any], params: dict[str, Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True, **options)`` after resetting dynamo, so each build
    compiles afresh (an honest warm-up time, a cold compile; no recompile limit), with the
    backend ``params.get("compile_backend", "inductor")`` (tests pass a cheaper one)."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=params.get("compile_backend", "inductor"), **options)


def compile_impl(ref: Callable[..., Any], call: Call, note: str | None = None) -> Impl:
    """The bound reference under :func:`fresh_compile`."""

    def build(inputs, params, device):
        return call.runner(fresh_compile(call.bound(ref, inputs, params), params), inputs)

    note = note or f"{ref.__name__} under torch.compile(fullgraph, inductor); warm-up = compile"
    return Impl(build, note, jit=True)


def standard_impls(op: Callable[..., Any], ref: Callable[..., Any], call: Call, *, kernel: str, retain: str,
                   eager: str) -> dict[str, Impl]:
    """The three implementations of a case with no other form: ``retain`` (the op), ``eager``
    (its reference) and ``compile`` (the reference under torch.compile), with these notes."""
    return {"retain": retain_impl(op, call, retain, kernel=kernel), "eager": eager_impl(ref, call, eager),
            "compile": compile_impl(ref, call)}


def with_cpu_capabilities(case: Case, capabilities: Sequence[str]) -> Case:
    """``case`` with each retain implementation also run under each listed CPU capability, as
    ``<impl>@<capability>`` (checked against the reference like any implementation)."""
    impls: dict[str, Impl] = {}
    for name, impl in case.impls.items():
        impls[name] = impl
        if name.startswith("retain"):
            for cap in capabilities:
                impls[f"{name}@{cap}"] = Impl(build=_at_capability(impl.build, cap), jit=impl.jit,
                                              note=f"{name} with the {cap} build of the CPU kernels")
    return replace(case, impls=impls)


def _at_capability(build: Callable[..., Runner], cap: str) -> Callable[..., Runner]:
    def at(fn: Callable[[], Any] | None) -> Callable[[], Any] | None:
        if fn is None:
            return None

        def call():
            before = _native.cpu_capability()
            _native.set_cpu_capability(cap)  # an atomic store: nothing next to a kernel call
            try:
                return fn()
            finally:
                _native.set_cpu_capability(before)

        return call

    def wrapped(inputs: dict[str, torch.Tensor], params: dict[str, Any], device: str) -> Runner:
        r = build(inputs, params, device)
        return Runner(fwd=at(r.fwd), fwdbwd=at(r.fwdbwd), to_ref=r.to_ref)

    return wrapped


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


class LoadMeter:
    """CPU used by *other* processes while measuring: system-wide busy time from /proc/stat minus
    this process's CPU time, as an average number of busy cores. None where /proc/stat is absent.
    On a machine with few cores, any other load stretches every multi-threaded call by up to a
    scheduler slice (milliseconds), so a busy cell is flagged."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal; guest is in user
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def other_cores(self) -> float | None:
        end = self._sample()
        if end is None or self._start is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self._start))
        return max(0.0, (busy - own) / wall) if wall > 0 else None


def wait_quiet(timeout_s: float, window_s: float = 3.0) -> float | None:
    """Wait until other processes used under ``NOISY_CORES`` cores over a ``window_s`` window, or
    ``timeout_s`` passed. Returns the last window's load (None where it cannot be measured)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        meter = LoadMeter()
        time.sleep(window_s)
        other = meter.other_cores()
        if other is None or other < NOISY_CORES or time.perf_counter() >= deadline:
            return other


def _check(case: Case, direction: str, got: Any, want: Any) -> None:
    if direction == "fwd":
        torch.testing.assert_close(got, want, rtol=case.rtol, atol=case.atol, check_dtype=False,
                                   msg=lambda m: f"forward output differs from {case.reference}: {m}")
        return
    for name, g, w in zip(case.grad_names, got, want):
        torch.testing.assert_close(g, w, rtol=case.rtol, atol=case.atol, check_dtype=False,
                                   msg=lambda m, name=name: f"{name} differs from {case.reference}: {m}")


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def status_of(exc: BaseException) -> str:
    """The report status for an exception raised by :func:`warm_up`."""
    if isinstance(exc, ImportError):
        name = getattr(exc, "name", None)
        return f"not installed ({name.partition('.')[0] if name else _short(exc)})"
    if isinstance(exc, Unsupported):
        return f"unsupported: {exc}"
    if isinstance(exc, WrongResult):
        return f"wrong result: {exc}"
    return f"error: {_short(exc)}"


def warm_up(case: Case, name: str, direction: str, inputs: dict[str, torch.Tensor], params: dict[str, Any],
            device: str, expected: Any = None) -> tuple[Callable[[], Any], float, Any]:
    """Build implementation ``name`` for ``direction``, call it once (timed: the warm-up, which
    includes any JIT or compile) and check its result against ``expected`` (the reference's, in
    the reference layout) when given.

    Returns ``(fn, warm_up_seconds, result_in_reference_layout)``. Raises ``ImportError`` (not
    installed), :class:`Unsupported`, :class:`WrongResult` or whatever the implementation raised;
    :func:`status_of` turns any of them into a report status.
    """
    runner = case.impls[name].build(inputs, params, device)
    fn = runner.fwd if direction == "fwd" else runner.fwdbwd
    if fn is None:
        raise Unsupported(f"no {direction}")
    out, warm = timed(fn, device)
    got = runner.to_ref(out)
    if expected is not None:
        try:
            _check(case, direction, got, expected)
        except AssertionError as exc:
            raise WrongResult(_short(exc).removeprefix("AssertionError: ")) from None
    return fn, warm, got


def time_calls(fn: Callable[[], Any], device: str, *, reps: int, budget_s: float, min_reps: int = 3) -> list[float]:
    """Seconds per call of ``fn`` (already warm): ``reps`` calls at most, fewer when they would take
    over ``budget_s`` (never fewer than ``min_reps``); sorted."""
    _, first = timed(fn, device)
    n = max(min_reps, min(reps, int(budget_s / max(first, 1e-9))))
    samples = [first] + [timed(fn, device)[1] for _ in range(max(0, n - 1))]
    return sorted(samples)


def run_case(
    case: Case,
    params: dict[str, Any],
    device: str = "cpu",
    *,
    impls: Sequence[str] | None = None,
    directions: Sequence[str] = DIRECTIONS,
    reps: int = 30,
    min_reps: int = 3,
    budget_s: float = 2.0,
    max_call_s: float = 10.0,
    skip: dict[tuple[str, str], str] | None = None,
    log: Callable[[str], None] | None = None,
    keep_outputs: bool = False,
    retry_noisy: int = 0,
    wait_quiet_s: float = 60.0,
) -> list[dict[str, Any]]:
    """Measure every implementation of ``case`` at ``params`` on ``device``.

    Returns one record per (direction, implementation), with ``status`` ``ok``, ``not installed
    (...)``, ``unsupported: ...``, ``error: ...``, ``wrong result: ...`` or ``skipped: ...``.
    ``skip`` maps (impl, direction) to a reason not to run it. With ``keep_outputs`` each ok
    record carries its checked result under ``"output"`` (for tests). A cell during which other
    processes used the CPUs (see :class:`LoadMeter`) is measured again, up to ``retry_noisy``
    times, each after waiting up to ``wait_quiet_s`` seconds for quiet.
    """
    log = log or (lambda _msg: None)
    names = [n for n in case.impls if impls is None or n in impls or n.partition("@")[0] in impls]
    ref = case.reference
    if ref in names:  # the reference runs first: everything else is checked against it
        names.remove(ref)
        names.insert(0, ref)
    inputs = case.make_inputs(params, device)
    records: list[dict[str, Any]] = []
    desc = case.describe(params)
    # a case runs the directions it has a cost model for (an in-place update has no backward)
    for direction in [d for d in directions if d in case.bytes_model or d in case.flops_model]:
        expected: Any = None
        for name in names:
            rec: dict[str, Any] = {
                "op": case.name, "family": case.family, "params": dict(params), "shape": desc,
                "device": device, "direction": direction, "impl": name, "note": case.impls[name].note,
                "status": "ok",
            }
            records.append(rec)
            prefix = f"[{case.name} {desc}] {direction:7s} {name:16s}"
            if skip and (name, direction) in skip:
                rec["status"] = f"skipped: {skip[(name, direction)]}"
                log(f"{prefix} {rec['status']}")
                continue
            try:
                meter = LoadMeter()
                fn, warm, got = warm_up(case, name, direction, inputs, params, device, expected)
                rec["warmup_s"] = warm
                if name == ref:
                    expected = got
                elif expected is None:
                    rec["unchecked"] = True  # the reference did not run
                if keep_outputs:
                    rec["output"] = got
                del got
                if warm > max_call_s and not case.impls[name].jit:
                    samples = [warm]  # too slow to call again: the first call is the sample
                    rec["single_call"] = True
                    rec["other_cpu"] = meter.other_cores()
                for attempt in range(0 if rec.get("single_call") else retry_noisy + 1):
                    meter = LoadMeter()
                    samples = time_calls(fn, device, reps=reps, budget_s=budget_s, min_reps=min_reps)
                    rec["other_cpu"] = meter.other_cores()
                    if (rec["other_cpu"] or 0) <= NOISY_CORES or attempt == retry_noisy:
                        break
                    log(f"{prefix} noisy ({rec['other_cpu']:.1f} other cores): waiting to measure again")
                    wait_quiet(wait_quiet_s)
                    rec["retries"] = attempt + 1
                del fn
            except Exception as exc:  # a broken or missing peer is reported, never fatal
                rec["status"] = status_of(exc)
                log(f"{prefix} {rec['status']}")
                continue
            rec.update(
                reps=len(samples), median_ms=1e3 * quantile(samples, 0.5), q1_ms=1e3 * quantile(samples, 0.25),
                q3_ms=1e3 * quantile(samples, 0.75), min_ms=1e3 * samples[0],
            )
            if direction in case.bytes_model:
                rec["bytes"] = case.bytes_model[direction](params)
                rec["gbps"] = rec["bytes"] / (rec["median_ms"] * 1e-3) / 1e9
            if direction in case.flops_model:
                rec["flops"] = case.flops_model[direction](params)
                rec["gflops"] = rec["flops"] / (rec["median_ms"] * 1e-3) / 1e9
            noisy = (rec.get("other_cpu") or 0) > NOISY_CORES
            log(f"{prefix} {rec['median_ms']:10.3f} ms  (n={rec['reps']}, warm-up {warm:.2f} s)"
                + (f"  NOISY: other processes used {rec['other_cpu']:.1f} cores" if noisy else ""))
        add_ratios(case, [r for r in records if r["direction"] == direction])
    return records


def add_ratios(case: Case, recs: list[dict[str, Any]]) -> None:
    by = {r["impl"]: r for r in recs if r["status"] == "ok"}
    base = by.get(case.baseline)
    ref = by.get(case.reference)
    for r in by.values():
        if base is not None:
            r["speedup_vs_" + case.baseline] = base["median_ms"] / r["median_ms"]
        if ref is not None:
            r["time_vs_" + case.reference] = r["median_ms"] / ref["median_ms"]
