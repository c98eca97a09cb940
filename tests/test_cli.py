"""The command line as a user runs it: output, exit codes, one-line errors, files, LaTeX.

Most tests run the command in this process (:func:`cli`, through ``symbn.cli.main(argv)``); a
subprocess only where the entry point itself is under test (the program name) or a file is
compiled."""
import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import NORMS
from symbn import BUILTINS
from symbn.cli import main
from symbn.errors import CompilerError, LatexError, SpecError, TorchMissing

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=None):
    """``python -m symbn ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "symbn", *args], capture_output=True, text=True, cwd=cwd)


def one_line_error(out, command, message, status=2):
    """The refusal every command makes: ``symbn COMMAND: error: ...`` on one line, no traceback."""
    assert out.returncode == status, (out.returncode, out.stderr)
    assert out.stderr.startswith(f"symbn {command}: error: "), out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr


def test_default_prints_the_six_paper_expressions_and_the_compact_form(cli):
    out = cli("derive")
    assert out.returncode == 0, out.stderr
    for lhs in ("∂l/∂x̂_i = γ·∂l/∂y_i", "∂l/∂σ²_B = ", "∂l/∂μ_B = ", "∂l/∂x_i = ", "∂l/∂γ = ", "∂l/∂β = "):
        assert lhs in out.stdout
    assert "∂l/∂x_i = γ·(m·∂l/∂y_i - Σ_k ∂l/∂y_k - x̂_i·Σ_k (∂l/∂y_k·x̂_k))/(m·√(σ²_B + ε))" in out.stdout
    assert "3 paths" in out.stdout


def test_eval_mode_and_forms(cli):
    out = cli("derive", "batchnorm", "--mode", "eval", "--form", "compact")
    assert out.returncode == 0
    assert "∂l/∂x_i = γ·∂l/∂y_i/√(Var[x] + ε)" in out.stdout
    assert "paper form" not in out.stdout and "1 path" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["derive", "groupnorm9"],
     "invalid choice: 'groupnorm9' (choose from 'batchnorm', 'layernorm', 'rmsnorm', 'instancenorm', 'groupnorm')"),
    (["derive", "--mode", "test"], "choose from 'train', 'eval'"),
    (["derive", "--form", "short"], "choose from 'paper', 'compact', 'both'"),
    (["derive", "--format", "html"], "choose from 'text', 'latex', 'json'"),
    (["derive", "--bogus"], "unrecognized arguments: --bogus"),
    (["list", "--format", "latex"], "choose from 'text', 'json'"),
    (["bench", "--format", "csv"], "choose from 'text', 'json'"),
    (["bench", "--json"], "unrecognized arguments: --json"),
    (["bench", "--threads", "0"], "argument --threads: must be a positive integer, got '0'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_bad_usage_exits_2_with_one_line(cli, args, message):
    out = cli(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr and out.stderr.startswith(f"symbn{' ' + args[0] if args[1:] else ''}: error: ")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_unwritable_output_is_a_clear_error(cli, tmp_path):
    one_line_error(cli("derive", "-o", str(tmp_path / "missing" / "x.txt")), "derive", "cannot write")
    one_line_error(cli("derive", "-o", str(tmp_path)), "derive", "it is a directory")
    one_line_error(cli("explain", "-o", str(tmp_path / "missing" / "x.txt")), "explain", "cannot write")
    one_line_error(cli("report", "-o", str(tmp_path / "missing" / "r.pdf")), "report", "cannot write")
    one_line_error(cli("bench", "--quick", "--plot", str(tmp_path / "missing" / "b.svg")), "bench", "cannot write")
    (tmp_path / "file").write_text("")
    one_line_error(cli("generate", "-o", str(tmp_path / "file" / "sub")), "generate", "cannot write")


def test_an_output_file_failing_late_is_one_line_too(cli, tmp_path, monkeypatch):
    """A write that fails after the checks (a full disk) is reported like the rest."""
    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    one_line_error(cli("derive", "--form", "compact", "-o", str(tmp_path / "x.txt")), "derive",
                   f"cannot write {tmp_path / 'x.txt'}: No space left on device")
    monkeypatch.setattr("symbn.bench.bench", lambda *args, **kwargs: {"cases": [], "double_backward": []})
    one_line_error(cli("bench", "--plot", str(tmp_path / "b.svg")), "bench", "No space left on device")


def test_a_reader_that_goes_away_is_no_traceback(capsys, monkeypatch):
    """symbn list | head -1: standard output breaks; the command stops quietly with 141 (128 + SIGPIPE)."""
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["list"]) == 141 and main(["list", "--format", "json"]) == 141
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_help_and_list(cli):
    for args in (["--help"], ["derive", "--help"], ["list", "--help"], ["bench", "--help"]):
        assert cli(*args).returncode == 0
    listed = cli("list").stdout.splitlines()
    assert [line.split()[0] for line in listed] == list(BUILTINS)


def test_list_as_json(cli):
    out = cli("list", "--format", "json")
    assert out.returncode == 0, out.stderr
    norms = json.loads(out.stdout)["norms"]
    assert [n["name"] for n in norms] == list(BUILTINS)
    batchnorm = norms[0]
    assert batchnorm["description"] == BUILTINS["batchnorm"].description and batchnorm["affine"] == "group"
    assert set(batchnorm["layout"]) == {"name", "description"} and set(batchnorm["statistics"]) == {"mean", "var"}


def test_every_command_that_prints_results_takes_format_json(cli):
    """--format text|json is the same option everywhere it applies; report and generate write files."""
    from symbn.cli import parser

    commands = parser().commands
    for name, sub in commands.items():
        formats = [a for a in sub._actions if "--format" in a.option_strings]
        if name in ("report", "generate"):
            assert not formats, name
        else:
            (option,) = formats
            assert {"text", "json"} <= set(option.choices) and option.default in (None, "text"), name


def test_json_has_stable_keys(cli, tmp_path):
    target = tmp_path / "bn.json"
    assert cli("derive", "--format", "json", "-o", str(target)).returncode == 0
    doc = json.loads(target.read_text())
    assert doc["norm"] == "batchnorm" and doc["mode"] == "train"
    assert list(doc["gradients"]) == ["xhat", "var", "mean", "x", "gamma", "beta"]
    assert [t["via"] for t in doc["gradients"]["x"]["terms"]] == ["xhat", "var", "mean"]
    assert set(doc["compact"]) == {"x", "gamma", "beta"}
    assert {"text", "latex", "sympy"} <= set(doc["compact"]["x"]["rhs"])
    assert "proofs" not in doc


@pytest.mark.slow
def test_json_proofs():
    doc = json.loads(run("derive", "rmsnorm", "--format", "json", "--proofs").stdout)
    status = {p["key"]: p["status"] for p in doc["proofs"]}
    assert status["paper_equals_direct[x]"] == "proven" and status["sum_dx_zero"] == "refuted"
    assert status["brute_force[m=6]"] == "proven"


def test_latex_equations(cli):
    out = cli("derive", "--format", "latex").stdout
    assert r"\begin{align*}" in out and r"\frac{\partial \ell}{\partial \sigma^{2}_{\mathcal{B}}}" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (CI installs it)")
@pytest.mark.parametrize("norm", NORMS)
def test_document_compiles(tmp_path, norm):
    tex = tmp_path / f"{norm}.tex"
    assert run("derive", norm, "--format", "latex", "--document", "-o", str(tex)).returncode == 0
    compiled = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", tex.name],
                              cwd=tmp_path, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-2000:]
    assert (tmp_path / f"{norm}.pdf").stat().st_size > 10_000


def test_generate_writes_every_kernel_file(cli, tmp_path):
    out = cli("generate", "-o", str(tmp_path))
    assert out.returncode == 0, out.stderr
    names = {p.name for p in tmp_path.iterdir()}
    stems = [*BUILTINS, *(f"{n}_backward2" for n in BUILTINS)]  # orders 1 and 2
    assert {f"{n}.{ext}" for n in stems for ext in ("py", "c", "h")} | {"__init__.py", "_runtime.py"} == names


def test_check_rejects_unknown_norms_in_one_line(cli):
    out = cli("check", "nope")
    assert out.returncode == 2 and "invalid choice: 'nope'" in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("args, target, error", [
    (["derive", "rmsnorm"], "symbn.cli.derive", SpecError("rmsnorm: a bad spec")),
    (["explain"], "symbn.explain.explain", SpecError("batchnorm: a bad spec")),
    (["report", "-o", "REPORT"], "symbn.explain.write_report", LatexError("pdflatex not found; r.tex is written")),
    (["check", "--backend", "numpy"], "symbn.check.check", TorchMissing("this oracle needs PyTorch")),
    (["bench", "--quick"], "symbn.bench.bench", CompilerError("the C compiler cannot run: cc")),
    (["generate", "-o", "DIR"], "symbn.emit.generate", CompilerError("no compiler")),
])
def test_every_symbn_error_is_one_line_exit_2(cli, monkeypatch, tmp_path, args, target, error):
    """Whatever SymbnError reaches the command line: PROG COMMAND: error: message, status 2."""
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, refuse)
    if args[0] == "report":
        monkeypatch.setattr("symbn.explain.explain", lambda norm: None)
    args = [{"REPORT": str(tmp_path / "r.pdf"), "DIR": str(tmp_path)}.get(a, a) for a in args]
    out = cli(*args)
    one_line_error(out, args[0], str(error))
    if args[0] == "check":
        assert "check: " not in out.stdout  # no totals: nothing was checked


def test_a_compiler_error_keeps_the_compiler_output_after_its_line(cli, monkeypatch):
    def refuse(*args, **kwargs):
        raise CompilerError("compiling batchnorm.c failed:\ncc -O2 batchnorm.c\nbatchnorm.c:1:1: error: boom")

    monkeypatch.setattr("symbn.check.check", refuse)
    out = cli("check", "--backend", "c", "--format", "json")
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert lines[0] == "symbn check: error: compiling batchnorm.c failed: (check the NumPy backend alone with --backend numpy)"
    assert lines[1:] == ["    cc -O2 batchnorm.c", "    batchnorm.c:1:1: error: boom"]


def test_bench_format_json_replaces_the_json_flag(cli, monkeypatch):
    """bench --format json prints the report as JSON; text the table (bench itself stubbed: no timing here)."""
    import symbn.bench

    report = {"cases": [], "double_backward": [], "allocation": "glibc told to keep it"}
    calls = []
    monkeypatch.setattr(symbn.bench, "bench", lambda quick, threads, progress: calls.append((quick, threads)) or report)
    monkeypatch.setattr(symbn.bench, "to_text", lambda r: "the table\n")
    out = cli("bench", "--quick", "--format", "json", "--threads", "3")
    assert out.returncode == 0 and json.loads(out.stdout) == report and calls == [(True, 3)]
    assert cli("bench").stdout == "the table\n" and calls[-1] == (False, 2)
    with pytest.raises(ValueError, match="format must be one of text, json"):
        symbn.bench.main(format="yaml")


@pytest.mark.slow
def test_bench_quick_reports_every_implementation(tmp_path):
    """Runs the benchmark (no timing is asserted): every case has C, NumPy and the hand-written baselines."""
    out = run("bench", "--quick", "--format", "json", "--plot", str(tmp_path / "bench.svg"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report["cases"]) == 3 and "[3/3]" in out.stderr
    (double,) = report["double_backward"]
    assert double["ms"]["symbn double backward"] > 0 and double["double_vs_own_backward"] > 0
    torch = {"torch", "torch (fresh)"} if importlib.util.find_spec("torch") else set()
    for case in report["cases"]:
        assert {"c", "numpy", "compact numpy", "staged numpy", *torch} <= set(case["results"]) and case["triad_gbs"] > 0
        assert case["dtype"] == "float32" and case["results"]["compact numpy"]["forward_ms"] > 0
    assert "glibc told to keep it" in report["allocation"]
    assert (tmp_path / "bench.svg").read_text().startswith("<svg")
    import symbn.bench

    if torch:
        whole = report["whole"]
        assert whole["shape"] == [256, 64] and min(whole["ms"].values()) > 0 and whole["forward_vs_torch"] > 0
    assert set(report["targets"]) == set(symbn.bench.TARGETS)
    assert report["targets"]["double_vs_torch"]["met"] is (None if not torch else report["targets"]["double_vs_torch"]["measured"] <= 1.0)
    assert "targets (issue 13)" in symbn.bench.to_text(report)


def test_the_bench_targets_follow_the_measurements():
    """Each target's status from a report: the extreme value, where it was, met or not; nothing
    measured, None. The committed run (docs/bench.json) prints and gives the statuses it holds."""
    import symbn.bench

    def case(norm, shape, dtype, c, numpy=None, compact=None, triad=None):
        results = {"c": {"forward_vs_torch": c[0], "backward_vs_torch": c[1], "forward_of_triad": triad}}
        if numpy:
            results["numpy"] = {"forward_ms": numpy[0], "backward_ms": numpy[1]}
            results["compact numpy"] = {"forward_ms": compact[0], "backward_ms": compact[1]}
        return {"norm": norm, "shape": list(shape), "dtype": dtype, "results": results}

    report = {"cases": [case("batchnorm", (8192, 1024), "float32", (0.9, 1.2), (2.0, 3.0), (2.0, 4.0), triad=0.81),
                        case("layernorm", (8192, 1024), "float32", (0.5, 0.7))],
              "double_backward": [{"shape": [8192, 1024], "double_vs_torch": 0.2}], "whole": None, "torch": None}
    t = symbn.bench.targets(report)
    assert t["c_vs_torch"] == {**t["c_vs_torch"], "measured": 1.2, "where": "batchnorm 8192x1024 float32 backward", "met": False}
    assert t["forward_of_triad"]["met"] is True and t["forward_of_triad"]["measured"] == 0.81
    assert t["numpy_vs_compact"]["measured"] == 1.0 and t["numpy_vs_compact"]["met"] is True
    assert t["double_vs_torch"]["met"] is True
    assert t["whole_256x64"]["met"] is None and t["ops_vs_torch"]["met"] is None
    committed = json.loads((ROOT / "docs" / "bench.json").read_text())
    assert symbn.bench.targets(committed) == committed["targets"]
    assert "targets (issue 13)" in symbn.bench.to_text(committed)


@pytest.mark.parametrize("shape", [(64, 8), (4, 3, 5, 6)])
def test_the_bench_baselines_compute_batch_norm(shape):
    """The hand-written NumPy the bench times symbn against computes what the generated kernels do
    (float64; they are checked against PyTorch and finite differences elsewhere)."""
    import numpy as np

    from symbn import load
    from symbn.bench import _compact_backward, _compact_forward, _staged_backward

    rng = np.random.default_rng(3)
    x, dy = rng.normal(3, 2, shape), rng.normal(size=shape)
    gamma, beta = rng.normal(1, 0.2, shape[1]), rng.normal(size=shape[1])
    y, mean, var = load("batchnorm").forward_train(x, gamma, beta)
    expected = load("batchnorm").backward_train(dy, x, gamma, mean, var)
    hand = _compact_forward(x, gamma, beta)  # saves the inverse standard deviation, as frameworks do
    for mine, theirs in zip(hand, (y, mean, 1 / np.sqrt(var + 1e-5))):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)
    for backward in (_compact_backward(dy, x, gamma, hand[1], hand[2]), _staged_backward(dy, x, gamma)):
        for mine, theirs in zip(backward, expected):
            np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-10)


def test_the_allocator_modes_of_the_bench_leave_results_alone():
    """keep_freed_memory only changes where large blocks come from, never what they hold."""
    import numpy as np

    from symbn.bench import keep_freed_memory

    for keep in (True, False, True):
        assert keep_freed_memory(keep)  # glibc here
        a = np.arange(1 << 23, dtype=np.float64)
        assert a[-1] == (1 << 23) - 1 and float(a.sum()) == (1 << 23) * ((1 << 23) - 1) / 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_order_2_document_compiles(tmp_path):
    """The article with the double backward: its staged levels, compact form and proofs."""
    tex = tmp_path / "bn2.tex"
    out = run("derive", "batchnorm", "--order", "2", "--format", "latex", "--document", "-o", str(tex))
    assert out.returncode == 0, out.stderr
    assert r"\partial \ell_{2}" in tex.read_text() and "Higher order" in tex.read_text()
    compiled = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", tex.name],
                              cwd=tmp_path, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-2000:]


def test_derive_at_higher_orders(cli):
    out = cli("derive", "batchnorm", "--order", "2", "--form", "compact")
    assert out.returncode == 0, out.stderr
    assert "Level 2" in out.stdout and "∂l₂/∂x_i = " in out.stdout and "∂l₂/∂(∂l/∂y_i) = " in out.stdout
    doc = json.loads(cli("derive", "rmsnorm", "--transforms", "vjp,jvp", "--format", "json").stdout)
    assert doc["order"] == 2 and doc["transforms"] == ["vjp", "jvp"] and len(doc["levels"]) == 2
    assert set(doc["compact"]) == {"dx", "dgamma", "dbeta"}
    for args, message in ((["--order", "0"], "must be a positive integer"), (["--transforms", "vjp,hvp"], "vjp or jvp"),
                          (["--order", "2", "--transforms", "vjp"], "not both")):
        bad = cli("derive", *args)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)


@pytest.mark.parametrize("args, message", [
    (["--mode", "eval"], "--mode cannot be combined with --document"),
    (["--mode", "train"], "--mode cannot be combined with --document"),
    (["--form", "compact"], "--form cannot be combined with --document"),
    (["--format", "json"], "--format json cannot be combined with --document"),
    (["--format", "text"], "--format text cannot be combined with --document"),
    (["--format", "latex", "--order", "2", "--form", "paper"], "--form cannot be combined with --document"),
])
def test_document_refuses_what_it_cannot_honour_naming_the_option(cli, tmp_path, args, message):
    """The article has both modes and both forms: --mode and --form are refused, never ignored,
    and nothing is written."""
    target = tmp_path / "bn.tex"
    one_line_error(cli("derive", "--document", *args, "-o", str(target)), "derive", message)
    assert not target.exists()


def test_document_honours_format_proofs_and_order(cli, monkeypatch):
    """--document implies --format latex; --proofs asks for what the article always has; the
    order or chain picks the article's higher-order part (to_document stubbed: the article is built elsewhere)."""
    calls = []
    monkeypatch.setattr("symbn.cli.to_document",
                        lambda norm, transforms, budget=None: calls.append((norm, transforms)) or "\\documentclass{article}\n")
    for args in ([], ["--format", "latex"], ["--proofs"], ["--format", "latex", "--proofs"]):
        out = cli("derive", "layernorm", "--document", *args)
        assert out.returncode == 0 and out.stdout == "\\documentclass{article}\n", (args, out.stderr)
    assert cli("derive", "--document", "--order", "2").returncode == 0
    assert cli("derive", "--document", "--transforms", "vjp,jvp").returncode == 0
    assert calls == [("layernorm", ("vjp",))] * 4 + [("batchnorm", ("vjp", "vjp")), ("batchnorm", ("vjp", "jvp"))]


