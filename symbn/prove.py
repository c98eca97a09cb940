"""Proofs, by the engine, of every identity symbn claims, at every order.

The decision procedure (:func:`vanishes`): inline everything down to the inputs, split every
sum into power-sum atoms (exact for every m, see :mod:`symbn.sums`), treat the atoms as
independent symbols, and eliminate the square root: eps is replaced by r² − (var part) with
r > 0, so that sqrt(var + eps) = r. What is left is a rational function; the identity holds
for every m, every batch and every eps > 0 exactly when it cancels to 0.

Two independent routes to the same derivatives are compared with the engine's staged ones:

* **direct** (:func:`direct_outputs`): the forward fully inlined, then differentiated as one
  expression, transform after transform (a vjp differentiates Σ cotangent·output by every
  input; a jvp takes the directional derivative): no staging, no per-path terms, no program;
* **brute force** (:func:`_brute_force`): the forward written out with m explicit symbols
  (m = 1..6 at order 1, fewer beyond), the chain of transforms done by plain ``sympy.diff`` on
  those: it shares nothing with the engine but the spec.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .derive import Derivation, derive
from .program import ELEMENT, Program
from .simplify import XhatBasis, is_root
from .spec import parse
from .sums import I, M, diff_element, expand_sums, fresh_index, group_sum

SYMBOLIC = "symbolic m: sums split into power-sum atoms, eps = r^2 - var with r > 0, rational cancellation"
BRUTE = "explicit m: forward written out with m symbols, differentiated by sympy.diff, eps = r^2 - var, cancellation"
BRUTE_FORCE_SIZES = {1: range(1, 7), 2: range(1, 5), 3: range(1, 4)}
"""Explicit sizes checked by brute force, per order (the written-out expressions grow fast)."""


@dataclass(frozen=True)
class Proof:
    """One claimed identity and what the engine found.

    ``holds`` is True when the engine proved ``equation`` for the stated scope (symbolic m, or
    one explicit m); False when the two sides provably differ, with ``residual`` = lhs − rhs
    rewritten in xhat and the group reductions (None where that was not worth computing)."""

    key: str
    claim: str
    equation: sp.Eq | None
    holds: bool
    residual: sp.Expr | None
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


def prove(d: Derivation, brute_force: range | None = None) -> list[Proof]:
    """All proofs for one derivation: staged vs direct, staged vs compact, vanishing terms, the
    invariance identities, and the brute-force cross-check at explicit m (default sizes per
    order: :data:`BRUTE_FORCE_SIZES`)."""
    sizes = BRUTE_FORCE_SIZES.get(d.order, range(1, 3)) if brute_force is None else brute_force
    return [*_against_direct(d), *_against_compact(d), *findings(d), *(_brute_force(d, n) for n in sizes)]


def findings(d: Derivation) -> list[Proof]:
    """What the engine finds beyond the forms' agreement: vanishing terms and invariances."""
    return [*_vanishing_terms(d), *_invariances(d)]


def _proof(d: Derivation, key: str, claim: str, lhs_shown, rhs_shown, lhs, rhs, at: dict | None = None,
           residual: bool = True) -> Proof:
    """Prove lhs = rhs (both inlined to the inputs), optionally at a point such as eps = 0.
    ``residual``: whether a refuted claim's difference is worth rewriting in x̂ and the
    reductions (not for two forms of a higher-order derivative, where it is costly and only says
    that the engine is wrong)."""
    at = at or {}
    holds = vanishes((lhs - rhs).subs(at), d.symbols["eps"])
    residual = sp.S.Zero if holds else XhatBasis(d).rewrite(lhs - rhs).subs(at) if residual else None
    equation = None if lhs_shown is None else sp.Eq(lhs_shown, rhs_shown, evaluate=False)
    return Proof(key, claim, equation, holds, residual, SYMBOLIC)


def _inlined_outputs(d: Derivation, p: Program) -> dict[str, sp.Expr]:
    """Each output of ``p`` (a program of ``d``'s chain) written out down to the inputs."""
    return {name: d.inline(p.value(name)) for name in p.outputs}


def _contracted(p: Program, name: str, value: sp.Expr, weight: sp.Basic) -> sp.Expr:
    """⟨weight, output⟩ over one group: Σ_k weight_k·value_k per element, weight·value per group."""
    if p.quantity(name).kind != ELEMENT:
        return weight * value
    k = fresh_index()
    return group_sum((weight[I] * value).xreplace({I: k}), k)


DIRECT_FROM_FORWARD = 2
"""Up to this order, the direct route starts from the fully expanded forward. Beyond it the
expressions grow too large to cancel in minutes, so order k starts from the compact form of
order k − 1, inlined: an induction, since that form is proven equal to the staged one and the
staged one to the direct differentiation of the forward at order k − 1."""


