"""Programs: what the engine differentiates, and what the lowering turns into kernels.

A program computes, for one group of m elements (m a symbol), named *steps* from named
*inputs*. Every quantity is one of two kinds:

* ``element``: one value per element of the group: an ``IndexedBase`` whose definition is
  written at the element index ``i`` (x, x̂, y, ∂l/∂x...);
* ``group``: one value for the whole group: a ``Symbol`` whose definition may hold sums
  over the group (μ, σ², ∂l/∂σ²...).

A group step is therefore a *group reduction* (sums over the group of element expressions,
combined with other group values) and an element step an *element-wise map*: the two things
a normalization, its backward and every derivative of that backward are made of. That is what
makes the representation closed under differentiation (:mod:`symbn.derive` maps a program to
its VJP or JVP program, which is again a program).

An input's *role* says how the layout maps it onto a tensor: ``data`` values belong to their
group (x, dy, saved statistics), ``param`` values are indexed by the parameter position and
shared by every group the layout maps onto it (γ, β, running statistics: the gradient of a
param sums over those groups), a ``scalar`` is one number for the whole tensor (ε).
The norm spec is one front end (:func:`forward_program`); nothing downstream depends on it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import sympy as sp

from .spec import Norm, Notation, parse
from .sums import I, K, M, group_sum

ELEMENT, GROUP = "element", "group"
DATA, PARAM, SCALAR = "data", "param", "scalar"


@dataclass(frozen=True)
class Input:
    """A quantity the program is given."""

    name: str
    kind: str              # ELEMENT or GROUP
    role: str              # DATA, PARAM or SCALAR: how the layout maps it onto a tensor
    symbol: sp.Basic       # IndexedBase (element) or Symbol (group)
    differentiable: bool   # whether transforms differentiate with respect to it (not ε, not eval's statistics)


@dataclass(frozen=True)
class Step:
    """One named quantity the program computes: ``target = definition``.

    An element step's definition is written at the element index i; a group step's may hold
    sums over the group, each over its own bound index."""

    name: str
    kind: str              # ELEMENT or GROUP
    role: str              # as for inputs: what an output of this step is, for the layout
    target: sp.Basic       # IndexedBase (element) or Symbol (group)
    definition: sp.Expr

    @property
    def value(self) -> sp.Expr:
        """The target as it appears in expressions: a Symbol, or the element at index i."""
        return self.target[I] if self.kind == ELEMENT else self.target


@dataclass(frozen=True)
class Program:
    """Inputs, steps in evaluation order, and the names of the outputs (steps).

    ``level`` counts the transforms applied since the forward pass (0: the forward itself);
    ``notation`` says how each symbol is written in the paper's notation."""

    inputs: tuple[Input, ...]
    steps: tuple[Step, ...]
    outputs: tuple[str, ...]
    notation: Mapping[sp.Basic, Notation]
    level: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "notation", MappingProxyType(dict(self.notation)))
        names = [q.name for q in (*self.inputs, *self.steps)]
        if len(set(names)) != len(names):
            raise ValueError(f"a program's quantities need distinct names: {names}")
        missing = set(self.outputs) - {s.name for s in self.steps}
        if missing:
            raise ValueError(f"outputs {sorted(missing)} are not steps of the program")

    def quantity(self, name: str) -> Input | Step:
        for q in (*self.inputs, *self.steps):
            if q.name == name:
                return q
        raise KeyError(name)

    def symbol(self, name: str) -> sp.Basic:
        q = self.quantity(name)
        return q.symbol if isinstance(q, Input) else q.target

    def value(self, name: str) -> sp.Expr:
        """A named quantity as it appears in expressions at element index i."""
        q = self.quantity(name)
        return self.symbol(name)[I] if q.kind == ELEMENT else self.symbol(name)

    @property
    def symbols(self) -> dict[str, sp.Basic]:
        """Every quantity's SymPy object by name."""
        return {q.name: self.symbol(q.name) for q in (*self.inputs, *self.steps)}

    def uses(self, step: Step) -> list[str]:
        """The quantities ``step``'s definition reads, inputs and steps alike."""
        return [q.name for q in (*self.inputs, *self.steps) if q.name != step.name and step.definition.has(self.symbol(q.name))]

    def frozen(self, names: tuple[str, ...]) -> Program:
        """The program with the steps ``names`` turned into inputs nothing differentiates: what a
        framework computes when it saves a statistic without its history (PyTorch's native batch
        norm saves mean and 1/σ that way, so its derivatives of order 3 miss their paths)."""
        steps = [s for s in self.steps if s.name in names]
        inputs = (*self.inputs, *(Input(s.name, s.kind, s.role, s.target, False) for s in steps))
        return Program(inputs, tuple(s for s in self.steps if s.name not in names), self.outputs, self.notation, self.level)

    def live(self) -> Program:
        """The program without the steps no output needs."""
        needed = set(self.outputs)
        for step in reversed(self.steps):
            if step.name in needed:
                needed.update(self.uses(step))
        steps = tuple(s for s in self.steps if s.name in needed)
        return Program(self.inputs, steps, self.outputs, self.notation, self.level)


