"""Bad input gets a clear error naming the argument, on both backends; never a crash or a wrong answer."""
import os
import shutil

import numpy as np
import pytest

import symbn

BACKENDS = ["numpy", pytest.param("c", marks=pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                                                 reason="no C compiler"))]


@pytest.fixture(params=BACKENDS)
def bn(request):
    return symbn.load("batchnorm", request.param)


@pytest.fixture(params=BACKENDS)
def bn2(request):
    return symbn.load("batchnorm", request.param, order=2)


@pytest.fixture(params=BACKENDS)
def gn(request):
    return symbn.load("groupnorm", request.param)


@pytest.fixture(params=BACKENDS)
def ln(request):
    return symbn.load("layernorm", request.param)


X = np.arange(12.0).reshape(4, 3)


@pytest.mark.parametrize("call, error, message", [
    (lambda k: k.forward_train([[1.0, 2.0]]), TypeError, "x must be a numpy.ndarray"),
    (lambda k: k.forward_train(np.arange(12).reshape(4, 3)), TypeError, "x must be float32 or float64, got int64"),
    (lambda k: k.forward_train(X.astype(np.float16)), TypeError, "float32 or float64"),
    (lambda k: k.forward_train(np.arange(4.0)), ValueError, r"x must have shape \(N, C, \*spatial\)"),
    (lambda k: k.forward_train(np.zeros((0, 3))), ValueError, "x is empty"),
    (lambda k: k.forward_train(X, np.ones(4)), ValueError, r"gamma must have shape \(3,\)"),
    (lambda k: k.forward_train(X, np.ones(3, np.float32)), TypeError, "gamma has dtype float32, but x has float64"),
    (lambda k: k.forward_train(X, None, np.ones(3, np.float32)), TypeError, "beta has dtype float32"),
    (lambda k: k.forward_train(X, eps=0.0), ValueError, "eps must be a positive finite number, got 0.0"),
    (lambda k: k.forward_train(X, eps=-1e-5), ValueError, "eps must be a positive"),
    (lambda k: k.forward_train(X, eps=float("nan")), ValueError, "eps must be a positive"),
    (lambda k: k.forward_train(X, eps="1e-5"), ValueError, "eps must be a positive"),
    (lambda k: k.forward_train(np.where(X > 5, np.nan, X)), ValueError, "x contains NaN or infinity"),
    (lambda k: k.forward_train(np.where(X > 5, np.inf, X).astype(np.float32)), ValueError, "x contains NaN or infinity"),
    (lambda k: k.forward_train(X, np.array([1.0, np.nan, 1.0])), ValueError, "gamma contains NaN"),
    (lambda k: k.forward_train(X, None, np.array([1.0, np.inf, 1.0])), ValueError, "beta contains NaN or infinity"),
    (lambda k: k.forward_train(np.tile([[1e308], [-1e308]], (2, 3))), ValueError, "a sum over them overflows"),
    (lambda k: k.backward_train(np.where(X > 5, np.nan, 1.0), X, None, np.zeros(3), np.ones(3)), ValueError, "dy contains NaN"),
    (lambda k: k.backward_train(np.ones((4, 3)), X, np.array([1.0, np.nan, 1.0]), np.zeros(3), np.ones(3)),
     ValueError, "gamma contains NaN"),
    (lambda k: k.backward_train(np.ones((4, 3)), X, None, np.array([0.0, np.nan, 0.0]), np.ones(3)), ValueError, "mean contains NaN"),
    (lambda k: k.backward_train(np.ones((4, 2)), X, None, np.zeros(3), np.ones(3)), ValueError, r"dy must have shape \(4, 3\)"),
    (lambda k: k.backward_train(np.ones((4, 3), np.float32), X, None, np.zeros(3), np.ones(3)), TypeError, "dy has dtype float32"),
    (lambda k: k.backward_train(np.ones((4, 3)), X, None, np.zeros(2), np.ones(3)), ValueError, r"mean must have shape \(3,\)"),
    (lambda k: k.backward_train(np.ones((4, 3)), X, None, np.zeros(3), np.full(3, np.nan)), ValueError, "var contains NaN"),
    (lambda k: k.backward_train(np.ones((4, 3)), X, None, np.zeros(3), np.ones(3), eps=0.0), ValueError, "eps must be a positive"),
    (lambda k: k.backward_train(np.ones((4, 3)), X, None, np.zeros(3), np.ones((3, 1))), ValueError, r"var must have shape \(3,\)"),
    (lambda k: k.backward_eval(np.ones((4, 3)), X, None, np.zeros(3), [1.0, 1.0, 1.0]), TypeError, "running_var must be a numpy.ndarray"),
    (lambda k: k.backward_eval(np.ones((4, 3)), X, None, np.zeros(3), np.full(3, np.inf)), ValueError, "running_var contains NaN"),
    (lambda k: k.forward_eval(X, None, None, np.zeros(2), np.ones(3)), ValueError, r"running_mean must have shape \(3,\)"),
    (lambda k: k.forward_train(X, running_mean=np.zeros(3)), TypeError, "running_var must be a numpy.ndarray"),
    (lambda k: k.forward_train(X, running_mean=np.zeros(3), running_var=np.ones(3), momentum=2), ValueError, "momentum"),
    (lambda k: k.forward_train(X, running_mean=np.zeros(6)[::2], running_var=np.ones(3)), ValueError, "writable C-contiguous"),
])
def test_batchnorm_refuses_bad_input(bn, call, error, message):
    with pytest.raises(error, match=message):
        call(bn)


