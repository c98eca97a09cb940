"""``bench --against REV``: the working tree's C kernels against a git revision's, interleaved in one
process. The work is kept tiny: one small case, batch norm (256, 64) float32, and few samples."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import symbn.bench
import symbn.compare
from symbn import load
from symbn.compare import CompareError, repository, resolve_revision, revision_files, revision_kernels, to_text

CC = os.environ.get("CC") or "cc"
CASE = ("batchnorm", (256, 64), {}, "float32")
REPEATS = 15  # about 0.1 s of timing per run: enough that a slow spell of the machine cannot decide a median


def _in_git_checkout() -> bool:
    try:
        repository()
    except CompareError:
        return False
    return True


needs_checkout = pytest.mark.skipif(shutil.which("git") is None or not _in_git_checkout(),
                                    reason="needs git and symbn run from its git checkout")
needs_cc = pytest.mark.skipif(shutil.which(CC.split()[0]) is None, reason=f"no C compiler ({CC})")


@pytest.fixture
def tiny(monkeypatch):
    """The quick case list cut to one small case, and few samples."""
    monkeypatch.setattr(symbn.bench, "QUICK", [CASE])
    monkeypatch.setattr(symbn.compare, "QUICK_REPEATS", REPEATS)


def one_line_error(out, message):
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr.startswith("symbn bench: error: "), out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout == ""


def git(folder, *args):
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    """A git checkout of its own, made to look like the one that holds generated/: a function that
    commits the given files under generated/ (or none) and returns the commit's name."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git(tmp_path, "init", "-q")
    monkeypatch.setattr(symbn.compare, "resource_dir", lambda name: tmp_path / name)

    def commit(names):
        (tmp_path / "README").write_text(f"{names}\n")
        if names:
            (tmp_path / "generated").mkdir(exist_ok=True)
        for name in names:
            (tmp_path / "generated" / name).write_text("# not a kernel\n")
        git(tmp_path, "add", "-A")
        git(tmp_path, "commit", "-q", "-m", "files")
        return "HEAD"
    return commit


