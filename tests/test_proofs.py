"""Each proof's status for every built-in in both modes, the exact residuals of the refuted
claims (checked numerically here), and negative controls: the decision procedure says no."""
from dataclasses import replace

import numpy as np
import pytest
import sympy as sp

from conftest import MODES, NORMS, Batch, numeric
from symbn import Norm, derive
from symbn.prove import prove, vanishes
from symbn.spec import CHANNEL
from symbn.sums import I, M

ALWAYS = [f"paper_equals_{kind}[{name}]" for kind in ("direct", "compact") for name in ("x", "gamma", "beta")]
EXPECTED = {
    # (norm, mode): keys refuted; everything else proven
    ("batchnorm", "train"): {"sum_dx_xhat_zero"},
    ("layernorm", "train"): {"sum_dx_xhat_zero"},
    ("rmsnorm", "train"): {"sum_dx_zero", "sum_dx_xhat_zero"},
    **{(norm, "eval"): {"sum_dx_zero", "sum_dx_xhat_zero", "sum_dx_xhat_zero_eps0"} for norm in NORMS},
}


@pytest.fixture(scope="module")
def symbolic(derivations):
    return {key: {p.key: p for p in prove(d, brute_force=range(0))} for key, d in derivations.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", NORMS)
def test_symbolic_proofs(symbolic, norm, mode):
    proofs = symbolic[norm, mode]
    assert set(ALWAYS) <= set(proofs)
    refuted = {key for key, p in proofs.items() if not p.holds}
    assert refuted == EXPECTED[norm, mode]
    assert all(p.status == ("refuted" if key in refuted else "proven") for key, p in proofs.items())
    assert (proofs.get("vanishing_term[mean<-var]") is not None) == (norm != "rmsnorm" and mode == "train")


def test_the_sigma_to_mu_term_vanishes(symbolic):
    p = symbolic["batchnorm", "train"]["vanishing_term[mean<-var]"]
    assert p.holds and p.residual == 0


def test_orthogonality_residual_is_exact(derivations, symbolic):
    """Σ dl/dx_i·x̂_i = ε γ Σ dy_k x̂_k / (σ²+ε)^{3/2}: compared with the numbers of a test batch."""
    d = derivations["batchnorm", "train"]
    residual = symbolic["batchnorm", "train"]["sum_dx_xhat_zero"].residual
    batch = Batch("batchnorm", "train", n=6)
    oracle_dx = batch.oracle()["x"]
    measured = float(oracle_dx @ batch.xhat)
    expected = 0.1 * batch.gamma * float(batch.dy @ batch.xhat) / (batch.stats["var"] + 0.1) ** 1.5
    assert measured == pytest.approx(expected, rel=1e-5)
    assert numeric(d, residual, batch.environment(d), 6)[0] == pytest.approx(expected, rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", NORMS)
def test_brute_force_m_1_to_6(derivations, norm, mode):
    proofs = [p for p in prove(derivations[norm, mode]) if p.key.startswith("brute_force")]
    assert [p.key for p in proofs] == [f"brute_force[m={n}]" for n in range(1, 7)]
    assert all(p.holds for p in proofs)


def test_vanishes_says_no_to_a_wrong_identity(derivations):
    d = derivations["batchnorm", "train"]
    wrong = d.compact["x"] + d.symbols["dy"][I] / M  # off by a small term
    assert not vanishes(d.inline(d.gradients["x"]) - d.inline(wrong), d.symbols["eps"])
    assert not vanishes(sp.Sum(d.symbols["x"][I], (I, 1, M)), d.symbols["eps"])


def corrupted(d, name="x", keep=2):
    """``d`` with the step of name's adjoint missing its last paths (batch norm: the one through the mean)."""
    level = d.levels[-1]
    target = level.derived[name]
    steps = tuple(replace(s, definition=sp.Add(*(t.expr for t in level.terms[name][:keep]))) if s.name == target else s
                  for s in level.program.steps)
    return replace(d, levels=(*d.levels[:-1], replace(level, program=replace(level.program, steps=steps))))


def test_brute_force_and_direct_catch_a_corrupted_derivation():
    from symbn.prove import _against_direct, _brute_force
    d = derive("batchnorm")
    assert _brute_force(d, 3).holds
    bad = corrupted(d)
    assert not _brute_force(bad, 3).holds
    assert not next(p for p in _against_direct(bad) if p.key == "paper_equals_direct[x]").holds


def test_order_2_proofs_catch_a_corrupted_double_backward():
    from symbn.prove import _against_direct, _brute_force
    d = derive("batchnorm", order=2)
    bad = corrupted(d, "mean", keep=3)  # one path into the mean's second-order adjoint dropped
    assert not _brute_force(bad, 2).holds
    assert not next(p for p in _against_direct(bad) if p.key == "paper_equals_direct[x]").holds


def test_a_spec_the_engine_never_saw():
    """A researcher's norm in three lines: the engine derives and proves it like the built-ins."""
    quartic = Norm("quartic", stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)",
                   affine="group", layout=CHANNEL)
    d = derive(quartic)
    proofs = {p.key: p for p in prove(d, brute_force=range(1, 4))}
    assert all(proofs[key].holds for key in ALWAYS)
    assert all(proofs[f"brute_force[m={n}]"].holds for n in (1, 2, 3))
    assert proofs["sum_dx_zero"].holds
    assert not proofs["vanishing_term[mean<-m4]"].holds  # d m4/d mean = -4 Σ (x - mean)^3 / m ≠ 0
    # and numerically, against finite differences of a forward written here
    rng = np.random.default_rng(3)
    x, dy, eps, gamma, beta = rng.normal(size=5), rng.normal(size=5), 0.1, 1.2, 0.3

    def loss(v):
        c = v - v.mean()
        return dy @ (gamma * c / ((c**4).mean() + eps) ** 0.25 + beta)

    from conftest import finite_difference
    s = d.symbols
    c = x - x.mean()
    env = {s["eps"]: eps, s["gamma"]: gamma, s["mean"]: x.mean(), s["m4"]: (c**4).mean(), M: 5}
    env.update({s["x"][j + 1]: x[j] for j in range(5)})
    env.update({s["dy"][j + 1]: dy[j] for j in range(5)})
    env.update({s["xhat"][j + 1]: c[j] / ((c**4).mean() + eps) ** 0.25 for j in range(5)})
    np.testing.assert_allclose(numeric(d, d.compact["x"], env, 5), finite_difference(loss, x), rtol=1e-6)
