"""``python -m symbn bench``: the generated kernels' speed against PyTorch and NumPy, in one process.

Each case times, as medians over repeats after warm-up: the generated C kernels, the generated
NumPy kernels, PyTorch's own CPU kernels (ATen, same thread count; when installed), for batch
norm the best NumPy written by hand (the compact form, in place) and the paper's staged backward
written in NumPy, and a STREAM-like triad on the same working set,
which gives the memory bandwidth the kernels are measured against. Bytes are counted as two
passes over the inputs plus one write of the output. Nothing here is a test: speed is reported,
never asserted.
"""
from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time

import numpy as np

from .build import cache_dir, compile_library, load
from .spec import BUILTINS

FULL = [  # norm, shape, options, dtype
    ("batchnorm", (8192, 1024), {}, "float32"),
    ("batchnorm", (32, 64, 56, 56), {}, "float32"),
    ("batchnorm", (256, 64), {}, "float32"),
    ("layernorm", (8192, 1024), {}, "float32"),
    ("rmsnorm", (8192, 1024), {}, "float32"),
    ("groupnorm", (32, 64, 56, 56), {"num_groups": 8}, "float32"),
    ("batchnorm", (8192, 1024), {}, "float64"),
    ("batchnorm", (256, 64), {}, "float64"),
]
QUICK = FULL[:3]
DOUBLE = [  # the double backward: symbn's order-2 C kernel against PyTorch's, batch norm in training, float32
    ((8192, 1024), "float32"),
    ((32, 64, 56, 56), "float32"),
]
WHOLE = ((256, 64), "float32")
"""The whole-call case: symbn's Python call of its C kernels against PyTorch's Python API
(``F.batch_norm``, and ``torch.autograd.grad`` of it), where the calls' overhead dominates."""
TARGETS = {  # issue 13's targets: (what, bound, whether a measurement must be at most (True) or at least the bound)
    "c_vs_torch": ("C time / PyTorch at its best, every case, forward and backward: the largest", 1.0, True),
    "forward_of_triad": ("batch norm 8192x1024 float32 C forward, bandwidth / the triad's", 0.8, False),
    "whole_256x64": ("batch norm 256x64 float32, symbn's whole call / F.batch_norm's (and its backward's): the larger", 0.6, True),
    "numpy_vs_compact": ("generated NumPy time / the compact NumPy by hand, every batch norm case: the largest", 1.0, True),
    "double_vs_torch": ("double backward / PyTorch's: the largest", 1.0, True),
    "ops_vs_torch": ("symbn.torch op / torch.nn, every case, forward and backward: the largest", 1.0, True),
}

TRIAD = r"""
#include <stddef.h>
#include "triad.h"
void triad(float *a, const float *b, const float *c, ptrdiff_t n, int threads)
{
    (void)threads;
#ifdef _OPENMP
    #pragma omp parallel for simd num_threads(threads) schedule(static)
#endif
    for (ptrdiff_t i = 0; i < n; ++i) a[i] = b[i] + 3.0f * c[i];
}
"""


SAMPLE_S = 0.002  # a sample times enough calls to last about this long: fast calls are timed in batches


def median_ms(calls: dict, repeats: int, warmup: int = 2) -> dict:
    """Median milliseconds per call of each of ``calls`` (name -> function). Samples are taken
    round-robin, one of each per round, so that the machine's fast and slow spells fall on every
    implementation alike; a fast call is timed as a batch of calls lasting about SAMPLE_S."""
    batch = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        start = time.perf_counter()
        call()
        batch[name] = max(1, int(SAMPLE_S / max(time.perf_counter() - start, 1e-9)))
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(batch[name]):
                call()
            samples[name].append((time.perf_counter() - start) / batch[name])
    return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