def element_symbol(name: str) -> sp.IndexedBase:
    return sp.IndexedBase(name, real=True)


def group_symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


def forward_program(norm: Norm, mode: str) -> Program:
    """The forward pass of ``norm`` as a program: inputs x, γ, β, ε (and, in eval mode, the
    population statistics); steps: the statistics (train mode only), x̂ and y; output y."""
    per_element = norm.affine == ELEMENT
    param_kind = ELEMENT if per_element else GROUP
    x, eps = element_symbol("x"), sp.Symbol("epsilon", positive=True)
    gamma = element_symbol("gamma") if per_element else group_symbol("gamma")
    beta = element_symbol("beta") if per_element else group_symbol("beta")
    inputs = [Input("x", ELEMENT, DATA, x, True), Input("gamma", param_kind, PARAM, gamma, True),
              Input("beta", param_kind, PARAM, beta, True), Input("eps", GROUP, SCALAR, eps, False)]
    notation = {
        x: Notation("x_{i}", "x_{{{i}}}"),
        eps: Notation("ε", r"\epsilon"),
        gamma: Notation("γ_{i}", r"\gamma_{{{i}}}") if per_element else Notation("γ", r"\gamma"),
        beta: Notation("β_{i}", r"\beta_{{{i}}}") if per_element else Notation("β", r"\beta"),
        M: Notation("m", "m"),
    }
    stats = {name: group_symbol(name) for name in norm.stat_names}
    for name, symbol in stats.items():
        given = norm.notation.get(name, Notation(name, rf"\mathrm{{{name}}}".replace("_", r"\_")))
        if mode == "eval":
            given = Notation(given.population_text or f"{given.text} (population)", given.population_latex or given.latex)
        notation[symbol] = given
    scalars = {"eps": eps, **stats}
    steps = []
    if mode == "train":
        for name, text in norm.stats:
            body = parse(text, {**scalars, "x": x[K]}, where=f"{norm.name}: statistic {name}")
            steps.append(Step(name, GROUP, DATA, stats[name], group_sum(body, K) / M))
    else:
        inputs += [Input(name, GROUP, PARAM, symbol, False) for name, symbol in stats.items()]
    xhat, y = element_symbol("xhat"), element_symbol("y")
    notation[xhat] = Notation("x̂_{i}", r"\hat{{x}}_{{{i}}}")
    notation[y] = Notation("y_{i}", "y_{{{i}}}")
    steps.append(Step("xhat", ELEMENT, DATA, xhat, parse(norm.normalized, {**scalars, "x": x[I]}, where=f"{norm.name}: normalized")))
    scale = gamma[I] if per_element else gamma
    shift = beta[I] if per_element else beta
    steps.append(Step("y", ELEMENT, DATA, y, scale * xhat[I] + shift))
    return Program(tuple(inputs), tuple(steps), ("y",), notation)
