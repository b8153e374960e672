"""``retain bench``: each op against its eager reference, torch.compile and the peers a user would
pick, measured side by side in one process, with the machine's measured ceilings.

Importing this module is cheap: it imports torch (already imported by ``retain``) and nothing
optional. numba, assoc_scan, accelerated_scan and matplotlib are imported inside the
implementations that need them; one that is missing is reported as ``not installed``.

Adding an op is a few lines: write an input factory, a bytes (or flops) model and one ``build``
function per implementation, then ``register(Case(...))``. See ``linear_recurrence`` below.

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

By default the process first tells glibc to keep freed memory (``mallopt``: no mmap for large
blocks, no trimming), the steady state a training loop sees. Without it, every fresh output over
32 MB is a new mmap whose page faults cost more than the kernel itself. ``--cold-heap`` skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

DIRECTIONS = ("fwd", "fwd+bwd")
NOISY_CORES = 0.15  # a cell during which other processes used more CPU than this is flagged
SCHEMA = "retain-bench/1"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


class Unsupported(Exception):
    """Raised by an implementation's ``build`` when it cannot run here (device, shape, dtype)."""


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
    ``not installed (<module>)``, ``Unsupported`` as ``unsupported: <reason>``.
    """

    build: Callable[[dict[str, torch.Tensor], dict[str, Any], str], Runner]
    note: str = ""
    jit: bool = False  # the first call compiles: a long warm-up says nothing about later calls


@dataclass(frozen=True)
class Case:
    """One op to benchmark.

    ``sizes`` maps a size name (``small``, ``default``) to parameters; ``make_inputs(params,
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


REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    REGISTRY[case.name] = case
    return case


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
    from retain import _native

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


def itemsize(params: dict[str, Any]) -> int:
    """Bytes per element of the case's ``dtype`` parameter (for bytes models)."""
    return torch.empty(0, dtype=getattr(torch, params["dtype"])).element_size()


def autograd_runner(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor],
                     args: Sequence[str], grad_out: str) -> Runner:
    """Runner for a differentiable torch function ``fn(*inputs[args])``: fwd without autograd,
    fwd+bwd as ``torch.autograd.grad`` of the output against ``inputs[grad_out]``."""
    plain = [inputs[k] for k in args]
    leaves = [inputs[k].detach().requires_grad_() for k in args]
    g = inputs[grad_out]

    def fwd():
        return fn(*plain)

    def fwdbwd():
        return torch.autograd.grad(fn(*leaves), leaves, g)

    return Runner(fwd, fwdbwd)


