"""symbn's kernels as PyTorch operators, differentiable to every order in both modes.

A *level* is one kernel: a chain of transforms applied to a norm's forward (``()`` the forward,
``("vjp",)`` the backward, ``("vjp", "vjp")`` the double backward, ``("vjp", "jvp")`` the backward's
forward-mode derivative...), in training or eval mode. Since the engine is closed under
differentiation, a level's derivatives are levels again: its reverse mode is the chain with one more
``vjp``, its forward mode the chain with one more ``jvp``. So one generic piece of code serves every
order:

- each level is a registered ``torch.library.custom_op`` (``symbn::<stem>_<kernel>``), with a fake
  implementation (shapes and dtypes from the layout's geometry, for ``torch.compile``) and its
  autograd registered as the next level (reverse mode is exact to any order);
- :class:`Level` wraps a level in a ``torch.autograd.Function`` whose ``backward`` applies the level
  above in reverse mode and whose ``jvp`` applies the level above in forward mode, so
  ``torch.func.jvp`` (nested, and over ``vjp``) is exact too, and whose ``vmap`` calls the kernel per
  slice (``torch.func.vmap``, ``jacrev``, ``jacfwd``, ``hessian``). A custom op alone has no
  forward mode: PyTorch would give it a silent zero tangent, so the bare ops raise instead;
- arguments pass between levels by name, with the engine's own names (the cotangent of ``dx`` at
  level 2 is ``d2_dx``, the tangent of ``x`` at level 1 is ``t_x``): nothing here knows a norm.

Tensors reach the kernels zero-copy (contiguous CPU float32 and float64) and the kernels' results
come back without a copy; other strides are copied; float16 and bfloat16 are computed in float32 and
returned in their dtype (parameter gradients in the parameters' dtype, float32 allowed, as in
PyTorch); element outputs in the memory format PyTorch's norm returns (channels-last kept by batch,
group and RMS norm, contiguous otherwise). Statistics are float64, one per group.
"""
from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as fw
from torch._functorch.utils import unwrap_dead_wrappers
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..build import load
from ..derive import adjoint_name, tangent_name
from ..errors import CompilerError
from ..lower import kernel_name, unit_name
from ..spec import BUILTINS, Norm, resolve

HALF = (torch.float16, torch.bfloat16)
"""Computed in float32, returned in their own dtype."""
DTYPES = (torch.float32, torch.float64, *HALF)


def _backend() -> str:
    """``"c"`` where a C compiler works, else ``"numpy"`` (the same results, slower)."""
    try:
        load("batchnorm", "c")
    except CompilerError:
        return "numpy"
    return "c"


BACKEND = None
"""The backend the ops run on: decided on first use (:func:`_backend`)."""


def op_stem(norm: Norm) -> str:
    """The operator-name prefix of ``norm``: a built-in's name, a spec's name with a hash of its
    definition (two specs of one name are two sets of ops)."""
    if BUILTINS.get(norm.name) == norm:
        return norm.name
    return f"{norm.name}_{hashlib.sha256(repr(norm).encode()).hexdigest()[:10]}"


def kernels(norm: Norm, chain: tuple[str, ...]):
    """The loaded kernels of ``norm`` whose last part holds ``chain``'s level (and the forward)."""
    global BACKEND
    if BACKEND is None:
        BACKEND = _backend()
    return load(norm, BACKEND, threads=torch.get_num_threads(), transforms=chain or ("vjp",))


class Spec:
    """What a level's operator needs: its kernel table and the runtime object that runs it."""

    def __init__(self, norm: Norm, chain: tuple[str, ...], mode: str):
        self.norm, self.chain, self.mode = norm, chain, mode
        self.kernel = kernel_name(chain, mode)
        self.part = getattr(kernels(norm, chain), self.kernel).__self__  # the generated module's object
        self.table = self.part.KERNELS[self.kernel]
        self.inputs = [name for name, *_ in self.table.inputs]
        self.outputs = [name for name, *_ in self.table.outputs]
        self.scalars = {name for name, _, role, _ in self.table.inputs if role == "scalar"}
        self.stats = set(self.table.stats)  # outputs that are statistics: not differentiable
        self.name = f"{op_stem(norm)}_{unit_name(chain)}_{mode}"
        self.layout = sys.modules[type(self.part).__module__].geometry  # shapes -> Geometry
        # the statistics whose running update corrects with Bessel's m/(m-1) (plain data, which
        # torch.compile reads from a traced constant)
        self.unbiased = tuple(self.part.UNBIASED)

    def geometry(self, x: torch.Tensor, params: Sequence[torch.Tensor | None], normalized_shape, num_groups):
        param_shape = next((tuple(p.shape) for p, (_, kind, role, _) in zip(params, self.table.inputs)
                            if p is not None and kind == "element" and role == "param"), None)
        return self.layout(tuple(x.shape), param_shape, _shape(normalized_shape), num_groups)


