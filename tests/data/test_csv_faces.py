"""Tests for the CSV-listed faces builder: row checks, image lookup, skip counts, clear errors."""

import io
import re
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import data_settings
from PIL import Image

from agejax.data import csv_faces, datasets, pipeline

SIZE = 32  # the `tiny` builder config


@pytest.mark.parametrize(
  "text, expected",
  [
    ("23", 23),
    (" 23.0 ", 23),
    ("0", 0),
    ("1e1", 10),
    ("", "missing age"),
    ("  ", "missing age"),
    ("abc", "non-numeric age"),
    ("nan", "non-numeric age"),
    ("inf", "non-numeric age"),
    ("23.5", "non-integer age"),
    ("-4", "negative age"),
    ("-0.0", 0),
    ("3000000000", "age too large"),
    ("+7", 7),
    ("7.", 7),
    ("1e400", "age too large"),
    # float() reads all of these; a CSV age is a plain decimal number.
    ("1_000", "non-numeric age"),
    ("\u0662\u0663", "non-numeric age"),
    ("\uff12\uff13", "non-numeric age"),
    ("Infinity", "non-numeric age"),
    ("0x1A", "non-numeric age"),
  ],
)
def test_parse_age(text, expected):
  assert csv_faces.parse_age(text) == expected


@pytest.mark.parametrize(
  "text, expected",
  [
    ("", 0.0),
    ("2.5", 2.5),
    ("0", 0.0),
    ("-1", "bad age_std"),
    ("x", "bad age_std"),
    ("nan", "bad age_std"),
    ("inf", "bad age_std"),
    ("1_0", "bad age_std"),
    ("3.4e38", 3.4e38),
    ("-0", 0.0),
    ("1e39", "bad age_std"),
    ("3.5e38", "bad age_std"),  # beyond float32: would be stored as inf
  ],
)
def test_parse_age_std(text, expected):
  value = csv_faces.parse_age_std(text)
  assert value == expected
  if not isinstance(value, str):
    assert np.isfinite(np.float32(value)) and str(value) != "-0.0"