def test_latex_equations_refuse_proofs_they_cannot_show(cli, monkeypatch):
    """--format latex prints the equations only: --proofs is refused before any proving starts."""
    monkeypatch.setattr("symbn.cli.prove", lambda d: pytest.fail("proved for nothing"))
    one_line_error(cli("derive", "--format", "latex", "--proofs"), "derive", "--proofs cannot be combined with --format latex")


@pytest.mark.parametrize("entry", ["module", "script"])
def test_the_program_name_is_the_entry_point_called(entry):
    """``python -m symbn`` in messages when run as a module, ``symbn`` through the console script,
    in usage lines, argparse's errors and the commands' own refusals alike."""
    if entry == "module":
        command, prog = [sys.executable, "-m", "symbn"], "python -m symbn"
    else:
        script = Path(sysconfig.get_path("scripts")) / "symbn"
        if not script.exists():
            pytest.skip(f"the console script is not installed at {script} (pip install -e .)")
        command, prog = [str(script)], "symbn"
    usage = subprocess.run([*command, "derive", "--mode", "test"], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith(f"{prog} derive: error: argument --mode: invalid choice: 'test'")
    refused = subprocess.run([*command, "derive", "--document", "--mode", "eval"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr == f"{prog} derive: error: --mode cannot be combined with --document " \
        "(the article shows both modes): drop one of them\n"
    helped = subprocess.run([*command, "derive", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith(f"usage: {prog} derive [-h] ")


def test_main_names_the_program_as_asked(cli, capsys):
    assert main(["derive", "--form", "x"], prog="mytool") == 2
    assert capsys.readouterr().err.startswith("mytool derive: error: argument --form: invalid choice: 'x'")
    assert main(["bench", "--help"], prog="mytool") == 0
    assert capsys.readouterr().out.startswith("usage: mytool bench [-h] ")
    assert main(["derive", "--document", "--form", "paper"], prog="mytool") == 2
    assert capsys.readouterr().err.startswith("mytool derive: error: --form cannot be combined")


def test_proof_budget_reaches_the_proofs(capsys):
    """--proof-budget is each claim's CPU budget: a tiny one leaves claims undecided, saying why."""
    assert main(["derive", "rmsnorm", "--proofs", "--proof-budget", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "[undecided]" in out and "budget" in out
    assert main(["derive", "--proof-budget", "-1"]) == 2
    assert "--proof-budget" in capsys.readouterr().err


def test_derive_distributed_shows_the_split_in_every_format(cli):
    out = cli("derive", "--distributed")
    assert out.returncode == 0, out.stderr
    assert "One exchange" in out.stdout and "One all-reduce" in out.stdout and "∂l/∂x_i = " in out.stdout
    assert "Proofs" not in out.stdout
    doc = json.loads(cli("derive", "batchnorm", "--distributed", "--format", "json").stdout)
    assert set(doc) == {"norm", "sections", "values_gathered", "shared"}
    assert doc["norm"] == "batchnorm" and doc["values_gathered"] == "1 + 2C" and doc["shared"] == ["R0", "R1"]
    for section in doc["sections"]:
        assert set(section) == {"title", "equations"} and section["equations"]
        for eq in section["equations"]:
            assert set(eq) == {"lhs", "rhs"} and all(set(eq[side]) == {"text", "latex", "sympy"} for side in eq)
    latex = cli("derive", "--distributed", "--format", "latex").stdout
    assert latex.count(r"\begin{align*}") == len(doc["sections"]) and latex.startswith("% Forward, on each process")


def test_derive_distributed_proofs(cli):
    text = cli("derive", "--distributed", "--proofs").stdout
    assert "[proven] split:var" in text and "[proven] split:dx:2,2" in text and "[refuted]" not in text
    doc = json.loads(cli("derive", "--distributed", "--proofs", "--format", "json").stdout)
    assert doc["proofs"] and all(set(p) == {"key", "claim", "outcome", "method", "reason"} for p in doc["proofs"])
    assert {p["outcome"] for p in doc["proofs"]} == {"proven"}


@pytest.mark.parametrize("args, message", [
    (["--mode", "eval"], "--distributed cannot be combined with --mode eval"),
    (["--order", "2"], "--distributed cannot be combined with --order 2"),
    (["--transforms", "vjp,jvp"], "--distributed cannot be combined with --transforms vjp,jvp"),
    (["--document"], "--distributed cannot be combined with --document"),
    (["--form", "compact"], "--form cannot be combined with --distributed"),
    (["--form", "both"], "--form cannot be combined with --distributed"),
    (["--proofs", "--proof-budget", "5"], "--proof-budget cannot be combined with --distributed"),
    (["--proofs", "--format", "latex"], "--proofs cannot be combined with --format latex"),
])
def test_derive_distributed_refuses_what_makes_no_sense(cli, monkeypatch, args, message):
    monkeypatch.setattr("symbn.cli.prove_split", lambda s: pytest.fail("proved for nothing"))
    out = cli("derive", "--distributed", *args)
    one_line_error(out, "derive", message)
    assert out.stdout == ""


def test_derive_distributed_takes_order_1_and_train_spelled_out(cli):
    plain = cli("derive", "--distributed").stdout
    assert cli("derive", "--distributed", "--mode", "train", "--order", "1").stdout == plain
    assert cli("derive", "--distributed", "--transforms", "vjp").stdout == plain


def test_a_norm_that_cannot_be_split_is_one_line_exit_2(cli, tmp_path):
    target = tmp_path / "ln.txt"
    out = cli("derive", "layernorm", "--distributed", "-o", str(target))
    one_line_error(out, "derive", "layernorm: its statistics are per row")
    assert "nothing to synchronize" in out.stderr and not target.exists()
