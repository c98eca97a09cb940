"""float32 accuracy against PyTorch's own (issue 13's condition for faster float32 arithmetic):
symbn's float32 results within 2x PyTorch's float32 error, both measured against a float64
reference computed from the same float32 inputs, on unit data and on 1e4 + noise. Both errors are
printed (``pytest -s``), so a change that trades accuracy for speed shows what it gave up."""
import pytest

torch = pytest.importorskip("torch")
import symbn.torch as S  # noqa: E402

F = torch.nn.functional
EPS32 = 2.0**-23
"""One float32 ulp at 1: the floor where PyTorch happens to be exact."""
CASES = {  # name -> (shape, symbn's call, PyTorch's call), each taking x, weight, bias
    "batchnorm": ((512, 64), lambda x, w, b: S.batch_norm(x, None, None, w, b, True),
                  lambda x, w, b: F.batch_norm(x, None, None, w, b, True)),
    "batchnorm NCHW": ((16, 8, 12, 12), lambda x, w, b: S.batch_norm(x, None, None, w, b, True),
                       lambda x, w, b: F.batch_norm(x, None, None, w, b, True)),
    "layernorm": ((64, 512), lambda x, w, b: S.layer_norm(x, x.shape[-1:], w, b),
                  lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)),
    "rmsnorm": ((64, 512), lambda x, w, b: S.rms_norm(x, x.shape[-1:], w, 1e-5),
                lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, 1e-5)),
    "groupnorm": ((8, 16, 10, 10), lambda x, w, b: S.group_norm(x, 4, w, b),
                  lambda x, w, b: F.group_norm(x, 4, w, b)),
}
DATA = {"unit": 0.0, "1e4 + noise": 1e4}


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


def _results(call, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = call(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), dy, allow_unused=True))


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("case", CASES)
def test_float32_within_twice_pytorchs_own_error(case, data):
    shape, mine, theirs = CASES[case]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen) + DATA[data]
    features = shape[-1] if case in ("layernorm", "rmsnorm") else shape[1]
    w, b = torch.rand(features, generator=gen) + 0.5, torch.randn(features, generator=gen)
    dy = torch.randn(shape, generator=gen)
    reference = _results(theirs, x.double(), w.double(), b.double(), dy.double())  # float64, same float32 inputs
    names = ("y", "dx", "dweight", "dbias")
    for name, got, torch32, want in zip(names, _results(mine, x, w, b, dy), _results(theirs, x, w, b, dy), reference):
        if want is None:  # rms_norm has no bias
            continue
        ours, pytorch = _error(got, want), _error(torch32, want)
        print(f"{case} {data} {name}: symbn {ours:.2e}, PyTorch {pytorch:.2e}")
        assert ours <= 2 * pytorch + EPS32, f"{name}: symbn's float32 error {ours:.2e} > 2x PyTorch's {pytorch:.2e}"