def _shape(normalized_shape):
    return None if normalized_shape is None else tuple(normalized_shape)


def _schema(spec: Spec) -> str:
    args = [f"float {name}" if name in spec.scalars else f"Tensor? {name}" for name in spec.inputs]
    return f"({', '.join(args)}, SymInt[]? normalized_shape, SymInt? num_groups) -> Tensor[]"


def _array(t: torch.Tensor | None):
    """A tensor as the kernels read it: a NumPy view where the dtype allows, float32 for halves."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype in HALF:
        t = t.float()
    return t.numpy()


def _run(spec: Spec, args: tuple, normalized_shape, num_groups) -> list[torch.Tensor]:
    """The real kernel: inputs in table order, outputs as tensors in the layout PyTorch returns."""
    x = args[spec.inputs.index("x")]
    values = [float(a) if name in spec.scalars else _array(a) for name, a in zip(spec.inputs, args)]
    outputs = spec.part._call(spec.kernel, values, _shape(normalized_shape), num_groups, None)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    layout, param_dtype = _memory_format(spec, x), _param_dtype(spec, args)
    results = []
    for (_, kind, role, double), value in zip(spec.table.outputs, outputs):
        t = torch.from_numpy(np.asarray(value))  # the kernel's buffer, C-contiguous: no copy
        if kind == "element" and role != "param":
            if t.dtype != x.dtype or layout != torch.contiguous_format:
                t = torch.empty_like(x, memory_format=layout).copy_(t)
        elif role == "param":
            t = t.to(param_dtype)
        elif not double:
            t = t.to(x.dtype)
        results.append(t)
    return results


KEEPS_CHANNELS_LAST = {"batchnorm": True, "groupnorm": True, "rmsnorm": True, "layernorm": False, "instancenorm": False}
"""Whether PyTorch's norm returns a channels-last x's result channels-last (else contiguous); a
spec's layout does as the built-in of that layout does (channel, groups: kept)."""


def _memory_format(spec: Spec, x: torch.Tensor) -> torch.memory_format:
    """The memory format of the element outputs, as PyTorch's norms return them: channels-last
    (2d or 3d) kept where the norm keeps it, contiguous otherwise (also for other strides)."""
    keeps = (KEEPS_CHANNELS_LAST[spec.norm.name] if BUILTINS.get(spec.norm.name) == spec.norm
             else spec.norm.layout.kind in ("channel", "groups"))
    if keeps and not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _param_dtype(spec: Spec, args: Sequence) -> torch.dtype:
    """The dtype of the parameter outputs (dgamma, dbeta...): the parameters', which may be float32
    for float16 or bfloat16 x, as in PyTorch; x's when no parameter is given."""
    x = args[spec.inputs.index("x")]
    return next((a.dtype for a, (name, _, role, _) in zip(args, spec.table.inputs)
                 if role == "param" and name not in spec.norm.stat_names and isinstance(a, torch.Tensor)), x.dtype)


def _plain(inputs: Sequence) -> bool:
    """Whether the kernel can run on ``inputs`` as they are: real CPU tensors (no subclass such as
    the fake and functional tensors of tracing, no batched tensor of the legacy vmap that
    gradcheck's batched gradients use) and no dispatch mode recording the call."""
    return (not is_in_torch_dispatch_mode() and
            all(type(t) in (torch.Tensor, torch.nn.Parameter) and torch._C._dispatch_keys(t).has(torch._C.DispatchKey.CPU)
                for t in inputs if isinstance(t, torch.Tensor)))


