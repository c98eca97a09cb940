"""``python -m symbn bench --against REV``: the C kernels of the working tree against those of a git revision, interleaved.

What: for each C case of the bench (the norms, shapes and dtypes :mod:`symbn.bench` times;
``quick``: its quick subset), the kernels of the working tree (``generated/`` as it is on disk,
what ``symbn.load(norm, "c", entry=False)`` loads) and the kernels committed in ``generated/`` at revision REV
(``<norm>.c``, ``.h``, ``.py`` and ``_runtime.py``, read with ``git show``), forward and
backward, timed in the same process by the bench's own timer (:func:`symbn.bench.median_ms`):
one sample of each in turn, round-robin. The report gives both times per case and the ratio
working tree / REV, and the geometric mean of the ratios.

Why: a tuning change is judged against the last one. Two bench runs, one after the other, fall
on different spells of a shared machine (its memory bandwidth has measured 14 to 58 GB/s between
runs here), so their times differ by more than most tuning changes do; interleaved samples in
one process see the same machine state, and their ratio is what the change did.

How the two are kept apart: REV's C source is written with its header to a temporary folder and
compiled by :func:`symbn.build.compile_library` into the cache (keyed by the source's hash: REV's
library is built once, and is the working tree's own when the sources are the same); its Python
bindings are executed from their text into a private in-memory package named after the commit
(as :mod:`symbn.build` loads sources it cannot write), never on the import path, so neither
``_runtime`` nor a norm's module of one revision can stand in for the other's.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import bench as _bench
from .build import _from_text, _package, compile_library, load
from .errors import SymbnError
from .jinja import resource_dir
from .spec import BUILTINS

QUICK_REPEATS, FULL_REPEATS = 15, 31
"""Samples per kernel (``--quick`` and not): three times the bench's. A case here times four calls
where the bench times a dozen, so they cost little, and the ratio needs them: on this project's
shared machine about one 2 ms sample in seven runs 3x slow, and with the bench's 5 samples such
spells decide one side's median in about one case in ten, a ratio of 0.3 or 3 between identical
kernels; with 15 that is rare."""
GIT_TIMEOUT = 60.0
"""Seconds one git command may take."""
FORMATS = ("text", "json")


class CompareError(SymbnError, RuntimeError):
    """The revision cannot be compared: not a git checkout, an unknown revision, files missing in
    its ``generated/``, or kernels that do not load; the message says which."""


# ----------------------------------------------------------------------------- git

def _git(repository: Path, *args: str) -> subprocess.CompletedProcess:
    """``git -C repository ARGS``, its output as bytes; git missing or hanging is a CompareError."""
    command = ["git", "-C", str(repository), *args]
    try:
        return subprocess.run(command, capture_output=True, timeout=GIT_TIMEOUT)
    except FileNotFoundError:
        raise CompareError("git is not installed: --against reads the revision's kernels with git") from None
    except subprocess.TimeoutExpired:
        raise CompareError(f"git did not finish in {GIT_TIMEOUT:g} s: {' '.join(command)}") from None
    except OSError as err:
        raise CompareError(f"git cannot run: {err}") from None


def _stderr(done: subprocess.CompletedProcess) -> str:
    """git's last line of complaint."""
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def repository(start: Path | None = None) -> tuple[Path, str]:
    """The top of the git checkout that holds ``start`` (default: the working tree's ``generated/``,
    the folder ``symbn.load`` reads), and the path of ``generated/`` inside it."""
    generated = (resource_dir("generated") if start is None else Path(start) / "generated").resolve()
    where = generated if generated.is_dir() else generated.parent
    done = _git(where, "rev-parse", "--show-toplevel")
    if done.returncode != 0:
        raise CompareError(f"{where} is not in a git checkout ({_stderr(done)}): --against compares the working "
                           "tree's generated/ with a revision of the repository that holds it")
    top = Path(done.stdout.decode().strip()).resolve()
    try:
        inside = generated.relative_to(top).as_posix()
    except ValueError:
        raise CompareError(f"{generated} is not inside the git checkout {top}") from None
    return top, inside


