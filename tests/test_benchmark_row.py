"""The unified benchmark's row by its own definitions: its recipe (configs/fae_benchmark.py), its MAE, its labels.

References: Paplham & Franc's facebase/configs/*_256x256_resnet50_imagenet.yaml and IMDB-CLEAN-EM-CNN_256x256.yaml
(batch 100, Adam 1e-4 / 1e-3, 50 / 100 epochs, labels0-101.yaml), lib/training.py (the prediction
argmin_y sum_a p(a)|a - y|, the best epoch by `<=`), loss.py dldl_loss (sigma 2 on the classes, renormalised).
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from fae_fixtures import make_fae_database, prepare_fae
from test_metrics import posterior_median_reference

from agejax import errors, labels, settings
from agejax.training import checkpointing, configuration, losses, train
from configs import fae_benchmark


def recipe(arg: str = "", **model) -> settings.Settings:
  config = fae_benchmark.get_config(arg)
  config.model.pretrained = ""  # no converted weights in tests; the key's value is checked below
  config.model.update(model)
  return configuration.validate(config)


@pytest.mark.parametrize("train_faces", [1, 100, 101, 12_345])
def test_the_recipe_is_the_benchmark_s_yaml(train_faces):
  cfg = recipe()
  assert fae_benchmark.get_config().model.pretrained == "weights/resnet50_imagenet"  # IMAGENET1K_V2 converted
  assert cfg.model.name == "resnet50" and cfg.run.batch_size == 100
  assert (cfg.optimizer.learning_rate, cfg.optimizer.schedule, cfg.optimizer.weight_decay) == (1e-4, "constant", 0.0)
  assert (cfg.labels.min_age, cfg.labels.max_age, cfg.labels.out_of_range) == (0, 101, "drop")  # labels0-101.yaml
  assert labels.age_bins(cfg.labels.min_age, cfg.labels.max_age).tolist() == list(range(102))
  assert cfg.data.image_size == 256 and cfg.data.eval_crop * 281 == pytest.approx(256)
  assert cfg.augment.resized_crop_min_area == 0.8 and cfg.augment.flip and not cfg.augment.scale
  assert cfg.eval.select_by == "bench_mae" and cfg.loss.name == "onehot"
  # 50 epochs of the split's own training set, an evaluation and a checkpoint each (a DataLoader's batches).
  per_epoch = math.ceil(train_faces / 100)
  run = train.in_steps(cfg, per_epoch).run
  assert run.num_train_steps == 50 * per_epoch
  assert run.eval_every_steps == run.checkpoint_every_steps == per_epoch
  first = recipe("pretrain")
  assert (first.optimizer.learning_rate, first.run.num_epochs, first.data.builder_config) == (1e-3, 100, "imdb_em_cnn")
  assert train.in_steps(first, per_epoch).run.num_train_steps == 100 * per_epoch
  assert {e.builder_config for e in first.eval.evals} == set(fae_benchmark.CROSS_DATASET)
  assert all(e.split == "all" and e.every_steps == train.AT_THE_END for e in first.eval.evals)


@pytest.mark.slow
def test_the_variants_train_the_benchmark_s_losses():
  """ce: one-hot cross-entropy; dldl: its Gaussian on 0..101 renormalised (float64 NumPy); kl: agejax's."""
  bins = jnp.arange(0, 102, dtype=jnp.float32)
  ages = np.array([0.0, 1.0, 37.0, 100.0, 101.0])
  logits = jnp.asarray(np.random.default_rng(0).normal(0, 2, (5, 102)), jnp.float32)
  log_p = np.asarray(logits, np.float64) - np.log(np.exp(np.asarray(logits, np.float64)).sum(1, keepdims=True))
  k = np.arange(102, dtype=np.float64)
  ce = losses.make_loss(recipe().loss, bins)(logits, jnp.asarray(ages, jnp.float32), jnp.zeros(5))
  np.testing.assert_allclose(ce, -log_p[np.arange(5), ages.astype(int)], rtol=1e-5)
  target = np.exp(-((k[None] - ages[:, None]) ** 2) / (2 * 2.0**2))
  target /= target.sum(1, keepdims=True)  # loss.py dldl_loss: the 1/sqrt(2 pi sigma) cancels here
  cross_entropy = -(target * log_p).sum(1)  # their F.cross_entropy(logits, target)
  entropy = -(target * np.log(np.maximum(target, 1e-300))).sum(1)
  dldl = losses.make_loss(recipe("dldl").loss, bins)(logits, jnp.asarray(ages, jnp.float32), jnp.zeros(5))
  np.testing.assert_allclose(dldl, cross_entropy - entropy, rtol=1e-4, atol=1e-5)  # KL: the same gradients
  assert (recipe("kl").loss.name, recipe("kl").loss.target) == ("kl", "mean_preserving")
  assert recipe("pretrained", init_from="some/run").model.init_from_head is False


