"""Finite sums over one group of m elements, for a symbolic m.

SymPy's own ``diff`` of a ``Sum`` by an ``Indexed`` element returns ``KroneckerDelta`` sums
whose ``doit()`` can crash or return ``Piecewise`` range guards (sympy#12751, #21891). Here
the two operations the engine needs are done with explicit rules instead:

* :func:`diff_element` differentiates by one element ``v[i]`` (i in 1..m): every ``v[j]``
  gives ``KroneckerDelta(j, i)`` and :func:`contract` removes the deltas from the sums.
* :func:`expand_sums` writes any expression as a combination of *atoms*
  ``Sum(monomial(x[k], dy[k], ...), (k, 1, m))`` by linearity, pulling out factors free of
  the summation index and replacing ``Sum(c, (k, 1, m))`` by ``m*c``.

Both are exact for every m, which is what makes a derivation for symbolic m a proof.
"""
from __future__ import annotations

import sympy as sp

M = sp.Symbol("m", integer=True, positive=True)
"""The number of elements in a group."""
I = sp.Symbol("i", integer=True, positive=True)
"""The free element index of per-element expressions."""
K = sp.Symbol("k", integer=True, positive=True)
"""The summation index of canonical atoms."""


def group_sum(body: sp.Expr, index: sp.Symbol) -> sp.Sum:
    """Σ_{index=1}^{m} body."""
    return sp.Sum(body, (index, 1, M))


def fresh_index() -> sp.Dummy:
    """A summation index that cannot clash with any other."""
    return sp.Dummy("k", integer=True, positive=True)


def diff_element(expr: sp.Expr, base: sp.IndexedBase, i: sp.Symbol = I) -> sp.Expr:
    """∂expr/∂base[i], with ``base[j]`` for other symbols j and sums over the group handled exactly."""
    if not expr.has(base):
        return sp.S.Zero
    if isinstance(expr, sp.Indexed) and expr.base == base:
        return sp.KroneckerDelta(expr.indices[0], i)
    if isinstance(expr, sp.Sum):
        (k, lo, hi), = expr.limits
        return contract(diff_element(expr.function, base, i), k, lo, hi)
    opaque = _opaque_parts(expr, base)
    # stand-ins keep the parts' realness: d|x|/dx is sign(x) only for a real x
    stand_ins = {part: sp.Dummy(real=True) if part.is_real else sp.Dummy() for part in opaque}
    flat = expr.xreplace(stand_ins)
    back = {d: part for part, d in stand_ins.items()}
    return sp.Add(*(sp.diff(flat, d).xreplace(back) * diff_element(part, base, i) for part, d in stand_ins.items()))


def _opaque_parts(expr: sp.Expr, base: sp.IndexedBase) -> set[sp.Expr]:
    """The outermost sums and ``base[j]`` elements inside ``expr``: the chain rule goes through these."""
    if isinstance(expr, sp.Sum) or (isinstance(expr, sp.Indexed) and expr.base == base):
        return {expr} if expr.has(base) else set()
    return set().union(*(_opaque_parts(arg, base) for arg in expr.args)) if expr.args else set()


def contract(body: sp.Expr, k: sp.Symbol, lo: sp.Expr, hi: sp.Expr) -> sp.Expr:
    """Σ_{k=lo}^{hi} body, where each term holding ``KroneckerDelta(k, j)`` collapses to its value at k = j.

    Valid when every such j lies in lo..hi, as the element index i does.
    """
    collapsed, kept = [], []
    for term in sp.Add.make_args(sp.expand(body)):
        deltas = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.KroneckerDelta) and k in f.free_symbols]
        if not deltas:
            outside = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.KroneckerDelta)]
            if outside:  # a delta of other indices leaves the sum, so that an enclosing sum can contract it
                collapsed.append(sp.Mul(*outside) * sp.Sum(term / sp.Mul(*outside), (k, lo, hi)))
            else:
                kept.append(term)
            continue
        delta = deltas[0]
        j = delta.args[1] if delta.args[0] == k else delta.args[0]
        collapsed.append((term / delta).subs(k, j))
    return sp.Add(*collapsed) + (sp.Sum(sp.Add(*kept), (k, lo, hi)) if kept else sp.S.Zero)


def evaluate_constant_sums(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every sum whose body does not vary over the group written as m·body: what
    differentiating a sum by a per-group quantity leaves behind (∂/∂μ Σ_k (x_k − μ) = Σ_k −1 = −m)."""
    return expr.replace(lambda e: isinstance(e, sp.Sum) and e.limits[0][0] not in e.function.free_symbols,
                        lambda s: (s.limits[0][2] - s.limits[0][1] + 1) * s.function)


def expand_sums(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every sum split into canonical atoms ``Sum(monomial(k), (k, 1, m))``.

    Two expressions equal for every m and every element values reduce to the same rational
    function of the atoms: this is the normal form the proofs compare in.
    """
    if isinstance(expr, sp.Sum):
        return _split_sum(expr)
    if not expr.args or not expr.has(sp.Sum):
        return expr
    return expr.func(*map(expand_sums, expr.args))


def _split_sum(total: sp.Sum) -> sp.Expr:
    (k, lo, hi), = total.limits
    body = expand_sums(total.function)
    count = hi - lo + 1
    out = []
    for term in sp.Add.make_args(sp.expand(body)):
        varying = [f for f in sp.Mul.make_args(term) if k in f.free_symbols]
        constant = sp.Mul(*(f for f in sp.Mul.make_args(term) if k not in f.free_symbols))
        if not varying:
            out.append(constant * count)
            continue
        if any(f.has(sp.Sum) for f in varying):
            raise NotImplementedError(f"sum whose body couples two summation indices: {total}")
        out.append(constant * sp.Sum(sp.Mul(*varying).xreplace({k: K}), (K, lo, hi)))
    return sp.Add(*out)

