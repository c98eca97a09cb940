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
import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import sympy as sp

from .errors import SpecError

FUNCTIONS = {"sqrt": sp.sqrt, "exp": sp.exp, "log": sp.log, "abs": sp.Abs}
"""Functions a spec expression may call; each takes exactly one argument."""

NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")
"""What every name in a spec must be, matched whole (``re.fullmatch``: no trailing newline)."""

MAX_TEXT = 500
"""Characters at most in a description (of a norm or a layout)."""
MAX_EXPRESSION = 1000
"""Characters at most in one expression."""
MAX_DEPTH = 30
"""Nesting depth at most of an expression's syntax tree."""
MAX_LITERAL = 10**6
"""Largest absolute value of a number written in an expression."""
MAX_EXPONENT = 16
"""Largest absolute value of a constant exponent; powers nested in one another multiply their
exponents (``(x**4)**8`` is a 32nd power), and the product is held to this limit too."""

_C_KEYWORDS = frozenset(
    "auto break case char const continue default do double else enum extern float for goto "
    "if inline int long register restrict return short signed sizeof static struct switch "
    "typedef union unsigned void volatile while _Bool _Complex _Imaginary".split()
)
_ROLES = frozenset("x y xhat eps epsilon gamma beta m i k n dy dx dxhat dgamma dbeta out invstd".split())
"""The quantities of every derivation and plan (``epsilon``: eps's symbol; ``invstd``: the saved inverse scale)."""
_KERNEL_NAMES = frozenset("""
    a address ahead args argtypes array arrays at axis b backward_eval backward_train base batch
    batch_statistics beta_v block blocks c checked coef contribution copy default define defined
    dtype dx_v dx_v_0 dxv dy_v dyv endif finite finite_sums forward_eval forward_train function
    functions g gamma_v geo geometry grads group groups h idx ifdef ifndef in_blocks include inputs
    j keepdims kind l l_count lib library like lp ls mine mine_params momentum n_partial n_pgrad name
    names nonfinite normalized normalized_shape num_groups num_threads outer output outv p p0 p_count
    param_shape parallel part partial pgrad pidx pl positive prepare ptr ptrdiff_t q q_count r real
    requested_threads row running s s_count saved schedule self set_threads shape shift signatures
    simd size size_t spatial start stats status step suffix summand sums t team team_size text
    thread_id threads total totals u units updatable update_running v value values width work
    writable x_v xhat_v xv y_v yv acc always_inline call columns count cs extra first g0 gs gstride gv
    keyed anchor anchor_g fv ftable u0 u1 n0 n1
    in_memory labels last limit mode ns outputs param parameters params ps red reduced rows single ss
    staticmethod strand symbols table flagged flags
    facc fl fl_params flushed fmine fparam fpgrad fstrand fsum since stretch wide
""".split())
"""Every identifier the generated Python and C use (arguments, locals, functions, keyword
arguments; tests/test_security.py checks the list against ``generated/``). A statistic's name
reaches the kernels bare as a saved quantity's argument and local, and in ``running_<name>``."""
_PYTHON_NAMES = frozenset(
    "all any bool dict float getattr int isinstance len max min range slice str sum tuple type zip "
    "abs print open eval exec compile globals locals vars object super property iter next map filter "
    "numpy np ctypes collections namedtuple math isfinite prod numbers Real".split()
)
"""The Python builtins and the imports of the generated module (and a few builtins a rewrite may use)."""
_C_LIBRARY = frozenset(
    "sqrt exp log fabs pow abs isfinite isnan isinf fmax fmin malloc calloc realloc free memset memcpy "
    "omp errno assert math_errhandling fpclassify isnormal signbit isgreater isgreaterequal isless "
    "islessequal islessgreater isunordered".split()
)
"""C library functions and macros the kernels call, or could, from a printed expression (with
<math.h>'s lower-case macros: a statistic of such a name would be replaced by the preprocessor)."""

RESERVED = frozenset(_ROLES | _KERNEL_NAMES | _PYTHON_NAMES | _C_LIBRARY | set(FUNCTIONS) | _C_KEYWORDS | set(keyword.kwlist))
"""Names a spec may not give to a statistic: the roles, every identifier of the generated code,
the Python builtins and modules it uses, C library names, the functions, C and Python keywords."""
RESERVED_PREFIXES = ("stat_", "run_", "running_", "saved_", "red_", "c_", "t_", "strand_", "acc_", "pacc_",
                     "symbn_", "omp_", "invstd")
