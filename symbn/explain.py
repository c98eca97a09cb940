"""``python -m symbn explain``: why the moments get gradients, derived and measured.

On one seeded group the engine's per-path terms of dl/dx_i are evaluated, the full gradient
(every path) and the frozen-moment gradient (the inference formula applied to the batch's
own statistics) are computed with the generated kernels, and both are compared with central
finite differences of the forward pass. The inference counterpart, the proven findings, and
the paper's own argument (Section 2: a bias before normalization drifts without bound when
the gradient ignores that the mean depends on it) complete the answer.

One order up (:func:`higher_order`), the same question is asked of PyTorch: its native batch,
layer and instance norm save the mean and 1/σ without history, so differentiating their double
backward treats the statistics as constants. On the same group, symbn's exact third order
(vjp³) and nested forward mode (jvp(jvp)) are measured against autograd of the forward written
in plain torch ops and against central differences, native PyTorch against the same reference,
and native's error is matched, term by term, with what freezing the statistics drops.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import textwrap
from itertools import pairwise
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sympy as sp

from .build import load, module
from .derive import Derivation, Level, derive, jvp, tangent_name, vjp
from .errors import LatexError
from .evaluate import compile_program, evaluate, evaluate_derivation, evaluate_level
from .jinja import environment
from .notation import latex, text
from .oracles import central_differences, relative_error
from .program import ELEMENT, PARAM, SCALAR, Input, Program, Step, forward_program
from .prove import findings, vanishes
from .render import document_context
from .spec import Norm, resolve

FORMATS = ("text", "json", "latex")
EPS = 1e-5
POPULATION = {"mean": 0.4, "var": 2.5, "ms": 3.0}
AGREE = 1e-10
"""Relative error below which two float64 results of one derivative are the same result."""
WIDTH = 112
"""Width of explain's wrapped paragraphs."""


def semantics(norm: Norm) -> dict:
    """What the statistics are per layout, and what symbn's eval mode is for this norm."""
    running = norm.layout.running
    return {"layout": norm.layout.name, "statistics": norm.layout.statistics, "group": norm.layout.group_noun,
            "inference_has_constant_statistics": running,
            "eval_mode": "inference with running statistics (constants)" if running else
            "a frozen-statistics variant (constants in place of the statistics), not PyTorch's inference, "
            "which computes the same per-sample statistics as training"}


@dataclass
class Explanation:
    norm: Norm
    train: Derivation
    inference: Derivation
    m: int
    seed: int
    numbers: dict = field(default_factory=dict)


def _one_group(norm: Norm, m: int) -> tuple[tuple[int, ...], dict]:
    """x's shape and the layout options for a single group of m elements."""
    return norm.layout.single_group(m)


def _routes(d: Derivation) -> list[list[str]]:
    """Every path from x to the loss through the named forward steps."""
    uses = {s.name: [n for n in ("x", *d.stats, "xhat") if n != s.name and s.definition.has(d.symbols[n])] for s in d.forward}
    edges = [(src, step) for step, sources in uses.items() for src in sources] + [("y", "l")]

    def walk(node: str) -> list[list[str]]:
        if node == "l":
            return [["l"]]
        return [[node, *rest] for src, dst in edges if src == node for rest in walk(dst)]

    return walk("x")


