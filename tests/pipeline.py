"""A trained `:tiny` workdir through every user-facing path: Predictor, evaluate, predict, export and serve.

Shared by the backbone tests (test_backbones.py, test_plugins.py): each trains its own model and input
spec, then checks that every path gives the distributions computed here by hand from the spec.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from conftest import ROOT, assert_same_distributions, train_command
from flax import nnx
from PIL import Image
from test_labels import tempered_reference

from agejax import models
from agejax.inference import export, loading, prediction
from agejax.serving import local

TESTS = Path(__file__).resolve().parent
ENV = dict(
  os.environ,
  JAX_PLATFORMS="cpu",
  TF_CPP_MIN_LOG_LEVEL="2",
  PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
)
SHORT = ("--config.num_train_steps=20", "--config.eval_every_steps=10", "--config.checkpoint_every_steps=10")


def run(*args: str) -> subprocess.CompletedProcess:
  """Runs a script of the project (cwd: the repository) and asserts that it succeeded."""
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def train(workdir: Path, *overrides: str, data_dir: str, cache: str) -> Path:
  """A 20-step `:tiny` run by scripts/train.py with the given overrides; returns the workdir."""
  run(*train_command(workdir, *overrides, *SHORT, data_dir=data_dir, cache=cache)[1:])
  return workdir


def by_hand(workdir: Path, crops: np.ndarray, spec: models.InputSpec, temperature: float) -> np.ndarray:
  """The run's distributions computed here: resize, then the spec's pixel range, channel order, mean and std."""
  _, trained, state = loading.load_trained(workdir)
  size = trained.model.image_size
  x = np.asarray(models.resize(np.asarray(crops, np.float32) / 255.0, size), np.float64) * spec.pixel_range
  x = x[..., ::-1] if spec.channels == "BGR" else x
  x = (x - np.array(spec.mean)) / np.array(spec.std)
  model = nnx.merge(trained.model.graphdef, state.params, state.model_state)
  logits = np.asarray(model(np.asarray(x, np.float32)), np.float64)
  bins = np.asarray(trained.model.bins, np.float64)
  return np.stack([tempered_reference(row, bins, temperature) for row in logits])  # the raw expected age kept


def check_every_path(workdir: Path, name: str, spec: models.InputSpec, cache: str, tmp_path: Path) -> None:
  """Asserts that the run's record, Predictor, evaluate.py, predict.py, its export and the server all
  use backbone `name` with input `spec` and give the same distributions."""
  record = json.loads((workdir / "inference.json").read_text())
  assert record["model"] == name and record["input_spec"] == spec.to_json()
  predictor = prediction.Predictor(workdir)
  assert predictor.input_spec == spec.to_json() and predictor.temperature != 1.0
  crops = np.random.default_rng(0).integers(0, 256, (5, predictor.input_size, predictor.input_size, 3), np.uint8)
  expected = predictor(crops)
  np.testing.assert_allclose(expected, by_hand(workdir, crops, spec, predictor.temperature), atol=2e-6)

  run("scripts/evaluate.py", "--workdir", str(workdir), "--split", "test")
  report = json.loads((workdir / "eval" / "test.json").read_text())
  assert report["num_examples"] == 50 and report["step"] in (10, 20)

  files = []
  for i, crop in enumerate(crops):
    files.append(tmp_path / f"{i}.png")
    Image.fromarray(crop).save(files[-1])
  lines = run("scripts/predict.py", "--workdir", str(workdir), "--aligned", "--json", *map(str, files)).stdout
  assert_same_distributions([json.loads(line)["distribution"] for line in lines.splitlines()], expected)

  out = tmp_path / "export"
  run("scripts/export.py", "--workdir", str(workdir), "--output", str(out), "--nosaved_model", "--noonnx")
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  assert manifest["model"] == name and manifest["input_spec"] == spec.to_json()
  assert_same_distributions(export.ExportedPredictor(out)(crops), expected)

  flags = ["--export", str(out), f"--compilation_cache_dir={cache}", "--max_batch=4"]
  with local.LocalServer(ROOT / "scripts" / "serve.py", flags, env=ENV) as server:
    assert httpx.get(server.url + "/healthz").json()["input_spec"] == spec.to_json()
    png = io.BytesIO()
    Image.fromarray(crops[0]).save(png, "PNG")
    answer = httpx.post(
      server.url + "/v1/predict", files={"files": ("0.png", png.getvalue())}, params={"aligned": "true"}, timeout=60
    ).json()
  assert_same_distributions(answer["results"][0]["faces"][0]["distribution"], expected[0])
