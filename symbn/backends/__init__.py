"""Backends: each a folder with its printer, its configuration and its templates (SymForce's layout).

A backend module exposes

* ``PRINTER``: the SymPy printer class of its language;
* ``FILES``: output file name (``{name}``: the plan's stem, ``batchnorm_backward2``) -> template,
  rendered once per kernel plan;
* ``SHARED`` (optional): output file name -> template, rendered once for every plan
  (the NumPy runtime, ``_runtime.py``), with ``shared_context()``;
* ``framed(transforms) -> bool``: whether the plans of that chain of transforms are lowered with
  the frame, for element passes that run in the input's precision (see :func:`symbn.lower.plan`);
* ``context(plan) -> dict``: everything its templates print, from one kernel plan;
* ``TEMPLATES``: its templates folder (``symbn/backends/<name>/templates``).

:data:`BACKENDS` holds those that import and have their templates; a backend still being
written is simply absent.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

NAMES = ("numpy", "c")
"""Every backend symbn knows, in the order they are tried and listed."""


def templates_dir(name: str) -> Path:
    """The templates folder of backend ``name`` (whether or not its module imports)."""
    return Path(__file__).resolve().parent / name / "templates"


def _load(name: str) -> ModuleType | None:
    """Backend ``name``'s module, or None while it is not there (or its templates are not)."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:  # the backend's package is not there (yet): not an error
        if err.name == f"{__name__}.{name}":
            return None
        raise
    if not all((templates_dir(name) / template).is_file() for template in module.FILES.values()):
        return None
    return module


BACKENDS: dict[str, ModuleType] = {name: module for name in NAMES if (module := _load(name)) is not None}
"""Backend name -> its module, for every backend that is installed."""
