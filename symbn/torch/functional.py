"""``torch.nn.functional``'s normalizations on symbn's kernels, same signatures and defaults, and
:func:`normalize` for any norm (a built-in or a spec).

Exact at every derivative order, in reverse and forward mode (see :mod:`symbn.torch.ops`); the
semantics of PyTorch's functionals, corners included: an empty batch gives an empty result,
``rms_norm``'s ``eps=None`` is the machine epsilon of the dtype it computes in (float32 for
float16 and bfloat16), eval mode needs running statistics.
Bad input is refused as PyTorch refuses it, naming the argument (``RuntimeError``, ``ValueError``,
``TypeError``); tensors on other devices than the CPU are refused (symbn has no CUDA kernels yet).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from ..spec import Norm, resolve
from .ops import DTYPES, HALF, Level, level, traced_level

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "normalize", "rms_norm"]


def _check(name: str, t: torch.Tensor | None, like: torch.Tensor | None = None) -> None:
    """Refuse what the kernels cannot take, naming the argument."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise RuntimeError(f"{name} is on {t.device}: symbn's kernels run on the CPU only (no CUDA kernels yet); "
                           "move the model and data to the CPU or use torch.nn's layers there")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if like is not None and not name.startswith("running_") and t.dtype != like.dtype and \
            not (like.dtype in HALF and t.dtype == torch.float32):
        raise RuntimeError(f"{name} has dtype {t.dtype}, but input has {like.dtype} (parameters take input's dtype, "
                           "or float32 for float16 and bfloat16 input, as in PyTorch)")


_ARGUMENTS = {"x": "input", "gamma": "weight", "beta": "bias"}
"""The kernels' names of the arguments -> torch.nn.functional's."""
_NAMED = re.compile(r"^(x|gamma|beta)\b|(?<=of )x\b|(?<=but )x\b")
"""Where the kernels' messages name an argument: first (``gamma must have shape...``), and x as
``of x (...)``, ``but x has``."""


def _guard(call):
    """The kernels' errors as PyTorch raises them, naming torch.nn.functional's arguments (input,
    weight, bias for x, gamma, beta): RuntimeError for bad values, TypeError for bad types."""
    try:
        return call()
    except ValueError as err:
        raise RuntimeError(f"symbn: {_NAMED.sub(lambda m: _ARGUMENTS[m.group(0)], str(err))}") from None
    except TypeError as err:
        raise TypeError(f"symbn: {_NAMED.sub(lambda m: _ARGUMENTS[m.group(0)], str(err))}") from None


def normalize(norm: str | Norm, input: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              *, training: bool = True, running: Sequence[torch.Tensor | None] | None = None, momentum: float = 0.1,
              eps: float = 1e-5, normalized_shape: Sequence[int] | None = None, num_groups: int | None = None) -> torch.Tensor:
    """``norm``'s forward on ``input``, differentiable to every order.

    training: the statistics from ``input`` (every path of the gradient); ``running`` (one tensor
        per statistic, in the spec's order, or None) is then updated in place with PyTorch's rule
        (``momentum``; Bessel's correction for the spec's ``unbiased`` statistics).
    not training: ``running`` are the statistics, constants (the eval mode).
    """
    norm = resolve(norm)
    _check("input", input)
    _check("weight", weight, input)
    _check("bias", bias, input)
    names = [f"running_{s}" for s in norm.stat_names]
    given = list(running) if running is not None else [None] * len(names)
    if len(given) != len(names):
        raise ValueError(f"running must hold {len(names)} tensors ({', '.join(names)}), got {len(given)}")
    for name, t in zip(names, given):
        _check(name, t, input)
    if not training and any(t is None for t in given):
        raise RuntimeError(f"{' and '.join(names)} must be defined in evaluation mode")
    mode = "train" if training else "eval"
    compiling = torch.compiler.is_compiling()
    spec = (traced_level if compiling else level)(norm, (), mode)
    if input.numel() == 0:
        return _empty(spec, input, weight, bias, given if not training else [], normalized_shape, num_groups, compiling)
    values = {"x": input, "gamma": weight, "beta": bias, "eps": float(eps),
              **({} if training else dict(zip(norm.stat_names, given)))}
    args = [values[name] for name in spec.inputs]
    if compiling:  # the registered op: traced through its fake, reverse mode by its autograd
        outputs = getattr(torch.ops.symbn, spec.name)(*args, normalized_shape, num_groups)
    else:
        outputs = _guard(lambda: Level.call(spec, args, normalized_shape, num_groups))
    if training and any(t is not None for t in given):
        _update(spec, input, outputs, given, momentum)
    return outputs[spec.outputs.index("y")]


