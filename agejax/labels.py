"""Age bins, Gaussian label distributions and the ages read off a predicted distribution."""

import re
from collections.abc import Iterable

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


TILT_STEPS = 30  # safeguarded Newton steps for the tilt that keeps a tempered distribution's mean
_TILT_LIMIT = 50.0  # |tilt| per year: exp(-50) of the mass a year further on is none


def tempered_log_probs(logits: jax.Array, bins: ArrayLike, temperature: ArrayLike = 1.0) -> jax.Array:
  """Log-probabilities [..., K] of softmax(logits) tempered without moving its expected age.

  A plain softmax(logits / T) moves the expectation (for a baby at T 0.57, by -0.4 years): the
  point prediction would change with the calibration. Here the tempered log-probabilities are
  tilted by lambda * (age - mean), lambda solved per distribution by safeguarded Newton steps (the
  mean rises with lambda at the rate of the variance), so the expected age stays the raw model's
  (to ~1e-4 years) and the temperature only widens or narrows the distribution around it: the
  exponential-family member nearest softmax(logits / T) with that mean.

  Args:
    logits: [..., K] unnormalised log-probabilities of the raw model.
    bins: [K] the ages of the bins.
    temperature: T > 0, a scalar or one per distribution [...].

  Returns:
    [..., K] float32 log-probabilities; at temperature 1, log_softmax(logits).
  """
  bins = jnp.asarray(bins, jnp.float32)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  mean = expected_age(jnp.exp(log_p), bins)
  base = log_p / jnp.asarray(temperature, jnp.float32)[..., None]
  centred = bins - mean[..., None]
  lam = jnp.zeros_like(mean)
  low, high = jnp.full_like(mean, -_TILT_LIMIT), jnp.full_like(mean, _TILT_LIMIT)
  for _ in range(TILT_STEPS):  # unrolled: exports (ONNX included) see plain ops, no loop primitive
    q = jax.nn.softmax(base + lam[..., None] * centred, axis=-1)
    offset = jnp.sum(q * centred, axis=-1)  # the tilted mean minus the target mean: rises with lambda
    variance = jnp.maximum(jnp.sum(q * jnp.square(centred), axis=-1) - jnp.square(offset), 1e-12)
    low, high = jnp.where(offset < 0, lam, low), jnp.where(offset > 0, lam, high)
    newton = lam - offset / variance
    lam = jnp.where((newton > low) & (newton < high), newton, 0.5 * (low + high))
  lam = jnp.where(jnp.asarray(temperature) == 1.0, 0.0, lam)  # T 1 is the raw model exactly (no rounding's tilt)
  return jax.nn.log_softmax(base + lam[..., None] * centred, axis=-1)


def tempered(logits: jax.Array, bins: ArrayLike, temperature: ArrayLike = 1.0) -> jax.Array:
  """The probabilities of `tempered_log_probs`: the calibrated distribution, its mean the raw model's."""
  return jnp.exp(tempered_log_probs(logits, bins, temperature))


def check_thresholds(thresholds: Iterable[int]) -> tuple[int, ...]:
  """Returns the threshold ages as ints, each once, in the order given; a non-integer or negative one fails."""
  out: dict[int, None] = {}
  for t in thresholds:
    if isinstance(t, bool) or not isinstance(t, int | np.integer):
      raise errors.UserError(f"age threshold {t!r}: must be a whole age in years (an integer), e.g. 18")
    if t < 0:
      raise errors.UserError(f"age threshold {int(t)}: must be an age of 0 or more")
    out[int(t)] = None
  return tuple(out)


def parse_thresholds(text: str) -> tuple[int, ...]:
  """Returns the threshold ages of a comma-separated list such as "18,25" (`check_thresholds`); fails in one line."""
  ages = []
  for item in str(text).split(","):
    item = item.strip()
    if not re.fullmatch(r"[+-]?\d{1,9}", item):
      raise errors.UserError(f"age threshold {item!r}: give whole ages in years separated by commas, e.g. 18,25")
    ages.append(int(item))
  return check_thresholds(ages)


def probability_under(probs: ArrayLike, bins: ArrayLike, thresholds: Iterable[int]) -> np.ndarray:
  """Returns P(age < T) for each threshold age T: the distribution's mass on the bins below T.

  The bins are ages in completed years, so "age < 18" means "has not reached their 18th birthday":
  the bins 17 and below (1..17 on bins 1..100). A threshold at or below the first bin's age gives
  0; one past the last bin's age gives the whole mass (1). Summed in float64, so the result is the
  sum of the given (calibrated) probabilities to float64's rounding, whatever their dtype.

  Args:
    probs: [..., K] distributions over the age bins (the calibrated ones a predictor returns).
    bins: [K] the whole ages of the bins.
    thresholds: whole ages T >= 0 (`check_thresholds`; repeats are answered once).

  Returns:
    float64 [..., len(T)]: P(age < T), one column per distinct threshold, in the order given.
  """
  ages = np.asarray(bins, np.float64)
  top = float(ages.max(initial=0.0)) + 1.0  # any threshold past the last bin takes every bin: no huge ints as floats
  limits = np.asarray([min(t, top) for t in check_thresholds(thresholds)], np.float64)
  below = (ages[None, :] < limits[:, None]).astype(np.float64)  # [T, K]
  return np.asarray(probs, np.float64) @ below.T
