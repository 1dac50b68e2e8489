"""Faces listed in CSV files as a TFDS dataset (`agejax_csv_faces`), from a manual folder.

The folder holds `train.csv`, `validation.csv` and optionally `test.csv`, one split each, UTF-8
text with a header naming at least `file_name,age`; an `age_std` column, when present, is the
per-image label spread (an empty cell or no column means 0.0, unknown). Two optional columns
group the faces for per-group reports: `gender` (male, female, m, f, 0 male or 1 female, any
case; an empty cell is unknown, any other value fails naming the file and line) and `group` (a
free-form label, e.g. an ethnicity or a camera; an empty cell, or "unknown", is unknown).
Image lookup: each `file_name` is looked up in the folder's `images/` subfolder when there is
one, then in the folder itself, so both `a.jpg` and `images/a.jpg` work; absolute paths are used
as they are.

Several CSV datasets live side by side as builder configs named by the user: `--name appa` (any
lowercase name of letters, digits, `_` and `-`) prepares `agejax_csv_faces/appa` at 224x224, which
training reads with `--config.data.builder_config=appa`; `default` (224x224) and `tiny` (32x32,
for tests) are predefined. The prepared dataset records a fingerprint of its source (the CSV
files' bytes and each listed image's name, size and modification time; `metadata["source"]`).

A file that is not CSV as written (not UTF-8, a quote left open, a quoted cell spanning lines or
longer than 128 KB) fails in one line naming the file and line. Rows are skipped and counted by
reason (`builder.info.metadata["skipped"]`): missing file name, missing file, file name too long
(beyond the file system's limit), unreadable file, missing age, non-numeric age ("abc", "nan",
"1_000", non-ASCII digits: only plain decimal numbers are ages), non-integer age ("23.5" is
rejected, not rounded: an integer age is stored, and rounding could hide a wrong column; "23" and
"23.0" are 23), negative age, age too large (beyond int32), bad age_std (not a plain decimal number
in 0..float32 max), duplicate row (a file_name listed again in the same CSV: the first row
decides), and the image problems of `faces.load_rgb`. Every age >= 0 is kept: the trainer's label
range decides, so the dataset never depends on a training config.
A file listed in several CSVs is kept in each but logged as a warning and counted in
`metadata["files_in_several_splits"]`: it leaks between splits.

Groups: `gender` is stored as a class label (male, female, unknown) and `group` as the text of its
cell. The groupings a dataset has (a column in at least one of its CSV files) are recorded with
their names in `metadata["groups"]`: gender's are male, female, unknown; group's are the distinct
non-empty labels of the examples kept in all splits, sorted, then "unknown" (`group_names()`).
"""

import codecs
import collections
import csv
import dataclasses
import errno
import functools
import hashlib
import io
import math
import os
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from agejax import errors
from agejax.data import builders, faces, sources

SPLIT_FILES = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"}
REQUIRED_SPLITS = ("train", "validation")
CONFIG_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Plain decimal numbers only: float() also reads "1_000", "nan", "inf" and non-ASCII digits.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
GENDERS = ("male", "female", builders.UNKNOWN)
_GENDER_CELLS = {"male": "male", "m": "male", "0": "male", "female": "female", "f": "female", "1": "female"}
GROUP_COLUMNS = ("gender", "group")  # the optional grouping columns


def parse_gender(text: str) -> str | None:
  """Returns the gender written in a cell ("unknown" when empty), or None for a value it can't be."""
  text = text.strip().lower()
  if not text or text == builders.UNKNOWN:
    return builders.UNKNOWN
  return _GENDER_CELLS.get(text)


def group_names(labels) -> tuple[str, ...]:
  """Returns the names of a free-form grouping: its distinct non-empty labels, sorted, then "unknown"."""
  return (*sorted(set(labels) - {"", builders.UNKNOWN}), builders.UNKNOWN)


def parse_age(text: str) -> int | str:
  """Returns the integer age written in `text` ("23" or "23.0"), or a skip reason."""
  text = text.strip()
  if not text:
    return "missing age"
  if not _NUMBER.fullmatch(text):
    return "non-numeric age"
  value = float(text)
  if not math.isfinite(value):  # "1e400"
    return "age too large"
  if not value.is_integer():
    return "non-integer age"
  return faces.age_skip_reason(int(value)) or int(value)


