"""A trained model for use without agejax: a jax.export file, a TensorFlow SavedModel, ONNX and their manifest.

`export_workdir` writes OUT/model.jax (preprocessing + model + tempered softmax, serialized with
jax.export for CPU, CUDA and TPU: uint8 RGB face crops [B, S, S, 3], any B, -> float32 probabilities
[B, K], the weights inside), OUT/saved_model/ (the same function through jax2tf, the weights as
variables), OUT/model.onnx (the same function through jax2onnx, for onnxruntime) and
OUT/manifest.json (what the numbers mean, every file's SHA-256 and a reference prediction). An
export made with `flip` averages each face's distribution with its mirror image's in every format,
tempered by calibration.json's flip temperature; the manifest records `flip` and the calibration
(temperature, the 80% interval's masses by age bucket), which `ExportedPredictor` carries.

An export is whole or absent: it is written into a sibling folder and swapped in by renames, so a
failed or killed export leaves the previous export or nothing. `ExportedPredictor` runs OUT/model.jax
with only jax and numpy (no model code, Flax or TensorFlow is imported to serve an export) and
refuses, in one line naming the file, a manifest with a bad field, a model.jax whose checksum or
shapes differ from the manifest, or one whose reference prediction is not what the export recorded.
"""

import contextlib
import hashlib
import io
import json
import logging as std_logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax import export as jax_export
from jax.extend import core as jax_core

import agejax
from agejax import errors, labels, parallel, storage
from agejax.data import framing
from agejax.evaluation import calibration

if TYPE_CHECKING:  # the model code is imported only to export, never to serve an export
  from agejax.inference import prediction

MODEL_FILE = "model.jax"
MANIFEST_FILE = "manifest.json"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
ENTRIES = (MANIFEST_FILE, MODEL_FILE, ONNX_FILE, SAVED_MODEL_DIR)  # everything an export folder may hold
# The manifest's layout; a change that breaks readers bumps it. 2: checksums, a reference prediction, no workdir path.
FORMAT = "agejax-export/2"
# One file runs on any of these: jax.export lowers for platforms this machine lacks.
PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"  # the SavedModel's serving signature and ONNX's names
DEFAULT_BATCH_SIZE = 32
EXPORT_COMMAND = "python scripts/export.py --workdir DIR --output {output}"
# How far a load may stray from the reference prediction the export recorded: another platform's
# float32 (TF32 convolutions on a GPU) moves probabilities by ~1e-3; a damaged model or changed ages move more.
REFERENCE_ATOL = 5e-3
REFERENCE_AGE_ATOL = 0.1  # years
ONNX_ATOL = 1e-4  # onnxruntime against jax on the reference crops, checked at export
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STAGING = r"^{name}\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{{8}}$"  # the sibling folders a swap uses


def _probabilities_fn(
  predictor: "prediction.Predictor", treedef: jax.tree_util.PyTreeDef
) -> Callable[[list, jax.Array], jax.Array]:
  """Returns f(weight leaves, uint8 images) -> probabilities through `AgeModel.distributions`: the same numbers.

  The predictor's way of predicting (single views or flip averages) with that way's temperature.
  """
  temperature, flip = np.float32(predictor.temperature), predictor.flip

  def probabilities(leaves: list, images: jax.Array) -> jax.Array:
    params, model_state = jax.tree.unflatten(treedef, leaves)
    return predictor.model.distributions(_Weights(params, model_state), images, temperature, flip)

  return probabilities


class _Weights(NamedTuple):
  params: Any
  model_state: Any


def _input_spec(size: int) -> jax.ShapeDtypeStruct:
  """uint8 [B, size, size, 3] with a symbolic batch B >= 1."""
  (batch,) = jax_export.symbolic_shape("B")
  return jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8)


def reference_crop(size: int) -> np.ndarray:
  """The fixed synthetic crop whose prediction an export records, uint8 [1, S, S, 3]: red down, green across."""
  ramp = np.linspace(0.0, 255.0, size)
  red, green = np.meshgrid(ramp, ramp, indexing="ij")
  return np.round(np.stack([red, green, (red + green) / 2], -1)).astype(np.uint8)[None]


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


def _write_saved_model(fn: Callable, leaves: list, size: int, platforms: Sequence[str], target: str) -> None:
  """Writes `fn` as a TensorFlow SavedModel at the local folder `target`: serving_default(images) -> {probabilities}."""
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
  tf.saved_model.save(module, target, signatures={"serving_default": serve})


