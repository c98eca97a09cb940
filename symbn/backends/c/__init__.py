"""The C backend: a kernel plan rendered as C99 with OpenMP.

Layout of the backend (SymForce's): this module holds the printer (:data:`PRINTER`), the files it
writes (:data:`FILES`), which plans are framed (:func:`framed`), the schedule rule
(:func:`choose_schedule`), its templates folder (:data:`TEMPLATES`) and :func:`context`, which turns a :class:`~symbn.lower.KernelPlan`
into what the templates under ``templates/`` print. The templates know no mathematics: every
expression arrives as C text from here; the context knows no loops: the loop shapes are the
plain C drivers at the top of ``kernels.c.j2``.

How the generated C is organised (``kernels.c.j2``, top to bottom):

* the runtime, once per file: the call's geometry and workspace (``struct symbn_call``), the
  size and overflow checks, the thread team, and three loop drivers, one per loop shape
  (:data:`GROUPS`, :data:`LANES`, :data:`ROWS`), generic over the member step they run;
* per kernel: its arrays (``struct symbn_<kernel>_arrays``), and per pass two functions, emitted
  once whatever the element type: ``symbn_<kernel>_group_<j>`` (the pass's per-group values,
  for one group) and ``symbn_<kernel>_<j>`` (the pass's element code for one member: loads,
  temporaries, its contributions to the sums and parameter gradients, its stores); then the
  kernel's ``run`` (which passes, in which order, for each loop shape: a few calls per pass),
  ``begin`` (checks, workspace, the per-group inputs) and ``end`` (per-group outputs,
  parameter sums, the non-finite check);
* the entry points, per element type: five lines each.

The element type reaches the element code as a constant flag (``single``) and the member step as
a constant number (``step``): the drivers and the element code are ``static inline`` with
``always_inline``, so that once inlined into a kernel's ``run`` the flag and the step's switch
fold away, and each driver's inner loop is the vectorized loop of the old hand-expanded code.

Per-group values (the count m, eps, γ of a group, the saved statistics, the program's group
steps, the hoisted coefficients, the reductions) live in one table per call,
``table[column * groups + g]``; the element code reads them through ``gv[column * gs]``, so that
one function serves a group held in a local copy (``gs = 1``), a lane of a block and a row of
groups (``gs = groups``: contiguous across p).
"""
from __future__ import annotations

from pathlib import Path

import sympy as sp
from sympy.codegen.ast import float32, real
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE

from ...interface import DEFAULTS, DTYPES, OPTIONAL, SCHEDULES, STATUS, function_name, parameters
from ...lower import ANCHOR, COUNT, SHIFT, X, Arg, Kernel, KernelPlan, Pass, group_var
from ...program import DATA, ELEMENT, GROUP, PARAM, SCALAR

FILES = {"{name}.c": "kernels.c.j2", "{name}.h": "kernels.h.j2"}
"""Output file name (``{name}``: the plan's name) -> template, in :data:`TEMPLATES`."""
def framed(transforms: tuple[str, ...]) -> bool:
    """The first order is lowered with the frame (:func:`symbn.lower.plan`): its passes that only
    store (y, dx) run in float for float32 x, measured from the rounded mean, the rest in double.
    Higher orders compute every element in double: unframed, their outputs collected into a few
    multiply-adds per element."""
    return len(transforms) == 1


TEMPLATES = Path(__file__).resolve().parent / "templates"

# The schedule: tuned and measured on the old template (README, issue 13); one place for C and Python.
LONG_RUN = 32       # runs (l*s) at least this long: group-major, a thread takes whole groups
LANES = 16          # runs of one element (x is (N, C)), small problems: blocks of LANES channels
STRANDS = 16        # independent partial sums per reduction over a run
AHEAD_ROWS = 2      # row-major read passes ask for the row this far ahead
SMALL = 65536       # elements: a problem this small runs on one thread, with no OpenMP call
TILE = 8            # rows of (N, C) summed with the sums in registers (ROWS), then added to the thread's partial sums
FLOAT_TERMS = 16    # most additions into one float partial sum before it is added into double (GROUPS, fl)
TUNING = {"LONG_RUN": LONG_RUN, "LANES": LANES, "STRANDS": STRANDS, "AHEAD_ROWS": AHEAD_ROWS, "SMALL": SMALL, "TILE": TILE,
          "FLOAT_TERMS": FLOAT_TERMS}