def _fake(spec: Spec, args: tuple, normalized_shape, num_groups) -> list[torch.Tensor]:
    """Shapes and dtypes of the outputs, for tracing (``torch.compile``, meta tensors)."""
    x = args[spec.inputs.index("x")]
    geo = spec.geometry(x, args, normalized_shape, num_groups)
    results = []
    layout, param_dtype = _memory_format(spec, x), _param_dtype(spec, args)
    for _, kind, role, double in spec.table.outputs:
        if kind == "element" and role != "param":
            results.append(torch.empty_like(x, memory_format=layout))
        elif role == "param":
            results.append(x.new_empty(geo.param_shape if kind == "element" else (geo.p,), dtype=param_dtype))
        else:
            results.append(x.new_empty(geo.group_shape, dtype=torch.float64 if double else x.dtype))
    return results


_OPERATORS: dict[tuple[str, tuple[str, ...], str], tuple[Spec, object]] = {}


def operator(norm: Norm, chain: tuple[str, ...], mode: str):
    """The registered custom op of one level (``torch.ops.symbn.<name>``), its autograd the level
    above; registered once per process."""
    key = (op_stem(norm), chain, mode)
    if key not in _OPERATORS:
        _OPERATORS[key] = _register(Spec(norm, chain, mode))
    return _OPERATORS[key]


def _register(spec: Spec):

    def real(*args):
        *args, normalized_shape, num_groups = args
        return _run(spec, tuple(args), normalized_shape, num_groups)

    def fake(*args):
        *args, normalized_shape, num_groups = args
        return _fake(spec, tuple(args), normalized_shape, num_groups)

    op = torch.library.custom_op(f"symbn::{spec.name}", real, mutates_args=(), device_types="cpu", schema=_schema(spec))
    op.register_fake(fake)

    def setup_context(ctx, inputs, output):
        ctx.inputs, ctx.output = inputs, output

    def backward(ctx, *grads):
        *inputs, normalized_shape, num_groups = ctx.inputs
        grads = grads[0] if len(grads) == 1 and isinstance(grads[0], (list, tuple)) else grads
        return (*reverse(spec, inputs, ctx.output, list(grads), normalized_shape, num_groups), None, None)

    op.register_autograd(backward, setup_context=setup_context)
    _refuse_forward_mode(op, spec)
    return spec, op


def _refuse_forward_mode(op, spec: Spec) -> None:
    """Forward mode through the bare op raises instead of returning a zero tangent: a custom op has
    no forward-mode formula, and PyTorch would run it below autograd and return a tangent of zeros
    (``torch.func.jvp``) or none (dual tensors), silently. The op's autograd kernel (the one
    ``register_autograd`` made) is wrapped with the check; :class:`Level`, which the functionals
    call, has the exact forward mode (the level above)."""
    from torch._library.autograd import make_autograd_impl

    autograd = make_autograd_impl(op._opoverload, op)

    def checked(keyset, *args):
        if fw._current_level >= 0 and any(isinstance(a, torch.Tensor) and fw.unpack_dual(a).tangent is not None
                                          for a in args):
            raise RuntimeError(f"symbn::{spec.name} has no forward-mode derivative as a bare op (it would be a silent "
                               "zero): call it through symbn.torch.ops.Level.call or symbn.torch.functional, whose "
                               "forward mode is the level above")
        return autograd(keyset, *args)

    with warnings.catch_warnings():  # the kernel register_autograd installed is replaced on purpose
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        op._lib.impl(op._name, checked, "Autograd", with_keyset=True)


def _zeros_like_output(spec: Spec, name: str, inputs, normalized_shape, num_groups) -> torch.Tensor:
    out = _fake(spec, tuple(inputs), normalized_shape, num_groups)[spec.outputs.index(name)]
    return torch.zeros_like(out)


def _zeros_input(above: Spec, name: str, spec: Spec, inputs, normalized_shape, num_groups) -> torch.Tensor:
    """Zeros of the shape level ``above`` takes for its input ``name``, in x's dtype (``inputs``
    are level ``spec``'s, which give the geometry)."""
    x = inputs[spec.inputs.index("x")]
    geo = spec.geometry(x, inputs, normalized_shape, num_groups)
    _, kind, role, _ = above.table.inputs[above.inputs.index(name)]
    shape = ((tuple(x.shape) if role != "param" else geo.param_shape) if kind == "element"
             else (geo.p,) if role == "param" else geo.group_shape)
    return x.new_zeros(shape)


