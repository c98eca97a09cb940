"""``python -m symbn``: derive, show and prove normalization gradients from the command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import BACKENDS
from .derive import MODES, derive, transforms_for
from .explain import FORMATS as EXPLAIN_FORMATS
from .prove import prove
from .render import FORMATS, FORMS, to_document, to_json, to_latex, to_text
from .spec import BUILTINS


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2, never a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _builtin(name: str) -> str:
    """A built-in norm's name (argparse's ``choices`` cannot be used with ``nargs='*'``)."""
    if name not in BUILTINS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(map(repr, BUILTINS))})")
    return name


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="python -m symbn", description="Normalization-layer gradients, derived symbolically and proven.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    derive_cmd = commands.add_parser("derive", help="derive the backward pass of a normalization and show it",
                                     description="Derive the backward pass from the forward definition, for symbolic m.")
    derive_cmd.add_argument("norm", nargs="?", default="batchnorm", choices=list(BUILTINS), metavar="NORM",
                            help=f"one of: {', '.join(BUILTINS)} (default: batchnorm)")
    derive_cmd.add_argument("--mode", choices=MODES,
                            help="train (default): batch statistics (functions of x); eval: population statistics (constants)")
    derive_cmd.add_argument("--form", choices=FORMS, help="paper (staged), compact, or both (default)")
    derive_cmd.add_argument("--order", type=_positive, default=1, metavar="N",
                            help="derivative order in reverse mode: 1 the backward pass (default), 2 the double backward, ...")
    derive_cmd.add_argument("--transforms", type=_chain, metavar="CHAIN",
                            help="another chain of transforms, innermost first: e.g. vjp,jvp for jvp(vjp(f)) "
                                 "(forward over reverse, a Hessian-vector product), jvp,jvp, vjp,vjp,vjp")
    derive_cmd.add_argument("--format", choices=FORMATS, default="text", help="text (default), latex or json")
    derive_cmd.add_argument("--proofs", action="store_true",
                            help="also prove every identity (symbolic m, and brute force at explicit m: 1..6 at order 1, 1..4 at order 2, 1..3 at order 3); takes seconds to a minute")
    derive_cmd.add_argument("--document", action="store_true",
                            help="with --format latex: a complete article (both modes, both forms, every proof)")
    derive_cmd.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of standard output")

    commands.add_parser("list", help="list the built-in normalizations", description="List the built-in normalizations.")

    explain_cmd = commands.add_parser("explain", help="why the moments get gradients: paths, numbers, the paper's argument",
                                      description="Answer 'why do the mean and variance get gradients?' with the derivation and measurements.")
    explain_cmd.add_argument("norm", nargs="?", default="batchnorm", choices=list(BUILTINS), metavar="NORM",
                             help=f"one of: {', '.join(BUILTINS)} (default: batchnorm)")
    explain_cmd.add_argument("--format", choices=EXPLAIN_FORMATS, default="text", help="text (default), json or latex (the report's source)")
    explain_cmd.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of standard output")

    report_cmd = commands.add_parser("report", help="the explanation as a PDF (or .tex) document",
                                     description="Write the report: FILE.pdf compiles with pdflatex (the .tex is kept beside it); FILE.tex writes the source only.")
    report_cmd.add_argument("norm", nargs="?", default="batchnorm", choices=list(BUILTINS), metavar="NORM",
                            help=f"one of: {', '.join(BUILTINS)} (default: batchnorm)")
    report_cmd.add_argument("-o", "--output", type=Path, metavar="FILE", required=True, help="FILE.pdf or FILE.tex")

    bench_cmd = commands.add_parser("bench", help="time the generated kernels against PyTorch and NumPy",
                                    description="Time C, NumPy, PyTorch and the paper's staged NumPy in one process; report ms, GB/s, "
                                                "fraction of the measured triad bandwidth and the ratio to PyTorch.")
    bench_cmd.add_argument("--quick", action="store_true", help="three batch-norm cases, fewer repeats (under a minute)")
    bench_cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_cmd.add_argument("--threads", type=int, default=2, help="threads for the C kernels and PyTorch (default 2)")
    bench_cmd.add_argument("--plot", type=Path, metavar="FILE.svg", help="also draw the ratios to PyTorch as an SVG bar chart")

    generate_cmd = commands.add_parser("generate", help="regenerate the kernels under generated/",
                                       description="Write the NumPy and C kernels of every built-in norm, deterministically.")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {"list": _list, "derive": _derive, "explain": _explain, "report": _report,
                "generate": _generate, "check": _check, "bench": _bench}
    return handlers[args.command](args)


def _list(args: argparse.Namespace) -> int:
    width = max(map(len, BUILTINS))
    for name, norm in BUILTINS.items():
        print(f"{name:<{width}}  {norm.description}; layout {norm.layout.name}: {norm.layout.description}")
    return 0


def _derive(args: argparse.Namespace) -> int:
    if args.document and args.format != "latex":
        _fail("derive", "--document needs --format latex")
    if args.document and (args.mode or args.form or args.proofs):
        _fail("derive", "--document writes both modes, both forms and every proof: drop --mode, --form and --proofs")
    if args.transforms and args.order != 1:
        _fail("derive", "give --order or --transforms, not both")
    args.transforms = args.transforms or ("vjp",) * args.order
    args.mode, args.form = args.mode or "train", args.form or "both"
    _emit(_derive_output(args), args.output, "derive")
    return 0


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

    if args.threads < 1:
        _fail("bench", f"--threads must be at least 1, got {args.threads}")
    sys.stdout.write(bench(args.quick, args.json, args.threads, args.plot))
    return 0


def _emit(output: str, target: Path | None, command: str) -> None:
    """Standard output, or the file named by -o."""
    if target is None:
        sys.stdout.write(output)
        return
    try:
        target.write_text(output, encoding="utf-8")
    except OSError as err:
        _fail(command, f"cannot write {target}: {err.strerror}")


def _derive_output(args: argparse.Namespace) -> str:
    if args.document:
        return to_document(args.norm, args.transforms)
    d = derive(args.norm, args.mode, transforms=args.transforms)
    proofs = prove(d) if args.proofs else None
    if args.format == "latex":
        return to_latex(d, args.form)
    if args.format == "json":
        return to_json(d, args.form, proofs)
    return to_text(d, args.form, proofs)


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain, to_json, to_latex, to_text

    render = {"text": to_text, "json": to_json, "latex": to_latex}[args.format]
    _emit(render(explain(args.norm)), args.output, "explain")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .explain import LatexError, explain, write_report

    if args.output.suffix not in (".pdf", ".tex"):
        _fail("report", f"-o must name a .pdf or .tex file, got {args.output}")
    try:
        print(write_report(explain(args.norm), args.output))
    except LatexError as err:
        _fail("report", str(err))
    except OSError as err:
        _fail("report", f"cannot write {args.output}: {err.strerror}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .emit import generate

    for path in generate(args.output):
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
    import json

    from .build import CompilerError
    from .check import check, format_row, header, to_json

    text = args.format == "text"
    if text:
        print(header(), flush=True)
    try:
        rows = check(tuple(args.norms) or tuple(BUILTINS), tuple(args.backend or BACKENDS),
                     progress=(lambda row: print(format_row(row), flush=True)) if text else None,
                     orders=args.orders, quick=args.quick)
    except CompilerError as err:
        _fail("check", f"{err} (check the NumPy backend alone with --backend numpy)")
    bad = sum(not row.ok for row in rows)
    if not text:
        print(json.dumps(to_json(rows), indent=1, ensure_ascii=False), flush=True)
    print(f"check: {len(rows)} combinations, {bad} mismatches", file=sys.stdout if text else sys.stderr)
    return 1 if bad else 0


def _fail(command: str, message: str) -> None:
    sys.stderr.write(f"python -m symbn {command}: error: {message}\n")
    raise SystemExit(2)
