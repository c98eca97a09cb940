"""Lowering: a derivation becomes a language-neutral kernel plan.

A plan is a few lists of assignments over plain symbols whose names are the kernels' own
variable names (``x_v``, ``stat_mean``, ``saved_invstd``, ``red_0``...). Per group: the
statistics (one reduction pass each, in order, so the variance is two-pass), the saved
quantities the backward needs, then the element-wise pass; for the backward, the
reductions the compact form hoists, then the element-wise pass. Every expression is taken
from the derivation; the templates only decide where in the loops each one is evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .derive import ELEMENT, Derivation, derive
from .spec import Norm, resolve
from .sums import I, K, M

X, DY, XHAT, GAMMA, BETA = sp.symbols("x_v dy_v xhat_v gamma_v beta_v", real=True)
SHIFT = sp.Symbol("shift", real=True)  # per group: the mean rounded to the working precision
MOMENTUM = sp.Symbol("momentum", positive=True)
EPS = sp.Symbol("eps", positive=True)
COUNT = sp.Symbol("m", positive=True)


@dataclass(frozen=True)
class Assign:
    """``name = expr``; for a reduction, ``name`` is the mean or sum over the group of ``expr``."""

    name: str
    expr: sp.Expr

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name, real=True)


@dataclass(frozen=True)
class Pass:
    """An element-wise pass: per-group assignments hoisted out of the loop, then per-element ones.

    The last element assignment of a pass is its result (``xhat_v``, ``y_v``, ``dx_v``)."""

    group: tuple[Assign, ...]
    element: tuple[Assign, ...]


@dataclass(frozen=True)
class KernelPlan:
    norm: Norm
    element_affine: bool
    stats: tuple[Assign, ...]        # stat = mean over the group of expr(x_v, earlier stats)
    saved: tuple[Assign, ...]        # what the forward keeps for the backward, from stats and eps
    xhat: Pass                       # x_v, saved -> xhat_v (the reductions' pass)
    y: Pass                          # x_v, saved, gamma_v, beta_v -> y_v
    reductions: tuple[Assign, ...]   # red_j = sum over the group of expr(dy_v, xhat_v, gamma_v)
    dx: Pass                         # x_v, dy_v, saved, reductions -> dx_v
    dgamma: sp.Expr                  # each element's contribution to dl/dgamma
    dbeta: sp.Expr
    y_eval: Pass                     # x_v, running statistics, eps -> y_v
    dx_eval: Pass
    dgamma_eval: sp.Expr
    dbeta_eval: sp.Expr
    running: tuple[Assign, ...]      # run_<stat> after one step, PyTorch's momentum rule
    shift: str | None = None         # the saved mean: xhat, y and dx take x_v - shift (see plan's frame)

    @property
    def stat_names(self) -> tuple[str, ...]:
        return self.norm.stat_names

    @property
    def param_sums(self) -> dict[str, int | None]:
        """dgamma, dbeta -> the reduction that already sums its contributions, or None. Where the
        layout has one parameter per group, such a gradient is that reduction summed over q, and
        the backward's first pass need not accumulate it again."""
        def reduction_of(contribution: sp.Expr) -> int | None:
            return next((j for j, r in enumerate(self.reductions) if r.expr == contribution), None)
        per_group = self.norm.layout.params_per_group
        return {name: reduction_of(getattr(self, name)) if per_group else None for name in ("dgamma", "dbeta")}

    @property
    def saved_names(self) -> tuple[str, ...]:
        return tuple(a.name.removeprefix("saved_") for a in self.saved)


