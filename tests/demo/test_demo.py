"""``retain demo``: its data, its bookkeeping, its command line, and ``--quick`` end to end."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys

import pytest
import torch

from retain.cl.metrics import forgetting
from retain.demo import METHODS, Config, TinyLM, make_domains, run_method
from retain.demo.data import arithmetic_text, code_text, prose_text

TINY = Config(steps=4, batch_size=4, seq_len=16, d_model=32, num_heads=2, head_dim=16, chars=4000, n_eval=4,
              eval_every=2, replay_capacity=16, fisher_samples=4)


def test_domains_are_deterministic_and_distinct():
    a = make_domains(chars=5000, seq_len=32, n_eval=8, seed=3)
    b = make_domains(chars=5000, seq_len=32, n_eval=8, seed=3)
    assert [d.name for d in a] == ["prose", "code", "arithmetic"]
    for x, y in zip(a, b):
        assert torch.equal(x.train, y.train) and torch.equal(x.eval, y.eval)
        assert x.eval.shape == (8, 33) and x.eval.dtype == torch.int64
        assert int(x.train.max()) < 128 and x.train.numel() == 4500   # ASCII bytes, 90 % for training
    # the evaluation windows come from the held-out tail, not from the training part
    prose = prose_text(5000).encode()
    tail = prose[4500:]
    assert all(bytes(w.tolist()) in tail for w in a[0].eval)


def test_code_has_no_docstrings_or_comments():
    code = code_text(20000)
    assert "def " in code and "#" not in code.replace("'#'", "").replace('"#"', "")[:2000]
    tree = ast.parse(code[:code.rfind("\n\n")])      # whole modules before the cut parse
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            assert not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                        and isinstance(first.value.value, str))


def test_arithmetic_lines_are_correct():
    lines = arithmetic_text(3000, seed=1).splitlines()[:-1]          # the last line may be cut
    assert len(lines) > 100
    for line in lines:
        lhs, rhs = line.split("=")
        assert eval(lhs) == int(rhs)                                 # noqa: S307 (digits and + - * only)


def test_model_shapes():
    model = TinyLM(d_model=32, num_layers=1, num_heads=2, head_dim=16)
    logits = model(torch.randint(0, 256, (3, 10)))
    assert logits.shape == (3, 10, 256)


@pytest.mark.parametrize("method", list(METHODS))
def test_run_method_bookkeeping(method):
    domains = make_domains(chars=TINY.chars, seq_len=TINY.seq_len, n_eval=TINY.n_eval, seed=0)
    r = run_method(method, TINY, domains, torch.device("cpu"), progress=False)
    curve = r["curve"]
    # evaluations: the initial one, then every eval_every steps (4 steps per domain, every 2)
    assert curve["step"] == [0, 2, 4, 6, 8, 10, 12]
    assert curve["task"] == [0, 0, 0, 1, 1, 2, 2]
    assert len(r["R"]) == 3 and all(len(row) == 3 for row in r["R"])
    for i, step in enumerate((4, 8, 12)):                          # R[i] = the evaluation at the end of domain i
        assert r["R"][i] == curve["loss"][curve["step"].index(step)]
    assert r["final"] == dict(zip(["prose", "code", "arithmetic"], r["R"][-1]))
    assert r["forgetting"] == pytest.approx(forgetting(r["R"], lower_is_better=True))
    # worst earlier: each earlier domain's highest loss at an evaluation after it was learned
    loss, task = curve["loss"], curve["task"]
    worst = [max(loss[t][j] for t in range(len(task)) if task[t] > j) for j in range(2)]
    assert r["worst_case"] == pytest.approx(sum(worst) / 2)
    assert all(math.isfinite(v) for row in loss for v in row) and r["seconds"] > 0


def test_methods_start_from_the_same_model():
    domains = make_domains(chars=TINY.chars, seq_len=TINY.seq_len, n_eval=TINY.n_eval, seed=0)
    first = {m: run_method(m, TINY, domains, torch.device("cpu"), progress=False)["curve"]["loss"][0]
             for m in ("naive", "ewc")}
    assert first["naive"] == first["ewc"]


def _demo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retain", "demo", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (("--methods", "naive,magic"), "--methods must be a comma-separated list"),
    (("--steps", "0"), "--steps must be >= 1, got 0"),
])
def test_bad_arguments_are_refused(args, message):
    proc = _demo(*args)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused():
    proc = _demo("--device", "cuda")
    assert proc.returncode == 2 and "torch.cuda.is_available() is False" in proc.stderr


def test_quick_demo_end_to_end(tmp_path):
    """``retain demo --quick``: every method, the JSON, the plot; naive fine-tuning forgets and replay
    forgets much less (a large effect at the quick settings: 5.3 against 0.16 nats when written)."""
    png = tmp_path / "demo.png"
    proc = _demo("--quick", "--json", "--no-progress", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [m["method"] for m in out["methods"]] == list(METHODS)
    by = {m["method"]: m for m in out["methods"]}
    for m in out["methods"]:
        assert all(math.isfinite(v) for v in m["final"].values())
    assert by["naive"]["forgetting"] > 2 * by["replay"]["forgetting"]
    assert by["naive"]["worst_case"] > by["replay"]["worst_case"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in proc.stderr


def test_table_output_and_json_file(tmp_path):
    path = tmp_path / "numbers.json"
    proc = _demo("--quick", "--steps", "2", "--methods", "naive,replay", "--no-progress", "--plot", "", "--json",
                 str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    numbers = json.loads(path.read_text())
    assert [m["method"] for m in numbers["methods"]] == ["naive", "replay"] and numbers["config"]["steps"] == 2
    assert "| method | prose | code | arithmetic | mean | forgetting | worst earlier | time s |" in proc.stdout
    assert "| naive fine-tuning |" in proc.stdout and "| reservoir replay |" in proc.stdout