"""Prefixes of the kernels' own families of names (``stat_<name>``, ``t_y_v_0``, ``invstd0``...)."""
_ADJOINT_OF = ("x", "xhat", "y", "gamma", "beta", "eps", "dy")
"""A statistic may not be called ``d`` + one of these, or ``d`` + another statistic's name: the
derivation names the adjoint of ``q`` ``dq``."""

C_HEADERS = frozenset(
    "assert complex ctype errno fenv float inttypes iso646 limits locale math setjmp signal stdalign "
    "stdarg stdatomic stdbool stddef stdint stdio stdlib stdnoreturn string tgmath threads time uchar "
    "wchar wctype omp unistd pthread alloca malloc".split()
)
"""The C (and OpenMP, POSIX) headers a norm's files ``<norm>.c``, ``<norm>.h`` could shadow
(``#include "<norm>.h"``): refused as norm names."""
PYTHON_MODULES = frozenset("numpy ctypes collections math numbers symbn generated".split())
"""The modules the generated package imports, and its own: refused as norm names."""
NORM_PREFIXES = ("omp", "symbn")
"""Prefixes a norm name may not have: OpenMP's names and symbn's own C symbols."""

AFFINE = ("group", "element")


def _pairs(norm: str, stats) -> tuple[tuple[str, str], ...]:
    """A spec's statistics, given as a mapping or as (name, expression) pairs, as pairs; a name
    given twice is refused (``dict`` would silently keep the last)."""
    if isinstance(stats, Mapping):
        stats = list(stats.items())
    elif isinstance(stats, (str, bytes)) or not hasattr(stats, "__iter__"):
        raise SpecError(f"{norm}: stats must be a mapping or (name, expression) pairs, got {stats!r}")
    pairs, seen = [], set()
    for pair in stats:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise SpecError(f"{norm}: stats must be (name, expression) pairs, got {pair!r}")
        name, text = pair
        _check_name(name, f"{norm}: statistic name")
        if name in seen:
            raise SpecError(f"{norm}: statistic {name!r} is defined twice: each statistic needs its own name")
        seen.add(name)
        pairs.append((name, text))
    return tuple(pairs)


