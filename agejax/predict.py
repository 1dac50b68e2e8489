"""Use a trained model: load a checkpoint, detect and align faces in photos, predict age distributions."""

import collections
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterable, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from agejax import checkpointing, errors, labels, parallel, steps, storage
from agejax.data import faces

TRAIN_COMMAND = "python scripts/train.py --config configs/vgg16_kl.py --workdir {workdir}"
CHECKPOINT_CHOICES = "best, latest or a step number"
# The crop's side over the detector box's longer side: MTCNN boxes hug brow-to-chin, while
# UTKFace's aligned chips (what the models are trained on) show the whole head with some margin.
FACE_MARGIN = 1.4
DETECT_MAX_SIDE = 1024  # MTCNN's image pyramid is slow on big photos; faces stay findable at this size
MIN_CONFIDENCE = 0.9
PLOT_MAX_INSETS = 3


def load_config(workdir: storage.Location) -> ml_collections.ConfigDict:
  """Returns the training config the trainer saved as WORKDIR/config.json."""
  path = storage.path(workdir) / "config.json"
  if not path.exists():
    raise errors.MissingInput(f"{path} does not exist: pass the training config with --config")
  return ml_collections.ConfigDict(storage.read_json_object(path))


def resolve_step(ckpts: checkpointing.Checkpoints, checkpoint: str | int, workdir: str | os.PathLike) -> int:
  """Returns the step that `checkpoint` ('best', 'latest' or a step number) names in WORKDIR."""
  latest = ckpts.latest_step()
  if latest is None:
    raise errors.MissingInput(no_checkpoints_message(workdir))
  checkpoint = str(checkpoint)
  if checkpoint == "latest":
    return latest
  if checkpoint == "best":
    best = ckpts.best_step()
    if best is None:  # a run stopped before its first evaluation has no ranked checkpoint
      logging.warning("%s has no evaluated checkpoint; using the latest, step %d", ckpts.directory, latest)
      return latest
    return best
  available = sorted(ckpts.manager.all_steps())
  if not checkpoint.isdigit():
    raise errors.UserError(f"--checkpoint={checkpoint!r}: use {CHECKPOINT_CHOICES} (available steps: {available})")
  if int(checkpoint) not in available:
    raise errors.UserError(f"--checkpoint={checkpoint}: no such step in {ckpts.directory} (available: {available})")
  return int(checkpoint)


def no_checkpoints_message(workdir: str | os.PathLike) -> str:
  """The one-line error for a workdir that holds no trained model."""
  return (f"{workdir} holds no checkpoints; train a model first: "
          + TRAIN_COMMAND.format(workdir=workdir))


