"""The engine's staged adjoints are the paper's six expressions, term by term (Ioffe & Szegedy
2015, page 4, typed here from the paper), and the compact form is the frameworks' one."""
import shutil
import subprocess

import numpy as np
import pytest
import sympy as sp
from conftest import Batch, numeric, staged

from symbn import SpecError, derive
from symbn.prove import vanishes
from symbn.sums import I, M


def paper_terms(d):
    """The paper's page-4 expressions, per path, in the derivation's symbols."""
    s, a = d.symbols, d.adjoints
    x, dy, xhat, mu, var, eps, gamma = s["x"], s["dy"], s["xhat"], s["mean"], s["var"], s["eps"], s["gamma"]
    k = sp.Symbol("j", integer=True, positive=True)
    total = lambda body: sp.Sum(body, (k, 1, M))  # noqa: E731
    return {
        "xhat": [dy[I] * gamma],
        "var": [total(a["xhat"][k] * (x[k] - mu) * sp.Rational(-1, 2) * (var + eps) ** sp.Rational(-3, 2))],
        "mean": [total(a["xhat"][k] * -1 / sp.sqrt(var + eps)), a["var"] * total(-2 * (x[k] - mu)) / M],
        "x": [a["xhat"][I] / sp.sqrt(var + eps), a["var"] * 2 * (x[I] - mu) / M, a["mean"] / M],
        "gamma": [total(dy[k] * xhat[k])],
        "beta": [total(dy[k])],
    }


def test_batchnorm_train_is_the_paper_term_by_term(derivations):
    d = derivations["batchnorm", "train"]
    expected = paper_terms(d)
    assert list(d.gradients) == list(expected)
    for name, terms in expected.items():
        assert len(d.terms[name]) == len(terms), name
        for mine, theirs in zip(d.terms[name], terms):
            assert vanishes(mine.expr - theirs, d.symbols["eps"]), (name, mine.via)
            # and numerically, at m = 4, by plain substitution
            env = Batch("batchnorm", "train", n=4).environment(d)
            env.update({d.adjoints["xhat"][j]: 0.3 * j - 0.5 for j in range(1, 5)})
            env.update({d.adjoints["var"]: 0.7, d.adjoints["mean"]: -1.1})
            np.testing.assert_allclose(numeric(d, mine.expr, env, 4), numeric(d, theirs, env, 4), rtol=1e-12)


def test_paths_to_x(derivations):
    assert [t.via for t in derivations["batchnorm", "train"].terms["x"]] == ["xhat", "var", "mean"]
    assert [t.via for t in derivations["rmsnorm", "train"].terms["x"]] == ["xhat", "ms"]
    assert [t.via for t in derivations["batchnorm", "eval"].terms["x"]] == ["xhat"]


def test_compact_form_is_the_frameworks(derivations):
    d = derivations["batchnorm", "train"]
    s = d.symbols
    k = sp.Symbol("j", integer=True, positive=True)
    dy, xhat = s["dy"], s["xhat"]
    framework = s["gamma"] / (M * sp.sqrt(s["var"] + s["eps"])) * (
        M * dy[I] - sp.Sum(dy[k], (k, 1, M)) - xhat[I] * sp.Sum(dy[k] * xhat[k], (k, 1, M)))
    assert vanishes(d.inline(d.compact["x"] - framework), s["eps"])
    batch = Batch("batchnorm", "train", n=6)
    env = batch.environment(d)
    np.testing.assert_allclose(numeric(d, d.compact["x"], env, 6), numeric(d, framework, env, 6), rtol=1e-12)


def test_inference_gradient_is_gamma_dy_over_sigma(derivations):
    d = derivations["batchnorm", "eval"]
    s = d.symbols
    assert sp.simplify(d.compact["x"] - s["gamma"] * s["dy"][I] / sp.sqrt(s["var"] + s["eps"])) == 0
    assert "mean" not in d.gradients and "var" not in d.gradients


@pytest.mark.parametrize("norm, keys", [
    ("batchnorm", ["xhat", "var", "mean", "x", "gamma", "beta"]),
    ("layernorm", ["xhat", "var", "mean", "x", "gamma", "beta"]),
    ("rmsnorm", ["xhat", "ms", "x", "gamma", "beta"]),
])
def test_gradient_keys_and_symbols(derivations, norm, keys):
    d = derivations[norm, "train"]
    assert list(d.gradients) == keys
    assert set(d.compact) == {"x", "gamma", "beta"}
    for role in ("x", "dy", "i", "m", "eps", "gamma", "beta", "xhat"):
        assert role in d.symbols
    assert isinstance(d.symbols["x"], sp.IndexedBase) and isinstance(d.symbols["dy"], sp.IndexedBase)
    assert [s.name for s in d.forward] == [*d.norm.stat_names, "xhat", "y"]
    assert ("mean" in d.symbols) == (norm != "rmsnorm")


def test_element_affine_parameters_are_per_element(derivations):
    d = derivations["layernorm", "train"]
    assert d.compact["gamma"] == d.symbols["dy"][I] * d.symbols["xhat"][I]


def test_staged_numbers_agree_between_modes_when_statistics_coincide(derivations):
    """With population statistics equal to the batch's, eval keeps only the direct path: it
    differs from training by exactly the moment paths."""
    train, inference = derivations["batchnorm", "train"], derivations["batchnorm", "eval"]
    batch = Batch("batchnorm", "train")
    direct = next(t for t in train.terms["x"] if t.via == "xhat")
    env = batch.environment(train)
    env.update({train.adjoints["xhat"][j + 1]: v for j, v in enumerate(staged(train, batch)["xhat"])})
    np.testing.assert_allclose(numeric(train, direct.expr, env, batch.n),
                               numeric(inference, inference.compact["x"], batch.environment(inference), batch.n), rtol=1e-12)


def test_unknown_norm_and_mode_are_clear_errors():
    with pytest.raises(SpecError, match="choose from: batchnorm, layernorm, rmsnorm, instancenorm, groupnorm"):
        derive("groupnorm2")
    with pytest.raises(ValueError, match="choose from: train, eval"):
        derive("batchnorm", "test")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (CI installs it)")
def test_a_derivation_renders_itself_in_jupyter(tmp_path):
    """``_repr_latex_`` is what Jupyter shows: the equations as LaTeX that compiles."""
    body = derive("layernorm", order=2)._repr_latex_()
    assert body.count(r"\begin{align*}") >= 3 and r"\mu_{\mathcal{L}}" in body
    tex = tmp_path / "repr.tex"
    tex.write_text("\\documentclass{article}\\usepackage{amsmath,amssymb}\\begin{document}\n" + body + "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", tex.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
