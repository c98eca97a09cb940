"""Hostile specs (issue 14): text from a spec never becomes code, and a spec that would break,
stall or shadow something later is refused when it is made, with a SpecError naming the part.

Every text that reaches generated code is escaped by one filter per target (symbn/jinja.py),
tested here with hostile strings; every name is validated (symbn/spec.py), tested per rule.
"""
from __future__ import annotations

import ast
import io
import re
import shutil
import subprocess
import time
import tokenize
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symbn
from symbn import Layout, Norm, SpecError
from symbn.emit import sources
from symbn.jinja import c_comment, c_string, python_comment, python_docstring, python_string
from symbn.spec import (BATCHNORM, BUILTINS, CHANNEL, MAX_DEPTH, MAX_EXPONENT, MAX_EXPRESSION, MAX_LITERAL, MAX_TEXT,
                        NAME, RESERVED, TRAILING, reserved_reason)

ROOT = Path(__file__).resolve().parent.parent
CC = shutil.which("cc")
needs_cc = pytest.mark.skipif(CC is None or shutil.which("nm") is None, reason="no C compiler or nm")

PYTHON_PAYLOAD = '"""\nimport os; os.system("id")\n"""'
C_PAYLOAD = "*/ int pwn = 1; /*"
HOSTILE = [
    '"""', "'''", '"', "'", "\\", "\n", "\r", "\r\n", "\t", "*/", "/*", "*", "/", "/*/", "*/*", "??/", "??=", "???",
    "?", "\\\n", "a\\", "\x00", "a\x00b", "\u2028", "\u2029", "\x85", "\x0b\x0c", "\u202e", "\ud800", "\x1b[31m", "é",
    "\U0001f600", PYTHON_PAYLOAD, C_PAYLOAD, "*/\n#define x 1\n/*", '"; int pwn; "', "\\" * 7,
    ("*/ /* ??/ \\\n \x00 \"\"\" ''' " * 300)[:10_000],
]


def ids(values):
    return [ascii(v)[:24] for v in values]


# ---- the filters, one per target -------------------------------------------------------------

@pytest.mark.parametrize("text", HOSTILE, ids=ids(HOSTILE))
def test_python_filters_round_trip(text):
    """pydoc in a docstring, pystr as a literal: the value is the text itself; pycomment: one comment line."""
    module = ast.parse(f'"""{python_docstring(text)}"""\nok = 1\n')
    assert len(module.body) == 2 and ast.get_docstring(module, clean=False) == text
    assert ast.literal_eval(python_string(text)) == text
    module = ast.parse(f"# {python_comment(text)}\nok = 1\n")
    assert [ast.unparse(s) for s in module.body] == ["ok = 1"]
    for escaped in (python_docstring(text), python_comment(text)):
        assert "\x00" not in escaped and "\r" not in escaped and "\u2028" not in escaped
        escaped.encode("utf-8")  # no lone surrogate: the file can be written
    assert "\n" not in python_comment(text)


