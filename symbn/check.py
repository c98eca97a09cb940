"""``python -m symbn check``: every backend against the others, finite differences and PyTorch,
at every order.

For each built-in norm x chain of transforms x layout case x mode x dtype x backend, on small
seeded problems, the kernels' outputs are compared with independent references. Errors are
max over outputs of max |a - b| / max |b| (:func:`symbn.oracles.relative_error`).

Chains (``--orders`` picks them by length):

* order 1: ``vjp`` (forward and backward, as ever) and ``jvp`` (forward mode);
* order 2: ``vjp²`` (double backward), ``jvp²`` (nested forward mode) and ``vjp·jvp``
  (forward over reverse: jvp of the backward, a Hessian-vector product);
* order 3: ``vjp³``.

References (columns):

* ``numpy64``: the NumPy kernels of the same chain in float64;
* ``fd``: central differences (float64 rows only) of the level below, computed by symbn's own
  float64 NumPy kernels: for a vjp level, the gradient of Σ cotangent·(outputs of the level
  below) with respect to each of its inputs; for a jvp level, the directional derivative along
  the tangents. In training the level below recomputes the statistics from x with the forward
  kernel (they are functions of x at every order);
* ``plain``: PyTorch autograd (``torch.autograd.grad`` / ``torch.func.jvp``) of the same forward
  written in plain torch ops (:mod:`symbn.oracles`), float64, on exactly the inputs the kernel
  got; in training the kernels take the batch's statistics, computed by the forward kernel;
* ``torch``: PyTorch's native op (``F.batch_norm`` & co.) by autograd, same dtype: order-1 vjp
  only (the native ops are wrong beyond order 2, which is the point of symbn).

The inputs of every chain other than the order-1 vjp are rounded to float32 (exactly
representable in both dtypes), so that float32 rows measure the kernels' own rounding, not the
inputs'. Tolerances are per dtype and reference (:data:`TOLERANCE`, with the worst errors measured).

What the default covers: every built-in, both backends, both modes, float32 and float64, the
chains of orders 1 to 3, with both layout cases (:func:`cases`) at every order. ``--quick``:
orders 1 and 2, and the first case of each layout beyond order 1. The C kernels of chains not
under ``generated/`` (orders 3, the jvp chains) are derived and compiled on demand into the
cache on the first run (about 10 to 30 s each). Measured on 2 cores: 480 combinations in about
6 s with a warm cache; about 4 minutes on an empty cache, nearly all of it deriving and compiling
(``--quick``, 280 combinations, skips the order-3 kernels). Since the cache key of an emitted
kernel includes a hash of symbn's own code, a change to any module of symbn derives the on-demand
kernels again (the compiled libraries are reused when their sources come out the same).
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from .build import BACKENDS, load
from .oracles import (TorchMissing, adjoint_name, central_differences, chain as torch_chain, evaluate, forward_program,
                      native_reference, relative_error, tangent_name)
from .spec import BUILTINS

DTYPES = (np.float64, np.float32)
MODES = ("train", "eval")
ORDERS = (1, 2, 3)
CHAINS = (("vjp",), ("jvp",), ("vjp", "vjp"), ("jvp", "jvp"), ("vjp", "jvp"), ("vjp", "vjp", "vjp"))
"""Every chain check runs, innermost transform first (("vjp", "jvp") is jvp(vjp(f)))."""
QUICK_ORDERS = (1, 2)
"""``--quick``: these orders only, and one case per layout beyond order 1."""
REFERENCES = ("numpy64", "fd", "plain", "torch")
EPS = 1e-5
FD_STEP = 1e-6
"""Central differences: the step, relative to each entry (vjp levels) or along the tangents (jvp levels)."""

TOLERANCE = {"float64": {"numpy64": 1e-12, "fd": 1e-6, "plain": 1e-12, "torch": 1e-10},
             "float32": {"numpy64": 2e-6, "fd": 1e-6, "plain": 2e-6, "torch": 2e-5}}
"""The largest relative error that passes, per dtype and reference, at every order.

Measured worst errors over every built-in, case, mode and backend (gcc -O3 -march=native, x86-64):

    chain    | float64 numpy64  plain    fd      | float32 numpy64  plain
    vjp      |         3.9e-16  4.9e-16  1.3e-9  |         1.6e-7   1.4e-7   (torch: 3.9e-16, 2.2e-7)
    jvp      |         3.8e-16  4.6e-16  1.5e-10 |         1.7e-7   1.7e-7
    vjp²     |         6.7e-16  8.3e-16  2.0e-9  |         1.1e-7   1.1e-7
    jvp²     |         4.2e-16  4.2e-16  2.3e-10 |         1.2e-7   1.2e-7
    vjp·jvp  |         7.4e-16  7.9e-16  4.7e-10 |         1.4e-7   1.4e-7
    vjp³     |         6.2e-16  6.6e-16  1.4e-9  |         2.0e-7   2.0e-7