def test_recipe_mistakes_fail_in_one_line():
  with pytest.raises(ValueError, match="unknown variant 'dldl2'"):
    fae_benchmark.get_config("dldl2")
  with pytest.raises(errors.UserError, match=r"config.model.init_from_head=False: .* set it to the first stage"):
    recipe("pretrained")  # the first stage's workdir not given: it would train from ImageNet unnoticed
  config = fae_benchmark.get_config()
  config.model.pretrained = ""
  config.eval.select_by = "median"
  with pytest.raises(errors.UserError, match=r"config.eval.select_by='median': must be one of \('mae', 'bench_mae'\)"):
    configuration.validate(config)
  config.eval.select_by, config.num_epochs, config.num_train_steps = "mae", 0.0, 0
  with pytest.raises(errors.UserError, match=r"config.num_train_steps=0: must be positive \(or set num_epochs\)"):
    configuration.validate(config)


def test_equal_scores_choose_the_later_checkpoint_as_the_benchmark_does(tmp_path):
  """lib/training.py keeps an epoch whose validation error is <= the best so far: of equal ones, the later."""
  ckpts = checkpointing.Checkpoints(tmp_path / "checkpoints", keep=1, asynchronous=False)
  state = {"w": np.zeros(3, np.float32)}
  for step, (mae, bench) in enumerate([(5.0, 6.0), (4.0, 5.5), (4.5, 5.5), (4.9, 7.0)], start=1):
    scores = {"mae": mae, "bench_mae": bench}
    ckpts.save(step, state, checkpointing.checkpoint_metrics(scores, "bench_mae"))
  ckpts.wait()
  assert ckpts.best_step() == 3  # steps 2 and 3 tie at 5.5; step 2 had the lower expected-age MAE
  ckpts.close()
  reader = checkpointing.Checkpoints(tmp_path / "checkpoints", read_only=True)
  assert reader.best_step() == 3 and 3 in reader.manager.all_steps()  # the preserved best is the later one too
  reader.close()


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, compilation_cache):
  """A tiny run of the recipe on a generated 10-folder aligned database, two ages above 101 in it."""
  root = tmp_path_factory.mktemp("bench_db")
  json_path, images = make_fae_database(root, "morph_aligned", subjects_per_folder=2, images_per_subject=3)
  entries = json.loads(json_path.read_text())
  test_entries = [e for e in entries if e["folder"] in (8, 9)]
  train_entries = [e for e in entries if e["folder"] in range(6)]
  test_entries[0]["age"], train_entries[0]["age"] = 104, 116  # UTKFace goes to 116; the benchmark drops them
  json_path.write_text(json.dumps(entries))
  prepare_fae(json_path, images, root / "tfds", "morph", image_size=36)
  config = fae_benchmark.get_config("tiny,kl")
  config.model.update(name="vgg16", width_multiplier=0.0625, batch_norm=True)  # the fastest to compile
  config.data.update(builder_config="morph", data_dir=str(root / "tfds"), cache_dir=str(root / "arrays"))
  config.compilation_cache_dir = compilation_cache
  # A cross-dataset test set as :pretrain's (here the same database's every folder): the best checkpoint, at the end.
  every = {"name": "every_folder", "dataset": "fae", "builder_config": "morph", "split": "all", "every_steps": -1}
  config.evals = (every,)
  workdir = tmp_path_factory.mktemp("bench_run")
  final = train.train_and_evaluate(config, workdir)
  return final, workdir, {"train": len(train_entries) - 1, "test": len(test_entries) - 1}


