"""symbn.torch's modules: torch.nn's normalization layers on symbn's kernels, the layer of any
spec, and convert(). References: the torch.nn layer from the same state dict, and autograd of
the forward written in plain torch ops (symbn.oracles.torch_forward)."""
import copy
import inspect
import warnings

import pytest

torch = pytest.importorskip("torch")

import symbn.torch as st  # noqa: E402
from symbn import Norm as Spec  # noqa: E402
from symbn import oracles  # noqa: E402
from symbn.spec import CHANNEL, resolve  # noqa: E402

F64 = torch.float64
CLASSES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "RMSNorm")
QUARTIC = Spec("quartic", stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)",
               affine="group", layout=CHANNEL)


def close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def pair(name, *args, **kwargs):
    """A torch.nn layer with random parameters and buffers, and symbn's loaded from its state dict."""
    ref = getattr(torch.nn, name)(*args, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=F64) + 0.5)
        for key, b in ref.named_buffers():
            if key.endswith("num_batches_tracked"):
                b.fill_(3)
            else:
                b.copy_(torch.rand(b.shape, generator=g, dtype=F64) + 0.5)
    sym = getattr(st, name)(*args, **kwargs)
    sym.load_state_dict(ref.state_dict(), strict=True)
    return ref, sym


def same_state(sym, ref, tol=1e-10, ignore=()):
    a, b = sym.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for key in set(b) - set(ignore):
        assert a[key].dtype == b[key].dtype, key
        close(a[key], b[key], tol)