def _block_max(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """A max-pool whose windows tile the input, as reshape + max (ONNX's MaxPool takes at most 3 spatial axes)."""
  shape: list[Any] = []
  axes = []
  for n, w in zip(x.shape, window):
    if w > 1:
      axes.append(len(shape) + 1)
      shape += [n // w, w]
    else:
      shape.append(n)
  return jnp.max(jnp.reshape(x, shape), axis=tuple(axes))


def _tiles(params: dict[str, Any], shape: Sequence[Any]) -> bool:
  """True for a reduce_window whose windows are its strides, unpadded, undilated, and divide the input."""
  window = params["window_dimensions"]
  return (
    tuple(params["window_strides"]) == tuple(window)
    and all(p == (0, 0) for p in params["padding"])
    and all(d == 1 for d in (*params["base_dilation"], *params["window_dilation"]))
    and all(w == 1 or (isinstance(n, int) and n % w == 0) for n, w in zip(shape, window))
  )


def _inline(jaxpr: jax_core.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
  """Evaluates a jaxpr equation by equation: nested jits inlined, tiling max-pools as reshape + max.

  jax2onnx then traces primitives only, never its own plug-ins for jax.image.resize (which refuses
  antialiasing and a symbolic batch) or flax's max_pool, and it writes no rank-4 MaxPool, which
  onnxruntime cannot run.
  """
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]  # noqa: E731
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in ("jit", "pjit"):
      inner = eqn.params["jaxpr"]
      outs = _inline(inner.jaxpr, inner.consts, *ins)
    elif name == "reduce_window_max" and _tiles(eqn.params, ins[0].shape):
      outs = [_block_max(ins[0], eqn.params["window_dimensions"])]
    else:
      out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
      outs = out if eqn.primitive.multiple_results else [out]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _write_onnx(
  fn: Callable, leaves: list, size: int, target: str, crops: np.ndarray, expected: np.ndarray
) -> str | None:
  """Writes `fn` as ONNX with a dynamic batch through jax2onnx, checked in onnxruntime on `crops`.

  Returns None, or why model.onnx was not written (an op jax2onnx or onnxruntime cannot handle).
  """
  try:
    import jax2onnx
  except ImportError as e:
    return f"jax2onnx is not installed ({e}; pip install jax2onnx)"
  spec = _input_spec(size)
  closed = jax.make_jaxpr(lambda images: fn(leaves, images))(spec)  # the weights become the jaxpr's constants
  # onnx_ir warns of every constant's value type; jax2onnx logs a traceback for each optional plug-in
  # (dm_pix, equinox) that fails to import. None of it is the user's business.
  quiet = [std_logging.getLogger(name) for name in ("onnx_ir", "jax2onnx")]
  levels = [logger.level for logger in quiet]
  try:
    for logger in quiet:
      logger.setLevel(std_logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx prints debug lines
      model = jax2onnx.to_onnx(
        lambda images: _inline(closed.jaxpr, closed.consts, images)[0],
        inputs=[spec],
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        model_name="agejax",
      )
  except Exception as e:  # jax2onnx raises NotImplementedError, TypeError or ValueError for what it cannot convert
    op = re.search(r"primitive '([^']+)'", str(e))
    return f"jax2onnx cannot convert {f'the op {op[1]!r}' if op else 'the model'} ({storage.first_line(e)})"
  finally:
    for logger, level in zip(quiet, levels):
      logger.setLevel(level)
  with open(target, "wb") as f:
    f.write(model.SerializeToString())
  try:
    import onnxruntime
  except ImportError:
    return None  # written, but not checked here
  try:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its shape-merging warnings are about intermediate values
    session = onnxruntime.InferenceSession(target, options, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {INPUT_NAME: crops[i : i + n]})[0] for i, n in ((0, 1), (1, 2))])
  except Exception as e:  # onnxruntime's errors name the node: "... running MaxPool node. Name:..."
    os.remove(target)
    op = re.search(r"running (\w+) node", str(e))
    return f"onnxruntime cannot run {f'the op {op[1]!r}' if op else 'it'} ({storage.first_line(e)})"
  error = float(np.abs(got - expected).max()) if np.all(np.isfinite(got)) else math.inf
  if error > ONNX_ATOL:
    os.remove(target)
    return f"onnxruntime's probabilities differ from jax's by {error:.2g} (more than {ONNX_ATOL:g})"
  return None


def _sha256(file: epath.Path) -> str:
  digest = hashlib.sha256()
  with file.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _checksums(folder: str) -> dict[str, str]:
  """SHA-256 of every file under a local folder but the manifest, by '/'-separated relative path."""
  sums = {}
  for root, _, files in os.walk(folder):
    for name in files:
      file = os.path.join(root, name)
      relative = os.path.relpath(file, folder).replace(os.sep, "/")
      if relative != MANIFEST_FILE:
        sums[relative] = _sha256(epath.Path(file))
  return dict(sorted(sums.items()))


def _check_destination(out: epath.Path) -> None:
  """Refuses, before any work, an output that is a file, cannot be written, or holds more than an export."""
  if out.exists():
    if not out.is_dir():
      raise errors.UserError(f"export folder {out} is not writable: it is a file")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ENTRIES)
    if foreign:
      raise errors.UserError(
        f"export folder {out} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, which no "
        f"export writes: give a new or empty folder (an export replaces its folder whole)"
      )
  if storage.is_url(out):
    storage.check_writable(out.parent, "export folder")  # object stores have no folders to create
    return
  existing = out.parent
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    reason = "a file" if not existing.is_dir() else "read-only"
    raise errors.UserError(f"export folder {out} is not writable: {existing} is {reason}")


