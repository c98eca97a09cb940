"""Build and load: the generated kernels as objects, on NumPy or on compiled C.

``symbn.load(norm, backend, order=..., transforms=...)`` returns one object with a method per
kernel of the chain and of its prefixes (order 2: forward_*, backward_*, backward2_*). The
built-ins at orders 1 and 2 load the committed files under ``generated/``; anything else
(orders 3 and up, other chains, user specs) is derived, lowered and emitted on demand into
the cache, keyed by a hash of the spec, the chain and symbn's own code, so that a warm cache
never derives again. The emitted sources are written atomically; a NumPy load needs no
writable cache (the modules are then imported from memory). The C source is compiled with
the system compiler (``CC`` honoured, with a timeout) into the cache, keyed by a hash of the
sources, the flags, the compiler's version and the CPU, written atomically with its size and
SHA-256 beside it, which are checked before every load (a damaged library is rebuilt, never
loaded). Every failure of the compiler is a :class:`CompilerError`.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from . import __version__
from .backends import NAMES
from .errors import CompilerError, SpecError, SymbnError
from .jinja import resource_dir
from .spec import BUILTINS, Norm, resolve

BACKENDS = NAMES
FLAGS = ("-std=c99", "-O3", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-pedantic")
VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())  # the first that builds: vector units, threads, plain
LIBS = ("-lm",)
TIMEOUT = 300.0
"""Seconds one compiler run may take (``$SYMBN_CC_TIMEOUT`` overrides)."""
BUILTIN_ORDERS = (1, 2)
"""The orders of the built-ins that ``generated/`` holds."""


def cache_dir() -> Path:
    """``$SYMBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/symbn``, else ``~/.cache/symbn``."""
    if os.environ.get("SYMBN_CACHE_DIR"):
        return Path(os.environ["SYMBN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "symbn"


# ----------------------------------------------------------------------------- the compiler

def compiler() -> list[str]:
    """The C compiler command: ``$CC`` (which may carry flags) or ``cc``."""
    text = os.environ.get("CC") or "cc"
    try:
        command = shlex.split(text)
    except ValueError as err:
        raise CompilerError(f"CC={text!r} cannot be parsed as a command: {err}") from None
    if not command or shutil.which(command[0]) is None:
        raise CompilerError(
            f"no C compiler: {command[0] if command else '$CC'!r} was not found. Install one (apt-get install gcc) "
            "or set CC; the NumPy backend (backend='numpy') needs none.")
    return command


def _timeout() -> float:
    try:
        return float(os.environ.get("SYMBN_CC_TIMEOUT") or TIMEOUT)
    except ValueError:
        return TIMEOUT


def _run(command: list[str]) -> subprocess.CompletedProcess:
    """Run the compiler; every way it can fail to run is a CompilerError."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=_timeout())
    except subprocess.TimeoutExpired:
        raise CompilerError(f"the C compiler did not finish in {_timeout():g} s ($SYMBN_CC_TIMEOUT): {shlex.join(command)}") from None
    except (OSError, ValueError) as err:
        raise CompilerError(f"the C compiler cannot run: {err}: {shlex.join(command)}") from None


def _version(command: list[str]) -> str:
    done = _run([*command, "--version"])
    return done.stdout + done.stderr


