"""Printers for the paper's notation: plain unicode text and LaTeX.

Both extend SymPy's printers and differ from them only in how symbols, elements, sums and
roots are written; each looks names up in a derivation's notation table (symbol -> Notation,
with ``{i}`` standing for an element's index).
"""
from __future__ import annotations

from collections.abc import Mapping

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.str import StrPrinter

from .spec import Notation


class _PaperOrder:
    """Terms in the paper's order: x_i - μ_B rather than -μ_B + x_i, subtracted terms last."""

    def _as_ordered_terms(self, expr: sp.Expr, order: str | None = None) -> list[sp.Expr]:
        terms = super()._as_ordered_terms(expr, order="rev-lex")
        return sorted(terms, key=lambda term: term.could_extract_minus_sign())


class TextPrinter(_PaperOrder, StrPrinter):
    """Unicode text: μ_B, σ²_B, x̂_i, ∂l/∂x_i, Σ_k, √(…), · for products."""

    printmethod = "_symbn_text"  # not "_sympystr": Indexed would print itself as x[i]

    def __init__(self, notation: Mapping[sp.Basic, Notation], settings: dict | None = None):
        super().__init__(settings)
        self.notation = notation

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        written = self.notation.get(expr)
        return written.text if written else expr.name

    _print_Dummy = _print_Symbol

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        written = self.notation.get(expr.base)
        index = self._print(expr.indices[0])
        return written.text.format(i=index).replace("_{" + index + "}", "_" + index) if written else f"{expr.base}_{index}"

    def _print_Sum(self, expr: sp.Sum) -> str:
        (k, _, _), = expr.limits
        body = self.parenthesize(expr.function, PRECEDENCE["Mul"])
        return f"Σ_{self._print(k)} {body}"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exp = expr.as_base_exp()
        if exp.is_negative:
            return "1/" + self.parenthesize(sp.Pow(base, -exp), PRECEDENCE["Mul"] + 1)
        if exp == sp.S.Half:
            return f"√{self.parenthesize(base, PRECEDENCE['Atom'])}"
        shown = self._print(exp) if exp.is_Integer else f"({self._print(exp)})"
        return f"{self.parenthesize(base, PRECEDENCE['Pow'], strict=True)}^{shown}"

    def _print_Mul(self, expr: sp.Mul) -> str:
        return super()._print_Mul(expr).replace("*", "·")

    def _print_Derivative(self, expr: sp.Derivative) -> str:
        (variable, _), = expr.variable_count
        return f"∂{self._print(expr.expr)}/∂{self._print(variable)}"

    def _print_Equality(self, expr: sp.Eq) -> str:
        return f"{self._print(expr.lhs)} = {self._print(expr.rhs)}"

    def _print_KroneckerDelta(self, expr: sp.KroneckerDelta) -> str:
        return f"δ_{self._print(expr.args[0])}{self._print(expr.args[1])}"


class PaperLatexPrinter(_PaperOrder, LatexPrinter):
    """LaTeX in the paper's notation: \\mu_{\\mathcal{B}}, \\hat{x}_{i}, \\frac{\\partial \\ell}{\\partial x_{i}}."""

    printmethod = "_symbn_latex"

    def __init__(self, notation: Mapping[sp.Basic, Notation], settings: dict | None = None):
        # 1/m Σ x_k and 1/(2(σ²+ε)^{3/2}) Σ ...: the paper's layout, and no fraction nested in another.
        super().__init__({"long_frac_ratio": 0, "fold_frac_powers": True, **(settings or {})})
        self.notation = notation

    def _print_Symbol(self, expr: sp.Symbol, style: str = "plain") -> str:
        written = self.notation.get(expr)
        return written.latex if written else super()._print_Symbol(expr, style)

    def _print_Dummy(self, expr: sp.Dummy) -> str:
        return self._print_Symbol(sp.Symbol(expr.name))

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        written = self.notation.get(expr.base)
        index = self._print(expr.indices[0])
        return written.latex.format(i=index) if written else super()._print_Indexed(expr)

    def _print_Derivative(self, expr: sp.Derivative) -> str:
        (variable, _), = expr.variable_count
        return rf"\frac{{\partial {self._print(expr.expr)}}}{{\partial {self._print(variable)}}}"

    def _print_Sum(self, expr: sp.Sum) -> str:
        (k, lo, hi), = expr.limits
        body = self._print(expr.function)
        if precedence(expr.function) < PRECEDENCE["Mul"]:
            body = rf"\left({body}\right)"
        return rf"\sum_{{{self._print(k)}={self._print(lo)}}}^{{{self._print(hi)}}} {body}"


def text(expr: sp.Basic, notation: Mapping[sp.Basic, Notation]) -> str:
    """``expr`` as unicode text in the paper's notation."""
    return TextPrinter(notation).doprint(expr)


def latex(expr: sp.Basic, notation: Mapping[sp.Basic, Notation]) -> str:
    """``expr`` as LaTeX math in the paper's notation."""
    return PaperLatexPrinter(notation).doprint(expr)