def steps(ref, sym, shape, *, n=3, dtype=F64, tol=1e-10, grad=True, memory_format=None, seed=0, ignore=()):
    """n forward (and backward) passes on both layers: outputs, gradients and the whole state
    (running statistics, num_batches_tracked) equal after each."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(dtype)
        dy = torch.randn(shape, generator=g, dtype=F64).to(dtype)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        xr, xs = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
        yr, ys = ref(xr), sym(xs)
        assert ys.shape == yr.shape and ys.dtype == yr.dtype
        close(ys, yr, tol)
        if grad:
            (yr * dy).sum().backward()
            (ys * dy).sum().backward()
            close(xs.grad, xr.grad, tol)
            for pr, ps in zip(ref.parameters(), sym.parameters()):
                assert (ps.grad is None) == (pr.grad is None)
                if pr.grad is not None:
                    close(ps.grad, pr.grad, tol)
        same_state(sym, ref, tol, ignore)
    return ys


# --------------------------------------------------------------------------- the torch.nn classes

OPTIONS = [
    ("BatchNorm1d", (5,), {}),
    ("BatchNorm1d", (5,), {"affine": False, "momentum": None}),
    ("BatchNorm2d", (4,), {"track_running_stats": False, "eps": 1e-3}),
    ("BatchNorm2d", (4,), {"bias": False}),
    ("BatchNorm3d", (3,), {"dtype": F64}),
    ("LayerNorm", (6,), {}),
    ("LayerNorm", ((3, 4),), {"elementwise_affine": False}),
    ("LayerNorm", ([5],), {"bias": False, "dtype": F64}),
    ("GroupNorm", (2, 6), {}),
    ("GroupNorm", (3, 6), {"affine": False}),
    ("GroupNorm", (3, 6), {"bias": False}),
    ("InstanceNorm1d", (4,), {}),
    ("InstanceNorm2d", (4,), {"affine": True, "track_running_stats": True}),
    ("InstanceNorm3d", (3,), {"affine": True, "bias": False}),
    ("RMSNorm", (6,), {}),
    ("RMSNorm", ((2, 3),), {"eps": 1e-6, "elementwise_affine": False}),
]


@pytest.mark.parametrize("name", CLASSES)
def test_same_class_surface_as_torch_nn(name):
    cls, base = getattr(st, name), getattr(torch.nn, name)
    assert issubclass(cls, base) and cls is not base and cls.__name__ == name
    assert inspect.signature(cls) == inspect.signature(base) and cls.forward is not base.forward
    assert cls.__module__ == "symbn.torch.nn" and st.nn.SWAPS[base] is cls


@pytest.mark.parametrize("name, args, kwargs", OPTIONS, ids=[f"{n}-{'-'.join(k) or 'default'}" for n, _, k in OPTIONS])
def test_state_dict_round_trip(name, args, kwargs):
    ref, sym = pair(name, *args, **kwargs)
    assert [k for k, _ in sym.named_parameters()] == [k for k, _ in ref.named_parameters()]
    assert dict(sym._parameters).keys() == dict(ref._parameters).keys()
    assert dict(sym._buffers).keys() == dict(ref._buffers).keys()  # the None ones too
    assert repr(sym) == repr(ref)
    same_state(sym, ref, 0)
    duplicate = copy.deepcopy(sym)
    assert type(duplicate) is type(sym) and (sym.weight is None or duplicate.weight is not sym.weight)
    same_state(duplicate, ref, 0)
    back = getattr(torch.nn, name)(*args, **kwargs)
    back.load_state_dict(sym.state_dict(), strict=True)
    same_state(back, ref, 0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        getattr(st, name)(*args, **kwargs).load_state_dict({**ref.state_dict(), "extra": torch.zeros(1)}, strict=True)


CASES = [
    ("BatchNorm1d", (5,), {}, (8, 5)),
    ("BatchNorm1d", (5,), {"momentum": None}, (6, 5, 4)),
    ("BatchNorm2d", (4,), {}, (3, 4, 3, 5)),
    ("BatchNorm2d", (4,), {"track_running_stats": False, "momentum": None}, (3, 4, 3, 5)),
    ("BatchNorm3d", (3,), {"momentum": None, "eps": 1e-3}, (2, 3, 2, 3, 4)),
    ("InstanceNorm1d", (4,), {"affine": True, "track_running_stats": True}, (3, 4, 7)),
    ("InstanceNorm2d", (4,), {"affine": True}, (2, 4, 3, 3)),
    ("InstanceNorm3d", (3,), {"affine": True, "track_running_stats": True, "momentum": None}, (2, 3, 2, 2, 3)),
    ("LayerNorm", ((3, 5),), {}, (4, 3, 5)),
    ("GroupNorm", (2, 6), {"eps": 1e-3}, (3, 6, 4)),
    ("RMSNorm", (5,), {}, (4, 2, 5)),
    ("RMSNorm", ((2, 5),), {"eps": 1e-4}, (3, 2, 5)),
]
IDS = [f"{n}-{'-'.join(k) or 'default'}-{len(s)}d" for n, _, k, s in (c.values if hasattr(c, "values") else c for c in CASES)]


@pytest.mark.parametrize("name, args, kwargs, shape", CASES, ids=IDS)
def test_train_then_eval_matches_torch_nn(name, args, kwargs, shape):
    """float64 to 1e-10: outputs, dx, dweight, dbias, running statistics and num_batches_tracked
    after three training steps, then eval mode (running statistics when tracked, else the batch's)."""
    ref, sym = pair(name, *args, dtype=F64, **kwargs)
    steps(ref, sym, shape)
    ref.eval(), sym.eval()
    steps(ref, sym, shape, n=2, seed=1)


@pytest.mark.parametrize("name, args, kwargs, shape", [
    ("BatchNorm2d", (4,), {"affine": False}, (3, 4, 2, 2)),
    ("BatchNorm1d", (4,), {"bias": False, "momentum": None}, (5, 4)),
    ("InstanceNorm1d", (4,), {"track_running_stats": True}, (3, 4, 6)),
    ("InstanceNorm2d", (4,), {}, (2, 4, 3, 3)),
    ("LayerNorm", (5,), {"elementwise_affine": False}, (4, 5)),
    ("LayerNorm", (5,), {"bias": False}, (4, 5)),
    ("GroupNorm", (2, 4), {"affine": False}, (3, 4, 5)),
    ("RMSNorm", (5,), {"elementwise_affine": False}, (4, 5)),
    ("RMSNorm", ((2, 5),), {"eps": 1e-4}, (3, 2, 5)),
])
def test_without_weight_or_bias_forward(name, args, kwargs, shape):
    ref, sym = pair(name, *args, dtype=F64, **kwargs)
    steps(ref, sym, shape, grad=False)
    ref.eval(), sym.eval()
    steps(ref, sym, shape, n=1, grad=False)


@pytest.mark.parametrize("name, args, kwargs, shape", [
    ("BatchNorm2d", (4,), {"affine": False}, (3, 4, 2, 2)),
    ("LayerNorm", (5,), {"bias": False}, (4, 5)),
    ("RMSNorm", (5,), {}, (4, 5)),
])
def test_without_weight_or_bias_gradients(name, args, kwargs, shape):
    ref, sym = pair(name, *args, dtype=F64, **kwargs)
    steps(ref, sym, shape)


def test_track_running_stats_turned_off_after_construction():
    """torch.nn's rule: buffers kept but not updated in training, and used in eval."""
    ref, sym = pair("BatchNorm1d", 3, dtype=F64)
    ref.track_running_stats = sym.track_running_stats = False
    steps(ref, sym, (6, 3))
    assert int(sym.num_batches_tracked) == 3
    ref.eval(), sym.eval()
    steps(ref, sym, (6, 3), n=1)


def test_eval_without_running_buffers_uses_batch_statistics():
    ref, sym = pair("BatchNorm2d", 3, dtype=F64)
    for m in (ref, sym):
        m.running_mean = m.running_var = None
        m.eval()
    steps(ref, sym, (4, 3, 2, 2), n=1)


def test_half_a_running_mean_is_refused_in_eval_as_torch_refuses():
    ref, sym = pair("BatchNorm1d", 3, dtype=F64)
    for m in (ref, sym):
        m.running_var = None
        m.eval()
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(RuntimeError, match="running_mean and running_var must be defined in evaluation mode"):
        sym(x)


# --------------------------------------------------------------------------- input forms

@pytest.mark.parametrize("name, args, shape", [
    ("InstanceNorm1d", (4,), (4, 6)),
    ("InstanceNorm2d", (3,), (3, 2, 4)),
    ("InstanceNorm3d", (2,), (2, 2, 2, 3)),
    ("LayerNorm", (5,), (5,)),
    ("RMSNorm", ((2, 5),), (2, 5)),
    ("GroupNorm", (2, 4), (3, 4)),
    ("BatchNorm1d", (4,), (5, 4)),
])
def test_unbatched_and_minimal_inputs(name, args, shape):
    kwargs = {"affine": True} if name.startswith("Instance") else {}
    ref, sym = pair(name, *args, dtype=F64, **kwargs)
    steps(ref, sym, shape, n=2)


def test_input_dimension_errors_are_torch_nn_s():
    for name, args, shape in [("BatchNorm1d", (3,), (2, 3, 4, 5)), ("BatchNorm2d", (3,), (2, 3, 4)),
                              ("BatchNorm3d", (3,), (2, 3, 4, 5)), ("InstanceNorm1d", (3,), (3,)),
                              ("InstanceNorm2d", (3,), (2, 3, 4, 5, 6))]:
        x = torch.randn(shape)
        with pytest.raises(ValueError) as expected:
            getattr(torch.nn, name)(*args)(x)
        with pytest.raises(ValueError) as got:
            getattr(st, name)(*args)(x)
        assert str(got.value) == str(expected.value)


def test_instance_norm_num_features_check_and_warning():
    x = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"expected input's size at dim=1 to match num_features \(4\), but got: 5"):
        st.InstanceNorm1d(4, affine=True)(x)
    with pytest.warns(UserWarning, match="input's size at dim=1 does not match num_features"):
        y = st.InstanceNorm1d(4)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(y, torch.nn.InstanceNorm1d(4)(x), 1e-5)


