"""OUT/manifest.json: what an export's numbers mean, every file's SHA-256 and a reference prediction.

`build` makes the fields an export records, `load_manifest` reads them back and checks each (a
one-line error naming the file, the key and the value), `checksums` and `check_digest` are the
files' SHA-256, and `reference_crop` is the fixed input whose prediction the manifest records.

An export folder may come from anyone: `open_file` (and `read_file`, `file_sha256`, `held_files`)
read its files only once they are regular files of bounded size inside the folder, so a link to
/dev/zero, a FIFO or a folder named model.jax is a one-line error, not a hang, a flood or a traceback.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

import jax
import numpy as np
from etils import epath

import agejax
from agejax import errors, storage
from agejax.data import framing
from agejax.evaluation import calibration
from agejax.inference.export import jax_export

if TYPE_CHECKING:  # the model code is imported only to export, never to serve an export
  from agejax.inference import prediction

MANIFEST_FILE = "manifest.json"
# The manifest's layout; a change that breaks readers bumps it. 2: checksums, a reference prediction, no workdir path.
FORMAT = "agejax-export/2"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"  # the SavedModel's serving signature and ONNX's names
EXPORT_COMMAND = "python scripts/export.py --workdir DIR --output {output}"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 1 << 20  # 100 ages make ~12 KB; 1 MiB holds the reference of ~50,000
MAX_DEPTH = 16  # a manifest nests 4 deep (framing's landmarks)
# Any file of an export: model.jax (a flatbuffer) and model.onnx (a protobuf) stop at 2 GiB, and the
# SavedModel's variables hold the same weights.
MAX_FILE_BYTES = 4 << 30
MAX_FILES = 10_000  # files an export folder may hold: an export writes about six
MAX_INPUT_SIZE = 4096  # pixels a side
MAX_AGE = 1000  # years: the ages' range bounds the distributions' length
_MAX_INT = 1 << 63  # larger whole numbers do not fit the int64 and float64 they are used as
_KINDS = (
  (stat.S_ISDIR, "a folder"),
  (stat.S_ISFIFO, "a FIFO (named pipe)"),
  (stat.S_ISCHR, "a character device"),
  (stat.S_ISBLK, "a block device"),
  (stat.S_ISSOCK, "a socket"),
)


def reference_crop(size: int) -> np.ndarray:
  """The fixed synthetic crop whose prediction an export records, uint8 [1, S, S, 3]: red down, green across."""
  ramp = np.linspace(0.0, 255.0, size)
  red, green = np.meshgrid(ramp, ramp, indexing="ij")
  return np.round(np.stack([red, green, (red + green) / 2], -1)).astype(np.uint8)[None]


def build(
  predictor: "prediction.Predictor",
  traced: jax_export.Traced,
  checkpoint: str | int,
  workdir: storage.Location,
) -> dict[str, Any]:
  """The manifest's fields for `traced` (whose first crop is the reference crop), but `files` and `sha256`."""
  size, bins = traced.size, predictor.bins
  reference = traced.expected[0]
  manifest: dict[str, Any] = {
    "format": FORMAT,
    "input_size": size,
    "image_size": predictor.model.image_size,
    "eval_crop": predictor.model.eval_crop,  # model.jax sees each crop's central fraction, resized to image_size
    "min_age": int(bins[0]),
    "max_age": int(bins[-1]),
    "model": predictor.cfg.model.name,
    "input_spec": predictor.model.input_spec.to_json(),
    "num_bins": len(bins),
    "flip": predictor.flip,
    **predictor.calibration.to_json(),  # temperature, and interval_masses (null: central intervals)
    "calibrated": predictor.calibrated,  # a calibration.json way was applied
    "step": predictor.step,
    "checkpoint": str(checkpoint),
    "run": storage.path(workdir).name,  # the workdir's name only: an export does not carry the builder's paths
    "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["B", size, size, 3], "channels": "RGB"},
    "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["B", len(bins)]},
    "platforms": list(traced.exported.platforms),
    "reference": {
      "crop": "export.reference_crop(input_size): red = 255 * row / (S - 1), green = 255 * column / (S - 1), "
      "blue = their mean, rounded",
      "distribution": [float(p) for p in reference],
      "expected_age": float(reference.astype(np.float64) @ bins.astype(np.float64)),
    },
    "agejax_version": agejax.__version__,
    "jax_version": jax.__version__,
    "calling_convention_version": traced.exported.calling_convention_version,
  }
  if predictor.record.get("framing"):  # where photos' faces are warped to, as the training crops were framed
    manifest["framing"] = predictor.record["framing"]
  return manifest


