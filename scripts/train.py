"""Trains an age estimator: python scripts/train.py --config configs/vgg16_kl.py[:VARIANT] --workdir DIR."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads datasets here

from absl import app, flags, logging
from ml_collections import config_flags

from agejax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and final metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax and CLU are chatty at INFO; -v 0 restores it
    logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
