"""Reading an export: `ExportedPredictor` runs OUT/model.jax with only jax and numpy; `verify` checks a folder whole.

No model code, Flax or TensorFlow is imported to serve an export. Loading refuses, in one line
naming the file, a manifest with a bad field, a model.jax whose checksum or shapes differ from the
manifest, or one whose reference prediction is not what the export recorded. Every file is read only
once it is a regular file of bounded size inside the folder (`manifest.open_file`).
"""

import hashlib
from collections.abc import Iterable

import jax
import numpy as np
from etils import epath
from jax import export as jax_exporting

from agejax import errors, labels, parallel, storage
from agejax.data import framing
from agejax.evaluation import calibration
from agejax.inference.export import jax_export, manifest

DEFAULT_BATCH_SIZE = 32
# How far a load may stray from the reference prediction the export recorded: another platform's
# float32 (TF32 convolutions on a GPU) moves probabilities by ~1e-3; a damaged model or changed ages move more.
REFERENCE_ATOL = 5e-3
REFERENCE_AGE_ATOL = 0.1  # years


def verify(path: storage.Location) -> "ExportedPredictor":
  """Checks an export whole: its manifest, model.jax (see ExportedPredictor) and every other file's SHA-256.

  Every file the folder holds must be listed in the manifest's `sha256` (an unlisted one could be
  anything), and every listed one must be a regular file inside the folder with that digest.
  Returns the loaded ExportedPredictor; raises a one-line UserError naming the first file that fails.
  """
  predictor = ExportedPredictor(path)
  folder, listed = predictor.path, predictor.manifest["sha256"]
  file = folder / manifest.MANIFEST_FILE
  unlisted = [name for name in manifest.held_files(folder) if name != manifest.MANIFEST_FILE and name not in listed]
  if unlisted:
    raise errors.UserError(
      f"{folder / unlisted[0]}: not listed in {file}'s 'sha256' (an export lists every file it holds); export again"
    )
  for name, expected in listed.items():
    if name == jax_export.MODEL_FILE:
      continue  # checked as it was loaded
    digest = manifest.file_sha256(folder, name, missing=f", but {file} lists it; export again")
    manifest.check_digest(folder / name, digest, expected)
  return predictor