@torch.no_grad()
def _update(spec, input, outputs, running, momentum) -> None:
    """PyTorch's running update (the kernels' ``RUNNING`` rule): this batch's statistics averaged
    over the groups that share a running value, with Bessel's correction for the unbiased ones.
    Shapes alone give the geometry, and only torch ops are used, so torch.compile traces it."""
    if momentum is None or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    # the statistics are one per group, group_shape of them: (..., p) with p per running value, but
    # in the trailing layout, where one running value (p = 1) averages every row's; count elements each
    stats = [o for name, o in zip(spec.outputs, outputs) if name in spec.stats]
    p = 1 if spec.norm.layout.kind == "trailing" else stats[0].shape[-1]
    for name, r in zip(spec.norm.stat_names, running):
        if r is not None and tuple(r.shape) != (p,):
            raise RuntimeError(f"symbn: running_{name} must have shape {(p,)}, got {tuple(r.shape)}")
    count = input.numel() // stats[0].numel()
    if spec.unbiased and count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    for name, r, stat in zip(spec.norm.stat_names, running, stats):
        if r is not None:
            new = stat.reshape(-1, p).mean(0) * (count / (count - 1) if name in spec.unbiased else 1.0)
            r.copy_((momentum * new + (1 - momentum) * r.to(torch.float64).reshape(p)).reshape(r.shape))


def _empty(spec, input, weight, bias, running, normalized_shape, num_groups, compiling) -> torch.Tensor:
    """The result for an input with no elements, as PyTorch's: empty, of input's shape, checked
    (the shapes of the arguments, eagerly), and connected to weight and bias (zero gradients)."""
    if not compiling:
        geo = _guard(lambda: spec.geometry(input, [input, weight, bias], normalized_shape, num_groups))
        values = {"gamma": weight, "beta": bias, **dict(zip(spec.norm.stat_names, running))}
        for name, kind, role, _ in spec.table.inputs:
            t = values.get(name)
            if role == "param" and t is not None:
                shape = geo.param_shape if kind == "element" else (geo.p,)
                if tuple(t.shape) != tuple(shape):
                    label = _ARGUMENTS.get(name, f"running_{name}")
                    raise RuntimeError(f"symbn: {label} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    y = input.clone()
    for p in (weight, bias):
        if p is not None:
            y = y + 0 * p.sum()
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on symbn's kernels."""
    if training:
        size = input.shape[0] * math.prod(input.shape[2:]) if input.dim() > 1 else 0
        if size == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    return normalize("batchnorm", input, weight, bias, training=training, running=(running_mean, running_var),
                     momentum=momentum, eps=eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm`` on symbn's kernels."""
    if use_input_stats and input.dim() > 2 and math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.shape}")
    return normalize("instancenorm", input, weight, bias, training=use_input_stats,
                     running=(running_mean, running_var), momentum=momentum, eps=eps)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` on symbn's kernels."""
    return normalize("layernorm", input, weight, bias, eps=eps, normalized_shape=_ints(normalized_shape))


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` on symbn's kernels."""
    return normalize("groupnorm", input, weight, bias, eps=eps, num_groups=num_groups)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` on symbn's kernels; ``eps=None`` is the machine epsilon
    of the dtype it computes in, as in PyTorch: input's, float32's for float16 and bfloat16."""
    if eps is None and isinstance(input, torch.Tensor) and input.dtype.is_floating_point:
        eps = torch.finfo(torch.float32 if input.dtype in HALF else input.dtype).eps
    return normalize("rmsnorm", input, weight, None, eps=eps, normalized_shape=_ints(normalized_shape))


def _ints(shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)
