import jax.numpy as jnp
import numpy as np

from agejax import metrics


def test_metrics_equal_hand_computed_values():
  pred = jnp.array([10.0, 22.0, 35.0, 60.0])
  age = jnp.array([12.0, 22.0, 29.0, 50.0])
  # |errors| = 2, 0, 6, 10
  np.testing.assert_allclose(metrics.absolute_error(pred, age), [2, 0, 6, 10])
  eps = metrics.epsilon_error(pred, age, 3.0)
  np.testing.assert_allclose(eps, [1 - np.exp(-4 / 18), 0.0, 1 - np.exp(-36 / 18), 1 - np.exp(-100 / 18)], rtol=1e-6)
  np.testing.assert_allclose(metrics.cumulative_score(pred, age, 5.0), [1, 1, 0, 0])
  sums = metrics.batch_sums(jnp.array([1.0, 2.0, 3.0, 4.0]), pred, age, 3.0)
  m = metrics.means(sums)
  assert m["mae"] == 4.5 and m["cs5"] == 0.5 and m["loss"] == 2.5
  np.testing.assert_allclose(m["epsilon_error"], float(np.mean(eps)), rtol=1e-6)


def test_masked_sums_ignore_padding_and_per_image_sigma():
  pred, age = jnp.array([10.0, 20.0, 99.0]), jnp.array([13.0, 20.0, 0.0])
  sums = metrics.batch_sums(jnp.ones(3), pred, age, jnp.array([1.5, 3.0, 3.0]), mask=jnp.array([1, 1, 0]))
  m = metrics.means(metrics.add(sums, metrics.zeros()))
  assert float(sums["count"]) == 2 and m["mae"] == 1.5 and m["cs5"] == 1.0
  np.testing.assert_allclose(m["epsilon_error"], (1 - np.exp(-9 / (2 * 1.5**2))) / 2, rtol=1e-6)


def test_mean_baseline_mae():
  assert metrics.mean_baseline_mae(np.array([10, 20, 30]), np.array([20, 40])) == 10.0


def test_report_sums_equal_float64_numpy_with_padding_and_per_image_sigma():
  """Every sum of an evaluation report (CS@1..10, std, MAE per decade) against NumPy, padding excluded."""
  rng = np.random.default_rng(0)
  n = 64
  age = np.concatenate([[0.0, 9.99, 10.0, 69.9, 70.0, 120.0], rng.uniform(0, 100, n - 6)])
  pred = age + rng.normal(0, 6, n)
  pred[:6] = age[:6] + np.array([5.5, 0.5, 10.5, 1.0, 3.0, 7.0])  # errors at and between the CS thresholds
  std, loss = rng.uniform(1, 9, n), rng.uniform(0, 3, n)
  age_std = np.where(rng.random(n) < 0.5, rng.uniform(1, 5, n), 0.0)
  mask = (rng.random(n) < 0.8).astype(np.float32)
  mask[:6] = 1.0
  sigma = metrics.per_image_sigma(jnp.asarray(age_std, jnp.float32), jnp.asarray(age, jnp.float32), 3.0)
  np.testing.assert_allclose(sigma, np.where(age_std > 0, age_std, 3.0), rtol=1e-6)
  bench = np.round(pred + rng.normal(0, 2, n))  # whole years, errors of exactly 5 included
  bench[6] = age[6] + 5.0
  args = [jnp.asarray(x, jnp.float32) for x in (loss, pred, age, sigma, std, mask, bench)]
  got = {k: np.asarray(v, np.float64) for k, v in metrics.report_sums(*args).items()}
  keep = mask > 0
  error = np.abs(pred - age)
  bench_error = np.abs(bench.astype(np.float32) - age.astype(np.float32))  # as float32 compares
  np.testing.assert_allclose(got["bench_mae"], bench_error[keep].sum(), rtol=1e-5)
  assert got["bench_cs5"] == np.sum(bench_error[keep] <= 5)
  assert got["count"] == keep.sum()
  np.testing.assert_allclose(got["loss"], loss[keep].sum(), rtol=1e-5)
  np.testing.assert_allclose(got["mae"], error[keep].sum(), rtol=1e-5)
  eps = 1 - np.exp(-((pred - age) ** 2) / (2 * np.where(age_std > 0, age_std, 3.0) ** 2))
  np.testing.assert_allclose(got["epsilon_error"], eps[keep].sum(), rtol=1e-5)
  np.testing.assert_allclose(got["std"], std[keep].sum(), rtol=1e-5)
  assert metrics.CS_THRESHOLDS == tuple(range(1, 11))  # the report's CS@1..CS@10
  np.testing.assert_array_equal(got["cs"], [np.sum(error[keep] <= k) for k in range(1, 11)])
  assert got["cs5"] == np.sum(error[keep] <= 5)
  decade = np.minimum(np.floor(age / 10), 7).astype(int)
  assert list(decade[:6]) == [0, 0, 1, 6, 7, 7]  # 9.99 is in 0-9, 70 and 120 in 70+
  np.testing.assert_array_equal(got["group_count"], [np.sum(keep & (decade == g)) for g in range(8)])
  np.testing.assert_allclose(
    got["group_abs_error"], [error[keep & (decade == g)].sum() for g in range(8)], rtol=1e-5, atol=1e-4
  )
  # Buckets: a face may be in several (a 10-year-old is in 3-12 and minors); end ages are exclusive.
  ranges = {
    "0-2": (0, 3),
    "3-12": (3, 13),
    "13-17": (13, 18),
    "18+": (18, np.inf),
    "minors": (0, 18),
    "60+": (60, np.inf),
  }
  assert [b[0] for b in metrics.AGE_BUCKETS] == list(ranges)
  inside = np.stack([(age >= lo) & (age < hi) & keep for lo, hi in ranges.values()], axis=1)
  np.testing.assert_array_equal(got["bucket_count"], inside.sum(0))
  np.testing.assert_allclose(got["bucket_abs_error"], (inside * error[:, None]).sum(0), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got["bucket_error"], (inside * (pred - age)[:, None]).sum(0), rtol=1e-5, atol=1e-4)


