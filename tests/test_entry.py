"""symbn's compiled entry point (symbn/backends/c/entry.c): it is built here, it takes the common
calls, it gives the results of the ctypes path bit for bit, and it hands everything else to the
Python path, whose checks and errors stay the only ones (tests/test_inputs.py runs them through
it)."""
import shutil

import numpy as np
import pytest

import symbn
from symbn.build import entry_point

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
NORMS = {"batchnorm": (16, 6, 5), "layernorm": (8, 12), "groupnorm": (4, 6, 7), "instancenorm": (3, 4, 9), "rmsnorm": (8, 12)}


def test_the_entry_point_is_built_where_python_h_is():
    import sysconfig
    from pathlib import Path

    assert (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
    assert entry_point() is not None


def problem(norm, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3, 2, NORMS[norm]).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    params = symbn.spec.BUILTINS[norm].layout.param_axes(x.ndim)
    gamma = rng.normal(1, 0.2, [x.shape[a] for a in params]).astype(dtype)
    beta = rng.normal(size=gamma.shape).astype(dtype)
    return x, dy, gamma, beta


def calls(kernels, x, dy, gamma, beta):
    """forward_train with and without out, γ and β left out, backward_train on the forward's statistics."""
    y = np.empty_like(x)
    first = kernels.forward_train(x, gamma, beta)
    given = kernels.forward_train(x, gamma, beta, out=y)
    plain = kernels.forward_train(x)
    backward = kernels.backward_train(dy, x, gamma, *first[1:])
    return [*first, *given, *plain, *backward]


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "groupnorm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_entry_point_gives_the_ctypes_paths_results_bit_for_bit(norm, dtype):
    x, dy, gamma, beta = problem(norm, dtype)
    entered, plain = symbn.load(norm, "c"), symbn.load(norm, "c", entry=False)
    assert entered.entry is not None and plain.entry is None
    for a, b in zip(calls(entered, x, dy, gamma, beta), calls(plain, x, dy, gamma, beta)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)


def test_the_entry_point_takes_the_common_calls_and_hands_the_rest_on():
    """``_entered`` is the entry point's answer: results, or None for the Python path."""
    k = symbn.load("batchnorm", "c")
    x, dy, gamma, beta = problem("batchnorm", np.float32)
    y = np.empty_like(x)
    taken = [(x, gamma, beta, 1e-5), (x, None, None, 1e-5), (x, gamma, beta, 0.5)]
    for values in taken:
        assert k._entered("forward_train", values, None) is not None
    assert k._entered("forward_train", (x, gamma, beta, 1e-5), y) is not None
    assert k._entered("forward_train", (x, gamma, beta, 1e-5), [y]) is not None
    handed_on = [
        ((x[:, :, ::2], gamma, beta, 1e-5), None),                 # strided: the Python path copies it
        ((x.astype(np.float64), gamma, beta, 1e-5), None),         # γ's dtype differs from x's
        ((x, gamma[:3], beta, 1e-5), None),                        # γ's shape
        ((x.tolist(), gamma, beta, 1e-5), None),                   # not an array
        ((x, gamma, beta, 1), None),                               # an int eps: the Python path converts it
        ((x, gamma, beta, -1e-5), None), ((x, gamma, beta, float("nan")), None),
        ((x, gamma, beta, 1e-5), x),                               # out overlaps x
        ((x, gamma, beta, 1e-5), y[:, :, :4]),                     # out's shape
        ((x, gamma, beta, 1e-5), (y, y)),                          # one store, two outs
        ((np.where(x > 4, np.nan, x), gamma, beta, 1e-5), None),   # NaN: the kernel reports it
    ]
    for values, out in handed_on:
        assert k._entered("forward_train", values, out) is None
    _, mean, var = k.forward_train(x, gamma, beta)
    assert k._entered("backward_train", (dy, x, gamma, 1e-5, mean, var), None) is not None
    assert k._entered("backward_train", (dy, x, gamma, 1e-5, mean, -var), None) is None  # a negative variance
    assert k._entered("forward_eval", (x, gamma, beta, 1e-5, mean, var), None) is None    # eval: checked in Python


def test_a_call_handed_on_gets_the_python_paths_error():
    k = symbn.load("batchnorm", "c")
    x, dy, gamma, beta = problem("batchnorm", np.float32)
    with pytest.raises(ValueError, match="out must not overlap an input"):
        k.forward_train(x, gamma, beta, out=x)
    with pytest.raises(ValueError, match="x contains NaN or infinity"):
        k.forward_train(np.where(x > 4, np.inf, x))
    _, mean, var = k.forward_train(x, gamma, beta)
    with pytest.raises(ValueError, match="var must be non-negative"):
        k.backward_train(dy, x, gamma, mean, -var)
