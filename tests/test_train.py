import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from agejax import train
from conftest import array_cache, checkpoint

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("train/loss", "train/mae", "train/learning_rate", "eval/loss", "eval/mae", "eval/epsilon_error", "eval/cs5",
        "train/nonfinite_steps")


def scalars(workdir: Path) -> dict[str, list[float]]:
  """Reads every scalar series with TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_accumulator
  out = {}
  for events in workdir.glob("events.out.tfevents.*"):
    acc = event_accumulator.EventAccumulator(str(events), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      values = [tf_make(e.tensor_proto) for e in acc.Tensors(tag)]
      out[tag] = [float(v) if np.ndim(v) == 0 else v for v in values]
  return out


def tf_make(proto):
  import tensorflow as tf
  return tf.make_ndarray(proto)


def params_at(workdir: Path, step: int):
  return checkpoint(workdir, step)["params"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, compilation_cache):
  """A 100-step run of the tiny config with checkpoints at steps 50 and 100."""
  from configs import vgg16_kl
  config = vgg16_kl.get_config("tiny")
  config.data.data_dir, config.compilation_cache_dir = data_dir, compilation_cache
  config.data.cache_dir = array_cache(data_dir)
  config.profile_steps = 5
  workdir = tmp_path_factory.mktemp("run")
  final = train.train_and_evaluate(config, workdir)
  return config, workdir, final


def test_profile_steps_leave_a_trace_for_tensorboards_profile_tab(trained):
  _, workdir, _ = trained
  [run] = (workdir / "plugins" / "profile").iterdir()
  assert run.name == "train_steps_11-15"  # after the first log step (10)
  [xplane] = run.glob("*.xplane.pb")  # what TensorBoard's profile tab reads
  assert xplane.stat().st_size > 0
  [chrome] = run.glob("*.trace.json.gz")
  import gzip
  events = json.loads(gzip.decompress(chrome.read_bytes()))["traceEvents"]
  assert sum(e.get("name") == "PjitFunction(train_step)" for e in events) >= 5  # the traced steps' dispatches


def test_run_writes_final_metrics_tensorboard_and_checkpoints(trained):
  _, workdir, final = trained
  on_disk = json.loads((workdir / "final_metrics.json").read_text())
  assert on_disk == final and on_disk["step"] == 100
  for key in ("eval_mae", "eval_epsilon_error", "eval_cs5", "baseline_mae", "eval_loss"):
    assert np.isfinite(on_disk[key])
  assert 0 <= on_disk["eval_cs5"] <= 1 and 0 <= on_disk["eval_epsilon_error"] <= 1
  series = scalars(workdir)
  assert set(TAGS) <= set(series), sorted(series)
  assert len(series["train/loss"]) == 10 and len(series["eval/mae"]) == 2
  assert series["eval/mae"][-1] == pytest.approx(on_disk["eval_mae"], rel=1e-6)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [50, 100]
  images = series["eval/distributions"]  # image summaries: [width, height, PNG bytes...] per evaluation
  assert len(images) == 2 and len(images[-1]) == 2 + 4 and images[-1][2][:8] == b"\x89PNG\r\n\x1a\n"


def test_training_lowers_the_loss(trained):
  series = scalars(trained[1])
  assert series["train/loss"][-1] < 0.95 * series["train/loss"][0]
  assert series["eval/mae"][-1] < series["eval/mae"][0]


def test_resume_continues_exactly_and_finished_run_exits_promptly(trained, tmp_path):
  config, workdir, final = trained
  # Drop the last checkpoint: the rerun restores step 50 and must retrace the same 50 steps.
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "100")
  (resumed / "final_metrics.json").unlink()
  again = train.train_and_evaluate(config, resumed)
  assert again["step"] == 100
  jax.tree.map(np.testing.assert_array_equal, params_at(resumed, 100), params_at(workdir, 100))
  assert not np.array_equal(params_at(workdir, 50)["head"]["kernel"], params_at(workdir, 100)["head"]["kernel"])
  assert again["eval_mae"] == pytest.approx(final["eval_mae"], rel=1e-6)
  start = time.perf_counter()
  assert train.train_and_evaluate(config, workdir) == final  # finished: no training, same metrics
  assert time.perf_counter() - start < 30


@pytest.mark.parametrize("override,key", [
    ("--config.batch_size=6", "config.batch_size=6"),
    ("--config.loss.sigma=0", "config.loss.sigma=0"),
    ("--config.labels.max_age=0", "config.labels.max_age=0"),
    ("--config.keep_checkpoints=0", "config.keep_checkpoints=0"),
    ("--config.optimizer.grad_clip_norm=-1", "config.optimizer.grad_clip_norm=-1"),
    ("--config.optimizer.end_learning_rate_factor=-1", "config.optimizer.end_learning_rate_factor=-1"),
    ("--config.model.dropout_rate=1.5", "config.model.dropout_rate=1.5"),
    ("--config.profile_steps=-1", "config.profile_steps=-1"),
    ("--config.data.cache_dir=gs://bucket/arrays", "config.data.cache_dir='gs://bucket/arrays'"),
])
def test_bad_config_fails_in_one_line_before_compiling(override, key, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/vgg16_kl.py:tiny",
                         "--workdir", str(tmp_path / "w"), override], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and key in last, proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()  # nothing was built, compiled or written


def test_a_config_that_does_not_fit_the_checkpoints_fails_in_one_line_and_keeps_config_json(trained, tmp_path):
  config, workdir, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  before = (copy / "config.json").read_text()
  proc = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/vgg16_kl.py:tiny", "--workdir",
                         str(copy), f"--config.data.data_dir={config.data.data_dir}", "--config.num_train_steps=200",
                         "--config.model.width_multiplier=0.125", "--config.compilation_cache_dir=",
                         f"--config.data.cache_dir={config.data.cache_dir}"],
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {copy / 'checkpoints'}: checkpoint step 100 does not fit this config: "
                         "params/convs/0/bias has shape (4,) there and (8,) in this config"), last
  assert (copy / "config.json").read_text() == before  # still describes the checkpoints


def test_clip_changes_training_targets_only_and_evaluation_scores_true_ages(tiny_config):
  from agejax.data import pipeline
  tiny_config.labels.max_age = 30
  true_eval = pipeline.load_split(tiny_config.data, "validation").age
  assert true_eval.max() > 30 and pipeline.load_split(tiny_config.data, "train").age.max() > 30
  assert train.load_labelled_split(tiny_config, "train", training=True).age.max() == 30
  np.testing.assert_array_equal(train.load_labelled_split(tiny_config, "validation").age, true_eval)
  tiny_config.labels.out_of_range = "drop"
  dropped = train.load_labelled_split(tiny_config, "validation").age
  np.testing.assert_array_equal(dropped, true_eval[true_eval <= 30])
