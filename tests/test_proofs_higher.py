"""Proofs at orders 2 and 3, for symbolic m: the staged program against direct differentiation,
the compact form, brute force with sympy.diff at explicit m; and the findings, as data."""
import pytest

from symbn import Norm, derive
from symbn.prove import BUDGET, _brute_force, prove
from symbn.spec import CHANNEL

AGREEMENTS = ("paper_equals_direct", "paper_equals_compact")


def by_key(proofs):
    return {p.key: p for p in proofs}


@pytest.fixture(scope="module")
def double_backward():
    return by_key(prove(derive("batchnorm", order=2), brute_force=range(1, 4)))


def test_double_backward_agrees_with_every_route(double_backward):
    keys = [key for key in double_backward if key.startswith(AGREEMENTS)]
    assert {key.split("[")[1].rstrip("]") for key in keys} == {"x", "gamma", "beta", "dy"}
    assert all(double_backward[key].outcome == "proven" for key in keys)
    assert all(double_backward[f"brute_force[m={n}]"].outcome == "proven" for n in (1, 2, 3))
    # every claim decided within the default budget
    assert all(p.budget_s == BUDGET and p.outcome != "undecided" for p in double_backward.values())


def test_which_invariances_survive_at_order_2(double_backward):
    """ℓ₂ = Σ v·∂l/∂x is a function of x through a shift-invariant gradient: still no component
    along a shift. But ∂l/∂x scales as 1/σ, so ℓ₂ is not scale invariant, not even at ε = 0."""
    assert double_backward["sum_dx_zero"].outcome == "proven"
    assert double_backward["sum_dx_xhat_zero"].outcome == "refuted"
    assert double_backward["sum_dx_xhat_zero_eps0"].outcome == "refuted"
    assert double_backward["vanishing_term[mean<-var]"].outcome == "proven"
    # refuted at explicit points, with the residual the docs print
    eps0 = double_backward["sum_dx_xhat_zero_eps0"]
    assert eps0.counterexample is not None and eps0.counterexample.m == 5 and eps0.residual is not None


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_over_reverse(mode):
    """jvp(vjp(f)), the Hessian-vector product, in both modes."""
    proofs = by_key(prove(derive("layernorm", mode, transforms=("vjp", "jvp")), brute_force=range(1, 3)))
    assert all(p.outcome == "proven" for key, p in proofs.items() if key.startswith((*AGREEMENTS, "brute_force")))


@pytest.mark.slow
def test_order_3_reverse_and_forward_over_reverse():
    for transforms in (("vjp", "vjp", "vjp"), ("vjp", "vjp", "jvp")):
        d = derive("batchnorm", transforms=transforms)
        proofs = by_key(prove(d, brute_force=range(1, 3)))
        assert all(p.outcome == "proven" for key, p in proofs.items() if key.startswith((*AGREEMENTS, "brute_force"))), transforms
        assert all("induction" in p.claim for key, p in proofs.items() if key.startswith("paper_equals_direct"))


def test_a_spec_the_engine_never_saw_at_order_2():
    quartic = Norm("quartic", stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)",
                   affine="group", layout=CHANNEL)
    d = derive(quartic, order=2)
    assert all(_brute_force(d, n).outcome == "proven" for n in (1, 2))
