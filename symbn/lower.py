"""Lowering: programs become language-neutral kernel plans.

A kernel computes one program over every group of a tensor. Lowering it means three things:

* **Reductions.** Every sum over the group in the program (a statistic's mean, a backward's
  Σ dy·x̂) becomes a reduction ``red_j`` over the group's members of an element expression.
* **Passes.** A reduction can run in the first sweep over the data whose start already knows
  every per-group value its summand reads; an element output, in the first sweep after the
  reductions it needs. So each reduction and output gets the earliest pass the dependencies
  allow: every derivative of batch norm takes two (its reductions; the outputs), whatever the
  order.
* **One read for the statistics.** Written as defined, the training forward's statistics need a
  sweep each (the variance reads the mean). Where every statistic is a polynomial in the earlier
  ones (:func:`symbn.split.anchored`), they are instead computed from sums of powers of x about
  an anchor, ``ANCHOR``, the group's first member, all in the first sweep: batch norm's forward
  takes two passes (Σ(x − a), Σ(x − a)²; y). The rewriting is the split's exact identity (its
  merge for one process, the shift any number); its rounding is bounded because the anchor is a
  member: (a − μ)² ≤ m·σ², so Σ(x − a)² − (Σ(x − a))²/m multiplies the summation's relative
  error by 1 + (a − μ)²/σ², at most m + 1 and about 1 for a member within a few σ of the mean
  (``tests/test_anchored.py``). Powers above the second would cancel (m + 1)² fold and more, so a
  statistic that sums one keeps its own sweep, as does one not polynomial in the earlier
  statistics (mean |x − μ|).
* **Hoisting.** In each pass, every part of an expression that does not vary within a group is
  a per-group coefficient ``c<p>_<j>`` computed once per group; what is left is shared out with
  ``sympy.cse`` into temporaries ``t<p>_<j>``.

The derived levels are lowered from their compact forms (reductions hoisted, the statistics'
own identities applied: Σ x̂_k = 0 ...), with the forward's statistics as inputs saved by the
forward kernel, so that a kernel of any order reads x once per pass and recomputes no
statistic. A plan holds symbols named as the kernels' variables (``x_v`` per element,
``mean_g`` per group, ``red_0``...): the templates only decide where in the loops each
assignment is evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .derive import Derivation, derive, transforms_for
from .errors import SpecError
from .program import DATA, ELEMENT, GROUP, PARAM, SCALAR, Input, Program, Step
from .spec import Norm, resolve
from .split import COUNT as PART_COUNT
from .split import SHIFT as PART_SHIFT
from .split import anchored
from .sums import I, K, M

COUNT = sp.Symbol("m", positive=True)
"""The number of members of a group, in the kernels."""
MOMENTUM = sp.Symbol("momentum", positive=True)
SHIFT = sp.Symbol("shift", real=True)
"""Per group: the mean rounded to the working precision (see :func:`plan`'s ``frame``)."""
ANCHOR = sp.Symbol("anchor_g", real=True)
"""Per group: x of its first member (n, l, s all 0), read before the first pass of an anchored
kernel, whose statistics are summed about it (see the module's docstring)."""
MOST_ANCHORED_POWER = 2
"""The highest power of x − ANCHOR an anchored kernel sums (the variance's)."""


def element_var(name: str) -> sp.Symbol:
    """The kernel variable of a per-element quantity: one element of it, as a double."""
    return sp.Symbol(f"{name}_v", real=True)


def group_var(name: str) -> sp.Symbol:
    """The kernel variable of a per-group quantity (or a scalar)."""
    return sp.Symbol(f"{name}_g", real=True)


X, XHAT = element_var("x"), element_var("xhat")


@dataclass(frozen=True)
class Assign:
    """``name = expr``; for a reduction, ``name`` is the sum over the group of ``expr``."""

    name: str
    expr: sp.Expr

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name, real=True)


@dataclass(frozen=True)
class Arg:
    """One array (or number) a kernel reads or writes, named as in the program.

    Its extent follows from ``kind`` and ``role``: element data has x's shape; group data one
    value per group (q, p); an element param one per parameter position (p, l), a group param
    one per p; a scalar is one number. Param outputs are sums over the groups that share them."""

    name: str
    kind: str       # ELEMENT or GROUP
    role: str       # DATA, PARAM or SCALAR
    double: bool    # held in double whatever x's dtype: statistics, running statistics, sums over groups, scalars

    @property
    def var(self) -> sp.Symbol:
        """The variable that holds one value of it in the kernel."""
        return element_var(self.name) if self.kind == ELEMENT else group_var(self.name)