def resolve_revision(top: Path, revision: str) -> str:
    """The full hash of the commit ``revision`` names; an unknown name is a CompareError."""
    if not revision or revision.startswith("-") or any(c in revision for c in "\0\n"):
        raise CompareError(f"{revision!r} is not a revision name")
    done = _git(top, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    if done.returncode != 0:
        raise CompareError(f"unknown revision {revision!r}: no commit of that name in {top} (git rev-parse --verify)")
    return done.stdout.decode().strip()


def revision_files(top: Path, inside: str, commit: str, revision: str, norm: str) -> dict[str, bytes]:
    """``<norm>.c``, ``.h``, ``.py`` and ``_runtime.py`` of ``generated/`` at ``commit``; a missing one
    is a CompareError that names it."""
    names = (f"{norm}.c", f"{norm}.h", f"{norm}.py", "_runtime.py")
    done = _git(top, "ls-tree", "--name-only", commit, "--", f"{inside}/")
    if done.returncode != 0:
        raise CompareError(f"cannot list {inside}/ at {revision}: {_stderr(done)}")
    present = {Path(line).name for line in done.stdout.decode("utf-8", "replace").splitlines()}
    if not present:
        raise CompareError(f"revision {revision} ({commit[:12]}) has no {inside}/: no kernels to compare against")
    missing = [name for name in names if name not in present]
    if missing:
        raise CompareError(f"revision {revision} ({commit[:12]}) has no {', '.join(f'{inside}/{m}' for m in missing)}: "
                           f"it cannot be compared for {norm}")
    files = {}
    for name in names:
        shown = _git(top, "show", "--no-textconv", f"{commit}:{inside}/{name}")
        if shown.returncode != 0:
            raise CompareError(f"git show {commit[:12]}:{inside}/{name} failed: {_stderr(shown)}")
        files[name] = shown.stdout
    return files


# ----------------------------------------------------------------------------- the revision's kernels

def revision_kernels(files: dict[str, bytes], commit: str, revision: str, norm: str, threads: int):
    """REV's kernels of ``norm`` on C: its source compiled into the cache, its bindings loaded
    from their text into a package of their own."""
    scratch = Path(tempfile.mkdtemp(prefix="symbn-against-"))
    try:
        for suffix in (".c", ".h"):
            (scratch / f"{norm}{suffix}").write_bytes(files[norm + suffix])
        library = compile_library(scratch / f"{norm}.c")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runtime = files["_runtime.py"]
    package = _package(f"revision:{commit}:{hashlib.sha256(runtime).hexdigest()}")
    try:
        if f"{package}._runtime" not in sys.modules:
            _load_text(package, "_runtime", runtime)
        module = sys.modules.get(f"{package}.{norm}") or _load_text(package, norm, files[f"{norm}.py"])
        return module.Kernels(library, threads=threads)
    except Exception as err:  # the revision's code, whatever it raises
        raise CompareError(f"the kernels of {norm} at {revision} ({commit[:12]}) do not load: "
                           f"{type(err).__name__}: {err}") from err


def _load_text(package: str, name: str, text: bytes):
    """A module of ``package`` executed from ``text``; nothing left in sys.modules if it fails."""
    try:
        return _from_text(package, name, text.decode("utf-8"))
    except BaseException:
        sys.modules.pop(f"{package}.{name}", None)
        raise


def _same_sources(files: dict[str, bytes], folder: Path) -> bool:
    """Whether ``folder`` (the working tree's generated/) holds exactly these files."""
    try:
        return all((folder / name).read_bytes() == data for name, data in files.items())
    except OSError:
        return False


# ----------------------------------------------------------------------------- timing

def _data(seed: int, norm: str, shape: tuple, dtype: np.dtype):
    """The bench's data for one case (as :func:`symbn.bench._case` draws it): x, dy, gamma, beta."""
    rng = np.random.default_rng(seed)
    x, dy = rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)
    params = tuple(x.shape[axis] for axis in BUILTINS[norm].layout.param_axes(x.ndim))
    return x, dy, rng.normal(1, 0.2, params).astype(dtype), rng.normal(size=params).astype(dtype)


def _calls(kernels, name: str, x, dy, gamma, beta, options, revision: str) -> dict:
    try:
        return _bench._symbn(kernels, name, x, dy, gamma, beta, options)
    except Exception as err:
        if name == "tree":
            raise
        raise CompareError(f"the kernels at {revision} do not take the bench's calls "
                           f"(forward_train(x, gamma, beta, eps, out=), backward_train(dy, x, gamma, *stats, eps=, out=)): "
                           f"{type(err).__name__}: {err}") from err


