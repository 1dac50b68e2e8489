"""OUT/manifest.json: what an export's numbers mean, every file's SHA-256 and a reference prediction.

`build` makes the fields an export records, `load_manifest` reads them back and checks each (a
one-line error naming the file, the key and the value), `checksums` and `check_digest` are the
files' SHA-256, and `reference_crop` is the fixed input whose prediction the manifest records.
"""

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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


def _safe_name(name: Any) -> bool:
  """A '/'-separated path inside the export folder: no absolute path, no '..'."""
  return isinstance(name, str) and bool(name) and not name.startswith("/") and ".." not in name.split("/")


def _check_fields(manifest: dict[str, Any], file: epath.Path) -> None:
  """Raises a one-line error naming the file, the key and the value of the first field with a wrong type or value."""

  def check(key: str, ok: Callable[[Any], bool], what: str) -> None:
    if key not in manifest:
      raise errors.UserError(f"{file}: {key!r} is missing; export the workdir again")
    if not ok(manifest[key]):
      raise _field_error(file, key, manifest[key], what)

  check("format", lambda v: v == FORMAT, f"{FORMAT!r} (older exports have no checksums)")
  check("input_size", lambda v: _is_int(v) and v >= 1, "a whole number of pixels")
  check("min_age", _is_int, "a whole number of years")
  check("max_age", lambda v: _is_int(v) and v >= manifest["min_age"], "a whole number >= min_age")
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
      and isinstance(v.get("distribution"), list)
      and len(v["distribution"]) == k
      and all(_is_number(p) for p in v["distribution"])
    ),
    f"an object with a finite 'expected_age' and a 'distribution' of {k} finite numbers",
  )
  if not isinstance(manifest.get("input_spec", {}), dict | None):
    raise _field_error(file, "input_spec", manifest["input_spec"], "an object or null")
  try:
    framing.from_record(manifest)
  except (TypeError, ValueError, KeyError) as e:
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
  manifest = storage.read_json_object(file)
  _check_fields(manifest, file)
  return manifest
