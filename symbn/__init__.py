"""symbn: normalization-layer gradients derived symbolically, proven, and turned into kernels."""
__version__ = "0.1.0"

from .build import load
from .derive import Derivation, derive
from .spec import BUILTINS, Layout, Norm, Notation, SpecError

__all__ = ["BUILTINS", "Derivation", "Layout", "Norm", "Notation", "SpecError", "derive", "load"]
