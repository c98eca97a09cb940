"""``symbn`` (or ``python -m symbn``): derive, show and prove normalization gradients from the command line.

Conventions every command keeps:

* ``--format text|json`` on every command that prints results (``derive`` and ``explain`` also
  ``latex``); ``generate`` and ``report`` write files, whose format the file names give, and print
  the paths they wrote.
* The program name in usage and error messages is the entry point that was called: ``symbn``
  for the console script, ``python -m symbn`` for the module (:func:`program_name`).
* A refusal is one line on standard error, ``PROG COMMAND: error: message``, with exit status 2:
  bad usage, every :class:`~symbn.errors.SymbnError` (a compiler's own output follows that line,
  indented), an output file that cannot be written. Never a traceback. Exit status 1 means a
  check found a mismatch; 141 that standard output's reader went away (``symbn list | head -1``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .build import BACKENDS
from .derive import MODES, derive, transforms_for
from .errors import CompilerError, SymbnError
from .explain import FORMATS as EXPLAIN_FORMATS
from .prove import BUDGET, prove
from .render import FORMATS, FORMS, split_to_json, split_to_latex, split_to_text, to_document, to_json, to_latex, to_text
from .split import prove as prove_split
from .split import split
from .spec import BUILTINS

MODULE_PROG = "python -m symbn"
"""The program name when run as ``python -m symbn``."""


def program_name(argv: list[str] | None = None) -> str:
    """The entry point that was called: ``python -m symbn`` when Python runs the package as a
    module, the script's own name (``symbn``) when its console script runs ``main()``, and
    ``symbn`` when ``main(argv)`` is called as a function."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name in ("symbn", "symbn.__main__"):
        return MODULE_PROG
    if argv is None and sys.argv and sys.argv[0] not in ("", "-c", "-m"):
        name = os.path.basename(sys.argv[0])
        name = name[:-4] if name.lower().endswith(".exe") else name
        if name and not name.endswith(".py"):
            return name
    return "symbn"


class _Refused(Exception):
    """A request the command refuses: printed as ``PROG COMMAND: error: message``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2, never a traceback."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}
        """The top-level parser's subcommands, by name."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _builtin(name: str) -> str:
    """A built-in norm's name (argparse's ``choices`` cannot be used with ``nargs='*'``)."""
    if name not in BUILTINS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(map(repr, BUILTINS))})")
    return name