def _triad(threads: int):
    """A compiled triad a = b + 3c with OpenMP, built like the kernels; over the arrays' bytes
    (as float32, whatever their dtype: the bandwidth is the same)."""
    directory = cache_dir() / "sources" / "triad"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "triad.c").write_text(TRIAD)
    (directory / "triad.h").write_text("#include <stddef.h>\n"
                                       "void triad(float *a, const float *b, const float *c, ptrdiff_t n, int threads);\n")
    function = ctypes.CDLL(str(compile_library(directory / "triad.c"))).triad
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_ssize_t, ctypes.c_int]
    return lambda a, b, c: function(a.ctypes.data, b.ctypes.data, c.ctypes.data, a.nbytes // 4, threads)


def _moment_axes(x) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Batch norm's reduction axes, and the shape that broadcasts a per-channel array against x."""
    return (0, *range(2, x.ndim)), (1, -1) + (1,) * (x.ndim - 2)


def _staged_backward(dy, x, gamma, eps=1e-5):
    """The paper's page-4 backward, stage by stage, in NumPy (batch norm): the baseline the
    compact form is measured against, written here as a reader of the paper would."""
    axes, shape = _moment_axes(x)
    m = x.size // x.shape[1]
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    dxhat = dy * gamma.reshape(shape)
    dvar = np.sum(dxhat * (x - mu) * -0.5 * (var + eps) ** -1.5, axis=axes, keepdims=True)
    dmu = np.sum(dxhat * -1 / np.sqrt(var + eps), axis=axes, keepdims=True) + dvar * np.sum(-2 * (x - mu), axis=axes, keepdims=True) / m
    dx = dxhat / np.sqrt(var + eps) + dvar * 2 * (x - mu) / m + dmu / m
    return dx, np.sum(dy * xhat, axis=axes), np.sum(dy, axis=axes)


def _compact_forward(x, gamma, beta, eps=1e-5):
    """Batch norm's training forward as a NumPy user writes it at best: moments summed in float64
    (the variance in a second pass), y in x's dtype in one temporary, updated in place."""
    axes, shape = _moment_axes(x)
    mean = x.mean(axis=axes, dtype=np.float64)
    y = x - mean.astype(x.dtype).reshape(shape)
    invstd = 1.0 / np.sqrt((y * y).mean(axis=axes, dtype=np.float64) + eps)
    y *= (gamma * invstd).astype(x.dtype).reshape(shape)
    y += beta.reshape(shape)
    return y, mean, invstd


def _compact_backward(dy, x, gamma, mean, invstd):
    """Batch norm's compact backward, dx = γ/(m·σ)·(m·dy − Σdy − x̂·Σ(dy·x̂)), by hand at its best:
    the sums in float64, the element-wise work in x's dtype in one temporary, in place."""
    axes, shape = _moment_axes(x)
    m = x.size // x.shape[1]
    xhat = (x - mean.astype(x.dtype).reshape(shape)) * invstd.astype(x.dtype).reshape(shape)
    dbeta = dy.sum(axis=axes, dtype=np.float64)
    dgamma = (dy * xhat).sum(axis=axes, dtype=np.float64)
    xhat *= (-dgamma / m).astype(x.dtype).reshape(shape)
    xhat += dy
    xhat -= (dbeta / m).astype(x.dtype).reshape(shape)
    xhat *= (gamma * invstd).astype(x.dtype).reshape(shape)
    return xhat, dgamma, dbeta


def _symbn(kernels, name: str, x, dy, gamma, beta, options) -> dict:
    """Forward and backward calls of generated kernels, into preallocated outputs; the backward
    takes the statistics the forward returns, and the same eps."""
    y, dx = np.empty_like(x), np.empty_like(x)
    _, *stats = kernels.forward_train(x, gamma, beta, 1e-5, **options)
    return {(name, "forward"): lambda: kernels.forward_train(x, gamma, beta, 1e-5, out=y, **options),
            (name, "backward"): lambda: kernels.backward_train(dy, x, gamma, *stats, eps=1e-5, out=dx, **options)}


def _torch(norm: str, x, dy, gamma, beta, options, threads: int) -> dict:
    """Forward and backward calls of PyTorch's ATen kernels (none without PyTorch)."""
    try:
        import torch
    except ImportError:
        return {}
    return {("torch", kind): call for kind, call in zip(("forward", "backward"), _aten(torch, norm, x, dy, gamma, beta, options, threads))}


def _aten(torch, norm: str, x, dy, gamma, beta, options, threads: int):
    """(forward, backward) calls of PyTorch's own kernels for ``norm``."""
    torch.set_num_threads(threads)
    aten = torch.ops.aten
    tx, tdy, tg, tb = (torch.from_numpy(v) for v in (x, dy, gamma, beta))
    if norm == "batchnorm":
        _, mean, invstd = aten.native_batch_norm(tx, tg, tb, None, None, True, 0.1, 1e-5)
        return (lambda: aten.native_batch_norm(tx, tg, tb, None, None, True, 0.1, 1e-5),
                lambda: aten.native_batch_norm_backward(tdy, tx, tg, None, None, mean, invstd, True, 1e-5, [True] * 3))
    if norm == "layernorm":
        shape = list(x.shape[-1:])
        _, mean, rstd = aten.native_layer_norm(tx, shape, tg, tb, 1e-5)
        return (lambda: aten.native_layer_norm(tx, shape, tg, tb, 1e-5),
                lambda: aten.native_layer_norm_backward(tdy, tx, shape, mean, rstd, tg, tb, [True] * 3))
    if norm == "groupnorm":
        n, c, hw, g = x.shape[0], x.shape[1], int(np.prod(x.shape[2:])), options["num_groups"]
        _, mean, rstd = aten.native_group_norm(tx, tg, tb, n, c, hw, g, 1e-5)
        return (lambda: aten.native_group_norm(tx, tg, tb, n, c, hw, g, 1e-5),
                lambda: aten.native_group_norm_backward(tdy, tx, mean, rstd, tg, n, c, hw, g, [True] * 3))
    shape = list(x.shape[-1:])
    leaf, weight = tx.clone().requires_grad_(), tg.clone().requires_grad_()
    return (lambda: torch.nn.functional.rms_norm(tx, shape, tg, 1e-5),
            lambda: torch.autograd.grad(torch.nn.functional.rms_norm(leaf, shape, weight, 1e-5), (leaf, weight), tdy))


def keep_freed_memory(keep: bool) -> bool:
    """Make glibc keep freed large blocks for reuse (``keep``), or hand every large block fresh
    pages (its default beyond a dynamic threshold, fixed here so that runs agree). Fresh outputs
    and temporaries (PyTorch's, the staged NumPy's) then page-fault on no call or on every call.
    False where the C library is not glibc: the allocator behaves as it does."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    threshold = 1 << 30 if keep else 128 << 10
    return bool(mallopt(M_MMAP_THRESHOLD, threshold) and mallopt(M_TRIM_THRESHOLD, threshold))


def bench(quick: bool = False, threads: int = 2, progress=None) -> dict:
    """Every case, every implementation; times in ms, bandwidth in GB/s."""
    cases, repeats = (QUICK, 5) if quick else (FULL, 15)
    glibc = keep_freed_memory(True)
    triad = _triad(threads)
    results = []
    for number, (norm, shape, options, dtype) in enumerate(cases, 1):
        if progress:
            progress(f"[{number}/{len(cases)}] {norm} {'x'.join(map(str, shape))} {dtype}, {threads} threads")
        results.append(_case(number, norm, shape, options, np.dtype(dtype), threads, triad, repeats, glibc))
    double = []
    for number, (shape, dtype) in enumerate(DOUBLE[:1] if quick else DOUBLE, 1):
        if progress:
            progress(f"[double {number}/{len(DOUBLE)}] batchnorm double backward {'x'.join(map(str, shape))} {dtype}, {threads} threads")
        double.append(_double_case(100 + number, shape, np.dtype(dtype), threads, repeats))
    if progress:
        progress(f"[whole] batchnorm {'x'.join(map(str, WHOLE[0]))} {WHOLE[1]}: whole calls, {threads} threads")
    report = {"cases": results, "double_backward": double, "whole": _whole_case(threads, repeats),
              "torch": _torch_section(threads, repeats, quick, progress), "quick": quick, "repeats": repeats,
            "allocation": "symbn: outputs preallocated (out=), reused every call; PyTorch: fresh outputs from its "
                          "allocator every call, NumPy by hand (compact, staged): fresh temporaries, " + (
                              "both on memory freed by the call before (glibc told to keep it: no page faults; ratios "
                              "are against this, PyTorch at its best); 'torch (fresh)': every output on fresh pages"
                              if glibc else "as the C library's allocator provides them (not glibc)"),
              "bytes": "forward 3|x| (two passes over x, one write of y); backward 5|x| (two passes over x and dy, one write of dx)"}
    report["targets"] = targets(report)
    return report


def _whole_case(threads: int, repeats: int) -> dict | None:
    """:data:`WHOLE`: symbn's forward_train and backward_train as a user calls them (C kernels,
    through the compiled entry point where it is built), against ``F.batch_norm(x, None, None,
    γ, β, training=True)`` and ``torch.autograd.grad`` of its output (graph built once), each a
    whole call through the Python API; None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    shape, dtype = WHOLE
    rng = np.random.default_rng(400)
    x, dy = (rng.normal(size=shape).astype(dtype) for _ in range(2))
    gamma, beta = rng.normal(1, 0.2, shape[1]).astype(dtype), rng.normal(size=shape[1]).astype(dtype)
    calls = _symbn(load("batchnorm", "c", threads=threads), "symbn", x, dy, gamma, beta, {})
    torch.set_num_threads(threads)
    batch_norm = torch.nn.functional.batch_norm
    tx, tg, tb, tdy = (torch.from_numpy(a.copy()) for a in (x, gamma, beta, dy))
    leaves = [t.clone().requires_grad_() for t in (tx, tg, tb)]
    y = batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=1e-5)
    calls["torch", "forward"] = lambda: batch_norm(tx, None, None, tg, tb, training=True, eps=1e-5)
    calls["torch", "backward"] = lambda: torch.autograd.grad(y, leaves, tdy, retain_graph=True)
    ms = median_ms(calls, repeats)
    return {"shape": list(shape), "dtype": dtype, "ms": {f"{name} {kind}": value for (name, kind), value in ms.items()},
            **{f"{kind}_vs_torch": ms["symbn", kind] / ms["torch", kind] for kind in ("forward", "backward")}}


