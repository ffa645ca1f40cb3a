"""The one runner of the coverage-guided fuzz targets in this directory (atheris, libFuzzer).

A target is a module ``tests/fuzz/<name>.py`` with ``target(data: bytes) -> None``, which
returns for any input the code accepts or refuses cleanly and raises otherwise (an
unexpected exception, or a failed ``assert`` on an invariant). It imports the code under
test inside :func:`instrumented`, keeps its seed inputs in ``tests/fuzz/corpus/<name>/``
(small files, checked in), and ends with::

    if __name__ == "__main__":
        run(target, "<name>")

Then, from the repository root::

    python -m tests.fuzz.<name>                  # 10 seconds
    python -m tests.fuzz.<name> --seconds 3600   # longer; --keep DIR keeps what it finds
    python -m tests.fuzz.<name> crash-1a2b...    # replay one input

New interesting inputs go to a temporary directory (or ``--keep DIR``), never into the
checked-in corpus; a crash is written to ``--artifacts DIR`` (default: a temporary
directory, named in the output) and the process exits non-zero. Every crash becomes a
regression test, and its input a corpus file (``tests/fuzz/test_fuzz.py`` replays them all).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import atheris

__all__ = ["CORPUS", "instrumented", "run"]

CORPUS = Path(__file__).resolve().parent / "corpus"


def instrumented(*packages: str) -> AbstractContextManager[None]:
    """Import the code under test inside this context: the agent's (and ``packages``)
    then reports coverage to the fuzzer."""
    return atheris.instrument_imports(include=["agent", *packages])


def run(
    target: Callable[[bytes], None],
    name: str,
    argv: list[str] | None = None,
    *,
    max_len: int = 4096,
) -> None:
    """Fuzz ``target`` from the seeds of ``name`` for a bounded time; never returns."""
    parser = argparse.ArgumentParser(description=f"fuzz {name} (atheris / libFuzzer)")
    parser.add_argument("--seconds", type=int, default=10, help="how long (default 10)")
    parser.add_argument("--keep", type=Path, help="directory for the new inputs found")
    parser.add_argument("--artifacts", type=Path, help="directory for crashing inputs")
    parser.add_argument("--max-len", type=int, default=max_len, help="longest input")
    parser.add_argument("inputs", nargs="*", type=Path, help="replay these inputs only")
    args = parser.parse_args(argv)
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-crashes-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    flags = [f"-artifact_prefix={artifacts}/", f"-max_len={args.max_len}"]
    if args.inputs:
        libfuzzer = [sys.argv[0], *flags, *map(str, args.inputs)]
    else:
        # libFuzzer writes new inputs into its first directory: never the seeds.
        found = args.keep or Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-found-"))
        found.mkdir(parents=True, exist_ok=True)
        print(f"fuzz {name}: new inputs go to {found}/", file=sys.stderr)
        seconds = f"-max_total_time={args.seconds}"
        libfuzzer = [sys.argv[0], *flags, seconds, str(found), str(CORPUS / name)]
    print(f"fuzz {name}: crashes go to {artifacts}/", file=sys.stderr)
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()
