"""Prepares a dataset once: python scripts/prepare_data.py {utkface,csv_faces,demo} --manual_dir DIR [--data_dir D].

`--name NAME` names a CSV dataset (a builder config: train with --config.data.builder_config=NAME),
so APPA-REAL, MORPH and your own lists live side by side. Preparing a name again from another or a
changed source is refused; `--rebuild` deletes the prepared dataset and prepares it again.
"""

import sys

from absl import flags

from agejax import cli
from agejax.data import datasets

_MANUAL_DIR = flags.DEFINE_string(
  "manual_dir", "", "Folder holding the downloaded dataset, or for utkface the archive itself (not for demo)."
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir; default ~/tensorflow_datasets.")
_BUILDER_CONFIG = flags.DEFINE_string("builder_config", "", "TFDS builder config, e.g. 'tiny' for demo.")
flags.DEFINE_alias("name", "builder_config")  # csv_faces: the name of your dataset, e.g. 'appa'
_REBUILD = flags.DEFINE_bool(
  "rebuild",
  False,
  "Delete the prepared dataset of this name (its version folder) and prepare it again from --manual_dir.",
)


def main(argv):
  if len(argv) != 2 or argv[1] not in datasets.DATASETS:
    sys.exit(
      f"usage: prepare_data.py {{{','.join(datasets.DATASETS)}}} [--manual_dir DIR] [--data_dir D] "
      f"[--name NAME] [--rebuild]"
    )
  try:
    args = argv[1], _DATA_DIR.value, _MANUAL_DIR.value, _BUILDER_CONFIG.value
    already = not _REBUILD.value and datasets.get_builder(args[0], args[1], args[3]).is_prepared()
    builder = datasets.prepare(*args, rebuild=_REBUILD.value)
  except AssertionError as e:  # TFDS asserts that the manual folder exists and is not empty
    reason = (str(e).strip().splitlines() or [""])[0].split(". Create it")[0]
    sys.exit(f"error: {reason}; pass --manual_dir FOLDER holding the downloaded files (README: Real datasets)")
  name = argv[1] + (f" --name {_BUILDER_CONFIG.value}" if _BUILDER_CONFIG.value else "")
  print(f"{name} {'was already prepared' if already else 'prepared'} in {builder.data_dir}")
  metadata = builder.info.metadata or {}
  if source := metadata.get("source"):
    print(f"  from         {source['path']}" + (" (unchanged)" if already else ""))
  for split_name, split in builder.info.splits.items():
    print(f"  {split_name:<12} {split.num_examples:>8} examples")
  skipped = metadata.get("skipped") or {}
  print(f"  skipped      {sum(skipped.values()):>8} files" + (":" if skipped else ""))
  for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1]):
    examples = ", ".join(metadata.get("skipped_examples", {}).get(reason, [])[:3])
    print(f"    {count:>8}  {reason}" + (f"  (e.g. {examples})" if examples else ""))


if __name__ == "__main__":
  cli.run(main)
