"""``python -m symbn check``: every backend against the others, finite differences and PyTorch.

For each norm x backend x dtype x layout x mode, on small seeded problems: the kernels'
outputs against the NumPy kernels in float64, their gradients against central finite
differences of the float64 forward, and everything against PyTorch (autograd, running
statistics) where PyTorch is installed and has the norm. Errors are max |a - b| / max |b|.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .build import BACKENDS, load
from .oracles import TorchMissing, central_differences, native_reference, relative_error
from .spec import BUILTINS

DTYPES = (np.float64, np.float32)
MODES = ("train", "eval")
TOLERANCE = {"float64": {"numpy64": 1e-12, "fd": 1e-6, "torch": 1e-10},
             "float32": {"numpy64": 2e-6, "fd": 1e-6, "torch": 2e-5}}


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
    layout = BUILTINS[norm].layout.name
    return {
        "channel": [Case(norm, (6, 3)), Case(norm, (2, 3, 2, 3))],
        "instance": [Case(norm, (2, 3, 5)), Case(norm, (2, 3, 2, 3))],
        "groups": [Case(norm, (2, 6, 4), {"num_groups": 3}), Case(norm, (2, 4, 2, 2), {"num_groups": 2})],
        "trailing": [Case(norm, (4, 6), {"normalized_shape": (6,)}), Case(norm, (3, 2, 5), {"normalized_shape": (2, 5)})],
    }[layout]


def problem(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float64 inputs: an offset x, a random cotangent, parameters and running statistics."""
    rng = np.random.default_rng(seed)
    stats = BUILTINS[case.norm].stat_names
    groups = case.options.get("num_groups", case.param_shape[0] if case.norm in ("batchnorm", "instancenorm") else 1)
    return {
        "x": rng.normal(0.5, 2.0, case.shape), "dy": rng.normal(size=case.shape),
        "gamma": rng.normal(1.0, 0.3, case.param_shape), "beta": rng.normal(size=case.param_shape),
        **{f"running_{s}": (rng.uniform(0.5, 2.0, groups) if s != "mean" else rng.normal(size=groups)) for s in stats},
    }


def run(kernels, case: Case, data: dict, mode: str, dtype=np.float64, eps: float = 1e-5) -> dict[str, np.ndarray]:
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


def finite_differences(case: Case, data: dict, mode: str, h: float = 1e-6) -> dict[str, np.ndarray]:
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
        return native_reference(case.norm, data, mode, dtype=dtype, eps=1e-5, momentum=0.1, **case.options)
    except TorchMissing:
        return None


@dataclass(frozen=True)
class Row:
    norm: str
    mode: str
    case: str
    dtype: str
    backend: str
    errors: dict[str, float | None]

    @property
    def ok(self) -> bool:
        return all(e is None or e <= TOLERANCE[self.dtype][k] for k, e in self.errors.items())


def check(norms: tuple[str, ...] = tuple(BUILTINS), backends: tuple[str, ...] = BACKENDS, progress=None) -> list[Row]:
    """Every combination; ``progress`` (if given) is called with each row as it is done."""
    rows = []
    for norm in norms:
        kernels = {backend: load(norm, backend) for backend in backends}
        for case in cases(norm):
            data = problem(case)
            for mode in MODES:
                reference = run(load(norm, "numpy"), case, data, mode)
                fd = finite_differences(case, data, mode)
                for dtype in DTYPES:
                    torch_out = torch_reference(case, data, mode, dtype)
                    for backend, k in kernels.items():
                        out = run(k, case, data, mode, dtype)
                        errors = {
                            "numpy64": max(relative_error(out[q], reference[q]) for q in out),
                            "fd": max(relative_error(out[f], fd[f]) for f in fd) if dtype == np.float64 else None,
                            "torch": None if torch_out is None else max(relative_error(out[q], torch_out[q]) for q in torch_out),
                        }
                        row = Row(norm, mode, case.label, np.dtype(dtype).name, backend, errors)
                        rows.append(row)
                        if progress:
                            progress(row)
    return rows


def format_row(row: Row) -> str:
    cells = ["-" if row.errors[k] is None else f"{row.errors[k]:.1e}" for k in ("numpy64", "fd", "torch")]
    return (f"{row.norm:<13}{row.mode:<6}{row.case:<26}{row.dtype:<8}{row.backend:<6}"
            + "".join(f"{c:>10}" for c in cells) + ("   ok" if row.ok else "   MISMATCH"))


def header() -> str:
    tolerance = "; ".join(f"{d}: " + ", ".join(f"{k} <= {v:.0e}" for k, v in t.items()) for d, t in TOLERANCE.items())
    return (f"max relative error against: numpy64 (NumPy kernels, float64), fd (central differences of the float64 "
            f"forward; float64 rows), torch (PyTorch autograd, same dtype)\ntolerances: {tolerance}\n"
            f"{'norm':<13}{'mode':<6}{'case':<26}{'dtype':<8}{'backend':<6}{'numpy64':>10}{'fd':>10}{'torch':>10}")
