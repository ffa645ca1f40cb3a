#!/usr/bin/env bash
# The main job, end to end on this machine: train a real model, make a signing key and a
# trust policy, build and sign bundles (ONNX and TFLite), verify them, show one, and run
# it the way a device does.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh sdk

out=out/quickstart
rm -rf "$out"
mkdir -p "$out"
export EDGESHIP_PASSPHRASE=${EDGESHIP_PASSPHRASE:-quickstart-demo-passphrase}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "1. train a digit classifier (scikit-learn's bundled digits) and export ONNX + TFLite"
python examples/digits/train.py --out "$out/digits"

step "2. a signing key (encrypted, 0600) and the trust policy a device gets"
edgeship keygen "$out/keys/release" --passphrase-env EDGESHIP_PASSPHRASE
edgeship trust "$out/keys/release.pub" --out "$out/trust.toml"

step "3. build and sign int8 bundles, gated: the build refuses a model that got worse"
# Static int8 with a calibration set; evaluated against the float model on the validation
# set; golden inputs and expected outputs from the int8 model in its real runtime.
for fmt in onnx tflite; do
  edgeship build "$out/digits/digits.$fmt" --metadata examples/digits/bundle.toml \
    --key "$out/keys/release" --passphrase-env EDGESHIP_PASSPHRASE \
    --quantize static --calibration "$out/digits/calibration.npz" \
    --validation "$out/digits/validation.npz" \
    --max-accuracy-drop 1.0 --min-agreement 0.97 \
    --out "$out/digits-$fmt-1.0.0.edgeship"
done

step "3b. a gate that cannot be met: no bundle is written"
if edgeship build "$out/digits/digits.onnx" --metadata examples/digits/bundle.toml \
    --key "$out/keys/release" --passphrase-env EDGESHIP_PASSPHRASE \
    --quantize dynamic --validation "$out/digits/validation.npz" --max-size-mb 0.01 \
    --out "$out/too-big.edgeship"; then
  echo "a build that missed its gate wrote a bundle: this is a bug" >&2
  exit 1
fi
test ! -e "$out/too-big.edgeship"
echo "(refused, as it must be)"

step "4. verify both against the trust policy"
edgeship verify "$out/digits-onnx-1.0.0.edgeship" --trust "$out/trust.toml"
edgeship verify "$out/digits-tflite-1.0.0.edgeship" --trust "$out/trust.toml"

step "5. a copy with one byte of the model changed is refused"
cp "$out/digits-onnx-1.0.0.edgeship" "$out/tampered.edgeship"
size=$(stat -c %s "$out/tampered.edgeship")
printf '\x5a' | dd of="$out/tampered.edgeship" bs=1 seek=$((size - 20000)) conv=notrunc status=none
if edgeship verify "$out/tampered.edgeship" --trust "$out/trust.toml"; then
  echo "a tampered bundle verified: this is a bug" >&2
  exit 1
fi
echo "(refused, as it must be)"

step "6. what the bundle says about itself"
edgeship inspect "$out/digits-onnx-1.0.0.edgeship"

step "done: bundles, key and trust policy are in $out/"
