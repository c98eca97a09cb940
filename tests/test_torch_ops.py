"""symbn.torch's op layer: every kernel level a registered custom op (torch.ops.symbn.*), wrapped
in an autograd.Function whose backward and jvp are the levels above, and torch.nn.functional's
norms on them. References: torch.library.opcheck, gradcheck, autograd and torch.func of the
forward written in plain torch ops (symbn.oracles.torch_forward, which shares no code with the
kernels), PyTorch's own norms, and the NumPy path's messages. The five built-ins and a spec no
template saw (a fourth-moment norm) throughout; float64 and small shapes unless a test is about
dtypes or layouts."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

import symbn  # noqa: E402
from symbn import Norm, oracles  # noqa: E402
from symbn.spec import BUILTINS, CHANNEL  # noqa: E402
from symbn.torch import functional as SF  # noqa: E402
from symbn.torch import ops  # noqa: E402

F64 = torch.float64
EPS = 1e-3  # large enough that the eps terms matter
MODES = ("train", "eval")
UNITS = {"forward": (), "backward": ("vjp",), "backward2": ("vjp", "vjp"), "jvp": ("jvp",), "vjp_jvp": ("vjp", "jvp")}
"""The levels every op is checked at: the operator's name part and its chain of transforms."""

QUARTIC = Norm("quartic", stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)",
               affine="group", layout=CHANNEL)
"""A spec no template saw: scaled by the fourth central moment, per channel, with running statistics."""


@dataclass(frozen=True)
class Case:
    """A norm, a small x for it, and how torch.nn.functional's signature calls it."""

    norm: Norm
    shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    running_shape: tuple[int, ...]  # one running value per p: (C,), (num_groups,), (1,) for trailing
    options: dict = field(default_factory=dict)  # normalized_shape / num_groups, for the ops and the oracle
    bias: bool = True  # rms_norm takes no bias

    def functional(self, mode: str, running=None):
        """f(x, weight[, bias]) through symbn.torch.functional: the torch.nn.functional function
        (eval: batch and instance norm with running statistics), else normalize()."""
        name, train = self.norm.name, mode == "train"
        if name == "batchnorm":
            mean, var = running if running is not None else (None, None)
            return lambda x, w, b=None: SF.batch_norm(x, mean, var, w, b, training=train, eps=EPS)
        if name == "instancenorm":
            mean, var = running if running is not None else (None, None)
            return lambda x, w, b=None: SF.instance_norm(x, mean, var, w, b, use_input_stats=train, eps=EPS)
        if train and name == "layernorm":
            return lambda x, w, b=None: SF.layer_norm(x, self.options["normalized_shape"], w, b, EPS)
        if train and name == "groupnorm":
            return lambda x, w, b=None: SF.group_norm(x, self.options["num_groups"], w, b, EPS)
        if train and name == "rmsnorm":
            return lambda x, w, b=None: SF.rms_norm(x, self.options["normalized_shape"], w, EPS)
        return lambda x, w, b=None: SF.normalize(self.norm, x, w, b, training=train, running=running, eps=EPS,
                                                 **self.options)

    def oracle(self, mode: str, running=None):
        """The same forward in plain torch ops."""
        return lambda x, w, b=None: oracles.torch_forward(self.norm, x, w, b, EPS, mode=mode, running=running, **self.options)

    def data(self, seed: int = 0, dtype=F64):
        """x, the parameters (weight, bias; weight alone for rms_norm) and positive running statistics."""
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(self.shape, generator=g, dtype=F64) * 1.5 + 0.3).to(dtype)
        w = (torch.rand(self.param_shape, generator=g, dtype=F64) + 0.5).to(dtype)
        b = torch.randn(self.param_shape, generator=g, dtype=F64).to(dtype)
        running = tuple(torch.rand(self.running_shape, generator=g, dtype=F64) + 0.5 for _ in self.norm.stat_names)
        return x, ((w, b) if self.bias else (w,)), running


CASES = {
    "batchnorm": Case(BUILTINS["batchnorm"], (4, 3, 2), (3,), (3,)),
    "layernorm": Case(BUILTINS["layernorm"], (3, 2, 4), (2, 4), (1,), {"normalized_shape": (2, 4)}),
    "groupnorm": Case(BUILTINS["groupnorm"], (2, 4, 3), (4,), (2,), {"num_groups": 2}),
    "instancenorm": Case(BUILTINS["instancenorm"], (2, 3, 4), (3,), (3,)),
    "rmsnorm": Case(BUILTINS["rmsnorm"], (3, 5), (5,), (1,), {"normalized_shape": (5,)}, bias=False),
    "quartic": Case(QUARTIC, (5, 3), (3,), (3,)),
}


def setup(name: str, mode: str, seed: int = 0):
    """symbn's f, the oracle's f and the primals (x, weight[, bias]) of one case in one mode."""
    case = CASES[name]
    x, params, running = case.data(seed)
    running = running if mode == "eval" else None
    return case.functional(mode, running), case.oracle(mode, running), (x, *params)