@dataclass(frozen=True)
class Pass:
    """One sweep over every member of every group.

    Before the sweep, per group, ``group`` (per-group values whose inputs are known: the
    program's group steps, then the hoisted coefficients); per member, ``element`` (temporaries
    and results, in order); the member's contributions ``sums`` (reduction ``red_j`` += expr),
    ``params`` (element param output at the member's parameter position += expr) and
    ``stores`` (element output at the member = expr)."""

    group: tuple[Assign, ...]
    element: tuple[Assign, ...]
    sums: tuple[Assign, ...]
    params: tuple[Assign, ...]
    stores: tuple[Assign, ...]
    framed: bool = False    # x_v is measured from SHIFT in this pass (plan's ``frame``)


@dataclass(frozen=True)
class Kernel:
    """One program over every group: its arguments, its passes, then per group ``final``
    (group values known only after the last pass, and each group output: data stored per
    group, params added into their position, as ``Assign(output name, expr)``)."""

    name: str                       # forward_train, backward_train, backward2_train, forward_eval...
    mode: str                       # train or eval
    transforms: tuple[str, ...]     # the chain that derived it from the forward (empty: the forward)
    inputs: tuple[Arg, ...]
    outputs: tuple[Arg, ...]
    passes: tuple[Pass, ...]
    final: tuple[Assign, ...]
    anchored: bool = False          # reads ANCHOR: its statistics are summed about the group's first member

    def arg(self, name: str) -> Arg:
        return next(a for a in (*self.inputs, *self.outputs) if a.name == name)

    @property
    def reductions(self) -> tuple[Assign, ...]:
        return tuple(a for p in self.passes for a in p.sums)


@dataclass(frozen=True)
class KernelPlan:
    """The kernels of one norm for one chain of transforms, in train and eval mode: those of the
    chain's last level, and the forward's too when the chain has one transform (``backward``:
    forward and backward, what order 1 needs; ``backward2``: the double backward alone). The
    running-statistics update (PyTorch's) goes with the forward."""

    norm: Norm
    transforms: tuple[str, ...]
    kernels: tuple[Kernel, ...]
    running: tuple[Assign, ...]      # run_<stat>_g after one step, PyTorch's momentum rule
    shift: str | None = None         # the statistic whose rounded value is the frame's SHIFT

    @property
    def name(self) -> str:
        """The plan's file stem: the norm's name, with the chain beyond one transform
        (``batchnorm``, ``batchnorm_backward2``, ``batchnorm_vjp_jvp``)."""
        return self.norm.name if len(self.transforms) == 1 else f"{self.norm.name}_{unit_name(self.transforms)}"

    def kernel(self, name: str) -> Kernel:
        return next(k for k in self.kernels if k.name == name)

    @property
    def stat_names(self) -> tuple[str, ...]:
        return self.norm.stat_names


def unit_name(transforms: tuple[str, ...]) -> str:
    """``forward``; ``backward`` for one vjp, ``backward2`` for two...; the chain spelled out
    otherwise (``vjp_jvp``: jvp of the backward)."""
    if not transforms:
        return "forward"
    if set(transforms) == {"vjp"}:
        return "backward" if len(transforms) == 1 else f"backward{len(transforms)}"
    return "_".join(transforms)


def kernel_name(transforms: tuple[str, ...], mode: str) -> str:
    """``forward_train``, ``backward_eval``, ``backward2_train``, ``vjp_jvp_eval``..."""
    return f"{unit_name(transforms)}_{mode}"


