"""Preemption, crashes mid-write, diverging runs and gradient accumulation."""

import json
import random
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_relative, checkpoint, cpu_env, preempt, train_command

from agejax import metrics, settings
from agejax.training import learner, preemption, workdir_lock

LONG = (
  "--config.num_train_steps=300",
  "--config.eval_every_steps=300",
  "--config.checkpoint_every_steps=100",
  "--config.log_every_steps=20",
)


def complete_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(compilation_cache, data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  subprocess.run(
    train_command(workdir, *LONG, data_dir=data_dir, cache=compilation_cache),
    env=cpu_env(),
    check=True,
    capture_output=True,
    timeout=600,
  )
  return workdir


@pytest.mark.slow
def test_sigterm_saves_at_that_step_and_the_rerun_ends_identical(compilation_cache, data_dir, uninterrupted, tmp_path):
  workdir = tmp_path / "preempted"
  command = train_command(workdir, *LONG, data_dir=data_dir, cache=compilation_cache)
  returncode, out, err = preempt(command, workdir, random.Random(0).uniform(0.2, 1.5))
  assert returncode == 0, err[-3000:]
  step = complete_steps(workdir)[-1]
  assert 0 < step < 300 and f"saved checkpoint at step {step}" in out
  assert not (workdir / "final_metrics.json").exists()
  assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released: the rerun needs no takeover
  rerun = subprocess.run(
    train_command(workdir, *LONG, data_dir=data_dir, cache=compilation_cache),
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert rerun.returncode == 0 and f"resuming from step {step}" in rerun.stdout, rerun.stderr[-3000:]
  jax.tree.map(np.testing.assert_array_equal, checkpoint(workdir, 300), checkpoint(uninterrupted, 300))


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(compilation_cache, data_dir, tmp_path):
  args = ("--config.num_train_steps=400", "--config.checkpoint_every_steps=10", "--config.eval_every_steps=400")
  for attempt in range(5):  # each try kills at the first partial write seen after a complete one
    workdir = tmp_path / f"killed{attempt}"
    proc = subprocess.Popen(
      train_command(workdir, *args, data_dir=data_dir, cache=compilation_cache),
      env=cpu_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    partial = []
    while proc.poll() is None and not partial:
      if complete_steps(workdir) if (workdir / "checkpoints").exists() else False:
        partial = list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    if partial:
      proc.kill()
    proc.wait(timeout=60)
    if list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*")):
      break
  else:
    pytest.fail("never caught a checkpoint write in progress")
  newest = complete_steps(workdir)[-1]
  left = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())  # the killed run never released its lock
  assert left["pid"] == proc.pid
  interrupted = workdir / f".final_metrics.json.tmp{proc.pid}"  # as a kill in the middle of write_text leaves it
  interrupted.write_text('{"step": 4')
  rerun = subprocess.run(
    train_command(workdir, *args, data_dir=data_dir, cache=compilation_cache),
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "ignoring incomplete checkpoint" in rerun.stderr and f"resuming from step {newest}" in rerun.stdout
  assert (
    f"the previous run, pid {proc.pid} on {left['host']} since {left['since']}, ended without releasing its "
    f"lock (killed?); taking it over"
  ) in rerun.stderr
  assert f"removed {interrupted}, left by an interrupted write" in rerun.stderr and not interrupted.exists()
  assert (workdir / "final_metrics.json").exists() and complete_steps(workdir)[-1] == 400
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


@pytest.mark.slow
def test_overflowing_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
  compilation_cache, data_dir, tmp_path
):
  workdir = tmp_path / "diverged"
  proc = subprocess.run(
    train_command(
      workdir,
      "--config.optimizer.learning_rate=1e4",
      "--config.optimizer.schedule=constant",
      "--config.checkpoint_every_steps=1",
      "--config.log_every_steps=1",
      data_dir=data_dir,
      cache=compilation_cache,
    ),
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite loss or gradient at step "), proc.stderr[-2000:]
  bad = int(last.split("at step ")[1].split()[0])
  assert complete_steps(workdir)[-1] == bad - 1 and bad >= 2
  params = checkpoint(workdir, bad - 1)["params"]
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_skip_policy_counts_nonfinite_steps_across_a_resume(tiny_config, tmp_path):
  from agejax.training import train

  tiny_config.update(
    nonfinite="skip", num_train_steps=6, log_every_steps=3, eval_every_steps=6, checkpoint_every_steps=6
  )
  tiny_config.optimizer.update(learning_rate=1e4, schedule="constant")
  first = train.train_and_evaluate(tiny_config, tmp_path)
  assert 0 < first["nonfinite_steps"] <= 6
  tiny_config.num_train_steps = 9
  final = train.train_and_evaluate(tiny_config, tmp_path)  # resumes at step 6
  saved = checkpoint(tmp_path, 9)
  assert first["nonfinite_steps"] <= final["nonfinite_steps"] == int(saved["skipped_steps"]) <= 9
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(saved["params"]))
  # Skipped steps do not advance the optimizer: its counters (which drive the schedule, and the
  # logged learning rate) stand at the applied updates.
  counts = [
    int(v)
    for path, v in jax.tree_util.tree_leaves_with_path(saved["opt_state"])
    if "count" in jax.tree_util.keystr(path)
  ]
  assert counts and set(counts) == {9 - final["nonfinite_steps"]}, counts


@pytest.mark.slow
def test_four_micro_batches_equal_one_four_times_larger_batch(tiny_config):
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.integers(0, 256, (16, 40, 40, 3), dtype=np.uint8)),
    "age": jnp.asarray(rng.integers(1, 91, 16).astype(np.float32)),
    "age_std": jnp.zeros(16),
  }

  def run(accum: int):
    config = tiny_config.copy_and_resolve_references()
    config.grad_accum_steps = accum
    fns, state, _ = learner.create(settings.Settings.from_config(config), steps_per_epoch=10)
    images = jnp.asarray(batch["image"], jnp.float32) / 255.0
    grads_fn = fns._grads if accum == 1 else fns._accumulated_grads
    targets = (batch["age"], batch["age_std"])
    grads, _ = jax.jit(grads_fn)(state.params, state.model_state, images, targets, jax.random.key(0))
    for _ in range(3):
      state, _, _ = jax.jit(fns.train_step)(state, metrics.zeros(), batch)
    return grads, state.params

  (g4, p4), (g1, p1) = run(4), run(1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * float(np.max(np.abs(b)))), g4, g1)
  assert_close_relative(p4, p1, 1e-5)  # three Adam steps later, as in test_scale


@pytest.mark.slow
def test_a_sigterm_whose_stop_was_swallowed_before_the_loop_still_stops_the_run():
  """Python ignores exceptions raised in some callbacks (JAX's gc callback): the signal must not be lost."""
  import gc
  import os

  with preemption.Preemption() as signalled:
    hit = []
    gc.callbacks.append(lambda *_: hit or (hit.append(1), os.kill(os.getpid(), signal.SIGTERM)))
    try:
      gc.collect()  # the handler runs inside the callback; its Stopped is printed and ignored
    finally:
      gc.callbacks.pop()
    assert hit
    with pytest.raises(preemption.Stopped):
      signalled.arm()
  with preemption.Preemption() as signalled:  # armed in time: SIGTERM only sets the flag
    signalled.arm()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert signalled
