"""symbn.torch in real use: training, gradient penalties, meta-learning.

Each test runs one model three ways from one initialization (``copy.deepcopy``): with
``torch.nn``'s layers (native), with ``symbn.torch.convert``'s (symbn), and with the same layers
written here in plain torch ops, normalization by hand with ``mean`` and a biased variance (plain;
autograd of it is exact at every order, an independent reference).

- A small CNN (batch norm, a group-norm block, a layer-norm head), 20 SGD steps with momentum:
  native and symbn agree (losses, gradients, parameters, running buffers, eval outputs).
- A WGAN-GP critic step (penalty (||grad_x D(x_hat)|| - 1)^2, ``create_graph=True``, backward to
  the critic's parameters): second order, where native is right too; symbn agrees with plain.
- MAML (inner step with ``create_graph=True``): second order, all three agree; with a gradient
  penalty inside the inner loss the meta-gradient is third order, where native's batch and layer
  norm are wrong and symbn is not.

- torch.func: Hessian-vector products (jvp of grad) and their jvp (third order, nested forward
  mode), against plain.
- Norms without weight or bias (RMSNorm, affine=False, bias=False) in training.

Measured first (``test_native_third_order``), torch 2.13.0 CPU, float64: native ``F.batch_norm``
(training) and ``F.layer_norm`` are wrong at the third reverse order (4.3e-02 and 7.9e-01 relative
to plain, symbn 3e-16 and 1e-15). Their create_graph backward is one node
(NativeBatchNormBackwardBackward0, NativeLayerNormBackwardBackward0) whose own derivative takes the
saved statistics as constants. Native ``F.group_norm`` is right at order 3 (2e-15): its
create_graph backward is written in differentiable ops, and the mean and rstd it reads are
differentiable outputs of the forward, so the graph reaches x through them. Group norm is therefore
tested at third order as a case where all three agree. The other numbers are in each test's
docstring.
"""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.autograd import grad  # noqa: E402
from torch.func import functional_call  # noqa: E402

import symbn.torch as st  # noqa: E402

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (absolute where b is all zeros)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    difference, scale = (a - b).abs().max().item(), b.abs().max().item()
    return difference / scale if scale > 0 else difference


def worst(first: dict, second: dict) -> tuple[float, str]:
    """The largest relative difference over same-named tensors, and its name."""
    assert first.keys() == second.keys()
    return max((relative(first[k], second[k]), k) for k in first)


# --------------------------------------------------------------------------- normalization in plain ops

def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _batch_norm(self, x):
    """nn.BatchNorm*d's forward by hand: batch statistics in training (running update with
    Bessel's correction and momentum, as PyTorch, when tracked), running statistics in eval
    when tracked."""
    dims, shape = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    if self.training or not self.track_running_stats:
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
    if self.training and self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            n = x.numel() // x.shape[1]
            self.running_mean.copy_((1 - m) * self.running_mean + m * mean.reshape(-1))
            self.running_var.copy_((1 - m) * self.running_var + m * var.reshape(-1) * n / (n - 1))
    elif self.track_running_stats:
        mean, var = self.running_mean.reshape(shape), self.running_var.reshape(shape)
    return _affine((x - mean) / torch.sqrt(var + self.eps), self.weight, self.bias, shape)


class PlainBatchNorm1d(nn.BatchNorm1d):
    forward = _batch_norm


class PlainBatchNorm2d(nn.BatchNorm2d):
    forward = _batch_norm


