"""Plug-ins from outside agejax (tests/plugin_toy.py): a backbone with its own input spec, a loss, optimizer rules.

No file in agejax/ names them: the config lists the module in `config.plugins`, and every script
that reads the workdir imports it again from its config.json.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jax
import numpy as np
import plugin_toy
import pytest
from conftest import ROOT, assert_same_distributions, one_train_step, train_command
from flax import nnx
from PIL import Image

from agejax import errors, models
from agejax.inference import export, loading, prediction
from agejax.serving import local
from agejax.training import configuration, learner

TESTS = Path(__file__).resolve().parent
ENV = dict(
  os.environ,
  JAX_PLATFORMS="cpu",
  TF_CPP_MIN_LOG_LEVEL="2",
  PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p),
)
TOY = ("--config.model.name=toy", "--config.plugins=('plugin_toy',)")
SHORT = ("--config.num_train_steps=20", "--config.eval_every_steps=10", "--config.checkpoint_every_steps=10")


def run(*args: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def toy_run(data_dir, compilation_cache, tmp_path_factory) -> Path:
  """A `:tiny` run of the toy backbone, trained by scripts/train.py."""
  workdir = tmp_path_factory.mktemp("toy")
  run(*train_command(workdir, *TOY, *SHORT, data_dir=data_dir, cache=compilation_cache)[1:])
  return workdir


def by_hand(workdir: Path, crops: np.ndarray, temperature: float) -> np.ndarray:
  """The toy model's distributions computed here: its spec's pixel range, BGR order, mean and std, applied by hand."""
  _, trained, state = loading.load_trained(workdir)
  size = trained.model.image_size
  x = np.asarray(models.resize(np.asarray(crops, np.float32) / 255.0, size), np.float64)
  x = (x * 255.0)[..., ::-1]
  x = (x - np.array(plugin_toy.SPEC.mean)) / np.array(plugin_toy.SPEC.std)
  toy = nnx.merge(trained.model.graphdef, state.params, state.model_state)
  logits = np.asarray(toy(np.asarray(x, np.float32)), np.float64) / temperature
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def test_a_toy_backbone_trains_evaluates_predicts_exports_and_serves_with_its_input_spec(
  toy_run, compilation_cache, tmp_path
):
  record = json.loads((toy_run / "inference.json").read_text())
  assert record["model"] == "toy" and record["input_spec"] == plugin_toy.SPEC.to_json()
  predictor = prediction.Predictor(toy_run)  # imports plugin_toy from config.json's plugins
  assert predictor.input_spec == plugin_toy.SPEC.to_json() and predictor.temperature != 1.0
  crops = np.random.default_rng(0).integers(0, 256, (5, predictor.input_size, predictor.input_size, 3), np.uint8)
  expected = predictor(crops)
  np.testing.assert_allclose(expected, by_hand(toy_run, crops, predictor.temperature), atol=2e-6)

  run("scripts/evaluate.py", "--workdir", str(toy_run), "--split", "test")
  report = json.loads((toy_run / "eval" / "test.json").read_text())
  assert report["num_examples"] == 50 and report["step"] in (10, 20)

  files = []
  for i, crop in enumerate(crops):
    files.append(tmp_path / f"{i}.png")
    Image.fromarray(crop).save(files[-1])
  lines = run("scripts/predict.py", "--workdir", str(toy_run), "--aligned", "--json", *map(str, files)).stdout
  assert_same_distributions([json.loads(line)["distribution"] for line in lines.splitlines()], expected)

  out = tmp_path / "export"
  run("scripts/export.py", "--workdir", str(toy_run), "--output", str(out), "--nosaved_model")
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  assert manifest["model"] == "toy" and manifest["input_spec"] == plugin_toy.SPEC.to_json()
  assert_same_distributions(export.ExportedPredictor(out)(crops), expected)

  flags = ["--export", str(out), f"--compilation_cache_dir={compilation_cache}", "--max_batch=4"]
  with local.LocalServer(ROOT / "scripts" / "serve.py", flags, env=ENV) as server:
    assert httpx.get(server.url + "/healthz").json()["input_spec"] == plugin_toy.SPEC.to_json()
    png = io.BytesIO()
    Image.fromarray(crops[0]).save(png, "PNG")
    answer = httpx.post(
      server.url + "/v1/predict", files={"files": ("0.png", png.getvalue())}, params={"aligned": "true"}, timeout=60
    ).json()
  assert_same_distributions(answer["results"][0]["faces"][0]["distribution"], expected[0])


def one_step(tiny_config, **optimizer) -> tuple[learner.TrainState, learner.TrainState, learner.Learner]:
  """(the state at step 0, after one train step, the learner) of the tiny VGG16 with the plug-in loss."""
  config = tiny_config.copy_and_resolve_references()
  config.plugins = ("plugin_toy",)
  config.loss.name = "expectation_l2"
  config.loss.scale = 50.0  # the plug-in loss's own key
  config.optimizer.update(schedule="constant", **optimizer)
  fns, state, after = one_train_step(config)
  return state, after, fns


def test_a_plugin_loss_and_optimizer_rules_by_parameter_path(tiny_config):
  rules = (("convs/0/.*", {"frozen": True}), ("fc1/kernel", {"lr": 0.5}))
  before, plain, fns = one_step(tiny_config)
  _, ruled, _ = one_step(tiny_config, rules=rules)
  # The plug-in loss, with its own config key: (E[age] - age)^2 / 50, against NumPy.
  logits = np.random.default_rng(1).normal(size=(4, 100)).astype(np.float32)
  ages = np.array([3.0, 30.0, 60.0, 90.0], np.float32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(
    fns.loss_fn(logits, ages, np.zeros(4)), (p @ np.arange(1, 101) - ages) ** 2 / 50, rtol=1e-5
  )
  # Rules: the first conv is frozen; fc1's kernel moves half as far (Adam's first step is lr * g / |g|).
  jax.tree.map(np.testing.assert_array_equal, ruled.params["convs"][0], before.params["convs"][0])
  assert np.abs(plain.params["convs"][0]["kernel"] - before.params["convs"][0]["kernel"]).max() > 0
  half = ruled.params["fc1"]["kernel"] - before.params["fc1"]["kernel"]
  full = plain.params["fc1"]["kernel"] - before.params["fc1"]["kernel"]
  np.testing.assert_allclose(half, 0.5 * full, rtol=1e-4, atol=1e-9)
  np.testing.assert_array_equal(ruled.params["fc1"]["bias"], plain.params["fc1"]["bias"])  # not matched: as before
  np.testing.assert_array_equal(ruled.params["head"]["kernel"], plain.params["head"]["kernel"])


@pytest.mark.parametrize(
  "rules, message",
  [
    ((("head/.*", {"speed": 2}),), "config.optimizer.rules[0]: unknown options ['speed']"),
    ((("head/(", {"lr": 2}),), "config.optimizer.rules[0]="),
  ],
)
def test_a_bad_rule_fails_in_one_line_before_anything_is_built(tiny_config, rules, message):
  tiny_config.optimizer.rules = rules
  with pytest.raises(errors.UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
    configuration.validate(tiny_config)


def test_an_unknown_backbone_or_plugin_fails_in_one_line(tiny_config):
  tiny_config.model.name = "resnet7"
  with pytest.raises(errors.UserError, match=r"config.model.name='resnet7' is not a registered backbone \(.*vgg16"):
    configuration.validate(tiny_config)
  tiny_config.plugins = ("no_such_plugin_module",)
  with pytest.raises(errors.UserError, match="config.plugins: cannot import 'no_such_plugin_module'"):
    configuration.validate(tiny_config)