Float64 against float64 references: a few ulps; 1e-12 leaves room for another compiler's
contractions and orders of summation. Central differences (step 1e-6, relative) are good to
about 1e-9; 1e-6 flags any wrong term (which errs by O(1)). Float32: every output is rounded to
float32 once (2^-24 ~ 6e-8 of each entry); beyond order 1 the kernels compute in double from
float32-exact inputs, so higher orders need no looser bound than order 1: 2e-6 is 10x the worst
measured (vjp³, 2.0e-7). PyTorch's native ops in float32 (order-1 vjp only) round every
intermediate to float32: 2e-5 as before."""


def tolerance(dtype: str, order: int, reference: str) -> float:
    """The largest relative error that passes for ``reference`` on a ``dtype`` row of ``order``
    (the same at every order: see :data:`TOLERANCE`)."""
    return TOLERANCE[dtype][reference]


def chain_label(transforms: tuple[str, ...]) -> str:
    """``vjp``, ``vjp²``, ``vjp³``, ``jvp``, ``jvp²``; a mixed chain spelled innermost first: ``vjp·jvp``."""
    if len(set(transforms)) == 1:
        power = len(transforms)
        return transforms[0] + ("" if power == 1 else "⁰¹²³⁴⁵⁶⁷⁸⁹"[power] if power < 10 else f"^{power}")
    return "·".join(transforms)


def chains(orders=ORDERS) -> tuple[tuple[str, ...], ...]:
    """The chains of the given orders (their lengths)."""
    return tuple(c for c in CHAINS if len(c) in tuple(orders))


@dataclass(frozen=True)
class Case:
    """One problem: a norm, a shape, and the options its layout needs."""

    norm: str
    shape: tuple[int, ...]
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{'x'.join(map(str, self.shape))}{extra}"

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(self.options.get("normalized_shape", self.shape[1:2]))


def cases(norm: str) -> list[Case]:
    """Small problems in each layout the norm takes: 2-D and 4-D, or two normalized shapes."""
    return [Case(norm, shape, dict(options)) for shape, options in BUILTINS[norm].layout.examples]


def problem(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float64 inputs: an offset x, a random cotangent, parameters and running statistics."""
    rng = np.random.default_rng(seed)
    stats = BUILTINS[case.norm].stat_names
    groups = case.options.get("num_groups", case.param_shape[0] if BUILTINS[case.norm].layout.params_per_group else 1)
    return {
        "x": rng.normal(0.5, 2.0, case.shape), "dy": rng.normal(size=case.shape),
        "gamma": rng.normal(1.0, 0.3, case.param_shape), "beta": rng.normal(size=case.param_shape),
        **{f"running_{s}": (rng.uniform(0.5, 2.0, groups) if s != "mean" else rng.normal(size=groups)) for s in stats},
    }


# ----------------------------------------------------------------------------- order 1, reverse mode

def run(kernels, case: Case, data: dict, mode: str, dtype=np.float64, eps: float = EPS) -> dict[str, np.ndarray]:
    """Forward and backward of one mode; arrays are cast to ``dtype``. In training the forward
    returns the statistics themselves, which the backward takes with the same eps."""
    cast = {k: v.astype(dtype) for k, v in data.items()}
    norm = BUILTINS[case.norm]
    running = [cast[f"running_{s}"] for s in norm.stat_names]
    if mode == "train":
        y, *stats = kernels.forward_train(cast["x"], cast["gamma"], cast["beta"], eps, **case.options)
        dx, dgamma, dbeta = kernels.backward_train(cast["dy"], cast["x"], cast["gamma"], *stats, eps=eps, **case.options)
        updated = [r.copy() for r in running]
        kernels.forward_train(cast["x"], cast["gamma"], cast["beta"], **case.options,
                              **{f"running_{s}": r for s, r in zip(norm.stat_names, updated)})
        return {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta,
                **{f"running_{s}": r for s, r in zip(norm.stat_names, updated)}}
    y = kernels.forward_eval(cast["x"], cast["gamma"], cast["beta"], *running, eps=eps, **case.options)
    dx, dgamma, dbeta = kernels.backward_eval(cast["dy"], cast["x"], cast["gamma"], *running, eps=eps, **case.options)
    return {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}


