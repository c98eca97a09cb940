"""Synchronized normalization across processes, on ``torch.distributed``, from :mod:`symbn.split`.

When data parallelism splits the batch over processes, batch norm's statistics must span every
process's share of it. :func:`symbn.split.split` derives, for any spec whose groups span the
batch (the channel layout), what each process computes over its members and how one exchange
merges it; this module runs that split on torch.distributed, with any backend (gloo on CPU
included):

* forward: each process sums its members' partials (count, its mean c_p, the central power sums
  about it; in float64), **one all-gather** of them (and a small header), the merge on every
  process (the derived formulas, identically on each), then y per member (the norm's eval-mode
  kernel, fed the merged statistics);
* backward: each process sums the backward's reductions over its members, **one all-reduce**
  adds those ∂l/∂x needs, then ∂l/∂x per member; the parameters' gradients stay per process, for
  DistributedDataParallel to average. First order only: differentiating the backward again
  (``create_graph=True``) is an error, not a silent wrong derivative.

Without a ``process_group`` the layers exchange on a group of every process of their own (made at
the first synchronized step), not on the default group that DistributedDataParallel's gradient
all-reduces keep busy during the backward. The first training forward of each layer also
exchanges a fixed-size handshake (the channels and the spec's digest), so that layers that
disagree across processes fail with a clear error on every process, instead of an exchange of
mismatched sizes (which gloo answers by aborting the process). Every later call makes exactly one
collective in the forward and one in the backward. Each call's header carries every process's
dtype, element count, input channels and what it found wrong with its own arguments: a mismatch
or a problem is a clear error on every process. A process that calls the layer must reach its
backward whenever the others do (as for PyTorch's SyncBatchNorm): one that skips it leaves the
others waiting until the process group's timeout.

Every per-member and merge formula is printed from the split's SymPy expressions by SymPy's
PyTorch printer (``lambdify(..., "torch")``): nothing here knows batch norm.
"""
from __future__ import annotations

import hashlib
import math

import sympy as sp
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..lower import hoist, mean_statistic
from ..spec import Norm as Spec
from ..spec import resolve
from ..split import Split, split
from ..sums import M
from . import functional as F
from .nn import Norm

__all__ = ["SyncBatchNorm", "SyncNorm", "convert_sync_batchnorm"]

_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
HEADER = ("count", "dtype", "channels", "problem")
"""What each process sends before its partials, in every exchange's payload: every process checks
every other's, so that what one process finds wrong is an error on all of them (an error raised
by one process alone would leave the others waiting in the exchange)."""
PROBLEMS = ("", "its weight or bias is not of the input's dtype (float32 for float16 or bfloat16 input)",
            "its input is not on the CPU (the gloo backend and symbn's layers run on the CPU)")
"""Header ``problem`` codes: what a process found wrong with its own arguments."""


class _Lambda:
    """One SymPy expression as a function of named tensors (SymPy's PyTorch printer)."""

    def __init__(self, expr: sp.Expr):
        self.names = sorted(s.name for s in expr.free_symbols)
        by_name = {s.name: s for s in expr.free_symbols}
        self.function = sp.lambdify([by_name[n] for n in self.names], expr, modules="torch")

    def __call__(self, values: dict) -> torch.Tensor:
        return self.function(*(values[n] for n in self.names))


_ELEMENTS = frozenset(sp.Symbol(name, real=True) for name in ("x", "dy", "xhat"))
"""The per-member symbols of the split's formulas: tensors over x's (N, C, L); the rest is per group."""
_NAMES = frozenset(e.name for e in _ELEMENTS)


FRAME = sp.Symbol("Fshift", real=True)
"""Per group in a framed formula: the batch mean rounded to x's precision; x arrives as x − it."""