# --------------------------------------------------------------------------------------------
# Machine: heap mode, facts, ceilings
# --------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def warm_heap() -> bool:
    """Make glibc keep freed memory for reuse (no mmap for big blocks, no trimming).

    Process-wide and irreversible: call it only in a benchmark process. Returns False where
    ``mallopt`` is unavailable (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def machine_facts(device: str) -> dict[str, Any]:
    import retain
    from retain import _native

    caps = _native.capabilities()
    cpu = caps["cpu"]
    facts: dict[str, Any] = {
        "cpu": cpu["model"],
        "cpu_isa": cpu["isa"],
        "cpu_capability": cpu.get("capability"),
        "cpu_capability_supported": cpu.get("supported"),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "retain": retain.__version__,
        "native": caps["native"],
        "compiler": caps["build"].get("compiler"),
        "device": device,
    }
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
        facts["cuda_runtime"] = torch.version.cuda
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return facts
    for dist in ("numpy", "numba", "assoc-scan", "accelerated-scan"):
        with contextlib.suppress(PackageNotFoundError):
            facts[dist] = version(dist)
    if "numba" in facts:  # the instruction set numba compiles for (LLVM's name for the CPU)
        facts["numba"] += f" (NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', 'host')})"
    return facts


def measure_ceilings(device: str, quick: bool = False) -> dict[str, Any]:
    """Copy bandwidth and float32 matmul rate on ``device``.

    Copy: ``dst.copy_(src)`` of float32 tensors, bytes = 2 * nbytes, best of several calls, in
    several fresh allocations held at once (on a VM the bandwidth of a buffer depends on the
    physical pages it got, by up to 2x); ``copy_gbps`` is the median over allocations (the typical
    buffer), ``copy_gbps_best`` the best. Matmul: best of several ``torch.mm`` calls.
    """
    if device == "cuda":
        n_copy, n_mm, allocs, tries = (1 << 24, 2048, 1, 5) if quick else (1 << 28, 8192, 2, 10)
    else:
        n_copy, n_mm, allocs, tries = (1 << 22, 512, 2, 3) if quick else (1 << 26, 2048, 5, 4)
    per_alloc, held = [], []
    for _ in range(allocs):
        src = torch.ones(n_copy, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        held.append((src, dst))  # keep them, so the next allocation gets other pages
        best = min(_timed(lambda: dst.copy_(src), device)[1] for _ in range(tries))
        per_alloc.append(2 * src.nbytes / best / 1e9)
    copy_bytes = 2 * held[0][0].nbytes
    del held, src, dst
    a = torch.randn(n_mm, n_mm, device=device)
    b = torch.randn(n_mm, n_mm, device=device)
    torch.mm(a, b)
    best_mm = min(_timed(lambda: torch.mm(a, b), device)[1] for _ in range(max(3, tries)))
    return {
        "copy_gbps": _quantile(sorted(per_alloc), 0.5),
        "copy_gbps_best": max(per_alloc),
        "copy_gbps_allocs": per_alloc,
        "copy_bytes": copy_bytes,
        "matmul_gflops": 2 * n_mm**3 / best_mm / 1e9,
        "matmul_n": n_mm,
        "matmul_tf32": bool(device == "cuda" and torch.backends.cuda.matmul.allow_tf32),
    }


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


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


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


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


class WrongResult(Exception):
    """An implementation's output differs from the reference's."""


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
    out, warm = _timed(fn, device)
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
    _, first = _timed(fn, device)
    n = max(min_reps, min(reps, int(budget_s / max(first, 1e-9))))
    samples = [first] + [_timed(fn, device)[1] for _ in range(max(0, n - 1))]
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
    for direction in directions:
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
                reps=len(samples), median_ms=1e3 * _quantile(samples, 0.5), q1_ms=1e3 * _quantile(samples, 0.25),
                q3_ms=1e3 * _quantile(samples, 0.75), min_ms=1e3 * samples[0],
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
        _add_ratios(case, [r for r in records if r["direction"] == direction])
    return records


def _add_ratios(case: Case, recs: list[dict[str, Any]]) -> None:
    by = {r["impl"]: r for r in recs if r["status"] == "ok"}
    base = by.get(case.baseline)
    ref = by.get(case.reference)
    for r in by.values():
        if base is not None:
            r["speedup_vs_" + case.baseline] = base["median_ms"] / r["median_ms"]
        if ref is not None:
            r["time_vs_" + case.reference] = r["median_ms"] / ref["median_ms"]


def _combine_ceilings(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Ceilings measured before and after the run, pooled: copy is the median over all
    allocations, matmul the best of both."""
    out = dict(before)
    allocs = before["copy_gbps_allocs"] + after["copy_gbps_allocs"]
    out.update(copy_gbps=_quantile(sorted(allocs), 0.5), copy_gbps_best=max(allocs), copy_gbps_allocs=allocs,
               matmul_gflops=max(before["matmul_gflops"], after["matmul_gflops"]))
    for key in ("copy_gbps", "matmul_gflops"):
        out[key + "_before"], out[key + "_after"] = before[key], after[key]
    return out


def add_ceiling_fractions(records: list[dict[str, Any]], ceilings: dict[str, Any]) -> None:
    for r in records:
        if "gbps" in r and ceilings.get("copy_gbps"):
            r["pct_copy"] = 100.0 * r["gbps"] / ceilings["copy_gbps"]
        if "gflops" in r and ceilings.get("matmul_gflops"):
            r["pct_matmul"] = 100.0 * r["gflops"] / ceilings["matmul_gflops"]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _ratio(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.3g}x" if v < 100 else f"{v:,.0f}x"


