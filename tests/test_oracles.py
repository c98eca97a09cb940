"""The oracles themselves: NumPy helpers, the plain-ops PyTorch forward of any spec, program
transforms at orders 1 to 3, and PyTorch's own norms (right at order 1 and reverse order 2,
wrong beyond for batch, layer and instance norm)."""
import re
import subprocess
import sys

import numpy as np
import pytest

from symbn import oracles
from symbn.oracles import adjoint_name, central_differences, chain, relative_error, tangent_name
from symbn.spec import BUILTINS, CHANNEL, TRAILING, Norm

EPS = 1e-5
QUARTIC = Norm("quartic", stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)",
               affine="group", layout=CHANNEL)
MADNORM = Norm("madnorm", stats={"mean": "x", "mad": "abs(x - mean)"}, normalized="(x - mean)/(mad + eps)",
               affine="element", layout=TRAILING)
USER = {"quartic": QUARTIC, "madnorm": MADNORM}
SPECS = {**BUILTINS, **USER}
PRIMALS = ("x", "gamma", "beta", "y")


def torch_or_skip():
    return pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'symbn[torch]'")


# --------------------------------------------------------------------------- NumPy helpers

def test_relative_error():
    assert relative_error([1.0, 2.0], [1.0, 4.0]) == pytest.approx(0.5)
    assert relative_error([1e-3, 0.0], [0.0, 0.0]) == pytest.approx(1e-3)  # absolute where b is all zero
    assert relative_error(np.ones(3), np.ones(4)) == float("inf")
    assert relative_error(np.ones((3, 1)), np.ones(3)) == float("inf")
    assert relative_error(np.empty(0), np.empty(0)) == 0.0
    assert relative_error(np.arange(4.0), np.arange(4.0)) == 0.0


def test_central_differences_of_a_cubic():
    v = np.array([[0.3, -1.5, 2.0], [7.0, 0.0, -0.01]])
    before = v.copy()
    grad = central_differences(lambda u: float(np.sum(u**3)), v)
    assert grad.dtype == np.float64 and grad.shape == v.shape
    assert relative_error(grad, 3 * v**2) < 1e-9  # roundoff: f is O(400), the step 1e-6
    np.testing.assert_allclose(grad, 3 * v**2, rtol=1e-4)
    np.testing.assert_array_equal(v, before)
    ints = central_differences(lambda u: float(np.sum(u**2)), np.array([1, 2]))  # integer input: float64 steps
    np.testing.assert_allclose(ints, [2.0, 4.0], rtol=1e-8)


def test_imports_without_torch_and_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from symbn import oracles\n"
            "from symbn.spec import BATCHNORM\n"
            "assert oracles.relative_error([1.0], [2.0]) == 0.5\n"
            "try:\n"
            "    oracles.torch_forward(BATCHNORM, np.ones((2, 3)))\n"
            "except ImportError as e:\n"
            "    assert isinstance(e, oracles.TorchMissing) and \"pip install 'symbn[torch]'\" in str(e), e\n"
            "    assert 'torch==2.13.0' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert done.returncode == 0, done.stderr


def test_names():
    assert [adjoint_name("y", 1), adjoint_name("x", 2), adjoint_name("d2_dx", 3)] == ["dy", "d2_x", "d3_d2_dx"]
    assert [tangent_name("x", 1), tangent_name("t_y", 2), tangent_name("gamma", 3)] == ["t_x", "t2_t_y", "t3_gamma"]


# --------------------------------------------------------------------------- problems

def options(norm: Norm, shape) -> dict:
    return {"groups": {"num_groups": 2}}.get(norm.layout.name, {})


def small_shape(norm: Norm, big: bool = False) -> tuple[int, ...]:
    return {"channel": (2, 3, 2, 2) if big else (6, 3), "instance": (2, 3, 2, 2) if big else (2, 3, 4),
            "groups": (2, 4, 2, 2) if big else (2, 4, 3), "trailing": (2, 3, 4) if big else (4, 5)}[norm.layout.name]