def explain(norm: str | Norm = "batchnorm", m: int = 16, seed: int = 0, steps: int = 40, higher: bool = True) -> Explanation:
    """Everything ``python -m symbn explain`` shows, as numbers under stable keys."""
    norm = resolve(norm)
    train, inference = derive(norm, "train"), derive(norm, "eval")
    out = Explanation(norm, train, inference, m, seed)
    rng = np.random.default_rng(seed)
    shape, options = _one_group(norm, m)
    kernels = load(norm, "numpy")
    element = norm.affine == "element"
    x, dy = rng.normal(1.5, 2.0, m), rng.normal(size=m)
    gamma = rng.normal(1.0, 0.3, m) if element else np.array([1.3])
    beta = rng.normal(size=m) if element else np.array([-0.2])

    def forward_train(v):
        return kernels.forward_train(v.reshape(shape), gamma, beta, EPS, **options)

    _, *saved = forward_train(x)
    full = kernels.backward_train(dy.reshape(shape), x.reshape(shape), gamma, *saved, **options)[0].ravel()
    batch_stats = [s.reshape(1) for s in kernels.batch_statistics(x.reshape(shape), EPS, **options)]
    frozen = kernels.backward_eval(dy.reshape(shape), x.reshape(shape), gamma, *batch_stats, EPS, **options)[0].ravel()
    fd = central_differences(lambda v: float(dy @ forward_train(v)[0].ravel()), x)

    values = evaluate(train, x, dy, gamma if element else gamma[0], beta if element else beta[0], EPS)
    terms = {via: np.broadcast_to(v, (m,)).astype(float) for via, v in values.terms["x"].items()}
    difference = full - frozen
    paths = []
    for t in train.terms["x"]:
        contribution = terms[t.via]
        moment = t.via != "xhat"
        paths.append({
            "name": "direct" if not moment else f"through {text(train.value(t.via), train.notation)}",
            "name_latex": "direct" if not moment else f"through ${latex(train.value(t.via), train.notation)}$",
            "via": t.via,
            "term": text(t.expr, train.notation),
            "term_latex": latex(t.expr, train.notation),
            "contribution": contribution.tolist(),
            "norm": float(np.linalg.norm(contribution)),
            "share": float(contribution @ difference / (difference @ difference)) if moment else None,
        })

    population = [np.array([POPULATION.get(s, 1.0)]) for s in norm.stat_names]
    evaluated = kernels.backward_eval(dy.reshape(shape), x.reshape(shape), gamma, *population, EPS, **options)[0].ravel()
    eval_fd = central_differences(
        lambda v: float(dy @ kernels.forward_eval(v.reshape(shape), gamma, beta, *population, EPS, **options).ravel()), x)

    out.numbers = {
        "norm": norm.name, "m": m, "seed": seed, "eps": EPS, "semantics": semantics(norm),
        "batch": {"x": x.tolist(), "dy": dy.tolist(), "gamma": gamma.tolist(), "beta": beta.tolist()},
        "graph": {"nodes": ["x", *norm.stat_names, "xhat", "y", "l"], "routes": _routes(train)},
        "paths": paths,
        "gradients": {"full": full.tolist(), "frozen": frozen.tolist(), "fd": fd.tolist()},
        "rel_err_full_vs_fd": relative_error(full, fd),
        "rel_err_frozen_vs_fd": relative_error(frozen, fd),
        "rel_err_paths_vs_full": relative_error(sum(terms.values()), full),
        "eval": {"population": {s: POPULATION.get(s, 1.0) for s in norm.stat_names}, "frozen": evaluated.tolist(), "fd": eval_fd.tolist()},
        "rel_err_eval_frozen_vs_fd": relative_error(evaluated, eval_fd),
        "findings": [{"mode": mode, "key": p.key, "claim": p.claim, "outcome": p.outcome, "status": p.status,
                      "reason": p.reason, "budget_s": p.budget_s, "residual_note": p.residual_note,
                      "counterexample": None if p.counterexample is None else p.counterexample.as_json(),
                      "residual": None if p.residual is None else text(p.residual, d.notation),
                      "residual_latex": None if p.residual is None else latex(p.residual, d.notation)}
                     for d, mode in ((train, "train"), (inference, "eval")) for p in findings(d)],
        "bias_drift": bias_drift(norm, steps=steps, seed=seed),
    }
    if higher:
        out.numbers["higher_order"] = higher_order(norm, out.numbers["batch"], m, seed)
    return out


def bias_drift(norm: Norm, steps: int = 40, lr: float = 0.2, seed: int = 0) -> dict:
    """The paper's Section 2 argument, run: x = a·u + b before normalization, gradient descent on
    a, b (and gamma, beta after it) with the true dl/dx and with the frozen-moment one."""
    rng = np.random.default_rng(seed + 1)
    shape, options = norm.layout.demo[0], dict(norm.layout.demo[1])
    kernels, geo = load(norm, "numpy"), module(norm).geometry(shape, None, None, options.get("num_groups"))
    view = (geo.outer, geo.q, geo.p, geo.l, geo.s)
    u = rng.normal(0.5, 1.5, shape)
    target = np.tanh(rng.normal(size=shape)) * 2
    out = {"steps": steps, "lr": lr, "shape": list(shape)}
    for variant in ("true", "frozen"):
        a, b = np.ones(geo.p), np.zeros(geo.p)
        gamma, beta = np.ones(geo.param_shape), np.zeros(geo.param_shape)
        record = {"bias_norm": [], "scale_norm": [], "loss": []}
        for _ in range(steps):
            x = (u.reshape(view) * a[:, None, None] + b[:, None, None]).reshape(shape)
            y, *saved = kernels.forward_train(x, gamma, beta, EPS, **options)
            record["bias_norm"].append(float(np.linalg.norm(b)))
            record["scale_norm"].append(float(np.linalg.norm(a)))
            record["loss"].append(float(0.5 * np.mean((y - target) ** 2)))
            dy = (y - target) / y.size
            if variant == "true":
                dx, dgamma, dbeta = kernels.backward_train(dy, x, gamma, *saved, **options)
            else:
                stats = [s.reshape(geo.p) for s in kernels.batch_statistics(x, EPS, **options)]
                dx, dgamma, dbeta = kernels.backward_eval(dy, x, gamma, *stats, EPS, **options)
            dx = dx.reshape(view)
            b -= lr * dx.sum(axis=(0, 1, 3, 4))
            a -= lr * (dx * u.reshape(view)).sum(axis=(0, 1, 3, 4))
            gamma -= lr * dgamma
            beta -= lr * dbeta
        out[variant] = record
    return out


# --------------------------------------------------------------------------- one order up

def _train_chain(norm: Norm, transforms: tuple[str, ...]) -> Derivation:
    """The chain of transforms on the norm's train-mode forward, staged (explain needs the
    programs and their per-path terms, not the compact forms that :func:`derive` adds)."""
    program, levels = forward_program(norm, "train"), []
    for kind in transforms:
        levels.append((vjp if kind == "vjp" else jvp)(program))
        program = levels[-1].program
    return Derivation(norm, "train", tuple(levels))


def _draw(program: Program, given: dict, rng: np.random.Generator, m: int) -> dict:
    """``given``, and a seeded random value for every other input of ``program`` (the cotangents
    or tangents of each level): a vector of m for an element input, a number for a group input."""
    values = dict(given)
    for q in program.inputs:
        if q.name not in values:
            values[q.name] = rng.normal(size=m) if q.kind == ELEMENT else float(rng.normal())
    return values


