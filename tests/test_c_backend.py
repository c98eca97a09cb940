"""The C backend (symbn/backends/c): any kernel plan rendered, compiled and called through ctypes,
against the plain-ops PyTorch reference of symbn.oracles, in every loop shape.

Each (norm, order) library is compiled once per module (in parallel), into a temporary folder."""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import jinja2
import numpy as np
import pytest

from symbn import jinja as symbn_jinja
from symbn import oracles
from symbn.backends import c as backend
from symbn.interface import DTYPES, SCHEDULES, STATUS, parameters
from symbn.lower import plan as lower_plan
from symbn.program import DATA, ELEMENT, GROUP, PARAM
from symbn.spec import BUILTINS, CHANNEL, Norm

CC = os.environ.get("CC", "cc")
pytestmark = pytest.mark.skipif(shutil.which(CC) is None, reason=f"no C compiler ({CC})")
FLAGS = ["-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-pedantic"]
EPS = 1e-5
QUARTIC = Norm("quartic", stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)",
               affine="group", layout=CHANNEL)
NORMS = {**BUILTINS, "quartic": QUARTIC}
SCHEDULE_VALUES = tuple(SCHEDULES.values())


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(backend.TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(symbn_jinja.environment("code").filters)
    return env


def render(p) -> dict[str, str]:
    env, ctx = environment(), backend.context(p)
    return {name.format(name=p.name): env.get_template(t).render(header="symbn test build", **ctx)
            for name, t in backend.FILES.items()}


class Library:
    """One compiled plan, called through its interface table."""

    def __init__(self, p, path):
        self.plan, self.lib = p, ctypes.CDLL(str(path))

    def call(self, kernel: str, dtype, geometry, values: dict, schedule: int = 0, eps: float = EPS) -> tuple[int, dict]:
        k = self.plan.kernel(kernel)
        outer, q, p, l, s = geometry
        suffix = next(t["suffix"] for t in DTYPES if t["numpy"] == np.dtype(dtype).name)
        fn = getattr(self.lib, f"symbn_{self.plan.norm.name}_{k.name}_{suffix}")
        types, args, keep, outputs = [], [], [], {}
        for prm in parameters(k):
            if prm.ctypes == "pointer":
                a, out = prm.arg, prm.arg in k.outputs
                size = {(ELEMENT, DATA): outer * q * p * l * s, (ELEMENT, PARAM): p * l, (GROUP, PARAM): p,
                        (GROUP, DATA): q * p}[a.kind, a.role]
                kind = np.float64 if a.double else dtype
                sane = 0 < size < 2**30  # else a size the kernel must refuse before it reads or writes
                if out:
                    value = np.zeros(size if sane else 1, kind)
                    outputs[a.name] = value
                else:
                    value = values.get(a.name)
                    if value is not None:
                        value = np.ascontiguousarray(np.asarray(value, kind).reshape(size if sane else -1))
                keep.append(value)
                types.append(ctypes.c_void_p)
                args.append(None if value is None else value.ctypes.data)
            elif prm.ctypes == "size":
                types.append(ctypes.c_ssize_t)
                args.append(dict(zip(("outer", "q_count", "p_count", "l_count", "s_count"), geometry))[prm.name])
            elif prm.ctypes == "real":
                types.append(ctypes.c_double)
                args.append(eps)
            else:
                types.append(ctypes.c_int)
                args.append(schedule)
        fn.argtypes, fn.restype = types, ctypes.c_int
        return fn(*args), outputs


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """(norm, order) -> Library, compiled in parallel (OpenMP)."""
    folder = tmp_path_factory.mktemp("c_backend")
    plans = {(name, order): lower_plan(norm, order=order, frame=backend.framed(("vjp",) * order))
             for name, norm in NORMS.items() for order in (1, 2)}

    def build(key):
        p = plans[key]
        for name, text in render(p).items():
            (folder / name).write_text(text)
        out = folder / f"lib{p.name}.so"
        run = subprocess.run([CC, *FLAGS, "-fopenmp", str(folder / f"{p.name}.c"), "-o", str(out), "-lm"],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return key, Library(p, out)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        libs = dict(pool.map(build, plans))
    for lib in libs.values():
        getattr(lib.lib, f"symbn_{lib.plan.name}_set_num_threads")(2)
    return libs


# --------------------------------------------------------------------------- the reference


def geometry(norm: Norm, shape, num_groups=None):
    n = shape[0]
    if norm.layout.name == "trailing":
        return (1, math.prod(shape[:-1]), 1, shape[-1], 1)
    c, s = shape[1], math.prod(shape[2:])
    if norm.layout.name == "channel":
        return (n, 1, c, 1, s)
    if norm.layout.name == "instance":
        return (1, n, c, 1, s)
    return (1, n, num_groups, c // num_groups, s)


def batch_statistics(norm: Norm, x, geo):
    """Each statistic per group, [q][p], in float64 (what the forward saves)."""
    torch = pytest.importorskip("torch")
    xv = torch.tensor(x, dtype=torch.float64).reshape(geo)
    env = {"x": xv, "eps": EPS}
    out = {}
    for name, text in norm.stats:
        value = torch.broadcast_to(torch.as_tensor(oracles._evaluate(text, env), dtype=torch.float64), xv.shape)
        env[name] = value.mean(dim=(0, 3, 4), keepdim=True)
        out[name] = env[name].reshape(geo[1], geo[2]).numpy()
    return out


def case(norm_name: str, shape, order: int, mode: str, num_groups=None, seed=0):
    """Random inputs for the level ``order`` kernel and the reference outputs (float64)."""
    norm = NORMS[norm_name]
    rng = np.random.default_rng(seed)
    geo = geometry(norm, shape, num_groups)
    pshape = (shape[-1],) if norm.layout.name == "trailing" else (shape[1],)
    values = {"x": rng.standard_normal(shape) * 2 + 0.5, "gamma": rng.standard_normal(pshape) + 1.5,
              "beta": rng.standard_normal(pshape)}
    running = None
    if mode == "eval":
        running = [rng.standard_normal(geo[2]) * 0.1 if text.strip() == "x" else np.abs(rng.standard_normal(geo[2])) + 0.5
                   for _, text in norm.stats]
        values.update({name: r for name, r in zip(norm.stat_names, running)})
    program = oracles.forward_program(norm, mode, EPS, running=running, num_groups=num_groups)
    program = oracles.chain(program, ["vjp"] * order)
    for name in program.inputs:
        if name not in values:
            values[name] = rng.standard_normal(pshape if name.endswith(("gamma", "beta")) else shape)
    reference = oracles.evaluate(program, values)
    if mode == "train":
        values.update(batch_statistics(norm, values["x"], geo))
    return geo, values, reference


def check(lib: Library, kernel: str, geo, values, reference, dtype, schedule):
    status, outputs = lib.call(kernel, dtype, geo, values, schedule)
    assert status == STATUS["SYMBN_OK"], (kernel, status)
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    for name, expected in reference.items():
        error = oracles.relative_error(outputs[name], np.asarray(expected).reshape(-1))
        assert error < tolerance, f"{kernel} {np.dtype(dtype).name} schedule {schedule}: {name} off by {error:.3g}"
    return outputs


SHAPES = {
    "batchnorm": [(8, 3), (4, 3, 40, 40), (300, 2000)],
    "layernorm": [(4, 64), (3, 5, 40), (80, 1024)],
    "rmsnorm": [(4, 64), (6, 7)],
    "instancenorm": [(2, 3, 5, 7), (2, 4, 40, 40)],
    "groupnorm": [(2, 6, 5, 5), (3, 4, 8, 8), (4, 128, 1)],
    "quartic": [(8, 3), (4, 3, 6, 6)],
}
GROUPS_OF = {"groupnorm": {(2, 6, 5, 5): 3, (3, 4, 8, 8): 2, (4, 128, 1): 2}}
FLOAT32_SCHEDULES = (0, SCHEDULES["SYMBN_SCHEDULE_GROUPS"])
"""float32 runs the rule and the group-major shape, whose sums may be float in short blocks: runs
longer than a block (batch norm's (4, 3, 40, 40)), parameter gradients summed over a run (instance,
group norm), in memory and added up every few groups (layer norm's (80, 1024)), or kept in double
(group norm's (4, 128, 1): one run per group, two groups per parameter)."""


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("norm", list(NORMS))
def test_against_reference(libraries, norm, order):
    """Every kernel of the plan, train and eval, float64 (every loop shape) and float32."""
    pytest.importorskip("torch")
    lib, spec = libraries[norm, order], NORMS[norm]
    unit = "backward" if order == 1 else "backward2"
    for shape in SHAPES[norm]:
        groups = GROUPS_OF.get(norm, {}).get(shape)
        schedules = SCHEDULE_VALUES  # every loop shape on every problem (LANES, where l * s > 1, is AUTO)
        for mode in ("train", "eval"):
            geo, values, reference = case(norm, shape, order, mode, groups)
            running = [values[s] for s in spec.stat_names] if mode == "eval" else None
            forward = oracles.evaluate(oracles.forward_program(spec, mode, EPS, running=running, num_groups=groups),
                                       {k: values[k] for k in ("x", "gamma", "beta")})
            if mode == "train":
                forward.update({s: values[s] for s in spec.stat_names})
            for dtype in (np.float64, np.float32):
                for schedule in schedules if dtype == np.float64 else FLOAT32_SCHEDULES:
                    check(lib, f"{unit}_{mode}", geo, values, reference, dtype, schedule)
                    if order == 1:
                        check(lib, f"forward_{mode}", geo, values, forward, dtype, schedule)


def test_schedule_rule_matches_c(libraries):
    """choose_schedule (Python), the rendered schedule.py and the C rule agree."""
    lib = libraries["batchnorm", 1]
    c_rule = lib.lib.symbn_batchnorm_schedule
    c_rule.argtypes, c_rule.restype = [ctypes.c_ssize_t] * 5, ctypes.c_int
    namespace: dict = {}
    exec(environment().get_template("schedule.py.j2").render(**backend.context(lib.plan)), namespace)
    for geo in [(8, 1, 3, 1, 1), (300, 1, 2000, 1, 1), (4, 1, 3, 1, 1600), (1, 4, 1, 64, 1), (1, 8192, 1, 1024, 1),
                (256, 1, 64, 1, 1), (32, 1, 64, 1, 3136), (1, 2, 3, 2, 25), (8192, 1, 1024, 1, 1), (1, 1, 1, 100000, 1)]:
        expected = backend.choose_schedule(None, *geo, threads=2)
        assert c_rule(*geo) == expected, geo
        assert namespace["schedule"](*geo, 2) == expected, geo


def test_errors(libraries):
    """NULL, non-positive and overflowing sizes, non-finite inputs; NULL gamma and beta are 1 and 0."""
    lib = libraries["batchnorm", 1]
    x = np.random.default_rng(1).standard_normal((16, 4))
    geo = (16, 1, 4, 1, 1)
    status, _ = lib.call("forward_train", np.float64, geo, {})
    assert status == STATUS["SYMBN_ENULL"]
    for bad in [(0, 1, 4, 1, 1), (16, 1, -4, 1, 1), (2**31, 2**31, 4, 1, 1), (1, 1, 4, 2**61, 4), (2**40, 1, 4, 2**20, 1)]:
        status, _ = lib.call("forward_eval", np.float64, bad, {"x": x, "mean": np.zeros(4), "var": np.ones(4)})
        assert status == STATUS["SYMBN_ESIZE"], bad
    bad = x.copy()
    bad[3, 1] = np.nan
    status, _ = lib.call("forward_train", np.float64, geo, {"x": bad})
    assert status == STATUS["SYMBN_ENONFINITE"]
    status, _ = lib.call("forward_train", np.float64, geo, {"x": x, "gamma": np.array([1, np.inf, 1, 1.0])})
    assert status == STATUS["SYMBN_ENONFINITE"]
    status, out = lib.call("forward_train", np.float64, geo, {"x": x})
    assert status == STATUS["SYMBN_OK"]
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) + EPS)
    assert oracles.relative_error(out["y"].reshape(x.shape), expected) < 1e-12
    status, out = lib.call("backward_train", np.float64, geo, {"x": x, "dy": x, "mean": x.mean(0), "var": x.var(0)})
    assert status == STATUS["SYMBN_OK"]  # dgamma, dbeta NULL: not computed


def test_generated_text():
    """Deterministic, compact, clean without OpenMP; user text cannot reach the code."""
    p = lower_plan("batchnorm", order=1, frame=False)
    first, again = render(p), render(lower_plan("batchnorm", order=1, frame=False))
    assert first == again
    assert len(first["batchnorm.c"].splitlines()) < 2000
    hostile = Norm("hostile", stats={"mean": "x", "var": "(x - mean)**2"}, normalized="(x - mean) / sqrt(var + eps)",
                   affine="group", layout=CHANNEL, description="*/ int pwn = 1; /*")
    for name, text in render(lower_plan(hostile, order=1, frame=False)).items():
        assert "*/ int pwn" not in text
        # the code without its comments (as the compiler sees it) holds no trace of the description
        run = subprocess.run([CC, "-fpreprocessed", "-dD", "-E", "-x", "c", "-"], input=text, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "pwn" not in run.stdout, name


def test_compiles_without_openmp(tmp_path):
    """-Wall -Wextra -Werror -pedantic, no OpenMP: one thread, the same code."""
    files = render(lower_plan("groupnorm", order=1, frame=False))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    run = subprocess.run([CC, *FLAGS, "-O1", str(tmp_path / "groupnorm.c"), "-o", str(tmp_path / "lib.so"), "-lm"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
