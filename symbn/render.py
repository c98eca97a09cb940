"""Show a derivation: plain text, LaTeX equations, JSON, or a complete LaTeX article.

All four are views of one model (:func:`sections`): the forward steps, the paper-form
adjoints (each a list of per-path terms), the compact forms and, when asked, the proofs.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from .derive import Derivation, derive
from .jinja import environment
from .notation import latex, text
from .prove import BUDGET, Proof, prove
from .split import COUNT, SHIFT, X, Split
from .sums import M

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
    """The derivation as titled lists of equations, in the order the paper shows them: the
    forward, each level's staged steps (``paper``: the last level's), the compact form."""
    shown = {"forward": [Equation(s.name, s.value, s.definition) for s in d.forward]}
    if form in ("paper", "both"):
        for number, level in enumerate(d.levels, 1):
            key = "paper" if number == d.order else f"staged{number}"
            shown[key] = [Equation(name, level.program.value(level.derived[name]), sp.Add(*(t.expr for t in terms)),
                                   tuple((t.via, t.expr) for t in terms))
                          for name, terms in level.terms.items()]
    if form in ("compact", "both"):
        shown["compact"] = [Equation(name, d.adjoint(name), expr) for name, expr in d.compact.items()]
    return shown


TITLES = {
    "forward": "Forward",
    "paper": "Backward, paper form (one term per path: the consumer's adjoint times its local derivative)",
    "compact": "Backward, compact form (reductions hoisted, as frameworks compute it)",
}


def titles(d: Derivation, latex: bool = False) -> dict[str, str]:
    """Each section's title; at order 1 in reverse mode, :data:`TITLES`. ``latex``: as LaTeX
    text (math in $...$), for the article."""
    if d.transforms == ("vjp",):
        return TITLES
    out = {"forward": "Forward"}
    for number, level in enumerate(d.levels, 1):
        key = "paper" if number == d.order else f"staged{number}"
        out[key] = f"Level {number}: {_level_title(number, level.kind, latex)}, staged"
    out["compact"] = f"Level {d.order}: {_level_title(d.order, d.levels[-1].kind, latex)}, compact form (reductions hoisted)"
    return out


def _level_title(number: int, kind: str, latex: bool) -> str:
    if kind == "jvp":
        return "forward mode (each tangent: one term per quantity it reads, local derivative times tangent)"
    if number == 1:
        return "reverse mode, the backward pass (one term per path)"
    loss = rf"$\ell_{{{number}}} = \sum$ cotangent $\cdot$ output" if latex else \
        f"l{str(number).translate(_SUBSCRIPTS)} = Σ cotangent · output"
    return f"reverse mode over level {number - 1} ({loss} of level {number - 1}; one term per path)"


_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _right(eq: Equation, show: Callable[[sp.Basic], str]) -> str:
    """The right side; a paper-form sum keeps its derived term order."""
    if not eq.terms:
        return show(eq.rhs)
    out = show(eq.terms[0][1])
    for _, term in eq.terms[1:]:
        piece = show(term)
        out += f" - {piece[1:]}" if piece.startswith("-") else f" + {piece}"
    return out


def mode_title(d: Derivation) -> str:
    """What a derivation's mode is for its norm: training; inference (population statistics) for
    the norms PyTorch keeps running statistics for; for the others "eval" is a frozen-statistics
    variant, since PyTorch's inference computes their per-sample statistics from x as in training."""
    if d.mode == "train":
        return "training"
    return "inference" if d.norm.layout.running else "frozen-statistics"


def paths(d: Derivation) -> str:
    """One sentence: along which paths the loss reaches x_i, and why (higher orders: what is
    differentiated, and what the statistics are there)."""
    if d.transforms != ("vjp",):
        what = "functions of every x_k at every level" if d.mode == "train" else "constants (inputs, like ε) at every level"
        chain = "(".join(reversed(d.transforms)) + "(f" + ")" * d.order
        return f"Order {d.order}: {chain}, where f is the forward pass; the statistics are {what}."
    via = [t.via for t in d.terms["x"]]
    shown = ", ".join(text(d.value(name), d.notation) for name in via)
    if d.mode == "train":
        return (f"The statistics are functions of every x_k, so the loss reaches x_i along {len(via)} paths: "
                f"through {shown}.")
    what = ("population constants (inputs, like ε)" if d.norm.layout.running else
            "given constants (inputs, like ε; PyTorch's inference computes them from x, as training does)")
    return f"The statistics are {what}, so the loss reaches x_i along {len(via)} path: through {shown}."


