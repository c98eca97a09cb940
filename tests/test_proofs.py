"""Each proof's outcome for every built-in in both modes, the exact residuals of the refuted
claims (checked numerically here), negative controls (the decision procedure says no, with a
counterexample), undecided claims (a spent budget, an expression the procedure cannot decide)
and the time budget."""
import contextlib
import json
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import sympy as sp

from conftest import MODES, NORMS, Batch, numeric
from symbn import Norm, derive
from symbn.prove import BUDGET, OUTCOMES, decide, prove, vanishes
from symbn.render import to_json, to_text
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
    refuted = {key for key, p in proofs.items() if p.outcome == "refuted"}
    assert refuted == EXPECTED[norm, mode]
    assert all(p.outcome == p.status == ("refuted" if key in refuted else "proven") for key, p in proofs.items())
    assert all(p.holds is (p.outcome == "proven") and p.budget_s == BUDGET for p in proofs.values())
    # every refutation rests on a counterexample: exact values at which lhs - rhs is enclosed away from 0
    assert all(proofs[key].counterexample is not None and proofs[key].residual is not None for key in refuted)
    assert (proofs.get("vanishing_term[mean<-var]") is not None) == (norm != "rmsnorm" and mode == "train")


def test_the_sigma_to_mu_term_vanishes(symbolic):
    p = symbolic["batchnorm", "train"]["vanishing_term[mean<-var]"]
    assert p.outcome == "proven" and p.residual == 0 and p.reason is None


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
    assert all(p.outcome == "proven" for p in proofs)


def test_vanishes_says_no_to_a_wrong_identity(derivations):
    d = derivations["batchnorm", "train"]
    wrong = d.compact["x"] + d.symbols["dy"][I] / M  # off by a small term
    assert not vanishes(d.inline(d.gradients["x"]) - d.inline(wrong), d.symbols["eps"])
    assert not vanishes(sp.Sum(d.symbols["x"][I], (I, 1, M)), d.symbols["eps"])
    found = decide(d.inline(d.gradients["x"]) - d.inline(wrong), d.symbols["eps"])
    assert found.outcome == "refuted" and found.counterexample is not None
    # the point is exact: the difference is -dy_i/m, so that is its value there
    point = found.counterexample
    dy = dict(point.values)["dy"]
    assert point.value == pytest.approx(float(-dy[point.i - 1] / point.m), rel=1e-12) and (point.low > 0 or point.high < 0)


def test_the_counterexample_is_a_point_where_the_claim_fails(symbolic):
    """Batch norm's Σ dl/dx_i·x̂_i = 0 is refuted at an explicit point: recomputed here in float64
    from the point's values, by the closed form ε γ Σ dy_k x̂_k / (σ²+ε)^{3/2}."""
    point = symbolic["batchnorm", "train"]["sum_dx_xhat_zero"].counterexample
    values = {name: np.array(v, dtype=float) if isinstance(v, tuple) else float(v) for name, v in point.values}
    x, dy, eps, gamma = values["x"], values["dy"], values["epsilon"], values["gamma"]
    assert len(x) == point.m == 5
    var = ((x - x.mean()) ** 2).mean()
    xhat = (x - x.mean()) / np.sqrt(var + eps)
    assert eps * gamma * (dy @ xhat) / (var + eps) ** 1.5 == pytest.approx(point.value, rel=1e-9)
    assert "counterexample: m = 5" in to_text(derive("batchnorm"), "compact", [symbolic["batchnorm", "train"]["sum_dx_xhat_zero"]])


def test_refuted_without_a_counterexample_by_the_rational_function():
    """(m - 5)·x_i vanishes at the m = 5 where the counterexample is looked for; the rational
    function left is nonzero, which refutes it for symbolic m."""
    eps = sp.Symbol("epsilon", positive=True)
    x = sp.IndexedBase("x")
    found = decide((M - 5) * x[I], eps)
    assert found.outcome == "refuted" and found.counterexample is None and "rational function" in found.reason


