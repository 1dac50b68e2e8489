"""A workdir from before the package regrouping (tests/fixtures/workdir_v0) evaluates, predicts, exports, resumes.

Its config.json lacks every key added since (model.name, plugins, evals, optimizer.rules) and its
inference.json has no input spec: it reads as the ImageNet-normalised vgg16 it was, and gives the
numbers the code that wrote it gave (expected_predictions.json; calibrated ones tempered as calibration
applies since issue 31, around the raw expected age).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, array_cache, assert_same_distributions, cpu_env, train_command
from test_labels import tempered_reference

from agejax import models
from agejax.inference import export, prediction

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "workdir_v0"
EXPECTED = json.loads((FIXTURE / "expected_predictions.json").read_text())


@pytest.fixture
def legacy(tmp_path, data_dir) -> Path:
  """A copy of the old workdir whose data moved to this session's tiny demo (data paths may change)."""
  workdir = tmp_path / "workdir_v0"
  shutil.copytree(FIXTURE, workdir, ignore=shutil.ignore_patterns("README.md", "expected_predictions.json"))
  config = json.loads((workdir / "config.json").read_text())
  assert "name" not in config["model"] and "plugins" not in config and "evals" not in config
  config["data"].update(data_dir=data_dir, cache_dir=array_cache(data_dir))
  (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  return workdir


def crops() -> np.ndarray:
  """The three crops expected_predictions.json was made from."""
  return np.stack(
    [
      np.full((40, 40, 3), 128, np.uint8),
      np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8),
      np.zeros((40, 40, 3), np.uint8),
    ]
  )


def run(*args: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def calibrated_now(row: dict) -> np.ndarray:
  """A calibrated row as calibration applies now: the raw row's distributions tempered around their own mean.

  The old code divided the logits by T (moving the expected age); since issue 31 the temperature keeps
  the raw model's expected age, so the old workdir's calibrated numbers are its raw ones, tilted.
  """
  raw = np.asarray(next(r for r in EXPECTED["predictions"] if not r["calibrated"])["distributions"], np.float64)
  bins = np.arange(1, raw.shape[-1] + 1, dtype=np.float64)
  return np.stack([tempered_reference(np.log(np.maximum(p, 1e-300)), bins, row["temperature"]) for p in raw])


@pytest.mark.slow
def test_an_old_workdir_predicts_what_its_code_predicted_and_exports_and_evaluates(legacy, tmp_path):
  for row in EXPECTED["predictions"]:
    predictor = prediction.Predictor(legacy, calibrated=row["calibrated"])
    assert (predictor.step, predictor.temperature) == (row["step"], pytest.approx(row["temperature"]))
    assert predictor.cfg.model.name == "vgg16" and predictor.input_spec == models.IMAGENET.to_json()
    assert_same_distributions(predictor(crops()), calibrated_now(row) if row["calibrated"] else row["distributions"])

  out = tmp_path / "export"
  run("scripts/export.py", "--workdir", str(legacy), "--output", str(out), "--nosaved_model")
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  assert (manifest["model"], manifest["input_spec"], manifest["step"]) == ("vgg16", models.IMAGENET.to_json(), 4)
  calibrated = next(r for r in EXPECTED["predictions"] if r["calibrated"])
  assert_same_distributions(export.ExportedPredictor(out)(crops()), calibrated_now(calibrated))

  run("scripts/evaluate.py", "--workdir", str(legacy), "--split", "test")
  report = json.loads((legacy / "eval" / "test.json").read_text())
  assert report["step"] == 4 and report["num_examples"] == 50


@pytest.mark.slow
def test_an_old_interrupted_workdir_resumes_to_its_end(legacy, data_dir, compilation_cache):
  args = (
    "--config.model.width_multiplier=0.01",
    "--config.num_train_steps=8",
    "--config.eval_every_steps=4",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=4",
    "--config.keep_checkpoints=1",
  )
  proc = run(*train_command(legacy, *args, data_dir=data_dir, cache=compilation_cache)[1:])
  assert f"resuming from step 4 of {legacy / 'checkpoints'}" in proc.stdout
  final = json.loads((legacy / "final_metrics.json").read_text())
  assert final["step"] == 8 and np.isfinite(final["eval_mae"])
  record = json.loads((legacy / "inference.json").read_text())  # rewritten by the new code, with what it assumed
  assert record["model"] == "vgg16" and record["input_spec"] == models.IMAGENET.to_json()