def targets(report: dict) -> dict:
    """Each of :data:`TARGETS` with what this run measured (None: not measured, as --quick or
    without PyTorch leaves some), whether it is met, and where the extreme was found."""
    def extreme(values: list[tuple[str, float]], largest: bool) -> tuple[float | None, str]:
        values = [(where, v) for where, v in values if v is not None]
        if not values:
            return None, ""
        where, value = (max if largest else min)(values, key=lambda item: item[1])
        return value, where

    def label(case: dict) -> str:
        return f"{case['norm']} {'x'.join(map(str, case['shape']))} {case['dtype']}"

    kinds = ("forward", "backward")
    c = [(f"{label(case)} {kind}", case["results"]["c"][f"{kind}_vs_torch"]) for case in report["cases"] for kind in kinds]
    triad = [(label(case), case["results"]["c"]["forward_of_triad"]) for case in report["cases"]
             if label(case) == "batchnorm 8192x1024 float32"]
    whole = report.get("whole") or {}
    compact = [(f"{label(case)} {kind}", case["results"]["numpy"][f"{kind}_ms"] / case["results"]["compact numpy"][f"{kind}_ms"])
               for case in report["cases"] if "compact numpy" in case["results"] for kind in kinds]
    double = [("x".join(map(str, case["shape"])), case["double_vs_torch"]) for case in report["double_backward"]]
    ops = [(f"{case['norm']} {'x'.join(map(str, case['shape']))} {kind}", case[f"{kind}_vs_torch"])
           for case in (report.get("torch") or {}).get("ops", []) for kind in kinds]
    measured = {"c_vs_torch": extreme(c, True), "forward_of_triad": extreme(triad, False),
                "whole_256x64": extreme([(kind, whole.get(f"{kind}_vs_torch")) for kind in kinds], True),
                "numpy_vs_compact": extreme(compact, True), "double_vs_torch": extreme(double, True),
                "ops_vs_torch": extreme(ops, True)}
    out = {}
    for key, (what, bound, at_most) in TARGETS.items():
        value, where = measured[key]
        met = None if value is None else (value <= bound if at_most else value >= bound)
        out[key] = {"what": what, "bound": bound, "at_most": at_most, "measured": value, "where": where, "met": met}
    return out