class PlainLayerNorm(nn.LayerNorm):
    def forward(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        return _affine((x - mean) / torch.sqrt(var + self.eps), self.weight, self.bias, self.normalized_shape)


class PlainGroupNorm(nn.GroupNorm):
    def forward(self, x):
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = ((grouped - mean) ** 2).mean(-1, keepdim=True)
        y = ((grouped - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        return _affine(y, self.weight, self.bias, (1, -1) + (1,) * (x.dim() - 2))


PLAIN = {nn.BatchNorm1d: PlainBatchNorm1d, nn.BatchNorm2d: PlainBatchNorm2d, nn.LayerNorm: PlainLayerNorm,
         nn.GroupNorm: PlainGroupNorm}
NORMS = (*PLAIN, nn.RMSNorm)


def plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its torch.nn norms computed by hand (same state_dict)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) in PLAIN:
            module.__class__ = PLAIN[type(module)]
    return model


def converted(model: nn.Module) -> nn.Module:
    """A copy of ``model`` through ``symbn.torch.convert``, checked to hold no torch.nn norm."""
    original = [type(m) for m in model.modules() if type(m) in NORMS]
    model = st.convert(copy.deepcopy(model))
    swapped = [m for m in model.modules() if isinstance(m, NORMS)]
    assert len(swapped) == len(original) and all(type(m).__module__ == "symbn.torch.nn" for m in swapped)
    assert all(isinstance(m, cls) for m, cls in zip(swapped, original))
    return model


def three(model: nn.Module) -> dict[str, nn.Module]:
    return {"native": copy.deepcopy(model), "symbn": converted(model), "plain": plain(model)}


def graph_names(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``tensor``."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


# --------------------------------------------------------------------------- 1. training a CNN

class SmallCNN(nn.Module):
    """Convolutions with batch norm (momentum 0.1, and None: the cumulative average), a
    group-norm block, a layer-norm head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


def train(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """SGD with momentum and weight decay, one step per batch; the losses and the gradients of
    every step, the final state (parameters and buffers)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    record = {}
    for step, (x, labels) in enumerate(batches):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        record[f"loss {step}"] = loss.detach()
        record.update({f"grad {step} {name}": p.grad.clone() for name, p in model.named_parameters()})
    record.update({f"state {name}": t.clone() for name, t in model.state_dict().items()})
    return record


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cnn_training_matches_torch_nn(dtype):
    """Measured, symbn against torch.nn, worst over 20 losses, every step's gradients and the final
    parameters and buffers: float64 5e-15 (losses 2e-16, eval outputs 7e-16); float32 3.1e-06
    (losses 2.3e-07, eval outputs 3.7e-07)."""
    torch.manual_seed(0)
    model = SmallCNN().to(dtype)
    data = [(torch.randn(8, 3, 16, 16, dtype=dtype), torch.randint(0, 10, (8,))) for _ in range(4)]
    batches = [data[step % 4] for step in range(20)]  # four batches, five epochs
    native, symbn = copy.deepcopy(model), converted(model)
    assert "LevelBackward" in graph_names(symbn(batches[0][0]))  # symbn's kernels are on the path
    assert "LevelBackward" not in graph_names(native(batches[0][0]))
    native.load_state_dict(model.state_dict())  # undo those two forwards' running updates
    symbn.load_state_dict(model.state_dict())

    ours, theirs = train(symbn, batches), train(native, batches)
    error, where = worst(ours, theirs)
    assert error < TOLERANCE[dtype], f"{where}: {error:.2e}"
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.endswith("num_batches_tracked"))
    assert sum(theirs[f"loss {s}"] for s in range(16, 20)) < sum(theirs[f"loss {s}"] for s in range(4))  # it learns
    assert theirs["state features.4.running_var"].ne(1).all()  # the running buffers moved

    native.eval(), symbn.eval()
    before = copy.deepcopy(symbn.state_dict())
    with torch.no_grad():
        x = torch.randn(8, 3, 16, 16, dtype=dtype)
        assert relative(symbn(x), native(x)) < TOLERANCE[dtype]
    assert all(torch.equal(t, before[k]) for k, t in symbn.state_dict().items())  # eval mode updates nothing


# --------------------------------------------------------------------------- 2. WGAN-GP critic

class Critic(nn.Module):
    """The convolutions before a norm have no bias (batch norm cancels it: its gradient is zero,
    and relative errors of round-off would mean nothing)."""

    def __init__(self, norm: str):
        super().__init__()
        make = {
            "batch": lambda c, s: nn.BatchNorm2d(c),
            "layer": lambda c, s: nn.LayerNorm([c, s, s]),
            "group": lambda c, s: nn.GroupNorm(c // 4, c),
        }[norm]
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), make(8, 4), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), make(16, 2), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)


