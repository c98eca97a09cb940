"""Proofs, by the engine, of every identity symbn claims, at every order.

Every claim ends in one of three outcomes (:data:`OUTCOMES`), decided by :func:`decide`:

* **proven**: the decision procedure reduced lhs − rhs to 0. Inline everything down to the
  inputs, split every sum into power-sum atoms (exact for every m, see :mod:`symbn.sums`), treat
  the atoms as independent symbols, and eliminate each root: a variable in which its base is
  linear (eps first) is replaced so that the base is r^q with r > 0 (for sqrt(var + eps):
  eps = r² − var). What is left is a rational function; the identity holds for every m, every
  batch and every eps > 0 exactly when it cancels to 0.
* **refuted**: the engine holds a witness that the two sides differ. The strongest is a
  :class:`Counterexample`: exact rational values of every symbol, m included, at which lhs − rhs,
  evaluated in interval arithmetic (outward rounding, so the enclosure is rigorous), lies in an
  interval that excludes 0. It is looked for first, at m = :data:`POINT_M`, since it is cheap;
  failing that, the rational function left after eliminating the roots is nonzero.
* **undecided**: neither, and ``reason`` says why: the claim's time budget was spent (and in
  which step), or the procedure met what it cannot eliminate (a root whose base is linear in no
  variable, a function such as exp or log left in the rational function).

Each claim runs within a time budget (``prove(d, budget=...)``, CPU seconds per claim, default
:data:`BUDGET`; CPU time, so that a loaded machine does not turn a claim undecided). In the main
thread, where ``signal.setitimer`` exists and no other profiling timer is running, the budget is
enforced with ``ITIMER_PROF``: its SIGPROF raises inside SymPy, which is pure Python, wherever it
is. Elsewhere (another thread, Windows, a profiling timer already running) the budget is checked
between the steps of the procedure (and between the terms of a sum it evaluates), so one step, a
cancellation, can overrun it. A refuted claim's residual (lhs − rhs rewritten in x̂ and the group
reductions) is computed with what is left of its budget; when that runs out the residual is None
and ``residual_note`` says so.

Two independent routes to the same derivatives are compared with the engine's staged ones:

* **direct** (:func:`direct_outputs`): the forward fully inlined, then differentiated as one
  expression, transform after transform (a vjp differentiates Σ cotangent·output by every
  input; a jvp takes the directional derivative): no staging, no per-path terms, no program;
* **brute force** (:func:`_brute_force`): the forward written out with m explicit symbols
  (m = 1..6 at order 1, fewer beyond), the chain of transforms done by plain ``sympy.diff`` on
  those: it shares nothing with the engine but the spec.
"""
from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import mpmath
import sympy as sp

from .derive import Derivation, derive
from .program import ELEMENT, Program
from .simplify import XhatBasis, is_root
from .spec import parse
from .sums import I, M, diff_element, expand_sums, fresh_index, group_sum

SYMBOLIC = "symbolic m: sums split into power-sum atoms, eps = r^2 - var with r > 0, rational cancellation"
BRUTE = "explicit m: forward written out with m symbols, differentiated by sympy.diff, eps = r^2 - var, cancellation"
BRUTE_FORCE_SIZES = {1: range(1, 7), 2: range(1, 5), 3: range(1, 4)}
"""Explicit sizes checked by brute force, per order (the written-out expressions grow fast)."""
OUTCOMES = ("proven", "refuted", "undecided")
BUDGET = 30.0
"""CPU seconds each claim may take by default (its decision and, for a refuted claim, its
residual). The slowest built-in claims take about 10: the direct derivative's comparison at
orders 2 and 3, brute force at m = 3 at order 3. None: no limit."""
POINT_M = 5
"""The group size at which :func:`decide` looks for a counterexample."""
MAX_ROOTS = 8
"""Root eliminations at most before :func:`decide` gives up."""


@dataclass(frozen=True)
class Counterexample:
    """A point where lhs − rhs is provably nonzero: the group size ``m``, the element ``i`` (None
    for an expression of no element), exact rational ``values`` of every symbol the expression
    reads (an element quantity: its m values), and ``low``..``high``, an interval arithmetic
    enclosure of lhs − rhs at that point (outward rounding at 200 bits), which excludes 0."""

    m: int
    i: int | None
    values: tuple[tuple[str, Fraction | tuple[Fraction, ...]], ...]
    low: float
    high: float

    @property
    def value(self) -> float:
        return (self.low + self.high) / 2

    def text(self) -> str:
        at = [f"m = {self.m}", *([] if self.i is None else [f"i = {self.i}"])]
        at += [f"{name} = {_fraction_text(v)}" for name, v in self.values]
        return ", ".join(at) + f": lhs - rhs = {self.value:.6g} (interval arithmetic: nonzero)"

    def as_json(self) -> dict:
        return {"m": self.m, "i": self.i, "values": {name: _fraction_json(v) for name, v in self.values},
                "value": self.value, "interval": [self.low, self.high]}