def _cpu() -> str:
    """What -march=native compiles for: the machine and its instruction-set flags (Linux), so that a
    cache shared between machines never hands one a library built for another."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _record(library: Path) -> Path:
    """Where the size and SHA-256 of ``library`` are kept, written with it."""
    return library.with_name(library.name + ".sha256")


def _digest(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


_VERIFIED: set[Path] = set()


def _intact(library: Path) -> bool:
    """Whether ``library`` is there and is what was written (its size and SHA-256 match the record)."""
    if library in _VERIFIED:
        return True
    try:
        ok = _record(library).read_text().strip() == _digest(library.read_bytes())
    except OSError:
        return False
    if ok:
        _VERIFIED.add(library)
    return ok


def compile_library(source: Path, extra: Sequence[str] = (), directory: Path | None = None) -> Path:
    """The shared library built from ``source`` (its header beside it), from the cache if there and intact.

    Built for this CPU's vector units and with OpenMP where the compiler can, else plainer
    (the same source: without OpenMP its pragmas are off and it runs serially). ``extra``: flags
    appended after :data:`FLAGS` and the variant's, so that they win (``-O1`` over ``-O3``); a
    library's key hashes them with the others. ``directory``: where the library and its record
    go, in place of the cache's ``lib/`` folder."""
    if isinstance(extra, str):
        raise TypeError(f"extra must be a sequence of flags, not the string {extra!r}")
    command = compiler()
    version = _version(command)
    header = source.with_suffix(".h")
    folder = cache_dir() / "lib" if directory is None else Path(directory)
    failure = ""
    for variant in VARIANTS:
        flags = (*FLAGS, *variant, *extra)
        key = hashlib.sha256()
        for part in (source.read_bytes(), header.read_bytes() if header.exists() else b"", " ".join(flags + LIBS).encode(),
                     version.encode(), " ".join(command).encode(), _cpu().encode()):
            key.update(part)
        target = folder / f"lib{source.stem}-{key.hexdigest()[:20]}.so"
        if _intact(target):
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            scratch = tempfile.mkdtemp(dir=target.parent)
        except OSError as err:
            if directory is not None:
                raise CompilerError(f"cannot write the library into {target.parent}: {err}") from None
            raise CompilerError(f"cannot write the kernel cache {target.parent}: {err}; set SYMBN_CACHE_DIR "
                                "to a writable folder (the NumPy backend needs none)") from None
        try:
            built = Path(scratch) / target.name
            run = [*command, *flags, "-I", str(source.parent), str(source), "-o", str(built), *LIBS]
            done = _run(run)
            if done.returncode == 0:
                if not built.is_file() or built.stat().st_size == 0:
                    raise CompilerError(f"the C compiler exited with status 0 but wrote no library: {shlex.join(run)}\n"
                                        f"{(done.stdout + done.stderr).strip()}")
                record = Path(scratch) / (target.name + ".sha256")
                record.write_text(_digest(built.read_bytes()) + "\n")
                os.replace(record, _record(target))  # the record first: a reader that sees the new library sees its record
                os.replace(built, target)  # atomic: another process sees the old name or the whole file
                _VERIFIED.discard(target)
                if _intact(target):
                    return target
                failure = f"{target} does not match what was written (another process replaced it): try again"
                continue
            failure = f"{shlex.join(run)}\n{(done.stdout + done.stderr).strip()}"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    raise CompilerError(f"compiling {source.name} failed:\n{failure}")


# ----------------------------------------------------------------------------- sources

def _chain(order: int = 1, transforms=None) -> tuple[str, ...]:
    from .derive import transforms_for

    return transforms_for(order, transforms)


def _stem(norm: Norm, chain: tuple[str, ...]) -> str:
    """The plan's file stem (:attr:`symbn.lower.KernelPlan.name`), without lowering it."""
    from .lower import unit_name

    return norm.name if len(chain) == 1 else f"{norm.name}_{unit_name(chain)}"


def _builtin(norm: Norm, chain: tuple[str, ...]) -> bool:
    """Whether ``generated/`` holds this chain of ``norm``."""
    return BUILTINS.get(norm.name) == norm and set(chain) == {"vjp"} and len(chain) in BUILTIN_ORDERS


@cache
def fingerprint() -> str:
    """A hash of symbn's own code and templates: an emitted file depends on all of it."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256(__version__.encode())
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.j2")]):
        if "__pycache__" not in path.parts and "generated" not in path.parts:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def spec_key(norm: Norm, chain: tuple[str, ...], backend: str) -> str:
    """The cache key of one chain of ``norm`` on one backend: the spec, the chain, symbn's code."""
    text = "\0".join((repr(norm), ",".join(chain), backend, fingerprint()))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


