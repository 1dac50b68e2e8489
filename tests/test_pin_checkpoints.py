"""Which checkpoint is best, which one a run scores at its end, a finished run's rerun, and init_from's checks.

Most tests share one run (`rising`) whose validation MAE rises after its best step, so "best" and
"latest" are different checkpoints. Each test's docstring names one-line bugs ("mutants", file:line
`before` -> `after`) that it fails on and that the older tests let through: each was edited into a
`git worktree` of commit a0b6b4c and this file failed. The first mutant each docstring names (and a few
more) also ran against the older tests of the same behaviour in test_train, test_init_from, test_crossval,
test_evaluate, test_newcomer, test_legacy_workdir and test_resilience, and they all passed.
"""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import array_cache, checkpoint
from test_init_from import flat
from tiny_run import tiny_run

from agejax import errors
from agejax.evaluation import calibration
from agejax.training import configuration, train
from configs import vgg16_kl

STEPS = 3


def eval_maes(workdir: Path) -> dict[int, float]:
  """The eval MAE the run logged at each step, read back with TensorBoard's own reader."""
  import tensorflow as tf
  from tensorboard.backend.event_processing import event_accumulator

  out: dict[int, float] = {}
  for events in sorted(workdir.glob("events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(str(events), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    for event in acc.Tensors("eval/mae") if "eval/mae" in acc.Tags()["tensors"] else []:
      out[event.step] = float(tf.make_ndarray(event.tensor_proto))
  return out


def steps_on_disk(workdir: Path) -> list[int]:
  """The steps of the checkpoints in WORKDIR/checkpoints."""
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def snapshot(folder: Path) -> dict[str, bytes]:
  """Every file under `folder` with its content."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def numpy_mae(workdir: Path, step: int, split: str) -> float:
  """MAE of checkpoint `step` on `split`: the raw model's expected ages in float64, without the Evaluator."""
  from agejax.data import pipeline
  from agejax.inference import loading

  cfg, fns, state = loading.load_trained(workdir, step)
  assert int(state.step) == step
  data = pipeline.load_labelled_split(cfg.data, cfg.labels, split)
  probs = np.asarray(jax.jit(fns.model.distributions)(state, data.gather(np.arange(len(data)))["image"]), np.float64)
  return float(np.mean(np.abs(probs @ np.asarray(fns.model.bins, np.float64) - data.age)))


@pytest.fixture(scope="module")
def learned(request, tmp_path_factory) -> Path:
  """A private copy of the session's learned tiny run (batch norm; eval MAE ~0.3x the mean-age baseline)."""
  return tiny_run(request, tmp_path_factory)[1]


def rising_config(source: Path, data_dir: str, cache: str, steps: int = STEPS):
  """A run from `source`'s weights whose first step changes no weight and whose later steps wreck them.

  One optimizer rule starts every parameter's updates at step 1 (the second step): step 1 moves only
  batch-norm statistics, so its eval MAE stays the learned one; then Adam at a constant 0.05 moves
  every parameter by ~0.05 a step and the MAE rises (measured: 8.0, 31, 35).
  """
  config = vgg16_kl.get_config("tiny")
  config.data.data_dir, config.data.cache_dir, config.compilation_cache_dir = data_dir, array_cache(data_dir), cache
  config.model.batch_norm, config.batch_size, config.model.init_from = True, 32, str(source)
  config.update(num_train_steps=steps, eval_every_steps=1, checkpoint_every_steps=1, log_every_steps=1)
  config.keep_checkpoints = 1  # the latest, and the best beside it
  config.optimizer.update(schedule="constant", learning_rate=0.05, rules=((".*", {"start_step": 1}),))
  return config


@pytest.fixture(scope="module")
def rising(learned, data_dir, compilation_cache, tmp_path_factory):
  """(config, workdir, final metrics, logged eval MAE by step) of a 3-step run evaluated at every step."""
  config = rising_config(learned, data_dir, compilation_cache)
  workdir = tmp_path_factory.mktemp("rising")
  final = train.train_and_evaluate(config, workdir)
  maes = eval_maes(workdir)
  assert sorted(maes) == [1, 2, 3] and min(maes.values()) < maes[STEPS], maes  # the MAE rose after its best step
  return config, workdir, final, maes


def copy_of(workdir: Path, tmp_path: Path) -> Path:
  """A copy of `workdir` under `tmp_path` (the shared run stays as it is)."""
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  return copy


@pytest.mark.slow
def test_the_best_checkpoint_is_the_lowest_logged_eval_mae_and_outlives_keep_checkpoints(rising):
  """Best = the argmin of the eval MAEs the run logged; kept beside the latest; what 'best' loads.

  Kills checkpointing.py:44 `best_mode="min"` -> `"max"`, checkpointing.py:39 `BestN(..., reverse=True, n=1, ...)`
  -> `reverse=False` or -> `n=0` (keep_checkpoints=1 then deletes the best checkpoint).
  """
  from agejax.inference import loading

  _, workdir, final, maes = rising
  best = min(maes, key=maes.get)
  assert best != STEPS and final["best_step"] == best
  assert steps_on_disk(workdir) == [best, STEPS]  # keep_checkpoints=1: the latest, and the best
  assert int(loading.load_trained(workdir, "best")[2].step) == best  # evaluate.py, predict.py, exports
  for step in (best, STEPS):  # the logged MAE is the one of the checkpoint saved at that step
    assert numpy_mae(workdir, step, "validation") == pytest.approx(maes[step], rel=1e-5)


@pytest.mark.slow
def test_the_end_of_a_run_scores_and_calibrates_the_best_checkpoint_and_names_it(rising):
  """final_metrics.json: the last evaluation's scores, best_step, and the test split and temperature of the best.

  Kills train.py:378 `ckpts.restore(state, best)` -> `ckpts.restore(state)`, train.py:378 `best in (None, step)`
  -> `best not in (None, step)`, train.py:379 `calibrate(b.evaluator, scored, ...)` -> `(b.evaluator, state, ...)`,
  train.py:390 `self._test_scores(scored, ...)` -> `(state, ...)`, checkpointing.py:44 `best_mode="min"` -> `"max"`.
  """
  _, workdir, final, maes = rising
  best = min(maes, key=maes.get)
  on_disk = json.loads((workdir / train.FINAL_METRICS).read_text())
  assert on_disk == final
  assert final["step"] == STEPS and final["eval_mae"] == pytest.approx(maes[STEPS], rel=1e-6)  # as the README says
  assert final["best_step"] == best
  fitted = json.loads((workdir / calibration.FILE).read_text())
  assert fitted["step"] == best and fitted["single"]["temperature"] == final["temperature"]
  best_test, last_test = numpy_mae(workdir, best, "test"), numpy_mae(workdir, STEPS, "test")
  assert abs(best_test - last_test) > 1  # the two checkpoints are far apart on the test split too
  # test_mae is the raw model's, as numpy_mae (temperature 1): the calibration never moves a point score.
  assert final["test_mae"] == pytest.approx(best_test, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [STEPS, 2])
def test_rerunning_a_finished_run_trains_nothing_prints_its_summary_and_keeps_every_file(
  rising, learned, data_dir, compilation_cache, tmp_path, capsys, steps
):
  """A finished run (also rerun with a lower num_train_steps) exits at once: its files, numbers and config stay.

  Kills train.py:217 `if start >= self.cfg.run.num_train_steps and ...` -> `start == ...` (the lower
  num_train_steps re-evaluates, recalibrates and rewrites final_metrics.json and config.json), train.py:203
  `finished = ... latest >= ...` -> `latest == ...` (prints "resuming from step 3" on a finished run).
  """
  _, source, final, _ = rising
  workdir = copy_of(source, tmp_path)
  before = snapshot(workdir)
  capsys.readouterr()
  again = train.train_and_evaluate(rising_config(learned, data_dir, compilation_cache, steps=steps), workdir)
  out = capsys.readouterr().out
  assert again == final
  assert snapshot(workdir) == before  # no checkpoint, event, final_metrics.json, calibration.json or config.json
  assert f"{workdir} finished at step {STEPS}: nothing to train" in out and "resuming" not in out
  assert f"MAE            {final['eval_mae']:.3f} years" in out and f"test split     MAE {final['test_mae']:.3f}" in out


@pytest.mark.slow
def test_a_run_killed_before_its_final_metrics_finishes_on_rerun_without_training(
  rising, learned, data_dir, compilation_cache, tmp_path, capsys
):
  """All steps checkpointed, final_metrics.json missing: the rerun trains nothing and writes the same numbers.

  Kills train.py:203 `latest >= self.cfg.run.num_train_steps and final_path.exists()` -> `... >= ...` (no
  "resuming" line) or -> `... or final_path.exists()`, train.py:371 `if not self.eval_metrics:` ->
  `if self.eval_metrics:`.
  """
  config, source, final, maes = rising
  workdir = copy_of(source, tmp_path)
  (workdir / train.FINAL_METRICS).unlink()
  checkpoints = snapshot(workdir / "checkpoints")
  capsys.readouterr()
  again = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f"resuming from step {STEPS} of " in out
  assert snapshot(workdir / "checkpoints") == checkpoints and eval_maes(workdir) == maes  # nothing trained
  assert json.loads((workdir / train.FINAL_METRICS).read_text()) == again
  assert again["step"] == STEPS and again["best_step"] == final["best_step"]
  for key in ("eval_mae", "eval_loss", "eval_cs5", "temperature", "test_mae", "test_coverage90"):
    assert again[key] == pytest.approx(final[key], rel=1e-6), key


def init_config(source: Path, data_dir: str, cache: str, **model):
  """The learned run's architecture (`:tiny`, batch norm) starting from `source`, with `model` overrides."""
  config = rising_config(source, data_dir, cache)
  config.model.update(model)
  return config


@pytest.mark.slow
def test_init_from_names_the_best_checkpoint_by_default_and_the_latest_on_request(rising, data_dir, compilation_cache):
  """init_from=WORKDIR starts from its best checkpoint (not its latest); WORKDIR:latest and WORKDIR:best as named.

  Kills checkpointing.py:257 `return value, "best"` -> `return value, "latest"`, checkpointing.py:255
  `tail in ("best", "latest")` -> `tail in ("best",)`, checkpointing.py:39 `reverse=True` -> `False`.
  """
  _, source, _, maes = rising
  best = min(maes, key=maes.get)
  for value, step in ((str(source), best), (f"{source}:latest", STEPS), (f"{source}:best", best)):
    cfg = configuration.validate(init_config(source, data_dir, compilation_cache, init_from=value))
    built = train.build(cfg)
    expected = checkpoint(source, step)
    for name, array in flat(built.state.params).items():
      np.testing.assert_array_equal(array, flat(expected["params"])[name], err_msg=f"{value}: {name}")


def test_init_from_a_batch_norm_run_into_a_plain_vgg16_fails_in_one_line_before_anything_is_written(
  learned, data_dir, compilation_cache, tmp_path
):
  """Another batch_norm is another backbone: the one-line error names both, and the new workdir gets nothing.

  Without the check, a plain VGG16's parameters are a subset of VGG16-BN's with the same shapes, so
  the weights load silently without their batch-norm statistics (the backstop in weights_from_run sees
  nothing). Kills checkpointing.py:284 `if architecture(cfg.model) != architecture(source.model):` ->
  `if (cfg.model.name, cfg.model.width_multiplier) != (source.model.name, source.model.width_multiplier):`.
  """
  config = init_config(learned, data_dir, compilation_cache, batch_norm=False)
  config.num_train_steps = 1  # with the check gone, a bug trains for one step only
  workdir = tmp_path / "second"
  with pytest.raises(errors.UserError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"config.model.init_from={str(learned)!r} trained backbone ")
  assert "vgg16 (width_multiplier=0.0625, batch_norm=True)" in message
  assert "this config's vgg16 (width_multiplier=0.0625, batch_norm=False)" in message
  assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("min_age,max_age", [(5, 100), (1, 80), (11, 110)])
def test_init_from_with_other_age_bins_keeps_the_backbone_and_starts_the_head_fresh(
  learned, data_dir, compilation_cache, caplog, min_age, max_age
):
  """Bins that differ at one end only, or are shifted with the same count, are other bins: the head starts fresh.

  Kills checkpointing.py:293 `return (a.min_age, a.max_age) == (b.min_age, b.max_age)` -> `a.max_age == b.max_age`
  ([5-100]), -> `a.min_age == b.min_age` ([1-80]), -> `a.max_age - a.min_age == b.max_age - b.min_age` ([11-110]:
  the head's 100 outputs would come across meaning ages 10 years off).
  """
  config = init_config(learned, data_dir, compilation_cache, init_from=str(learned))
  config.labels.update(min_age=min_age, max_age=max_age)
  caplog.set_level(logging.WARNING)
  built = train.build(configuration.validate(config))
  source = json.loads((learned / train.FINAL_METRICS).read_text())["best_step"]
  trained, got = flat(checkpoint(learned, source)["params"]), flat(built.state.params)
  backbone = [k for k in got if not k.startswith("head/")]
  assert backbone and all(np.array_equal(got[k], trained[k]) for k in backbone)
  assert got["head/kernel"].shape[-1] == max_age - min_age + 1
  assert got["head/kernel"].shape != trained["head/kernel"].shape or not np.array_equal(
    got["head/kernel"], trained["head/kernel"]
  )
  [warning] = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
  assert f"1..100 differ from this config's {min_age}..{max_age}" in warning
