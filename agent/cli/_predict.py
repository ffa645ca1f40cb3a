"""``edgeship-agent predict``: run a model over a file of inputs, offline, on the device.

The work is in :func:`predict_files` (and the readers and writers it uses), separate from
argument parsing, so the installed-agent flow can call it with a store directory.

Input files: ``.npz`` (one array per input name), ``.json`` (an object mapping input names
to nested lists, or a bare nested list for a single-input model), ``.npy`` (one array, for
a single-input model). Output files take the same forms, ``.npy`` only for a single-output
model. Arrays are loaded without pickle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.bundle.manifest import MANIFEST_PATH, RUNTIMES
from agent.errors import ConfigError, InferenceError, StateError
from agent.serve._validation import InputPolicy

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="run a bundle's model over a file of inputs",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[2],
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--bundle-dir",
        type=Path,
        help=f"an extracted, verified bundle ({MANIFEST_PATH} at its root)",
    )
    where.add_argument(
        "--model",
        help="the installed model of that name (agent.toml [models.NAME]; default: the"
        " model called default): its current version, from --state-dir or --config",
    )
    p.add_argument("--state-dir", type=Path, help="with --model: the agent's state directory")
    p.add_argument("--config", type=Path, help="with --model: the agent configuration")
    p.add_argument("--input", type=Path, required=True, help="inputs: .npy, .npz or .json")
    p.add_argument("--output", type=Path, required=True, help="outputs: .npy, .npz or .json")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="default: the first runtime the manifest allows that is installed",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        help="rows per call (models with a dynamic first dimension)",
    )
    p.add_argument("--threads", type=_positive_int, help="intra-op threads (default: automatic)")
    p.add_argument(
        "--max-elements",
        type=_positive_int,
        default=InputPolicy().max_elements,
        help="most elements one call may carry (default: %(default)s)",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="let NaN/inf inputs through")
    p.add_argument(
        "--decryption-key", type=Path, help="the device key that opens an encrypted bundle"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run)


def _installed(args: argparse.Namespace) -> Path:
    """The current version's directory of the model ``args.model`` names.

    Raises:
        ConfigError: no state directory given or found, or not a model name.
        StateError: that model has no current version.
    """
    from agent.cli._lifecycle import DEFAULT_CONFIG, _model_state_dir  # noqa: PLC0415
    from agent.install._store import Store  # noqa: PLC0415

    state_dir = args.state_dir
    if state_dir is None:
        config = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        if config is None:
            raise ConfigError("--model needs the agent's --state-dir or --config")
        from agent.config import load_config  # noqa: PLC0415

        state_dir = load_config(config).state_dir
    store = Store(_model_state_dir(state_dir, args.model))
    current = store.load().current
    if current is None:
        raise StateError(f"model {args.model!r} has no installed version in {store.root}")
    return store.version_dir(current)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    from agent.bundle.crypto import DeviceKey  # noqa: PLC0415 - what the command uses, when run
    from agent.bundle.manifest import Manifest  # noqa: PLC0415
    from agent.serve.batch import predict_files  # noqa: PLC0415
    from agent.serve.runtimes import RuntimeOptions  # noqa: PLC0415

    bundle_dir: Path = args.bundle_dir or _installed(args)
    manifest_path = bundle_dir / MANIFEST_PATH
    try:
        manifest_bytes = manifest_path.read_bytes()
    except OSError as exc:
        raise InferenceError(
            f"cannot read {manifest_path}: {exc}; --bundle-dir must be an extracted bundle"
        ) from exc
    manifest = Manifest.from_bytes(manifest_bytes)
    summary = predict_files(
        manifest,
        bundle_dir,
        args.input,
        args.output,
        runtime=args.runtime,
        options=RuntimeOptions(threads=args.threads),
        policy=InputPolicy(max_elements=args.max_elements, allow_nonfinite=args.allow_nonfinite),
        batch_size=args.batch_size,
        key=None if args.decryption_key is None else DeviceKey.load(args.decryption_key),
    )
    if args.json:
        print(
            json.dumps(
                {
                    "runtime": summary.runtime,
                    "rows": summary.rows,
                    "outputs": list(summary.outputs),
                    "output_file": str(args.output),
                    "seconds": round(summary.seconds, 6),
                }
            )
        )
    else:
        print(
            f"{summary.rows} rows -> {args.output} ({', '.join(summary.outputs)};"
            f" {summary.runtime}, {summary.seconds:.3f} s)"
        )
    return 0
