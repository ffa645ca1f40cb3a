"""How every ``edgeship`` command prints a result: JSON for scripts, a table for people."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["emit"]


def emit(args: argparse.Namespace, doc: Any, table: Table | str) -> None:
    """Print ``doc`` as JSON with ``--json``, else ``table`` (a rich Table or text)."""
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        Console().print(table)