def plan(norm: str | Norm, transforms: tuple[str, ...] | str | None = None, order: int = 1, frame: bool = False) -> KernelPlan:
    """Lower ``norm``'s chain of transforms (default: ``order`` vjps) into one kernel plan: the
    kernels of its last level in both modes, and the forward's when the chain has one transform.

    ``frame``: for kernels whose element passes run in the input's precision (float32 NumPy),
    x_v is measured from ``SHIFT``, the group mean rounded to that precision, in every pass that
    knows the mean: x_v − SHIFT is exact or nearly so, and the rest of the offset (SHIFT − mean,
    small) is a per-group coefficient computed in double. Without it, x_v − mean would lose
    every digit the mean carries beyond float32 (1e4 + noise: a relative error of 1e-3 in x̂)."""
    norm = resolve(norm)
    chain = transforms_for(order, transforms)
    shift = mean_statistic(norm) if frame else None
    kernels = []
    for mode in ("train", "eval"):
        d = derive(norm, mode, transforms=chain)
        if len(chain) == 1:
            kernels.append(_forward_kernel(d.levels[0].source, norm, mode, shift))
        kernels.append(_derived_kernel(d, shift))
    running = tuple(_running(name, name in norm.unbiased) for name in norm.stat_names)
    return KernelPlan(norm, chain, tuple(kernels), running, shift)


def mean_statistic(norm: Norm) -> str | None:
    """The statistic that is the plain mean of x, if the norm has one: the frame's shift."""
    return next((name for name, text in norm.stats if text.replace(" ", "") == "x"), None)


def _forward_kernel(p: Program, norm: Norm, mode: str, shift: str | None) -> Kernel:
    """The forward program; in training its statistics are outputs too (saved for the backward),
    from one read of x where they can be (see the module's docstring)."""
    stats = [s for s in p.steps if s.kind == GROUP]
    inline = {s.target: s.definition for s in p.steps if s.kind == ELEMENT}
    outputs = [(_output(p, name), _inlined(p.value(name), inline)) for name in p.outputs]
    outputs += [(Arg(s.name, GROUP, DATA, True), s.target) for s in stats]
    inputs = [_input(q) for q in p.inputs]
    one_read = _anchored_statistics(p, norm) if mode == "train" else None
    return _lower(kernel_name((), mode), mode, (), inputs, one_read or stats, outputs, {}, _renaming(p), shift,
                  collect=False, anchored=one_read is not None, linear_in_x="whole")


def _anchored_statistics(p: Program, norm: Norm) -> list[Step] | None:
    """The training statistics as steps defined by sums of powers of x about ANCHOR (the split's
    merge for one process, :func:`symbn.split.anchored`), or None where that saves no sweep (no
    statistic reads an earlier one: RMS norm's mean of x² takes one sweep as defined), where one
    of them cannot be (not polynomial in the earlier ones) or would sum a power above
    MOST_ANCHORED_POWER."""
    stats = [s for s in p.steps if s.kind == GROUP]
    if not any(s.definition.has(*(e.target for e in stats[:j])) for j, s in enumerate(stats) if j):
        return None
    try:
        a = anchored(norm)
    except SpecError:
        return None
    powers = [int(part.name[1:]) for part in a.partials if part.name.startswith("S")]
    if max(powers, default=0) > MOST_ANCHORED_POWER:
        return None
    x = p.symbols["x"]
    member = {sp.Symbol(str(base), real=True): base[K] for base in p.symbols.values() if isinstance(base, sp.IndexedBase)}
    sums = {part.symbol: sp.Sum(part.summand.xreplace({PART_SHIFT: ANCHOR}).xreplace(member), (K, 1, M)) for part in a.partials}
    if any(e.base != x for total in sums.values() for e in total.atoms(sp.Indexed)):
        return None  # a summand reads an element quantity other than x
    steps = {s.name: s for s in stats}

    def mean_of(term: sp.Expr) -> sp.Expr:
        """term / m, term by term: the mean a + Σ(x − a)/m, never (a·m + Σ(x − a))/m, whose a·m can
        overflow where the mean does not."""
        term = term.xreplace({PART_COUNT: M, PART_SHIFT: ANCHOR, **sums})
        return sp.Add(*(t / M for t in sp.Add.make_args(term)))

    return [Step(m.name, GROUP, steps[m.name].role, m.symbol, mean_of(m.term)) for m in a.statistics]


