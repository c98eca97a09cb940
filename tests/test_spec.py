"""Specs are data; bad ones are refused with a message naming the part and the reason."""
import importlib.util
import math
from pathlib import Path

import pytest
import sympy as sp

from symbn import BUILTINS, Norm, SpecError
from symbn.emit import shared_sources
from symbn.spec import CHANNEL, GROUPS, INSTANCE, LAYOUTS, TRAILING, Layout, parse


def make(**changes):
    fields = dict(name="mine", stats={"mean": "x"}, normalized="x - mean", affine="group", layout=CHANNEL)
    return Norm(**{**fields, **changes})


def test_builtins():
    assert list(BUILTINS) == ["batchnorm", "layernorm", "rmsnorm", "instancenorm", "groupnorm"]
    assert BUILTINS["rmsnorm"].stat_names == ("ms",)
    assert BUILTINS["batchnorm"].affine == "group" and BUILTINS["layernorm"].affine == "element"


@pytest.mark.parametrize("changes, message", [
    (dict(stats={"Mean": "x"}), "must match"),
    (dict(stats={"int": "x"}), "reserved"),
    (dict(stats={"gamma": "x"}), "reserved"),
    (dict(stats={"mean": "x +"}), "cannot parse"),
    (dict(stats={"mean": "z"}), "unknown name 'z'"),
    (dict(stats={"mean": "var", "var": "x"}), "unknown name 'var'"),
    (dict(stats={"mean": "__import__('os')"}), "unknown function"),
    (dict(stats={"mean": "x.real"}), "is not allowed"),
    (dict(stats={"mean": "'x'"}), "is not allowed"),
    (dict(stats={}), "at least one statistic"),
    (dict(normalized="mean"), "must depend on x"),
    (dict(affine="channel"), "affine must be one of"),
    (dict(name="bad name"), "must match"),
    (dict(unbiased=("var",)), "unknown statistics"),
    (dict(stats={"mean\n": "x"}), "must match"),  # fullmatch: $ would let a trailing newline through
    (dict(name="mine\n"), "must match"),
    (dict(stats=[("mean", "x"), ("mean", "x**2")]), "defined twice"),
    (dict(stats={"self": "x"}), "reserved"),
    (dict(stats={"mean": "sqrt(x, x)"}), "exactly one argument"),
    (dict(stats={"mean": "x/0"}), "division by zero"),
    (dict(stats={"mean": "1e400*x"}), "not finite"),
    (dict(stats={"mean": "2**10**10"}), "at most 16"),
    (dict(stats={"mean": 1}), "must be a str"),
    (dict(name="stddef"), "shadow a header"),
])
def test_bad_specs_are_refused(changes, message):
    with pytest.raises(SpecError, match=message):
        make(**changes)


def test_parse_is_exact_and_safe():
    assert parse("x/2 + 0.5", {"x"}) == sp.Symbol("x") / 2 + sp.Rational(1, 2)
    assert parse("sqrt(x)**-1", {"x"}) == 1 / sp.sqrt(sp.Symbol("x"))
    with pytest.raises(SpecError):
        parse("(lambda: 1)()", {"x"})


def test_layouts():
    assert CHANNEL.reduce_axes(4) == (0, 2, 3) and CHANNEL.param_axes(4) == (1,)
    assert CHANNEL.reduce_axes(2) == (0,)
    assert TRAILING.reduce_axes(3, 2) == (1, 2) and TRAILING.param_axes(3, 2) == (1, 2)
    assert INSTANCE.reduce_axes(4) == (2, 3) and GROUPS.reduce_axes(3) == (1, 2) and GROUPS.param_axes(3) == (1,)
    with pytest.raises(ValueError):
        CHANNEL.reduce_axes(1)
    with pytest.raises(ValueError):
        INSTANCE.reduce_axes(2)
    with pytest.raises(ValueError):
        TRAILING.reduce_axes(2, 3)


