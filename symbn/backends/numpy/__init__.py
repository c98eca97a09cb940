"""The NumPy backend: a printer, its configuration, and two templates.

``kernels.py.j2`` renders one module per kernel plan, holding only what differs between plans:
the description, the layout's name, the kernel tables (arguments, C parameters) and the
element code, one function per kernel. ``runtime.py.j2`` renders ``_runtime.py`` once: the
validation, the geometry of every layout (:data:`GEOMETRY`), the blocks, the output buffers,
the ctypes binding (from the kernel tables, which come from :mod:`symbn.interface`) and the
``Kernels`` machinery every plan module's class derives from. Both need NumPy only.

Each pass of a kernel is one loop over blocks of about 2^16 elements (the temporaries of a
block stay in cache): per block, the element inputs it reads (x measured from the shift in a
framed pass), the element temporaries, the summands of the reductions (accumulated per group
in float64), the parameter outputs' contributions and the element outputs, written in place.
Inside the loop a per-group value ``c_0`` is read as ``_c_0``: the block's part of it, in the
working precision (x's dtype at order 1, float64 above). Above order 1 an element output whose
dtype is narrower than float64 is computed in a float64 block (``_runtime.scratch``) and stored
into the output once (``_runtime.store``): every partial sum of its terms stays in float64.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import sympy as sp
from sympy.printing.numpy import NumPyPrinter

from ... import interface
from ...lower import ANCHOR, COUNT, MOMENTUM, SHIFT, Assign, Kernel, KernelPlan, X, group_var
from ...program import ELEMENT, GROUP, PARAM, SCALAR
from ...spec import LAYOUTS, SpecError

TEMPLATES = Path(__file__).resolve().parent / "templates"
FILES = {"{name}.py": "kernels.py.j2"}
SHARED = {"_runtime.py": "runtime.py.j2"}
PACKAGE = "package.py.j2"
"""The ``__init__.py`` of ``generated/``: imports every built-in's modules."""
def framed(transforms: tuple[str, ...]) -> bool:
    """Every NumPy plan is framed: the first order's element passes run in the input's precision
    (higher orders compute in float64 from the framed x, which costs nothing)."""
    del transforms
    return True

DEFAULTS = {"eps": "1e-5"}
"""Default values of scalar inputs, as Python source."""

GEOMETRY = {layout.name: layout.geometry for layout in LAYOUTS.values()}
"""Per layout, the body of its geometry function ``(shape, param_shape, normalized_shape,
num_groups) -> Geometry``: x viewed as (outer, q, p, l, s), the shape of one value per group,
and the shape of an element parameter (an element parameter has p·l values, a group
parameter p, running statistics included). Each ``Layout`` owns its body
(:attr:`symbn.spec.Layout.geometry`); only the built-in layouts' bodies exist."""

SIZES = {"outer": "outer", "q_count": "q", "p_count": "p", "l_count": "l", "s_count": "s"}
"""The C interface's size parameters -> the Geometry field each one is."""
assert set(SIZES) == set(interface.SIZES)
CTYPES = {"pointer": "ctypes.c_void_p", "size": "ctypes.c_ssize_t", "real": "ctypes.c_double", "int": "ctypes.c_int"}
"""How Python passes each kind of C parameter (:attr:`symbn.interface.Parameter.ctypes`)."""


