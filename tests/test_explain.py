"""`python -m symbn explain` and `report`: the numbers checked against computations done here."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from symbn.explain import EPS, POPULATION, LatexError, explain, to_json, to_text, write_report

try:
    import torch  # noqa: F401
    from symbn import oracles
except ImportError:  # the PyTorch rows say so; symbn's own numbers remain
    oracles = None
needs_torch = pytest.mark.skipif(oracles is None, reason="PyTorch is not installed")


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "symbn", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def explained():
    """explain() in this process, once per norm (imports and torch's first calls paid once)."""
    cache = {}

    def get(norm):
        if norm not in cache:
            cache[norm] = explain(norm)
        return cache[norm]

    return get


@pytest.fixture(scope="module")
def batchnorm(explained):
    """The numbers as ``--format json`` writes them (the command line itself: test_text_output)."""
    return json.loads(to_json(explained("batchnorm")))


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
    error = lambda a, b: np.max(np.abs(a - b)) / np.max(np.abs(b))  # noqa: E731  (symbn.oracles.relative_error's metric)
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
def test_other_norms(explained, norm):
    out = json.loads(to_json(explained(norm)))
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
    for phrase in ("x → μ_B → σ²_B → x̂ → y → l", "frozen moments", "The paper's own argument", "[proven] train",
                   "per channel over the batch", "In inference, with", "One order up", "through σ²_B", "[refuted] inference:"):
        assert phrase in out.stdout


def test_report_without_pdflatex_writes_the_tex_and_says_how_to_install(explained, tmp_path, monkeypatch):
    python_only = os.path.dirname(sys.executable)
    if shutil.which("pdflatex", path=python_only):
        pytest.skip("pdflatex sits beside python")
    monkeypatch.setenv("PATH", python_only)
    with pytest.raises(LatexError) as failed:  # the command line reports it with exit status 2
        write_report(explained("rmsnorm"), tmp_path / "r.pdf")
    assert "pdflatex not found" in str(failed.value) and "apt-get install" in str(failed.value)
    assert (tmp_path / "r.tex").read_text().startswith("% Generated by symbn")


def test_report_needs_pdf_or_tex(tmp_path):
    out = run("report", "-o", str(tmp_path / "r.docx"))
    assert out.returncode == 2 and ".pdf or .tex" in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (CI installs it)")
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_report_compiles(explained, tmp_path, norm):
    """With the higher-order section: layer norm's (PyTorch differs) and RMS norm's (PyTorch agrees)."""
    target = write_report(explained(norm), tmp_path / "report.pdf")
    assert target.stat().st_size > 20_000
    source = (tmp_path / "report.tex").read_text()
    assert "One order up: PyTorch's higher derivatives" in source and "frozen-statistics variant" in source
    # without PyTorch the report cannot tell whether native agrees, and shows the derived terms either way
    assert ("drops exactly the terms" in source) is (norm == "layernorm" or oracles is None)


# --------------------------------------------------------------------------- one order up

def test_higher_order_keys(batchnorm):
    h = batchnorm["higher_order"]
    assert set(h) >= {"order3", "nested_jvp", "torch", "op", "statistics"}
    o3, nj = h["order3"], h["nested_jvp"]
    assert o3["outputs"] == ["d3_x", "d3_gamma", "d3_beta", "d3_dy", "d3_d2_dx", "d3_d2_dgamma", "d3_d2_dbeta"]
    for block in (o3, nj):
        assert {"symbn_vs_fd", "symbn_vs_plain", "native_vs_plain", "native_agrees", "dropped"} <= set(block)
        assert set(block["symbn_vs_fd"]) == {"rel_err", "per_output"}
    assert [t["via"] for t in o3["dropped"]["terms"]] == ["var", "mean"]
    assert o3["dropped"]["other_outputs"] == {o: [] for o in o3["outputs"][1:]}
    assert nj["outputs"] == ["t2_t_y"] and nj["explanation"] == (["mean", "var"] if oracles is not None else None)


def _group(h, batch, names, element):
    """The inputs of the chained program, as the oracles take them, for a (16, 1) batch-norm group."""
    values = {"x": batch["x"], "dy": batch["dy"], "gamma": batch["gamma"], "beta": batch["beta"], **h["order3"]["inputs"]}
    shaped = {}
    for name in names:
        v = np.asarray(values[name], float)
        param = name.endswith("gamma") or name.endswith("beta")
        shaped[name] = (v.reshape(-1) if element else v.reshape(1)) if param else v.reshape(16, 1)
    return shaped


@needs_torch
def test_third_order_against_the_oracles_directly(batchnorm):
    """native − plain ops for d3_x, computed here, is minus the reported dropped terms' sum; symbn's d3 is plain ops'."""
    h = batchnorm["higher_order"]
    o3 = h["order3"]
    norm = "batchnorm"
    from symbn.spec import resolve
    spec = resolve(norm)
    plain_program = oracles.chain(oracles.forward_program(spec, "train", EPS), ("vjp",) * 3)
    inputs = _group(h, batchnorm["batch"], plain_program.inputs, element=False)
    plain = oracles.evaluate(plain_program, inputs)
    native = oracles.evaluate(oracles.chain(oracles.native_program(spec, "train", EPS), ("vjp",) * 3), inputs)
    for o in o3["outputs"]:
        assert oracles.relative_error(np.broadcast_to(o3["symbn"][o], plain[o].ravel().shape), plain[o].ravel()) < 1e-10, o
    error = (native["d3_x"] - plain["d3_x"]).ravel()
    assert np.max(np.abs(error)) > 0.1 * np.max(np.abs(plain["d3_x"]))  # PyTorch 2.13 is wrong here
    dropped = sum(np.array(t["contribution"]) for t in o3["dropped"]["terms"])
    assert oracles.relative_error(-dropped, error) < 1e-12
    assert o3["dropped"]["rel_err_minus_terms_vs_native_error"] < 1e-12
    for o in o3["outputs"][1:]:  # no terms through the statistics: native gets them right
        assert oracles.relative_error(native[o].ravel(), plain[o].ravel()) < 1e-12, o
    assert o3["native_vs_plain"]["per_output"]["d3_x"] == pytest.approx(oracles.relative_error(native["d3_x"], plain["d3_x"]), rel=1e-6)
    # against symbn's order-2 program as derived, the σ²→μ sum (zero in value) adds its frozen derivative
    a = o3["dropped"]["as_derived"]
    assert a["rel_err_minus_terms_and_vanishing_part_vs_native_error"] < 1e-12 < a["vanishing_part_norm"]


def test_third_order_against_central_differences(batchnorm):
    h = batchnorm["higher_order"]
    assert h["order3"]["symbn_vs_fd"]["rel_err"] < 1e-7 and h["nested_jvp"]["symbn_vs_fd"]["rel_err"] < 1e-7
    d = h["order3"]["dropped"]
    # the vjp of the frozen program is symbn's exact result minus the dropped terms, term by term
    exact = np.array(h["order3"]["symbn"]["d3_x"])
    np.testing.assert_allclose(np.array(d["frozen"]), exact - np.array(d["sum"]), rtol=1e-10, atol=1e-12)


@needs_torch
@pytest.mark.parametrize("norm, differs", [("layernorm", True), ("instancenorm", True), ("rmsnorm", False), ("groupnorm", False)])
def test_native_per_norm(explained, norm, differs):
    """Measured: batch, layer and instance norm drop the statistics' terms; RMS and group norm keep them."""
    h = explained(norm).numbers["higher_order"]
    o3, nj = h["order3"], h["nested_jvp"]
    assert o3["symbn_vs_plain"]["rel_err"] < 1e-10 and nj["symbn_vs_plain"]["rel_err"] < 1e-10
    assert o3["symbn_vs_fd"]["rel_err"] < 1e-7 and nj["symbn_vs_fd"]["rel_err"] < 1e-7
    assert o3["native_agrees"] is (not differs) and nj["native_agrees"] is (not differs)
    if differs:
        assert o3["dropped"]["rel_err_minus_terms_vs_native_error"] < 1e-12
        assert o3["dropped"]["rel_err_frozen_vs_native"] < 1e-12
        assert nj["explanation"] == list(h["statistics"])
        assert nj["dropped"]["rel_err_minus_parts_vs_native_error"] < 1e-12
    else:
        assert o3["native_vs_plain"]["rel_err"] < 1e-12 and o3["dropped"]["sum_norm"] > 0.1


def test_without_torch_the_pytorch_rows_say_so(explained, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    e = explain("rmsnorm", steps=2)
    h = e.numbers["higher_order"]
    assert h["torch"] is None and "not installed" in h["note"]
    assert h["order3"]["native_vs_plain"] is None and h["order3"]["symbn_vs_plain"] is None
    assert h["order3"]["symbn_vs_fd"]["rel_err"] < 1e-7 and h["nested_jvp"]["symbn_vs_fd"]["rel_err"] < 1e-7
    shown = to_text(e)
    assert "not installed" in shown and "One order up" in shown


@pytest.mark.parametrize("norm, per, inference", [
    ("batchnorm", "per channel over the batch", True), ("instancenorm", "per sample and channel", True),
    ("layernorm", "per row", False), ("rmsnorm", "per row", False), ("groupnorm", "per sample and group", False)])
def test_wording_per_norm(explained, norm, per, inference):
    e = explained(norm)
    shown = to_text(e)
    assert per in shown and e.numbers["semantics"]["inference_has_constant_statistics"] is inference
    assert "computed from the batch" not in shown
    if inference:
        assert "In inference, with" in shown and "[refuted] inference:" in shown
    else:
        assert "has no inference" in shown and "not PyTorch's inference" in shown
        assert "frozen-statistics variant" in shown and "[refuted] frozen-statistics variant:" in shown
        assert "inference mode: frozen formula" not in shown
