"""Split statistics: one training step of a norm whose groups are spread over several processes.

Synchronized batch norm splits each channel's batch across P processes: process p holds m_p of
the group's m = Σ_p m_p members, and the processes can exchange only a few numbers per group.
Every statistic is a mean over the whole group, s_j = 1/m Σ_k f_j(x_k, s_1, …, s_{j-1}). This
module derives, from those definitions alone, what each process computes over its own members
and how **one** exchange merges it exactly, for any norm:

* f_j is written as a polynomial in the earlier statistics, Σ_α s^α a_α(x): a process cannot know
  them before the exchange, but it can sum each coefficient a_α over its members. A statistic
  that is not polynomial in the earlier ones (|x − μ|: its sum is no function of per-process
  numbers while μ is unknown) would need a second exchange or x itself, and is refused, with
  that reason;
* a coefficient a_α polynomial in x is expanded about the process's own mean c_p,
  a_α(c_p + d) = Σ_n b_n(c_p) dⁿ, so the process sends m_p, c_p and the central power sums
  S⁽ⁿ⁾_p = Σ_{k∈p} (x_k − c_p)ⁿ (n ≥ 2; S⁽¹⁾_p = 0 by c_p's definition), and the merge is
  Σ_p Σ_n b_n(c_p) S⁽ⁿ⁾_p. For the variance this is Chan, Golub and LeVeque's update,
  Σ_p [S⁽²⁾_p + m_p (c_p − μ)²]: no E[x²] − E[x]² cancellation, any split of the batch
  (uneven, a process with no members);
* a coefficient that is not polynomial in x (|x|, log x) is summed as it is, Σ_{k∈p} a_α(x_k).

The backward needs no such care. Given the merged statistics, each of its sums over the group
(Σ ∂l/∂y_k x̂_k ...) is a sum of per-member terms, so each process sums its own members and one
all-reduce adds them; each ∂l/∂x_i is then the single-batch compact form (:mod:`symbn.simplify`)
reading the totals and the global m. The parameters' gradients stay per process: a data-parallel
wrapper (DDP) sums or averages them itself.

:func:`prove` proves the merge for symbolic per-process counts m₁ and m₂ (data as per-process
power sums, the shifts as their means), and the distributed gradients against the derivative of
the concatenated batch's forward at explicit sizes, exactly.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import sympy as sp

from .derive import derive
from .errors import SpecError
from .program import ELEMENT, GROUP, Program, forward_program
from .prove import Proof
from .spec import Norm, Notation, resolve
from .sums import I, K, M

X = sp.Symbol("x", real=True)
"""One member's x, in the per-member expressions of this module."""
COUNT = sp.Symbol("Mp", integer=True, nonnegative=True)
"""m_p: how many members of the group the process holds."""
SHIFT = sp.Symbol("Cp", real=True)
"""c_p: the process's own mean of x over its members (0 when it has none)."""


_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


@dataclass(frozen=True)
class Partial:
    """One number per group that each process sums over its own members: Σ_{k∈p} ``summand``."""

    name: str           # S2, S3 (central power sums), A0, A1 (other sums): never a spec's name
    summand: sp.Expr    # of X and SHIFT

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name, real=True)


@dataclass(frozen=True)
class Merged:
    """A statistic over the whole group: 1/m Σ_p ``term``, ``term`` reading the process's
    count, shift and partials, the earlier (merged) statistics and eps."""

    name: str
    symbol: sp.Symbol   # the statistic's symbol in the program
    term: sp.Expr


@dataclass(frozen=True)
class Reduction:
    """A sum over the group in the backward: Σ_k ``summand``, per process over its members."""

    name: str           # R0, R1...
    summand: sp.Expr    # of the element symbols (x, dy, xhat...) and group values
    shared: bool        # all-reduced: some ∂l/∂x reads it (else only a parameter's gradient does)

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name, real=True)


