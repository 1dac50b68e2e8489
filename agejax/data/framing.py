"""The framing of the stored face crops: where MTCNN's five landmarks sit in them, measured once per run.

A model trained on a dataset's crops (e.g. the unified age-estimation benchmark's faces, cropped
around an aligned box grown by its extension margins) should see new faces framed the same way.
`measure` runs MTCNN on a seeded sample of a split's stored crops and takes the median position of
each landmark (left eye, right eye, nose, left and right mouth corner, image left/right, as MTCNN
names them), as fractions of the crop's width and height. The trainer records it in
WORKDIR/inference.json under "framing"; predict.py and serve.py then map each detected face's five
landmarks onto it with a least-squares similarity (`fit_similarity`). Workdirs without a record,
UTKFace's chips and the demo's drawn faces keep the fixed-margin, eye-levelled crop.

Coordinates are continuous: pixel (i, j) covers [i, i + 1) x [j, j + 1), as PIL's transforms and
resizes read them, so a fraction means the same point at every crop size.

It lives in `data` (not `inference`): the trainer records it, and training may not import inference.
"""

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from agejax import parallel, settings, storage

LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # MTCNN's names, its order
MIN_CONFIDENCE = 0.9  # MTCNN's face score below which a detection is not trusted (predict.py's too)
SAMPLE = 200  # crops measured: the median of 200 moves by well under a pixel between samples
MIN_FOUND, MIN_FOUND_FRACTION = 10, 0.2  # fewer faces found than this: the crops are not faces MTCNN sees
MIN_SIDE = 48  # MTCNN finds no face under ~20 pixels; a face fills well under half a smaller crop
# Crops are measured at most this big: a face filling much of a crop stays easy to find, and MTCNN's
# pyramid on a 224-pixel crop takes ~3x as long (200 crops: ~40 s against ~12 s on a busy 2-core CPU).
MEASURE_MAX_SIDE = 128
# Datasets whose new faces keep the fixed-margin crop: UTKFace's chips are already aligned and cropped
# (the fixed margin was tuned on them), the demo's faces are drawn (no detector sees them as faces).
KEEP_FIXED_MARGIN = ("demo", "utkface")

Landmarks = np.ndarray  # [5, 2] float (x, y) in pixels, in LANDMARKS order


@dataclasses.dataclass(eq=False)
class Framing:
  """Where the five landmarks sit in the stored crops, as fractions of their side; measured on how many crops."""

  landmarks: np.ndarray  # [5, 2] float64 (x / width, y / height), in LANDMARKS order
  measured_on: int = 0  # crops sampled
  found: int = 0  # of those, crops MTCNN found a face in (the median is over these)

  def __post_init__(self):
    self.landmarks = np.asarray(self.landmarks, np.float64)
    if self.landmarks.shape != (len(LANDMARKS), 2) or not np.all(np.isfinite(self.landmarks)):
      raise ValueError(f"framing landmarks must be {len(LANDMARKS)} finite (x, y) pairs, got {self.landmarks.tolist()}")

  def to_json(self) -> dict[str, Any]:
    """The record inference.json keeps under "framing"."""
    return {
      "landmarks": [[round(float(x), 6), round(float(y), 6)] for x, y in self.landmarks],
      "names": list(LANDMARKS),
      "measured_on": int(self.measured_on),
      "found": int(self.found),
    }

  @classmethod
  def from_json(cls, obj: dict[str, Any]) -> "Framing":
    """Reads `to_json`'s record back."""
    return cls(np.asarray(obj["landmarks"], np.float64), int(obj.get("measured_on", 0)), int(obj.get("found", 0)))