def _derived_kernel(d: Derivation, shift: str | None) -> Kernel:
    """The last level of ``d``, from the compact forms of its outputs, reading the forward's
    statistics (train mode) as saved inputs. Inputs come newest first (a backward's dy before
    x), then the forward's, then the saved statistics: the order the kernels take them in."""
    p, last = d.program, d.levels[-1]
    xhat = next(s for s in d.forward if s.name == "xhat")
    outputs = [(_output(p, last.derived[name]), d.compact[name]) for name in d.outputs]
    saved = [Arg(name, GROUP, DATA, True) for name in d.stats] if d.mode == "train" else []
    inputs = [_input(q) for level in reversed(d.levels) for q in level.program.inputs if q not in level.source.inputs]
    inputs += [_input(q) for q in d.levels[0].source.inputs] + saved
    return _lower(kernel_name(d.transforms, d.mode), d.mode, d.transforms, inputs, [], outputs,
                  {xhat.target: xhat.definition}, _renaming(p), shift, collect=shift is None, linear_in_x="inside")


def _input(q: Input) -> Arg:
    """An input in x's dtype, except what is kept in double: the running statistics (params
    nothing differentiates) and scalars."""
    return Arg(q.name, q.kind, q.role, q.role == SCALAR or (q.role == PARAM and not q.differentiable))


def _output(p: Program, name: str) -> Arg:
    """An output: per element in x's dtype; per group, or summed over groups (params), in double."""
    q = p.quantity(name)
    return Arg(name, q.kind, q.role, not (q.kind == ELEMENT and q.role == DATA))


def _almost_everywhere(expr: sp.Expr) -> sp.Expr:
    """``expr`` with its Dirac deltas dropped: the derivative of sign(u) (from |u|, at order 2) is
    0 wherever it is defined, which is what a kernel computes, as PyTorch's autograd does."""
    return expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)


def _inlined(expr: sp.Expr, definitions: dict[sp.Basic, sp.Expr]) -> sp.Expr:
    """``expr`` with the per-element steps in ``definitions`` replaced by their definitions."""
    for _ in range(len(definitions) + 1):
        new = expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base in definitions,
                           lambda e: definitions[e.base].xreplace({I: e.indices[0]}))
        if new == expr:
            return expr
        expr = new
    raise RuntimeError("element steps are cyclic")


def _renaming(p: Program) -> dict[sp.Basic, str]:
    """Program symbol -> the quantity's name, for every input and step of ``p``."""
    return {symbol: name for name, symbol in p.symbols.items()}


def _to_vars(expr: sp.Expr, names: dict[sp.Basic, str]) -> sp.Expr:
    """Program symbols -> kernel variables: every element of an IndexedBase (x_i, x_k) becomes
    the member at hand, ``<name>_v``; a per-group symbol ``<name>_g``; m the group's count."""
    expr = expr.replace(lambda e: isinstance(e, sp.Indexed), lambda e: element_var(names[e.base]))
    return expr.xreplace({**{s: group_var(n) for s, n in names.items() if isinstance(s, sp.Symbol)}, M: COUNT})