AUTO, GROUPS, LANES_SHAPE, ROWS = (SCHEDULES[k] for k in ("SYMBN_SCHEDULE_AUTO", "SYMBN_SCHEDULE_GROUPS",
                                                           "SYMBN_SCHEDULE_LANES", "SYMBN_SCHEDULE_ROWS"))


class CKernelPrinter(C99CodePrinter):
    """C99 in double precision: small integer powers as products, square roots as sqrt; constants
    (e, log 2, ...) as numbers, never <math.h>'s M_E, M_LN2, which strict C99 does not define."""

    def __init__(self, settings: dict | None = None):
        super().__init__(settings)
        self.math_macros = {}

    def _print_NumberSymbol(self, expr: sp.NumberSymbol) -> str:
        return self._print(sp.Float(expr.evalf(20), 20))

    _print_Exp1 = _print_Pi = _print_NumberSymbol

    def _print_Pow(self, expr: sp.Pow) -> str:
        base, exp = expr.base, expr.exp
        one, sqrt = self._print(sp.Float(1.0)), f"sqrt{self._get_func_suffix(real)}"  # 1.0F and sqrtf in float
        if exp.is_Integer and 1 <= abs(exp) <= 4:
            product = "*".join([self.parenthesize(base, PRECEDENCE["Mul"], strict=True)] * abs(int(exp)))
            if abs(exp) > 1:
                product = f"({product})"  # a power is one operand: m/(m*m), never m/m*m
            return product if exp > 0 else f"{one}/{product}"
        if exp == sp.S.Half:
            return f"{sqrt}({self._print(base)})"
        if exp == -sp.S.Half:
            return f"{one}/{sqrt}({self._print(base)})"
        if abs(exp) == sp.Rational(3, 2):
            b = self._print(base)
            return f"({b})*{sqrt}({b})" if exp > 0 else f"{one}/(({b})*{sqrt}({b}))"
        return super()._print_Pow(expr)


PRINTER = CKernelPrinter
"""The printer class (the registry's convention); :func:`context` prints with one instance of it."""
_PRINT = CKernelPrinter().doprint
_PRINT_FLOAT = CKernelPrinter({"type_aliases": {real: float32}}).doprint
"""The element code of a pass that runs in float: float literals (2.0F) and functions (sqrtf)."""


def choose_schedule(kernel: Kernel | None, outer: int, q: int, p: int, l: int, s: int, threads: int) -> int:
    """The loop shape the C kernels choose with ``schedule = SYMBN_SCHEDULE_AUTO`` (0) on
    ``threads`` threads (what ``symbn_<name>_set_num_threads`` or OpenMP gives): the same rule,
    the same constants (``templates/schedule.py.j2`` renders it as a standalone function).

    * :data:`GROUPS` (1): runs of at least LONG_RUN elements, and a group per thread: a thread
      takes whole groups and makes every pass over a group back to back, while in cache;
    * :data:`LANES_SHAPE` (2): runs of one element (x is (N, C)) in a small problem: a thread
      takes blocks of LANES channels, the sums in registers;
    * :data:`ROWS` (3): anything else: rows streamed across the threads, partial sums per thread.

    Problems of at most SMALL elements run on one thread. ``kernel`` is not used today: every
    kernel of a plan follows the same rule."""
    del kernel
    ls, groups, units = l * s, q * p, outer * q
    team = 1 if units * p * ls <= SMALL else max(1, threads)
    blocks = (p + LANES - 1) // LANES
    if ls >= LONG_RUN and groups >= team:
        return GROUPS
    if ls == 1 and q * blocks >= team and units * p <= SMALL:
        return LANES_SHAPE
    return ROWS


# --------------------------------------------------------------------------- context


