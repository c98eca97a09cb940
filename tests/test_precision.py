"""float32 at orders above 1 on NumPy: the elements are computed in float64 and each element
output is rounded to float32 once, as the C kernels do (docs/kernels.md, "Precision").

Before, each output's sum of terms was built in place in the float32 output, so every partial
sum was rounded to float32: with one value per group (y = beta), d2_dy was off d2_dbeta by
hundreds of ulps and d2_x, which is 0, came out near 1e-5."""
import numpy as np
import pytest

import symbn
from symbn.build import module

EPS32 = float(np.finfo(np.float32).eps)

ONE_PER_GROUP = {  # norm -> (x shape, options) with m = 1: y = beta whatever x, gamma and dy
    "batchnorm": [((1, 3), {}), ((1, 2, 1, 1), {})],
    "instancenorm": [((2, 3, 1), {})],
    "groupnorm": [((2, 4, 1), {"num_groups": 4})],
    "layernorm": [((5, 1), {})],
}
SHAPES = {  # m = 1, 2, larger, and more than one block (batchnorm 70000 x 2)
    "batchnorm": [((1, 3), {}), ((2, 3), {}), ((64, 5), {}), ((4, 3, 5, 6), {}), ((70000, 2), {})],
    "instancenorm": [((2, 3, 1), {}), ((2, 3, 2), {}), ((3, 4, 5, 6), {})],
    "groupnorm": [((2, 4, 1), {"num_groups": 4}), ((3, 6, 5, 4), {"num_groups": 3}), ((2, 4, 7), {"num_groups": 1})],
    "layernorm": [((5, 1), {}), ((5, 2), {}), ((6, 4, 10), {"normalized_shape": (4, 10)}), ((33,), {})],
    "rmsnorm": [((5, 1), {}), ((5, 2), {}), ((6, 4, 10), {"normalized_shape": (4, 10)})],
}
assert set(SHAPES) == set(symbn.BUILTINS)


def cases(table):
    return [(norm, shape, options) for norm, shapes in table.items() for shape, options in shapes]


def problem(norm, shape, options, seed):
    """float32 inputs of backward2_train and backward2_eval (by name), the statistics of x in
    float64 and running statistics, and how a parameter broadcasts against x."""
    forward = module(norm)
    trailing = forward.LAYOUT == "trailing"
    p = tuple(options.get("normalized_shape", shape[-1:])) if trailing else shape[1:2]
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    gamma, beta = rng.normal(1.0, 0.3, p).astype(np.float32), rng.normal(size=p).astype(np.float32)
    inputs = {"d2_dx": rng.normal(size=shape), "d2_dgamma": rng.normal(size=p), "d2_dbeta": rng.normal(size=p),
              "dy": rng.normal(size=shape), "x": x, "gamma": gamma}
    inputs = {name: value.astype(np.float32) for name, value in inputs.items()}
    stats = forward.forward_train(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), **options)[1:]
    count = forward.geometry(shape, p, options.get("normalized_shape"), options.get("num_groups")).p
    running = [rng.uniform(0.5, 2.0, count) for _ in stats]
    along = p if trailing else (p[0],) + (1,) * (len(shape) - 2)  # a parameter against x
    return inputs, stats, running, along


def call(kernels, mode, inputs, stats, running, options, dtype):
    table = kernels.KERNELS[f"backward2_{mode}"]
    arrays = {name: value.astype(dtype) for name, value in inputs.items()}
    statistics = iter(stats if mode == "train" else running)
    values = {label: arrays[label] if label in arrays else next(statistics) for label in table.labels if label != "eps"}
    return dict(zip((name for name, *_ in table.outputs), getattr(kernels, f"backward2_{mode}")(**values, eps=1e-5, **options)))


@pytest.mark.parametrize("norm, shape, options", cases(ONE_PER_GROUP))
def test_one_value_per_group_gives_the_exact_identities_in_float32(norm, shape, options):
    """m = 1: y = beta, so d2_dy = d2_dbeta (one float32 rounding of it: here none), and d2_x and
    d2_gamma are 0 (up to float64 cancellation, ~1e-13, of terms near 1/sqrt(eps) = 316)."""
    kernels = module(norm, ("vjp", "vjp")).Kernels()
    for seed in range(5):
        inputs, stats, running, along = problem(norm, shape, options, seed)
        out = call(kernels, "train", inputs, stats, running, options, np.float32)
        assert out["d2_dy"].dtype == np.float32
        expected = np.broadcast_to(inputs["d2_dbeta"].reshape(along), shape)
        np.testing.assert_array_equal(out["d2_dy"], expected, err_msg=f"{norm} {shape} seed {seed}: d2_dy")
        assert np.abs(out["d2_x"]).max() < 1e-9, (norm, shape, seed, np.abs(out["d2_x"]).max())
        assert np.abs(out["d2_gamma"]).max() < 1e-9, (norm, shape, seed)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm, shape, options", cases(SHAPES))
def test_float32_is_the_float64_result_rounded_once(norm, shape, options, mode):
    """Each float32 output is the float64 call's on the same values, within one float32 ulp of the
    output's scale (its largest magnitude): the final rounding costs half of one; rounding partial
    sums cost 1e5 ulps at m = 2, and still up to 1.7 at m = 70000."""
    kernels = module(norm, ("vjp", "vjp")).Kernels()
    for seed in range(3):
        inputs, stats, running, _ = problem(norm, shape, options, seed)
        single = call(kernels, mode, inputs, stats, running, options, np.float32)
        double = call(kernels, mode, inputs, stats, running, options, np.float64)
        for name, reference in double.items():
            assert single[name].dtype == np.float32
            scale = np.abs(reference).max()
            error = np.abs(single[name].astype(np.float64) - reference).max()
            assert error <= EPS32 * scale, f"{norm} {shape} {mode} seed {seed}: {name} off by {error:.3g}, its scale {scale:.3g}"