def _case(seed: int, norm: str, shape: tuple, options: dict, dtype: np.dtype, threads: int, triad, repeats: int,
          glibc: bool) -> dict:
    """One norm, shape and dtype: every implementation timed in the same rounds, and the triad."""
    rng = np.random.default_rng(seed)
    x, dy = rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)
    params = tuple(x.shape[axis] for axis in BUILTINS[norm].layout.param_axes(x.ndim))
    gamma, beta = rng.normal(1, 0.2, params).astype(dtype), rng.normal(size=params).astype(dtype)
    a, b, c = np.empty_like(x), np.ones_like(x), np.ones_like(x)
    calls = {("triad", "forward"): lambda: triad(a, b, c)}
    for backend in ("c", "numpy"):
        calls.update(_symbn(load(norm, backend, threads=threads if backend == "c" else None), backend, x, dy, gamma, beta, options))
    torch_calls = _torch(norm, x, dy, gamma, beta, options, threads)
    calls.update(torch_calls)
    if norm == "batchnorm":
        _, mean, invstd = _compact_forward(x, gamma, beta)
        calls["compact numpy", "forward"] = lambda: _compact_forward(x, gamma, beta)
        calls["compact numpy", "backward"] = lambda: _compact_backward(dy, x, gamma, mean, invstd)
        calls["staged numpy", "backward"] = lambda: _staged_backward(dy, x, gamma)
    ms = median_ms(calls, repeats)
    if torch_calls and glibc:  # PyTorch again, each of its outputs on fresh pages
        keep_freed_memory(False)
        ms.update({(f"{name} (fresh)", kind): value for (name, kind), value in median_ms(torch_calls, repeats).items()})
        keep_freed_memory(True)
    bandwidth = 3 * x.nbytes / ms.pop(("triad", "forward")) / 1e6
    timings = {}
    for (name, kind), value in sorted(ms.items(), key=lambda item: item[0][0] in ("compact numpy", "staged numpy")):
        timings.setdefault(name, [None, None])[kind == "backward"] = value
    return {"norm": norm, "shape": list(shape), "options": options, "dtype": dtype.name, "threads": threads,
            "triad_gbs": bandwidth, "results": {name: _row(fwd, bwd, x.nbytes, bandwidth, timings.get("torch"))
                                                for name, (fwd, bwd) in timings.items()}}


