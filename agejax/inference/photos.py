"""Faces in photos: MTCNN detection, crops framed like the training faces; the file walk; results.

A workdir whose inference.json records the training crops' framing (data/framing.py) gets each
face warped so that its five landmarks land where the training crops have them; one without (and
UTKFace's and the demo's runs) gets the fixed-margin crop levelled on the eyes (`align_face`).
"""

import collections
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image

from agejax import labels, storage
from agejax.data import faces
from agejax.data.framing import MIN_CONFIDENCE, Framing, detect, fit_similarity, load_mtcnn
from agejax.inference import prediction

# The crop's side over the detector box's longer side: MTCNN boxes hug brow-to-chin, while
# UTKFace's aligned chips (what the models are trained on) show the whole head with some margin.
FACE_MARGIN = 1.4
DETECT_MAX_SIDE = 1024  # MTCNN's image pyramid is slow on big photos; faces stay findable at this size
# Candidate boxes kept (the most confident) before each of MTCNN's suppressions: its suppression builds
# several n x n float64 arrays, so a crowd of 900 faces (tens of thousands of candidates) took 6.5 GB.
# With the cap and suppression in blocks of NMS_BLOCK columns, memory is linear in the photo. A busy
# 1024-pixel photo has at most a few hundred candidates at any stage (docs/benchmarks.md).
MAX_CANDIDATES = 2000
NMS_BLOCK = 256
# RNet and ONet see their candidates in batches of at most this many: ONet's first layer alone holds
# 270 KB a candidate (2,000 candidates took 1.2 GB in one call). A photo with fewer runs in one call.
STAGE_BATCH = 256
# Photos are decoded at reduced scale (JPEG's DCT scaling, else one box reduction) with at least this
# shorter side: faces are cropped from it when large enough there, a finer decode otherwise.
WORK_MIN_SIDE = 1536


@dataclasses.dataclass
class Detection:
  """A detected face in the photo's pixels: box (x, y, width, height), the two eye centres, the five landmarks."""

  box: tuple[float, float, float, float]
  left_eye: tuple[float, float]  # MTCNN's, rounded to whole pixels (the fixed-margin crop uses these)
  right_eye: tuple[float, float]
  confidence: float
  landmarks: np.ndarray | None = None  # [5, 2] float, framing.LANDMARKS order (the framed crop uses these)


class Detections(list):
  """Detections, most confident first; `found` counts every face over the confidence bar, also those cut by a cap."""

  def __init__(self, items: Iterable[Detection] = (), found: int | None = None):
    super().__init__(items)
    self.found = len(self) if found is None else found


