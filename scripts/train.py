"""Trains an age estimator: python scripts/train.py --config configs/vgg16_kl.py[:VARIANT] --workdir DIR."""

from absl import flags
from ml_collections import config_flags

from agejax import cli
from agejax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config(arg)).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and final metrics.")
_CLUSTER = cli.ClusterFlags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  _CLUSTER.initialize()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