def _double_case(seed: int, shape: tuple, dtype: np.dtype, threads: int, repeats: int) -> dict:
    """Batch norm's double backward (the gradient of the backward, given cotangents of dx, dγ, dβ):
    symbn's generated order-2 C kernel, its own first backward, and PyTorch's double backward
    (``torch.autograd.grad`` of the first-order gradients that ``autograd.grad(..., create_graph=True)``
    built through ``F.batch_norm``; the graph is built once, the second grad is what is timed)."""
    rng = np.random.default_rng(seed)
    x, dy, v = (rng.normal(size=shape).astype(dtype) for _ in range(3))
    channels = shape[1]
    gamma, beta, v_gamma, v_beta = (rng.normal(1, 0.2, channels).astype(dtype) for _ in range(4))
    kernels = load("batchnorm", "c", threads=threads, order=2)
    _, *stats = kernels.forward_train(x, gamma, beta, 1e-5)
    dx, d2_x, d2_dy = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    calls = {"symbn backward": lambda: kernels.backward_train(dy, x, gamma, *stats, eps=1e-5, out=dx),
             "symbn double backward": lambda: kernels.backward2_train(v, v_gamma, v_beta, dy, x, gamma, *stats, eps=1e-5,
                                                                      out=(d2_x, d2_dy))}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        tx, tg, tb, tdy = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, gamma, beta, dy))
        y = torch.nn.functional.batch_norm(tx, None, None, tg, tb, training=True, eps=1e-5)
        first = torch.autograd.grad(y, (tx, tg, tb), tdy, create_graph=True)
        cotangents = (torch.from_numpy(v), torch.from_numpy(v_gamma), torch.from_numpy(v_beta))
        calls["torch double backward"] = lambda: torch.autograd.grad(first, (tx, tg, tdy), cotangents, retain_graph=True)
    ms = median_ms(calls, repeats)
    mine, native = ms["symbn double backward"], ms.get("torch double backward")
    return {"norm": "batchnorm", "shape": list(shape), "dtype": dtype.name, "threads": threads, "ms": ms,
            "double_vs_torch": None if native is None else mine / native,
            "double_vs_own_backward": mine / ms["symbn backward"]}