class _Formula:
    """A per-member formula with its per-group parts hoisted (:func:`symbn.lower.hoist`, as the
    kernels do): computed once per channel in float64, then what is left per member in the
    element tensors' precision (∂l/∂x = c0·dy + c1·x̂ + c2).

    ``framed``: x arrives measured from FRAME (the mean rounded to x's precision, as the NumPy
    kernels' frame): x − FRAME is exact, and what the rounding left (FRAME − μ, small) is in a
    per-group coefficient computed in float64, so float32 loses nothing to a large mean."""

    def __init__(self, expr: sp.Expr, framed: bool = False):
        x = sp.Symbol("x", real=True)
        if framed:
            expr = expr.xreplace({x: x + FRAME})
        coefficients: list = []
        collect = (set(_ELEMENTS) - {x}) & expr.free_symbols
        body = hoist(expr, set(_ELEMENTS), coefficients, collect)
        self.coefficients = [(a.name, _Lambda(a.expr)) for a in coefficients]
        self.body = _Lambda(body)
        self.names = sorted({n for _, f in self.coefficients for n in f.names} | set(self.body.names))

    def __call__(self, values: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        values = dict(values)
        for name, f in self.coefficients:
            values[name] = f(values)
        return self.body({name: values[name] if name in _NAMES else torch.as_tensor(values[name]).to(dtype)
                          for name in self.body.names})


class Runtime:
    """A spec's split, compiled to functions of tensors (x viewed as (N, C, L), a group's values (1, C, 1))."""

    def __init__(self, norm: Spec):
        self.split: Split = split(norm)
        s = self.split
        self.partials = [(p.name, _Formula(p.summand)) for p in s.partials]
        self.statistics = [(m.name, _Formula(m.term)) for m in s.statistics]
        # the backward runs in x's precision, measured from the rounded mean where the spec has one
        self.frame = mean_statistic(s.norm)
        framed = self.frame is not None
        self.framed_xhat = _Formula(s.elements["xhat"], framed)
        self.reductions = [(r.name, _Formula(r.summand, framed)) for r in s.reductions]
        self.shared = [r.name for r in s.shared]
        self.gradients = {name: _Formula(e, framed) for name, e in s.gradients.items()}
        self.digest = int(hashlib.sha256(repr(s.norm).encode()).hexdigest()[:12], 16)  # < 2^53: exact in float64

    @property
    def stat_names(self) -> tuple[str, ...]:
        return self.split.norm.stat_names

    def payload_size(self, channels: int) -> int:
        """Values one process sends in the forward's exchange: the header, c_p and its partials per channel."""
        return len(HEADER) + channels * (int(self.split.shifted) + len(self.partials))

    def backward_size(self, channels: int) -> int:
        """Values the backward's all-reduce adds: the shared reductions per channel."""
        return channels * len(self.shared)


_RUNTIMES: dict[str, Runtime] = {}


def runtime(norm: str | Spec) -> Runtime:
    """The compiled split of ``norm`` (cached per spec, keyed by its definition)."""
    norm = resolve(norm)
    key = repr(norm)
    if key not in _RUNTIMES:
        _RUNTIMES[key] = Runtime(norm)
    return _RUNTIMES[key]


def _group_sum(value, like: torch.Tensor) -> torch.Tensor:
    """Σ over the members of one process, per channel, as float64: value (a tensor or a number) over
    x's (N, C, L). A float32 tensor is summed in float32 by PyTorch's cascade summation (blocks
    combined pairwise: an error of a few ulps, not the n ulps of a running sum), with no float64 copy."""
    return torch.as_tensor(value).expand(like.shape).sum((0, 2)).to(torch.float64)


class _Sync(torch.autograd.Function):
    """y = the norm of x over every process's members; the global count and statistics as more outputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, rt: Runtime, eps: float, group, channels: int):
        problem = _problem(x, weight, bias)
        fits = x.dim() >= 2 and x.shape[1] == channels and x.dtype in _CODES and not problem
        x3 = _view(x.detach()) if fits else torch.zeros(0, channels, 1, dtype=torch.float64)
        values = {"x": x3}
        parts = []
        if rt.split.shifted:
            values["Cp"] = (x3.sum((0, 2)) / max(x3.shape[0] * x3.shape[2], 1)).view(1, channels, 1)
            parts.append(values["Cp"].view(channels))
        parts += [_group_sum(f(values), x3) for _, f in rt.partials]
        # the header: what every process checks of every other, so that a disagreement fails everywhere
        header = torch.tensor([x3.shape[0] * x3.shape[2], _CODES.get(x.dtype, 0), x.shape[1] if x.dim() >= 2 else -1,
                               problem], dtype=torch.float64)
        gathered = _exchange(torch.cat([header, *parts]), group, channels)
        total = float(gathered[:, 0].sum())
        if total < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over every "
                             "process (symbn's synchronized norm: the batch of all processes together)")
        per = {"Mp": gathered[:, :1], "epsilon": torch.tensor(eps, dtype=torch.float64)}
        columns = gathered[:, len(HEADER):].reshape(gathered.shape[0], -1, channels)
        names = (["Cp"] if rt.split.shifted else []) + [name for name, _ in rt.partials]
        per.update({name: columns[:, j] for j, name in enumerate(names)})
        stats: dict[str, torch.Tensor] = {}
        for name, f in rt.statistics:
            stats[name] = torch.as_tensor(f({**per, **stats})).expand(gathered.shape[0], channels).sum(0) / total
        saved = [stats[name] for name in rt.stat_names]
        # y from the merged statistics: the norm's eval-mode kernel, which takes them as its inputs
        y = F.normalize(rt.split.norm, x.detach(), weight, bias, training=False, running=saved, eps=eps)
        ctx.rt, ctx.eps, ctx.group, ctx.total = rt, eps, group, total
        ctx.save_for_backward(x, weight, bias, *saved)
        ctx.mark_non_differentiable(*saved)
        return (y, torch.tensor(total, dtype=torch.float64), *saved)

    @staticmethod
    @once_differentiable  # a derivative of this backward is an error, never a silent wrong one
    def backward(ctx, dy, *_):
        rt = ctx.rt
        x, weight, bias, *saved = ctx.saved_tensors
        c = x.shape[1]
        dtype = x.dtype if x.dtype == torch.float64 else torch.float32  # float16, bfloat16: float32
        xs = _view(x, dtype)
        values = {name: v.view(1, c, 1) for name, v in zip(rt.stat_names, saved)}
        if rt.frame is not None:
            shift = values[rt.frame].to(dtype)
            values[FRAME.name] = shift.to(torch.float64)
            xs = xs - shift
        values.update(_affine(weight, bias, c), epsilon=torch.tensor(ctx.eps, dtype=torch.float64), x=xs,
                      dy=dy.reshape(xs.shape).to(dtype))
        values["xhat"] = rt.framed_xhat(values, dtype)
        local = {name: _group_sum(f(values, dtype), xs) for name, f in rt.reductions}
        totals = dict(local)
        if rt.shared:  # the backward's one collective
            reduced = torch.stack([local[name] for name in rt.shared])
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=ctx.group)
            totals.update(zip(rt.shared, reduced))
        dx = None
        if ctx.needs_input_grad[0]:
            each = {**values, **{name: v.view(1, c, 1) for name, v in totals.items()},
                    M.name: torch.tensor(ctx.total, dtype=torch.float64)}
            dx = torch.as_tensor(rt.gradients["x"](each, dtype)).expand(xs.shape).reshape(x.shape).to(x.dtype)
        grads = [_param_grad(rt, name, values, local, xs, dtype).to(param.dtype) if param is not None and needed else None
                 for name, param, needed in (("gamma", weight, ctx.needs_input_grad[1]),
                                             ("beta", bias, ctx.needs_input_grad[2]))]
        return (dx, *grads, None, None, None, None)


def _view(t: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(N, C, *) as (N, C, L) in ``dtype``: a group's members along N and L."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])).to(dtype)


def _param_grad(rt: Runtime, name: str, values: dict, local: dict, x3: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter's gradient from this process's own members: its formula with the local sums,
    summed over the members where it is a per-member formula."""
    formula = rt.gradients[name]
    per_member = bool(_NAMES & set(formula.names))
    # a per-group formula runs in float64, from the float64 sums
    value = formula({**values, **{k: v.view(1, -1, 1) for k, v in local.items()}}, dtype if per_member else torch.float64)
    if per_member:
        return _group_sum(value, x3)
    return torch.as_tensor(value, dtype=torch.float64).expand(1, x3.shape[1], 1).reshape(-1)


def _problem(x: torch.Tensor, weight, bias) -> int:
    """What is wrong with this process's arguments, as a :data:`PROBLEMS` code (0: nothing)."""
    if any(t is not None and t.device.type != "cpu" for t in (x, weight, bias)):
        return 2
    expected = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    if any(t is not None and t.dtype not in (x.dtype, expected) for t in (weight, bias)):
        return 1
    return 0


def _affine(weight, bias, c: int) -> dict:
    one = torch.ones(1, c, 1, dtype=torch.float64)
    return {"gamma": one if weight is None else weight.detach().to(torch.float64).view(1, c, 1),
            "beta": 0 * one if bias is None else bias.detach().to(torch.float64).view(1, c, 1)}


def _exchange(payload: torch.Tensor, group, channels: int) -> torch.Tensor:
    """The forward's one collective: every process's payload, stacked (P, size); the headers
    checked alike on every process, so that any disagreement is an error everywhere."""
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(payload) for _ in range(size)]
    dist.all_gather(gathered, payload, group=group)
    stacked = torch.stack(gathered)
    codes = {int(code) for code in stacked[:, 1]}
    if len(codes) > 1 or 0 in codes:
        names = {0: "not float64, float32, float16 or bfloat16", **{v: str(k).replace("torch.", "") for k, v in _CODES.items()}}
        seen = ", ".join(f"process {r}: {names[int(code)]}" for r, code in enumerate(stacked[:, 1]))
        raise RuntimeError(f"symbn synchronized norm: the processes give inputs of different dtypes ({seen}); "
                           "give every process the same dtype")
    problems = [(r, PROBLEMS[int(code)]) for r, code in enumerate(stacked[:, 3]) if int(code)]
    if problems:
        raise RuntimeError("symbn synchronized norm: " + "; ".join(f"on process {r}, {text}" for r, text in problems))
    wrong = [(r, int(ch)) for r, ch in enumerate(stacked[:, 2]) if int(ch) != channels]
    if wrong:
        raise RuntimeError(f"symbn synchronized norm: input channels differ from the layer's {channels} on "
                           + ", ".join(f"process {r} ({ch})" for r, ch in wrong))
    return stacked