def close(actual, expected, tol=1e-10, what=""):
    """Equal within tol relative to expected's largest entry (absolute below 1)."""
    assert actual is not None, f"{what}: None where the reference is {expected}"
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def relative(actual, expected) -> float:
    return oracles.relative_error(actual.detach().numpy(), expected.detach().numpy())


def flat(tensors, like) -> torch.Tensor:
    """Tensors (None: no dependence, zeros) as one vector."""
    return torch.cat([(t if t is not None else torch.zeros_like(r)).reshape(-1) for t, r in zip(tensors, like)])


def randn_like(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in tensors)


# --------------------------------------------------------------------------- 1. opcheck, every level

def level_arguments(spec, case: Case, dtype=F64, memory_format=None, seed=0):
    """Valid arguments of one level's op, from its kernel table: x (and every element input) of the
    case's shape; the statistics of a training level computed from x by the forward (they are
    functions of x, never free inputs); positive running statistics at eval levels; random
    parameters, cotangents and tangents. Differentiable inputs require grad."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(case.shape, generator=g, dtype=F64) * 1.5 + 0.3).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    ns, ng = case.options.get("normalized_shape"), case.options.get("num_groups")
    geo = spec.layout(case.shape, None, ns, ng)
    forward = ops.level(case.norm, (), "train")
    saved = dict(zip(forward.outputs, ops.Level.call(forward, [x, None, None, EPS], ns, ng)))
    args = []
    for name, kind, role, _ in spec.table.inputs:
        if role == "scalar":
            args.append(EPS)
        elif name in case.norm.stat_names:
            args.append(saved[name].detach().clone() if role == "data" else
                        torch.rand(geo.p, generator=g, dtype=F64) + 0.5)
        elif name == "x":
            args.append(x.detach().clone().requires_grad_())
        else:
            shape = (case.shape if role != "param" else geo.param_shape) if kind == "element" else \
                (geo.p,) if role == "param" else geo.group_shape
            t = torch.randn(shape, generator=g, dtype=F64).to(dtype)
            if memory_format is not None and t.dim() == x.dim():
                t = t.contiguous(memory_format=memory_format)
            args.append(t.requires_grad_())
    return (*args, ns, ng)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("name", CASES)
def test_opcheck_every_level(name, unit, mode):
    """torch.library.opcheck for every norm at every level: schema, autograd registration and fake
    tensor everywhere; AOT dispatch with the backward (the level above, traced) for the forward and
    the backward. Above them it would derive and compile a third level per op (a minute each for a
    spec); the higher-order tests run those levels against plain-ops autograd instead."""
    case = CASES[name]
    spec = ops.level(case.norm, UNITS[unit], mode)
    assert spec.name == f"{ops.op_stem(case.norm)}_{unit}_{mode}"
    op = getattr(torch.ops.symbn, spec.name)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, level_arguments(spec, case),
                          test_utils=(*checks, "test_aot_dispatch_dynamic") if unit in ("forward", "backward") else checks)


@pytest.mark.parametrize(("dtype", "memory_format"), [(torch.float32, torch.channels_last), (torch.bfloat16, None),
                                                      (torch.float16, torch.channels_last)])
@pytest.mark.parametrize("unit", ["forward", "backward"])
def test_opcheck_dtypes_and_layouts(dtype, memory_format, unit):
    """The fake implementation agrees with the kernels on dtypes (half x: float32 arithmetic,
    results in x's dtype, parameter gradients in the parameters') and on memory formats."""
    case = Case(BUILTINS["batchnorm"], (2, 3, 2, 2), (3,), (3,))
    spec = ops.level(case.norm, UNITS[unit], "train")
    args = level_arguments(spec, case, dtype, memory_format)
    torch.library.opcheck(getattr(torch.ops.symbn, spec.name), args)
    outputs = getattr(torch.ops.symbn, spec.name)(*args)
    element = outputs[0]
    assert element.dtype == dtype
    if memory_format is not None:
        assert element.is_contiguous(memory_format=memory_format)


# --------------------------------------------------------------------------- 2. gradcheck, gradgradcheck

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_gradcheck_and_gradgradcheck(name, mode):
    """Finite differences against reverse and forward mode (first order), and against the double
    backward and forward-over-reverse (second order), through the functionals in float64."""
    f, _, primals = setup(name, mode)
    primals = tuple(p.requires_grad_() for p in primals)
    assert torch.autograd.gradcheck(f, primals, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, primals, check_fwd_over_rev=True)


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_without_weight_or_bias(name):
    """Without weight and bias (affine=False, RMSNorm without weight) and with a weight alone:
    the kernels take None for gamma and beta, never for a tangent or a cotangent."""
    f, _, (x, w, *_) = setup(name, "train")
    x, w = x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: f(x, None, None), (x,), check_forward_ad=True)
    assert torch.autograd.gradcheck(lambda x, w: f(x, w, None), (x, w), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: f(x, w, None), (x, w), check_fwd_over_rev=True)


# --------------------------------------------------------------------------- 3. exact at higher orders

def _grad(output, inputs, cotangent=None):
    """autograd.grad with create_graph, all inputs; zeros where the output does not depend on
    anything (the oracle's derivatives of a constant)."""
    if not output.requires_grad:
        return tuple(torch.zeros_like(p) for p in inputs)
    return torch.autograd.grad(output, inputs, cotangent, create_graph=True, allow_unused=True, materialize_grads=True)


def reverse3(f, primals, cotangents):
    """grad of grad of grad: l1 = <y, c0>, l2 = <grad l1, c1>, l3 = <grad l2, c2>; each with create_graph."""
    p = [t.detach().requires_grad_() for t in primals]
    g1 = _grad(f(*p), p, cotangents[0])
    g2 = _grad(sum((g * v).sum() for g, v in zip(g1, cotangents[1])), p)
    g3 = _grad(sum((g * v).sum() for g, v in zip(g2, cotangents[2])), p)
    return flat(g1, p), flat(g2, p), flat(g3, p)


def jvp(f, primals, tangents):
    return torch.func.jvp(f, tuple(primals), tuple(tangents))[1]


def jvp_of_jvp(f, primals, t1, t2):
    return torch.func.jvp(lambda *p: jvp(f, p, t1), tuple(primals), tuple(t2))[1]


def jvp_of_vjp(f, primals, cotangent, tangents):
    """Forward over reverse (Hessian-vector products): torch.func.jvp of torch.func.vjp."""
    out = torch.func.jvp(lambda *p: torch.func.vjp(f, *p)[1](cotangent), tuple(primals), tuple(tangents))[1]
    return flat(out, primals)


def dual_over_grad(f, primals, cotangent, tangents):
    """Forward over reverse with dual tensors through torch.autograd.grad(create_graph=True)."""
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p.detach(), t).requires_grad_() for p, t in zip(primals, tangents)]
        grads = torch.autograd.grad(f(*duals), duals, cotangent, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        return flat([fwAD.unpack_dual(g).tangent for g in grads], primals)


def vjp_of_jvp(f, primals, tangents, cotangent):
    out = torch.func.vjp(lambda *p: jvp(f, p, tangents), *primals)[1](cotangent)
    return flat(out, primals)


TRANSFORMS = ("vjp3", "jvp", "jvp_jvp", "jvp_vjp", "dual_grad", "vjp_jvp")


def transformed(transform: str, f, primals, seed=1):
    """One higher-order derivative of f at primals, along random (co)tangents drawn from seed."""
    y = f(*primals).detach()
    c0, = randn_like([y], seed)
    t1, t2, c1, c2 = (randn_like(primals, seed + k) for k in (1, 2, 3, 4))
    if transform == "vjp3":
        return torch.cat(reverse3(f, primals, (c0, c1, c2)))
    if transform == "jvp":
        return jvp(f, primals, t1)
    if transform == "jvp_jvp":
        return jvp_of_jvp(f, primals, t1, t2)
    if transform == "jvp_vjp":
        return jvp_of_vjp(f, primals, c0, t1)
    if transform == "dual_grad":
        return dual_over_grad(f, primals, c0, t1)
    return vjp_of_jvp(f, primals, t1, c0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_higher_orders_exact(name, mode):
    """Third-order reverse, jvp, nested jvp, jvp over vjp (torch.func and dual tensors over
    autograd.grad), vjp of jvp: equal to autograd of the plain-ops forward to 1e-10 in float64."""
    f, oracle, primals = setup(name, mode)
    for transform in TRANSFORMS:
        close(transformed(transform, f, primals), transformed(transform, oracle, primals), 1e-10, f"{name} {mode} {transform}")


@pytest.mark.parametrize("name", CASES)
def test_vmap_jacobians_and_hessian(name):
    """torch.func.vmap and what is built on it (jacrev, jacfwd, hessian; a kernel has no batch
    dimension of its own: Level's vmap rule calls it per slice): exact against the plain-ops forward."""
    f, oracle, (x, w, *rest) = setup(name, "train")
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        close(transform(lambda x: f(x, w, *rest))(x), transform(lambda x: oracle(x, w, *rest))(x), 1e-10, transform.__name__)

    def hessian(g):
        return torch.func.hessian(lambda x, w: (g(x, w, *rest) ** 3).sum(), argnums=(0, 1))(x, w)

    for i, (got, want) in enumerate(zip(hessian(f), hessian(oracle))):
        for j, (a, b) in enumerate(zip(got, want)):
            close(a, b, 1e-10, f"hessian block {i}{j}")
    batch = torch.stack([x, 2 * x + 1, x.flip(0)])
    close(torch.func.vmap(lambda x: f(x, w, *rest))(batch), torch.stack([oracle(b, w, *rest) for b in batch]), 1e-12, "vmap")
    weights = torch.stack([w, w + 1])
    close(torch.func.vmap(lambda w: f(x, w, *rest))(weights), torch.stack([oracle(x, v, *rest) for v in weights]), 1e-12,
          "vmap over the weight")


@pytest.mark.parametrize("name", ["batchnorm", "layernorm"])
def test_native_pytorch_is_wrong_beyond_second_order(name):
    """PyTorch's native batch and layer norm save their statistics without history: right at
    orders 1 and 2, measurably wrong at the third order in reverse mode and in nested forward
    mode (the paths through the statistics are dropped), where symbn is exact."""
    case = CASES[name]
    native = {"batchnorm": lambda x, w, b: TF.batch_norm(x, None, None, w, b, training=True, eps=EPS),
              "layernorm": lambda x, w, b: TF.layer_norm(x, case.options["normalized_shape"], w, b, EPS)}[name]
    f, oracle, primals = setup(name, "train")
    y = oracle(*primals).detach()
    cotangents = (*randn_like([y], 1), randn_like(primals, 2), randn_like(primals, 3))
    want1, want2, want3 = reverse3(oracle, primals, cotangents)
    got1, got2, got3 = reverse3(native, primals, cotangents)
    assert relative(got1, want1) < 1e-12 and relative(got2, want2) < 1e-12  # right at orders 1 and 2
    assert relative(got3, want3) > 1e-3, "native vjp³ agrees with the plain-ops forward"
    assert relative(reverse3(f, primals, cotangents)[2], want3) < 1e-12
    t1, t2 = randn_like(primals, 4), randn_like(primals, 5)
    want = jvp_of_jvp(oracle, primals, t1, t2)
    assert relative(jvp_of_jvp(native, primals, t1, t2), want) > 1e-3, "native nested jvp agrees"
    assert relative(jvp_of_jvp(f, primals, t1, t2), want) < 1e-12


# --------------------------------------------------------------------------- 4. no silent zero

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_forward_mode_never_a_silent_zero(name, mode):
    """Along each input alone, the tangent of y (torch.func.jvp, dual tensors) and the second-order
    tangent (nested jvp) are nonzero wherever the true one is, and equal to it."""
    f, oracle, primals = setup(name, mode)
    for i, which in enumerate(("x", "weight", "bias")[:len(primals)]):
        tangents = [torch.zeros_like(p) for p in primals]
        tangents[i] = randn_like([primals[i]], 7 + i)[0]
        want = jvp(oracle, primals, tangents)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            dual = fwAD.unpack_dual(f(*duals)).tangent
        second = randn_like(primals, 20 + i)
        want2 = jvp_of_jvp(oracle, primals, tangents, second)
        for label, got, expected in (("jvp", jvp(f, primals, tangents), want), ("dual", dual, want),
                                     ("jvp_jvp", jvp_of_jvp(f, primals, tangents, second), want2)):
            what = f"{name} {mode} d/d{which} {label}"
            assert got is not None, f"{what}: no tangent"
            nonzero = expected.abs() > 1e-12 * max(1.0, expected.abs().max().item())
            # y is affine in the bias: its second-order tangent along the bias is zero, truly
            assert nonzero.any() or (which, label) == ("bias", "jvp_jvp"), f"{what}: the reference is zero"
            assert (got[nonzero] != 0).all(), f"{what}: zero tangent where the true one is nonzero"
            close(got, expected, 1e-10, what)


def test_bare_op_refuses_forward_mode():
    """A registered op alone has no forward-mode formula: PyTorch would run it below autograd and
    return zeros. It raises instead; reverse mode through it and forward mode through Level work."""
    spec = ops.level("batchnorm", (), "train")
    op = getattr(torch.ops.symbn, spec.name)
    x = torch.randn(4, 3, dtype=F64)
    t = torch.randn(4, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="no forward-mode derivative as a bare op"):
        torch.func.jvp(lambda x: op(x, None, None, EPS, None, None)[0], (x,), (t,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="silent"):
        op(fwAD.make_dual(x, t), None, None, EPS, None, None)
    # a tensor without tangent under forward mode is fine (its derivative really is zero)
    assert torch.func.jvp(lambda s: s + op(x, None, None, EPS, None, None)[0], (x,), (t,))[1].equal(t)
    want = jvp(CASES["batchnorm"].oracle("train"), (x, torch.ones(3, dtype=F64)), (t, torch.zeros(3, dtype=F64)))
    close(jvp(lambda x: ops.Level.call(spec, [x, None, None, EPS], None, None)[0], (x,), (t,)), want)
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(op(xr, None, None, EPS, None, None)[0], xr, t)
    close(dx, torch.autograd.grad(TF.batch_norm(xr, None, None, training=True, eps=EPS), xr, t)[0])


# --------------------------------------------------------------------------- 5. torch.compile

def test_compile_fullgraph_same_as_eager():
    """One compiled function using every functional (batch norm in training with running
    statistics, updated in place, and in eval), normalize() of a spec: fullgraph (no graph break),
    the same loss, gradients and running statistics as eager."""
    def step(x, w4, b4, w3, rm, rv, qm, q4):
        h = SF.batch_norm(x, rm, rv, w4, b4, training=True, momentum=0.2)
        h = SF.group_norm(h, 2, w4, b4)
        h = SF.layer_norm(h, (4, 3), None, None)
        h = SF.rms_norm(h, (3,), w3)
        h = SF.instance_norm(h, None, None, w4, b4)
        h = SF.batch_norm(h, rm, rv, w4, None, training=False)
        h = SF.normalize(QUARTIC, h.reshape(-1, 4), w4, b4, running=(qm, q4)).reshape(h.shape)
        return (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).reshape(h.shape)).sum()

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 4, 3, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64) + 0.5,
              torch.randn(4, generator=g, dtype=F64), torch.rand(3, generator=g, dtype=F64) + 0.5]
    buffers = [torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)]
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        p = [t.clone().requires_grad_() for t in params]
        b = [t.clone() for t in buffers]
        loss = fn(*p, *b)
        results.append((loss, torch.autograd.grad(loss, p), b))
    (eager, eager_grads, eager_buffers), (compiled, compiled_grads, compiled_buffers) = results
    close(compiled, eager, 1e-12, "loss")
    for i, (c, e) in enumerate(zip(compiled_grads, eager_grads)):
        close(c, e, 1e-12, f"gradient {i}")
    for i, (c, e) in enumerate(zip(compiled_buffers, eager_buffers)):
        close(c, e, 1e-12, f"running statistic {i}")
    assert not eager_buffers[0].equal(buffers[0]), "running statistics not updated"