def context(plan: KernelPlan) -> dict:
    """What ``kernels.c.j2``, ``kernels.h.j2`` (and ``schedule.py.j2``) print for ``plan``
    (lowered with ``frame=framed(plan.transforms)``). The caller adds ``header``, the do-not-edit line."""
    norm = plan.norm
    kernels = [_kernel(norm.name, k, plan.shift) for k in plan.kernels]
    steps = [p for k in kernels for p in k["passes"]]
    return {
        "name": plan.name, "NAME": plan.name.upper(), "norm": norm.name,
        "description": norm.description or norm.name,
        "layout": norm.layout.name, "layout_description": norm.layout.description,
        "transforms": list(plan.transforms), "stat_names": list(plan.stat_names),
        "status": STATUS, "schedules": SCHEDULES, "tuning": TUNING, "dtypes": DTYPES,
        "optional": list(OPTIONAL), "defaults": {k: f"{v:g}" for k, v in DEFAULTS.items()},
        "kernels": kernels, "steps": steps,
        "columns_max": max(k["nv"] for k in kernels),
        "reduced_max": max([p["ns"] + p["np"] for p in steps] + [1]),
    }


def _describe(arg: Arg, output: bool) -> str:
    """One array's place in the layout, for the header."""
    where = {(ELEMENT, DATA): "x's shape, (outer, q, p, l, s)", (ELEMENT, PARAM): "p_count * l_count, [p][l]",
             (GROUP, DATA): "one per group, q_count * p_count, [q][p]", (GROUP, PARAM): "p_count, [p]",
             (GROUP, SCALAR): "a number"}[(arg.kind, arg.role)]
    kind = "double" if arg.double else "T"
    note = ""
    if output and arg.role == PARAM:
        note = "; accumulated into (+=, summed over the groups that share an entry), NULL: not computed"
    elif not output and arg.name in OPTIONAL:
        note = f"; may be NULL ({DEFAULTS[arg.name]:g})"
    return f"{arg.name}: {kind}, {where}{note}"