@needs_checkout
@needs_cc
def test_head_against_head_through_the_command_line(cli, tiny):
    out = cli("bench", "--against", "HEAD", "--quick", "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report) >= {"against", "repository", "threads", "quick", "repeats", "cases", "geometric_mean", "method"}
    assert report["against"]["revision"] == "HEAD" and len(report["against"]["commit"]) == 40
    assert report["quick"] is True and report["repeats"] == REPEATS and report["threads"] == 2
    (case,) = report["cases"]
    assert (case["norm"], case["shape"], case["dtype"]) == ("batchnorm", [256, 64], "float32")
    assert isinstance(case["same_sources"], bool)
    for side in ("working_tree", "against"):
        assert set(case[side]) == {"forward_ms", "backward_ms"} and all(v > 0 for v in case[side].values())
    for kind in ("forward", "backward"):  # the same kernels, or nearly: ratios near 1 (no timing target)
        assert case["ratio"][kind] == pytest.approx(case["working_tree"][f"{kind}_ms"] / case["against"][f"{kind}_ms"])
        assert 0.5 < case["ratio"][kind] < 2, case
    means = report["geometric_mean"]
    assert means["all"] == pytest.approx((case["ratio"]["forward"] * case["ratio"]["backward"]) ** 0.5)
    assert "[1/1] batchnorm 256x64 float32" in out.stderr  # progress on standard error


@needs_checkout
@needs_cc
def test_the_text_table_and_its_summary(cli, tiny):
    out = cli("bench", "--against", "HEAD", "--quick", "--threads", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("C kernels, 1 threads: working tree against HEAD (")
    assert "tree fwd ms" in lines[2] and "HEAD fwd ms" in lines[2] and "bwd ratio" in lines[2]
    assert lines[3].startswith("batchnorm 256x64 float32")
    assert lines[-1].startswith("geometric mean of the 2 ratios, working tree / HEAD: ")


@needs_checkout
@needs_cc
def test_the_revisions_kernels_are_a_package_of_their_own():
    """REV's bindings run from their text in a private package: not the working tree's modules,
    and they compute what the working tree's kernels do (HEAD and the working tree agree here)."""
    top, inside = repository()
    commit = resolve_revision(top, "HEAD")
    files = revision_files(top, inside, commit, "HEAD", "batchnorm")
    assert set(files) == {"batchnorm.c", "batchnorm.h", "batchnorm.py", "_runtime.py"}
    theirs, ours = revision_kernels(files, commit, "HEAD", "batchnorm", 2), load("batchnorm", "c", threads=2)
    module = sys.modules[type(theirs).__module__]
    assert module is not sys.modules[type(ours).__module__] and module.__name__.startswith("_symbn_kernels_")
    assert module._runtime is not sys.modules[type(ours).__module__]._runtime
    assert revision_kernels(files, commit, "HEAD", "batchnorm", 2).__class__ is type(theirs)  # loaded once
    rng = np.random.default_rng(0)
    x, gamma, beta = rng.normal(size=(32, 8)), rng.normal(size=8), rng.normal(size=8)
    for a, b in zip(theirs.forward_train(x, gamma, beta), ours.forward_train(x, gamma, beta)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@needs_checkout
def test_an_unknown_revision_is_one_line_exit_2(cli, tiny):
    one_line_error(cli("bench", "--against", "no-such-revision-0f3a9", "--quick"), "unknown revision 'no-such-revision-0f3a9'")
    one_line_error(cli("bench", "--against", "HEAD:generated"), "unknown revision 'HEAD:generated'")  # a tree, not a commit


def test_against_refuses_plot(cli, tmp_path):
    one_line_error(cli("bench", "--against", "HEAD", "--plot", str(tmp_path / "b.svg")),
                   "--against cannot be combined with --plot")
    assert not (tmp_path / "b.svg").exists()


def test_a_revision_whose_generated_lacks_a_file(cli, tiny, fake_checkout):
    fake_checkout(["batchnorm.c", "batchnorm.py", "_runtime.py", "layernorm.c", "layernorm.h"])
    one_line_error(cli("bench", "--against", "HEAD", "--quick"), "has no generated/batchnorm.h: it cannot be compared for batchnorm")


def test_a_revision_without_generated(cli, tiny, fake_checkout):
    fake_checkout([])
    one_line_error(cli("bench", "--against", "HEAD", "--quick"), "has no generated/: no kernels to compare against")


def test_a_revision_whose_kernels_do_not_load(monkeypatch):
    """Files there but not kernels: a CompareError naming the norm and revision, not the revision's traceback."""
    files = {name: b"raise ImportError('old layout')\n" if name.endswith(".py") else b"" for name in
             ("batchnorm.c", "batchnorm.h", "batchnorm.py", "_runtime.py")}
    commit = "0123456789abcdef" * 2 + "01234567"
    monkeypatch.setattr(symbn.compare, "compile_library", lambda source: source)  # nothing to compile: the bindings fail
    with pytest.raises(CompareError, match=r"the kernels of batchnorm at HEAD \(0123456789ab\) do not load: "
                                           r"ImportError: old layout"):
        revision_kernels(files, commit, "HEAD", "batchnorm", 2)
    where = f"revision:{commit}:{hashlib.sha256(files['_runtime.py']).hexdigest()}"
    package = f"_symbn_kernels_{hashlib.sha256(where.encode()).hexdigest()[:16]}"
    assert package in sys.modules and f"{package}._runtime" not in sys.modules  # nothing half-loaded is kept

def test_not_a_git_checkout(cli, tiny, tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    (tmp_path / "generated").mkdir()
    monkeypatch.setattr(symbn.compare, "resource_dir", lambda name: tmp_path / name)
    one_line_error(cli("bench", "--against", "HEAD", "--quick"), "is not in a git checkout")


def test_to_text_of_a_report():
    report = {"against": {"revision": "v1", "commit": "a" * 40}, "threads": 2, "method": "m", "cases": [
        {"norm": "layernorm", "shape": [8, 4], "dtype": "float64", "same_sources": False,
         "working_tree": {"forward_ms": 1.0, "backward_ms": 2.0}, "against": {"forward_ms": 2.0, "backward_ms": 2.0},
         "ratio": {"forward": 0.5, "backward": 1.0}}],
        "geometric_mean": {"all": 0.5 ** 0.5, "forward": 0.5, "backward": 1.0}}
    lines = to_text(report).splitlines()
    assert lines[3].split() == ["layernorm", "8x4", "float64", "1.000", "2.000", "0.50", "2.000", "2.000", "1.00"]
    assert lines[-1] == ("geometric mean of the 2 ratios, working tree / v1: 0.707 (forward 0.500, backward 1.000; "
                         "below 1: the working tree is faster)")
    with pytest.raises(ValueError, match="format must be one of text, json"):
        symbn.compare.main("HEAD", format="yaml")

