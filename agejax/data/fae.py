"""The unified age-estimation benchmark's databases as a TFDS dataset (`agejax_fae`), one split per folder.

Paplham & Franc (CVPR 2024; github paplhjak/Facial-Age-Estimation-Benchmark and its -Databases
repository) describe each database as a JSON list with one entry per face. Every entry has
`img_path` (relative to the images folder), `age` (completed years; -1 unknown) and `folder` (a
subject-exclusive fold); most have `database`. Depending on the database: AgeDB `name` (the
person), `number` and `gender`; AFAD, CACD2000, FG-NET and MORPH `id_num` (the person; CACD2000 has
`name` too); CLAP2016 `std_age` (the per-image spread of its votes); `gender` is `M`, `F` or `U`
(unknown). The `*_aligned.json` files add `aligned_bbox`: the four corners A, B, C, D (x, y, one-based
source pixels, possibly outside the image) of the aligned face box, or [] where no face was found.

Crop (their prepare_data.py and lib/utils.py `crop_image`): the box is extended by `margin` of its
size on each side, margin = input_extension + bbox_extension + 2 * input_extension * bbox_extension
(their configs: 0.05 and 0), and A, B, C of the extended box are mapped by an affine transform onto
the corners of a `image_size` square (their 256 input plus 2 x 5%: 281 pixels), sampled bilinearly
with black outside the image: cv2.warpAffine's defaults, reproduced bit for bit (`warp`).
`aligned_bbox` is used when present, else `bbox`. An entry without a box is skipped ("no face box",
as their prepare_data.py does) when the database has boxes; a database with none (e.g. AgeDB.json)
is read as whole images, centre-cropped to a square like the other agejax datasets.

Splits: `folder0`, `folder1`, ... one per folder present (FG-NET has one per person, 1-82);
`config.data.split` forms train / validation / test from them (data/splits.py). Features: the shared
image, `age`, `age_std` (from `std_age`, 0 when absent), and `folder`, `img_path`, `subject` (`id_num`,
else `name`; empty when the database has neither) and `gender` (a class label: male, female, unknown;
a grouping of the report when the database has genders).

Integrity: a malformed JSON fails in one line naming the entry's index and field; so does a subject
found in two folders (naming the subject, both folders and an img_path from each), since the folders
are subject-exclusive, except among the folders `--shared_subjects` names: IMDB-CLEAN-FP-AGE puts
people in both its training and validation folders (0 and 1) on purpose, only its test folder 2
exclusive (their facebase/to_json/imdb_fp_age_to_json.py); such a database is prepared as given,
with one line saying so (`shared_subjects_line`) and the folders recorded (`metadata["shared_subjects"]`).
Entries with an unknown (-1) or negative age or no folder (-1), images that are missing or
undecodable, are skipped and counted (`metadata["skipped"]`). The prepared dataset records its
source's fingerprint (the JSON's bytes, each listed image's name, size and modification time, and
--shared_subjects when given), its folders with their example counts, and whether it has subjects.

Datasets are named by the user (`prepare_data.py fae --database AgeDB_aligned.json --images DIR
--name agedb`); training reads one with `--config.data.name=fae --config.data.builder_config=agedb`.
"""

import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import typing
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from agejax import errors
from agejax.data import builders, faces, sources, splits

BUILDER_NAME = "agejax_fae"
INPUT_EXTENSION = 0.05  # facebase/configs/*_256x256.yaml preprocess.input_extension
BBOX_EXTENSION = 0.0  # ... preprocess.bbox_extension
BENCHMARK_INPUT = 256  # ... model.input_size
DEFAULT_IMAGE_SIZE = int(BENCHMARK_INPUT * (1 + 2 * INPUT_EXTENSION))  # 281: their stored crop
MARGIN = INPUT_EXTENSION + BBOX_EXTENSION + 2 * INPUT_EXTENSION * BBOX_EXTENSION  # their normalize_img
CONFIG_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
GENDERS = ("male", "female", builders.UNKNOWN)
_GENDER_CODES = {"m": "male", "f": "female", "u": builders.UNKNOWN}
BOX_FIELDS = ("aligned_bbox", "bbox")  # in order of preference


