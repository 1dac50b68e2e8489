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