def _image(rng, shape=(48, 40)) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _write_manual_folder(root: Path) -> None:
  """Writes images (in images/ and one beside the CSVs) and train / validation CSV files."""
  rng = np.random.default_rng(0)
  (root / "images" / "sub").mkdir(parents=True)
  for i in range(15):
    (root / "images" / f"a{i}.jpg").write_bytes(_image(rng))
  (root / "images" / "sub" / "deep.jpg").write_bytes(_image(rng, (64, 64)))
  (root / "beside.jpg").write_bytes(_image(rng))
  truncated = _image(rng)
  (root / "images" / "broken.jpg").write_bytes(truncated[: len(truncated) // 2])
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
    "a12.jpg,1_000,1",  # int() and float() read "1_000" as 1000
    "a13.jpg,30,1e39",  # beyond float32
    "a14.jpg,\u0663\u0660,1",  # Arabic-Indic digits, which float() reads as 30
    "x" * 300 + ".jpg,30,1",  # beyond the file system's 255-byte name limit: OSError, once
  ]
  (root / "train.csv").write_text("\n".join(train) + "\n", encoding="utf-8-sig")
  validation = ["file_name,age", "a9.jpg,50", "a10.jpg,51", "a8.jpg,12", "a11.jpg,xyz"]
  (root / "validation.csv").write_text("\n".join(validation) + "\n")


TRAIN = {
  "a0.jpg": (23, 2.5),
  "images/a1.jpg": (23, 0.0),
  "a2.jpg": (40, 1.0),
  "sub/deep.jpg": (7, 0.0),
  "beside.jpg": (65, 3.25),
  "a8.jpg": (12, 0.0),
}
VALIDATION = {"a9.jpg": (50, 0.0), "a10.jpg": (51, 0.0), "a8.jpg": (12, 0.0)}
TRAIN_SKIPS = {
  "non-numeric age": 3,
  "missing age": 1,
  "non-integer age": 1,
  "negative age": 1,
  "bad age_std": 2,
  "duplicate row": 3,
  "missing file": 1,
  "missing file name": 1,
  "corrupt image": 1,
  "not an image": 1,
  "file name too long": 1,
}


def _prepare(manual_dir: Path, data_dir: Path):
  datasets.prepare("csv_faces", str(data_dir), str(manual_dir), "tiny")
  return datasets.get_builder("csv_faces", str(data_dir), "tiny")  # reads everything back from disk


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("csv_faces")
  _write_manual_folder(root / "manual")
  return _prepare(root / "manual", root / "tfds")


@pytest.mark.slow
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
  assert metadata["skipped"] == {**TRAIN_SKIPS, "non-numeric age": 4}
  assert metadata["skipped_examples"]["missing file"] == ["train.csv line 14: nope.jpg"]
  assert metadata["files_in_several_splits"] == 1  # a8.jpg


def _nothing_written(data_dir: Path) -> bool:
  """True when a failed preparation left no file at all in its data_dir."""
  return not any(path.is_file() for path in data_dir.rglob("*"))


def test_missing_csv_or_columns_fail_clearly(tmp_path):
  manual = tmp_path / "manual"
  (manual / "images").mkdir(parents=True)
  (manual / "train.csv").write_text("file_name,age\na.jpg,3\n")
  with pytest.raises(
    FileNotFoundError,
    match=r"^validation\.csv is missing .* holds: images/, train\.csv; it "
    r"needs train\.csv and validation\.csv .*[^\n]$",
  ):
    _prepare(manual, tmp_path / "tfds")
  (manual / "validation.csv").write_text("path,label\na.jpg,3\n")
  with pytest.raises(ValueError, match=r"validation\.csv: the header must name .* \['path', 'label'\]$"):
    _prepare(manual, tmp_path / "tfds")
  (manual / "validation.csv").write_text("")
  with pytest.raises(ValueError, match=r"validation\.csv is empty: it needs a header"):
    _prepare(manual, tmp_path / "tfds")
  with pytest.raises(ValueError, match=r"train\.csv is a file: csv_faces needs the folder holding train\.csv"):
    _prepare(manual / "train.csv", tmp_path / "tfds")
  with pytest.raises(
    FileNotFoundError,
    match=r"^the manual folder \S*/absent does not exist; pass --manual_dir "
    r"FOLDER holding the downloaded files \(docs/guides/datasets.md\)$",
  ):
    _prepare(tmp_path / "absent", tmp_path / "tfds")
  assert _nothing_written(tmp_path / "tfds")


ROWS = [f"a{i}.jpg,{20 + i}" for i in range(6)]
TAIL = "x.jpg,30\n" * 20_000  # 180 KB of rows: past csv's 128 KB cell limit when swallowed by a quote


@pytest.mark.parametrize(
  "train, message",
  [
    # An unclosed quote used to swallow the rows after it into one "missing file" (or, past 128 KB, a
    # _csv.Error traceback); a Latin-1 file failed naming neither the file nor the line.
    (
      "\n".join(["file_name,age", *ROWS[:3], '"a3.jpg,23', *ROWS[4:]]) + "\n",
      r"train\.csv line 5: a quote opened in this row is never closed",
    ),
    (
      "\n".join(["file_name,age", *ROWS[:3], '"a3.jpg,23']) + "\n" + TAIL,
      r"train\.csv line 5: a cell longer than 128 KB starts in this row \(a quote left open\?\)",
    ),
    (
      "\n".join(["file_name,age", *ROWS[:3], '"a3.jpg,23', ROWS[4], 'a5.jpg","24"']) + "\n",
      r"train\.csv line 5: a quoted cell runs on to line 7 \(a quote left open\?\); file names and ages fit "
      r"on one line",
    ),
    (
      "\n".join(["file_name,age", *ROWS[:2], '"a2"x.jpg,22', *ROWS[3:]]) + "\n",
      r"train\.csv line 4: not valid CSV \(',' expected after '\"'\)",
    ),
    (
      "\n".join(["file_name,age", *ROWS[:4], "Jos\xe9.jpg,24"]).encode("latin-1"),
      r"train\.csv line 6: byte 0xe9 is not UTF-8 text; save the file as UTF-8 \(from Latin-1: iconv -f latin1 "
      r"-t utf-8\)",
    ),
  ],
  ids=["unclosed quote", "unclosed quote past 128 KB", "quote closed lines later", "text after a quote", "Latin-1"],
)
def test_csv_syntax_errors_name_the_file_and_line(tmp_path, train, message):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    (manual / f"a{i}.jpg").write_bytes(_image(rng))
  (manual / "validation.csv").write_text("file_name,age\na0.jpg,20\n")
  train_csv = manual / "train.csv"
  train_csv.write_bytes(train if isinstance(train, bytes) else train.encode())
  before = train_csv.read_bytes()
  with pytest.raises(ValueError) as error:
    _prepare(manual, tmp_path / "tfds")
  assert re.fullmatch(re.escape(str(train_csv)) + " " + message.removeprefix(r"train\.csv "), str(error.value))
  assert train_csv.read_bytes() == before and _nothing_written(tmp_path / "tfds")


# --- gender and group columns ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "text, expected",
  [
    ("male", "male"),
    ("Female", "female"),
    (" M ", "male"),
    ("f", "female"),
    ("0", "male"),
    ("1", "female"),
    ("", "unknown"),
    ("  ", "unknown"),
    ("Unknown", "unknown"),
    ("x", None),
    ("2", None),
    ("mf", None),
    ("woman", None),
  ],
)
def test_parse_gender(text, expected):
  assert csv_faces.parse_gender(text) == expected