# --------------------------------------------------------------------------- 6. tensors as users pass them

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_zero_copy(monkeypatch, dtype):
    """Contiguous float32 and float64 reach the kernel as views of the tensor's memory and its
    result is returned without a copy (and aliases no input); halves are computed in float32."""
    spec = ops.level("layernorm", (), "train")
    seen = {}
    call = spec.part._call

    def spy(kernel, values, *rest):
        outputs = call(kernel, values, *rest)
        seen["x"], seen["y"] = values[spec.inputs.index("x")], outputs[0]
        return outputs

    monkeypatch.setattr(spec.part, "_call", spy)
    x = torch.randn(6, 8, dtype=dtype)
    w, b = torch.randn(8, dtype=dtype), torch.randn(8, dtype=dtype)
    y = SF.layer_norm(x, (8,), w, b)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.data_ptr() != x.data_ptr() and y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    if dtype == torch.float16:
        assert seen["x"].dtype == np.float32
    else:
        assert seen["x"].__array_interface__["data"][0] == x.data_ptr(), "x was copied on the way in"
        assert y.data_ptr() == seen["y"].__array_interface__["data"][0], "y was copied on the way out"
    close(y.double(), TF.layer_norm(x.double(), (8,), w.double(), b.double()), 1e-6 if dtype == torch.float32 else
          (1e-15 if dtype == F64 else 2e-3))


