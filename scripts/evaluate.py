"""Evaluates a trained model on a whole split: python scripts/evaluate.py --workdir DIR [--split test].

Prints a table and writes DIR/eval/<split>.json, <split>_predictions.jsonl and <split>_*.png (with
--flip: <split>_flip.json, ...): the scores, error by group of people with bootstrap intervals,
calibration and NIST's age-check rates (with --age_check 18: a rule chosen for a stated error on the
validation split, checked on this one). DIR/calibration.json's calibration of the way scored
(single views, or --flip) is applied when present (--nocalibration: the raw model; --calibrate fits
both ways first); MAE and the other point scores are the raw model's either way. `--config`
defaults to the DIR/config.json the trainer wrote.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from agejax import cli
from agejax.evaluation import scoring
from agejax.inference import evaluate

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training config file; default: WORKDIR/config.json.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
_CHECKPOINT = cli.checkpoint_flag()
_FLIP = flags.DEFINE_bool(
  "flip", False, "Average each image's distribution with its mirror image's (reports named <split>_flip*)."
)
_CALIBRATE = flags.DEFINE_bool(
  "calibrate", False, "First fit both ways' calibrations on the config's eval split; write WORKDIR/calibration.json."
)
_AGE_CHECK = flags.DEFINE_integer(
  "age_check",
  None,
  "T of the age check 'is this person under T?' (e.g. 18): choose its rules on the config's eval split for "
  "--age_check_target_fpr, report them on --split and draw <split>_age_checks.png; default: config.eval.age_check.",
)
_AGE_CHECK_TARGET = flags.DEFINE_float(
  "age_check_target_fpr", None, "The largest share of minors the age check may pass; default: config's (0.01)."
)
_CALIBRATION = cli.calibration_flag("score the raw model")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CALIBRATE.value and not _CALIBRATION.value:
    raise app.UsageError("--calibrate fits the temperature that --nocalibration ignores: give one of them")
  report, written = evaluate.run_evaluation(
    _CONFIG.value,
    _WORKDIR.value,
    _SPLIT.value,
    checkpoint=_CHECKPOINT.value,
    flip=_FLIP.value,
    calibrated=_CALIBRATION.value,
    fit_calibration=_CALIBRATE.value,
    age_check=_AGE_CHECK.value,
    age_check_target_fpr=_AGE_CHECK_TARGET.value,
  )
  print(scoring.format_table(report))
  # As the user named the workdir (storage makes local paths absolute).
  names = [os.path.join(_WORKDIR.value, "eval", path.name) for path in written]
  print("wrote " + "\n      ".join(names))


if __name__ == "__main__":
  cli.run(main)
