"""Reverse mode over named intermediates, for a symbolic group size m.

The forward pass is a list of named :class:`Step`s (the statistics, ``xhat``, ``y``). Each
step knows its own definition; the adjoint of a quantity is the sum, over every step that
consumes it, of that step's adjoint times its *local* partial derivative, with all other
named quantities held fixed. That is the staged form of Ioffe & Szegedy's page 4: the
six expressions fall out term by term, one term per consumer.

Two modes. ``train``: the statistics are steps, functions of every x_k, so the loss reaches
x_i along one path per consumer of x. ``eval``: the statistics are population constants,
inputs like eps, and only the direct path remains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import sympy as sp

from .spec import Norm, Notation, parse, resolve
from .sums import I, K, M, diff_element, fresh_index, group_sum

if TYPE_CHECKING:
    from .prove import Proof

MODES = ("train", "eval")
GROUP, ELEMENT = "group", "element"


@dataclass(frozen=True)
class Step:
    """One named forward quantity: ``target = definition``.

    ``kind`` is ``"group"`` for one value per group (a Symbol) or ``"element"`` for one value
    per element (an IndexedBase; the definition is written at the element index i).
    """

    name: str
    kind: str
    target: sp.Basic
    definition: sp.Expr

    @property
    def value(self) -> sp.Expr:
        """The target as it appears in expressions: a Symbol, or the element at index i."""
        return self.target[I] if self.kind == ELEMENT else self.target


@dataclass(frozen=True)
class Term:
    """One path's contribution to an adjoint: ``adjoint(via) * local``, with ``local`` the
    partial derivative of step ``via`` with respect to the quantity, all else held fixed."""

    via: str
    adjoint: sp.Expr
    local: sp.Expr
    expr: sp.Expr


@dataclass
class Derivation:
    """Everything derived for one norm in one mode; see :func:`derive`."""

    norm: Norm
    mode: str
    symbols: dict[str, sp.Basic]
    forward: list[Step]
    adjoints: dict[str, sp.Basic]
    terms: dict[str, list[Term]]
    notation: dict[sp.Basic, Notation]
    compact: dict[str, sp.Expr] = field(default_factory=dict)

    @property
    def gradients(self) -> dict[str, sp.Expr]:
        """Paper-form adjoints, keyed by quantity; each is the sum of its :attr:`terms`."""
        return {name: sp.Add(*(t.expr for t in terms)) for name, terms in self.terms.items()}

    @property
    def stats(self) -> tuple[str, ...]:
        return self.norm.stat_names

    def kind(self, name: str) -> str:
        """``"element"`` or ``"group"`` for a named quantity (x, xhat, y, gamma, beta, a statistic)."""
        return ELEMENT if isinstance(self.symbols[name], sp.IndexedBase) else GROUP

    def value(self, name: str) -> sp.Expr:
        """A named quantity as it appears at element index i."""
        sym = self.symbols[name]
        return sym[I] if isinstance(sym, sp.IndexedBase) else sym

    def adjoint(self, name: str) -> sp.Expr:
        """∂l/∂name as it appears at element index i."""
        adjoint = self.adjoints[name]
        return adjoint[I] if isinstance(adjoint, sp.IndexedBase) else adjoint

    def inline(self, expr: sp.Expr, keep: tuple[str, ...] = ()) -> sp.Expr:
        """``expr`` with adjoints and forward steps replaced by their definitions, until only
        the inputs (and the steps named in ``keep``) are left. Sums get fresh indices."""
        rules = [(self.adjoints[name], self.gradients[name], self.kind(name)) for name in self.terms]
        rules += [(s.target, s.definition, s.kind) for s in self.forward if s.name not in keep]
        for _ in range(len(rules) + 1):
            new = expr
            for target, definition, kind in rules:
                new = _substitute(new, target, definition, kind)
            if new == expr:
                return expr
            expr = new
        raise RuntimeError("inlining did not terminate: the forward definition is cyclic")

    @cached_property
    def proofs(self) -> list[Proof]:
        """Every identity the engine claims, each with its status (see :mod:`symbn.prove`)."""
        from .prove import prove

        return prove(self)


def _substitute(expr: sp.Expr, target: sp.Basic, definition: sp.Expr, kind: str) -> sp.Expr:
    if kind == GROUP:
        return expr.xreplace({target: _freshen(definition)}) if expr.has(target) else expr
    return expr.replace(
        lambda e: isinstance(e, sp.Indexed) and e.base == target,
        lambda e: _freshen(definition).xreplace({I: e.indices[0]}),
    )


def _freshen(expr: sp.Expr) -> sp.Expr:
    """``expr`` with each sum's bound index renamed to a fresh one, so that it nests safely."""
    return expr.replace(
        lambda e: isinstance(e, sp.Sum),
        lambda s: sp.Sum(s.function.xreplace({s.limits[0][0]: (k := fresh_index())}), (k, *s.limits[0][1:])),
    )


