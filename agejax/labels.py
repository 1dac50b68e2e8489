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


def label_distribution(ages: ArrayLike, bins: ArrayLike, sigma: ArrayLike) -> jax.Array:
  """Returns N(age, sigma^2) evaluated at the bins and normalised to sum 1, shape [..., K]."""
  ages = jnp.asarray(ages, jnp.float32)[..., None]
  sigma = jnp.asarray(sigma, jnp.float32)
  sigma = sigma[..., None] if sigma.ndim else sigma
  # A softmax over the log-density normalises exactly and stays finite for ages outside the bins.
  return jax.nn.softmax(-0.5 * jnp.square((bins - ages) / sigma), axis=-1)


def expected_age(probs: ArrayLike, bins: ArrayLike) -> jax.Array:
  """Returns the expectation of the age under the distribution over bins."""
  return jnp.sum(probs * bins, axis=-1)


def argmax_age(probs: jax.Array, bins: jax.Array) -> jax.Array:
  """Returns the most probable age bin."""
  return jnp.asarray(bins)[jnp.argmax(probs, axis=-1)]


def distribution_std(probs: jax.Array, bins: jax.Array) -> jax.Array:
  """Returns the standard deviation of the age under the distribution (the model's uncertainty)."""
  mean = expected_age(probs, bins)
  return jnp.sqrt(jnp.maximum(jnp.sum(probs * jnp.square(bins - mean[..., None]), axis=-1), 0.0))
