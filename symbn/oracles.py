"""Independent oracles: the one place that check, explain, bench and the tests take their
references from.

* :func:`relative_error` and :func:`central_differences`, in NumPy.
* :func:`torch_forward`: the forward pass of any :class:`~symbn.spec.Norm`, written in plain
  PyTorch ops (reshape, mean, arithmetic, sqrt/exp/log/abs) from the spec's expression strings
  by a small ``ast`` walker of its own, with the layout's geometry written here too. Nothing of
  symbn's parser, derivation or code generation is used, so autograd of it is an independent
  reference at every order.
* Program-level transforms over torch functions (:class:`TorchProgram`, :func:`vjp`,
  :func:`jvp`, :func:`chain`), named as symbn names its own programs' inputs and outputs
  (:func:`adjoint_name`, :func:`tangent_name`).
* :func:`native_forward`, :func:`native_program`, :func:`native_reference`: PyTorch's own
  ``F.batch_norm`` & co., right at order 1 and (reverse mode) 2, wrong at reverse order 3 and at
  nested forward order 2 (their saved statistics carry no history).

PyTorch is imported lazily: this module imports without it, and what needs it raises
:class:`TorchMissing` (an ImportError) saying how to install it.
"""
from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import TorchMissing
from .spec import BUILTINS, Norm

TORCH_PIN = "torch==2.13.0"
MODES = ("train", "eval")
TRANSFORMS = ("vjp", "jvp")


def _torch():
    try:
        import torch
    except ImportError as err:
        raise TorchMissing(f"this oracle needs PyTorch ({TORCH_PIN}): pip install 'symbn[torch]'") from err
    return torch


# --------------------------------------------------------------------------- NumPy oracles