class NumPyKernelPrinter(NumPyPrinter):
    """NumPy arrays: the same expressions, element-wise; and (``statements``) as in-place ufunc
    calls, which reuse one buffer per assignment instead of allocating a temporary per operation.

    ``renamed``: symbols printed under another name (inside a block loop, a per-group value is
    read as its block's part, ``_c_0``)."""

    UFUNCS: ClassVar[dict[type, str]] = {sp.Add: "numpy.add", sp.Mul: "numpy.multiply"}
    FUNCTIONS: ClassVar[dict[type, str]] = {sp.exp: "numpy.exp", sp.log: "numpy.log", sp.Abs: "numpy.absolute"}

    def __init__(self, settings=None, renamed: dict[sp.Symbol, str] | None = None):
        super().__init__(settings)
        self.renamed = dict(renamed or {})

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        return self.renamed.get(expr) or super()._print_Symbol(expr)

    def statements(self, expr: sp.Expr, target: str, varying: set[sp.Symbol], new: bool = True,
                   dtype: str | None = None) -> list[str]:
        """Python lines that leave ``expr`` in the array ``target``: a new variable (``new``; its
        first operation allocates it, in ``dtype`` if given) or an existing array (an output block,
        written in place). Only the ``varying`` (element-wise) parts are computed in the buffer;
        per-group parts stay ordinary expressions, which broadcast."""
        spare = (f"{target}_{j}" for j in range(1000))

        def first(call: str, *operands: str) -> str:
            options = ("" if not dtype else f", dtype={dtype}") if new else f", out={target}"
            return f"{target} = {call}({', '.join(operands)}{options})" if new else f"{call}({', '.join(operands)}{options})"

        def again(call: str, *operands: str) -> str:
            return f"{call}({target}, {', '.join(operands)}, out={target})" if operands else f"{call}({target}, out={target})"

        def moving(e: sp.Expr) -> bool:
            return bool(e.free_symbols & varying)

        if not moving(expr) or expr.is_Symbol:
            return [first("numpy.positive", self.doprint(expr))]
        if type(expr) in self.UFUNCS:
            call = self.UFUNCS[type(expr)]
            nested = [a for a in expr.args if moving(a) and not a.is_Symbol]
            symbols = [a for a in expr.args if moving(a) and a.is_Symbol]
            fixed = [a for a in expr.args if not moving(a)]
            plain = [self.doprint(a) for a in symbols] + ([self.doprint(type(expr)(*fixed))] if fixed else [])
            if nested:
                lines = self.statements(nested[0], target, varying, new, dtype)
            else:  # the first operation combines an element-wise symbol with another operand
                lines, plain = [first(call, *plain[:2])], plain[2:]
            for operand in nested[1:]:
                name = next(spare)
                lines += self.statements(operand, name, varying, True, dtype)
                lines.append(again(call, name))
            return lines + [again(call, a) for a in plain]
        if isinstance(expr, sp.Pow) and not moving(expr.exp):
            if expr.exp == 2 and expr.base.is_Symbol:  # one call, not a copy then a product
                return [first("numpy.multiply", *[self.doprint(expr.base)] * 2)]
            lines = self.statements(expr.base, target, varying, new, dtype)
            if expr.exp == 2:
                return lines + [again("numpy.multiply", target)]
            if expr.exp == sp.S.Half:
                return lines + [again("numpy.sqrt")]
            return lines + [again("numpy.power", self.doprint(expr.exp))]
        if type(expr) in self.FUNCTIONS and len(expr.args) == 1:
            return self.statements(expr.args[0], target, varying, new, dtype) + [again(self.FUNCTIONS[type(expr)])]
        return [first("numpy.positive", self.doprint(expr))]


PRINTER = NumPyKernelPrinter


# ----------------------------------------------------------------------------- per plan

def python_name(plan: KernelPlan, kernel: Kernel, name: str) -> str:
    """The Python parameter that carries input ``name``: the running statistics of an eval
    kernel are ``running_<stat>`` (as in forward_train's keywords), everything else its own name."""
    arg = kernel.arg(name)
    if kernel.mode == "eval" and arg.role == PARAM and arg.kind == GROUP and name in plan.stat_names:
        return f"running_{name}"
    return name


