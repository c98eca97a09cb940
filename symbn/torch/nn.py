"""``torch.nn``'s normalization layers on symbn's kernels, a layer for any spec, and :func:`convert`.

- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`, :class:`LayerNorm`,
  :class:`GroupNorm`, :class:`InstanceNorm1d`, :class:`InstanceNorm2d`, :class:`InstanceNorm3d`,
  :class:`RMSNorm`: subclasses of the ``torch.nn`` class of the same name that override ``forward``
  alone. Constructor arguments, parameters, buffers, ``state_dict`` keys (and its loading of old
  versions), ``reset_parameters``, ``repr`` are ``torch.nn``'s, so a state dict moves strictly
  between the two either way; ``forward`` is ``torch.nn``'s, line for line (``num_batches_tracked``,
  ``momentum=None`` as a cumulative average, batch statistics in eval mode without running ones,
  InstanceNorm's unbatched input and its ``num_features`` check), with
  :mod:`symbn.torch.functional` in place of ``torch.nn.functional``: the same values, and exact
  derivatives at every order. ``isinstance(m, torch.nn.BatchNorm2d)`` holds.
- :class:`Norm`: the layer of any :class:`symbn.Norm` spec (or built-in by name), its parameters
  shaped by the spec's layout, one running buffer ``running_<stat>`` per statistic.
- :func:`convert`: a model's ``torch.nn`` normalization layers swapped for these.

Like the functionals, the layers run on the CPU only: an input, parameter or buffer elsewhere is
refused by name when ``forward`` runs (the layers themselves may be built anywhere, ``meta`` too).
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch

from ..spec import Norm as Spec
from ..spec import resolve
from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "LayerNorm", "Norm", "RMSNorm", "convert"]


class _BatchNorm:
    """``torch.nn.modules.batchnorm._BatchNorm.forward`` on :func:`symbn.torch.functional.batch_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # batch statistics in training, and in eval mode when there are no running ones
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        # the buffers are passed to be updated (training, tracked) or to be used (eval)
        keep = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                            self.weight, self.bias, bn_training, factor, self.eps)


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` on symbn's kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` on symbn's kernels: input (N, C, H, W), any memory format
    (the output takes the input's, channels_last included)."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` on symbn's kernels: input (N, C, D, H, W)."""


class _InstanceNorm:
    """``torch.nn.modules.instancenorm._InstanceNorm.forward`` on
    :func:`symbn.torch.functional.instance_norm`; unbatched input gets a batch of one."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                                 f" ({self.num_features}), but got: {input.size(feature_dim)}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. "
                          "You can silence this warning by not passing in num_features, "
                          "which is not used because affine=False", stacklevel=2)
        if input.dim() == self._get_no_batch_dim():
            return self._instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._instance_norm(input)

    def _instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        # momentum=None is 0: torch.nn's instance norm has no cumulative average (nor counts batches)
        return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               self.training or not self.track_running_stats,
                               self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """:class:`torch.nn.InstanceNorm1d` on symbn's kernels: input (N, C, L) or unbatched (C, L)."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """:class:`torch.nn.InstanceNorm2d` on symbn's kernels: input (N, C, H, W) or unbatched (C, H, W)."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """:class:`torch.nn.InstanceNorm3d` on symbn's kernels: input (N, C, D, H, W) or unbatched (C, D, H, W)."""


class LayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` on symbn's kernels: input (*, *normalized_shape)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` on symbn's kernels: input (N, C, *)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` on symbn's kernels: input (*, *normalized_shape); ``eps=None`` is
    the machine epsilon of the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


_LEAST_DIMS = {"channel": 2, "instance": 3, "groups": 2}


class Norm(torch.nn.Module):
    """The layer of a normalization spec: ``Norm(spec, ...)`` is to a :class:`symbn.Norm` (or a
    built-in's name) what :class:`torch.nn.BatchNorm2d` is to batch norm.

    spec: a :class:`symbn.Norm` or a built-in's name.
    num_features: C, the channels of x (N, C, *), for the channel, instance and groups layouts.
    num_groups: the groups of channels, for the groups layout (it must divide C).
    normalized_shape: the trailing dims of x normalized together, for the trailing layout.
    eps, momentum: as in ``torch.nn``; ``momentum=None`` is a cumulative average (as BatchNorm's).
    affine: learnable ``weight`` (ones) and ``bias`` (zeros, unless ``bias=False``), shaped
        (C,) in the channel, instance and groups layouts, ``normalized_shape`` in the trailing one.
    track_running_stats: keep ``running_<stat>`` for each statistic of the spec, in its order,
        and ``num_batches_tracked`` (default: the layout's ``running``: True for the channel and
        instance layouts, as batch and instance norm keep them). One value per channel (C,) in the
        channel and instance layouts, per group (num_groups,) in the groups layout, one (1,) in the
        trailing layout (:func:`symbn.torch.functional.normalize` averages the groups that share
        a value). They start at 1 for the statistics that cannot be negative
        (``spec.nonnegative``: a variance, a mean square, a fourth moment) and at 0 for the others
        (a mean), as PyTorch starts ``running_var`` at 1 and ``running_mean`` at 0: at the start,
        eval mode then normalizes by about nothing (xhat close to x for the built-ins); updated by
        PyTorch's rule, with Bessel's correction for the spec's ``unbiased`` statistics.

    Training mode uses the batch's statistics (every path of the gradient through them) and
    updates the running ones; eval mode uses the running ones when tracked (constants), else the
    batch's, as ``torch.nn``'s batch norm does. Statistics are computed in float64 whatever the
    dtype; float16 and bfloat16 in float32.
    """

    def __init__(self, spec: str | Spec, num_features: int | None = None, normalized_shape: int | Sequence[int] | None = None,
                 num_groups: int | None = None, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool | None = None, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.spec = resolve(spec)
        kind = self.spec.layout.kind
        needs = {"channel": ("num_features",), "instance": ("num_features",),
                 "groups": ("num_features", "num_groups"), "trailing": ("normalized_shape",)}[kind]
        given = {"num_features": num_features, "normalized_shape": normalized_shape, "num_groups": num_groups}
        for name, value in given.items():
            if name in needs and value is None:
                raise TypeError(f"{self.spec.name} (layout {self.spec.layout.name}) needs {' and '.join(needs)}; "
                                f"{name} is missing")
            if name not in needs and value is not None:
                raise TypeError(f"{self.spec.name} (layout {self.spec.layout.name}) takes {' and '.join(needs)}, "
                                f"not {name}")
        if kind == "trailing":
            shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else normalized_shape
            self.normalized_shape = tuple(_positive("normalized_shape", d) for d in shape)
            if not self.normalized_shape:
                raise ValueError("normalized_shape must have at least one dimension, got ()")
            param_shape, stat_shape = self.normalized_shape, (1,)
        else:
            self.num_features = _positive("num_features", num_features)
            param_shape = stat_shape = (self.num_features,)
        if kind == "groups":
            self.num_groups = _positive("num_groups", num_groups)
            if self.num_features % self.num_groups:
                raise ValueError(f"num_features ({self.num_features}) must be divisible by num_groups ({self.num_groups})")
            stat_shape = (self.num_groups,)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = bool(self.spec.layout.running) if track_running_stats is None else track_running_stats
        if affine:
            self.weight = torch.nn.Parameter(torch.empty(param_shape, **factory))
            self.bias = torch.nn.Parameter(torch.empty(param_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        nonnegative = self.spec.nonnegative
        self._initial = {stat: 1.0 if stat in nonnegative else 0.0 for stat in self.spec.stat_names}
        for stat in self.spec.stat_names:
            self.register_buffer(f"running_{stat}", torch.empty(stat_shape, **factory) if self.track_running_stats else None)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
                             if self.track_running_stats else None)
        self.reset_parameters()

    @property
    def running(self) -> list[torch.Tensor | None]:
        """The running statistics, one buffer per statistic of the spec, in its order."""
        return [getattr(self, f"running_{stat}") for stat in self.spec.stat_names]

    def reset_running_stats(self) -> None:
        """Running statistics to their initial values (0, or 1 for non-negative ones), no batch tracked."""
        if self.track_running_stats:
            for stat, buffer in zip(self.spec.stat_names, self.running):
                if buffer is not None:
                    buffer.fill_(self._initial[stat])
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            torch.nn.init.ones_(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)

    def _check_input(self, input) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
        shape, kind = tuple(input.shape), self.spec.layout.kind
        if kind == "trailing":
            k = len(self.normalized_shape)
            if len(shape) < k or shape[len(shape) - k:] != self.normalized_shape:
                raise ValueError(f"expected input of shape (*, {', '.join(map(str, self.normalized_shape))}) "
                                 f"(normalized_shape {self.normalized_shape}), got {shape}")
        elif len(shape) < _LEAST_DIMS[kind] or shape[1] != self.num_features:
            spatial = ", L, *" if kind == "instance" else ", *"
            raise ValueError(f"expected input of shape (N, {self.num_features}{spatial}) (num_features="
                             f"{self.num_features}), got {shape}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        running = self.running
        batch = self.training or all(r is None for r in running)
        keep = (not self.training or self.track_running_stats) and any(r is not None for r in running)
        kind = self.spec.layout.kind
        return F.normalize(self.spec, input, self.weight, self.bias, training=batch, running=running if keep else None,
                           momentum=factor, eps=self.eps,
                           normalized_shape=self.normalized_shape if kind == "trailing" else None,
                           num_groups=self.num_groups if kind == "groups" else None)

    def extra_repr(self) -> str:
        kind = self.spec.layout.kind
        sizes = (f"normalized_shape={self.normalized_shape}" if kind == "trailing" else
                 f"{self.num_features}" + (f", num_groups={self.num_groups}" if kind == "groups" else ""))
        return (f"{self.spec.name}, {sizes}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")


def _positive(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


SWAPS: dict[type, type] = {
    torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.LayerNorm: LayerNorm, torch.nn.GroupNorm: GroupNorm, torch.nn.RMSNorm: RMSNorm,
    torch.nn.InstanceNorm1d: InstanceNorm1d, torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
}
"""The ``torch.nn`` class each of symbn's layers replaces (exact types: not their subclasses,
lazy and sync batch norm, a user's own subclass, nor symbn's layers)."""


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every ``torch.nn`` normalization layer in it (:data:`SWAPS`, ``module``
    itself included) replaced by symbn's, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    does: containers are changed in place, and the module is returned (a new one when ``module``
    is itself a norm layer). A new layer shares the old one's parameters and buffers (the same
    tensors: an optimizer made before still holds them, and training either updates both) and has
    its attributes (training flag, eps, momentum, hooks...); the dtype, device and requires_grad
    are those tensors'. A layer that appears twice in the model is replaced by one new layer.
    Anything else is left as it is: call ``convert(model)`` twice and the second does nothing.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return _convert(module, {})


def _convert(module: torch.nn.Module, done: dict[int, torch.nn.Module]) -> torch.nn.Module:
    if id(module) in done:
        return done[id(module)]
    swap = SWAPS.get(type(module))
    result = module if swap is None else _swapped(module, swap)
    done[id(module)] = result
    for name, child in list(result._modules.items()):  # not named_children(): it skips a repeated child
        if child is not None:
            result._modules[name] = _convert(child, done)
    return result


def _swapped(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A ``cls`` with ``module``'s state: its attributes, and copies of its tables (parameters,
    buffers, children, hooks) holding the same objects."""
    new = cls.__new__(cls)
    new.__dict__.update({key: value.copy() if isinstance(value, (dict, set)) else value
                         for key, value in module.__dict__.items()})
    return new