def critic_steps(critic: nn.Module, data, weight: float = 10.0) -> dict[str, torch.Tensor]:
    """WGAN-GP critic steps: D(fake) - D(real) + weight * (||grad_x D(x_hat)|| - 1)^2 at x_hat
    between real and fake, the penalty's graph kept (create_graph=True) and differentiated to the
    critic's parameters."""
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.01, momentum=0.5)
    record = {}
    for step, (real, fake, alpha) in enumerate(data):
        optimizer.zero_grad()
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_()
        (slope,) = grad(critic(x_hat).sum(), x_hat, create_graph=True)
        penalty = ((slope.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss = critic(fake).mean() - critic(real).mean() + weight * penalty
        loss.backward()
        optimizer.step()
        record.update({f"loss {step}": loss.detach(), f"penalty {step}": penalty.detach(),
                       f"slope {step}": slope.detach()})
        record.update({f"grad {step} {name}": p.grad.clone() for name, p in critic.named_parameters()})
    record.update({f"state {name}": t.clone() for name, t in critic.state_dict().items()})
    return record


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_wgan_gp_critic_step(norm):
    """Second order in the parameters: native is right here too. Measured against plain, worst
    over every loss, penalty, slope, gradient and buffer of 3 steps: symbn 1e-15 to 2e-15, native
    1e-15 to 2.4e-15 (penalty ~0.25 of a loss, so it matters)."""
    torch.manual_seed(1)
    critic = Critic(norm).double()
    data = [(torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randn(6, 3, 8, 8, dtype=torch.float64),
             torch.rand(6, 1, 1, 1, dtype=torch.float64)) for _ in range(3)]
    runs = {name: critic_steps(model, data) for name, model in three(critic).items()}
    assert runs["plain"]["penalty 0"] > 1e-3  # the penalty matters
    for name in ("symbn", "native"):
        error, where = worst(runs[name], runs["plain"])
        assert error < 1e-10, f"{name} {where}: {error:.2e}"


# --------------------------------------------------------------------------- 3. MAML

class Learner(nn.Module):
    """A regressor with one normalization (no bias before it, as in :class:`Critic`), a smooth
    activation (every order of the norm's derivative reaches the meta-gradient)."""

    def __init__(self, norm: str):
        super().__init__()
        make = {"batch": lambda: nn.BatchNorm1d(16), "layer": lambda: nn.LayerNorm(16),
                "group": lambda: nn.GroupNorm(4, 16)}[norm]
        self.net = nn.Sequential(nn.Linear(3, 16, bias=False), make(), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def tasks(count: int = 2, dtype=torch.float64):
    """Sine-like regression tasks: (support x, support y, query x, query y)."""
    out = []
    for _ in range(count):
        w, phase = torch.randn(3, 1, dtype=dtype), torch.rand(1, dtype=dtype) * 3
        xs, xq = torch.randn(10, 3, dtype=dtype), torch.randn(10, 3, dtype=dtype)
        out.append((xs, torch.sin(xs @ w + phase), xq, torch.sin(xq @ w + phase)))
    return out


def maml_step(model: nn.Module, batch, inner_lr: float = 0.5, penalty: float = 0.0) -> dict[str, torch.Tensor]:
    """One MAML meta-gradient: an inner SGD step on the support loss (plus ``penalty`` times the
    mean squared input gradient ||d f / d x||^2 when given) with create_graph=True, the query loss
    at the adapted weights, backward to the initial weights."""
    params = dict(model.named_parameters())
    outer = 0.0
    for xs, ys, xq, yq in batch:
        xs = xs.clone().requires_grad_(penalty > 0)
        prediction = functional_call(model, params, (xs,))
        inner = F.mse_loss(prediction, ys)
        if penalty:
            (slope,) = grad(prediction.sum(), xs, create_graph=True)
            inner = inner + penalty * slope.pow(2).sum(1).mean()
        grads = grad(inner, list(params.values()), create_graph=True)
        fast = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
        outer = outer + F.mse_loss(functional_call(model, fast, (xq,)), yq)
    model.zero_grad()
    outer.backward()
    record = {"outer": outer.detach()}
    record.update({f"grad {name}": p.grad.clone() for name, p in model.named_parameters()})
    record.update({f"state {name}": t.clone() for name, t in model.state_dict().items()})
    return record


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_maml_second_order(norm):
    """Second order: symbn, native and plain agree (measured: worst meta-gradient or buffer
    2e-15 to 3.5e-15 relative, for both)."""
    torch.manual_seed(2)
    learner, batch = Learner(norm).double(), tasks()
    runs = {name: maml_step(model, batch) for name, model in three(learner).items()}
    for name in ("symbn", "native"):
        error, where = worst(runs[name], runs["plain"])
        assert error < 1e-10, f"{name} {where}: {error:.2e}"


def _third(norm_fn, x, cotangents):
    """d/dx of <c3, d/dx <c2, d/dx <c1, sin(f(x))>>>: three reverse passes through one norm."""
    c1, c2, c3 = cotangents
    (g1,) = grad((torch.sin(norm_fn(x)) * c1).sum(), x, create_graph=True)
    (g2,) = grad((g1 * c2).sum() ** 2, x, create_graph=True)
    (g3,) = grad((g2 * c3).sum(), x)
    return g3


THIRD = {  # name: (native, symbn, plain) on x of shape (8, 4, 3), weight and bias (4,) or (3,)
    "batch_norm": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                   lambda x, w, b: st.batch_norm(x, None, None, w, b, training=True),
                   lambda x, w, b: _by_hand(x, (0, 2), w[:, None], b[:, None])),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (3,), w, b),
                   lambda x, w, b: st.layer_norm(x, (3,), w, b),
                   lambda x, w, b: _by_hand(x, (2,), w, b)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b),
                   lambda x, w, b: st.group_norm(x, 2, w, b),
                   lambda x, w, b: _by_hand(x.reshape(8, 2, 6), (2,), 1, 0).reshape(8, 4, 3) * w[:, None] + b[:, None]),
}