_IN_MEMORY: dict[str, dict[str, str]] = {}
"""Sources emitted in this process that could not be written to the cache (read-only)."""


def _emit(norm: Norm, chain: tuple[str, ...], backend: str) -> dict[str, str]:
    """The sources of one chain; a spec the derivation, simplification, lowering or emission cannot
    carry through is a :class:`SpecError` naming the spec, the chain and what failed, never an
    internal error from deep inside (the built-ins are emitted ahead of time, so a failure here is
    a spec symbn does not support yet)."""
    from sympy.polys.polyerrors import PolynomialError

    from .emit import shared_sources, sources

    try:
        files = sources(norm, transforms=chain, backends=(backend,))
    except SymbnError:
        raise
    except (ArithmeticError, LookupError, NotImplementedError, TypeError, ValueError, PolynomialError) as err:
        raise SpecError(f"{norm.name}: symbn cannot yet carry this spec through {'/'.join(chain)} for the {backend} "
                        f"backend ({type(err).__name__}: {err})") from err
    files.update(shared_sources((backend,)))
    return files


def emitted(norm: str | Norm, transforms=None, order: int = 1, backend: str = "numpy") -> tuple[str, Path | None, dict | None]:
    """Where the files of one chain of ``norm`` for ``backend`` are: (stem, folder, None) when on
    disk (``generated/`` for a built-in, else the cache), (stem, None, {name: text}) when the
    cache cannot be written. Emitted at most once per spec, chain and version of symbn."""
    norm, chain = resolve(norm), _chain(order, transforms)
    stem = _stem(norm, chain)
    if _builtin(norm, chain):
        return stem, resource_dir("generated"), None
    key = spec_key(norm, chain, backend)
    directory = cache_dir() / "sources" / f"{stem}-{backend}-{key}"
    if directory.is_dir():
        return stem, directory, None
    if key in _IN_MEMORY:
        return stem, None, _IN_MEMORY[key]
    files = _emit(norm, chain, backend)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=directory.parent))
    except OSError:  # a read-only cache: keep the sources in memory
        _IN_MEMORY[key] = files
        return stem, None, files
    try:
        for name, text in files.items():
            (scratch / name).write_text(text, encoding="utf-8")
        os.replace(scratch, directory)  # atomic: all the files or none
    except OSError:  # another process got there first, with the same files (or the disk is full)
        shutil.rmtree(scratch, ignore_errors=True)
        if not directory.is_dir():
            _IN_MEMORY[key] = files
            return stem, None, files
    return stem, directory, None


def sources_dir(norm: str | Norm, transforms=None, order: int = 1, backend: str = "c") -> Path:
    """The folder that holds the kernel sources of one chain of ``norm`` for ``backend``."""
    _, directory, _ = emitted(norm, transforms, order, backend)
    if directory is None:
        raise CompilerError(f"cannot write the kernel cache {cache_dir()}: set SYMBN_CACHE_DIR to a writable folder")
    return directory


_MODULES: dict[tuple, types.ModuleType] = {}


def _package(where: str) -> str:
    """A package, registered under a private name, whose modules are the files of ``where``."""
    name = f"_symbn_kernels_{hashlib.sha256(where.encode()).hexdigest()[:16]}"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [where] if os.path.isdir(where) else []
        package.__package__ = name
        sys.modules[name] = package
    return name


def _from_text(package: str, name: str, text: str) -> types.ModuleType:
    module = types.ModuleType(f"{package}.{name}")
    module.__package__, module.__file__ = package, f"<symbn: {name}.py>"
    sys.modules[module.__name__] = module
    setattr(sys.modules[package], name, module)
    exec(compile(text, module.__file__, "exec"), module.__dict__)
    return module