def _compile(tmp_path: Path, source: str, flags=("-std=c99", "-Wall", "-Werror", "-pedantic")) -> Path:
    path = tmp_path / "probe.c"
    path.write_text(source, encoding="utf-8")
    done = subprocess.run([CC, *flags, "-c", str(path), "-o", str(tmp_path / "probe.o")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return tmp_path / "probe.o"


def _symbols(obj: Path) -> set[str]:
    listed = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in listed.splitlines() if line.strip()}


@needs_cc
@pytest.mark.parametrize("text", HOSTILE, ids=ids(HOSTILE))
def test_c_comment_holds_anything(tmp_path, text):
    """The escaped text in a comment, with spaces, tight against the delimiters, and as a line of a
    block: it compiles under -Wall -Werror -pedantic (no nested /*, no trigraph) to the one symbol."""
    escaped = c_comment(text)
    assert not [s for s in ("*/", "/*", "??", "\n", "\r", "\x00") if s in escaped]
    assert not escaped.endswith("\\")
    source = f"/* {escaped} */\n/*{escaped}*/\n/*\n * {escaped}\n *{escaped}\n */\nint ok;\n"
    assert _symbols(_compile(tmp_path, source)) == {"ok"}


@needs_cc
@pytest.mark.parametrize("text", HOSTILE, ids=ids(HOSTILE))
def test_c_string_is_the_text(tmp_path, text):
    """A program printing the literal writes exactly the text's UTF-8 bytes."""
    source = ("#include <stdio.h>\n"
              f"static const char text[] = {c_string(text)};\n"
              "int main(void) { fwrite(text, 1, sizeof text - 1, stdout); return 0; }\n")
    path = tmp_path / "probe.c"
    path.write_text(source, encoding="utf-8")
    pedantic = ["-pedantic"] if len(text.encode("utf-8", "surrogatepass")) < 4095 else []  # C99's longest required literal
    done = subprocess.run([CC, "-std=c99", "-Wall", "-Werror", *pedantic, str(path), "-o", str(tmp_path / "probe")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[:2000]
    printed = subprocess.run([str(tmp_path / "probe")], capture_output=True, check=True).stdout
    assert printed == text.encode("utf-8", "surrogatepass")


# ---- hostile text in a spec: the generated code is the benign spec's ---------------------------

INJECTION = f"{PYTHON_PAYLOAD}\n{C_PAYLOAD}"


@pytest.fixture(scope="module")
def generated():
    """Sources of a batch-norm-like spec with the injection as its description and its layout's,
    and of the same spec with a plain description."""
    hostile_layout = Layout("channel", f"{C_PAYLOAD} {PYTHON_PAYLOAD}")
    hostile = replace(BATCHNORM, name="hostile", description=INJECTION, layout=hostile_layout)
    benign = replace(BATCHNORM, name="hostile", description="plain", layout=Layout("channel", "plain"))
    return sources(hostile), sources(benign)


def test_python_payload_stays_in_the_docstring(generated):
    hostile, benign = (ast.parse(files["hostile.py"]) for files in generated)
    docstring = ast.get_docstring(hostile, clean=False)
    assert docstring.startswith(INJECTION + "\n\nStandalone kernels") and f"{C_PAYLOAD} {PYTHON_PAYLOAD}." in docstring
    assert [ast.dump(s) for s in hostile.body[1:]] == [ast.dump(s) for s in benign.body[1:]]  # the same code
    imports = {a.name for n in ast.walk(hostile) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert "os" not in imports
    assert not [n for n in ast.walk(hostile) if isinstance(n, ast.Attribute) and n.attr == "system"]
    assert not [n for n in ast.walk(hostile) if isinstance(n, ast.Name) and n.id == "os"]


@needs_cc
def test_c_payload_stays_in_the_comment(generated, tmp_path):
    """The header and source compile to the benign spec's code: same preprocessed text (comments
    gone), and no symbol pwn."""
    preprocessed = []
    for j, files in enumerate(generated):
        directory = tmp_path / str(j)
        directory.mkdir()
        for name in ("hostile.c", "hostile.h"):
            (directory / name).write_text(files[name], encoding="utf-8")
        source = directory / "hostile.c"
        subprocess.run([CC, "-std=c99", "-c", str(source), "-o", str(directory / "hostile.o")], check=True, capture_output=True)
        assert not any("pwn" in s for s in _symbols(directory / "hostile.o"))
        done = subprocess.run([CC, "-std=c99", "-E", "-P", str(source)], check=True, capture_output=True, text=True)
        assert "pwn" not in done.stdout
        preprocessed.append(done.stdout)
    assert preprocessed[0] == preprocessed[1]


def test_load_does_not_run_the_description(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = f'"""\nimport pathlib; pathlib.Path({str(marker)!r}).write_text("pwned")\n"""'
    monkeypatch.setenv("SYMBN_CACHE_DIR", str(tmp_path / "cache"))
    spec = replace(BATCHNORM, name="marker", description=payload)
    kernels = symbn.load(spec, "numpy")
    assert not marker.exists()
    assert kernels.forward_train is not None


@pytest.mark.parametrize("name", ["*/ int pwn = 1; /*", '"""\nimport os\n"""', "channel\n", "Channel", "if", "", 7])
def test_layout_names_are_validated(name):
    with pytest.raises(SpecError, match="layout name"):
        Layout(name, "fine")


@pytest.mark.parametrize("description", [3, None, "a" * (MAX_TEXT + 1)])
def test_descriptions_are_bounded_text(description):
    with pytest.raises(SpecError, match="layout channel: description"):
        Layout("channel", description)
    with pytest.raises(SpecError, match="mine: description"):
        make(description=description)


# ---- spec validation ---------------------------------------------------------------------------

def make(**changes):
    fields = dict(name="mine", stats={"mean": "x", "var": "(x - mean)**2"}, normalized="(x - mean) / sqrt(var + eps)",
                  affine="group", layout=CHANNEL)
    return Norm(**{**fields, **changes})


def test_builtins_still_build():
    for norm in BUILTINS.values():
        assert replace(norm) == norm


@pytest.mark.parametrize("name", ["mean\n", "mean\r", "Mean", "1mean", "_mean", "mé", "a" * 32, "", None, 5])
def test_names_match_whole(name):
    with pytest.raises(SpecError, match="must match"):
        make(stats={name: "x"}, normalized="x")
    with pytest.raises(SpecError, match="must match"):
        make(name=name)


@pytest.mark.parametrize("name", [
    "self", "invstd", "invstd0", "num_groups", "array", "arrays", "shift", "work", "group", "block", "part", "geo",
    "total", "summand", "idx", "pidx", "row", "team", "units", "groups", "partial", "pgrad", "sums", "coef", "momentum",
    "normalized_shape", "out", "saved", "stats", "running", "epsilon",  # kernels' and derivation's own names
    "len", "zip", "float", "range", "tuple", "max", "isinstance", "type", "sum", "any", "all",  # builtins it calls
    "numpy", "ctypes", "namedtuple", "isfinite", "prod", "math",  # its imports
    "sqrt", "fabs", "pow", "free", "calloc",  # C library
    "int", "while", "lambda", "none",  # keywords (and a lower-case None is fine: see below)
    "x", "xhat", "y", "gamma", "beta", "eps", "dy", "dx", "dxhat", "dgamma", "dbeta",  # roles and their adjoints
])
def test_reserved_names(name):
    if name == "none":  # not reserved: only the capitalized keyword is, and names are lower case
        make(stats={"mean": "x", name: "(x - mean)**2"}, normalized="(x - mean) / sqrt(none + eps)")
        return
    with pytest.raises(SpecError, match="reserved"):
        make(stats={"mean": "x", name: "(x - mean)**2"}, normalized="x - mean")


@pytest.mark.parametrize("name", ["stat_a", "run_a", "running_a", "saved_a", "red_0", "c_a", "t_a", "strand_a", "acc_0",
                                  "pacc_1", "symbn_a", "omp_a", "invstd_a", "d0", "d1x"])
def test_reserved_prefixes(name):
    with pytest.raises(SpecError, match=r"prefix|digit"):
        make(stats={"mean": "x", name: "(x - mean)**2"}, normalized="x - mean")


@pytest.mark.parametrize("stats", [{"mean": "x", "dmean": "x**2"}, {"dvar": "x", "var": "x**2"}, {"mean": "x", "deps": "x"},
                                   {"mean": "x", "dy_": "x"}])
def test_adjoint_like_names(stats):
    if "dy_" in stats:  # dy_ is no adjoint's name
        make(stats=stats, normalized="x - mean")
        return
    with pytest.raises(SpecError, match="adjoint"):
        make(stats=stats, normalized="x")


@pytest.mark.parametrize("name", ["math", "stddef", "stdlib", "stdio", "string", "omp", "ompnorm", "limits", "float",
                                  "stdint", "errno", "assert", "complex", "symbn", "symbnorm", "numpy", "ctypes",
                                  "collections", "numbers", "if", "int"])
def test_norm_names_that_shadow(name):
    with pytest.raises(SpecError, match="norm name"):
        make(name=name)


def test_duplicate_statistics():
    with pytest.raises(SpecError, match="'mean' is defined twice"):
        make(stats=[("mean", "x"), ("mean", "x**2")], normalized="x - mean")
    assert make(stats=[("mean", "x"), ("var", "(x - mean)**2")]).stats == BATCHNORM.stats
    with pytest.raises(SpecError, match="pairs"):
        make(stats=[("mean", "x", "extra")])
    with pytest.raises(SpecError, match="mapping or"):
        make(stats="mean")


@pytest.mark.parametrize("text", ["sqrt(x, x)", "exp(x, x)", "log()", "abs(x, y=x)", "sqrt(*x)"])
def test_call_arity(text):
    with pytest.raises(SpecError, match="exactly one argument"):
        make(stats={"mean": text}, normalized="x - mean")


@pytest.mark.parametrize("text, message", [
    ("1e400 * x", "not finite"),
    ("x * 1e400", "not finite"),
    ("x / 0", "division by zero"),
    ("x / (1 - 1)", "division by zero"),
    ("x / (x - x)", "division by zero"),
    ("log(0) * x", "infinite or undefined"),
    ("x * 0**-1", "infinite or undefined"),
    (f"x * {MAX_LITERAL * 10}", re.escape(f"at most {MAX_LITERAL:g}")),
    ("x ** 17", f"at most {MAX_EXPONENT}"),
    ("x ** -17", f"at most {MAX_EXPONENT}"),
    ("(x ** 4) ** 8", f"at most {MAX_EXPONENT}"),
    ("((x + 1) ** 4 + 1) ** 5", f"at most {MAX_EXPONENT}"),
    ("x ** (1 / 0)", "not a finite number"),
    ("x ** exp(1000)", "not a finite number"),
    ("x ** (10**10 + 0*x)", f"at most {MAX_EXPONENT}"),
    ("x" + " + x" * 400, f"at most {MAX_EXPRESSION}"),
    ("-" * 500 + "x", f"at most {MAX_DEPTH}"),
    ("(" * 250 + "x" + ")" * 250, "cannot parse|at most"),
    ("sqrt(" * 40 + "x" + ")" * 40, f"at most {MAX_DEPTH}"),
    ("x" + "**1" * 300, f"at most {MAX_DEPTH}"),
    ("x\x00", "cannot parse"),
    ("1j * x", "not allowed"),
    ("True * x", "not allowed"),
])
def test_constants_and_sizes(text, message):
    with pytest.raises(SpecError, match=message):
        make(stats={"mean": text}, normalized="x - mean")


@pytest.mark.parametrize("text", [3, 3.0, None, b"x", ["x"]])
def test_expressions_are_text(text):
    with pytest.raises(SpecError, match="must be a str"):
        make(stats={"mean": text}, normalized="x - mean")
    with pytest.raises(SpecError, match="must be a str"):
        make(normalized=text)


@pytest.mark.parametrize("text", ["2**10**10", "(x - mean)**10**10", "x**(2**(2**(2**2)))", "x**9**9**9**9**9",
                                  "(((((((((x**16)**16)**16)**16)**16)**16)**16)**16)**16)", "2**16**16**16**16"])
def test_huge_exponents_are_refused_quickly(text):
    start = time.perf_counter()
    with pytest.raises(SpecError, match=f"at most {MAX_EXPONENT}"):
        make(stats={"mean": "x", "var": text})
    assert time.perf_counter() - start < 1.0


def test_limits_that_hold_still_build():
    make(stats={"mean": "x", "m4": "(x - mean)**4"}, normalized="(x - mean) / (m4 + eps)**(1/4)")
    make(stats={"mean": "x", "var": "(x - mean)**16 / 1000000"}, normalized="(x - mean) * exp(-var) / 2**-16")
    make(stats={"mean": "abs(x)"}, normalized="x / (mean + eps)", affine="element", layout=TRAILING)


def test_reserved_covers_every_identifier_of_the_generated_code():
    """Every name the committed kernels use (not an attribute after a dot) is reserved, or is a
    built-in's own statistic or norm name: a statistic can collide with none of them."""
    own = {s for norm in BUILTINS.values() for s in norm.stat_names} | set(BUILTINS) | {f"{n}_backward2" for n in BUILTINS}
    used = set()
    for path in (ROOT / "generated").glob("*.py"):
        if path.name == "_runtime.py":
            continue  # generic: it reads names from the per-plan tables as strings, never a statistic's as an identifier
        tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
        used |= {t.string for j, t in enumerate(tokens) if t.type == tokenize.NAME and not (j and tokens[j - 1].string == ".")}
    for path in [*(ROOT / "generated").glob("*.c"), *(ROOT / "generated").glob("*.h")]:
        code = re.sub(r"/\*.*?\*/", " ", path.read_text(), flags=re.S)
        code = re.sub(r'"(\\.|[^"\\])*"|#include.*', '""', code)
        used |= set(re.findall(r"\b[A-Za-z_]\w*\b", code))
    nameable = {n for n in used if NAME.fullmatch(n)} - own
    unguarded = sorted(n for n in nameable if reserved_reason(n) is None and n not in RESERVED)
    assert not unguarded, f"add to symbn.spec._KERNEL_NAMES: {unguarded}"
    # running_<stat> is an argument: a statistic named like the rest of a running_* identifier would collide
    assert all(reserved_reason(n.removeprefix("running_")) for n in nameable if n.startswith("running_")
               and n.removeprefix("running_") not in own)


# ---- fuzz: random hostile text into every text field and name ------------------------------------

FRAGMENTS = st.sampled_from(['"""', "'''", "\\", "\n", "*/", "/*", "??/", "\x00", "\u2028", "\r", "\ud800", "{{", "{%",
                             "import os", "#", " ", "a", "_", "1"])
TEXT = st.lists(st.one_of(FRAGMENTS, st.text(st.characters(blacklist_categories=()), max_size=8)), max_size=80).map("".join)


@pytest.fixture(scope="module")
def render_numpy():
    """The NumPy module of a fixed plan with another description: rendering is milliseconds. The
    template's context is the one ``sources`` builds (caught on its way to the template)."""
    from unittest import mock

    import symbn.emit as emit
    from symbn.jinja import environment

    contexts = []

    def printed(*args, **kwargs):
        contexts.append(real(*args, **kwargs))
        return contexts[-1]

    real = emit._printed
    with mock.patch.object(emit, "_printed", printed):
        emit.sources(BATCHNORM, backends=("numpy",))
    template = environment("code").get_template("numpy/kernels.py.j2")
    return lambda norm: template.render(header=emit.header("numpy/kernels.py.j2", norm.name),
                                        **{**contexts[-1], "description": norm.description or norm.name,
                                           "layout_description": norm.layout.description})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(description=TEXT, layout_description=TEXT)
def test_fuzz_descriptions(render_numpy, description, layout_description):
    try:
        norm = replace(BATCHNORM, description=description, layout=Layout("channel", layout_description))
    except SpecError:
        assert len(description) > MAX_TEXT or len(layout_description) > MAX_TEXT
        return
    module = ast.parse(render_numpy(norm))
    docstring = ast.get_docstring(module, clean=False)
    assert docstring.startswith((description or "batchnorm") + "\n\nStandalone kernels")
    assert f"{layout_description}." in docstring
    assert not [n for n in ast.walk(module) if isinstance(n, ast.Import) and any(a.name == "os" for a in n.names)]
    escaped = c_comment(description)
    assert not any(s in escaped for s in ("*/", "/*", "??", "\n", "\r", "\x00")) and not escaped.endswith("\\")


@settings(max_examples=200, deadline=None)
@given(name=st.one_of(TEXT, st.from_regex(r"[a-z][a-z0-9_]{0,33}\n?", fullmatch=True)))
def test_fuzz_names(name):
    """A name is refused, or it is a plain identifier (and, for a statistic, one no generated code uses)."""
    for kind, make_one in (("norm", lambda: make(name=name)), ("layout", lambda: Layout(name, "fine")),
                           ("statistic", lambda: make(stats={"mean": "x", name: "x"}, normalized="x - mean"))):
        try:
            make_one()
        except SpecError:
            continue
        assert NAME.fullmatch(name) and name.isidentifier() and name.isascii() and "\n" not in name
        if kind == "statistic":
            assert name == "mean" or reserved_reason(name) is None
