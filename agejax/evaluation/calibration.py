"""Calibrated age uncertainty: temperature scaling, the NLL of the true age, central intervals and their coverage.

A predicted distribution over integer age bins is read as a continuous density that spreads each
bin's mass evenly over [age - 0.5, age + 0.5]: its central interval of mass m is
[Q((1 - m) / 2), Q((1 + m) / 2)]. Whether the true age lies in it is read off the randomized
probability integral transform (PIT): uniform on [0, 1] for a model whose distributions are the
true ones, so a calibrated model's interval of mass m holds the true age m of the time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from agejax import errors, labels, metrics, storage

FILE = "calibration.json"  # WORKDIR/calibration.json: temperature, split, nll_before, nll_after
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)
INTERVAL_MASS = 0.8  # the interval predict.py and the server print beside each age
# log(T) is searched in this range: a model so far off that T leaves it is better retrained.
LOG_T_RANGE = (float(np.log(0.05)), float(np.log(20.0)))
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
RELIABILITY_BINS = 10  # predicted-std bins of equal counts in the reliability plot
CURVE_LEVELS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)) + (0.99,)  # nominal masses on the coverage curve
COVERAGE_SEED = 0  # the randomized PIT's draws: the same outputs always give the same coverage


def scaled(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """Returns softmax(logits / temperature) over the last axis."""
  return jax.nn.softmax(logits / temperature, axis=-1)


def _bin_index(age: jax.Array, bins: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(age - bins[0]), 0, bins.shape[0] - 1).astype(jnp.int32)


def nll(probs: jax.Array, bins: jax.Array, age: jax.Array) -> jax.Array:
  """Returns -log(density at the true age) per example; ages outside the bins count in the end bins."""
  p = jnp.take_along_axis(probs, _bin_index(age, bins)[..., None], axis=-1)[..., 0]
  return -jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny))


def randomized_pit(probs: jax.Array, bins: jax.Array, age: jax.Array, key: jax.Array) -> jax.Array:
  """The CDF of each distribution at its true age, the age's own bin entered at a uniform random point.

  Ages are whole years, so the CDF at the middle of the age's bin (the mid-PIT) sits nearer 0.5
  than it should and coverage reads high (for exactly right distributions of std 1: 0.539 for a
  50% interval). Entering the bin at a uniform draw makes the PIT uniform on [0, 1] for a
  calibrated model (the randomized PIT for discrete outcomes; Czado, Gneiting & Held 2009). Ages
  outside the bins count in the end bins, as in `nll`.
  """
  index = _bin_index(age, bins)
  below = jnp.sum(jnp.where(jnp.arange(bins.shape[0]) < index[..., None], probs, 0.0), axis=-1)
  mass = jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0]
  return below + jax.random.uniform(key, jnp.shape(age)) * mass


def quantile(probs: jax.Array, bins: jax.Array, q: float | jax.Array) -> jax.Array:
  """Returns the age at which each distribution's CDF reaches q (linear within a bin)."""
  cdf = jnp.cumsum(probs, axis=-1)
  k = jnp.minimum(jnp.sum(cdf < q, axis=-1, keepdims=True), bins.shape[0] - 1)
  mass = jnp.take_along_axis(probs, k, axis=-1)[..., 0]
  below = jnp.take_along_axis(cdf, k, axis=-1)[..., 0] - mass
  within = jnp.clip((q - below) / jnp.maximum(mass, jnp.finfo(jnp.float32).tiny), 0.0, 1.0)
  return bins[k[..., 0]] - 0.5 + within


def interval(probs: jax.Array, bins: jax.Array, mass: float = INTERVAL_MASS) -> tuple[jax.Array, jax.Array]:
  """Returns (low, high) of each distribution's central interval holding `mass` of the probability."""
  return quantile(probs, bins, (1.0 - mass) / 2.0), quantile(probs, bins, (1.0 + mass) / 2.0)


def covered(probs: jax.Array, bins: jax.Array, age: jax.Array, masses, key: jax.Array | None = None) -> jax.Array:
  """Returns [N, len(masses)]: 1.0 where the true age lies in the central interval of each mass, else 0.0.

  "Lies in" by the randomized PIT (seeded: COVERAGE_SEED unless `key` is given), so a calibrated
  model covers each nominal mass on average, with whole-year ages too.
  """
  key = jax.random.key(COVERAGE_SEED) if key is None else key
  masses = jnp.asarray(masses, jnp.float32)
  return (jnp.abs(randomized_pit(probs, bins, age, key) - 0.5)[:, None] <= masses / 2.0).astype(jnp.float32)


