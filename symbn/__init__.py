"""symbn: normalization-layer gradients derived symbolically, proven, and turned into kernels."""
__version__ = "0.1.0"

from .build import load
from .derive import Derivation, derive
from .errors import CompilerError, LatexError, SpecError, SymbnError, TorchMissing
from .prove import Proof, prove
from .spec import BUILTINS, Layout, Norm, Notation

__all__ = ["BUILTINS", "CompilerError", "Derivation", "LatexError", "Layout", "Norm", "Notation", "Proof", "SpecError",
           "SymbnError", "TorchMissing", "derive", "load", "prove"]