def to_text(d: Derivation, form: str = "both", proofs: list[Proof] | None = None) -> str:
    show = lambda e: text(e, d.notation)  # noqa: E731
    lines = [f"{d.norm.name}, {mode_title(d)} mode: {d.norm.description}",
             "Sums run over the m elements of one group (k = 1..m); i is any one element.", paths(d)]
    heads = titles(d)
    for key, equations in sections(d, form).items():
        lines += ["", heads[key]]
        lines += [f"  {show(eq.lhs)} = {_right(eq, show)}" for eq in equations]
    if proofs is not None:
        lines += ["", f"Proofs (each checked by the engine{budget_phrase(proofs)}; symbolic m unless it says otherwise)"]
        for p in proofs:
            lines.append(f"  [{p.outcome}] {p.key}: {p.claim}")
            if p.equation is not None:
                lines.append(f"      {show(p.equation)}")
            lines += [f"      {line}" for line in proof_details(p, show)]
    return "\n".join(lines) + "\n"


def budget_phrase(proofs: list[Proof]) -> str:
    """", within a budget of 30 s of CPU time per claim" (the budget of ``proofs``), or ", with no time budget"."""
    budgets = sorted({p.budget_s for p in proofs}, key=lambda b: (b is None, b or 0))
    if not budgets:
        return ""
    if budgets == [None]:
        return ", with no time budget"
    return f", within a budget of {' or '.join(f'{b:g} s' for b in budgets if b is not None)} of CPU time per claim"


def proof_details(p: Proof, show: Callable[[sp.Basic], str]) -> list[str]:
    """What a proof's outcome rests on, in lines: a refuted claim's residual (or why it is not
    shown) and its counterexample (or the witness); an undecided claim's reason and budget."""
    if p.outcome == "refuted":
        residual = show(p.residual) if p.residual is not None else f"({p.residual_note or 'not simplified'})"
        witness = f"counterexample: {p.counterexample.text()}" if p.counterexample is not None else f"witness: {p.reason}"
        return [f"lhs - rhs = {residual}", witness]
    if p.outcome == "undecided":
        budget = "no time budget" if p.budget_s is None else f"budget {p.budget_s:g} s"
        return [f"undecided after {p.seconds or 0:.1f} s ({budget}): {p.reason}"]
    return []


def to_latex(d: Derivation, form: str = "both") -> str:
    """The equations as LaTeX ``align*`` blocks in the paper's notation."""
    show = lambda e: latex(e, d.notation)  # noqa: E731
    blocks, heads = [], titles(d)
    for key, equations in sections(d, form).items():
        rows = " \\\\\n".join(f"  {show(eq.lhs)} &= {_right(eq, show)}" for eq in equations)
        blocks.append(f"% {heads[key]}\n\\begin{{align*}}\n{rows}\n\\end{{align*}}")
    return "\n".join(blocks) + "\n"


def _expr_json(expr: sp.Basic, d: Derivation) -> dict[str, str]:
    return {"text": text(expr, d.notation), "latex": latex(expr, d.notation), "sympy": str(expr)}


