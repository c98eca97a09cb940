"""`python -m symbn explain` and `report`: the numbers checked against computations done here."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from symbn.explain import EPS, POPULATION


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "symbn", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def batchnorm():
    out = run("explain", "batchnorm", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_stable_keys(batchnorm):
    for key in ("rel_err_full_vs_fd", "rel_err_frozen_vs_fd", "rel_err_eval_frozen_vs_fd", "paths", "bias_drift"):
        assert key in batchnorm
    assert [p["via"] for p in batchnorm["paths"]] == ["xhat", "var", "mean"]
    assert {"name", "term", "contribution"} <= set(batchnorm["paths"][0])
    for variant in ("true", "frozen"):
        assert set(batchnorm["bias_drift"][variant]) == {"bias_norm", "scale_norm", "loss"}


def test_numbers_against_an_independent_computation(batchnorm):
    """The test's own forward pass, finite differences and frozen-moment formula on the same batch."""
    b = batchnorm["batch"]
    x, dy, gamma, beta = (np.array(b[k]) for k in ("x", "dy", "gamma", "beta"))

    def loss(v, mean=None, var=None):
        mean = v.mean() if mean is None else mean
        var = ((v - v.mean()) ** 2).mean() if var is None else var
        return dy @ (gamma * (v - mean) / np.sqrt(var + EPS) + beta)

    def fd(f):
        h, grad = 1e-6, np.empty_like(x)
        for j in range(x.size):
            e = np.zeros_like(x)
            e[j] = h
            grad[j] = (f(x + e) - f(x - e)) / (2 * h)
        return grad

    truth = fd(loss)
    full, frozen = np.array(batchnorm["gradients"]["full"]), np.array(batchnorm["gradients"]["frozen"])
    error = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert error(full, truth) < 1e-7 and batchnorm["rel_err_full_vs_fd"] < 1e-7
    np.testing.assert_allclose(frozen, gamma * dy / np.sqrt(x.var() + EPS), rtol=1e-12)
    assert error(frozen, truth) > 0.05 and batchnorm["rel_err_frozen_vs_fd"] == pytest.approx(error(frozen, truth), rel=1e-3)
    # inference: the frozen formula with population statistics is the true gradient of the inference forward
    population = fd(lambda v: loss(v, POPULATION["mean"], POPULATION["var"]))
    np.testing.assert_allclose(batchnorm["eval"]["frozen"], gamma * dy / np.sqrt(POPULATION["var"] + EPS), rtol=1e-12)
    assert error(np.array(batchnorm["eval"]["frozen"]), population) < 1e-7 and batchnorm["rel_err_eval_frozen_vs_fd"] < 1e-7


def test_paths_add_up(batchnorm):
    paths = {p["via"]: np.array(p["contribution"]) for p in batchnorm["paths"]}
    full = np.array(batchnorm["gradients"]["full"])
    np.testing.assert_allclose(sum(paths.values()), full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(paths["xhat"], batchnorm["gradients"]["frozen"], rtol=1e-10)
    assert sum(p["share"] for p in batchnorm["paths"] if p["share"] is not None) == pytest.approx(1.0)
    routes = batchnorm["graph"]["routes"]
    assert ["x", "xhat", "y", "l"] in routes and ["x", "mean", "var", "xhat", "y", "l"] in routes


def test_findings(batchnorm):
    status = {(f["mode"], f["key"]): f["status"] for f in batchnorm["findings"]}
    assert status["train", "vanishing_term[mean<-var]"] == "proven"
    assert status["train", "sum_dx_zero"] == "proven" and status["eval", "sum_dx_zero"] == "refuted"


def test_bias_drifts_only_under_the_frozen_gradient(batchnorm):
    drift = batchnorm["bias_drift"]
    true, frozen = drift["true"], drift["frozen"]
    assert max(true["bias_norm"]) < 1e-12
    assert frozen["bias_norm"][-1] > 0.1 and np.all(np.diff(frozen["bias_norm"]) >= -1e-12)  # grows steadily
    assert max(abs(s - true["scale_norm"][0]) for s in true["scale_norm"]) < 1e-3 * true["scale_norm"][0]
    assert abs(frozen["scale_norm"][-1] - frozen["scale_norm"][0]) > 0.1
    np.testing.assert_allclose(true["loss"], frozen["loss"], rtol=2e-3)  # the loss cannot see the drift
    assert true["loss"][-1] < true["loss"][0]


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "instancenorm", "groupnorm"])
def test_other_norms(norm):
    out = json.loads(run("explain", norm, "--format", "json").stdout)
    assert out["rel_err_full_vs_fd"] < 1e-7 and out["rel_err_eval_frozen_vs_fd"] < 1e-7
    assert out["rel_err_frozen_vs_fd"] > 0.01
    drift = out["bias_drift"]
    if norm == "rmsnorm":  # no mean: a bias before RMS norm is not cancelled, so the true gradient moves it (and a) too
        assert [p["via"] for p in out["paths"]] == ["xhat", "ms"]
        assert max(drift["true"]["bias_norm"]) > 1e-3
    else:
        assert max(drift["true"]["bias_norm"]) < 1e-12 < drift["frozen"]["bias_norm"][-1]
        assert abs(drift["frozen"]["scale_norm"][-1] - drift["frozen"]["scale_norm"][0]) > 0.05
        assert abs(drift["true"]["scale_norm"][-1] - drift["true"]["scale_norm"][0]) < 1e-3


def test_text_output():
    out = run("explain")
    assert out.returncode == 0
    for phrase in ("x → μ_B → σ²_B → x̂ → y → l", "frozen moments", "The paper's own argument", "[proven] train"):
        assert phrase in out.stdout


def test_report_without_pdflatex_writes_the_tex_and_says_how_to_install(tmp_path):
    python_only = os.path.dirname(sys.executable)
    out = run("report", "rmsnorm", "-o", str(tmp_path / "r.pdf"), env={**os.environ, "PATH": python_only})
    if shutil.which("pdflatex", path=python_only):
        pytest.skip("pdflatex sits beside python")
    assert out.returncode == 2 and "pdflatex not found" in out.stderr and "apt-get install" in out.stderr
    assert (tmp_path / "r.tex").read_text().startswith("% Generated by symbn")


def test_report_needs_pdf_or_tex(tmp_path):
    out = run("report", "-o", str(tmp_path / "r.docx"))
    assert out.returncode == 2 and ".pdf or .tex" in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (CI installs it)")
def test_report_compiles(tmp_path):
    out = run("report", "layernorm", "-o", str(tmp_path / "report.pdf"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "report.pdf").stat().st_size > 20_000