def derive(norm: str | Norm, mode: str = "train") -> Derivation:
    """Derive the backward pass of ``norm`` (a built-in name or a :class:`Norm`) from its forward definition.

    Returns a :class:`Derivation` with the forward steps, the paper-form adjoints and their
    terms, and the compact closed forms. Proofs are computed on first access of ``.proofs``.
    """
    norm = resolve(norm)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
    symbols, notation = _symbols(norm, mode)
    forward = _forward(norm, mode, symbols)
    adjoints = {name: _adjoint_symbol(name, symbols[name], notation) for name in symbols if name in _differentiable(norm, mode)}
    adjoints["y"] = symbols["dy"]
    terms = _reverse(forward, symbols, adjoints, norm, mode)
    derivation = Derivation(norm, mode, symbols, forward, {k: adjoints[k] for k in terms}, terms, notation)
    from .simplify import compact_forms

    derivation.compact = compact_forms(derivation)
    return derivation


def _differentiable(norm: Norm, mode: str) -> list[str]:
    """The quantities that get an adjoint, in the order the paper lists them: steps nearest the loss first."""
    stats = list(reversed(norm.stat_names)) if mode == "train" else []
    return ["xhat", *stats, "x", "gamma", "beta"]


def _symbols(norm: Norm, mode: str) -> tuple[dict[str, sp.Basic], dict[sp.Basic, Notation]]:
    per_element = norm.affine == ELEMENT
    symbols: dict[str, sp.Basic] = {
        "x": sp.IndexedBase("x", real=True),
        "dy": sp.IndexedBase("dy", real=True),
        "i": I,
        "k": K,
        "m": M,
        "eps": sp.Symbol("epsilon", positive=True),
        "gamma": sp.IndexedBase("gamma", real=True) if per_element else sp.Symbol("gamma", real=True),
        "beta": sp.IndexedBase("beta", real=True) if per_element else sp.Symbol("beta", real=True),
    }
    notation = {
        symbols["x"]: Notation("x_{i}", "x_{{{i}}}"),
        symbols["dy"]: Notation("∂l/∂y_{i}", r"\frac{{\partial \ell}}{{\partial y_{{{i}}}}}"),
        symbols["eps"]: Notation("ε", r"\epsilon"),
        symbols["gamma"]: Notation("γ_{i}", r"\gamma_{{{i}}}") if per_element else Notation("γ", r"\gamma"),
        symbols["beta"]: Notation("β_{i}", r"\beta_{{{i}}}") if per_element else Notation("β", r"\beta"),
        M: Notation("m", "m"),
    }
    for name in norm.stat_names:
        symbols[name] = sp.Symbol(name, real=True)
        given = norm.notation.get(name, Notation(name, rf"\mathrm{{{name}}}".replace("_", r"\_")))
        if mode == "eval":
            given = Notation(given.population_text or f"{given.text} (population)", given.population_latex or given.latex)
        notation[symbols[name]] = given
    symbols["xhat"] = sp.IndexedBase("xhat", real=True)
    symbols["y"] = sp.IndexedBase("y", real=True)
    notation[symbols["xhat"]] = Notation("x̂_{i}", r"\hat{{x}}_{{{i}}}")
    notation[symbols["y"]] = Notation("y_{i}", "y_{{{i}}}")
    return symbols, notation