def test_an_expression_the_procedure_cannot_decide():
    """√(a² + 2a + 1) − (a + 1): zero for a ≥ −1, but the root's base is linear in no variable
    and a is any real, so the procedure says it does not know, and why."""
    a, eps = sp.Symbol("a"), sp.Symbol("epsilon", positive=True)
    found = decide(sp.sqrt(a**2 + 2 * a + 1) - (a + 1), eps)
    assert found.outcome == "undecided" and "linear in no variable" in found.reason and found.counterexample is None
    assert not vanishes(sp.sqrt(a**2 + 2 * a + 1) - (a + 1), eps)
    # where a variable is linear in the base, the root is eliminated and the identity proven
    assert decide(sp.sqrt(a + eps) ** 3 - (a + eps) * sp.sqrt(a + eps), eps).outcome == "proven"
    assert decide(sp.sqrt(a**2 + eps) ** 2 - a**2 - eps, eps).outcome == "proven"


def test_a_spent_budget_is_undecided_with_the_budget_in_the_output(derivations):
    d = derivations["layernorm", "train"]
    start = time.monotonic()
    proofs = prove(d, brute_force=range(2, 3), budget=0.001)
    assert time.monotonic() - start < 10
    assert {p.outcome for p in proofs} <= {"proven", "undecided"}  # nothing refuted for lack of time
    undecided = [p for p in proofs if p.outcome == "undecided"]
    assert {"paper_equals_direct[x]", "paper_equals_compact[x]", "sum_dx_xhat_zero", "brute_force[m=2]"} <= {p.key for p in undecided}
    assert all(p.budget_s == 0.001 and p.holds is None for p in undecided)
    # the direct derivative, shared by three claims, has their three budgets
    assert all(("the direct derivative was not computed: time budget of 0.003 s spent" if p.key.startswith("paper_equals_direct")
                else "time budget of 0.001 s spent") in p.reason for p in undecided)
    assert all(p.residual is None and p.counterexample is None for p in undecided)
    shown = to_text(d, "compact", proofs)
    assert "within a budget of 0.001 s of CPU time per claim" in shown and "[undecided] sum_dx_xhat_zero:" in shown
    assert "(budget 0.001 s): time budget of 0.001 s spent" in shown
    doc = json.loads(to_json(d, "compact", proofs))
    entry = next(p for p in doc["proofs"] if p["key"] == "sum_dx_xhat_zero")
    assert entry["outcome"] == entry["status"] == "undecided" and entry["budget_s"] == 0.001
    assert "time budget of 0.001 s spent" in entry["reason"] and entry["residual"] is None
    # the alarm is disarmed and the previous handler back
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGPROF) in (signal.SIG_DFL, None)


def test_the_budget_outside_the_main_thread_is_checked_between_steps(derivations):
    """No SIGPROF there: the budget is checked between the steps, so a claim still ends, undecided."""
    d = derivations["batchnorm", "train"]
    expr = d.inline(d.gradients["x"]) - d.inline(d.compact["x"])
    found = []
    worker = threading.Thread(target=lambda: found.append(decide(expr, d.symbols["eps"], budget=0.001)))
    worker.start()
    worker.join(60)
    assert found and found[0].outcome == "undecided" and "time budget of 0.001 s spent" in found[0].reason


def test_json_and_text_show_each_outcome(derivations, symbolic):
    d = derivations["rmsnorm", "train"]
    proofs = list(symbolic["rmsnorm", "train"].values())
    doc = json.loads(to_json(d, "compact", proofs))
    by_key = {p["key"]: p for p in doc["proofs"]}
    assert {p["outcome"] for p in doc["proofs"]} <= set(OUTCOMES)
    assert by_key["sum_dx_zero"]["outcome"] == "refuted" and by_key["sum_dx_zero"]["counterexample"]["m"] == 5
    assert by_key["paper_equals_direct[x]"]["outcome"] == "proven" and by_key["paper_equals_direct[x]"]["reason"] is None
    assert all(p["budget_s"] == BUDGET for p in doc["proofs"])
    shown = to_text(d, "compact", proofs)
    assert f"within a budget of {BUDGET:g} s of CPU time per claim" in shown and "[refuted] sum_dx_zero:" in shown


