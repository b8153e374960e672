"""Command line: ``retain demo``, ``retain info`` and ``retain bench`` (also ``python -m retain ...``)."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(_args) -> int:
    import torch

    import retain
    from retain import _native

    print(f"retain {retain.__version__}  torch {torch.__version__}  Python {platform.python_version()} "
          f"({platform.machine()}, {platform.system()})")
    caps = _native.capabilities()
    if not caps["native"]:
        print(f"native module: FAILED to load: {caps['load_error']}")
        print(_native.REBUILD_HINT)
        return 1
    build, cpu = caps["build"], caps["cpu"]
    floor = f", runs on glibc >= {build['glibc_floor']}" if build["glibc_floor"] else ""
    print(f"native module: {build['compiler']}, OpenMP {build['openmp']} "
          f"(torch threads: {torch.get_num_threads()}){floor}")
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; instruction sets: {' '.join(cpu['isa']) or 'baseline'}")
    print(f"CPU kernels: capability {cpu['capability']} (this CPU supports up to {cpu['supported']}; "
          f"compiled: {', '.join(cpu['compiled'])}; {_native.CPU_CAPABILITY_ENV} selects a lower one)")
    ok = True
    if cpu["error"]:
        ok = False
        print(f"CPU kernels: FAILED: {cpu['error']}")
    if build["cuda"]:
        rt = build["cuda_runtime"]
        archs = ", ".join(f"sm_{a}" for a in build["cuda_archs"].split(","))
        print(f"CUDA kernels: compiled for {archs} (runtime {rt // 1000}.{rt % 1000 // 10}, "
              f"linked {build['cuda_runtime_link']})")
    else:
        print("CUDA kernels: not compiled (rebuild with RETAIN_CUDA=ON for GPU kernels)")
    print("kernels:")
    for op, devices in caps["kernels"].items():
        print(f"  {op:24s} {', '.join(devices)}")

    devices = ["cpu"]
    if build["cuda"]:
        if torch.cuda.is_available():
            devices.append("cuda")
        elif torch.version.cuda is None:
            print(f"smoke test on cuda: skipped (torch {torch.__version__} is a CPU-only build)")
        else:
            print("smoke test on cuda: skipped (torch.cuda.is_available() is False: no GPU or driver visible)")
    for dev in devices:
        try:
            _smoke(dev)
            print(f"smoke test on {dev}: ok")
        except Exception as exc:  # report every failure, then exit non-zero
            ok = False
            print(f"smoke test on {dev}: FAILED: {exc!r}")
    return 0 if ok else 1


def _smoke(device: str) -> None:
    """linear_recurrence forward and backward against its reference on ``device``."""
    import torch

    from retain.ops import linear_recurrence
    from retain.ops.scan.reference import linear_recurrence_ref

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 33, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    x = torch.randn(2, 33, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    h = linear_recurrence(a, x)
    (ga,) = torch.autograd.grad(h.sum(), a)
    h_ref = linear_recurrence_ref(a, x)
    (ga_ref,) = torch.autograd.grad(h_ref.sum(), a)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(ga, ga_ref)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retain")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retain", description="retain: fast memory primitives for PyTorch")
    parser.add_argument("--version", action="version", version=f"retain {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small memory-layer LM on three domains in turn: how much each "
                          "continual-learning method forgets")
    from retain.demo.run import add_arguments as demo_arguments, run_cli as demo_cli

    demo_arguments(demo)
    demo.set_defaults(fn=demo_cli)
    sub.add_parser("info", help="versions, build facts, kernels per device and a smoke test").set_defaults(fn=_info)
    bench = sub.add_parser("bench", help="benchmark ops against their references and peers")
    from retain.bench.cli import add_arguments, run_cli

    add_arguments(bench)
    bench.set_defaults(fn=run_cli)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
