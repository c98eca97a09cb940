"""The command line as a user runs it: output, exit codes, one-line errors, files, LaTeX."""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from conftest import NORMS
from symbn import BUILTINS


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "symbn", *args], capture_output=True, text=True, cwd=cwd)


def test_default_prints_the_six_paper_expressions_and_the_compact_form():
    out = run("derive")
    assert out.returncode == 0, out.stderr
    for lhs in ("∂l/∂x̂_i = γ·∂l/∂y_i", "∂l/∂σ²_B = ", "∂l/∂μ_B = ", "∂l/∂x_i = ", "∂l/∂γ = ", "∂l/∂β = "):
        assert lhs in out.stdout
    assert "∂l/∂x_i = γ·(m·∂l/∂y_i - Σ_k ∂l/∂y_k - x̂_i·Σ_k (∂l/∂y_k·x̂_k))/(m·√(σ²_B + ε))" in out.stdout
    assert "3 paths" in out.stdout


def test_eval_mode_and_forms():
    out = run("derive", "batchnorm", "--mode", "eval", "--form", "compact")
    assert out.returncode == 0
    assert "∂l/∂x_i = γ·∂l/∂y_i/√(Var[x] + ε)" in out.stdout
    assert "paper form" not in out.stdout and "1 path" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["derive", "groupnorm9"], "invalid choice: 'groupnorm9' (choose from 'batchnorm', 'layernorm', 'rmsnorm', 'instancenorm', 'groupnorm')"),
    (["derive", "--mode", "test"], "choose from 'train', 'eval'"),
    (["derive", "--form", "short"], "choose from 'paper', 'compact', 'both'"),
    (["derive", "--format", "html"], "choose from 'text', 'latex', 'json'"),
    (["derive", "--document"], "--document needs --format latex"),
    (["derive", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_bad_usage_exits_2_with_one_line(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_unwritable_output_is_a_clear_error(tmp_path):
    out = run("derive", "-o", str(tmp_path / "missing" / "x.txt"))
    assert out.returncode == 2 and "cannot write" in out.stderr and "Traceback" not in out.stderr


def test_help_and_list():
    for args in (["--help"], ["derive", "--help"], ["list", "--help"]):
        assert run(*args).returncode == 0
    listed = run("list").stdout.splitlines()
    assert [line.split()[0] for line in listed] == list(BUILTINS)


def test_json_has_stable_keys(tmp_path):
    target = tmp_path / "bn.json"
    assert run("derive", "--format", "json", "-o", str(target)).returncode == 0
    doc = json.loads(target.read_text())
    assert doc["norm"] == "batchnorm" and doc["mode"] == "train"
    assert list(doc["gradients"]) == ["xhat", "var", "mean", "x", "gamma", "beta"]
    assert [t["via"] for t in doc["gradients"]["x"]["terms"]] == ["xhat", "var", "mean"]
    assert set(doc["compact"]) == {"x", "gamma", "beta"}
    assert {"text", "latex", "sympy"} <= set(doc["compact"]["x"]["rhs"])
    assert "proofs" not in doc


@pytest.mark.slow
def test_json_proofs():
    doc = json.loads(run("derive", "rmsnorm", "--format", "json", "--proofs").stdout)
    status = {p["key"]: p["status"] for p in doc["proofs"]}
    assert status["paper_equals_direct[x]"] == "proven" and status["sum_dx_zero"] == "refuted"
    assert status["brute_force[m=6]"] == "proven"


def test_latex_equations():
    out = run("derive", "--format", "latex").stdout
    assert r"\begin{align*}" in out and r"\frac{\partial \ell}{\partial \sigma^{2}_{\mathcal{B}}}" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (CI installs it)")
@pytest.mark.parametrize("norm", NORMS)
def test_document_compiles(tmp_path, norm):
    tex = tmp_path / f"{norm}.tex"
    assert run("derive", norm, "--format", "latex", "--document", "-o", str(tex)).returncode == 0
    compiled = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", tex.name],
                              cwd=tmp_path, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-2000:]
    assert (tmp_path / f"{norm}.pdf").stat().st_size > 10_000


def test_generate_writes_every_kernel_file(tmp_path):
    out = run("generate", "-o", str(tmp_path))
    assert out.returncode == 0, out.stderr
    names = {p.name for p in tmp_path.iterdir()}
    stems = [*BUILTINS, *(f"{n}_backward2" for n in BUILTINS)]  # orders 1 and 2
    assert {f"{n}.{ext}" for n in stems for ext in ("py", "c", "h")} | {"__init__.py", "_runtime.py"} == names


def test_check_rejects_unknown_norms_in_one_line():
    out = run("check", "nope")
    assert out.returncode == 2 and "invalid choice: 'nope'" in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.slow
def test_bench_quick_reports_every_implementation(tmp_path):
    """Runs the benchmark (no timing is asserted): every case has C, NumPy and the hand-written baselines."""
    out = run("bench", "--quick", "--json", "--plot", str(tmp_path / "bench.svg"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report["cases"]) == 3 and "[3/3]" in out.stderr
    (double,) = report["double_backward"]
    assert double["ms"]["symbn double backward"] > 0 and double["double_vs_own_backward"] > 0
    torch = {"torch", "torch (fresh)"} if importlib.util.find_spec("torch") else set()
    for case in report["cases"]:
        assert {"c", "numpy", "compact numpy", "staged numpy", *torch} <= set(case["results"]) and case["triad_gbs"] > 0
        assert case["dtype"] == "float32" and case["results"]["compact numpy"]["forward_ms"] > 0
    assert "glibc told to keep it" in report["allocation"]
    assert (tmp_path / "bench.svg").read_text().startswith("<svg")


@pytest.mark.parametrize("shape", [(64, 8), (4, 3, 5, 6)])
def test_the_bench_baselines_compute_batch_norm(shape):
    """The hand-written NumPy the bench times symbn against computes what the generated kernels do
    (float64; they are checked against PyTorch and finite differences elsewhere)."""
    import numpy as np

    from symbn import load
    from symbn.bench import _compact_backward, _compact_forward, _staged_backward

    rng = np.random.default_rng(3)
    x, dy = rng.normal(3, 2, shape), rng.normal(size=shape)
    gamma, beta = rng.normal(1, 0.2, shape[1]), rng.normal(size=shape[1])
    y, mean, var = load("batchnorm").forward_train(x, gamma, beta)
    expected = load("batchnorm").backward_train(dy, x, gamma, mean, var)
    hand = _compact_forward(x, gamma, beta)  # saves the inverse standard deviation, as frameworks do
    for mine, theirs in zip(hand, (y, mean, 1 / np.sqrt(var + 1e-5))):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)
    for backward in (_compact_backward(dy, x, gamma, hand[1], hand[2]), _staged_backward(dy, x, gamma)):
        for mine, theirs in zip(backward, expected):
            np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-10)


def test_the_allocator_modes_of_the_bench_leave_results_alone():
    """keep_freed_memory only changes where large blocks come from, never what they hold."""
    import numpy as np

    from symbn.bench import keep_freed_memory

    for keep in (True, False, True):
        assert keep_freed_memory(keep)  # glibc here
        a = np.arange(1 << 23, dtype=np.float64)
        assert a[-1] == (1 << 23) - 1 and float(a.sum()) == (1 << 23) * ((1 << 23) - 1) / 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_order_2_document_compiles(tmp_path):
    """The article with the double backward: its staged levels, compact form and proofs."""
    tex = tmp_path / "bn2.tex"
    out = run("derive", "batchnorm", "--order", "2", "--format", "latex", "--document", "-o", str(tex))
    assert out.returncode == 0, out.stderr
    assert r"\partial \ell_{2}" in tex.read_text() and "Higher order" in tex.read_text()
    compiled = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", tex.name],
                              cwd=tmp_path, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-2000:]


def test_derive_at_higher_orders():
    out = run("derive", "batchnorm", "--order", "2", "--form", "compact")
    assert out.returncode == 0, out.stderr
    assert "Level 2" in out.stdout and "∂l₂/∂x_i = " in out.stdout and "∂l₂/∂(∂l/∂y_i) = " in out.stdout
    doc = json.loads(run("derive", "rmsnorm", "--transforms", "vjp,jvp", "--format", "json").stdout)
    assert doc["order"] == 2 and doc["transforms"] == ["vjp", "jvp"] and len(doc["levels"]) == 2
    assert set(doc["compact"]) == {"dx", "dgamma", "dbeta"}
    for args, message in ((["--order", "0"], "must be a positive integer"), (["--transforms", "vjp,hvp"], "vjp or jvp"),
                          (["--order", "2", "--transforms", "vjp"], "not both"),
                          (["--format", "latex", "--document", "--mode", "eval"], "drop --mode")):
        bad = run("derive", *args)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)