def test_batch_of_one_value_per_channel_is_refused_in_training():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        st.BatchNorm1d(3)(torch.randn(1, 3))
    m = st.BatchNorm1d(3).eval()
    assert m(torch.randn(1, 3)).shape == (1, 3)


def test_channels_last_batch_norm_2d():
    ref, sym = pair("BatchNorm2d", 4, dtype=F64)
    y = steps(ref, sym, (3, 4, 5, 6), memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref.eval(), sym.eval()
    y = steps(ref, sym, (3, 4, 5, 6), n=1, memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name, args, kwargs, shape", [
    ("BatchNorm2d", (4,), {}, (4, 4, 3, 3)),
    ("InstanceNorm1d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 8)),
    ("LayerNorm", (6,), {}, (5, 6)),
    ("GroupNorm", (2, 4), {}, (3, 4, 5)),
    ("RMSNorm", (6,), {}, (5, 6)),
], ids=["bn2d", "in1d", "ln", "gn", "rms"])
def test_lower_precision_matches_torch_nn(dtype, tol, name, args, kwargs, shape):
    ref, sym = pair(name, *args, dtype=dtype, **kwargs)
    assert sym.weight.dtype == dtype
    steps(ref, sym, shape, n=2, dtype=dtype, tol=tol)
    ref.eval(), sym.eval()
    steps(ref, sym, shape, n=1, dtype=dtype, tol=tol)


def test_second_order_gradient_is_exact():
    """grad of grad through the module equals autograd of the plain-ops forward (native
    batch norm agrees at this order too; symbn stays exact at every order)."""
    sym = st.BatchNorm1d(3, dtype=F64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, generator=g, dtype=F64)
    dy, v = torch.randn(7, 3, generator=g, dtype=F64), torch.randn(7, 3, generator=g, dtype=F64)
    gamma, beta = sym.weight.detach().clone().requires_grad_(), sym.bias.detach().clone().requires_grad_()

    def second(forward, *params):
        xr = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad((forward(xr) * dy).sum(), xr, create_graph=True)
        return torch.autograd.grad((dx * v).sum(), (xr, *params), materialize_grads=True)

    got = second(sym, sym.weight, sym.bias)
    want = second(lambda xr: oracles.torch_forward(resolve("batchnorm"), xr, gamma, beta),
                  gamma, beta)
    for a, b in zip(got, want):
        close(a, b)


# --------------------------------------------------------------------------- errors

def test_other_devices_are_refused_naming_the_argument():
    with pytest.raises(RuntimeError, match="input is on meta"):
        st.BatchNorm2d(3)(torch.empty(2, 3, 4, 4, device="meta"))
    with pytest.raises(RuntimeError, match="weight is on meta"):
        st.LayerNorm(4, device="meta")(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="running_mean is on meta"):
        st.BatchNorm1d(3, affine=False, device="meta").eval()(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="input is on meta"):
        st.Norm(QUARTIC, 3, device="meta")(torch.empty(4, 3, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_is_refused_naming_the_argument():
    with pytest.raises(RuntimeError, match="input is on cuda"):
        st.BatchNorm2d(3, device="cuda")(torch.randn(2, 3, 4, 4, device="cuda"))


def test_wrong_dtypes_are_refused_naming_the_argument():
    with pytest.raises(RuntimeError, match=r"weight has dtype torch\.float32, but input has torch\.float64"):
        st.BatchNorm2d(3)(torch.randn(2, 3, 2, 2, dtype=F64))
    with pytest.raises(TypeError, match=r"input must be float32, float64, float16 or bfloat16, got torch\.int64"):
        st.LayerNorm(4)(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="input must be float32"):
        st.GroupNorm(2, 4, affine=False)(torch.ones(2, 4, dtype=torch.complex64))


# --------------------------------------------------------------------------- convert

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.ReLU()))
        self.head = torch.nn.ModuleDict({"pool": torch.nn.AdaptiveAvgPool2d(1), "fc": torch.nn.Linear(8, 6),
                                         "norm": torch.nn.LayerNorm(6)})

    def forward(self, x):
        x = self.head["pool"](self.features(x)).flatten(1)
        return self.head["norm"](self.head["fc"](x))


def test_convert_a_model():
    torch.manual_seed(0)
    model = Net().double()
    model.features[3][1].weight.requires_grad_(False)
    original = {name: m for name, m in model.named_modules()}
    ref = copy.deepcopy(model)
    calls = []
    model.head["norm"].register_forward_hook(lambda *_: calls.append(1))
    out = st.convert(model)
    assert out is model
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["features.1"] is st.BatchNorm2d and kinds["features.3.1"] is st.GroupNorm
    assert kinds["head.norm"] is st.LayerNorm
    assert not any(type(m) in st.nn.SWAPS for m in model.modules())
    assert model.features[0] is original["features.0"] and model.head["fc"] is original["head.fc"]
    assert model.features[1].weight is original["features.1"].weight  # the same parameters
    assert model.features[1].running_mean is original["features.1"].running_mean
    assert not model.features[3][1].weight.requires_grad and model.features[3][1].bias.requires_grad
    assert all(p.dtype == F64 for p in model.parameters())
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6, generator=g, dtype=F64)
        dy = torch.randn(4, 6, generator=g, dtype=F64)
        ys, yr = model(x), ref(x)
        close(ys, yr)
        (ys * dy).sum().backward()
        (yr * dy).sum().backward()
        for (key, ps), pr in zip(model.named_parameters(), ref.parameters()):
            close(ps.grad, pr.grad) if pr.grad is not None else None
            assert (ps.grad is None) == (pr.grad is None), key
        same_state(model, ref)
    assert calls == [1, 1]  # the hook moved with the layer
    model.eval(), ref.eval()
    close(model(x), ref(x))
    again = {name: m for name, m in model.named_modules()}
    assert st.convert(model) is model and {name: m for name, m in model.named_modules()} == again


