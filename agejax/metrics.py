"""Age-estimation metrics (MAE, epsilon-error, CS@k) as on-device masked sums and their means."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Sums = dict[str, jax.Array]


def absolute_error(pred: jax.Array, age: jax.Array) -> jax.Array:
  """Returns |pred - age| per example."""
  return jnp.abs(pred - age)


def epsilon_error(pred: jax.Array, age: jax.Array, sigma: jax.Array | float) -> jax.Array:
  """Returns 1 - exp(-(pred - age)^2 / (2 sigma^2)) per example (ChaLearn LAP epsilon-error)."""
  return 1.0 - jnp.exp(-jnp.square(pred - age) / (2.0 * jnp.square(sigma)))


def posterior_median(probs: jax.Array, bins: jax.Array) -> jax.Array:
  """The bin minimising each distribution's expected absolute error (the unified benchmark's prediction).

  The benchmark (Paplham & Franc, CVPR 2024; lib/training.py) predicts argmin_y sum_a p(a) |a - y|
  over its integer classes: a posterior median. argmin takes the first (youngest) bin on a tie, as
  torch.min does.
  """
  loss = jnp.abs(bins[:, None] - bins[None, :])  # [K, K]: |true - predicted|
  return bins[jnp.argmin(probs @ loss, axis=-1)]


def cumulative_score(pred: jax.Array, age: jax.Array, k: float) -> jax.Array:
  """Returns 1 where |pred - age| <= k else 0, per example (its mean is CS@k)."""
  return (jnp.abs(pred - age) <= k).astype(jnp.float32)


# Accumulator entries that are not per-example metrics: the example count and the train step's
# first non-finite step (1-based; 0 while there was none). The state counts all skipped steps.
COUNTERS = ("count", "nonfinite_step")
CS_THRESHOLDS = tuple(range(1, 11))  # CS@k for these k (years)
AGE_GROUPS = ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
# Where age models fail users: babies, children, teenagers (minors together) and the old. A face may
# be in several buckets (a 10-year-old is in 3-12 and minors): (name, first age, end age).
AGE_BUCKETS = (
  ("0-2", 0.0, 3.0),
  ("3-12", 3.0, 13.0),
  ("13-17", 13.0, 18.0),
  ("18+", 18.0, float("inf")),
  ("minors", 0.0, 18.0),
  ("60+", 60.0, float("inf")),
)


def per_image_sigma(age_std: jax.Array | None, age: jax.Array, default: float) -> jax.Array:
  """The epsilon-error sigma of each image: the dataset's age_std where it has one (> 0), else `default`."""
  if age_std is None:
    return jnp.full_like(age, default, jnp.float32)
  return jnp.where(age_std > 0, age_std, default)


def age_buckets(age: ArrayLike) -> jax.Array:
  """[N, len(AGE_BUCKETS)] 1.0 where each true age falls in each bucket (ages below 0 count as 0)."""
  age = jnp.maximum(jnp.asarray(age, jnp.float32), 0.0)[..., None]
  first = jnp.asarray([b[1] for b in AGE_BUCKETS], jnp.float32)
  end = jnp.asarray([b[2] for b in AGE_BUCKETS], jnp.float32)
  return ((age >= first) & (age < end)).astype(jnp.float32)


def age_group(age: ArrayLike) -> jax.Array:
  """Index into AGE_GROUPS of each age (decades, 70 and over together)."""
  return jnp.clip(jnp.floor(age / 10.0), 0, len(AGE_GROUPS) - 1).astype(jnp.int32)


def batch_sums(
  loss: jax.Array, pred: jax.Array, age: jax.Array, sigma: jax.Array | float, mask: jax.Array | None = None
) -> Sums:
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


def report_sums(
  loss: jax.Array,
  pred: jax.Array,
  age: jax.Array,
  sigma: jax.Array,
  std: jax.Array,
  mask: jax.Array,
  bench_pred: jax.Array,
) -> Sums:
  """Masked sums of everything an evaluation report needs: `batch_sums`, CS@1..10, std, per age group and bucket.

  `bench_pred` is the benchmark's whole-year prediction (`posterior_median`): its MAE and CS@5.
  """
  mask = mask.astype(jnp.float32)
  bench_error = absolute_error(bench_pred, age)
  error = absolute_error(pred, age)
  cs = jnp.stack([cumulative_score(pred, age, k) for k in CS_THRESHOLDS], axis=-1)
  groups = jax.nn.one_hot(age_group(age), len(AGE_GROUPS)) * mask[:, None]
  buckets = age_buckets(age) * mask[:, None]
  return {
    **batch_sums(loss, pred, age, sigma, mask),
    "cs": jnp.sum(cs * mask[:, None], axis=0),
    "std": jnp.sum(std * mask),
    "group_count": jnp.sum(groups, axis=0),
    "group_abs_error": jnp.sum(groups * error[:, None], axis=0),
    "bucket_count": jnp.sum(buckets, axis=0),
    "bucket_abs_error": jnp.sum(buckets * error[:, None], axis=0),
    "bucket_error": jnp.sum(buckets * (pred - age)[:, None], axis=0),
    "bench_mae": jnp.sum(bench_error * mask),
    "bench_cs5": jnp.sum((bench_error <= 5.0) * mask),
  }


def zeros() -> Sums:
  """An empty accumulator for the train step: `batch_sums` and the counters."""
  return {k: jnp.zeros((), jnp.float32) for k in ("loss", "mae", "epsilon_error", "cs5", *COUNTERS)}


def report_zeros() -> Sums:
  """An empty accumulator of `report_sums`."""
  vectors = {
    "cs": len(CS_THRESHOLDS),
    "group_count": len(AGE_GROUPS),
    "group_abs_error": len(AGE_GROUPS),
    **{k: len(AGE_BUCKETS) for k in ("bucket_count", "bucket_abs_error", "bucket_error")},
  }
  return {
    **{
      k: jnp.zeros((), jnp.float32)
      for k in ("loss", "mae", "epsilon_error", "cs5", "count", "std", "bench_mae", "bench_cs5")
    },
    **{k: jnp.zeros((n,), jnp.float32) for k, n in vectors.items()},
  }


def add(a: Sums, b: Sums) -> Sums:
  """Adds the per-batch sums `b` into the accumulator `a` (on device, no host synchronisation)."""
  return {k: a[k] + b[k] if k in b else a[k] for k in a}


def fetch_array(x: ArrayLike) -> np.ndarray:
  """Copies a replicated array to the host from a local device (works on every process)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def fetch(sums: Mapping[str, ArrayLike]) -> dict[str, float]:
  """Copies a replicated accumulator to the host."""
  return {k: float(fetch_array(v)) for k, v in sums.items()}


def means(sums: Sums | dict[str, float]) -> dict[str, float]:
  """Returns each metric's mean over the counted examples (fetching the sums if on device)."""
  host = fetch(sums)
  count = max(host["count"], 1.0)
  return {k: v / count for k, v in host.items() if k not in COUNTERS}


def mean_baseline_mae(train_ages: np.ndarray, eval_ages: np.ndarray) -> float:
  """Returns the MAE on eval of always predicting the training-set mean age."""
  return float(np.mean(np.abs(np.asarray(eval_ages, np.float64) - np.mean(train_ages, dtype=np.float64))))
