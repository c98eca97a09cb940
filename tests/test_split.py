"""The split of a norm's training step across processes (:mod:`symbn.split`): what each process
sums, how one exchange merges it, the backward's all-reduced sums, the refusals, and a NumPy
check of the merge and the gradient, independent of symbn's own proofs."""
import numpy as np
import pytest
import sympy as sp

from symbn.errors import SpecError
from symbn.spec import LAYOUTS, Norm
from symbn.split import COUNT, SHIFT, X, prove, split

REAL = dict(real=True)


def channel_norm(name, stats, normalized):
    """A user spec on the channel layout (statistics over the batch), affine per group."""
    return Norm(name, stats=stats, normalized=normalized, affine="group", layout=LAYOUTS["channel"])


def same(a, b):
    return sp.expand(a - b) == 0


@pytest.fixture(scope="module")
def bn():
    return split("batchnorm")


def test_batchnorm_sends_one_central_power_sum(bn):
    (partial,) = bn.partials
    assert partial.name == "S2" and same(partial.summand, (X - SHIFT) ** 2)
    assert bn.shifted and bn.values_gathered == "1 + 2C"


def test_batchnorm_merges_by_chans_update(bn):
    mean, var = bn.statistics
    assert (mean.name, var.name) == ("mean", "var")
    assert same(mean.term, SHIFT * COUNT)
    s2 = bn.partials[0].symbol
    assert same(var.term, COUNT * (SHIFT - mean.symbol) ** 2 + s2)


def test_batchnorm_backward_all_reduces_two_sums(bn):
    dy, xhat = sp.Symbol("dy", **REAL), sp.Symbol("xhat", **REAL)
    by_summand = {r.summand: r for r in bn.reductions}
    assert set(by_summand) == {dy, dy * xhat}
    assert all(r.shared for r in bn.reductions) and bn.shared == bn.reductions
    assert bn.gradients["gamma"] == by_summand[dy * xhat].symbol
    assert bn.gradients["beta"] == by_summand[dy].symbol


def test_every_batchnorm_proof_is_proven(bn):
    proofs = prove(bn)
    assert proofs and all(p.outcome == "proven" for p in proofs), [(p.key, p.outcome, p.reason) for p in proofs]
    assert {p.key for p in proofs} >= {"split:mean", "split:var", "split:dx:1,2", "split:dx:2,2"}


def test_an_rms_statistic_on_the_channel_layout_merges():
    s = split(channel_norm("chanrms", {"ms": "x**2"}, "x / sqrt(ms + eps)"))
    (merged,) = s.statistics
    assert merged.name == "ms"
    proofs = prove(s, sizes=())
    assert [(p.key, p.outcome) for p in proofs] == [("split:ms", "proven"), ("split:dx", "proven")]


def test_a_coefficient_not_polynomial_in_x_is_summed_as_it_is():
    s = split(channel_norm("absmean", {"mu": "x", "am": "abs(x)"}, "(x - mu) / (am + eps)"))
    (partial,) = [p for p in s.partials if p.name.startswith("A")]
    assert partial.name == "A0" and partial.summand == sp.Abs(X)
    assert dict((m.name, m.term) for m in s.statistics)["am"] == partial.symbol
    proofs = prove(s, sizes=())
    assert proofs and all(p.outcome == "proven" for p in proofs), [(p.key, p.outcome) for p in proofs]


def test_a_statistic_not_polynomial_in_earlier_ones_is_refused_saying_why():
    with pytest.raises(SpecError) as err:
        split(channel_norm("absdev", {"mu": "x", "d": "abs(x - mu)"}, "(x - mu) / (d + eps)"))
    message = str(err.value)
    assert "statistic d" in message and "not a polynomial in the earlier statistics" in message
    assert "one exchange" in message


def test_a_per_row_norm_has_nothing_to_synchronize():
    with pytest.raises(SpecError, match="nothing to synchronize"):
        split("layernorm")


# ----------------------------------------------------------------------------- numeric, with NumPy alone

def evaluate(expr, values):
    """``expr`` at ``values`` (symbol name -> number or array), through NumPy."""
    symbols = sorted(expr.free_symbols, key=str)
    return sp.lambdify(symbols, expr, "numpy")(*(values[str(s)] for s in symbols))


def test_the_split_computes_the_whole_batchs_statistics_and_gradient(bn):
    """A batch of 7 split 3, 0, 4 (a process with no members: count, shift and partials 0):
    the merge gives NumPy's mean and variance of the whole batch, and ∂l/∂x from the all-reduced
    sums matches central differences of the whole batch's forward."""
    rng = np.random.default_rng(7)
    x, dy = rng.normal(2.0, 3.0, 7), rng.normal(size=7)
    gamma, beta, eps = 1.3, -0.4, 1e-5
    pieces = np.split(np.arange(7), [3, 3])
    assert [len(p) for p in pieces] == [3, 0, 4]

    # forward: each process's numbers, then one exchange
    sent = []
    for members in pieces:
        shift = x[members].mean() if len(members) else 0.0
        numbers = {str(COUNT): len(members), str(SHIFT): shift}
        numbers |= {p.name: evaluate(p.summand, {"x": x[members], str(SHIFT): shift}).sum() if len(members) else 0.0
                    for p in bn.partials}
        sent.append(numbers)
    m = sum(numbers[str(COUNT)] for numbers in sent)
    stats = {}
    for merged in bn.statistics:
        stats[str(merged.symbol)] = sum(float(evaluate(merged.term, {**numbers, **stats})) for numbers in sent) / m
    assert m == 7
    assert abs(stats["mean"] - x.mean()) < 1e-12 and abs(stats["var"] - x.var()) < 1e-12

    # backward: each process sums its members, one all-reduce adds them, then ∂l/∂x per member
    group = {**stats, "epsilon": eps, "gamma": gamma, "beta": beta, "m": m}
    xhat = evaluate(bn.elements["xhat"], {**group, "x": x})
    totals = {}
    for r in bn.shared:
        totals[r.name] = sum(float(np.sum(np.broadcast_to(evaluate(r.summand, {"dy": dy[p], "xhat": xhat[p]}), len(p))))
                             for p in pieces)
    dx = evaluate(bn.gradients["x"], {**group, **totals, "x": x, "dy": dy, "xhat": xhat})

    def loss(v):
        return np.sum(dy * (gamma * (v - v.mean()) / np.sqrt(v.var() + eps) + beta))

    h, numeric = 1e-6, np.empty(7)
    for i in range(7):
        e = np.zeros(7)
        e[i] = h
        numeric[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-7)