def test_convert_keeps_each_layer_s_state():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3, momentum=None, affine=False),
                                torch.nn.InstanceNorm1d(3, track_running_stats=True), torch.nn.RMSNorm(4, eps=1e-3))
    model[0].eps = 1e-2
    model[1].eval()
    model.float()
    shared = torch.nn.LayerNorm(4)
    model.append(shared), model.append(shared)
    st.convert(model)
    assert [type(m) for m in model] == [st.BatchNorm1d, st.InstanceNorm1d, st.RMSNorm, st.LayerNorm, st.LayerNorm]
    assert model[0].momentum is None and model[0].eps == 1e-2 and model[0].weight is None
    assert model[0].training and not model[1].training and model[1].track_running_stats
    assert model[2].eps == 1e-3 and model[3] is model[4]
    assert model.state_dict().keys() == torch.nn.Sequential(
        torch.nn.BatchNorm1d(3, affine=False), torch.nn.InstanceNorm1d(3, track_running_stats=True),
        torch.nn.RMSNorm(4), shared, shared).state_dict().keys()


def test_convert_a_bare_norm_layer():
    bn = torch.nn.BatchNorm1d(5, dtype=F64)
    ref, _ = pair("BatchNorm1d", 5, dtype=F64)
    bn.load_state_dict(ref.state_dict())
    bn.weight.requires_grad_(False), ref.weight.requires_grad_(False)
    sym = st.convert(bn)
    assert type(sym) is st.BatchNorm1d and sym is not bn and type(bn) is torch.nn.BatchNorm1d
    assert sym.weight is bn.weight and not sym.weight.requires_grad and sym.training
    assert st.convert(sym) is sym
    steps(ref, sym, (6, 5), n=2)


