"""Proofs, by the engine, of every identity symbn claims.

The decision procedure (:func:`vanishes`): inline everything down to the inputs, split every
sum into power-sum atoms (exact for every m, see :mod:`symbn.sums`), treat the atoms as
independent symbols, and eliminate the square root: eps is replaced by r² − (var part) with
r > 0, so that sqrt(var + eps) = r. What is left is a rational function; the identity holds
for every m, every batch and every eps > 0 exactly when it cancels to 0.

The brute-force check writes the forward pass out with m explicit symbols (m = 1..6) and
differentiates it with plain ``sympy.diff``: it shares nothing with the engine but the spec.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .derive import ELEMENT, Derivation
from .simplify import XhatBasis, is_root
from .spec import parse
from .sums import I, K, M, diff_element, expand_sums, fresh_index, group_sum

SYMBOLIC = "symbolic m: sums split into power-sum atoms, eps = r^2 - var with r > 0, rational cancellation"
BRUTE = "explicit m: forward written out with m symbols, differentiated by sympy.diff, eps = r^2 - var, cancellation"
BRUTE_FORCE_SIZES = range(1, 7)


@dataclass(frozen=True)
class Proof:
    """One claimed identity and what the engine found.

    ``holds`` is True when the engine proved ``equation`` for the stated scope (symbolic m, or
    one explicit m); False when the two sides provably differ, with ``residual`` = lhs − rhs
    rewritten in xhat and the group reductions.
    """

    key: str
    claim: str
    equation: sp.Eq | None
    holds: bool
    residual: sp.Expr
    method: str

    @property
    def status(self) -> str:
        return "proven" if self.holds else "refuted"


def vanishes(expr: sp.Expr, eps: sp.Symbol) -> bool:
    """Whether ``expr`` (inputs, sums over the group, square roots) is identically zero."""
    e = expand_sums(expr)
    e = e.xreplace({a: sp.Dummy("S") for a in e.atoms(sp.Sum)})
    for _ in range(8):
        e = e.replace(is_root, lambda p: sp.Pow(sp.expand(p.base), p.exp))
        roots = sorted({p.base for p in e.atoms(sp.Pow) if is_root(p)}, key=sp.default_sort_key)
        if not roots:
            return sp.cancel(sp.together(e)) == 0
        base = roots[0]
        var = next((v for v in [eps, *sorted(base.free_symbols - {eps}, key=str)] if _linear_in(base, v)), None)
        if var is None:
            return sp.simplify(e) == 0
        r = sp.Dummy("r", positive=True)
        e = e.subs(var, sp.solve(base - r**2, var)[0])
    return sp.simplify(e) == 0


def _linear_in(expr: sp.Expr, v: sp.Symbol) -> bool:
    if v not in expr.free_symbols:
        return False
    coefficient = sp.expand(expr).coeff(v)
    return coefficient.is_number and coefficient != 0 and v not in sp.expand(expr - coefficient * v).free_symbols


def prove(d: Derivation, brute_force: range = BRUTE_FORCE_SIZES) -> list[Proof]:
    """All proofs for one derivation: staged vs direct, staged vs compact, vanishing terms,
    the invariance identities, and the brute-force cross-check at explicit m."""
    return [*_against_direct(d), *_against_compact(d), *findings(d), *(_brute_force(d, n) for n in brute_force)]


def findings(d: Derivation) -> list[Proof]:
    """What the engine finds beyond the two forms' agreement: vanishing terms and invariances."""
    return [*_vanishing_terms(d), *_invariances(d)]


def _proof(d: Derivation, key: str, claim: str, lhs_shown, rhs_shown, lhs, rhs, at: dict | None = None) -> Proof:
    """Prove lhs = rhs (both inlined to the inputs), optionally at a point such as eps = 0."""
    at = at or {}
    holds = vanishes((lhs - rhs).subs(at), d.symbols["eps"])
    residual = sp.S.Zero if holds else XhatBasis(d).rewrite(lhs - rhs).subs(at)
    equation = None if lhs_shown is None else sp.Eq(lhs_shown, rhs_shown, evaluate=False)
    return Proof(key, claim, equation, holds, residual, SYMBOLIC)


def _loss(d: Derivation) -> sp.Expr:
    """l = Σ_k ∂l/∂y_k · y_k with the forward fully inlined: any loss, to first order."""
    y = d.inline(next(s.definition for s in d.forward if s.name == "y"))
    return group_sum(d.symbols["dy"][K] * y.xreplace({I: K}), K)


def _direct(d: Derivation, loss: sp.Expr, name: str) -> sp.Expr:
    if d.kind(name) == ELEMENT:
        return diff_element(loss, d.symbols[name], I)
    return sp.diff(loss, d.symbols[name])


