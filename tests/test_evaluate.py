"""Evaluation of a trained workdir: report files, agreement with predict.py, flip averaging, figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_run
from PIL import Image
from test_calibration import reference_covered, reference_quantile

from agejax import metrics, parallel, settings
from agejax.data import pipeline
from agejax.evaluation import calibration, plots, scoring
from agejax.inference import loading, prediction

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
  """(config, workdir, final metrics) of the session's tiny run, copied for this module."""
  final, workdir = tiny_run.tiny_run(request, tmp_path_factory)
  return settings.Settings.from_config(loading.load_config(workdir)), workdir, final


def evaluator(fns, data: pipeline.ArraySplit, flip: bool = False) -> scoring.Evaluator:
  """An Evaluator of a restored model at batch 16, which does not divide the 50-face splits: padding must not count."""
  eps = fns.cfg.eval.epsilon_sigma
  return scoring.Evaluator(fns.model, fns.loss_fn, data, 16, parallel.make_mesh(), epsilon_sigma=eps, flip=flip)


def run_script(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_evaluate_script_writes_report_and_matches_predict_script(trained, tmp_path):
  config, workdir, _ = trained
  proc = run_script("scripts/evaluate.py", "--workdir", str(workdir), "--split", "test")  # config from config.json
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "MAE" in proc.stdout and "CS@k" in proc.stdout
  report = json.loads((workdir / "eval" / "test.json").read_text())
  data = pipeline.load_labelled_split(config.data, config.labels, "test")
  assert report["num_examples"] == len(data) == 50
  assert report["split"] == "test" and report["step"] in tiny_run.CHECKPOINTS and report["flip"] is False
  assert sorted(map(int, report["cumulative_score"])) == list(range(1, 11))
  cs = list(report["cumulative_score"].values())
  assert all(0 <= a <= b <= 1 for a, b in zip(cs, cs[1:]))
  assert list(report["mae_by_age_group"]) == list(metrics.AGE_GROUPS)
  assert sum(g["count"] for g in report["mae_by_age_group"].values()) == len(data)
  assert 0 <= report["epsilon_error"] <= 1 and report["mean_predicted_std"] > 0
  for name in ("cs_curve", "mae_by_age_group", "predicted_vs_true"):
    with Image.open(workdir / "eval" / f"test_{name}.png") as png:
      assert png.format == "PNG" and png.width > 100
  rows = [json.loads(line) for line in (workdir / "eval" / "test_predictions.jsonl").read_text().splitlines()]
  assert [r["index"] for r in rows] == list(range(len(data)))
  assert np.mean([abs(r["predicted_age"] - r["age"]) for r in rows]) == pytest.approx(report["mae"], rel=1e-6)

  # The same faces as PNG files through predict.py --aligned must give the same MAE.
  faces_dir = tmp_path / "faces"
  faces_dir.mkdir()
  for i in range(len(data)):
    Image.fromarray(data.gather(np.array([i]))["image"][0]).save(faces_dir / f"{i:03d}.png")
  proc = run_script("scripts/predict.py", "--workdir", str(workdir), "--aligned", "--json", str(faces_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [Path(r["file"]).name for r in lines] == [f"{i:03d}.png" for i in range(len(data))]
  for r in lines:
    assert r["status"] == "ok" and r["face"] == 0
    assert len(r["distribution"]) == config.labels.max_age - config.labels.min_age + 1
    assert abs(sum(r["distribution"]) - 1.0) < 1e-5
  predicted = np.array([r["age"] for r in lines])
  np.testing.assert_allclose(predicted, [r["predicted_age"] for r in rows], rtol=1e-5)
  assert np.mean(np.abs(predicted - data.age)) == pytest.approx(report["mae"], rel=1e-5)


@pytest.mark.slow
def test_evaluate_script_on_the_latest_checkpoint_reports_the_trainers_final_metrics(trained):
  """One Evaluator scores both: the same numbers to float32 rounding."""
  config, workdir, final = trained
  proc = run_script(
    "scripts/evaluate.py",
    "--workdir",
    str(workdir),
    "--checkpoint",
    "latest",
    "--split",
    config.data.eval_split,
    "--no-calibration",  # the trainer's evaluations score the raw model
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "eval" / f"{config.data.eval_split}.json").read_text())
  assert report["step"] == tiny_run.STEPS and report["num_examples"] == 50 and report["temperature"] == 1.0
  assert report["mae"] == pytest.approx(final["eval_mae"], rel=1e-6)
  assert report["epsilon_error"] == pytest.approx(final["eval_epsilon_error"], rel=1e-6)
  assert report["cumulative_score"]["5"] == pytest.approx(final["eval_cs5"], rel=1e-6)
  assert report["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_the_evaluators_report_equals_a_float64_numpy_computation(trained):
  """Every number of the report, recomputed in float64 NumPy from the Predictor's distributions."""
  config, workdir, _ = trained
  data = pipeline.load_labelled_split(config.data, config.labels, "test")
  predictor = prediction.Predictor(workdir, "latest", batch_size=8, calibrated=False)
  probs = predictor(data.images).astype(np.float64)
  bins = predictor.bins.astype(np.float64)
  predicted = probs @ bins
  std = np.sqrt(np.maximum(probs @ bins**2 - predicted**2, 0))
  error = np.abs(predicted - data.age)
  sigma = np.where(data.age_std > 0, data.age_std, config.eval.epsilon_sigma)
  _, fns, state = loading.load_trained(workdir, "latest")
  # A batch that does not divide the split: padding must not count.
  report = evaluator(fns, data).run(state)
  assert report["num_examples"] == len(data) == 50
  assert report["mae"] == pytest.approx(error.mean(), rel=1e-5)
  assert report["epsilon_error"] == pytest.approx(
    np.mean(1 - np.exp(-((predicted - data.age) ** 2) / (2 * sigma**2))), rel=1e-5
  )
  assert report["mean_predicted_std"] == pytest.approx(std.mean(), rel=1e-4)
  for k, value in report["cumulative_score"].items():  # float32 may fall either side of a threshold it is at
    assert np.mean(error <= int(k) - 1e-3) <= value <= np.mean(error <= int(k) + 1e-3), k
  groups = np.clip(np.floor(data.age / 10), 0, 7).astype(int)
  for g, (name, entry) in enumerate(report["mae_by_age_group"].items()):
    assert entry["count"] == int(np.sum(groups == g)), name
    assert entry["mae"] == (pytest.approx(error[groups == g].mean(), rel=1e-5) if entry["count"] else None)


@pytest.mark.slow
def test_the_calibrated_report_with_groups_equals_a_float64_numpy_computation(trained):
  """Groups and calibration, with the trainer's temperature, recomputed in float64 from the Predictor's outputs."""
  config, workdir, final = trained
  data = pipeline.load_labelled_split(config.data, config.labels, "test")
  record = json.loads((workdir / calibration.FILE).read_text())
  fitted = record["single"]  # the tiny config scores single views (eval.flip False)
  assert fitted["temperature"] == final["temperature"] and record["split"] == config.data.eval_split
  assert record["step"] == final["best_step"] and fitted["nll_after"] <= fitted["nll_before"]
  assert record["flip"]["temperature"] != fitted["temperature"]  # flip averages have their own
  predictor = prediction.Predictor(workdir, "latest", batch_size=8)
  assert predictor.temperature == fitted["temperature"] != 1.0
  probs = predictor(data.images).astype(np.float64)
  raw = prediction.Predictor(workdir, "latest", batch_size=8, calibrated=False)(data.images).astype(np.float64)
  bins = predictor.bins.astype(np.float64)
  predicted = raw @ bins  # the raw model's expected age: the point prediction, whatever the temperature
  np.testing.assert_allclose(probs @ bins, predicted, atol=5e-4)  # the calibrated distributions keep it
  _, fns, state = loading.load_trained(workdir, "latest")
  report, _ = evaluator(fns, data).run(state, temperature=calibration.Calibration.from_fit(fitted), outputs=True)
  assert report["mae"] == pytest.approx(np.mean(np.abs(predicted - data.age)), rel=1e-5)
  # final_metrics.json's test_mae (the best checkpoint, here the latest) is that same raw MAE.
  assert final["best_step"] == int(state.step)
  assert final["test_mae"] == pytest.approx(report["mae"], rel=1e-6)
  # A plain softmax(logits / T) moves the expectation: scoring it (the mutant) reads another MAE.
  plain = np.exp(np.log(np.maximum(raw, 1e-300)) / fitted["temperature"])
  plain_mae = np.mean(np.abs((plain / plain.sum(1, keepdims=True)) @ bins - data.age))
  assert abs(plain_mae - report["mae"]) > 1e-3
  groupings = {**{k: (v, data.group_names[k]) for k, v in data.groups.items()}}
  groupings["age_group"] = (np.clip(np.floor(data.age / 10), 0, 7).astype(int), metrics.AGE_GROUPS)
  assert list(report["groups"]) == list(groupings) and len(groupings) >= 3  # the demo's own groupings too
  for grouping, (codes, names) in groupings.items():
    assert list(report["groups"][grouping]) == list(names)
    for g, name in enumerate(names):
      entry, inside = report["groups"][grouping][name], codes == g
      assert entry["count"] == int(inside.sum()), (grouping, name)
      if entry["count"]:
        assert entry["mae"] == pytest.approx(np.mean(np.abs(predicted - data.age)[inside]), rel=1e-5)
        assert entry["mean_error"] == pytest.approx(np.mean((predicted - data.age)[inside]), rel=1e-4, abs=1e-4)
    assert sum(e["count"] for e in report["groups"][grouping].values()) == len(data)
  c = report["calibration"]
  age_bin = (data.age - config.labels.min_age).astype(int)
  for p, nll_key, coverage_key in ((probs, "nll", "coverage"), (raw, "nll_uncalibrated", "coverage_uncalibrated")):
    assert c[nll_key] == pytest.approx(np.mean(-np.log(p[np.arange(len(data)), age_bin])), rel=1e-4)
    for level, share in c[coverage_key].items():
      m = float(level)
      assert share == pytest.approx(np.mean(reference_covered(p, data.age, m)), abs=1.5 / len(data))
  # The 80% interval as shown: per age bucket b, the rounded central interval of mass m_b clipped to
  # b's ages, from the first to the last such age; the share of whole-year ages inside it.
  masses = fitted["interval_masses"]["0.8"]
  inside = []
  for row, age in zip(probs, data.age):
    ends = []
    for (_, first, end), m in zip(calibration.INTERVAL_BUCKETS, masses):
      low = max(round(reference_quantile(row, (1 - m) / 2)), first, bins[0])
      high = min(round(reference_quantile(row, (1 + m) / 2)), end - 1, bins[-1])
      ends += [(low, high)] if low <= high else []
    inside.append(min(e[0] for e in ends) <= age <= max(e[1] for e in ends))
  assert c["coverage_shown"]["0.8"] == pytest.approx(np.mean(inside), abs=1.5 / len(data))
  assert c["coverage_by_bucket"]["18+"]["count"] == int(np.sum(data.age >= 18))


@pytest.mark.slow
def test_calibrate_refits_and_no_calibration_scores_the_raw_model(trained):
  config, workdir, _ = trained
  proc = run_script("scripts/evaluate.py", "--workdir", str(workdir), "--checkpoint", "latest", "--calibrate")
  assert proc.returncode == 0, proc.stderr[-3000:]
  fitted = json.loads((workdir / calibration.FILE).read_text())
  assert fitted["step"] == tiny_run.STEPS and fitted["split"] == config.data.eval_split
  report = json.loads((workdir / "eval" / "test.json").read_text())
  assert report["temperature"] == report["calibration"]["temperature"] == fitted["single"]["temperature"]
  assert "largest MAE gap" in proc.stdout and "calibration (temperature" in proc.stdout
  for name in ("groups", "calibration"):
    with Image.open(workdir / "eval" / f"test_{name}.png") as png:
      assert png.format == "PNG" and png.width > 300
  proc = run_script("scripts/evaluate.py", "--workdir", str(workdir), "--checkpoint", "latest", "--no-calibration")
  assert proc.returncode == 0, proc.stderr[-3000:]
  raw = json.loads((workdir / "eval" / "test.json").read_text())
  assert raw["temperature"] == 1.0 and raw["calibration"]["nll"] == pytest.approx(
    report["calibration"]["nll_uncalibrated"]
  )
  proc = run_script("scripts/evaluate.py", "--workdir", str(workdir), "--calibrate", "--no-calibration")
  assert proc.returncode != 0 and "give one of them" in proc.stderr


def mirror_symmetric(params: dict) -> dict:
  """Makes every conv kernel, and fc1 over the pooled grid, symmetric under a horizontal flip."""
  params = jax.tree.map(np.asarray, params)
  convs = {
    i: {**layer, "kernel": 0.5 * (layer["kernel"] + layer["kernel"][:, ::-1])} for i, layer in params["convs"].items()
  }
  fc1 = params["fc1"]["kernel"]
  grid = fc1.reshape(7, 7, -1, fc1.shape[-1])  # rows are the pooled features in H, W, C order
  fc1 = (0.5 * (grid + grid[:, ::-1])).reshape(fc1.shape)
  return {**params, "convs": convs, "fc1": {**params["fc1"], "kernel": fc1}}


@pytest.mark.slow
def test_flip_changes_nothing_on_a_mirror_symmetric_model(trained):
  config, workdir, _ = trained
  data = pipeline.load_labelled_split(config.data, config.labels, "test")
  _, fns, state = loading.load_trained(workdir, "latest")

  def distributions(state, flip: bool) -> np.ndarray:
    return evaluator(fns, data, flip).run(state, outputs=True)[1]["distribution"]

  # Sanity check: the trained model is not symmetric, so flipping does change its predictions.
  assert np.abs(distributions(state, True) - distributions(state, False)).max() > 1e-4
  symmetric = state.replace(
    params=jax.device_put(mirror_symmetric(state.params), jax.tree.map(lambda x: x.sharding, state.params))
  )
  np.testing.assert_allclose(distributions(symmetric, True), distributions(symmetric, False), atol=1e-6)


@pytest.mark.slow
def test_distribution_figure_images_renders_one_rgb_image_per_face(trained):
  config, workdir, _ = trained
  predictor = prediction.Predictor(workdir)
  batch = pipeline.load_labelled_split(config.data, config.labels, "validation").gather(np.arange(3))
  probs = predictor(batch["image"])
  images = plots.distribution_figure_images(batch["image"], batch["age"], probs, predictor.bins, config.loss.sigma)
  assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == 3 and images.shape[-1] == 3
  assert images.shape[1] >= 100 and images.shape[2] >= 200
  assert all(image.std() > 10 for image in images)  # something was drawn


def target_f64(age: float, sigma: float, mean_preserving: bool, bins: np.ndarray) -> np.ndarray:
  """The loss's target in float64 NumPy: N(centre, sigma^2) on the bins, normalised; with `mean_preserving` the
  centre is bisected until the distribution's mean is the age (outward, next to an end)."""
  bins = np.asarray(bins, np.float64)

  def gaussian(centre: float) -> np.ndarray:
    z = -0.5 * ((bins - centre) / sigma) ** 2
    w = np.exp(z - z.max())
    return w / w.sum()

  if not mean_preserving:
    return gaussian(age)
  low, high = bins[0] - 50 * sigma**2 - 50, bins[-1] + 50 * sigma**2 + 50
  for _ in range(200):
    mid = 0.5 * (low + high)
    low, high = (low, mid) if gaussian(mid) @ bins > age else (mid, high)
  return gaussian(0.5 * (low + high))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gaussian", "mean_preserving"])
def test_distribution_figure_images_draw_each_faces_own_target_sigma(target, monkeypatch):
  """With loss.sigma_from_data, each face's drawn target is its own training target (train.py passes
  losses.target_sigma), not loss.sigma's: checked against float64 NumPy."""
  from agejax.training import losses

  drawn = []
  original = plots.distribution_figure

  def spy(*args, **kwargs):
    fig = original(*args, **kwargs)
    (line,) = [x for x in fig.axes[1].get_lines() if x.get_label().startswith("target")]
    drawn.append((np.asarray(line.get_ydata(), np.float64), line.get_label()))
    return fig

  monkeypatch.setattr(plots, "distribution_figure", spy)
  bins = np.arange(1, 101, dtype=np.float32)
  ages = np.array([2.0, 40.0, 60.0, 98.0], np.float32)
  age_std = np.array([5.0, 0.0, 0.3, 3.5], np.float32)  # its own; none (loss.sigma); below the floor; its own
  cfg = settings.LossSettings(sigma=2.0, target=target, sigma_from_data=True, sigma_floor=1.0)
  sigma = np.asarray(losses.target_sigma(cfg, age_std))
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  probs = np.full((4, 100), 0.01, np.float32)
  mean_preserving = target == "mean_preserving"
  out = plots.distribution_figure_images(images, ages, probs, bins, sigma, mean_preserving=mean_preserving)
  assert out.shape[0] == 4 and len(drawn) == 4
  for age, own, (curve, label) in zip(ages, [5.0, 2.0, 1.0, 3.5], drawn):
    np.testing.assert_allclose(curve, target_f64(float(age), own, mean_preserving, bins), rtol=0, atol=2e-5)
    assert label == f"target N({age:g}, {own:g}²)"
  drawn.clear()  # one sigma for all faces (loss.sigma_from_data off): the same as before
  plots.distribution_figure_images(images, ages, probs, bins, 2.0, mean_preserving=mean_preserving)
  for age, (curve, _) in zip(ages, drawn):
    np.testing.assert_allclose(curve, target_f64(float(age), 2.0, mean_preserving, bins), rtol=0, atol=2e-5)


@pytest.mark.slow
def test_missing_checkpoints_and_unknown_steps_fail_with_one_line(trained, tmp_path):
  _, workdir, _ = trained
  with pytest.raises(FileNotFoundError, match="python scripts/train.py --config configs/vgg16_kl.py --workdir"):
    loading.load_trained(tmp_path / "never_trained")
  with pytest.raises(ValueError, match=rf"available: \[{', '.join(map(str, tiny_run.CHECKPOINTS))}\]"):
    loading.load_trained(workdir, "15")  # not a checkpoint
  with pytest.raises(ValueError, match="best, latest or a step number"):
    loading.load_trained(workdir, "newest")