def handshake(rt: Runtime, channels: int, group) -> None:
    """A fixed-size exchange of what fixes the payload's size (channels, the spec's digest): a
    layer built differently on some process is a clear error on every process, never an
    exchange of mismatched sizes."""
    mine = torch.tensor([channels, rt.digest, rt.payload_size(channels)], dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        seen = "; ".join(f"process {r}: {int(g[0])} channels, spec {int(g[1]):x}" for r, g in enumerate(gathered))
        raise RuntimeError(f"symbn synchronized norm: the layer differs across processes ({seen}): build the same "
                           "model on every process")


_OWN: list = [None, None]
"""The default group, and the group of every process that the sync layers use in its place."""


def _own_group():
    """A process group of every process, the sync layers' own, made at their first training step:
    their exchanges then never queue behind DistributedDataParallel's gradient all-reduces on the
    default group, which run in the background during the backward (measured: a DDP step of the
    bench's CNN over 2 processes, 113 ms on the default group, 82 ms on its own). Made once per
    default group; every process makes it at the same point, its first synchronized step."""
    if _OWN[0] is not dist.group.WORLD:
        _OWN[:] = [dist.group.WORLD, dist.new_group()]
    return _OWN[1]


def _group_ready(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("symbn synchronized norm: torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group(...) in every process before training (eval mode "
                           "needs no process group)")


def sync_normalize(norm: str | Spec, input: torch.Tensor, weight, bias, running, momentum: float, eps: float,
                   group=None, channels: int | None = None) -> torch.Tensor:
    """One training step of ``norm`` over the batch of every process in ``group``; ``running``
    (one tensor or None per statistic) updated by PyTorch's rule with the global statistics
    (Bessel's correction over the global count)."""
    rt = runtime(norm)
    channels = input.shape[1] if channels is None else channels
    y, total, *stats = _Sync.apply(input, weight, bias, rt, float(eps), group, channels)
    with torch.no_grad():
        count = float(total)
        for name, r, stat in zip(rt.stat_names, running, stats):
            if r is not None:
                new = stat * (count / (count - 1) if name in rt.split.norm.unbiased else 1.0)
                r.copy_((momentum * new + (1 - momentum) * r.to(torch.float64)).to(r.dtype))
    return y


class _Synced:
    """What both synchronized layers share: the training step over every process's batch."""

    process_group = None

    def _sync(self, input: torch.Tensor, spec: Spec, running, momentum: float) -> torch.Tensor:
        _group_ready(self.process_group)
        group = self.process_group if self.process_group is not None else _own_group()
        rt = runtime(spec)
        key = (id(group), self.num_features, rt.digest)
        if getattr(self, "_shaken", None) != key:  # once per layer and process group
            handshake(rt, self.num_features, group)
            self._shaken = key
        return sync_normalize(spec, input, self.weight, self.bias, running, momentum, self.eps, group, self.num_features)

    def _factor(self) -> float:
        """torch.nn's momentum for this step (``None``: a cumulative average), counting the step."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor


class SyncNorm(_Synced, Norm):
    """The layer of any spec whose statistics span the batch (the channel layout), its statistics
    synchronized over ``process_group`` (default: the whole world) in training. Arguments as
    :class:`symbn.torch.nn.Norm`'s, and ``process_group``."""

    def __init__(self, spec: str | Spec, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool | None = None, process_group=None, device=None,
                 dtype=None, *, bias: bool = True) -> None:
        super().__init__(spec, num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype, bias=bias)
        self.process_group = process_group
        runtime(self.spec)  # a spec that cannot be split is refused here, not at the first step

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:  # as torch.nn.SyncBatchNorm: eval mode never synchronizes
            return super().forward(input)
        factor = self._factor()
        running = self.running if self.training and self.track_running_stats else [None] * len(self.running)
        return self._sync(input, self.spec, running, factor)


class SyncBatchNorm(_Synced, torch.nn.modules.batchnorm._BatchNorm):
    """:class:`torch.nn.SyncBatchNorm`'s constructor, parameters, buffers and semantics, on the
    split derived by symbn: any input (N, C, *), any torch.distributed backend (gloo on CPU), inside
    DistributedDataParallel (it is not a subclass of ``torch.nn.SyncBatchNorm``, which DDP on CPU
    refuses). Eval mode is the plain batch norm, never synchronized (as torch.nn.SyncBatchNorm)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    @property
    def running(self) -> list[torch.Tensor | None]:
        return [self.running_mean, self.running_var]

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = self._factor()
        if not self.training:  # as torch.nn.SyncBatchNorm: eval mode never synchronizes
            bn_training = self.running_mean is None and self.running_var is None
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, bn_training, factor,
                                self.eps)
        running = self.running if self.training and self.track_running_stats else [None, None]
        return self._sync(input, resolve("batchnorm"), running, factor)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """``module`` with every batch norm layer in it (``torch.nn``'s, symbn's, ``torch.nn.SyncBatchNorm``)
    replaced by :class:`SyncBatchNorm`, and every :class:`symbn.torch.Norm` of the channel layout by a
    :class:`SyncNorm`, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: the same parameter and
    buffer tensors, the training flag kept; containers changed in place, the module returned."""
    if isinstance(module, (SyncBatchNorm, SyncNorm)):
        return module
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        _move_state(module, out)
    elif isinstance(module, Norm) and module.spec.layout.kind == "channel":
        out = SyncNorm(module.spec, module.num_features, module.eps, module.momentum, module.affine,
                       module.track_running_stats, process_group, bias=module.bias is not None)
        _move_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def _move_state(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """``new`` holds ``old``'s parameters and buffers (the same tensors) and its training flag."""
    with torch.no_grad():
        for name, p in old._parameters.items():
            new._parameters[name] = p
        for name, b in old._buffers.items():
            new._buffers[name] = b
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig


