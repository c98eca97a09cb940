"""symbn: normalization-layer gradients derived symbolically, proven, and turned into kernels."""
__version__ = "0.1.0"

from .build import CompilerError, load
from .derive import Derivation, derive
from .prove import Proof, prove
from .spec import BUILTINS, Layout, Norm, Notation, SpecError

__all__ = ["BUILTINS", "CompilerError", "Derivation", "Layout", "Norm", "Notation", "Proof", "SpecError", "derive", "load", "prove"]
