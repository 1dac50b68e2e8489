"""Framing new faces like the training crops: the similarity fit, the warp, measuring, the record, no record."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from agejax import settings
from agejax.data import framing
from agejax.evaluation import calibration
from agejax.inference import photos
from agejax.serving import app as serving_app
from agejax.training import checkpointing

SIZE = 128
# A framing like the benchmark's crops (an aligned box grown by its margins): eyes, nose, mouth corners.
FRAMING = framing.Framing(np.array([[0.37, 0.42], [0.63, 0.42], [0.5, 0.55], [0.4, 0.68], [0.6, 0.68]]), 200, 187)


def similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
  """The [2, 3] similarity that scales, rotates (counter-clockwise on screen: y points down) and shifts."""
  c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
  return np.array([[scale * c, scale * s, shift[0]], [-scale * s, scale * c, shift[1]]])


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
  return np.asarray(points, np.float64) @ m[:, :2].T + m[:, 2]


def invert(m: np.ndarray) -> np.ndarray:
  inverse = np.linalg.inv(m[:, :2])
  return np.concatenate([inverse, -inverse @ m[:, 2:]], axis=1)


def reference_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity in complex numbers (dst ~ a src + b), float64: independent of Umeyama's SVD."""
  zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
  cs, cd = zs - zs.mean(), zd - zd.mean()
  a = np.sum(np.conj(cs) * cd) / np.sum(np.abs(cs) ** 2)
  b = zd.mean() - a * zs.mean()
  return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def reference_warp(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
  """Float64 bilinear warp: crop pixel (u, v) reads the image at m^-1 of its centre (continuous coordinates)."""
  v, u = np.mgrid[0:size, 0:size] + 0.5
  p = apply(invert(m), np.stack([u.ravel(), v.ravel()], axis=-1)) - 0.5  # to index coordinates
  x0, y0 = np.floor(p[:, 0]).astype(int), np.floor(p[:, 1]).astype(int)
  fx, fy = (p[:, 0] - x0)[:, None], (p[:, 1] - y0)[:, None]
  img = image.astype(np.float64)
  out = (
    img[y0, x0] * (1 - fx) * (1 - fy)
    + img[y0, x0 + 1] * fx * (1 - fy)
    + img[y0 + 1, x0] * (1 - fx) * fy
    + img[y0 + 1, x0 + 1] * fx * fy
  )
  return out.reshape(size, size, -1)


def render(shape: tuple[int, int], to_crop: np.ndarray, landmarks: np.ndarray, sigma: float) -> np.ndarray:
  """An image drawn analytically: red Gaussian dots at the crop's landmarks, a smooth green pattern in crop coordinates.

  `to_crop` maps this image's points to the crop's (identity for the stored crop itself), so a photo
  and its stored crop are drawn from one scene, with no resampling involved.
  """
  v, u = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
  q = apply(to_crop, np.stack([u.ravel(), v.ravel()], axis=-1)).reshape(*shape, 2)  # crop coordinates
  red = sum(np.exp(-(((q - c) ** 2).sum(-1)) / (2 * sigma**2)) for c in landmarks)
  green = 0.5 + 0.25 * np.sin(q[..., 0] / 9.0) * np.cos(q[..., 1] / 13.0)
  return np.clip(np.stack([red, green, np.full(shape, 0.25)], axis=-1) * 255 + 0.5, 0, 255).astype(np.uint8)


def centroids(image: np.ndarray, near: np.ndarray, radius: int) -> np.ndarray:
  """The red channel's intensity-weighted centroid within `radius` of each point (continuous coordinates)."""
  red = image[..., 0].astype(np.float64)
  v, u = np.mgrid[0 : red.shape[0], 0 : red.shape[1]] + 0.5
  out = []
  for x, y in near:
    w = red * (((u - x) ** 2 + (v - y) ** 2) <= radius**2)
    out.append([(w * u).sum() / w.sum(), (w * v).sum() / w.sum()])
  return np.array(out)


class FakeDetector:
  """Finds one face with given landmarks (detection quality out of the picture)."""

  def __init__(self, landmarks: np.ndarray):
    self.landmarks = np.asarray(landmarks, np.float64)

  def __call__(self, photo: Image.Image) -> list[photos.Detection]:
    (x0, y0), (x1, y1) = self.landmarks.min(0), self.landmarks.max(0)
    box = (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
    eyes = [tuple(float(round(v)) for v in p) for p in self.landmarks[:2]]
    return [photos.Detection(box, eyes[0], eyes[1], 0.99, self.landmarks)]


class StubPredictor:
  """What predict_files needs of a model: uniform distributions; `framing` as a workdir's record gives it."""

  def __init__(self, record: dict, has_framing: bool = True):
    self.input_size, self.batch_size, self.bins = record["input_size"], 4, np.arange(1, 101)
    self.calibration = calibration.Calibration()  # uncalibrated: central intervals
    if has_framing:  # an export made before framing has no such attribute
      self.framing = framing.from_record(record)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return np.full((len(images), len(self.bins)), 1 / len(self.bins), np.float32)


def predicted_chips(predictor, files, detector) -> list[np.ndarray]:
  results = list(photos.predict_files(predictor, files, detector=detector, keep_photos=len(files)))
  return [face.chip for r in results for face in r.faces]


def test_the_similarity_fit_matches_an_independent_least_squares_solution():
  rng = np.random.default_rng(0)
  for _ in range(20):
    src = rng.uniform(0, 500, (5, 2))
    truth = similarity(rng.uniform(0.1, 4), rng.uniform(-180, 180), tuple(rng.uniform(-300, 300, 2)))
    exact = framing.fit_similarity(src, apply(truth, src))
    np.testing.assert_allclose(exact, truth, atol=1e-9)
    noisy = apply(truth, src) + rng.normal(0, 3, (5, 2))
    np.testing.assert_allclose(framing.fit_similarity(src, noisy), reference_fit(src, noisy), atol=1e-9)
  mirrored = src * [-1, 1]  # a mirror image is fitted by a rotation, never a reflection
  m = framing.fit_similarity(src, mirrored)
  assert np.linalg.det(m[:, :2]) > 0
  np.testing.assert_allclose(m, reference_fit(src, mirrored), atol=1e-9)


@pytest.mark.parametrize("scale", [2.3, 0.7])  # the face larger (a Lanczos step) and smaller than the crop
def test_the_warp_equals_a_float64_reference_and_puts_the_landmarks_on_the_framing(scale):
  to_photo = similarity(scale, 17.0, (400.0, 150.0))  # crop -> photo
  landmarks = apply(to_photo, FRAMING.landmarks * SIZE)
  photo = render((800, 1000), invert(to_photo), FRAMING.landmarks * SIZE, sigma=2.0)
  chip = photos.warp_face(Image.fromarray(photo), landmarks, FRAMING, SIZE)
  assert chip.shape == (SIZE, SIZE, 3) and chip.dtype == np.uint8
  m = framing.fit_similarity(landmarks, FRAMING.landmarks * SIZE)
  np.testing.assert_allclose(apply(m, landmarks), FRAMING.landmarks * SIZE, atol=1e-9)  # float64, exact
  if scale < 1:  # one bilinear warp, no resize: PIL's pixels are the float64 reference's, rounded
    reference = reference_warp(photo, m, SIZE)
    assert np.abs(chip - reference).max() <= 1.0
  # The red dots drawn at the landmarks come out where the framing puts them.
  found = centroids(chip, FRAMING.landmarks * SIZE, radius=6)
  error = np.linalg.norm(found - FRAMING.landmarks * SIZE, axis=1)
  assert error.max() < 0.5, error
  # And the whole crop is the one stored for the scene (drawn directly at the crop's size).
  stored = render((SIZE, SIZE), np.array([[1.0, 0, 0], [0, 1, 0]]), FRAMING.landmarks * SIZE, sigma=2.0)
  assert np.abs(chip.astype(int) - stored).mean() < 2.0


def test_predict_files_crops_a_photo_like_the_stored_crop(tmp_path):
  """predict.py's path: a photo of a tilted, enlarged face comes out as the crop the dataset stores."""
  to_photo = similarity(3.1, -24.0, (300.0, 420.0))
  photo = render((1100, 900), invert(to_photo), FRAMING.landmarks * SIZE, sigma=2.0)
  stored = render((SIZE, SIZE), np.array([[1.0, 0, 0], [0, 1, 0]]), FRAMING.landmarks * SIZE, sigma=2.0)
  Image.fromarray(photo).save(tmp_path / "photo.png")
  detector = FakeDetector(apply(to_photo, FRAMING.landmarks * SIZE))
  record = {"input_size": SIZE, "framing": FRAMING.to_json()}
  (chip,) = predicted_chips(StubPredictor(json.loads(json.dumps(record))), [tmp_path / "photo.png"], detector)
  error = np.linalg.norm(centroids(chip, FRAMING.landmarks * SIZE, 6) - FRAMING.landmarks * SIZE, axis=1)
  assert error.max() < 0.5, error
  assert np.abs(chip.astype(int) - stored).mean() < 2.0
  # serve.py crops the same way.
  buf = io.BytesIO()
  Image.fromarray(photo).save(buf, "PNG")
  _, _, (served,) = serving_app.prepare(buf.getvalue(), False, SIZE, detector, FRAMING)
  np.testing.assert_array_equal(served, chip)


def test_without_a_framing_record_the_crop_is_todays_fixed_margin_crop_bit_for_bit(tmp_path):
  to_photo = similarity(2.0, 12.0, (250.0, 200.0))
  photo = render((500, 600), invert(to_photo), FRAMING.landmarks * SIZE, sigma=2.0)
  Image.fromarray(photo).save(tmp_path / "photo.png")
  detector = FakeDetector(apply(to_photo, FRAMING.landmarks * SIZE))
  (detection,) = detector(Image.fromarray(photo))
  today = photos.align_face(faces_open(tmp_path / "photo.png"), detection, SIZE)
  old_record = {"input_size": SIZE, "model": "vgg16"}  # a workdir from before framing
  assert framing.from_record(old_record) is None
  for predictor in (StubPredictor(old_record), StubPredictor(old_record, has_framing=False)):
    (chip,) = predicted_chips(predictor, [tmp_path / "photo.png"], detector)
    np.testing.assert_array_equal(chip, today)
  _, _, (served,) = serving_app.prepare((tmp_path / "photo.png").read_bytes(), False, SIZE, detector, None)
  np.testing.assert_array_equal(served, today)


def faces_open(path) -> Image.Image:
  from agejax.data import faces

  photo = faces.open_rgb(path)
  assert not isinstance(photo, str)
  return photo


def labelled_crops(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Noise crops, each carrying its index in its first pixel, and each one's landmarks in pixels [n, 5, 2]."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
  points = FRAMING.landmarks * size + rng.normal(0, 2.5, (n, 5, 2))
  return images, points


def fake_landmarks(points: np.ndarray, found: set[int] | None = None):
  """A detector of the crops `labelled_crops` made: their known landmarks (None where not in `found`)."""
  calls = []

  def landmarks_of(image: np.ndarray) -> np.ndarray | None:
    i = int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])
    calls.append(i)
    return points[i] if found is None or i in found else None

  return landmarks_of, calls


def test_measure_takes_the_median_of_a_seeded_sample():
  images, points = labelled_crops(500, 64)
  landmarks_of, calls = fake_landmarks(points)
  measured = framing.measure(images, sample=200, seed=3, landmarks_of=landmarks_of)
  assert measured is not None and (measured.measured_on, measured.found) == (200, 200)
  picked = np.sort(np.random.default_rng(3).choice(500, 200, replace=False))
  assert calls == picked.tolist()
  np.testing.assert_array_equal(measured.landmarks, np.median(points[picked] / 64, axis=0))
  np.testing.assert_allclose(measured.landmarks, FRAMING.landmarks, atol=0.5 / 64)  # 2.5 px noise averages out
  # Faces missed in some crops: the median is over the others. Fewer crops than the sample: all of them.
  found = set(range(0, 30, 2))
  landmarks_of, calls = fake_landmarks(points, found)
  measured = framing.measure(images[:30], landmarks_of=landmarks_of)
  assert measured is not None and (measured.measured_on, measured.found) == (30, 15)
  assert sorted(calls) == list(range(30))
  np.testing.assert_array_equal(measured.landmarks, np.median(points[sorted(found)] / 64, axis=0))
  # The record survives JSON.
  again = framing.Framing.from_json(json.loads(json.dumps(measured.to_json())))
  np.testing.assert_allclose(again.landmarks, measured.landmarks, atol=1e-6)
  assert (again.measured_on, again.found) == (30, 15)


@pytest.mark.parametrize("n,found", [(30, 9), (100, 19)])  # under 10 faces; under 20% of the sample
def test_measure_gives_none_when_too_few_faces_are_found(n, found, caplog):
  images, points = labelled_crops(n, 64)
  landmarks_of, _ = fake_landmarks(points, set(range(found)))
  assert framing.measure(images, sample=n, landmarks_of=landmarks_of) is None
  assert f"found a face in only {found} of {n} sampled crops" in caplog.text


def test_framing_record_measures_new_csv_runs_only(monkeypatch, tmp_path):
  images, points = labelled_crops(300, 64)
  split = type("Split", (), {"images": images})()
  cfg = lambda name: settings.Settings.from_config({"data": {"name": name}})  # noqa: E731
  landmarks_of, calls = fake_landmarks(points)
  monkeypatch.setattr(framing, "mtcnn_landmarks", lambda: landmarks_of)
  for name in framing.KEEP_FIXED_MARGIN:  # UTKFace's chips and the demo keep today's crop: nothing runs
    assert framing.framing_record(cfg(name), split) is None and not calls
  small = type("Split", (), {"images": images[:, :32, :32]})()
  assert framing.framing_record(cfg("csv_faces"), small) is None and not calls
  record = framing.framing_record(cfg("csv_faces"), split)
  assert record is not None and len(calls) == framing.SAMPLE
  assert record["measured_on"] == framing.SAMPLE and record["found"] == framing.SAMPLE
  assert record["names"] == list(framing.LANDMARKS) and np.shape(record["landmarks"]) == (5, 2)
  # inference.json: the record under "framing", absent when none; a resumed run reads it back.
  model = type("Model", (), {"input_spec": type("Spec", (), {"to_json": lambda self: {}})(), "eval_crop": 1.0})()
  written = checkpointing.inference_record(cfg("csv_faces"), model, 64, record)
  assert written["framing"] == record and "framing" not in checkpointing.inference_record(cfg("demo"), model, 64)
  path = tmp_path / checkpointing.INFERENCE_FILE
  assert framing.recorded(path) is None
  path.write_text(json.dumps(written))
  assert framing.recorded(path) == record


@pytest.fixture(scope="module")
def detector():
  """MTCNN, loaded once for the module."""
  return photos.FaceDetector()


def astronaut() -> np.ndarray:
  """A real face without downloads: scikit-image's public-domain NASA portrait (512x512 RGB)."""
  from skimage import data

  return data.astronaut()


def test_mtcnn_end_to_end_a_moved_photo_is_cropped_where_the_stored_crop_has_its_face(detector):
  """Real detections: the crop of a rotated, enlarged copy of a photo frames the face as the original's crop does."""
  original = Image.fromarray(astronaut())
  (found,) = detector(original)
  assert found.landmarks is not None and found.landmarks.shape == (5, 2)
  # The JSON keypoints are MTCNN's landmarks rounded: one detection gives both.
  np.testing.assert_array_equal(np.round(found.landmarks[:2]), [found.left_eye, found.right_eye])
  to_stored = framing.fit_similarity(found.landmarks, FRAMING.landmarks * SIZE)
  stored = photos.warp_face(original, found.landmarks, FRAMING, SIZE)
  # The same face, turned 20 degrees and 1.6x larger, in a bigger photo.
  moved = similarity(1.6, 20.0, (500.0, 150.0))
  inverse = invert(moved)
  big = original.transform(
    (1400, 1200), Image.Transform.AFFINE, tuple(inverse.ravel()), Image.Resampling.BICUBIC, fillcolor=(90, 110, 130)
  )
  _, _, (chip,) = photos.find_faces(big, SIZE, detector=detector, framing=FRAMING)
  (again,) = detector(big)
  to_chip = framing.fit_similarity(again.landmarks, FRAMING.landmarks * SIZE)
  # Where the face's true points (the original's landmarks, moved) land in each crop.
  drift = np.linalg.norm(apply(to_chip, apply(moved, found.landmarks)) - apply(to_stored, found.landmarks), axis=1)
  assert drift.max() < 3.0, drift
  assert np.abs(chip.astype(int) - stored.astype(int)).mean() < 20, np.abs(chip.astype(int) - stored).mean()


def test_mtcnn_measures_the_framing_the_crops_were_cut_with(detector):
  """Crops cut with a known framing (jittered) measure back to where it put the face: measure and warp agree."""
  original = Image.fromarray(astronaut())
  (found,) = detector(original)
  rng = np.random.default_rng(0)
  crops, placed = [], []
  for _ in range(12):
    shifted = framing.Framing(FRAMING.landmarks + rng.normal(0, 1.0 / SIZE, 2))  # the whole face moves by ~1 px
    crops.append(photos.warp_face(original, found.landmarks, shifted, SIZE))
    # Where this crop has the face's landmarks: the framing's, up to the fit's residual (no face is the median face).
    placed.append(apply(framing.fit_similarity(found.landmarks, shifted.landmarks * SIZE), found.landmarks))
  landmarks_of = lambda image: (lambda d: d[0].landmarks if d else None)(detector(Image.fromarray(image)))  # noqa: E731
  measured = framing.measure(np.stack(crops), landmarks_of=landmarks_of)
  assert measured is not None and measured.found == 12
  error = np.linalg.norm(measured.landmarks * SIZE - np.median(placed, axis=0), axis=1)
  assert error.max() < 1.5, error


def test_a_small_face_in_a_photo_decoded_at_reduced_scale_is_cropped_from_a_finer_decode():
  """A JPEG decoded at 1/4 scale (draft) holds a face too small to fill the crop: it is cropped from the photo decoded
  again at full size, where it was found, and its box comes back in full-size pixels (mutant killed: photos.py:187
  `if finer is None or ...` -> `and`, which raised on the first small face; :200 the eyes' `ex * kx` -> `ex // kx`,
  which turned the crop by the wrong angle)."""
  from agejax.data import faces

  full = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
  coarse = faces.Decoded(full.resize((100, 100), Image.BILINEAR), full.size)
  found = photos.Detection((40.0, 40.0, 10.0, 10.0), (43.0, 43.0), (47.0, 45.0), 0.99)  # eyes not level: turned
  asked = []

  def reopen(factor: int) -> faces.Decoded:
    asked.append(factor)
    return faces.Decoded(full, full.size)

  status, boxes, chips = photos.find_faces(coarse, 64, detector=lambda image: [found], reopen=reopen)
  at_full_size = photos.Detection((160.0, 160.0, 40.0, 40.0), (172.0, 172.0), (188.0, 180.0), 0.99)
  assert (status, asked, [b.box for b in boxes]) == ("ok", [1], [(160.0, 160.0, 40.0, 40.0)])
  np.testing.assert_array_equal(chips[0], photos.crop_face(full, at_full_size, 64))
  _, _, coarse_chips = photos.find_faces(coarse, 64, detector=lambda image: [found])  # no reopen: the coarse pixels
  assert not np.array_equal(coarse_chips[0], chips[0])


def test_a_fixed_margin_crop_of_a_face_larger_than_the_input_is_its_margined_box_resized_with_lanczos():
  """Level eyes, a 100 px box: the crop is the 140 px square about the box's centre (margin 1.4), cut at the photo's
  resolution and resized to the input size with Lanczos, as PIL does by hand (mutant killed: photos.py:92 `if n !=
  size` -> `if n <= size`, which returned the 140 px square unresized)."""
  photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8))
  face = photos.Detection((200.0, 200.0, 100.0, 100.0), (230.0, 235.0), (270.0, 235.0), 0.99)
  chip = photos.crop_face(photo, face, 64)
  expected = np.asarray(photo.crop((180, 180, 320, 320)).resize((64, 64), Image.Resampling.LANCZOS))
  assert chip.shape == (64, 64, 3)
  np.testing.assert_array_equal(chip, expected)


