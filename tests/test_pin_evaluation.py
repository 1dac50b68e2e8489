"""Pinned numbers users read: flip evaluation, the cross-validation aggregate, the mean-age baseline, framing scale."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_run
from test_labels import tempered_reference

from agejax import metrics, settings
from agejax.data import framing, pipeline
from agejax.evaluation import calibration
from agejax.inference import evaluate, loading, prediction
from agejax.training import crossval, train

# A framing like the benchmark's crops: eyes, nose, mouth corners as fractions of the crop's width and height.
FRACTIONS = np.array([[0.37, 0.42], [0.63, 0.42], [0.5, 0.55], [0.4, 0.68], [0.6, 0.68]])


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> tuple[settings.Settings, Path, dict]:
  """(settings, workdir, final metrics) of the session's learned tiny run, copied for this module."""
  final, workdir = tiny_run.tiny_run(request, tmp_path_factory)
  return settings.Settings.from_config(loading.load_config(workdir)), workdir, final


@pytest.fixture(scope="module")
def views(trained) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per split: (true ages, the latest checkpoint's raw distributions of each face, of its mirror image), float64."""
  cfg, workdir, _ = trained
  _, learner, state = loading.load_trained(workdir, "latest")
  one_view = jax.jit(lambda state, images: learner.model.distributions(state, images))  # no flip, temperature 1
  out = {}
  for split in ("test", cfg.data.eval_split):
    data = pipeline.load_labelled_split(cfg.data, cfg.labels, split)
    images = np.asarray(data.images)
    plain, mirrored = (np.asarray(one_view(state, x), np.float64) for x in (images, images[:, :, ::-1]))
    out[split] = (np.asarray(data.age, np.float64), plain, mirrored)
  return out


def flip_average(plain: np.ndarray, mirrored: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """By hand: the two views' mean probabilities, tempered around their own expected age (float64 tilt)."""
  mean = 0.5 * (plain + mirrored)
  if temperature == 1.0:
    return mean
  bins = np.arange(1, mean.shape[-1] + 1, dtype=np.float64)
  return np.stack([tempered_reference(np.log(np.maximum(row, 1e-300)), bins, temperature) for row in mean])


def mean_nll(probs: np.ndarray, age: np.ndarray, min_age: int) -> float:
  """Mean -log of the probability of each true age's bin."""
  return float(np.mean(-np.log(probs[np.arange(len(age)), (age - min_age).astype(int)])))


@pytest.mark.slow
def test_evaluate_py_flip_fits_and_scores_the_average_of_the_two_views(trained, views, tmp_path):
  """evaluate.py --flip --calibrate: the temperature is fitted to, and the report scores, the two views' mean.

  Kills (tests/test_newcomer.py checks only the report's names and its "flip" flag): inference/evaluate.py:91
  `trained.evaluator(data, mesh, flip=flip)` -> `flip=False`; inference/evaluate.py:87
  `trained.evaluator(fit_data, mesh, flip=flip)` -> `flip=False`. (Also fails on evaluation/scoring.py:80
  `self.flip` -> `False` and training/learner.py:108 `... if flip is None else flip` -> `self.cfg.eval.flip`.)
  """
  cfg, workdir, _ = trained
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  report, _ = evaluate.run_evaluation(None, run, "test", checkpoint="latest", flip=True, fit_calibration=True)
  bins, min_age = np.arange(cfg.labels.min_age, cfg.labels.max_age + 1, dtype=np.float64), cfg.labels.min_age
  # The temperature, fitted on the validation split's flip averages.
  record = json.loads((run / calibration.FILE).read_text())
  fitted = record["flip"]
  assert record["split"] == cfg.data.eval_split and fitted["temperature"] != record["single"]["temperature"]
  age, plain, mirrored = views[cfg.data.eval_split]
  t = fitted["temperature"]
  nll = lambda t: mean_nll(flip_average(plain, mirrored, t), age, min_age)  # noqa: E731
  assert fitted["nll_before"] == pytest.approx(nll(1.0), rel=1e-5)
  assert fitted["nll_after"] == pytest.approx(nll(t), rel=1e-5)
  assert nll(t) <= min(nll(t * 1.02), nll(t / 1.02))  # the minimum
  assert abs(nll(1.0) - mean_nll(plain, age, min_age)) > 1e-3  # one view alone is visibly another model
  # The test split, scored at that temperature.
  age, plain, mirrored = views["test"]
  expected = flip_average(plain, mirrored, t)
  assert report["flip"] is True and report["temperature"] == t and report["num_examples"] == len(age)
  rows = [json.loads(line) for line in (run / "eval" / "test_flip_predictions.jsonl").read_text().splitlines()]
  predicted = np.array([r["predicted_age"] for r in rows])
  raw = flip_average(plain, mirrored) @ bins  # the point prediction: the untempered average's expectation
  np.testing.assert_allclose(predicted, raw, rtol=0, atol=1e-4)
  np.testing.assert_allclose(expected @ bins, raw, rtol=0, atol=1e-4)  # the reference tilt keeps it too
  assert np.abs(flip_average(plain, plain, t) @ bins - expected @ bins).max() > 0.05  # the mirror view counts
  assert report["mae"] == pytest.approx(np.mean(np.abs(raw - age)), rel=1e-5)
  assert report["calibration"]["nll"] == pytest.approx(mean_nll(expected, age, min_age), rel=1e-5)
  assert report["calibration"]["nll_uncalibrated"] == pytest.approx(
    mean_nll(flip_average(plain, mirrored), age, min_age), rel=1e-5
  )


@pytest.mark.slow
def test_a_flip_predictor_gives_the_tempered_average_of_the_two_views(trained, views):
  """predict.py/serve.py --flip: the mean of the face's and its mirror image's distributions, then calibrated.

  Kills: inference/prediction.py:67 `self.model.distributions(state, images, temperature, flip)` -> `..., False)`.
  """
  _, workdir, final = trained
  age, plain, mirrored = views["test"]
  predictor = prediction.Predictor(workdir, "latest", flip=True, batch_size=16)
  assert predictor.temperature == calibration.load(workdir, flip=True).temperature != final["temperature"]
  expected = flip_average(plain, mirrored, predictor.temperature)
  got = predictor(np.asarray(pipeline.load_labelled_split(predictor.cfg.data, predictor.cfg.labels, "test").images))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
  assert np.abs(flip_average(plain, plain, predictor.temperature) - expected).max() > 1e-3


def write_final(workdir: Path, split: str, **scores) -> None:
  """A finished split's final_metrics.json with these test scores."""
  final = {"step": 100, "best_step": 50, "eval_mae": 7.0, "temperature": 1.1, **scores}
  (workdir / f"split{split}").mkdir(parents=True)
  (workdir / f"split{split}" / train.FINAL_METRICS).write_text(json.dumps(final))


def test_the_crossval_aggregate_is_numpys_mean_and_std_over_the_finished_splits(tmp_path):
  """Mean, population std, sample std and count over the splits that have a score, as float64 NumPy gives them.

  Kills (two splits, as tests/test_crossval.py has, cannot tell a mean from a median, and have no None score):
  training/crossval.py `_summary`: `np.mean(array)` -> `np.median(array)`;
  training/crossval.py `_summary`: `if len(array) > 1` -> `if len(array) > 0`;
  crossval.py `aggregate`: `if s.get(key) is not None` -> dropped (None, no minors in a split, enters the column).
  """
  keys = ["test_mae", "test_cs5", "test_mae_minors", "test_coverage90", "test_coverage80_shown", "test_epsilon_error"]
  scores = {
    "0": [5.12, 0.61, 4.3, 0.9, 0.83, 0.41],
    "1": [5.31, 0.58, None, 0.88, 0.79, 0.43],  # no one under 18 in its test split
    "3": [9.74, 0.35, 6.9, 0.81, 0.74, 0.62],
    "4": [4.87, 0.66, 3.1, 0.93, 0.81, 0.37],
  }
  for split, values in scores.items():
    write_final(tmp_path, split, **dict(zip(keys, values)))
  write_final(tmp_path, "5", test_mae=None)  # no test split
  result = crossval.aggregate(tmp_path, ["0", "1", "2", "3", "4", "5"])
  assert result["finished"] == ["0", "1", "3", "4"] and list(result["missing"]) == ["2", "5"]
  for i, key in enumerate(keys):
    column = np.array([v[i] for v in scores.values() if v[i] is not None], np.float64)
    summary = result["summary"][key]
    assert summary["n"] == len(column), key
    assert summary["mean"] == pytest.approx(np.mean(column), rel=1e-12), key
    assert summary["std"] == pytest.approx(np.std(column, ddof=0), rel=1e-12), key
    assert summary["std_ddof1"] == pytest.approx(np.std(column, ddof=1), rel=1e-12), key
  assert json.loads((tmp_path / crossval.RESULT_FILE).read_text()) == result
  mae = np.array([v[0] for v in scores.values()])
  assert f"{np.mean(mae):.2f} ± {np.std(mae):.2f}" in crossval.format_table(result).splitlines()[2]
  # One finished split: no spread (population std 0; the sample std is undefined).
  one = crossval.aggregate(tmp_path, ["0"], write=False)["summary"]["test_mae"]
  assert one == {"mean": 5.12, "std": 0.0, "std_ddof1": None, "n": 1}


def test_mean_baseline_mae_is_the_eval_mae_of_the_training_mean():
  """The MAE on the eval ages of always guessing the training ages' mean, in float64 (not the median, not signed).

  Kills: metrics.py:145 `np.mean(np.abs(...))` -> `np.median(np.abs(...))`; `np.abs(x)` -> `x`;
  `np.mean(train_ages, dtype=np.float64)` -> `np.median(train_ages)`; `np.asarray(eval_ages, np.float64)` ->
  `np.asarray(eval_ages, np.float32)` (tests/test_metrics.py's [10, 20, 30] and [20, 40] cannot tell them apart).
  """
  assert metrics.mean_baseline_mae(np.array([10, 12, 50]), np.array([20, 60, 30, 2])) == 17.0  # mean 24: 4+36+6+22
  rng = np.random.default_rng(0)
  train_ages, eval_ages = rng.uniform(1, 90, 1001).astype(np.float32), rng.uniform(1, 90, 333)  # float64: real ages
  expected = np.abs(eval_ages - train_ages.astype(np.float64).sum() / train_ages.size).mean()
  assert metrics.mean_baseline_mae(train_ages, eval_ages) == pytest.approx(expected, rel=1e-13)


def test_final_metrics_baseline_guesses_the_training_mean_on_the_eval_split(trained):
  """final_metrics.json's baseline_mae: the training split's mean age guessed for every eval-split face.

  Kills: training/train.py:383 `metrics.mean_baseline_mae(b.train_data.age, b.eval_data.age)` ->
  `(b.eval_data.age, b.eval_data.age)`, and the two arguments swapped.
  """
  cfg, _, final = trained
  train_age = np.asarray(pipeline.load_split(cfg.data, "train").age, np.float64)
  eval_age = np.asarray(pipeline.load_split(cfg.data, cfg.data.eval_split).age, np.float64)
  expected = np.mean(np.abs(eval_age - np.mean(train_age)))
  assert final["baseline_mae"] == pytest.approx(expected, rel=1e-9)
  assert abs(np.mean(np.abs(eval_age - np.mean(eval_age))) - expected) > 1e-3  # the eval mean is another guess
  assert abs(np.mean(np.abs(train_age - np.mean(eval_age))) - expected) > 1e-3


def test_measure_gives_fractions_of_a_non_square_crops_width_and_height():
  """x is a fraction of the width, y of the height, on crops wider than they are tall.

  Kills (tests/test_framing.py measures square crops only): data/framing.py:160
  `found.append(np.asarray(points, np.float64) / [width, height])` -> `/ [height, width]`;
  data/framing.py:153 `n, height, width = images.shape[:3]` -> `n, width, height = images.shape[:3]`.
  """
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 60, 100, 3), np.uint8)
  points = FRACTIONS * [100, 60] + rng.normal(0, 1.5, (40, 5, 2))
  images[:, 0, 0, 0] = np.arange(40)  # each crop says which it is
  measured = framing.measure(images, sample=40, landmarks_of=lambda image: points[int(image[0, 0, 0])])
  assert measured is not None and measured.found == 40
  np.testing.assert_allclose(measured.landmarks, np.median(points / [100, 60], axis=0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(measured.landmarks, FRACTIONS, atol=0.01)


def test_mtcnn_landmarks_on_a_shrunk_crop_come_back_in_the_crops_own_pixels(monkeypatch):
  """A crop larger than MEASURE_MAX_SIDE is shrunk undistorted for MTCNN; its landmarks are scaled back exactly.

  Kills (no test runs `mtcnn_landmarks` on a crop it shrinks): data/framing.py:130 `points[best] / scale` ->
  `points[best] * scale` or `points[best]`; :126 `size[1] / height` -> `size[1] / width`;
  :123 `round(height * shrink)` -> `round(width * shrink)`; :122 `MEASURE_MAX_SIDE / max(height, width)` ->
  `MEASURE_MAX_SIDE / min(height, width)`; :129 `np.argmax(scores)` -> `np.argmin(scores)`;
  :130 `>= MIN_CONFIDENCE` -> `> MIN_CONFIDENCE`.
  """
  seen, confidences = [], []

  def detect(_, image: np.ndarray) -> tuple[list[dict], np.ndarray]:  # two faces, in the pixels of what MTCNN sees
    seen.append(image.shape)
    h, w = image.shape[:2]
    return [{"confidence": c} for c in confidences], np.stack([FRACTIONS * [w, h] * 0.5, FRACTIONS * [w, h]])

  monkeypatch.setattr(framing, "load_mtcnn", lambda: None)
  monkeypatch.setattr(framing, "detect", detect)
  landmarks_of = framing.mtcnn_landmarks()

  def landmarks(image: np.ndarray, scores: list[float]) -> np.ndarray | None:
    confidences[:] = scores
    return landmarks_of(image)

  crop = np.random.default_rng(0).integers(0, 256, (190, 250, 3), np.uint8)  # 128 / 250: y rounds to 97 pixels
  expected = FRACTIONS * [250, 190]  # the second face's, in the crop's pixels
  found = landmarks(crop, [0.91, 0.99])
  assert found is not None and seen[-1] == (97, framing.MEASURE_MAX_SIDE, 3)
  np.testing.assert_allclose(found, expected, rtol=0, atol=1e-9)
  found = landmarks(crop, [0.5, framing.MIN_CONFIDENCE])  # the threshold itself is trusted
  assert found is not None
  np.testing.assert_allclose(found, expected, rtol=0, atol=1e-9)
  assert landmarks(crop, [0.5, 0.89]) is None
  small = crop[:100, :120]  # under MEASURE_MAX_SIDE: measured as it is
  found = landmarks(small, [0.5, 0.99])
  assert found is not None and seen[-1] == small.shape
  np.testing.assert_allclose(found, FRACTIONS * [120, 100], rtol=0, atol=1e-9)