def _cell_status(r: dict[str, Any]) -> str:
    other = r.get("other_cpu")
    return f"ok, noisy ({other:.1f} other cores)" if other is not None and other > NOISY_CORES else "ok"


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown: machine facts, ceilings, then one table per op and shape."""
    m, c, cfg = report["machine"], report["ceilings"], report["config"]
    lines = [
        f"# retain bench ({report['created']})",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}"
        + (f", GPU {m['gpu']} (CUDA {m.get('cuda_runtime')})" if m.get("gpu") else ""),
        f"- CPU instruction sets: {' '.join(m.get('cpu_isa') or []) or 'baseline'}; retain's CPU kernels: "
        f"`{m.get('cpu_capability')}` build (the CPU supports up to `{m.get('cpu_capability_supported')}`)"
        + ("; `<impl>@<capability>` rows use another build" if cfg.get("cpu_capabilities") else ""),
        f"- software: Python {m['python']}, torch {m['torch']}, retain {m['retain']} ({m.get('compiler')})"
        + "".join(f", {k} {m[k]}" for k in ("numba", "numpy", "assoc-scan", "accelerated-scan") if k in m),
        f"- ceilings on {cfg['device']}: copy {c['copy_gbps']:.1f} GB/s (float32 dst.copy_(src), "
        f"{c['copy_bytes'] / 2**20:.0f} MiB moved; median over {len(c['copy_gbps_allocs'])} fresh buffers, "
        f"which ranged {min(c['copy_gbps_allocs']):.1f}-{max(c['copy_gbps_allocs']):.1f} GB/s), "
        f"matmul {c['matmul_gflops']:.1f} GFLOP/s "
        f"(float32 {c['matmul_n']}x{c['matmul_n']}{', TF32' if c.get('matmul_tf32') else ''}, best call)",
        f"- ceilings before / after the run: copy {c.get('copy_gbps_before', c['copy_gbps']):.1f} / "
        f"{c.get('copy_gbps_after', c['copy_gbps']):.1f} GB/s, matmul "
        f"{c.get('matmul_gflops_before', c['matmul_gflops']):.0f} / "
        f"{c.get('matmul_gflops_after', c['matmul_gflops']):.0f} GFLOP/s",
        f"- heap: {cfg['heap']}",
        f"- other processes' CPU during the run: "
        + ("unknown" if cfg.get("other_cpu") is None else f"{cfg['other_cpu']:.2f} cores on average")
        + f"; cells where it exceeded {NOISY_CORES} cores say `noisy`"
        + (" (**the machine was busy: rerun when quiet**)" if (cfg.get("other_cpu") or 0) > NOISY_CORES else ""),
        f"- timing: median of up to {cfg['reps']} calls after one warm-up call (excluded, shown as "
        f"warm-up), at most ~{cfg['budget_s']:g} s per cell (at least 3 calls); `*` = one call only "
        f"(its first call took over {cfg['max_call_s']:g} s)",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["results"]:
        groups.setdefault((r["op"], r["shape"]), []).append(r)
    for (op, shape), recs in groups.items():
        case = REGISTRY.get(op)
        base = case.baseline if case else "eager"
        ref = case.reference if case else "retain"
        # arithmetic-bound ops (a flops model, no bytes model) report GFLOP/s against the matmul rate
        flops = bool(case and case.flops_model and not case.bytes_model)
        rate, pct, rate_key, pct_key = (("GFLOP/s", "% matmul", "gflops", "pct_matmul") if flops
                                        else ("GB/s", "% copy", "gbps", "pct_copy"))
        lines += ["", f"## {op}: {shape}, {recs[0]['device']}", "",
                  f"| direction | impl | median ms | IQR ms | reps | warm-up s | speed-up vs {base} | "
                  f"time / {ref} | {rate} | {pct} | status |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        for r in recs:
            if r["status"] != "ok":
                lines.append(f"| {r['direction']} | {r['impl']} | | | | | | | | | {r['status']} |")
                continue
            star = "*" if r.get("single_call") else ""
            iqr = f"{r['q1_ms']:.3g}-{r['q3_ms']:.3g}"
            lines.append(
                f"| {r['direction']} | {r['impl']} | {r['median_ms']:.3f}{star} | {iqr} | {r['reps']} | "
                f"{r['warmup_s']:.2f} | {_ratio(r.get('speedup_vs_' + base))} | "
                f"{_ratio(r.get('time_vs_' + ref))} | {_fmt(r.get(rate_key), '.1f')} | "
                f"{_fmt(r.get(pct_key), '.0f')} | {_cell_status(r)} |")
    notes = {}
    for r in report["results"]:
        notes.setdefault(r["op"], {}).setdefault(r["impl"], r["note"])
    for op, impl_notes in notes.items():
        case = REGISTRY.get(op)
        lines += ["", f"{op} implementations:", ""]
        lines += [f"- `{k}`: {v}" for k, v in impl_notes.items()]
        if case and case.model_note:
            lines.append(f"- {case.model_note}")
    lines += _sweep_summary(report["results"])
    lines += _capability_summary(report)
    return "\n".join(lines) + "\n"


def _capability_summary(report: dict[str, Any]) -> list[str]:
    """Median ms of each retain implementation per CPU capability, side by side."""
    active = report["machine"].get("cpu_capability")
    caps = [active] + [c for c in report["config"].get("cpu_capabilities") or [] if c != active]
    if len(caps) < 2:
        return []
    cells: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for r in report["results"]:
        base, _, cap = r["impl"].partition("@")
        if base.startswith("retain") and r["status"] == "ok":
            cells.setdefault((r["op"], r["shape"], r["direction"], base), {})[cap or active] = r["median_ms"]
    lines = ["", "## retain per CPU capability (median ms; in brackets: speed as a fraction of the "
                 f"`{active}` build)", "",
             "| op | shape | direction | impl | " + " | ".join(f"`{c}`" for c in caps) + " |",
             "|---|---|---|---|" + "--:|" * len(caps)]
    for (op, shape, direction, impl), by_cap in cells.items():
        best = by_cap.get(active)
        row = [f"{by_cap[c]:.3f}" + (f" ({best / by_cap[c]:.2f})" if best and c != active else "")
               if c in by_cap else "" for c in caps]
        lines.append(f"| {op} | {shape} | {direction} | {impl} | " + " | ".join(row) + " |")
    return lines


def _sweep_summary(results: list[dict[str, Any]]) -> list[str]:
    """A pivot of median ms by T when the report holds several T of one op."""
    lines: list[str] = []
    ops = sorted({r["op"] for r in results})
    for op in ops:
        recs = [r for r in results if r["op"] == op and "T" in r["params"]]
        ts = sorted({r["params"]["T"] for r in recs})
        if len(ts) < 2:
            continue
        lines += ["", f"## {op}: median ms by T", "", "| direction | impl | " + " | ".join(f"T={t}" for t in ts)
                  + " |", "|---|---|" + "--:|" * len(ts)]
        for direction in DIRECTIONS:
            impls = list(dict.fromkeys(r["impl"] for r in recs if r["direction"] == direction))
            for impl in impls:
                cells = []
                for t in ts:
                    r = next((r for r in recs if r["direction"] == direction and r["impl"] == impl
                              and r["params"]["T"] == t), None)
                    if r is None or r["status"] != "ok":
                        cells.append("" if r is None else r["status"].split(":")[0])
                    else:
                        cells.append(f"{r['median_ms']:.3g}" + ("*" if r.get("single_call") else ""))
                lines.append(f"| {direction} | {impl} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", action="append", metavar="NAME",
                        help=f"op to benchmark (repeatable; default all: {', '.join(REGISTRY)})")
    parser.add_argument("--impl", metavar="A,B", help="only these implementations (comma-separated)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=("small", "default"), default="default")
    parser.add_argument("--sweep-T", metavar="T1,T2,...", help="run each op at these T (other sizes as --size)")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per cell at most (default 30)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds per cell; slow implementations get fewer calls (default 2)")
    parser.add_argument("--max-call-s", type=float, default=10.0,
                        help="a first call longer than this is the only sample (default 10)")
    parser.add_argument("--cold-heap", action="store_true",
                        help="leave glibc's malloc as it is (fresh large outputs pay page faults)")
    parser.add_argument("--compile-cache", action="store_true",
                        help="let torch.compile use its on-disk caches (default: off, warm-up = cold compile)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds until other processes leave the CPUs idle")
    parser.add_argument("--retry-noisy", type=int, default=0, metavar="N",
                        help="measure a cell again, up to N times, when other processes used the CPUs "
                             "meanwhile (each time after waiting up to --wait-quiet, or 60 s, for quiet)")
    parser.add_argument("--cpu-capability", metavar="CAPS",
                        help="also run retain's implementations with these builds of the CPU kernels "
                             "(comma-separated, or 'all'), as <impl>@<capability>; RETAIN_CPU_CAPABILITY "
                             "sets the build of the plain rows")
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the printed table to FILE as well")
    parser.add_argument("--list", action="store_true", help="list ops and implementations, then exit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _compile_caches(enabled: bool):
    """Context manager that turns torch.compile's on-disk caches off (unless ``enabled``)."""
    stack = contextlib.ExitStack()
    if not enabled:
        try:
            import torch._functorch.config as functorch_config
            import torch._inductor.config as inductor_config

            stack.enter_context(inductor_config.patch(fx_graph_cache=False))
            stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - older/newer torch
            pass
    return stack