class ExportedPredictor:
  """An exported model (OUT/model.jax + OUT/manifest.json) with Predictor's interface, needing only jax.

  Loading checks the manifest's fields, model.jax's SHA-256, its input and output shapes against the
  manifest, and the reference crop's prediction against the one the export recorded (finite, within
  REFERENCE_ATOL, and the same expected age under the manifest's ages); each failure is one line.

  Faces run in batches of `batch_size`; a last, smaller batch is padded to the next power of two,
  so a single face costs one face's worth of compute and at most ceil(log2(batch_size)) + 1 shapes
  compile.

  Args:
    path: the export folder (a path or a gs:// URL).
    batch_size: faces per model call.
  """

  def __init__(self, path: storage.Location, *, batch_size: int = DEFAULT_BATCH_SIZE):
    if batch_size < 1:
      raise errors.UserError(f"batch_size={batch_size}: must be a positive number of faces per model call")
    self.path = storage.path(path)
    self.manifest = manifest.load_manifest(self.path)
    model = self.path / jax_export.MODEL_FILE
    again = f": export again ({manifest.EXPORT_COMMAND.format(output=path)})"
    data = manifest.read_file(self.path, jax_export.MODEL_FILE, missing=again)
    manifest.check_digest(model, hashlib.sha256(data).hexdigest(), self.manifest["sha256"][jax_export.MODEL_FILE])
    try:
      self.exported = jax_exporting.deserialize(bytearray(data))
    except Exception as e:  # jax raises ValueError, flatbuffers IndexError or struct.error on a damaged file
      raise errors.UserError(f"{model}: not a jax.export file ({storage.first_line(e)}); export again") from None
    self.input_size: int = self.manifest["input_size"]
    self.min_age, self.max_age = self.manifest["min_age"], self.manifest["max_age"]
    self.bins = labels.age_bins(self.min_age, self.max_age)
    self.flip: bool = self.manifest.get("flip", False)  # each face averaged with its mirror image, inside model.jax
    # The central fraction of each crop's side model.jax sees before its resize (the crop is inside model.jax).
    self.eval_crop: float = float(self.manifest.get("eval_crop", 1.0))
    # The temperature inside model.jax, and the 80% interval's masses by age bucket (None: central intervals).
    self.calibration = calibration.Calibration.from_fit(self.manifest, str(self.path / manifest.MANIFEST_FILE))
    self.temperature = self.calibration.temperature
    self.step: int = self.manifest["step"]
    self.input_spec = self.manifest.get("input_spec")  # what the model inside normalises to (None: before specs)
    self.framing = framing.from_record(self.manifest)  # None: the fixed-margin crop
    self.batch_size = batch_size
    self._check_shapes(model)
    self._call = jax.jit(self.exported.call)
    self._check_reference(model)

  def _check_shapes(self, model: epath.Path) -> None:
    """The manifest's input_size and ages against the exported function's argument and result shapes."""
    file, s = self.path / manifest.MANIFEST_FILE, self.input_size
    avals = self.exported.in_avals, self.exported.out_avals
    if [len(a) for a in avals] != [1, 1]:
      raise errors.UserError(f"{model} takes {len(avals[0])} and returns {len(avals[1])} arrays, not 1 and 1")
    (given,), (returned,) = avals
    if given.dtype != np.uint8 or tuple(given.shape[1:]) != (s, s, 3):
      shape = ", ".join(map(str, given.shape))
      raise errors.UserError(
        f"{file}: 'input_size' is {s}, but {model} takes {given.dtype} [{shape}] crops; export the workdir again"
      )
    if returned.shape[-1] != len(self.bins):
      raise errors.UserError(
        f"{file}: 'min_age'..'max_age' {self.min_age}..{self.max_age} name {len(self.bins)} ages, but {model} "
        f"returns {returned.shape[-1]}; export the workdir again"
      )

  def _check_reference(self, model: epath.Path) -> None:
    """Runs the reference crop: refuses non-finite outputs, another distribution, or another expected age."""
    file, reference = self.path / manifest.MANIFEST_FILE, self.manifest["reference"]
    got = self(manifest.reference_crop(self.input_size))[0].astype(np.float64)
    if not np.all(np.isfinite(got)):
      raise errors.UserError(f"{model}: the reference crop's probabilities are not finite (NaN or inf); export again")
    error = float(np.abs(got - np.asarray(reference["distribution"])).max())
    if error > REFERENCE_ATOL:
      raise errors.UserError(
        f"{model}: the reference crop's probabilities differ from those in {file} by {error:.2g} "
        f"(at most {REFERENCE_ATOL:g}): not the model that was exported; export again"
      )
    age = float(got @ self.bins.astype(np.float64))
    if abs(age - reference["expected_age"]) > REFERENCE_AGE_ATOL:
      raise errors.UserError(
        f"{file}: the reference crop's expected age is {age:.2f} under 'min_age'..'max_age' "
        f"{self.min_age}..{self.max_age}, but the export recorded {reference['expected_age']:.2f}: the ages "
        f"were changed; export the workdir again"
      )

  def probability_under(self, probs: np.ndarray, thresholds: Iterable[int]) -> np.ndarray:
    """Returns P(age < T) [N, len(T)] of distributions [N, K] this export returned, under the manifest's ages.

    Computed from the exported (calibrated) distribution, as `Predictor.probability_under` is: every
    format outputs the distribution, and this sum is the same whichever produced it.
    """
    return labels.probability_under(probs, self.bins, thresholds)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Returns distributions [N, K] for uint8 face crops [N, S, S, 3] (S = input_size), run in padded batches.

    Args:
      images: uint8 RGB face crops of the export's input size, [N, S, S, 3].

    Returns:
      float32 probabilities over the age bins, [N, K].
    """
    images = np.asarray(images)
    s = self.input_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
      raise errors.UserError(
        f"images {images.dtype}{list(images.shape)}: the export takes uint8 RGB face crops [N, {s}, {s}, 3]"
      )
    n = len(images)
    out, in_flight = [], parallel.InFlight()
    for start in range(0, n, self.batch_size):
      batch = images[start : start + self.batch_size]
      padded = min(self.batch_size, 1 << (len(batch) - 1).bit_length())  # the next power of two
      if padded > len(batch):
        batch = np.concatenate([batch, np.zeros((padded - len(batch), s, s, 3), np.uint8)])
      out.append(in_flight.add(self._call(batch)))
    if not out:
      return np.zeros((0, len(self.bins)), np.float32)
    return np.concatenate([np.asarray(o) for o in out])[:n]