def parse_age_std(text: str) -> float | str:
  """Returns the label spread written in `text` (0.0 when empty), or a skip reason."""
  text = text.strip()
  if not text:
    return 0.0
  if not _NUMBER.fullmatch(text):
    return "bad age_std"
  value = float(text)
  # Stored as float32: a larger value would become inf.
  return value + 0.0 if 0 <= value <= _FLOAT32_MAX else "bad age_std"  # + 0.0: "-0" is 0.0


@dataclasses.dataclass
class CsvFacesConfig(tfds.core.BuilderConfig):
  """Image size of the prepared CSV-listed dataset."""

  image_size: int = 224


@functools.cache  # one object per name: TFDS checks a passed config is the one it looks up
def named_config(name: str) -> CsvFacesConfig | None:
  """Returns the config of a CSV dataset named by the user (faces at 224x224), or None for an invalid name."""
  if not CONFIG_NAME.fullmatch(name):
    return None
  return CsvFacesConfig(name=name, description=f"CSV-listed faces named {name!r}, at 224x224.")


@dataclasses.dataclass(frozen=True)
class _Row:
  """One accepted CSV row: the normalised file_name, the image path, the labels, where it was listed."""

  file_name: str
  path: Path
  age: int
  age_std: float
  where: str
  gender: str = builders.UNKNOWN
  group: str = ""  # the group column's label; empty when unknown


def _folder_listing(root: Path, limit: int = 20) -> str:
  """Returns the first entries of a folder, for error messages."""
  names = sorted(sources.display(p.name) + ("/" if p.is_dir() else "") for p in root.iterdir())
  more = f", ... ({len(names)} entries)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more if names else "nothing"


def _decode(csv_path: Path, data: bytes) -> str:
  """Returns a CSV file's text; bytes that are not UTF-8 fail naming the file and line."""
  if data.startswith(codecs.BOM_UTF8):  # spreadsheets write one
    data = data[len(codecs.BOM_UTF8) :]
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise errors.UserError(
      f"{csv_path} line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text; save the file as "
      f"UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"
    ) from None


def _csv_error(csv_path: Path, line: int, error: csv.Error) -> str:
  """The one-line message of a CSV syntax error in the row starting at `line`."""
  if "unexpected end of data" in str(error):
    return f"{csv_path} line {line}: a quote opened in this row is never closed"
  if "field larger than field limit" in str(error):
    return (
      f"{csv_path} line {line}: a cell longer than {csv.field_size_limit() // 1024} KB starts in this row "
      f"(a quote left open?)"
    )
  return f"{csv_path} line {line}: not valid CSV ({error})"


def _find(name: str, image_dirs: list[Path]) -> Path | str:
  """Returns the image a file_name names, or a skip reason."""
  for folder in image_dirs:
    try:
      if (folder / name).is_file():
        return folder / name
    except OSError as e:  # is_file() only swallows "not found"-like errors
      return "file name too long" if e.errno == errno.ENAMETOOLONG else "unreadable file"
  return "missing file"


