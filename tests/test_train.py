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
from conftest import array_cache, checkpoint, data_settings, labelled_split

from agejax.data import pipeline
from agejax.training import train

ROOT = Path(__file__).resolve().parents[1]
TAGS = (
  "train/loss",
  "train/mae",
  "train/learning_rate",
  "eval/loss",
  "eval/mae",
  "eval/epsilon_error",
  "eval/cs5",
  "eval/mae_minors",
  "train/nonfinite_steps",
)


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
  """A 100-step run of the tiny config with checkpoints at steps 50 and 100, scoring the test split too."""
  from configs import vgg16_kl

  config = vgg16_kl.get_config("tiny")
  config.data.data_dir, config.compilation_cache_dir = data_dir, compilation_cache
  config.data.cache_dir = array_cache(data_dir)
  config.profile_steps = 5
  config.evals = (
    {"name": "demo_test", "dataset": "demo", "builder_config": "tiny", "split": "test", "every_steps": 25},
  )
  workdir = tmp_path_factory.mktemp("run")
  final = train.train_and_evaluate(config, workdir)
  return config, workdir, final


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_an_extra_evaluation_writes_its_scalars_and_final_metrics_as_the_evaluator_scores_it(trained):
  from agejax import parallel
  from agejax.inference import loading

  _, workdir, final = trained
  series = scalars(workdir)
  for key in ("loss", "mae", "epsilon_error", "cs5"):
    assert len(series[f"eval/demo_test/{key}"]) == 4, key  # every 25 steps
  assert set(final["evals"]) == {"demo_test"}
  assert series["eval/demo_test/mae"][-1] == pytest.approx(final["evals"]["demo_test"]["mae"], rel=1e-6)
  # The same numbers as scoring the test split with the final checkpoint, independently of the loop.
  cfg, fns, state = loading.load_trained(workdir, "latest")
  test = pipeline.load_labelled_split(cfg.data, cfg.labels, "test")
  report = fns.evaluator(test, parallel.make_mesh()).run(state)
  assert final["evals"]["demo_test"]["mae"] == pytest.approx(report["mae"], rel=1e-6)
  assert final["evals"]["demo_test"]["mae"] != pytest.approx(final["eval_mae"], rel=1e-3)  # another split


@pytest.mark.slow
def test_eval_flip_scores_calibrates_and_picks_the_best_by_flip_averages(tiny_config, tmp_path):
  from agejax import parallel
  from agejax.evaluation import calibration
  from agejax.inference import loading

  config = tiny_config
  config.eval.flip = True
  config.update(num_train_steps=20, eval_every_steps=10, checkpoint_every_steps=10, log_every_steps=10)
  final = train.train_and_evaluate(config, tmp_path / "run")
  cfg, fns, state = loading.load_trained(tmp_path / "run", "latest")
  validation = pipeline.load_labelled_split(cfg.data, cfg.labels, "validation")
  mesh = parallel.make_mesh()
  flipped = fns.evaluator(validation, mesh).run(state)  # the settings' flip: on
  plain = fns.evaluator(validation, mesh, flip=False).run(state)
  assert final["eval_mae"] == pytest.approx(flipped["mae"], rel=1e-6) != pytest.approx(plain["mae"], rel=1e-4)
  record = json.loads((tmp_path / "run" / calibration.FILE).read_text())
  assert record["flip"]["temperature"] == final["temperature"] != record["single"]["temperature"]


@pytest.mark.slow
def test_training_lowers_the_loss(trained):
  series = scalars(trained[1])
  assert series["train/loss"][-1] < 0.95 * series["train/loss"][0]
  assert series["eval/mae"][-1] < series["eval/mae"][0]


@pytest.mark.slow
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