def _torch_section(threads: int, repeats: int, quick: bool, progress) -> dict | None:
    """symbn.torch against torch.nn (see :mod:`symbn.torch.bench`); None without PyTorch."""
    try:
        from .torch.bench import section
    except ImportError:
        return None
    return section(median_ms, threads, repeats, quick, progress)


def _row(fwd: float | None, bwd: float, nbytes: int, bandwidth: float, torch: list | None) -> dict:
    """Times, bandwidths (bytes counted as in the report), fraction of the triad, ratio to PyTorch."""
    row = {"forward_ms": fwd, "backward_ms": bwd,
           "forward_gbs": None if fwd is None else 3 * nbytes / fwd / 1e6, "backward_gbs": 5 * nbytes / bwd / 1e6,
           "forward_vs_torch": None if fwd is None or torch is None else fwd / torch[0],
           "backward_vs_torch": None if torch is None else bwd / torch[1]}
    for key in ("forward", "backward"):
        row[f"{key}_of_triad"] = None if row[f"{key}_gbs"] is None else row[f"{key}_gbs"] / bandwidth
    return row


def to_text(report: dict) -> str:
    lines = [(f"median of {report['repeats']} samples after warm-up, taken round-robin across implementations (fast calls "
              f"timed in batches of about {SAMPLE_S * 1e3:.0f} ms); {report['allocation']}"),
             f"bytes counted: {report['bytes']}", ""]
    header = (f"{'case':<42}{'impl':<15}{'fwd ms':>9}{'bwd ms':>9}{'fwd GB/s':>10}{'bwd GB/s':>10}{'fwd %triad':>11}"
              f"{'bwd %triad':>11}{'fwd/torch':>10}{'bwd/torch':>10}")
    lines.append(header)
    for case in report["cases"]:
        label = f"{case['norm']} {'x'.join(map(str, case['shape']))} {case['dtype']} ({case['triad_gbs']:.0f} GB/s)"
        for name, r in case["results"].items():
            cells = [_cell(r["forward_ms"], ".3f"), _cell(r["backward_ms"], ".3f"), _cell(r["forward_gbs"], ".1f"),
                     _cell(r["backward_gbs"], ".1f"), _cell(r["forward_of_triad"], ".0%"), _cell(r["backward_of_triad"], ".0%"),
                     _cell(r["forward_vs_torch"], ".2f"), _cell(r["backward_vs_torch"], ".2f")]
            lines.append(f"{label:<42}{name:<15}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (9, 9, 10, 10, 11, 11, 10, 10))))
            label = ""
    return "\n".join(lines + _double_text(report) + _whole_text(report) + _torch_text(report) + _targets_text(report)) + "\n"


def _whole_text(report: dict) -> list[str]:
    whole = report.get("whole")
    if not whole:
        return []
    ms = whole["ms"]
    return ["", f"whole calls, batch norm {'x'.join(map(str, whole['shape']))} {whole['dtype']} (symbn: forward_train, "
                "backward_train on its C kernels; PyTorch: F.batch_norm, torch.autograd.grad of it)",
            f"{'':<34}{'symbn ms':>10}{'torch ms':>10}{'ratio':>8}",
            f"{'forward':<34}{ms['symbn forward']:>10.4f}{ms['torch forward']:>10.4f}{whole['forward_vs_torch']:>8.2f}",
            f"{'backward':<34}{ms['symbn backward']:>10.4f}{ms['torch backward']:>10.4f}{whole['backward_vs_torch']:>8.2f}"]


def _targets_text(report: dict) -> list[str]:
    lines = ["", "targets (issue 13)"]
    for t in report.get("targets", {}).values():
        status = "not measured" if t["met"] is None else "met" if t["met"] else "not met"
        value = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        where = f" ({t['where']})" if t["where"] else ""
        lines.append(f"  {t['what']} {'<=' if t['at_most'] else '>='} {t['bound']}: {value}{where}: {status}")
    return lines


def _torch_text(report: dict) -> list[str]:
    """The PyTorch section (:mod:`symbn.torch.bench`), as text: it needs no PyTorch to print."""
    section = report.get("torch")
    if not section:
        return []
    lines = ["", "PyTorch path (symbn.torch against torch.nn, float32, through autograd as a user calls them)",
             f"{'case':<34}{'symbn fwd ms':>13}{'torch fwd ms':>13}{'symbn bwd ms':>13}{'torch bwd ms':>13}"
             f"{'fwd/torch':>10}{'bwd/torch':>10}{'floor fwd':>10}{'floor bwd':>10}"]
    for c in section["ops"]:
        ms = c["ms"]
        lines.append(f"{c['norm'] + ' ' + 'x'.join(map(str, c['shape'])):<34}{ms['symbn forward']:>13.3f}"
                     f"{ms['torch forward']:>13.3f}{ms['symbn backward']:>13.3f}{ms['torch backward']:>13.3f}"
                     f"{c['forward_vs_torch']:>10.2f}{c['backward_vs_torch']:>10.2f}"
                     f"{c.get('floor_forward_vs_torch', float('nan')):>10.2f}{c.get('floor_backward_vs_torch', float('nan')):>10.2f}")
    lines.append("floor: an autograd.Function that allocates its outputs and computes nothing (the least an op "
                 "written in Python costs), over PyTorch's time")
    lines.append(f"{'CNN step, batch 64, 32x32':<34}{'symbn ms':>13}{'torch ms':>13}{'ratio':>10}")
    for key, s in section["steps"].items():
        lines.append(f"{key.replace('_', ' '):<34}{s['symbn_ms']:>13.2f}{s['torch_ms']:>13.2f}{s['vs_torch']:>10.2f}")
    if section.get("sync"):
        c = section["sync"]
        lines.append(f"{'DDP step, ' + str(c['processes']) + ' processes x ' + str(c['batch_per_process']):<34}"
                     f"{'sync ms':>13}{'plain ms':>13}{'ratio':>10}")
        lines.append(f"{'synchronized batch norm (' + str(c['bn_layers']) + ' layers)':<34}{c['sync_ms']:>13.2f}"
                     f"{c['plain_ms']:>13.2f}{c['vs_plain']:>10.2f}")
        lines.append(f"bytes per process per step: symbn sends {c['symbn_forward_bytes']} (forward all-gather) + "
                     f"{c['symbn_backward_bytes']} (backward all-reduce); PyTorch's SyncBatchNorm algorithm "
                     f"{c['torch_forward_bytes']} + {c['torch_backward_bytes']}")
    lines.append("targets: " + "; ".join(
        f"{k.replace('_', ' ')} <= {t['target']}x: {'-' if t['measured'] is None else format(t['measured'], '.2f')}"
        f" ({'met' if t['met'] else 'not met' if t['met'] is not None else 'not measured'})" for k, t in section["targets"].items()))
    return lines


def _double_text(report: dict) -> list[str]:
    """The double-backward section: times and the two ratios the targets are stated in."""
    if not report.get("double_backward"):
        return []
    lines = ["", "double backward (batch norm, training; PyTorch: autograd.grad of the create_graph=True gradients of F.batch_norm)",
             f"{'case':<34}{'symbn bwd ms':>14}{'symbn bwd2 ms':>15}{'torch bwd2 ms':>15}{'bwd2/torch':>12}{'bwd2/own bwd':>14}"]
    for case in report["double_backward"]:
        ms = case["ms"]
        lines.append(f"{'x'.join(map(str, case['shape'])) + ' ' + case['dtype']:<34}{ms['symbn backward']:>14.3f}"
                     f"{ms['symbn double backward']:>15.3f}{_cell(ms.get('torch double backward'), '.3f'):>15}"
                     f"{_cell(case['double_vs_torch'], '.2f'):>12}{case['double_vs_own_backward']:>14.2f}")
    return lines


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_svg(report: dict) -> str:
    """Bars of time relative to PyTorch (1 = as fast; lower is faster), forward and backward, per case."""
    bars = [(f"{c['norm']} {'x'.join(map(str, c['shape']))} {c['dtype']}", name, key, c["results"][name][f"{key}_vs_torch"])
            for c in report["cases"] for name in ("c", "numpy") if name in c["results"]
            for key in ("forward", "backward") if c["results"][name][f"{key}_vs_torch"] is not None]
    height, top, scale = 22 * len(bars) + 60, 40, 120.0
    limit = max([1.0, *(min(v, 4.0) for *_, v in bars)])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="800" height="{height}" font-family="sans-serif" font-size="12">',
           '<text x="10" y="20" font-size="14">time relative to PyTorch, same threads (1 = as fast, lower is faster)</text>']
    for j, (case, name, key, value) in enumerate(bars):
        y = top + 22 * j
        width = scale * min(value, 4.0) / limit * 3
        colour = {"c": "#2b6cb0", "numpy": "#dd6b20"}[name]
        out.append(f'<text x="10" y="{y + 14}">{case} {name} {key}</text>')
        out.append(f'<rect x="340" y="{y}" width="{width:.1f}" height="16" fill="{colour}" opacity="{0.6 if key == "forward" else 1}"/>')
        out.append(f'<text x="{345 + width:.1f}" y="{y + 13}">{value:.2f}{"+" if value > 4 else ""}</text>')
    x_one = 340 + scale / limit * 3
    out.append(f'<line x1="{x_one:.1f}" y1="{top - 5}" x2="{x_one:.1f}" y2="{height - 15}" stroke="black" stroke-dasharray="4"/>')
    out.append(f'<text x="{x_one - 20:.1f}" y="{height - 3}">PyTorch</text></svg>')
    return "\n".join(out) + "\n"


FORMATS = ("text", "json")
"""What ``bench --format`` prints: the table, or every number as JSON."""


def main(quick: bool = False, format: str = "text", threads: int = 2, plot=None) -> str:
    """The ``bench`` command: runs the cases (progress lines on standard error) and returns what
    it prints, in ``format`` (one of :data:`FORMATS`); ``plot``: also write the SVG chart there."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    report = bench(quick, threads, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if plot:
        plot.write_text(to_svg(report))
    return json.dumps(report, indent=2) + "\n" if format == "json" else to_text(report)