def _adjoint_symbol(name: str, primal: sp.Basic, notation: dict[sp.Basic, Notation]) -> sp.Basic:
    """∂l/∂name: an IndexedBase for per-element quantities, a Symbol for per-group ones."""
    written = notation[primal]
    if isinstance(primal, sp.IndexedBase):
        # Per-element notation is a format template: {i} is the index, literal braces doubled.
        adjoint = sp.IndexedBase(f"d{name}", real=True)
        latex = r"\frac{{\partial \ell}}{{\partial " + written.latex + "}}"
    else:
        adjoint = sp.Symbol(f"d{name}", real=True)
        latex = r"\frac{\partial \ell}{\partial " + written.latex + "}"
    notation[adjoint] = Notation(f"∂l/∂{written.text}", latex)
    return adjoint


def _forward(norm: Norm, mode: str, symbols: dict[str, sp.Basic]) -> list[Step]:
    """The named forward steps. In eval mode the statistics are inputs, not steps."""
    x, eps = symbols["x"], symbols["eps"]
    scalars = {"eps": eps, **{name: symbols[name] for name in norm.stat_names}}
    steps = []
    if mode == "train":
        for name, text in norm.stats:
            body = parse(text, {**scalars, "x": x[K]}, where=f"{norm.name}: statistic {name}")
            steps.append(Step(name, GROUP, symbols[name], group_sum(body, K) / M))
    xhat = parse(norm.normalized, {**scalars, "x": x[I]}, where=f"{norm.name}: normalized")
    steps.append(Step("xhat", ELEMENT, symbols["xhat"], xhat))
    scale = symbols["gamma"][I] if norm.affine == ELEMENT else symbols["gamma"]
    shift = symbols["beta"][I] if norm.affine == ELEMENT else symbols["beta"]
    steps.append(Step("y", ELEMENT, symbols["y"], scale * symbols["xhat"][I] + shift))
    return steps


def _reverse(forward: list[Step], symbols, adjoints, norm: Norm, mode: str) -> dict[str, list[Term]]:
    """The adjoint of every differentiable quantity as a list of per-consumer terms."""
    terms: dict[str, list[Term]] = {}
    for name in _differentiable(norm, mode):
        primal = symbols[name]
        kind = ELEMENT if isinstance(primal, sp.IndexedBase) else GROUP
        consumers = [s for s in reversed(forward) if s.definition.has(primal)]
        terms[name] = [_term(primal, kind, consumer, adjoints[consumer.name]) for consumer in consumers]
    return terms


def _term(primal: sp.Basic, kind: str, consumer: Step, adjoint: sp.Basic) -> Term:
    """adjoint(consumer) * ∂consumer/∂primal, summed over the group where a per-group
    quantity feeds a per-element step."""
    if kind == ELEMENT:
        local = diff_element(consumer.definition, primal, I)
        adj = adjoint[I] if consumer.kind == ELEMENT else adjoint
        return Term(consumer.name, adj, local, adj * local)
    local = sp.diff(consumer.definition, primal)
    if consumer.kind == GROUP:
        return Term(consumer.name, adjoint, local, adjoint * local)
    each = (adjoint[I] * local).xreplace({I: K})
    varying = sp.Mul(*(f for f in sp.Mul.make_args(each) if K in f.free_symbols))
    outside = sp.Mul(*(f for f in sp.Mul.make_args(each) if K not in f.free_symbols))
    return Term(consumer.name, adjoint[K], local.xreplace({I: K}), outside * group_sum(varying, K))