def test_a_dataset_without_group_columns_has_no_groupings(built, tmp_path):
  assert built.info.metadata["groups"] == {} and built.group_names() == {}
  cfg = {"name": "csv_faces", "data_dir": built.data_dir_root, "builder_config": "tiny", "cache_dir": str(tmp_path)}
  data = pipeline.load_split(data_settings(ml_collections.ConfigDict(cfg)), "train")
  assert len(data) == len(TRAIN) and data.groups == {} and data.group_names == {}


def test_gender_and_group_columns_become_groupings(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(0)
  for i in range(9):
    (manual / f"a{i}.jpg").write_bytes(_image(rng))
  (manual / "broken.jpg").write_bytes(b"not an image")
  train = [
    "file_name,age,gender,group",
    "a0.jpg,20,M,north",
    "a1.jpg,21,female,",  # an empty group cell: unknown
    "a2.jpg,22,,south",  # an empty gender cell: unknown
    "a3.jpg,23,1,unknown",  # "unknown" is unknown, not a group of its own
    "a4.jpg,24, F , north ",  # cells are stripped
    "broken.jpg,25,m,ghost",  # skipped: its label names no group
    "a5.jpg,26,0",  # a short row: group unknown
  ]
  (manual / "train.csv").write_text("\n".join(train) + "\n")
  (manual / "validation.csv").write_text("file_name,age,group\na6.jpg,30,Zone 9\na7.jpg,31,south\n")
  (manual / "test.csv").write_text("file_name,age\na8.jpg,40\n")  # no group column: all unknown
  builder = _prepare(manual, tmp_path / "tfds")

  groups = {"gender": ("male", "female", "unknown"), "group": ("Zone 9", "north", "south", "unknown")}
  assert builder.info.metadata["groups"] == {name: list(names) for name, names in groups.items()}
  assert builder.group_names() == groups
  expected = {
    "train": {
      "a0.jpg": ("male", "north"),
      "a1.jpg": ("female", "unknown"),
      "a2.jpg": ("unknown", "south"),
      "a3.jpg": ("female", "unknown"),
      "a4.jpg": ("female", "north"),
      "a5.jpg": ("male", "unknown"),
    },
    "validation": {"a6.jpg": ("unknown", "Zone 9"), "a7.jpg": ("unknown", "south")},
    "test": {"a8.jpg": ("unknown", "unknown")},
  }
  cfg = {"name": "csv_faces", "data_dir": str(tmp_path / "tfds"), "builder_config": "tiny", "cache_dir": str(tmp_path)}
  for split, by_file in expected.items():
    records = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    files = [ex["file_name"].decode() for ex in records]  # the array cache's order
    assert sorted(files) == sorted(by_file)
    if split == "train":  # stored as a class label, and the cell's text
      stored = {ex["file_name"].decode(): (ex["gender"], ex["group"].decode()) for ex in records}
      assert stored["a0.jpg"] == (0, "north") and stored["a3.jpg"] == (1, "")
    data = pipeline.load_split(data_settings(ml_collections.ConfigDict(cfg)), split)
    assert data.group_names == groups
    for grouping, names in groups.items():
      codes = data.groups[grouping]
      assert codes.dtype == np.int32 and len(codes) == len(data)
      assert [names[c] for c in codes] == [by_file[f][list(groups).index(grouping)] for f in files], (split, grouping)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["x", "2", "woman"])
def test_a_bad_gender_fails_naming_the_file_line_and_value(tmp_path, cell):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    (manual / f"a{i}.jpg").write_bytes(_image(rng))
  (manual / "train.csv").write_text(f"file_name,age,gender\na0.jpg,20,m\na1.jpg,21,{cell}\n")
  (manual / "validation.csv").write_text("file_name,age,gender\na2.jpg,30,f\n")
  with pytest.raises(ValueError) as error:
    _prepare(manual, tmp_path / "tfds")
  assert str(error.value) == (
    f"{manual / 'train.csv'} line 3: gender {cell!r} is not male, female, m, f, 0 (male) or 1 (female); leave "
    f"the cell empty when unknown"
  )
  assert _nothing_written(tmp_path / "tfds")