def test_convert_leaves_subclasses_and_other_norms_alone():
    class Mine(torch.nn.BatchNorm1d):
        pass

    model = torch.nn.Sequential(Mine(3), torch.nn.LazyBatchNorm1d(), torch.nn.SyncBatchNorm(3),
                                torch.nn.LocalResponseNorm(2))
    before = list(model)
    st.convert(model)
    assert list(model) == before


# --------------------------------------------------------------------------- the layer of a spec

def test_spec_layer_parameters_and_buffers():
    m = st.Norm(QUARTIC, 3)
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_m4", "num_batches_tracked"]
    assert m.weight.shape == m.bias.shape == (3,) and m.weight.dtype == torch.float32
    assert m.running_mean.tolist() == [0, 0, 0] and m.running_m4.tolist() == [1, 1, 1]  # m4 >= 0: starts at 1
    assert m.num_batches_tracked.dtype == torch.long and int(m.num_batches_tracked) == 0
    assert "quartic, 3," in repr(m)
    bare = st.Norm(QUARTIC, 3, affine=False, track_running_stats=False, dtype=F64)
    assert list(bare.state_dict()) == [] and bare.weight is None and bare.running_m4 is None
    assert st.Norm("layernorm", normalized_shape=(2, 5)).running_mean is None  # no running statistics by default
    assert st.Norm("groupnorm", 6, num_groups=3, track_running_stats=True).running_var.shape == (3,)
    assert st.Norm("rmsnorm", normalized_shape=4, track_running_stats=True, bias=False).running_ms.shape == (1,)