def param_shape(norm: Norm, shape) -> tuple[int, ...]:
    return (shape[-1],) if norm.layout.name == "trailing" else (shape[1],)


def running_count(norm: Norm, shape) -> int:
    return {"channel": shape[1], "instance": shape[1], "groups": 2, "trailing": 1}[norm.layout.name]


def problem(norm: Norm, shape, mode: str, seed: int = 0):
    """x, gamma, beta and (eval) running statistics, positive where a statistic is a scale."""
    rng = np.random.default_rng(seed)
    ps = param_shape(norm, shape)
    base = {"x": rng.normal(0.5, 2.0, shape), "gamma": rng.normal(1.0, 0.3, ps), "beta": rng.normal(size=ps)}
    p = running_count(norm, shape)
    running = None if mode == "train" else [rng.normal(size=p) if s == "mean" else rng.uniform(0.5, 2.0, p) for s in norm.stat_names]
    return base, running


def primal_of(name: str) -> str:
    while name not in PRIMALS:
        stripped = re.sub(r"^(d\d+_|t\d+_|t_|d)", "", name, count=1)
        assert stripped != name, name
        name = stripped
    return name


def fill(program, base: dict, shape, seed: int = 1) -> dict:
    """``base`` plus a random value for every other input (a cotangent or tangent of some primal)."""
    rng = np.random.default_rng(seed)
    values = dict(base)
    for name in program.inputs:
        if name not in values:
            primal = primal_of(name)
            values[name] = rng.normal(size=shape if primal == "y" else base[primal].shape)
    return values


def program(norm: Norm, mode: str, running, shape, native: bool = False):
    make = oracles.native_program if native else oracles.forward_program
    return make(norm, mode, EPS, running=running, **options(norm, shape))


# --------------------------------------------------------------------------- forward against PyTorch's own

NATIVE_CASES = [(name, mode) for name in BUILTINS for mode in ("train", "eval") if mode == "train" or name in ("batchnorm", "instancenorm")]


@pytest.mark.parametrize("big", [False, True], ids=["small", "4d"])
@pytest.mark.parametrize("affine", ["gamma+beta", "gamma", "beta", "none"])
@pytest.mark.parametrize("name,mode", NATIVE_CASES)
def test_forward_equals_native(name, mode, affine, big):
    torch = torch_or_skip()
    norm = BUILTINS[name]
    shape = small_shape(norm, big)
    base, running = problem(norm, shape, mode)
    t = {k: torch.tensor(v) for k, v in base.items()}
    gamma = t["gamma"] if "gamma" in affine else None
    beta = t["beta"] if "beta" in affine else None
    stats = None if running is None else [torch.tensor(r) for r in running]
    normalized = {"normalized_shape": shape[-2:]} if big and norm.layout.name == "trailing" else {}
    if normalized:
        gamma = None if gamma is None else torch.tensor(np.random.default_rng(3).normal(size=shape[-2:]))
        beta = None if beta is None else torch.tensor(np.random.default_rng(4).normal(size=shape[-2:]))
    ours = oracles.torch_forward(norm, t["x"], gamma, beta, EPS, mode=mode, running=stats, **options(norm, shape), **normalized)
    theirs = oracles.native_forward(name, t["x"], gamma, beta, EPS, mode=mode, running=stats, **options(norm, shape), **normalized)
    assert ours.shape == t["x"].shape
    assert relative_error(ours.numpy(), theirs.numpy()) < 1e-12


def test_native_has_no_population_statistics_for_layer_group_rms():
    torch = torch_or_skip()
    x = torch.ones(2, 4, 3, dtype=torch.float64)
    for name in ("layernorm", "groupnorm", "rmsnorm"):
        assert oracles.native_forward(name, x, None, None, mode="eval", running=[torch.zeros(1)] * 2, num_groups=2) is None
        assert oracles.native_program(name, "eval", running=[np.zeros(1)] * 2) is None
    assert oracles.native_program(QUARTIC, "train") is None


