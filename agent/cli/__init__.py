"""``edgeship-agent``: the device CLI. Thin: parse, call the library, print.

Subcommands are registered by the modules that implement them (``register(subparsers)``).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from agent import __version__
from agent.errors import EdgeshipError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    from agent.cli import _lifecycle, _predict, _run  # noqa: PLC0415

    return [_predict, _lifecycle, _run]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeshipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