def run_train(
  workdir, *overrides: str, config: str = "configs/vgg16_kl.py:tiny", devices: int = 4, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
  """scripts/train.py as a user runs it (optionally under a `prefix` command such as unshare)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [*prefix, sys.executable, "scripts/train.py", "--config", config, "--workdir", str(workdir), *overrides],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def last_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode != 0, proc.stdout[-2000:]
  return proc.stderr.strip().splitlines()[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
  """Every file under `folder` with its content: to show that nothing was lost or overwritten."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize(
  "override,key",
  [
    ("--config.batch_size=6", "config.batch_size=6"),
    ("--config.loss.sigma=0", "config.loss.sigma=0"),
    ("--config.loss.sigma=1e-46", "config.loss.sigma=1e-46: must be at least 0.0757 years"),
    ("--config.loss.sigma=0.07", "config.loss.sigma=0.07: must be at least 0.0757 years"),
    ("--config.seed=-1", "config.seed=-1: must be an integer in [0, 2**32)"),
    ("--config.seed=4294967296", "config.seed=4294967296: must be an integer in [0, 2**32)"),
    ("--config.labels.max_age=0", "config.labels.max_age=0"),
    ("--config.keep_checkpoints=0", "config.keep_checkpoints=0"),
    ("--config.optimizer.grad_clip_norm=-1", "config.optimizer.grad_clip_norm=-1"),
    ("--config.optimizer.end_learning_rate_factor=-1", "config.optimizer.end_learning_rate_factor=-1"),
    ("--config.model.dropout_rate=1.5", "config.model.dropout_rate=1.5"),
    ("--config.profile_steps=-1", "config.profile_steps=-1"),
    ("--config.data.cache_dir=gs://bucket/arrays", "config.data.cache_dir='gs://bucket/arrays'"),
    ("--config.data.eval_split=test", "config.data.eval_split='test': the best checkpoint and the temperature"),
  ],
)
def test_bad_config_fails_in_one_line_before_compiling(override, key, tmp_path):
  proc = run_train(tmp_path / "w", override)
  last = last_line(proc)
  assert last.startswith("error: ") and key in last, proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()  # nothing was built, compiled or written


def test_an_eval_split_that_is_the_test_split_is_refused(tiny_config):
  """The best checkpoint and the temperature are chosen on data.eval_split: never on the split scored at the end."""
  from agejax import errors
  from agejax.training import configuration

  tiny_config.data.eval_split = train.TEST_SPLIT
  with pytest.raises(errors.UserError, match=r"^config.data.eval_split='test': .* held out; use 'validation'$"):
    configuration.validate(tiny_config)
  for split in ("validation", "train"):  # anything else is the user's choice
    tiny_config.data.eval_split = split
    assert configuration.validate(tiny_config).data.eval_split == split


def test_sigma_at_the_bound_gives_a_finite_gaussian_target_and_below_it_one_hot():
  from agejax import labels
  from agejax.training import configuration

  bins = labels.age_bins(1, 100)
  at = np.asarray(labels.label_distribution(np.float32(50), bins, configuration.MIN_SIGMA * 1.001))
  below = np.asarray(labels.label_distribution(np.float32(50), bins, configuration.MIN_SIGMA * 0.95))
  assert np.all(np.isfinite(at)) and at[48] > 0 and at[50] > 0  # the neighbours of age 50 (index 49)
  assert below[48] == 0 and below[49] == 1  # degenerate: one-hot


