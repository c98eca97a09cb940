"""The Jinja environment over ``templates/`` and every backend's templates folder, shared by
every stage that fills a template.

Every text from a spec that a template prints (a description, a layout's name and description,
a name in a comment or docstring) goes through one of the escaping filters below, one per
target language and context; they are the single mechanism that keeps user text from becoming
code. Names printed as identifiers are validated instead (:mod:`symbn.spec`).

=============  ==========================================================  ==================
filter         where a template must use it                                function
=============  ==========================================================  ==================
``pydoc``      inside a Python docstring (triple double quotes)            :func:`python_docstring`
``pycomment``  after ``#`` in a Python comment                             :func:`python_comment`
``pystr``      a whole Python string literal (the filter adds the quotes)  :func:`python_string`
``ccomment``   inside a C ``/* */`` comment                                :func:`c_comment`
``cstr``       a whole C string literal (the filter adds the quotes)       :func:`c_string`
``tex``        LaTeX text                                                  :func:`tex_escape`
=============  ==========================================================  ==================
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2

_CHECKOUT = Path(__file__).resolve().parent.parent


def resource_dir(name: str) -> Path:
    """``templates/`` or ``generated/`` of a checkout, else the copy installed as ``symbn.<name>``."""
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "templates").is_dir():
        return _CHECKOUT / name
    return Path(__file__).resolve().parent / name  # installed: package-dir maps them to symbn/<name>


def backend_template_dirs() -> dict[str, Path]:
    """Backend name -> its templates folder, ``symbn/backends/<name>/templates``."""
    backends = Path(__file__).resolve().parent / "backends"
    return {path.parent.name: path for path in sorted(backends.glob("*/templates"))}


def template_dirs() -> list[Path]:
    """Where templates are looked up, in order: ``templates/`` (the documents), then each
    backend's own folder (the kernels)."""
    return [resource_dir("templates"), *backend_template_dirs().values()]


def _loader() -> jinja2.BaseLoader:
    """A template by its name in any of :func:`template_dirs` (``kernels.c.j2``), or by its
    backend and name (``numpy/kernels.py.j2``)."""
    prefixed = jinja2.PrefixLoader({name: jinja2.FileSystemLoader(path) for name, path in backend_template_dirs().items()})
    return jinja2.ChoiceLoader([jinja2.FileSystemLoader(template_dirs()), prefixed])


@cache
def environment(kind: str) -> jinja2.Environment:
    """``"code"``: Jinja's usual delimiters; ``"latex"``: ones that do not clash with TeX braces
    (``<< >>``, ``<% %>``, ``<# #>``)."""
    delimiters = {
        "code": {},
        "latex": dict(variable_start_string="<<", variable_end_string=">>", block_start_string="<%",
                      block_end_string="%>", comment_start_string="<#", comment_end_string="#>"),
    }[kind]
    env = jinja2.Environment(
        loader=_loader(), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False, **delimiters,
    )
    env.filters.update(tex=tex_escape, pydoc=python_docstring, pycomment=python_comment, pystr=python_string,
                       ccomment=c_comment, cstr=c_string)
    return env


_TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(value: str) -> str:
    """Plain text made safe for LaTeX: its special characters escaped."""
    return "".join(_TEX_SPECIALS.get(c, c) for c in str(value))


def _escaped(c: str) -> str:
    """One character as a Python (and C) escape: ``\n``, ``\x00``, ``\u2028``, ``\U0001f600``."""
    named = {"\n": r"\n", "\r": r"\r", "\t": r"\t", "\\": "\\\\", '"': '\\"'}
    if c in named:
        return named[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def python_docstring(value: str) -> str:
    r'''Text for the inside of a Python docstring in triple double quotes (or any ``"``-quoted, non-raw string):
    backslashes and double quotes escaped, so nothing in it can end the string; unprintable
    characters (NUL, other controls, line and paragraph separators, bidirectional overrides, lone
    surrogates) written as escapes. Newlines and tabs stay as they are, so the text reads as
    written; the string's value is exactly ``value``. Templates: ``"""{{ text|pydoc }}"""``.'''
    return "".join(c if c in "\n\t" else _escaped(c) if c in '\\"' or not c.isprintable() else c for c in str(value))


def python_comment(value: str) -> str:
    r"""Text for a Python ``#`` comment, on one line: line breaks and every other unprintable
    character written as escapes (so is a backslash, to keep the escapes unambiguous).
    Templates: ``# {{ text|pycomment }}``."""
    return "".join(_escaped(c) if c == "\\" or not c.isprintable() else c for c in str(value))


def python_string(value: str) -> str:
    """A whole Python string literal (quotes included) whose value is ``value``: its ``repr``.
    Templates: ``NAME = {{ text|pystr }}``."""
    return repr(str(value))


_C_ENDS = "\\*/?"  # at either end of a comment's text: could join the template's characters next to it


def c_comment(value: str) -> str:
    r"""Text for the inside of a C ``/* */`` comment, on one line, that cannot end it or open
    another (``*/`` and ``/*`` never appear: ``*\/``, ``/\*``), spell a trigraph (``??`` is
    ``?\?``), splice lines (no newline; no backslash last) or hold a NUL: line breaks, backslashes
    and unprintable characters are written as C escapes, and a ``\ * / ?`` at either end as a
    hexadecimal escape, so the text is safe next to whatever the template puts around it.
    Templates: ``/* {{ text|ccomment }} */``, and `` * {{ text|ccomment }}`` in a block."""
    text = str(value)
    out = []
    for j, c in enumerate(text):
        before = text[j - 1] if j else ""
        if (j == 0 or j == len(text) - 1) and c in _C_ENDS:
            out.append(f"\\x{ord(c):02x}")
        elif c == "\\" or not c.isprintable():
            out.append(_escaped(c))
        elif (before, c) in (("*", "/"), ("/", "*"), ("?", "?")):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def c_string(value: str) -> str:
    r"""A whole C string literal (quotes included) whose bytes are ``value`` in UTF-8: printable
    ASCII as it is except ``"`` ``\`` ``?`` (escaped: no trigraph), every other byte as a
    three-digit octal escape (which, unlike ``\x``, cannot swallow the next character).
    Templates: ``static const char text[] = {{ text|cstr }};``."""
    named = {ord("\n"): r"\n", ord("\t"): r"\t", ord('"'): r"\"", ord("\\"): r"\\", ord("?"): r"\?"}
    data = str(value).encode("utf-8", "surrogatepass")
    return '"' + "".join(named.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\{b:03o}") for b in data) + '"'
