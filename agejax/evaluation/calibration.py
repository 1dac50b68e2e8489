"""Calibrated age uncertainty: temperature scaling, the NLL of the true age, central intervals and their coverage.

A temperature reshapes a distribution around the raw model's expected age and never moves it
(`labels.tempered`): point predictions are the model's as trained. Single views and flip averages
each have their own temperature, fitted on the validation split.

One temperature calibrates on average over ages, not at each age: a model whose error grows with
age gets intervals too wide for children and too narrow for the old. The interval users are shown
is therefore adjusted per age bucket by split conformal prediction conditional on the label's
bucket (Vovk's Mondrian conformal; Lei & Wasserman 2014 for its class-conditional form): age a is
in the interval of level m when it lies in the central interval of mass m_b, where m_b is fitted on
the validation faces of a's own bucket b, so faces of every bucket are covered at least m of the
time (exchangeable faces assumed; at most m + 1 / (n_b + 1)).

A predicted distribution over integer age bins is read as a continuous density that spreads each
bin's mass evenly over [age - 0.5, age + 0.5]: its central interval of mass m is
[Q((1 - m) / 2), Q((1 + m) / 2)]. Whether the true age lies in it is read off the randomized
probability integral transform (PIT): uniform on [0, 1] for a model whose distributions are the
true ones, so a calibrated model's interval of mass m holds the true age m of the time.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.typing import ArrayLike

from agejax import errors, labels, metrics, storage

FILE = "calibration.json"  # WORKDIR/calibration.json: split, step, and per way of predicting its temperatures
WAYS = ("single", "flip")  # single views, flip averages: each way its own temperatures
# The buckets the shown interval holds in: disjoint, so each face has one (metrics.AGE_BUCKETS overlap).
INTERVAL_BUCKETS = (
  ("0-2", 0.0, 3.0),
  ("3-12", 3.0, 13.0),
  ("13-17", 13.0, 18.0),
  ("18-59", 18.0, 60.0),
  ("60+", 60.0, float("inf")),
)
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)
INTERVAL_MASS = 0.8  # the interval predict.py and the server print beside each age
# log(T) is searched in this range: a model so far off that T leaves it is better retrained.
LOG_T_RANGE = (float(np.log(0.05)), float(np.log(20.0)))
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
RELIABILITY_BINS = 10  # predicted-std bins of equal counts in the reliability plot
CURVE_LEVELS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)) + (0.99,)  # nominal masses on the coverage curve
COVERAGE_SEED = 0  # the randomized PIT's draws: the same outputs always give the same coverage


def scaled(logits: jax.Array, bins: jax.Array, temperature: ArrayLike) -> jax.Array:
  """Returns the calibrated distributions: `labels.tempered` (the raw model's expected age kept)."""
  return labels.tempered(logits, bins, temperature)


def _bin_index(age: jax.Array, bins: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(age - bins[0]), 0, bins.shape[0] - 1).astype(jnp.int32)


def _below_and_at(probs: jax.Array, bins: jax.Array, age: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(the mass of the bins below each true age's, the mass of its own bin); ages outside count in the end bins."""
  index = _bin_index(age, bins)
  below = jnp.sum(jnp.where(jnp.arange(bins.shape[0]) < index[..., None], probs, 0.0), axis=-1)
  return below, jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0]


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
  below, mass = _below_and_at(probs, bins, age)
  return below + jax.random.uniform(key, jnp.shape(age)) * mass


def quantile(probs: jax.Array, bins: jax.Array, q: float | jax.Array) -> jax.Array:
  """Returns the age at which each distribution's CDF reaches q (linear within a bin)."""
  cdf = jnp.cumsum(probs, axis=-1)
  k = jnp.minimum(jnp.sum(cdf < q, axis=-1, keepdims=True), bins.shape[0] - 1)
  mass = jnp.take_along_axis(probs, k, axis=-1)[..., 0]
  below = jnp.take_along_axis(cdf, k, axis=-1)[..., 0] - mass
  within = jnp.clip((q - below) / jnp.maximum(mass, jnp.finfo(jnp.float32).tiny), 0.0, 1.0)
  return bins[k[..., 0]] - 0.5 + within


def interval(probs: jax.Array, bins: jax.Array, mass: float | jax.Array = INTERVAL_MASS) -> tuple[jax.Array, jax.Array]:
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
  """Returns the masked mean NLL of the true ages under the distributions tempered by exp(log_t)."""
  per_example = nll(scaled(logits, bins, jnp.exp(log_t)), bins, age)
  return jnp.sum(jnp.where(mask > 0, per_example, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def _golden_section(loss, iterations: int) -> jax.Array:
  """Minimises the unimodal loss(log_t) over LOG_T_RANGE; returns T."""

  def body(_, bracket):
    lo, hi = bracket
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    left = loss(a) <= loss(b)
    return jnp.where(left, lo, a), jnp.where(left, b, hi)

  start = tuple(jnp.asarray(x, jnp.float32) for x in LOG_T_RANGE)
  lo, hi = jax.lax.fori_loop(0, iterations, body, start)
  return jnp.exp(0.5 * (lo + hi))


@functools.partial(jax.jit, static_argnames="iterations")
def fit_temperature(
  logits: jax.Array, bins: jax.Array, age: jax.Array, mask: jax.Array | None = None, iterations: int = 40
) -> jax.Array:
  """Returns the one temperature T minimising the mean NLL of the tempered distributions: a golden-section search.

  The NLL is unimodal along log T, so the search brackets its minimum to ~1e-8 of the range in 40
  iterations, all in one compiled call.

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
  return _golden_section(functools.partial(mean_nll, logits, bins, age, mask), iterations)


def needed_mass(probs: jax.Array, bins: jax.Array, age: jax.Array) -> jax.Array:
  """[N] the smallest mass whose central interval, as shown (ends rounded to whole years), holds the true age.

  The ends Q((1 - m) / 2) and Q((1 + m) / 2) round to at most a and at least a when
  (1 - m) / 2 < F(a + 1/2) and (1 + m) / 2 >= F(a - 1/2), F the CDF of the piecewise-uniform density.
  """
  below, mass = _below_and_at(probs, bins, age)
  return jnp.clip(jnp.maximum(1.0 - 2.0 * (below + mass), 2.0 * below - 1.0), 0.0, 1.0)


def interval_bucket_one_hot(age: ArrayLike) -> jax.Array:
  """[N, len(INTERVAL_BUCKETS)] 1.0 in the bucket of each age (ages below 0 count as 0)."""
  age = jnp.maximum(jnp.asarray(age, jnp.float32), 0.0)[..., None]
  first = jnp.asarray([b[1] for b in INTERVAL_BUCKETS], jnp.float32)
  end = jnp.asarray([b[2] for b in INTERVAL_BUCKETS], jnp.float32)
  return ((age >= first) & (age < end)).astype(jnp.float32)


_MASS_GRID = np.linspace(0.0, 1.0, 201)  # the masses the second pass of fit_interval_masses tries
_REFIT_PASSES = 2


@jax.jit
def _hull_hits(
  probs: jax.Array, bins: jax.Array, age: jax.Array, member: jax.Array, masses: jax.Array, bucket: jax.Array
) -> jax.Array:
  """[len(_MASS_GRID)] how many `member` faces `adjusted_interval` holds with masses[bucket] set to each grid mass.

  The whole split with a 0/1 mask, the bucket traced: one compilation per split size, not per bucket.
  """

  def hits(m):
    low, high = adjusted_interval(probs, bins, masses.at[bucket].set(m))
    return jnp.sum(jnp.where((age >= low) & (age <= high), member, 0.0))

  return jax.lax.map(hits, jnp.asarray(_MASS_GRID, jnp.float32))


def fit_interval_masses(
  probs: jax.Array, bins: jax.Array, age: jax.Array, levels=COVERAGE_LEVELS
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (masses [len(levels), len(INTERVAL_BUCKETS)], validation count per bucket): split conformal per bucket.

  Bucket b's mass for level m is first the ceil((n_b + 1) m)-th smallest `needed_mass` of its n_b
  faces: its own ages' band then holds m of them. The interval shown runs from the first to the
  last age of all buckets' bands, which holds more (a teenager's wide distribution reaches the
  bands of 3-12 and 18-59 on both sides), so each bucket's mass is then lowered, in turn and twice
  over, to the smallest on a grid of 1/200 at which the shown interval still holds that rank of its
  faces; lowering a neighbour's mass takes faces from a bucket checked before, so a last pass raises
  each mass where its bucket fell short. 1.0 (the whole distribution) where n_b < m / (1 - m): too
  few faces to promise m.
  """
  # A face whose distribution is not finite (a diverged model) needs the whole distribution.
  needed = np.nan_to_num(np.asarray(metrics.fetch_array(needed_mass(probs, bins, age)), np.float64), nan=1.0)
  bucket = np.asarray(metrics.fetch_array(interval_bucket_one_hot(age))).argmax(axis=1)
  masses = np.ones((len(levels), len(INTERVAL_BUCKETS)))
  counts = np.bincount(bucket, minlength=len(INTERVAL_BUCKETS))
  ranks = np.ceil((counts[None] + 1) * np.asarray(levels)[:, None]).astype(int)  # [L, B]
  for b, n in enumerate(counts):
    scores = np.sort(needed[bucket == b])
    for i in range(len(levels)):
      if ranks[i, b] <= n:
        masses[i, b] = scores[ranks[i, b] - 1]
  for i in range(len(levels)):
    for refit in range(_REFIT_PASSES + 1):
      for b, n in enumerate(counts):
        if ranks[i, b] > n:
          continue
        member = jnp.asarray(bucket == b, jnp.float32)
        found = _hull_hits(probs, bins, age, member, jnp.asarray(masses[i], jnp.float32), jnp.asarray(b))
        hits = np.asarray(metrics.fetch_array(found))
        enough = np.flatnonzero(hits >= ranks[i, b])
        smallest = _MASS_GRID[enough[0]] if len(enough) else 1.0
        # The last pass only raises: a bucket's band grows every span, so no bucket checked before loses faces.
        masses[i, b] = max(masses[i, b], smallest) if refit == _REFIT_PASSES else min(masses[i, b], smallest)
  return masses, counts


def adjusted_interval(probs: jax.Array, bins: jax.Array, masses: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """(low, high) whole-year ends of the interval that holds by age bucket: masses [len(INTERVAL_BUCKETS)].

  The ages of each bucket b inside the central interval of mass masses[b], rounded as shown; the
  interval runs from the first to the last such age (a gap between buckets is filled: it holds more).
  """
  lows, highs = [], []
  for b, (_, first, end) in enumerate(INTERVAL_BUCKETS):
    low, high = (jnp.round(x) for x in interval(probs, bins, jnp.asarray(masses, jnp.float32)[b]))
    low, high = jnp.maximum(low, jnp.maximum(first, bins[0])), jnp.minimum(high, jnp.minimum(end - 1.0, bins[-1]))
    lows.append(jnp.where(low <= high, low, jnp.inf))
    highs.append(jnp.where(low <= high, high, -jnp.inf))
  low, high = jnp.min(jnp.stack(lows), axis=0), jnp.max(jnp.stack(highs), axis=0)
  return jnp.where(jnp.isfinite(low), low, jnp.nan), jnp.where(jnp.isfinite(high), high, jnp.nan)


def fit(logits: jax.Array, bins: jax.Array, age: jax.Array) -> dict:
  """Fits one way of predicting's calibration on the validation split: the temperature, then the interval masses.

  Args:
    logits: [N, K] the raw model's log-probabilities (flip-averaged for the flip way).
    bins: [K] the ages of the bins.
    age: [N] the true ages.

  Returns:
    {temperature, nll_before (T 1), nll_after, interval_masses {level: [mass per INTERVAL_BUCKETS
    entry]}, bucket_counts}.
  """
  mask = jnp.ones_like(age)
  temperature = float(metrics.fetch_array(fit_temperature(logits, bins, age, mask)))
  masses, counts = fit_interval_masses(scaled(logits, bins, temperature), bins, age)
  mean = lambda t: float(metrics.fetch_array(mean_nll(logits, bins, age, mask, jnp.log(t))))  # noqa: E731
  return {
    "temperature": temperature,
    "nll_before": mean(1.0),
    "nll_after": mean(temperature),
    "interval_masses": {str(m): row.tolist() for m, row in zip(COVERAGE_LEVELS, masses)},
    "bucket_counts": counts.tolist(),
  }


def covered_as_shown(
  probs: jax.Array, bins: jax.Array, age: jax.Array, masses, interval_masses: jax.Array | None = None
) -> jax.Array:
  """Returns [N, len(masses)]: 1.0 where the whole-year age lies in the interval of each mass as users see it.

  predict.py, the server and the page print an interval's ends in whole years, both ages included
  ("80%: 31-38"): with `interval_masses` [len(masses), len(INTERVAL_BUCKETS)] the interval adjusted
  per age bucket (`adjusted_interval`), else the central interval rounded, which for whole-year ages
  covers more than its mass (92.5% at 90% for exactly right distributions of std 1).
  """
  hits = []
  for i, m in enumerate(masses):
    if interval_masses is None:
      low, high = (jnp.round(end) for end in interval(probs, bins, float(m)))
    else:
      low, high = adjusted_interval(probs, bins, interval_masses[i])
    hits.append((age >= low) & (age <= high))
  return jnp.stack(hits, axis=-1).astype(jnp.float32)


def _shares(indicator: jax.Array, one_hot: jax.Array) -> jax.Array:
  """[G, L] the mean of each column of indicator [N, L] over each group of one_hot [N, G] (NaN: an empty group)."""
  count = jnp.sum(one_hot, axis=0)
  return jnp.where(count[:, None] > 0, one_hot.T @ indicator / jnp.maximum(count, 1.0)[:, None], jnp.nan)


@jax.jit
def _report_arrays(
  logits: jax.Array,
  probs: jax.Array,
  bins: jax.Array,
  age: jax.Array,
  group_one_hot: jax.Array,
  interval_masses: jax.Array | None,
) -> dict[str, dict[str, jax.Array]]:
  """NLL, coverage (COVERAGE_LEVELS, then CURVE_LEVELS) by bucket and group, reliability bins: raw and calibrated."""
  out: dict[str, dict[str, jax.Array]] = {}
  buckets = metrics.age_buckets(age)
  for name, p, masses in (("uncalibrated", jax.nn.softmax(logits), None), ("calibrated", probs, interval_masses)):
    std = labels.distribution_std(p, bins)
    squared_error = jnp.square(labels.expected_age(p, bins) - age)
    edges = jnp.quantile(std, jnp.linspace(0.0, 1.0, RELIABILITY_BINS + 1))
    one_hot = jax.nn.one_hot(jnp.searchsorted(edges[1:-1], std, side="right"), RELIABILITY_BINS)
    count = jnp.sum(one_hot, axis=0)
    pit = covered(p, bins, age, COVERAGE_LEVELS + CURVE_LEVELS)
    shown = covered_as_shown(p, bins, age, COVERAGE_LEVELS, masses)
    out[name] = {
      "nll": jnp.mean(nll(p, bins, age)),
      "coverage": jnp.mean(pit, axis=0),
      "coverage_shown": jnp.mean(shown, axis=0),
      "bucket_coverage": _shares(pit[:, : len(COVERAGE_LEVELS)], buckets),
      "bucket_coverage_shown": _shares(shown, buckets),
      "group_coverage": _shares(pit[:, : len(COVERAGE_LEVELS)], group_one_hot),
      "group_coverage_shown": _shares(shown, group_one_hot),
      "count": count,
      "mean_std": jnp.sum(one_hot * std[:, None], axis=0) / jnp.maximum(count, 1.0),
      "rms_error": jnp.sqrt(jnp.sum(one_hot * squared_error[:, None], axis=0) / jnp.maximum(count, 1.0)),
    }
  out["counts"] = {"bucket": jnp.sum(buckets, axis=0), "group": jnp.sum(group_one_hot, axis=0)}
  return out


def _by_level(values) -> dict[str, float | None]:
  return {str(m): (None if np.isnan(v) else float(v)) for m, v in zip(COVERAGE_LEVELS, values)}


def report(
  logits: jax.Array,
  probs: jax.Array,
  bins: jax.Array,
  age: jax.Array,
  fitted: "float | Calibration",
  groupings: Mapping[str, tuple[np.ndarray, Sequence[str]]] | None = None,
) -> dict:
  """The calibration report of per-example raw log-probabilities and calibrated distributions.

  Args:
    logits: [N, K] the raw model's log-probabilities (temperature 1).
    probs: [N, K] the distributions the model reports (made with `fitted`'s temperature).
    bins: [K] the ages of the bins.
    age: [N] the true ages.
    fitted: the calibration `probs` were made with (a float: a temperature, intervals not adjusted).
    groupings: name -> (code per example, group names): coverage by group (e.g. gender, race).

  Returns:
    temperature, interval_masses, nll; coverage {level: share} (the randomized PIT: whether the
    distributions are calibrated), coverage_shown (of the whole-year interval users see),
    coverage_by_bucket (metrics.AGE_BUCKETS of the true age) and coverage_by_group {grouping:
    {group: ...}}, each with count, coverage, coverage_shown and coverage_uncalibrated;
    nll_uncalibrated, coverage_uncalibrated, coverage_shown_uncalibrated, and for the plots
    coverage_curve and reliability (predicted std bins against the RMS error).
  """
  fitted = fitted if isinstance(fitted, Calibration) else Calibration(float(fitted))
  groupings = dict(groupings or {})
  names = [(grouping, group) for grouping, (_, group_names) in groupings.items() for group in group_names]
  one_hot = jnp.concatenate(
    [jnp.zeros((age.shape[0], 0), jnp.float32)]
    + [jax.nn.one_hot(jnp.asarray(codes), len(g), dtype=jnp.float32) for codes, g in groupings.values()],
    axis=1,
  )
  masses = None if fitted.interval_masses is None else jnp.asarray(fitted.interval_masses, jnp.float32)
  arrays = _report_arrays(logits, probs, bins, age, one_hot, masses)
  host = jax.tree.map(lambda x: np.asarray(metrics.fetch_array(x), np.float64), arrays)  # works on every process
  n = len(COVERAGE_LEVELS)
  cal, raw = host["calibrated"], host["uncalibrated"]

  def entry(count, kind: str, j: int) -> dict:
    return {
      "count": int(count),
      "coverage": _by_level(cal[f"{kind}_coverage"][j]),
      "coverage_shown": _by_level(cal[f"{kind}_coverage_shown"][j]),
      "coverage_uncalibrated": _by_level(raw[f"{kind}_coverage"][j]),
    }

  by_group: dict[str, dict] = {grouping: {} for grouping in groupings}
  for j, (grouping, group) in enumerate(names):
    by_group[grouping][group] = entry(host["counts"]["group"][j], "group", j)
  return {
    **fitted.to_json(),
    "nll": float(cal["nll"]),
    "coverage": _by_level(cal["coverage"][:n]),
    "coverage_shown": _by_level(cal["coverage_shown"]),
    "coverage_by_bucket": {
      name: entry(host["counts"]["bucket"][j], "bucket", j) for j, (name, _, _) in enumerate(metrics.AGE_BUCKETS)
    },
    "coverage_by_group": by_group,
    "nll_uncalibrated": float(raw["nll"]),
    "coverage_uncalibrated": _by_level(raw["coverage"][:n]),
    "coverage_shown_uncalibrated": _by_level(raw["coverage_shown"]),
    "coverage_curve": {
      "nominal": [float(v) for v in CURVE_LEVELS],
      **{name: host[name]["coverage"][n:].tolist() for name in ("uncalibrated", "calibrated")},
    },
    "reliability": {
      name: {k: host[name][k].tolist() for k in ("mean_std", "rms_error", "count")}
      for name in ("uncalibrated", "calibrated")
    },
  }


@dataclasses.dataclass(frozen=True)
class Calibration:
  """One way of predicting's calibration: its temperature and, once fitted, the interval masses by age bucket."""

  temperature: float = 1.0
  interval_masses: np.ndarray | None = None  # [len(COVERAGE_LEVELS), len(INTERVAL_BUCKETS)]; None: central intervals

  def shown_masses(self, mass: float = INTERVAL_MASS) -> np.ndarray | None:
    """[len(INTERVAL_BUCKETS)] the masses of the interval of `mass` users are shown; None: the central interval."""
    if self.interval_masses is None:
      return None
    return np.asarray(self.interval_masses[COVERAGE_LEVELS.index(mass)], np.float32)

  def to_json(self) -> dict[str, Any]:
    """{temperature, interval_masses {level: {bucket: mass}} or None}, as reports, manifests and /healthz show it."""
    masses = None
    if self.interval_masses is not None:
      buckets = [b[0] for b in INTERVAL_BUCKETS]
      masses = {str(m): dict(zip(buckets, map(float, row))) for m, row in zip(COVERAGE_LEVELS, self.interval_masses)}
    return {"temperature": float(self.temperature), "interval_masses": masses}

  @classmethod
  def from_fit(cls, entry: dict[str, Any], where: str = FILE) -> "Calibration":
    """The calibration of a `fit` record (a way of calibration.json, or a manifest), checked; errors name `where`."""
    temperature: Any = entry.get("temperature")
    if not _positive(temperature):
      raise errors.UserError(
        f"{where}: temperature={temperature!r} is not a positive number; delete it or rerun evaluate.py --calibrate"
      )
    masses = entry.get("interval_masses")
    if masses is None:
      return cls(float(temperature))
    buckets = [b[0] for b in INTERVAL_BUCKETS]
    # Per level: a list in INTERVAL_BUCKETS order (calibration.json) or {bucket: mass} (`to_json`: manifests).
    row = lambda v: [v[b] for b in buckets] if isinstance(v, dict) else v  # noqa: E731
    try:
      table = np.asarray([row(masses[str(m)]) for m in COVERAGE_LEVELS], np.float64)
    except (KeyError, TypeError, ValueError):
      table = np.zeros(0)
    if table.shape != (len(COVERAGE_LEVELS), len(INTERVAL_BUCKETS)) or not np.all((table >= 0) & (table <= 1)):
      raise errors.UserError(
        f"{where}: interval_masses={masses!r} is not, for each level {', '.join(map(str, COVERAGE_LEVELS))}, "
        f"{len(INTERVAL_BUCKETS)} masses in [0, 1]; delete it or rerun evaluate.py --calibrate"
      )
    return cls(float(temperature), table)


def way(flip: bool) -> str:
  """The calibration.json key of a way of predicting: 'flip' (flip averages) or 'single' (single views)."""
  return WAYS[1] if flip else WAYS[0]


def _positive(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def load(workdir: storage.Location, step: int | None = None, flip: bool = False) -> Calibration | None:
  """Returns WORKDIR/calibration.json's calibration of single views or flip averages; None: never calibrated.

  With `step`, warns when it was fitted for another checkpoint's model. A file from before flip
  averages had their own temperature ({"temperature": T, "flip": bool}) serves the way it was
  fitted for; the other way fails in one line (a temperature fitted to one way misstates the
  other's intervals).
  """
  path = storage.path(workdir) / FILE
  if not path.exists():
    return None
  record = storage.read_json_object(path)
  if step is not None and record.get("step") not in (None, step):
    logging.warning(
      "%s was fitted for step %s, not step %d: evaluate.py --calibrate refits it", path, record["step"], step
    )
  name = way(flip)
  entry = record.get(name)
  if not isinstance(entry, dict) and "temperature" in record:  # the file before one temperature per way
    fitted_flip = bool(record.get("flip", False))
    if fitted_flip != flip:
      raise errors.UserError(
        f"{path} was fitted {'with' if fitted_flip else 'without'} flip averaging and holds no temperature for "
        f"{'flip averages' if flip else 'single views'}: rerun evaluate.py --calibrate (fits both), or --nocalibration"
      )
    entry = {"temperature": record["temperature"]}
  if not isinstance(entry, dict):
    raise errors.UserError(f"{path}: no {name!r} calibration; delete it or rerun evaluate.py --calibrate")
  return Calibration.from_fit(entry, str(path))


def write(workdir: storage.Location, record: dict) -> None:
  """Writes WORKDIR/calibration.json: split, step, and a `fit` record per way ('single', 'flip')."""
  storage.write_json(storage.path(workdir) / FILE, record)