def test_unrecorded_calls_skip_autograd(monkeypatch):
    """A call autograd would not record (grad mode off, or no input requiring grad: inference, a
    first backward's own kernel) runs the kernel without the autograd function, with the results of
    a recorded call; a recorded one builds the graph."""
    applied = []
    apply = ops.Level.apply.__func__
    monkeypatch.setattr(ops.Level, "apply", classmethod(lambda cls, *args: applied.append(1) or apply(cls, *args)))
    x, w, b = torch.randn(16, 4, dtype=F64), torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)
    plain = SF.batch_norm(x, None, None, w, b, True)
    with torch.no_grad():
        quiet = SF.batch_norm(x.requires_grad_(), None, None, w, b, True)
    assert not applied and plain.grad_fn is None and quiet.grad_fn is None
    recorded = SF.batch_norm(x, None, None, w, b, True)
    assert len(applied) == 1 and recorded.grad_fn is not None
    assert torch.equal(plain, recorded) and torch.equal(quiet, recorded)
    dy = torch.randn_like(x)
    first, = torch.autograd.grad(recorded, x, dy)  # the backward's kernel, unrecorded
    assert len(applied) == 1
    again, = torch.autograd.grad(SF.batch_norm(x, None, None, w, b, True), x, dy, create_graph=True)
    assert len(applied) == 3 and again.grad_fn is not None and torch.equal(first, again)
    reference, = torch.autograd.grad(TF.batch_norm(x, None, None, w, b, True), x, dy)
    close(first, reference, 1e-12)