def finite_differences(case: Case, data: dict, mode: str, h: float = FD_STEP) -> dict[str, np.ndarray]:
    """dl/dx, dl/dgamma, dl/dbeta of l = Σ dy·y by central differences of the float64 NumPy forward."""
    kernels = load(case.norm, "numpy")
    norm = BUILTINS[case.norm]
    running = [data[f"running_{s}"] for s in norm.stat_names]

    def loss(**changed) -> float:
        args = {**{k: data[k] for k in ("x", "gamma", "beta")}, **changed}
        if mode == "train":
            y = kernels.forward_train(args["x"], args["gamma"], args["beta"], **case.options)[0]
        else:
            y = kernels.forward_eval(args["x"], args["gamma"], args["beta"], *running, **case.options)
        return float(np.sum(data["dy"] * y))

    return {f"d{name}": central_differences(lambda v, name=name: loss(**{name: v}), data[name], h) for name in ("x", "gamma", "beta")}


def torch_reference(case: Case, data: dict, mode: str, dtype=np.float64) -> dict[str, np.ndarray] | None:
    """The same quantities from PyTorch (autograd for the gradients, updated running statistics for
    batch and instance norm in training), or None where it has no such norm or is not installed."""
    try:
        return native_reference(case.norm, data, mode, dtype=dtype, eps=EPS, momentum=0.1, **case.options)
    except TorchMissing:
        return None


# ----------------------------------------------------------------------------- any chain

_BASES = ("x", "y", "gamma", "beta")
_PREFIX = re.compile(r"d\d+_(.+)|t\d*_(.+)|d(.+)")


def base_name(name: str) -> str:
    """The primal a cotangent, gradient or tangent belongs to: d3_d2_dy -> y, t2_t_x -> x, dgamma -> gamma."""
    while name not in _BASES:
        match = _PREFIX.fullmatch(name)
        if match is None:
            raise ValueError(f"check: cannot tell what {name!r} is the adjoint or tangent of")
        name = next(g for g in match.groups() if g is not None)
    return name


