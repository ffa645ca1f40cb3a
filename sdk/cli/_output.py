"""How every ``edgeship`` command prints a result: JSON for scripts, a table for people."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["emit"]

# Piped or logged, a table gets whole rows rather than 80 columns of wrapped cells (rich
# assumes 80 when the output is no terminal); COLUMNS still decides when it is set.
PIPED_WIDTH = 200


def emit(args: argparse.Namespace, doc: Any, table: Table | str) -> None:
    """Print ``doc`` as JSON with ``--json``, else ``table`` (a rich Table or text)."""
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        Console(width=PIPED_WIDTH if piped else None).print(table)