def plan(norm: str | Norm, frame: bool = False) -> KernelPlan:
    """Lower both modes of ``norm`` into one kernel plan.

    ``frame``: for kernels whose element passes run in the input's precision (float32 NumPy), x_v
    in the training passes is measured from ``shift``, the group mean rounded to that precision:
    x_v - shift is exact or nearly so, and the rest of the offset (shift - mean, small) is a
    per-group coefficient computed in double. Without it, x_v - mean would lose every digit the
    mean carries beyond float32 (1e4 + noise: a relative error of 1e-3 in xhat)."""
    norm = resolve(norm)
    train, inference = derive(norm, "train"), derive(norm, "eval")
    element_affine = norm.affine == ELEMENT
    to_code = _renaming(train, "stat_")
    stats = tuple(Assign(f"stat_{s.name}", _body(s.definition).xreplace(to_code)) for s in train.forward if s.kind == "group")
    xhat_def = next(s.definition for s in train.forward if s.name == "xhat").xreplace(to_code)
    saved, to_saved = _saved(xhat_def, stats)
    y_def = next(s.definition for s in train.forward if s.name == "y").xreplace(to_code)
    group_level = _group_level(element_affine)

    compact = {name: expr.xreplace(to_code) for name, expr in train.compact.items()}
    atoms = sorted(set().union(*(e.atoms(sp.Sum) for e in compact.values())), key=sp.default_sort_key)
    reductions = tuple(Assign(f"red_{j}", _body(a)) for j, a in enumerate(atoms))
    to_reduction = {a: r.symbol for a, r in zip(atoms, reductions)}
    dx = _in_saved(compact["x"].xreplace(to_reduction), to_saved)
    allowed = {DY, XHAT, GAMMA, COUNT, *(a.symbol for a in saved), *(r.symbol for r in reductions)}
    if not dx.free_symbols <= allowed:
        raise NotImplementedError(f"{norm.name}: the backward needs {sorted(map(str, dx.free_symbols - allowed))}, "
                                  "which the forward does not save")

    to_running = _renaming(inference, "run_")
    inference_compact = {name: expr.xreplace(to_running) for name, expr in inference.compact.items()}
    xhat_eval = next(s.definition for s in inference.forward if s.name == "xhat").xreplace(to_running)
    mean = next((a for a in saved if a.expr in {s.symbol for s in stats if s.expr == X}), None)
    shift = mean.name if frame and mean is not None else None
    into_frame = {X: X + SHIFT} if shift else {}
    xhat = hoist("xhat_v", _in_saved(xhat_def, to_saved).xreplace(into_frame), group_level)
    dgamma_eval, dbeta_eval = (_contribution(inference_compact[name]) for name in ("gamma", "beta"))
    # dx as c0·dy + c1·xhat + c2 (in x_v's coordinate xhat_v, never expanded in x_v itself) in double;
    # in the input's precision the factored form, whose differences cancel exactly when they should
    collected = set() if shift else group_level - {X}
    return KernelPlan(
        norm=norm,
        element_affine=element_affine,
        stats=stats,
        saved=saved,
        xhat=xhat,
        y=hoist("y_v", y_def.xreplace({XHAT: _in_saved(xhat_def, to_saved)}).xreplace(into_frame), group_level),
        reductions=reductions,
        dx=after(xhat, hoist("dx_v", dx, group_level, collected)),
        dgamma=_contribution(compact["gamma"]),
        dbeta=_contribution(compact["beta"]),
        y_eval=hoist("y_v", y_def.xreplace({XHAT: xhat_eval}), group_level),
        dx_eval=after(hoist("xhat_v", xhat_eval, group_level), hoist("dx_v", inference_compact["x"], group_level, collected),
                      dgamma_eval, dbeta_eval),
        dgamma_eval=dgamma_eval,
        dbeta_eval=dbeta_eval,
        running=tuple(_running(name, name in norm.unbiased) for name in norm.stat_names),
        shift=shift,
    )


def _renaming(d: Derivation, prefix: str) -> dict[sp.Basic, sp.Basic]:
    """Derivation symbols -> kernel variables. Every element of a group (x_i, x_k) becomes the
    element at hand; the statistics become ``stat_*`` (train) or ``run_*`` (running, eval)."""
    s = d.symbols
    table: dict[sp.Basic, sp.Basic] = {s["eps"]: EPS, M: COUNT}
    for name, code in (("x", X), ("dy", DY), ("xhat", XHAT), ("gamma", GAMMA), ("beta", BETA)):
        if isinstance(s[name], sp.IndexedBase):
            table.update({s[name][I]: code, s[name][K]: code})
        else:
            table[s[name]] = code
    table.update({s[name]: sp.Symbol(prefix + name, real=True) for name in d.stats})
    return table


def _body(expr: sp.Expr) -> sp.Expr:
    """The summand of the one group sum in ``expr`` (a statistic's mean, or a reduction)."""
    (total,) = expr.atoms(sp.Sum)
    return total.function


def _saved(xhat: sp.Expr, stats: tuple[Assign, ...]) -> tuple[tuple[Assign, ...], dict[sp.Expr, sp.Symbol]]:
    """What the backward needs: each power involving eps (the inverse standard deviation),
    and the statistics xhat uses outside of it (the mean). Returns the assignments and the
    map from those expressions to the saved symbols."""
    roots = sorted({p for p in xhat.atoms(sp.Pow) if p.base.has(EPS)}, key=sp.default_sort_key)
    names = ["invstd"] if len(roots) == 1 else [f"invstd{j}" for j in range(len(roots))]
    outside = xhat.xreplace({r: sp.Dummy() for r in roots}).free_symbols
    kept = [Assign(f"saved_{a.name.removeprefix('stat_')}", a.symbol) for a in stats if a.symbol in outside]
    inverse = [Assign(f"saved_{name}", root) for name, root in zip(names, roots)]
    to_saved = {a.expr: a.symbol for a in kept + inverse}
    return tuple(kept + inverse), to_saved


def _in_saved(expr: sp.Expr, to_saved: dict[sp.Expr, sp.Symbol]) -> sp.Expr:
    """``expr`` written in the saved quantities: (var + eps)^q becomes invstd^(q / (-1/2))."""
    roots = {root.base: (symbol, root.exp) for root, symbol in to_saved.items() if isinstance(root, sp.Pow)}

    def in_saved(p: sp.Pow) -> sp.Expr:
        symbol, exp = roots[p.base]
        return symbol ** (p.exp / exp)

    bare = {base: symbol ** (1 / exp) for base, (symbol, exp) in roots.items()}
    stats = {k: v for k, v in to_saved.items() if not isinstance(k, sp.Pow)}
    return expr.replace(lambda e: isinstance(e, sp.Pow) and e.base in roots, in_saved).xreplace(bare).xreplace(stats)