LAYOUTS = {  # x of 3 channels as a view of a contiguous base of this shape
    "channels_last": ((4, 5, 6, 3), lambda b: b.permute(0, 3, 1, 2)),
    "channels_last_3d": ((2, 4, 2, 3, 3), lambda b: b.permute(0, 4, 1, 2, 3)),
    "transposed": ((4, 3, 6, 5), lambda b: b.transpose(2, 3)),
    "sliced": ((4, 3, 10, 6), lambda b: b[:, :, ::2]),
    "batch_second": ((3, 4, 5, 6), lambda b: b.transpose(0, 1)),
}


NATIVE = {  # (symbn, torch) of x with 3 channels
    "batch_norm": (lambda F, x, w, b: F.batch_norm(x, None, None, w, b, training=True)),
    "group_norm": (lambda F, x, w, b: F.group_norm(x, 3, w, b)),
    "instance_norm": (lambda F, x, w, b: F.instance_norm(x, None, None, w, b)),
    "layer_norm": (lambda F, x, w, b: F.layer_norm(x, x.shape[-2:])),
    "rms_norm": (lambda F, x, w, b: F.rms_norm(x, x.shape[-1:])),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("functional", NATIVE)
def test_strided_input_results_and_memory_format(functional, layout):
    """channels-last, transposed and sliced x: the results of PyTorch's norm (forward and the
    gradient), in the memory format PyTorch returns (channels-last kept by batch, group and RMS
    norm; contiguous otherwise)."""
    shape, view = LAYOUTS[layout]
    base = torch.randn(shape, dtype=F64)
    w, b = torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)
    bases = base.clone().requires_grad_(), base.clone().requires_grad_()
    ys, yn = NATIVE[functional](SF, view(bases[0]), w, b), NATIVE[functional](TF, view(bases[1]), w, b)
    if layout.startswith("channels_last"):
        assert view(base).is_contiguous(memory_format=getattr(torch, layout))
    close(ys, yn, 1e-12, "y")
    assert ys.stride() == yn.stride(), f"strides {ys.stride()}, PyTorch's {yn.stride()}"
    dy = torch.randn(yn.shape, dtype=F64)
    close(torch.autograd.grad(ys, bases[0], dy)[0], torch.autograd.grad(yn, bases[1], dy)[0], 1e-11, "dx")