def direct_outputs(d: Derivation) -> dict[str, sp.Expr]:
    """The last program's outputs computed without the engine's staging: the forward inlined to
    one expression per output, then each transform of the chain applied to whole expressions
    (beyond :data:`DIRECT_FROM_FORWARD`, from the level below's compact form)."""
    levels = d.levels
    if d.order <= DIRECT_FROM_FORWARD:
        first = d.levels[0].source
        values = {name: d.inline(first.value(name)) for name in first.outputs}
    else:
        below = derive(d.norm, d.mode, transforms=d.transforms[:-1])
        values = {below.levels[-1].derived[name]: below.inline(expr) for name, expr in below.compact.items()}
        levels = levels[-1:]
    for level in levels:
        source, program = level.source, level.program
        if level.kind == "vjp":
            loss = sp.Add(*(_contracted(source, name, values[name], program.symbol(level.derived[name])) for name in source.outputs))
            values = {level.derived[q.name]: _derivative(loss, q.kind, q.symbol) for q in source.inputs if q.differentiable}
        else:
            moving = [(q, program.symbol(level.derived[q.name])) for q in source.inputs if q.differentiable]
            values = {level.derived[name]: _directional(values[name], moving) for name in source.outputs}
    return values


def _derivative(expr: sp.Expr, kind: str, symbol: sp.Basic) -> sp.Expr:
    return diff_element(expr, symbol, I) if kind == ELEMENT else sp.diff(expr, symbol)


def _directional(expr: sp.Expr, moving) -> sp.Expr:
    """d/dt of ``expr`` at t = 0 with every moving input q replaced by q + t·tangent."""
    t = sp.Dummy("t")
    for q, tangent in moving:
        if q.kind == ELEMENT:
            expr = expr.replace(lambda e, base=q.symbol: isinstance(e, sp.Indexed) and e.base == base,
                                lambda e, tangent=tangent: e + t * tangent[e.indices[0]])
        else:
            expr = expr.xreplace({q.symbol: q.symbol + t * tangent})
    return sp.diff(expr, t).subs(t, 0)


def _against_direct(d: Derivation) -> list[Proof]:
    direct = direct_outputs(d)
    last = d.levels[-1]
    return [
        _proof(d, f"paper_equals_direct[{name}]",
               f"{_staged(d)} {_what(d, name)} equals direct differentiation of "
               + ("the fully expanded forward" if d.order <= DIRECT_FROM_FORWARD else "the level below's compact form (induction)"),
               None, None, d.inline(d.adjoint(name)), direct[last.derived[name]], residual=d.order == 1)
        for name in d.outputs
    ]


def _what(d: Derivation, name: str) -> str:
    """"dl/dx", or at higher orders "the adjoint of x (vjp, vjp)", "the tangent of dx (vjp, jvp)"."""
    if d.order == 1 and d.levels[0].kind == "vjp":
        return f"dl/d{name}"
    return f"the {'adjoint' if d.levels[-1].kind == 'vjp' else 'tangent'} of {name} ({', '.join(d.transforms)})"


def _staged(d: Derivation) -> str:
    return "paper form of" if d.transforms == ("vjp",) else "staged"


def _against_compact(d: Derivation) -> list[Proof]:
    return [
        _proof(d, f"paper_equals_compact[{name}]", f"{_staged(d)} {_what(d, name)} equals the compact form",
               d.adjoint(name), d.compact[name], d.inline(d.adjoint(name)), d.inline(d.compact[name]), residual=d.order == 1)
        for name in d.outputs
    ]


def _vanishing_terms(d: Derivation) -> list[Proof]:
    """Terms through which one statistic reaches another: the paper's σ²→μ term is zero (and, in
    forward mode, the tangent of σ² through μ)."""
    stats = set(d.stats)
    return [
        _proof(d, f"vanishing_term[{name}<-{term.via}]",
               f"the term through {term.via} in {_what(d, name)} is identically zero",
               term.local, sp.S.Zero, d.inline(term.local), sp.S.Zero)
        for name, terms in d.terms.items()
        if name in stats
        for term in terms
        if term.via in stats
    ]