def test_age_buckets_at_their_edges():
  ages = jnp.array([-1.0, 0.0, 2.99, 3.0, 12.99, 13.0, 17.99, 18.0, 59.99, 60.0, 200.0])
  expected = np.array(
    # 0-2 3-12 13-17 18+ minors 60+
    [
      [1, 0, 0, 0, 1, 0],  # below 0 counts as 0
      [1, 0, 0, 0, 1, 0],
      [1, 0, 0, 0, 1, 0],
      [0, 1, 0, 0, 1, 0],
      [0, 1, 0, 0, 1, 0],
      [0, 0, 1, 0, 1, 0],
      [0, 0, 1, 0, 1, 0],
      [0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 0, 1],
      [0, 0, 0, 1, 0, 1],
    ]
  )
  np.testing.assert_array_equal(metrics.age_buckets(ages), expected)


def test_age_groups_at_their_edges_and_sigma_without_per_image_stds():
  edges = jnp.array([-1.0, 0.0, 9.999, 10.0, 19.5, 69.999, 70.0, 200.0])
  np.testing.assert_array_equal(metrics.age_group(edges), [0, 0, 0, 1, 1, 6, 7, 7])
  assert metrics.AGE_GROUPS[0] == "0-9" and metrics.AGE_GROUPS[-1] == "70+" and len(metrics.AGE_GROUPS) == 8
  np.testing.assert_array_equal(metrics.per_image_sigma(None, jnp.zeros(3), 2.5), [2.5, 2.5, 2.5])
  small = metrics.per_image_sigma(jnp.array([0.5, 0.0, 7.0]), jnp.zeros(3), 2.5)  # any std > 0 is the image's own
  np.testing.assert_array_equal(small, [0.5, 2.5, 7.0])


def test_adding_sums_keeps_counters_the_batch_lacks_and_means_of_nothing_are_zero():
  total = metrics.add(metrics.zeros(), {"loss": jnp.float32(2.0), "count": jnp.float32(4.0)})
  assert float(total["loss"]) == 2.0 and float(total["count"]) == 4.0 and float(total["mae"]) == 0.0
  again = metrics.add(total, {"loss": jnp.float32(1.0), "count": jnp.float32(2.0)})
  assert float(again["loss"]) == 3.0 and float(again["count"]) == 6.0 and float(again["nonfinite_step"]) == 0.0
  assert metrics.means(metrics.zeros()) == {"loss": 0.0, "mae": 0.0, "epsilon_error": 0.0, "cs5": 0.0}
  assert metrics.means({"loss": 3.0, "count": 1.0, "nonfinite_step": 0.0}) == {"loss": 3.0}
  assert metrics.means({"loss": 3.0, "count": 2.0, "nonfinite_step": 0.0}) == {"loss": 1.5}
  np.testing.assert_array_equal(metrics.fetch_array(np.array([1, 2])), [1, 2])  # host values pass through
  assert float(metrics.fetch_array(jnp.float32(1.5))) == 1.5


def posterior_median_reference(probs: np.ndarray, bins: np.ndarray) -> np.ndarray:
  """float64: for each row, the bin y minimising sum_a p(a) |a - y| (the first such bin on a tie)."""
  expected_error = np.abs(bins[None, :, None] - bins[None, None, :]) * probs[:, :, None]  # [N, true, predicted]
  return bins[np.argmin(expected_error.sum(axis=1), axis=1)]


def test_posterior_median_minimises_the_expected_absolute_error_as_the_benchmark_predicts():
  rng = np.random.default_rng(3)
  bins = np.arange(0, 102, dtype=np.float64)
  bins32 = jnp.asarray(bins, jnp.float32)
  median = lambda p: float(metrics.posterior_median(jnp.asarray(p[None], jnp.float32), bins32)[0])  # noqa: E731
  logits = rng.normal(0, 3, (200, bins.size))
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  got = np.asarray(metrics.posterior_median(jnp.asarray(probs, jnp.float32), jnp.asarray(bins, jnp.float32)))
  want = posterior_median_reference(probs, bins)
  np.testing.assert_array_equal(got, want)
  # It is the median: at least half the mass at or below it and at least half at or above it.
  at_or_below = np.array([p[bins <= y].sum() for p, y in zip(probs, want)])
  at_or_above = np.array([p[bins >= y].sum() for p, y in zip(probs, want)])
  assert (at_or_below >= 0.5 - 1e-6).all() and (at_or_above >= 0.5 - 1e-6).all()
  # Not the mean rounded: a skewed distribution's median and mean differ by years.
  skewed = np.zeros(bins.size)
  skewed[[20, 21, 80]] = [0.3, 0.3, 0.4]
  assert median(skewed) == 21
  # Two bins of mass 0.5 each: every age between them is a median; the benchmark's argmin takes the first.
  tie = np.zeros(bins.size)
  tie[[30, 40]] = 0.5
  assert median(tie) == 30