def names(transforms: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(inputs, differentiable inputs, outputs) of the program of ``transforms`` (the forward for
    an empty chain), named as :mod:`symbn.oracles` and symbn's kernels name them; no PyTorch needed."""
    inputs = differentiable = ("x", "gamma", "beta")
    outputs: tuple[str, ...] = ("y",)
    for level, transform in enumerate(transforms, start=1):
        if transform == "vjp":
            added, outputs = tuple(adjoint_name(o, level) for o in outputs), tuple(adjoint_name(i, level) for i in differentiable)
        else:
            added, outputs = tuple(tangent_name(i, level) for i in differentiable), tuple(tangent_name(o, level) for o in outputs)
        inputs, differentiable = inputs + added, differentiable + added
    return inputs, differentiable, outputs


def _reference_program(case: Case, mode: str, transforms: tuple[str, ...], running: dict, eps: float = EPS):
    """The plain-ops PyTorch program of ``transforms`` (the forward for an empty chain)."""
    stats = [running[f"running_{s}"] for s in BUILTINS[case.norm].stat_names] if mode == "eval" else None
    return torch_chain(forward_program(BUILTINS[case.norm], mode, eps, running=stats, **case.options), transforms)


def chain_problem(case: Case, transforms: tuple[str, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Every input of ``transforms``'s program: :func:`problem`'s, and a seeded normal array (the
    shape of its primal) for each further cotangent and tangent, the same array for the same name
    in every chain; all rounded to float32 so that both dtypes see the same numbers."""
    data = problem(case, seed)
    for name in names(transforms)[0]:
        if name not in data:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            data[name] = rng.normal(size=case.shape if base_name(name) in ("x", "y") else case.param_shape)
    return {k: v.astype(np.float32).astype(np.float64) for k, v in data.items()}


def _table(kernels, name: str):
    """The table (inputs, outputs, in plan order) of kernel ``name`` of a loaded object."""
    for part in getattr(kernels, "parts", (kernels,)):
        if name in part.KERNELS:
            return part.KERNELS[name]
    raise KeyError(f"check: no kernel {name} in {kernels!r}")


def call(kernels, case: Case, mode: str, transforms: tuple[str, ...], values: dict, dtype=np.float64,
         eps: float = EPS) -> dict[str, np.ndarray]:
    """The outputs, by name, of the kernel of ``transforms`` (the forward for an empty chain) on
    ``values`` cast to ``dtype``. In training its statistics are this batch's, computed by the
    forward kernel from ``values["x"]``; in eval mode they are the running statistics."""
    from .lower import kernel_name

    norm = BUILTINS[case.norm]
    cast = {k: np.asarray(v).astype(dtype) for k, v in values.items()}
    if mode == "train":
        y, *stats = kernels.forward_train(cast["x"], cast["gamma"], cast["beta"], eps, **case.options)
        cast.update(zip(norm.stat_names, stats))
    if not transforms:
        if mode == "eval":
            y = kernels.forward_eval(cast["x"], cast["gamma"], cast["beta"],
                                     *[cast[f"running_{s}"] for s in norm.stat_names], eps=eps, **case.options)
        return {"y": y}
    name = kernel_name(transforms, mode)
    table = _table(kernels, name)
    out = getattr(kernels, name)(*[cast[label] for label in table.labels if label != "eps"], eps=eps, **case.options)
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip([o[0] for o in table.outputs], out))


def plain_reference(case: Case, mode: str, transforms: tuple[str, ...], values: dict, eps: float = EPS) -> dict[str, np.ndarray]:
    """The outputs of ``transforms`` by PyTorch autograd of the plain-ops forward, float64."""
    return evaluate(_reference_program(case, mode, transforms, values, eps), values)


def fd_reference(kernels, case: Case, mode: str, transforms: tuple[str, ...], values: dict, h: float = FD_STEP,
                 eps: float = EPS) -> dict[str, np.ndarray]:
    """The outputs of the last level of ``transforms`` by central differences of the level below,
    computed by ``kernels`` (float64 NumPy): for a vjp, the gradient of Σ cotangent·output with
    respect to each input of the level below; for a jvp, the derivative along the tangents."""
    below, level = transforms[:-1], len(transforms)
    _, differentiable, below_outputs = names(below)

    def outputs(vals: dict) -> dict:
        return call(kernels, case, mode, below, vals, np.float64, eps)

    if transforms[-1] == "vjp":
        def loss(vals: dict) -> float:
            out = outputs(vals)
            return float(sum(np.sum(vals[adjoint_name(o, level)] * out[o]) for o in below_outputs if o in out))

        return {adjoint_name(i, level): central_differences(lambda v, i=i: loss({**values, i: v}), values[i], h)
                for i in differentiable}
    tangents = {i: values[tangent_name(i, level)] for i in differentiable}
    up = outputs({**values, **{i: values[i] + h * t for i, t in tangents.items()}})
    down = outputs({**values, **{i: values[i] - h * t for i, t in tangents.items()}})
    return {tangent_name(o, level): (up[o] - down[o]) / (2 * h) for o in below_outputs if o in up}


def compare(out: dict, reference: dict | None) -> float | None:
    """The largest relative error over the outputs either side has (a missing one counts as zeros)."""
    if reference is None:
        return None
    errors = []
    for name in {**out, **reference}:
        a, b = out.get(name), reference.get(name)
        a = np.zeros_like(b) if a is None else a
        b = np.zeros(np.shape(a)) if b is None else b
        errors.append(relative_error(a, b))
    return max(errors, default=0.0)


# ----------------------------------------------------------------------------- rows

@dataclass(frozen=True)
class Row:
    norm: str
    mode: str
    case: str
    dtype: str
    backend: str
    errors: dict[str, float | None]
    transforms: tuple[str, ...] = ("vjp",)

    @property
    def order(self) -> int:
        return len(self.transforms)

    @property
    def chain(self) -> str:
        return chain_label(self.transforms)

    @property
    def ok(self) -> bool:
        return all(e is None or e <= tolerance(self.dtype, self.order, k) for k, e in self.errors.items())

    def to_dict(self) -> dict:
        return {"norm": self.norm, "mode": self.mode, "case": self.case, "dtype": self.dtype, "backend": self.backend,
                "chain": self.chain, "transforms": list(self.transforms), "order": self.order,
                "errors": dict(self.errors),
                "tolerances": {k: tolerance(self.dtype, self.order, k) for k in self.errors},
                "ok": self.ok}


def _order1(norm: str, kernels: dict, progress, rows: list) -> None:
    """The order-1 vjp rows, as check has always made them, with the plain-ops reference beside."""
    numpy64 = load(norm, "numpy")
    for case in cases(norm):
        data = problem(case)
        for mode in MODES:
            reference = run(numpy64, case, data, mode)
            fd = finite_differences(case, data, mode)
            for dtype in DTYPES:
                torch_out = torch_reference(case, data, mode, dtype)
                given = {k: v.astype(dtype).astype(np.float64) for k, v in data.items()}
                plain = _plain_order1(case, mode, given)
                for backend, k in kernels.items():
                    out = run(k, case, data, mode, dtype)
                    errors = {
                        "numpy64": max(relative_error(out[q], reference[q]) for q in out),
                        "fd": max(relative_error(out[f], fd[f]) for f in fd) if dtype == np.float64 else None,
                        "plain": None if plain is None else max(relative_error(out[q], plain[q]) for q in plain),
                        "torch": None if torch_out is None else max(relative_error(out[q], torch_out[q]) for q in torch_out),
                    }
                    _add(rows, Row(norm, mode, case.label, np.dtype(dtype).name, backend, errors, ("vjp",)), progress)


def _plain_order1(case: Case, mode: str, data: dict) -> dict | None:
    """y, dx, dgamma, dbeta from the plain-ops forward (float64), or None without PyTorch."""
    try:
        return {**plain_reference(case, mode, (), data), **plain_reference(case, mode, ("vjp",), data)}
    except TorchMissing:
        return None


def _add(rows: list, row: Row, progress) -> None:
    rows.append(row)
    if progress:
        progress(row)


def _chain_rows(norm: str, transforms: tuple[str, ...], backends, selected: list[Case], progress, rows: list) -> None:
    kernels = {backend: load(norm, backend, transforms=transforms) for backend in backends}
    numpy64 = kernels["numpy"] if "numpy" in kernels else load(norm, "numpy", transforms=transforms)
    for case in selected:
        values = chain_problem(case, transforms)
        for mode in MODES:
            reference = call(numpy64, case, mode, transforms, values)
            fd = fd_reference(numpy64, case, mode, transforms, values)
            try:
                plain = plain_reference(case, mode, transforms, values)
            except TorchMissing:
                plain = None
            for dtype in DTYPES:
                for backend, k in kernels.items():
                    out = call(k, case, mode, transforms, values, dtype)
                    errors = {"numpy64": compare(out, reference),
                              "fd": compare(out, fd) if dtype == np.float64 else None,
                              "plain": compare(out, plain), "torch": None}
                    _add(rows, Row(norm, mode, case.label, np.dtype(dtype).name, backend, errors, transforms), progress)


def check(norms: tuple[str, ...] = tuple(BUILTINS), backends: tuple[str, ...] = BACKENDS, progress=None,
          orders=ORDERS, quick: bool = False, transforms=None) -> list[Row]:
    """Every combination; ``progress`` (if given) is called with each row as it is done.
    ``orders``: the chain lengths to check (:data:`CHAINS` of those lengths), or ``transforms``:
    the chains themselves; ``quick``: orders 1 and 2 only, and the first case of each layout
    beyond order 1."""
    selected_chains = tuple(map(tuple, transforms)) if transforms is not None else chains(orders)
    if quick:
        selected_chains = tuple(c for c in selected_chains if len(c) in QUICK_ORDERS)
    rows: list[Row] = []
    for norm in norms:
        for transforms in selected_chains:
            if transforms == ("vjp",):
                _order1(norm, {backend: load(norm, backend) for backend in backends}, progress, rows)
                continue
            selected = cases(norm)[:1] if quick and len(transforms) > 1 else cases(norm)
            _chain_rows(norm, transforms, backends, selected, progress, rows)
    return rows


# ----------------------------------------------------------------------------- output

def format_row(row: Row) -> str:
    cells = ["-" if row.errors.get(k) is None else f"{row.errors[k]:.1e}" for k in REFERENCES]
    return (f"{row.norm:<13}{row.mode:<6}{row.case:<26}{row.dtype:<8}{row.backend:<6}{row.chain:<9}"
            + "".join(f"{c:>10}" for c in cells) + ("   ok" if row.ok else "   MISMATCH"))


def _tolerance_text() -> str:
    return "; ".join(f"{dtype}: " + ", ".join(f"{k} <= {v:.0e}" for k, v in t.items()) for dtype, t in TOLERANCE.items())


def header() -> str:
    return ("max relative error against: numpy64 (NumPy kernels, float64), fd (central differences of the float64 "
            "level below; float64 rows), plain (PyTorch autograd of the plain-ops forward, float64), "
            "torch (PyTorch's native op by autograd, same dtype; order-1 vjp)\n"
            f"tolerances: {_tolerance_text()}\n"
            f"{'norm':<13}{'mode':<6}{'case':<26}{'dtype':<8}{'backend':<6}{'chain':<9}"
            + "".join(f"{k:>10}" for k in REFERENCES))


def to_json(rows: list[Row]) -> dict:
    """The rows and the totals, as JSON-ready data."""
    return {"rows": [row.to_dict() for row in rows], "references": list(REFERENCES),
            "tolerances": TOLERANCE,
            "combinations": len(rows), "mismatches": sum(not row.ok for row in rows)}
