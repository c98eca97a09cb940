"""The Jinja environment over ``templates/``, shared by every stage that fills a template."""
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
        loader=jinja2.FileSystemLoader(resource_dir("templates")), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False, **delimiters,
    )
    env.filters["tex"] = tex_escape
    return env


_TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(value: str) -> str:
    """Plain text made safe for LaTeX: its special characters escaped."""
    return "".join(_TEX_SPECIALS.get(c, c) for c in str(value))