def _kernel(norm: str, k: Kernel, shift: str | None) -> dict:
    """The C of one kernel (see the module's docstring for where each part goes); ``shift``: the
    plan's frame statistic, whose value rounded to x's precision framed passes measure x from."""
    outputs = {a.name for a in k.outputs}
    group_inputs = [a for a in k.inputs if a.kind == GROUP]
    columns = [COUNT.name] + [a.var.name for a in group_inputs] + ([ANCHOR.name] if k.anchored else [])
    first_framed = next((j for j, ps in enumerate(k.passes) if ps.framed), None)
    columns += [SHIFT.name] if first_framed is not None else []
    for ps in k.passes:
        columns += [g.name for g in ps.group] + [s.name for s in ps.sums]
    # a group param output's value per group, summed over q into its array by `end`, in order
    columns += [a.name for a in k.final if a.name in outputs and k.arg(a.name).role == PARAM and a.expr != 0]
    index = {name: j for j, name in enumerate(columns)}
    if len(index) != len(columns):
        raise ValueError(f"{k.name}: a per-group value is defined twice: {columns}")

    element_inputs = {a.var: a for a in k.inputs if a.kind == ELEMENT}
    element_params_out = [a for ps in k.passes for a in ps.params]
    param_index = {}
    for a in element_params_out:
        param_index.setdefault(a.name, len(param_index))
    passes, pbase = [], 0
    first_column = len([COUNT] + group_inputs)
    for j, ps in enumerate(k.passes):
        red = index[ps.sums[0].name] if ps.sums else 0
        if ps.sums and [index[s.name] for s in ps.sums] != list(range(red, red + len(ps.sums))):
            raise AssertionError("a pass's sums take consecutive columns")
        passes.append(_pass(k, j, ps, index, element_inputs, red, pbase,
                            group_var(shift).name if j == first_framed else None))
        pbase += len(ps.params)
    del first_column
    final = _final(k, index, outputs)
    final["sums"] = [{"name": a.name, "column": index[a.name]} for a in k.final
                     if a.name in outputs and k.arg(a.name).role == PARAM and a.expr != 0]
    train = k.mode == "train"
    finite = []
    sums_checked = [ps["red"] + j for ps in passes for j in range(ps["ns"])] if train else []
    if train:
        finite.append("symbn_unflagged(c)")
        extent = {(ELEMENT, PARAM): "c->pl", (GROUP, PARAM): "c->p_count", (GROUP, DATA): "c->groups"}
        for a in k.inputs:
            if (a.kind, a.role) in extent:
                finite.append(f"symbn_all_finite(a->{a.name}, {extent[a.kind, a.role]}, {0 if a.double else 'single'})")
    params = parameters(k)
    arrays = [p for p in params if p.ctypes == "pointer"]

    def field(p) -> str:
        if p.arg.double:
            return f"{'double *' if 'const' not in p.c_type else 'const double *'}{p.name}"
        return f"{'const void *' if 'const' in p.c_type else 'void *'}{p.name}"

    fields = [{"decl": field(p), "doc": _describe(p.arg, p.arg in k.outputs)} for p in arrays]
    fields += [{"decl": f"double {p.name}", "doc": _describe(p.arg, False)} for p in params if p.ctypes == "real"]
    members = [p.name for p in params if p.ctypes in ("pointer", "real")]
    packed = []  # the packed entry's arguments: the arrays, sizes and reals from three arrays, in the parameters' order
    for p in params:
        count = sum(q.ctypes == p.ctypes for q in params[:params.index(p)])
        packed.append({"pointer": f"symbn_p[{count}]", "size": f"symbn_n[{count}]", "real": f"symbn_r[{count}]"}.get(p.ctypes, p.name))
    return {
        "name": k.name, "mode": k.mode, "train": train, "transforms": list(k.transforms),
        "functions": {t["suffix"]: function_name(norm, k, t["suffix"]) for t in DTYPES},
        "parameters": [p.typed for p in params], "fields": fields, "members": members, "packed": packed,
        "required": [p.name for p in arrays if not p.optional],
        "inputs": [_describe(a, False) for a in k.inputs],
        "outputs": [_describe(a, True) for a in k.outputs],
        "columns": columns, "nv": len(columns),
        "loads": [{"column": index[a.var.name], "name": a.var.name, "code": _load(a, element=False)} for a in group_inputs]
        + ([{"column": index[ANCHOR.name], "name": f"{ANCHOR.name}: x of the group's first member",
             "code": "symbn_load(a->x, g * c->ls, single)"}] if k.anchored else []),
        "passes": passes, "final": final,
        "nsums": max([p["ns"] for p in passes] + [0]),
        "params": [{"name": name, "index": j} for name, j in param_index.items()],
        "finite": finite, "checked": sums_checked,
        "float_params": any(p["fl"] == "fl_params" for p in passes),
        "ahead_rows": not k.transforms,
    }


def _reads(exprs, defined: set[str], index: dict[str, int], what: str) -> list[dict]:
    """The table columns that ``exprs`` read (the per-group symbols not ``defined`` before)."""
    names = sorted({s.name for e in exprs for s in e.free_symbols} - defined)
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(f"{what}: reads {unknown}, which no column holds")
    return [{"name": n, "column": index[n]} for n in names]


