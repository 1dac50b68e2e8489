"""Prepares a dataset once: python scripts/prepare_data.py {utkface,csv_faces,demo} --manual_dir DIR [--data_dir D].

`--name NAME` names a CSV dataset (a builder config: train with --config.data.builder_config=NAME),
so APPA-REAL, MORPH and your own lists live side by side. Preparing a name again from another or a
changed source is refused; `--rebuild` deletes the prepared dataset and prepares it again.

A database of the unified benchmark: python scripts/prepare_data.py fae --database AgeDB_aligned.json
--images DIR [--name agedb] [--image_size 281] (the name defaults to the JSON's stem, lowercased); it
prints the examples per folder and the train / validation / test sizes of each benchmark split.
A database whose folders share people on purpose (IMDB-CLEAN-FP-AGE: training folder 0 and validation
folder 1; only test folder 2 is subject-exclusive) needs `--shared_subjects 0,1`; it prints one line
saying how many subjects those folders share.

`--beam_options runner=DirectRunner,direct_num_workers=2` (fae) prepares on Apache Beam through TFDS's Beam
support, to ArrayRecord shards unless `--file_format tfrecord`; the same examples (keys, stored features), with the
skips counted as Beam metrics (README: the Dataflow, Spark and Flink forms).
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
_DATABASE = flags.DEFINE_string("database", "", "fae: the benchmark's database JSON, e.g. AgeDB_aligned.json.")
_IMAGES = flags.DEFINE_string("images", "", "fae: the folder the JSON's img_path values are relative to.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "fae: the stored crop size; 0 is the benchmark's (281).")
_SHARED_SUBJECTS = flags.DEFINE_string(
  "shared_subjects",
  "",
  "fae: folders that may share subjects, e.g. 0,1 for IMDB-CLEAN-FP-AGE (or 'all'); default: none, every folder "
  "subject-exclusive.",
)
_BEAM_OPTIONS = flags.DEFINE_string(
  "beam_options",
  "",
  "fae: prepare on Apache Beam with these pipeline options, e.g. runner=DirectRunner,direct_num_workers=2 "
  "(README: Dataflow, Spark, Flink).",
)
_FILE_FORMAT = flags.DEFINE_enum(
  "file_format",
  "",
  ["", "tfrecord", "array_record"],
  "Format of the prepared shards; default: array_record with --beam_options, else tfrecord.",
)
_REBUILD = flags.DEFINE_bool(
  "rebuild",
  False,
  "Delete the prepared dataset of this name (its version folder) and prepare it again from --manual_dir.",
)


def main(argv):
  if len(argv) != 2 or argv[1] not in datasets.DATASETS:
    sys.exit(
      f"usage: prepare_data.py {{{','.join(datasets.DATASETS)}}} [--manual_dir DIR] [--data_dir D] "
      f"[--name NAME] [--rebuild]; fae --database FILE.json --images DIR [--name NAME] [--image_size N] "
      f"[--shared_subjects 0,1] [--beam_options runner=DirectRunner,...] [--file_format array_record]"
    )
  fae = argv[1] == "fae"
  name = _BUILDER_CONFIG.value
  if fae and not name and _DATABASE.value:
    from agejax.data import fae as fae_data

    name = fae_data.config_name(_DATABASE.value)
  try:
    args = argv[1], _DATA_DIR.value, (_IMAGES.value or _MANUAL_DIR.value) if fae else _MANUAL_DIR.value, name
    extra = {"database": _DATABASE.value, "image_size": _IMAGE_SIZE.value} if fae else {}
    if _SHARED_SUBJECTS.value:  # datasets.prepare refuses it for a dataset other than fae
      extra["shared_subjects"] = _SHARED_SUBJECTS.value
    if _BEAM_OPTIONS.value:  # datasets.prepare refuses it for a dataset other than fae
      extra["beam_options"] = _BEAM_OPTIONS.value
    extra["file_format"] = _FILE_FORMAT.value
    builder = datasets.get_builder(args[0], args[1], args[3], extra.get("image_size", 0))
    already = not _REBUILD.value and builder.is_prepared()
    builder = datasets.prepare(*args, rebuild=_REBUILD.value, **extra)
  except AssertionError as e:  # TFDS asserts that the manual folder exists and is not empty
    reason = (str(e).strip().splitlines() or [""])[0].split(". Create it")[0]
    sys.exit(f"error: {reason}; pass --manual_dir FOLDER holding the downloaded files (docs/guides/datasets.md)")
  shown = argv[1] + (f" --name {name}" if name else "")
  print(f"{shown} {'was already prepared' if already else 'prepared'} in {builder.data_dir}")
  metadata = builder.info.metadata or {}
  if source := metadata.get("source"):
    print(f"  from         {source['path']}" + (" (unchanged)" if already else ""))
  if fae:
    from agejax.data import fae as fae_data

    if shared := fae_data.shared_subjects_line(metadata):
      print(shared)
    print("\n".join(fae_data.summary(builder)))
  else:
    for split_name, split in builder.info.splits.items():
      print(f"  {split_name:<12} {split.num_examples:>8} examples")
  skipped = metadata.get("skipped") or {}
  print(f"  skipped      {sum(skipped.values()):>8} files" + (":" if skipped else ""))
  for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1]):
    examples = ", ".join(metadata.get("skipped_examples", {}).get(reason, [])[:3])
    print(f"    {count:>8}  {reason}" + (f"  (e.g. {examples})" if examples else ""))


if __name__ == "__main__":
  cli.run(main)
