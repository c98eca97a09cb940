"""Build and load: the generated kernels as objects, on NumPy or on compiled C.

Built-in norms load the committed files under ``generated/``; a spec is emitted on the fly
into the cache. The C source is compiled with the system compiler (``CC`` honoured) into a
per-user cache keyed by a hash of the sources, the flags and the compiler's version, written
atomically so that concurrent processes never load a half-written library.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

from .jinja import resource_dir
from .spec import BUILTINS, Norm, resolve

BACKENDS = ("numpy", "c")
FLAGS = ("-std=c99", "-O3", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-pedantic")
VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())  # the first that builds: vector units, threads, plain
LIBS = ("-lm",)


class CompilerError(RuntimeError):
    """No usable C compiler, or the generated C did not compile."""


def cache_dir() -> Path:
    """``$SYMBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/symbn``, else ``~/.cache/symbn``."""
    if os.environ.get("SYMBN_CACHE_DIR"):
        return Path(os.environ["SYMBN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "symbn"


def compiler() -> list[str]:
    """The C compiler command: ``$CC`` (which may carry flags) or ``cc``."""
    command = shlex.split(os.environ.get("CC") or "cc")
    if not command or shutil.which(command[0]) is None:
        raise CompilerError(
            f"no C compiler: {command[0] if command else '$CC'!r} was not found. Install one (apt-get install gcc) "
            "or set CC; the NumPy backend (backend='numpy') needs none.")
    return command


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as err:
        raise CompilerError(f"the C compiler {command[0]!r} cannot run: {err}") from None
    return done.stdout + done.stderr


def _cpu() -> str:
    """What -march=native compiles for: the machine and its instruction-set flags (Linux), so that a
    cache shared between machines never hands one a library built for another."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def compile_library(source: Path) -> Path:
    """The shared library built from ``source`` (its header beside it), from the cache if there.

    Built for this CPU's vector units and with OpenMP where the compiler can, else plainer
    (the same source: without OpenMP its pragmas are off and it runs serially)."""
    command = compiler()
    version = _version(command)
    failure = ""
    for extra in VARIANTS:
        flags = FLAGS + extra
        key = hashlib.sha256()
        for part in (source.read_bytes(), source.with_suffix(".h").read_bytes(), " ".join(flags + LIBS).encode(),
                     version.encode(), " ".join(command).encode(), _cpu().encode()):
            key.update(part)
        target = cache_dir() / "lib" / f"lib{source.stem}-{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            done = subprocess.run([*command, *flags, "-I", str(source.parent), str(source), "-o", str(built), *LIBS],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(built, target)  # atomic: another process sees the old name or the whole file
                return target
            failure = done.stderr.strip()
    raise CompilerError(f"compiling {source.name} failed:\n{failure}")


def sources_dir(norm: str | Norm) -> Path:
    """Where the kernel sources of ``norm`` are: ``generated/`` for a built-in, else emitted into the cache."""
    norm = resolve(norm)
    if BUILTINS.get(norm.name) == norm:
        return resource_dir("generated")
    from .emit import sources

    files = sources(norm)
    key = hashlib.sha256("".join(f"{name}\0{text}" for name, text in sorted(files.items())).encode()).hexdigest()[:20]
    directory = cache_dir() / "sources" / f"{norm.name}-{key}"
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=directory.parent))
        for name, text in files.items():
            (scratch / name).write_text(text, encoding="utf-8")
        try:
            os.replace(scratch, directory)  # atomic: all the files or none
        except OSError:  # another process got there first, with the same files
            shutil.rmtree(scratch, ignore_errors=True)
    return directory


_MODULES: dict[Path, ModuleType] = {}


def module(norm: str | Norm) -> ModuleType:
    """The generated Python module of ``norm`` (standalone: needs only NumPy)."""
    norm = resolve(norm)
    path = sources_dir(norm) / f"{norm.name}.py"
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"symbn_kernels_{norm.name}_{len(_MODULES)}", path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        _MODULES[path] = loaded
    return _MODULES[path]


def load(norm: str | Norm = "batchnorm", backend: str = "numpy", threads: int | None = None):
    """The kernels of ``norm`` (a built-in name or a spec) on ``backend`` (``"numpy"`` or ``"c"``):
    an object with forward_train, backward_train, forward_eval, backward_eval. ``threads`` caps the
    C kernels' OpenMP team (default: every core)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    norm = resolve(norm)
    kernels = module(norm).Kernels
    if backend == "numpy":
        return kernels()
    return kernels(compile_library(sources_dir(norm) / f"{norm.name}.c"), threads=threads)
