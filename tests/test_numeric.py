"""The derived expressions, evaluated numerically, against central finite differences of a
forward pass the engine did not produce."""
import numpy as np
import pytest
from conftest import MODES, NORMS, Batch, numeric, staged


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_paper_and_compact_forms_match_finite_differences(derivations, norm, mode, n):
    d = derivations[norm, mode]
    batch = Batch(norm, mode, n=n, seed=n)
    oracle = batch.oracle()
    paper = staged(d, batch)
    env = batch.environment(d)
    for name in ("x", "gamma", "beta"):
        compact = numeric(d, d.compact[name], env, n)
        np.testing.assert_allclose(paper[name], oracle[name], rtol=1e-6, atol=1e-8, err_msg=f"paper {name}")
        np.testing.assert_allclose(compact, oracle[name], rtol=1e-6, atol=1e-8, err_msg=f"compact {name}")


def test_batch_of_one_has_zero_input_gradient(derivations):
    d = derivations["batchnorm", "train"]
    batch = Batch("batchnorm", "train", n=1)
    assert np.allclose(staged(d, batch)["x"], 0.0)


def test_a_wrong_gradient_is_caught(derivations):
    """The oracle can fail: dropping the mean path from dl/dx must not pass."""
    d = derivations["batchnorm", "train"]
    batch = Batch("batchnorm", "train")
    without_mean_path = sum(t.expr for t in d.terms["x"] if t.via != "mean")
    env = batch.environment(d)
    env.update({d.adjoints["xhat"][j + 1]: v for j, v in enumerate(staged(d, batch)["xhat"])})
    env[d.adjoints["var"]] = staged(d, batch)["var"][0]
    wrong = numeric(d, without_mean_path, env, batch.n)
    assert not np.allclose(wrong, batch.oracle()["x"], rtol=1e-3)