@pytest.mark.parametrize("geometry", [
    ("return Geometry(1, 1, 1, 1, 1, (), ())",),
    (*CHANNEL.geometry, "import os"),
    ("__import__('os').system('echo pwned')",),
    CHANNEL.geometry[:-1],
    list(CHANNEL.geometry[:-1]),
])
def test_a_layout_cannot_bring_its_own_geometry(geometry):
    """The geometry is code that reaches the generated runtime: only the built-ins' bodies exist."""
    with pytest.raises(SpecError, match="geometry must be one of the built-in layouts'"):
        Layout("mine", "fine", geometry=geometry)
    with pytest.raises(SpecError, match="geometry"):
        Layout("channel", "fine", geometry=geometry)


def test_a_layout_reuses_a_built_in_geometry():
    with pytest.raises(SpecError, match="geometry must be one of the built-in layouts'"):
        Layout("mine", "fine")  # no geometry of its own, and no built-in of that name
    with pytest.raises(SpecError, match="must have its geometry"):
        Layout("channel", "fine", geometry=TRAILING.geometry)
    mine = Layout("mine", "fine", geometry=list(GROUPS.geometry))
    assert mine.geometry is GROUPS.geometry and mine.kind == "groups"  # the built-in tuple, not the caller's list
    assert mine.examples == GROUPS.examples and mine.statistics == GROUPS.statistics and mine.running is False
    assert mine.reduce_axes(3) == GROUPS.reduce_axes(3) and not mine.params_per_group
    plain = Layout("channel", "plain")
    assert plain.geometry is CHANNEL.geometry and plain.single_group(5) == ((5, 1), {}) and plain.running
    assert make(layout=mine, affine="element").layout.kind == "groups"
    assert len({hash(layout) for layout in LAYOUTS.values()}) == 4 and hash(plain) != hash(CHANNEL)


def _runtime():
    """The NumPy runtime rendered now from the layouts, imported from a file of its own."""
    source = shared_sources(("numpy",))["_runtime.py"]
    committed = Path(__file__).resolve().parents[1] / "generated" / "_runtime.py"
    assert source == committed.read_text(encoding="utf-8"), "python -m symbn generate"
    spec = importlib.util.spec_from_file_location("symbn_test_runtime", committed)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_example_shapes_run_through_the_generated_geometry(layout):
    runtime = _runtime()
    geometry = runtime.GEOMETRY[layout.name]
    for line in layout.geometry:
        assert f"    {line}\n" in Path(runtime.__file__).read_text(encoding="utf-8")

    def view(shape, options):
        geo = geometry(shape, None, options.get("normalized_shape"), options.get("num_groups"))
        assert geo.outer * geo.q * geo.p * geo.l * geo.s == math.prod(shape)
        normalized_ndim = len(options.get("normalized_shape", (1,)))
        assert tuple(geo.param_shape) == tuple(shape[a] for a in layout.param_axes(len(shape), normalized_ndim))
        reduced = math.prod(shape[a] for a in layout.reduce_axes(len(shape), normalized_ndim))
        assert geo.outer * geo.l * geo.s == reduced // (options.get("num_groups", 1) if layout.kind == "groups" else 1)
        assert geo.l == 1 or not layout.params_per_group
        return geo

    assert len(layout.examples) == 2
    for shape, options in layout.examples:
        geo = view(shape, dict(options))
        assert geo.q * geo.p > 1, "an example has several groups"
    view(layout.demo[0], dict(layout.demo[1]))
    for m in (1, 7):
        shape, options = layout.single_group(m)
        geo = view(shape, options)
        assert geo.q * geo.p == 1 and geo.outer * geo.l * geo.s == m
    with pytest.raises(ValueError):
        geometry((3,) if layout.kind != "trailing" else (2, 3), None, (4,) if layout.kind == "trailing" else None, 2)


def test_the_statistics_that_cannot_be_negative_are_derived():
    """Found by SymPy from each definition, so a spec's own statistics are covered as well."""
    assert BUILTINS["batchnorm"].nonnegative == {"var": "(x - mean)**2"}
    assert BUILTINS["rmsnorm"].nonnegative == {"ms": "x**2"}
    spec = Norm(name="mad", stats={"mean": "x", "mad": "abs(x - mean)", "skew": "(x - mean)**3", "m4": "(x - mad)**4"},
                normalized="(x - mean) / (mad + eps)", affine="group", layout=BUILTINS["batchnorm"].layout)
    assert list(spec.nonnegative) == ["mad", "m4"]