def test_a_jpegs_decode_budget_counts_its_draft_scale_and_other_formats_their_full_size():
  """What the server reserves for a decode (`decode_bytes`): a JPEG decoded in draft mode at 1/2, 1/4 or 1/8 never
  holds its full size, other formats do, and both hold the reduced RGB copy (mutant killed: faces.py:67
  `if self.format == "JPEG"` -> `is not`, which budgeted PNGs as drafts and JPEGs at full size)."""
  from agejax.data import faces

  def encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (1600, 1200), (90, 120, 150)).save(out, fmt)
    return out.getvalue()

  jpeg, png_header = faces.read_header(encoded("JPEG")), faces.read_header(encoded("PNG"))
  pixels, libraries = 1600 * 1200, 2 << 20
  for min_side, factor, draft in ((300, 4, 4), (100, 12, 8), (None, 1, 1)):
    reduced = pixels // factor**2 * 4  # the RGB copy at the reduced size (Pillow: 4 bytes a pixel)
    assert jpeg.decode_bytes(min_side) == pixels * 4 // draft**2 + reduced + libraries, min_side
    assert png_header.decode_bytes(min_side) == pixels * 4 + reduced + libraries, min_side


def test_only_the_first_keep_photos_results_with_faces_keep_their_photo(tmp_path):
  """predict.py's figure needs the photos it draws, and only those: with keep_photos=2 of 4 photos, the first two keep
  theirs at full size and the rest keep none, so memory does not grow with the number of files (mutant killed:
  photos.py:256 `kept + 1` -> `kept % 1`, which kept every photo)."""
  files = []
  for i in range(4):
    files.append(tmp_path / f"{i}.png")
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(files[-1])
  landmarks = np.array([[60.0, 50.0], [100.0, 50.0], [80.0, 70.0], [65.0, 90.0], [95.0, 90.0]])
  predictor = StubPredictor({"input_size": 32}, has_framing=False)
  results = list(photos.predict_files(predictor, files, detector=FakeDetector(landmarks), keep_photos=2))
  assert [len(r.faces) for r in results] == [1, 1, 1, 1]
  assert [r.photo is not None for r in results] == [True, True, False, False]
  assert [r.photo.size for r in results[:2]] == [(160, 120), (160, 120)]
