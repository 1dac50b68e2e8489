"""Trains an age estimator: python scripts/train.py --config configs/vgg16_kl.py[:VARIANT] --workdir DIR."""

from absl import flags
from ml_collections import config_flags

from agejax import cli, parallel
from agejax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config(arg)).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and final metrics.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Multi-process run that JAX discovers (TPU VM pods, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for other clusters.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Process count, with --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id, with --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
