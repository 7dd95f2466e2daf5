"""Command line: ``python -m star_export <command>``, a thin layer over the Python API.

Each command is a module of :mod:`star_export.commands` (its flags, help text and run); this module
assembles them into one parser and runs the chosen one. User mistakes (UsageError) exit 2 with one
line on stderr, a missing component (TensorRT, a GPU) exits 3 with one line, a failed parity check
exits 1 after writing its report, Ctrl-C 130 and SIGTERM 143, each with one line.
"""

from __future__ import annotations

import argparse
import signal
import sys

from star_export import __version__
from star_export.errors import MissingComponent, Terminated, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on a bad flag."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"star_export: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, in the order of the command list. Imports the command modules
    (and through them the model families, hence torch): call it where Ctrl-C is handled."""
    from star_export.commands import (
        bench,
        build,
        check,
        compare,
        export,
        generate,
        llava,
        serve,
        triton,
        validate,
    )
    from star_export.commands import eval as evaluate

    parser = _Parser(
        prog="python -m star_export",
        description="STAR visual-token pruning for vision-language models, exported as static-shape ONNX / "
        "TensorRT with parity proofs.",
    )
    parser.add_argument("--version", action="version", version=f"star_export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in (llava, export, build, validate, generate, evaluate, compare, bench, triton, serve, check):
        # with examples, the epilog keeps its lines (and the description is printed as written, too)
        raw = command.EPILOG is not None
        p = sub.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.DESCRIPTION,
            epilog=command.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def _on_sigterm(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C at any time, also while the parser imports torch: one line, exit 130
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (an embedding application): leave its handlers alone
            previous = None
        try:
            return args.func(args)
        except (UsageError, MissingComponent) as e:
            print(f"star_export: error: {e}", file=sys.stderr)
            return e.exit_code
        except Terminated:
            print("star_export: terminated", file=sys.stderr)
            return 143
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        print("star_export: interrupted", file=sys.stderr)
        return 130
