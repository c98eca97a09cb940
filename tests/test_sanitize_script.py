"""scripts/sanitize.py, cheaply: its help, and that a sanitizer finding fails the run with the report.

The run over the kernels themselves compiles a dozen libraries (a minute or more): CI runs it on
its own (``python scripts/sanitize.py``), not here. The canaries compile one tiny C file with the
kernels' flags and make one deliberate fault each, which must end the run with status 1 and the
sanitizer's report: the proof that the preloading and the exit status work.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sanitize.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False)


def sanitizers() -> bool:
    """gcc with its ASan and UBSan runtimes."""
    if shutil.which("gcc") is None:
        return False
    paths = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=False).stdout.strip()
             for name in ("libasan.so", "libubsan.so")]
    return all(Path(path).is_absolute() and Path(path).exists() for path in paths)


def test_help():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--calls", "--seconds", "--seed"):
        assert option in done.stdout


@pytest.mark.skipif(not sanitizers(), reason="needs gcc with libasan and libubsan")
@pytest.mark.parametrize(("canary", "report"), [("asan", "ERROR: AddressSanitizer: heap-buffer-overflow"),
                                                ("ubsan", "runtime error: signed integer overflow")])
def test_a_finding_fails_the_run_with_the_report(canary, report):
    done = run("--canary", canary)
    assert done.returncode == 1, done.stdout + done.stderr
    assert report in done.stderr
    assert "sanitizer reports: 1" in done.stderr