def _fraction_text(v) -> str:
    return f"({', '.join(map(str, v))})" if isinstance(v, tuple) else str(v)


def _fraction_json(v):
    return [str(f) for f in v] if isinstance(v, tuple) else str(v)


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` found: ``outcome`` in :data:`OUTCOMES`; ``reason``: the witness of a
    refutation or why it is undecided (None when proven); the counterexample where there is one."""

    outcome: str
    reason: str | None = None
    counterexample: Counterexample | None = None


@dataclass(frozen=True)
class Proof:
    """One claimed identity and what the engine found.

    ``outcome`` is "proven" (the engine proved ``equation`` for the stated scope: symbolic m, or
    one explicit m), "refuted" (the two sides provably differ: ``reason`` says by what witness,
    ``counterexample`` is a point where they differ, ``residual`` = lhs − rhs rewritten in xhat and
    the group reductions, or None with ``residual_note`` saying why) or "undecided" (``reason``
    says why: the budget spent, or what the procedure cannot eliminate). ``budget_s``: the
    claim's time budget in CPU seconds (None: none); ``seconds``: the CPU time it took."""

    key: str
    claim: str
    equation: sp.Eq | None
    outcome: str
    residual: sp.Expr | None
    method: str
    reason: str | None = None
    counterexample: Counterexample | None = None
    budget_s: float | None = BUDGET
    seconds: float | None = None
    residual_note: str | None = None

    @property
    def status(self) -> str:
        """The outcome ("proven", "refuted" or "undecided")."""
        return self.outcome

    @property
    def holds(self) -> bool | None:
        """True when proven, False when refuted, None when undecided (so ``not p.holds`` does not
        tell refuted from undecided: compare ``outcome``)."""
        return {"proven": True, "refuted": False}.get(self.outcome)


class _OutOfTime(BaseException):
    """A claim's budget is spent. A BaseException, so that SymPy's ``except Exception`` lets it pass."""


class _Budget:
    """The CPU time left to one claim. ``with budget:`` arms SIGPROF for what is left (main thread
    only, and only when no other profiling timer runs); :meth:`check` raises between steps
    everywhere. CPU time, not wall time, so that a loaded machine does not turn a claim undecided:
    the process's in the main thread, the thread's own elsewhere. ``stage`` names the step under
    way, for the reason of an undecided claim."""

    def __init__(self, seconds: float | None):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a proof budget is a positive number of seconds or None, not {seconds!r}")
        self.seconds = seconds
        self.clock = time.process_time if threading.current_thread() is threading.main_thread() else time.thread_time
        self.start = self.clock()
        self.end = math.inf if seconds is None else self.start + seconds
        self.stage = "setting up"
        self._previous = None
        self._armed = False

    def used(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.end - self.clock()

    def check(self) -> None:
        if self.clock() >= self.end:
            raise _OutOfTime

    def spent(self) -> str:
        return f"time budget of {self.seconds:g} s spent ({self.stage})"

    def __enter__(self) -> _Budget:
        self.check()
        if self.seconds is not None and _can_alarm():
            self._previous = signal.getsignal(signal.SIGPROF)
            signal.signal(signal.SIGPROF, self._alarm)
            self._armed = True
            # repeats every half second, in case SymPy swallows the first one in a bare except
            signal.setitimer(signal.ITIMER_PROF, max(self.left(), 1e-4), 0.5)
        return self

    def __exit__(self, *exc) -> bool:
        if self._armed:
            signal.setitimer(signal.ITIMER_PROF, 0)
            self._armed = False
            signal.signal(signal.SIGPROF, signal.SIG_DFL if self._previous is None else self._previous)
        if exc[0] is None and self.clock() >= self.end:
            # the work ran past its budget: the alarm was swallowed (by a bare except in SymPy, or in a
            # garbage-collector callback, where Python ignores exceptions): out of time all the same
            raise _OutOfTime
        return False

    def _alarm(self, signum, frame) -> None:
        if self._armed:
            raise _OutOfTime


def _can_alarm() -> bool:
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_PROF)[0] == 0)


def decide(expr: sp.Expr, eps: sp.Symbol, budget: float | None = BUDGET) -> Decision:
    """Whether ``expr`` (inputs, sums over the group, square roots) is identically zero, for
    every m, every batch and every eps > 0: proven, refuted (with a witness) or undecided (with
    the reason), within ``budget`` seconds."""
    b = _Budget(budget)
    try:
        with b:
            return _decide(expr, eps, b)
    except _OutOfTime:
        return Decision("undecided", b.spent())


def vanishes(expr: sp.Expr, eps: sp.Symbol, budget: float | None = BUDGET) -> bool:
    """True when :func:`decide` proves ``expr`` identically zero; False when it is refuted or
    undecided."""
    return decide(expr, eps, budget).outcome == "proven"


def _decide(expr: sp.Expr, eps: sp.Symbol, b: _Budget, m: int = POINT_M) -> Decision:
    b.stage = f"looking for a counterexample at m = {m}"
    point = counterexample(expr, m, b)
    if point is not None:
        return Decision("refuted", f"nonzero at m = {m} (a counterexample)", point)
    outcome, reason = _symbolic(expr, eps, b)
    return Decision(outcome, reason)


def _symbolic(expr: sp.Expr, eps: sp.Symbol, b: _Budget) -> tuple[str, str | None]:
    """The symbolic procedure: power-sum atoms as symbols, roots eliminated, rational cancellation."""
    b.stage = "splitting sums into power-sum atoms"
    e = expand_sums(expr)
    e = e.xreplace({a: sp.Dummy("S") for a in e.atoms(sp.Sum)})
    for _ in range(MAX_ROOTS + 1):
        b.stage = "eliminating roots"
        b.check()
        e = e.replace(is_root, lambda p: sp.Pow(sp.expand(p.base), p.exp))
        roots = sorted({p.base for p in e.atoms(sp.Pow) if is_root(p)}, key=sp.default_sort_key)
        if not roots:
            b.stage = "cancelling the rational function left after eliminating the roots"
            left = sp.cancel(sp.together(e))
            if left == 0:
                return "proven", None
            if left.is_rational_function() is not True:
                functions = sorted({type(f).__name__ for f in left.atoms(sp.Function)}) or ["powers with symbolic exponents"]
                return "undecided", (f"what is left is not a rational function: it holds {', '.join(functions)}, "
                                     "which the procedure does not normalize")
            return "refuted", "the rational function left after eliminating the roots is nonzero (power-sum atoms as independent symbols)"
        choice = next(((base, v) for base in roots for v in _candidates(base, eps) if _linear_in(base, v)), None)
        if choice is None:
            b.stage = "sympy.simplify, after a root whose base is linear in no variable"
            if sp.simplify(e) == 0:
                return "proven", None
            return "undecided", f"a root whose base is linear in no variable ({roots[0]}), and sympy.simplify does not reduce the rest to 0"
        base, var = choice
        q = math.lcm(*(int(p.exp.q) for p in e.atoms(sp.Pow) if is_root(p) and p.base == base))
        r = sp.Dummy("r", positive=True)
        c = sp.expand(base).coeff(var)
        e = e.subs(var, (r**q - sp.expand(base - c * var)) / c)
    return "undecided", f"more than {MAX_ROOTS} roots to eliminate"


def _candidates(base: sp.Expr, eps: sp.Symbol) -> list[sp.Symbol]:
    return [v for v in [eps, *sorted(base.free_symbols - {eps}, key=sp.default_sort_key)] if v in base.free_symbols]


def _linear_in(expr: sp.Expr, v: sp.Symbol) -> bool:
    """``expr`` = c·v + rest, with c ≠ 0 free of v and of roots, rest free of v."""
    if v not in expr.free_symbols:
        return False
    expanded = sp.expand(expr)
    c = expanded.coeff(v)
    return (c != 0 and v not in c.free_symbols and not any(is_root(p) for p in c.atoms(sp.Pow))
            and v not in sp.expand(expanded - c * v).free_symbols)


class _NoValue(Exception):
    """The expression has no real value at this point (a root of a negative number, a division
    by an interval holding 0), or holds what the evaluator does not know."""


def counterexample(expr: sp.Expr, m: int = POINT_M, budget: _Budget | None = None, tries: int = 3) -> Counterexample | None:
    """A point where ``expr`` is provably nonzero, or None: random rational values (scalars in
    (0, 5], elements of either sign) for every symbol, m = ``m``, the element i = 2, and
    ``expr`` evaluated in interval arithmetic; the point counts when the interval excludes 0."""
    b = budget or _Budget(None)
    previous = mpmath.iv.prec
    mpmath.iv.prec = 200
    try:
        for seed in range(tries):
            point = _Point(m, seed, b)
            try:
                low, high = (mpmath.mpf(end) for end in point.value(expr, {})._mpi_)
            except (_NoValue, ArithmeticError, ValueError, RecursionError):
                continue  # no real value here: another point
            if mpmath.isinf(low) or mpmath.isinf(high) or mpmath.isnan(low) or mpmath.isnan(high):
                continue
            if low > 0 or high < 0:
                return Counterexample(m, point.i if point.used_i else None, point.shown(), float(low), float(high))
            return None  # an enclosure of 0: zero here, most likely everywhere
        return None
    finally:
        mpmath.iv.prec = previous


class _Point:
    """One random point and an interval evaluator of SymPy expressions at it (memoized per
    subexpression and per value of the summation indices it reads)."""

    def __init__(self, m: int, seed: int, budget: _Budget):
        self.m, self.i, self.budget = m, min(2, m), budget
        self.rng = random.Random(seed)
        self.scalars: dict[sp.Basic, Fraction] = {}
        self.elements: dict[sp.Basic, tuple[Fraction, ...]] = {}
        self.used_i = False
        self.memo: dict = {}
        self.free: dict = {}

    def shown(self) -> tuple:
        named = [(str(s), v) for s, v in self.scalars.items()] + [(str(s), v) for s, v in self.elements.items()]
        return tuple(sorted(named, key=lambda nv: (isinstance(nv[1], tuple), nv[0])))

    def _scalar(self, s: sp.Basic):
        if s not in self.scalars:
            self.scalars[s] = Fraction(self.rng.randint(1, 40), self.rng.randint(1, 8))
        return _interval(self.scalars[s])

    def _element(self, base: sp.Basic, j: int):
        if base not in self.elements:
            self.elements[base] = tuple(Fraction(self.rng.randint(-40, 40), self.rng.randint(1, 8)) for _ in range(self.m))
        if not 1 <= j <= self.m:
            raise _NoValue(f"element {j} of {base} outside 1..{self.m}")
        return _interval(self.elements[base][j - 1])

    def _free(self, e: sp.Basic) -> frozenset:
        if e not in self.free:
            if isinstance(e, sp.Symbol):
                out = frozenset([e])
            elif isinstance(e, sp.Sum):
                out = self._free(e.function).union(*(self._free(a) for _, *ab in e.limits for a in ab)) - {lim[0] for lim in e.limits}
            elif isinstance(e, sp.Indexed):
                out = frozenset().union(*(self._free(j) for j in e.indices))
            else:
                out = frozenset().union(*(self._free(a) for a in e.args))
            self.free[e] = out
        return self.free[e]

    def index(self, e: sp.Basic, env: dict) -> int:
        """An integer-valued expression: an index or a bound of a sum."""
        if e.is_Integer:
            return int(e)
        if e in env:
            return env[e]
        if e == M:
            return self.m
        if e == I:
            self.used_i = True
            return self.i
        if isinstance(e, (sp.Add, sp.Mul)):
            parts = [self.index(a, env) for a in e.args]
            return sum(parts) if isinstance(e, sp.Add) else math.prod(parts)
        raise _NoValue(f"not an index: {e}")

    def value(self, e: sp.Basic, env: dict):
        key = (e, tuple((s, env[s]) for s in self._free(e) if s in env))
        if key not in self.memo:
            self.memo[key] = self._value(e, env)
        return self.memo[key]

    def _value(self, e: sp.Basic, env: dict):
        iv = mpmath.iv
        if e.is_Rational:
            return _interval(Fraction(int(e.p), int(e.q)))
        if e.is_Float:
            return iv.mpf(mpmath.mpf(e._mpf_))
        if e is sp.pi:
            return iv.pi
        if e is sp.E:
            return iv.e
        if isinstance(e, sp.Symbol):
            if e in env or e in (M, I):
                return iv.mpf(self.index(e, env))
            return self._scalar(e)
        if isinstance(e, sp.Indexed):
            return self._element(e.base, self.index(e.indices[0], env))
        if isinstance(e, sp.Sum):
            (k, lo, hi), = e.limits
            total = iv.mpf(0)
            for j in range(self.index(lo, env), self.index(hi, env) + 1):
                self.budget.check()
                total += self.value(e.function, {**env, k: j})
            return total
        if isinstance(e, sp.Add):
            total = iv.mpf(0)
            for a in e.args:
                total += self.value(a, env)
            return total
        if isinstance(e, sp.Mul):
            product = iv.mpf(1)
            for a in e.args:
                product *= self.value(a, env)
            return product
        if isinstance(e, sp.Pow):
            base = self.value(e.base, env)
            if e.exp.is_Integer:
                if e.exp < 0 and base.a <= 0 <= base.b:
                    raise _NoValue("division by an interval holding 0")
                return base ** int(e.exp)
            if not base.a > 0:
                raise _NoValue("a root or power of a number not surely positive")
            if e.exp.is_Rational:
                return base ** (iv.mpf(int(e.exp.p)) / int(e.exp.q))
            return iv.exp(self.value(e.exp, env) * iv.log(base))
        if isinstance(e, sp.KroneckerDelta):
            return iv.mpf(int(self.index(e.args[0], env) == self.index(e.args[1], env)))
        if isinstance(e, (sp.exp, sp.log, sp.Abs, sp.sign)) and len(e.args) == 1:
            arg = self.value(e.args[0], env)
            if isinstance(e, sp.exp):
                return iv.exp(arg)
            if isinstance(e, sp.Abs):
                return abs(arg)
            if not (arg.a > 0 or (isinstance(e, sp.sign) and arg.b < 0)):
                raise _NoValue(f"{type(e).__name__} of an interval holding 0 or less")
            return iv.log(arg) if isinstance(e, sp.log) else iv.mpf(1 if arg.a > 0 else -1)
        raise _NoValue(f"the evaluator does not know {type(e).__name__}")


def _interval(f: Fraction):
    return mpmath.iv.mpf(f.numerator) / f.denominator


def prove(d: Derivation, brute_force: range | None = None, budget: float | None = BUDGET) -> list[Proof]:
    """All proofs for one derivation: staged vs direct, staged vs compact, vanishing terms, the
    invariance identities, and the brute-force cross-check at explicit m (default sizes per
    order: :data:`BRUTE_FORCE_SIZES`). ``budget``: CPU seconds per claim (None: no limit); the
    direct derivative, work shared by the claims that compare with it, gets their budgets
    together (one per output)."""
    sizes = BRUTE_FORCE_SIZES.get(d.order, range(1, 3)) if brute_force is None else brute_force
    prover = _Prover(d, budget)
    return [*_against_direct(d, prover=prover), *_against_compact(d, prover=prover), *findings(d, prover=prover),
            *(_brute_force(d, n, prover=prover) for n in sizes)]


def findings(d: Derivation, budget: float | None = BUDGET, prover: _Prover | None = None) -> list[Proof]:
    """What the engine finds beyond the forms' agreement: vanishing terms and invariances."""
    prover = prover or _Prover(d, budget)
    return [*_vanishing_terms(d, prover), *_invariances(d, prover)]


class _Prover:
    """Proves the claims of one derivation, each within ``budget`` seconds, sharing what the
    claims have in common (the x̂ basis for residuals, the direct derivative)."""

    def __init__(self, d: Derivation, budget: float | None):
        _Budget(budget)  # validates it
        self.d, self.budget = d, budget
        self._basis: XhatBasis | None = None
        self._direct: dict | str | None = None

    def direct(self) -> dict[str, sp.Expr] | str:
        """:func:`direct_outputs`, computed once within one budget; the reason, if it was not."""
        if self._direct is None:
            b = _Budget(None if self.budget is None else self.budget * len(self.d.outputs))
            b.stage = "differentiating the inlined forward directly"
            try:
                with b:
                    self._direct = direct_outputs(self.d)
            except _OutOfTime:
                self._direct = f"the direct derivative was not computed: {b.spent()}"
        return self._direct

    def claim(self, key: str, claim: str, equation: sp.Eq | None, method: str,
              decision: Callable[[_Budget], Decision], residual: Callable[[], sp.Expr] | None) -> Proof:
        """Run ``decision`` within the budget; for a refuted claim, ``residual`` with what is left."""
        b = _Budget(self.budget)
        try:
            with b:
                found = decision(b)
        except _OutOfTime:
            found = Decision("undecided", b.spent())
        value, note = (sp.S.Zero if found.outcome == "proven" else None), None
        if found.outcome == "refuted" and residual is not None:
            b.stage = "simplifying the residual"
            try:
                with b:
                    value = residual()
            except _OutOfTime:
                note = f"not simplified: the budget of {self.budget:g} s was spent"
            except NotImplementedError as err:
                note = f"not rewritten in xhat: {err}"
        return Proof(key, claim, equation, found.outcome, value, method, found.reason, found.counterexample,
                     self.budget, b.used(), note)

    def basis(self) -> XhatBasis:
        if self._basis is None:
            self._basis = XhatBasis(self.d)
        return self._basis


def _proof(prover: _Prover, key: str, claim: str, lhs_shown, rhs_shown, lhs: Callable[[], sp.Expr],
           rhs: Callable[[], sp.Expr], at: dict | None = None, residual: bool = True) -> Proof:
    """Prove lhs() = rhs() (both inlined to the inputs, computed within the budget), optionally
    at a point such as eps = 0. ``residual``: whether a refuted claim's difference is worth
    rewriting in x̂ and the reductions (not for two forms of a higher-order derivative, where it
    is costly and only says that the engine is wrong)."""
    d, at = prover.d, at or {}
    difference: list[sp.Expr] = []

    def decision(b: _Budget) -> Decision:
        b.stage = "inlining both sides"
        difference.append(lhs() - rhs())
        return _decide(difference[0].subs(at), d.symbols["eps"], b)

    equation = None if lhs_shown is None else sp.Eq(lhs_shown, rhs_shown, evaluate=False)
    rewrite = (lambda: prover.basis().rewrite(difference[0]).subs(at)) if residual else None
    return prover.claim(key, claim, equation, SYMBOLIC, decision, rewrite)


def _inlined_outputs(d: Derivation, p: Program) -> dict[str, sp.Expr]:
    """Each output of ``p`` (a program of ``d``'s chain) written out down to the inputs."""
    return {name: d.inline(p.value(name)) for name in p.outputs}


def _contracted(p: Program, name: str, value: sp.Expr, weight: sp.Basic) -> sp.Expr:
    """⟨weight, output⟩ over one group: Σ_k weight_k·value_k per element, weight·value per group."""
    if p.quantity(name).kind != ELEMENT:
        return weight * value
    k = fresh_index()
    return group_sum((weight[I] * value).xreplace({I: k}), k)


DIRECT_FROM_FORWARD = 2
"""Up to this order, the direct route starts from the fully expanded forward. Beyond it the
expressions grow too large to cancel in minutes, so order k starts from the compact form of
order k − 1, inlined: an induction, since that form is proven equal to the staged one and the
staged one to the direct differentiation of the forward at order k − 1."""


def direct_outputs(d: Derivation) -> dict[str, sp.Expr]:
    """The last program's outputs computed without the engine's staging: the forward inlined to
    one expression per output, then each transform of the chain applied to whole expressions
    (beyond :data:`DIRECT_FROM_FORWARD`, from the level below's compact form)."""
    levels = d.levels
    if d.order <= DIRECT_FROM_FORWARD:
        first = d.levels[0].source
        values = {name: d.inline(first.value(name)) for name in first.outputs}
    else:
        below = derive(d.norm, d.mode, transforms=d.transforms[:-1])
        values = {below.levels[-1].derived[name]: below.inline(expr) for name, expr in below.compact.items()}
        levels = levels[-1:]
    for level in levels:
        source, program = level.source, level.program
        if level.kind == "vjp":
            loss = sp.Add(*(_contracted(source, name, values[name], program.symbol(level.derived[name])) for name in source.outputs))
            values = {level.derived[q.name]: _derivative(loss, q.kind, q.symbol) for q in source.inputs if q.differentiable}
        else:
            moving = [(q, program.symbol(level.derived[q.name])) for q in source.inputs if q.differentiable]
            values = {level.derived[name]: _directional(values[name], moving) for name in source.outputs}
    return values


def _derivative(expr: sp.Expr, kind: str, symbol: sp.Basic) -> sp.Expr:
    return diff_element(expr, symbol, I) if kind == ELEMENT else sp.diff(expr, symbol)


def _directional(expr: sp.Expr, moving) -> sp.Expr:
    """d/dt of ``expr`` at t = 0 with every moving input q replaced by q + t·tangent."""
    t = sp.Dummy("t")
    for q, tangent in moving:
        if q.kind == ELEMENT:
            expr = expr.replace(lambda e, base=q.symbol: isinstance(e, sp.Indexed) and e.base == base,
                                lambda e, tangent=tangent: e + t * tangent[e.indices[0]])
        else:
            expr = expr.xreplace({q.symbol: q.symbol + t * tangent})
    return sp.diff(expr, t).subs(t, 0)


def _against_direct(d: Derivation, budget: float | None = BUDGET, prover: _Prover | None = None) -> list[Proof]:
    prover = prover or _Prover(d, budget)
    last = d.levels[-1]
    route = "the fully expanded forward" if d.order <= DIRECT_FROM_FORWARD else "the level below's compact form (induction)"
    out = []
    direct = prover.direct()
    for name in d.outputs:
        key, claim = f"paper_equals_direct[{name}]", f"{_staged(d)} {_what(d, name)} equals direct differentiation of {route}"
        if isinstance(direct, str):
            out.append(Proof(key, claim, None, "undecided", None, SYMBOLIC, direct, None, prover.budget, 0.0))
            continue
        out.append(_proof(prover, key, claim, None, None, lambda name=name: d.inline(d.adjoint(name)),
                          lambda name=name: direct[last.derived[name]], residual=d.order == 1))
    return out


def _what(d: Derivation, name: str) -> str:
    """"dl/dx", or at higher orders "the adjoint of x (vjp, vjp)", "the tangent of dx (vjp, jvp)"."""
    if d.order == 1 and d.levels[0].kind == "vjp":
        return f"dl/d{name}"
    return f"the {'adjoint' if d.levels[-1].kind == 'vjp' else 'tangent'} of {name} ({', '.join(d.transforms)})"


def _staged(d: Derivation) -> str:
    return "paper form of" if d.transforms == ("vjp",) else "staged"


def _against_compact(d: Derivation, budget: float | None = BUDGET, prover: _Prover | None = None) -> list[Proof]:
    prover = prover or _Prover(d, budget)
    return [
        _proof(prover, f"paper_equals_compact[{name}]", f"{_staged(d)} {_what(d, name)} equals the compact form",
               d.adjoint(name), d.compact[name], lambda name=name: d.inline(d.adjoint(name)),
               lambda name=name: d.inline(d.compact[name]), residual=d.order == 1)
        for name in d.outputs
    ]


def _vanishing_terms(d: Derivation, prover: _Prover) -> list[Proof]:
    """Terms through which one statistic reaches another: the paper's σ²→μ term is zero (and, in
    forward mode, the tangent of σ² through μ)."""
    stats = set(d.stats)
    return [
        _proof(prover, f"vanishing_term[{name}<-{term.via}]",
               f"the term through {term.via} in {_what(d, name)} is identically zero",
               term.local, sp.S.Zero, lambda term=term: d.inline(term.local), lambda: sp.S.Zero)
        for name, terms in d.terms.items()
        if name in stats
        for term in terms
        if term.via in stats
    ]


def _invariances(d: Derivation, prover: _Prover) -> list[Proof]:
    """Σ_i ∂l/∂x_i = 0 and Σ_i ∂l/∂x_i·x̂_i = 0: no gradient along what normalization removes.

    The second holds only as eps → 0 (with eps > 0, xhat is not exactly scale invariant), so
    it is checked both exactly and at eps = 0. At every order of reverse mode, for the last
    level's adjoint of x."""
    if d.levels[-1].kind != "vjp" or "x" not in d.outputs:
        return []
    eps, i = d.symbols["eps"], fresh_index()
    shown_dx, shown_xhat = d.adjoint("x"), d.value("xhat")
    zero = lambda: sp.S.Zero  # noqa: E731

    def summed(weighted: bool) -> sp.Expr:
        dx = d.inline(d.adjoint("x"))
        body = dx * d.inline(d.value("xhat")) if weighted else dx
        return group_sum(body.xreplace({I: i}), i)

    return [
        _proof(prover, "sum_dx_zero", f"{_what(d, 'x')} sums to zero over the group: no component along a shift of x",
               group_sum(shown_dx, I), 0, lambda: summed(False), zero),
        _proof(prover, "sum_dx_xhat_zero", f"{_what(d, 'x')} is orthogonal to xhat: no component along a rescaling, exactly, for eps > 0",
               group_sum(shown_dx * shown_xhat, I), 0, lambda: summed(True), zero),
        _proof(prover, "sum_dx_xhat_zero_eps0", f"{_what(d, 'x')} is orthogonal to xhat at eps = 0",
               group_sum(shown_dx * shown_xhat, I), 0, lambda: summed(True), zero, at={eps: 0}),
    ]


def _brute_force(d: Derivation, n: int, budget: float | None = BUDGET, prover: _Prover | None = None) -> Proof:
    """At m = n: every output of the last program, for every element, against the chain of
    transforms done by ``sympy.diff`` on the forward written out element by element."""
    prover = prover or _Prover(d, budget)
    claim = (f"at m = {n}: dl/dx (every element), dl/dgamma and dl/dbeta equal sympy.diff of the forward written out"
             if d.transforms == ("vjp",) and d.outputs == ("x", "gamma", "beta") else
             f"at m = {n}: every output of the last program, at every element, equals the chain {', '.join(d.transforms)} "
             "done by sympy.diff on the forward written out")
    return prover.claim(f"brute_force[m={n}]", claim, None, BRUTE, lambda b: _brute_force_decision(d, n, b), None)


def _brute_force_decision(d: Derivation, n: int, b: _Budget) -> Decision:
    """Every element of every output at m = n: refuted at the first that differs (its point is
    the counterexample), undecided at the first the procedure cannot decide, else proven."""
    b.stage = f"writing the forward out at m = {n} and differentiating it with sympy.diff"
    first = d.levels[0].source
    explicit: dict[sp.Basic, sp.Basic] = {}  # engine's x[j] -> x_j
    per_element: dict[str, list[sp.Symbol]] = {}

    def written(p: Program, name: str) -> list[sp.Basic]:
        """An input of ``p`` at every element (a list of n symbols), or its one group symbol (a list of one)."""
        q = p.quantity(name)
        if q.kind != ELEMENT:
            return [q.symbol]
        if name not in per_element:
            per_element[name] = list(sp.symbols(f"{name}_1:{n + 1}", real=True))
            explicit.update({q.symbol[j + 1]: s for j, s in enumerate(per_element[name])})
        return per_element[name]

    values = _explicit_forward(d, first, n, written)
    for level in d.levels:
        source, program = level.source, level.program
        if level.kind == "vjp":
            loss = sp.Add(*(sum(w * v for w, v in zip(written(program, level.derived[name]), values[name]))
                            for name in source.outputs))
            values = {level.derived[q.name]: _gradient(loss, written(source, q.name)) for q in source.inputs if q.differentiable}
        else:
            moving = [(written(source, q.name), written(program, level.derived[q.name])) for q in source.inputs if q.differentiable]
            values = {level.derived[name]: [_explicit_tangent(v, moving) for v in values[name]] for name in source.outputs}
    undecided = None
    for name in d.outputs:
        output = d.levels[-1].derived[name]
        engine = d.inline(d.program.value(output)).subs(M, n)
        for j in range(n) if d.program.quantity(output).kind == ELEMENT else [0]:
            b.stage = f"comparing {output} at m = {n}"
            mine = _summed_out(engine.xreplace({I: j + 1})).xreplace(explicit)
            found = _decide(mine - values[output][j], d.symbols["eps"], b, m=n)
            where = f"{output}" + (f" at element {j + 1}" if d.program.quantity(output).kind == ELEMENT else "")
            if found.outcome == "refuted":
                return Decision("refuted", f"{where}: {found.reason}", found.counterexample)
            if found.outcome == "undecided" and undecided is None:
                undecided = Decision("undecided", f"{where}: {found.reason}")
    return undecided or Decision("proven")


def _summed_out(expr: sp.Expr) -> sp.Expr:
    """Every sum with explicit limits written as the sum of its terms, inner sums first: what
    ``Sum.doit`` gives there, without its search for closed forms (``apart`` of each body took
    most of the time of brute force at order 3)."""
    def terms(total: sp.Sum) -> sp.Expr:
        (k, lo, hi), = total.limits
        return sp.Add(*(total.function.xreplace({k: j}) for j in range(int(lo), int(hi) + 1)))

    return expr.replace(lambda e: isinstance(e, sp.Sum), terms)


def _explicit_forward(d: Derivation, first: Program, n: int, written) -> dict[str, list[sp.Expr]]:
    """The forward's outputs at each of n elements, from the spec alone."""
    norm = d.norm
    x = written(first, "x")
    scalars = {"eps": d.symbols["eps"]}
    if d.mode == "train":
        for name, text in norm.stats:
            scalars[name] = sp.Add(*(parse(text, {**scalars, "x": v}) for v in x)) / n
    else:
        scalars.update({name: first.symbol(name) for name in norm.stat_names})
    gamma, beta = written(first, "gamma"), written(first, "beta")
    return {"y": [gamma[j % len(gamma)] * parse(norm.normalized, {**scalars, "x": x[j]}) + beta[j % len(beta)] for j in range(n)]}


def _gradient(loss: sp.Expr, inputs: list[sp.Basic]) -> list[sp.Expr]:
    """∂loss/∂input at each element (a per-group input: its one derivative)."""
    return [sp.diff(loss, v) for v in inputs]


def _explicit_tangent(value: sp.Expr, moving) -> sp.Expr:
    """d/dt of ``value`` at t = 0 with every moving input replaced by input + t·tangent."""
    t = sp.Dummy("t")
    table = {p: p + t * v for primal, tangent in moving for p, v in zip(primal, tangent)}
    return sp.diff(value.xreplace(table), t).subs(t, 0)