HALF_TOL = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # one unit in the last place


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_half_precision(name, dtype):
    """float16 and bfloat16: computed with float32 arithmetic (results within one unit in the last
    place of the float64 reference on the same rounded inputs), returned in the input's dtype, the
    gradients too; float32 weight and bias with half input are accepted as in PyTorch."""
    case = CASES[name]
    x, params, _ = case.data(3, dtype)
    f, oracle = case.functional("train"), case.oracle("train")
    xs = x.clone().requires_grad_()
    ps = [p.clone().requires_grad_() for p in params]
    y = f(xs, *ps)
    assert y.dtype == dtype
    want = oracle(x.double(), *[p.double() for p in params])
    assert (y.double() - want).abs().max() <= HALF_TOL[dtype] * want.abs().max()
    dy = torch.randn(y.shape, dtype=F64).to(dtype)
    grads = torch.autograd.grad(y, [xs, *ps], dy)
    xd, pd = x.double().requires_grad_(), [p.double().requires_grad_() for p in params]
    wanted = torch.autograd.grad(oracle(xd, *pd), [xd, *pd], dy.double())
    for g, w, label in zip(grads, wanted, ("x", "weight", "bias")):
        assert g.dtype == dtype, label
        assert (g.double() - w).abs().max() <= 4 * HALF_TOL[dtype] * w.abs().max(), label
    # float32 parameters with half input: PyTorch's mixed precision
    p32 = [p.float().requires_grad_() for p in params]
    y32 = f(x, *p32)
    assert y32.dtype == dtype
    assert (y32.double() - want).abs().max() <= HALF_TOL[dtype] * want.abs().max()
    assert all(g.dtype == torch.float32 for g in torch.autograd.grad(y32, p32, dy))


