"""Entry point of ``python -m symbn``."""
import sys

from .cli import main

sys.exit(main())
