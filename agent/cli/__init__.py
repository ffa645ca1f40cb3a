"""``edgeship-agent``: the device CLI. Thin: parse, call the library, print.

Subcommands are registered by the modules that implement them (``register(subparsers)``).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from agent import __version__
from agent.cli._output import parser_class, reader_gone, report_error
from agent.errors import EdgeshipError

__all__ = ["main"]


def build_parser(*, json_errors: bool = False) -> argparse.ArgumentParser:
    parser = parser_class(json_errors)(
        prog="edgeship-agent",
        description="The edgeship device agent: install, serve and watch signed model bundles.",
    )
    parser.add_argument("--version", action="version", version=f"edgeship-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command module adds its own subparser and sets `func`.
    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules() -> list[ModuleType]:
    # Imported here so `edgeship-agent --help` stays fast and light.
    from agent.cli import _lifecycle, _predict, _run, _trust  # noqa: PLC0415

    return [_predict, _lifecycle, _run, _trust]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return reader_gone()


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(json_errors="--json" in argv).parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeshipError as exc:
        return report_error(exc, getattr(args, "json", False))
    except KeyboardInterrupt:
        return 130