def _not_regular(file: epath.Path, mode: int) -> errors.UserError:
  kind = next((name for test, name in _KINDS if test(mode)), "not a file")
  return errors.UserError(f"{file}: {kind}, not a regular file; an export holds regular files only: export again")


def _too_large(file: epath.Path, size: int, limit: int) -> errors.UserError:
  return errors.UserError(f"{file}: {size:,} bytes, more than the {limit:,} it may have; export again")


def _inside(folder: epath.Path, file: epath.Path | str) -> str:
  """The real path of a local `file` under `folder`; a one-line error when a symbolic link leads it out."""
  root, real = os.path.realpath(folder), os.path.realpath(file)
  if os.path.commonpath([root, real]) != root:
    how = "a symbolic link to" if os.path.islink(file) else "in a linked folder, at"
    raise errors.UserError(
      f"{file}: {how} {real}, outside the export folder; an export holds its own files only: export again"
    )
  return real


@contextlib.contextmanager
def open_file(folder: epath.Path, name: str, limit: int = MAX_FILE_BYTES, missing: str = "") -> Iterator[BinaryIO]:
  """Opens FOLDER/NAME for reading once it is a regular file of at most `limit` bytes inside the folder.

  Checked before it is opened, each a one-line error naming the file: a symbolic link leading out of
  the folder (to /dev/zero, to another export's file), a folder, a device (reads forever) or a FIFO
  (its open blocks). Links inside the folder are followed. Read at most `limit` + 1 bytes from it.

  Args:
    folder: the export folder (a link to a folder is fine).
    name: a '/'-separated path inside it.
    limit: the most bytes the file may have.
    missing: what the MissingInput error for an absent file adds after "FILE does not exist".
  """
  file = folder / name
  if storage.is_url(folder):  # an object store holds objects only: no links, devices or pipes
    if not file.exists():
      raise errors.MissingInput(f"{file} does not exist{missing}")
    info = file.stat()
    if info.is_directory:
      raise _not_regular(file, stat.S_IFDIR)
    if info.length > limit:
      raise _too_large(file, info.length, limit)
    with file.open("rb") as f:
      yield f
    return
  real = _inside(folder, file)
  try:
    info = os.stat(real)  # `real` has no links left: this is what open would reach
  except FileNotFoundError:
    raise errors.MissingInput(f"{file} does not exist{missing}") from None
  except OSError as e:  # a loop of links, a folder without permission
    raise errors.UserError(f"{file}: cannot be read ({storage.first_line(e)}); export again") from None
  if not stat.S_ISREG(info.st_mode):
    raise _not_regular(file, info.st_mode)
  if info.st_size > limit:
    raise _too_large(file, info.st_size, limit)
  try:  # non-blocking: a file swapped for a FIFO since the stat still cannot hang the open
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
  except OSError as e:
    raise errors.UserError(f"{file}: cannot be read ({storage.first_line(e)}); export again") from None
  with os.fdopen(fd, "rb") as f:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      raise _not_regular(file, mode)
    yield f


def read_file(folder: epath.Path, name: str, limit: int = MAX_FILE_BYTES, missing: str = "") -> bytes:
  """FOLDER/NAME's bytes, read as `open_file` allows."""
  with open_file(folder, name, limit, missing) as f:
    data = f.read(limit + 1)
  if len(data) > limit:  # it grew since its size was checked
    raise _too_large(folder / name, len(data), limit)
  return data


def file_sha256(folder: epath.Path, name: str, missing: str = "") -> str:
  """FOLDER/NAME's SHA-256 as 64 hex digits, read in 4 MiB chunks as `open_file` allows."""
  digest, size = hashlib.sha256(), 0
  with open_file(folder, name, MAX_FILE_BYTES, missing) as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      size += len(chunk)
      if size > MAX_FILE_BYTES:
        raise _too_large(folder / name, size, MAX_FILE_BYTES)
      digest.update(chunk)
  return digest.hexdigest()


def _entries(folder: epath.Path) -> Iterator[tuple[str, list[str]]]:
  """(folder, the names in it that are not folders) for every folder under `folder`, links to folders as names."""
  if storage.is_url(folder):  # an object store has no links
    for root, _, files in folder.walk():
      yield os.fspath(root), list(files)
    return
  for root, dirs, files in os.walk(folder):  # never into a linked folder
    links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
    for name in files + links:
      if os.path.islink(os.path.join(root, name)):
        _inside(folder, os.path.join(root, name))
    yield root, files + links


def held_files(folder: epath.Path) -> list[str]:
  """Every entry of an export folder that is not a folder, by '/'-separated relative path, the manifest included.

  A symbolic link to a folder counts as a file (and is not followed), so that the manifest must list
  it too. Raises a one-line error for a link that leads out of the folder, and past MAX_FILES entries.
  """
  names: list[str] = []
  for root, entries in _entries(folder):
    for entry in entries:
      names.append(os.path.relpath(os.path.join(root, entry), os.fspath(folder)).replace(os.sep, "/"))
      if len(names) > MAX_FILES:
        raise errors.UserError(f"{folder}: holds more than {MAX_FILES:,} files, not an export; export again")
  return sorted(names)