def module(norm: str | Norm, transforms=None, order: int = 1) -> types.ModuleType:
    """The generated Python module of one chain of ``norm`` (default: order 1, forward and
    backward); standalone: it needs only NumPy and the ``_runtime`` beside it."""
    stem, directory, files = emitted(norm, transforms, order, "numpy")
    where = str(directory) if directory is not None else f"memory:{hashlib.sha256(files[f'{stem}.py'].encode()).hexdigest()}"
    if (where, stem) not in _MODULES:
        package = _package(where)
        if directory is not None:
            loaded = importlib.import_module(f"{package}.{stem}")
        else:
            if f"{package}._runtime" not in sys.modules:
                _from_text(package, "_runtime", files["_runtime.py"])
            loaded = _from_text(package, stem, files[f"{stem}.py"])
        _MODULES[where, stem] = loaded
    return _MODULES[where, stem]


def prefixes(chain: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The chains whose kernels a load of ``chain`` holds: every prefix, the first one forward and backward."""
    return [chain[:j] for j in range(1, len(chain) + 1)]


ENTRY = Path(__file__).resolve().parent / "backends" / "c" / "entry.c"
"""The compiled entry point's source (a CPython extension; see its comment)."""


def entry_flags() -> tuple[str, ...] | None:
    """The flags that compile ``ENTRY`` beside the kernels' (Python's headers); None without them."""
    import sysconfig

    include = sysconfig.get_paths().get("include")
    return ("-I", include) if include and (Path(include) / "Python.h").is_file() else None


@cache
def entry_point() -> types.ModuleType | None:
    """symbn's compiled entry point: ``ENTRY`` built like the kernels (the same compiler, flags
    and cache, with Python's headers) and imported; it calls the C kernels on the common calls
    with none of the Python around ctypes. None where it cannot be built (no ``Python.h``, no
    compiler): the kernels then run through ctypes alone, with the same results."""
    flags = entry_flags()
    if flags is None:
        return None
    try:
        library = compile_library(ENTRY, extra=flags)
    except CompilerError:
        return None
    return import_entry(library)


def import_entry(library: Path) -> types.ModuleType:
    """The entry point built into ``library`` (by :func:`entry_point`, or with other flags, as the
    sanitizer run builds it), imported and bound to NumPy's arrays."""
    import importlib.machinery
    import importlib.util

    import numpy

    loader = importlib.machinery.ExtensionFileLoader("symbn_entry", str(library))
    spec = importlib.util.spec_from_file_location("symbn_entry", str(library), loader=loader)
    entry = importlib.util.module_from_spec(spec)
    loader.exec_module(entry)
    entry.bind(numpy.ndarray)
    return entry


def load(norm: str | Norm = "batchnorm", backend: str = "numpy", threads: int | None = None, order: int = 1,
         transforms=None, entry: bool = True):
    """The kernels of ``norm`` (a built-in name or a spec) on ``backend`` (``"numpy"`` or ``"c"``):
    one object with a method per kernel of the chain (``order`` vjps, or ``transforms`` such as
    ``("vjp", "jvp")``) and of its prefixes: forward_train, backward_train, forward_eval,
    backward_eval at order 1, and backward2_train, backward2_eval... above. ``threads`` caps the
    C kernels' OpenMP team (default: every core). ``entry``: C calls of training kernels go
    through symbn's compiled entry point (:func:`entry_point`) where it can be built, the rest
    through ctypes; the same checks, errors and results either way."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    norm, chain = resolve(norm), _chain(order, transforms)
    if backend == "c":
        from .backends import BACKENDS as INSTALLED

        if "c" not in INSTALLED:
            raise CompilerError("the C backend (symbn.backends.c) is not installed; the NumPy backend works")
    parts = []
    for prefix in prefixes(chain):
        kernels = module(norm, prefix).Kernels
        if backend == "numpy":
            parts.append(kernels())
        else:
            stem = _stem(norm, prefix)
            parts.append(kernels(compile_library(sources_dir(norm, prefix, backend="c") / f"{stem}.c"), threads=threads,
                                 entry=entry_point() if entry else None))
    if len(parts) == 1:
        return parts[0]
    return sys.modules[type(parts[-1]).__module__]._runtime.Chain(parts)