def _signature(plan: KernelPlan, kernel: Kernel) -> dict:
    """The Python signature of one kernel's function: arrays in plan order, then the scalars
    (eps=1e-5), then keywords; and the argument tuple it hands the runtime, in plan order."""
    arrays = [python_name(plan, kernel, a.name) for a in kernel.inputs if a.role != SCALAR]
    scalars = [a.name for a in kernel.inputs if a.role == SCALAR]
    missing = [s for s in scalars if s not in DEFAULTS]
    if missing:
        raise SpecError(f"{plan.name}: scalar inputs {missing} have no default in the NumPy backend")
    positional = []
    for name in arrays:
        optional = kernel.name == "forward_train" and name in interface.OPTIONAL
        positional.append(f"{name}=None" if optional else name)
    positional += [f"{s}={DEFAULTS[s]}" for s in scalars]
    keywords = []
    if kernel.name == "forward_train":
        keywords += [f"running_{s}=None" for s in plan.stat_names] + ["momentum=0.1"]
    keywords += ["normalized_shape=None", "num_groups=None", "out=None"]
    call = [python_name(plan, kernel, a.name) for a in kernel.inputs]
    outputs = [a.name for a in kernel.outputs]
    returns = outputs[0] if len(outputs) == 1 else f"({', '.join(outputs)})"
    return {"parameters": [*positional, "*", *keywords], "call": call, "returns": returns,
            "text": f"{kernel.name}({', '.join([*positional, '*', *keywords])}) -> {returns}"}


def _checked(kernel: Kernel) -> list[str]:
    """The element inputs whose NaN or infinity the kernel's own outputs reveal: those a
    parameter output sums, or a reduction that reaches a per-group or parameter output reads.
    The others are checked before the call (one more pass over them)."""
    temporaries = {a.symbol: a.expr for p in kernel.passes for a in p.element}
    definitions = {a.symbol: a.expr for p in kernel.passes for a in p.group}
    definitions.update({a.symbol: a.expr for a in kernel.final})

    def expanded(expr: sp.Expr, table: dict) -> sp.Expr:
        for _ in range(len(table) + 1):
            new = expr.xreplace(table)
            if new == expr:
                break
            expr = new
        return expr

    reached = set().union(*(expanded(a.expr, definitions).free_symbols for a in kernel.final), set())
    read: set[sp.Symbol] = set()
    for p in kernel.passes:
        for a in (*p.params, *(s for s in p.sums if s.symbol in reached)):
            read |= expanded(a.expr, temporaries).free_symbols
    return [a.name for a in kernel.inputs if a.kind == ELEMENT and a.role != PARAM and a.var in read]


