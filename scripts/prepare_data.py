"""Prepares a dataset once: python scripts/prepare_data.py {demo,...} [--manual_dir DIR] [--data_dir D]."""

import sys

from absl import app, flags, logging

from agejax.data import pipeline

_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder holding the downloaded dataset (not for demo).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir; default ~/tensorflow_datasets.")
_BUILDER_CONFIG = flags.DEFINE_string("builder_config", "", "TFDS builder config, e.g. 'tiny' for demo.")


def main(argv):
  if len(argv) != 2 or argv[1] not in pipeline.DATASETS:
    sys.exit(f"usage: prepare_data.py {{{','.join(pipeline.DATASETS)}}} [--manual_dir DIR] [--data_dir D]")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  builder = pipeline.prepare(argv[1], _DATA_DIR.value, _MANUAL_DIR.value, _BUILDER_CONFIG.value)
  print(f"{argv[1]} prepared in {builder.data_dir}")
  for name, split in builder.info.splits.items():
    print(f"  {name:<12} {split.num_examples:>8} examples")


if __name__ == "__main__":
  app.run(main)
