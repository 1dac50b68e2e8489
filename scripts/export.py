"""Exports a trained model: python scripts/export.py --workdir DIR [--checkpoint best|latest|STEP] --output OUT.

Writes OUT/model.jax (jax.export: uint8 RGB face crops [B, S, S, 3] -> float32 age probabilities
[B, K], with preprocessing and WORKDIR/calibration.json's temperature inside; --no-calibration: the
raw model), OUT/saved_model/ (the same for TensorFlow) and OUT/manifest.json (S, the ages, the
temperature, the checkpoint step, the versions). OUT may be a gs:// URL.
"""

import json

from absl import app, flags

from agejax import cli
from agejax.inference import export
from agejax.training import checkpointing

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", f"Checkpoint: {checkpointing.CHECKPOINT_CHOICES}.")
_OUTPUT = flags.DEFINE_string("output", None, "Export folder (a path or gs:// URL); its files are replaced.")
_NO_CALIBRATION = flags.DEFINE_bool(
  "no-calibration", False, "Ignore WORKDIR/calibration.json's temperature: export the raw model."
)
_SAVED_MODEL = flags.DEFINE_bool("saved_model", True, "Also write the TensorFlow SavedModel (--nosaved_model: skip).")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  manifest = export.export_workdir(
    _WORKDIR.value,
    _OUTPUT.value,
    _CHECKPOINT.value,
    calibrated=not _NO_CALIBRATION.value,
    saved_model=_SAVED_MODEL.value,
  )
  out = _OUTPUT.value.rstrip("/")
  s = manifest["input_size"]
  print(f"exported step {manifest['step']} (temperature {manifest['temperature']:g}) of {_WORKDIR.value}:")
  print(f"  {out}/{export.MODEL_FILE}: jax.export, uint8 [B, {s}, {s}, 3] -> float32 [B, {manifest['num_bins']}]")
  if manifest["files"]["saved_model"]:
    print(f"  {out}/{export.SAVED_MODEL_DIR}/: TensorFlow SavedModel, signature serving_default")
  print(f"  {out}/{export.MANIFEST_FILE}: {json.dumps({k: manifest[k] for k in ('min_age', 'max_age', 'step')})}")


if __name__ == "__main__":
  cli.run(main)
