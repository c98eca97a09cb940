"""Closed forms: the derived adjoints rewritten in xhat and hoisted group reductions.

The paper's staged adjoints reference each other. Inlining them and then writing every x_k
back in terms of xhat_k (inverting the normalize step) leaves an expression in x̂_i, ∂l/∂y_i
and sums over the group. The statistics' own definitions say what the sums of pure powers
of xhat are (for batch norm Σ x̂_k = 0, the reason the σ²→μ path vanishes, and
Σ x̂_k² = mσ²/(σ²+ε)); substituting them leaves only sums that involve ∂l/∂y: exactly the
reductions a kernel hoists (Σ ∂l/∂y_k and Σ ∂l/∂y_k·x̂_k for batch norm).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import sympy as sp

from .errors import SpecError
from .sums import I, M, expand_sums


class Derivation(Protocol):
    """What this stage reads of a derivation (:class:`symbn.derive.Derivation` provides it): the
    forward's steps, every symbol, the last level's paper-form quantities and outputs, and
    inlining. A protocol, so that this stage does not import the one before it."""

    forward: Sequence
    symbols: Mapping[str, sp.Basic]
    gradients: Mapping[str, sp.Expr]
    outputs: tuple[str, ...]
    stats: tuple[str, ...]

    def inline(self, expr: sp.Expr, keep: tuple[str, ...] = ()) -> sp.Expr: ...


def compact_forms(d: Derivation) -> dict[str, sp.Expr]:
    """Closed forms of ∂l/∂x_i, ∂l/∂γ and ∂l/∂β in terms of xhat and group reductions."""
    basis = XhatBasis(d)
    return {name: basis.rewrite(d.gradients[name]) for name in d.outputs}


class XhatBasis:
    """Rewrites expressions of a derivation in xhat, the statistics and group reductions."""

    def __init__(self, d: Derivation):
        self.d = d
        self.inverse = self._inverse()
        self.rules = self._xhat_sum_rules()

    def rewrite(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` inlined down to the inputs, then rewritten in xhat, the statistics and reductions."""
        in_x = self.d.inline(expr, keep=self.d.stats)
        return _tidy(expand_sums(self._to_xhat(in_x)).xreplace(self.rules), self.d.symbols["eps"])

    def _inverse(self) -> sp.Expr:
        """x as a function of xhat (at index i): the normalize step solved for x."""
        d = self.d
        step = next(s for s in d.forward if s.name == "xhat")
        t, x_i = sp.Dummy("t"), d.symbols["x"][I]
        solutions = sp.solve(sp.Eq(t, step.definition), x_i)
        if len(solutions) != 1:
            raise SpecError(f"{d.norm.name}: normalized {d.norm.normalized!r} is not invertible in x (solutions: "
                            f"{solutions}): the compact forms write x through x̂, so symbn supports only normalized "
                            "values with one x for each x̂")
        return solutions[0].xreplace({t: d.symbols["xhat"][I]})

    def _to_xhat(self, expr: sp.Expr) -> sp.Expr:
        x = self.d.symbols["x"]
        return expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base == x,
                            lambda e: self.inverse.xreplace({I: e.indices[0]}))

    def _xhat_sum_rules(self) -> dict[sp.Sum, sp.Expr]:
        """Sums of pure powers of xhat fixed by the statistics' definitions, e.g. Σ x̂_k = 0.

        Statistic s = (1/m) Σ f(x_k) gives the equation m·s = Σ f(x(x̂_k)); each equation fixes
        one new sum of xhat powers, solved for here in the order the statistics are defined.
        """
        rules: dict[sp.Sum, sp.Expr] = {}
        for step in self.d.forward:
            if step.kind != "group":
                continue
            (total,) = step.definition.atoms(sp.Sum)
            equation = expand_sums(self._to_xhat(total)).xreplace(rules) - M * step.target
            unknown = sorted(equation.atoms(sp.Sum) - set(rules), key=sp.default_sort_key)
            pure = [a for a in unknown if _only(self.d, a, "xhat")]
            if len(pure) == 1:
                rules[pure[0]] = sp.solve(equation, pure[0])[0]
        return rules


def _only(d: Derivation, total: sp.Sum, name: str) -> bool:
    return {e.base for e in total.function.atoms(sp.Indexed)} == {d.symbols[name]}


def _tidy(expr: sp.Expr, eps: sp.Symbol) -> sp.Expr:
    """One fraction, common factors pulled out, square-root arguments cancelled. Where every
    root has one base linear in ε (σ² + ε), that base is written r² first (ε = r² − σ²), so that
    σ²·a + ε·a cancels against a power of the root; then r is √(σ² + ε) again."""
    expr = expr.replace(is_root, lambda p: sp.Pow(sp.cancel(p.base), p.exp))
    bases = {p.base for p in expr.atoms(sp.Pow) if is_root(p)}
    if len(bases) == 1 and eps in (base := bases.pop()).free_symbols and sp.degree(base, eps) == 1 and expr.count(eps) > base.count(eps):
        r = sp.Dummy("r", positive=True)
        rest = sp.solve(base - r**2, eps)[0]
        in_r = expr.replace(lambda e: isinstance(e, sp.Pow) and e.base == base, lambda p: r ** (2 * p.exp)).xreplace({eps: rest})
        numerator, denominator = sp.fraction(sp.cancel(sp.expand(in_r)))
        back = {r: sp.sqrt(base)}
        return sp.factor_terms(numerator).xreplace(back) / sp.factor(denominator).xreplace(back)
    numerator, denominator = sp.fraction(sp.cancel(sp.expand(expr)))
    return sp.factor_terms(numerator) / sp.factor(denominator)


def is_root(p: sp.Basic) -> bool:
    """A power with a non-integer rational exponent, such as (var + eps)^(-3/2)."""
    return isinstance(p, sp.Pow) and p.exp.is_Rational and not p.exp.is_integer