def _size(program: Program, name: str, m: int) -> int:
    return m if program.quantity(name).kind == ELEMENT else 1


def _flat(value, n: int) -> np.ndarray:
    """A value on the group as a vector of its n entries (a constant element expression is one number)."""
    v = np.asarray(value, np.float64).ravel()
    return np.broadcast_to(v, (n,)).copy() if v.size in (1, n) else v


def _compare(a: dict, b: dict, names: tuple[str, ...]) -> dict:
    """Relative errors (max|a−b| / max|b|) of a against b: all named outputs together, and each one."""
    return {"rel_err": relative_error(np.concatenate([a[n] for n in names]), np.concatenate([b[n] for n in names])),
            "per_output": {n: relative_error(a[n], b[n]) for n in names}}


def _torch_values(program: Program, values: dict, shape: tuple[int, ...]) -> dict:
    """The inputs as the oracles' tensors take them: data like x, parameters by position."""
    out = {}
    for q in program.inputs:
        if q.role == SCALAR:
            continue
        v = np.asarray(values[q.name], np.float64)
        out[q.name] = (v.reshape(-1) if q.kind == ELEMENT else v.reshape(1)) if q.role == PARAM else v.reshape(shape)
    return out


def _torch_chains(norm: Norm, transforms: tuple[str, ...], program: Program, values: dict, shape, options, m: int) -> dict:
    """The plain-ops reference and PyTorch's own op, ``transforms`` chained, on the group: outputs
    as flat vectors, or a note saying why there is none."""
    try:
        import torch

        from . import oracles
    except ImportError:
        return {"torch": None, "plain": None, "native": None, "note": "PyTorch is not installed (pip install 'symbn[torch]')"}
    inputs = _torch_values(program, values, shape)
    num_groups = options.get("num_groups")
    flat = lambda out: {n: _flat(v, _size(program, n, m)) for n, v in out.items()}  # noqa: E731
    plain = flat(oracles.evaluate(oracles.chain(oracles.forward_program(norm, "train", EPS, num_groups=num_groups), transforms), inputs))
    native_program = oracles.native_program(norm, "train", EPS, num_groups=num_groups)
    native = None if native_program is None else flat(oracles.evaluate(oracles.chain(native_program, transforms), inputs))
    op = {"batchnorm": "F.batch_norm", "layernorm": "F.layer_norm", "instancenorm": "F.instance_norm",
          "groupnorm": "F.group_norm", "rmsnorm": "F.rms_norm"}.get(norm.name)
    return {"torch": torch.__version__, "plain": plain, "native": native, "op": op if native is not None else None,
            "note": None if native is not None else f"PyTorch has no op of its own for {norm.name}"}


def _split(program: Program, values: dict, m: int) -> tuple[list, np.ndarray]:
    """The differentiable inputs of ``program`` and their values as one vector."""
    wrt = [q for q in program.inputs if q.differentiable]
    return wrt, np.concatenate([_flat(values[q.name], _size(program, q.name, m)) for q in wrt])


def _joined(program: Program, values: dict, wrt: list, vector: np.ndarray, m: int) -> dict:
    moved, at = dict(values), 0
    for q in wrt:
        n = _size(program, q.name, m)
        moved[q.name] = vector[at:at + n] if q.kind == ELEMENT else float(vector[at])
        at += n
    return moved


def _fd_reverse(level: Level, values: dict, m: int) -> dict:
    """The last vjp's outputs by central differences of the program below it: the gradient of
    Σ_o ⟨cotangent_o, o⟩ with respect to each differentiable input."""
    source, run = level.source, compile_program(level.source)
    wrt, at = _split(source, values, m)
    weights = {o: _flat(values[level.derived[o]], _size(source, o, m)) for o in source.outputs}

    def loss(vector: np.ndarray) -> float:
        out = run(_joined(source, values, wrt, vector, m), m)
        return float(sum(weights[o] @ _flat(out[o], weights[o].size) for o in source.outputs))

    gradient = _joined(source, {}, wrt, central_differences(loss, at), m)
    return {level.derived[q.name]: _flat(gradient[q.name], _size(source, q.name, m)) for q in wrt}


def _fd_forward(level: Level, values: dict, m: int, h: float = 1e-6) -> dict:
    """The last jvp's outputs by a central difference of the program below it along the tangents."""
    source, run = level.source, compile_program(level.source)
    wrt, at = _split(source, values, m)
    direction = np.concatenate([_flat(values[level.derived[q.name]], _size(source, q.name, m)) for q in wrt])
    up = run(_joined(source, values, wrt, at + h * direction, m), m)
    down = run(_joined(source, values, wrt, at - h * direction, m), m)
    return {level.derived[o]: (_flat(up[o], _size(source, o, m)) - _flat(down[o], _size(source, o, m))) / (2 * h) for o in source.outputs}


