#!/usr/bin/env python3
"""Run the generated C kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

What: the C sources of every built-in norm at orders 1 and 2 (the committed files under
``generated/``) and of one user spec (the README's quartic norm, emitted on the fly) are
compiled by ``build.compile_library`` with gcc, its flags (``-std=c99 -Wall -Wextra -Werror
-pedantic -march=native -fopenmp``) followed by ``-fsanitize=address,undefined
-fno-sanitize-recover=all -g -O1`` (``-O1`` overrides its ``-O3``), into a temporary folder,
never into the kernel cache. A child Python process, with
the ASan and UBSan runtimes preloaded, then makes a seeded random sequence of calls through the ordinary
Python wrappers (``Kernels(library)`` of each generated module, as ``symbn.load`` makes them):
every kernel, train and eval, float32 and float64, random shapes per layout (a group of one,
tiny and odd sizes, many channels, problems big enough for the thread team, empty arrays,
which must be refused), C-contiguous, strided, reversed, Fortran-order and read-only inputs,
gamma and beta given or None, ``out=`` buffers, running statistics, a NaN now and then, one
or two threads and every value of the ``schedule`` argument, half the calls through ctypes and half
through symbn's compiled entry point (``symbn/backends/c/entry.c``, built with the same sanitizers:
it reads the arrays' memory itself and calls the kernels' packed forms). Each result is compared with the
same call on the NumPy backend: dtypes, shapes and refusals with the call itself, values with
the call in float64 (the C computes every element in double), so that a wrong answer is a
failure too, and so is a refusal by one backend only. Every C entry point is also called directly with sizes whose product
overflows ``ptrdiff_t``: it must return SYMBN_ESIZE and leave its buffers alone.

Why: the C kernels index raw pointers with sizes they compute themselves, run OpenMP teams and
prefetch ahead; the numerical tests see a wrong value, not an out-of-bounds read that happens
to land in mapped memory, an uninitialised workspace or a signed overflow. The sanitizers see
those.

Usage::

    python scripts/sanitize.py                      # what CI runs: 500 calls
    python scripts/sanitize.py --calls 3000 --seconds 600 --seed 7

It prints the calls made per norm and kernel and the sanitizer reports (0), and exits 1 with
the report on any finding, a wrong answer or a crash of the child (``--seed K --calls I+1``
replays a failure at call I), 2 when the libraries cannot be built. Needs gcc with libasan
and libubsan (Debian: gcc), Linux.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "symbn").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's symbn and generated/, before an installed copy

from symbn import build  # noqa: E402
from symbn.interface import STATUS  # noqa: E402
from symbn.spec import BUILTINS, CHANNEL, Norm  # noqa: E402

CC = "gcc"
"""The compiler: its own ASan and UBSan runtimes are the ones preloaded into the child."""
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1")
ENVIRONMENT = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:check_initialization_order=1:strict_string_checks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:abort_on_error=1",
}
"""Python leaks by design (detect_leaks=0); any finding aborts the child."""
FINDINGS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")
"""What a sanitizer report contains: found in the child's output, it fails the run even on exit status 0."""

QUARTIC = Norm("quartic", stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)",
               affine="group", layout=CHANNEL)
