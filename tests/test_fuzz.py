"""Property-based fuzzing of the whole pipeline, spec to kernels (hypothesis, derandomized).

* Random VALID specs from the expression grammar (one to three statistics, each a mean of an
  expression in x, eps and the earlier statistics, with every function and operator of the
  grammar; a normalized value affine in x, or exp of that, with coefficients in the statistics,
  well-defined for any data; every built-in layout; both affine kinds; some statistics
  unbiased): each is built with ``Norm``, loaded on NumPy and run in training and eval mode
  against a float64 reference written here from the spec's expression strings (a tiny ``ast``
  evaluator on NumPy arrays and the layouts' definitions; nothing of symbn's parser or
  derivation): y, the saved statistics, the running statistics' update, and dx, dgamma, dbeta
  against central differences of that reference. Each spec's C sources pass the compiler's
  syntax check under symbn's own flags (-std=c99 -Wall -Wextra -Werror -pedantic); one spec is
  compiled and run on C; four are run at order 2 (backward2 against central differences of
  the backward).
* Random hostile text into every field that reaches generated code or output (the norm's and
  the layout's descriptions and texts, the notations) and hostile or unusual names (the norm,
  its statistics, its layout): refused with a SpecError, or accepted, and then the text is only
  ever escaped (the kernels' code is the benign spec's; importing runs nothing) and the names
  make working kernels.
* The bugs this found, reduced: a regression test each for those fixed since, a strict xfail
  each for those still open (it fails until fixed, then XPASS fails the suite: drop the
  marker). The fuzz tests pass over the examples the open ones stop, and count them
  (``pytest -s -n 0`` prints the counts): any other failure fails them.

Runs without PyTorch, in about 35 s with a warm kernel cache (70 s cold) on two cores. Seeds
are fixed (``derandomize=True``: the examples depend on each test's source), so CI sees the same
examples; no shrinking unless $SYMBN_FUZZ_SHRINK is set.
"""
from __future__ import annotations

import ast
import functools
import inspect
import json
import keyword
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import hypothesis
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

import symbn
from symbn import Layout, Norm, Notation, SpecError
from symbn.build import sources_dir
from symbn.emit import sources
from symbn.jinja import c_comment
from symbn.oracles import central_differences, relative_error
from symbn.render import to_json, to_latex, to_text
from symbn.spec import BUILTINS, CHANNEL, GROUPS, INSTANCE, MAX_TEXT, NAME, TRAILING, reserved_reason

CC = shutil.which(os.environ.get("CC") or "cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")

FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
            phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("SYMBN_FUZZ_SHRINK") else []))
"""Fixed seeds, no example database; no shrinking (minutes per failure here) unless $SYMBN_FUZZ_SHRINK is set."""


# --------------------------------------------------------------------------- a strategy of valid specs

@dataclass(frozen=True)
class E:
    """A generated expression: its text, and whether it is non-negative for every real input."""

    text: str
    nonneg: bool = False


SCALES = ("2", "3", "0.5", "1/3", "1.5")


@st.composite
def expressions(draw, atoms: tuple[E, ...], depth: int, rational: bool = True) -> E:
    """An expression over ``atoms`` that is finite for every real value of them (no division by
    something that can vanish, no root or log of something that can be negative). ``rational``:
    with divisions and negative powers too; the statistics' expressions in x have none, since
    rational functions of x make the compact-form stage stall (test_compact_form_stalls)."""
    if depth <= 0 or draw(st.integers(0, 9)) < 3:
        return draw(st.sampled_from(atoms))
    a = draw(expressions(atoms, depth - 1, rational))
    op = draw(st.sampled_from(["add", "sub", "mul", "scale", "pow", "abs", "sqrt", "exp", "log", "ratpow", "vpow"]
                              + ["div"] * rational))
    if op in ("add", "sub", "mul", "div", "vpow"):
        b = draw(expressions(atoms, depth - 1, rational))
    if op == "add":
        return E(f"{a.text} + {b.text}", nonneg=a.nonneg and b.nonneg)
    if op == "sub":
        return E(f"{a.text} - ({b.text})")
    if op == "mul":
        return E(f"({a.text}) * ({b.text})", nonneg=a.nonneg and b.nonneg)
    if op == "scale":
        c = draw(st.sampled_from(SCALES))
        return E(draw(st.sampled_from([f"{c}*({a.text})", f"({a.text})/{c}", f"-{c}*({a.text})"])))
    if op == "pow":
        k = draw(st.sampled_from([2, 3]))
        return E(f"({a.text})**{k}", nonneg=k % 2 == 0 or a.nonneg)
    if op == "abs":
        return E(f"abs({a.text})", nonneg=True)
    if op == "sqrt":
        inner = a.text if a.nonneg else f"({a.text})**2"
        return E(f"sqrt({inner} + 1)", nonneg=True)
    if op == "exp":  # bounded: no overflow whatever the argument's size
        return E(f"exp(-({a.text})**2)", nonneg=True)
    if op == "log":
        inner = draw(st.sampled_from([f"({a.text})**2", f"abs({a.text})"] + ([a.text] if a.nonneg else [])))
        return E(f"log({inner} + 1)", nonneg=True)
    if op == "div":
        return E(f"({a.text}) / (({b.text})**2 + 1)", nonneg=a.nonneg)
    if op == "ratpow":
        r = draw(st.sampled_from(["1/3", "3/2", "1/4"] + ["-1/2", "-2"] * rational))
        return E(f"(({a.text})**2 + 1)**({r})", nonneg=True)
    # vpow: a variable exponent, on a constant base (its derivative has log(2): see test_c_constants_compile)
    # or on a positive one
    if draw(st.booleans()):
        return E(f"2**(({a.text})/8)", True)
    return E(f"(({a.text})**2 + 1)**(({b.text})/8)", nonneg=True)


