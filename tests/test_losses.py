import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax import labels, settings
from agejax.training import losses


def log_softmax_f64(logits):
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_f64(logits, ages, bins, sigma):
  out = []
  for z, age in zip(log_softmax_f64(logits), ages):
    t = np.exp(-((bins.astype(np.float64) - age) ** 2) / (2 * sigma**2))
    t /= t.sum()
    nz = t > 0
    out.append(np.sum(t[nz] * (np.log(t[nz]) - z[nz])))
  return np.array(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_equals_float64_numpy(seed):
  rng = np.random.default_rng(seed)
  bins = labels.age_bins(1, 100)
  ages = np.concatenate([[1, 100, 2, 99], rng.integers(1, 101, 12)]).astype(np.float32)
  logits = (rng.normal(size=(16, 100)) * 3).astype(np.float32)
  got = losses.kl_loss(jnp.asarray(logits), jnp.asarray(ages), jnp.asarray(bins), 2.0)
  np.testing.assert_allclose(np.asarray(got), kl_f64(logits, ages, bins, 2.0), rtol=0, atol=1e-6 * 16)
  assert np.all(np.asarray(got) >= -1e-6)


@pytest.mark.slow
def test_kl_is_zero_at_the_target_and_gradient_points_to_it():
  bins = jnp.asarray(labels.age_bins(1, 100))
  target = labels.label_distribution(jnp.array([40.0]), bins, 2.0)
  perfect = jnp.log(target)
  assert abs(float(losses.kl_loss(perfect, jnp.array([40.0]), bins, 2.0)[0])) < 1e-5
  grad = jax.grad(lambda z: losses.kl_loss(z, jnp.array([40.0]), bins, 2.0).sum())(jnp.zeros((1, 100)))
  assert int(jnp.argmin(grad)) == 39  # descending raises the logit of age 40 most


def test_onehot_nll_and_l1_term():
  rng = np.random.default_rng(3)
  bins = labels.age_bins(1, 100)
  logits = rng.normal(size=(8, 100)).astype(np.float32)
  ages = np.array([1, 100, 5, 50, 77, 23, 64, 9], np.float32)
  no_std = jnp.zeros(8)
  nll = losses.make_loss(settings.LossSettings("onehot"), jnp.asarray(bins))(
    jnp.asarray(logits), jnp.asarray(ages), no_std
  )
  ref = -log_softmax_f64(logits)[np.arange(8), (ages - 1).astype(int)]
  np.testing.assert_allclose(np.asarray(nll), ref, atol=1e-5)
  kl_with_l1 = settings.LossSettings("kl", sigma=2.0, l1_weight=0.5)
  with_l1 = losses.make_loss(kl_with_l1, jnp.asarray(bins))(jnp.asarray(logits), jnp.asarray(ages), no_std)
  p = np.exp(log_softmax_f64(logits))
  expect = kl_f64(logits, ages, bins, 2.0) + 0.5 * np.abs(p @ bins - ages)
  np.testing.assert_allclose(np.asarray(with_l1), expect, atol=1e-4)
  with pytest.raises(ValueError, match="config.loss.name='mse'"):
    losses.make_loss(settings.LossSettings("mse"), jnp.asarray(bins))