def from_record(record: dict[str, Any]) -> Framing | None:
  """The framing an inference.json records, or None (recorded before framing, or kept at the fixed margin)."""
  obj = record.get("framing")
  return None if obj is None else Framing.from_json(obj)


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The similarity (rotation, scale, shift; no mirror) mapping points src onto dst by least squares, [2, 3].

  Umeyama (1991) in float64: `m[:, :2] @ p + m[:, 2]` is the image of point p.
  """
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  mean_src, mean_dst = src.mean(0), dst.mean(0)
  a, b = src - mean_src, dst - mean_dst
  u, d, vt = np.linalg.svd(b.T @ a / len(src))
  flip = np.diag([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])  # a rotation, never a mirror
  rotation = u @ flip @ vt
  scale = float(np.trace(np.diag(d) @ flip)) / float((a**2).sum() / len(src))
  shift = mean_dst - scale * rotation @ mean_src
  return np.concatenate([scale * rotation, shift[:, None]], axis=1)


def load_mtcnn():
  """MTCNN on the CPU (JAX owns the accelerators); its weights ship inside the `mtcnn` package."""
  parallel.import_tensorflow()
  from mtcnn import MTCNN

  return MTCNN(device="CPU:0")


def detect(mtcnn, image: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray]:
  """MTCNN's faces in an RGB uint8 image: its usual JSON results and their five landmarks as floats [F, 5, 2].

  The JSON rounds keypoints to whole pixels; the raw rows keep the fractions. Both come from one
  detection, and the JSON is built by the same mtcnn function `detect_faces` itself calls.
  """
  from mtcnn.utils.bboxes import to_json

  raw = mtcnn.detect_faces(image, box_format="xyxy", output_type="numpy")
  found = to_json(raw, images_count=1, output_as_width_height=True, input_as_width_height=False)[0]
  # A row: image index, x1, y1, x2, y2, confidence, the five landmarks' x, then their y.
  return found, np.stack([raw[:, 6:11], raw[:, 11:16]], axis=-1).astype(np.float64)


def mtcnn_landmarks() -> Callable[[np.ndarray], Landmarks | None]:
  """A function of a crop: the five landmarks of MTCNN's most confident face in it, or None."""
  mtcnn = load_mtcnn()

  def landmarks(image: np.ndarray) -> Landmarks | None:
    height, width = image.shape[:2]
    shrink = min(1.0, MEASURE_MAX_SIDE / max(height, width))
    size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
    if size != (width, height):  # PIL resizes continuous coordinates exactly: x_small = x * small_width / width
      image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    scale = np.array([size[0] / width, size[1] / height])
    found, points = detect(mtcnn, image)
    scores = [float(face["confidence"]) for face in found]
    best = int(np.argmax(scores)) if scores else -1
    return points[best] / scale if scores and scores[best] >= MIN_CONFIDENCE else None

  return landmarks


def measure(
  images: np.ndarray,
  sample: int = SAMPLE,
  seed: int = 0,
  landmarks_of: Callable[[np.ndarray], Landmarks | None] | None = None,
) -> Framing | None:
  """The median framing of a seeded sample of stored crops [N, H, W, 3], or None when too few faces are found.

  Args:
    images: a split's uint8 crops (a memory-mapped array is read only where sampled).
    sample: how many crops to measure (all of them when there are fewer).
    seed: picks the sample.
    landmarks_of: a crop's five landmarks in pixels, or None; default MTCNN's (`mtcnn_landmarks`).

  Returns:
    The landmarks' medians as fractions of the crop's width and height, with the counts; None when
    faces were found in fewer than MIN_FOUND crops or MIN_FOUND_FRACTION of the sample.
  """
  n, height, width = images.shape[:3]
  picked = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
  landmarks_of = landmarks_of or mtcnn_landmarks()
  found = []
  for i in picked:
    points = landmarks_of(np.asarray(images[i]))
    if points is not None:
      found.append(np.asarray(points, np.float64) / [width, height])
  if len(found) < max(MIN_FOUND, MIN_FOUND_FRACTION * len(picked)):
    logging.warning(
      "framing: MTCNN found a face in only %d of %d sampled crops: new faces keep the fixed-margin crop",
      len(found),
      len(picked),
    )
    return None
  return Framing(np.median(np.stack(found), axis=0), len(picked), len(found))


def framing_record(cfg: settings.Settings, train_split: Any) -> dict[str, Any] | None:
  """Measures the training crops' framing for WORKDIR/inference.json's "framing", or None (the fixed margin stays).

  Called when a run starts fresh: demo and UTKFace runs, and crops too small for MTCNN, record none.
  `train_split` is the run's `pipeline.ArraySplit` (its `images`, [N, S, S, 3] uint8).
  """
  if cfg.data.name in KEEP_FIXED_MARGIN:
    logging.info("framing: %s keeps the fixed-margin crop (nothing measured)", cfg.data.name)
    return None
  images = train_split.images
  if min(images.shape[1:3]) < MIN_SIDE:
    logging.info("framing: %dx%d crops are too small for MTCNN: the fixed-margin crop stays", *images.shape[1:3])
    return None
  start = time.perf_counter()
  framing = measure(images)
  if framing is None:
    return None
  logging.info(
    "framing: landmarks at %s of the crop (MTCNN found %d faces in %d crops, %.1f s)",
    np.round(framing.landmarks, 3).tolist(),
    framing.found,
    framing.measured_on,
    time.perf_counter() - start,
  )
  return framing.to_json()


def recorded(inference_json: storage.Location) -> dict[str, Any] | None:
  """The framing record an earlier start wrote to this inference.json (a resumed run keeps it), or None."""
  path = storage.path(inference_json)
  return storage.read_json_object(path).get("framing") if path.exists() else None
