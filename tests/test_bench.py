"""Smoke tests of ``retain bench`` (python/retain/bench/) and bench/plot.py, so the benchmark code
cannot rot: every registered case runs at its small size and agrees with retain, every installed
peer of the scan cases runs once at a tiny size, missing or broken peers are reported rather than
fatal, malformed cases are refused at registration, the report and the CLI write what they
promise, and the package imports without a cycle. No timing is asserted."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import pkgutil
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retain.bench
import retain.ops
from retain.bench import cli, harness, registry, report
from retain.ops.scan.reference import linear_recurrence_ref
from tests.helpers import assert_close

CASE = registry.REGISTRY["linear_recurrence"]
# One compile chunk covering all of T keeps torch.compile to one graph per direction, and the
# aot_eager backend skips inductor's C++ compiles (seconds each): the chunk loop is still exercised.
TINY = dict(CASE.sizes["small"], T=16, compile_chunk=16, compile_backend="aot_eager")
ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(retain.bench.__file__).parent
EXPECTED_STATUS = ("ok", "not installed", "unsupported")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Every registered case
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(registry.REGISTRY))
def test_every_registered_case_runs_at_its_small_size(op):
    """Each case in the registry at its small size: retain's implementations, the eager reference
    and the torch.compile form (aot_eager backend: no C++ compiles), checked against retain."""
    case = registry.REGISTRY[op]
    impls = [n for n in case.impls if n.startswith("retain") or n in ("eager", "compile", case.baseline)]
    assert {"retain", "eager"} <= set(impls)
    params = dict(case.sizes["small"], compile_backend="aot_eager")
    recs = harness.run_case(case, params, "cpu", impls=impls, reps=1, min_reps=1, budget_s=0)
    directions = [d for d in registry.DIRECTIONS if d in case.bytes_model or d in case.flops_model]
    assert {(r["impl"], r["direction"]) for r in recs} == {(i, d) for i in impls for d in directions}
    bad = [(r["impl"], r["direction"], r["status"]) for r in recs if r["status"] != "ok" or r.get("unchecked")]
    assert not bad, bad
    for r in recs:
        assert r["median_ms"] > 0 and (r.get("gbps", 0) > 0 or r.get("gflops", 0) > 0)


def test_every_family_registers_cases_named_after_its_ops():
    """cli.FAMILIES is the list of families: each mirrors a retain.ops package, registers at least
    one case, and every registered case belongs to a listed family and is named after a public op
    (``cached_readout_gated``: one of an op's modes)."""
    families = {case.family for case in registry.REGISTRY.values()}
    assert families == set(cli.FAMILIES)
    for family in cli.FAMILIES:
        assert (BENCH_DIR / f"{family}.py").is_file()
        importlib.import_module(f"retain.ops.{family}")
    for name, case in registry.REGISTRY.items():  # the op's name, or <op>_<mode> for one op's modes
        op = name if hasattr(retain.ops, name) else name.rsplit("_", 1)[0]
        assert name == case.name and callable(getattr(retain.ops, op, None)), name


def test_cost_models_match_the_committed_results():
    """The bytes and flops models give what the committed results were computed with."""
    checked = 0
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        if not str(data.get("schema", "")).startswith("retain-bench/"):  # e.g. `retain demo --json`
            continue
        for r in data["results"]:
            case = registry.REGISTRY[r["op"]]
            for key, model in (("bytes", case.bytes_model), ("flops", case.flops_model)):
                if key in r:
                    assert model[r["direction"]](r["params"]) == r[key], (path.name, r["op"], r["direction"], key)
                    checked += 1
    assert checked > 100


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_register_refuses_a_malformed_case(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # nothing leaks into other tests
    with pytest.raises(ValueError, match="already registered"):
        registry.register(CASE)
    bad = {
        "no 'small' size": dataclasses.replace(CASE, name="x", sizes={"default": CASE.sizes["default"]}),
        "reference 'numbaa' is not one of its impls": dataclasses.replace(CASE, name="x", reference="numbaa"),
        "bytes_model for unknown direction 'bwd'": dataclasses.replace(CASE, name="x", bytes_model={"bwd": len}),
        "neither a bytes_model nor a flops_model": dataclasses.replace(CASE, name="x", bytes_model={}),
    }
    for message, case in bad.items():
        with pytest.raises(ValueError, match=f"case 'x': .*{message}"):
            registry.register(case)
    assert "x" not in registry.REGISTRY
    ok = dataclasses.replace(CASE, name="x")
    assert registry.register(ok) is ok and registry.REGISTRY["x"] is ok


def test_cost_model_counts_units_per_direction():
    model = registry.cost_model(lambda p: p["n"] * registry.itemsize(p), fwd=3, fwdbwd=8)
    assert set(model) == set(registry.DIRECTIONS)
    assert model["fwd"]({"n": 10, "dtype": "float32"}) == 120
    assert model["fwd+bwd"]({"n": 10, "dtype": "bfloat16"}) == 160


# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------


def test_autograd_runner_differentiates_the_named_inputs_only():
    x, y, g = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(3)
    inputs = {"x": x, "y": y, "g": g.double()}
    r = harness.autograd_runner(lambda a, b: (a * b).sum(), inputs, ("x", "y"), wrt=("y",))
    assert_close(r.fwd(), (x * y).sum())
    (gy,) = r.fwdbwd()  # a scalar loss: no output gradient
    assert_close(gy, x)
    r = harness.autograd_runner(lambda a, b: a * b, inputs, ("x", "y"), grad_out="g")
    gx, gy = r.fwdbwd()
    assert_close(gx, y * g.double())
    assert_close(gy, x * g.double())
    assert not x.requires_grad and not y.requires_grad  # the inputs themselves are left alone


def test_retain_impl_is_unsupported_without_a_native_kernel():
    impl = harness.retain_impl(retain.ops.linear_recurrence, harness.Call(("a", "x"), "grad_h"), "n",
                               kernel="no_such_kernel")
    with pytest.raises(harness.Unsupported, match="no no_such_kernel kernel for cpu"):
        impl.build(CASE.make_inputs(TINY, "cpu"), TINY, "cpu")


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


def test_gated_delta_rule_case_runs_every_installed_implementation():
    case = registry.REGISTRY["gated_delta_rule"]
    params = dict(case.sizes["small"], T=8)
    recs = harness.run_case(case, params, "cpu", reps=1, min_reps=1, budget_s=0)
    by = {(r["impl"], r["direction"]): r for r in recs}
    for r in recs:
        assert r["status"].startswith(EXPECTED_STATUS), r
    for d in registry.DIRECTIONS:  # checked against retain before timing: "ok" means they agree
        for impl in ("retain", "eager", "compile"):
            assert by[impl, d]["status"] == "ok", by[impl, d]
    assert by["retain", "fwd"]["gflops"] > 0
    assert by["numba", "fwd+bwd"]["status"].startswith(("unsupported", "not installed"))
    assert by["fla-chunk", "fwd"]["status"].startswith(("unsupported", "not installed"))  # CUDA only


def test_numba_peer_runs_when_installed():
    pytest.importorskip("numba")
    recs = harness.run_case(CASE, TINY, "cpu", impls=["retain", "numba"], reps=1, min_reps=1, budget_s=0)
    assert [r["status"] for r in recs] == ["ok"] * 4


def test_missing_peers_are_reported_not_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    monkeypatch.setitem(sys.modules, "assoc_scan", None)
    for name in [m for m in sys.modules if m.split(".")[0] == "accelerated_scan"] + ["accelerated_scan"]:
        monkeypatch.setitem(sys.modules, name, None)  # submodules too: an earlier test may have imported them
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


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _record(impl: str, direction: str, T: int, ms: float, **extra) -> dict:
    return {"op": "linear_recurrence", "shape": f"T={T}", "device": "cpu", "direction": direction, "impl": impl,
            "note": f"{impl} note", "status": "ok", "params": {"B": 1, "T": T, "D": 2, "dtype": "float32"},
            "median_ms": ms, "q1_ms": ms, "q3_ms": ms, "min_ms": ms, "reps": 3, "warmup_s": 0.5, **extra}


def _report(results: list[dict], caps: list[str] | None = None) -> dict:
    copy = {"copy_gbps": 10.0, "copy_gbps_allocs": [9.0, 11.0], "copy_bytes": 2 << 20, "matmul_gflops": 50.0,
            "matmul_n": 512}
    return {"schema": report.SCHEMA, "created": "now", "command": "retain bench --op linear_recurrence",
            "machine": {"cpu": "cpu", "logical_cpus": 2, "torch_threads": 2, "python": "3", "torch": "2",
                        "retain": "0", "cpu_capability": "avx2", "cpu_capability_supported": "avx2"},
            "ceilings": copy,
            "config": {"device": "cpu", "heap": "warm (test)", "reps": 3, "budget_s": 2, "max_call_s": 10,
                       "other_cpu": 0.5, "cpu_capabilities": caps},
            "results": results}


def test_report_tables_sweep_pivot_and_capabilities():
    results = [_record("retain", "fwd", 8, 1.0, gbps=5.0), _record("eager", "fwd", 8, 4.0),
               _record("retain", "fwd", 16, 2.0, single_call=True), _record("retain@default", "fwd", 8, 3.0),
               dict(_record("numba", "fwd", 16, 0), status="not installed (numba)")]
    harness.add_ratios(CASE, results[:2])
    report.add_ceiling_fractions(results, {"copy_gbps": 10.0, "matmul_gflops": 50.0})
    assert results[0]["pct_copy"] == 50.0 and results[0]["speedup_vs_eager"] == 4.0
    text = report.format_report(_report(results, caps=["avx2", "default"]))
    assert "the machine was busy: rerun when quiet" in text  # other_cpu 0.5 > NOISY_CORES
    assert "| fwd | retain | 1.000 | 1-1 | 3 | 0.50 | 4x | 1x | 5.0 | 50 | ok |" in text
    assert "| fwd | numba | | | | | | | | | not installed (numba) |" in text
    assert "- `eager`: eager note" in text and CASE.model_note in text
    assert "## linear_recurrence: median ms by T" in text
    assert "| fwd | retain | 1 | 2* |" in text and "| fwd | numba |  | not installed (numba) |" in text
    assert "| linear_recurrence | T=8 | fwd | retain | 1.000 | 3.000 (0.33) |" in text  # avx2, then default


def test_write_report_writes_markdown_and_json(tmp_path):
    rep = _report([_record("retain", "fwd", 8, 1.0)])
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    text = report.write_report(rep, str(md), str(js))
    assert md.read_text() == text and json.loads(js.read_text()) == rep
    assert "median ms by T" not in text and "per CPU capability" not in text  # one T, one build


# --------------------------------------------------------------------------------------------
# CLI and package
# --------------------------------------------------------------------------------------------


def test_run_cli_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    args = _parse(["--op", "linear_recurrence", "--size", "small", "--sweep-T", "8,16", "--impl", "retain,eager",
                   "--reps", "2", "--cold-heap", "--quiet", "--json", str(out), "--markdown", str(md)])
    assert cli.run_cli(args) == 0
    rep = json.loads(out.read_text())
    assert rep["schema"] == report.SCHEMA
    assert {"created", "command", "machine", "ceilings", "config", "results"} <= set(rep)
    assert rep["command"] == cli.command_line(args)
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


def test_run_cli_runs_each_cpu_capability(tmp_path):
    usable = retain.cpu_capabilities()
    out = tmp_path / "c.json"
    args = _parse(["--op", "feature_imitation", "--size", "small", "--impl", "retain", "--reps", "1", "--budget", "0",
                   "--cold-heap", "--quiet", "--cpu-capability", "all", "--json", str(out)])
    assert cli.run_cli(args) == 0
    rep = json.loads(out.read_text())
    others = [c for c in usable if c != retain.cpu_capability()]
    assert {r["impl"] for r in rep["results"]} == {"retain"} | {f"retain@{c}" for c in others}
    assert all(r["status"] == "ok" for r in rep["results"])
    assert retain.cpu_capability() == rep["machine"]["cpu_capability"]  # put back after each call
    assert cli.run_cli(_parse(["--cpu-capability", "nope", "--quiet"])) == 2


def test_run_cli_rejects_unknown_op_and_lists_ops(capsys):
    assert cli.run_cli(_parse(["--op", "nope"])) == 2
    assert "unknown op nope" in capsys.readouterr().err
    assert cli.run_cli(_parse(["--list"])) == 0
    listed = capsys.readouterr().out
    assert "linear_recurrence (scan): retain, eager" in listed
    assert all(f"{name} ({case.family}): " in listed for name, case in registry.REGISTRY.items())


def test_command_line_records_every_option_that_changes_a_report():
    argv = ["--op", "tm_loss", "--op", "kl_imitation", "--impl", "retain,eager", "--device", "cpu", "--size", "small",
            "--sweep-T", "8,16", "--reps", "5", "--budget", "0.5", "--max-call-s", "3.0", "--cold-heap",
            "--compile-cache", "--wait-quiet", "60.0", "--retry-noisy", "2", "--cpu-capability", "all",
            "--json", "a.json", "--markdown", "a.md", "--quiet"]
    args = _parse(argv)
    line = cli.command_line(args)
    assert line.startswith("retain bench ") and "--quiet" not in line and "--device" not in line  # default
    again = _parse(line.split()[2:])
    assert vars(again) == dict(vars(args), quiet=False)
    assert cli.command_line(_parse([])) == "retain bench"


def test_both_entry_points_take_the_same_options(capsys):
    import retain.__main__

    helps = []
    for entry in (lambda: cli.main(["--help"]), lambda: retain.__main__.main(["bench", "--help"])):
        with pytest.raises(SystemExit) as exc:
            entry()
        assert exc.value.code == 0
        helps.append(capsys.readouterr().out)
    options = [h[h.index("options:"):] for h in helps]
    assert options[0] == options[1] and "--cpu-capability CAPS" in options[0]
    assert all(h.startswith("usage: retain bench [-h] [--op NAME]") for h in helps)


def test_python_m_retain_bench_sees_every_registered_case():
    proc = subprocess.run([sys.executable, "-m", "retain.bench", "--list"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split(" ", 1)[0] for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert listed == list(registry.REGISTRY) and len(listed) >= 6


def _bench_imports(path: Path) -> set[str]:
    """The retain.bench modules ``path`` imports (the families through cli.FAMILIES)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "retain.bench":
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retain.bench."):
            names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FAMILIES" for t in node.targets):
            names |= {e.value for e in node.value.elts}
    return names - {path.stem}


def test_bench_modules_import_without_a_cycle_each_on_its_own():
    modules = [m.name for m in pkgutil.iter_modules([str(BENCH_DIR)]) if m.name != "__main__"]
    graph = {m: _bench_imports(BENCH_DIR / f"{m}.py") & set(modules) for m in modules}
    assert graph["registry"] == set() and graph["cli"] >= set(cli.FAMILIES)
    for family in cli.FAMILIES:  # a family sees the registry and the harness only
        assert graph[family] <= {"registry", "harness"}, (family, graph[family])
    order: list[str] = []  # topological order, or a cycle
    while len(order) < len(graph):
        ready = [m for m in graph if m not in order and graph[m] <= set(order)]
        assert ready, f"import cycle among {sorted(set(graph) - set(order))}: {graph}"
        order += sorted(ready)
    code = (  # each module first, in a process where no retain.bench module is loaded yet
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for m in [m for m in sys.modules if m == 'retain.bench' or m.startswith('retain.bench.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module('retain.bench.' + name)\n"
        "    print(name, len(sys.modules['retain.bench.registry'].REGISTRY))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [x for m in modules for x in (m, str(len(registry.REGISTRY)))]


def test_bench_import_is_lean_and_warm_heap_works():
    optional = ["numba", "assoc_scan", "accelerated_scan", "fla", "matplotlib", "pytest_benchmark"]
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
