"""Show a derivation: plain text, LaTeX equations, JSON, or a complete LaTeX article.

All four are views of one model (:func:`sections`): the forward steps, the paper-form
adjoints (each a list of per-path terms), the compact forms and, when asked, the proofs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import sympy as sp

from .derive import Derivation, derive
from .jinja import environment
from .notation import latex, text
from .prove import Proof

FORMS = ("paper", "compact", "both")
FORMATS = ("text", "latex", "json")


@dataclass(frozen=True)
class Equation:
    """``lhs = rhs``; ``terms`` (via, expr) when the right side is a sum of per-path terms."""

    key: str
    lhs: sp.Expr
    rhs: sp.Expr
    terms: tuple[tuple[str, sp.Expr], ...] = ()


def sections(d: Derivation, form: str = "both") -> dict[str, list[Equation]]:
    """The derivation as titled lists of equations, in the order the paper shows them."""
    shown = {"forward": [Equation(s.name, s.value, s.definition) for s in d.forward]}
    if form in ("paper", "both"):
        shown["paper"] = [
            Equation(name, d.adjoint(name), d.gradients[name], tuple((t.via, t.expr) for t in terms))
            for name, terms in d.terms.items()
        ]
    if form in ("compact", "both"):
        shown["compact"] = [Equation(name, d.adjoint(name), expr) for name, expr in d.compact.items()]
    return shown


TITLES = {
    "forward": "Forward",
    "paper": "Backward, paper form (one term per path: the consumer's adjoint times its local derivative)",
    "compact": "Backward, compact form (reductions hoisted, as frameworks compute it)",
}


def _right(eq: Equation, show: Callable[[sp.Basic], str]) -> str:
    """The right side; a paper-form sum keeps its derived term order."""
    if not eq.terms:
        return show(eq.rhs)
    out = show(eq.terms[0][1])
    for _, term in eq.terms[1:]:
        piece = show(term)
        out += f" - {piece[1:]}" if piece.startswith("-") else f" + {piece}"
    return out


def paths(d: Derivation) -> str:
    """One sentence: along which paths the loss reaches x_i, and why."""
    via = [t.via for t in d.terms["x"]]
    shown = ", ".join(text(d.value(name), d.notation) for name in via)
    if d.mode == "train":
        return (f"The statistics are functions of every x_k, so the loss reaches x_i along {len(via)} paths: "
                f"through {shown}.")
    return f"The statistics are population constants (inputs, like ε), so the loss reaches x_i along {len(via)} path: through {shown}."


def to_text(d: Derivation, form: str = "both", proofs: list[Proof] | None = None) -> str:
    show = lambda e: text(e, d.notation)  # noqa: E731
    lines = [f"{d.norm.name}, {'training' if d.mode == 'train' else 'inference'} mode: {d.norm.description}",
             "Sums run over the m elements of one group (k = 1..m); i is any one element.", paths(d)]
    for key, equations in sections(d, form).items():
        lines += ["", TITLES[key]]
        lines += [f"  {show(eq.lhs)} = {_right(eq, show)}" for eq in equations]
    if proofs is not None:
        lines += ["", "Proofs (each checked by the engine; symbolic m unless it says otherwise)"]
        for p in proofs:
            lines.append(f"  [{p.status}] {p.key}: {p.claim}")
            if p.equation is not None:
                lines.append(f"      {show(p.equation)}")
            if not p.holds:
                lines.append(f"      lhs - rhs = {show(p.residual)}")
    return "\n".join(lines) + "\n"


def to_latex(d: Derivation, form: str = "both") -> str:
    """The equations as LaTeX ``align*`` blocks in the paper's notation."""
    show = lambda e: latex(e, d.notation)  # noqa: E731
    blocks = []
    for key, equations in sections(d, form).items():
        rows = " \\\\\n".join(f"  {show(eq.lhs)} &= {_right(eq, show)}" for eq in equations)
        blocks.append(f"% {TITLES[key]}\n\\begin{{align*}}\n{rows}\n\\end{{align*}}")
    return "\n".join(blocks) + "\n"


def _expr_json(expr: sp.Basic, d: Derivation) -> dict[str, str]:
    return {"text": text(expr, d.notation), "latex": latex(expr, d.notation), "sympy": str(expr)}


def to_json(d: Derivation, form: str = "both", proofs: list[Proof] | None = None) -> str:
    """Everything under stable keys: forward, gradients (with terms), compact, proofs."""
    shown = sections(d, form)
    doc = {
        "norm": d.norm.name,
        "mode": d.mode,
        "description": d.norm.description,
        "forward": [{"name": eq.key, "lhs": _expr_json(eq.lhs, d), "rhs": _expr_json(eq.rhs, d)} for eq in shown["forward"]],
    }
    if "paper" in shown:
        doc["gradients"] = {
            eq.key: {"lhs": _expr_json(eq.lhs, d), "rhs": _expr_json(eq.rhs, d),
                     "terms": [{"via": via, **_expr_json(term, d)} for via, term in eq.terms]}
            for eq in shown["paper"]
        }
    if "compact" in shown:
        doc["compact"] = {eq.key: {"lhs": _expr_json(eq.lhs, d), "rhs": _expr_json(eq.rhs, d)} for eq in shown["compact"]}
    if proofs is not None:
        doc["proofs"] = [
            {"key": p.key, "claim": p.claim, "status": p.status, "method": p.method,
             "equation": None if p.equation is None else _expr_json(p.equation, d),
             "residual": _expr_json(p.residual, d)}
            for p in proofs
        ]
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def document_context(norm) -> dict:
    """What the LaTeX templates need for ``norm``: both modes, both forms, every proof."""
    modes = []
    for mode in ("train", "eval"):
        d = derive(norm, mode)
        show = lambda e, d=d: latex(e, d.notation)  # noqa: E731
        modes.append({
            "mode": mode,
            "derivation": d,
            "paths": [show(d.value(t.via)) for t in d.terms["x"]],
            "sections": {key: [(show(eq.lhs), _right(eq, show)) for eq in equations] for key, equations in sections(d).items()},
            "x_terms": [(show(d.value(t.via)), show(t.expr)) for t in d.terms["x"]],
            "proofs": [{"p": p, "equation": None if p.equation is None else show(p.equation),
                        "residual": show(p.residual)} for p in d.proofs],
            "stats": [(show(d.symbols[s]), s) for s in d.stats],
        })
    train = modes[0]["derivation"]
    return {"norm": train.norm, "modes": modes, "titles": TITLES,
            "symbols": {name: latex(train.value(name), train.notation) for name in ("x", "xhat", "y")}}


def to_document(norm) -> str:
    """A complete LaTeX article for ``norm``: both modes, both forms, every proof's outcome."""
    return environment("latex").get_template("derivation.tex.j2").render(**document_context(norm))
