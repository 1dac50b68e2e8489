"""Exports a trained model: python scripts/export.py --workdir DIR [--checkpoint STEP] [--flip] --output OUT.

Writes OUT/model.jax (jax.export: uint8 RGB face crops [B, S, S, 3] -> float32 age probabilities
[B, K], with preprocessing and WORKDIR/calibration.json's temperature inside; --nocalibration: the
raw model), OUT/saved_model/ (the same for TensorFlow), OUT/model.onnx (the same for onnxruntime),
OUT/triton/ (a Triton model repository of model.onnx: tritonserver --model-repository OUT/triton) and
OUT/manifest.json (S, the ages, the temperature, the checkpoint step, the versions, every file's
SHA-256 and a reference prediction). OUT is replaced whole, or left as it was if the export fails.
OUT may be a gs:// URL. --flip: every format averages each face with its mirror image, with
calibration.json's flip temperature; the manifest records `flip`, the `temperature` and the 80%
interval's `interval_masses` by age bucket, which predict and serve apply to an export's intervals.

python scripts/export.py --verify OUT checks an export (manifest, checksums, reference prediction).
"""

import json

from absl import app, flags

from agejax import cli, errors
from agejax.inference import export

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
_CHECKPOINT = cli.checkpoint_flag()
_OUTPUT = flags.DEFINE_string(
  "output", None, "Export folder (a path or gs:// URL): new, empty or an earlier export, which is replaced whole."
)
_CALIBRATION = cli.calibration_flag("export the raw model")
_FLIP = cli.flip_flag("every format predicts so, and the manifest records it")
_SAVED_MODEL = flags.DEFINE_bool("saved_model", True, "Also write the TensorFlow SavedModel (--nosaved_model: skip).")
_ONNX = flags.DEFINE_bool("onnx", True, "Also write model.onnx through jax2onnx (--noonnx: skip).")
_TRITON = flags.DEFINE_bool(
  "triton", True, "Also write OUT/triton/, a Triton model repository of model.onnx (--notriton: skip)."
)
_VERIFY = flags.DEFINE_bool(
  "verify", False, "Check the export at --output (manifest, every file's SHA-256, reference prediction); no export."
)
flags.mark_flags_as_required(["output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = _OUTPUT.value.rstrip("/")
  if _VERIFY.value:
    predictor = export.verify(_OUTPUT.value)
    print(f"{out}: a whole export of step {predictor.step}; {len(predictor.manifest['sha256'])} files verified")
    return
  if _WORKDIR.value is None:
    raise errors.UserError("--workdir DIR is required to export (or --verify to check the export at --output)")
  manifest = export.export_workdir(
    _WORKDIR.value,
    _OUTPUT.value,
    _CHECKPOINT.value,
    calibrated=_CALIBRATION.value,
    flip=_FLIP.value,
    saved_model=_SAVED_MODEL.value,
    onnx=_ONNX.value,
    triton=_TRITON.value,
  )
  s, k = manifest["input_size"], manifest["num_bins"]
  views = "flip averages" if manifest["flip"] else "single views"
  print(f"exported step {manifest['step']} ({views}, temperature {manifest['temperature']:g}) of {_WORKDIR.value}:")
  print(f"  {out}/{export.MODEL_FILE}: jax.export, uint8 [B, {s}, {s}, 3] -> float32 [B, {k}]")
  if manifest["files"]["saved_model"]:
    print(f"  {out}/{export.SAVED_MODEL_DIR}/: TensorFlow SavedModel, signature serving_default")
  if manifest["files"]["onnx"]:
    print(f"  {out}/{export.ONNX_FILE}: ONNX, {export.INPUT_NAME} uint8 [B, {s}, {s}, 3] -> {export.OUTPUT_NAME}")
  elif _ONNX.value:
    print(f"  {out}/{export.ONNX_FILE}: not written: {manifest['onnx_skipped']}")
  if manifest["files"]["triton"]:
    repository = f"{out}/{export.TRITON_DIR}"
    print(f"  {repository}/: Triton model repository (tritonserver --model-repository {repository})")
  elif _TRITON.value:
    print(f"  {out}/{export.TRITON_DIR}/: not written: {manifest['triton_skipped']}")
  print(f"  {out}/{export.MANIFEST_FILE}: {json.dumps({k: manifest[k] for k in ('min_age', 'max_age', 'step')})}")


if __name__ == "__main__":
  cli.run(main)