def mean_nll(logits: jax.Array, bins: jax.Array, age: jax.Array, mask: jax.Array, log_t: jax.Array) -> jax.Array:
  """Returns the masked mean NLL of the true ages under softmax(logits / exp(log_t))."""
  per_example = nll(scaled(logits, jnp.exp(log_t)), bins, age)
  return jnp.sum(jnp.where(mask > 0, per_example, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames="iterations")
def fit_temperature(
  logits: jax.Array, bins: jax.Array, age: jax.Array, mask: jax.Array | None = None, iterations: int = 60
) -> jax.Array:
  """Returns the temperature T minimising the mean NLL of softmax(logits / T): a golden-section search.

  The NLL is convex in 1 / T, so it has one minimum along log T, which the search brackets to ~1e-12
  of the range in 60 iterations, all in one compiled call.

  Args:
    logits: [N, K] unnormalised log-probabilities (one model output per example).
    bins: [K] the ages of the bins.
    age: [N] the true ages.
    mask: [N] 1.0 for the examples to fit on (padding 0.0); default: all.
    iterations: golden-section steps.

  Returns:
    The scalar temperature.
  """
  mask = jnp.ones_like(age) if mask is None else mask
  loss = functools.partial(mean_nll, logits, bins, age, mask)

  def body(_, bracket):
    lo, hi = bracket
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    left = loss(a) <= loss(b)
    return jnp.where(left, lo, a), jnp.where(left, b, hi)

  lo, hi = jax.lax.fori_loop(0, iterations, body, tuple(jnp.asarray(x, jnp.float32) for x in LOG_T_RANGE))
  return jnp.exp(0.5 * (lo + hi))


@jax.jit
def _report_arrays(
  logits: jax.Array, probs: jax.Array, bins: jax.Array, age: jax.Array
) -> dict[str, dict[str, jax.Array]]:
  """NLL, coverage (COVERAGE_LEVELS, then CURVE_LEVELS) and reliability bins of the raw and calibrated model."""
  out: dict[str, dict[str, jax.Array]] = {}
  for name, p in (("uncalibrated", jax.nn.softmax(logits)), ("calibrated", probs)):
    std = labels.distribution_std(p, bins)
    squared_error = jnp.square(labels.expected_age(p, bins) - age)
    edges = jnp.quantile(std, jnp.linspace(0.0, 1.0, RELIABILITY_BINS + 1))
    one_hot = jax.nn.one_hot(jnp.searchsorted(edges[1:-1], std, side="right"), RELIABILITY_BINS)
    count = jnp.sum(one_hot, axis=0)
    out[name] = {
      "nll": jnp.mean(nll(p, bins, age)),
      "coverage": jnp.mean(covered(p, bins, age, COVERAGE_LEVELS + CURVE_LEVELS), axis=0),
      "count": count,
      "mean_std": jnp.sum(one_hot * std[:, None], axis=0) / jnp.maximum(count, 1.0),
      "rms_error": jnp.sqrt(jnp.sum(one_hot * squared_error[:, None], axis=0) / jnp.maximum(count, 1.0)),
    }
  return out


def report(logits: jax.Array, probs: jax.Array, bins: jax.Array, age: jax.Array, temperature: float) -> dict:
  """The calibration report of per-example raw log-probabilities and calibrated distributions.

  Args:
    logits: [N, K] the raw model's log-probabilities (temperature 1).
    probs: [N, K] the distributions the model reports (with `temperature`).
    bins: [K] the ages of the bins.
    age: [N] the true ages.
    temperature: the temperature `probs` were made with.

  Returns:
    temperature, nll, coverage {level: share}, nll_uncalibrated, coverage_uncalibrated, and for
    the plots coverage_curve and reliability (predicted std bins against the RMS error).
  """
  arrays = _report_arrays(logits, probs, bins, age)
  host = jax.tree.map(lambda x: np.asarray(metrics.fetch_array(x), np.float64), arrays)  # works on every process
  n = len(COVERAGE_LEVELS)
  coverage = {name: dict(zip(map(str, COVERAGE_LEVELS), host[name]["coverage"][:n].tolist())) for name in host}
  return {
    "temperature": float(temperature),
    "nll": float(host["calibrated"]["nll"]),
    "coverage": coverage["calibrated"],
    "nll_uncalibrated": float(host["uncalibrated"]["nll"]),
    "coverage_uncalibrated": coverage["uncalibrated"],
    "coverage_curve": {
      "nominal": [float(v) for v in CURVE_LEVELS],
      **{name: host[name]["coverage"][n:].tolist() for name in host},
    },
    "reliability": {name: {k: host[name][k].tolist() for k in ("mean_std", "rms_error", "count")} for name in host},
  }


def load_temperature(workdir: storage.Location, step: int | None = None, flip: bool | None = None) -> float | None:
  """Returns WORKDIR/calibration.json's temperature, or None when the workdir was never calibrated.

  With `step`, warns when the temperature was fitted for another checkpoint's model; with `flip`,
  when it was fitted with the other flip setting (it then tempers a distribution it was not fitted to).
  """
  path = storage.path(workdir) / FILE
  if not path.exists():
    return None
  record = storage.read_json_object(path)
  temperature = record.get("temperature")
  if step is not None and record.get("step") not in (None, step):
    logging.warning(
      "%s was fitted for step %s, not step %d: evaluate.py --calibrate refits it", path, record["step"], step
    )
  if flip is not None and bool(record.get("flip", False)) != flip:
    logging.warning(
      "%s was fitted %s flip averaging and is applied %s it: evaluate.py%s --calibrate refits it",
      path,
      "with" if record.get("flip", False) else "without",
      "with" if flip else "without",
      " --flip" if flip else "",
    )
  if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
    raise errors.UserError(
      f"{path}: temperature={temperature!r} is not a positive number; delete it or rerun evaluate.py --calibrate"
    )
  return float(temperature)


def write(workdir: storage.Location, record: dict) -> None:
  """Writes WORKDIR/calibration.json (temperature, split, nll_before, nll_after)."""
  storage.write_json(storage.path(workdir) / FILE, record)
