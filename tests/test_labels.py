import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax import labels


def gaussian_target_f64(age: float, bins: np.ndarray, sigma: float) -> np.ndarray:
  g = np.exp(-((bins.astype(np.float64) - age) ** 2) / (2 * sigma**2))
  return g / g.sum()


def test_age_bins_default_range():
  bins = labels.age_bins(1, 100)
  assert bins.shape == (100,) and bins[0] == 1 and bins[-1] == 100
  with pytest.raises(ValueError, match="min_age=5 > max_age=4"):
    labels.age_bins(5, 4)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.5])
def test_label_distribution_matches_float64_gaussian(sigma):
  bins = labels.age_bins(1, 100)
  ages = np.array([1, 2, 37, 50, 99, 100], np.float32)
  got = np.asarray(labels.label_distribution(jnp.asarray(ages), jnp.asarray(bins), sigma))
  for row, age in zip(got, ages):
    np.testing.assert_allclose(row, gaussian_target_f64(age, bins, sigma), atol=1e-7)
    assert abs(row.sum() - 1.0) < 1e-6
    assert bins[np.argmax(row)] == age  # peaks at the true age, ends of the range included


def test_label_distribution_per_example_sigma_and_out_of_range_age():
  bins = jnp.asarray(labels.age_bins(1, 100))
  got = labels.label_distribution(jnp.array([30.0, 150.0]), bins, jnp.array([1.0, 2.0]))
  assert np.all(np.isfinite(got)) and np.allclose(got.sum(-1), 1.0, atol=1e-6)
  assert got[1].argmax() == 99  # mass piles on the last bin, no NaN from underflow
  np.testing.assert_allclose(got[0], gaussian_target_f64(30.0, np.asarray(bins), 1.0), atol=1e-7)


def test_expected_argmax_and_std():
  bins = jnp.asarray(labels.age_bins(1, 5))
  probs = jnp.array([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
  np.testing.assert_allclose(labels.expected_age(probs, bins), [3.0, 3.0])
  np.testing.assert_allclose(labels.argmax_age(probs[1:], bins), [3.0])
  np.testing.assert_allclose(labels.distribution_std(probs, bins), [1.0, 0.0], atol=1e-6)


@pytest.mark.slow
def test_the_summaries_take_one_distribution_or_any_batch_shape_and_match_float64_numpy():
  """A notebook passes one distribution, the flip path a (views, batch, bins) stack: each summary reads the last axis
  (mutant killed: labels.py:66 `argmax(probs, axis=-1)` -> `axis=1`, which fails on one distribution and takes the
  batch's argmax on a stack)."""
  bins = np.arange(1, 8, dtype=np.float64)
  probs = np.random.default_rng(0).dirichlet(np.ones(bins.size), size=(2, 3))
  mean = (probs * bins).sum(-1)
  want = {
    "expected_age": mean,
    "argmax_age": bins[probs.argmax(-1)],
    "distribution_std": np.sqrt((probs * (bins - mean[..., None]) ** 2).sum(-1)),
  }
  for name, expected in want.items():
    summary = getattr(labels, name)
    stacked = np.asarray(summary(jnp.asarray(probs, jnp.float32), jnp.asarray(bins, jnp.float32)))
    np.testing.assert_allclose(stacked, expected, rtol=1e-5, err_msg=name)
    one = np.asarray(summary(jnp.asarray(probs[1, 2], jnp.float32), jnp.asarray(bins, jnp.float32)))
    assert one.shape == () and np.isclose(one, expected[1, 2], rtol=1e-5), name


def test_the_age_range_is_1_to_100_when_a_config_leaves_it_out_as_in_the_base_config():
  """The README's default range: a config without a labels section (a hand-written or plug-in config) and the base
  config both mean ages 1..100, clipped (mutant killed: settings.py:58 `min_age: int = 1` -> `0`)."""
  import importlib.util

  from conftest import ROOT

  from agejax import settings

  spec = importlib.util.spec_from_file_location("vgg16_kl", ROOT / "configs" / "vgg16_kl.py")
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  for config in ({}, base.get_config()):
    ranged = settings.Settings.from_config(config).labels
    assert (ranged.min_age, ranged.max_age, ranged.out_of_range) == (1, 100, "clip"), config
    bins = np.asarray(labels.age_bins(ranged.min_age, ranged.max_age))
    np.testing.assert_array_equal(bins, np.arange(1, 101))


def tempered_reference(logits: np.ndarray, bins: np.ndarray, t: float) -> np.ndarray:
  """float64: p^(1/T) tilted by exp(lam * age), lam found by bisection so the mean is p's own."""
  log_p = logits - logits.max()
  log_p = log_p - np.log(np.exp(log_p).sum())
  target = float(np.exp(log_p) @ bins)

  def tilted(lam):
    z = log_p / t + lam * (bins - target)
    q = np.exp(z - z.max())
    return q / q.sum()

  low, high = -50.0, 50.0
  for _ in range(200):
    mid = 0.5 * (low + high)
    low, high = (mid, high) if tilted(mid) @ bins < target else (low, mid)
  return tilted(0.5 * (low + high))


@pytest.mark.parametrize("temperature", [0.4, 1.0, 1.7, 6.0])
def test_tempering_keeps_the_raw_expected_age_and_matches_a_float64_tilt(temperature):
  """A temperature widens or narrows a distribution around the raw model's expected age, never moves it.

  A plain softmax(logits / T) (the mutant that drops the tilt) moves a child's and an old person's
  expectation by years; the mean-preserving target's point mass at the first bin stays one.
  """
  rng = np.random.default_rng(3)
  bins = labels.age_bins(1, 100).astype(np.float64)
  centres = np.array([1.0, 2.0, 4.0, 30.0, 85.0, 99.5])
  logits = -0.5 * ((bins[None] - centres[:, None]) / rng.uniform(1.0, 8.0, (len(centres), 1))) ** 2
  logits += rng.normal(0.0, 0.3, logits.shape)
  got = np.asarray(labels.tempered(jnp.asarray(logits, jnp.float32), bins, temperature), np.float64)
  expected = np.stack([tempered_reference(row, bins, temperature) for row in logits])
  np.testing.assert_allclose(got, expected, atol=2e-5)
  raw_mean = np.asarray(labels.expected_age(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), bins))
  np.testing.assert_allclose(got @ bins, raw_mean, atol=2e-4)
  if temperature != 1.0:  # the plain temperature would have moved the ends' expectations
    plain = np.asarray(jax.nn.softmax(jnp.asarray(logits / temperature, jnp.float32)), np.float64) @ bins
    assert np.max(np.abs(plain - raw_mean)) > 0.1
  point = labels.label_distribution(1.0, bins, 2.0, mean_preserving=True)
  np.testing.assert_allclose(labels.tempered(jnp.log(point), bins, temperature), point, atol=1e-6)