def _without_vanishing_sums(d: Derivation, program: Program) -> tuple[Program, list[sp.Expr]]:
    """``program`` with every group sum of forward quantities that the engine proves identically
    zero (Σ_k (2·μ_B − 2·x_k)/m: the σ²→μ local derivative) written as 0. The same function, value
    for value; but its derivatives with the statistics frozen differ, since a frozen μ_B no longer
    tracks the x_k in such a sum. PyTorch's hand-written double backward has no such sums."""
    forward = {q.symbol if hasattr(q, "symbol") else q.target for q in (*d.levels[0].source.inputs, *d.levels[0].source.steps)}
    eps, cache = d.symbols["eps"], {}

    def zero(e) -> bool:
        if not isinstance(e, sp.Sum) or not {a.base for a in e.atoms(sp.Indexed)} <= forward:
            return False
        if e not in cache:
            cache[e] = vanishes(d.inline(e), eps)
        return cache[e]

    steps = tuple(Step(s.name, s.kind, s.role, s.target, s.definition.replace(zero, lambda e: sp.S.Zero)) for s in program.steps)
    return Program(program.inputs, steps, program.outputs, program.notation, program.level), [e for e, z in cache.items() if z]


def _run(program: Program, values: dict, m: int) -> dict:
    return compile_program(program)(values, m)


def _thaw(program: Program, names: tuple[str, ...]) -> Program:
    """``program`` with the inputs ``names`` differentiable: a frozen program whose statistics a
    jvp may still move, to split what freezing drops into one part per statistic."""
    inputs = tuple(Input(q.name, q.kind, q.role, q.symbol, True) if q.name in names else q for q in program.inputs)
    return Program(inputs, program.steps, program.outputs, program.notation, program.level)