def _pass(k: Kernel, j: int, ps: Pass, index: dict[str, int], element_inputs: dict, red: int, pbase: int,
          shift_from: str | None) -> dict:
    """One pass: its per-group function and its member function. ``shift_from``: the statistic
    this pass's group function rounds into the frame's shift (the first framed pass only)."""
    doprint = _PRINT
    name = f"symbn_{k.name}_{j}"
    lines = [{"name": g.name, "code": doprint(g.expr), "column": index[g.name]} for g in ps.group]
    group_exprs = [g.expr for g in ps.group]
    if shift_from:  # the shift: the statistic rounded to x's precision, once it is known
        at = next((n + 1 for n, g in enumerate(ps.group) if g.name == shift_from), 0)
        lines.insert(at, {"name": SHIFT.name, "code": f"single ? (double)(float){shift_from} : {shift_from}",
                          "column": index[SHIFT.name]})
        group_exprs.append(sp.Symbol(shift_from, real=True))
    defined = {line["name"] for line in lines}
    group_reads = [r for r in _reads(group_exprs, set(), index, f"{k.name} pass {j} group") if r["name"] not in defined]
    group = {"reads": group_reads, "assigns": lines} if lines else None
    exprs = [a.expr for a in (*ps.element, *ps.sums, *ps.params, *ps.stores)]
    used = {s for e in exprs for s in e.free_symbols}
    loads = [(v, a) for v, a in element_inputs.items() if v in used]
    framed_x = ps.framed and any(v == X for v, _ in loads)  # x_v is x - shift
    temporaries = {a.name for a in ps.element}
    known = temporaries | {v.name for v, _ in loads}
    reads = _reads(exprs + ([SHIFT] if framed_x else []), known, index, f"{k.name} pass {j}")
    stores = []
    for s in ps.stores:
        out = k.arg(s.name)
        code = doprint(s.expr)
        stores.append(f"a->{s.name}[idx] = {code};" if out.double else f"symbn_store(a->{s.name}, idx, single, {code});")
    single = _single(k, ps, loads, framed_x)
    floats = reads if single else []
    typed = any(not a.double for _, a in loads) or any(not k.arg(s.name).double for s in ps.stores)  # reads `single`
    in_float = bool(single and single["accumulates"])  # sums into fsum, fparam where fl
    used_params = {
        "a": bool(loads) or bool(ps.stores), "single": typed, "fl": in_float,
        "gv": bool(reads), "fv": bool(floats), "gs": bool(reads),
        "idx": any(a.role == DATA for _, a in loads) or bool(ps.stores),
        "pidx": any(a.role == PARAM for _, a in loads),
        "sum": bool(ps.sums), "fsum": in_float and bool(ps.sums), "ss": bool(ps.sums),
        "param": bool(ps.params), "fparam": in_float and bool(ps.params), "ps": bool(ps.params),
    }
    prefetch = []
    for _, a in loads:
        if a.role == DATA:
            prefetch.append(f"SYMBN_PREFETCH(a->{a.name} + idx);" if a.double else
                            f"SYMBN_PREFETCH((const char *)a->{a.name} + idx * (single ? sizeof(float) : sizeof(double)));")
    what = [f"{s.name} +=" for s in ps.sums] + [f"{p.name} +=" for p in ps.params] + [f"{s.name} =" for s in ps.stores]
    return {
        "index": j, "kernel": k.name, "step": f"SYMBN_STEP_{k.name.upper()}_{j}", "function": name,
        "what": ", ".join(what) or "nothing",
        "group": group,
        "loads": [{"name": v.name, "code": _load(a, framed=v == X and framed_x)} for v, a in loads],
        "reads": reads,
        "element": [{"name": a.name, "code": doprint(a.expr)} for a in ps.element],
        "sums": [{"name": a.name, "code": doprint(a.expr)} for a in ps.sums],
        "params": [{"name": a.name, "code": doprint(a.expr)} for a in ps.params],
        "stores": stores,
        "single": single, "floats": floats,
        # the drivers' fl for this pass in GROUPS: sums in float for float x, parameter gradients
        # where the layout allows (the kernel's fl_params); ROWS' tiles, whose parameter gradients
        # stay in registers, take `single` for any pass not "0"
        "fl": ("fl_params" if ps.params else "single") if in_float else "0",
        "unused": " ".join(f"(void){n};" for n, u in used_params.items() if not u),
        "ns": len(ps.sums), "np": len(ps.params), "red": red, "pbase": pbase,
        "prefetch": prefetch,
        # group-major: the first pass of a kernel of several asks for the next group on its way
        "ahead_groups": j == 0 and len(k.passes) > 1 and bool(prefetch),
    }


def _degree(expr: sp.Expr, ps: Pass, data: list[sp.Symbol]) -> int | None:
    """The total degree of ``expr`` (its temporaries written out) in the element data ``data`` (x,
    dy), the rest per group or per parameter position; None where it is no polynomial in them."""
    for t in reversed(ps.element):
        expr = expr.xreplace({t.symbol: t.expr})
    try:
        return sp.Poly(expr, *data).total_degree() if data else 0
    except sp.PolynomialError:
        return None


