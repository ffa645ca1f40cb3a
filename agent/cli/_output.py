"""How both CLIs (``edgeship-agent`` and ``edgeship``) report a failure.

For people, one line on stderr: ``error: <what to do>``. With ``--json``, scripts get the
same shape as the HTTP endpoint's errors on stdout, ``{"error": {"code": ...,
"message": ...}}``, and the same non-zero exit status: 1 for a refused command, 2 for a
command line argparse cannot read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import NoReturn

__all__ = ["USAGE_EXIT", "error_code", "parser_class", "reader_gone", "report_error"]

USAGE_EXIT = 2


def error_code(exc: BaseException) -> str:
    """The kebab-case name of the error's class without ``Error``: ``ConfigError`` ->
    ``config``, ``StoreUnavailableError`` -> ``store-unavailable``; stable for scripts."""
    name = type(exc).__name__.removesuffix("Error") or "error"
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _print_error(code: str, message: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": {"code": code, "message": message}}, sort_keys=True))
    else:
        print(f"error: {message}", file=sys.stderr)


def report_error(exc: BaseException, as_json: bool) -> int:
    """Print ``exc`` for a person (stderr) or a script (JSON on stdout); returns 1."""
    _print_error(error_code(exc), str(exc), as_json)
    return 1


def reader_gone() -> int:
    """What a CLI does when the reader of its output went away (``... | head``): stop
    quietly with the status a shell gives a tool that SIGPIPE ended, as Unix tools do."""
    # Python flushes stdout once more at exit and would print another BrokenPipeError.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13  # SIGPIPE


def parser_class(as_json: bool) -> type[argparse.ArgumentParser]:
    """An ``ArgumentParser`` (for the parser and its subparsers) whose usage errors are
    JSON when ``as_json``."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            if not as_json:
                super().error(message)
            _print_error("usage", f"{self.prog}: {message}", True)
            sys.exit(USAGE_EXIT)

    return Parser
