"""What each process runs in tests/test_distributed.py (spawned: this module is imported fresh).

Every case computes, on each process, its share of a batch that every process generates alike
from one seed, and compares with one process computing the concatenated batch: torch.nn's
batch norm, or a plain-ops PyTorch forward of a user spec differentiated by autograd. Results
go to ``<folder>/<case>-<rank>.json``; the test reads and judges them.
"""
from __future__ import annotations

import datetime
import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

FOURTH = dict(stats={"mu": "x", "mfour": "(x - mu)**4"}, normalized="(x - mu) / (mfour + eps)**(1/4)", affine="group")
"""A user spec whose merge needs central power sums up to the fourth (its oracle: :func:`_fourth`)."""


def main(rank: int, world: int, folder: str) -> None:
    # a file rendezvous: no port to pick (a free port picked beforehand can be taken before it is bound)
    dist.init_process_group("gloo", init_method=f"file://{Path(folder, 'rendezvous')}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        for name, case in CASES.items():
            try:
                result = case(rank, world)
            except Exception as err:  # recorded: the test says which case failed and how
                result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            Path(folder, f"{name}-{rank}.json").write_text(json.dumps(result))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _share(full: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return full[start:start + sizes[rank]]


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a − b| relative to b's scale, or absolute where b is below 1 (two members: ∂l/∂x
    vanishes but for rounding), 0 for empty tensors."""
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max().clamp_min(1.0))


def _batchnorm(sizes: list[int], shape: tuple[int, ...], dtype: torch.dtype, rank: int, shift: float = 0.0) -> dict:
    from symbn.torch import SyncBatchNorm

    generator = torch.Generator().manual_seed(len(sizes) * 100 + sum(sizes))
    full = (torch.randn(sum(sizes), *shape, generator=generator, dtype=torch.float64) * 3 + shift).to(dtype)
    dy = torch.randn(full.shape, generator=generator, dtype=torch.float64).to(dtype)
    c = shape[0]
    weight, bias = torch.linspace(0.5, 2.0, c, dtype=dtype), torch.linspace(-1.0, 1.0, c, dtype=dtype)
    layer = SyncBatchNorm(c, momentum=0.3).to(dtype)
    # the reference: torch.nn's batch norm in float64 over the concatenated batch (the same values)
    reference = (torch.nn.BatchNorm1d if len(shape) < 3 else torch.nn.BatchNorm2d)(c, momentum=0.3).double()
    for module in (layer, reference):
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    x = _share(full, sizes, rank).clone().requires_grad_()
    y = layer(x)
    (y * _share(dy, sizes, rank)).sum().backward()
    xr = full.double().requires_grad_()
    yr = reference(xr)
    (yr * dy.double()).sum().backward()
    params = torch.stack([layer.weight.grad, layer.bias.grad]).double()
    dist.all_reduce(params)  # what DDP does with them (it averages: the sum over processes, divided by their number)
    return {"y": _error(y, _share(yr, sizes, rank)), "dx": _error(x.grad, _share(xr.grad, sizes, rank)),
            "running_mean": _error(layer.running_mean, reference.running_mean),
            "running_var": _error(layer.running_var, reference.running_var),
            "dweight": _error(params[0], reference.weight.grad), "dbias": _error(params[1], reference.bias.grad)}


def _fourth(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """FOURTH's forward in plain PyTorch ops, over the whole batch (the oracle)."""
    axes = (0, *range(2, x.dim()))
    mu = x.mean(axes, keepdim=True)
    mfour = ((x - mu) ** 4).mean(axes, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return weight.view(shape) * (x - mu) / (mfour + eps) ** 0.25 + bias.view(shape)


def _spec(rank: int, world: int) -> dict:
    from symbn import Norm
    from symbn.spec import LAYOUTS
    from symbn.torch import SyncNorm

    spec = Norm("fourth", layout=LAYOUTS["channel"], **FOURTH)
    sizes = [3 + 2 * r for r in range(world)]
    generator = torch.Generator().manual_seed(7)
    full = torch.randn(sum(sizes), 2, 3, generator=generator, dtype=torch.float64) + 5
    dy = torch.randn(full.shape, generator=generator, dtype=torch.float64)
    layer = SyncNorm(spec, 2, momentum=0.5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5]))
    x = _share(full, sizes, rank).clone().requires_grad_()
    (layer(x) * _share(dy, sizes, rank)).sum().backward()
    xr = full.clone().requires_grad_()
    yr = _fourth(xr, layer.weight.detach(), layer.bias.detach(), layer.eps)
    (yr * dy).sum().backward()
    mu = full.mean((0, 2))
    mfour = ((full - mu.view(1, -1, 1)) ** 4).mean((0, 2))
    y = layer(_share(full, sizes, rank)).detach()  # a second step: its y from the same batch
    return {"y": _error(y, _share(yr.detach(), sizes, rank)), "dx": _error(x.grad, _share(xr.grad, sizes, rank)),
            "running_mu": _error(layer.running_mu, 0.75 * mu), "running_mfour": _error(layer.running_mfour, 0.25 + 0.75 * mfour)}