STAT_NAME = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_]{1,10}", fullmatch=True),
    st.builds("{}{}".format, st.sampled_from(["mu", "var", "ms", "mad", "nu", "kurt", "sig", "lo", "hi", "w"]), st.integers(0, 99)),
).filter(lambda n: reserved_reason(n) is None)
"""Statistic names: random, or a plausible stem and a number; those symbn reserves are not drawn."""
NORM_NAME = st.one_of(st.from_regex(r"fz[a-z0-9_]{0,10}", fullmatch=True), st.sampled_from(sorted(BUILTINS)))
LAYOUT = st.integers(0, 2**16).map(lambda n: (CHANNEL, INSTANCE, GROUPS, TRAILING)[n % 4])
"""A built-in layout, about evenly (``sampled_from`` would favour the first)."""


@dataclass
class Case:
    fields: dict


@st.composite
def cases(draw, max_stats: int = 3, depth: int = 1) -> Case:
    """The fields of a valid spec."""
    count = draw(st.integers(1, max_stats))
    names = draw(st.lists(STAT_NAME, min_size=count, max_size=count, unique=True))
    eps = E("eps", True)
    stats, atoms = [], [E("x")]
    for name in names:
        earlier = [a for a in atoms if a.text != "x"]
        s = draw(st.sampled_from(earlier)) if earlier else None
        templates = [E("x"), E("x**2", True), E("abs(x)", True)]
        if s is not None:
            templates += [E(f"(x - {s.text})**2", True), E(f"abs(x - {s.text})", True), E(f"(x - {s.text})**4", True),
                          E(f"(x - {s.text}) * {s.text}")]
        if draw(st.integers(0, 2)):
            expr = draw(expressions(tuple(atoms) + (eps,) * draw(st.integers(0, 1)), depth, rational=False))
        else:
            expr = draw(st.sampled_from(templates))
        stats.append((name, expr.text))
        atoms.append(E(name, expr.nonneg))
    stat_atoms = tuple(atoms[1:])
    s = draw(st.sampled_from(stat_atoms))
    a = draw(expressions(stat_atoms + (eps,) * draw(st.integers(0, 1)), 1))
    # affine in x, with coefficients in the statistics (or exp of it: invertible); a normalized value
    # that is not invertible in x is test_normalized_not_invertible_in_x's
    numerator = draw(st.sampled_from(["x", f"x - {s.text}", f"(x - {s.text}) * ({a.text})", f"x * ({a.text}) + {s.text}",
                                      f"x + {a.text}", f"exp((x - {s.text})/4)"]))
    nonneg = [t for t in stat_atoms if t.nonneg]
    d = draw(st.sampled_from(nonneg)) if nonneg and draw(st.booleans()) else draw(
        st.sampled_from([E(f"({t.text})**2", True) for t in stat_atoms] + [draw(expressions(stat_atoms, 1))]))
    if not d.nonneg:
        d = E(f"({d.text})**2", True)
    denominator = draw(st.sampled_from(["", f" / sqrt({d.text} + eps)", f" / ({d.text} + eps)**(1/4)", f" / ({d.text} + eps)",
                                        f" * exp(-({d.text}))", f" / ({d.text} + 1)"]))
    normalized = f"({numerator}){denominator}"
    layout = draw(LAYOUT)
    affine = draw(st.sampled_from(["group", "element"])) if layout.params_per_group else "element"
    unbiased = tuple(n for n in names if draw(st.integers(0, 3)) == 0)
    return Case(dict(name=draw(NORM_NAME), stats=stats, normalized=normalized, affine=affine, layout=layout,
                     description="a generated spec", unbiased=unbiased))


# --------------------------------------------------------------------------- the reference, written here

_OPS = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.divide, ast.Pow: np.power}
_FUNCS = {"sqrt": np.sqrt, "exp": np.exp, "log": np.log, "abs": np.abs}