# --------------------------------------------------------------------------- orders 1 and 2 against PyTorch's own

@pytest.mark.parametrize("transforms", [["vjp"], ["jvp"], ["vjp", "vjp"], ["vjp", "jvp"]], ids="-".join)
@pytest.mark.parametrize("name,mode", NATIVE_CASES)
def test_orders_one_and_two_equal_native(name, mode, transforms):
    """Where PyTorch's own ops are right: order 1, reverse-over-reverse and forward-over-reverse."""
    torch_or_skip()
    norm = BUILTINS[name]
    shape = small_shape(norm, big=True)
    base, running = problem(norm, shape, mode)
    ours = chain(program(norm, mode, running, shape), transforms)
    theirs = chain(program(norm, mode, running, shape, native=True), transforms)
    assert ours.inputs == theirs.inputs and ours.outputs == theirs.outputs
    values = fill(ours, base, shape)
    a, b = oracles.evaluate(ours, values), oracles.evaluate(theirs, values)
    for key in ours.outputs:
        assert relative_error(a[key], b[key]) < 1e-12, key


# --------------------------------------------------------------------------- PyTorch's own beyond: documented wrong

def test_native_batchnorm_is_wrong_at_reverse_order_three():
    """PyTorch 2.13's native batch norm freezes its saved statistics when its backward is
    differentiated again: vjp^3 differs from the plain-ops program (which central differences
    confirm, below). When this fails, PyTorch fixed it: turn this into an equality test."""
    torch_or_skip()
    norm = BUILTINS["batchnorm"]
    base, _ = problem(norm, (6, 3), "train")
    ours, theirs = (chain(program(norm, "train", None, (6, 3), native=n), ["vjp"] * 3) for n in (False, True))
    values = fill(ours, base, (6, 3))
    a, b = oracles.evaluate(ours, values), oracles.evaluate(theirs, values)
    assert max(np.max(np.abs(a[k] - b[k])) for k in ours.outputs) > 1e-3


@pytest.mark.parametrize("name", ["batchnorm", "layernorm", "instancenorm"])
def test_native_is_wrong_at_reverse_order_three(name):
    torch_or_skip()
    norm = BUILTINS[name]
    shape = small_shape(norm)
    base, _ = problem(norm, shape, "train")
    ours, theirs = (chain(program(norm, "train", None, shape, native=n), ["vjp"] * 3) for n in (False, True))
    values = fill(ours, base, shape)
    a, b = oracles.evaluate(ours, values), oracles.evaluate(theirs, values)
    assert max(relative_error(b[k], a[k]) for k in ours.outputs) > 1e-3


@pytest.mark.parametrize("name", ["batchnorm", "layernorm", "instancenorm"])
@pytest.mark.parametrize("transforms", [["jvp", "jvp"], ["jvp", "vjp"]], ids="-".join)
def test_native_is_wrong_at_nested_forward_order_two(name, transforms):
    """Nested forward mode (and reverse over forward) through the native op is wrong at order 2."""
    torch_or_skip()
    norm = BUILTINS[name]
    shape = small_shape(norm)
    base, _ = problem(norm, shape, "train")
    ours, theirs = (chain(program(norm, "train", None, shape, native=n), transforms) for n in (False, True))
    values = fill(ours, base, shape)
    a, b = oracles.evaluate(ours, values), oracles.evaluate(theirs, values)
    assert max(relative_error(b[k], a[k]) for k in ours.outputs) > 1e-3