def _kernel(plan: KernelPlan, kernel: Kernel) -> dict:
    """Everything the template prints for one kernel: its table and its element code."""
    exact = len(kernel.transforms) > 1  # derivatives beyond the first run in float64 throughout
    group_printer = NumPyKernelPrinter()
    data_inputs = [a for a in kernel.inputs if a.kind == ELEMENT and a.role != PARAM]
    varying_inputs = {a.var for a in kernel.inputs if a.kind == ELEMENT}
    shift_of = group_var(plan.shift) if plan.shift else None
    framed = any(p.framed for p in kernel.passes)
    setup = []
    for a in kernel.inputs:
        if a.role == SCALAR:
            setup.append(f"{a.var} = {a.name}")
        elif a.kind == GROUP:
            function = "group_param" if a.role == PARAM else "group_data"
            setup.append(f"{a.var} = _runtime.{function}({a.name}, geo)")
        elif a.role == PARAM:
            setup.append(f"{a.var} = _runtime.element_param({a.name}, geo, _w)")
        else:
            setup.append(f"_{a.name} = _runtime.view({a.name}, geo)")
    for a in kernel.outputs:
        if a.kind == ELEMENT and a.role != PARAM:
            setup.append(f"_{a.name} = _runtime.view({a.name}, geo)")
    defined = {a.var for a in kernel.inputs if a.kind == GROUP} | {COUNT}
    if kernel.anchored:
        setup.append(f"{ANCHOR} = _runtime.anchor(_x)")
        defined.add(ANCHOR)

    def shift_line() -> str:
        return f"shift = _runtime.rounded({group_printer.doprint(shift_of)}, _w)"

    shift_defined = False
    if framed and shift_of in defined:
        setup.append(shift_line())
        shift_defined = True

    passes = []
    for number, p in enumerate(kernel.passes):
        group_lines = []
        for a in p.group:
            group_lines.append(f"{a.name} = {group_printer.doprint(a.expr)}")
            if framed and not shift_defined and a.symbol == shift_of:
                group_lines.append(shift_line())
                shift_defined = True
        temporaries = {a.symbol for a in p.element}
        varying = varying_inputs | temporaries
        summand_dtype = "numpy.float64" if not kernel.transforms else None  # statistics: summands in float64
        # A pass of the forward's statistics alone sums float64 summands: there x is read as it is
        # (x_v - shift in the expressions), with the per-group values in float64, one operation
        # fewer; where it shares a temporary between sums (x - anchor), x is read in float64.
        raw = summand_dtype is not None and not (p.params or p.stores) and (p.framed or bool(p.element))
        framed_x = p.framed and not raw
        sums_of = [Assign(a.name, a.expr.xreplace({X: X - SHIFT})) for a in p.sums] if raw else list(p.sums)
        everything = [a.expr for a in (*p.element, *sums_of, *p.params, *p.stores)]
        per_group = sorted({v for e in everything for v in e.free_symbols} - varying - {COUNT}, key=str)
        if framed_x:
            per_group = sorted({*per_group, SHIFT}, key=str)
        printer = NumPyKernelPrinter(renamed={v: f"_{v}" for v in per_group})
        reads = {v for e in everything for v in e.free_symbols}
        loads = [f"_{v} = _work[{str(v)!r}][_part]" for v in per_group]
        for a in data_inputs:
            if a.var in reads:
                value = f"_{a.name}[_block]"
                if a.name == "x" and framed_x:
                    value = f"{value} - _shift"
                elif exact or (raw and p.element):
                    value = f"{value}.astype(numpy.float64)"
                loads.append(f"{a.var} = {value}")
        lines = []
        for a in p.element:
            lines += printer.statements(a.expr, a.name, varying)
        sums = []
        whole = not p.framed and not p.element and not p.params and not p.stores and all(
            a.expr in {x.var for x in data_inputs} for a in p.sums)
        for j, a in enumerate(sums_of):
            if whole:
                sums.append({"name": a.name, "lines": [], "summand": f"_{kernel.arg(element_name(a.expr)).name}"})
            elif a.expr.is_Symbol and a.expr in varying:
                sums.append({"name": a.name, "lines": [], "summand": printer.doprint(a.expr)})
            else:
                target = f"_s{j}"
                body = printer.statements(a.expr, target, varying, dtype=summand_dtype)
                summand = target if a.expr.free_symbols & varying else f"numpy.broadcast_to({target}, _x[_block].shape)"
                sums.append({"name": a.name, "lines": body, "summand": summand})
        params = []
        for j, a in enumerate(p.params):
            target = f"_p{j}"
            params.append({"name": a.name, "lines": printer.statements(a.expr, target, varying), "value": target})
        stores = []
        for a in p.stores:
            target = f"{a.name}_v"
            body = printer.statements(a.expr, target, varying, new=False)
            if exact and len(body) > 1:
                # float64 throughout: a float32 output is built in a float64 block and rounded once (in
                # the output itself, every partial sum would be rounded to float32). One ufunc call
                # computes in float64 and rounds once already.
                load, store = f"{target} = _runtime.scratch(_{a.name}, _block, _w)", [f"_runtime.store(_{a.name}, _block, {target})"]
            else:  # the working precision is the output's (order 1), or one call: computed in the output itself
                load, store = f"{target} = _{a.name}[_block]", []
            stores.append({"name": a.name, "load": load, "store": store, "lines": body})
        passes.append({"number": number, "framed": framed_x, "dtype": "numpy.float64" if raw else "_w",
                       "group": group_lines, "whole": whole,
                       "loop": bool(p.sums or p.params or p.stores), "work": [str(v) for v in per_group],
                       "loads": loads, "lines": lines, "sums": sums, "params": params, "stores": stores})
    final = []
    for a in kernel.final:
        out = next((o for o in kernel.outputs if o.name == a.name), None)
        code = group_printer.doprint(a.expr)
        if out is None:
            final.append(f"{a.name} = {code}")
        elif out.role == PARAM:
            if a.expr != 0:
                final.append(f"{a.name} += _runtime.param_total({code}, geo)")
        else:
            final.append(f"{a.name}[...] = _runtime.per_group({code}, geo)[0, :, :, 0, 0]")
    signature = _signature(plan, kernel)
    parameters = interface.parameters(kernel)
    return {
        "name": kernel.name, "mode": kernel.mode, "exact": exact,
        "inputs": tuple((a.name, a.kind, a.role, a.double) for a in kernel.inputs),
        "outputs": tuple((a.name, a.kind, a.role, a.double) for a in kernel.outputs),
        "labels": tuple(signature["call"]), "checked": tuple(_checked(kernel)),
        "arrays": [p.name for p in parameters if p.ctypes == "pointer"],
        "scalars": [p.name for p in parameters if p.ctypes == "real"],
        "parameters": tuple((p.name, p.ctypes) for p in parameters),
        "symbols": {d["numpy"]: interface.function_name(plan.norm.name, kernel, d["suffix"]) for d in interface.DTYPES},
        "signature": signature, "setup": setup, "passes": passes, "final": final,
        "stats": tuple(a.name for a in kernel.outputs if a.kind == GROUP and a.role != PARAM and a.name in plan.stat_names),
        "keyed": tuple(j for j, a in enumerate(kernel.inputs) if a.name == "x" or (a.kind == ELEMENT and a.role == PARAM)),
    }