def _read_rows(
  csv_path: Path, image_dirs: list[Path], skips: faces.SkipCounter
) -> tuple[list[_Row], str, tuple[str, ...]]:
  """Returns one CSV file's valid rows, its bytes' SHA-256 and its grouping columns; counts other rows in `skips`.

  A gender cell that names no gender fails the file (in one line), whatever else is wrong with its row.
  """
  data = csv_path.read_bytes()
  # strict: a quote left open at the end of the file is an error, not a cell running to the end.
  reader = csv.reader(io.StringIO(_decode(csv_path, data), newline=""), strict=True)
  rows, seen, columns = [], set(), None
  while True:
    line = reader.line_num + 1  # where the next row starts (blank lines aside)
    try:
      record = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      raise errors.UserError(_csv_error(csv_path, line, e)) from None
    if any("\n" in cell or "\r" in cell for cell in record):  # only a quote makes a cell span lines
      first = reader.line_num - sum(cell.count("\n") or cell.count("\r") for cell in record)
      raise errors.UserError(
        f"{csv_path} line {first}: a quoted cell runs on to line {reader.line_num} (a quote left "
        f"open?); file names and ages fit on one line"
      )
    if not record:  # a blank line
      continue
    if columns is None:
      columns = [c.strip() for c in record]
      if "file_name" not in columns or "age" not in columns:
        raise errors.UserError(
          f"{csv_path}: the header must name the columns file_name and age (and optionally age_std, gender, "
          f"group); it names {columns}"
        )
      continue
    cells = dict(zip(columns, record))  # a short row's missing cells are empty
    name = (cells.get("file_name") or "").strip()
    where = f"{csv_path.name} line {reader.line_num}: {name}"
    gender = parse_gender(cells.get("gender") or "")
    if gender is None:
      raise errors.UserError(
        f"{csv_path} line {reader.line_num}: gender {cells['gender'].strip()!r} is not male, female, m, f, 0 "
        f"(male) or 1 (female); leave the cell empty when unknown"
      )
    if not name:
      skips.add("missing file name", where)
      continue
    name = os.path.normpath(name)
    path = _find(name, image_dirs)
    if isinstance(path, str):
      skips.add(path, where)
      continue
    if path.resolve() in seen:  # "a.jpg", "./a.jpg" and "images/a.jpg" can name one file
      skips.add("duplicate row", where)
      continue
    seen.add(path.resolve())
    age = parse_age(cells.get("age") or "")
    if isinstance(age, str):
      skips.add(age, where)
      continue
    age_std = parse_age_std(cells.get("age_std") or "")
    if isinstance(age_std, str):
      skips.add(age_std, where)
      continue
    group = (cells.get("group") or "").strip()
    rows.append(_Row(name, path, age, age_std, where, gender, "" if group == builders.UNKNOWN else group))
  if columns is None:
    raise errors.UserError(f"{csv_path} is empty: it needs a header naming file_name and age, then a row per image")
  return rows, hashlib.sha256(data).hexdigest(), tuple(c for c in GROUP_COLUMNS if c in columns)


@dataclasses.dataclass
class _Listing:
  """A manual folder as read: each split's valid rows and skips, and the source's fingerprint."""

  rows: dict[str, list[_Row]]
  skips: dict[str, faces.SkipCounter]
  source: dict
  groupings: tuple[str, ...]  # the grouping columns present in some CSV file


def _read_folder(root: Path) -> _Listing:
  """Reads every CSV file of a manual folder (no image is decoded)."""
  if root.is_file():
    raise errors.UserError(
      f"{sources.display(root)} is a file: csv_faces needs the folder holding train.csv and validation.csv"
    )
  for split in REQUIRED_SPLITS:
    if not (root / SPLIT_FILES[split]).is_file():
      raise errors.MissingInput(
        f"{SPLIT_FILES[split]} is missing from the manual folder {root}, which holds: {_folder_listing(root)}; "
        f"it needs train.csv and validation.csv (optionally test.csv) with a header "
        f"file_name,age[,age_std,gender,group]"
      )
  image_dirs = [root / "images", root] if (root / "images").is_dir() else [root]
  rows: dict[str, list[_Row]] = {}
  skips: dict[str, faces.SkipCounter] = {}
  parts: dict[str, str] = {}
  columns: set[str] = set()
  for split, csv_name in SPLIT_FILES.items():
    if (root / csv_name).is_file():
      skips[split] = faces.SkipCounter()
      rows[split], parts[csv_name], split_columns = _read_rows(root / csv_name, image_dirs, skips[split])
      columns.update(split_columns)
  parts["images"], num_images = sources.files_digest(
    {(row.file_name, row.path) for split_rows in rows.values() for row in split_rows}
  )
  return _Listing(
    rows, skips, sources.fingerprint(root, parts, num_images), tuple(c for c in GROUP_COLUMNS if c in columns)
  )