def _given(spec: Spec, inputs: Sequence, outputs: Sequence) -> dict:
    """A level's values by name: its inputs, and the statistics among its outputs (which the
    levels above read, as the backward reads the forward's)."""
    return {**dict(zip(spec.inputs, inputs)), **{n: o for n, o in zip(spec.outputs, outputs) if n in spec.stats}}


def reverse(spec: Spec, inputs: Sequence, outputs: Sequence, grads: Sequence, normalized_shape, num_groups) -> list:
    """The vjp of level ``spec`` at ``inputs`` (and ``outputs``) with output cotangents ``grads``:
    the level above in reverse mode, applied through :class:`Level` (so it is differentiable again).
    One gradient per input, None for scalars, statistics and inputs the level above does not
    differentiate."""
    above, _ = operator(spec.norm, (*spec.chain, "vjp"), spec.mode)
    level = len(above.chain)
    given = _given(spec, inputs, outputs)
    cotangent = {adjoint_name(o, level): g for o, g in zip(spec.outputs, grads) if o not in spec.stats}
    args = []
    for name in above.inputs:
        if name in cotangent:
            g = cotangent[name]
            args.append(g if g is not None else _zeros_like_output(spec, name[len(adjoint_name("", level)):], inputs,
                                                                     normalized_shape, num_groups))
        else:
            args.append(given[name])
    outs = dict(zip(above.outputs, Level.call(above, args, normalized_shape, num_groups)))
    return [None if name in spec.scalars or name in spec.stats or given[name] is None else outs.get(adjoint_name(name, level))
            for name in spec.inputs]


def forward_mode(spec: Spec, inputs: Sequence, outputs: Sequence, tangents: Sequence, normalized_shape, num_groups) -> list:
    """The jvp of level ``spec`` at ``inputs`` (and ``outputs``) along ``tangents``: the level above
    in forward mode. One tangent per output; statistics (not differentiable outputs) get None."""
    above, _ = operator(spec.norm, (*spec.chain, "jvp"), spec.mode)
    level = len(above.chain)
    given = _given(spec, inputs, outputs)
    tangent = {tangent_name(i, level): t for i, t in zip(spec.inputs, tangents)}
    args = []
    for name in above.inputs:
        if name in tangent:
            t = tangent[name]
            base = given[name[len(tangent_name("", level)):]]
            # no tangent: zeros, also for an input given as None (weight or bias absent: the
            # kernels take None for gamma and beta, never for a tangent)
            args.append(t if t is not None else torch.zeros_like(base) if base is not None else
                        _zeros_input(above, name, spec, inputs, normalized_shape, num_groups))
        else:
            args.append(given[name])
    outs = dict(zip(above.outputs, Level.call(above, args, normalized_shape, num_groups)))
    return [None if name in spec.stats else outs[tangent_name(name, level)] for name in spec.outputs]


