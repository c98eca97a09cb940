"""Forward definitions as data.

A normalization is a short declarative spec: the statistics it computes (each one a mean,
over the elements of one group, of an expression in ``x`` and the earlier statistics), the
normalized value ``xhat`` as an expression in ``x``, the statistics and ``eps``, and the
affine output ``y = gamma*xhat + beta``. Which elements of a tensor form a group, and along
which axes gamma and beta live, is the spec's :class:`Layout`.

Expressions are strings in a tiny, safe subset of Python (numbers, names, + - * / **, and
the functions in :data:`FUNCTIONS`), parsed without ``eval``. Every name a spec introduces
is checked, because names later become identifiers in generated C and Python.
"""
from __future__ import annotations

import ast
import keyword
import re
from dataclasses import dataclass, field, replace
from typing import Mapping

import sympy as sp

FUNCTIONS = {"sqrt": sp.sqrt, "exp": sp.exp, "log": sp.log, "abs": sp.Abs}
"""Functions a spec expression may call."""

NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_C_KEYWORDS = set(
    "auto break case char const continue default do double else enum extern float for goto "
    "if inline int long register restrict return short signed sizeof static struct switch "
    "typedef union unsigned void volatile while".split()
)
RESERVED = (
    {"x", "y", "xhat", "eps", "gamma", "beta", "m", "i", "k", "dy", "n", "out", "numpy", "np", "math"}
    | set(FUNCTIONS)
    | _C_KEYWORDS
    | set(keyword.kwlist)
)
"""Names a spec may not give to a statistic: the roles, C and Python keywords, functions."""

AFFINE = ("group", "element")


class SpecError(ValueError):
    """A spec that cannot describe a normalization; the message says which part and why."""


@dataclass(frozen=True)
class Layout:
    """How a tensor maps onto groups of elements that share statistics.

    Every layout views x as (outer, Q, P, L, S): a group is one (q, p) pair, its members run
    over (outer, L, S), gamma and beta are indexed by (p, l), running statistics by p. The
    generated kernels use exactly this view (see ``templates/``).
    """

    name: str
    description: str

    def reduce_axes(self, ndim: int, normalized_ndim: int = 1) -> tuple[int, ...]:
        """The axes of an ``ndim``-dimensional x that one group's statistics reduce over
        (for ``groups``: the channel axis within one group of channels, and the spatial axes)."""
        if self.name == "trailing":
            if not 1 <= normalized_ndim <= ndim:
                raise ValueError(f"normalized_shape of {normalized_ndim} dims does not fit x of {ndim} dims")
            return tuple(range(ndim - normalized_ndim, ndim))
        least = 2 if self.name == "channel" else 3
        if ndim < least:
            raise ValueError(f"{self.name} layout needs x of at least {least} dimensions (N, C, ...), got {ndim}")
        first = {"channel": (0,), "instance": (), "groups": (1,)}[self.name]
        return first + tuple(range(2, ndim))

    @property
    def params_per_group(self) -> bool:
        """Whether gamma and beta hold one entry per group's p (L = 1: channel, instance)."""
        return self.name in ("channel", "instance")

    def param_axes(self, ndim: int, normalized_ndim: int = 1) -> tuple[int, ...]:
        """The axes of x along which gamma and beta vary."""
        return self.reduce_axes(ndim, normalized_ndim) if self.name == "trailing" else (1,)


CHANNEL = Layout("channel", "x: (N, C, *spatial); statistics per channel over N and spatial; gamma, beta: (C,)")
INSTANCE = Layout("instance", "x: (N, C, *spatial); statistics per sample and channel over spatial; gamma, beta: (C,)")
GROUPS = Layout("groups", "x: (N, C, *spatial); statistics per sample and group of C/num_groups channels; gamma, beta: (C,)")
TRAILING = Layout("trailing", "x: (*batch, *normalized_shape); statistics per row over the trailing dims; gamma, beta: normalized_shape")
LAYOUTS = {layout.name: layout for layout in (CHANNEL, INSTANCE, GROUPS, TRAILING)}


@dataclass(frozen=True)
class Notation:
    """How a quantity is written: plain text (unicode) and LaTeX.

    ``population_*`` is how a statistic is written in inference mode, where it is a constant
    estimated over the training set (the paper's E[x], Var[x]) instead of a batch statistic.
    """

    text: str
    latex: str
    population_text: str = ""
    population_latex: str = ""


