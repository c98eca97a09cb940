"""The algebra of sums for symbolic m, checked against SymPy's own expansion at explicit m."""
import pytest
import sympy as sp

from symbn.sums import I, K, M, diff_element, expand_sums

x, dy = sp.IndexedBase("x"), sp.IndexedBase("dy")
j = sp.Symbol("j", integer=True, positive=True)
a = sp.Symbol("a")


def explicit(expr, n):
    """expr at m = n with sums written out and x[1..n] as plain symbols."""
    xs, dys = sp.symbols(f"x1:{n + 1}"), sp.symbols(f"dy1:{n + 1}")
    table = {x[t + 1]: xs[t] for t in range(n)} | {dy[t + 1]: dys[t] for t in range(n)}
    return expr.subs(M, n).doit().xreplace(table), xs


CASES = [
    sp.Sum(x[K] ** 2, (K, 1, M)) / M,
    sp.Sum((x[K] - sp.Sum(x[j], (j, 1, M)) / M) ** 2, (K, 1, M)),
    sp.sqrt(sp.Sum(x[K] ** 2, (K, 1, M)) + a) * x[I],
    sp.Sum(dy[K] * x[K] / sp.sqrt(sp.Sum(x[j] ** 2, (j, 1, M)) + a), (K, 1, M)),
]


@pytest.mark.parametrize("expr", CASES)
@pytest.mark.parametrize("n", [1, 3])
def test_diff_element_matches_explicit_differentiation(expr, n):
    derivative = diff_element(expr, x, I)
    for element in range(1, n + 1):
        mine, xs = explicit(derivative.xreplace({I: element}), n)
        theirs, _ = explicit(expr.xreplace({I: element}), n)
        assert sp.simplify(mine - sp.diff(theirs, xs[element - 1])) == 0


@pytest.mark.parametrize("expr", CASES[:2] + [sp.Sum(a * x[K] * dy[K] + 1, (K, 1, M))])
def test_expand_sums_is_an_identity(expr):
    canonical = expand_sums(expr)
    assert all(s.limits[0][0] == K for s in canonical.atoms(sp.Sum))
    for n in (1, 4):
        assert sp.expand(explicit(canonical, n)[0] - explicit(expr, n)[0]) == 0


def test_constants_leave_sums():
    assert expand_sums(sp.Sum(a * x[K] + 2, (K, 1, M))) == a * sp.Sum(x[K], (K, 1, M)) + 2 * M