@pytest.mark.parametrize("functional", NATIVE)
def test_empty_batch(functional):
    """An input with no elements gives an empty result like PyTorch's, connected to weight and
    bias (zero gradients), and its arguments are still checked."""
    x = torch.randn(0, 3, 4, dtype=F64)
    w, b = torch.rand(3, dtype=F64).requires_grad_(), torch.randn(3, dtype=F64).requires_grad_()
    ys = NATIVE[functional](SF, x, w, b)
    assert ys.shape == x.shape and ys.dtype == x.dtype
    if functional == "instance_norm":  # PyTorch's own fails: IndexError in torch.nn.functional
        with pytest.raises(IndexError):
            NATIVE[functional](TF, x, w, b)
        assert all(g.equal(torch.zeros(3, dtype=F64)) for g in torch.autograd.grad(ys.sum(), [w, b]))
        return
    yn = NATIVE[functional](TF, x, w, b)
    assert ys.shape == yn.shape and ys.dtype == yn.dtype
    if yn.requires_grad:
        for gs, gn in zip(torch.autograd.grad(ys.sum(), [w, b]), torch.autograd.grad(yn.sum(), [w, b])):
            assert gs.equal(gn)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        SF.layer_norm(torch.randn(0, 4), (4,), torch.ones(5))
    with pytest.raises(RuntimeError, match="normalized_shape"):
        SF.layer_norm(torch.randn(0, 4), (3,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_rms_norm_eps_none_is_machine_epsilon(dtype):
    """rms_norm's eps=None is the machine epsilon of the dtype it computes in, as in PyTorch:
    torch.finfo(dtype).eps, float32's for float16 and bfloat16 (visible on a tiny x)."""
    x = (torch.randn(3, 6, dtype=F64) * 1e-4).to(dtype)
    y = SF.rms_norm(x, (6,))
    assert y.equal(SF.rms_norm(x, (6,), eps=torch.finfo(dtype if dtype not in ops.HALF else torch.float32).eps))
    assert not y.equal(SF.rms_norm(x, (6,), eps=1e-5))
    close(y.double(), TF.rms_norm(x, (6,)).double(), 1e-6 if dtype not in ops.HALF else 4 * HALF_TOL[dtype])


def test_running_statistics_as_pytorch_and_numpy():
    """Training with running statistics updates them in place as PyTorch does (momentum, Bessel's
    correction of the variance) and as the NumPy kernels do; a running tensor of the wrong shape
    is refused by name before it is touched."""
    x = torch.randn(6, 3, 4, dtype=F64)
    rm, rv = torch.rand(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    nm, nv = rm.clone(), rv.clone()
    km, kv = rm.numpy().copy(), rv.numpy().copy()
    SF.batch_norm(x, rm, rv, training=True, momentum=0.3)
    TF.batch_norm(x, nm, nv, training=True, momentum=0.3)
    symbn.load("batchnorm", "numpy").forward_train(x.numpy(), running_mean=km, running_var=kv, momentum=0.3)
    for got, want in ((rm, nm), (rv, nv), (rm, torch.from_numpy(km)), (rv, torch.from_numpy(kv))):
        close(got, want, 1e-14)
    bad = torch.zeros(4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"running_mean must have shape \(3,\), got \(4,\)"):
        SF.batch_norm(x, bad, rv, training=True)
    assert bad.equal(torch.zeros(4, dtype=F64))


# --------------------------------------------------------------------------- 7. bad input

X = torch.randn(4, 3, 5)

BAD = {  # id: (call, exception, the message names the argument)
    "weight of wrong size": (lambda: SF.batch_norm(X, None, None, torch.ones(4), None, True), RuntimeError,
                             r"weight must have shape \(3,\), got \(4,\)"),
    "bias of wrong size": (lambda: SF.group_norm(X, 3, None, torch.ones(2)), RuntimeError, r"bias must have shape"),
    "running_var of wrong size": (lambda: SF.batch_norm(X, torch.zeros(3), torch.ones(2), training=False), RuntimeError,
                                  r"running_var must have shape"),
    "normalized_shape not ending x": (lambda: SF.layer_norm(X, (4,)), RuntimeError,
                                      r"normalized_shape \(4,\) must match the trailing dims of input"),
    "weight not normalized_shape": (lambda: SF.rms_norm(X, (5,), torch.ones(3, 5)), RuntimeError,
                                    r"weight must have shape \(5,\)"),
    "num_groups not dividing C": (lambda: SF.group_norm(X, 2), RuntimeError, r"num_groups must be a positive integer"),
    "x of one dimension": (lambda: SF.batch_norm(torch.randn(5), None, None, training=True), RuntimeError,
                           r"input must have shape \(N, C, \*spatial\)"),
    "int input": (lambda: SF.layer_norm(torch.ones(4, 5, dtype=torch.int64), (5,)), TypeError, r"input must be float32"),
    "complex input": (lambda: SF.rms_norm(torch.ones(4, 5, dtype=torch.complex64), (5,)), TypeError, r"input must be"),
    "int weight": (lambda: SF.layer_norm(torch.ones(4, 5), (5,), torch.ones(5, dtype=torch.int32)), TypeError,
                   r"weight must be float32"),
    "float64 weight, float32 input": (lambda: SF.layer_norm(torch.ones(4, 5), (5,), torch.ones(5, dtype=F64)), RuntimeError,
                                      r"weight has dtype torch.float64, but input has torch.float32"),
    "bfloat16 weight, float32 input": (lambda: SF.batch_norm(X, None, None, torch.ones(3, dtype=torch.bfloat16), None, True),
                                       RuntimeError, r"weight has dtype torch.bfloat16"),
    "input on another device": (lambda: SF.layer_norm(torch.randn(4, 5, device="meta"), (5,)), RuntimeError,
                                r"input is on meta: symbn's kernels run on the CPU only"),
    "weight on another device": (lambda: SF.batch_norm(X, None, None, torch.ones(3, device="meta"), None, True), RuntimeError,
                                 r"weight is on meta"),
    "running_mean on another device": (lambda: SF.batch_norm(X, torch.zeros(3, device="meta"), torch.ones(3), training=False),
                                       RuntimeError, r"running_mean is on meta"),
    "NaN in input": (lambda: SF.layer_norm(torch.tensor([[1.0, float("nan"), 2.0]]), (3,)), RuntimeError,
                     r"input contains NaN or infinity"),
    "infinity in input, eval": (lambda: SF.batch_norm(torch.tensor([[1.0, float("inf")], [2.0, 3.0]]), torch.zeros(2),
                                                      torch.ones(2), training=False), RuntimeError, r"input contains NaN"),
    "NaN in weight": (lambda: SF.instance_norm(X, None, None, torch.tensor([1.0, float("nan"), 1.0])), RuntimeError,
                      r"weight contains NaN or infinity"),
    "negative running_var": (lambda: SF.batch_norm(X, torch.zeros(3), -torch.ones(3), training=False), RuntimeError,
                             r"running_var must be non-negative"),
    "negative eps": (lambda: SF.layer_norm(X, (5,), eps=-1.0), RuntimeError, r"eps must be a positive finite number"),
    "eval without running statistics": (lambda: SF.batch_norm(X, None, None, training=False), RuntimeError,
                                        r"running_mean and running_var must be defined in evaluation mode"),
    "one value per channel": (lambda: SF.batch_norm(torch.randn(1, 3), None, None, training=True), ValueError,
                              r"Expected more than 1 value per channel"),
    "list for input": (lambda: SF.layer_norm([[1.0, 2.0]], (2,)), TypeError, r"input must be a Tensor, got list"),
    "running of the wrong count": (lambda: SF.normalize("rmsnorm", X, running=(None, None)), ValueError,
                                   r"running must hold 1 tensors \(running_ms\)"),
    "momentum out of range": (lambda: SF.batch_norm(X, torch.zeros(3), torch.ones(3), training=True, momentum=2.0),
                              ValueError, r"momentum must be a number in \[0, 1\]"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_by_name(case):
    """Refused with PyTorch's exception types, naming torch.nn.functional's argument."""
    call, exception, message = BAD[case]
    with pytest.raises(exception, match=message):
        call()


def test_messages_correspond_to_the_numpy_path():
    """Where the NumPy kernels refuse the same input, the torch path's message is theirs with
    torch.nn.functional's names for the arguments (input, weight, bias for x, gamma, beta)."""
    x = np.random.default_rng(0).normal(size=(4, 3, 5))
    bn, ln = symbn.load("batchnorm", "numpy"), symbn.load("layernorm", "numpy")
    nan = x.copy()
    nan[1, 2, 3] = np.nan
    pairs = [
        (lambda: bn.forward_train(x, np.ones(4)), lambda t: SF.batch_norm(t, None, None, torch.ones(4, dtype=F64), None, True)),
        (lambda: bn.forward_train(x, None, np.ones(2)), lambda t: SF.batch_norm(t, None, None, None, torch.ones(2, dtype=F64), True)),
        (lambda: bn.forward_train(nan), lambda t: SF.batch_norm(torch.from_numpy(nan), None, None, training=True)),
        (lambda: bn.forward_train(x, np.array([1.0, np.inf, 1.0])),
         lambda t: SF.batch_norm(t, None, None, torch.tensor([1.0, np.inf, 1.0], dtype=F64), None, True)),
        (lambda: bn.forward_eval(x, None, None, np.zeros(3), -np.ones(3)),
         lambda t: SF.batch_norm(t, torch.zeros(3), -torch.ones(3), training=False)),
        (lambda: bn.forward_train(x, eps=0.0), lambda t: SF.batch_norm(t, None, None, training=True, eps=0.0)),
        (lambda: ln.forward_train(x, normalized_shape=(4,)), lambda t: SF.layer_norm(t, (4,))),
        (lambda: symbn.load("groupnorm", "numpy").forward_train(x, num_groups=2), lambda t: SF.group_norm(t, 2)),
    ]
    names = {"x": "input", "gamma": "weight", "beta": "bias"}
    for numpy_call, torch_call in pairs:
        with pytest.raises(ValueError) as numpy_error:
            numpy_call()
        with pytest.raises(RuntimeError) as torch_error:
            torch_call(torch.from_numpy(x))
        expected = re.sub(r"^(x|gamma|beta)\b|(?<=of )x\b", lambda m: names[m.group(0)], str(numpy_error.value))
        assert str(torch_error.value) == f"symbn: {expected}"


def test_bad_cotangent_is_refused_in_the_backward():
    """NaN reaching a backward kernel (the cotangent) raises, naming it, instead of spreading."""
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    y = SF.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="dy contains NaN or infinity"):
        torch.autograd.grad(y, x, torch.full_like(y, float("nan")))