def higher_order(norm: Norm, batch: dict, m: int, seed: int) -> dict:
    """The third order (vjp³) and nested forward mode (jvp(jvp)) on one group: symbn's exact
    result against the plain-ops PyTorch reference and central differences; PyTorch's own op
    against the same reference; and native's error matched with what freezing the statistics drops."""
    shape, options = _one_group(norm, m)
    stats = norm.stat_names
    element = norm.affine == ELEMENT
    given = {"x": np.asarray(batch["x"]), "dy": np.asarray(batch["dy"]), "eps": EPS,
             "gamma": np.asarray(batch["gamma"]) if element else batch["gamma"][0],
             "beta": np.asarray(batch["beta"]) if element else batch["beta"][0]}
    out: dict = {"cotangent_seed": seed + 2, "tangent_seed": seed + 3, "statistics": list(stats)}

    # reverse mode, third order
    d3 = _train_chain(norm, ("vjp",) * 3)
    p3, last = d3.program, d3.levels[-1]
    values = _draw(p3, given, np.random.default_rng(seed + 2), m)
    exact = evaluate_derivation(d3, values, m)
    outputs = p3.outputs
    symbn = {o: _flat(exact.values[o], _size(p3, o, m)) for o in outputs}
    torch = _torch_chains(norm, ("vjp",) * 3, p3, values, shape, options, m)
    out["torch"], out["op"], out["note"] = torch["torch"], torch.get("op"), torch["note"]
    order3: dict = {"transforms": ["vjp"] * 3, "outputs": list(outputs),
                    "outputs_text": {o: text(p3.value(o), p3.notation) for o in outputs},
                    "outputs_latex": {o: latex(p3.value(o), p3.notation) for o in outputs},
                    "inputs": {n: _flat(v, _size(p3, n, m)).tolist() for n, v in values.items() if n not in given},
                    "symbn": {o: v.tolist() for o, v in symbn.items()},
                    "symbn_vs_fd": _compare(symbn, _fd_reverse(last, values, m), outputs),
                    "symbn_vs_plain": None if torch["plain"] is None else _compare(symbn, torch["plain"], outputs),
                    "native_vs_plain": None if torch["native"] is None else _compare(torch["native"], torch["plain"], outputs)}

    # what freezing the statistics drops, term by term: the order-2 program as PyTorch writes it
    # (without the sums the engine proves zero), its vjp, and that vjp with the statistics frozen
    p2 = last.source
    p2_bare, vanishing = _without_vanishing_sums(d3, p2)
    level = vjp(p2_bare)
    bare = evaluate_level(level, values, m)
    x_out, n_x = last.derived["x"], _size(p2, "x", m)
    show = lambda e: text(e, level.program.notation)  # noqa: E731
    terms = [t for t in level.terms["x"] if t.via in stats]
    dropped = [{"via": t.via, "name": f"through {show(p2.value(t.via))}",
                "name_latex": f"through ${latex(p2.value(t.via), level.program.notation)}$",
                "adjoint": show(t.adjoint), "adjoint_value": float(np.ravel(bare.values[level.derived[t.via]])[0]),
                "term": show(t.expr), "term_latex": latex(t.expr, level.program.notation),
                "contribution": _flat(bare.terms["x"][t.via], n_x).tolist(),
                "norm": float(np.linalg.norm(_flat(bare.terms["x"][t.via], n_x)))} for t in terms]
    total = sum((np.asarray(t["contribution"]) for t in dropped), np.zeros(n_x))
    at_stats = {**values, **{s: exact.values[s] for s in stats}}
    frozen_bare = _flat(_run(vjp(p2_bare.frozen(stats)).program, at_stats, m)[x_out], n_x)
    frozen_as_derived = _flat(_run(vjp(p2.frozen(stats)).program, at_stats, m)[x_out], n_x)
    as_derived = [t for t in last.terms["x"] if t.via in stats]
    as_derived_total = sum((_flat(exact.terms["x"][t.via], n_x) for t in as_derived), np.zeros(n_x))
    vanishing_part = frozen_as_derived - frozen_bare  # what the zero sums' frozen derivatives add
    native_error = None if torch["native"] is None else torch["native"][x_out] - torch["plain"][x_out]
    against = (lambda a: None) if native_error is None else (lambda a: relative_error(a, native_error))
    order3["dropped"] = {
        "output": x_out,
        "program": "vjp of the order-2 program without the sums the engine proves zero, as PyTorch's double backward is written",
        "vanishing_sums": [text(e, p2.notation) for e in vanishing], "vanishing_sums_latex": [latex(e, p2.notation) for e in vanishing],
        "terms": dropped, "sum": total.tolist(), "sum_norm": float(np.linalg.norm(total)),
        "native_error": None if native_error is None else native_error.tolist(),
        "native_error_norm": None if native_error is None else float(np.linalg.norm(native_error)),
        "rel_err_minus_terms_vs_native_error": against(-total),
        "frozen": frozen_bare.tolist(),
        "rel_err_frozen_vs_native": None if torch["native"] is None else relative_error(frozen_bare, torch["native"][x_out]),
        "rel_err_frozen_vs_exact_minus_terms": relative_error(frozen_bare, symbn[x_out] - total),
        "as_derived": {
            "terms": [{"via": t.via, "term": text(t.expr, d3.notation), "norm": float(np.linalg.norm(_flat(exact.terms["x"][t.via], n_x)))}
                      for t in as_derived],
            "rel_err_minus_terms_vs_native_error": against(-as_derived_total),
            "vanishing_part_norm": float(np.linalg.norm(vanishing_part)),
            "rel_err_minus_terms_and_vanishing_part_vs_native_error": against(-as_derived_total - vanishing_part),
            "rel_err_frozen_vs_native": None if torch["native"] is None else relative_error(frozen_as_derived, torch["native"][x_out]),
        },
        "other_outputs": {last.derived[q]: [t.via for t in level.terms.get(q, ()) if t.via in stats]
                          for q in d3.outputs if last.derived[q] != x_out},
    }
    order3["native_agrees"] = None if order3["native_vs_plain"] is None else order3["native_vs_plain"]["rel_err"] < AGREE
    out["order3"] = order3

    # forward mode, nested: jvp(jvp)
    dj = _train_chain(norm, ("jvp", "jvp"))
    pj, first = dj.program, dj.levels[0].program
    values = _draw(pj, given, np.random.default_rng(seed + 3), m)
    exact = evaluate_derivation(dj, values, m)
    outputs = pj.outputs
    symbn = {o: _flat(exact.values[o], _size(pj, o, m)) for o in outputs}
    torch = _torch_chains(norm, ("jvp", "jvp"), pj, values, shape, options, m)
    nested: dict = {"transforms": ["jvp"] * 2, "outputs": list(outputs),
                    "outputs_text": {o: text(pj.value(o), pj.notation) for o in outputs},
                    "outputs_latex": {o: latex(pj.value(o), pj.notation) for o in outputs},
                    "symbn": {o: v.tolist() for o, v in symbn.items()},
                    "symbn_vs_fd": _compare(symbn, _fd_forward(dj.levels[-1], values, m), outputs),
                    "symbn_vs_plain": None if torch["plain"] is None else _compare(symbn, torch["plain"], outputs),
                    "native_vs_plain": None if torch["native"] is None else _compare(torch["native"], torch["plain"], outputs)}
    tangents = tuple(tangent_name(s, 1) for s in stats if any(q.name == tangent_name(s, 1) for q in first.steps))
    at_stats = {**values, **{n: exact.values[n] for n in (*stats, *tangents)}}
    variants = []
    for names, what in ((stats, "the statistics (their level-1 tangents recomputed from x, x's tangent and the frozen statistics)"),
                        (stats + tangents, "the statistics and their level-1 tangents"),
                        (tangents, "the level-1 tangents of the statistics only")):
        result = _run(jvp(first.frozen(names)).program, at_stats, m)
        flat = {o: _flat(result[o], _size(pj, o, m)) for o in outputs}
        variants.append({"freeze": list(names), "what": what,
                         "rel_err_vs_native": None if torch["native"] is None else _compare(flat, torch["native"], outputs)["rel_err"],
                         "rel_err_vs_exact": _compare(flat, symbn, outputs)["rel_err"]})
    nested["frozen_variants"] = variants
    matching = [v for v in variants if v["rel_err_vs_native"] is not None and v["rel_err_vs_native"] < AGREE]
    nested["explanation"] = matching[0]["freeze"] if matching else None
    # what freezing the statistics drops, one part per statistic: the second-level tangents δ₂s
    thawed = jvp(_thaw(first.frozen(stats), stats))
    run = compile_program(thawed.program)
    zero = {tangent_name(s, 2): 0.0 for s in stats}
    base = run({**at_stats, **zero}, m)
    parts = []
    for s in stats:
        moved = run({**at_stats, **zero, tangent_name(s, 2): exact.values[tangent_name(s, 2)]}, m)
        o = outputs[0]
        contribution = _flat(moved[o], _size(pj, o, m)) - _flat(base[o], _size(pj, o, m))
        parts.append({"stat": s, "tangent": tangent_name(s, 2), "tangent_text": text(dj.program.symbol(tangent_name(s, 2)), dj.notation),
                      "tangent_latex": latex(dj.program.symbol(tangent_name(s, 2)), dj.notation),
                      "tangent_value": float(np.ravel(exact.values[tangent_name(s, 2)])[0]),
                      "contribution": contribution.tolist(), "norm": float(np.linalg.norm(contribution))})
    o = outputs[0]
    parts_total = sum((np.asarray(p["contribution"]) for p in parts), np.zeros(_size(pj, o, m)))
    nested["dropped"] = {"output": o, "parts": parts, "sum_norm": float(np.linalg.norm(parts_total)),
                         "rel_err_minus_parts_vs_native_error": None if torch["native"] is None
                         else relative_error(-parts_total, torch["native"][o] - torch["plain"][o]),
                         "rel_err_exact_minus_parts_vs_frozen": relative_error(symbn[o] - parts_total, _flat(base[o], _size(pj, o, m)))}
    nested["native_agrees"] = None if nested["native_vs_plain"] is None else nested["native_vs_plain"]["rel_err"] < AGREE
    out["nested_jvp"] = nested
    return out


