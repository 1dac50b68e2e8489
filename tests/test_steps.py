"""The train step's accelerator contract, read from the program itself: bf16 compute, f32 state, donation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax import metrics, parallel, settings
from agejax.benchmarks import jax_step
from agejax.training import learner
from configs import vgg16_kl


def _batch(size: int, batch: int = 2) -> dict:
  """Abstract uint8 training batch."""
  return {
    "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
    "age": jax.ShapeDtypeStruct((batch,), jnp.float32),
    "age_std": jax.ShapeDtypeStruct((batch,), jnp.float32),
  }


@pytest.mark.slow
def test_bf16_step_convolves_in_bf16_and_keeps_params_optimizer_and_loss_in_f32():
  config = jax_step.bench_config(vgg16_kl.get_config(), 2, "bfloat16", 32, 0.0625)
  fns, state, _ = learner.create(settings.Settings.from_config(config), steps_per_epoch=100, abstract=True)
  lowered = jax.jit(fns.train_step).lower(state, jax.eval_shape(metrics.zeros), _batch(32))
  convs = [line for line in lowered.as_text().splitlines() if "stablehlo.convolution" in line]
  result_types = [re.findall(r"-> tensor<[0-9x]+x(\w+)>", line)[-1] for line in convs]
  # 13 forward convolutions, 13 kernel gradients, 12 input gradients (none for the image itself).
  assert result_types == ["bf16"] * 38, result_types
  new_state, sums, loss = jax.eval_shape(fns.train_step, state, jax.eval_shape(metrics.zeros), _batch(32))
  floats = [x.dtype for x in jax.tree.leaves((new_state.params, new_state.opt_state)) if x.ndim]
  assert floats and set(floats) == {jnp.dtype(jnp.float32)}
  assert loss.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(sums))


def test_float32_config_has_no_bf16_convolution():
  config = jax_step.bench_config(vgg16_kl.get_config(), 2, "float32", 32, 0.0625)
  fns, state, _ = learner.create(settings.Settings.from_config(config), steps_per_epoch=100, abstract=True)
  text = jax.jit(fns.train_step).lower(state, jax.eval_shape(metrics.zeros), _batch(32)).as_text()
  assert "bf16" not in text


@pytest.mark.slow
def test_train_step_donates_state_and_sums_but_not_the_batch():
  config = jax_step.bench_config(vgg16_kl.get_config(), 2, "bfloat16", 32, 0.0625)
  fns, state, _ = learner.create(settings.Settings.from_config(config), steps_per_epoch=100)
  mesh = parallel.make_mesh()
  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  train_step = learner.jit_train_step(fns, replicated, sharded)
  state, sums = jax.device_put((state, metrics.zeros()), replicated)
  batch = jax.device_put(
    {
      "image": np.zeros((2, 32, 32, 3), np.uint8),
      "age": np.full(2, 30.0, np.float32),
      "age_std": np.zeros(2, np.float32),
    },
    sharded,
  )
  new_state, new_sums, _ = train_step(state, sums, batch)
  assert all(x.is_deleted() for x in jax.tree.leaves((state, sums)))  # updated in place, no copy
  assert not any(x.is_deleted() for x in jax.tree.leaves(batch))
  assert int(new_state.step) == 1 and float(new_sums["count"]) == 2