def _swap(staged: epath.Path, out: epath.Path, tag: str) -> None:
  """Puts the complete local export `staged` at `out` by renames (atomic): the old one moves aside first."""
  old = None
  if out.exists():
    old = out.parent / f"{out.name}.old-{tag}"
    out.rename(old)
  try:
    staged.rename(out)
  except BaseException:
    if old is not None and not out.exists():
      old.rename(out)  # the previous export back in place
    raise
  if old is not None:
    old.rmtree()


def _replace_objects(staged: epath.Path, out: epath.Path, names: Sequence[str]) -> None:
  """Puts the complete export `staged` (files `names`) at the URL `out`, where no rename is atomic.

  The old manifest goes first and the new one comes last, so a reader finds the new export whole,
  or no manifest ("not an export folder"), never a manifest beside another export's files.
  """
  if (out / MANIFEST_FILE).exists():
    (out / MANIFEST_FILE).unlink()
  for name in sorted(names, key=lambda n: n == MANIFEST_FILE):  # the manifest last
    (staged / name).copy(out / name, overwrite=True)
  for folder, _, files in out.walk():  # the old export's files the new one lacks (a SavedModel no longer written)
    for name in files:
      if os.path.relpath(os.fspath(folder / name), os.fspath(out)) not in names:
        (folder / name).unlink()


def _remove_stale(out: epath.Path) -> None:
  """Removes the staging folders that killed exports to a local `out` left beside it."""
  if storage.is_url(out):
    return  # a process on another host may own them
  pattern = re.compile(_STAGING.format(name=re.escape(out.name)))
  for entry in out.parent.iterdir():
    match = pattern.match(entry.name)
    if match and not storage.process_running(int(match["pid"])):
      shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _staged(out: epath.Path) -> Iterator[str]:
  """Yields a local folder to write an export into; on success it replaces `out` whole, else `out` is untouched.

  Locally the folder is OUT.tmp-PID-XXXXXXXX beside OUT (same file system: the swap is renames); a
  gs:// export is written in a local scratch folder, uploaded to that sibling and then copied into OUT
  (see _replace_objects: whole or refused at load there, as object stores have no atomic rename).
  """
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  staged = out.parent / f"{out.name}.tmp-{tag}"
  url = storage.is_url(out)
  created = None  # the first folder above OUT this export makes: removed again if it fails
  if not url:
    created = next((p for p in reversed([out.parent, *out.parent.parents]) if not p.exists()), None)
  local = tempfile.mkdtemp(prefix="agejax-export-") if url else os.fspath(staged)
  try:
    if not url:
      staged.mkdir(parents=True)
    yield local
    if url:
      names = [os.path.relpath(os.path.join(root, n), local) for root, _, files in os.walk(local) for n in files]
      for name in names:  # uploaded beside OUT first: a failed upload leaves the previous export as it was
        epath.Path(local, name).copy(staged / name, overwrite=True)
      _replace_objects(staged, out, names)
    else:
      _swap(staged, out, tag)
  except BaseException:
    if not url and staged.exists():
      staged.rmtree()
    if created is not None:
      for folder in [out.parent, *out.parent.parents]:  # only the empty folders this export made
        if not folder.exists() or any(folder.iterdir()):
          break
        folder.rmdir()
        if folder == created:
          break
    raise
  finally:
    if url:
      shutil.rmtree(local, ignore_errors=True)
      if staged.exists():
        staged.rmtree()
  _remove_stale(out)