def _group_level(element_affine: bool) -> set[sp.Symbol]:
    """Symbols that vary within a group: what must stay inside the element loop."""
    return {X, DY, XHAT} | ({GAMMA, BETA} if element_affine else set())


def _contribution(expr: sp.Expr) -> sp.Expr:
    """One element's contribution to a parameter gradient: the summand of a per-group sum,
    or the per-element expression itself."""
    return _body(expr) if expr.has(sp.Sum) else expr


def _running(name: str, unbiased: bool) -> Assign:
    """PyTorch's rule: run = (1 - momentum)·run + momentum·stat, the variance made unbiased."""
    batch = sp.Symbol(f"stat_{name}", real=True) * (COUNT / (COUNT - 1) if unbiased else 1)
    old = sp.Symbol(f"run_{name}", real=True)
    return Assign(f"run_{name}", (1 - MOMENTUM) * old + MOMENTUM * batch)


def hoist(result: str, expr: sp.Expr, varying: set[sp.Symbol], collect: set[sp.Symbol] = frozenset()) -> Pass:
    """Loop-invariant code motion, then common subexpressions.

    Every maximal part of ``expr`` free of the ``varying`` symbols becomes a per-group
    coefficient ``c_j``; what is left is shared out with ``sympy.cse`` into ``t_j``. When
    ``expr`` is a polynomial in the ``collect`` symbols it is first written as a sum of
    coefficient times monomial, so that each coefficient is hoisted whole (batch norm's dx
    becomes c0·dy + c1·x̂ + c2: two multiply-adds per element). A negative factor is moved
    into the difference it multiplies (-a·(b - x) is a·(x - b)): no negation per element."""
    group: list[Assign] = []

    def invariant(part: sp.Expr) -> sp.Expr:
        if part.is_Atom or (-part).is_Atom:  # a number, a variable or its negation: nothing to save
            return part
        for assign in group:
            if assign.expr == part:
                return assign.symbol
        group.append(Assign(f"c_{result}_{len(group)}", part))
        return group[-1].symbol

    def split(e: sp.Expr) -> sp.Expr:
        if not (e.free_symbols & varying):
            return invariant(e)
        if isinstance(e, sp.Mul):
            e = _sign_inside(e, varying)
        if isinstance(e, (sp.Add, sp.Mul)):
            fixed = [a for a in e.args if not (a.free_symbols & varying)]
            moving = [split(a) for a in e.args if a.free_symbols & varying]
            return e.func(invariant(e.func(*fixed)), *moving) if fixed else e.func(*moving)
        return e.func(*(split(a) for a in e.args)) if e.args else e

    lifted = split(_collected(expr, collect & expr.free_symbols))
    temporaries, (final,) = sp.cse([lifted], symbols=sp.numbered_symbols(f"t_{result}_", real=True))
    element = [Assign(str(t), e) for t, e in temporaries] + [Assign(result, final)]
    return Pass(tuple(group), tuple(element))


def _sign_inside(product: sp.Mul, varying: set[sp.Symbol]) -> sp.Expr:
    """-a·(b - x) as a·(x - b): a negative factor moved into a difference that varies."""
    coefficient, factors = product.as_coeff_mul()
    difference = next((f for f in factors if isinstance(f, sp.Add) and f.free_symbols & varying), None)
    if coefficient >= 0 or difference is None:
        return product
    return sp.Mul(-coefficient, *(-f if f is difference else f for f in factors))


def _collected(expr: sp.Expr, symbols: set[sp.Symbol]) -> sp.Expr:
    """``expr`` as Σ coefficient·monomial in ``symbols`` when it is a polynomial in them, else as it is.
    The coefficients are kept unevaluated products, so that each is one hoistable part."""
    if not symbols:
        return expr
    try:
        poly = sp.Poly(expr, *sorted(symbols, key=sp.default_sort_key))
    except sp.PolynomialError:
        return expr
    if any(c.free_symbols & symbols for c in poly.coeffs()):
        return expr
    monomials = [(sp.factor_terms(c), sp.Mul(*(g**k for g, k in zip(poly.gens, powers)))) for powers, c in poly.terms()]
    terms = [c if m == 1 else sp.Mul(c, m, evaluate=False) for c, m in monomials]
    return sp.Add(*terms, evaluate=False)


def after(first: Pass, then: Pass, *also: sp.Expr) -> Pass:
    """``then`` as a self-contained pass: preceded by ``first`` when it, or one of the expressions
    ``also`` evaluated in the same loop, uses ``first``'s result."""
    needed = sp.Symbol(first.element[-1].name, real=True)
    if not any(e.has(needed) for e in (*(a.expr for a in then.element), *also)):
        return then
    return Pass(first.group + then.group, first.element + then.element)