def relative_error(a, b) -> float:
    """max |a - b| / max |b|: absolute where b is all zeros, inf on a shape mismatch, 0.0 when empty."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not b.size:
        return 0.0
    difference, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    return difference / scale if scale > 0 else difference


def central_differences(f: Callable[[np.ndarray], float], value, h: float = 1e-6) -> np.ndarray:
    """d f / d value by central differences, entry by entry, in float64, with a step of
    ``h * max(1, |entry|)`` (relative to each entry). ``value`` is not modified."""
    value = np.array(value, dtype=np.float64)
    grad = np.empty_like(value)
    for index in np.ndindex(value.shape):
        step = h * max(1.0, abs(value[index]))
        up, down = value.copy(), value.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (f(up) - f(down)) / (2 * step)
    return grad


# --------------------------------------------------------------------------- spec expressions in torch

_FUNCTIONS = ("sqrt", "exp", "log", "abs")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.Pow: operator.pow}


def _evaluate(text: str, env: Mapping[str, object]):
    """A spec expression string with names from ``env`` (tensors or floats), in torch ops."""
    torch = _torch()

    def call(name: str, arg):
        arg = arg if isinstance(arg, torch.Tensor) else torch.as_tensor(float(arg), dtype=torch.float64)
        return getattr(torch, name)(arg)

    def walk(node: ast.AST):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and len(node.args) == 1 and not node.keywords):
            return call(node.func.id, walk(node.args[0]))
        raise ValueError(f"oracle: cannot evaluate {ast.unparse(node)!r} in {text!r}")

    return walk(ast.parse(text, mode="eval"))


# --------------------------------------------------------------------------- geometry

def _view(layout: str, shape: tuple[int, ...], gamma_shape, beta_shape, normalized_shape, num_groups):
    """(outer, q, p, l, s) of x, and the 5-D shape gamma and beta are viewed as."""
    ndim = len(shape)
    if layout == "trailing":
        if normalized_shape is None:
            normalized_shape = gamma_shape if gamma_shape is not None else beta_shape if beta_shape is not None else shape[-1:]
        normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not 1 <= len(normalized_shape) <= ndim or tuple(shape[ndim - len(normalized_shape):]) != normalized_shape:
            raise ValueError(f"oracle: normalized_shape {normalized_shape} does not end x's shape {shape}")
        length = math.prod(normalized_shape)
        return (1, math.prod(shape) // max(length, 1), 1, length, 1), (1, 1, 1, length, 1), normalized_shape
    least = 2 if layout == "channel" else 3
    if ndim < least:
        raise ValueError(f"oracle: layout {layout} needs x of at least {least} dimensions, got {shape}")
    n, c, s = shape[0], shape[1], math.prod(shape[2:])
    if layout == "channel":
        return (n, 1, c, 1, s), (1, 1, c, 1, 1), (c,)
    if layout == "instance":
        return (1, n, c, 1, s), (1, 1, c, 1, 1), (c,)
    if layout == "groups":
        if not num_groups or c % num_groups:
            raise ValueError(f"oracle: num_groups={num_groups} must divide the {c} channels")
        return (1, n, num_groups, c // num_groups, s), (1, 1, num_groups, c // num_groups, 1), (c,)
    raise ValueError(f"oracle: unknown layout {layout!r}")


def torch_forward(norm: Norm, x, gamma=None, beta=None, eps: float = 1e-5, *, mode: str = "train",
                  running=None, normalized_shape=None, num_groups=None):
    """y of ``norm`` in plain torch ops, differentiable to any order by autograd and by torch.func.

    x is viewed as (outer, q, p, l, s) per layout: channel (N, 1, C, 1, S); instance (1, N, C, 1, S);
    groups (1, N, G, C/G, S); trailing (1, B, 1, L, 1) with L = prod(normalized_shape) (default:
    gamma's shape, else beta's, else x's last dim). Each statistic is the mean over (outer, l, s)
    of its expression, in spec order; in ``mode="eval"`` the statistics are ``running`` instead
    (one tensor of p entries per statistic, a sequence in spec order or a mapping by name).
    gamma and beta: (C,) for channel, instance and groups, normalized_shape for trailing; None
    means 1 and 0. Returns y with x's shape.
    """
    torch = _torch()
    if mode not in MODES:
        raise ValueError(f"oracle: mode must be one of {MODES}, got {mode!r}")
    shape = tuple(x.shape)
    view, param_view, param_shape = _view(norm.layout.name, shape, None if gamma is None else tuple(gamma.shape),
                                          None if beta is None else tuple(beta.shape), normalized_shape, num_groups)
    xv = x.reshape(view)
    env: dict[str, object] = {"x": xv, "eps": float(eps)}
    if mode == "train":
        for name, text in norm.stats:
            value = _evaluate(text, env)
            value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=x.dtype)
            env[name] = torch.broadcast_to(value, view).mean(dim=(0, 3, 4), keepdim=True)
    else:
        if running is None:
            raise ValueError(f"oracle: eval mode needs running statistics ({', '.join(norm.stat_names)})")
        values = [running[s] for s in norm.stat_names] if isinstance(running, Mapping) else list(running)
        if len(values) != len(norm.stats):
            raise ValueError(f"oracle: {len(values)} running statistics for {len(norm.stats)} ({', '.join(norm.stat_names)})")
        for name, value in zip(norm.stat_names, values):
            env[name] = torch.as_tensor(value, dtype=x.dtype).reshape(1, 1, view[2], 1, 1)
    y = _evaluate(norm.normalized, env)
    for param in (gamma, beta):
        if param is not None and tuple(param.shape) != param_shape:
            raise ValueError(f"oracle: gamma and beta must have shape {param_shape}, got {tuple(param.shape)}")
    if gamma is not None:
        y = gamma.reshape(param_view) * y
    if beta is not None:
        y = y + beta.reshape(param_view)
    return torch.broadcast_to(y, view).reshape(shape)


# --------------------------------------------------------------------------- programs

@dataclass(frozen=True)
class TorchProgram:
    """A function from named tensors to named tensors; ``differentiable`` lists the inputs that
    transforms differentiate with respect to. ``autograd``: whether ``fn`` calls
    ``torch.autograd.grad`` (a VJP somewhere inside), so that torch.func cannot transform it."""

    fn: Callable[[dict], dict]
    inputs: tuple[str, ...]
    differentiable: tuple[str, ...]
    outputs: tuple[str, ...]
    autograd: bool = False

    def __call__(self, values: Mapping[str, object]) -> dict:
        missing = [name for name in self.inputs if name not in values]
        if missing:
            raise KeyError(f"program needs inputs {missing}; it takes {', '.join(self.inputs)}")
        return self.fn(dict(values))


def adjoint_name(name: str, level: int) -> str:
    """The cotangent or gradient of ``name`` at reverse level ``level``: dy, dx at 1; d2_dy, d3_x at 2, 3."""
    return "d" + name if level == 1 else f"d{level}_{name}"


def tangent_name(name: str, level: int) -> str:
    """The tangent of ``name`` at forward level ``level``: t_x at 1; t2_x, t3_t_y at 2, 3."""
    return "t_" + name if level == 1 else f"t{level}_{name}"


def _requiring_grad(value):
    """``value`` itself if autograd tracks it, else a fresh leaf that requires grad (nothing to keep)."""
    return value if value.requires_grad else value.detach().requires_grad_()


def vjp(program: TorchProgram, level: int = 1) -> TorchProgram:
    """The VJP program: inputs + one cotangent per output (``adjoint_name(o, level)``), outputs the
    gradients ``adjoint_name(i, level)`` of every differentiable input, by ``torch.autograd.grad``
    with ``create_graph=True`` so that they can be differentiated again."""
    torch = _torch()
    cotangents = tuple(adjoint_name(o, level) for o in program.outputs)
    gradients = tuple(adjoint_name(i, level) for i in program.differentiable)
    clash = set(cotangents) & set(program.inputs) | set(gradients) & set(program.inputs)
    if clash:
        raise ValueError(f"vjp at level {level}: names {sorted(clash)} are already inputs; use another level")

    def fn(values: dict) -> dict:
        values = {**values, **{i: _requiring_grad(values[i]) for i in program.differentiable}}
        out = program.fn(values)
        pairs = [(out[o], values[c]) for o, c in zip(program.outputs, cotangents) if out[o].requires_grad]
        wrt = [values[i] for i in program.differentiable]
        if not pairs:
            return {g: torch.zeros_like(v) for g, v in zip(gradients, wrt)}
        grads = torch.autograd.grad([p[0] for p in pairs], wrt, grad_outputs=[p[1] for p in pairs],
                                    create_graph=True, allow_unused=True, materialize_grads=True)
        return dict(zip(gradients, grads))

    return TorchProgram(fn, program.inputs + cotangents, program.differentiable + cotangents, gradients, autograd=True)


def jvp(program: TorchProgram, level: int = 1) -> TorchProgram:
    """The JVP program: inputs + one tangent per differentiable input (``tangent_name(i, level)``),
    outputs the tangents ``tangent_name(o, level)`` of the outputs (not the primal outputs).

    Computed with ``torch.func.jvp`` when ``program`` is functional (forward programs and JVPs of
    them). torch.func cannot transform a function that calls ``torch.autograd.grad``, so the JVP of
    a program with a VJP inside (``jvp(vjp(f))``) is computed by the double-vjp trick instead:
    with a dummy cotangent u, J t = d/du <J^T u, t>, two ``torch.autograd.grad`` calls with
    ``create_graph=True`` (exact, since J^T u is linear in u; differentiable again).
    """
    torch = _torch()
    tangents = tuple(tangent_name(i, level) for i in program.differentiable)
    results = tuple(tangent_name(o, level) for o in program.outputs)
    clash = (set(tangents) | set(results)) & set(program.inputs)
    if clash:
        raise ValueError(f"jvp at level {level}: names {sorted(clash)} are already inputs; use another level")

    def functional(values: dict) -> dict:
        rest = {k: v for k, v in values.items() if k not in program.differentiable}

        def f(*primals):
            out = program.fn({**rest, **dict(zip(program.differentiable, primals))})
            return tuple(out[o] for o in program.outputs)

        _, out = torch.func.jvp(f, tuple(values[i] for i in program.differentiable), tuple(values[t] for t in tangents))
        return dict(zip(results, out))

    def double_vjp(values: dict) -> dict:
        values = {**values, **{i: _requiring_grad(values[i]) for i in program.differentiable}}
        out = program.fn(values)
        wrt = [values[i] for i in program.differentiable]
        live = [o for o in program.outputs if out[o].requires_grad]
        dummies = {o: torch.zeros_like(out[o], requires_grad=True) for o in live}
        answer = {tangent_name(o, level): torch.zeros_like(out[o]) for o in program.outputs}
        if not live:
            return answer
        transposed = torch.autograd.grad([out[o] for o in live], wrt, grad_outputs=[dummies[o] for o in live],
                                         create_graph=True, allow_unused=True, materialize_grads=True)
        pairs = [(g, values[t]) for g, t in zip(transposed, tangents) if g.requires_grad]
        if pairs:
            forward = torch.autograd.grad([p[0] for p in pairs], [dummies[o] for o in live], grad_outputs=[p[1] for p in pairs],
                                          create_graph=True, allow_unused=True, materialize_grads=True)
            answer.update({tangent_name(o, level): g for o, g in zip(live, forward)})
        return answer

    return TorchProgram(double_vjp if program.autograd else functional, program.inputs + tangents,
                        program.differentiable + tangents, results, autograd=program.autograd)


def chain(program: TorchProgram, transforms: Sequence[str]) -> TorchProgram:
    """``transforms`` ("vjp" or "jvp") applied innermost first, at levels 1, 2, 3, ...:
    ``chain(f, ["vjp", "jvp"])`` is jvp(vjp(f, 1), 2)."""
    for level, name in enumerate(transforms, start=1):
        if name not in TRANSFORMS:
            raise ValueError(f"unknown transform {name!r}; choose from {TRANSFORMS}")
        program = (vjp if name == "vjp" else jvp)(program, level)
    return program


def forward_program(norm: Norm, mode: str = "train", eps: float = 1e-5, running=None, normalized_shape=None,
                    num_groups=None) -> TorchProgram:
    """x, gamma, beta -> y through :func:`torch_forward` (plain ops); ``running`` (eval mode) is a constant."""
    options = {"mode": mode, "running": running, "normalized_shape": normalized_shape, "num_groups": num_groups}

    def fn(values: dict) -> dict:
        return {"y": torch_forward(norm, values["x"], values.get("gamma"), values.get("beta"), eps, **options)}

    return TorchProgram(fn, ("x", "gamma", "beta"), ("x", "gamma", "beta"), ("y",))


def evaluate(program: TorchProgram, values: Mapping[str, np.ndarray], dtype=None) -> dict[str, np.ndarray]:
    """Run ``program`` on NumPy arrays: tensors of ``dtype`` (default float64), requiring grad for
    the differentiable inputs; returns its outputs as NumPy arrays."""
    torch = _torch()
    dtype = torch.float64 if dtype is None else dtype
    missing = [name for name in program.inputs if name not in values]
    if missing:
        raise KeyError(f"evaluate: missing inputs {missing}; the program takes {', '.join(program.inputs)}")
    tensors = {name: torch.tensor(np.asarray(values[name]), dtype=dtype, requires_grad=name in program.differentiable)
               for name in program.inputs}
    return {name: value.detach().numpy() for name, value in program(tensors).items()}


# --------------------------------------------------------------------------- PyTorch's own norms

def native_forward(norm: str | Norm, x, gamma, beta, eps: float = 1e-5, *, mode: str = "train", running=None,
                   normalized_shape=None, num_groups=None, momentum: float = 0.1):
    """y from PyTorch's own op (F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm,
    F.rms_norm + beta), or None where PyTorch has no such norm or mode (layer, group and RMS norm
    have no eval mode with population statistics). ``running`` (mean, var) is updated in place in
    train mode, with ``momentum``, as PyTorch does; it is required in eval mode."""
    torch = _torch()
    F = torch.nn.functional
    name = norm.name if isinstance(norm, Norm) else norm
    if isinstance(norm, Norm) and BUILTINS.get(name) != norm:
        return None
    if mode not in MODES:
        raise ValueError(f"oracle: mode must be one of {MODES}, got {mode!r}")
    train = mode == "train"
    if name in ("batchnorm", "instancenorm"):
        if running is None and not train:
            raise ValueError(f"oracle: {name} in eval mode needs running statistics (mean, var)")
        mean, var = (None, None) if running is None else (
            [running[s] for s in ("mean", "var")] if isinstance(running, Mapping) else running)
        if name == "batchnorm":
            return F.batch_norm(x, mean, var, gamma, beta, training=train, momentum=momentum, eps=eps)
        return F.instance_norm(x, mean, var, gamma, beta, use_input_stats=train, momentum=momentum, eps=eps)
    if not train or name not in BUILTINS:
        return None
    if name == "groupnorm":
        return F.group_norm(x, num_groups, gamma, beta, eps=eps)
    if normalized_shape is None:
        normalized_shape = tuple(gamma.shape) if gamma is not None else tuple(beta.shape) if beta is not None else tuple(x.shape[-1:])
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if name == "layernorm":
        return F.layer_norm(x, normalized_shape, gamma, beta, eps=eps)
    y = F.rms_norm(x, normalized_shape, gamma, eps=eps)
    return y if beta is None else y + beta


def native_program(norm: str | Norm, mode: str = "train", eps: float = 1e-5, running=None, normalized_shape=None,
                   num_groups=None) -> TorchProgram | None:
    """Like :func:`forward_program`, through :func:`native_forward`; None where PyTorch has no such
    norm or mode. In train mode the running statistics are not passed (no in-place updates)."""
    name = norm.name if isinstance(norm, Norm) else norm
    if name not in BUILTINS or (isinstance(norm, Norm) and BUILTINS[name] != norm):
        return None
    if mode == "eval" and name not in ("batchnorm", "instancenorm"):
        return None
    torch = _torch()

    def fn(values: dict) -> dict:
        x = values["x"]
        stats = None if mode == "train" else [torch.as_tensor(r, dtype=x.dtype) for r in
                                              ([running[s] for s in ("mean", "var")] if isinstance(running, Mapping) else running)]
        return {"y": native_forward(name, x, values.get("gamma"), values.get("beta"), eps, mode=mode, running=stats,
                                    normalized_shape=normalized_shape, num_groups=num_groups)}

    return TorchProgram(fn, ("x", "gamma", "beta"), ("x", "gamma", "beta"), ("y",))


def native_reference(norm: str | Norm, data: Mapping[str, np.ndarray], mode: str, dtype=np.float64, eps: float = 1e-5,
                     momentum: float = 0.1, normalized_shape=None, num_groups=None) -> dict[str, np.ndarray] | None:
    """check's PyTorch reference: y, dx, dgamma, dbeta of l = sum(dy * y) by autograd through the
    native op, and (batch and instance norm in train mode) the running statistics
    ``running_mean``, ``running_var`` updated from ``data``'s with ``momentum``. ``data`` holds x,
    dy, gamma, beta and running_<stat>; arrays are cast to ``dtype``. None where PyTorch has no
    such norm or mode."""
    torch = _torch()
    name = norm.name if isinstance(norm, Norm) else norm
    t = {k: torch.tensor(np.asarray(v).astype(dtype), requires_grad=k in ("x", "gamma", "beta")) for k, v in data.items()}
    running = {k: t[k].detach().clone() for k in data if k.startswith("running_")}
    stats = [running[k] for k in ("running_mean", "running_var")] if "running_mean" in running and "running_var" in running else None
    y = native_forward(name, t["x"], t.get("gamma"), t.get("beta"), eps, mode=mode, running=stats, momentum=momentum,
                       normalized_shape=normalized_shape, num_groups=num_groups)
    if y is None:
        return None
    wrt = [k for k in ("x", "gamma", "beta") if k in t]
    grads = torch.autograd.grad(y, [t[k] for k in wrt], grad_outputs=t["dy"], allow_unused=True, materialize_grads=True)
    out = {"y": y, **{f"d{k}": g for k, g in zip(wrt, grads)}}
    if name in ("batchnorm", "instancenorm") and mode == "train":
        out.update(running)
    return {k: v.detach().numpy() for k, v in out.items()}