def evaluator(text: str):
    """A spec expression as a function of an environment of float64 arrays and floats."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp):
            left, right, op = walk(node.left), walk(node.right), _OPS[type(node.op)]
            return lambda env: op(left(env), right(env))
        if isinstance(node, ast.UnaryOp):
            inner = walk(node.operand)
            return (lambda env: -inner(env)) if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.Constant):
            value = float(node.value)
            return lambda env: value
        if isinstance(node, ast.Name):
            return lambda env: env[node.id]
        if isinstance(node, ast.Call):
            fn, arg = _FUNCS[node.func.id], walk(node.args[0])
            return lambda env: fn(arg(env))
        raise AssertionError(f"the generator made {ast.unparse(node)!r}")

    return walk(ast.parse(text, mode="eval"))


class Reference:
    """A spec's forward pass on one problem in NumPy, from the layouts' definitions: channel:
    statistics per channel over N and the spatial dims; instance: per sample and channel over the
    spatial dims; groups: per sample and group of channels; trailing: per row over normalized_shape."""

    def __init__(self, norm: Norm, shape, options: dict):
        self.norm, self.shape, self.kind = norm, tuple(shape), norm.layout.kind
        self.stats = [(name, evaluator(text)) for name, text in norm.stats]
        self.normalized = evaluator(norm.normalized)
        ndim = len(shape)
        if self.kind == "trailing":
            k = len(options["normalized_shape"])
            self.view, self.axes = self.shape, tuple(range(ndim - k, ndim))
            self.param_shape = self.param_view = tuple(options["normalized_shape"])
        else:
            n, c = shape[:2]
            self.param_shape, self.param_view = (c,), (1, c) + (1,) * (ndim - 2)
            if self.kind == "channel":
                self.view, self.axes = self.shape, (0, *range(2, ndim))
            elif self.kind == "instance":
                self.view, self.axes = self.shape, tuple(range(2, ndim))
            else:
                self.view, self.axes = (n, options["num_groups"], -1), (2,)

    def group_values(self, x, eps):
        """Each statistic per group (train mode), kept broadcastable against the view."""
        env = {"x": x.reshape(self.view), "eps": eps}
        for name, fn in self.stats:
            env[name] = np.broadcast_to(fn(env), env["x"].shape).mean(axis=self.axes, keepdims=True)
        return {name: env[name] for name, _ in self.stats}

    def per_p(self, values: dict) -> dict:
        """Statistics per group as running statistics keep them, one per parameter p: the mean
        over the samples (instance, groups) or over the rows (trailing)."""
        if self.kind == "channel":
            return {name: v.reshape(-1) for name, v in values.items()}
        if self.kind == "trailing":
            return {name: np.array([v.mean()]) for name, v in values.items()}
        return {name: v.reshape(v.shape[0], v.shape[1]).mean(axis=0) for name, v in values.items()}

    def _from_p(self, value):
        if self.kind == "trailing":
            return float(value[0])
        return value.reshape(1, -1, 1) if self.kind == "groups" else value.reshape((1, -1) + (1,) * (len(self.shape) - 2))

    def forward(self, x, gamma, beta, eps, running=None):
        """y and the statistics per group; with ``running`` (one array per statistic, per p): eval mode."""
        env = {"x": x.reshape(self.view), "eps": eps}
        values = self.group_values(x, eps) if running is None else {n: self._from_p(running[n]) for n, _ in self.stats}
        env.update(values)
        xhat = np.broadcast_to(self.normalized(env), env["x"].shape).reshape(self.shape)
        return xhat * gamma.reshape(self.param_view) + beta.reshape(self.param_view), values

    def problem(self, seed: int, eps: float):
        rng = np.random.default_rng(seed)
        x, dy = rng.normal(0.3, 1.0, self.shape), rng.normal(size=self.shape)
        gamma, beta = rng.normal(1.0, 0.3, self.param_shape), rng.normal(size=self.param_shape)
        # the running statistics: another batch's, so that they lie in the statistics' domain
        running = self.per_p(self.group_values(rng.normal(0.3, 1.0, self.shape), eps))
        return x, dy, gamma, beta, running


def close(mine, expected, what, rtol=1e-9):
    """Equal to ``rtol`` of the larger of 1 and the largest expected value."""
    mine, expected = np.asarray(mine, np.float64), np.asarray(expected, np.float64)
    assert mine.shape == expected.shape, (what, mine.shape, expected.shape)
    assert np.all(np.isfinite(mine)), (what, "not finite", mine)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    error = float(np.max(np.abs(mine - expected), initial=0.0)) / scale
    assert error < rtol, (what, error, mine, expected)


COUNTS: Counter = Counter()
"""What the fuzz tests dropped, and why (printed by test_fuzz_report; hypothesis' statistics
show the same per test with ``--hypothesis-show-statistics``)."""


def drop(reason: str):
    """Drop this example (counted), in a hypothesis test; elsewhere (the reduced bugs) fail."""
    COUNTS[reason] += 1
    if not currently_in_test_context():
        raise AssertionError(f"the example is unusable: {reason}")
    event(reason)
    assume(False)


def note(text: str):
    if currently_in_test_context():
        hypothesis.note(text)


def check_gradient(mine, loss, value, what):
    """``mine`` against central differences of ``loss`` at ``value``: a relative error under
    1e-6; a larger one is a failure unless the differences' own noise (against a step 4x larger)
    is within a factor 10 of it: then the example is dropped as too ill-conditioned to judge."""
    fd = central_differences(loss, value)
    error = relative_error(mine, fd)
    if error < 1e-6:
        return
    noise = relative_error(central_differences(loss, value, h=4e-6), fd)
    note(f"{what}: relative error {error:.3g} against central differences, whose own noise is {noise:.3g}")
    assert error < 10 * noise, (what, error, noise, mine, fd)
    drop("central differences too noisy")


# --------------------------------------------------------------------------- building, loading, calling

class _Stalled(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise _Stalled in the block after ``seconds`` (SIGALRM, in the main thread; where there is
    none, the test is skipped rather than risk a stall of many minutes). It is raised again here,
    without the frames the signal interrupted: one of them can carry no line number (CPython 3.11,
    interrupted inside SymPy), and pytest, formatting the expected failure, then crashed the
    whole xdist session (seen once in CI: INTERNALERROR on test_compact_form_stalls)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        pytest.skip("bounding a stall needs SIGALRM in the main thread")

    def stalled(*_):
        raise _Stalled

    previous = signal.signal(signal.SIGALRM, stalled)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    timed_out = False
    try:
        yield
    except _Stalled:
        timed_out = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if timed_out:
        raise _Stalled(f"still running after {seconds} s")


def build(case: Case) -> Norm:
    """The spec, or the example dropped when the engine refuses it (with a SpecError that says why)."""
    try:
        return Norm(**case.fields)
    except SpecError as err:
        assert str(err).startswith(f"{case.fields['name']}: "), str(err)
        drop("refused by Norm")


def _raised_in(err: BaseException) -> str:
    """The file of symbn's innermost frame in ``err``'s traceback, relative to the package ('' if none)."""
    frames = [Path(f.filename) for f in traceback.extract_tb(err.__traceback__)]
    mine = [f for f in frames if "symbn" in f.parts and "tests" not in f.parts]
    return mine[-1].relative_to(next(p for p in mine[-1].parents if p.name == "symbn")).as_posix() if mine else ""


LOAD_LIMIT = 8.0
"""Seconds a generated spec may take to derive and emit (at order 1) before it counts as a stall:
the specs drawn here take one or two; the stalls, more than 25 minutes."""


def guarded(make, limit: float = LOAD_LIMIT):
    """``make()`` (a derivation and emission): a SpecError (a spec refused at load, e.g. a
    normalized value SymPy cannot invert) and the known failures of the compact-form stage
    (symbn/simplify.py raises, or stalls: ``limit`` seconds; see the xfail tests below) drop the
    example, counted; any other exception fails the test."""
    try:
        with time_limit(limit):
            return make()
    except _Stalled:
        drop("known bug: the compact-form stage stalls")
    except SpecError as err:
        assert str(err), "a SpecError without a message"
        cause = err.__cause__  # symbn.load's "cannot yet carry this spec": the failure it names
        if cause is not None and _raised_in(cause) == "simplify.py":
            drop(f"known bug: the compact-form stage raises {type(cause).__name__}")
        elif cause is not None and known_c_bug(f"error: {cause}"):
            raise  # the C backend's known bug: c_sources_pass counts it and the example goes on
        else:
            drop("refused at load")
    except Exception as err:
        if _raised_in(err) == "simplify.py":
            drop(f"known bug: the compact-form stage raises {type(err).__name__}")
        raise


def load(norm: Norm, backend: str = "numpy"):
    return guarded(lambda: symbn.load(norm, backend))


def call(kernel, **values):
    """``kernel`` with those of ``values`` it takes, by name (a kernel takes eps, and the saved
    statistics, only when the spec's expressions read them)."""
    taken = inspect.signature(kernel).parameters
    return kernel(**{name: value for name, value in values.items() if name in taken})


def _cc_flags() -> list[str]:
    """The syntax check's flags: symbn's own (-std=c99 -Wall -Wextra -Werror -pedantic), with
    OpenMP when the compiler has it (so that the pragmas are checked too)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.c"
        probe.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 0; }\n")
        done = subprocess.run([CC, "-fopenmp", "-fsyntax-only", str(probe)], capture_output=True)
    return ["-std=c99", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-pedantic"] + (["-fopenmp"] if done.returncode == 0 else [])


CC_FLAGS = _cc_flags() if CC else []


def c_syntax_errors(directory: Path, stem: str) -> str:
    """The compiler's complaints about ``<stem>.c`` (and the header it includes), or ''."""
    done = subprocess.run([CC, *CC_FLAGS, "-I", str(directory), str(directory / f"{stem}.c")], capture_output=True, text=True)
    return done.stderr if done.returncode else ""


KNOWN_C_BUGS = {
    "a pass reads a column no pass holds": re.compile(r"reads \['x_v'\], which no column holds"),
}
"""The C backend's known failures (test_c_kernels_when_every_statistic_read_is_a_mean): each error
the compiler or the backend reports must match one of these, or the test fails. (Fixed since:
constants printed as <math.h>'s M_E, M_LN2; unused parameters under -Wextra -Werror.)"""


def known_c_bug(errors: str) -> str:
    """Which known bug explains every error in ``errors`` (one error line each), or ''."""
    lines = [line for line in errors.splitlines() if "error" in line and "warnings being treated as errors" not in line]
    found = {name for line in lines for name, pattern in KNOWN_C_BUGS.items() if pattern.search(line)}
    explained = all(any(p.search(line) for p in KNOWN_C_BUGS.values()) for line in lines)
    return " and ".join(sorted(found)) if lines and explained else ""


def c_sources_pass(norm: Norm) -> bool:
    """Whether ``norm``'s C sources emit and pass the compiler's syntax check; a known C bug is
    counted (and False returned), anything else fails the test."""
    try:
        directory = guarded(lambda: sources_dir(norm, backend="c"))
        errors = c_syntax_errors(directory, norm.name)
    except ValueError as err:
        cause = err.__cause__ if isinstance(err, SpecError) else err  # load names the failure as a SpecError
        if cause is None or not _raised_in(cause).startswith("backends/c/") or not known_c_bug(f"error: {cause}"):
            raise
        errors = f"error: {cause}"
    if not errors:
        return True
    known = known_c_bug(errors)
    assert known, errors[:3000]
    COUNTS[f"known C bug: {known}"] += 1
    if currently_in_test_context():
        event(f"known C bug: {known}")
    return False


# --------------------------------------------------------------------------- random valid specs, run

def test_generated_specs_are_mostly_accepted():
    """The strategy makes valid specs: Norm accepts at least 90% of them, and each one it refuses
    it refuses with a SpecError that names the spec and says why."""
    counts = Counter()

    @settings(max_examples=200, **FUZZ)
    @given(case=cases())
    def run(case):
        try:
            Norm(**case.fields)
            counts["accepted"] += 1
        except SpecError as err:
            assert str(err).startswith(case.fields["name"] + ": ") and len(str(err)) > len(case.fields["name"]) + 10, str(err)
            counts["refused"] += 1

    run()
    total = counts["accepted"] + counts["refused"]
    assert total >= 180 and counts["refused"] <= 0.1 * total, counts


def run_case(k, norm: Norm, example: int, seed: int, eps: float, momentum: float):
    """Training and eval mode of kernels ``k`` against the reference, on one of the layout's
    examples: y, the saved statistics, the running statistics' update, dx, dgamma, dbeta."""
    shape, options = norm.layout.examples[example % len(norm.layout.examples)]
    options = dict(options)
    ref = Reference(norm, shape, options)
    x, dy, gamma, beta, running = ref.problem(seed, eps)
    note(f"x: {shape}, {options}, eps {eps}, momentum {momentum}, seed {seed}")
    expected, values = ref.forward(x, gamma, beta, eps)
    if not (np.all(np.isfinite(expected)) and all(np.all(np.isfinite(v)) for v in values.values())):
        drop("the reference is not finite")

    live = {f"running_{name}": running[name].copy() for name in norm.stat_names}
    y, *saved = call(k.forward_train, x=x, gamma=gamma, beta=beta, eps=eps, momentum=momentum, **live, **options)
    close(y, expected, "y")
    assert len(saved) == len(norm.stats)
    for name, mine in zip(norm.stat_names, saved):
        close(mine, values[name].reshape(mine.shape), name)
    m = x.size // saved[0].size  # the members of a group
    batch = ref.per_p(values)
    for name in norm.stat_names:  # PyTorch's update, Bessel's correction for the unbiased ones
        correction = m / (m - 1) if name in norm.unbiased else 1.0
        close(live[f"running_{name}"], (1 - momentum) * running[name] + momentum * correction * batch[name], f"running_{name}")

    def loss(x=x, gamma=gamma, beta=None, running=None):
        """Σ dy·y; beta = 0 unless it is the variable (a constant term in y only adds rounding)."""
        return float(np.sum(dy * ref.forward(x, gamma, np.zeros_like(gamma) if beta is None else beta, eps, running)[0]))

    dx, dgamma, dbeta = call(k.backward_train, dy=dy, x=x, gamma=gamma, eps=eps, **dict(zip(norm.stat_names, saved)), **options)
    check_gradient(dx, lambda v: loss(x=v), x, "train dx")
    check_gradient(dgamma, lambda v: loss(gamma=v), gamma, "train dgamma")
    check_gradient(dbeta, lambda v: loss(gamma=0 * gamma, beta=v), beta, "train dbeta")

    constants = {f"running_{name}": running[name] for name in norm.stat_names}
    expected = ref.forward(x, gamma, beta, eps, running)[0]
    if not np.all(np.isfinite(expected)):
        drop("the eval reference is not finite")
    close(call(k.forward_eval, x=x, gamma=gamma, beta=beta, eps=eps, **constants, **options), expected, "eval y")
    dx, dgamma, dbeta = call(k.backward_eval, dy=dy, x=x, gamma=gamma, eps=eps, **constants, **options)
    check_gradient(dx, lambda v: loss(x=v, running=running), x, "eval dx")
    check_gradient(dgamma, lambda v: loss(gamma=v, running=running), gamma, "eval dgamma")
    check_gradient(dbeta, lambda v: loss(gamma=0 * gamma, beta=v, running=running), beta, "eval dbeta")


PROBLEM = dict(example=st.integers(0, 1), seed=st.integers(0, 2**16), eps=st.sampled_from([1e-5, 1e-2, 0.3]),
               momentum=st.sampled_from([0.1, 0.5, 1.0]))


def _describe(norm: Norm) -> str:
    return (f"Norm({norm.name!r}, stats={dict(norm.stats)!r}, normalized={norm.normalized!r}, affine={norm.affine!r}, "
            f"layout={norm.layout.name.upper()}, unbiased={norm.unbiased!r})")


@settings(max_examples=50, **FUZZ)
@given(case=cases(), **PROBLEM)
def test_random_specs_on_numpy(case, example, seed, eps, momentum):
    """A random valid spec, derived and loaded on NumPy, against the reference in both modes;
    its C sources emit and pass the compiler's syntax check (or fail with a known C bug, counted)."""
    norm = build(case)
    note(_describe(norm))
    k = load(norm)
    if CC is not None:
        c_sources_pass(norm)
    run_case(k, norm, example, seed, eps, momentum)
    COUNTS["random specs run on NumPy"] += 1


@needs_cc
@settings(max_examples=1, **FUZZ)
@given(case=cases(max_stats=2), **PROBLEM)
def test_random_specs_on_c(case, example, seed, eps, momentum):
    """A random spec compiled (seconds, then cached) and run on C, against the reference
    (specs the known C bugs stop are passed over, cheaply, before the compiler runs)."""
    norm = build(case)
    note(_describe(norm))
    if not c_sources_pass(norm):
        drop("a known C bug")
    run_case(load(norm, "c"), norm, example, seed, eps, momentum)
    COUNTS["random specs run on C"] += 1


@settings(max_examples=4, **FUZZ)
@given(case=cases(max_stats=2), example=st.integers(0, 1), seed=st.integers(0, 2**16), eps=st.sampled_from([1e-5, 0.3]),
       mode=st.sampled_from(["train", "eval"]))
def test_random_specs_at_order_2(case, example, seed, eps, mode):
    """The double backward of a random spec (NumPy): backward2 is the gradient of
    l2 = Σ v·(dx, dgamma, dbeta) of the first backward with respect to x, gamma and dy, by central
    differences of that backward (in training with the statistics recomputed from x, as the
    functions of x they are); beta is read by no backward: its gradient is zero."""
    norm = build(case)
    note(_describe(norm) + f", {mode}")
    k = guarded(lambda: symbn.load(norm, "numpy", order=2), 4 * LOAD_LIMIT)  # order 2: seconds, where order 1 takes one
    shape, options = norm.layout.examples[example]
    options = dict(options)
    ref = Reference(norm, shape, options)
    x, dy, gamma, beta, running = ref.problem(seed, eps)
    if not np.all(np.isfinite(ref.forward(x, gamma, beta, eps, None if mode == "train" else running)[0])):
        drop("the reference is not finite")
    rng = np.random.default_rng(seed + 1)
    v = {"d2_dx": rng.normal(size=x.shape), "d2_dgamma": rng.normal(size=gamma.shape), "d2_dbeta": rng.normal(size=beta.shape)}
    constants = {f"running_{name}": running[name] for name in norm.stat_names}

    def statistics(x, gamma):
        if mode == "eval":
            return constants
        _, *saved = call(k.forward_train, x=x, gamma=gamma, beta=beta, eps=eps, **options)
        return dict(zip(norm.stat_names, saved))

    def first(x=x, gamma=gamma, dy=dy):
        grads = call(getattr(k, f"backward_{mode}"), dy=dy, x=x, gamma=gamma, eps=eps, **statistics(x, gamma), **options)
        return float(sum(np.sum(w * g) for w, g in zip(v.values(), grads)))

    try:
        d2_x, d2_gamma, d2_beta, d2_dy = call(getattr(k, f"backward2_{mode}"), **v, dy=dy, x=x, gamma=gamma, eps=eps,
                                              **statistics(x, gamma), **options)
    except UnboundLocalError as err:  # test_order_2_when_every_statistic_read_is_a_mean
        if "'x_v'" not in str(err):
            raise
        drop("known bug: the order-2 NumPy kernel reads x_v before assigning it")
    check_gradient(d2_x, lambda value: first(x=value), x, f"{mode} d2_x")
    check_gradient(d2_gamma, lambda value: first(gamma=value), gamma, f"{mode} d2_gamma")
    check_gradient(d2_dy, lambda value: first(dy=value), dy, f"{mode} d2_dy")
    np.testing.assert_array_equal(d2_beta, 0.0)
    COUNTS["random specs run at order 2"] += 1


# --------------------------------------------------------------------------- bugs found, reduced

def _spec(name, stats, normalized, layout=CHANNEL, affine="group"):
    return Norm(name, stats=stats, normalized=normalized, affine=affine, layout=layout)


def _c_compiles(norm: Norm):
    directory = sources_dir(norm, backend="c")
    assert not c_syntax_errors(directory, norm.name), c_syntax_errors(directory, norm.name)[:2000]


def xfail(raises, reason):
    """A known bug, reduced: the test fails with ``raises`` until it is fixed, then XPASS fails the
    suite (strict), a reminder to drop the marker."""
    return pytest.mark.xfail(strict=True, raises=raises, reason=reason)


# Found by these tests and fixed since: kept as regression tests.

@needs_cc
@pytest.mark.parametrize("normalized", ["exp(1) * x / sqrt(ms + eps)", "log(2) * x / sqrt(ms + eps)",
                                        "log(10) * x / sqrt(ms + eps)", "2**(ms/8) * x / sqrt(ms + eps)"])
def test_c_constants_compile(normalized):
    """E, log(2), log(10) (a derivative of 2**x has log(2)) were printed as M_E, M_LN2, M_LN10,
    which <math.h> does not define under -std=c99."""
    _c_compiles(_spec("constants", {"ms": "x**2"}, normalized, TRAILING, "element"))


@needs_cc
@pytest.mark.parametrize("stats, normalized, layout", [
    ({"ms": "x**2"}, "x / sqrt(ms + 1)", TRAILING),  # no eps: symbn_<kernel>_load's gs was unused
    ({"ms": "x**2"}, "x * ms", TRAILING),
    ({"d": "eps"}, "x / sqrt(d**2 + eps)", GROUPS),  # a statistic without x: the parameter a was unused
])
def test_c_kernels_compile_under_wextra_werror(stats, normalized, layout):
    _c_compiles(_spec("unused", stats, normalized, layout, "element"))


def test_statistic_named_like_a_math_h_macro():
    """math_errhandling is an object-like macro of <math.h>: refused as a name, or the C compiles."""
    try:
        norm = _spec("macro", {"mean": "x", "math_errhandling": "(x - mean)**2"}, "(x - mean) / sqrt(math_errhandling + eps)")
    except SpecError as err:
        assert "math_errhandling" in str(err)
        return
    if CC is not None:
        _c_compiles(norm)


@pytest.mark.parametrize("normalized", ["(x - mean)**3", "x**2 - mean", "abs(x - mean)"])
def test_normalized_not_invertible_in_x(normalized):
    """A normalized value SymPy cannot invert in x was a NotImplementedError from symbn.load: now
    a SpecError (when made, or at load) that says so, or kernels that compute it right."""
    try:
        norm = _spec("noninvertible", {"mean": "x", "var": "(x - mean)**2"}, normalized)
        k = symbn.load(norm, "numpy")
    except SpecError as err:
        assert "invertible" in str(err), str(err)
        return
    run_case(k, norm, 1, 0, 1e-5, 0.1)


# Open bugs: strict xfails.

@xfail(ValueError, "C backend: when every statistic the normalized value reads is a mean of x (linear in x), emission "
                   "fails: \"backward_train pass 1 group: reads ['x_v'], which no column holds\"")
@pytest.mark.parametrize("normalized", ["x - mu", "(x - mu) / sqrt(mu**2 + eps)"])
def test_c_kernels_when_every_statistic_read_is_a_mean(normalized):
    sources_dir(_spec("centred", {"mu": "x"}, normalized, TRAILING, "element"), backend="c")


@xfail(UnboundLocalError, "NumPy backend, order 2: when every statistic the normalized value reads is a mean of x, "
                          "backward2_train reads x_v before assigning it (the C backend's bug above, at order 2)")
def test_order_2_when_every_statistic_read_is_a_mean():
    norm = _spec("centred", {"mu": "x"}, "x - mu", TRAILING, "element")
    k = symbn.load(norm, "numpy", order=2)
    x, ones = np.random.default_rng(0).normal(size=(4, 6)), np.ones(6)
    _, mu = k.forward_train(x, ones)
    *_, d2_dy = k.backward2_train(x, ones, ones, x, x, ones, mu)  # v = (x, 1, 1), dy = x, gamma = 1
    # l2 = Σ x·(dy - mean(dy)) + Σ dy·xhat + Σ dy, with xhat = x - mean(x)
    np.testing.assert_allclose(d2_dy, 2 * (x - x.mean(axis=1, keepdims=True)) + 1)


@xfail(SpecError, "a Layout of another name with a built-in geometry is accepted by Layout and Norm, then refused by "
                  "symbn.load (the NumPy backend finds a geometry by the layout's name, not its kind)")
def test_layout_of_another_name():
    try:
        rows = Layout("rows", "each row over its features", geometry=TRAILING.geometry)
        norm = _spec("rowsnorm", {"ms": "x**2"}, "x / sqrt(ms + eps)", rows, "element")
    except SpecError:
        return  # refused when made: fine
    run_case(symbn.load(norm, "numpy"), norm, 0, 0, 1e-5, 0.1)


ROOT_OF_RATIONAL = {"w": "((x/(x**2 + 1))**2 + 1)**(1/4)"}


def test_compact_form_polynomial_error():
    """SymPy's PolynomialError from simplify._tidy (sp.degree of a root's base that is not a
    polynomial in eps) reaches the user as a SpecError naming the spec, not as SymPy's error; the
    spec itself is not supported yet."""
    norm = _spec("polyerror", ROOT_OF_RATIONAL, "x + w*eps")
    with pytest.raises(SpecError, match=r"polyerror: symbn cannot yet carry this spec.*PolynomialError"):
        symbn.load(norm, "numpy")


@xfail(_Stalled, "symbn.load of this 60-character spec runs for many minutes (simplify._tidy: sp.cancel of the "
                 "expanded compact form)")
def test_compact_form_stalls():
    norm = _spec("stall", ROOT_OF_RATIONAL, "(x + w) / (w + eps)**(1/4)")
    with time_limit(3.0):
        symbn.load(norm, "numpy")


# --------------------------------------------------------------------------- hostile text in every field

SENTINEL = Path(tempfile.gettempdir()) / f"symbn-fuzz-executed-{os.getpid()}"
"""Created by the payloads below if any of them is ever executed."""
TOUCH = f"__import__('pathlib').Path({str(SENTINEL)!r}).touch()"
PAYLOADS = [
    f'"""\n{TOUCH}\n"""', f"'''\n{TOUCH}\n'''", f"\n{TOUCH}\n#", f"\\\n{TOUCH}", f"\r{TOUCH}", f"\u2028{TOUCH}",
    f"{{{{ {TOUCH} }}}}", f"{{% set _ = {TOUCH} %}}", f"{{{{ cycler.__init__.__globals__.os.system('touch {SENTINEL}') }}}}",
    "*/ int pwn = 1; /*", "*/\n#define gamma 0\n/*", "??/\nint pwn;", "\\\nint pwn;", '"; int pwn; "',
    "*/ __attribute__((constructor)) static void pwn(void) { abort(); } /*", "#include </etc/passwd>",
    "\\input{/etc/passwd}", "}\\end{document}", "{i}", "{0}", "{", "}", "%", "$", "\\",
]
FRAGMENTS = st.sampled_from(['"""', "'''", '"', "'", "\\", "\n", "\r", "\t", "*/", "/*", "*", "/", "??", "?", "\x00", "\x1b",
                             "\u2028", "\u202e", "\ud800", "\U0001f600", "é", "#", " ", "a", "_", *PAYLOADS])
TEXT = st.lists(st.one_of(FRAGMENTS, st.text(max_size=6)), max_size=12).map("".join)
NOTATION = st.builds(Notation, TEXT, TEXT, TEXT, TEXT)

BN_STATS = {"mean": "x", "var": "(x - mean)**2"}
BN_NORMALIZED = "(x - mean) / sqrt(var + eps)"


def _module_body(path: Path) -> list[str]:
    """The statements of a generated module after its docstring, as AST dumps."""
    module = ast.parse(path.read_text(encoding="utf-8"))
    return [ast.dump(s) for s in module.body[1:]]


def _preprocessed(directory: Path, stem: str) -> str:
    """The C source through the preprocessor alone: comments gone, code as the compiler sees it."""
    done = subprocess.run([CC, "-std=c99", "-E", "-P", "-I", str(directory), str(directory / f"{stem}.c")],
                          capture_output=True, text=True, check=True)
    return done.stdout


@functools.cache
def benign():
    """The kernels' code of the spec the hostile ones are variations of, with plain texts."""
    norm = Norm("hostile", stats=BN_STATS, normalized=BN_NORMALIZED, affine="group", layout=Layout("channel", "plain"),
                description="plain")
    numpy_dir, c_dir = sources_dir(norm, backend="numpy"), sources_dir(norm, backend="c") if CC else None
    return _module_body(numpy_dir / "hostile.py"), _preprocessed(c_dir, "hostile") if CC else None


@settings(max_examples=20, **FUZZ)
@given(description=TEXT, layout_description=TEXT, statistics=TEXT, group_noun=TEXT, mean=NOTATION, var=NOTATION)
def test_fuzz_hostile_texts(description, layout_description, statistics, group_noun, mean, var):
    """Hostile text in the descriptions, the layout's texts and the notations: refused (only for
    length) or accepted, and then the kernels' code is the benign spec's (Python: the same
    statements after the docstring, which holds the texts exactly; C: the same code once the
    preprocessor has dropped the comments, and it compiles with -Werror), importing runs nothing,
    and the derivation's text, JSON and LaTeX output are made without an error."""
    texts = (description, layout_description, statistics, group_noun)
    try:
        layout = Layout("channel", layout_description, statistics=statistics, group_noun=group_noun)
        norm = Norm("hostile", stats=BN_STATS, normalized=BN_NORMALIZED, affine="group", layout=layout,
                    description=description, notation={"mean": mean, "var": var})
    except SpecError as err:
        assert any(len(t) > MAX_TEXT for t in texts), err
        drop("hostile text refused (too long)")
    assert all(len(t) <= MAX_TEXT for t in texts)
    body, c_code = benign()
    numpy_dir = sources_dir(norm, backend="numpy")
    docstring = ast.get_docstring(ast.parse((numpy_dir / "hostile.py").read_text(encoding="utf-8")), clean=False)
    assert (description or "hostile") in docstring and layout_description in docstring
    assert _module_body(numpy_dir / "hostile.py") == body
    k = symbn.load(norm, "numpy")
    assert not SENTINEL.exists(), "a payload ran"
    _, mean_, _ = k.forward_train(np.arange(12.0).reshape(4, 3))
    np.testing.assert_allclose(mean_, [4.5, 5.5, 6.5])
    if CC is not None:
        c_dir = sources_dir(norm, backend="c")
        assert not c_syntax_errors(c_dir, "hostile"), c_syntax_errors(c_dir, "hostile")[:2000]
        assert _preprocessed(c_dir, "hostile") == c_code
        header = (c_dir / "hostile.h").read_text(encoding="utf-8")
        assert c_comment(description or "hostile") in header and c_comment(layout_description) in header
    for mode in ("train", "eval"):
        d = symbn.derive(norm, mode)
        assert description in to_text(d)
        assert json.loads(to_json(d))["description"] == description
        to_latex(d)  # notation.latex is LaTeX by definition: printed as it is (see the report)
    assert not SENTINEL.exists(), "a payload ran"
    COUNTS["hostile texts accepted and checked"] += 1


LIBRARY_NAMES = sorted(set("""
    e pi inf nan true false main stdin stdout stderr floor ceil round copysign hypot nanf complex imaginary float_t double_t
    int8_t int64_t uint32_t intptr_t div_t exit abort rand environ unix linux signbit isless fpclassify alignas noreturn
    static_assert thread_local nullptr typeof constexpr os sys builtins ones zeros empty asarray float64 float32 ndarray
    errstate geometry dims kernels chain numbers cdll byref pointer cls kwargs match case print_ exec_ self_ lambda_ main_
    math_errhandling
""".split()))
NAMEISH = st.one_of(TEXT, st.from_regex(r"[a-z][a-z0-9_]{0,33}\n?", fullmatch=True), st.sampled_from(LIBRARY_NAMES))


@settings(max_examples=20, **FUZZ)
@given(norm_name=NAMEISH, first=NAMEISH, second=NAMEISH, layout_name=st.one_of(st.just("channel"), NAMEISH))
def test_fuzz_hostile_names(norm_name, first, second, layout_name):
    """Hostile and unusual names for the norm, its statistics and its layout: refused with a
    SpecError, or plain identifiers that generate working code: the NumPy kernels right against
    the reference, the C sources passing the compiler's checks (names of the C and Python
    libraries included: they must not collide with anything the kernels use)."""
    try:
        layout = Layout(layout_name, "fine", geometry=CHANNEL.geometry)
        norm = Norm(norm_name, stats={first: "x", second: f"(x - {first})**2"}, normalized=f"(x - {first}) / sqrt({second} + eps)",
                    affine="group", layout=layout, unbiased=(second,))
    except SpecError as err:
        assert str(err)
        drop("hostile name refused")
    for name in (norm_name, first, second, layout_name):
        assert NAME.fullmatch(name) and name.isascii() and name.isidentifier() and not keyword.iskeyword(name), name
    note(f"norm {norm_name!r}, statistics {first!r}, {second!r}, layout {layout_name!r}")
    if layout_name == "channel":
        run_case(load(norm), norm, 0, 0, 1e-5, 0.1)
        if CC is not None:
            c_dir = sources_dir(norm, backend="c")
            assert not c_syntax_errors(c_dir, norm.name), c_syntax_errors(c_dir, norm.name)[:2000]
    elif CC is not None:  # a layout of another name loads nowhere yet (test_layout_of_another_name): its C alone
        with tempfile.TemporaryDirectory() as tmp:
            for filename, text in sources(norm, backends=("c",)).items():
                (Path(tmp) / filename).write_text(text, encoding="utf-8")
            assert not c_syntax_errors(Path(tmp), norm.name), c_syntax_errors(Path(tmp), norm.name)[:2000]
    COUNTS["unusual names accepted and checked"] += 1


def test_no_payload_ran():
    assert not SENTINEL.exists()


def test_fuzz_report():
    """What the fuzz tests above ran and dropped (``pytest -s -n 0`` prints it): the strategies
    are meant to make valid, well-conditioned examples, so few are dropped."""
    print("\nfuzz:", dict(sorted(COUNTS.items())))
    ran = COUNTS["random specs run on NumPy"]
    if ran:
        assert COUNTS["refused at load"] <= 0.1 * ran, COUNTS
        dropped = sum(v for k, v in COUNTS.items() if k.startswith(("known bug", "central", "the reference", "the eval")))
        assert dropped <= 0.2 * ran, COUNTS
