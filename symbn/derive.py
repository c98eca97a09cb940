"""Reverse and forward mode over programs, for a symbolic group size m.

Reverse mode (:func:`vjp`): the adjoint of a quantity is the sum, over every step that
consumes it, of that step's adjoint times its *local* partial derivative, with all other
named quantities held fixed (:func:`_term`). That is the staged form of Ioffe & Szegedy's
page 4: the six expressions fall out term by term, one term per consumer. Forward mode
(:func:`jvp`): the tangent of a step is the sum, over every quantity it reads, of the local
partial derivative times that quantity's tangent.

Both map a program to a program of the same two kinds of steps (group reductions and
element-wise maps), so they compose: vjp(vjp(f)) is the double backward, jvp(vjp(f)) a
Hessian-vector product, and no order needs code of its own. In training the statistics are
steps, functions of every x_k, at every order; in eval mode they are inputs, like ε.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import sympy as sp

from .program import ELEMENT, GROUP, Input, Program, Step, element_symbol, forward_program, group_symbol
from .simplify import compact_forms
from .spec import Norm, Notation, resolve
from .sums import I, K, M, diff_element, evaluate_constant_sums, fresh_index, group_sum

MODES = ("train", "eval")
TRANSFORMS = ("vjp", "jvp")
_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


@dataclass(frozen=True)
class Term:
    """One path's contribution to a derived quantity.

    Reverse mode: ``adjoint(via) * local``, with ``local`` the partial derivative of step
    ``via`` with respect to the quantity, all else held fixed. Forward mode: ``local *
    tangent(via)``, with ``local`` the partial derivative of the quantity with respect to
    ``via``. ``adjoint`` holds the adjoint or tangent factor; ``expr`` the whole term."""

    via: str
    adjoint: sp.Expr
    local: sp.Expr
    expr: sp.Expr


@dataclass(frozen=True)
class Level:
    """One transform: ``kind`` ("vjp" or "jvp") applied to ``source``, giving ``program``.

    ``derived`` maps each quantity of ``source`` to the name of its adjoint (vjp) or tangent
    (jvp) in ``program``; ``terms`` holds, per quantity, the per-path terms of that step, in
    the order the paper lists them (vjp: steps nearest the loss first)."""

    kind: str
    source: Program
    program: Program
    derived: Mapping[str, str]
    terms: Mapping[str, tuple[Term, ...]]


def adjoint_name(name: str, level: int) -> str:
    """``dx`` at the first level (the paper's ∂l/∂x), ``d2_dx`` at the second..."""
    return f"d{name}" if level == 1 else f"d{level}_{name}"


def tangent_name(name: str, level: int) -> str:
    """``t_x`` at the first level, ``t2_x`` at the second..."""
    return f"t_{name}" if level == 1 else f"t{level}_{name}"


def _compound(text: str) -> bool:
    """Whether a written quantity needs parentheses as an operand of ∂ or δ (∂l/∂x_i does, μ_B not)."""
    return any(c in text for c in " /·+-^")


def _literal(latex: str, element: bool) -> str:
    """LaTeX as it goes into a notation: an element's notation is a format template ({i} is the
    index), so its own braces are doubled."""
    return latex.replace("{", "{{").replace("}", "}}") if element else latex


def _adjoint_notation(written: Notation, element: bool, level: int) -> Notation:
    """∂l/∂q (level 1, the paper's), ∂l₂/∂q at level 2...; element notations stay format templates."""
    loss_text = "l" if level == 1 else f"l{str(level).translate(_SUBSCRIPTS)}"
    loss_latex = _literal(r"\ell" if level == 1 else rf"\ell_{{{level}}}", element)
    operand = f"({written.text})" if _compound(written.text) else written.text
    frac = r"\frac{{{{\partial {0}}}}}{{{{\partial {1}}}}}" if element else r"\frac{{\partial {0}}}{{\partial {1}}}"
    return Notation(f"∂{loss_text}/∂{operand}", frac.format(loss_latex, written.latex))


def _tangent_notation(written: Notation, element: bool, level: int) -> Notation:
    """δq (level 1), δ₂q at level 2...: the directional derivative of q."""
    text = "δ" if level == 1 else f"δ{str(level).translate(_SUBSCRIPTS)}"
    delta = _literal(r"\delta " if level == 1 else rf"\delta_{{{level}}} ", element)
    if _compound(written.text):
        return Notation(f"{text}({written.text})", delta + r"\left(" + written.latex + r"\right)")
    return Notation(f"{text}{written.text}", delta + written.latex)


def _new_quantity(p: Program, name: str, new_name: str, level: int, reverse: bool) -> tuple[sp.Basic, Notation]:
    q = p.quantity(name)
    symbol = element_symbol(new_name) if q.kind == ELEMENT else group_symbol(new_name)
    written = p.notation.get(p.symbol(name), Notation(name, name))
    notation = (_adjoint_notation if reverse else _tangent_notation)(written, q.kind == ELEMENT, level)
    return symbol, notation


def _differentiable(p: Program) -> set[str]:
    """The quantities that depend on a differentiable input."""
    varying = {q.name for q in p.inputs if q.differentiable}
    for step in p.steps:
        if varying & set(p.uses(step)):
            varying.add(step.name)
    return varying


def vjp(p: Program) -> Level:
    """The VJP program of ``p``: given a cotangent for each output, the adjoint of each
    differentiable input. Its steps are ``p``'s (the forward recomputed) and one adjoint step
    per quantity on a path from a differentiable input to an output."""
    level, notation, symbols = p.level + 1, dict(p.notation), {}

    def new(name: str) -> sp.Basic:
        symbols[name], notation_ = _new_quantity(p, name, adjoint_name(name, level), level, True)
        notation[symbols[name]] = notation_
        return symbols[name]

    inputs = list(p.inputs)
    for name in p.outputs:  # the cotangents: differentiable inputs of the new program
        if any(name in p.uses(s) for s in p.steps):
            raise NotImplementedError(f"output {name} is also read by another step; a VJP of such a program is not supported")
        step = p.quantity(name)
        inputs.append(Input(adjoint_name(name, level), step.kind, step.role, new(name), True))
    varying, steps, terms = _differentiable(p), list(p.steps), {}
    for q in [*reversed(p.steps), *p.inputs]:  # nearest the outputs first
        if q.name in symbols or q.name not in varying or (isinstance(q, Input) and not q.differentiable):
            continue
        users = [s for s in reversed(p.steps) if q.name in p.uses(s) and s.name in symbols]
        if not users and isinstance(q, Step):
            continue  # reaches no output
        terms[q.name] = tuple(_term(p.symbol(q.name), q.kind, user, symbols[user.name]) for user in users)
        steps.append(Step(adjoint_name(q.name, level), q.kind, q.role, new(q.name), sp.Add(*(t.expr for t in terms[q.name]))))
    outputs = tuple(adjoint_name(q.name, level) for q in p.inputs if q.differentiable)
    program = Program(tuple(inputs), tuple(steps), outputs, notation, level).live()
    derived = {name: adjoint_name(name, level) for name in (*p.outputs, *terms)}
    return Level("vjp", p, program, MappingProxyType(derived), MappingProxyType(terms))


def _term(primal: sp.Basic, kind: str, consumer: Step, adjoint: sp.Basic) -> Term:
    """adjoint(consumer) * ∂consumer/∂primal, summed over the group where a per-group
    quantity feeds a per-element step."""
    if kind == ELEMENT:
        local = diff_element(consumer.definition, primal, I)
        adj = adjoint[I] if consumer.kind == ELEMENT else adjoint
        return Term(consumer.name, adj, local, adj * local)
    local = evaluate_constant_sums(sp.diff(consumer.definition, primal))
    if consumer.kind == GROUP:
        return Term(consumer.name, adjoint, local, adjoint * local)
    each = (adjoint[I] * local).xreplace({I: K})
    varying = sp.Mul(*(f for f in sp.Mul.make_args(each) if K in f.free_symbols))
    outside = sp.Mul(*(f for f in sp.Mul.make_args(each) if K not in f.free_symbols))
    return Term(consumer.name, adjoint[K], local.xreplace({I: K}), outside * group_sum(varying, K))


def jvp(p: Program) -> Level:
    """The JVP program of ``p``: given a tangent for each differentiable input, the tangent of
    each output (the directional derivative). Its steps are ``p``'s and one tangent step per
    step that depends on a differentiable input, in ``p``'s order."""
    level, notation, symbols = p.level + 1, dict(p.notation), {}

    def new(name: str) -> sp.Basic:
        symbols[name], notation_ = _new_quantity(p, name, tangent_name(name, level), level, False)
        notation[symbols[name]] = notation_
        return symbols[name]

    inputs = list(p.inputs) + [Input(tangent_name(q.name, level), q.kind, q.role, new(q.name), True)
                               for q in p.inputs if q.differentiable]
    steps, terms = list(p.steps), {}
    for step in p.steps:
        sources = [name for name in p.uses(step) if name in symbols]
        if sources or step.name in p.outputs:  # an output that depends on no differentiable input has tangent 0
            terms[step.name] = tuple(_tangent_term(step, p.quantity(name), p.symbol(name), symbols[name]) for name in sources)
            steps.append(Step(tangent_name(step.name, level), step.kind, step.role, new(step.name),
                              sp.Add(*(t.expr for t in terms[step.name]))))
    outputs = tuple(tangent_name(name, level) for name in p.outputs)
    program = Program(tuple(inputs), tuple(steps), outputs, notation, level).live()
    derived = {name: tangent_name(name, level) for name in symbols}
    return Level("jvp", p, program, MappingProxyType(derived), MappingProxyType(terms))


def _tangent_term(step: Step, source: Input | Step, primal: sp.Basic, tangent: sp.Basic) -> Term:
    """∂step/∂source · tangent(source): the directional derivative of ``step``'s definition when
    ``source`` alone moves along its tangent. Where that does not factor (a per-element source
    inside a sum: Σ_k ∂body/∂x_k · δx_k), ``local`` is the whole term and ``adjoint`` is 1."""
    if source.kind == GROUP:
        local = evaluate_constant_sums(sp.diff(step.definition, primal))
        return Term(source.name, tangent, local, local * tangent)
    if step.kind == ELEMENT and not step.definition.has(sp.Sum):
        local = diff_element(step.definition, primal, I)
        return Term(source.name, tangent[I], local, local * tangent[I])
    t = sp.Dummy("t")
    moved = step.definition.replace(lambda e: isinstance(e, sp.Indexed) and e.base == primal,
                                    lambda e: e + t * tangent[e.indices[0]])
    expr = sp.diff(moved, t).subs(t, 0)
    return Term(source.name, sp.S.One, expr, expr)


@dataclass(frozen=True)
class Derivation:
    """Everything derived for one norm, one mode and one chain of transforms; see :func:`derive`.

    ``forward`` is the norm's forward pass; ``levels`` one :class:`Level` per transform (order 1
    in reverse mode is one vjp); ``terms``, ``adjoints`` and ``gradients`` describe the last
    level; ``compact`` holds the closed forms of the last level's outputs, keyed like ``terms``."""

    norm: Norm
    mode: str
    levels: tuple[Level, ...]
    compact: Mapping[str, sp.Expr] = field(default_factory=dict)

    def _repr_latex_(self) -> str:
        """Jupyter (MathJax) shows a derivation as its equations in the paper's notation, as SymPy
        objects render themselves: the ``align*`` blocks of ``derive --format latex``."""
        from .render import to_latex  # render reads derivations: imported on use, not at import

        return to_latex(self)

    @property
    def transforms(self) -> tuple[str, ...]:
        return tuple(level.kind for level in self.levels)

    @property
    def order(self) -> int:
        return len(self.levels)

    @property
    def program(self) -> Program:
        """The last program: every step of every level."""
        return self.levels[-1].program

    @property
    def forward(self) -> list[Step]:
        """The norm's forward steps."""
        return list(self.levels[0].source.steps)

    @property
    def terms(self) -> dict[str, list[Term]]:
        """The last level's derived quantities, each as its list of per-path terms."""
        return {name: list(terms) for name, terms in self.levels[-1].terms.items()}

    @property
    def adjoints(self) -> dict[str, sp.Basic]:
        """Quantity -> the symbol of its adjoint (or tangent) at the last level."""
        last = self.levels[-1]
        return {name: last.program.symbol(new) for name, new in last.derived.items() if name in last.terms}

    @property
    def outputs(self) -> tuple[str, ...]:
        """The quantities whose adjoints (or tangents) the last program outputs, by their own names."""
        last = self.levels[-1]
        back = {new: name for name, new in last.derived.items()}
        return tuple(back[name] for name in last.program.outputs)

    @property
    def symbols(self) -> dict[str, sp.Basic]:
        """Every quantity of every level by name, and the indices and m."""
        programs = (self.levels[0].source, *(level.program for level in self.levels))
        return {name: symbol for p in programs for name, symbol in p.symbols.items()} | {"i": I, "k": K, "m": M}

    @property
    def notation(self) -> Mapping[sp.Basic, Notation]:
        return self.program.notation

    @property
    def gradients(self) -> dict[str, sp.Expr]:
        """Paper-form derived quantities, keyed by quantity; each is the sum of its :attr:`terms`."""
        return {name: sp.Add(*(t.expr for t in terms)) for name, terms in self.terms.items()}

    @property
    def stats(self) -> tuple[str, ...]:
        return self.norm.stat_names

    def _holder(self, name: str) -> Program:
        """The program that has ``name``: the last one, else an earlier one (the forward's y)."""
        for p in (self.program, *(level.source for level in reversed(self.levels))):
            if any(q.name == name for q in (*p.inputs, *p.steps)):
                return p
        raise KeyError(name)

    def kind(self, name: str) -> str:
        """``"element"`` or ``"group"`` for a named quantity of any level."""
        return self._holder(name).quantity(name).kind

    def value(self, name: str) -> sp.Expr:
        """A named quantity of any level as it appears at element index i."""
        return self._holder(name).value(name)

    def adjoint(self, name: str) -> sp.Expr:
        """The last level's adjoint (or tangent) of ``name`` as it appears at element index i."""
        return self.program.value(self.levels[-1].derived[name])

    def inline(self, expr: sp.Expr, keep: tuple[str, ...] = ()) -> sp.Expr:
        """``expr`` with every step (of every level, the forward's too) replaced by its definition,
        until only the inputs (and the steps named in ``keep``) are left. Sums get fresh indices."""
        steps = {s.name: s for p in (self.levels[0].source, *(level.program for level in self.levels)) for s in p.steps}
        rules = [(s.target, s.definition, s.kind) for s in steps.values() if s.name not in keep]
        for _ in range(len(rules) + 1):
            new = expr
            for target, definition, kind in rules:
                new = _substitute(new, target, definition, kind)
            if new == expr:
                return expr
            expr = new
        raise RuntimeError("inlining did not terminate: the program is cyclic")


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


def transforms_for(order: int = 1, transforms: tuple[str, ...] | str | None = None) -> tuple[str, ...]:
    """The chain of transforms, innermost first: ``order`` vjps, unless ``transforms`` names them
    (a sequence, or a comma-separated string such as "vjp,jvp" for jvp(vjp(f)))."""
    if transforms is None:
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be a positive integer, got {order!r}")
        return ("vjp",) * order
    chain = tuple(t.strip() for t in transforms.split(",")) if isinstance(transforms, str) else tuple(transforms)
    unknown = [t for t in chain if t not in TRANSFORMS]
    if not chain or unknown:
        raise ValueError(f"transforms must be a non-empty sequence of {' or '.join(TRANSFORMS)}, got {transforms!r}")
    return chain


def derive(norm: str | Norm, mode: str = "train", order: int = 1, transforms: tuple[str, ...] | str | None = None) -> Derivation:
    """Derive ``norm`` (a built-in name or a :class:`Norm`) from its forward definition alone.

    ``order`` vjps by default (1: the backward pass, 2: the double backward...); ``transforms``
    names another chain, innermost first, e.g. ``("vjp", "jvp")`` for jvp(vjp(f)), the
    forward-over-reverse Hessian-vector product. Returns a :class:`Derivation` with every level's
    staged steps and per-path terms, and the compact closed forms of the last level's outputs."""
    norm = resolve(norm)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
    program = forward_program(norm, mode)
    levels = []
    for kind in transforms_for(order, transforms):
        levels.append((vjp if kind == "vjp" else jvp)(program))
        program = levels[-1].program
    derivation = Derivation(norm, mode, tuple(levels))
    return replace(derivation, compact=MappingProxyType(compact_forms(derivation)))