class FaceDetector:
  """MTCNN (TensorFlow, CPU) run on a copy of the photo downscaled to at most `max_side` pixels.

  Its memory is linear in the photo: at most `max_candidates` boxes enter each suppression, which
  runs in blocks (`suppress`). `max_faces` keeps the most confident faces (None: all).
  """

  def __init__(
    self,
    max_side: int = DETECT_MAX_SIDE,
    min_confidence: float = MIN_CONFIDENCE,
    max_faces: int | None = None,
    max_candidates: int = MAX_CANDIDATES,
  ):
    self.max_side, self.min_confidence, self.max_faces = max_side, min_confidence, max_faces
    self.mtcnn = bounded_mtcnn(max_candidates)

  def __call__(self, photo: Image.Image) -> Detections:
    """Returns the faces found in an RGB photo, most confident first, in the photo's coordinates."""
    scale = min(1.0, self.max_side / max(photo.size))
    small = photo
    if scale < 1.0:
      small = photo.resize(
        (max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
        Image.Resampling.BILINEAR,
        reducing_gap=2.0,
      )
    found, landmarks = detect(self.mtcnn, np.asarray(small))
    out = []
    for face, points in sorted(zip(found, landmarks), key=lambda f: -f[0]["confidence"]):
      if face["confidence"] < self.min_confidence:
        continue
      x, y, w, h = (float(v) / scale for v in face["box"])
      eyes = face["keypoints"]
      left_x, left_y = (float(v) / scale for v in eyes["left_eye"])
      right_x, right_y = (float(v) / scale for v in eyes["right_eye"])
      confidence = float(face["confidence"])
      out.append(Detection((x, y, w, h), (left_x, left_y), (right_x, right_y), confidence, points / scale))
    return Detections(out[: self.max_faces], found=len(out))


def bounded_mtcnn(max_candidates: int = MAX_CANDIDATES):
  """MTCNN on the CPU whose three stages suppress at most `max_candidates` boxes each time, in blocks.

  The stages are mtcnn 1.0's own, step for step, with `suppress` in place of its
  `smart_nms_from_bboxes`: below the cap the boxes are the same.
  """
  load_mtcnn()  # imports TensorFlow with the GPUs hidden (JAX owns the accelerators)
  import tensorflow as tf
  from mtcnn import MTCNN
  from mtcnn.stages import StageONet, StagePNet, StageRNet
  from mtcnn.utils import bboxes as mb
  from mtcnn.utils.images import apply_scales, build_scale_pyramid, extract_patches
  from mtcnn.utils.landmarks import adjust_landmarks

  nms = lambda b, threshold, method, initial_sort: suppress(b, threshold, method, initial_sort, max_candidates)

  def batched(model, images, boxes, size):  # the model's outputs on every box's patch, STAGE_BATCH patches a call
    calls = [
      model(extract_patches(images, boxes[k : k + STAGE_BATCH], expected_size=(size, size)))
      for k in range(0, max(1, len(boxes)), STAGE_BATCH)
    ]
    return calls[0] if len(calls) == 1 else tuple(tf.concat(parts, 0) for parts in zip(*calls))

  class PNet(StagePNet):
    def __call__(self, images_normalized, images_oshapes, min_face_size=20, scale_factor=0.709, **kw):
      threshold, nms1, nms2 = kw.get("threshold_pnet", 0.6), kw.get("nms_pnet1", 0.5), kw.get("nms_pnet2", 0.7)
      groups = [build_scale_pyramid(s[1], s[0], min_face_size=min_face_size, scale_factor=scale_factor)
                for s in images_oshapes]  # fmt: skip
      scaled, scales = apply_scales(images_normalized, groups)
      n = images_normalized.shape[0]
      per_scale = []
      for s, scale in zip(scaled, scales):
        reg, cls = self._model(s)
        boxes = mb.upscale_bboxes(mb.generate_bounding_box(reg, cls, threshold), np.asarray([scale] * n))
        per_scale.append(nms(boxes, nms1, "union", False))
      both = np.concatenate(per_scale, axis=0) if per_scale else np.empty((0, 6))
      return mb.resize_to_square(nms(both, nms2, "union", True))

  class RNet(StageRNet):
    def __call__(self, images_normalized, bboxes_batch, threshold_rnet=0.7, nms_rnet=0.7, **kw):
      offsets, scores = batched(self._model, images_normalized, bboxes_batch, 24)
      boxes = mb.adjust_bboxes(mb.replace_confidence(bboxes_batch, scores), offsets)
      boxes = mb.pick_matches(boxes, score_threshold=threshold_rnet)
      return mb.resize_to_square(nms(boxes, nms_rnet, "union", True))

  class ONet(StageONet):
    def __call__(self, images_normalized, bboxes_batch, threshold_onet=0.8, nms_onet=0.7, **kw):
      offsets, landmarks, scores = batched(self._model, images_normalized, bboxes_batch, 48)
      landmarks = adjust_landmarks(landmarks, bboxes_batch)
      boxes = mb.adjust_bboxes(mb.replace_confidence(bboxes_batch, scores), offsets)
      boxes = mb.pick_matches(
        np.concatenate([boxes, landmarks], axis=-1), scores_column=5, score_threshold=threshold_onet
      )
      return nms(boxes, nms_onet, "min", True)

  return MTCNN(stages=[PNet(), RNet(), ONet()], device="CPU:0")


def suppress(boxes: np.ndarray, threshold: float, method: str, initial_sort: bool, max_boxes: int) -> np.ndarray:
  """mtcnn's `smart_nms_from_bboxes` on the `max_boxes` most confident boxes, in memory linear in their number.

  Rows are [image, x1, y1, x2, y2, confidence, ...]. Like mtcnn's, a box is dropped when any more
  confident box of its image overlaps it by more than `threshold` (IoU, or over the smaller area
  with method "min"), dropped or not. The overlaps are computed NMS_BLOCK columns at a time, with
  mtcnn's arithmetic, so the boxes kept are the same as its own on the same input.
  """
  if initial_sort:  # mtcnn's own sort (np.argsort, reversed), so that ties keep its order
    boxes = boxes[np.argsort(boxes[:, 5])[::-1]]
  kept = []
  for image in np.unique(boxes[:, 0]):
    mine = boxes[boxes[:, 0] == image][:max_boxes]  # sorted, most confident first
    x1, y1, x2, y2 = (mine[:, k] for k in range(1, 5))
    area = (x2 - x1) * (y2 - y1)
    keep = np.ones(len(mine), bool)
    with np.errstate(divide="ignore", invalid="ignore"):  # empty boxes: nan, never over the threshold (as mtcnn)
      for start in range(0, len(mine), NMS_BLOCK):
        j = slice(start, min(start + NMS_BLOCK, len(mine)))
        i = slice(0, j.stop)  # only more confident boxes (rows above the column) can drop a box
        inter = np.maximum(0, np.minimum(x2[i, None], x2[None, j]) - np.maximum(x1[i, None], x1[None, j])) * np.maximum(
          0, np.minimum(y2[i, None], y2[None, j]) - np.maximum(y1[i, None], y1[None, j])
        )
        if method == "union":
          overlap = inter / (area[i, None] + area[None, j] - inter)
        else:
          overlap = inter / np.minimum(area[i, None], area[None, j])
        rows = np.arange(i.stop)[:, None] < np.arange(j.start, j.stop)[None, :]
        keep[j] = ~((overlap > threshold) & rows).any(axis=0)
    kept.append(mine[keep])
  return np.concatenate(kept, axis=0) if kept else np.empty((0, 6))  # mtcnn's empty answer, whatever the columns


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
  chip = photo.transform(
    (n, n), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0)
  )  # black outside the photo, as in the training crops
  if n != size:
    chip = chip.resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(chip, dtype=np.uint8)


