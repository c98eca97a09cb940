"""symbn's errors: one base class, so that a caller can catch everything symbn refuses.

Each error is also the built-in exception a caller would expect for its cause (a bad spec is a
``ValueError``, a missing optional dependency an ``ImportError``), so ``except ValueError`` keeps
working. The generated kernels are standalone and raise the built-in ``ValueError`` and
``TypeError`` only (they import nothing of symbn).
"""


class SymbnError(Exception):
    """Base of every error symbn raises on purpose."""


class SpecError(SymbnError, ValueError):
    """A spec that cannot describe a normalization; the message says which part and why."""


class CompilerError(SymbnError, RuntimeError):
    """No usable C compiler, or the generated C did not compile: the message has the command and its output."""


class LatexError(SymbnError, RuntimeError):
    """pdflatex is missing or failed; the message says what to do."""


class TorchMissing(SymbnError, ImportError):
    """PyTorch is needed for this and is not installed."""