def config_name(database: str | os.PathLike) -> str:
  """The default dataset name of a database JSON: its stem, lowercased, other characters as '_' ("agedb_aligned")."""
  name = re.sub(r"[^a-z0-9_-]+", "_", Path(database).stem.lower()).strip("_-")[:64]
  return name if CONFIG_NAME.fullmatch(name) else "fae"


@dataclasses.dataclass
class FaeConfig(tfds.core.BuilderConfig):
  """Stored size of the crops of a database named by the user."""

  image_size: int = DEFAULT_IMAGE_SIZE


@functools.cache  # one object per (name, size): TFDS compares a passed config with the one it looks up
def named_config(name: str, image_size: int = DEFAULT_IMAGE_SIZE) -> FaeConfig | None:
  """The config of a database named by the user, its crops image_size x image_size; None for an invalid name."""
  if not CONFIG_NAME.fullmatch(name) or not 8 <= image_size <= 4096:
    return None
  return FaeConfig(
    name=name, description=f"benchmark database {name!r}, crops at {image_size}x{image_size}.", image_size=image_size
  )


def prepared_image_size(data_dir: str, name: str) -> int | None:
  """The crop size a prepared database was stored at (its metadata), or None when it is not prepared."""
  root = epath.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
  metadata = root / BUILDER_NAME / name / str(AgejaxFae.VERSION) / "metadata.json"
  try:
    return int(json.loads(metadata.read_text())["image_size"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def prepared_names(data_dir: str) -> list[str]:
  """The databases prepared in a data_dir, for messages."""
  root = epath.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser() / BUILDER_NAME
  try:
    return sorted(p.name for p in root.iterdir() if (p / str(AgejaxFae.VERSION) / "dataset_info.json").exists())
  except OSError:
    return []


# ---------------------------------------------------------------------------------------------------------------
# The crop


def extended_corners(box, margin: float = MARGIN) -> np.ndarray:
  """A, B, C of a one-based 8-number box extended by `margin` of its sides, zero-based, as float32 [3, 2].

  Computed in float32 as lib/utils.py `crop_image` does, so the crops match the benchmark's.
  """
  a, b, c, d = (np.float32(box[i : i + 2]) - np.float32(1) for i in range(0, 8, 2))
  m = np.float32(margin)
  return np.stack([a + (a - b) * m + (a - d) * m, b + (b - a) * m + (b - c) * m, c + (c - d) * m + (c - b) * m])


def affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 2x3 matrix mapping three points `src` onto `dst`: cv2.getAffineTransform, to the last bit.

  Its 6x6 system solved by OpenCV's own LU (partial pivoting, rows eliminated in place, back
  substitution by division): numpy's LAPACK solve differs in the last bits, enough to move a few
  source points across a 1/32-pixel step of `warp`.
  """
  a = np.zeros((6, 6))
  a[0::2, 0:2], a[0::2, 2], a[1::2, 3:5], a[1::2, 5] = src, 1, src, 1
  b = np.asarray(dst, np.float64).reshape(6).copy()
  for i in range(6):
    k = i + int(np.argmax(np.abs(a[i:, i])))  # the first largest, as OpenCV's strict '>' picks
    if a[k, i] == 0:
      raise ValueError(f"the face box's corners {src.tolist()} lie on one line")
    if k != i:
      a[[i, k], i:], b[[i, k]] = a[[k, i], i:], b[[k, i]]
    d = -1 / a[i, i]
    for j in range(i + 1, 6):
      alpha = a[j, i] * d
      for c in range(i + 1, 6):
        a[j, c] += alpha * a[i, c]
      b[j] += alpha * b[i]
  for i in range(5, -1, -1):
    s = b[i]
    for k in range(i + 1, 6):
      s -= a[i, k] * b[k]
    b[i] = s / a[i, i]
  return b.reshape(2, 3)


def warp(image: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
  """Samples the parallelogram A, B, C (`corners`, zero-based x, y) of an HxWxC uint8 image onto size x size.

  cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT) of OpenCV 4.7 (the benchmark's pin) in its integer
  steps: the inverse map in 1/1024 pixel, source points rounded to 1/32 pixel, weights in 1/32768,
  black for every neighbour outside the image. Measured bit-identical to it (tests/test_fae.py).
  """
  out = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1]], np.float64)
  m = affine(corners.astype(np.float64), out).ravel()  # source -> output
  det = m[0] * m[4] - m[1] * m[3]
  det = 1.0 / det if det else 0.0
  i0, i1, i3, i4 = m[4] * det, -m[1] * det, -m[3] * det, m[0] * det  # inverted as warpAffine does
  b0, b1 = -i0 * m[2] - i1 * m[5], -i3 * m[2] - i4 * m[5]
  steps = np.arange(size)

  def fixed(values: np.ndarray) -> np.ndarray:  # cvRound at 1/1024 pixel
    return np.rint(values * 1024).astype(np.int64)

  # Source points in 1/32 pixel: a per-row offset plus a per-column delta, each rounded at 1/1024 pixel.
  qx = (fixed(i1 * steps + b0)[:, None] + 16 + fixed(i0 * steps)[None, :]) >> 5
  qy = (fixed(i4 * steps + b1)[:, None] + 16 + fixed(i3 * steps)[None, :]) >> 5
  h, w = image.shape[:2]
  # Far-outside points only need to stay outside: clipping keeps the arithmetic in int32.
  qx, qy = np.clip(qx, -64, (w + 1) * 32).astype(np.int32), np.clip(qy, -64, (h + 1) * 32).astype(np.int32)
  x0, y0, fx, fy = qx >> 5, qy >> 5, qx & 31, qy & 31
  flat = image.reshape(h * w, -1)
  total = np.zeros((size, size, flat.shape[1]), np.int32)
  weights = ((32 - fx) * (32 - fy), fx * (32 - fy), (32 - fx) * fy, fx * fy)  # in 1/1024: exact integers
  for (dy, dx), weight in zip(((0, 0), (0, 1), (1, 0), (1, 1)), weights):
    x, y = x0 + dx, y0 + dy
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)  # a neighbour outside the image is black
    pixels = flat[np.clip(y, 0, h - 1) * w + np.clip(x, 0, w - 1)]
    total += pixels * (weight * inside * 32)[..., None]  # in 1/32768, as cv2's fixed-point table
  return np.clip((total + (1 << 14)) >> 15, 0, 255).astype(np.uint8)


def crop_face(image: np.ndarray, box, size: int, margin: float = MARGIN) -> np.ndarray:
  """The benchmark's crop of an RGB uint8 image around a one-based 8-number box, extended by `margin`."""
  return warp(image, extended_corners(box, margin), size)


# ---------------------------------------------------------------------------------------------------------------
# The database JSON


@dataclasses.dataclass(frozen=True)
class Entry:
  """One usable entry of a database JSON."""

  index: int
  img_path: str
  path: Path
  age: int
  age_std: float
  folder: int
  subject: str
  gender: str
  box: tuple[float, ...] | None  # 8 numbers, one-based corners A, B, C, D; None: whole image


@dataclasses.dataclass
class Database:
  """A database JSON as read: its usable entries by folder, skips by folder, fingerprint and what it has."""

  entries: dict[int, list[Entry]]
  skips: dict[int, faces.SkipCounter]
  unassigned: faces.SkipCounter  # faces in no folder (-1)
  source: dict
  has_subjects: bool
  has_genders: bool
  has_boxes: bool
  databases: list[str]
  # The folders allowed to share subjects (--shared_subjects) and the subjects found in several of them:
  # subject -> its folders, ascending.
  shared_folders: tuple[int, ...] = ()
  shared: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  # Without the check in this process (check_subjects=False, the Beam path): one row per listed entry with a
  # subject, (subject, folder, index, img_path, kept), for the pipeline's per-subject aggregation (fae_beam).
  subject_rows: list[tuple[str, int, int, str, bool]] = dataclasses.field(default_factory=list)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(where: str, key: str, value) -> int:
  """An integer field (23 or 23.0), else a one-line error naming the entry and field."""
  if _is_int(value):
    return value
  if _number(value) and float(value).is_integer():
    return int(value)
  raise errors.UserError(f"{where}: field {key!r} is {value!r}, not an integer")


def _box(where: str, entry: dict) -> tuple[float, ...] | None:
  """The entry's face box (aligned_bbox, else bbox): 8 numbers, or None; [] means none was found."""
  for key in BOX_FIELDS:
    value = entry.get(key)
    if value is None or (isinstance(value, list) and not value):
      continue
    if not isinstance(value, list) or len(value) != 8 or not all(_number(v) for v in value):
      raise errors.UserError(
        f"{where}: field {key!r} must be 8 numbers (corners A, B, C, D as x, y) or [], not {json.dumps(value)[:80]}"
      )
    return tuple(float(v) for v in value)
  return None


def _subject(where: str, entry: dict) -> str:
  """The person of an entry: id_num, else name; '' when the database records neither."""
  for key in ("id_num", "name"):
    value = entry.get(key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int | str) or (isinstance(value, str) and not value.strip()):
      raise errors.UserError(f"{where}: field {key!r} is {value!r}, not a subject id or name")
    return str(value).strip()
  return ""


def _load_json(path: Path) -> tuple[list, bytes]:
  """The list of entries of a database JSON and its bytes; one-line errors when it is not one."""
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise errors.MissingInput(f"the database JSON {sources.display(path)} does not exist; pass --database") from None
  except OSError as e:
    raise errors.UserError(f"{sources.display(path)}: cannot read it ({e.strerror or e})") from None
  try:
    entries = json.loads(data)
  except UnicodeDecodeError as e:
    raise errors.UserError(f"{sources.display(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    where = f"{sources.display(path)} line {e.lineno} column {e.colno}"
    raise errors.UserError(f"{where}: not valid JSON ({e.msg})") from None
  if not isinstance(entries, list):
    raise errors.UserError(
      f"{sources.display(path)}: a database JSON is a list of entries, one per face; this holds a "
      f"{type(entries).__name__}"
    )
  return entries, data


SHARED_ALL = "all"


def parse_shared_subjects(text: str) -> tuple[int, ...] | str:
  """--shared_subjects: '' -> () (folders subject-exclusive), '0,1' -> (0, 1), 'all' -> 'all'; one-line errors."""
  text = str(text or "").strip()
  if not text:
    return ()
  if text.lower() == SHARED_ALL:
    return SHARED_ALL
  folders = [part.strip() for part in text.split(",")]
  if not all(f.isdigit() and f.isascii() for f in folders):
    raise errors.UserError(f"--shared_subjects={text!r}: give folder numbers such as 0,1, or 'all'")
  if len(folders) < 2 or len(set(map(int, folders))) != len(folders):
    raise errors.UserError(f"--shared_subjects={text!r}: name two or more different folders, e.g. 0,1")
  return tuple(sorted(int(f) for f in folders))


def _shared_text(shared: tuple[int, ...] | str) -> str:
  """The flag's value as written back to the user: '0,1' or 'all'."""
  return shared if isinstance(shared, str) else ",".join(map(str, shared))


def read_database(
  database: Path, images: Path, shared_subjects: tuple[int, ...] | str = (), *, check_subjects: bool = True
) -> Database:
  """Reads and checks a database JSON against its images folder (no image is decoded).

  `shared_subjects` (parse_shared_subjects) names the folders that may share subjects; () none, 'all' any.
  `check_subjects=False` leaves the subject-exclusivity check and the subject counts to a Beam aggregation
  over `Database.subject_rows` (fae_beam): no per-subject table is held in this process.
  """
  if not images.is_dir():
    raise errors.MissingInput(
      f"the images folder {sources.display(images)} does not exist or is not a folder; pass --images, the folder "
      f"that the entries' img_path are relative to"
    )
  raw, data = _load_json(database)
  name = database.name
  entries: dict[int, list[Entry]] = collections.defaultdict(list)
  skips: dict[int, faces.SkipCounter] = collections.defaultdict(faces.SkipCounter)
  unassigned = faces.SkipCounter()
  first_in: dict[str, dict[int, str]] = collections.defaultdict(dict)  # subject -> folder -> an img_path
  rows: list[tuple[str, int, int, str]] = []  # (subject, folder, index, img_path) when not check_subjects
  files: set[tuple[str, Path]] = set()
  genders = boxes = False
  databases: set[str] = set()
  listed: set[int] = set()  # the folders
  for i, entry in enumerate(raw):
    where = f"{name} entry {i}"
    if not isinstance(entry, dict):
      shown = json.dumps(entry)[:60]
      raise errors.UserError(f"{where}: an entry is an object with img_path, age and folder, not {shown}")
    for key in ("img_path", "age", "folder"):
      if key not in entry:
        raise errors.UserError(f"{where}: field {key!r} is missing (it has {sorted(entry)})")
    img_path = entry["img_path"]
    if not isinstance(img_path, str) or not img_path.strip():
      raise errors.UserError(f"{where}: field 'img_path' is {img_path!r}, not a path")
    where = f"{name} entry {i} ({img_path})"
    folder = _integer(where, "folder", entry["folder"])
    if folder < -1:
      raise errors.UserError(f"{where}: field 'folder' is {folder}, not a folder number (or -1: none)")
    age = _integer(where, "age", entry["age"])
    std = entry.get("std_age")
    if std is not None and not (_number(std) and std >= 0):
      raise errors.UserError(f"{where}: field 'std_age' is {std!r}, not a number >= 0")
    gender = entry.get("gender")
    if gender is not None and (not isinstance(gender, str) or gender.strip().lower() not in _GENDER_CODES):
      raise errors.UserError(f"{where}: field 'gender' is {gender!r}, not 'M', 'F' or 'U'")
    genders |= gender is not None
    subject = _subject(where, entry)
    box = _box(where, entry)
    boxes |= box is not None
    if isinstance(entry.get("database"), str):
      databases.add(entry["database"])
    if folder == -1:
      unassigned.add("no folder (-1)", img_path)
      continue
    if subject and check_subjects:
      first_in[subject].setdefault(folder, img_path)
    elif subject:
      rows.append((subject, folder, i, img_path))
    listed.add(folder)
    if age == -1:
      skips[folder].add("unknown age (-1)", img_path)
      continue
    if reason := faces.age_skip_reason(age):
      skips[folder].add(reason, img_path)
      continue
    path = images / os.path.normpath(img_path)
    if not path.is_file():
      skips[folder].add("missing file", img_path)
      continue
    files.add((img_path, path))
    gender_name = _GENDER_CODES[gender.strip().lower()] if gender is not None else builders.UNKNOWN
    entries[folder].append(Entry(i, img_path, path, age, float(std or 0.0), folder, subject, gender_name, box))
  shared: dict[str, list[int]] = {}
  for subject, folders in first_in.items():
    if len(folders) < 2:
      continue
    if not may_share(folders, shared_subjects):
      raise subject_error(name, subject, folders, shared_subjects)
    shared[subject] = sorted(folders)
  if not listed:
    skipped = dict(unassigned.counts)
    raise errors.UserError(f"{name} lists no face with a folder ({len(raw)} entries; skipped: {skipped})")
  if boxes:  # an aligned database: a face without a box is dropped, as the benchmark's prepare_data.py does
    for folder, kept in entries.items():
      for e in [e for e in kept if e.box is None]:
        skips[folder].add("no face box", e.img_path)
      entries[folder] = [e for e in kept if e.box is not None]
  kept_indices = {e.index for kept in entries.values() for e in kept}
  subject_rows = [(subject, f, i, path, i in kept_indices) for subject, f, i, path in rows]
  for folder in listed:  # every folder listed gets a split, whatever its skips
    entries.setdefault(folder, [])
    skips.setdefault(folder, faces.SkipCounter())
  parts = {"database": hashlib.sha256(data).hexdigest()}
  if shared_subjects:  # part of the source only when given: datasets prepared before the flag keep their digest
    parts["shared_subjects"] = _shared_text(shared_subjects)
  parts["images"], num_images = sources.files_digest(files)
  source = sources.fingerprint(database, parts, num_images)
  source["images"] = sources.display(os.path.abspath(images))
  return Database(
    dict(sorted(entries.items())),
    dict(skips),
    unassigned,
    source,
    has_subjects=bool(first_in or rows),
    has_genders=genders,
    has_boxes=boxes,
    databases=sorted(databases),
    shared_folders=tuple(sorted(listed)) if isinstance(shared_subjects, str) else shared_subjects,
    shared=shared,
    subject_rows=subject_rows,
  )


def may_share(folders, shared_subjects: tuple[int, ...] | str) -> bool:
  """Whether a subject may be in these folders (two or more) under --shared_subjects."""
  return shared_subjects == SHARED_ALL or set(folders) <= set(shared_subjects)


def subject_error(name: str, subject: str, folders: dict[int, str], shared_subjects) -> errors.UserError:
  """The one-line error of a subject found in several folders, `folders` mapping each to its first img_path."""
  where = ", ".join(f"{path} in folder {f}" for f, path in sorted(folders.items()))
  allowed = (
    f"--shared_subjects {_shared_text(shared_subjects)} lets only folders {_shared_text(shared_subjects)} share "
    f"subjects"
    if shared_subjects
    else "--shared_subjects FOLDERS (e.g. 0,1) prepares a database whose folders share subjects on purpose"
  )
  return errors.UserError(
    f"{name}: subject {subject!r} is in folders {sorted(folders)} ({where}); the benchmark's folders are "
    f"subject-exclusive: fix the folders in the JSON, or {allowed}"
  )


def shared_subjects_line(metadata: dict) -> str | None:
  """One line saying which folders of a prepared database share subjects (--shared_subjects), or None."""
  folders = metadata.get("shared_subjects")
  if not folders:
    return None
  database_name = Path((metadata.get("source") or {}).get("path") or "the database JSON").name
  listed = ",".join(map(str, folders))
  count = metadata.get("shared_subject_count", 0)
  if not count:
    return f"{database_name}: --shared_subjects {listed} given, and no subject is in more than one folder"
  example = metadata.get("shared_subject_example") or {}
  where = " and ".join(map(str, example.get("folders", [])))
  return (
    f"{database_name}: {count:,} subjects are in more than one of folders {listed} "
    f"(e.g. {example.get('subject')!r} in {where}): prepared as given; these folders are not subject-exclusive"
  )


# ---------------------------------------------------------------------------------------------------------------
# The builder


class AgejaxFae(builders.ManualSourceBuilder):
  """A database of the unified age-estimation benchmark: one split per subject-exclusive folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download a database JSON (e.g. AgeDB_aligned.json) from
  github.com/paplhjak/Facial-Age-Estimation-Benchmark-Databases (or the link in its README) and the
  database's images from their authors, into one folder that the JSON's img_path values are
  relative to. Then: python scripts/prepare_data.py fae --database AgeDB_aligned.json --images FOLDER
  [--name agedb] [--image_size 281].
  """
  # No predefined configs: every database is named by the user (`named_config`), e.g. "agedb".
  database_path: Path | None = None  # the JSON: set by datasets.prepare before describing or preparing
  shared_subjects: tuple[int, ...] | str = ()  # --shared_subjects (parse_shared_subjects): set with database_path
  # Set by datasets.prepare with --beam_options to the fae_beam module (it imports this one, not the reverse): each
  # folder is then a Beam PTransform and TFDS runs them in one pipeline; the subject check and counts are its.
  beam: "BeamHooks | None" = None
  _beam_database: Database | None = None  # what _process_pipeline_result completes the metadata from

  def _info(self) -> tfds.core.DatasetInfo:
    features = builders.features(
      self.builder_config.image_size,
      folder=tfds.features.Scalar(np.int32, doc="the benchmark's subject-exclusive folder"),
      img_path=tfds.features.Text(doc="img_path as listed in the database JSON"),
      subject=tfds.features.Text(doc="the person: id_num, else name; empty when the database has neither"),
      gender=builders.class_label(GENDERS, "the gender field (M, F); unknown when U or absent"),
    )
    return self.dataset_info_from_configs(features=features, metadata=tfds.core.MetadataDict())

  def group_names(self) -> dict[str, tuple[str, ...]]:
    """The groupings of the prepared database: gender when it records genders."""
    return {name: tuple(names) for name, names in (self.info.metadata or {}).get("groups", {}).items()}

  def folders(self) -> list[int]:
    """The folders of the prepared database, ascending."""
    return sorted(int(f) for f in (self.info.metadata or {}).get("folders", {}))

  def describe_source(self, manual_dir: str | os.PathLike) -> dict:
    """The fingerprint of the database JSON and its images folder; a one-line error when either is wrong."""
    return self._read(Path(os.fspath(manual_dir)).expanduser()).source

  def _read(self, images: Path) -> Database:
    if self.database_path is None:
      raise errors.UserError("fae needs the database JSON: pass --database FILE.json (e.g. AgeDB_aligned.json)")
    # On Beam the JSON is still parsed here, in the launching process; the per-subject check is the pipeline's.
    return read_database(
      Path(self.database_path).expanduser(), images, self.shared_subjects, check_subjects=self.beam is None
    )

  def _split_generators(self, dl_manager):
    db = self._read(self._manual_root(dl_manager))
    self._record_source(db.source)
    metadata = self.info.metadata
    metadata["image_size"] = self.builder_config.image_size
    metadata["margin"] = MARGIN
    metadata["folders"] = {str(f): len(kept) for f, kept in db.entries.items()}  # kept counts replace these
    metadata["has_subjects"] = db.has_subjects
    # On Beam the pipeline counts the subjects (fae_beam.record_metrics).
    metadata["subjects"] = (
      0 if self.beam else len({e.subject for kept in db.entries.values() for e in kept if e.subject})
    )
    metadata["boxes"] = db.has_boxes
    metadata["databases"] = db.databases
    metadata["groups"] = {"gender": list(GENDERS)} if db.has_genders else {}
    if db.shared_folders:  # these folders are not subject-exclusive: said by prepare_data.py, kept for readers
      record_shared(metadata, db.shared_folders, len(db.shared), min(db.shared.items()) if db.shared else None)
    if db.unassigned.counts:
      db.unassigned.record(metadata, self.name, "unassigned")
    if self.beam is not None:
      self._beam_database = db
      return self.beam.split_transforms(db, self.builder_config.image_size, self.database_name, self.shared_subjects)
    return {f"folder{f}": self._generate_examples(f, kept, db.skips[f]) for f, kept in db.entries.items()}

  @property
  def database_name(self) -> str:
    """The database JSON's file name, as errors name it."""
    return Path(self.database_path or "").name

  def _generate_examples(self, folder: int, entries: list[Entry], skips: faces.SkipCounter):
    kept = 0
    for e in entries:
      result = example(e, self.builder_config.image_size)
      if isinstance(result, str):
        skips.add(result, e.img_path)
        continue
      kept += 1
      yield result
    self.record_folder(folder, kept, skips)

  def record_folder(self, folder: int, kept: int, skips: faces.SkipCounter) -> None:
    """Records a folder's kept count and skips in the metadata; a one-line error when it kept no image."""
    skips.record(self.info.metadata, self.name, f"folder{folder}")
    self.info.metadata["folders"][str(folder)] = kept
    if not kept:
      raise errors.UserError(
        f"folder {folder} of {sources.display(self.database_path or '')} has no usable image "
        f"(skipped: {dict(skips.counts)}); check --images"
      )

  def _process_pipeline_result(self, pipeline_result) -> None:
    """Completes the metadata from the Beam pipeline's metrics: skips, kept counts, subjects (fae_beam)."""
    assert self.beam is not None and self._beam_database is not None  # set before TFDS built the pipeline
    self.beam.record_metrics(self, pipeline_result, self._beam_database)


class BeamHooks(typing.Protocol):
  """What the builder calls on Beam (the fae_beam module)."""

  def split_transforms(self, db: Database, size: int, name: str, shared_subjects) -> dict:
    """{"folderN": PTransform} of the database's folders."""
    ...

  def record_metrics(self, builder: "AgejaxFae", pipeline_result, db: Database) -> None:
    """Completes the builder's metadata from the pipeline's metrics."""
    ...


def record_shared(metadata, folders: tuple[int, ...], count: int, example: tuple[str, list[int]] | None) -> None:
  """Records the folders allowed to share subjects, how many subjects they share and the first (by name)."""
  metadata["shared_subjects"] = list(folders)
  metadata["shared_subject_count"] = count
  if example:  # the same example every time the JSON is prepared
    metadata["shared_subject_example"] = {"subject": example[0], "folders": list(example[1])}


def example(e: Entry, size: int) -> tuple[int, dict] | str:
  """The (key, features) of an entry's face, its crop size x size, or why it is skipped."""
  if e.box is None:
    image = faces.load_rgb(e.path, size)
  else:
    opened = faces.open_rgb(e.path)
    image = opened if isinstance(opened, str) else crop_face(np.asarray(opened), e.box, size)
  if isinstance(image, str):
    return image
  features = {"image": image, "age": e.age, "age_std": e.age_std, "folder": e.folder, "img_path": e.img_path}
  return e.index, {**features, "subject": e.subject, "gender": e.gender}


def summary(builder) -> list[str]:
  """Lines for prepare_data.py: examples per folder, and the train / validation / test sizes of each split K."""
  counts = {int(name.removeprefix("folder")): split.num_examples for name, split in builder.info.splits.items()}
  metadata = builder.info.metadata or {}
  subjects = f"{metadata.get('subjects', 0)} subjects" if metadata.get("has_subjects") else "no subject ids"
  lines = [f"  folders      {len(counts):>8} ({subjects}; crops {metadata.get('image_size', '?')} px)"]
  lines += [f"  folder{f:<6} {n:>8} examples" for f, n in sorted(counts.items())]
  ks = splits.formable(counts)
  for k in ks:
    split = splits.resolve(k, counts)
    assert split is not None  # k is a split number
    sizes = splits.part_sizes(split, counts)
    lines.append(
      f"  split {k}      train {sizes['train']:>7}  validation {sizes['validation']:>7}  test {sizes['test']:>7}"
      f"   (--config.data.split={k})"
    )
  if not ks:
    lines.append("  no benchmark split 0-4 fits these folders: give --config.data.split='train:A-B,val:C-D,test:E-F'")
  return lines