@pytest.mark.slow
@pytest.mark.parametrize(
  "script,args,expected",
  [
    (
      "train.py",
      ("--config", "configs/vgg16_kl.py:tiny", "--config.optimizer.learnig_rate=1"),
      "error: --config.optimizer.learnig_rate=1: the config has no key 'optimizer.learnig_rate' (did you mean "
      '"learning_rate" instead of "learnig_rate"?)',
    ),
    (
      "train.py",
      ("--config", "configs/vgg16_kl.py:tiny", "--config.sed=1"),
      'error: --config.sed=1: the config has no key \'sed\' (did you mean "seed" instead of "sed"?)',
    ),
    (
      "train.py",
      ("--config", "configs/vgg16_kl.py:tiny", "--config.seed=abc"),
      "error: flag --config.seed=abc: invalid literal for int() with base 10: 'abc'",
    ),
    (
      "train.py",
      ("--config", "configs/vgg16_kl.py:huge"),
      "error: flag --config=configs/vgg16_kl.py:huge: Error whilst parsing config file: ValueError: "
      "configs/vgg16_kl.py: unknown variant 'huge'; use 'demo' or 'tiny'",
    ),
    (
      "train.py",
      ("--config", "configs/missing.py"),
      "error: --config: [Errno 2] No such file or directory: 'configs/missing.py'",
    ),
    (
      "evaluate.py",
      ("--config", "configs/vgg16_kl.py:tiny", "--config.labels.max_ag=90"),
      "error: --config.labels.max_ag=90: the config has no key 'labels.max_ag' (did you mean \"max_age\" instead of "
      '"max_ag"?)',
    ),
  ],
)
def test_bad_flags_fail_in_one_line_with_the_hint(script, args, expected, tmp_path):
  proc = subprocess.run(
    [sys.executable, f"scripts/{script}", "--workdir", str(tmp_path / "w"), *args],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [expected]  # the whole output: no traceback, no usage text
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_workdir_that_is_a_file_fails_in_one_line(tmp_path):
  file = tmp_path / "w"
  file.write_text("notes\n")
  assert last_line(run_train(file)) == f"error: workdir {file} is not writable: it is a file"
  assert file.read_text() == "notes\n"


@pytest.mark.slow
def test_a_read_only_workdir_fails_in_one_line_before_compiling(tmp_path):
  workdir, cache = tmp_path / "w", tmp_path / "cache"
  workdir.mkdir()
  cache.mkdir()
  (workdir / "notes.txt").write_text("kept\n")
  # Root ignores permission bits: a read-only bind mount, in a mount namespace of the run's own.
  readonly = (
    "unshare",
    "-m",
    "sh",
    "-c",
    f'mount --bind "{workdir}" "{workdir}" && mount -o remount,bind,ro "{workdir}" && exec "$@"',
    "sh",
  )
  proc = run_train(workdir, f"--config.compilation_cache_dir={cache}", prefix=readonly)
  last = last_line(proc)
  assert last.startswith(f"error: workdir {workdir} is not writable: [Errno 30] Read-only file system: "), proc.stderr[
    -2000:
  ]
  assert snapshot(workdir) == {"notes.txt": b"kept\n"} and not list(cache.iterdir())


@pytest.mark.slow
def test_a_shifted_age_range_on_resume_fails_in_one_line_and_leaves_the_workdir_as_it_was(trained, tmp_path):
  config, workdir, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  before = snapshot(copy)
  cache = tmp_path / "cache"
  cache.mkdir()
  proc = run_train(
    copy,
    f"--config.data.data_dir={config.data.data_dir}",
    "--config.num_train_steps=200",
    "--config.labels.min_age=11",
    "--config.labels.max_age=110",
    f"--config.compilation_cache_dir={cache}",
    f"--config.data.cache_dir={config.data.cache_dir}",
    devices=1,
  )
  assert last_line(proc) == (
    f"error: config.labels.min_age=11, config.labels.max_age=110 differ from labels.min_age=1, labels.max_age=100 "
    f"in {copy / 'config.json'}, which this workdir's checkpoints were trained with: these keys set what the "
    f"checkpoints mean and cannot change on resume; use a new workdir, or the run's values"
  )
  assert snapshot(copy) == before and not list(cache.iterdir())  # nothing written, nothing compiled


@pytest.mark.slow
def test_resume_may_extend_the_run_and_move_its_data_but_not_change_its_seed(trained, tmp_path):
  from agejax.training import configuration

  config, workdir, _ = trained
  recorded = json.loads((workdir / "config.json").read_text())
  extended = config.copy_and_resolve_references()
  extended.num_train_steps, extended.eval_every_steps, extended.log_every_steps = 500, 100, 25
  extended.data.data_dir, extended.data.cache_dir, extended.compilation_cache_dir = "gs://b/tfds", "/x", ""
  extended.optimizer.learning_rate, extended.nonfinite, extended.profile_steps = 1e-5, "skip", 3
  configuration.check_resume(extended, recorded, "config.json")  # allowed: no error
  extended.seed = 1
  with pytest.raises(ValueError, match=r"^config.seed=1 differs from seed=0 in config.json, "):
    configuration.check_resume(extended, recorded, "config.json")


@pytest.mark.parametrize("variant", ["", "demo", "tiny"])
def test_every_config_key_is_classified_for_resume(variant):
  """A new key must be put in RESUME_MUST_MATCH or RESUME_MAY_CHANGE (unlisted keys must match)."""
  from agejax.training import configuration
  from configs import vgg16_kl

  keys = configuration.flatten(vgg16_kl.get_config(variant).to_dict())
  unclassified = [
    k for k in keys if k not in configuration.RESUME_MUST_MATCH and not configuration.resume_may_change(k)
  ]
  assert not unclassified
  assert not [k for k in configuration.RESUME_MUST_MATCH if configuration.resume_may_change(k)]


@pytest.mark.slow
def test_a_corrupt_config_json_on_resume_fails_in_one_line_naming_it(trained, tmp_path):
  config, workdir, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  (copy / "config.json").write_text('{"seed": 0, "model": {')  # a truncated write
  before = snapshot(copy)
  proc = run_train(
    copy,
    f"--config.data.data_dir={config.data.data_dir}",
    "--config.compilation_cache_dir=",
    f"--config.data.cache_dir={config.data.cache_dir}",
    devices=1,
  )
  assert last_line(proc).startswith(f"error: {copy / 'config.json'}: not valid JSON (")
  assert snapshot(copy) == before


@pytest.mark.slow
def test_checkpoints_that_do_not_fit_fail_in_one_line_even_without_config_json(trained, tmp_path):
  config, workdir, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  (copy / "config.json").unlink()  # an older workdir: only the arrays' shapes can be compared
  before = snapshot(copy)
  proc = run_train(
    copy,
    f"--config.data.data_dir={config.data.data_dir}",
    "--config.num_train_steps=200",
    "--config.model.width_multiplier=0.125",
    "--config.compilation_cache_dir=",
    f"--config.data.cache_dir={config.data.cache_dir}",
    devices=1,
  )
  assert last_line(proc).startswith(
    f"error: {copy / 'checkpoints'}: checkpoint step 100 does not fit this config: "
    "params/convs/0/bias has shape (4,) there and (8,) in this config"
  ), proc.stderr
  assert snapshot(copy) == before  # config.json is not written from a config that does not fit


@pytest.mark.slow
def test_drop_that_empties_a_split_fails_in_one_line_before_compiling(data_dir, tmp_path):
  from conftest import array_cache

  from agejax.data import pipeline
  from configs import vgg16_kl

  data = vgg16_kl.get_config("tiny").data
  data.data_dir, data.cache_dir = data_dir, array_cache(data_dir)
  train_ages = set(pipeline.load_split(data_settings(data), "train").age.astype(int))
  eval_ages = pipeline.load_split(data_settings(data), "validation").age
  only_in_train = min(train_ages - set(eval_ages.astype(int)))
  cache = tmp_path / "cache"
  cache.mkdir()
  common = (
    f"--config.data.data_dir={data_dir}",
    f"--config.data.cache_dir={data.cache_dir}",
    f"--config.compilation_cache_dir={cache}",
    "--config.labels.out_of_range=drop",
  )
  proc = run_train(
    tmp_path / "eval",
    *common,
    f"--config.labels.min_age={only_in_train}",
    f"--config.labels.max_age={only_in_train}",
    devices=1,
  )
  assert last_line(proc) == (
    f"error: config.labels.out_of_range='drop' empties split 'validation' of demo: none of its {len(eval_ages)} ages "
    f"is in labels.min_age..labels.max_age = {only_in_train}..{only_in_train}"
  )
  proc = run_train(tmp_path / "train", *common, "--config.labels.min_age=200", "--config.labels.max_age=300", devices=1)
  assert last_line(proc).startswith(
    "error: config.labels.out_of_range='drop' empties split 'train' of demo: none of its "
  )
  assert not list(cache.iterdir())  # failed before compiling
  for workdir in (tmp_path / "eval", tmp_path / "train"):
    assert [p.name for p in workdir.iterdir()] == ["checkpoints"]  # no config.json, no events; no steps


@pytest.mark.slow
def test_the_tensorboard_target_figure_draws_each_faces_own_sigma_with_sigma_from_data(tiny_config, tmp_path):
  """The eval/distributions figure's target curve of each sample face is its training target: its own age_std
  (floored) with loss.sigma_from_data, loss.sigma where it has none; float64 NumPy's (a toy backbone's short run)."""
  import dataclasses

  import plugin_toy  # noqa: F401  # the toy backbone: a train step that compiles in seconds
  from test_evaluate import target_f64

  from agejax.evaluation import plots

  tiny_config.update(num_train_steps=2, log_every_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  tiny_config.model.name, tiny_config.plugins = "toy", ("plugin_toy",)
  tiny_config.loss.update(sigma=2.0, sigma_from_data=True, sigma_floor=1.0, target="mean_preserving")
  stds = np.array([0.0, 6.0, 0.3, 3.5], np.float32)  # none; wide; below loss.sigma_floor; moderate
  load, draw, drawn = pipeline.load_labelled_split, plots.distribution_figure, []

  def with_stds(data, labels, split, **kwargs):  # the demo data has no age_std: give the eval split some
    arrays = load(data, labels, split, **kwargs)
    if split != tiny_config.data.eval_split:
      return arrays
    return dataclasses.replace(arrays, age_std=np.resize(stds, len(arrays)))

  def spy(image, age, probs, bins, sigma, mean_preserving=False):
    fig = draw(image, age, probs, bins, sigma, mean_preserving)
    (line,) = [x for x in fig.axes[1].get_lines() if x.get_label().startswith("target")]
    drawn.append((age, np.asarray(bins), np.asarray(line.get_ydata(), np.float64)))
    return fig

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "load_labelled_split", with_stds)
    mp.setattr(plots, "distribution_figure", spy)
    train.train_and_evaluate(tiny_config, tmp_path / "run")
  assert len(drawn) == 4  # one evaluation (step 2) of the 4 sample faces
  for (age, bins, curve), own in zip(drawn, [2.0, 6.0, 1.0, 3.5]):
    np.testing.assert_allclose(curve, target_f64(age, own, True, bins), rtol=0, atol=2e-5)


def test_clip_changes_training_targets_only_and_evaluation_scores_true_ages(tiny_config):
  from agejax.data import pipeline

  tiny_config.labels.max_age = 30
  true_eval = pipeline.load_split(data_settings(tiny_config.data), "validation").age
  assert true_eval.max() > 30 and pipeline.load_split(data_settings(tiny_config.data), "train").age.max() > 30
  assert labelled_split(tiny_config, "train", training=True).age.max() == 30
  np.testing.assert_array_equal(labelled_split(tiny_config, "validation").age, true_eval)
  tiny_config.labels.out_of_range = "drop"
  dropped = labelled_split(tiny_config, "validation").age
  np.testing.assert_array_equal(dropped, true_eval[true_eval <= 30])


@pytest.mark.slow
def test_the_loop_compiles_its_train_step_once_and_moves_no_data_implicitly(tiny_config, tmp_path, caplog):
  """Steady state under transfer_guard('disallow'): only the loop's explicit fetches at sync points move data."""
  import logging

  tiny_config.update(
    num_train_steps=20, log_every_steps=5, eval_every_steps=10, checkpoint_every_steps=10, compilation_cache_dir=""
  )  # a cache hit would still log, but keep the count plain
  with jax.transfer_guard("disallow"), pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    jax.jit(lambda x: x + 1)(np.ones(3))  # the guard is enforced on this backend
  caplog.set_level(logging.WARNING)
  with jax.transfer_guard("disallow"), jax.log_compiles():
    final = train.train_and_evaluate(tiny_config, tmp_path / "run")
  assert final["step"] == 20 and sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["10", "20"]
  compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(train_step)")]
  assert len(compiles) == 1, compiles  # logging, evaluating and checkpointing never retrace the step
  # Two evaluations, then the calibration's outputs: single views' (the eval step's own) and flip averages'.
  for eval_step, count in (("_sums_step", 1), ("_outputs_step", 2)):
    assert len([r for r in caplog.records if r.getMessage().startswith(f"Compiling jit({eval_step})")]) == count