def load_trained(workdir: str | os.PathLike, checkpoint: str | int = "best",
                 config: ml_collections.ConfigDict | None = None
                 ) -> tuple[ml_collections.ConfigDict, steps.Steps, steps.TrainState]:
  """Restores WORKDIR's 'best', 'latest' or numbered checkpoint, replicated over the device mesh.

  `config` defaults to the WORKDIR/config.json the trainer wrote. Nothing is allocated before the
  restore: the target is the abstract shape of the state the trainer builds.
  """
  workdir = storage.path(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise errors.MissingInput(no_checkpoints_message(workdir))
  config = load_config(workdir) if config is None else config
  ckpts = checkpointing.Checkpoints(workdir / "checkpoints", read_only=True)
  try:
    step = resolve_step(ckpts, checkpoint, workdir)
    # Restoring needs the optimizer state's structure, not the schedule's values, so one step per
    # epoch stands in for the training set's size (the data need not be on this machine).
    fns, abstract, _ = steps.create(config, 1, abstract=True)
    replicated = parallel.replicated(parallel.make_mesh())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    state = ckpts.restore(target, step)
  finally:
    ckpts.close()
  return config, fns, state


@jax.jit
def summaries(probs: jax.Array, bins: jax.Array) -> dict[str, jax.Array]:
  """Returns each distribution's expected age, most probable age and std (one compiled call)."""
  return {"predicted_age": labels.expected_age(probs, bins), "argmax_age": labels.argmax_age(probs, bins),
          "std": labels.distribution_std(probs, bins)}


def distributions(fns: steps.Steps, state: steps.TrainState, images: jax.Array, flip: bool = False) -> jax.Array:
  """Returns predicted age distributions [B, K] of a uint8 batch; `flip` averages in the mirror images."""
  probs = fns.predict(state.params, state.model_state, images)
  if flip:
    # A mirrored face is an equally valid view: averaging both is test-time augmentation.
    probs = 0.5 * (probs + fns.predict(state.params, state.model_state, images[:, :, ::-1]))
  return probs


class Predictor:
  """A restored model with a jitted, data-parallel prediction over the device mesh."""

  def __init__(self, workdir: str | os.PathLike, checkpoint: str | int = "best",
               config: ml_collections.ConfigDict | None = None, *, flip: bool = False,
               batch_size: int | None = None):
    if batch_size is not None and batch_size < 1:
      raise errors.UserError(f"batch_size={batch_size}: must be a positive number of faces per model call (None: the "
                       f"config's eval batch)")
    self.config, self.steps, self.state = load_trained(workdir, checkpoint, config)
    self.step = int(self.state.step)
    self.bins = np.asarray(self.steps.bins)
    self.mesh = parallel.make_mesh()
    n = jax.device_count()
    size = batch_size or self.config.get("eval_batch_size", 0) or self.config.batch_size
    self.batch_size = -(-size // n) * n  # every device gets an equal slice
    self.sharding = parallel.data_sharded(self.mesh)
    self.predict_device = jax.jit(functools.partial(distributions, self.steps, flip=flip),
                                  in_shardings=(parallel.replicated(self.mesh), self.sharding),
                                  out_shardings=parallel.replicated(self.mesh))

  @functools.cached_property
  def stored_size(self) -> int:
    """The side of the dataset's stored faces: new faces are cropped to it, as the training data was."""
    from agejax.data import pipeline
    data = self.config.data
    builder = pipeline.get_builder(data.name, data.data_dir, data.get("builder_config", ""))
    return int(builder.info.features["image"].shape[0])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Returns distributions [N, K] for uint8 images [N, H, W, 3], run in padded batches."""
    out, in_flight = [], parallel.InFlight()
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      # Padding with copies keeps one compiled shape; the extra rows are dropped below.
      batch = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
      out.append(in_flight.add(self.predict_device(self.state, jax.device_put(batch, self.sharding))))
    if not out:
      return np.zeros((0, len(self.bins)), np.float32)
    return np.concatenate(jax.device_get(out))[:len(images)]


@dataclasses.dataclass
class Detection:
  """A detected face in the photo's pixels: box (x, y, width, height) and the two eye centres."""
  box: tuple[float, float, float, float]
  left_eye: tuple[float, float]
  right_eye: tuple[float, float]
  confidence: float


class FaceDetector:
  """MTCNN (TensorFlow, CPU) run on a copy of the photo downscaled to at most `max_side` pixels."""

  def __init__(self, max_side: int = DETECT_MAX_SIDE, min_confidence: float = MIN_CONFIDENCE):
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")  # JAX owns the accelerators
    from mtcnn import MTCNN
    self.max_side, self.min_confidence = max_side, min_confidence
    self.mtcnn = MTCNN(device="CPU:0")

  def __call__(self, photo: Image.Image) -> list[Detection]:
    """Returns the faces found in an RGB photo, most confident first, in the photo's coordinates."""
    scale = min(1.0, self.max_side / max(photo.size))
    small = photo
    if scale < 1.0:
      small = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
                           Image.Resampling.BILINEAR, reducing_gap=2.0)
    found = self.mtcnn.detect_faces(np.asarray(small))
    out = []
    for face in sorted(found, key=lambda f: -f["confidence"]):
      if face["confidence"] < self.min_confidence:
        continue
      x, y, w, h = (float(v) / scale for v in face["box"])
      eyes = face["keypoints"]
      out.append(Detection((x, y, w, h), tuple(float(v) / scale for v in eyes["left_eye"]),
                           tuple(float(v) / scale for v in eyes["right_eye"]), float(face["confidence"])))
    return out


def align_face(photo: Image.Image, detection: Detection, size: int, margin: float = FACE_MARGIN) -> np.ndarray:
  """Rotates the face upright (eyes level) and crops a square, `margin` x its box, as size x size uint8."""
  (lx, ly), (rx, ry) = sorted([detection.left_eye, detection.right_eye])
  angle = math.atan2(ry - ly, rx - lx)
  x, y, w, h = detection.box
  cx, cy = x + w / 2, y + h / 2
  side = margin * max(w, h)
  # Crop at the photo's own resolution, then downscale with antialiasing (PIL's affine has none).
  n = max(1, round(side))
  k, cos, sin = side / n, math.cos(angle), math.sin(angle)
  # PIL's affine maps each output pixel (u, v) to the input (a u + b v + c, d u + e v + f): here a
  # rotation by the eye angle about the box centre, so the crop's x axis runs along the eye line.
  a, b, d, e = k * cos, -k * sin, k * sin, k * cos
  coeffs = (a, b, cx - (a + b) * n / 2, d, e, cy - (d + e) * n / 2)
  chip = photo.transform((n, n), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC,
                         fillcolor=(0, 0, 0))  # black outside the photo, as in the training crops
  if n != size:
    chip = chip.resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(chip, dtype=np.uint8)


@dataclasses.dataclass
class Face:
  """One face's box in its photo and, once predicted, its age distribution and summaries."""
  box: tuple[float, float, float, float]
  chip: np.ndarray | None = None  # the model's input, kept with the photo for plotting
  distribution: np.ndarray | None = None
  predicted_age: float = math.nan
  argmax_age: float = math.nan
  std: float = math.nan


@dataclasses.dataclass
class ImageResult:
  """A file's outcome: status 'ok' with its faces, 'no face found', or why it was skipped."""
  file: str
  status: str
  faces: list[Face] = dataclasses.field(default_factory=list)
  photo: Image.Image | None = None  # kept only when asked for (plotting)


def list_files(inputs: Iterable[storage.Location]) -> list[epath.Path]:
  """Expands folders (recursively, sorted) into their files; other paths and URLs are kept as given."""
  files = []
  for item in map(epath.Path, inputs):
    if item.is_dir():  # walk, not rglob: epath refuses recursive globs (thousands of requests on GCS)
      files.extend(sorted(epath.Path(root) / name for root, _, names in item.walk() for name in names))
    else:
      files.append(item)
  return files


def predict_files(predictor: Predictor, files: Iterable[str | os.PathLike], *, aligned: bool = False,
                  detector: FaceDetector | None = None, keep_photos: int = 0) -> Iterator[ImageResult]:
  """Yields each file's result in order; faces from several files share padded batches.

  With `aligned`, each file is one face crop (centre square, as training read them); otherwise
  `detector` finds the faces, which are aligned and cropped like the dataset's faces. The first
  `keep_photos` results that have faces keep their photo for plotting.
  """
  size = predictor.stored_size
  pending: collections.deque[ImageResult] = collections.deque()
  chips: list[np.ndarray] = []
  waiting: list[Face] = []
  kept = 0

  def fill() -> None:
    probs = predictor(np.stack(chips))
    stats = jax.device_get(summaries(probs, predictor.bins))
    for i, face in enumerate(waiting):
      face.distribution = probs[i]
      face.predicted_age, face.argmax_age, face.std = (
          float(stats[k][i]) for k in ("predicted_age", "argmax_age", "std"))
    chips.clear()
    waiting.clear()

  for path in files:
    photo = faces.open_rgb(path)
    if isinstance(photo, str):
      result, new_chips = ImageResult(str(path), photo), []
    elif aligned:
      result = ImageResult(str(path), "ok", [Face(faces.centre_square_box(*photo.size))])
      new_chips = [faces.centre_square(photo, size)]
    else:
      found = detector(photo)
      result = ImageResult(str(path), "ok" if found else "no face found", [Face(d.box) for d in found])
      new_chips = [align_face(photo, d, size) for d in found]
    if result.faces and kept < keep_photos:
      result.photo, kept = photo, kept + 1
      for face, chip in zip(result.faces, new_chips):
        face.chip = chip
    chips.extend(new_chips)
    waiting.extend(result.faces)
    pending.append(result)
    if len(chips) >= predictor.batch_size:
      fill()
    if not chips:  # nothing awaits the model: every pending result is complete
      while pending:
        yield pending.popleft()
  if chips:
    fill()
  yield from pending


def to_json(result: ImageResult, min_age: int) -> list[dict]:
  """Returns the JSON objects of a result: one per face, or one with the file's status."""
  if not result.faces:
    return [{"file": result.file, "status": result.status}]
  return [{"file": result.file, "status": result.status, "face": i, "box": [round(v, 1) for v in f.box],
           "predicted_age": f.predicted_age, "argmax_age": f.argmax_age, "std": f.std,
           "min_age": min_age, "distribution": f.distribution.tolist()} for i, f in enumerate(result.faces)]


def to_lines(result: ImageResult) -> list[str]:
  """Returns the human-readable lines of a result: one per face, or the file's status."""
  if not result.faces:
    return [f"{result.file}  {'' if result.status == 'no face found' else 'skipped: '}{result.status}"]
  return [f"{result.file}  face {i}  box {','.join(str(round(v)) for v in f.box)}  age {f.predicted_age:.1f}"
          f"  argmax {f.argmax_age:.0f}  std {f.std:.1f}" for i, f in enumerate(result.faces)]


def plot_results(results: list[ImageResult], bins: np.ndarray, path: storage.Location) -> None:
  """Saves a PNG: each photo with its face boxes and ages, beside the faces' predicted distributions.

  The first few faces' model inputs (aligned crops) are inset above their distributions.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  rows = [r for r in results if r.photo is not None]
  if not rows:
    raise errors.UserError("no faces to plot")
  fig = Figure(figsize=(10, 4 * len(rows)), layout="constrained")
  FigureCanvasAgg(fig)
  colours = [f"C{i}" for i in range(10)]
  for row, result in enumerate(rows):
    ax_photo, ax_dist = fig.add_subplot(len(rows), 2, 2 * row + 1), fig.add_subplot(len(rows), 2, 2 * row + 2)
    ax_photo.imshow(result.photo)
    ax_photo.set_title(epath.Path(result.file).name)
    ax_photo.axis("off")
    for i, face in enumerate(result.faces):
      x, y, w, h = face.box
      colour = colours[i % len(colours)]
      ax_photo.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2))
      ax_photo.text(x, y, f"{i}: {face.predicted_age:.1f}", color="white", fontsize=11, va="bottom",
                    bbox=dict(facecolor=colour, edgecolor="none", pad=2))
      ax_dist.bar(bins, face.distribution, width=1.0, color=colour, alpha=0.6,
                  label=f"face {i}: {face.predicted_age:.1f} ± {face.std:.1f}")
      ax_dist.axvline(face.predicted_age, color=colour, linestyle="--")
      if i < PLOT_MAX_INSETS:
        inset = ax_dist.inset_axes((0.01 + 0.17 * i, 0.62, 0.16, 0.36))
        inset.imshow(face.chip)
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
          spine.set_edgecolor(colour)
          spine.set_linewidth(2)
    ax_dist.set_xlabel("age (years)")
    ax_dist.set_ylabel("probability")
    ax_dist.set_title("predicted age distribution")
    ax_dist.legend()
  with storage.path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=80)
