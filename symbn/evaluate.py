"""Numbers from a derivation: every forward step, adjoint and per-path term on one concrete group.

Each expression is evaluated as written by the engine: a sum over the group becomes a NumPy
sum over the group's vector, an element x_i (or x_k inside a sum) becomes the whole vector,
so per-element expressions come out as vectors over i.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from .derive import Derivation
from .sums import M


@dataclass(frozen=True)
class GroupValues:
    """Values on one group: ``steps`` (forward), ``adjoints`` and ``terms`` (name -> via -> value)."""

    steps: dict[str, np.ndarray | float]
    adjoints: dict[str, np.ndarray | float]
    terms: dict[str, dict[str, np.ndarray | float]]


def value(expr: sp.Expr, env: dict[sp.Basic, object]) -> np.ndarray | float:
    """``expr`` with ``env``'s values: scalars for symbols, vectors over the group for IndexedBases."""
    sums = _outermost_sums(expr)
    stand_ins = {s: sp.Dummy("S") for s in sums}
    numbers = {stand_ins[s]: _total(value(s.function, env), env[M]) for s in sums}
    flat = expr.xreplace(stand_ins)
    vectors = {e: sp.Dummy(str(e.base)) for e in flat.atoms(sp.Indexed)}
    flat = flat.xreplace(vectors)
    names = {**numbers, **{d: env[e.base] for e, d in vectors.items()},
             **{s: env[s] for s in flat.free_symbols if s in env}}
    missing = flat.free_symbols - set(names)
    if missing:
        raise KeyError(f"no value for {sorted(map(str, missing))}")
    args = list(names)
    return sp.lambdify(args, flat, "numpy")(*(names[a] for a in args))


def _total(body, m: int):
    """Σ_k body: a vector's sum, or m times a body that does not vary over the group."""
    return np.sum(body) if np.ndim(body) else body * m


def _outermost_sums(expr: sp.Expr) -> list[sp.Sum]:
    if isinstance(expr, sp.Sum):
        return [expr]
    return [s for arg in expr.args for s in _outermost_sums(arg)]


def evaluate(d: Derivation, x, dy, gamma=1.0, beta=0.0, eps: float = 1e-5, population: dict | None = None) -> GroupValues:
    """The derivation on one group of ``len(x)`` elements; ``population`` gives the statistics
    in eval mode."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    s = d.symbols
    env: dict[sp.Basic, object] = {s["x"]: x, s["dy"]: dy, s["gamma"]: gamma, s["beta"]: beta, s["eps"]: eps, M: x.size}
    if d.mode == "eval":
        env.update({s[name]: population[name] for name in d.stats})
    steps = {}
    for step in d.forward:
        steps[step.name] = env[step.target] = value(step.definition, env)
    adjoints, terms = {}, {}
    for name, parts in d.terms.items():
        terms[name] = {t.via: value(t.expr, env) for t in parts}
        adjoints[name] = env[d.adjoints[name]] = sum(terms[name].values())
    return GroupValues(steps, adjoints, terms)