class _Counter:
    """Counts torch.distributed's collectives while it is installed."""

    NAMES = ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter", "all_to_all")

    def __enter__(self):
        self.calls: list[str] = []
        self.saved = {name: getattr(dist, name) for name in self.NAMES}
        for name, function in self.saved.items():
            def counted(*args, _name=name, _function=function, **kwargs):
                self.calls.append(_name)
                return _function(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, function in self.saved.items():
            setattr(dist, name, function)


def _collectives(rank: int, world: int) -> dict:
    from symbn.torch import SyncBatchNorm

    layer = SyncBatchNorm(4).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()  # the first step also shakes hands
    with _Counter() as forward:
        y = layer(x)
    with _Counter() as backward:
        y.square().sum().backward()
    return {"forward": forward.calls, "backward": backward.calls}


def _empty_and_single(rank: int, world: int) -> dict:
    """A process with no members, and one member per process (N = 1, x of shape (1, C))."""
    return {"empty": _batchnorm([0] + [2] * (world - 1), (3, 4), torch.float64, rank),
            "single": _batchnorm([1] * world, (3,), torch.float64, rank)}


class _Net(torch.nn.Module):
    """A small CNN with two batch norms."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))

    def forward(self, x):
        return self.body(x)


def _ddp(rank: int, world: int) -> dict:
    """10 steps of DDP with the sync layers against one process training on the whole batch."""
    from symbn.torch import SyncBatchNorm, convert_sync_batchnorm

    torch.manual_seed(3)
    single = _Net().double()
    model = convert_sync_batchnorm(_Net().double())
    model.load_state_dict(single.state_dict())
    converted = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ddp, single)]
    per = 4
    generator = torch.Generator().manual_seed(11)
    for _ in range(10):
        data = torch.randn(per * world, 3, 6, 6, generator=generator, dtype=torch.float64)
        target = torch.randint(0, 5, (per * world,), generator=generator)
        for net, optimizer, x, t in ((ddp, optimizers[0], data[rank * per:(rank + 1) * per], target[rank * per:(rank + 1) * per]),
                                     (single, optimizers[1], data, target)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), t).backward()
            optimizer.step()
    mine, theirs = model.state_dict(), single.state_dict()
    worst = max(_error(mine[k], theirs[k]) for k in theirs if theirs[k].is_floating_point())
    return {"converted": converted, "worst": worst}


def _float32(rank: int, world: int) -> dict:
    sizes = [5 + r for r in range(world)]
    return {"unit": _batchnorm(sizes, (3, 4, 4), torch.float32, rank),
            "offset": _batchnorm(sizes, (3, 4, 4), torch.float32, rank, shift=1e4)}


def _bad_inputs(rank: int, world: int) -> dict:
    from symbn.torch import SyncBatchNorm

    found = {}
    for name, make in (("channels", lambda: (SyncBatchNorm(3 + rank % 2).double(), torch.randn(4, 3 + rank % 2).double())),
                       ("dtypes", lambda: (SyncBatchNorm(3).double(), torch.randn(4, 3, dtype=torch.float64 if rank else torch.float32))),
                       ("input", lambda: (SyncBatchNorm(3).double(), torch.randn(4, 3 + (rank == world - 1), dtype=torch.float64)))):
        layer, x = make()
        try:
            layer(x)
            found[name] = "no error"
        except Exception as err:
            found[name] = f"{type(err).__name__}: {err}"
    return found


def _second_order(rank: int, world: int) -> dict:
    """Differentiating the layer's backward again (a gradient penalty) is refused, never wrong."""
    from symbn.torch import SyncBatchNorm

    layer = SyncBatchNorm(3).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    try:
        grad.sum().backward()
    except RuntimeError as err:
        return {"error_message": str(err)}
    return {"error_message": "no error"}


CASES = {
    "float64": lambda rank, world: _batchnorm([2 + 3 * r for r in range(world)], (3, 4, 4), torch.float64, rank),
    "float32": _float32,
    "edges": _empty_and_single,
    "spec": _spec,
    "collectives": _collectives,
    "ddp": _ddp,
    "bad": _bad_inputs,
    "second_order": _second_order,
}