def _by_hand(x, dims, w, b):
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


@pytest.mark.parametrize("name", list(THIRD))
def test_native_third_order(name):
    """The direct measurement: grad of grad of grad w.r.t. x through one norm, float64. Relative
    to plain ops: symbn 3e-16, 1e-15, 1.3e-15; native batch_norm (training) 4.3e-02, layer_norm
    7.9e-01, group_norm 2.3e-15 (right: see the module docstring)."""
    torch.manual_seed(3)
    x = torch.randn(8, 4, 3, dtype=torch.float64, requires_grad=True)
    size = 3 if name == "layer_norm" else 4
    w, b = torch.randn(size, dtype=torch.float64), torch.randn(size, dtype=torch.float64)
    cotangents = [torch.randn(8, 4, 3, dtype=torch.float64) for _ in range(3)]
    native, symbn, by_hand = (_third(lambda t, f=f: f(t, w, b), x, cotangents) for f in THIRD[name])
    assert relative(symbn, by_hand) < 1e-10
    if name == "group_norm":
        assert relative(native, by_hand) < 1e-10
    else:
        assert relative(native, by_hand) > 1e-2


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_maml_with_gradient_penalty_third_order(norm):
    """MAML whose inner loss has a gradient penalty: the meta-gradient is third order in the
    norm. Measured against plain: symbn 5e-16 to 1.1e-14; native batch norm 4.1e-02 and
    layer norm 1.5e-01 (worst meta-gradient, both at the first layer's weight) while the outer loss
    itself agrees; native group norm 1e-14 (see test_native_third_order)."""
    torch.manual_seed(4)
    learner, batch = Learner(norm).double(), tasks()
    runs = {name: maml_step(model, batch, penalty=1.0) for name, model in three(learner).items()}
    error, where = worst(runs["symbn"], runs["plain"])
    assert error < 1e-10, f"symbn {where}: {error:.2e}"
    native, where = worst(runs["native"], runs["plain"])
    if norm == "group":
        assert native < 1e-10, f"native {where}: {native:.2e}"
    else:
        assert native > 1e-3, f"native {where}: {native:.2e}"
        assert relative(runs["native"]["outer"], runs["plain"]["outer"]) < 1e-12  # the loss itself is right


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_torch_func_hessian_vector_products(norm):
    """Forward over reverse with torch.func: the Hessian-vector product of a loss in the
    parameters (jvp of grad), and its own jvp (third order, nested forward mode). Measured against
    plain: symbn 5e-16 to 1.5e-14 at both; native right at the HVP (5e-16 to 3e-14) and wrong at
    the third order for batch norm (7.8e-01) and layer norm (1.3e-01), right for group norm
    (7e-14)."""
    torch.manual_seed(5)
    learner = Learner(norm).double()
    if norm == "batch":  # no running statistics: torch.func refuses their in-place update
        learner.net[1] = nn.BatchNorm1d(16, track_running_stats=False).double()
    ((x, y, _, _),) = tasks(1)
    params = {name: p.detach() for name, p in learner.named_parameters()}
    v = {name: torch.randn_like(p) for name, p in params.items()}
    runs = {}
    for name, model in three(learner).items():
        def loss(p, model=model):
            return ((functional_call(model, p, (x,)) - y) ** 2).mean()

        def hvp(p, loss=loss):
            return torch.func.jvp(torch.func.grad(loss), (p,), (v,))[1]

        third = torch.func.jvp(hvp, (params,), (v,))[1]
        runs[name] = {**{f"hvp {k}": t for k, t in hvp(params).items()}, **{f"third {k}": t for k, t in third.items()}}
    hvps = {name: {k: t for k, t in run.items() if k.startswith("hvp")} for name, run in runs.items()}
    thirds = {name: {k: t for k, t in run.items() if k.startswith("third")} for name, run in runs.items()}
    for name in ("symbn", "native"):
        error, where = worst(hvps[name], hvps["plain"])
        assert error < 1e-10, f"{name} {where}: {error:.2e}"
    error, where = worst(thirds["symbn"], thirds["plain"])
    assert error < 1e-10, f"symbn {where}: {error:.2e}"
    native, where = worst(thirds["native"], thirds["plain"])
    assert (native < 1e-10) if norm == "group" else (native > 1e-3), f"native {where}: {native:.2e}"


