"""``edgeship``: the build and fleet CLI. Thin: parse, call the library, print.

The commands live in :mod:`sdk.cli._build` (keygen, build, inspect, verify),
:mod:`sdk.cli._trust` (trust, heartbeat), :mod:`sdk.cli._fleet` (serve, publish, collect,
fleet) and :mod:`sdk.cli._rollout` (rollout). Results print as tables for people and as
JSON with ``--json`` for scripts. Only :class:`~agent.errors.EdgeshipError` is caught; its
text is the whole message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.cli._output import parser_class, reader_gone, report_error
from agent.errors import EdgeshipError
from sdk import __version__
from sdk.cli import _build, _fleet, _rollout, _trust

__all__ = ["main"]


def build_parser(*, json_errors: bool = False) -> argparse.ArgumentParser:
    parser = parser_class(json_errors)(
        prog="edgeship",
        description="Build, sign and check model bundles; publish and roll them out to a fleet.",
    )
    parser.add_argument("--version", action="version", version=f"edgeship {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    _build.register(command)
    _trust.register(command)
    _fleet.register(command)
    _rollout.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return reader_gone()


def _main(argv: list[str] | None) -> int:
    argv = _trust.legacy_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser(json_errors="--json" in argv).parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeshipError as exc:
        return report_error(exc, getattr(args, "json", False))
    except KeyboardInterrupt:
        return 130