def _lower(name: str, mode: str, transforms: tuple[str, ...], inputs: list[Arg], group_steps, outputs, elements: dict,
           names: dict[sp.Basic, str], shift: str | None, collect: bool, anchored: bool = False,
           linear_in_x: str | None = None) -> Kernel:
    """Reductions, passes and hoisting for one kernel (see the module's docstring).

    ``group_steps``: the program's per-group steps (statistics) to compute; ``outputs``: (Arg,
    expression) pairs; ``elements``: per-element steps kept as named temporaries (x̂); ``names``:
    program symbol -> quantity name; ``anchored``: the group steps read ANCHOR; ``linear_in_x``:
    in framed passes, how a store linear in x is collected in x (:func:`_linear_in_x`): "whole"
    (the forward's y = k·(x − shift) + k′) or "inside" its per-group factor (a derivative's
    dx = c·(k·(x − shift) + m·dy + r), which keeps the differences of the factored form)."""
    sums: list[Assign] = []

    def reduction(total: sp.Sum) -> sp.Symbol:
        (k, _, _), = total.limits
        if total.function.has(sp.Sum):
            raise NotImplementedError(f"{name}: a sum nested in another: {total}")
        body = _to_vars(total.function.xreplace({k: I}), names)
        same = next((a for a in sums if a.expr == body), None)
        if same is None:
            sums.append(same := Assign(f"red_{len(sums)}", body))
        return same.symbol

    def reduced(expr: sp.Expr) -> sp.Expr:
        """``expr`` in kernel variables, each sum over the group replaced by its reduction."""
        return _to_vars(expr.replace(lambda e: isinstance(e, sp.Sum), reduction), names)

    group = [Assign(group_var(s.name).name, reduced(s.definition)) for s in group_steps]
    results = [(arg, reduced(_almost_everywhere(expr))) for arg, expr in outputs]
    temporaries = [Assign(element_var(names[base]).name, reduced(definition)) for base, definition in elements.items()]
    read = set().union(*(a.expr.free_symbols for a in (*group, *sums, *temporaries)), *(e.free_symbols for _, e in results))
    inputs = [a for a in inputs if a.name == "x" or a.var in read]

    # earliest pass: per-group values known before pass `ready[v]`
    ready = {a.var: 0 for a in inputs if a.kind == GROUP}
    ready[COUNT] = 0
    if anchored:
        ready[ANCHOR] = 0

    def after(expr: sp.Expr) -> int:
        return max((ready[v] for v in expr.free_symbols if v in ready), default=0)

    reductions = list(sums)
    pending = list(group)
    level: dict[str, int] = {}
    while pending or any(r.name not in level for r in reductions):
        progressed = False
        for r in reductions:
            if r.name not in level and all(v in ready for v in _group_vars(r.expr, temporaries)):
                level[r.name] = after(_expanded(r.expr, temporaries))
                ready[r.symbol] = level[r.name] + 1
                progressed = True
        for g in list(pending):
            if all(v in ready for v in g.expr.free_symbols):
                ready[g.symbol] = after(g.expr)
                pending.remove(g)
                progressed = True
        if not progressed:
            raise NotImplementedError(f"{name}: cannot order the per-group values {[g.name for g in pending]}")
    element_results = [(a, e) for a, e in results if a.kind == ELEMENT]
    when = {a.name: after(_expanded(e, temporaries)) for a, e in element_results}
    count = max([*level.values(), *when.values(), -1]) + 1
    shift_ready = ready.get(group_var(shift)) if shift else None
    passes, coefficients = [], []
    for number in range(count):
        framed = shift_ready is not None and shift_ready <= number
        groups = [g for g in group if ready[g.symbol] == number]
        wanted = [(f"sum:{r.name}", r.expr) for r in reductions if level[r.name] == number]
        wanted += [(f"{'param' if a.role == PARAM else 'store'}:{a.name}", e) for a, e in element_results if when[a.name] == number]
        passes.append(_hoisted(number, groups, wanted, temporaries, framed, collect, coefficients,
                               linear_in_x if framed else None))
    final = [g for g in group if ready[g.symbol] >= count]
    final += [Assign(a.name, e) for a, e in results if a.kind == GROUP]
    return Kernel(name, mode, transforms, tuple(inputs), tuple(a for a, _ in outputs), tuple(passes), tuple(final), anchored)


def _expanded(expr: sp.Expr, temporaries: list[Assign]) -> sp.Expr:
    """``expr`` with the named element temporaries (x̂) written out: what it really reads."""
    return expr.xreplace({t.symbol: t.expr for t in temporaries})


def _group_vars(expr: sp.Expr, temporaries: list[Assign]) -> set[sp.Symbol]:
    return {v for v in _expanded(expr, temporaries).free_symbols if not v.name.endswith("_v")}


def _hoisted(number: int, groups: list[Assign], wanted: list[tuple[str, sp.Expr]], temporaries: list[Assign],
             framed: bool, collect: bool, coefficients: list[Assign], in_x: str | None = None) -> Pass:
    """One pass: ``wanted`` (tagged results) computed per member, with every per-group part
    hoisted into a coefficient and common subexpressions shared. ``coefficients`` holds those of
    the earlier passes (reused, not computed again); the pass adds its new ones.

    Results are collected in the named temporaries (x̂: dx = c0·dy + c1·x̂ + c2, never expanded
    in x itself), which are then written out and shared by ``sympy.cse`` like any other part."""
    frame = {X: X + SHIFT} if framed else {}
    varying = {v for _, e in wanted for v in _expanded(e, temporaries).free_symbols if v.name.endswith("_v")}
    varying |= {t.symbol for t in temporaries}
    known = len(coefficients)
    framed_temporaries = {t.symbol: t.expr.xreplace(frame) for t in temporaries}
    written = {symbol: hoist(expr, varying, coefficients) for symbol, expr in framed_temporaries.items()}
    lifted = []
    for tag, expr in wanted:
        collected = varying - {X} if collect and not tag.startswith("sum:") else set()
        expr = expr.xreplace(frame)
        if in_x and tag.startswith("store:"):
            data = varying - set(framed_temporaries)
            expr = _linear_in_x(expr.xreplace(framed_temporaries), data, in_x == "inside") or expr
        lifted.append(hoist(expr, varying, coefficients, collected & expr.free_symbols).xreplace(written))
    temps, finals = sp.cse(lifted, symbols=sp.numbered_symbols(f"t{number}_", real=True), order="none")
    out = {"sum": [], "param": [], "store": []}
    for (tag, _), value in zip(wanted, finals):
        kind, name = tag.split(":", 1)
        if kind != "param" or value != 0:  # a zero contribution to a parameter is no work
            out[kind].append(Assign(name, value))
    return Pass(tuple(groups) + tuple(coefficients[known:]), tuple(Assign(str(t), e) for t, e in temps),
                tuple(out["sum"]), tuple(out["param"]), tuple(out["store"]), framed)