def compare(against: str, quick: bool = False, threads: int = 2, progress=None, cases=None, repeats: int | None = None,
            checkout: Path | None = None) -> dict:
    """Time the working tree's C kernels against those of revision ``against``, interleaved; times
    in ms. ``cases``: (norm, shape, options, dtype) tuples (default: the bench's, quick or full);
    ``checkout``: the git checkout REV is read from, its ``generated/`` (default: the checkout that
    holds the ``generated/`` ``symbn.load`` reads, as always for the working tree's kernels)."""
    cases = list(cases if cases is not None else (_bench.QUICK if quick else _bench.FULL))
    repeats = repeats or (QUICK_REPEATS if quick else FULL_REPEATS)
    top, inside = repository(checkout)
    generated = top / inside
    commit = resolve_revision(top, against)
    files = {norm: revision_files(top, inside, commit, against, norm) for norm in dict.fromkeys(c[0] for c in cases)}
    ours = {}
    for norm in files:
        if progress:
            progress(f"loading {norm} at {against} ({commit[:12]}): compiling its C into the cache")
        ours[norm] = revision_kernels(files[norm], commit, against, norm, threads)
    results = []
    for number, (norm, shape, options, dtype) in enumerate(cases, 1):
        if progress:
            progress(f"[{number}/{len(cases)}] {norm} {'x'.join(map(str, shape))} {dtype}, {threads} threads: "
                     f"working tree against {against}")
        x, dy, gamma, beta = _data(number, norm, shape, np.dtype(dtype))
        tree = load(norm, "c", threads=threads, entry=False)  # both through ctypes: the kernels compared, not the entry
        calls = {}
        calls.update(_calls(tree, "tree", x, dy, gamma, beta, options, against))
        calls.update(_calls(ours[norm], "rev", x, dy, gamma, beta, options, against))
        calls = {key: calls[key] for key in (("tree", "forward"), ("rev", "forward"), ("tree", "backward"), ("rev", "backward"))}
        try:
            ms = _bench.median_ms(calls, repeats)
        except Exception as err:
            raise CompareError(f"a kernel failed while timed ({norm} {'x'.join(map(str, shape))} {dtype}): "
                               f"{type(err).__name__}: {err}") from err
        results.append({"norm": norm, "shape": list(shape), "options": options, "dtype": np.dtype(dtype).name,
                        "same_sources": _same_sources(files[norm], generated),
                        "working_tree": {"forward_ms": ms["tree", "forward"], "backward_ms": ms["tree", "backward"]},
                        "against": {"forward_ms": ms["rev", "forward"], "backward_ms": ms["rev", "backward"]},
                        "ratio": {kind: ms["tree", kind] / ms["rev", kind] for kind in ("forward", "backward")}})
    return {"against": {"revision": against, "commit": commit}, "repository": str(top), "threads": threads,
            "quick": quick, "repeats": repeats, "cases": results, "geometric_mean": _geometric_means(results),
            "method": f"median of {repeats} samples after warm-up, taken round-robin across the two revisions' forward "
                      f"and backward (fast calls timed in batches of about {_bench.SAMPLE_S * 1e3:.0f} ms); outputs "
                      "preallocated (out=); ratio = working tree / revision (below 1: the working tree is faster)"}


def _geometric_means(results: list[dict]) -> dict:
    ratios = {kind: [case["ratio"][kind] for case in results] for kind in ("forward", "backward")}
    ratios["all"] = ratios["forward"] + ratios["backward"]
    return {kind: math.exp(sum(map(math.log, values)) / len(values)) if values else None for kind, values in ratios.items()}


# ----------------------------------------------------------------------------- output

def to_text(report: dict) -> str:
    rev = report["against"]["revision"]
    label = rev if len(rev) <= 12 else report["against"]["commit"][:12]
    lines = [f"C kernels, {report['threads']} threads: working tree against {rev} ({report['against']['commit'][:12]}); "
             f"{report['method']}", ""]
    columns = (("tree fwd ms", 12), (f"{label} fwd ms"[:16], 17), ("fwd ratio", 10),
               ("tree bwd ms", 12), (f"{label} bwd ms"[:16], 17), ("bwd ratio", 10))
    lines.append(f"{'case':<34}" + "".join(f"{name:>{width}}" for name, width in columns))
    for case in report["cases"]:
        name = f"{case['norm']} {'x'.join(map(str, case['shape']))} {case['dtype']}"
        cells = (case["working_tree"]["forward_ms"], case["against"]["forward_ms"], case["ratio"]["forward"],
                 case["working_tree"]["backward_ms"], case["against"]["backward_ms"], case["ratio"]["backward"])
        row = "".join(f"{value:>{width}.{3 if j % 3 < 2 else 2}f}" for j, (value, (_, width)) in enumerate(zip(cells, columns)))
        lines.append(f"{name:<34}{row}" + ("  (same sources)" if case["same_sources"] else ""))
    means = report["geometric_mean"]
    if means["all"] is not None:
        lines += ["", f"geometric mean of the {2 * len(report['cases'])} ratios, working tree / {rev}: {means['all']:.3f} "
                      f"(forward {means['forward']:.3f}, backward {means['backward']:.3f}; below 1: the working tree is faster)"]
    return "\n".join(lines) + "\n"


def main(against: str, quick: bool = False, format: str = "text", threads: int = 2) -> str:
    """``bench --against REV``: runs the comparison (progress lines on standard error) and returns
    what it prints, in ``format`` (one of :data:`FORMATS`)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    report = compare(against, quick, threads, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return json.dumps(report, indent=2) + "\n" if format == "json" else to_text(report)
