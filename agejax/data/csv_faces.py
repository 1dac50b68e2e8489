"""Faces listed in CSV files as a TFDS dataset (`agejax_csv_faces`), from a manual folder.

The folder holds `train.csv`, `validation.csv` and optionally `test.csv`, one split each, with a
header naming at least `file_name,age`; an `age_std` column, when present, is the per-image label
spread (an empty cell or no column means 0.0, unknown). Image lookup: each `file_name` is looked
up in the folder's `images/` subfolder when there is one, then in the folder itself, so both
`a.jpg` and `images/a.jpg` work; absolute paths are used as they are.

Rows are skipped and counted by reason (`builder.info.metadata["skipped"]`): missing file name,
missing file, missing age, non-numeric age ("abc", "nan"), non-integer age ("23.5" is rejected,
not rounded: an integer age is stored, and rounding could hide a wrong column; "23" and "23.0" are
23), negative age, age too large (beyond int32), bad age_std (not a finite number >= 0), duplicate
row (a file_name listed again in the same CSV: the first row decides), and the image problems of
`faces.load_rgb`. Every age >= 0 is kept: the trainer's label range decides, so the dataset never
depends on a training config.
A file listed in several CSVs is kept in each but logged as a warning and counted in
`metadata["files_in_several_splits"]`: it leaks between splits.
"""

import collections
import csv
import dataclasses
import math
import os
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from agejax.data import builders, faces

SPLIT_FILES = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"}
REQUIRED_SPLITS = ("train", "validation")


def parse_age(text: str) -> int | str:
  """Returns the integer age written in `text` ("23" or "23.0"), or a skip reason."""
  text = text.strip()
  if not text:
    return "missing age"
  try:
    value = float(text)
  except ValueError:
    return "non-numeric age"
  if not math.isfinite(value):
    return "non-numeric age"
  if not value.is_integer():
    return "non-integer age"
  return faces.age_skip_reason(int(value)) or int(value)


def parse_age_std(text: str) -> float | str:
  """Returns the label spread written in `text` (0.0 when empty), or a skip reason."""
  text = text.strip()
  if not text:
    return 0.0
  try:
    value = float(text)
  except ValueError:
    return "bad age_std"
  return value if math.isfinite(value) and value >= 0 else "bad age_std"


@dataclasses.dataclass
class CsvFacesConfig(tfds.core.BuilderConfig):
  """Image size of the prepared CSV-listed dataset."""
  image_size: int = 224


@dataclasses.dataclass(frozen=True)
class _Row:
  """One accepted CSV row: the normalised file_name, the image path, the labels, where it was listed."""
  file_name: str
  path: Path
  age: int
  age_std: float
  where: str


def _folder_listing(root: Path, limit: int = 20) -> str:
  """Returns the first entries of a folder, for error messages."""
  names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
  more = f", ... ({len(names)} entries)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more if names else "nothing"


def _read_rows(csv_path: Path, image_dirs: list[Path], skips: faces.SkipCounter) -> list[_Row]:
  """Returns the valid rows of one CSV file, counting the others in `skips`."""
  rows, seen = [], set()
  with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or []]
    if "file_name" not in columns or "age" not in columns:
      raise ValueError(f"{csv_path}: the header must name the columns file_name and age (and "
                       f"optionally age_std); it names {columns}")
    reader.fieldnames = columns
    for record in reader:
      # A short row gives None for its missing cells: treated as empty.
      name = (record.get("file_name") or "").strip()
      where = f"{csv_path.name} line {reader.line_num}: {name}"
      if not name:
        skips.add("missing file name", where)
        continue
      name = os.path.normpath(name)
      path = next((d / name for d in image_dirs if (d / name).is_file()), None)
      if path is None:
        skips.add("missing file", where)
        continue
      if path.resolve() in seen:  # "a.jpg", "./a.jpg" and "images/a.jpg" can name one file
        skips.add("duplicate row", where)
        continue
      seen.add(path.resolve())
      age = parse_age(record.get("age") or "")
      if isinstance(age, str):
        skips.add(age, where)
        continue
      age_std = parse_age_std(record.get("age_std") or "")
      if isinstance(age_std, str):
        skips.add(age_std, where)
        continue
      rows.append(_Row(name, path, age, age_std, where))
  return rows


class AgejaxCsvFaces(tfds.core.GeneratorBasedBuilder):
  """Faces and ages listed in train / validation / test CSV files (the original project's format)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put in one folder: `train.csv` and `validation.csv` (optionally `test.csv`), each with a header
  naming the columns `file_name,age` (optionally `age_std`), and the images, either in an `images/`
  subfolder or beside the CSV files; `file_name` is the image's path relative to that place.
  Then pass the folder as `--manual_dir`.
  """
  BUILDER_CONFIGS = [
      CsvFacesConfig(name="default", description="Faces centre-cropped and resized to 224x224."),
      CsvFacesConfig(name="tiny", description="For tests: faces at 32x32.", image_size=32),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    features = builders.features(self.builder_config.image_size,
                                 file_name=tfds.features.Text(doc="file_name as listed in the CSV file"))
    return self.dataset_info_from_configs(features=features,
                                          metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    root = Path(os.fspath(dl_manager.manual_dir))
    for split in REQUIRED_SPLITS:
      if not (root / SPLIT_FILES[split]).is_file():
        raise FileNotFoundError(
            f"{SPLIT_FILES[split]} is missing from the manual folder {root}, which holds: "
            f"{_folder_listing(root)}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    image_dirs = [root / "images", root] if (root / "images").is_dir() else [root]
    generators, names = {}, {}
    for split, csv_name in SPLIT_FILES.items():
      if (root / csv_name).is_file():
        skips = faces.SkipCounter()
        rows = _read_rows(root / csv_name, image_dirs, skips)
        names[split] = {row.path.resolve() for row in rows}
        generators[split] = self._generate_examples(split, rows, skips)
    listed = collections.Counter(path for paths in names.values() for path in paths)
    shared = sorted(str(path) for path, n in listed.items() if n > 1)
    self.info.metadata["files_in_several_splits"] = len(shared)
    if shared:
      logging.warning("%s: %d image(s) are listed in several CSV files, e.g. %s: they leak between "
                      "splits", self.name, len(shared), shared[:3])
    return generators

  def _generate_examples(self, split: str, rows: list[_Row], skips: faces.SkipCounter):
    kept = 0
    for row in rows:
      image = faces.load_rgb(row.path, self.builder_config.image_size)
      if isinstance(image, str):
        skips.add(image, row.where)
        continue
      kept += 1
      yield row.file_name, {"image": image, "age": row.age, "age_std": row.age_std,
                            "file_name": row.file_name}
    skips.record(self.info.metadata, self.name, split)
    if not kept:
      raise ValueError(f"{SPLIT_FILES[split]} lists no usable image (skipped: {dict(skips.counts)})")