def to_json(e: Explanation) -> str:
    return json.dumps(e.numbers, indent=2, ensure_ascii=False) + "\n"


def _statistics_sentence(e: Explanation, label: dict) -> list[str]:
    """How this norm's statistics are computed, in training and inference, in its own words."""
    sem, stats = e.numbers["semantics"], ", ".join(label[s] for s in e.norm.stat_names)
    if sem["inference_has_constant_statistics"]:
        return [f"In training the statistics ({stats}) are computed {sem['statistics']}, so every x_k of the {sem['group']} feeds them.",
                "Routes from x_i to the loss:"]
    return [f"The statistics ({stats}, one {sem['group']}'s) are computed {sem['statistics']},",
            "in training and in inference alike, so every x_k of the group feeds them. Routes from x_i to the loss:"]


def _mode_label(e: Explanation, mode: str) -> str:
    if mode == "train":
        return "train"
    return "inference" if e.numbers["semantics"]["inference_has_constant_statistics"] else "frozen-statistics variant"


def _error_of(output: str | None):
    """A comparison's relative error over every output (``output`` None) or for one output."""
    if output is None:
        return lambda c: None if c is None else c["rel_err"]
    return lambda c: None if c is None else c["per_output"][output]


def _wrap(paragraph: str, indent: str = "") -> list[str]:
    return textwrap.wrap(paragraph, WIDTH, initial_indent=indent, subsequent_indent=indent + ("  " if indent else ""),
                         break_on_hyphens=False)


def _higher_order_text(e: Explanation) -> list[str]:
    h = e.numbers.get("higher_order")
    if not h:
        return []
    o3, nj = h["order3"], h["nested_jvp"]
    native = h["op"] is not None
    fmt = lambda v: "--" if v is None else f"{v:.1e}"  # noqa: E731
    who = f"PyTorch's {h['op']} (torch {h['torch']})" if native else (h["note"] or "PyTorch")
    x_out = o3["dropped"]["output"]
    lines = ["", *_wrap(f"One order up: symbn's exact derivatives and {who}, on the same group with seeded random "
                        "cotangents and tangents for each level. Relative errors max|a − b| / max|b|; plain ops: autograd "
                        "of the same forward written in plain torch ops."),
             f"  {'derivative':<34}{'symbn vs fin. diff.':>20}{'symbn vs plain ops':>20}{'native vs plain ops':>21}"]
    rows = [(f"vjp³, all {len(o3['outputs'])} outputs", o3, None), (f"  {o3['outputs_text'][x_out]} alone", o3, x_out),
            ("jvp(jvp), " + ", ".join(nj["outputs_text"].values()), nj, None)]
    for name, block, only in rows:
        pick = _error_of(only)
        lines.append(f"  {name:<34}{fmt(pick(block['symbn_vs_fd'])):>20}{fmt(pick(block['symbn_vs_plain'])):>20}"
                     f"{fmt(pick(block['native_vs_plain'])):>21}")
    if h["torch"] is None:
        lines.append(f"  ({h['note']}: no PyTorch columns.)")
    d = o3["dropped"]
    shown = {t["via"]: t["name"].removeprefix("through ") for t in d["terms"]}
    stats = ", ".join(shown[s] for s in h["statistics"] if s in shown)
    if native and o3["native_agrees"]:
        lines += _wrap(f"{h['op']} agrees at the third order: its statistics keep their history (it is a composite of "
                       f"differentiable ops), so nothing is dropped. Freezing {stats} would drop |terms| = {d['sum_norm']:.3g} "
                       f"from {o3['outputs_text'][x_out]}.")
    else:
        lines += _wrap((f"Native saves {stats} without history (the scale as its inverse), so its vjp³ is the vjp of the order-2 "
                        if native else
                        f"Freezing {stats}, as a framework that saves them without history does, takes the vjp of the order-2 ")
                       + "program with the statistics frozen. That drops exactly the terms of "
                       + f"{o3['outputs_text'][x_out]} through the statistics:")
        for t in d["terms"]:
            lines.append(f"  {t['name']:<16} {t['term']:<34} |term| = {t['norm']:.3g}   ({t['adjoint']} = {t['adjoint_value']:.3g})")
        if native:
            lines.append(f"  native − plain ops = −(their sum) to {fmt(d['rel_err_minus_terms_vs_native_error'])} "
                         f"(|native − plain ops| = {d['native_error_norm']:.3g}).")
        others = [o3["outputs_text"][o] for o, vias in d["other_outputs"].items() if not vias]
        lines += _wrap(f"The other outputs ({', '.join(others)}) have no terms through the statistics"
                       f"{', and native gets them right' if native else ''}.", "  ")
        if d["vanishing_sums"]:
            a = d["as_derived"]
            lines += _wrap(f"The order-2 program is taken as PyTorch writes its double backward: without "
                           f"{', '.join(d['vanishing_sums'])}, which the engine proves zero."
                           + (f" symbn's own order-2 program keeps that sum: zero in value, but its derivative with μ frozen is not "
                              f"(|·| = {a['vanishing_part_norm']:.2g}); against that program the terms through the statistics match "
                              f"native's error to {fmt(a['rel_err_minus_terms_vs_native_error'])}, and with that part added to "
                              f"{fmt(a['rel_err_minus_terms_and_vanishing_part_vs_native_error'])}." if native else ""), "  ")
    nd = nj["dropped"]
    tangents = ", ".join(f"{p['tangent_text']} = {p['tangent_value']:.3g} (|part| = {p['norm']:.3g})" for p in nd["parts"])
    if native and nj["native_agrees"]:
        lines += _wrap(f"Nested forward mode: {h['op']} agrees; freezing the statistics would drop {tangents}.")
    elif native:
        matched = nj["explanation"]
        variants = "; ".join(f"freezing {', '.join(v['freeze'])}: {fmt(v['rel_err_vs_native'])}" for v in nj["frozen_variants"])
        if matched:
            lines += _wrap(f"Nested forward mode: native's formula recomputes the level-1 tangents of the statistics from x and its "
                           f"tangent with the statistics themselves frozen: the jvp of the forward-mode program with {', '.join(matched)} "
                           f"frozen is native's result (vs native, {variants}). It drops {tangents}; native − plain ops = "
                           f"−(those parts) to {fmt(nd['rel_err_minus_parts_vs_native_error'])}.")
        else:
            lines += _wrap(f"Nested forward mode: no frozen variant matches native ({variants}).")
    else:
        lines += _wrap(f"Nested forward mode: freezing the statistics would drop {tangents}.")
    lines.append("symbn keeps every path at every order.")
    return lines


