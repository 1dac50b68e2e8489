"""Evaluates a trained model on a whole split: python scripts/evaluate.py --workdir DIR [--split test].

Prints a table and writes DIR/eval/<split>.json, <split>_predictions.jsonl and <split>_*.png: the
scores, error by group of people with bootstrap intervals, and calibration. DIR/calibration.json's
temperature is applied when present (--no-calibration: the raw model; --calibrate fits it first).
`--config` defaults to the DIR/config.json the trainer wrote.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from agejax import cli
from agejax.evaluation import scoring
from agejax.inference import evaluate
from agejax.training import checkpointing

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training config file; default: WORKDIR/config.json.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", f"Checkpoint: {checkpointing.CHECKPOINT_CHOICES}.")
_FLIP = flags.DEFINE_bool("flip", False, "Average each image's distribution with its mirror image's.")
_CALIBRATE = flags.DEFINE_bool(
  "calibrate", False, "First fit the temperature on the config's eval split; write WORKDIR/calibration.json."
)
_NO_CALIBRATION = flags.DEFINE_bool(
  "no-calibration", False, "Ignore WORKDIR/calibration.json's temperature: score the raw model."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CALIBRATE.value and _NO_CALIBRATION.value:
    raise app.UsageError("--calibrate fits the temperature that --no-calibration ignores: give one of them")
  report = evaluate.evaluate_workdir(
    _CONFIG.value,
    _WORKDIR.value,
    _SPLIT.value,
    checkpoint=_CHECKPOINT.value,
    flip=_FLIP.value,
    calibrated=not _NO_CALIBRATION.value,
    fit_calibration=_CALIBRATE.value,
  )
  print(scoring.format_table(report))
  print(f"wrote {os.path.join(_WORKDIR.value, 'eval', _SPLIT.value)}.json, _predictions.jsonl and plots")


if __name__ == "__main__":
  cli.run(main)
