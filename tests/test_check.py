"""``python -m symbn check`` at every order: a fast subset passes, a wrong kernel is caught, JSON parses."""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from symbn import check as checking
from symbn.build import module

CC_MISSING = shutil.which("cc") is None and shutil.which("gcc") is None
HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed: the plain-ops reference needs it")
BACKENDS = ("numpy",) if CC_MISSING else ("numpy", "c")
SUBSET = (("vjp",), ("vjp", "vjp"), ("vjp", "jvp"))


def test_a_fast_subset_of_chains_passes_on_both_backends():
    rows = checking.check(("batchnorm",), BACKENDS, transforms=SUBSET, quick=True)
    # order 1: 2 cases; beyond: 1 case (quick); x 2 modes x 2 dtypes x backends
    assert len(rows) == (2 + 1 + 1) * 2 * 2 * len(BACKENDS)
    assert {row.chain for row in rows} == {"vjp", "vjp²", "vjp·jvp"} and {row.backend for row in rows} == set(BACKENDS)
    assert [row for row in rows if not row.ok] == []
    for row in rows:
        assert row.errors["numpy64"] is not None and (row.errors["fd"] is None) == (row.dtype == "float32")
        if row.order > 1:
            assert (row.errors["plain"] is not None) == HAVE_TORCH and row.errors["torch"] is None


def test_chain_labels_and_orders():
    assert [checking.chain_label(c) for c in checking.CHAINS] == ["vjp", "jvp", "vjp²", "jvp²", "vjp·jvp", "vjp³"]
    assert checking.chains((3,)) == (("vjp", "vjp", "vjp"),)
    assert checking.chains((1, 2)) == checking.CHAINS[:5]
    assert checking.base_name("d3_d2_dy") == "y" and checking.base_name("t2_t_gamma") == "gamma"


def test_check_inputs_match_every_kernel_argument():
    """The names check gives a chain's program are the kernels' own (none missing, none invented)."""
    case = checking.cases("groupnorm")[0]
    for transforms in checking.CHAINS[1:]:
        values = checking.chain_problem(case, transforms)
        inputs, _, outputs = checking.names(transforms)
        assert set(inputs) <= set(values)
        out = checking.call(checking.load("groupnorm", "numpy", transforms=transforms), case, "eval", transforms, values)
        assert set(out) <= set(outputs) and out


def _perturb(monkeypatch, transforms, kernel, output=0, factor=1 + 1e-3):
    """Make ``kernel`` of ``transforms`` (on every backend) return one output slightly wrong."""
    cls = module("batchnorm", transforms).Kernels
    original = getattr(cls, kernel)

    def wrong(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out = list(out) if isinstance(out, tuple) else [out]
        out[output] = out[output] * factor
        return tuple(out) if len(out) > 1 else out[0]

    monkeypatch.setattr(cls, kernel, wrong)


@needs_torch
@pytest.mark.parametrize("transforms, kernel, output", [
    (("vjp", "vjp"), "backward2_train", 0),      # d2_x
    (("vjp", "jvp"), "vjp_jvp_eval", 1),         # t2_dgamma
])
def test_a_wrong_kernel_is_reported_as_a_mismatch(monkeypatch, transforms, kernel, output):
    _perturb(monkeypatch, transforms, kernel, output)
    rows = checking.check(("batchnorm",), BACKENDS, transforms=(transforms,), quick=True)
    mode = kernel.rsplit("_", 1)[1]
    bad = [row for row in rows if not row.ok]
    assert bad and all(row.mode == mode for row in bad)
    assert {row.backend for row in bad} == set(BACKENDS)
    for row in bad:  # the plain-ops reference always sees it, central differences on float64 rows too
        assert row.errors["plain"] > 1e-4
        assert row.dtype == "float32" or row.errors["fd"] > 1e-4
    assert "MISMATCH" in checking.format_row(bad[0])


@needs_torch
def test_the_level_below_is_what_central_differences_use(monkeypatch):
    """A wrong backward (the level below) shows as a disagreement of the double backward with
    central differences of it, while the double backward itself still matches plain PyTorch."""
    _perturb(monkeypatch, ("vjp",), "backward_train", 0, 1.01)
    rows = checking.check(("batchnorm",), ("numpy",), transforms=(("vjp", "vjp"),), quick=True)
    train64 = [row for row in rows if row.mode == "train" and row.dtype == "float64"]
    assert train64 and all(row.errors["fd"] > 1e-4 and row.errors["plain"] < 1e-12 for row in train64)


def run(*args):
    return subprocess.run([sys.executable, "-m", "symbn", "check", *args], capture_output=True, text=True)


def test_json_output_parses_and_the_summary_is_the_last_line():
    out = run("layernorm", "--backend", "numpy", "--orders", "1,2", "--quick", "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["mismatches"] == 0 and report["combinations"] == len(report["rows"]) == (2 + 2) * 2 * 2 + 3 * 2 * 2
    assert {row["chain"] for row in report["rows"]} == {"vjp", "jvp", "vjp²", "jvp²", "vjp·jvp"}
    row = report["rows"][0]
    assert set(row["errors"]) == {"numpy64", "fd", "plain", "torch"} and row["ok"] is True
    assert out.stderr.strip().splitlines()[-1] == f"check: {report['combinations']} combinations, 0 mismatches"


def test_text_output_has_a_chain_column_and_ends_with_the_summary():
    out = run("rmsnorm", "--backend", "numpy", "--orders", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "check: 8 combinations, 0 mismatches"
    assert "chain" in lines[2] and "plain" in lines[2] and "numpy64" in lines[2]
    assert all("vjp³" in line and line.endswith("ok") for line in lines[3:-1])


@pytest.mark.parametrize("args, message", [
    (["--orders", "4"], "must be a comma-separated list of 1, 2, 3"),
    (["--orders", ""], "must be a comma-separated list"),
    (["--format", "xml"], "choose from 'text', 'json'"),
])
def test_bad_options_are_one_line_errors(args, message):
    out = run(*args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.splitlines()) == 1


def test_a_mismatch_makes_the_command_fail(monkeypatch, capsys):
    from symbn.cli import main

    _perturb(monkeypatch, ("vjp", "vjp"), "backward2_eval", 3)  # d2_dy
    assert main(["check", "batchnorm", "--backend", "numpy", "--orders", "2", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and out.strip().splitlines()[-1].endswith(" mismatches") and " 0 mismatches" not in out