def to_json(d: Derivation, form: str = "both", proofs: list[Proof] | None = None) -> str:
    """Everything under stable keys: forward, gradients (the last level's staged steps, with
    terms), earlier levels, compact, proofs."""
    shown = sections(d, form)

    def staged(equations: list[Equation]) -> dict:
        return {eq.key: {"lhs": _expr_json(eq.lhs, d), "rhs": _expr_json(eq.rhs, d),
                         "terms": [{"via": via, **_expr_json(term, d)} for via, term in eq.terms]}
                for eq in equations}

    doc = {
        "norm": d.norm.name,
        "mode": d.mode,
        "order": d.order,
        "transforms": list(d.transforms),
        "description": d.norm.description,
        "forward": [{"name": eq.key, "lhs": _expr_json(eq.lhs, d), "rhs": _expr_json(eq.rhs, d)} for eq in shown["forward"]],
    }
    if "paper" in shown:
        doc["gradients"] = staged(shown["paper"])
        doc["levels"] = [{"level": number, "transform": level.kind, "staged": staged(shown.get(f"staged{number}", shown["paper"]))}
                         for number, level in enumerate(d.levels, 1)]
    if "compact" in shown:
        doc["compact"] = {eq.key: {"lhs": _expr_json(eq.lhs, d), "rhs": _expr_json(eq.rhs, d)} for eq in shown["compact"]}
    if proofs is not None:
        doc["proofs"] = [
            {"key": p.key, "claim": p.claim, "outcome": p.outcome, "status": p.status, "reason": p.reason,
             "budget_s": p.budget_s, "seconds": None if p.seconds is None else round(p.seconds, 3), "method": p.method,
             "equation": None if p.equation is None else _expr_json(p.equation, d),
             "residual": None if p.residual is None else _expr_json(p.residual, d), "residual_note": p.residual_note,
             "counterexample": None if p.counterexample is None else p.counterexample.as_json()}
            for p in proofs
        ]
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def document_context(norm, transforms: tuple[str, ...] = ("vjp",), budget: float | None = BUDGET) -> dict:
    """What the LaTeX templates need for ``norm``: both modes, the backward in both forms with
    every proof (each within ``budget`` CPU seconds), and, for a longer chain of ``transforms``,
    that derivation and its proofs too."""
    modes = []
    for mode in ("train", "eval"):
        d = derive(norm, mode)
        show = lambda e, d=d: latex(e, d.notation)  # noqa: E731
        block = {
            "mode": mode,
            "title": mode_title(d),
            "derivation": d,
            "paths": [show(d.value(t.via)) for t in d.terms["x"]],
            "sections": {key: [(show(eq.lhs), _right(eq, show)) for eq in equations] for key, equations in sections(d).items()},
            "x_terms": [(show(d.value(t.via)), show(t.expr)) for t in d.terms["x"]],
            "proofs": _shown_proofs(d, show, budget),
            "stats": [(show(d.symbols[s]), s) for s in d.stats],
            "higher": None,
        }
        if tuple(transforms) != ("vjp",):
            h = derive(norm, mode, transforms=transforms)
            show_h = lambda e, h=h: latex(e, h.notation)  # noqa: E731
            block["higher"] = {
                "derivation": h, "chain": "(".join(reversed(h.transforms)) + "(f" + ")" * h.order,
                "sections": [(titles(h, latex=True)[key], [(show_h(eq.lhs), _right(eq, show_h)) for eq in equations])
                             for key, equations in sections(h).items() if key != "forward"],
                "proofs": _shown_proofs(h, show_h, budget),
            }
        modes.append(block)
    train = modes[0]["derivation"]
    return {"norm": train.norm, "modes": modes, "titles": TITLES, "transforms": tuple(transforms),
            "symbols": {name: latex(train.value(name), train.notation) for name in ("x", "xhat", "y")}}


def _shown_proofs(d: Derivation, show: Callable[[sp.Basic], str], budget: float | None = BUDGET) -> list[dict]:
    return [{"p": p, "equation": None if p.equation is None else show(p.equation),
             "residual": None if p.residual is None else show(p.residual)}
            for p in prove(d, budget=budget)]


def to_document(norm, transforms: tuple[str, ...] = ("vjp",), budget: float | None = BUDGET) -> str:
    """A complete LaTeX article for ``norm``: both modes, both forms, every proof's outcome; for
    a longer chain of ``transforms`` (order 2: ("vjp", "vjp")), that derivation too."""
    return environment("latex").get_template("derivation.tex.j2").render(**document_context(norm, transforms, budget))


# ----------------------------------------------------------------------------- the split across processes

