"""Numbers from a derivation: every step of every level, adjoint and per-path term on one concrete group.

Each expression is evaluated as written by the engine: a sum over the group becomes a NumPy
sum over the group's vector, an element x_i (or x_k inside a sum) becomes the whole vector,
so per-element expressions come out as vectors over i, per-group ones as scalars.

* :func:`evaluate` takes the norm's own inputs (x, dy, γ, β, ε and, in eval mode, the population
  statistics): the order-1 case, as ``explain`` uses it.
* :func:`evaluate_derivation` takes a value for every input of the derivation's last program, by
  name, and evaluates any derivation (any order, reverse or forward mode).
* :func:`evaluate_level` evaluates one level alone (a transform of any program, a frozen one too).
* :func:`compile_program` turns a :class:`~symbn.program.Program` into a NumPy function of its
  inputs by name, compiled once (for finite differences, which call it many times).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from .derive import Derivation, Level
from .program import Program
from .sums import M


@dataclass(frozen=True)
class GroupValues:
    """Values on one group: ``steps`` (every step of every level, by name: the forward's first),
    ``adjoints`` and ``terms`` (the last level's: quantity -> adjoint or tangent; quantity -> via
    -> value), and ``values`` (every named quantity, inputs and steps alike)."""

    steps: dict[str, np.ndarray | float]
    adjoints: dict[str, np.ndarray | float]
    terms: dict[str, dict[str, np.ndarray | float]]
    values: dict[str, np.ndarray | float] = field(default_factory=dict)


Compiled = Callable[[Mapping[sp.Basic, object]], "np.ndarray | float"]

_FUNCTIONS = {sp.exp: np.exp, sp.log: np.log, sp.Abs: np.abs, sp.sign: np.sign}


def compile_expr(expr: sp.Expr) -> Compiled:
    """``expr`` as a function of an environment (symbol or IndexedBase -> value, and m).

    The expression tree is walked with NumPy directly (no code generation: a derivation of order
    3 has hundreds of expressions, each evaluated a few times); each sum over the group is its
    body's NumPy sum."""
    return lambda env: _walk(expr, env)


def _walk(e: sp.Basic, env: Mapping[sp.Basic, object]):
    if e.is_Number or isinstance(e, sp.NumberSymbol):
        return float(e)
    if isinstance(e, sp.Symbol):
        if e not in env:
            raise KeyError(f"no value for {e}")
        return env[e]
    if isinstance(e, sp.Indexed):
        if e.base not in env:
            raise KeyError(f"no value for {e.base}")
        return env[e.base]
    if isinstance(e, sp.Add):
        total = _walk(e.args[0], env)
        for arg in e.args[1:]:
            total = total + _walk(arg, env)
        return total
    if isinstance(e, sp.Mul):
        product = _walk(e.args[0], env)
        for arg in e.args[1:]:
            product = product * _walk(arg, env)
        return product
    if isinstance(e, sp.Pow):
        base, exp = _walk(e.base, env), e.exp
        if exp == sp.S.Half:
            return np.sqrt(base)
        if exp == -sp.S.Half:
            return 1 / np.sqrt(base)
        if exp.is_Integer and exp < 0:
            return 1 / np.power(base, -int(exp))
        return np.power(base, int(exp) if exp.is_Integer else _walk(exp, env))
    if isinstance(e, sp.Sum):
        return _total(_walk(e.function, env), env[M])
    if e.func in _FUNCTIONS:
        return _FUNCTIONS[e.func](_walk(e.args[0], env))
    raise NotImplementedError(f"cannot evaluate {type(e).__name__} {e}")


def value(expr: sp.Expr, env: Mapping[sp.Basic, object]) -> np.ndarray | float:
    """``expr`` with ``env``'s values: scalars for symbols, vectors over the group for IndexedBases."""
    return _walk(expr, env)


def _total(body, m: int):
    """Σ_k body: a vector's sum, or m times a body that does not vary over the group."""
    return np.sum(body) if np.ndim(body) else body * m


def _environment(program: Program, inputs: Mapping[str, object], m: int | None) -> dict[sp.Basic, object]:
    missing = [q.name for q in program.inputs if q.name not in inputs]
    if missing:
        raise KeyError(f"no value for the inputs {missing}; the program takes {', '.join(q.name for q in program.inputs)}")
    env: dict[sp.Basic, object] = {}
    for q in program.inputs:
        v = inputs[q.name]
        env[q.symbol] = np.asarray(v, np.float64) if q.kind == "element" else v
    sizes = {np.size(env[q.symbol]) for q in program.inputs if q.kind == "element"}
    if m is None:
        if len(sizes) != 1:
            raise ValueError(f"the element inputs must all have one length (the group's m), got lengths {sorted(sizes)}")
        m = sizes.pop()
    env[M] = m
    return env


def compile_program(program: Program) -> Callable[[Mapping[str, object]], dict[str, np.ndarray | float]]:
    """``program`` as a NumPy function: a value for every input, by name (element inputs as vectors
    over one group, group inputs as numbers) -> every step's value, by name."""
    steps = [(s.name, s.target, compile_expr(s.definition)) for s in program.steps]

    def run(inputs: Mapping[str, object], m: int | None = None) -> dict[str, np.ndarray | float]:
        env = _environment(program, inputs, m)
        out = {}
        for name, target, f in steps:
            out[name] = env[target] = f(env)
        return out

    return run


def evaluate_derivation(d: Derivation, inputs: Mapping[str, object], m: int | None = None) -> GroupValues:
    """Every step of every level of ``d``, and the last level's adjoints (or tangents) and
    per-path terms, on one group: ``inputs`` holds a value for every input of the last program, by
    name (element inputs as vectors of the group's m entries, group inputs as numbers)."""
    return _evaluate((d.levels[0].source, *(level.program for level in d.levels)), d.levels[-1], inputs, m)


def evaluate_level(level: Level, inputs: Mapping[str, object], m: int | None = None) -> GroupValues:
    """One level alone (a transform of any program, e.g. of a frozen one): its source's and its
    program's steps, its adjoints (or tangents) and per-path terms; ``inputs`` as for
    :func:`evaluate_derivation`, for every input of ``level.program``."""
    return _evaluate((level.source, level.program), level, inputs, m)


def _evaluate(programs: tuple[Program, ...], last: Level, inputs: Mapping[str, object], m: int | None) -> GroupValues:
    env = _environment(last.program, inputs, m)
    values: dict[str, object] = {q.name: env[q.symbol] for q in last.program.inputs}
    steps: dict[str, object] = {}
    for p in programs:
        for step in p.steps:
            if step.name not in steps:
                steps[step.name] = env[step.target] = value(step.definition, env)
    values.update(steps)
    adjoints, terms = {}, {}
    for name, parts in last.terms.items():  # nearest the outputs first: each term's adjoint is known
        terms[name] = {t.via: value(t.expr, env) for t in parts}
        new = last.derived[name]
        symbol = last.program.symbol(new) if _has(last.program, new) else _symbol_like(last.source, name, new)
        if symbol not in env:  # a step the last program does not keep: the sum of its terms
            env[symbol] = sum(terms[name].values()) if terms[name] else 0.0
        adjoints[name] = env[symbol]
        values.setdefault(new, adjoints[name])
    return GroupValues(steps, adjoints, terms, values)


def _has(p: Program, name: str) -> bool:
    return any(q.name == name for q in (*p.inputs, *p.steps))


def _symbol_like(source: Program, name: str, new_name: str) -> sp.Basic:
    from .program import element_symbol, group_symbol

    return element_symbol(new_name) if source.quantity(name).kind == "element" else group_symbol(new_name)


def evaluate(d: Derivation, x, dy, gamma=1.0, beta=0.0, eps: float = 1e-5, population: dict | None = None) -> GroupValues:
    """An order-1 reverse derivation on one group of ``len(x)`` elements, from the norm's own
    inputs; ``population`` gives the statistics in eval mode."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    inputs = {"x": x, "dy": dy, "gamma": gamma, "beta": beta, "eps": eps}
    if d.mode == "eval":
        inputs.update({name: population[name] for name in d.stats})
    return evaluate_derivation(d, inputs, m=x.size)