@dataclass(frozen=True)
class Split:
    """A norm's training step across processes (see the module's docstring).

    Element quantities are plain symbols named as in the program (``x``, ``dy``, ``xhat``); per
    group: the statistics' symbols, ``epsilon``, γ and β, the reductions' symbols, m (the global
    count, :data:`symbn.sums.M`)."""

    norm: Norm
    program: Program                     # the training forward
    written: Mapping[sp.Basic, Notation]  # how the derivation writes its symbols (dy, xhat, the statistics)
    shifted: bool                        # whether a process computes its shift c_p
    partials: tuple[Partial, ...]
    statistics: tuple[Merged, ...]
    elements: Mapping[str, sp.Expr]      # xhat, y: per member, from the merged statistics
    reductions: tuple[Reduction, ...]
    gradients: Mapping[str, sp.Expr]     # input name -> its gradient: x per member, γ and β per group

    def __post_init__(self) -> None:
        for name in ("written", "elements", "gradients"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def shared(self) -> tuple[Reduction, ...]:
        """The reductions the backward's one all-reduce adds."""
        return tuple(r for r in self.reductions if r.shared)

    @property
    def values_gathered(self) -> str:
        """What each process contributes to the forward's exchange, per group, as a formula in C
        (groups) beside the count: ``1 + 2C`` for batch norm."""
        return f"1 + {int(self.shifted) + len(self.partials)}C"

    def notation(self, index: str = "i") -> dict[sp.Basic, Notation]:
        """How this module's symbols are written: the derivation's notation, per-member symbols
        at element ``index`` (``k`` inside a sum over a process's members)."""
        table = dict(self.written)
        for base, written in self.written.items():
            if isinstance(base, sp.IndexedBase):
                table[sp.Symbol(str(base), real=True)] = Notation(written.text.format(i=index), written.latex.format(i=index))
        table.update({COUNT: Notation("m_p", "m_p"), SHIFT: Notation("c_p", "c_p")})
        for part in self.partials:
            n = part.name[1:]
            table[part.symbol] = (Notation(f"S⁽{n.translate(_SUPERSCRIPTS)}⁾_p", rf"S^{{({n})}}_p") if part.name.startswith("S")
                                  else Notation(f"A{n}_p", rf"A^{{({n})}}_p"))
        for r in self.reductions:
            table[r.symbol] = Notation(f"R{r.name[1:]}", rf"R_{{{r.name[1:]}}}")
        return table


def split(norm: str | Norm) -> Split:
    """The split of ``norm``'s training step (see the module's docstring); a statistic that
    cannot be merged in one exchange is a :class:`SpecError` naming it and why."""
    norm = resolve(norm)
    if norm.layout.kind != "channel":
        raise SpecError(f"{norm.name}: its statistics are {norm.layout.statistics}, so a group never spans processes "
                        "that split the batch: there is nothing to synchronize (only a layout of channel geometry, "
                        "statistics over the batch, is split)")
    program = forward_program(norm, "train")
    stats = [s for s in program.steps if s.kind == GROUP]
    partials: dict[sp.Expr, Partial] = {}
    merged = [Merged(s.name, s.target, _merge(norm, s.name, _body(s), [e.target for e in stats[:j]], partials))
              for j, s in enumerate(stats)]
    elements = {s.name: _per_member(s.definition) for s in program.steps if s.kind == ELEMENT}
    reductions, gradients, written = _backward(norm)
    shifted = any(p.summand.has(SHIFT) for p in partials.values()) or any(m.term.has(SHIFT) for m in merged)
    return Split(norm, program, written, shifted, tuple(partials.values()), tuple(merged), elements, reductions, gradients)


@dataclass(frozen=True)
class Anchored:
    """A norm's training statistics over one whole group, from sums over its members about an
    anchor a (any number: a kernel takes the group's first member), all readable in one sweep:
    the power sums Σ_k (x_k − a)ⁿ, n ≥ 1, and the sums of coefficients not polynomial in x. The
    split's merge for a single process whose shift is a rather than its mean (so Σ (x_k − a) is
    kept): each statistic is ``term`` / m with COUNT the group's m and SHIFT the anchor."""

    norm: Norm
    partials: tuple[Partial, ...]
    statistics: tuple[Merged, ...]


def anchored(norm: str | Norm) -> Anchored:
    """``norm``'s statistics from sums about an anchor (:class:`Anchored`), for any layout; a
    statistic not polynomial in the earlier ones is a :class:`SpecError`, as for :func:`split`."""
    norm = resolve(norm)
    stats = [s for s in forward_program(norm, "train").steps if s.kind == GROUP]
    partials: dict[sp.Expr, Partial] = {}
    merged = [Merged(s.name, s.target, _merge(norm, s.name, _body(s), [e.target for e in stats[:j]], partials, centered=False))
              for j, s in enumerate(stats)]
    return Anchored(norm, tuple(partials.values()), tuple(merged))


def _body(step) -> sp.Expr:
    """f in a statistic's definition 1/m Σ_k f(x_k, ...), at member X."""
    total = step.definition * M
    if not (isinstance(total, sp.Sum) and total.limits == ((K, 1, M),)):
        raise SpecError(f"statistic {step.name} is not a mean over the group: {step.definition}")
    return _per_member(total.function.xreplace({K: I}))


def _per_member(expr: sp.Expr) -> sp.Expr:
    """Elements at the index i (x[i], xhat[i]) as plain symbols named as the quantity."""
    return expr.replace(lambda e: isinstance(e, sp.Indexed) and e.indices == (I,),
                        lambda e: sp.Symbol(str(e.base), real=True))


def _merge(norm: Norm, name: str, body: sp.Expr, earlier: list[sp.Symbol], partials: dict[sp.Expr, Partial],
           centered: bool = True) -> sp.Expr:
    """Σ over one process's members of ``body``, written as its per-process term of the merge
    (``centered``: the shift is the members' own mean, see :func:`_summed`)."""
    text = dict(norm.stats)[name]
    try:
        poly = sp.Poly(body, *earlier) if earlier else None
    except sp.PolynomialError:
        poly = None
    if earlier and (poly is None or any(c.free_symbols & set(earlier) for c in poly.coeffs())):
        raise SpecError(
            f"{norm.name}: statistic {name} = mean of {text} is not a polynomial in the earlier statistics "
            f"({', '.join(str(e) for e in earlier)}), so a process cannot sum its members' share before it knows them: "
            "it cannot be merged across processes in one exchange (it would need a second exchange, or x itself), "
            "and symbn refuses to split it")
    terms = poly.terms() if poly is not None else [((), body)]
    out = sp.S.Zero
    for powers, coefficient in terms:
        monomial = sp.Mul(*(g**k for g, k in zip(earlier, powers)))
        out += monomial * _summed(coefficient, partials, centered)
    # shown as Chan's update: m_p (c_p − μ)² + S⁽²⁾_p, each per-process number times its factored coefficient
    numbers = [COUNT, *(p.symbol for p in partials.values())]
    collected = sp.collect(sp.expand(out), numbers, evaluate=False)
    return sp.Add(*(sp.factor(c) * v for v, c in collected.items()))


def _summed(coefficient: sp.Expr, partials: dict[sp.Expr, Partial], centered: bool = True) -> sp.Expr:
    """Σ_{k∈p} coefficient(x_k) in the per-process numbers: power sums about the shift when it is
    a polynomial in x (``centered``: the shift is the members' mean, so the first power's sum is 0
    and is left out), the sum of it as it is otherwise."""
    if not coefficient.has(X):
        return coefficient * COUNT
    try:
        poly = sp.Poly(sp.expand(coefficient.xreplace({X: SHIFT + X})), X)
    except sp.PolynomialError:
        poly = None
    if poly is None or any(c.has(X) for c in poly.coeffs()):
        return _partial(coefficient, "A", partials)
    out = sp.S.Zero
    for (n,), b in poly.terms():
        if n == 0:
            out += b * COUNT
        elif n >= 2 or not centered:  # centered, n = 1: Σ_{k∈p} (x_k − c_p) = 0, c_p being the process's mean
            out += b * _partial((X - SHIFT) ** n, "S", partials, n)
    return out


def _partial(summand: sp.Expr, prefix: str, partials: dict[sp.Expr, Partial], n: int | None = None) -> sp.Symbol:
    if summand not in partials:
        number = n if n is not None else sum(p.name.startswith(prefix) for p in partials.values())
        partials[summand] = Partial(f"{prefix}{number}", summand)
    return partials[summand].symbol


def _backward(norm: Norm) -> tuple[tuple[Reduction, ...], dict[str, sp.Expr], Mapping[sp.Basic, Notation]]:
    """The compact first-order gradients with each sum over the group a named reduction."""
    d = derive(norm, "train")
    sums: dict[sp.Expr, Reduction] = {}
    shared: set[str] = set()

    def reduction(total: sp.Sum) -> sp.Symbol:
        (k, _, _), = total.limits
        if total.function.has(sp.Sum):
            raise SpecError(f"{norm.name}: a sum nested in another in the backward ({total}) cannot be split")
        summand = _per_member(total.function.xreplace({k: I}))
        if summand not in sums:
            sums[summand] = Reduction(f"R{len(sums)}", summand, False)
        return sums[summand].symbol

    gradients = {}
    for name in d.outputs:
        expr = _per_member(d.compact[name].replace(lambda e: isinstance(e, sp.Sum), reduction))
        gradients[name] = expr
        if d.kind(name) == ELEMENT and d.levels[0].source.quantity(name).role == "data":
            shared |= {s.name for s in expr.free_symbols if s.name.startswith("R")}
    reductions = tuple(Reduction(r.name, r.summand, r.name in shared) for r in sums.values())
    return reductions, gradients, d.notation


# ----------------------------------------------------------------------------- proofs

def prove(s: Split, sizes: tuple[tuple[int, int], ...] = ((1, 2), (2, 2))) -> list[Proof]:
    """The split's claims: each merged statistic equals the statistic of the concatenated
    batch, for symbolic per-process counts m₁ and m₂ (data as each process's raw power sums and
    sums of the other coefficients, the shifts their means); the distributed ∂l/∂x equals SymPy's
    derivative of the concatenated batch's forward at each explicit (m₁, m₂) in ``sizes``."""
    return [*_merge_proofs(s), _sums_proof(s), *(_gradient_proof(s, m1, m2) for m1, m2 in sizes)]


def _merge_proofs(s: Split) -> list[Proof]:
    return _merge_claims(s.program, s.partials, s.statistics, anchored=False)


def prove_anchored(a: Anchored) -> list[Proof]:
    """For symbolic m and a symbolic anchor: each statistic from the sums about the anchor equals
    its definition over the group (data as the group's raw power sums)."""
    return _merge_claims(forward_program(a.norm, "train"), a.partials, a.statistics, anchored=True)


def _merge_claims(program: Program, partials: tuple[Partial, ...], statistics: tuple[Merged, ...], anchored: bool) -> list[Proof]:
    """Each statistic of ``statistics`` against its definition: merged from two processes (their
    shifts their means), or (``anchored``) from one block of all m members about any anchor."""
    m1, m2 = sp.symbols("m1 m2", integer=True, positive=True)
    counts = (sp.Symbol("m", integer=True, positive=True),) if anchored else (m1, m2)
    anchor = sp.Symbol("a", real=True)
    raw: dict[tuple[int, object], sp.Symbol] = {}

    def block(b: int, key) -> sp.Symbol:
        """Σ over process b's members of xⁿ (key n) or of an opaque coefficient (key: its expression)."""
        if key == 0:
            return counts[b]
        if (b, key) not in raw:
            raw[b, key] = sp.Symbol(f"P{b + 1}_{len(raw)}", real=True)
        return raw[b, key]

    def summed(b: int, expr: sp.Expr) -> sp.Expr:
        """Σ over process b's members of expr(x_k), by linearity, in the block's raw sums."""
        expr = sp.expand(expr)
        if not expr.has(X):
            return expr * counts[b]
        try:
            poly = sp.Poly(expr, X)
            if any(c.has(X) for c in poly.coeffs()):
                raise sp.PolynomialError
        except sp.PolynomialError:
            return sum((summed(b, t) for t in sp.Add.make_args(expr)), sp.S.Zero) if isinstance(expr, sp.Add) else \
                _opaque(b, expr)
        return sum((c * block(b, n) for (n,), c in poly.terms()), sp.S.Zero)

    def _opaque(b: int, expr: sp.Expr) -> sp.Expr:
        factor, rest = expr.as_independent(X, as_Add=False)
        return factor * block(b, rest)

    proofs = []
    blocks, total = range(len(counts)), sum(counts, sp.S.Zero)
    for merged in statistics:
        body = _body(next(st for st in program.steps if st.name == merged.name))
        union = sum((summed(b, body) for b in blocks), sp.S.Zero) / total
        parts = []
        for b in blocks:
            shift = anchor if anchored else block(b, 1) / counts[b]
            values = {COUNT: counts[b], SHIFT: shift}
            values.update({p.symbol: summed(b, p.summand.xreplace({SHIFT: shift})) for p in partials})
            parts.append(merged.term.xreplace(values))
        difference = sp.cancel(sp.together(sum(parts, sp.S.Zero) / total - union))
        outcome = "proven" if difference == 0 else "refuted"
        if anchored:
            proofs.append(Proof(f"anchored:{merged.name}", f"{merged.name} from the sums of powers of x − a over the group "
                                f"equals {merged.name} as defined", None, outcome, difference,
                                "symbolic in m, the anchor a and the group's raw power sums", budget_s=None))
        else:
            proofs.append(Proof(f"split:{merged.name}", f"{merged.name} merged from two processes of m₁ and m₂ members equals "
                                f"{merged.name} over the concatenated batch of m₁ + m₂", None, outcome, difference,
                                "symbolic in m₁, m₂ and each process's raw power sums (its shift c_p: its mean)", budget_s=None))
    return proofs


def _sums_proof(s: Split) -> Proof:
    """For symbolic m₁, m₂: the split's ∂l/∂x_i, each all-reduced total written as the two
    processes' sums over their members, equals the concatenated batch's compact ∂l/∂x_i at
    m = m₁ + m₂. SymPy combines the adjacent sums; that the compact form is the derivative of the
    forward, for symbolic m, is what ``derive --proofs`` proves."""
    m1, m2 = sp.symbols("m1 m2", integer=True, positive=True)
    compact = derive(s.norm, "train").compact["x"]
    bases = {str(b): b for b in compact.atoms(sp.Indexed) for b in (b.base,)}

    def at(expr: sp.Expr, index: sp.Symbol) -> sp.Expr:
        return expr.xreplace({sp.Symbol(name, real=True): base[index] for name, base in bases.items()})

    totals = {r.symbol: sp.simplify(sp.Sum(at(r.summand, K), (K, 1, m1)) + sp.Sum(at(r.summand, K), (K, m1 + 1, m1 + m2)))
              for r in s.shared}
    split_dx = at(s.gradients["x"], I).xreplace(totals).xreplace({M: m1 + m2})
    batch_dx = compact.xreplace({M: m1 + m2})
    difference = sp.cancel(sp.together(split_dx - batch_dx))
    claim = ("∂l/∂x_i from two processes of m₁ and m₂ members (the all-reduced sums, m = m₁ + m₂) equals the "
             "concatenated batch's ∂l/∂x_i")
    return Proof("split:dx", claim, None, "proven" if difference == 0 else "refuted", difference,
                 "symbolic in m₁, m₂: adjacent sums combined by SymPy; the compact form against the forward's "
                 "derivative: derive --proofs", budget_s=None)


def _gradient_proof(s: Split, m1: int, m2: int) -> Proof:
    """∂l/∂x of the split, evaluated per process (merged statistics, all-reduced sums, the global
    m), against SymPy's derivative of the forward of the concatenated batch, at explicit sizes.

    Both sides are symbolic in every member's x and ∂l/∂y, γ, β and ε. First each merged
    statistic is shown equal to the concatenated batch's (a rational identity in the members);
    then, with the statistics written alike on both sides, each root and function of them is
    one symbol, and the difference must cancel as a rational function."""
    n = m1 + m2
    xs, dys = sp.symbols(f"x1:{n + 1}", real=True), sp.symbols(f"dy1:{n + 1}", real=True)
    program = s.program
    union: dict[sp.Symbol, sp.Expr] = {}
    for merged in s.statistics:
        body = _body(next(st for st in program.steps if st.name == merged.name)).xreplace(union)
        union[merged.symbol] = sum((body.xreplace({X: v}) for v in xs), sp.S.Zero) / n
    y = s.elements["y"].xreplace({sp.Symbol("xhat", real=True): s.elements["xhat"]})
    loss = sum((dy * y.xreplace({X: x}).xreplace(union) for dy, x in zip(dys, xs)), sp.S.Zero)
    reference = [sp.diff(loss, x) for x in xs]
    blocks = (range(0, m1), range(m1, n))
    claim = (f"∂l/∂x of two processes of {m1} and {m2} members, merged and all-reduced, equals SymPy's derivative of "
             f"the forward of one batch of {n}")
    method = f"symbolic in every member's x and ∂l/∂y at m₁ = {m1}, m₂ = {m2}"
    for merged in s.statistics:
        total = sp.S.Zero
        for members in blocks:
            shift = sum((xs[k] for k in members), sp.S.Zero) / len(members)
            values = {COUNT: len(members), SHIFT: shift}
            values.update({p.symbol: sum((p.summand.xreplace({X: xs[k], SHIFT: shift}) for k in members), sp.S.Zero)
                           for p in s.partials})
            total += merged.term.xreplace(values).xreplace(union)
        if sp.cancel(sp.together(total / n - union[merged.symbol])) != 0:
            return Proof(f"split:dx:{m1},{m2}", claim, None, "refuted", None, method,
                         reason=f"the merged {merged.name} differs from the batch's", budget_s=None)

    def member(expr: sp.Expr, k: int) -> sp.Expr:
        values = {sp.Symbol("xhat", real=True): s.elements["xhat"].xreplace({X: xs[k]}), X: xs[k],
                  sp.Symbol("dy", real=True): dys[k]}
        return expr.xreplace(values).xreplace(union)

    totals = {r.symbol: sum((member(r.summand, k) for k in range(n)), sp.S.Zero) for r in s.reductions}
    residuals = [_rational(member(s.gradients["x"], k).xreplace(totals).xreplace({M: n}) - reference[k]) for k in range(n)]
    if all(r == 0 for r in residuals):
        return Proof(f"split:dx:{m1},{m2}", claim, None, "proven", sp.S.Zero, method, budget_s=None)
    return Proof(f"split:dx:{m1},{m2}", claim, None, "undecided", None, method, budget_s=None,
                 reason="the difference does not cancel with each root and function of the statistics one symbol")


def _rational(expr: sp.Expr) -> sp.Expr:
    """``expr`` as one rational function, each root b^(p/q) written t_b^p and each function
    application one symbol (so zero means zero; nonzero may still be zero through t_b^q = b)."""
    roots: dict[tuple[sp.Expr, int], sp.Dummy] = {}

    def root(e: sp.Pow) -> sp.Expr:
        base, exponent = e.as_base_exp()
        return roots.setdefault((base, exponent.q), sp.Dummy(positive=True)) ** exponent.p

    expr = expr.replace(lambda e: e.is_Pow and e.exp.is_Rational and not e.exp.is_Integer, root)
    expr = expr.xreplace({f: sp.Dummy() for f in expr.atoms(sp.Function)})
    return sp.cancel(sp.together(expr))
