"""Age-estimation metrics (MAE, epsilon-error, CS@k) as on-device masked sums and their means."""

import jax
import jax.numpy as jnp
import numpy as np

Sums = dict[str, jax.Array]


def absolute_error(pred: jax.Array, age: jax.Array) -> jax.Array:
  """Returns |pred - age| per example."""
  return jnp.abs(pred - age)


def epsilon_error(pred: jax.Array, age: jax.Array, sigma: jax.Array | float) -> jax.Array:
  """Returns 1 - exp(-(pred - age)^2 / (2 sigma^2)) per example (ChaLearn LAP epsilon-error)."""
  return 1.0 - jnp.exp(-jnp.square(pred - age) / (2.0 * jnp.square(sigma)))


def cumulative_score(pred: jax.Array, age: jax.Array, k: float) -> jax.Array:
  """Returns 1 where |pred - age| <= k else 0, per example (its mean is CS@k)."""
  return (jnp.abs(pred - age) <= k).astype(jnp.float32)


def batch_sums(loss: jax.Array, pred: jax.Array, age: jax.Array, sigma: jax.Array | float,
               mask: jax.Array | None = None) -> Sums:
  """Returns masked per-batch sums of loss, abs error, epsilon-error, CS@5 and the count."""
  mask = jnp.ones_like(age, jnp.float32) if mask is None else mask.astype(jnp.float32)
  per_example = {
      "loss": loss,
      "mae": absolute_error(pred, age),
      "epsilon_error": epsilon_error(pred, age, sigma),
      "cs5": cumulative_score(pred, age, 5.0),
  }
  sums = {k: jnp.sum(jnp.where(mask > 0, v, 0.0)) for k, v in per_example.items()}
  sums["count"] = jnp.sum(mask)
  return sums


def zeros() -> Sums:
  """Returns an empty accumulator with the keys of `batch_sums`."""
  return {k: jnp.zeros((), jnp.float32) for k in ("loss", "mae", "epsilon_error", "cs5", "count")}


def add(a: Sums, b: Sums) -> Sums:
  """Adds two accumulators (on device, no host synchronisation)."""
  return jax.tree.map(jnp.add, a, b)


def means(sums: Sums) -> dict[str, float]:
  """Fetches an accumulator and returns the mean of each metric over the counted examples."""
  host = jax.device_get(sums)
  count = float(host["count"])
  return {k: float(v) / max(count, 1.0) for k, v in host.items() if k != "count"}


def mean_baseline_mae(train_ages: np.ndarray, eval_ages: np.ndarray) -> float:
  """Returns the MAE on eval of always predicting the training-set mean age."""
  return float(np.mean(np.abs(np.asarray(eval_ages, np.float64) - np.mean(train_ages, dtype=np.float64))))