def _linear_in_x(expr: sp.Expr, data: set[sp.Symbol], inside: bool) -> sp.Expr | None:
    """``expr`` collected in x where it is linear in x with a slope free of the element ``data``,
    else None. Whole: k·x + r (the forward's y = k·(x − shift) + k′, two operations per element).
    Inside: ``expr`` must be per-group factors times one such part, which alone is collected:
    c·(k·x + r), so that r's differences still cancel before the scaling (batch norm's dx =
    c·(k·(x − shift) + m·dy + r′): m·dy + r′ is exactly 0 in a group of one, where c·m·dy + c·r′,
    each rounded first, is an error the size of c (1.5e-5 measured in float32); five per-group
    values read per element where the fully factored form reads seven). r is ``expr`` at
    x − shift = 0, its differences as written (γ·(shift − μ), never γ·shift − γ·μ)."""
    if inside:
        factors = sp.Mul.make_args(expr)
        moving = [f for f in factors if f.free_symbols & data]
        if len(moving) != 1 or len(factors) == 1:
            return None
        part = _linear_in_x(moving[0], data, False)
        return None if part is None else sp.Mul(*(f for f in factors if f is not moving[0]), part, evaluate=False)
    slope = sp.diff(expr, X)
    if X not in expr.free_symbols or slope.free_symbols & data:
        return None
    return sp.Add(sp.Mul(slope, X, evaluate=False), expr.xreplace({X: 0}), evaluate=False)


def hoist(expr: sp.Expr, varying: set[sp.Symbol], coefficients: list[Assign], collect: set[sp.Symbol] = frozenset()) -> sp.Expr:
    """Loop-invariant code motion: every maximal part of ``expr`` free of the ``varying``
    symbols becomes a per-group coefficient (appended to ``coefficients``, shared with the parts
    already there). When ``expr`` is a polynomial in the ``collect`` symbols it is first written
    as a sum of coefficient times monomial, so that each coefficient is hoisted whole (batch
    norm's dx becomes c0·dy + c1·x̂ + c2: two multiply-adds per element). A negative factor is
    moved into the difference it multiplies (-a·(b - x) is a·(x - b)): no negation per element."""
    def invariant(part: sp.Expr) -> sp.Expr:
        if part.is_Atom or (-part).is_Atom:  # a number, a variable or its negation: nothing to save
            return part
        for assign in coefficients:
            if assign.expr == part:
                return assign.symbol
        coefficients.append(Assign(f"c_{len(coefficients)}", part))
        return coefficients[-1].symbol

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

    return split(_collected(expr, collect))


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
    monomials = [(sp.factor_terms(sp.cancel(c)), sp.Mul(*(g**k for g, k in zip(poly.gens, powers)))) for powers, c in poly.terms()]
    terms = [c if m == 1 else sp.Mul(c, m, evaluate=False) for c, m in monomials]
    return sp.Add(*terms, evaluate=False)


def _running(name: str, unbiased: bool) -> Assign:
    """PyTorch's rule: run = (1 - momentum)·run + momentum·stat, the variance made unbiased."""
    batch = group_var(name) * (COUNT / (COUNT - 1) if unbiased else 1)
    old = group_var(f"run_{name}")
    return Assign(f"run_{name}_g", (1 - MOMENTUM) * old + MOMENTUM * batch)