def test_three_statistics_finish_within_their_budget():
    """Mean, variance and fourth central moment: the residual of Σ dl/dx_i·x̂_i = 0 took minutes to
    simplify before budgets. Every claim now ends within its budget, the refuted ones on their
    counterexample, with the residual where it was cheap and a note where it was not."""
    three = Norm("three", stats={"mean": "x", "var": "(x - mean)**2", "m4": "(x - mean)**4"},
                 normalized="(x - mean) / (var + m4 + eps)**(1/2)", affine="group", layout=CHANNEL)
    d = derive(three)
    start = time.process_time()
    proofs = {p.key: p for p in prove(d, brute_force=range(2, 3), budget=3)}
    assert time.process_time() - start < 30
    assert all(p.budget_s == 3 and p.seconds < 3.5 for p in proofs.values())
    assert all(proofs[key].outcome == "proven" for key in [*ALWAYS, "sum_dx_zero", "brute_force[m=2]"])
    assert proofs["vanishing_term[mean<-m4]"].outcome == "refuted"
    for key in ("sum_dx_xhat_zero", "sum_dx_xhat_zero_eps0"):
        p = proofs[key]
        assert p.outcome == "refuted" and p.counterexample is not None and p.counterexample.m == 5
        assert p.residual is not None or p.residual_note == "not simplified: the budget of 3 s was spent"
    shown = to_text(d, "compact", list(proofs.values()))
    assert "within a budget of 3 s of CPU time per claim" in shown and "counterexample: m = 5" in shown


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
    assert _brute_force(d, 3).outcome == "proven"
    bad = corrupted(d)
    caught = _brute_force(bad, 3)
    assert caught.outcome == "refuted" and caught.counterexample is not None and caught.counterexample.m == 3
    assert "at element" in caught.reason
    assert next(p for p in _against_direct(bad) if p.key == "paper_equals_direct[x]").outcome == "refuted"


def test_order_2_proofs_catch_a_corrupted_double_backward():
    from symbn.prove import _against_direct, _brute_force
    d = derive("batchnorm", order=2)
    bad = corrupted(d, "mean", keep=3)  # one path into the mean's second-order adjoint dropped
    assert _brute_force(bad, 2).outcome == "refuted"
    assert next(p for p in _against_direct(bad) if p.key == "paper_equals_direct[x]").outcome == "refuted"


def test_a_spec_the_engine_never_saw():
    """A researcher's norm in three lines: the engine derives and proves it like the built-ins."""
    quartic = Norm("quartic", stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)",
                   affine="group", layout=CHANNEL)
    d = derive(quartic)
    proofs = {p.key: p for p in prove(d, brute_force=range(1, 4))}
    assert all(proofs[key].outcome == "proven" for key in ALWAYS)
    assert all(proofs[f"brute_force[m={n}]"].outcome == "proven" for n in (1, 2, 3))
    assert proofs["sum_dx_zero"].outcome == "proven"
    assert proofs["vanishing_term[mean<-m4]"].outcome == "refuted"  # d m4/d mean = -4 Σ (x - mean)^3 / m ≠ 0
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


def test_work_past_its_budget_is_out_of_time_even_when_the_alarm_is_swallowed():
    """An alarm swallowed where Python ignores exceptions (a garbage-collector callback, a bare
    except in SymPy) must not let a claim finish past its budget as if within it."""
    from symbn.prove import _Budget, _OutOfTime

    with pytest.raises(_OutOfTime), _Budget(0.01):
        end = time.process_time() + 0.1
        while time.process_time() < end:
            with contextlib.suppress(BaseException):  # what a gc callback does with the alarm
                sum(range(1000))