def test_groupnorm_needs_a_dividing_number_of_groups(gn):
    x = np.ones((2, 6, 3))
    for groups in (None, 0, 4, 2.0, True):
        with pytest.raises(ValueError, match="num_groups must be a positive integer dividing C = 6"):
            gn.forward_train(x, num_groups=groups)


def test_layernorm_shape_must_match(ln):
    with pytest.raises(ValueError, match=r"normalized_shape \(4,\) must match the trailing dims of x \(2, 3\)"):
        ln.forward_train(np.ones((2, 3)), np.ones(4))
    with pytest.raises(ValueError, match="must match"):
        ln.forward_train(np.ones((2, 3)), normalized_shape=(2,))
    y, mean, var = ln.forward_train(np.arange(6.0).reshape(2, 3), normalized_shape=(2, 3))
    assert mean.shape == var.shape == () and y.shape == (2, 3)


def test_layernorm_normalized_shape_is_validated_as_pytorch_does(ln):
    """Issue 14, finding 2: normalized_shape is never ignored when gamma or beta is given."""
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3, 4\), got \(4,\)"):
        ln.forward_train(x, np.ones(4), normalized_shape=(3, 4))
    with pytest.raises(ValueError, match=r"beta must have shape \(3, 4\)"):
        ln.forward_train(x, None, np.ones(4), normalized_shape=(3, 4))
    with pytest.raises(ValueError, match="normalized_shape must be a non-empty sequence of positive ints"):
        ln.forward_train(x, normalized_shape=())
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints"):
        ln.forward_train(x, normalized_shape=4.0)
    y, mean, _ = ln.forward_train(x, normalized_shape=4)  # an int is one trailing dim, as in PyTorch
    assert mean.shape == (2, 3) and y.shape == x.shape
    _, dgamma, dbeta = ln.backward_train(x, x, np.ones((3, 4)), *ln.forward_train(x, normalized_shape=(3, 4))[1:])
    assert dgamma.shape == dbeta.shape == (3, 4)


def test_higher_order_kernels_name_their_arguments(bn2):
    x, dy = np.arange(12.0).reshape(4, 3), np.ones((4, 3))
    _, mean, var = bn2.forward_train(x)
    ones = np.ones(3)
    with pytest.raises(ValueError, match=r"d2_dx must have shape \(4, 3\)"):
        bn2.backward2_train(np.ones((3, 3)), ones, ones, dy, x, ones, mean, var)
    with pytest.raises(TypeError, match="d2_dgamma has dtype float32"):
        bn2.backward2_train(dy, ones.astype(np.float32), ones, dy, x, ones, mean, var)
    with pytest.raises(ValueError, match="dy contains NaN"):
        bn2.backward2_train(dy, ones, ones, np.full((4, 3), np.nan), x, ones, mean, var)
    with pytest.raises(ValueError, match="out must be a sequence of 2 arrays or None"):
        bn2.backward2_train(dy, ones, ones, dy, x, ones, mean, var, out=np.empty((4, 3)))
    d2_x, d2_dy = np.empty((4, 3)), np.empty((4, 3))
    result = bn2.backward2_train(dy, ones, ones, dy, x, ones, mean, var, out=(d2_x, d2_dy))
    assert result[0] is d2_x and result[3] is d2_dy
    with pytest.raises(ValueError, match=r"out\[1\] must not overlap an input"):
        bn2.backward2_train(dy, ones, ones, dy, x, ones, mean, var, out=(None, dy))


def test_errors_leave_outputs_and_running_statistics_untouched(bn):
    running = [np.zeros(3), np.ones(3)]
    with pytest.raises(ValueError):
        bn.forward_train(np.ones((1, 3)), running_mean=running[0], running_var=running[1])
    assert running[0].tolist() == [0, 0, 0] and running[1].tolist() == [1, 1, 1]


def test_read_only_input_is_fine(bn):
    x = X.copy()
    x.flags.writeable = False
    y, *_ = bn.forward_train(x)
    assert y.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_or_nan_statistics_are_refused_by_name(backend):
    """A variance or mean square cannot be negative: given one (running, saved, or at order 2), the
    kernels say which argument and why instead of returning NaN; NaN is refused by name too."""
    bn, rms = symbn.load("batchnorm", backend, order=2), symbn.load("rmsnorm", backend)
    ones, zeros, bad = np.ones(3), np.zeros(3), np.array([1.0, -1.0, 1.0])
    calls = [
        (lambda: bn.forward_eval(X, None, None, zeros, bad), "running_var must be non-negative"),
        (lambda: bn.backward_eval(X, X, None, zeros, bad), "running_var must be non-negative"),
        (lambda: bn.backward_train(X, X, None, zeros, bad), r"var must be non-negative \(var is the mean of \(x - mean\)\*\*2\)"),
        (lambda: bn.backward2_train(X, ones, zeros, X, X, ones, zeros, bad), "var must be non-negative"),
        (lambda: bn.forward_train(X, running_mean=zeros.copy(), running_var=bad.copy()), "running_var must be non-negative"),
        (lambda: bn.forward_eval(X, None, None, zeros, np.array([1.0, np.nan, 1.0])), "running_var contains NaN"),
        (lambda: bn.forward_eval(X, None, None, np.array([np.nan, 0, 0]), ones), "running_mean contains NaN"),
        (lambda: rms.forward_eval(X, np.ones(3), None, -np.ones(1)), "running_ms must be non-negative"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message):
            call()
    bn.forward_eval(X, None, None, -ones, zeros)  # a mean may be negative, a variance may be zero
