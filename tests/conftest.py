"""Independent oracles for the symbolic core: a NumPy forward written here, finite differences,
and a numeric evaluator that walks the staged adjoints with plain SymPy substitution."""
from __future__ import annotations

import os
import shutil
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import sympy as sp

from symbn import derive
from symbn.cli import main
from symbn.oracles import central_differences
from symbn.sums import I, M


def pytest_configure(config):
    """One kernel cache for the whole session (C compiles once per plan), made by the process that
    starts the session and removed by it at the end; pytest-xdist's workers inherit it."""
    if os.environ.get("SYMBN_CACHE_DIR") or hasattr(config, "workerinput"):
        return
    os.environ["SYMBN_CACHE_DIR"] = config._symbn_cache = tempfile.mkdtemp(prefix="symbn-tests-")


def pytest_unconfigure(config):
    if getattr(config, "_symbn_cache", None):
        shutil.rmtree(config._symbn_cache, ignore_errors=True)
        del os.environ["SYMBN_CACHE_DIR"]


NORMS = ("batchnorm", "layernorm", "rmsnorm")
MODES = ("train", "eval")
EPS = 0.1  # large enough that the eps terms matter


def forward(norm: str, x, gamma, beta, eps=EPS, stats=None):
    """One group's forward pass in NumPy, written from the papers, not from symbn's specs.
    Returns y and the statistics; ``stats`` given means inference (population statistics)."""
    if norm == "rmsnorm":
        (ms,) = stats if stats is not None else ((x**2).mean(),)
        return gamma * x / np.sqrt(ms + eps) + beta, {"ms": ms}
    mean, var = stats if stats is not None else (x.mean(), ((x - x.mean()) ** 2).mean())
    return gamma * (x - mean) / np.sqrt(var + eps) + beta, {"mean": mean, "var": var}


def finite_difference(f, v, h=1e-6):
    """Central differences of scalar f at every entry of the float64 array v (or at the float v, as
    an array of one): :func:`symbn.oracles.central_differences`, with its step relative to each entry."""
    return central_differences(f, np.atleast_1d(np.asarray(v, dtype=np.float64)), h)


class Batch:
    """A random group of n elements, the cotangent dy, parameters, and the test's own forward."""

    def __init__(self, norm: str, mode: str, n: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.norm, self.mode, self.n = norm, mode, n
        self.x = rng.normal(1.0, 2.0, n)
        self.dy = rng.normal(size=n)  # random cotangent: a cotangent of ones hides errors
        per_element = norm != "batchnorm"
        self.gamma = rng.normal(1.0, 0.5, n) if per_element else 1.3
        self.beta = rng.normal(size=n) if per_element else -0.4
        self.population = (0.7, 2.5) if norm != "rmsnorm" else (3.1,)
        self.population = self.population if mode == "eval" else None
        self.y, self.stats = forward(norm, self.x, self.gamma, self.beta, stats=self.population)
        mean = self.stats.get("mean", 0.0)
        spread = self.stats.get("var", self.stats.get("ms"))
        self.xhat = (self.x - mean) / np.sqrt(spread + EPS)

    def loss(self, x=None, gamma=None, beta=None) -> float:
        x = self.x if x is None else x
        gamma = self.gamma if gamma is None else (gamma if np.ndim(self.gamma) else gamma[0])
        beta = self.beta if beta is None else (beta if np.ndim(self.beta) else beta[0])
        return float(self.dy @ forward(self.norm, x, gamma, beta, stats=self.population)[0])

    def oracle(self) -> dict[str, np.ndarray]:
        """dl/dx, dl/dgamma, dl/dbeta of l = Σ dy·y by central differences in float64."""
        return {
            "x": finite_difference(lambda v: self.loss(x=v), self.x),
            "gamma": finite_difference(lambda v: self.loss(gamma=v), self.gamma),
            "beta": finite_difference(lambda v: self.loss(beta=v), self.beta),
        }

    def environment(self, d) -> dict:
        """Numeric values for the derivation's symbols at m = n (indices 1..n)."""
        s = d.symbols
        env = {s["eps"]: EPS, M: self.n}
        for name in ("x", "dy", "xhat", "gamma", "beta"):
            value = getattr(self, name)
            if isinstance(s[name], sp.IndexedBase):
                env.update({s[name][j + 1]: value[j] for j in range(self.n)})
            else:
                env[s[name]] = value
        env.update({s[name]: value for name, value in self.stats.items()})
        return env


def numeric(d, expr, env, n) -> np.ndarray:
    """expr at every element i (or once, if it has no i) by substitution at m = n."""
    expanded = expr.subs(M, n)
    at = [expanded.xreplace({I: j + 1}).doit() for j in range(n)] if expanded.has(I) else [expanded.doit()]
    env = {key: sp.sympify(value) for key, value in env.items()}
    return np.array([float(e.xreplace(env)) for e in at])


def staged(d, batch: Batch) -> dict[str, np.ndarray]:
    """The paper-form adjoints evaluated in their derived order, each using the earlier ones."""
    env = batch.environment(d)
    out = {}
    for name, gradient in d.gradients.items():
        value = numeric(d, gradient, env, batch.n)
        out[name] = value
        adjoint = d.adjoints[name]
        if isinstance(adjoint, sp.IndexedBase):
            env.update({adjoint[j + 1]: value[j] for j in range(batch.n)})
        else:
            env[adjoint] = value[0]
    return out


@pytest.fixture(scope="session")
def derivations():
    """Every built-in in both modes, derived once per test session."""
    return {(norm, mode): derive(norm, mode) for norm in NORMS for mode in MODES}


@pytest.fixture
def cli(capsys):
    """``symbn ARGS`` in this process: returncode, stdout, stderr (the program name is ``symbn``)."""
    def call(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return call