@pytest.mark.slow
def test_a_tiny_run_reports_the_benchmark_s_mae_of_the_posterior_median_at_temperature_1(bench_run):
  from agejax.inference import evaluate

  final, workdir, sizes = bench_run
  assert final["step"] == 2 * math.ceil(sizes["train"] / 16)  # 2 epochs of the split's training faces, 116 dropped
  report, _ = evaluate.run_evaluation(None, workdir, "test")
  lines = [json.loads(line) for line in (workdir / "eval" / "test_predictions.jsonl").read_text().splitlines()]
  assert len(lines) == report["num_examples"] == sizes["test"]  # the age 104 is dropped from the test split too
  probs = np.array([line["probabilities"] for line in lines], np.float64)  # the raw model's: temperature 1
  ages = np.array([line["age"] for line in lines])
  median = posterior_median_reference(probs, np.arange(0, 102, dtype=np.float64))
  np.testing.assert_array_equal([line["bench_age"] for line in lines], median)
  assert final["temperature"] != 1.0  # calibration tempers the shown distributions, never this score
  assert final["test_bench_mae"] == pytest.approx(np.mean(np.abs(median - ages)), rel=1e-6)
  assert report["bench_mae"] == pytest.approx(final["test_bench_mae"], rel=1e-6)
  assert final["test_bench_cs5"] == pytest.approx(np.mean(np.abs(median - ages) <= 5), rel=1e-6)
  assert final["eval_bench_mae"] is not None and final["eval_bench_cs5"] is not None


@pytest.mark.slow
def test_a_cross_dataset_evaluation_scores_every_folder_with_the_best_checkpoint_at_the_end(bench_run):
  from agejax.inference import evaluate, loading

  final, workdir, sizes = bench_run
  every = final["evals"]["every_folder"]
  assert every["step"] == final["best_step"]
  config = loading.load_config(workdir)
  config.data.split = ""  # the database's own folders, all of them, as config.evals reads them
  report = evaluate.evaluate_workdir(config, workdir, "all")
  assert report["step"] == final["best_step"] and report["num_examples"] == 60 - 2  # the two ages over 101 dropped
  assert every["bench_mae"] == pytest.approx(report["bench_mae"], rel=1e-6)
  assert every["mae"] == pytest.approx(report["mae"], rel=1e-6)


@pytest.mark.slow
def test_a_config_that_imports_its_sibling_loads_from_a_script(tmp_path):
  """configs/fae_benchmark.py and resnet50_kl.py import the config they vary (`from configs import ...`),
  and a script's sys.path starts at scripts/: the folder above the config's package is put on it."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  root = Path(__file__).resolve().parents[1]
  package = tmp_path / "project" / "myconfigs"  # not importable from anywhere else
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "base.py").write_text(
    "from configs import vgg16_kl\n\ndef get_config(arg=None):\n  return vgg16_kl.get_config('tiny')\n"
  )
  (package / "variant.py").write_text(
    "from myconfigs import base\n\n"
    "def get_config(arg=None):\n  c = base.get_config()\n  c.num_epochs = -1.0\n  return c\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))  # agejax and configs, not myconfigs
  command = [sys.executable, "scripts/train.py", "--config", str(package / "variant.py"), "--workdir", str(tmp_path)]
  proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: config.num_epochs=-1.0: must be >= 0 (0: num_train_steps sets the length)"
  )
