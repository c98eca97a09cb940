"""``python -m symbn explain``: why the moments get gradients, derived and measured.

On one seeded group the engine's per-path terms of dl/dx_i are evaluated, the full gradient
(every path) and the frozen-moment gradient (the inference formula applied to the batch's
own statistics) are computed with the generated kernels, and both are compared with central
finite differences of the forward pass. The inference counterpart, the proven findings, and
the paper's own argument (Section 2: a bias before normalization drifts without bound when
the gradient ignores that the mean depends on it) complete the answer.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .build import load, module
from .derive import Derivation, derive
from .evaluate import evaluate
from .jinja import environment
from .notation import latex, text
from .oracles import central_differences, relative_error
from .prove import findings
from .render import document_context
from .spec import Norm, resolve

FORMATS = ("text", "json", "latex")
EPS = 1e-5
POPULATION = {"mean": 0.4, "var": 2.5, "ms": 3.0}


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
    return {
        "channel": ((m, 1), {}),
        "trailing": ((1, m), {}),
        "instance": ((1, 1, m), {}),
        "groups": ((1, m, 1), {"num_groups": 1}),
    }[norm.layout.name]


def _routes(d: Derivation) -> list[list[str]]:
    """Every path from x to the loss through the named forward steps."""
    uses = {s.name: [n for n in ("x", *d.stats, "xhat") if n != s.name and s.definition.has(d.symbols[n])] for s in d.forward}
    edges = [(src, step) for step, sources in uses.items() for src in sources] + [("y", "l")]

    def walk(node: str) -> list[list[str]]:
        if node == "l":
            return [["l"]]
        return [[node, *rest] for src, dst in edges if src == node for rest in walk(dst)]

    return walk("x")


def explain(norm: str | Norm = "batchnorm", m: int = 16, seed: int = 0, steps: int = 40) -> Explanation:
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

    y, *saved = forward_train(x)
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

    population = [np.array([POPULATION[s]]) for s in norm.stat_names]
    evaluated = kernels.backward_eval(dy.reshape(shape), x.reshape(shape), gamma, *population, EPS, **options)[0].ravel()
    eval_fd = central_differences(
        lambda v: float(dy @ kernels.forward_eval(v.reshape(shape), gamma, beta, *population, EPS, **options).ravel()), x)

    out.numbers = {
        "norm": norm.name, "m": m, "seed": seed, "eps": EPS,
        "batch": {"x": x.tolist(), "dy": dy.tolist(), "gamma": gamma.tolist(), "beta": beta.tolist()},
        "graph": {"nodes": ["x", *norm.stat_names, "xhat", "y", "l"], "routes": _routes(train)},
        "paths": paths,
        "gradients": {"full": full.tolist(), "frozen": frozen.tolist(), "fd": fd.tolist()},
        "rel_err_full_vs_fd": relative_error(full, fd),
        "rel_err_frozen_vs_fd": relative_error(frozen, fd),
        "rel_err_paths_vs_full": relative_error(sum(terms.values()), full),
        "eval": {"population": {s: POPULATION[s] for s in norm.stat_names}, "frozen": evaluated.tolist(), "fd": eval_fd.tolist()},
        "rel_err_eval_frozen_vs_fd": relative_error(evaluated, eval_fd),
        "findings": [{"mode": mode, "key": p.key, "claim": p.claim, "status": p.status,
                      "residual": text(p.residual, d.notation), "residual_latex": latex(p.residual, d.notation)}
                     for d, mode in ((train, "train"), (inference, "eval")) for p in findings(d)],
        "bias_drift": bias_drift(norm, steps=steps, seed=seed),
    }
    return out


def bias_drift(norm: Norm, steps: int = 40, lr: float = 0.2, seed: int = 0) -> dict:
    """The paper's Section 2 argument, run: x = a·u + b before normalization, gradient descent on
    a, b (and gamma, beta after it) with the true dl/dx and with the frozen-moment one."""
    rng = np.random.default_rng(seed + 1)
    shape, options = {
        "channel": ((64, 8), {}), "trailing": ((1, 64), {}),
        "instance": ((1, 8, 32), {}), "groups": ((1, 8, 16), {"num_groups": 4}),
    }[norm.layout.name]
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


def to_json(e: Explanation) -> str:
    return json.dumps(e.numbers, indent=2, ensure_ascii=False) + "\n"


def to_text(e: Explanation) -> str:
    n, d = e.numbers, e.train
    show = lambda expr: text(expr, d.notation)  # noqa: E731
    label = {name: show(d.value(name)).removesuffix("_i") for name in ("x", "xhat", "y", *d.stats)} | {"l": "l"}
    lines = [f"Why do the moments get gradients? {e.norm.name}, one group of m = {e.m} (seed {e.seed}, float64, eps = {EPS:g})",
             "", "In training the statistics are computed from the batch, so every x_k feeds them. Routes from x_i to the loss:"]
    vanishing = {f["key"] for f in n["findings"] if f["key"].startswith("vanishing_term") and f["status"] == "proven"}
    for route in n["graph"]["routes"]:
        through = [label[r] for r in route]
        note = ""
        for first, second in zip(route, route[1:]):
            if f"vanishing_term[{first}<-{second}]" in vanishing:
                note = f"   (contributes nothing: ∂{label[second]}/∂{label[first]} = 0, proven)"
        lines.append("  " + " → ".join(through) + note)
    lines += ["", "The engine's terms of ∂l/∂x_i, one per first step, on this batch:"]
    for p in n["paths"]:
        share = "" if p["share"] is None else f", {100 * p['share']:.1f}% of full − frozen"
        lines.append(f"  {p['name']:<16} {p['term']}   |term| = {p['norm']:.3g}{share}")
    lines += ["", f"  {'gradient':<56}{'rel. error vs finite differences':>34}",
              f"  {'full: every path (training kernels)':<56}{n['rel_err_full_vs_fd']:>10.1e}",
              f"  {'frozen moments: inference formula, batch statistics':<56}{n['rel_err_frozen_vs_fd']:>10.1e}",
              f"  {'inference mode: frozen formula, population statistics':<56}{n['rel_err_eval_frozen_vs_fd']:>10.1e}",
              f"  (sum of the engine's path terms vs the kernel's full gradient: {n['rel_err_paths_vs_full']:.1e})",
              "", "So the moments are not constants in training: treating them so gives a wrong gradient. In inference they",
              "are constants, and the same formula is exactly right.", "", "Proven by the engine for symbolic m:"]
    for f in n["findings"]:
        residual = "" if f["status"] == "proven" else f"  (differs by {f['residual']})"
        lines.append(f"  [{f['status']}] {f['mode']}: {f['claim']}{residual}")
    drift = n["bias_drift"]
    lines += ["", "The paper's own argument (Section 2), run with the generated kernels: x = a·u + b before normalization,",
              f"gradient descent ({drift['steps']} steps, lr {drift['lr']}) on a, b and on γ, β after it, shape {tuple(drift['shape'])}.",
              f"  {'step':>5}  {'|b| true':>10} {'|b| frozen':>11}  {'|a| true':>10} {'|a| frozen':>11}  {'loss true':>10} {'loss frozen':>12}"]
    for step in sorted({0, drift["steps"] // 4, drift["steps"] // 2, 3 * drift["steps"] // 4, drift["steps"] - 1}):
        t, f = drift["true"], drift["frozen"]
        lines.append(f"  {step:>5}  {t['bias_norm'][step]:>10.3g} {f['bias_norm'][step]:>11.3g}  {t['scale_norm'][step]:>10.4g} "
                     f"{f['scale_norm'][step]:>11.4g}  {t['loss'][step]:>10.4g} {f['loss'][step]:>12.4g}")
    lines.append("Under the frozen gradient the parameters that normalization cancels drift while the loss does not notice;")
    lines.append("under the true gradient they stay put.")
    return "\n".join(lines) + "\n"


def to_latex(e: Explanation) -> str:
    """The report as LaTeX source: the derivation, the graph, the measurements, the drift."""
    n, d = e.numbers, e.train
    vanishing = {f["key"] for f in n["findings"] if f["key"].startswith("vanishing_term") and f["status"] == "proven"}
    edges = sorted({(a, b) for route in n["graph"]["routes"] for a, b in zip(route, route[1:])})
    stats = d.stats
    graph = {
        # statistics above and below the direct edge x -> xhat, so that every route stays visible
        "stats": [{"name": s, "label": latex(d.symbols[s], d.notation), "y": 1.4 if len(stats) == 1 else 1.4 - 2.8 * j / (len(stats) - 1)}
                  for j, s in enumerate(stats)],
        "edges": [{"src": a, "dst": b, "bend": 45 if f"vanishing_term[{a}<-{b}]" in vanishing else 0, "vanishes": f"vanishing_term[{a}<-{b}]" in vanishing} for a, b in edges],
    }
    return environment("latex").get_template("report.tex.j2").render(
        **document_context(e.norm), numbers=n, drift=n["bias_drift"], graph=graph)


class LatexError(RuntimeError):
    """pdflatex is missing or failed; the message says what to do."""


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