def _local_platform() -> str:
  """This process's default JAX platform as jax.export names it ('cpu', 'cuda', 'rocm' or 'tpu')."""
  platform = jax.default_backend()
  if platform == "gpu":
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
  return platform


def export_workdir(
  workdir: storage.Location,
  output: storage.Location,
  checkpoint: str | int = "best",
  *,
  calibrated: bool = True,
  flip: bool = False,
  saved_model: bool = True,
  onnx: bool = True,
  platforms: Sequence[str] = PLATFORMS,
) -> dict[str, Any]:
  """Exports a trained workdir's checkpoint to OUT/model.jax, OUT/saved_model/, OUT/model.onnx and OUT/manifest.json.

  The exported function is the evaluation path's preprocessing (resize to the model's image size,
  normalise), the model (with `flip`, the mean of each face's and its mirror image's distributions)
  and the tempered distribution (`labels.tempered`), on uint8 crops of the stored face size S.
  The folder is replaced whole, and only once the new export has loaded and passed its checks.

  Args:
    workdir: the training workdir (a path or a gs:// URL).
    output: the export folder (a path or a gs:// URL): new, empty, or an earlier export, which is replaced.
    checkpoint: 'best' (lowest eval MAE), 'latest' or a step number.
    calibrated: apply WORKDIR/calibration.json's calibration of this way of predicting when the workdir has one.
    flip: every format averages each face's distribution with its mirror image's (and applies the
      flip way's calibration); the manifest records it.
    saved_model: also write the TensorFlow SavedModel.
    onnx: also write model.onnx (skipped with a warning naming the op when jax2onnx or onnxruntime cannot).
    platforms: where model.jax and the SavedModel may run (a subset of 'cpu', 'cuda', 'rocm', 'tpu').

  Returns:
    The manifest (also written to OUT/manifest.json), with `onnx_skipped` saying why when model.onnx is absent.
  """
  from agejax.inference import prediction  # the model code: ExportedPredictor must not need it

  if not storage.path(workdir).is_dir():
    raise errors.MissingInput(f"workdir {storage.path(workdir)} does not exist")
  unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
  if unknown or not platforms:
    raise errors.UserError(f"platforms={list(platforms)}: use some of cpu, cuda, rocm, tpu")
  if saved_model:
    _saved_model_tools()  # before any work
  out = storage.path(output)
  _check_destination(out)
  predictor = prediction.Predictor(workdir, checkpoint, calibrated=calibrated, flip=flip)  # nothing written before
  size = predictor.input_size
  # Host copies: the export holds plain arrays, not arrays laid out over this machine's devices.
  leaves, treedef = jax.tree.flatten(jax.device_get((predictor.state.params, predictor.state.model_state)))
  fn = _probabilities_fn(predictor, treedef)
  exported = jax_export.export(jax.jit(lambda images: fn(leaves, images)), platforms=tuple(platforms))(
    _input_spec(size)
  )
  # The reference crop, its mirror and its negative: one fixed input recorded, three checked in ONNX (batches 1 and 2).
  crop = reference_crop(size)
  crops = np.concatenate([crop, crop[:, :, ::-1], 255 - crop])
  probabilities = np.asarray(jax.jit(fn)(leaves, crops))
  manifest: dict[str, Any] = {
    "format": FORMAT,
    "input_size": size,
    "image_size": predictor.model.image_size,
    "eval_crop": predictor.model.eval_crop,  # model.jax sees each crop's central fraction, resized to image_size
    "min_age": int(predictor.bins[0]),
    "max_age": int(predictor.bins[-1]),
    "model": predictor.cfg.model.name,
    "input_spec": predictor.model.input_spec.to_json(),
    "num_bins": len(predictor.bins),
    "flip": predictor.flip,
    **predictor.calibration.to_json(),  # temperature, and interval_masses (null: central intervals)
    "calibrated": predictor.calibrated,  # a calibration.json way was applied
    "step": predictor.step,
    "checkpoint": str(checkpoint),
    "run": storage.path(workdir).name,  # the workdir's name only: an export does not carry the builder's paths
    "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["B", size, size, 3], "channels": "RGB"},
    "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["B", len(predictor.bins)]},
    "platforms": list(exported.platforms),
    "reference": {
      "crop": "export.reference_crop(input_size): red = 255 * row / (S - 1), green = 255 * column / (S - 1), "
      "blue = their mean, rounded",
      "distribution": [float(p) for p in probabilities[0]],
      "expected_age": float(probabilities[0].astype(np.float64) @ predictor.bins.astype(np.float64)),
    },
    "agejax_version": agejax.__version__,
    "jax_version": jax.__version__,
    "calling_convention_version": exported.calling_convention_version,
  }
  if predictor.record.get("framing"):  # where photos' faces are warped to, as the training crops were framed
    manifest["framing"] = predictor.record["framing"]
  with _staged(out) as stage:
    with open(os.path.join(stage, MODEL_FILE), "wb") as f:
      f.write(bytes(exported.serialize()))
    if saved_model:
      _write_saved_model(fn, leaves, size, platforms, os.path.join(stage, SAVED_MODEL_DIR))
    skipped = _write_onnx(fn, leaves, size, os.path.join(stage, ONNX_FILE), crops, probabilities) if onnx else None
    if skipped:
      logging.warning("%s not written: %s; model.jax and the other formats are", ONNX_FILE, skipped)
      manifest["onnx_skipped"] = skipped
    manifest["files"] = {
      "jax": MODEL_FILE,
      "saved_model": SAVED_MODEL_DIR if saved_model else None,
      "onnx": ONNX_FILE if os.path.exists(os.path.join(stage, ONNX_FILE)) else None,
    }
    manifest["sha256"] = _checksums(stage)
    storage.write_json(os.path.join(stage, MANIFEST_FILE), manifest)
    if _local_platform() in exported.platforms:
      verify(stage)  # what a server will check, before the export replaces anything
  return manifest


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
      and MODEL_FILE in v
      and all(_safe_name(n) and isinstance(d, str) and _HEX64.match(d) for n, d in v.items())
    ),
    f"an object of files in the folder -> 64 hex digits, with {MODEL_FILE!r}",
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
  aside = []
  if not storage.is_url(folder) and folder.parent.is_dir():
    pattern = re.compile(_STAGING.format(name=re.escape(folder.name)))
    aside = sorted(p.name for p in folder.parent.iterdir() if pattern.match(p.name) and ".old-" in p.name)
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