"""The README's user spec: its kernels are emitted on the fly (into the temporary cache)."""
SPECS = {QUARTIC.name: QUARTIC}
ORDERS = (1, 2)
THREADS = (1, 2)
SCHEDULES = (0, 1, 2, 3, 7)
"""AUTO, GROUPS, LANES, ROWS (symbn.interface.SCHEDULES), and a value that is none of them (the C reads it as AUTO)."""
TOLERANCE = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-7}
"""Largest |C - NumPy in float64| per output, relative to the output's largest magnitude or FLOOR times the
call's largest output, whichever is larger (:func:`mismatch`). The C rounds a double result once (float32:
6e-8); an output that is zero up to rounding (a group of one makes dx and d2_x differences of equal terms)
is rounding noise of different sizes on the two backends, so it is measured on the call's scale (seen: 3e-9
of it in float64); a wrong index or stride is off by the whole output."""
FLOOR = 1e-3
T = TypeVar("T")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
PTRDIFF_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_ssize_t) - 1) - 1
OVERFLOWING = ((2**31, 2**31, 4, 1, 1), (1, 1, 2**32, 1, 2**32), (3, 1, 1, 1, PTRDIFF_MAX // 2), (PTRDIFF_MAX, 1, 1, 1, 1),
               (1, PTRDIFF_MAX, PTRDIFF_MAX, 1, 1), (2**21, 2**21, 2**21, 2**21, 2**21))
"""(outer, q_count, p_count, l_count, s_count) whose products overflow ptrdiff_t (or its workspace)."""
NONPOSITIVE = ((0, 1, 1, 1, 1), (1, 1, 1, 1, -1), (1, -(2**40), 1, 1, 1))
"""Sizes that are not all positive: SYMBN_ESIZE too."""
CANARY = """#include <limits.h>
#include <stdlib.h>
int canary_asan(int n);
int canary_ubsan(int n);
int canary_asan(int n)  /* reads one int past the end of a heap block */
{
    int *p = calloc((size_t)n, sizeof *p), v;
    if (!p) return -1;
    v = p[n];
    free(p);
    return v;
}
int canary_ubsan(int n)  /* signed overflow for n > 0 */
{
    return INT_MAX + n;
}
"""
"""What ``--canary`` builds with the kernels' flags and calls: proof that a finding fails the run."""


def norm_of(name: str) -> str | Norm:
    """A built-in by name, or one of :data:`SPECS`."""
    return SPECS.get(name, name)


# ============================================================================ the parent: build, run, report

@dataclass(frozen=True)
class Unit:
    """One generated C file: a norm's kernels of one order (order 2: backward2_* only)."""

    norm: str
    order: int
    source: Path


def units(norms: list[str], orders: tuple[int, ...]) -> list[Unit]:
    """The C sources to sanitize; a spec's are emitted into the (temporary) cache by build.py."""
    found = []
    for name in norms:
        for order in orders:
            stem, directory, _ = build.emitted(norm_of(name), order=order, backend="c")
            if directory is None:
                raise build.CompilerError(f"cannot write the emitted sources of {name} to {build.cache_dir()}")
            found.append(Unit(name, order, directory / f"{stem}.c"))
    return found


def compile_sanitized(source: Path, folder: Path, extra: tuple[str, ...] = ()) -> Path:
    """``source`` compiled by build.py (its flags and variants, with OpenMP always: the threads are
    under test) with the sanitizers after them (their -O1 over its -O3), into ``folder``."""
    try:
        return build.compile_library(source, extra=(*extra, *SANITIZE, "-fopenmp"), directory=folder)
    except build.CompilerError as err:
        raise build.CompilerError(f"with the sanitizers: {err}") from None


def compile_all(found: list[Unit], folder: Path) -> dict[Unit, Path]:
    """Every unit's sanitized library, compiled in parallel (one compiler per core)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        libraries = list(pool.map(lambda unit: compile_sanitized(unit.source, folder), found))
    return dict(zip(found, libraries))


def runtime(name: str) -> str:
    """The path of one of the compiler's sanitizer runtimes (``libasan.so``), to preload."""
    done = subprocess.run([CC, f"-print-file-name={name}"], capture_output=True, text=True, check=False)
    path = done.stdout.strip()
    if done.returncode or not os.path.isabs(path) or not os.path.exists(path):
        raise build.CompilerError(f"{CC} has no {name}: install its sanitizer runtimes (Debian: gcc, libasan, libubsan)")
    return path


def child_environment() -> dict[str, str]:
    """The environment of the child: the sanitizer runtimes preloaded (ASan first, as it must be)."""
    env = dict(os.environ, **ENVIRONMENT)
    env["LD_PRELOAD"] = " ".join(runtime(name) for name in ("libasan.so", "libubsan.so"))
    return env


def run_child(plan: Path, seconds: float) -> subprocess.CompletedProcess | None:
    """The child, run on ``plan``; None when it ran five minutes past ``seconds`` (a hang)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(plan)]
    try:
        return subprocess.run(command, capture_output=True, text=True, env=child_environment(), check=False,
                              timeout=seconds + 300)
    except subprocess.TimeoutExpired:
        return None


def findings(output: str) -> list[str]:
    """The lines of ``output`` that belong to a sanitizer report's headline."""
    return [line for line in output.splitlines() if any(mark in line for mark in FINDINGS)]


def print_summary(summary: dict, seconds: float) -> None:
    """Calls per norm and kernel, refusals, probes, and the sanitizer reports (none, or we would not be here)."""
    calls = summary["calls"]
    print(f"{sum(calls.values())} calls in {summary['seconds']:.0f} s ({seconds:.0f} s in all; seed {summary['seed']}), "
          "each compared with the NumPy backend:")
    norms = sorted({key.split(".")[0] for key in calls})
    kernels = sorted({key.split(".")[1] for key in calls}, key=lambda k: (k.startswith("backward2"), k))
    print(f"  {'':14}" + "".join(f"{k:>16}" for k in kernels))
    for norm in norms:
        print(f"  {norm:14}" + "".join(f"{calls.get(f'{norm}.{k}', 0):>16}" for k in kernels))
    print(f"  refused by both backends alike: {summary['refused']}; threads: {summary['threads']}; "
          f"schedules: {summary['schedules']}")
    print(f"  through the compiled entry point: {summary['entered']}, of which it ran {summary['taken']} itself and handed "
          "the rest to ctypes (evaluation kernels, and calls it does not take: other layouts, options, a parameter "
          "given as None, a refusal); the other calls through ctypes alone")
    print(f"  SYMBN_ESIZE probes (direct ctypes calls with overflowing sizes): {summary['probes']}, all refused")
    print("sanitizer reports: 0")


def build_libraries(args: argparse.Namespace, folder: Path) -> tuple[list[list], str | None]:
    """[norm, order, library] for every unit asked for, or the canary's library alone (``--canary``);
    and the entry point's library (None without Python's headers, or for the canary)."""
    if args.canary:
        source = folder / "canary.c"
        source.write_text(CANARY)
        return [["canary", 0, str(compile_sanitized(source, folder))]], None
    found = units(args.norms, tuple(args.orders))
    print(f"compiling {len(found)} kernel libraries and the entry point with {CC} {' '.join(SANITIZE)} ...", flush=True)
    flags = build.entry_flags()
    if flags is None:
        print("sanitize: no Python.h: the compiled entry point is not built, every call goes through ctypes", flush=True)
    entry = None if flags is None else str(compile_sanitized(build.ENTRY, folder, flags))
    return [[unit.norm, unit.order, str(path)] for unit, path in compile_all(found, folder).items()], entry


def failure(done: subprocess.CompletedProcess | None, current: Path, seed: int) -> str | None:
    """What went wrong in the child, with its output (the sanitizer's report), or None."""
    last = current.read_text() if current.exists() else "(none)"
    if done is None:
        return f"the child hung (still running 5 minutes after --seconds) in: {last}"
    output = done.stdout + done.stderr
    reports = findings(output)
    if not done.returncode and not reports:
        return None
    replay = f"\nsanitize: replay it with: python scripts/sanitize.py --seed {seed} --calls <its number + 1>" if current.exists() else ""
    return (f"{output}\nsanitize: FAILED: the child exited with status {done.returncode}; sanitizer reports: {len(reports)}\n"
            f"sanitize: the call in progress: {last}{replay}")


def parent(args: argparse.Namespace) -> int:
    """Build the sanitized libraries into a temporary folder, run the child on them, report."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="symbn-sanitize-") as scratch:
        folder = Path(scratch)
        os.environ["SYMBN_CACHE_DIR"] = str(folder / "cache")  # a spec's sources go here, never into the user's cache
        os.environ["CC"] = CC  # build.py compiles with the compiler whose runtimes the child preloads
        try:
            libraries, entry = build_libraries(args, folder)
            child_environment()  # the runtimes exist, before any call
        except (build.CompilerError, subprocess.TimeoutExpired, OSError) as err:
            print(f"sanitize: {err}", file=sys.stderr)
            return 2
        print(f"compiled in {time.time() - start:.0f} s; calling the kernels ...", flush=True)
        plan, summary, current = folder / "plan.json", folder / "summary.json", folder / "current.txt"
        plan.write_text(json.dumps({"libraries": libraries, "entry": entry, "calls": args.calls, "seed": args.seed, "seconds": args.seconds,
                                    "canary": args.canary,
                                    "summary": str(summary), "current": str(current)}))
        why = failure(run_child(plan, args.seconds), current, args.seed)
        if why or not summary.exists():
            print(f"sanitize: {why or 'the child wrote no summary'}", file=sys.stderr)
            return 1
        result = json.loads(summary.read_text())
    if not sum(result["calls"].values()):
        print("sanitize: FAILED: no kernel call was made: raise --calls or --seconds", file=sys.stderr)
        return 1
    print_summary(result, time.time() - start)
    return 0


# ============================================================================ the child: the calls

@dataclass
class Target:
    """One norm: per order, its generated module, its kernels on the sanitized library (through ctypes,
    and through the sanitized entry point where there is one) and on NumPy."""

    name: str
    modules: dict[int, types.ModuleType] = field(default_factory=dict)
    c: dict[int, object] = field(default_factory=dict)
    entered: dict[int, object] = field(default_factory=dict)
    numpy: dict[int, object] = field(default_factory=dict)
    libraries: dict[int, str] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        return self.modules[1].LAYOUT

    def kernels(self) -> list[tuple[int, str]]:
        """(order, kernel) for every kernel on a sanitized library."""
        return [(order, name) for order in sorted(self.c) for name in self.modules[order].KERNELS]


def load_targets(libraries: list[list], entry: types.ModuleType | None) -> dict[str, Target]:
    """Each library bound as ``symbn.load`` binds it (``Kernels(library)``, and with ``entry``), and the
    NumPy kernels beside it."""
    targets: dict[str, Target] = {}
    for name, order, path in libraries:
        target = targets.setdefault(name, Target(name))
        for level in sorted({1, order}):  # order 1's NumPy kernels give every target its statistics
            target.modules[level] = build.module(norm_of(name), order=level)
            target.numpy[level] = target.modules[level].Kernels()
        target.c[order], target.libraries[order] = target.modules[order].Kernels(path), path
        if entry is not None:
            target.entered[order] = target.modules[order].Kernels(path, entry=entry)
    return targets


@dataclass
class Case:
    """One call: the kernel, its problem, and how it runs."""

    target: Target
    order: int
    kernel: str
    shape: tuple[int, ...]
    dtype: np.dtype
    options: dict
    threads: int
    schedule: int
    inputs: dict = field(default_factory=dict)
    running: dict | None = None
    momentum: float = 0.1
    out: bool = False
    entered: bool = False  # through the compiled entry point (else ctypes)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        layouts = {label: layout_name(value) for label, value in self.inputs.items() if isinstance(value, np.ndarray)}
        return (f"{self.target.name}.{self.kernel} x{self.shape} {self.dtype} {self.options} threads={self.threads} "
                f"schedule={self.schedule} inputs={layouts} running={self.running is not None} out={self.out} "
                f"entered={self.entered} "
                f"{' '.join(self.notes)}")


def layout_name(a: np.ndarray) -> str:
    kind = "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "strided"
    return kind + ("" if a.flags.writeable else ",ro")


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One of ``options``, uniformly."""
    return options[int(rng.integers(len(options)))]


def dims(rng: np.random.Generator, count: int, low: int = 1, high: int = 5) -> tuple[int, ...]:
    return tuple(int(d) for d in rng.integers(low, high + 1, count))


def random_problem(rng: np.random.Generator, layout: str) -> tuple[tuple[int, ...], dict]:
    """x's shape and the layout's options: tiny and odd mostly, a group of one, many channels,
    more than 65536 elements (the thread team), or an empty x (refused)."""
    size = str(rng.choice(["tiny", "one", "wide", "big", "empty"], p=[0.5, 0.12, 0.18, 0.15, 0.05]))
    spatial = dims(rng, int(rng.integers(0, 3)))
    n, c = dims(rng, 2)
    if size == "wide":
        c, spatial = int(rng.integers(17, 300)), dims(rng, int(rng.integers(0, 2)), 1, 3)
    if size == "big":
        n, c = int(rng.integers(2, 9)), int(rng.integers(3, 65))
        spatial = (int(-(-int(rng.integers(65537, 200000)) // (n * c))),)
    groups = pick(rng, [d for d in range(1, c + 1) if c % d == 0])
    if size == "one":  # a group of one member
        n, spatial, groups = 1, (), c
    options: dict = {}
    if layout == "channel":
        shape = (n, c, *spatial)
    elif layout == "instance":  # (N, C, L, *spatial): a group is one (n, c)
        shape = (n, c, 1) if size == "one" else (n, c, *dims(rng, 1), *spatial)
    elif layout == "groups":
        shape, options["num_groups"] = (n, c, *spatial), groups
    else:  # trailing: (*batch, *normalized)
        batch = (n, *spatial[:1]) if size != "big" else (n, c)
        normalized = (1,) if size == "one" else (c, *spatial[1:]) if size != "big" else spatial
        shape = (*batch[: int(rng.integers(0, len(batch) + 1))], *normalized)
        if len(normalized) > 1 or rng.random() < 0.5:
            options["normalized_shape"] = normalized
    if size == "empty":
        shape = tuple(0 if j == int(rng.integers(0, len(shape))) else d for j, d in enumerate(shape))
    return shape, options


def relayout(rng: np.random.Generator, a: np.ndarray) -> np.ndarray:
    """``a``'s values in another memory layout: C-contiguous, every other element of a larger
    array, reversed (negative strides), Fortran order, or read-only."""
    kind = pick(rng, ["C", "strided", "reversed", "F", "readonly"])
    if kind == "strided" and a.ndim and a.size:
        wide = np.full((*a.shape[:-1], 2 * a.shape[-1]), np.nan, a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if kind == "reversed" and a.ndim:
        return np.ascontiguousarray(a[::-1])[::-1]
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "readonly":
        a = a.copy()
        a.flags.writeable = False
    return a


def sample(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, offset: float = 0.0) -> np.ndarray:
    scale = 10.0 ** rng.uniform(-1, 1)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def statistics(case: Case, x: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """This batch's statistics from the NumPy kernels, by name (for the derived kernels' inputs)."""
    kernels = case.target.numpy[1]
    return dict(zip(kernels.STATS, kernels.batch_statistics(x, eps, **case.options)))


def fill_inputs(rng: np.random.Generator, case: Case) -> None:
    """The kernel's arguments, by the Python names its table gives them, in random layouts; for a call
    through the entry point mostly as it runs them itself (C-contiguous, statistics in float64, gamma
    and beta given), else it hands the call back to ctypes."""
    module = case.target.modules[case.order]
    table = module.KERNELS[case.kernel]
    eps = pick(rng, [1e-5, 1e-3, 0.1])
    x = sample(rng, case.shape, case.dtype, offset=pick(rng, [0.0, 0.0, 3.0, 100.0]))
    geo = None if x.size == 0 else module.geometry(case.shape, None, **case.options)
    stats, usual = None, case.entered and rng.random() < 0.8
    for (name, kind, role, double), label in zip(table.inputs, table.labels):
        if role == "scalar":
            case.inputs[label] = eps
            continue
        if name == "x" or geo is None:  # an empty x: every other argument is a dummy, the wrapper refuses x first
            value = x if name == "x" else np.ones(1, case.dtype)
        elif kind == "group" and double:  # saved statistics (train) or running ones (eval)
            stats = stats if stats is not None else statistics(case, x, eps)
            value = stats[name] if role == "data" else running(rng, stats[name], geo)
            value = value.astype(np.float64 if usual else pick(rng, DTYPES))
        elif name in module._runtime.OPTIONAL and not usual and rng.random() < 0.25:  # gamma, beta: None is 1, 0
            case.inputs[label] = None
            continue
        else:
            shape = case.shape if role != "param" else geo.param_shape if kind == "element" else (geo.p,)
            value = sample(rng, shape, case.dtype, offset=1.0 if name == "gamma" else 0.0)
        case.inputs[label] = value if usual else relayout(rng, value)
    if case.kernel == "forward_train" and geo is not None and rng.random() < 0.3:
        stats = stats if stats is not None else statistics(case, x, eps)
        case.running = {f"running_{s}": running(rng, stats[s], geo).astype(pick(rng, DTYPES)) for s in module.STATS}
        case.momentum = float(rng.uniform(0, 1))
    if rng.random() < 0.03:
        poison(rng, case)


def running(rng: np.random.Generator, stat: np.ndarray, geo) -> np.ndarray:
    """A running statistic, shape (p,): this batch's averaged over q, scaled by up to ±20 % (keeps its sign)."""
    value = np.asarray(stat, np.float64).reshape(geo.q, geo.p).mean(axis=0)
    return value * (1 + 0.2 * rng.uniform(-1, 1, value.shape))


def poison(rng: np.random.Generator, case: Case) -> None:
    """A NaN or an infinity in one array input: both backends must refuse it, naming it."""
    labels = [label for label, value in case.inputs.items() if isinstance(value, np.ndarray) and value.size]
    label = pick(rng, labels)
    value = case.inputs[label].copy()
    value.flat[int(rng.integers(0, value.size))] = pick(rng, [np.nan, np.inf, -np.inf])
    case.inputs[label] = value
    case.notes.append(f"poisoned={label}")


def make_case(rng: np.random.Generator, target: Target, order: int, kernel: str) -> Case:
    shape, options = random_problem(rng, target.layout)
    case = Case(target, order, kernel, shape, pick(rng, DTYPES), options, threads=pick(rng, THREADS),
                schedule=pick(rng, SCHEDULES), entered=bool(order in target.entered and rng.random() < 0.5))
    fill_inputs(rng, case)
    case.out = bool(rng.random() < 0.3)
    return case


def out_buffers(case: Case) -> list[np.ndarray] | None:
    """Fresh ``out=`` buffers for the kernel's element outputs, filled with NaN (None: let it allocate)."""
    if not case.out or any(isinstance(v, np.ndarray) and v.size == 0 for v in case.inputs.values()):
        return None
    table = case.target.modules[case.order].KERNELS[case.kernel]
    stores = [name for name, kind, role, _ in table.outputs if kind == "element" and role != "param"]
    return [np.full(case.shape, np.nan, case.dtype) for _ in stores] or None


def invoke(case: Case, kernels) -> tuple[dict[str, np.ndarray] | Exception, dict[str, np.ndarray]]:
    """The call on one backend: (its outputs by name, or the exception it raised; the running statistics after it)."""
    running = {k: v.copy() for k, v in (case.running or {}).items()}
    extra: dict = dict(case.options)
    if case.kernel == "forward_train" and case.running is not None:
        extra.update(running, momentum=case.momentum)
    buffers = out_buffers(case)
    if buffers is not None:
        extra["out"] = buffers[0] if len(buffers) == 1 else buffers
    try:
        result = getattr(kernels, case.kernel)(**case.inputs, **extra)
    except (ValueError, TypeError) as err:
        return err, running
    table = case.target.modules[case.order].KERNELS[case.kernel]
    results = result if isinstance(result, tuple) else (result,)
    return {**dict(zip([name for name, *_ in table.outputs], results)), **running}, running


def promoted(case: Case) -> Case:
    """``case`` with its float32 arrays in float64 (no ``out=``): the C kernels compute every element in
    double from the float32 values, so the float64 NumPy kernels give what they should return, before
    rounding; NumPy's own float32 path rounds its elements to float32 (by design at order 1)."""
    inputs = {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype == case.dtype else v
              for k, v in case.inputs.items()}
    return replace(case, dtype=np.dtype(np.float64), inputs=inputs, out=False)


def mismatch(got: np.ndarray, want: np.ndarray, exact: np.ndarray, tolerance: float, floor: float) -> str | None:
    """Why ``got`` (C) is not ``want`` (NumPy, the same call) and ``exact`` (NumPy, in float64): shape or dtype
    unlike ``want``'s, or max |got - exact| above ``tolerance`` times the larger of their largest magnitudes
    and ``floor``."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{got.shape} where NumPy gives {want.dtype}{want.shape}"
    if not np.isfinite(got).all() or not np.isfinite(exact).all():
        return None if np.array_equal(got, want, equal_nan=True) else "non-finite values differ"
    scale = max(largest(got), largest(exact), floor)
    error = largest(got.astype(np.float64) - exact)
    return None if error <= tolerance * scale else f"max |C - NumPy| = {error:.3g} > {tolerance:.0e} x {scale:.3g}"


def largest(a: np.ndarray) -> float:
    return float(np.abs(a).max(initial=0.0))


def check_case(case: Case) -> tuple[str | None, bool]:
    """Run ``case`` on the sanitized C and on NumPy: (what differs or None, whether both refused it).
    Refusals must agree (the same exception; the same message unless an input was poisoned, where
    the backends may meet another error first) and leave the running statistics untouched."""
    c = (case.target.entered if case.entered else case.target.c)[case.order]
    c.set_threads(case.threads)
    c.schedule = case.schedule
    numpy_ = case.target.numpy[case.order]
    got, got_running = invoke(case, c)
    want, want_running = invoke(case, numpy_)
    if isinstance(got, Exception) or isinstance(want, Exception):
        if type(got) is not type(want) or (str(got) != str(want) and not case.notes):
            return f"C gives {got!r}, NumPy {want!r}", False
        after = [*got_running.items(), *want_running.items()]
        touched = sorted({k for k, v in after if not np.array_equal(v, case.running[k])})
        return (f"refused, but wrote {touched}" if touched else None), True
    exact = want if case.dtype == np.float64 else invoke(promoted(case), numpy_)[0]
    if isinstance(exact, Exception):
        return f"NumPy refuses the call in float64: {exact!r}", False
    floor = FLOOR * max(largest(v) for v in exact.values())
    for name in want:
        why = mismatch(got[name], want[name], exact[name].astype(np.float64), TOLERANCE[case.dtype], floor)
        if why:
            return f"{name}: {why}", False
    return None, False


def probe_esize(targets: dict[str, Target]) -> int:
    """Every C entry point called directly with sizes that overflow ptrdiff_t (and sizes not positive):
    each must return SYMBN_ESIZE without touching its buffers (ASan watches their bounds). Returns the count."""
    count = 0
    for target in targets.values():
        for order, library in target.libraries.items():
            module = target.modules[order]
            _, functions, _ = module._runtime.bind(library, module.KERNELS)  # the C functions, their argument types set
            for (kernel, dtype), function in functions.items():
                parameters = module.KERNELS[kernel].parameters
                for sizes in OVERFLOWING + NONPOSITIVE:
                    count += probe_one(function, parameters, sizes, f"{target.name}.{kernel} {dtype}")
    return count


def probe_one(function, parameters: tuple, sizes: tuple[int, ...], what: str) -> int:
    """One direct call with ``sizes``, a one-element sentinel buffer behind every pointer."""
    buffers = [np.full(1, 0.25) for _, kind in parameters if kind == "pointer"]
    pointers, given = iter(buffers), iter(sizes)
    values = {"pointer": lambda: next(pointers).ctypes.data, "size": lambda: next(given), "real": lambda: 1e-5, "int": lambda: 0}
    status = function(*[values[kind]() for _, kind in parameters])
    if status != STATUS["SYMBN_ESIZE"]:
        raise AssertionError(f"{what} with sizes {sizes} returned {status}, not SYMBN_ESIZE ({STATUS['SYMBN_ESIZE']})")
    if any(b[0] != 0.25 for b in buffers):
        raise AssertionError(f"{what} with sizes {sizes} returned SYMBN_ESIZE but wrote to a buffer")
    return 1


def armed() -> None:
    """Fail unless the ASan and UBSan runtimes are in this process (LD_PRELOAD took)."""
    process = ctypes.CDLL(None)
    for symbol in ("__asan_init", "__ubsan_handle_add_overflow_abort"):
        if not hasattr(process, symbol):
            raise SystemExit(f"sanitize: {symbol} is not loaded: the sanitizer runtimes were not preloaded")


def run_calls(targets: dict[str, Target], plan: dict) -> dict | str:
    """The plan's random calls, each kernel in turn: the summary, or what went wrong."""
    combos = [(target, order, kernel) for target in targets.values() for order, kernel in target.kernels()]
    calls, threads, schedules, refused, entered = Counter(), Counter(), Counter(), 0, 0
    start = time.time()
    for index in range(plan["calls"]):
        if time.time() > start + plan["seconds"]:
            break
        target, order, kernel = combos[index % len(combos)]
        case = make_case(np.random.default_rng([plan["seed"], index]), target, order, kernel)
        Path(plan["current"]).write_text(f"call {index}: {case.describe()}")  # what the parent reports if we die
        with np.errstate(all="ignore"):
            why, refusal = check_case(case)
        if why:
            return f"WRONG ANSWER at call {index} (seed {plan['seed']}): {case.describe()}: {why}"
        calls[f"{target.name}.{kernel}"] += 1
        refused += refusal
        entered += case.entered
        threads[case.threads] += 1
        schedules[case.schedule] += 1
    return {"calls": calls, "seed": plan["seed"], "refused": refused, "entered": entered, "seconds": time.time() - start,
            "threads": dict(sorted(threads.items())), "schedules": dict(sorted(schedules.items()))}


def child(plan_path: Path) -> int:
    """Make the calls the plan asks for (after the size probes); write the summary; 1 on a wrong answer."""
    plan = json.loads(plan_path.read_text())
    armed()
    if plan["canary"]:  # the run must end here, with the sanitizer's report
        getattr(ctypes.CDLL(plan["libraries"][0][2]), f"canary_{plan['canary']}")(ctypes.c_int(4))
        print(f"sanitize: the {plan['canary']} canary's fault went unreported", file=sys.stderr)
        return 1
    entry, taken = counted(plan["entry"] and build.import_entry(Path(plan["entry"])))
    targets = load_targets(plan["libraries"], entry)
    probes = probe_esize(targets)
    summary = run_calls(targets, plan)
    if isinstance(summary, str):
        print(f"sanitize: {summary}", file=sys.stderr)
        return 1
    if entry is not None and summary["entered"] and not taken[True]:
        print("sanitize: FAILED: the compiled entry point handed every call back to ctypes", file=sys.stderr)
        return 1
    Path(plan["summary"]).write_text(json.dumps({**summary, "probes": probes, "taken": taken[True]}))
    return 0


def counted(entry: types.ModuleType | None) -> tuple[types.ModuleType | None, Counter]:
    """``entry`` with its calls counted: taken (True: it ran the kernel) or handed back (False)."""
    taken: Counter = Counter()
    if entry is not None:
        call = entry.call

        def counting(*args):
            result = call(*args)
            taken[result is not None] += 1
            return result

        entry.call = counting
    return entry, taken


# ============================================================================ the command line

def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit status: 0 clean, 1 a finding, 2 no build.")
    parser.add_argument("--calls", type=int, default=500, help="random kernel calls to make (default 500)")
    parser.add_argument("--seconds", type=float, default=90.0,
                        help="start no call this many seconds after the first (default 90; compiling comes before)")
    parser.add_argument("--seed", type=int, default=0, help="the random sequence (default 0)")
    parser.add_argument("--norms", nargs="+", default=[*BUILTINS, *SPECS], choices=[*BUILTINS, *SPECS],
                        help="which norms (default: every built-in and the quartic spec)")
    parser.add_argument("--orders", nargs="+", type=int, default=list(ORDERS), choices=ORDERS, help="which orders (default 1 2)")
    parser.add_argument("--canary", choices=("asan", "ubsan"),
                        help="build and call a deliberate heap overflow (asan) or signed overflow (ubsan) instead of the kernels: "
                             "the run must fail with the sanitizer's report")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return child(args.child) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
