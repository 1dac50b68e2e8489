"""Tests for the CSV-listed faces builder: row checks, image lookup, skip counts, clear errors."""

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from agejax.data import csv_faces, pipeline

SIZE = 32  # the `tiny` builder config


@pytest.mark.parametrize("text, expected", [
    ("23", 23), (" 23.0 ", 23), ("0", 0), ("1e1", 10), ("", "missing age"), ("  ", "missing age"),
    ("abc", "non-numeric age"), ("nan", "non-numeric age"), ("inf", "non-numeric age"),
    ("23.5", "non-integer age"), ("-4", "negative age"), ("-0.0", 0), ("3000000000", "age too large"),
])
def test_parse_age(text, expected):
  assert csv_faces.parse_age(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("", 0.0), ("2.5", 2.5), ("0", 0.0), ("-1", "bad age_std"), ("x", "bad age_std"), ("nan", "bad age_std"),
])
def test_parse_age_std(text, expected):
  assert csv_faces.parse_age_std(text) == expected


def _image(rng, shape=(48, 40)) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _write_manual_folder(root: Path) -> None:
  """Writes images (in images/ and one beside the CSVs) and train / validation CSV files."""
  rng = np.random.default_rng(0)
  (root / "images" / "sub").mkdir(parents=True)
  for i in range(12):
    (root / "images" / f"a{i}.jpg").write_bytes(_image(rng))
  (root / "images" / "sub" / "deep.jpg").write_bytes(_image(rng, (64, 64)))
  (root / "beside.jpg").write_bytes(_image(rng))
  truncated = _image(rng)
  (root / "images" / "broken.jpg").write_bytes(truncated[:len(truncated) // 2])
  (root / "images" / "text.jpg").write_text("not an image")
  train = [
      " file_name , age ,age_std",  # spaces around names, and a BOM below: spreadsheet habits
      "a0.jpg,23,2.5",
      "images/a1.jpg,23.0,",  # lookup falls back from images/ to the folder itself
      "./a2.jpg,40,1",
      "sub/deep.jpg,7,0",
      "beside.jpg,65,3.25",
      "a3.jpg,abc,1",
      "a4.jpg,,1",
      "a5.jpg,23.5,1",
      "a6.jpg,-4,1",
      "a7.jpg,30,-1",
      "a0.jpg,41,1",  # duplicate: the first row (23) decides
      "a2.jpg,41,1",  # a duplicate once normalised
      "nope.jpg,30,1",
      ",30,1",
      "broken.jpg,30,1",
      "text.jpg,30,1",
      "a8.jpg,12",  # a short row: age_std 0.0
      "images/a0.jpg,41,1",  # a duplicate: the same file by another path
  ]
  (root / "train.csv").write_text("\n".join(train) + "\n", encoding="utf-8-sig")
  validation = ["file_name,age", "a9.jpg,50", "a10.jpg,51", "a8.jpg,12", "a11.jpg,xyz"]
  (root / "validation.csv").write_text("\n".join(validation) + "\n")


TRAIN = {"a0.jpg": (23, 2.5), "images/a1.jpg": (23, 0.0), "a2.jpg": (40, 1.0), "sub/deep.jpg": (7, 0.0),
         "beside.jpg": (65, 3.25), "a8.jpg": (12, 0.0)}
VALIDATION = {"a9.jpg": (50, 0.0), "a10.jpg": (51, 0.0), "a8.jpg": (12, 0.0)}
TRAIN_SKIPS = {"non-numeric age": 1, "missing age": 1, "non-integer age": 1, "negative age": 1,
               "bad age_std": 1, "duplicate row": 3, "missing file": 1, "missing file name": 1,
               "corrupt image": 1, "not an image": 1}


def _prepare(manual_dir: Path, data_dir: Path):
  pipeline.prepare("csv_faces", str(data_dir), str(manual_dir), "tiny")
  return pipeline.get_builder("csv_faces", str(data_dir), "tiny")  # reads everything back from disk


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("csv_faces")
  _write_manual_folder(root / "manual")
  return _prepare(root / "manual", root / "tfds")


def test_rows_labels_and_images(built):
  assert set(built.info.splits) == {"train", "validation"}  # no test.csv, no test split
  for split, expected in (("train", TRAIN), ("validation", VALIDATION)):
    examples = list(tfds.as_numpy(built.as_dataset(split=split, shuffle_files=False)))
    got = {ex["file_name"].decode(): (int(ex["age"]), float(ex["age_std"])) for ex in examples}
    assert got == expected
    assert all(ex["image"].dtype == np.uint8 and ex["image"].shape == (SIZE, SIZE, 3) for ex in examples)


def test_skip_counts_reach_the_metadata(built):
  metadata = built.info.metadata
  assert metadata["skipped_by_split"] == {"train": TRAIN_SKIPS, "validation": {"non-numeric age": 1}}
  assert metadata["skipped"] == {**TRAIN_SKIPS, "non-numeric age": 2}
  assert metadata["skipped_examples"]["missing file"] == ["train.csv line 14: nope.jpg"]
  assert metadata["files_in_several_splits"] == 1  # a8.jpg


def test_missing_csv_or_columns_fail_clearly(tmp_path):
  manual = tmp_path / "manual"
  (manual / "images").mkdir(parents=True)
  (manual / "train.csv").write_text("file_name,age\na.jpg,3\n")
  with pytest.raises(FileNotFoundError, match=r"validation\.csv is missing .* holds: images/, train\.csv"):
    _prepare(manual, tmp_path / "tfds")
  (manual / "validation.csv").write_text("path,label\na.jpg,3\n")
  with pytest.raises(ValueError, match=r"validation\.csv: the header must name .* \['path', 'label'\]"):
    _prepare(manual, tmp_path / "tfds")