def test_spec_layer_refuses_the_wrong_sizes():
    with pytest.raises(TypeError, match="needs num_features"):
        st.Norm(QUARTIC)
    with pytest.raises(TypeError, match="takes normalized_shape, not num_features"):
        st.Norm("layernorm", 4)
    with pytest.raises(TypeError, match="num_groups is missing"):
        st.Norm("groupnorm", 4)
    with pytest.raises(ValueError, match="divisible"):
        st.Norm("groupnorm", 6, num_groups=4)
    with pytest.raises(ValueError, match="num_features must be a positive integer"):
        st.Norm(QUARTIC, 0)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, \*\) \(num_features=3\), got \(4, 2\)"):
        st.Norm(QUARTIC, 3)(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"normalized_shape \(2, 5\)"):
        st.Norm("layernorm", normalized_shape=(2, 5))(torch.randn(4, 5, 2))
    with pytest.raises(TypeError, match="input must be a Tensor"):
        st.Norm(QUARTIC, 3)([[1.0, 2.0, 3.0]])


def test_spec_layer_trains_a_step_as_autograd_of_plain_ops():
    """The quartic norm: output and gradients as autograd of the same forward in plain torch
    ops, running statistics by PyTorch's rule, an SGD step, then eval mode on the running ones."""
    m = st.Norm(QUARTIC, 3, dtype=F64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.5, 0.5, -1.0])), m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    gamma, beta = (p.detach().clone().requires_grad_() for p in (m.weight, m.bias))
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 4, generator=g, dtype=F64) * 2 + 1
    dy = torch.randn(6, 3, 4, generator=g, dtype=F64)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yr = m(xs), oracles.torch_forward(QUARTIC, xr, gamma, beta, 1e-5)
    close(ys, yr)
    (ys * dy).sum().backward()
    (yr * dy).sum().backward()
    close(xs.grad, xr.grad), close(m.weight.grad, gamma.grad), close(m.bias.grad, beta.grad)
    mean = x.mean(dim=(0, 2))
    m4 = ((x - mean[:, None]) ** 4).mean(dim=(0, 2))
    close(m.running_mean, 0.1 * mean), close(m.running_m4, 0.9 + 0.1 * m4)
    assert int(m.num_batches_tracked) == 1
    optimizer.step()
    close(m.weight, gamma - 0.1 * gamma.grad), close(m.bias, beta - 0.1 * beta.grad)
    m.eval()
    xs = x.clone().requires_grad_()
    running = [m.running_mean.clone(), m.running_m4.clone()]
    gamma, beta = m.weight.detach().clone(), m.bias.detach().clone()
    xr = x.clone().requires_grad_()
    ys, yr = m(xs), oracles.torch_forward(QUARTIC, xr, gamma, beta, 1e-5, mode="eval", running=running)
    close(ys, yr)
    (ys * dy).sum().backward(), (yr * dy).sum().backward()
    close(xs.grad, xr.grad)
    close(m.running_mean, running[0])  # eval mode leaves them
    assert int(m.num_batches_tracked) == 1


