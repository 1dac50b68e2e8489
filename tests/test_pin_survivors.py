"""Pins two mutation survivors by what users read: the per-bucket report, and gradient accumulation's memory."""

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_relative

from agejax import metrics, parallel, settings
from agejax.data import pipeline
from agejax.training import learner
from configs import vgg16_kl

# Several true ages in every bucket and decade (babies, children, teenagers, adults, the old), some twice.
AGES = np.array([1, 2, 2, 4, 7, 12, 13, 15, 17, 19, 25, 33, 41, 48, 55, 61, 66, 72, 80, 95, 3, 9, 16, 60], np.float32)


@pytest.fixture(scope="module", autouse=True)
def persistent_cache(compilation_cache: str) -> Iterator[None]:
  """The session's persistent compilation cache while this module runs, as the training loop turns it on."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  names += ("jax_persistent_cache_min_entry_size_bytes",)
  before = {name: getattr(jax.config, name) for name in names}
  parallel.enable_compilation_cache(compilation_cache)  # a second run loads the tiny programs: ~10x faster
  yield
  for name, value in before.items():
    jax.config.update(name, value)


def _tiny(compilation_cache: str, **overrides) -> settings.Settings:
  """The `:tiny` training settings (no data read) with top-level config overrides."""
  config = vgg16_kl.get_config("tiny")
  config.compilation_cache_dir = compilation_cache
  for key, value in overrides.items():
    setattr(config, key, value)
  return settings.Settings.from_config(config)


@pytest.mark.slow
def test_report_mae_and_mean_error_per_bucket_and_decade_match_numpy_over_the_per_example_predictions(
  compilation_cache,
):
  """Evaluator.run: every bucket's and decade's MAE and mean error equal float64 NumPy over its predictions.

  Kills (tests/test_pin_evaluation.py, tests/test_evaluate.py miss it): evaluation/scoring.py:187
  `"mae": float(e / c) if c else None` -> `"mae": float(e - c) if c else None` (mae_by_bucket).
  """
  fns, state, _ = learner.create(_tiny(compilation_cache), steps_per_epoch=10)
  # A fresh head predicts ~50.5 for every face: a louder one spreads the predictions (measured 61..91).
  loud = lambda path, x: x * 1e4 if jax.tree_util.keystr(path) == "['head']['kernel']" else x  # noqa: E731
  state = dataclasses.replace(state, params=jax.tree_util.tree_map_with_path(loud, state.params))
  rng = np.random.default_rng(0)
  data = pipeline.ArraySplit(
    images=rng.integers(0, 256, (len(AGES), 32, 32, 3), dtype=np.uint8), age=AGES, age_std=np.zeros_like(AGES)
  )
  report, host = fns.evaluator(data, parallel.make_mesh()).run(state, outputs=True)
  pred, age = np.asarray(host["predicted_age"], np.float64), AGES.astype(np.float64)
  assert np.ptp(pred) > 10, "a constant prediction would hide a per-example mix-up"
  buckets = report["mae_by_bucket"]
  assert list(buckets) == [name for name, _, _ in metrics.AGE_BUCKETS]
  for name, first, end in metrics.AGE_BUCKETS:
    inside = (age >= first) & (age < end)
    assert inside.sum() >= 3, name
    got = buckets[name]
    assert got["count"] == inside.sum(), name
    np.testing.assert_allclose(got["mae"], np.mean(np.abs(pred - age)[inside]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got["mean_error"], np.mean((pred - age)[inside]), rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(report["mae_minors"], np.mean(np.abs(pred - age)[age < 18]), rtol=1e-5)
  decades = np.minimum(age // 10, len(metrics.AGE_GROUPS) - 1)
  for i, name in enumerate(metrics.AGE_GROUPS):
    got = report["mae_by_age_group"][name]
    assert got["count"] == (decades == i).sum() > 0, name
    np.testing.assert_allclose(got["mae"], np.mean(np.abs(pred - age)[decades == i]), rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(report["mae"], np.mean(np.abs(pred - age)), rtol=1e-5)


def _compiled_train_step(cfg: settings.Settings, batch: int) -> tuple[learner.Learner, learner.TrainState, object]:
  """(learner, state at step 0, the real jitted train step compiled for a uint8 batch of `batch` faces)."""
  fns, state, _ = learner.create(cfg, steps_per_epoch=10)
  mesh = parallel.make_mesh()
  step = learner.jit_train_step(fns, parallel.replicated(mesh), parallel.data_sharded(mesh))
  size = cfg.data.image_size
  shapes = {
    "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
    "age": jax.ShapeDtypeStruct((batch,), jnp.float32),
    "age_std": jax.ShapeDtypeStruct((batch,), jnp.float32),
  }
  return fns, state, step.lower(state, jax.eval_shape(metrics.zeros), shapes).compile()


@pytest.mark.slow
def test_four_micro_batches_give_the_same_step_in_clearly_less_temporary_memory(compilation_cache):
  """grad_accum_steps=4: the compiled train step needs far less scratch memory, and updates the same parameters.

  Kills (tests/test_losses.py, tests/test_pin_training.py, tests/test_steps.py miss it): training/learner.py:162
  `grads_fn = self._grads if self.cfg.run.grad_accum_steps == 1 else self._accumulated_grads` ->
  `grads_fn = self._grads if not self.cfg.run.grad_accum_steps == 1 else self._accumulated_grads`.
  """
  batch = 64
  plain, accumulated = (_tiny(compilation_cache, batch_size=batch, grad_accum_steps=k) for k in (1, 4))
  assert not plain.model.batch_norm and plain.model.dropout_rate == 0.0  # the same update, to float rounding
  _, state, step1 = _compiled_train_step(plain, batch)
  _, _, step4 = _compiled_train_step(accumulated, batch)
  temp1, temp4 = (s.memory_analysis().temp_size_in_bytes for s in (step1, step4))
  # XLA:CPU, batch 64 of 32x32 faces, width 1/16: 8.07 MB / 18.38 MB = 0.44 (batch 32: 0.55, 128: 0.37); the
  # scratch is activations, which scale with the micro-batch. The mutant swaps the two programs (ratio 2.3).
  assert temp4 < 0.6 * temp1, (temp4, temp1)

  rng = np.random.default_rng(0)
  faces = {
    "image": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
    "age": rng.integers(1, 91, batch).astype(np.float32),
    "age_std": np.zeros(batch, np.float32),
  }
  copy = jax.tree.map(jnp.copy, state)  # the step donates its state
  (after1, sums1, _), (after4, sums4, _) = (s(st, metrics.zeros(), faces) for s, st in ((step1, state), (step4, copy)))
  assert int(after1.step) == int(after4.step) == 1 and float(sums1["count"]) == float(sums4["count"]) == batch
  assert_close_relative(after4.params, after1.params, 1e-5)  # Adam's first step: sign(gradient), per parameter
  assert float(sums4["mae"]) == pytest.approx(float(sums1["mae"]), rel=1e-5)
