"""A trained model for use without agejax: a jax.export file, a TensorFlow SavedModel and their manifest.

`export_workdir` writes OUT/model.jax (preprocessing + model + tempered softmax, serialized with
jax.export for CPU, CUDA and TPU: uint8 RGB face crops [B, S, S, 3], any B, -> float32 probabilities
[B, K], the weights inside), OUT/saved_model/ (the same function through jax2tf, the weights as
variables) and OUT/manifest.json (what the numbers mean). `ExportedPredictor` runs OUT/model.jax with
only jax and numpy: no model code, Flax or TensorFlow is imported to serve an export.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np
from jax import export as jax_export

import agejax
from agejax import errors, labels, parallel, storage
from agejax.data import framing
from agejax.evaluation import calibration

if TYPE_CHECKING:  # the model code is imported only to export, never to serve an export
  from agejax.inference import prediction

MODEL_FILE = "model.jax"
MANIFEST_FILE = "manifest.json"
SAVED_MODEL_DIR = "saved_model"
FORMAT = "agejax-export/1"  # the manifest's layout; a change that breaks readers bumps it
# One file runs on any of these: jax.export lowers for platforms this machine lacks.
PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"  # the SavedModel's serving signature
DEFAULT_BATCH_SIZE = 32
EXPORT_COMMAND = "python scripts/export.py --workdir DIR --output {output}"


def _write_bytes(file: storage.Location, data: bytes) -> None:
  """Writes `data` so that readers see the old or the new content (as storage.write_text does for text)."""
  target = storage.path(file)
  if storage.is_url(target):
    target.write_bytes(data)  # one object write: atomic on object stores
    return
  tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, target)


def _probabilities_fn(
  predictor: "prediction.Predictor", treedef: jax.tree_util.PyTreeDef
) -> Callable[[list, jax.Array], jax.Array]:
  """Returns f(weight leaves, uint8 images) -> probabilities through `AgeModel.distributions`: the same numbers."""
  temperature = np.float32(predictor.temperature)

  def probabilities(leaves: list, images: jax.Array) -> jax.Array:
    params, model_state = jax.tree.unflatten(treedef, leaves)
    return predictor.model.distributions(_Weights(params, model_state), images, temperature)

  return probabilities


class _Weights(NamedTuple):
  params: Any
  model_state: Any


def _input_spec(size: int) -> jax.ShapeDtypeStruct:
  """uint8 [B, size, size, 3] with a symbolic batch B >= 1."""
  (batch,) = jax_export.symbolic_shape("B")
  return jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8)


def _saved_model_tools() -> tuple[Any, Any]:
  """Returns (tensorflow, jax2tf), or raises a one-line error saying how to do without them."""
  try:
    tf = parallel.import_tensorflow()
    from jax.experimental import jax2tf
  except ImportError as e:
    raise errors.UserError(
      f"the TensorFlow SavedModel needs tensorflow and jax.experimental.jax2tf ({e}): "
      f"pip install tensorflow-cpu, or skip it (--nosaved_model)"
    ) from None
  return tf, jax2tf


def _write_saved_model(
  fn: Callable, leaves: list, size: int, platforms: Sequence[str], target: storage.Location
) -> None:
  """Writes `fn` as a TensorFlow SavedModel through jax2tf: signature serving_default(images) -> {probabilities}.

  It is saved locally and then copied, as the output may be a bucket.
  """
  tf, jax2tf = _saved_model_tools()
  module = tf.Module()
  module.weights = [tf.Variable(leaf, trainable=False) for leaf in leaves]  # not constants: graphs stay < 2 GB
  converted = jax2tf.convert(
    fn,
    polymorphic_shapes=[None, f"(B, {size}, {size}, 3)"],
    with_gradient=False,
    native_serialization_platforms=tuple(platforms),
  )

  @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)], autograph=False)
  def serve(images):
    return {OUTPUT_NAME: converted(module.weights, images)}

  module.serve = serve
  scratch = tempfile.mkdtemp(prefix="agejax-export-")
  local = os.path.join(scratch, SAVED_MODEL_DIR)  # made by TensorFlow, with the umask's permissions
  try:
    tf.saved_model.save(module, local, signatures={"serving_default": serve})
    destination = storage.path(target)
    if destination.exists():
      destination.rmtree()
    if storage.is_url(destination):
      for root, _, files in os.walk(local):
        folder = destination / os.path.relpath(root, local)
        for name in files:
          storage.path(os.path.join(root, name)).copy(folder / name, overwrite=True)
    else:
      shutil.move(local, destination)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def export_workdir(
  workdir: storage.Location,
  output: storage.Location,
  checkpoint: str | int = "best",
  *,
  calibrated: bool = True,
  saved_model: bool = True,
  platforms: Sequence[str] = PLATFORMS,
) -> dict[str, Any]:
  """Exports a trained workdir's checkpoint to OUT/model.jax, OUT/saved_model/ and OUT/manifest.json.

  The exported function is the evaluation path's preprocessing (resize to the model's image size,
  normalise), the model and softmax(logits / temperature), on uint8 crops of the stored face size S.

  Args:
    workdir: the training workdir (a path or a gs:// URL).
    output: the export folder (a path or a gs:// URL); files already there are replaced.
    checkpoint: 'best' (lowest eval MAE), 'latest' or a step number.
    calibrated: apply WORKDIR/calibration.json's temperature when the workdir has one.
    saved_model: also write the TensorFlow SavedModel.
    platforms: where model.jax and the SavedModel may run (a subset of 'cpu', 'cuda', 'rocm', 'tpu').

  Returns:
    The manifest (also written to OUT/manifest.json).
  """
  from agejax.inference import prediction  # the model code: ExportedPredictor must not need it

  if not storage.path(workdir).is_dir():
    raise errors.MissingInput(f"workdir {storage.path(workdir)} does not exist")
  unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
  if unknown or not platforms:
    raise errors.UserError(f"platforms={list(platforms)}: use some of cpu, cuda, rocm, tpu")
  if saved_model:
    _saved_model_tools()  # before any work
  out = storage.check_writable(output, "export folder")
  predictor = prediction.Predictor(workdir, checkpoint, calibrated=calibrated)
  size = predictor.input_size
  # Host copies: the export holds plain arrays, not arrays laid out over this machine's devices.
  leaves, treedef = jax.tree.flatten(jax.device_get((predictor.state.params, predictor.state.model_state)))
  fn = _probabilities_fn(predictor, treedef)

  exported = jax_export.export(jax.jit(lambda images: fn(leaves, images)), platforms=tuple(platforms))(
    _input_spec(size)
  )
  _write_bytes(out / MODEL_FILE, bytes(exported.serialize()))
  if saved_model:
    _write_saved_model(fn, leaves, size, platforms, out / SAVED_MODEL_DIR)
  elif (out / SAVED_MODEL_DIR).exists():
    (out / SAVED_MODEL_DIR).rmtree()  # never leave one from another model beside this manifest
  manifest = {
    "format": FORMAT,
    "input_size": size,
    "image_size": predictor.model.image_size,
    "min_age": int(predictor.bins[0]),
    "max_age": int(predictor.bins[-1]),
    "model": predictor.cfg.model.name,
    "input_spec": predictor.model.input_spec.to_json(),
    "num_bins": len(predictor.bins),
    "temperature": float(predictor.temperature),
    "calibrated": calibrated and calibration.load_temperature(workdir) is not None,
    "step": predictor.step,
    "checkpoint": str(checkpoint),
    "workdir": os.fspath(storage.path(workdir)),
    "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["B", size, size, 3], "channels": "RGB"},
    "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["B", len(predictor.bins)]},
    "platforms": list(exported.platforms),
    "files": {"jax": MODEL_FILE, "saved_model": SAVED_MODEL_DIR if saved_model else None},
    "agejax_version": agejax.__version__,
    "jax_version": jax.__version__,
    "calling_convention_version": exported.calling_convention_version,
  }
  if predictor.record.get("framing"):  # where photos' faces are warped to, as the training crops were framed
    manifest["framing"] = predictor.record["framing"]
  storage.write_json(out / MANIFEST_FILE, manifest)  # last: a manifest means a complete export
  return manifest


def load_manifest(path: storage.Location) -> dict[str, Any]:
  """Returns OUT/manifest.json of an export folder."""
  file = storage.path(path) / MANIFEST_FILE
  if not file.exists():
    raise errors.MissingInput(
      f"{file} does not exist: not an export folder (make one: {EXPORT_COMMAND.format(output=path)})"
    )
  manifest = storage.read_json_object(file)
  missing = [k for k in ("input_size", "min_age", "max_age", "temperature", "step") if k not in manifest]
  if missing:
    raise errors.UserError(f"{file}: missing {', '.join(missing)}; export the workdir again")
  return manifest


class ExportedPredictor:
  """An exported model (OUT/model.jax + OUT/manifest.json) with Predictor's interface, needing only jax.

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
    self.manifest = load_manifest(self.path)
    model = self.path / MODEL_FILE
    if not model.exists():
      raise errors.MissingInput(f"{model} does not exist: export again ({EXPORT_COMMAND.format(output=path)})")
    try:
      self.exported = jax_export.deserialize(bytearray(model.read_bytes()))
    except Exception as e:  # jax raises ValueError, flatbuffers IndexError or struct.error on a damaged file
      raise errors.UserError(f"{model}: not a jax.export file ({storage.first_line(e)}); export again") from None
    self.input_size = int(self.manifest["input_size"])
    self.min_age, self.max_age = int(self.manifest["min_age"]), int(self.manifest["max_age"])
    self.bins = labels.age_bins(self.min_age, self.max_age)
    self.temperature = float(self.manifest["temperature"])
    self.step = int(self.manifest["step"])
    self.input_spec = self.manifest.get("input_spec")  # what the model inside normalises to (None: before specs)
    self.framing = framing.from_record(self.manifest)  # None: the fixed-margin crop
    self.batch_size = batch_size
    (out,) = self.exported.out_avals
    if out.shape[-1] != len(self.bins):
      raise errors.UserError(f"{model} returns {out.shape[-1]} ages but the manifest names {len(self.bins)}")
    self._call = jax.jit(self.exported.call)

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
