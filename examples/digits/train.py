"""Train a digit classifier on scikit-learn's bundled digits set and export it.

No download: ``sklearn.datasets.load_digits`` ships with scikit-learn (1797 8x8 images).
Writes into ``--out`` (default ``out/digits``):

* ``digits.onnx``: the trained MLPClassifier exported with skl2onnx (opset 17, IR 8, so
  any onnxruntime >= 1.14 loads it); input ``x`` float32 [N, 64] in [0, 1], outputs
  ``label`` and ``probabilities``;
* ``digits.tflite``: the same weights as a TFLite flatbuffer (sdk.build.tflite_writer), input
  ``x``, output ``probabilities``;
* ``calibration.npz``: 300 training images (key ``x``) for static quantization;
* ``validation.npz``: the held-out images (``x``) and their ``labels``;
* ``summary.json``: sample counts and the float model's validation accuracy.

Then, for example::

    edgeship build out/digits/digits.onnx --quantize static \\
        --calibration out/digits/calibration.npz --validation out/digits/validation.npz \\
        --max-accuracy-drop 0.5 --target onnxruntime ...

Runs in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from sdk.build.model_io import open_model
from sdk.build.tflite_writer import write_mlp_tflite

ONNX_OPSET = 17  # onnxruntime rejects onnx 1.23's default opset 28 / IR 14
ONNX_IR_VERSION = 8
CALIBRATION_SAMPLES = 300
SEED = 0


def build(out: Path, *, shuffle_labels: bool = False) -> dict[str, Path]:
    """Train, export and write the data sets; returns the paths written.

    ``shuffle_labels`` trains on labels out of step with their images (shifted by one
    class): a retrain gone wrong, which exports, builds and passes its own health gate
    (its golden outputs are its own) and is wrong on real digits.
    """
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=SEED, stratify=y
    )
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=400, random_state=SEED)
    with warnings.catch_warnings():
        # Reaching max_iter on this small set is fine: validation accuracy is ~97%.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, (y_train + 1) % 10 if shuffle_labels else y_train)

    onnx_model = convert_sklearn(
        clf,
        initial_types=[("x", FloatTensorType([None, x.shape[1]]))],
        target_opset=ONNX_OPSET,
        options={id(clf): {"zipmap": False}},
    )
    onnx_model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(onnx_model)
    paths = {
        "onnx": out / "digits.onnx",
        "tflite": out / "digits.tflite",
        "calibration": out / "calibration.npz",
        "validation": out / "validation.npz",
        "summary": out / "summary.json",
    }
    onnx.save(onnx_model, str(paths["onnx"]))
    write_mlp_tflite(
        paths["tflite"],
        list(zip(clf.coefs_, clf.intercepts_, strict=True)),
        input_name="x",
        output_name="probabilities",
    )
    rng = np.random.default_rng(SEED)
    calib = x_train[rng.choice(len(x_train), CALIBRATION_SAMPLES, replace=False)]
    np.savez(paths["calibration"], x=calib)
    np.savez(paths["validation"], x=x_val, labels=y_val)

    # The three must agree: sklearn, onnxruntime and LiteRT on the validation set.
    sk = clf.predict_proba(x_val)
    ort_probs = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"x": x_val}
    )[0]
    with open_model(paths["tflite"]) as litert:
        tfl_probs = litert.predict({"x": x_val})["probabilities"]
    for name, probs in (("onnxruntime", ort_probs), ("litert", tfl_probs)):
        if np.abs(probs - sk).max() > 1e-4:
            raise SystemExit(f"{name} disagrees with scikit-learn: the export is broken")
    summary = {
        "train_samples": len(x_train),
        "validation_samples": len(x_val),
        "validation_accuracy": float(np.mean(sk.argmax(axis=1) == y_val)),
        **{k: str(v) for k, v in paths.items()},
    }
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/digits"))
    parser.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="train on labels out of step with the images: a broken retrain, for the demo",
    )
    args = parser.parse_args()
    paths = build(args.out, shuffle_labels=args.shuffle_labels)
    print(paths["summary"].read_text(), end="")


if __name__ == "__main__":
    main()