def sha256(file: epath.Path) -> str:
  """A file's SHA-256 as 64 hex digits, read in 4 MiB chunks."""
  digest = hashlib.sha256()
  with file.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def checksums(folder: str) -> dict[str, str]:
  """SHA-256 of every file under a local folder but the manifest, by '/'-separated relative path."""
  sums = {}
  for root, _, files in os.walk(folder):
    for name in files:
      file = os.path.join(root, name)
      relative = os.path.relpath(file, folder).replace(os.sep, "/")
      if relative != MANIFEST_FILE:
        sums[relative] = sha256(epath.Path(file))
  return dict(sorted(sums.items()))


def check_digest(file: epath.Path, digest: str, expected: str) -> None:
  """Raises a one-line error naming `file` when its SHA-256 `digest` is not the manifest's `expected`."""
  if digest != expected:
    raise errors.UserError(
      f"{file}: SHA-256 {digest[:16]}... differs from the manifest's {expected[:16]}...: the file changed after "
      f"export (damaged or replaced); export again"
    )


def _field_error(file: epath.Path, key: str, value: Any, what: str) -> errors.UserError:
  shown = json.dumps(value)
  return errors.UserError(
    f"{file}: {key!r} is {shown if len(shown) <= 60 else shown[:57] + '...'}, not {what}; export the workdir again"
  )


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any, count: int, ok: Callable[[Any], bool] = _is_number) -> bool:
  return isinstance(value, list) and len(value) == count and all(_is_number(v) and ok(v) for v in value)


def _is_input_spec(spec: Any) -> bool:
  """InputSpec.to_json()'s record: a positive pixel range, a channel order, 3 finite means and 3 positive stds."""
  return (
    isinstance(spec, dict)
    and _is_number(spec.get("pixel_range", 1.0))
    and spec.get("pixel_range", 1.0) > 0
    and spec.get("channels", "RGB") in ("RGB", "BGR")
    and _numbers(spec.get("mean"), 3)
    and _numbers(spec.get("std"), 3, lambda v: v > 0)
  )


def _safe_name(name: Any) -> bool:
  """A '/'-separated path inside the export folder: not absolute, no '..', '.' or empty part, no backslash."""
  return (
    isinstance(name, str)
    and bool(name)
    and "\\" not in name
    and all(part not in ("", ".", "..") for part in name.split("/"))
  )


def _shown_key(path: list[Any]) -> str:
  """A key's place in the manifest, e.g. input_spec.mean[1] (cut at 80 characters: keys may be anything)."""
  text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
  return text if len(text) <= 80 else text[:77] + "..."


def _check_numbers(manifest: dict[str, Any], file: epath.Path) -> None:
  """Refuses nesting deeper than MAX_DEPTH, and any number that is not finite or not within +-2**63, by key.

  Iterative, so a deep manifest cannot exhaust the stack here either.
  """
  stack: list[tuple[Any, list[Any]]] = [(manifest, [])]
  while stack:
    value, path = stack.pop()
    if isinstance(value, dict | list):
      if len(path) >= MAX_DEPTH:
        raise errors.UserError(
          f"{file}: nested more than {MAX_DEPTH} deep at {_shown_key(path)!r}, not an export's manifest; export the "
          f"workdir again"
        )
      items = value.items() if isinstance(value, dict) else enumerate(value)
      stack.extend((v, [*path, k]) for k, v in items)
    elif isinstance(value, float) and not math.isfinite(value):
      raise _field_error(file, _shown_key(path), value, "a finite number")
    elif _is_int(value) and not -_MAX_INT < value < _MAX_INT:
      raise _field_error(file, _shown_key(path), value, "a whole number within +-2**63")


