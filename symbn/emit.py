"""Emission: kernel plans printed by SymPy's code printers into the templates.

Each backend is a printer plus a folder of templates (SymForce's layout): the plan knows no
language, the templates know no math. ``python -m symbn generate`` writes ``generated/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import sympy as sp
from sympy.printing.c import C99CodePrinter
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import PRECEDENCE

from . import __version__
from .jinja import environment, resource_dir
from .lower_old import DY, XHAT, Assign, KernelPlan, Pass, X, plan
from .spec import BUILTINS, Norm, resolve


class CKernelPrinter(C99CodePrinter):
    """C99 in double precision: small integer powers as products, square roots as sqrt."""

    def _print_Pow(self, expr: sp.Pow) -> str:
        base, exp = expr.base, expr.exp
        if exp.is_Integer and 1 <= abs(exp) <= 4:
            product = "*".join([self.parenthesize(base, PRECEDENCE["Mul"], strict=True)] * abs(int(exp)))
            if abs(exp) > 1:
                product = f"({product})"  # a power is one operand: m/(m*m), never m/m*m
            return product if exp > 0 else f"1.0/{product}"
        if exp == sp.S.Half:
            return f"sqrt({self._print(base)})"
        if exp == -sp.S.Half:
            return f"1.0/sqrt({self._print(base)})"
        return super()._print_Pow(expr)


class NumPyKernelPrinter(NumPyPrinter):
    """NumPy arrays: the same expressions, element-wise; and (``statements``) as in-place ufunc
    calls, which reuse one buffer per assignment instead of allocating a temporary per operation."""

    UFUNCS: ClassVar[dict[type, str]] = {sp.Add: "numpy.add", sp.Mul: "numpy.multiply"}
    FUNCTIONS: ClassVar[dict[type, str]] = {sp.exp: "numpy.exp", sp.log: "numpy.log", sp.Abs: "numpy.absolute"}

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
            lines = self.statements(expr.base, target, varying, new, dtype)
            if expr.exp == 2:
                return lines + [again("numpy.multiply", target)]
            if expr.exp == sp.S.Half:
                return lines + [again("numpy.sqrt")]
            return lines + [again("numpy.power", self.doprint(expr.exp))]
        if type(expr) in self.FUNCTIONS and len(expr.args) == 1:
            return self.statements(expr.args[0], target, varying, new, dtype) + [again(self.FUNCTIONS[type(expr)])]
        return [first("numpy.positive", self.doprint(expr))]


@dataclass(frozen=True)
class Backend:
    printer: type
    templates: dict[str, str]  # output file name (with {norm}) -> template
    frame: bool                # element passes in the input's precision: see lower.plan


BACKENDS = {
    "numpy": Backend(NumPyKernelPrinter, {"{norm}.py": "numpy/kernels.py.j2"}, frame=True),
    "c": Backend(CKernelPrinter, {"{norm}.c": "c/kernels.c.j2", "{norm}.h": "c/kernels.h.j2"}, frame=False),
}
DTYPES = ({"c": "float", "suffix": "f32", "numpy": "float32"}, {"c": "double", "suffix": "f64", "numpy": "float64"})


def _printed(p: KernelPlan, printer) -> dict:
    """Every expression of the plan as code, ready for the templates."""
    def code(a: Assign) -> dict:
        return {"name": a.name, "code": printer.doprint(a.expr)}

    statements = getattr(printer, "statements", None)  # in-place code, where the backend has it
    blocks = {X, DY, XHAT}  # what has an element's shape; the rest broadcasts per group

    def uses(assigns: tuple[Assign, ...], moving: set[sp.Symbol]) -> list[str]:
        """The per-group names that ``assigns`` read (the template loads just those)."""
        return sorted({str(v) for a in assigns for v in a.expr.free_symbols - moving})

    def step(s: Pass) -> dict:
        moving = blocks | {a.symbol for a in s.element}
        return {"group": [code(a) for a in s.group], "uses": uses(s.element, moving),
                "element": [{**code(a), **({"lines": statements(a.expr, a.name, moving),
                                            "into": statements(a.expr, a.name, moving, new=False)} if statements else {})}
                            for a in s.element]}

    def summed(a: Assign, dtype: str | None) -> dict:
        """A statistic's or a reduction's summand: the lines computing it into ``summand``, or
        none where it is an element-wise symbol itself (summed as it is)."""
        bare = a.expr.is_Symbol or not statements
        return {**code(a), "lines": [] if bare else statements(a.expr, "summand", blocks, dtype=dtype),
                "summand": printer.doprint(a.expr) if bare else "summand"}

    norm = p.norm
    return {
        "norm": norm.name, "NAME": norm.name.upper(), "description": norm.description or norm.name,
        "layout": norm.layout.name, "layout_description": norm.layout.description,
        "element_affine": p.element_affine, "stat_names": tuple(p.stat_names), "saved_names": tuple(p.saved_names),
        "unbiased": tuple(norm.unbiased),
        "running_args": [f"running_{s}" for s in p.stat_names],
        "running_kwargs": [f"running_{s}=None" for s in p.stat_names],
        "running_locals": [f"run_{s}" for s in p.stat_names],
        "stats": [summed(a, "numpy.float64") for a in p.stats], "saved": [code(a) for a in p.saved],
        "reductions": [summed(a, None) for a in p.reductions], "running": [code(a) for a in p.running],
        "reduction_uses": uses(p.reductions, blocks),
        "xhat": step(p.xhat), "y": step(p.y), "dx": step(p.dx), "y_eval": step(p.y_eval), "dx_eval": step(p.dx_eval),
        **{name: printer.doprint(getattr(p, name)) for name in ("dgamma", "dbeta", "dgamma_eval", "dbeta_eval")},
        "dtypes": DTYPES, "shift": p.shift,
        "param_sums": p.param_sums,
    }


def header(template: str, norm: str) -> str:
    """The first line of a generated file, as plain text: the templates print it through their
    comment filter (``# {{ header|pycomment }}``, ``/* {{ header|ccomment }} */``), which escapes
    whatever it holds; ``norm`` is a validated name, or a phrase of the caller's."""
    return (f"Generated by symbn {__version__} from templates/{template} for {norm}. Do not edit: "
            "run `python -m symbn generate`.")


def sources(norm: str | Norm, backends: tuple[str, ...] = tuple(BACKENDS)) -> dict[str, str]:
    """File name -> source text of every kernel file for ``norm``."""
    norm = resolve(norm)
    env = environment("code")
    out = {}
    for name in backends:
        backend = BACKENDS[name]
        context = _printed(plan(norm, backend.frame), backend.printer())
        for filename, template in backend.templates.items():
            out[filename.format(norm=norm.name)] = env.get_template(template).render(header=header(template, norm.name), **context)
    return out


def generate(directory: Path | None = None, norms: tuple[str, ...] = tuple(BUILTINS)) -> list[Path]:
    """Write the kernels of ``norms`` (and the package's ``__init__.py``) into ``directory``."""
    directory = Path(directory) if directory is not None else resource_dir("generated")
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: text for norm in norms for name, text in sources(norm).items()}
    files["__init__.py"] = environment("code").get_template("numpy/package.py.j2").render(
        header=header("numpy/package.py.j2", "every built-in norm"), norms=list(norms))
    written = []
    for name, text in sorted(files.items()):
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