def element_name(symbol: sp.Symbol) -> str:
    """The input an element variable holds: ``x_v`` -> ``x``."""
    return str(symbol).removesuffix("_v")


def context(plan: KernelPlan) -> dict:
    """What ``kernels.py.j2`` prints for ``plan``."""
    norm = plan.norm
    if GEOMETRY.get(norm.layout.name) != norm.layout.geometry:
        raise SpecError(f"{norm.name}: layout {norm.layout.name!r} has no geometry in the NumPy backend "
                        f"(layouts: {', '.join(GEOMETRY)})")
    printer = NumPyKernelPrinter()
    running = None
    if any(k.name == "forward_train" for k in plan.kernels):
        stats = [group_var(s) for s in plan.stat_names]
        olds = [group_var(f"run_{s}") for s in plan.stat_names]
        running = {"arguments": ["m", "momentum", *map(str, stats), *map(str, olds)],
                   "values": [printer.doprint(a.expr) for a in plan.running]}
        assert all(v in {COUNT, MOMENTUM, *stats, *olds} for a in plan.running for v in a.expr.free_symbols)
    return {
        "norm": norm.name, "name": plan.name, "description": norm.description or norm.name,
        "layout": norm.layout.name, "layout_description": norm.layout.description,
        "stat_names": tuple(plan.stat_names), "unbiased": tuple(norm.unbiased),
        "nonnegative": norm.nonnegative, "transforms": tuple(plan.transforms),
        "shift": plan.shift, "kernels": [_kernel(plan, k) for k in plan.kernels], "running": running,
        "threads_symbol": f"symbn_{plan.name}_set_num_threads",
    }


def shared_context() -> dict:
    """What ``runtime.py.j2`` prints: the tables of the C interface and of the layouts, and what
    the C backend's ``schedule.py.j2`` (included when it exists) needs: its tuning."""
    try:
        from ..c import TUNING as tuning
    except ImportError:
        tuning = {}
    return {"schedules": interface.SCHEDULES, "tuning": tuning, "status": interface.STATUS,
            "optional": {name: interface.DEFAULTS[name] for name in interface.OPTIONAL},
            "geometry": GEOMETRY, "sizes": SIZES, "ctypes": CTYPES}


__all__ = ["FILES", "GEOMETRY", "PACKAGE", "PRINTER", "SHARED", "TEMPLATES", "NumPyKernelPrinter", "context", "framed",
           "shared_context"]