def test_native_batchnorm_nested_jvp_breaks_shift_invariance():
    """y(x + c) = y(x) per channel, and the sum of y over a channel is N*beta: every second
    derivative in x along a constant shift, and of the channel sums, is 0. The plain-ops program
    gets 0; the native op does not, when the shift is the outer direction (its nested JVP is not
    even symmetric: with the shift as the inner direction it gets 0)."""
    torch_or_skip()
    norm = BUILTINS["batchnorm"]
    base, _ = problem(norm, (6, 3), "train")
    ours, theirs = (chain(program(norm, "train", None, (6, 3), native=n), ["jvp", "jvp"]) for n in (False, True))
    rng = np.random.default_rng(5)
    zeros = {name: np.zeros_like(base[primal_of(name)]) for name in ours.inputs if name not in base}
    for t_x, t2_x in ((rng.normal(size=(6, 3)), np.ones((6, 3))), (rng.normal(size=(6, 3)), rng.normal(size=(6, 3)))):
        values = {**base, **zeros, "t_x": t_x, "t2_x": t2_x}
        a, b = oracles.evaluate(ours, values)["t2_t_y"], oracles.evaluate(theirs, values)["t2_t_y"]
        assert np.max(np.abs(a.sum(axis=0))) < 1e-12
        assert np.max(np.abs(b.sum(axis=0))) > 1e-2
    values = {**base, **zeros, "t_x": rng.normal(size=(6, 3)), "t2_x": np.ones((6, 3))}
    assert np.max(np.abs(oracles.evaluate(ours, values)["t2_t_y"])) < 1e-12
    assert np.max(np.abs(oracles.evaluate(theirs, values)["t2_t_y"])) > 1e-2


@pytest.mark.parametrize("name", ["rmsnorm", "groupnorm"])
def test_native_rms_and_group_norm_agree_at_order_three(name):
    """These two are right at order 3 in PyTorch 2.13: an independent agreement for the oracle."""
    torch_or_skip()
    norm = BUILTINS[name]
    shape = small_shape(norm)
    base, _ = problem(norm, shape, "train")
    for transforms in (["vjp"] * 3, ["jvp", "jvp"], ["jvp", "vjp"]):
        ours, theirs = (chain(program(norm, "train", None, shape, native=n), transforms) for n in (False, True))
        values = fill(ours, base, shape)
        a, b = oracles.evaluate(ours, values), oracles.evaluate(theirs, values)
        for key in ours.outputs:
            assert relative_error(a[key], b[key]) < 1e-11, (transforms, key)


# --------------------------------------------------------------------------- every order against central differences

FD_CASES = [(name, mode) for name in SPECS for mode in ("train", "eval")]


def reverse_against_fd(inner, base, shape, level):
    """vjp(inner) against central differences of <cotangents, inner>."""
    outer = oracles.vjp(inner, level)
    values = fill(outer, base, shape, seed=level)
    got = oracles.evaluate(outer, values)
    cotangents = {o: values[adjoint_name(o, level)] for o in inner.outputs}

    def loss(name, v):
        out = oracles.evaluate(inner, {**values, name: v})
        return float(sum(np.sum(cotangents[o] * out[o]) for o in inner.outputs))

    for name in inner.differentiable:
        fd = central_differences(lambda v, name=name: loss(name, v), values[name])
        assert relative_error(got[adjoint_name(name, level)], fd) < 1e-6, adjoint_name(name, level)


def forward_against_fd(inner, base, shape, level, h=1e-6):
    """jvp(inner) against central differences of inner along the tangent direction."""
    outer = oracles.jvp(inner, level)
    values = fill(outer, base, shape, seed=10 + level)
    got = oracles.evaluate(outer, values)
    step = {i: values[tangent_name(i, level)] for i in inner.differentiable}
    up = oracles.evaluate(inner, {**values, **{i: values[i] + h * step[i] for i in step}})
    down = oracles.evaluate(inner, {**values, **{i: values[i] - h * step[i] for i in step}})
    for o in inner.outputs:
        assert relative_error(got[tangent_name(o, level)], (up[o] - down[o]) / (2 * h)) < 1e-6, tangent_name(o, level)


@pytest.mark.parametrize("name,mode", FD_CASES)
def test_reverse_orders_two_and_three_against_central_differences(name, mode):
    torch_or_skip()
    norm = SPECS[name]
    shape = small_shape(norm)
    base, running = problem(norm, shape, mode)
    f = program(norm, mode, running, shape)
    reverse_against_fd(f, base, shape, 1)
    reverse_against_fd(chain(f, ["vjp"]), base, shape, 2)
    reverse_against_fd(chain(f, ["vjp", "vjp"]), base, shape, 3)