class AgejaxCsvFaces(builders.ManualSourceBuilder):
  """Faces and ages listed in train / validation / test CSV files (the original project's format)."""

  VERSION = tfds.core.Version("3.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "2.0.0": "Records the source's fingerprint (metadata['source']); configs named by the user; ages such "
    "as '1_000', age_std beyond float32 and CSV files that are not UTF-8 or leave a quote open are "
    "refused; 32-bit grayscale images scaled by their value range instead of clipped.",
    "3.0.0": "Optional gender and group columns, stored as the gender and group features; the groupings "
    "present and their names in metadata['groups'].",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put in one folder: `train.csv` and `validation.csv` (optionally `test.csv`), UTF-8, each with a
  header naming the columns `file_name,age` (optionally `age_std`, and `gender` and `group` to
  report errors by group), and the images, either in an `images/` subfolder or beside the CSV
  files; `file_name` is the image's path relative to that place. Then pass the folder as
  `--manual_dir`, and a name for the dataset as `--name`.
  """
  BUILDER_CONFIGS = [
    CsvFacesConfig(name="default", description="Faces centre-cropped and resized to 224x224."),
    CsvFacesConfig(name="tiny", description="For tests: faces at 32x32.", image_size=32),
  ]

  @classmethod
  def get_builder_config(cls, name: str, version: str | tfds.core.Version | None = None) -> CsvFacesConfig | None:
    """Returns a predefined config, or the config of a dataset named by the user (`named_config`)."""
    return super().get_builder_config(name, version) or named_config(name)

  def _info(self) -> tfds.core.DatasetInfo:
    features = builders.features(
      self.builder_config.image_size,
      file_name=tfds.features.Text(doc="file_name as listed in the CSV file"),
      gender=builders.class_label(GENDERS, "the gender column; unknown when empty or absent"),
      group=tfds.features.Text(doc="the group column's label; empty when unknown or absent"),
    )
    return self.dataset_info_from_configs(features=features, metadata=tfds.core.MetadataDict())

  def group_names(self) -> dict[str, tuple[str, ...]]:
    """The groupings of the prepared dataset (those its CSV files have columns for) and their names."""
    return {name: tuple(names) for name, names in (self.info.metadata or {}).get("groups", {}).items()}

  def _describe_source(self, path: Path) -> dict:
    return _read_folder(path).source

  def _split_generators(self, dl_manager):
    listing = _read_folder(self._manual_root(dl_manager))
    self._record_source(listing.source)
    # The group column's names grow as each split's examples are kept (_generate_examples).
    self.info.metadata["groups"] = {
      name: list(GENDERS if name == "gender" else group_names([])) for name in listing.groupings
    }
    names = {split: {row.path.resolve() for row in rows} for split, rows in listing.rows.items()}
    listed = collections.Counter(path for paths in names.values() for path in paths)
    shared = sorted(str(path) for path, n in listed.items() if n > 1)
    self.info.metadata["files_in_several_splits"] = len(shared)
    if shared:
      logging.warning(
        "%s: %d image(s) are listed in several CSV files, e.g. %s: they leak between splits",
        self.name,
        len(shared),
        shared[:3],
      )
    return {split: self._generate_examples(split, rows, listing.skips[split]) for split, rows in listing.rows.items()}

  def _generate_examples(self, split: str, rows: list[_Row], skips: faces.SkipCounter):
    kept, labels = 0, set()
    for row in rows:
      image = faces.load_rgb(row.path, self.builder_config.image_size)
      if isinstance(image, str):
        skips.add(image, row.where)
        continue
      kept += 1
      labels.add(row.group)
      yield (
        row.file_name,
        {
          "image": image,
          "age": row.age,
          "age_std": row.age_std,
          "file_name": row.file_name,
          "gender": row.gender,
          "group": row.group,
        },
      )
    skips.record(self.info.metadata, self.name, split)
    groups = self.info.metadata["groups"]
    if "group" in groups:
      groups["group"] = list(group_names([*groups["group"], *labels]))
    if not kept:
      raise errors.UserError(f"{SPLIT_FILES[split]} lists no usable image (skipped: {dict(skips.counts)})")