def _against_direct(d: Derivation) -> list[Proof]:
    loss = _loss(d)
    return [
        _proof(
            d, f"paper_equals_direct[{name}]",
            f"paper form of dl/d{name} equals direct differentiation of the fully expanded forward",
            None, None,
            d.inline(d.gradients[name]), _direct(d, loss, name),
        )
        for name in ("x", "gamma", "beta")
    ]


def _against_compact(d: Derivation) -> list[Proof]:
    return [
        _proof(
            d, f"paper_equals_compact[{name}]", f"paper form of dl/d{name} equals the compact form",
            d.adjoint(name), d.compact[name], d.inline(d.gradients[name]), d.inline(d.compact[name]),
        )
        for name in ("x", "gamma", "beta")
    ]


def _vanishing_terms(d: Derivation) -> list[Proof]:
    """Terms through which one statistic reaches another: the paper's σ²→μ term is zero."""
    stats = set(d.stats)
    return [
        _proof(
            d, f"vanishing_term[{name}<-{term.via}]",
            f"the term through {term.via} in dl/d{name} is identically zero",
            term.local, sp.S.Zero, d.inline(term.local), sp.S.Zero,
        )
        for name in d.terms
        if name in stats
        for term in d.terms[name]
        if term.via in stats
    ]


def _invariances(d: Derivation) -> list[Proof]:
    """Σ_i ∂l/∂x_i = 0 and Σ_i ∂l/∂x_i·x̂_i = 0: no gradient along what normalization removes.

    The second holds only as eps → 0 (with eps > 0, xhat is not exactly scale invariant), so
    it is checked both exactly and at eps = 0.
    """
    eps, i = d.symbols["eps"], fresh_index()
    dx = d.inline(d.gradients["x"])
    xhat = d.inline(d.value("xhat"))
    shown_dx, shown_xhat = d.adjoint("x"), d.value("xhat")
    sum_dx = group_sum(dx.xreplace({I: i}), i)
    sum_dx_xhat = group_sum((dx * xhat).xreplace({I: i}), i)
    return [
        _proof(d, "sum_dx_zero", "dl/dx sums to zero over the group: no component along a shift of x",
               group_sum(shown_dx, I), 0, sum_dx, 0),
        _proof(d, "sum_dx_xhat_zero", "dl/dx is orthogonal to xhat: no component along a rescaling, exactly, for eps > 0",
               group_sum(shown_dx * shown_xhat, I), 0, sum_dx_xhat, 0),
        _proof(d, "sum_dx_xhat_zero_eps0", "dl/dx is orthogonal to xhat at eps = 0",
               group_sum(shown_dx * shown_xhat, I), 0, sum_dx_xhat, 0, at={eps: 0}),
    ]


def _brute_force(d: Derivation, n: int) -> Proof:
    """At m = n: the engine's ∂l/∂x_i, ∂l/∂γ, ∂l/∂β for every i against ``sympy.diff`` of the
    forward written out element by element."""
    elements = {name: sp.symbols(f"{name}1:{n + 1}", real=True) for name in ("x", "dy", "gamma", "beta")}
    scalars = {"eps": d.symbols["eps"], **{s: d.symbols[s] for s in d.stats}}

    def element(name: str, j: int) -> sp.Expr:
        return elements[name][j] if d.kind(name) == ELEMENT else d.symbols[name]

    if d.mode == "train":
        for name, text in d.norm.stats:
            scalars[name] = sp.Add(*(parse(text, {**scalars, "x": x}) for x in elements["x"])) / n
    loss = sp.Add(*(
        elements["dy"][j] * (element("gamma", j) * parse(d.norm.normalized, {**scalars, "x": elements["x"][j]}) + element("beta", j))
        for j in range(n)
    ))
    explicit = {d.symbols[name][j + 1]: elements[name][j] for name in elements if d.kind(name) == ELEMENT for j in range(n)}
    holds = True
    for name in ("x", "gamma", "beta"):
        engine = d.inline(d.gradients[name]).subs(M, n).doit()
        for j in range(n) if d.kind(name) == ELEMENT else [0]:
            mine = engine.xreplace({I: j + 1}).doit().xreplace(explicit)
            holds &= vanishes(mine - sp.diff(loss, element(name, j)), d.symbols["eps"])
    claim = f"at m = {n}: dl/dx (every element), dl/dgamma and dl/dbeta equal sympy.diff of the forward written out"
    return Proof(f"brute_force[m={n}]", claim, None, holds, sp.S.Zero, BRUTE)