@dataclass(frozen=True)
class Norm:
    """A normalization layer, defined by its forward pass alone.

    stats: ordered (name, expression) pairs; statistic ``name`` is the mean over the group of
        its expression, which may use ``x``, ``eps`` and earlier statistics.
    normalized: xhat as an expression in ``x``, the statistics and ``eps``.
    affine: ``"group"`` when gamma and beta are one value per group (batch norm, as in the
        paper), ``"element"`` when they vary across a group's elements (layer norm).
    """

    name: str
    stats: tuple[tuple[str, str], ...]
    normalized: str
    affine: str
    layout: Layout
    description: str = ""
    notation: Mapping[str, Notation] = field(default_factory=dict)
    unbiased: tuple[str, ...] = ()
    """Statistics whose running estimate uses Bessel's correction m/(m-1), as PyTorch does for the variance."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stats", tuple(tuple(s) for s in dict(self.stats).items()))
        object.__setattr__(self, "unbiased", tuple(self.unbiased))
        _check_name(self.name, "norm name", reserved=False)
        if self.affine not in AFFINE:
            raise SpecError(f"{self.name}: affine must be one of {', '.join(AFFINE)}, got {self.affine!r}")
        if not isinstance(self.layout, Layout):
            raise SpecError(f"{self.name}: layout must be a Layout ({', '.join(LAYOUTS)})")
        if self.affine == "group" and self.layout.name not in ("channel", "instance"):
            raise SpecError(f"{self.name}: with layout {self.layout.name}, gamma varies within a group: use affine='element'")
        if not self.stats:
            raise SpecError(f"{self.name}: a normalization needs at least one statistic")
        known = {"x", "eps"}
        for stat, text in self.stats:
            _check_name(stat, f"{self.name}: statistic name")
            parse(text, known, where=f"{self.name}: statistic {stat}")
            known.add(stat)
        normalized = parse(self.normalized, known, where=f"{self.name}: normalized")
        unknown = set(self.unbiased) - set(self.stat_names)
        if unknown:
            raise SpecError(f"{self.name}: unbiased names unknown statistics {sorted(unknown)}; statistics: {', '.join(self.stat_names)}")
        if sp.Symbol("x") not in normalized.free_symbols:
            raise SpecError(f"{self.name}: normalized must depend on x")

    @property
    def stat_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stats)


def _check_name(name: str, what: str, reserved: bool = True) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise SpecError(f"{what} {name!r} must match {NAME.pattern} (lower case letters, digits, _)")
    if reserved and name in RESERVED:
        raise SpecError(f"{what} {name!r} is reserved; reserved names: {', '.join(sorted(RESERVED))}")


_BINARY = {ast.Add: sp.Add, ast.Sub: lambda a, b: a - b, ast.Mult: sp.Mul, ast.Div: lambda a, b: a / b, ast.Pow: sp.Pow}


def parse(text: str, names: set[str] | Mapping[str, sp.Basic], where: str = "expression") -> sp.Expr:
    """Parse a spec expression into SymPy without ``eval``.

    ``names`` lists the names the expression may use; a mapping gives the object each stands
    for (default: a plain Symbol of that name). Numbers become exact rationals.
    """
    table = names if isinstance(names, Mapping) else {n: sp.Symbol(n) for n in names}
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, TypeError) as err:
        raise SpecError(f"{where}: cannot parse {text!r}: {err}") from None

    def build(node: ast.AST) -> sp.Expr:
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](build(node.left), build(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = build(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return sp.Rational(str(node.value))
        if isinstance(node, ast.Name):
            if node.id not in table:
                raise SpecError(f"{where}: unknown name {node.id!r} in {text!r}; known: {', '.join(sorted(table))}")
            return table[node.id]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id not in FUNCTIONS:
                raise SpecError(f"{where}: unknown function {node.func.id!r}; known: {', '.join(FUNCTIONS)}")
            return FUNCTIONS[node.func.id](*map(build, node.args))
        raise SpecError(f"{where}: {ast.unparse(node)!r} is not allowed in {text!r} (numbers, names, + - * / ** and {', '.join(FUNCTIONS)})")

    return build(tree)


_MOMENTS = {
    "mean": Notation("μ_B", r"\mu_{\mathcal{B}}", "E[x]", r"\mathrm{E}[x]"),
    "var": Notation("σ²_B", r"\sigma^{2}_{\mathcal{B}}", "Var[x]", r"\mathrm{Var}[x]"),
}

BATCHNORM = Norm(
    name="batchnorm",
    stats={"mean": "x", "var": "(x - mean)**2"},
    normalized="(x - mean) / sqrt(var + eps)",
    affine="group",
    layout=CHANNEL,
    description="Batch normalization (Ioffe & Szegedy 2015): each channel over the mini-batch",
    notation=_MOMENTS,
    unbiased=("var",),
)

LAYERNORM = replace(
    BATCHNORM,  # the same statistics; only which elements share them, and the parameters' axes, differ
    name="layernorm",
    affine="element",
    layout=TRAILING,
    description="Layer normalization (Ba et al. 2016): each sample over its features",
)

RMSNORM = Norm(
    name="rmsnorm",
    stats={"ms": "x**2"},
    normalized="x / sqrt(ms + eps)",
    affine="element",
    layout=TRAILING,
    description="RMS normalization (Zhang & Sennrich 2019): no mean, scaled by the root mean square",
    notation={"ms": Notation("ν_B", r"\nu_{\mathcal{B}}", "E[x²]", r"\mathrm{E}[x^{2}]")},
)

INSTANCENORM = replace(
    BATCHNORM,
    name="instancenorm",
    layout=INSTANCE,
    description="Instance normalization (Ulyanov et al. 2016): each sample and channel over its spatial positions",
)

GROUPNORM = replace(
    BATCHNORM,
    name="groupnorm",
    affine="element",  # gamma is per channel, and a group holds several channels
    layout=GROUPS,
    description="Group normalization (Wu & He 2018): each sample over groups of channels and their spatial positions",
)

BUILTINS: dict[str, Norm] = {norm.name: norm for norm in (BATCHNORM, LAYERNORM, RMSNORM, INSTANCENORM, GROUPNORM)}


def resolve(norm: str | Norm) -> Norm:
    """A built-in norm by name, or the spec itself; an unknown name raises :class:`SpecError` naming the choices."""
    if isinstance(norm, Norm):
        return norm
    if norm in BUILTINS:
        return BUILTINS[norm]
    raise SpecError(f"unknown norm {norm!r}; choose from: {', '.join(BUILTINS)}")