def test_spec_layer_momentum_none_and_untracked():
    m = st.Norm(QUARTIC, 2, momentum=None, dtype=F64)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(5, 2, 3, generator=g, dtype=F64) for _ in range(3)]
    for x in batches:
        m(x)
    close(m.running_mean, torch.stack([x.mean(dim=(0, 2)) for x in batches]).mean(0))  # a cumulative average
    assert int(m.num_batches_tracked) == 3
    free = st.Norm(QUARTIC, 2, track_running_stats=False, dtype=F64).eval()  # eval on the batch's statistics
    close(free(batches[0]), oracles.torch_forward(QUARTIC, batches[0], free.weight, free.bias, 1e-5))


@pytest.mark.parametrize("name, torch_name, sizes, shape", [
    ("batchnorm", "BatchNorm2d", ({"num_features": 4}, (4,)), (3, 4, 2, 3)),
    ("instancenorm", "InstanceNorm1d", ({"num_features": 4, "track_running_stats": True}, (4, 1e-5, 0.1, True, True)),
     (3, 4, 5)),
    ("groupnorm", "GroupNorm", ({"num_features": 6, "num_groups": 3, "track_running_stats": False}, (3, 6)), (2, 6, 4)),
    ("layernorm", "LayerNorm", ({"normalized_shape": (2, 5)}, ((2, 5),)), (3, 2, 5)),
])
def test_spec_layer_of_a_builtin_is_torch_nn_s_layer(name, torch_name, sizes, shape):
    """Norm("batchnorm", C) has BatchNorm's state dict and behaviour, and so on (but counts its
    batches in instance norm's layout too, where torch.nn's InstanceNorm leaves the count at 0)."""
    kwargs, args = sizes
    ref, _ = pair(torch_name, *args, dtype=F64)
    m = st.Norm(name, **kwargs, dtype=F64)
    m.load_state_dict(ref.state_dict(), strict=True)
    ignore = ("num_batches_tracked",) if name == "instancenorm" else ()
    steps(ref, m, shape, ignore=ignore)
    ref.eval(), m.eval()
    steps(ref, m, shape, n=1, ignore=ignore)


def test_spec_layer_running_statistics_in_a_trailing_layout():
    """A layer norm with running statistics (one value each, averaged over the rows): eval mode
    normalizes by them, as the plain-ops forward in eval mode."""
    m = st.Norm("layernorm", normalized_shape=(2, 5), track_running_stats=True, dtype=F64)
    x = torch.randn(3, 2, 5, dtype=F64) * 3 + 2
    m(x)
    rows = x.reshape(3, 10)
    close(m.running_mean, 0.1 * rows.mean().reshape(1))
    close(m.running_var, 0.9 + 0.1 * rows.var(dim=1, unbiased=True).mean().reshape(1))
    m.eval()
    close(m(x), oracles.torch_forward(resolve("layernorm"), x, m.weight, m.bias, mode="eval",
                                      running=[m.running_mean, m.running_var]))
