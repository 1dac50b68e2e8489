"""Two-stage training: `model.init_from` starts a new run from another run's trained weights."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import array_cache, checkpoint

from agejax import errors
from agejax.training import configuration, train
from configs import vgg16_kl

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def tiny(data_dir: str, cache: str, **overrides):
  """The `:tiny` config at 20 steps with batch norm (its statistics must come across too), checkpoints at 10 and 20."""
  config = vgg16_kl.get_config("tiny")
  config.data.data_dir, config.data.cache_dir, config.compilation_cache_dir = data_dir, array_cache(data_dir), cache
  config.model.batch_norm = True
  config.update(num_train_steps=STEPS, eval_every_steps=10, checkpoint_every_steps=10, log_every_steps=10)
  for key, value in overrides.items():
    section, _, name = key.rpartition("__")
    (config[section] if section else config)[name] = value
  return config


def flat(tree) -> dict[str, np.ndarray]:
  """Leaves by '/'-joined key names (Orbax's plain restore keys list items as strings, nnx as ints)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = "/".join(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))) for k in path)
    out[name] = np.asarray(leaf)
  return out


def assert_same(got, expected, skip: str | None = None) -> None:
  got, expected = flat(got), flat(expected)
  if skip:
    got = {k: v for k, v in got.items() if not k.startswith(skip + "/")}
    expected = {k: v for k, v in expected.items() if not k.startswith(skip + "/")}
  assert got.keys() == expected.keys() and got
  for name in got:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_dir, compilation_cache):
  """A finished 20-step tiny run: the first stage."""
  workdir = tmp_path_factory.mktemp("source")
  final = train.train_and_evaluate(tiny(data_dir, compilation_cache), workdir)
  assert final["best_step"] in (10, 20)
  return workdir, final


@pytest.mark.slow
def test_a_new_run_starts_from_the_best_checkpoint_with_a_fresh_optimizer_and_step(source, data_dir, compilation_cache):
  workdir, final = source
  cfg = configuration.validate(tiny(data_dir, compilation_cache, model__init_from=str(workdir)))
  built = train.build(cfg)
  best = checkpoint(workdir, final["best_step"])
  assert_same(built.state.params, best["params"])
  assert_same(built.state.model_state, best["model_state"])  # batch-norm statistics
  assert flat(built.state.model_state)  # there are some
  assert int(built.state.step) == 0 and int(built.state.skipped_steps) == 0
  jax.tree.map(np.testing.assert_array_equal, built.state.opt_state, built.learner.tx.init(built.state.params))
  # WORKDIR:STEP: that step's weights
  other = 30 - final["best_step"]  # the checkpoint that is not the best
  cfg = configuration.validate(tiny(data_dir, compilation_cache, model__init_from=f"{workdir}:{other}"))
  assert_same(train.build(cfg).state.params, checkpoint(workdir, other)["params"])


@pytest.mark.slow
def test_other_age_bins_keep_the_backbone_and_start_the_head_fresh(source, data_dir, compilation_cache, caplog):
  workdir, final = source
  config = tiny(data_dir, compilation_cache, model__init_from=str(workdir), labels__min_age=5, labels__max_age=80)
  caplog.set_level(logging.WARNING)
  built = train.build(configuration.validate(config))
  best = checkpoint(workdir, final["best_step"])
  assert_same(built.state.params, best["params"], skip="head")
  assert_same(built.state.model_state, best["model_state"], skip="head")
  assert flat(built.state.params)["head/kernel"].shape[-1] == 76  # ages 5..80
  [warning] = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
  assert "1..100" in warning and "5..80" in warning and "head" in warning


