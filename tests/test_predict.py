"""predict.py on photos: MTCNN detection on a real face, alignment, batching, flip, bad inputs, errors."""

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_run
from conftest import assert_same_distributions
from PIL import Image

from agejax import errors, settings
from agejax.data import pipeline
from agejax.evaluation import calibration
from agejax.inference import loading, photos, prediction

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
# Where the astronaut's face goes in the large photo: (left, top) and the crop of skimage's portrait.
PASTE_AT = (1700, 1100)
FACE_CROP = (slice(20, 260), slice(120, 330))
# calibrated_two_ways' temperatures: single views flattened, flip averages sharpened (told apart at a glance).
SINGLE_T, FLIP_T = 2.0, 0.6


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
  """(settings, workdir) of the session's tiny run, copied for this module."""
  _, workdir = tiny_run.tiny_run(request, tmp_path_factory)
  return settings.Settings.from_config(loading.load_config(workdir)), workdir


@pytest.fixture(scope="module")
def detector():
  """MTCNN, loaded once for the module."""
  return photos.FaceDetector()


def astronaut() -> np.ndarray:
  """A real face without downloads: scikit-image's public-domain NASA portrait (512x512 RGB)."""
  from skimage import data

  return data.astronaut()


def large_photo(path: Path) -> tuple[int, int, int, int]:
  """Saves the astronaut's face pasted on a 3200x2400 noisy gradient; returns the pasted (x, y, w, h)."""
  rng = np.random.default_rng(0)
  h, w = 2400, 3200
  yy, xx = np.mgrid[0:h, 0:w]
  background = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 128)], axis=-1)
  background = np.clip(background + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
  face = astronaut()[FACE_CROP]
  x, y = PASTE_AT
  background[y : y + face.shape[0], x : x + face.shape[1]] = face
  Image.fromarray(background).save(path, quality=92)
  return x, y, face.shape[1], face.shape[0]


def calibrated_two_ways(workdir: Path, copy: Path) -> tuple[Path, dict[bool, calibration.Calibration]]:
  """A copy of `workdir` whose calibration.json holds single views at SINGLE_T and flip averages at FLIP_T.

  Each way has its own interval masses, the 80% row's differing by age bucket (so an adjusted interval
  is not the central one). Returns (the copy, {flip: its Calibration}). Shared by the predict, serve and
  export tests.
  """
  shutil.copytree(workdir, copy)
  rows = {False: [0.70, 0.75, 0.80, 0.85, 0.90], True: [0.95, 0.90, 0.85, 0.80, 0.75]}
  levels = calibration.COVERAGE_LEVELS
  ways = {
    flip: calibration.Calibration(
      t, np.asarray([rows[flip] if m == calibration.INTERVAL_MASS else [m] * len(rows[flip]) for m in levels])
    )
    for flip, t in ((False, SINGLE_T), (True, FLIP_T))
  }
  record = {"split": "validation"}
  for flip, way in ways.items():
    assert way.interval_masses is not None
    masses = {str(m): row.tolist() for m, row in zip(levels, way.interval_masses)}
    record[calibration.way(flip)] = {"temperature": way.temperature, "interval_masses": masses}
  calibration.write(copy, record)
  return copy, ways


@functools.cache
def _distributions_fn(workdir: Path, flip: bool) -> Callable[[np.ndarray, float], np.ndarray]:
  """The best checkpoint's jitted `AgeModel.distributions` (images, temperature), restored and compiled once."""
  _, learner, state = loading.load_trained(workdir, "best")
  fn = jax.jit(lambda s, x, t: learner.model.distributions(s, x, t, flip))
  return lambda images, temperature: np.asarray(fn(state, images, np.float32(temperature)))


def direct_distributions(workdir: Path, images: np.ndarray, temperature: float, flip: bool) -> np.ndarray:
  """The best checkpoint's `AgeModel.distributions` of uint8 crops, called here: not through Predictor or an export."""
  return _distributions_fn(Path(workdir), flip)(images, temperature)


def shown_intervals(probs: np.ndarray, bins: np.ndarray, way: calibration.Calibration) -> np.ndarray:
  """[N, 2] the whole-year 80% intervals users are shown under a way's interval masses, from `calibration`."""
  low, high = calibration.adjusted_interval(probs, bins, way.shown_masses())
  return np.stack([np.asarray(low), np.asarray(high)], axis=-1)


def run_predict(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "scripts/predict.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180
  )


@pytest.mark.slow
def test_finds_the_pasted_face_and_reports_every_bad_input(trained, tmp_path):
  config, workdir = trained
  photos = tmp_path / "photos"
  photos.mkdir()
  px, py, pw, ph = large_photo(photos / "b_large.jpg")
  Image.new("RGB", (300, 200), (128, 128, 128)).save(photos / "a_blank.png")
  (photos / "c_notes.txt").write_text("not a photo\n")
  jpeg = (photos / "b_large.jpg").read_bytes()
  (photos / "d_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 50])
  plot = tmp_path / "plot.png"
  proc = run_predict("--workdir", str(workdir), "--json", "--plot", str(plot), str(photos))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  by_name = {Path(r["file"]).name: r for r in lines}
  assert [Path(r["file"]).name for r in lines] == [
    "a_blank.png",
    "b_large.jpg",
    "c_notes.txt",
    "d_truncated.jpg",
  ]
  assert by_name["a_blank.png"] == {"file": str(photos / "a_blank.png"), "status": "no face found"}
  assert by_name["c_notes.txt"]["status"] == "not an image"
  assert by_name["d_truncated.jpg"]["status"] == "corrupt image"
  face = by_name["b_large.jpg"]
  assert face["status"] == "ok" and face["face"] == 0
  x, y, w, h = face["box"]
  # Found in the full-size photo's coordinates (detection ran on a 1024-pixel copy): the box lies
  # within the pasted face, and is most of its size.
  assert px - 5 <= x and x + w <= px + pw + 5 and py - 5 <= y and y + h <= py + ph + 5
  assert w > 0.3 * pw and h > 0.3 * ph
  assert abs(sum(face["distribution"]) - 1.0) < 1e-5
  assert config.labels.min_age <= face["age"] <= config.labels.max_age
  assert face["argmax_age"] == config.labels.min_age + int(np.argmax(face["distribution"]))
  # The 80% interval adjusted by age bucket: the trainer fitted the workdir's interval masses.
  bins = np.arange(config.labels.min_age, config.labels.max_age + 1, dtype=np.float32)
  fitted = calibration.load(workdir)
  assert fitted is not None and fitted.interval_masses is not None
  low, high = face["interval80"]
  assert low <= face["age"] <= high
  np.testing.assert_array_equal([low, high], shown_intervals(np.asarray([face["distribution"]]), bins, fitted)[0])
  with Image.open(plot) as png:
    assert png.format == "PNG"


@pytest.mark.slow
def test_workdir_without_checkpoints_fails_with_the_training_command(tmp_path):
  image = tmp_path / "face.png"
  Image.fromarray(astronaut()).save(image)
  (tmp_path / "empty").mkdir()
  proc = run_predict("--workdir", str(tmp_path / "empty"), str(image))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
    f"error: {tmp_path / 'empty'} holds no checkpoints; train a model first: "
    f"python scripts/train.py --config configs/vgg16_kl.py --workdir {tmp_path / 'empty'}"
  ]


@pytest.mark.slow
def test_alignment_levels_the_eyes_of_a_tilted_face(detector):
  photo = Image.fromarray(astronaut()).rotate(25, resample=Image.Resampling.BICUBIC, expand=True)
  (found,) = detector(photo)
  (lx, ly), (rx, ry) = sorted([found.left_eye, found.right_eye])
  assert abs(np.degrees(np.arctan2(ry - ly, rx - lx))) > 15  # the photo's eyes are tilted
  chip = photos.align_face(photo, found, 160)
  assert chip.shape == (160, 160, 3) and chip.dtype == np.uint8
  (again,) = detector(Image.fromarray(chip))
  (lx, ly), (rx, ry) = sorted([again.left_eye, again.right_eye])
  assert abs(np.degrees(np.arctan2(ry - ly, rx - lx))) < 5
  x, y, w, h = again.box  # centred, with margin all round
  assert abs(x + w / 2 - 80) < 16 and abs(y + h / 2 - 80) < 16 and max(w, h) < 150


@pytest.mark.slow
def test_results_come_in_input_order_through_padded_batches(trained, tmp_path):
  config, workdir = trained
  data = pipeline.load_labelled_split(config.data, config.labels, "test")
  images = data.gather(np.arange(5))["image"]
  files = []
  for i, image in enumerate(images):
    files.append(tmp_path / f"{i}.png")
    Image.fromarray(image).save(files[-1])
    if i == 2:
      files.append(tmp_path / "notes.txt")
      files[-1].write_text("x")
  predictor = prediction.Predictor(workdir, batch_size=2)
  results = list(photos.predict_files(predictor, files, aligned=True))
  assert [r.file for r in results] == [str(f) for f in files]
  assert [r.status for r in results] == ["ok"] * 3 + ["not an image"] + ["ok"] * 2
  got = np.stack([r.faces[0].distribution for r in results if r.faces])
  np.testing.assert_allclose(got, predictor(images), atol=1e-6)
  assert results[0].faces[0].box == (0, 0, 40, 40)
  line = photos.to_lines(results[0])[0]
  assert line.startswith(f"{files[0]}  face 0  box 0,0,40,40  age ") and " argmax " in line and " std " in line
  assert photos.to_lines(results[3]) == [f"{files[3]}  skipped: not an image"]


@pytest.mark.slow
@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_batch_size_below_one_fails_in_one_line(trained, value, tmp_path):
  _, workdir = trained
  image = tmp_path / "face.png"
  Image.fromarray(astronaut()).save(image)
  proc = run_predict("--workdir", str(workdir), "--aligned", f"--batch_size={value}", str(image))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [f"error: flag --batch_size={value}: {value} is not a positive integer"]
  with pytest.raises(ValueError, match=f"^batch_size={value}: must be a positive number of faces per model call"):
    prediction.Predictor(workdir, batch_size=int(value))


@pytest.mark.slow
@pytest.mark.parametrize(
  "content,problem", [('{"seed": 0, "data": {', "not valid JSON ("), ("[1, 2]", "not a JSON object (found list)")]
)
@pytest.mark.parametrize("script", ["predict.py", "evaluate.py"])
def test_a_corrupt_config_json_fails_in_one_line_naming_it(trained, script, content, problem, tmp_path):
  import shutil

  _, workdir = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  (copy / "config.json").write_text(content)
  image = tmp_path / "face.png"
  Image.fromarray(astronaut()).save(image)
  args = ("--aligned", str(image)) if script == "predict.py" else ("--split", "validation")
  proc = subprocess.run(
    [sys.executable, f"scripts/{script}", "--workdir", str(copy), *args],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {copy / 'config.json'}: {problem}"), proc.stderr
  assert (copy / "config.json").read_text() == content and not (copy / "eval").exists()


@pytest.mark.slow
def test_flip_predicts_with_the_flip_temperature_and_intervals_and_an_old_calibration_refuses_it(trained, tmp_path):
  """predict.py --flip: each face averaged with its mirror image, tempered by calibration.json's flip temperature,
  its 80% interval adjusted by the flip way's masses; without --flip, the single-view way's. A calibration.json
  from before one temperature per way, fitted without flip, refuses --flip in one line."""
  config, workdir = trained
  run, ways = calibrated_two_ways(workdir, tmp_path / "run")
  images = pipeline.load_labelled_split(config.data, config.labels, "test").gather(np.arange(4))["image"]
  files = []
  for i, image in enumerate(images):
    files.append(tmp_path / f"{i}.png")
    Image.fromarray(image).save(files[-1])
  proc = run_predict("--workdir", str(run), "--flip", "--under", "18", "--json", "--aligned", *map(str, files))
  assert proc.returncode == 0, proc.stderr[-3000:]
  flipped = [json.loads(line) for line in proc.stdout.splitlines()]
  single = [r.faces[0] for r in photos.predict_files(prediction.Predictor(run), files, aligned=True)]
  answers = {
    True: ([f["distribution"] for f in flipped], [f["interval80"] for f in flipped]),
    False: ([f.distribution for f in single], [f.interval80 for f in single]),
  }
  bins = np.arange(config.labels.min_age, config.labels.max_age + 1, dtype=np.float32)
  for flip, (distributions, intervals) in answers.items():
    expected = direct_distributions(run, images, ways[flip].temperature, flip)
    assert_same_distributions(distributions, expected)
    np.testing.assert_array_equal(intervals, shown_intervals(expected, bins, ways[flip]))
  # Each part counts: the mirror image, the way's temperature, the way's interval masses.
  assert np.abs(direct_distributions(run, images, FLIP_T, False) - answers[True][0]).max() > 1e-3
  assert np.abs(direct_distributions(run, images, SINGLE_T, True) - answers[True][0]).max() > 1e-3
  assert not np.array_equal(answers[True][1], shown_intervals(np.asarray(answers[True][0]), bins, ways[False]))
  # P(age < 18) with --flip: the mass below 18 of the flip way's calibrated distribution, summed in float64 here.
  flip_probs = direct_distributions(run, images, FLIP_T, True).astype(np.float64)
  under = np.where(bins < 18, flip_probs, 0.0).sum(-1)
  np.testing.assert_allclose([f["p_under"]["18"] for f in flipped], under, atol=1e-6, rtol=0)
  # The single views' temperature on the same flip averages would be told apart.
  wrong_way = np.where(bins < 18, direct_distributions(run, images, SINGLE_T, True).astype(np.float64), 0).sum(-1)
  assert np.abs(wrong_way - under).max() > 1e-3, (under, wrong_way)

  # The file from before one temperature per way serves the way it was fitted for, and refuses the other.
  calibration.write(run, {"split": "validation", "temperature": 1.5, "flip": False})
  assert prediction.Predictor(run).temperature == 1.5
  with pytest.raises(errors.UserError) as error:  # scripts print a UserError as their one `error: ...` line
    prediction.Predictor(run, flip=True)
  assert str(error.value).startswith(f"{run / calibration.FILE} was fitted without flip averaging")
  assert "\n" not in str(error.value)