class Level(torch.autograd.Function):
    """One level as an autograd function: reverse mode by the level above's ``vjp``, forward mode
    by its ``jvp`` (``torch.func.jvp``, nested, over ``vjp``). The statistics it outputs are not
    differentiable: the levels above differentiate through them, as functions of x."""

    @staticmethod
    def forward(spec, normalized_shape, num_groups, *inputs):
        if _plain(inputs):  # the op's own CPU kernel, without a second trip through the dispatcher's autograd
            return tuple(_run(spec, inputs, normalized_shape, num_groups))
        # traced (fake, functional or meta tensors, a dispatch mode): the registered op, through its fake
        _, op = operator(spec.norm, spec.chain, spec.mode)
        return tuple(op(*inputs, normalized_shape, num_groups))

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, normalized_shape, num_groups, *values = inputs
        ctx.spec, ctx.normalized_shape, ctx.num_groups = spec, normalized_shape, num_groups
        stats = [o for name, o in zip(spec.outputs, output) if name in spec.stats]
        tensors = [v for v in values if isinstance(v, torch.Tensor)] + stats
        ctx.where = [isinstance(v, torch.Tensor) for v in values]
        ctx.others = [None if isinstance(v, torch.Tensor) else v for v in values]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.mark_non_differentiable(*[o for name, o in zip(spec.outputs, output) if name in spec.stats])

    @staticmethod
    def _values(ctx) -> tuple[list, list]:
        """The saved inputs (tensors and the rest, in order) and outputs (statistics by name)."""
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if is_tensor else other for is_tensor, other in zip(ctx.where, ctx.others)]
        outputs = [next(saved) if name in ctx.spec.stats else None for name in ctx.spec.outputs]
        return inputs, outputs

    @staticmethod
    def backward(ctx, *grads):
        inputs, outputs = Level._values(ctx)
        return (None, None, None, *reverse(ctx.spec, inputs, outputs, grads, ctx.normalized_shape, ctx.num_groups))

    @staticmethod
    def jvp(ctx, _spec, _normalized_shape, _num_groups, *tangents):
        inputs, outputs = Level._values(ctx)
        return tuple(forward_mode(ctx.spec, inputs, outputs, tangents, ctx.normalized_shape, ctx.num_groups))

    @staticmethod
    def vmap(info, in_dims, spec, normalized_shape, num_groups, *inputs):
        """``torch.func.vmap`` (jacrev, jacfwd, hessian, batched gradients): one call per slice of
        the batch, stacked (the kernels have no batch dimension of their own); each call is a
        Level again, so the derivatives of the batched function stay exact."""
        dims = in_dims[3:]
        results = []
        for i in range(info.batch_size):
            args = [a.select(d, i) if d is not None else a for a, d in zip(inputs, dims)]
            results.append(Level.apply(spec, normalized_shape, num_groups, *args))
        outputs = tuple(torch.stack(column) for column in zip(*results))
        return outputs, (0,) * len(outputs)

    @classmethod
    def apply(cls, *args):
        """``Function.apply`` less its per-call ``inspect.signature`` binding of defaults, which
        ``forward`` does not have (every argument is positional): a third of a (256, 64) call. Under
        functorch transforms (vmap, jvp, grad) ``Function.apply`` itself, which routes through them."""
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))  # autograd's C apply

    @staticmethod
    def call(spec: Spec, args: Sequence, normalized_shape, num_groups) -> tuple[torch.Tensor, ...]:
        """The level on ``args``: through autograd where it records (a tensor requiring grad with
        grad mode on, a forward-mode or functorch level), else the kernel alone (a first backward's
        own kernel call, inference), which is what autograd would have run."""
        if _recorded(args) or not _plain(args):
            return Level.apply(spec, _shape(normalized_shape), num_groups, *args)
        return tuple(_run(spec, args, _shape(normalized_shape), num_groups))


def _recorded(args: Sequence) -> bool:
    """Whether autograd records a call on ``args``: grad mode on and a tensor requiring grad, or a
    forward-mode level or functorch transform active."""
    return (fw._current_level >= 0 or torch._C._are_functorch_transforms_active() or
            (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)))


_LEVELS: dict[tuple, tuple[str | Norm, Spec]] = {}


def level(norm: str | Norm, chain: tuple[str, ...] = (), mode: str = "train") -> Spec:
    """The :class:`Spec` of one level, its op registered on first use; looked up per call by the
    norm's name or identity (a spec is hashed once, not on every call)."""
    key = (norm if isinstance(norm, str) else id(norm), chain, mode)
    found = _LEVELS.get(key)
    if found is None or (found[0] is not norm and not isinstance(norm, str)):
        found = _LEVELS[key] = (norm, operator(resolve(norm), tuple(chain), mode)[0])
    return found[1]


def traced_level(norm: str | Norm, chain: tuple[str, ...] = (), mode: str = "train") -> Spec:
    """:func:`level` for ``torch.compile``: called while tracing, its result a constant. The level
    above in reverse mode is registered too: a compiled backward (from inductor's cache, perhaps,
    with no tracing in this process) calls its op by name."""
    level(norm, (*chain, "vjp"), mode)
    return level(norm, chain, mode)


# What torch.compiler.assume_constant_result(traced_level) does, without the import of torch._dynamo
# it makes first: 0.8 s at `import symbn.torch`, and with it loaded a torch.distributed (gloo) process
# aborts at exit now and then ("terminate called without an active exception", 2 runs in 20, with
# destroy_process_group called). The compile tests check that tracing still takes it as a constant.
traced_level._dynamo_marked_constant = True