def split_sections(s: Split) -> list[tuple[str, list[tuple[sp.Basic, sp.Basic]]]]:
    """The split of one training step across processes, as titled lists of (lhs, rhs): what a
    process computes over its members, what the one exchange gives every process, the forward
    per member; the backward's per-process sums, its one all-reduce, the gradients."""
    k = sp.Symbol("k")
    x = sp.Symbol("x", real=True)  # a member's x, written x_k in these sections
    local = [(SHIFT, sp.Sum(x, (k, 1, COUNT)) / COUNT)] if s.shifted else []
    local += [(p.symbol, sp.Sum(p.summand.xreplace({X: x}), (k, 1, COUNT))) for p in s.partials]
    p = sp.Symbol("p", integer=True, positive=True)
    processes = sp.Symbol("P", integer=True, positive=True)
    merged = [(M, sp.Sum(COUNT, (p, 1, processes)))]
    merged += [(m.symbol, sp.Sum(m.term, (p, 1, processes)) / M) for m in s.statistics]
    elements = [(sp.Symbol(name, real=True), e) for name, e in s.elements.items()]
    sums = [(r.symbol, sp.Sum(r.summand, (k, 1, COUNT))) for r in s.reductions]
    data = [(sp.Symbol("dx", real=True), s.gradients["x"])]
    params = [(sp.Symbol(f"d{name}", real=True), e) for name, e in s.gradients.items() if name != "x"]
    return [
        ("Forward, on each process p over its own m_p members (k = 1..m_p)", local),
        (f"One exchange (all-gather: {s.values_gathered} numbers per process, C groups), then on every process",
         merged),
        ("Forward, per member i", elements),
        ("Backward, on each process over its own members", sums),
        (f"One all-reduce (sum over processes) of {', '.join(r.name for r in s.shared)}, then per member i", data),
        ("Parameters' gradients: each process's own sums (a data-parallel wrapper adds them)", params),
    ]


def _split_index(title: str) -> str:
    """The element index a section's per-member symbols take: ``k`` inside a process's sums over
    its own members, ``i`` for any one member."""
    return "k" if title.startswith(("Forward, on each process", "Backward, on each process")) else "i"


def split_to_text(s: Split, proofs: list[Proof] | None = None) -> str:
    lines = [f"{s.norm.name}, training mode, the batch split across processes: {s.norm.description}",
             "Each process holds m_p of a group's m = Σ_p m_p members; one exchange in the forward and one in the "
             "backward make every process's results those of the whole batch."]
    for title, rows in split_sections(s):
        notation = s.notation(_split_index(title))
        show = lambda e, notation=notation: text(e, notation)  # noqa: E731
        lines += ["", title] + [f"  {show(lhs)} = {show(rhs)}" for lhs, rhs in rows]
    if proofs is not None:
        lines += ["", "Proofs (checked by the engine)"]
        for p in proofs:
            lines += [f"  [{p.outcome}] {p.key}: {p.claim}", f"      {p.method}"]
            if p.reason:
                lines.append(f"      {p.reason}")
    return "\n".join(lines) + "\n"


def split_to_latex(s: Split) -> str:
    """The split as LaTeX ``align*`` blocks, one per section of :func:`split_sections`, each
    after a ``% title`` comment."""
    blocks = []
    for title, rows in split_sections(s):
        notation = s.notation(_split_index(title))
        show = lambda e, notation=notation: latex(e, notation)  # noqa: E731
        body = " \\\\\n".join(f"  {show(lhs)} &= {show(rhs)}" for lhs, rhs in rows)
        blocks.append(f"% {title}\n\\begin{{align*}}\n{body}\n\\end{{align*}}")
    return "\n".join(blocks) + "\n"


def split_to_json(s: Split, proofs: list[Proof] | None = None) -> str:
    """The split under stable keys: norm, sections (title, equations of lhs and rhs, each as
    text, latex and sympy), values_gathered, shared (the all-reduced sums' names) and, when
    given, proofs."""
    def side(expr: sp.Basic, notation: dict) -> dict[str, str]:
        return {"text": text(expr, notation), "latex": latex(expr, notation), "sympy": str(expr)}

    shown = []
    for title, rows in split_sections(s):
        notation = s.notation(_split_index(title))
        shown.append({"title": title, "equations": [{"lhs": side(lhs, notation), "rhs": side(rhs, notation)}
                                                    for lhs, rhs in rows]})
    doc = {"norm": s.norm.name, "sections": shown, "values_gathered": s.values_gathered,
           "shared": [r.name for r in s.shared]}
    if proofs is not None:
        doc["proofs"] = [{"key": p.key, "claim": p.claim, "outcome": p.outcome, "method": p.method, "reason": p.reason}
                         for p in proofs]
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
