"""Smoke tests of ``retain bench`` (python/retain/bench/) and bench/plot.py, so the benchmark code
cannot rot: every installed implementation runs once at a tiny size and agrees with retain, the
CLI writes the JSON it promises, missing or broken peers are reported rather than fatal. No
timing is asserted."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retain.bench import cli, harness, machine, registry, report
from retain.ops.scan.reference import linear_recurrence_ref
from tests.helpers import assert_close

CASE = registry.REGISTRY["linear_recurrence"]
# One compile chunk covering all of T keeps torch.compile to one graph per direction, and the
# aot_eager backend skips inductor's C++ compiles (seconds each): the chunk loop is still exercised.
TINY = dict(CASE.sizes["small"], T=16, compile_chunk=16, compile_backend="aot_eager")
ROOT = Path(__file__).resolve().parents[1]
EXPECTED_STATUS = ("ok", "not installed", "unsupported")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_every_installed_implementation_runs_and_agrees_with_retain():
    recs = harness.run_case(CASE, TINY, "cpu", reps=1, min_reps=1, budget_s=0, keep_outputs=True)
    assert {(r["impl"], r["direction"]) for r in recs} == {
        (i, d) for i in CASE.impls for d in registry.DIRECTIONS
    }
    for r in recs:
        assert r["status"].startswith(EXPECTED_STATUS), r
    by = {(r["impl"], r["direction"]): r for r in recs}
    for d in registry.DIRECTIONS:  # torch-only implementations always run
        for impl in ("retain", "eager", "compile"):
            assert by[impl, d]["status"] == "ok", by[impl, d]
    a, x, g = (t.double() for t in CASE.make_inputs(TINY, "cpu").values())
    a.requires_grad_()
    x.requires_grad_()
    h = linear_recurrence_ref(a, x)
    ga, gx = torch.autograd.grad(h, (a, x), g)
    for r in recs:
        if r["status"] != "ok":
            continue
        assert r["median_ms"] > 0 and r["reps"] >= 1 and r["warmup_s"] >= 0
        assert r["gbps"] > 0
        if r["direction"] == "fwd":
            assert_close(r["output"], h.detach().to(r["output"].dtype))
        else:
            got_ga, got_gx = r["output"]
            assert_close(got_ga, ga.to(got_ga.dtype))
            assert_close(got_gx, gx.to(got_gx.dtype))
        assert r["time_vs_retain"] > 0 and r["speedup_vs_eager"] > 0


def test_numba_peer_runs_when_installed():
    pytest.importorskip("numba")
    recs = harness.run_case(CASE, TINY, "cpu", impls=["retain", "numba"], reps=1, min_reps=1, budget_s=0)
    assert [r["status"] for r in recs] == ["ok"] * 4


def test_missing_peers_are_reported_not_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    monkeypatch.setitem(sys.modules, "assoc_scan", None)
    for name in [m for m in sys.modules if m.split(".")[0] == "accelerated_scan"] + ["accelerated_scan"]:
        monkeypatch.setitem(sys.modules, name, None)  # submodules too: an earlier test may have imported them
    from retain.bench import scan as scan_cases

    monkeypatch.setattr(scan_cases, "_NUMBA_KERNELS", {})
    recs = harness.run_case(CASE, TINY, "cpu", impls=["retain", "numba", "assoc-scan", "accelerated-scan"],
                          directions=["fwd"], reps=1, min_reps=1, budget_s=0)
    status = {r["impl"]: r["status"] for r in recs}
    assert status == {
        "retain": "ok",
        "numba": "not installed (numba)",
        "assoc-scan": "not installed (assoc_scan)",
        "accelerated-scan": "not installed (accelerated_scan)",
    }


def test_wrong_and_broken_peers_are_caught_before_timing():
    def wrong(inputs, params, device):
        return registry.Runner(lambda: inputs["x"] + 1, lambda: (inputs["a"], inputs["x"]))

    def broken(inputs, params, device):
        raise RuntimeError("kaput")

    def cuda_only(inputs, params, device):
        raise harness.Unsupported("CUDA only")

    case = dataclasses.replace(CASE, impls={
        "retain": CASE.impls["retain"], "wrong": registry.Impl(wrong), "broken": registry.Impl(broken),
        "cuda-only": registry.Impl(cuda_only)})
    recs = harness.run_case(case, TINY, "cpu", reps=1, min_reps=1, budget_s=0)
    status = {(r["impl"], r["direction"]): r["status"] for r in recs}
    for d in registry.DIRECTIONS:
        assert status["retain", d] == "ok"
        assert status["wrong", d].startswith("wrong result: "), status
        assert "median_ms" not in next(r for r in recs if r["impl"] == "wrong" and r["direction"] == d)
        assert status["broken", d] == "error: RuntimeError: kaput"
        assert status["cuda-only", d] == "unsupported: CUDA only"


def test_run_cli_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    args = _parse(["--op", "linear_recurrence", "--size", "small", "--sweep-T", "8,16", "--impl", "retain,eager",
                   "--reps", "2", "--cold-heap", "--quiet", "--json", str(out), "--markdown", str(md)])
    assert cli.run_cli(args) == 0
    rep = json.loads(out.read_text())
    assert rep["schema"] == report.SCHEMA
    assert {"created", "command", "machine", "ceilings", "config", "results"} <= set(rep)
    assert {"cpu", "logical_cpus", "torch_threads", "torch", "retain"} <= set(rep["machine"])
    assert rep["ceilings"]["copy_gbps"] > 0 and rep["ceilings"]["matmul_gflops"] > 0
    assert rep["config"]["heap_mode"] == "cold" and rep["config"]["sweep_T"] == [8, 16]
    results = rep["results"]
    assert {(r["params"]["T"], r["direction"], r["impl"]) for r in results} == {
        (t, d, i) for t in (8, 16) for d in registry.DIRECTIONS for i in ("retain", "eager")}
    for r in results:
        assert r["status"] == "ok"
        for key in ("op", "shape", "median_ms", "q1_ms", "q3_ms", "min_ms", "reps", "warmup_s", "bytes", "gbps",
                    "pct_copy", "speedup_vs_eager", "time_vs_retain"):
            assert key in r, key
    text = capsys.readouterr().out
    assert text == md.read_text()
    assert "| fwd+bwd | eager |" in text and "median ms by T" in text and "heap: cold" in text


def test_run_cli_rejects_unknown_op_and_lists_ops(capsys):
    assert cli.run_cli(_parse(["--op", "nope"])) == 2
    assert cli.run_cli(_parse(["--list"])) == 0
    assert "linear_recurrence (scan): retain, eager" in capsys.readouterr().out


def test_bench_import_is_lean_and_warm_heap_works():
    optional = ["numba", "assoc_scan", "accelerated_scan", "matplotlib", "pytest_benchmark"]
    code = (
        "import sys, retain.__main__, retain.bench\n"
        f"print(sorted(m for m in {optional!r} if m in sys.modules))\n"
        "print(retain.bench.machine.warm_heap())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded, warm = proc.stdout.split("\n")[:2]
    assert loaded == "[]"
    if platform.libc_ver()[0] == "glibc":
        assert warm == "True"


def test_plot_script_draws_a_report(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rec = {"op": "linear_recurrence", "shape": "s", "device": "cpu", "impl": "retain", "status": "ok",
           "median_ms": 1.0, "q1_ms": 0.9, "q3_ms": 1.1, "params": {"B": 1, "T": 8, "D": 2, "dtype": "float32"}}
    results = [dict(rec, direction=d, params=dict(rec["params"], T=t), median_ms=t / 8)
               for d in registry.DIRECTIONS for t in (8, 16)]
    results.append(dict(rec, impl="numba", direction="fwd", status="not installed (numba)"))
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"machine": {"cpu": "x", "torch_threads": 2}, "config": {"heap_mode": "warm"},
                               "results": results}))
    png = tmp_path / "r.png"
    assert plot.main([str(src), "-o", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_gated_delta_rule_case_runs_every_installed_implementation():
    case = registry.REGISTRY["gated_delta_rule"]
    params = dict(case.sizes["small"], T=8)
    recs = harness.run_case(case, params, "cpu", reps=1, min_reps=1, budget_s=0)
    by = {(r["impl"], r["direction"]): r for r in recs}
    for d in registry.DIRECTIONS:  # checked against retain before timing: "ok" means they agree
        for impl in ("retain", "eager", "compile"):
            assert by[impl, d]["status"] == "ok", by[impl, d]
    assert by["retain", "fwd"]["gflops"] > 0
    assert by["numba", "fwd+bwd"]["status"].startswith(("unsupported", "not installed"))


def test_python_m_retain_bench_sees_every_registered_case():
    proc = subprocess.run([sys.executable, "-m", "retain.bench", "--list"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split(" ", 1)[0] for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert sorted(listed) == sorted(registry.REGISTRY) and len(listed) >= 6


@pytest.mark.parametrize("op", list(registry.REGISTRY))
def test_every_registered_case_runs_at_its_small_size(op):
    """retain, the eager reference and torch.compile forms of each case, checked against retain."""
    case = registry.REGISTRY[op]
    impls = [n for n in case.impls if n.startswith("retain") or n in ("eager", case.baseline)]
    recs = harness.run_case(case, case.sizes["small"], "cpu", impls=impls, reps=1, min_reps=1, budget_s=0)
    assert {r["impl"] for r in recs} == set(impls)
    bad = [(r["impl"], r["direction"], r["status"]) for r in recs if r["status"] != "ok"]
    assert not bad, bad
