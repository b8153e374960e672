"""``retain bench``: each op against its eager reference, torch.compile and the peers a user would
pick, measured side by side in one process, with the machine's measured ceilings.

The command line of ``retain bench`` and ``python -m retain.bench`` (the same options: this
module's :func:`add_arguments` and :func:`run_cli`). It loads the families listed in
``FAMILIES``, whose modules register their cases; importing it imports torch and nothing
optional (numba, assoc_scan, accelerated_scan, fla and matplotlib are imported by the
implementations that need them; one that is missing is reported as ``not installed``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import sys
from typing import Any

import torch

from retain import _native
from retain.bench.harness import LoadMeter, run_case, wait_quiet, with_cpu_capabilities
from retain.bench.machine import combine_ceilings, machine_facts, measure_ceilings, warm_heap
from retain.bench.registry import REGISTRY, SIZES
from retain.bench.report import SCHEMA, add_ceiling_fractions, write_report

# The op families whose cases `retain bench` runs, in this order: python/retain/bench/<family>.py,
# each mirroring python/retain/ops/<family>/. A new family is one more line.
FAMILIES = (
    "cache",
    "margin",
    "fisher",
    "replay",
    "scan",
)
for _family in FAMILIES:
    importlib.import_module(f"retain.bench.{_family}")

_NOT_RECORDED = ("list", "quiet")  # options that change nothing in a report's numbers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", action="append", metavar="NAME",
                        help=f"op to benchmark (repeatable; default all: {', '.join(REGISTRY)})")
    parser.add_argument("--impl", metavar="A,B", help="only these implementations (comma-separated)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=SIZES, default="default")
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
    """Run ``retain bench`` with parsed ``args`` (see :func:`add_arguments`): print the markdown
    report, write the JSON/markdown files asked for. Returns the exit status: 0, 1 when an
    implementation failed or gave a wrong result (or the reference did not run), 2 for bad
    arguments."""
    if args.list:
        for name, case in REGISTRY.items():
            print(f"{name} ({case.family}): {', '.join(case.impls)}")
            for size, p in case.sizes.items():
                print(f"  --size {size}: {case.describe(p)}")
        return 0
    ops = args.op or list(REGISTRY)
    unknown = [o for o in ops if o not in REGISTRY]
    if unknown:
        return _usage_error(f"unknown op {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    impls = [s.strip() for s in args.impl.split(",")] if args.impl else None
    if args.device == "cuda" and not torch.cuda.is_available():
        return _usage_error("--device cuda but torch.cuda.is_available() is False")
    sweep = [int(t) for t in args.sweep_T.split(",")] if args.sweep_T else None
    extra_caps = _extra_cpu_capabilities(args)
    if isinstance(extra_caps, str):
        return _usage_error(extra_caps)

    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.wait_quiet > 0:
        other = wait_quiet(args.wait_quiet)
        log("retain bench: other processes' CPU before starting: "
            + ("unknown" if other is None else f"{other:.2f} cores"))
    if args.cold_heap:
        heap = "cold (glibc defaults: large outputs are fresh mmaps, page faults included)"
    elif warm_heap():
        heap = "warm (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1: freed memory is reused, never trimmed)"
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
    ceilings = combine_ceilings(ceilings, measure_ceilings(args.device, quick=args.size == "small"))
    add_ceiling_fractions(results, ceilings)
    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(args),
        "machine": machine_facts(args.device),
        "ceilings": ceilings,
        "config": {"device": args.device, "size": args.size, "sweep_T": sweep, "reps": args.reps,
                   "budget_s": args.budget, "max_call_s": args.max_call_s, "heap": heap,
                   "heap_mode": "cold" if args.cold_heap else "warm", "compile_cache": args.compile_cache,
                   "other_cpu": meter.other_cores(),
                   "cpu_capabilities": [_native.cpu_capability(), *extra_caps] if extra_caps else None},
        "results": results,
    }
    print(write_report(report, args.markdown, args.json), end="")
    failed = [r for r in results if r["status"].startswith(("error", "wrong result"))
              or (r["impl"] == REGISTRY[r["op"]].reference and r["status"] != "ok")]
    return 1 if failed else 0


def _usage_error(message: str) -> int:
    print(f"retain bench: {message}", file=sys.stderr)
    return 2


def _extra_cpu_capabilities(args: argparse.Namespace) -> list[str] | str:
    """The CPU capabilities ``--cpu-capability`` adds to the active one, highest first, or the
    reason it cannot (a string)."""
    if not args.cpu_capability:
        return []
    usable = _native.cpu_capabilities()
    wanted = usable if args.cpu_capability.strip() == "all" else [
        c.strip() for c in args.cpu_capability.split(",") if c.strip()]
    bad = [c for c in wanted if c not in usable]
    if bad or args.device != "cpu":
        return (f"--cpu-capability {args.cpu_capability}: "
                + (f"{', '.join(bad)} not usable here (this build and CPU run: {', '.join(usable)})" if bad
                   else "CPU capabilities apply to --device cpu"))
    return sorted((c for c in wanted if c != _native.cpu_capability()),
                  key=_native.CPU_CAPABILITY_ORDER.index, reverse=True)


def command_line(args: argparse.Namespace) -> str:
    """The ``retain bench`` command that makes a report like the one ``args`` make: every option
    that differs from its default, in the order of :func:`add_arguments`."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    out = ["retain", "bench"]
    for key, default in vars(parser.parse_args([])).items():
        v = getattr(args, key, default)
        if key in _NOT_RECORDED or v == default:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag)
        elif isinstance(v, list):
            out += [x for item in v for x in (flag, str(item))]
        else:
            out += [flag, str(v)]
    return " ".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m retain.bench [options]`` (``retain bench`` goes through ``retain.__main__``)."""
    parser = argparse.ArgumentParser(prog="retain bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))
