"""The training forward's statistics from one read of x (:func:`symbn.split.anchored`, lowered by
:mod:`symbn.lower`): the identity proven for symbolic m, which kernels use it, and its rounding
against a float64 two-pass reference, also where the anchor (the group's first member) is the
worst member it can be."""
import math

import numpy as np
import pytest

import symbn
from symbn.errors import SpecError
from symbn.lower import ANCHOR, plan
from symbn.spec import LAYOUTS, Norm
from symbn.split import anchored, prove_anchored

BUILTINS = ("batchnorm", "layernorm", "groupnorm", "instancenorm", "rmsnorm")
FOURTH = Norm("kurtnorm", stats={"mu": "x", "sd2": "(x - mu)**2", "kurt": "(x - mu)**4"},
              normalized="(x - mu) / (sd2 + kurt + eps)**0.5", affine="group", layout=LAYOUTS["channel"])
ABSDEV = Norm("absdev", stats={"mu": "x", "d": "abs(x - mu)"}, normalized="(x - mu) / (d + eps)",
              affine="group", layout=LAYOUTS["channel"])


@pytest.mark.parametrize("norm", [*BUILTINS, FOURTH])
def test_the_statistics_about_any_anchor_equal_their_definitions_for_symbolic_m(norm):
    proofs = prove_anchored(anchored(norm))
    assert proofs and all(p.outcome == "proven" for p in proofs), [(p.key, p.outcome) for p in proofs]


def test_a_statistic_not_polynomial_in_the_earlier_ones_cannot_be_anchored():
    with pytest.raises(SpecError, match="not a polynomial in the earlier statistics"):
        anchored(ABSDEV)


@pytest.mark.parametrize("norm, expected", [
    ("batchnorm", True), ("layernorm", True), ("groupnorm", True), ("instancenorm", True),
    ("rmsnorm", False),    # one statistic, one sweep as defined: nothing to save
    (FOURTH, False),       # a fourth power about the anchor would cancel (m + 1)² fold: a sweep per statistic
    (ABSDEV, False),       # |x − μ| needs μ first
])
def test_which_forward_kernels_read_x_once_for_their_statistics(norm, expected):
    for frame in (False, True):
        forward = plan(norm, frame=frame).kernel("forward_train")
        assert forward.anchored is expected
        statistic_passes = [p for p in forward.passes if p.sums]
        assert len(statistic_passes) == (1 if expected else len(statistic_passes))
        if expected:
            assert len(forward.passes) == 2  # the sums; y
        assert all(not k.anchored for k in plan(norm, frame=frame).kernels if k.name != "forward_train")
        uses = any(ANCHOR in a.expr.free_symbols for p in forward.passes for a in (*p.element, *p.sums))
        assert uses is expected


def two_pass(x):
    """The float64 reference per channel of an (m, C) x: the mean and the mean squared deviation
    from it, each sum correctly rounded (math.fsum)."""
    x = x.astype(np.float64)
    mean = np.array([math.fsum(column) / len(column) for column in x.T])
    return mean, np.array([math.fsum((column - mu) ** 2) / len(column) for column, mu in zip(x.T, mean)])


def data(kind, rng, shape, dtype):
    x = rng.standard_normal(shape)
    if kind == "offset":          # far from zero: the anchor, a member, is near the mean
        x = 1e6 + x
    elif kind == "outlier":       # the anchor, each channel's first member, as far from the mean as a member can be
        x[0] = 1e3 * np.sqrt(shape[0])
    elif kind == "constant":      # every member the same: the variance is 0 exactly
        x = np.full(shape, 3.25)
    return x.astype(dtype)


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["unit", "offset", "outlier", "constant"])
def test_one_read_statistics_are_within_the_bound_of_a_float64_reference(backend, dtype, kind):
    """lower's bound: the variance's relative error is the summation's (a few 1e-15 here) times
    1 + (a − μ)²/σ², which is at most m + 1 (the outlier: 4096) and about 1 for an anchor
    within a few σ of the mean; the mean, a + Σ(x − a)/m, within a few ulps of |a| + |μ| and the sum's error; a
    constant group's variance is 0."""
    rng = np.random.default_rng(7)
    m = 4096
    x = data(kind, rng, (m, 8), dtype)
    _, mean, var = symbn.load("batchnorm", backend).forward_train(x, np.ones(8, dtype), np.zeros(8, dtype))
    ref_mean, ref_var = two_pass(x)
    if kind == "constant":
        assert np.array_equal(var, np.zeros(8)) and np.array_equal(mean, ref_mean)
        return
    amplification = 1 + (x[0].astype(np.float64) - ref_mean) ** 2 / ref_var
    assert (amplification > m / 2).all() if kind == "outlier" else (amplification < 20).all()
    error = np.abs(var - ref_var) / ref_var
    print(f"{backend} {np.dtype(dtype)} {kind}: variance relative error {error.max():.1e}, amplification {amplification.max():.0f}")
    assert (error <= 1e-14 * amplification).all()
    anchor = x[0].astype(np.float64)
    spread = np.sqrt(ref_var + (anchor - ref_mean) ** 2)  # the root mean square of x − a
    assert (np.abs(mean - ref_mean) <= 4 * 2.0**-53 * (np.abs(anchor) + np.abs(ref_mean)) + 1e-14 * spread).all()