def to_text(e: Explanation) -> str:
    n, d = e.numbers, e.train
    show = lambda expr: text(expr, d.notation)  # noqa: E731
    label = {name: show(d.value(name)).removesuffix("_i") for name in ("x", "xhat", "y", *d.stats)} | {"l": "l"}
    sem = n["semantics"]
    running = sem["inference_has_constant_statistics"]
    lines = [f"Why do the moments get gradients? {e.norm.name}, one group of m = {e.m} (seed {e.seed}, float64, eps = {EPS:g})",
             "", *_statistics_sentence(e, label)]
    vanishing = {f["key"] for f in n["findings"] if f["key"].startswith("vanishing_term") and f["status"] == "proven"}
    for route in n["graph"]["routes"]:
        through = [label[r] for r in route]
        note = ""
        for first, second in pairwise(route):
            if f"vanishing_term[{first}<-{second}]" in vanishing:
                note = f"   (contributes nothing: ∂{label[second]}/∂{label[first]} = 0, proven)"
        lines.append("  " + " → ".join(through) + note)
    lines += ["", "The engine's terms of ∂l/∂x_i, one per first step, on this group:"]
    for p in n["paths"]:
        share = "" if p["share"] is None else f", {100 * p['share']:.1f}% of full − frozen"
        lines.append(f"  {p['name']:<16} {p['term']}   |term| = {p['norm']:.3g}{share}")
    frozen_row = ("frozen moments: inference formula, batch statistics" if running
                  else f"frozen moments: constant-statistics formula, the {sem['group']}'s")
    eval_row = ("inference mode: frozen formula, population statistics" if running
                else "frozen-statistics variant: given constants")
    lines += ["", f"  {'gradient':<56}{'rel. error vs finite differences':>34}",
              f"  {'full: every path (training kernels)':<56}{n['rel_err_full_vs_fd']:>10.1e}",
              f"  {frozen_row:<56}{n['rel_err_frozen_vs_fd']:>10.1e}",
              f"  {eval_row:<56}{n['rel_err_eval_frozen_vs_fd']:>10.1e}",
              f"  (sum of the engine's path terms vs the kernel's full gradient: {n['rel_err_paths_vs_full']:.1e})", ""]
    if running:
        lines += ["So the moments are not constants in training: treating them so gives a wrong gradient. In inference, with",
                  "running statistics, they are constants, and the same formula is exactly right."]
    else:
        lines += ["So the moments are not constants: treating them so gives a wrong gradient. " + e.norm.name + " has no inference",
                  "mode with constant statistics: PyTorch computes the same statistics in training and inference, so the",
                  "gradient flows through them in both. symbn's \"eval\" mode here is a frozen-statistics variant (constants",
                  "given in place of the statistics), not PyTorch's inference; for such constants the frozen formula is exact."]
    budgets = " or ".join(f"{b:g} s" for b in sorted({f["budget_s"] for f in n["findings"] if f["budget_s"] is not None}))
    lines += ["", "Decided by the engine for symbolic m" + (f" (each claim within a budget of {budgets} of CPU time):" if budgets else ":")]
    for f in n["findings"]:
        lines.append(f"  [{f['outcome']}] {_mode_label(e, f['mode'])}: {f['claim']}{_finding_detail(f)}")
    lines += _higher_order_text(e)
    drift = n["bias_drift"]
    lines += ["", "The paper's own argument (Section 2), run with the generated kernels: x = a·u + b before normalization,",
              f"gradient descent ({drift['steps']} steps, lr {drift['lr']}) on a, b and on γ, β after it, shape {tuple(drift['shape'])}.",
              f"  {'step':>5}  {'|b| true':>10} {'|b| frozen':>11}  {'|a| true':>10} {'|a| frozen':>11}  "
              f"{'loss true':>10} {'loss frozen':>12}"]
    for step in sorted({0, drift["steps"] // 4, drift["steps"] // 2, 3 * drift["steps"] // 4, drift["steps"] - 1}):
        t, f = drift["true"], drift["frozen"]
        lines.append(f"  {step:>5}  {t['bias_norm'][step]:>10.3g} {f['bias_norm'][step]:>11.3g}  {t['scale_norm'][step]:>10.4g} "
                     f"{f['scale_norm'][step]:>11.4g}  {t['loss'][step]:>10.4g} {f['loss'][step]:>12.4g}")
    lines.append("Under the frozen gradient the parameters that normalization cancels drift while the loss does not notice;")
    lines.append("under the true gradient they stay put.")
    return "\n".join(lines) + "\n"


def _finding_detail(f: dict) -> str:
    """After a finding's claim: nothing when proven; the residual (else the counterexample's value)
    when refuted; the reason when undecided."""
    if f["outcome"] == "refuted":
        if f["residual"] is not None:
            return f"  (differs by {f['residual']})"
        point = f["counterexample"]
        return f"  (differs: {f['reason']}" + ("" if point is None else f", lhs - rhs = {point['value']:.6g} at m = {point['m']}") + ")"
    if f["outcome"] == "undecided":
        return f"  (undecided: {f['reason']})"
    return ""


def to_latex(e: Explanation) -> str:
    """The report as LaTeX source: the derivation, the graph, the measurements, the drift."""
    n, d = e.numbers, e.train
    vanishing = {f["key"] for f in n["findings"] if f["key"].startswith("vanishing_term") and f["status"] == "proven"}
    edges = sorted({(a, b) for route in n["graph"]["routes"] for a, b in pairwise(route)})
    stats = d.stats
    graph = {
        # statistics above and below the direct edge x -> xhat, so that every route stays visible
        "stats": [{"name": s, "label": latex(d.symbols[s], d.notation), "y": 1.4 if len(stats) == 1 else 1.4 - 2.8 * j / (len(stats) - 1)}
                  for j, s in enumerate(stats)],
        "edges": [{"src": a, "dst": b, "bend": 45 if f"vanishing_term[{a}<-{b}]" in vanishing else 0,
                   "vanishes": f"vanishing_term[{a}<-{b}]" in vanishing} for a, b in edges],
    }
    h, rows, x_out = n.get("higher_order"), [], None
    if h:
        o3, nj = h["order3"], h["nested_jvp"]
        x_out = o3["outputs_latex"][o3["dropped"]["output"]]
        fmt = lambda v: "--" if v is None else f"{v:.1e}"  # noqa: E731
        for name, block, only in ((rf"vjp$^3$, all {len(o3['outputs'])} outputs", o3, None),
                                  (rf"\quad ${x_out}$ alone", o3, o3["dropped"]["output"]),
                                  ("jvp(jvp), $" + ", ".join(nj["outputs_latex"].values()) + "$", nj, None)):
            pick = _error_of(only)
            rows.append({"name": name, **{k: fmt(pick(block[key])) for k, key in
                                          (("fd", "symbn_vs_fd"), ("plain", "symbn_vs_plain"), ("native", "native_vs_plain"))}})
    return environment("latex").get_template("report.tex.j2").render(
        **document_context(e.norm), numbers=n, drift=n["bias_drift"], graph=graph, semantics=n["semantics"],
        higher=h, higher_rows=rows, higher_x=x_out)


def write_report(e: Explanation, target: Path) -> Path:
    """Write ``target``: LaTeX source for ``.tex``; for ``.pdf``, the source beside it, then pdflatex."""
    target = Path(target)
    source = target.with_suffix(".tex")
    source.write_text(to_latex(e), encoding="utf-8")
    if target.suffix != ".pdf":
        return source
    if shutil.which("pdflatex") is None:
        raise LatexError(f"pdflatex not found; {source} is written. Install it with: apt-get install -y texlive-latex-base "
                         "texlive-latex-recommended texlive-pictures, then run: pdflatex -halt-on-error " + source.name)
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", "-output-directory", scratch, str(source)],
                              capture_output=True, text=True)
        built = Path(scratch) / source.with_suffix(".pdf").name
        if done.returncode != 0 or not built.exists():
            errors = [line for line in done.stdout.splitlines() if line.startswith("!")]
            raise LatexError(f"pdflatex failed on {source}: {' '.join(errors) or done.stdout[-500:]}")
        shutil.copyfile(built, target)
    return target
