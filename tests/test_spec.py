"""Specs are data; bad ones are refused with a message naming the part and the reason."""
import pytest
import sympy as sp

from symbn import BUILTINS, Norm, SpecError
from symbn.spec import CHANNEL, GROUPS, INSTANCE, TRAILING, parse


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