def _invariances(d: Derivation) -> list[Proof]:
    """Σ_i ∂l/∂x_i = 0 and Σ_i ∂l/∂x_i·x̂_i = 0: no gradient along what normalization removes.

    The second holds only as eps → 0 (with eps > 0, xhat is not exactly scale invariant), so
    it is checked both exactly and at eps = 0. At every order of reverse mode, for the last
    level's adjoint of x."""
    if d.levels[-1].kind != "vjp" or "x" not in d.outputs:
        return []
    eps, i = d.symbols["eps"], fresh_index()
    dx = d.inline(d.adjoint("x"))
    xhat = d.inline(d.value("xhat"))
    shown_dx, shown_xhat = d.adjoint("x"), d.value("xhat")
    sum_dx = group_sum(dx.xreplace({I: i}), i)
    sum_dx_xhat = group_sum((dx * xhat).xreplace({I: i}), i)
    return [
        _proof(d, "sum_dx_zero", f"{_what(d, 'x')} sums to zero over the group: no component along a shift of x",
               group_sum(shown_dx, I), 0, sum_dx, 0),
        _proof(d, "sum_dx_xhat_zero", f"{_what(d, 'x')} is orthogonal to xhat: no component along a rescaling, exactly, for eps > 0",
               group_sum(shown_dx * shown_xhat, I), 0, sum_dx_xhat, 0),
        _proof(d, "sum_dx_xhat_zero_eps0", f"{_what(d, 'x')} is orthogonal to xhat at eps = 0",
               group_sum(shown_dx * shown_xhat, I), 0, sum_dx_xhat, 0, at={eps: 0}),
    ]


def _brute_force(d: Derivation, n: int) -> Proof:
    """At m = n: every output of the last program, for every element, against the chain of
    transforms done by ``sympy.diff`` on the forward written out element by element."""
    first = d.levels[0].source
    explicit: dict[sp.Basic, sp.Basic] = {}  # engine's x[j] -> x_j
    per_element: dict[str, list[sp.Symbol]] = {}

    def written(p: Program, name: str) -> list[sp.Basic]:
        """An input of ``p`` at every element (a list of n symbols), or its one group symbol (a list of one)."""
        q = p.quantity(name)
        if q.kind != ELEMENT:
            return [q.symbol]
        if name not in per_element:
            per_element[name] = list(sp.symbols(f"{name}_1:{n + 1}", real=True))
            explicit.update({q.symbol[j + 1]: s for j, s in enumerate(per_element[name])})
        return per_element[name]

    values = _explicit_forward(d, first, n, written)
    for level in d.levels:
        source, program = level.source, level.program
        if level.kind == "vjp":
            loss = sp.Add(*(sum(w * v for w, v in zip(written(program, level.derived[name]), values[name]))
                            for name in source.outputs))
            values = {level.derived[q.name]: _gradient(loss, written(source, q.name)) for q in source.inputs if q.differentiable}
        else:
            moving = [(written(source, q.name), written(program, level.derived[q.name])) for q in source.inputs if q.differentiable]
            values = {level.derived[name]: [_explicit_tangent(v, moving) for v in values[name]] for name in source.outputs}
    holds = True
    for name in d.outputs:
        output = d.levels[-1].derived[name]
        engine = d.inline(d.program.value(output)).subs(M, n)
        for j in range(n) if d.program.quantity(output).kind == ELEMENT else [0]:
            mine = engine.xreplace({I: j + 1}).doit().xreplace(explicit)
            holds &= vanishes(mine - values[output][j], d.symbols["eps"])
    claim = (f"at m = {n}: dl/dx (every element), dl/dgamma and dl/dbeta equal sympy.diff of the forward written out"
             if d.transforms == ("vjp",) and d.outputs == ("x", "gamma", "beta") else
             f"at m = {n}: every output of the last program, at every element, equals the chain {', '.join(d.transforms)} "
             "done by sympy.diff on the forward written out")
    return Proof(f"brute_force[m={n}]", claim, None, holds, sp.S.Zero, BRUTE)


def _explicit_forward(d: Derivation, first: Program, n: int, written) -> dict[str, list[sp.Expr]]:
    """The forward's outputs at each of n elements, from the spec alone."""
    norm = d.norm
    x = written(first, "x")
    scalars = {"eps": d.symbols["eps"]}
    if d.mode == "train":
        for name, text in norm.stats:
            scalars[name] = sp.Add(*(parse(text, {**scalars, "x": v}) for v in x)) / n
    else:
        scalars.update({name: first.symbol(name) for name in norm.stat_names})
    gamma, beta = written(first, "gamma"), written(first, "beta")
    return {"y": [gamma[j % len(gamma)] * parse(norm.normalized, {**scalars, "x": x[j]}) + beta[j % len(beta)] for j in range(n)]}


def _gradient(loss: sp.Expr, inputs: list[sp.Basic]) -> list[sp.Expr]:
    """∂loss/∂input at each element (a per-group input: its one derivative)."""
    return [sp.diff(loss, v) for v in inputs]


def _explicit_tangent(value: sp.Expr, moving) -> sp.Expr:
    """d/dt of ``value`` at t = 0 with every moving input replaced by input + t·tangent."""
    t = sp.Dummy("t")
    table = {p: p + t * v for primal, tangent in moving for p, v in zip(primal, tangent)}
    return sp.diff(value.xreplace(table), t).subs(t, 0)