@pytest.mark.parametrize("name,mode", FD_CASES)
def test_forward_and_mixed_orders_against_central_differences(name, mode):
    torch_or_skip()
    norm = SPECS[name]
    shape = small_shape(norm)
    base, running = problem(norm, shape, mode)
    f = program(norm, mode, running, shape)
    forward_against_fd(f, base, shape, 1)
    forward_against_fd(chain(f, ["jvp"]), base, shape, 2)  # jvp(jvp(f))
    forward_against_fd(chain(f, ["vjp"]), base, shape, 2)  # jvp(vjp(f)): the double-vjp trick
    reverse_against_fd(chain(f, ["jvp"]), base, shape, 2)  # vjp(jvp(f))
    forward_against_fd(chain(f, ["jvp", "jvp"]), base, shape, 3)  # jvp(jvp(jvp(f)))


# --------------------------------------------------------------------------- identities between the mixed orders

@pytest.mark.parametrize("name,mode", FD_CASES)
def test_hessian_vector_products_agree(name, mode):
    """With g = vjp(f) (inputs theta = x, gamma, beta and dy; outputs dtheta):
    jvp(g) in direction (t_theta = w, t_dy = 0) is the Hessian of <dy, f> times w, and so is
    vjp(g) with cotangent d2_dtheta = w (the Hessian is symmetric); and for any t and w,
    <jvp(g)(t), w> = <t, vjp(g)(w)> over all of g's inputs. vjp(jvp(f)) with cotangent
    d2_t_y = dy gives the same Hessian-vector product (d2_theta) and the first-order VJP (d2_t_theta)."""
    torch_or_skip()
    norm = SPECS[name]
    shape = small_shape(norm)
    base, running = problem(norm, shape, mode)
    f = program(norm, mode, running, shape)
    rng = np.random.default_rng(7)
    theta = ("x", "gamma", "beta")
    dy = rng.normal(size=shape)
    w = {i: rng.normal(size=base[i].shape) for i in theta}

    over = chain(f, ["vjp", "jvp"])  # jvp(vjp(f))
    hvp_forward = oracles.evaluate(over, {**base, "dy": dy, **{f"t2_{i}": w[i] for i in theta}, "t2_dy": np.zeros(shape)})
    twice = chain(f, ["vjp", "vjp"])  # vjp(vjp(f))
    hvp_reverse = oracles.evaluate(twice, {**base, "dy": dy, **{f"d2_d{i}": w[i] for i in theta}})
    for i in theta:
        assert relative_error(hvp_forward[f"t2_d{i}"], hvp_reverse[f"d2_{i}"]) < 1e-12, i

    t = {name: rng.normal(size=(shape if name == "dy" else base[name].shape)) for name in (*theta, "dy")}
    forward = oracles.evaluate(over, {**base, "dy": dy, **{f"t2_{k}": v for k, v in t.items()}})
    reverse = oracles.evaluate(twice, {**base, "dy": dy, **{f"d2_d{i}": w[i] for i in theta}})
    lhs = sum(np.sum(forward[f"t2_d{i}"] * w[i]) for i in theta)
    rhs = sum(np.sum(t[k] * reverse[f"d2_{k}"]) for k in t)
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)

    reverse_over_forward = oracles.evaluate(chain(f, ["jvp", "vjp"]), {**base, **{f"t_{i}": w[i] for i in theta}, "d2_t_y": dy})
    first = oracles.evaluate(chain(f, ["vjp"]), {**base, "dy": dy})
    for i in theta:
        assert relative_error(reverse_over_forward[f"d2_{i}"], hvp_reverse[f"d2_{i}"]) < 1e-12, i
        assert relative_error(reverse_over_forward[f"d2_t_{i}"], first[f"d{i}"]) < 1e-12, i