@pytest.mark.slow
def test_the_backbone_alone_comes_across_with_init_from_head_false(source, data_dir, compilation_cache, caplog):
  """The benchmark's *_pretrained recipes: the pretrained backbone, a fresh head, though the bins are the same."""
  workdir, final = source
  config = tiny(data_dir, compilation_cache, model__init_from=str(workdir), model__init_from_head=False)
  caplog.set_level(logging.WARNING)
  built = train.build(configuration.validate(config))
  best = checkpoint(workdir, final["best_step"])
  assert_same(built.state.params, best["params"], skip="head")
  assert_same(built.state.model_state, best["model_state"], skip="head")
  fresh = train.build(configuration.validate(tiny(data_dir, compilation_cache)))  # from scratch, the same seed
  head = {k: v for k, v in flat(built.state.params).items() if k.startswith("head/")}
  assert head and all(np.array_equal(v, flat(fresh.state.params)[k]) for k, v in head.items())
  assert not np.array_equal(head["head/kernel"], flat(best["params"])["head/kernel"])
  assert not [r for r in caplog.records if "init_from" in r.getMessage()]  # the same bins: nothing to warn about


@pytest.mark.slow
def test_a_resumed_run_restores_its_own_checkpoint_not_the_source(source, data_dir, compilation_cache, tmp_path):
  workdir, final = source
  first_stage = tmp_path / "first_stage"  # a copy: removed below, so a rerun that read it would fail
  shutil.copytree(workdir, first_stage)
  config = tiny(data_dir, compilation_cache, model__init_from=str(first_stage))
  finished = train.train_and_evaluate(config, tmp_path / "second")
  assert finished["step"] == STEPS and "test_mae" in finished
  best = checkpoint(workdir, final["best_step"])["params"]
  assert not np.array_equal(checkpoint(tmp_path / "second", 10)["params"]["head"]["kernel"], best["head"]["kernel"])
  # Interrupted after step 10: the rerun resumes from its own step 10, the first stage long gone.
  interrupted = tmp_path / "interrupted"
  shutil.copytree(tmp_path / "second", interrupted)
  shutil.rmtree(interrupted / "checkpoints" / "20")
  (interrupted / train.FINAL_METRICS).unlink()
  shutil.rmtree(first_stage)
  again = train.train_and_evaluate(config, interrupted)
  assert again["step"] == STEPS
  assert_same(checkpoint(interrupted, 20)["params"], checkpoint(tmp_path / "second", 20)["params"])
  assert again["eval_mae"] == pytest.approx(finished["eval_mae"], rel=1e-6)


@pytest.mark.slow
def test_init_from_problems_fail_in_one_line_before_anything_is_written(source, data_dir, compilation_cache, tmp_path):
  workdir, _ = source
  bad = {
    f"{tmp_path}/missing": f"config.model.init_from='{tmp_path}/missing': {tmp_path}/missing does not exist",
    f"{workdir}:15": f"config.model.init_from='{workdir}:15': no checkpoint step 15 in {workdir}/checkpoints "
    f"(available: [10, 20])",
    f"{workdir}:": f"config.model.init_from='{workdir}:': must be '' or another run's WORKDIR",
  }
  for value, message in bad.items():
    config = tiny(data_dir, compilation_cache, model__init_from=value)
    with pytest.raises(errors.UserError) as e:
      configuration.check_init_source(configuration.validate(config))
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
  wider = configuration.validate(
    tiny(data_dir, compilation_cache, model__init_from=str(workdir), model__width_multiplier=0.125)
  )
  with pytest.raises(
    errors.UserError,
    match=r"trained backbone vgg16 \(width_multiplier=0.0625, batch_norm=True\), "
    r"which does not fit this config's vgg16 \(width_multiplier=0.125, batch_norm=True\)",
  ):
    configuration.check_init_source(wider)
  # As a user meets it: one line from scripts/train.py, no workdir created.
  proc = subprocess.run(
    [
      sys.executable,
      "scripts/train.py",
      "--config",
      "configs/vgg16_kl.py:tiny",
      "--workdir",
      str(tmp_path / "w"),
      f"--config.model.init_from={tmp_path}/missing",
      f"--config.data.data_dir={data_dir}",
    ],
    cwd=ROOT,
    env=dict(
      os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
    f"error: {bad[f'{tmp_path}/missing']}; name a finished agejax workdir (WORKDIR or WORKDIR:STEP)"
  ]
  assert not (tmp_path / "w").exists()


def test_init_from_may_change_on_resume():
  assert configuration.resume_may_change("model.init_from")