MOST_FLOAT_STORE_DEGREE = 1
"""A store in float is affine in the element data (y = k·x + k', dx = a·dy + b·x̂ + c): its float
rounding is then a few ulps of its terms. A higher power (a fourth-moment norm's (x − μ)³) would
lose more, and stays in double."""
MOST_FLOAT_SUM_DEGREE = 2
"""A summand or parameter gradient in float is at most a product of two element values (dy·x̂),
each rounded once: a few ulps per term, summed in float over at most SYMBN_FLOAT_TERMS terms per
partial sum, then in double."""


def _single(k: Kernel, ps: Pass, loads: list, framed_x: bool) -> dict | None:
    """The pass's element code in float, for float32 x, or None where it runs in double: a pass
    of the first order, its inputs and outputs in x's dtype, x measured from the shift, its stores
    affine in the element data and its sums and parameter gradients of degree at most 2
    (:data:`MOST_FLOAT_STORE_DEGREE`, :data:`MOST_FLOAT_SUM_DEGREE`). ``accumulates``: it sums;
    its partial sums are then float over short blocks, added up in double (where the loop shape
    allows: the drivers' ``fl``). Every order above the first stays in double."""
    outputs = [k.arg(s.name) for s in ps.stores]
    data = [v for v, a in loads if a.role == DATA]

    def within(exprs, most: int) -> bool:
        return all((d := _degree(e, ps, data)) is not None and d <= most for e in exprs)

    if len(k.transforms) > 1 or not (ps.stores or ps.sums or ps.params) or any(o.double for o in outputs) \
            or any(a.double for _, a in loads) or (any(v == X for v, _ in loads) and not framed_x) \
            or not within([s.expr for s in ps.stores], MOST_FLOAT_STORE_DEGREE) \
            or not within([a.expr for a in (*ps.sums, *ps.params)], MOST_FLOAT_SUM_DEGREE):
        return None
    doprint = _PRINT_FLOAT
    return {"loads": [{"name": v.name, "code": _load(a, single=True, framed=v == X)} for v, a in loads],
            "element": [{"name": a.name, "code": doprint(a.expr)} for a in ps.element],
            "sums": [{"name": a.name, "code": doprint(a.expr)} for a in ps.sums],
            "params": [{"name": a.name, "code": doprint(a.expr)} for a in ps.params],
            "stores": [f"((float *)a->{s.name})[idx] = {doprint(s.expr)};" for s in ps.stores],
            "accumulates": bool(ps.sums or ps.params)}


def _load(a: Arg, element: bool = True, single: bool = False, framed: bool = False) -> str:
    """C that reads input ``a``: an element input at idx (its parameter at pidx), a per-group one
    in ``begin`` at g (its parameter at p); a double array as it is, one in x's dtype through
    symbn_load, or as the float it is (``single``: the element code in float); an optional input
    given as NULL reads its default; ``framed``: x measured from the shift."""
    if a.role == SCALAR:
        return f"a->{a.name}"
    at = ("idx" if element else "g") if a.role == DATA else ("pidx" if element else "p")
    if single:
        value, default = f"((const float *)a->{a.name})[{at}]", f"{DEFAULTS.get(a.name)!r}F"
    else:
        value, default = (f"a->{a.name}[{at}]" if a.double else f"symbn_load(a->{a.name}, {at}, single)"), repr(DEFAULTS.get(a.name))
    value = f"(a->{a.name} ? {value} : {default})" if a.name in OPTIONAL else value
    return f"{value} - shift" if framed else value


def _final(k: Kernel, index: dict[str, int], outputs: set[str]) -> dict:
    """Per group after the last pass: the group steps left, then each group output."""
    doprint = _PRINT
    steps = [a for a in k.final if a.name not in outputs]
    results = [a for a in k.final if a.name in outputs]
    reads = _reads([a.expr for a in k.final], {a.name for a in steps}, index, f"{k.name} final")
    lines = [f"const double {a.name} = {doprint(a.expr)};" for a in steps]
    for a in results:
        out = k.arg(a.name)
        if out.role == DATA:
            lines.append(f"a->{a.name}[g] = {doprint(a.expr)};")
        elif a.expr != 0:  # a zero contribution to a parameter's sum is no work
            lines.append(f"gv[{index[a.name]} * gs] = {doprint(a.expr)}; /* {a.name}, summed over q by end */")
    return {"reads": reads, "lines": lines}