def warp_face(photo: Image.Image, landmarks: np.ndarray, framing: Framing, size: int) -> np.ndarray:
  """Crops size x size uint8 with the similarity that best maps the face's five landmarks onto `framing`'s."""
  m = fit_similarity(landmarks, framing.landmarks * size)  # photo -> crop pixels
  # Like the stored crops (a face cut at its photo's resolution, then resized with Lanczos): warp to a
  # canvas at about the photo's scale, then downscale with antialiasing (PIL's affine has none).
  # Capped at twice the photo's side: degenerate landmarks (a tiny fitted scale) must not allocate a giant canvas.
  n = min(max(size, round(size / max(math.hypot(m[0, 0], m[1, 0]), 1e-9))), max(size, 2 * max(photo.size)))
  to_canvas = m * (n / size)
  inverse = np.linalg.inv(to_canvas[:, :2])
  shift = -inverse @ to_canvas[:, 2]
  # PIL's affine maps each output point (u, v) to the input (a u + b v + c, d u + e v + f).
  coeffs = (*inverse[0], shift[0], *inverse[1], shift[1])
  chip = photo.transform(
    (n, n), Image.Transform.AFFINE, tuple(map(float, coeffs)), resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
  )  # black outside the photo, as in the training crops
  if n != size:
    chip = chip.resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(chip, dtype=np.uint8)


def crop_face(photo: Image.Image, detection: Detection, size: int, framing: Framing | None = None) -> np.ndarray:
  """A detected face's size x size crop: warped onto `framing` when there is one, else the fixed-margin crop."""
  if framing is None or detection.landmarks is None:
    return align_face(photo, detection, size)
  return warp_face(photo, detection.landmarks, framing, size)


@dataclasses.dataclass
class Face:
  """One face's box in its photo and, once predicted, its age distribution and summaries."""

  box: tuple[float, float, float, float]
  chip: np.ndarray | None = None  # the model's input, kept with the photo for plotting
  distribution: np.ndarray | None = None
  predicted_age: float = math.nan
  argmax_age: float = math.nan
  std: float = math.nan
  # The 80% interval (years): adjusted by age bucket when calibrated (calibration.json's interval_masses), else central.
  interval80: tuple[float, float] = (math.nan, math.nan)
  # P(age < T) of the calibrated distribution per threshold age T asked (labels.probability_under); None: none.
  p_under: dict[int, float] | None = None


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