def parser(prog: str = "symbn") -> argparse.ArgumentParser:
    top = _Parser(prog=prog, description="Normalization-layer gradients, derived symbolically and proven.",
                  epilog="Commands that print results take --format text|json (derive and explain also latex); "
                         "generate and report write files and print their paths. Errors are one line on standard "
                         "error with exit status 2; check exits 1 on a mismatch.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    top.commands = commands.choices

    derive_cmd = commands.add_parser("derive", help="derive the backward pass of a normalization and show it",
                                     description="Derive the backward pass from the forward definition, for symbolic m.")
    derive_cmd.add_argument("norm", nargs="?", default="batchnorm", choices=list(BUILTINS), metavar="NORM",
                            help=f"one of: {', '.join(BUILTINS)} (default: batchnorm)")
    derive_cmd.add_argument("--mode", choices=MODES,
                            help="train (default): batch statistics (functions of x); eval: population statistics (constants); "
                                 "not with --document, which writes both")
    derive_cmd.add_argument("--form", choices=FORMS,
                            help="paper (staged), compact, or both (default); not with --document, which writes both")
    derive_cmd.add_argument("--order", type=_positive, default=1, metavar="N",
                            help="derivative order in reverse mode: 1 the backward pass (default), 2 the double backward, ...")
    derive_cmd.add_argument("--transforms", type=_chain, metavar="CHAIN",
                            help="another chain of transforms, innermost first: e.g. vjp,jvp for jvp(vjp(f)) "
                                 "(forward over reverse, a Hessian-vector product), jvp,jvp, vjp,vjp,vjp")
    derive_cmd.add_argument("--format", choices=FORMATS,
                            help="text (default), latex (the equations; with --document the article) or json")
    derive_cmd.add_argument("--proofs", action="store_true",
                            help="also prove every identity (symbolic m, and brute force at explicit m: 1..6 at order 1, 1..4 at order 2, "
                                 "1..3 at order 3; with --distributed, the split's merge and gradient); takes seconds to a minute; "
                                 "with --format text or json (--document always has them)")
    derive_cmd.add_argument("--proof-budget", type=_seconds, default=argparse.SUPPRESS, metavar="SECONDS",
                            help=f"CPU seconds each claim may take before it is reported undecided (default {BUDGET:g}; 0: no limit)")
    derive_cmd.add_argument("--distributed", action="store_true",
                            help="the training step split across processes (synchronized statistics): what each process "
                                 "sums, the forward's one exchange, the backward's one all-reduce; for a norm with "
                                 "statistics over the batch (batchnorm); order 1")
    derive_cmd.add_argument("--document", action="store_true",
                            help="a complete LaTeX article (implies --format latex): both modes, both forms, every proof, "
                                 "at the --order or --transforms given")
    derive_cmd.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of standard output")

    list_cmd = commands.add_parser("list", help="list the built-in normalizations", description="List the built-in normalizations.")
    list_cmd.add_argument("--format", choices=("text", "json"), default="text",
                          help="text (default): one line each; json: name, description, layout, affine, statistics")

    explain_cmd = commands.add_parser("explain", help="why the moments get gradients: paths, numbers, the paper's argument",
                                      description="Answer 'why do the mean and variance get gradients?' with the derivation "
                                                  "and measurements.")
    explain_cmd.add_argument("norm", nargs="?", default="batchnorm", choices=list(BUILTINS), metavar="NORM",
                             help=f"one of: {', '.join(BUILTINS)} (default: batchnorm)")
    explain_cmd.add_argument("--format", choices=EXPLAIN_FORMATS, default="text",
                             help="text (default), json or latex (the report's source)")
    explain_cmd.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of standard output")

    report_cmd = commands.add_parser("report", help="the explanation as a PDF (or .tex) document",
                                     description="Write the report: FILE.pdf compiles with pdflatex (the .tex is kept beside it); "
                                                 "FILE.tex writes the source only. It prints the path written. FILE's suffix "
                                                 "is the format (no --format); the explanation as JSON: explain --format json.")
    report_cmd.add_argument("norm", nargs="?", default="batchnorm", choices=list(BUILTINS), metavar="NORM",
                            help=f"one of: {', '.join(BUILTINS)} (default: batchnorm)")
    report_cmd.add_argument("-o", "--output", type=Path, metavar="FILE", required=True, help="FILE.pdf or FILE.tex")

    bench_cmd = commands.add_parser("bench", help="time the generated kernels against PyTorch and NumPy",
                                    description="Time C, NumPy, PyTorch and the paper's staged NumPy in one process; report ms, GB/s, "
                                                "fraction of the measured triad bandwidth and the ratio to PyTorch.")
    bench_cmd.add_argument("--quick", action="store_true", help="three batch-norm cases, fewer repeats (under a minute)")
    bench_cmd.add_argument("--format", choices=("text", "json"), default="text",
                           help="text (default): a table; json: every number (the progress lines go to standard error either way)")
    bench_cmd.add_argument("--threads", type=_positive, default=2, metavar="N", help="threads for the C kernels and PyTorch (default 2)")
    bench_cmd.add_argument("--plot", type=Path, metavar="FILE.svg", help="also draw the ratios to PyTorch as an SVG bar chart")
    bench_cmd.add_argument("--against", metavar="REV",
                           help="instead: time the working tree's C kernels against those committed in generated/ at git "
                                "revision REV, interleaved in one process; report both times and working tree / REV")

    generate_cmd = commands.add_parser("generate", help="regenerate the kernels under generated/",
                                       description="Write the NumPy and C kernels of every built-in norm, deterministically, "
                                                   "and print each path written.")
    generate_cmd.add_argument("-o", "--output", type=Path, metavar="DIR", help="write into DIR instead of generated/")

    check_cmd = commands.add_parser(
        "check", help="check every backend and order against the others, finite differences and PyTorch",
        description="Compare the NumPy and C kernels, float32 and float64, train and eval, with the float64 NumPy kernels, "
                    "central differences of the order below, PyTorch autograd of the forward in plain torch ops and (order-1 "
                    "vjp) PyTorch's native op. Default: every built-in, both layout cases, chains of orders 1 to 3: vjp and jvp; "
                    "vjp², jvp² and vjp·jvp (jvp of the backward); vjp³. The C kernels of orders 3 and of the jvp chains are "
                    "compiled into the cache on the first run. The last line is 'check: N combinations, M mismatches' "
                    "(on standard error with --format json); the exit status is 1 on any mismatch.")
    check_cmd.add_argument("norms", nargs="*", type=_builtin, metavar="NORM", help=f"norms to check: {', '.join(BUILTINS)} (default: all)")
    check_cmd.add_argument("--backend", choices=BACKENDS, action="append", help="backends to check (default: all; repeatable)")
    check_cmd.add_argument("--orders", type=_orders, default=(1, 2, 3), metavar="LIST",
                           help="derivative orders to check, comma-separated: 1 (vjp, jvp), 2 (vjp², jvp², vjp·jvp), 3 (vjp³) "
                                "(default: 1,2,3)")
    check_cmd.add_argument("--quick", action="store_true",
                           help="orders 1 and 2 only (of --orders), and the first case of each layout beyond order 1")
    check_cmd.add_argument("--format", choices=("text", "json"), default="text",
                           help="text (default): a table, row by row; json: one document with every row and the totals")
    return top


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one command; the exit status. ``argv``: the arguments (default ``sys.argv[1:]``);
    ``prog``: the program name in messages (default :func:`program_name`)."""
    prog = prog or program_name(argv)
    top = parser(prog)
    try:
        args, unknown = top.parse_known_args(argv)
        if unknown:  # named by the command they were given to: "PROG derive: error: unrecognized arguments: ..."
            top.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as stop:  # --help, or a usage error argparse has printed
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    handlers = {"list": _list, "derive": _derive, "explain": _explain, "report": _report,
                "generate": _generate, "check": _check, "bench": _bench}
    try:
        status = handlers[args.command](args)
        sys.stdout.flush()
        return status
    except (_Refused, SymbnError) as err:
        first, *rest = str(err).strip().splitlines() or [type(err).__name__]
        sys.stdout.flush()
        sys.stderr.write(f"{prog} {args.command}: error: {first}\n" + "".join(f"    {line}\n" for line in rest))
        return 2
    except BrokenPipeError:  # the reader stopped (symbn list | head -1): quietly, with a shell's status for SIGPIPE
        _silence_stdout()
        return BROKEN_PIPE


BROKEN_PIPE = 141
"""The exit status when standard output's reader has gone: 128 + SIGPIPE, as a shell reports a program that signal ended."""


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that Python's final flush at exit cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no file descriptor (a stream replaced in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _fail(message: str) -> None:
    raise _Refused(message)


def _writable(target: Path) -> None:
    """Refuse an output file that cannot be written before the work starts (proofs and the bench take a minute)."""
    if target.is_dir():
        _fail(f"cannot write {target}: it is a directory")
    if not target.parent.is_dir():
        _fail(f"cannot write {target}: no directory {target.parent}")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        _fail(f"cannot write {target}: permission denied")


def _list(args: argparse.Namespace) -> int:
    if args.format == "json":
        norms = [{"name": name, "description": norm.description,
                  "layout": {"name": norm.layout.name, "description": norm.layout.description},
                  "affine": norm.affine, "statistics": dict(norm.stats), "normalized": norm.normalized}
                 for name, norm in BUILTINS.items()]
        print(json.dumps({"norms": norms}, indent=2, ensure_ascii=False))
        return 0
    width = max(map(len, BUILTINS))
    for name, norm in BUILTINS.items():
        print(f"{name:<{width}}  {norm.description}; layout {norm.layout.name}: {norm.layout.description}")
    return 0


def _derive(args: argparse.Namespace) -> int:
    if args.transforms and args.order != 1:
        _fail("give --order or --transforms, not both")
    if args.distributed:
        _refuse_with_distributed(args)
    args.proof_budget = getattr(args, "proof_budget", BUDGET)
    if args.document:
        if args.format not in (None, "latex"):
            _fail(f"--format {args.format} cannot be combined with --document (the article is LaTeX): "
                  "give --format latex or leave --format out")
        if args.mode:
            _fail("--mode cannot be combined with --document (the article shows both modes): drop one of them")
        if args.form:
            _fail("--form cannot be combined with --document (the article shows both forms): drop one of them")
        args.format = "latex"  # --proofs: the article proves every identity anyway
    elif args.proofs and args.format == "latex":
        _fail("--proofs cannot be combined with --format latex (the equations only): for the proofs give "
              + ("--format text or json" if args.distributed else "--document (the article) or --format text or json"))
    args.format = args.format or "text"
    args.transforms = args.transforms or ("vjp",) * args.order
    args.mode, args.form = args.mode or "train", args.form or "both"
    if args.output is not None:
        _writable(args.output)
    _emit(_derive_output(args), args.output)
    return 0


def _refuse_with_distributed(args: argparse.Namespace) -> None:
    """--distributed shows one thing, the first-order training step split across processes:
    every option that asks for something else is refused, naming it."""
    if args.document:
        _fail("--distributed cannot be combined with --document (the article is of one process's derivation): "
              "drop one of them")
    if args.mode == "eval":
        _fail("--distributed cannot be combined with --mode eval (eval mode's statistics are given constants: "
              "there is nothing to exchange)")
    if args.order != 1:
        _fail(f"--distributed cannot be combined with --order {args.order} (the split is of the first-order backward "
              "pass)")
    if args.transforms and tuple(args.transforms) != ("vjp",):
        _fail(f"--distributed cannot be combined with --transforms {','.join(args.transforms)} (the split is of the "
              "first-order backward pass)")
    if args.form:
        _fail("--form cannot be combined with --distributed (the split has one form: the compact backward)")
    if hasattr(args, "proof_budget"):
        _fail("--proof-budget cannot be combined with --distributed (the split's proofs run without a time budget)")


def _seconds(text: str) -> float | None:
    """``--proof-budget``: seconds >= 0; 0 is no limit (None)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0 (0: no limit), got {text!r}")
    return value or None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _chain(text: str) -> tuple[str, ...]:
    try:
        return transforms_for(transforms=text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _bench(args: argparse.Namespace) -> int:
    from .bench import main as bench

    if args.against is not None:
        if args.plot is not None:
            _fail("--against cannot be combined with --plot (the chart is of the ratios to PyTorch): drop one of them")
        from .compare import main as compare

        sys.stdout.write(compare(args.against, args.quick, args.format, args.threads))
        return 0
    if args.plot is not None:
        _writable(args.plot)
    try:
        sys.stdout.write(bench(args.quick, args.format, args.threads, args.plot))
    except OSError as err:
        if args.plot is None or err.filename != str(args.plot):
            raise
        _fail(f"cannot write {args.plot}: {err.strerror}")
    return 0


def _emit(output: str, target: Path | None) -> None:
    """Standard output, or the file named by -o."""
    if target is None:
        sys.stdout.write(output)
        return
    try:
        target.write_text(output, encoding="utf-8")
    except OSError as err:
        _fail(f"cannot write {target}: {err.strerror}")


def _derive_output(args: argparse.Namespace) -> str:
    if args.distributed:
        s = split(args.norm)  # a norm that cannot be split: a SpecError, reported by main
        proofs = prove_split(s) if args.proofs else None
        if args.format == "latex":
            return split_to_latex(s)
        return split_to_json(s, proofs) if args.format == "json" else split_to_text(s, proofs)
    if args.document:
        return to_document(args.norm, args.transforms, budget=args.proof_budget)
    d = derive(args.norm, args.mode, transforms=args.transforms)
    proofs = prove(d, budget=args.proof_budget) if args.proofs else None
    if args.format == "latex":
        return to_latex(d, args.form)
    if args.format == "json":
        return to_json(d, args.form, proofs)
    return to_text(d, args.form, proofs)


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain, to_json, to_latex, to_text

    render = {"text": to_text, "json": to_json, "latex": to_latex}[args.format]
    if args.output is not None:
        _writable(args.output)
    _emit(render(explain(args.norm)), args.output)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .explain import explain, write_report

    if args.output.suffix not in (".pdf", ".tex"):
        _fail(f"-o must name a .pdf or .tex file, got {args.output}")
    _writable(args.output)
    try:
        print(write_report(explain(args.norm), args.output))  # a LatexError is reported by main
    except OSError as err:
        _fail(f"cannot write {args.output}: {err.strerror}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .emit import generate

    try:
        written = generate(args.output)
    except OSError as err:
        _fail(f"cannot write {err.filename or args.output}: {err.strerror}")
    for path in written:
        print(path)
    return 0


def _orders(text: str) -> tuple[int, ...]:
    """``--orders``: a comma-separated list of 1, 2, 3."""
    from .check import ORDERS

    try:
        orders = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        orders = ()
    if not orders or any(o not in ORDERS for o in orders):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of {', '.join(map(str, ORDERS))}, got {text!r}")
    return orders


def _check(args: argparse.Namespace) -> int:
    from .check import check, format_row, header, to_json

    text = args.format == "text"
    if text:
        print(header(), flush=True)
    try:
        rows = check(tuple(args.norms) or tuple(BUILTINS), tuple(args.backend or BACKENDS),
                     progress=(lambda row: print(format_row(row), flush=True)) if text else None,
                     orders=args.orders, quick=args.quick)
    except CompilerError as err:
        first, _, rest = str(err).partition("\n")
        raise CompilerError(f"{first} (check the NumPy backend alone with --backend numpy)\n{rest}".strip()) from None
    bad = sum(not row.ok for row in rows)
    if not text:
        print(json.dumps(to_json(rows), indent=1, ensure_ascii=False), flush=True)
    print(f"check: {len(rows)} combinations, {bad} mismatches", file=sys.stdout if text else sys.stderr)
    return 1 if bad else 0