def run_cli(args: argparse.Namespace) -> int:
    if args.list:
        for name, case in REGISTRY.items():
            print(f"{name} ({case.family}): {', '.join(case.impls)}")
            for size, p in case.sizes.items():
                print(f"  --size {size}: {case.describe(p)}")
        return 0
    ops = args.op or list(REGISTRY)
    unknown = [o for o in ops if o not in REGISTRY]
    if unknown:
        print(f"retain bench: unknown op {', '.join(unknown)}; known: {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    impls = [s.strip() for s in args.impl.split(",")] if args.impl else None
    if args.device == "cuda" and not torch.cuda.is_available():
        print("retain bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    sweep = [int(t) for t in args.sweep_T.split(",")] if args.sweep_T else None
    from retain import _native

    extra_caps: list[str] = []
    if args.cpu_capability:
        usable = _native.cpu_capabilities()
        wanted = usable if args.cpu_capability.strip() == "all" else [
            c.strip() for c in args.cpu_capability.split(",") if c.strip()]
        bad = [c for c in wanted if c not in usable]
        if bad or args.device != "cpu":
            print(f"retain bench: --cpu-capability {args.cpu_capability}: "
                  + (f"{', '.join(bad)} not usable here (this build and CPU run: {', '.join(usable)})" if bad
                     else "CPU capabilities apply to --device cpu"), file=sys.stderr)
            return 2
        extra_caps = sorted((c for c in wanted if c != _native.cpu_capability()),
                            key=_native.CPU_CAPABILITY_ORDER.index, reverse=True)

    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.wait_quiet > 0:
        other = wait_quiet(args.wait_quiet)
        log(f"retain bench: other processes' CPU before starting: "
            + ("unknown" if other is None else f"{other:.2f} cores"))
    if args.cold_heap:
        heap = "cold (glibc defaults: large outputs are fresh mmaps, page faults included)"
    elif warm_heap():
        heap = "warm (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1: freed memory is reused)"
    else:
        heap = "default allocator (mallopt unavailable)"
    log(f"retain bench: heap {heap.split(' ')[0]}, measuring ceilings on {args.device}...")
    meter = LoadMeter()
    ceilings = measure_ceilings(args.device, quick=args.size == "small")
    results: list[dict[str, Any]] = []
    with _compile_caches(args.compile_cache):
        for op in ops:
            case = with_cpu_capabilities(REGISTRY[op], extra_caps) if extra_caps else REGISTRY[op]
            base = case.sizes[args.size]
            skip: dict[tuple[str, str], str] = {}
            for p in ([dict(base, T=t) for t in sweep] if sweep else [base]):
                recs = run_case(case, p, args.device, impls=impls, reps=args.reps, budget_s=args.budget,
                                max_call_s=args.max_call_s, skip=skip, log=log, retry_noisy=args.retry_noisy,
                                wait_quiet_s=args.wait_quiet or 60.0)
                for r in recs:  # a cell over --max-call-s is not run again at larger T
                    if r.get("single_call") and (r["impl"], r["direction"]) not in skip:
                        skip[(r["impl"], r["direction"])] = (
                            f"over --max-call-s at T={p['T']} ({r['median_ms'] / 1e3:.1f} s)")
                results += recs
    log("measuring ceilings again (noise check)...")
    ceilings = _combine_ceilings(ceilings, measure_ceilings(args.device, quick=args.size == "small"))
    add_ceiling_fractions(results, ceilings)
    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "retain bench " + " ".join(_argv_of(args)),
        "machine": machine_facts(args.device),
        "ceilings": ceilings,
        "config": {"device": args.device, "size": args.size, "sweep_T": sweep, "reps": args.reps,
                   "budget_s": args.budget, "max_call_s": args.max_call_s, "heap": heap,
                   "heap_mode": "cold" if args.cold_heap else "warm", "compile_cache": args.compile_cache,
                   "other_cpu": meter.other_cores(),
                   "cpu_capabilities": [_native.cpu_capability(), *extra_caps] if extra_caps else None},
        "results": results,
    }
    text = format_report(report)
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    failed = [r for r in results if r["status"].startswith(("error", "wrong result"))
              or (r["impl"] == REGISTRY[r["op"]].reference and r["status"] != "ok")]
    return 1 if failed else 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    out = []
    for key, default in (("op", None), ("impl", None), ("device", "cpu"), ("size", "default"),
                         ("sweep_T", None), ("reps", 30), ("budget", 2.0), ("max_call_s", 10.0),
                         ("cold_heap", False), ("compile_cache", False), ("wait_quiet", 0), ("retry_noisy", 0),
                         ("cpu_capability", None), ("json", None),
                         ("markdown", None)):
        v = getattr(args, key, default)
        if v == default:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag)
        elif isinstance(v, list):
            out += [x for item in v for x in (flag, str(item))]
        else:
            out += [flag, str(v)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retain bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


# The op families register their cases (python/retain/bench/<family>.py); imported last so
# they can use everything above.
from retain.bench import margin as _margin_cases  # noqa: E402,F401
from retain.bench import scan as _scan_cases  # noqa: E402,F401