def find_faces(
  photo: Image.Image | faces.Decoded,
  size: int,
  *,
  aligned: bool = False,
  detector: Callable[[Image.Image], list[Detection]] | None = None,
  framing: Framing | None = None,
  reopen: Callable[[int], faces.Decoded | None] | None = None,
) -> tuple[str, list[Face], list[np.ndarray]]:
  """Returns (status, faces, size x size crops) of a photo: its centre square if `aligned`, else each detected face.

  A detected face is framed like the training crops (`framing`, the workdir's record) or, without
  one, cropped with the fixed margin. A photo decoded at reduced scale (`faces.Decoded`) is searched
  as it is and boxes come back in its full-size pixels; a face too small there to fill its crop is
  cropped from `reopen(factor)`, the photo decoded again less reduced, when that returns one.
  """
  decoded = photo if isinstance(photo, faces.Decoded) else faces.Decoded(photo, photo.size)
  image, (sx, sy) = decoded.image, decoded.scale
  if aligned:  # the file is one face crop: its centre square, as training read them
    return "ok", [Face(faces.centre_square_box(*decoded.full_size))], [faces.centre_square(image, size)]
  assert detector is not None  # callers pass one unless `aligned` (serve.py refuses such requests first)
  found = detector(image)
  finer: faces.Decoded | None = None
  chips = []
  for d in found:
    side = FACE_MARGIN * max(d.box[2], d.box[3])  # the crop's side in this image's pixels
    source, detection = image, d
    if side < size and reopen is not None and min(sx, sy) < 1:
      factor = max(1, int(side / size / min(sx, sy)))  # the most reduction that still fills the crop
      if finer is None or finer.scale[0] * factor < 0.99:
        finer = reopen(factor) or finer
      if finer is not None and finer.scale[0] > sx:
        source, detection = finer.image, _scaled(d, finer.scale[0] / sx, finer.scale[1] / sy)
    chips.append(crop_face(source, detection, size, framing))
  boxes = [(x / sx, y / sy, w / sx, h / sy) for x, y, w, h in (d.box for d in found)]
  return ("ok" if found else "no face found"), [Face(b) for b in boxes], chips


def _scaled(d: Detection, kx: float, ky: float) -> Detection:
  """A detection's coordinates in an image `kx` x `ky` times as large."""
  x, y, w, h = d.box
  landmarks = None if d.landmarks is None else d.landmarks * np.array([kx, ky])
  eyes = [(ex * kx, ey * ky) for ex, ey in (d.left_eye, d.right_eye)]
  return Detection((x * kx, y * ky, w * kx, h * ky), eyes[0], eyes[1], d.confidence, landmarks)