def _check_fields(manifest: dict[str, Any], file: epath.Path) -> None:
  """Raises a one-line error naming the file, the key and the value of the first field with a wrong type or value."""

  def check(key: str, ok: Callable[[Any], bool], what: str) -> None:
    if key not in manifest:
      raise errors.UserError(f"{file}: {key!r} is missing; export the workdir again")
    if not ok(manifest[key]):
      raise _field_error(file, key, manifest[key], what)

  check("format", lambda v: v == FORMAT, f"{FORMAT!r} (older exports have no checksums)")
  pixels = lambda v: _is_int(v) and 1 <= v <= MAX_INPUT_SIZE  # noqa: E731
  check("input_size", pixels, f"a whole number of pixels, 1 to {MAX_INPUT_SIZE}")
  if "image_size" in manifest:  # the model's own size, recorded for people; absent in early exports
    check("image_size", pixels, f"a whole number of pixels, 1 to {MAX_INPUT_SIZE}")
  check("min_age", lambda v: _is_int(v) and 0 <= v <= MAX_AGE, f"a whole number of years, 0 to {MAX_AGE}")
  check("max_age", lambda v: _is_int(v) and manifest["min_age"] <= v <= MAX_AGE, f"a whole number, min_age..{MAX_AGE}")
  k = manifest["max_age"] - manifest["min_age"] + 1
  check("num_bins", lambda v: _is_int(v) and v == k, f"max_age - min_age + 1 = {k}")
  check("temperature", lambda v: _is_number(v) and v > 0, "a finite number > 0")
  check("step", lambda v: _is_int(v) and v >= 0, "a whole number >= 0")
  check("calibrated", lambda v: isinstance(v, bool), "true or false")
  if not isinstance(manifest.get("flip", False), bool):  # absent: an export from before flip averaging
    raise _field_error(file, "flip", manifest["flip"], "true or false")
  crop = manifest.get("eval_crop", 1.0)  # absent: an export from before the crop, which saw the whole crop
  if not (_is_number(crop) and 0 < crop <= 1):
    raise _field_error(file, "eval_crop", crop, "a number in (0, 1]")
  try:
    calibration.Calibration.from_fit(manifest, str(file))  # absent interval_masses: central intervals
  except errors.UserError:
    raise _field_error(
      file,
      "interval_masses",
      manifest.get("interval_masses"),
      f"null or, for each level {', '.join(map(str, calibration.COVERAGE_LEVELS))}, a mass in [0, 1] per age bucket",
    ) from None
  check(
    "sha256",
    lambda v: (
      isinstance(v, dict)
      and jax_export.MODEL_FILE in v
      and all(_safe_name(n) and isinstance(d, str) and _HEX64.match(d) for n, d in v.items())
    ),
    f"an object of files in the folder -> 64 hex digits, with {jax_export.MODEL_FILE!r}",
  )
  check(
    "reference",
    lambda v: (
      isinstance(v, dict)
      and _is_number(v.get("expected_age"))
      and _numbers(v.get("distribution"), k, lambda p: 0 <= p <= 1)
    ),
    f"an object with a finite 'expected_age' and a 'distribution' of {k} probabilities",
  )
  spec = manifest.get("input_spec")  # absent or null: an export from before input specs (ImageNet's)
  if spec is not None and not _is_input_spec(spec):
    raise _field_error(
      file,
      "input_spec",
      spec,
      "null or an object with 'pixel_range' > 0, 'channels' RGB or BGR, 3 finite 'mean' and 3 'std' > 0",
    )
  try:
    framing.from_record(manifest)
  except (TypeError, ValueError, KeyError, OverflowError) as e:
    raise _field_error(file, "framing", manifest.get("framing"), f"a framing ({storage.first_line(e)})") from None


def _missing_export(folder: epath.Path) -> errors.MissingInput:
  """The error for a folder without a manifest, pointing at a previous export that a killed swap left aside."""
  aside = storage.set_aside(folder)
  if aside:
    return errors.MissingInput(
      f"{folder / MANIFEST_FILE} does not exist: an interrupted export left the previous one in "
      f"{folder.parent / aside[-1]} (rename it to {folder.name}, or export again)"
    )
  return errors.MissingInput(
    f"{folder / MANIFEST_FILE} does not exist: not an export folder (make one: {EXPORT_COMMAND.format(output=folder)})"
  )


def load_manifest(path: storage.Location) -> dict[str, Any]:
  """Returns OUT/manifest.json of an export folder, its fields checked (one-line errors naming key and value)."""
  folder = storage.path(path)
  file = folder / MANIFEST_FILE
  if not file.exists():
    raise _missing_export(folder)
  data = read_file(folder, MANIFEST_FILE, MAX_MANIFEST_BYTES)
  try:
    manifest = json.loads(data.decode("utf-8"))
  except RecursionError:  # json recurses once per level: 100,000 brackets end here
    raise errors.UserError(
      f"{file}: nested more than {MAX_DEPTH} deep, not an export's manifest; export the workdir again"
    ) from None
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.UserError(f"{file}: not valid JSON ({e}); export the workdir again") from None
  if not isinstance(manifest, dict):
    raise errors.UserError(f"{file}: not a JSON object (found {type(manifest).__name__}); export the workdir again")
  _check_numbers(manifest, file)  # 1e999 and Infinity read as inf, NaN as nan: refused here, by key
  _check_fields(manifest, file)
  return manifest