# --------------------------------------------------------------------------- norms without weight or bias

class Bare(nn.Module):
    """An MLP whose norms lack weight or bias: RMSNorm (F.rms_norm has no bias), BatchNorm1d
    without affine, LayerNorm without bias, GroupNorm without affine."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.RMSNorm(16), nn.Tanh(),
            nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16, affine=False), nn.Tanh(),
            nn.Linear(16, 16), nn.LayerNorm(16, bias=False), nn.Tanh(),
            nn.Linear(16, 16), nn.GroupNorm(4, 16, affine=False), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def test_training_norms_without_weight_or_bias():
    """10 SGD steps against torch.nn (first order). Measured: worst over losses, gradients and
    state 1.7e-13 relative (the last layer's bias gradient at the last step)."""
    torch.manual_seed(6)
    model = Bare().double()
    batches = [(torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)) for _ in range(3)]
    native, symbn = copy.deepcopy(model), converted(model)
    runs = {}
    for name, net in (("native", native), ("symbn", symbn)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        record = {}
        for step in range(10):
            x, y = batches[step % 3]
            optimizer.zero_grad()
            loss = F.mse_loss(net(x), y)
            loss.backward()
            optimizer.step()
            record[f"loss {step}"] = loss.detach()
            record.update({f"grad {step} {k}": p.grad.clone() for k, p in net.named_parameters()})
        runs[name] = {**record, **{f"state {k}": t.clone() for k, t in net.state_dict().items()}}
    error, where = worst(runs["symbn"], runs["native"])
    assert error < 1e-10, f"{where}: {error:.2e}"
