"""Age bins, Gaussian label distributions and the ages read off a predicted distribution."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from agejax import errors


def age_bins(min_age: int, max_age: int) -> np.ndarray:
  """Returns the ages the model predicts over, one bin a year, as float32."""
  if max_age < min_age:
    raise errors.UserError(f"labels: empty age range min_age={min_age} > max_age={max_age}")
  return np.arange(min_age, max_age + 1, dtype=np.float32)


MEAN_SEARCH_STEPS = 50  # bisection steps for a mean-preserving target's centre (to ~1e-13 of the bracket)


def _gaussian(centres: jax.Array, bins: jax.Array, sigma: jax.Array) -> jax.Array:
  # A softmax over the log-density normalises exactly and stays finite for centres outside the bins.
  return jax.nn.softmax(-0.5 * jnp.square((bins - centres) / sigma), axis=-1)


def label_distribution(
  ages: ArrayLike, bins: ArrayLike, sigma: ArrayLike, *, mean_preserving: bool = False
) -> jax.Array:
  """Returns a Gaussian of std `sigma` evaluated at the bins and normalised to sum 1, shape [..., K].

  Centred on the age, the Gaussian is cut at the first and last bin, and its mean moves inward:
  for age 1 with sigma 2 on bins 1..100 it is 1.9. With `mean_preserving`, each Gaussian's centre
  is moved (outward, near an end) until the distribution's mean is the age: a model that fits the
  target exactly predicts the age without bias at the ends (the target narrows there instead;
  at the very first or last bin it is a point mass). Away from the ends both are the same.
  """
  ages = jnp.asarray(ages, jnp.float32)[..., None]
  bins = jnp.asarray(bins, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  sigma = sigma[..., None] if sigma.ndim else sigma
  if not mean_preserving:
    return _gaussian(ages, bins, sigma)
  # The mean over the bins rises with the centre: bisect for the centre whose mean is the age.
  # 20 sigma^2 beyond an end, the end bin's neighbour gets exp(-20) of its mass: a point mass.
  s = jnp.broadcast_to(sigma, ages.shape)
  span = 10.0 * s + 20.0 * jnp.square(s)
  low, high = jnp.minimum(ages, bins[0]) - span, jnp.maximum(ages, bins[-1]) + span

  def step(_, bracket):
    low, high = bracket
    mid = 0.5 * (low + high)
    above = expected_age(_gaussian(mid, bins, sigma), bins)[..., None] > ages
    return jnp.where(above, low, mid), jnp.where(above, mid, high)

  low, high = jax.lax.fori_loop(0, MEAN_SEARCH_STEPS, step, (low, high))
  return _gaussian(0.5 * (low + high), bins, sigma)


def expected_age(probs: ArrayLike, bins: ArrayLike) -> jax.Array:
  """Returns the expectation of the age under the distribution over bins."""
  return jnp.sum(probs * bins, axis=-1)


def argmax_age(probs: jax.Array, bins: jax.Array) -> jax.Array:
  """Returns the distribution's peak (its mode): the age bin of highest probability.

  Not the prediction (that is `expected_age`): next to the ends of the bins the mean-preserving
  target keeps its mean on the age by leaning on the end, so its peak is pulled toward the end
  (sigma 2: ages 1-6 peak at 1, 1, 2, 4, 5, 6), and so is the peak of a model that fits it.
  """
  return jnp.asarray(bins)[jnp.argmax(probs, axis=-1)]


def distribution_std(probs: jax.Array, bins: jax.Array) -> jax.Array:
  """Returns the standard deviation of the age under the distribution (the model's uncertainty)."""
  mean = expected_age(probs, bins)
  return jnp.sqrt(jnp.maximum(jnp.sum(probs * jnp.square(bins - mean[..., None]), axis=-1), 0.0))