def _check_digest(file: epath.Path, digest: str, expected: str) -> None:
  if digest != expected:
    raise errors.UserError(
      f"{file}: SHA-256 {digest[:16]}... differs from the manifest's {expected[:16]}...: the file changed after "
      f"export (damaged or replaced); export again"
    )


def verify(path: storage.Location) -> "ExportedPredictor":
  """Checks an export whole: its manifest, model.jax (see ExportedPredictor) and every other file's SHA-256.

  Returns the loaded ExportedPredictor; raises a one-line UserError naming the first file that fails.
  """
  predictor = ExportedPredictor(path)
  listed = predictor.manifest["sha256"]
  for name, expected in listed.items():
    file = predictor.path / name
    if name == MODEL_FILE:
      continue  # checked as it was loaded
    if not file.exists():
      raise errors.MissingInput(f"{file} does not exist, but {predictor.path / MANIFEST_FILE} lists it; export again")
    _check_digest(file, _sha256(file), expected)
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
    self.manifest = load_manifest(self.path)
    model = self.path / MODEL_FILE
    if not model.exists():
      raise errors.MissingInput(f"{model} does not exist: export again ({EXPORT_COMMAND.format(output=path)})")
    data = model.read_bytes()
    _check_digest(model, hashlib.sha256(data).hexdigest(), self.manifest["sha256"][MODEL_FILE])
    try:
      self.exported = jax_export.deserialize(bytearray(data))
    except Exception as e:  # jax raises ValueError, flatbuffers IndexError or struct.error on a damaged file
      raise errors.UserError(f"{model}: not a jax.export file ({storage.first_line(e)}); export again") from None
    self.input_size: int = self.manifest["input_size"]
    self.min_age, self.max_age = self.manifest["min_age"], self.manifest["max_age"]
    self.bins = labels.age_bins(self.min_age, self.max_age)
    self.flip: bool = self.manifest.get("flip", False)  # each face averaged with its mirror image, inside model.jax
    # The central fraction of each crop's side model.jax sees before its resize (the crop is inside model.jax).
    self.eval_crop: float = float(self.manifest.get("eval_crop", 1.0))
    # The temperature inside model.jax, and the 80% interval's masses by age bucket (None: central intervals).
    self.calibration = calibration.Calibration.from_fit(self.manifest, str(self.path / MANIFEST_FILE))
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
    file, s = self.path / MANIFEST_FILE, self.input_size
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
    file, reference = self.path / MANIFEST_FILE, self.manifest["reference"]
    got = self(reference_crop(self.input_size))[0].astype(np.float64)
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