def test_program_names():
    torch_or_skip()
    f = oracles.forward_program(BUILTINS["batchnorm"])
    assert chain(f, ["vjp"]).inputs == ("x", "gamma", "beta", "dy")
    assert chain(f, ["vjp"]).outputs == ("dx", "dgamma", "dbeta")
    assert chain(f, ["vjp", "vjp"]).outputs == ("d2_x", "d2_gamma", "d2_beta", "d2_dy")
    assert chain(f, ["vjp", "jvp"]).outputs == ("t2_dx", "t2_dgamma", "t2_dbeta")
    assert chain(f, ["jvp", "jvp"]).inputs == ("x", "gamma", "beta", "t_x", "t_gamma", "t_beta", "t2_x", "t2_gamma", "t2_beta",
                                                "t2_t_x", "t2_t_gamma", "t2_t_beta")
    assert chain(f, ["jvp", "vjp"]).outputs == ("d2_x", "d2_gamma", "d2_beta", "d2_t_x", "d2_t_gamma", "d2_t_beta")
    with pytest.raises(ValueError, match="unknown transform"):
        chain(f, ["grad"])


# --------------------------------------------------------------------------- user specs against a hand-written NumPy forward

def numpy_forward(name, x, gamma, beta, eps=EPS, running=None):
    """The two user specs, written by hand: quartic per channel of (N, C), madnorm per row."""
    axis, keep = (0, True) if name == "quartic" else (-1, True)
    if running is None:
        mean = x.mean(axis=axis, keepdims=keep)
        spread = ((x - mean) ** 4 if name == "quartic" else np.abs(x - mean)).mean(axis=axis, keepdims=keep)
    else:
        mean, spread = running
    xhat = (x - mean) / ((spread + eps) ** 0.25 if name == "quartic" else spread + eps)
    return gamma * xhat + beta


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(USER))
def test_user_specs_against_numpy_and_central_differences(name, mode):
    torch = torch_or_skip()
    norm = USER[name]
    shape = small_shape(norm)
    base, running = problem(norm, shape, mode)
    t = {k: torch.tensor(v) for k, v in base.items()}
    ours = oracles.torch_forward(norm, t["x"], t["gamma"], t["beta"], EPS, mode=mode,
                                 running=None if running is None else [torch.tensor(r) for r in running]).numpy()
    mine = numpy_forward(name, base["x"], base["gamma"], base["beta"], running=running)
    assert relative_error(ours, mine) < 1e-12

    dy = np.random.default_rng(9).normal(size=shape)
    got = oracles.evaluate(chain(oracles.forward_program(norm, mode, EPS, running=running), ["vjp"]), {**base, "dy": dy})
    for k in ("x", "gamma", "beta"):
        loss = lambda v, k=k: float(np.sum(dy * numpy_forward(name, **{**base, k: v}, running=running)))  # noqa: E731
        assert relative_error(got[f"d{k}"], central_differences(loss, base[k])) < 1e-6, k


# --------------------------------------------------------------------------- check's reference

def test_native_reference_matches_autograd_and_updates_running():
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(6, 3)), "dy": rng.normal(size=(6, 3)), "gamma": rng.normal(size=3), "beta": rng.normal(size=3),
            "running_mean": np.zeros(3), "running_var": np.ones(3)}
    out = oracles.native_reference("batchnorm", data, "train")
    x = data["x"]
    assert relative_error(out["running_mean"], 0.1 * x.mean(0)) < 1e-14
    assert relative_error(out["running_var"], 0.9 + 0.1 * x.var(0, ddof=1)) < 1e-14
    got = oracles.evaluate(chain(oracles.forward_program(BUILTINS["batchnorm"]), ["vjp"]), data)
    for k in ("dx", "dgamma", "dbeta"):
        assert relative_error(out[k], got[k]) < 1e-12
    assert oracles.native_reference("layernorm", {**data, "gamma": data["gamma"], "beta": data["beta"]}, "eval") is None
    assert torch is not None