def reserved_reason(name: str) -> str | None:
    """Why ``name`` may not name a statistic (a reserved name or prefix, ``d`` and a digit), or None."""
    if name in RESERVED:
        return ("is reserved: statistics may not take the name of a role (x, xhat, y, gamma, beta, eps, dy, dx, ...), "
                "an identifier of the generated code, a Python builtin or module it uses, a C library name, a function or a keyword")
    prefix = next((p for p in RESERVED_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        return f"is reserved: it starts with {prefix!r}, a prefix of the generated code's own names ({', '.join(RESERVED_PREFIXES)})"
    if re.fullmatch(r"d[0-9].*", name):
        return "is reserved: d followed by a digit is the form of adjoint names"
    if re.fullmatch(r"t[0-9].*", name):
        return "is reserved: t followed by a digit is the form of tangent names and the kernels' temporaries"
    if re.search(r"_[gv]\Z", name):
        return "is reserved: the kernels name a quantity's per-group and per-element values <name>_g and <name>_v"
    if re.match(r"(forward|backward|vjp|jvp)", name):
        return "is reserved: kernels are named forward_*, backward*_*, vjp_*, jvp_*"
    return None


def _check_name(name: str, what: str, reserved: bool = True) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SpecError(f"{what} {name!r} must match {NAME.pattern} whole (lower case letters, digits, _; at most 31)")
    if keyword.iskeyword(name) or name in _C_KEYWORDS:
        raise SpecError(f"{what} {name!r} is reserved: a Python or C keyword")
    reason = reserved_reason(name) if reserved else None
    if reason:
        raise SpecError(f"{what} {name!r} {reason}; the full list: symbn.spec.RESERVED, RESERVED_PREFIXES")


def _check_norm_name(name: str) -> None:
    """A norm's name becomes file names (``<norm>.py``, ``<norm>.c``, ``<norm>.h``), a module of
    the generated package and a part of C symbols (``symbn_<norm>_...``)."""
    _check_name(name, "norm name", reserved=False)
    if name in C_HEADERS or name in PYTHON_MODULES or name.startswith(NORM_PREFIXES):
        raise SpecError(f"norm name {name!r} would shadow a header or module: a norm may not be named like a C header "
                        f"({', '.join(sorted(C_HEADERS))}), a module the generated package imports "
                        f"({', '.join(sorted(PYTHON_MODULES))}), or start with {' or '.join(NORM_PREFIXES)}")


def _check_text(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise SpecError(f"{what} must be a str, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise SpecError(f"{what} has {len(text)} characters; at most {MAX_TEXT}")


_GEOMETRY = {
    "channel": (
        "if len(shape) < 2:",
        "    raise ValueError(f\"x must have shape (N, C, *spatial), got {tuple(shape)}\")",
        "n, c, spatial = shape[0], shape[1], prod(shape[2:])",
        "return Geometry(n, 1, c, 1, spatial, (c,), (c,))",
    ),
    "instance": (
        "if len(shape) < 3:",
        "    raise ValueError(f\"x must have shape (N, C, L, *spatial), got {tuple(shape)}\")",
        "n, c, spatial = shape[0], shape[1], prod(shape[2:])",
        "return Geometry(1, n, c, 1, spatial, (n, c), (c,))",
    ),
    "groups": (
        "if len(shape) < 2:",
        "    raise ValueError(f\"x must have shape (N, C, *spatial), got {tuple(shape)}\")",
        "n, c, spatial = shape[0], shape[1], prod(shape[2:])",
        "if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 or c % num_groups:",
        "    raise ValueError(f\"num_groups must be a positive integer dividing C = {c}, got {num_groups!r}\")",
        "return Geometry(1, n, num_groups, c // num_groups, spatial, (n, num_groups), (c,))",
    ),
    "trailing": (
        "if normalized_shape is not None:",
        "    normalized = dims(\"normalized_shape\", normalized_shape)",
        "elif param_shape is not None:",
        "    normalized = tuple(param_shape)",
        "else:",
        "    normalized = tuple(shape[-1:])",
        "if not normalized or len(normalized) > len(shape) or tuple(shape[len(shape) - len(normalized):]) != normalized:",
        "    raise ValueError(f\"normalized_shape {normalized} must match the trailing dims of x {tuple(shape)}\")",
        "batch = tuple(shape[:len(shape) - len(normalized)])",
        "return Geometry(1, prod(batch), 1, prod(normalized), 1, batch, normalized)",
    ),
}
"""The only geometry code there is: per built-in layout, the body of its geometry function.
It is Python source that reaches the generated runtime, so it is written here and nowhere
else; a :class:`Layout` may only carry one of these bodies, never text of its own."""

Shape = tuple[int, ...]
Options = tuple[tuple[str, object], ...]
"""A layout's options (``num_groups``, ``normalized_shape``) as (name, value) pairs:
a tuple, so that a Layout stays hashable; ``dict(options)`` gives the keyword arguments."""


@dataclass(frozen=True)
class Layout:
    """How a tensor maps onto groups of elements that share statistics.

    Every layout views x as (outer, Q, P, L, S): a group is one (q, p) pair, its members run
    over (outer, L, S), gamma and beta are indexed by (p, l), running statistics by p. The
    generated kernels use exactly this view (see ``templates/``).

    geometry: the body of ``geometry(shape, param_shape, normalized_shape, num_groups) ->
        Geometry(outer, q, p, l, s, group_shape, param_shape)`` in the generated runtime
        (standalone Python: it may use ``prod``, ``dims`` and ``Geometry`` and raises ValueError
        for a shape the layout cannot take). It is code that reaches generated files, so it
        must be one of the built-in layouts' bodies (:data:`_GEOMETRY`): left empty, it is the
        built-in of the same name's; anything else is refused. A layout named like a built-in
        must carry that built-in's geometry (the generated modules find it by name).
    examples: small test problems, (shape, options) pairs (``check`` runs each).
    one_group: (shape, options) of x forming a single group, with ``-1`` standing for the
        group's size m (see :meth:`single_group`).
    demo: (shape, options) of a moderate x, for demonstrations (explain's bias-drift run).
    statistics: what the statistics are computed per, in words ("per channel over the batch").
    group_noun: what one group is, in words ("batch", "row").
    running: whether PyTorch's norms in this layout keep running statistics (batch norm,
        instance norm with ``track_running_stats``): only they have an inference mode with
        constant statistics.

    Fields left empty (and ``running`` left None) are those of the built-in layout whose
    geometry this one carries.
    """

    name: str
    description: str
    geometry: tuple[str, ...] = ()
    examples: tuple[tuple[Shape, Options], ...] = ()
    one_group: tuple[Shape, Options] = ()
    demo: tuple[Shape, Options] = ()
    statistics: str = ""
    group_noun: str = ""
    running: bool | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "layout name", reserved=False)
        _check_text(self.description, f"layout {self.name}: description")
        geometry = self.geometry
        if isinstance(geometry, list):
            geometry = tuple(geometry)
        if not geometry and self.name in _GEOMETRY:
            geometry = _GEOMETRY[self.name]
        if geometry not in _GEOMETRY.values():
            raise SpecError(f"layout {self.name}: the geometry must be one of the built-in layouts' "
                            f"({', '.join(_GEOMETRY)}), e.g. geometry=CHANNEL.geometry: it is code that reaches "
                            "the generated files, so a spec cannot bring its own")
        if self.name in _GEOMETRY and geometry != _GEOMETRY[self.name]:
            raise SpecError(f"layout {self.name}: a layout named like the built-in {self.name} must have its geometry")
        # the built-in tuple itself, never the caller's object (whatever its type compares like)
        object.__setattr__(self, "geometry", next(body for body in _GEOMETRY.values() if body == geometry))
        builtin = globals().get("LAYOUTS", {}).get(self.kind)
        for name in ("examples", "one_group", "demo", "statistics", "group_noun"):
            if not getattr(self, name) and builtin is not None:
                object.__setattr__(self, name, getattr(builtin, name))
        if self.running is None and builtin is not None:
            object.__setattr__(self, "running", builtin.running)
        for name in ("statistics", "group_noun"):
            _check_text(getattr(self, name), f"layout {self.name}: {name}")

    @property
    def kind(self) -> str:
        """The built-in layout whose geometry this one carries."""
        return next(name for name, body in _GEOMETRY.items() if body == self.geometry)

    def single_group(self, m: int) -> tuple[Shape, dict]:
        """x's shape and the layout options for a single group of m elements."""
        shape, options = self.one_group
        return tuple(m if d == -1 else d for d in shape), dict(options)

    def reduce_axes(self, ndim: int, normalized_ndim: int = 1) -> tuple[int, ...]:
        """The axes of an ``ndim``-dimensional x that one group's statistics reduce over
        (for ``groups``: the channel axis within one group of channels, and the spatial axes)."""
        if self.kind == "trailing":
            if not 1 <= normalized_ndim <= ndim:
                raise ValueError(f"normalized_shape of {normalized_ndim} dims does not fit x of {ndim} dims")
            return tuple(range(ndim - normalized_ndim, ndim))
        least = 2 if self.kind == "channel" else 3
        if ndim < least:
            raise ValueError(f"{self.name} layout needs x of at least {least} dimensions (N, C, ...), got {ndim}")
        first = {"channel": (0,), "instance": (), "groups": (1,)}[self.kind]
        return first + tuple(range(2, ndim))

    @property
    def params_per_group(self) -> bool:
        """Whether gamma and beta hold one entry per group's p (L = 1: channel, instance)."""
        return self.kind in ("channel", "instance")

    def param_axes(self, ndim: int, normalized_ndim: int = 1) -> tuple[int, ...]:
        """The axes of x along which gamma and beta vary."""
        return self.reduce_axes(ndim, normalized_ndim) if self.kind == "trailing" else (1,)


CHANNEL = Layout(
    "channel", "x: (N, C, *spatial); statistics per channel over N and spatial; gamma, beta: (C,)",
    geometry=_GEOMETRY["channel"], examples=(((6, 3), ()), ((2, 3, 2, 3), ())), one_group=((-1, 1), ()),
    demo=((64, 8), ()), statistics="per channel over the batch", group_noun="batch", running=True)
INSTANCE = Layout(
    "instance", "x: (N, C, *spatial); statistics per sample and channel over spatial; gamma, beta: (C,)",
    geometry=_GEOMETRY["instance"], examples=(((2, 3, 5), ()), ((2, 3, 2, 3), ())), one_group=((1, 1, -1), ()),
    demo=((1, 8, 32), ()), statistics="per sample and channel", group_noun="sample's channel", running=True)
GROUPS = Layout(
    "groups", "x: (N, C, *spatial); statistics per sample and group of C/num_groups channels; gamma, beta: (C,)",
    geometry=_GEOMETRY["groups"],
    examples=(((2, 6, 4), (("num_groups", 3),)), ((2, 4, 2, 2), (("num_groups", 2),))),
    one_group=((1, -1, 1), (("num_groups", 1),)), demo=((1, 8, 16), (("num_groups", 4),)),
    statistics="per sample and group", group_noun="sample's group", running=False)
TRAILING = Layout(
    "trailing", "x: (*batch, *normalized_shape); statistics per row over the trailing dims; gamma, beta: normalized_shape",
    geometry=_GEOMETRY["trailing"],
    examples=(((4, 6), (("normalized_shape", (6,)),)), ((3, 2, 5), (("normalized_shape", (2, 5)),))),
    one_group=((1, -1), ()), demo=((1, 64), ()),
    statistics="per row (one sample, over the normalized dimensions)", group_noun="row", running=False)
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
        _check_norm_name(self.name)
        object.__setattr__(self, "stats", _pairs(self.name, self.stats))
        if isinstance(self.unbiased, str) or not all(isinstance(u, str) for u in self.unbiased):
            raise SpecError(f"{self.name}: unbiased must be a sequence of statistic names, got {self.unbiased!r}")
        object.__setattr__(self, "unbiased", tuple(self.unbiased))
        _check_text(self.description, f"{self.name}: description")
        if self.affine not in AFFINE:
            raise SpecError(f"{self.name}: affine must be one of {', '.join(AFFINE)}, got {self.affine!r}")
        if not isinstance(self.layout, Layout):
            raise SpecError(f"{self.name}: layout must be a Layout ({', '.join(LAYOUTS)})")
        if self.affine == "group" and not self.layout.params_per_group:
            raise SpecError(f"{self.name}: with layout {self.layout.name}, gamma varies within a group: use affine='element'")
        if not self.stats:
            raise SpecError(f"{self.name}: a normalization needs at least one statistic")
        names = [stat for stat, _ in self.stats]
        known = {"x", "eps"}
        for stat, text in self.stats:
            _check_name(stat, f"{self.name}: statistic name")
            adjoint_of = next((q for q in (*_ADJOINT_OF, *names) if stat == "d" + q), None)
            if adjoint_of is not None:
                raise SpecError(f"{self.name}: statistic name {stat!r} is reserved: the derivation calls the adjoint "
                                f"of {adjoint_of} d{adjoint_of} (no statistic may be named d + x, xhat, y, gamma, beta, "
                                "eps, dy or another statistic)")
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

    @property
    def nonnegative(self) -> dict[str, str]:
        """Statistic -> its expression, for the statistics that cannot be negative: means of an
        expression SymPy finds non-negative for every real x, eps > 0 and earlier statistics (those
        found non-negative taken so): a variance, a mean square, a mean |x - mean|. A negative value
        given for one (saved or running) is an error upstream, and would make NaN of a square root."""
        symbols = {"x": sp.Symbol("x", real=True), "eps": sp.Symbol("eps", positive=True)}
        found = {}
        for name, text in self.stats:
            if parse(text, symbols).is_nonnegative:
                found[name] = text
            symbols[name] = sp.Symbol(name, nonnegative=True) if name in found else sp.Symbol(name, real=True)
        return found


_BINARY = {ast.Add: sp.Add, ast.Sub: lambda a, b: a - b, ast.Mult: sp.Mul, ast.Div: lambda a, b: a / b, ast.Pow: sp.Pow}


def parse(text: str, names: set[str] | Mapping[str, sp.Basic], where: str = "expression") -> sp.Expr:
    """Parse a spec expression into SymPy without ``eval``.

    ``names`` lists the names the expression may use; a mapping gives the object each stands
    for (default: a plain Symbol of that name). Numbers become exact rationals.

    Refused, as :class:`SpecError` naming ``where`` and the reason, before SymPy builds anything
    large: text that is not a str or longer than :data:`MAX_EXPRESSION` characters, a syntax tree
    deeper than :data:`MAX_DEPTH`, a number that is not finite or above :data:`MAX_LITERAL`, a
    constant exponent above :data:`MAX_EXPONENT` (alone, or multiplied by the exponents of powers
    it is nested in), a function called with other than one argument. With ``names`` a set (the
    symbolic check of a spec), also a division by a divisor that is identically zero, and a
    result that is infinite or undefined (``log(0)``).
    """
    symbolic = not isinstance(names, Mapping)
    table = {n: sp.Symbol(n) for n in names} if symbolic else names
    if not isinstance(text, str):
        raise SpecError(f"{where}: an expression must be a str, got {type(text).__name__} {text!r}")
    if len(text) > MAX_EXPRESSION:
        raise SpecError(f"{where}: expression of {len(text)} characters; at most {MAX_EXPRESSION}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, TypeError, ValueError) as err:
        raise SpecError(f"{where}: cannot parse {text!r}: {err}") from None
    except (RecursionError, MemoryError):
        raise SpecError(f"{where}: expression nested too deeply; at most {MAX_DEPTH} levels") from None
    _check_tree(tree, text, where)

    def build(node: ast.AST) -> sp.Expr:
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = build(node.left), build(node.right)
            if symbolic and isinstance(node.op, ast.Pow) and right.is_Number and abs(right) > MAX_EXPONENT:  # before SymPy computes it
                raise SpecError(f"{where}: exponent {ast.unparse(node.right)!r} is {right} in {text!r}: "
                                f"at most {MAX_EXPONENT} in absolute value")
            if symbolic and isinstance(node.op, ast.Div) and right.is_zero:
                raise SpecError(f"{where}: division by zero: {ast.unparse(node.right)!r} is identically zero in {text!r}")
            return _BINARY[type(node.op)](left, right)
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
            return FUNCTIONS[node.func.id](build(node.args[0]))  # name and arity checked by _check_tree
        raise SpecError(f"{where}: {ast.unparse(node)!r} is not allowed in {text!r} "
                        f"(numbers, names, + - * / ** and {', '.join(FUNCTIONS)})")

    expr = build(tree)
    if symbolic and expr.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
        raise SpecError(f"{where}: {text!r} is infinite or undefined ({expr}); constants must be finite, divisors nonzero")
    return expr


def _check_tree(tree: ast.Expression, text: str, where: str) -> None:
    """The syntactic limits of :func:`parse`, checked on the tree before SymPy sees it (without
    recursion, so that a deep tree cannot overflow the stack)."""
    stack = [(tree.body, 1)]
    while stack:  # the depth first: the checks below recurse into exponents
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SpecError(f"{where}: expression nested too deeply; at most {MAX_DEPTH} levels in {text!r}")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    stack = [(tree.body, 1)]  # node, product of the constant exponents of the powers it is the base of
    while stack:
        node, power = stack.pop()
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            _check_literal(node.value, where, text)
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            if name not in FUNCTIONS:
                raise SpecError(f"{where}: unknown function {name!r}; known: {', '.join(FUNCTIONS)}")
            if len(node.args) != 1 or node.keywords or isinstance(node.args[0], ast.Starred):
                raise SpecError(f"{where}: {name} takes exactly one argument, got {ast.unparse(node)!r} in {text!r}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            exponent = _constant(node.right, where, text)
            if exponent is not None:
                if abs(exponent) > MAX_EXPONENT:
                    raise SpecError(f"{where}: exponent {ast.unparse(node.right)!r} is too large in {text!r}: "
                                    f"at most {MAX_EXPONENT} in absolute value")
                if power * abs(exponent) > MAX_EXPONENT:
                    raise SpecError(f"{where}: nested powers in {ast.unparse(node)!r} multiply to an exponent of "
                                    f"{power * abs(exponent):g} in {text!r}: at most {MAX_EXPONENT} in absolute value")
            stack.append((node.left, power * max(1.0, abs(exponent or 1.0))))
            stack.append((node.right, 1))
            continue
        stack.extend((child, power) for child in ast.iter_child_nodes(node))


def _check_literal(value: int | float, where: str, text: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where}: number {value!r} is not finite in {text!r}")
    if abs(value) > MAX_LITERAL:
        raise SpecError(f"{where}: number {value!r} is too large in {text!r}: at most {MAX_LITERAL:g} in absolute value")


_FLOAT_FUNCTIONS = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "abs": abs}


def _constant(node: ast.AST, where: str, text: str) -> float | None:
    """The value of a constant subexpression (numbers, operators and functions only) as a float,
    or None when it uses a name or is not a plain number; refused when it is not a finite number
    (an overflow, ``0**-1``, ``log(0)``), so that no exponent can hide a huge value."""
    def value(n: ast.AST) -> float:
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            _check_literal(n.value, where, text)
            return float(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            return -value(n.operand) if isinstance(n.op, ast.USub) else value(n.operand)
        if isinstance(n, ast.BinOp) and type(n.op) in _BINARY:
            a, b = value(n.left), value(n.right)
            if isinstance(n.op, ast.Pow) and abs(b) > MAX_EXPONENT:
                raise SpecError(f"{where}: exponent {ast.unparse(n.right)!r} is too large in {text!r}: "
                                f"at most {MAX_EXPONENT} in absolute value")
            return {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                    ast.Div: operator.truediv, ast.Pow: operator.pow}[type(n.op)](a, b)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FLOAT_FUNCTIONS and len(n.args) == 1:
            return float(_FLOAT_FUNCTIONS[n.func.id](value(n.args[0])))
        raise _NotConstant

    try:
        result = value(node)
    except _NotConstant:
        return None
    except SpecError:
        raise
    except (ArithmeticError, ValueError, TypeError):
        raise SpecError(f"{where}: {ast.unparse(node)!r} is not a finite number in {text!r}") from None
    if isinstance(result, complex) or not math.isfinite(result):
        raise SpecError(f"{where}: {ast.unparse(node)!r} is not a finite real number in {text!r}")
    return result


class _NotConstant(Exception):
    pass


def _moments(group: str) -> dict[str, Notation]:
    """Mean and variance over ``group``, the letter that names the set of elements sharing them:
    the paper's mini-batch 𝓑 for batch norm; 𝓛 (a layer's units, one row), 𝓖 (a group) and 𝓘 (an
    instance) for the per-sample norms, whose statistics are not the batch's."""
    return {
        "mean": Notation(f"μ_{group}", rf"\mu_{{\mathcal{{{group}}}}}", "E[x]", r"\mathrm{E}[x]"),
        "var": Notation(f"σ²_{group}", rf"\sigma^{{2}}_{{\mathcal{{{group}}}}}", "Var[x]", r"\mathrm{Var}[x]"),
    }


BATCHNORM = Norm(
    name="batchnorm",
    stats={"mean": "x", "var": "(x - mean)**2"},
    normalized="(x - mean) / sqrt(var + eps)",
    affine="group",
    layout=CHANNEL,
    description="Batch normalization (Ioffe & Szegedy 2015): each channel over the mini-batch",
    notation=_moments("B"),
    unbiased=("var",),
)

LAYERNORM = replace(
    BATCHNORM,  # the same statistics; only which elements share them, and the parameters' axes, differ
    name="layernorm",
    affine="element",
    layout=TRAILING,
    description="Layer normalization (Ba et al. 2016): each sample over its features",
    notation=_moments("L"),
)

RMSNORM = Norm(
    name="rmsnorm",
    stats={"ms": "x**2"},
    normalized="x / sqrt(ms + eps)",
    affine="element",
    layout=TRAILING,
    description="RMS normalization (Zhang & Sennrich 2019): no mean, scaled by the root mean square",
    notation={"ms": Notation("ν_L", r"\nu_{\mathcal{L}}", "E[x²]", r"\mathrm{E}[x^{2}]")},
)

INSTANCENORM = replace(
    BATCHNORM,
    name="instancenorm",
    layout=INSTANCE,
    description="Instance normalization (Ulyanov et al. 2016): each sample and channel over its spatial positions",
    notation=_moments("I"),
)

GROUPNORM = replace(
    BATCHNORM,
    name="groupnorm",
    affine="element",  # gamma is per channel, and a group holds several channels
    layout=GROUPS,
    description="Group normalization (Wu & He 2018): each sample over groups of channels and their spatial positions",
    notation=_moments("G"),
)

BUILTINS: dict[str, Norm] = {norm.name: norm for norm in (BATCHNORM, LAYERNORM, RMSNORM, INSTANCENORM, GROUPNORM)}


def resolve(norm: str | Norm) -> Norm:
    """A built-in norm by name, or the spec itself; an unknown name raises :class:`SpecError` naming the choices."""
    if isinstance(norm, Norm):
        return norm
    if norm in BUILTINS:
        return BUILTINS[norm]
    raise SpecError(f"unknown norm {norm!r}; choose from: {', '.join(BUILTINS)}")
