"""The C interface of the kernels, as one table.

The C header, the C definitions and the Python bindings (ctypes argument types, the order in
which arrays are passed) are all generated from :func:`parameters` and :data:`STATUS`, so that
the interface is stated once.

Conventions, for a kernel over an element type T (float or double):
* arrays the user gives or gets back in x's dtype: element data (x, dy...) and params
  (γ, β, their cotangents...) are ``T *``; the running statistics (non-differentiable params)
  and per-group data (saved statistics) are ``double *``; param outputs (dγ...) are ``double *``
  accumulated into (``+=``), zeroed by the caller; element outputs are ``T *``;
* then the view's sizes (outer, q_count, p_count, l_count, s_count), then the scalars (ε),
  then ``int schedule``: the loop shape (:data:`SCHEDULES`; 0 lets the C choose, by the rule
  :func:`symbn.backends.c.choose_schedule` states; the results do not depend on it);
* the inputs named in :data:`OPTIONAL` may be NULL (:data:`DEFAULTS`), and so may the param
  outputs (not computed); every other pointer is required (SYMBN_ENULL).
"""
from __future__ import annotations

from dataclasses import dataclass

from .lower import Arg, Kernel
from .program import PARAM, SCALAR

SIZES = ("outer", "q_count", "p_count", "l_count", "s_count")
"""x viewed as (outer, q, p, l, s): a group is one (q, p); its members run over (outer, l, s)."""

STATUS = {"SYMBN_OK": 0, "SYMBN_ENULL": 1, "SYMBN_ESIZE": 2, "SYMBN_ENOMEM": 3, "SYMBN_ENONFINITE": 4}
"""Every C function returns one of these: ENULL (a required pointer is NULL), ESIZE (a size is
not positive, or their product overflows), ENOMEM, ENONFINITE (an input held NaN or infinity,
or a sum overflowed; the outputs are written but meaningless)."""

OPTIONAL = ("gamma", "beta")
"""Inputs that may be NULL (None in Python): the forward's γ and β, as 1 and 0."""
DEFAULTS = {"gamma": 1.0, "beta": 0.0}
"""The value an OPTIONAL input takes where its pointer is NULL."""

SCHEDULES = {"SYMBN_SCHEDULE_AUTO": 0, "SYMBN_SCHEDULE_GROUPS": 1, "SYMBN_SCHEDULE_LANES": 2, "SYMBN_SCHEDULE_ROWS": 3}
"""The trailing ``schedule`` argument of every kernel: AUTO (the C chooses per problem shape and
thread count); GROUPS (a thread takes whole groups, every pass over one back to back); LANES (x
viewed with l_count * s_count == 1 only: blocks of 16 channels, the sums in registers; elsewhere
it means AUTO); ROWS (rows streamed across threads, partial sums per thread). Any other value
means AUTO. Every shape gives the same results up to rounding; the choice is about speed only."""


@dataclass(frozen=True)
class Parameter:
    """One C parameter of a kernel function."""

    name: str            # the C parameter's name: the program's name for the array, or a size
    c_type: str          # with "{T}" for the element type: "const {T} *", "double *", "ptrdiff_t", "double"
    ctypes: str          # how Python passes it: "pointer", "size", "real" or "int" (the schedule)
    arg: Arg | None      # the kernel argument it carries (None for a size or the schedule)
    optional: bool = False  # a pointer that may be NULL: an OPTIONAL input, or a param output (not computed)

    @property
    def typed(self) -> str:
        """``c_type`` with T left as a template field, and the name: ``const {T} *x``."""
        return f"{self.c_type}{'' if self.c_type.endswith('*') else ' '}{self.name}"


def parameters(kernel: Kernel) -> tuple[Parameter, ...]:
    """The C parameters of ``kernel``'s function, in order: input arrays, output arrays, sizes,
    scalars, the schedule."""
    def pointer(arg: Arg, output: bool) -> Parameter:
        element = "double" if arg.double else "{T}"
        optional = arg.role == PARAM if output else arg.name in OPTIONAL
        return Parameter(arg.name, f"{'' if output else 'const '}{element} *", "pointer", arg, optional)

    arrays = [pointer(a, False) for a in kernel.inputs if a.role != SCALAR]
    arrays += [pointer(a, True) for a in kernel.outputs]
    sizes = [Parameter(name, "ptrdiff_t", "size", None) for name in SIZES]
    scalars = [Parameter(a.name, "double", "real", a) for a in kernel.inputs if a.role == SCALAR]
    return (*arrays, *sizes, *scalars, Parameter("schedule", "int", "int", None))


def function_name(norm: str, kernel: Kernel, suffix: str) -> str:
    """``symbn_<norm>_<kernel>_<f32|f64>``."""
    return f"symbn_{norm}_{kernel.name}_{suffix}"


DTYPES = ({"c": "float", "suffix": "f32", "numpy": "float32"}, {"c": "double", "suffix": "f64", "numpy": "float64"})
"""The element types every kernel is generated for."""