def predict_files(
  predictor: prediction.Predictor,
  files: Iterable[str | os.PathLike],
  *,
  aligned: bool = False,
  detector: Callable[[Image.Image], list[Detection]] | None = None,
  keep_photos: int = 0,
  under: Sequence[int] = (),
) -> Iterator[ImageResult]:
  """Yields each file's result in order; faces from several files share padded batches.

  With `aligned`, each file is one face crop (centre square, as training read them); otherwise
  `detector` finds the faces, which are framed like the dataset's faces (the predictor's `framing`,
  when its workdir records one). The first `keep_photos` results that have faces keep their photo
  for plotting. Each face gets P(age < T) for the threshold ages `under` (`Face.p_under`) when given.
  """
  under = labels.check_thresholds(under)  # a bad threshold fails before any photo is read
  size = predictor.input_size
  framing = getattr(predictor, "framing", None)  # an export made before framing records none
  pending: collections.deque[ImageResult] = collections.deque()
  chips: list[np.ndarray] = []
  waiting: list[Face] = []
  kept = 0

  def fill() -> None:
    probs = predictor(np.stack(chips))
    stats = jax.device_get(prediction.summaries(probs, predictor.bins, predictor.calibration.shown_masses()))
    p_under = predictor.probability_under(probs, under) if under else None
    for i, face in enumerate(waiting):
      face.distribution = probs[i]
      face.predicted_age, face.argmax_age, face.std = (
        float(stats[k][i]) for k in ("predicted_age", "argmax_age", "std")
      )
      low, high = (float(v) for v in stats["interval80"][i])
      face.interval80 = (low, high)
      if p_under is not None:
        face.p_under = dict(zip(under, map(float, p_under[i])))
    chips.clear()
    waiting.clear()

  for path in files:
    decoded = open_photo(path, size, aligned=aligned)
    new_chips: list[np.ndarray]
    if isinstance(decoded, str):
      result, new_chips = ImageResult(str(path), decoded), []
    else:
      reopen = lambda factor: _or_none(faces.open_reduced(path, factor=factor))  # noqa: B023  (used at once)
      status, found, new_chips = find_faces(
        decoded, size, aligned=aligned, detector=detector, framing=framing, reopen=reopen
      )
      result = ImageResult(str(path), status, found)
    if result.faces and kept < keep_photos:
      assert not isinstance(decoded, str)  # a file that could not be opened has no faces
      # The plot draws boxes in the photo's full-size pixels: keep a photo of that size.
      photo = decoded.image
      if photo.size != decoded.full_size:
        photo = photo.resize(decoded.full_size, Image.Resampling.BILINEAR)
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


def min_side(size: int, aligned: bool) -> int:
  """The least shorter side a photo is decoded at: twice the crop for a face crop, else the detection working size."""
  return 2 * size if aligned else WORK_MIN_SIDE


def open_photo(
  path_or_bytes: str | os.PathLike | bytes, size: int, *, aligned: bool, max_pixels: int | None = None
) -> faces.Decoded | str:
  """Decodes a photo at the reduced scale `find_faces` works at, or returns why it can't be read."""
  return faces.open_reduced(path_or_bytes, max_pixels=max_pixels, min_side=min_side(size, aligned))


def _or_none(decoded: faces.Decoded | str) -> faces.Decoded | None:
  return None if isinstance(decoded, str) else decoded


def face_json(face: Face, age_key: str = "predicted_age") -> dict:
  """A predicted face's JSON: box, expected age (as `age_key`), argmax age, std, interval80, p_under, distribution."""
  assert face.distribution is not None  # only predicted faces are written out
  out = {
    "box": [round(v) for v in face.box],  # whole pixels, detected or not: [x, y, width, height]
    age_key: face.predicted_age,
    "argmax_age": face.argmax_age,
    "std": face.std,
    "interval80": [round(v, 2) for v in face.interval80],
  }
  if face.p_under is not None:  # JSON keys are strings: {"18": P(age < 18), ...}
    out["p_under"] = {str(t): p for t, p in face.p_under.items()}
  return out | {"distribution": face.distribution.tolist()}


def to_json(result: ImageResult, min_age: int) -> list[dict]:
  """Returns the JSON objects of a result: one per face, or one with the file's status."""
  if not result.faces:
    return [{"file": result.file, "status": result.status}]
  return [
    {"file": result.file, "status": result.status, "face": i, "min_age": min_age, **face_json(f)}
    for i, f in enumerate(result.faces)
  ]


def to_lines(result: ImageResult) -> list[str]:
  """Returns the human-readable lines of a result: one per face, or the file's status."""
  if not result.faces:
    return [f"{result.file}  {'' if result.status == 'no face found' else 'skipped: '}{result.status}"]
  return [
    f"{result.file}  face {i}  box {','.join(str(round(v)) for v in f.box)}  age {f.predicted_age:.1f}"
    f"  (80%: {f.interval80[0]:.0f}-{f.interval80[1]:.0f})  argmax {f.argmax_age:.0f}  std {f.std:.1f}{under_text(f)}"
    for i, f in enumerate(result.faces)
  ]


def under_text(face: Face) -> str:
  """A face's P(age < T) for people, e.g. "  P(age<18) 0.9312  P(age<25) 0.9987"; empty when none was asked."""
  return "".join(f"  P(age<{t}) {p:.4f}" for t, p in (face.p_under or {}).items())
