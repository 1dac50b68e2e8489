"""Simulations where the truth is known, for the statistics every report prints (`benchmark.py statistics`).

- Coverage: ages drawn from discretised Gaussians that are exactly the predicted distributions; a
  calibrated report's coverage of each mass should be that mass.
- The group-gap test: groups of UTKFace's validation race sizes, and of 30, 300 and 3,000, whose MAEs
  are equal while their errors' spreads and shapes differ (GAP_SCENARIOS: no real gap, how often is
  one flagged?), and with the smallest group 1 year worse (POWER_SCENARIOS: how often is it found?).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax import labels
from agejax.evaluation import calibration, groups

UTKFACE_RACE_SIZES = (1000, 450, 355, 400, 165)  # white, black, asian, indian, others of 2,370 faces


def coverage(sigma: float, n: int = 20_000, seed: int = 0) -> dict[str, float]:
  """Coverage of each nominal mass by exactly right distributions of std `sigma`, ages in whole years."""
  rng = np.random.default_rng(seed)
  bins = labels.age_bins(1, 100).astype(np.float64)
  centre = rng.uniform(15, 85, n)
  p = np.exp(-0.5 * ((bins[None] - centre[:, None]) / sigma) ** 2)
  p /= p.sum(1, keepdims=True)
  ages = bins[np.minimum((np.cumsum(p, axis=1) < rng.uniform(size=(n, 1))).sum(1), len(bins) - 1)]
  levels = calibration.COVERAGE_LEVELS
  covered = calibration.covered(jnp.asarray(p, jnp.float32), jnp.asarray(bins, jnp.float32), jnp.asarray(ages), levels)
  return {str(m): float(c) for m, c in zip(levels, np.asarray(jnp.mean(covered, axis=0)))}


ERROR_SHAPES = {  # abs errors of mean 1, rescaled to the scenario's MAE: spread (sd / mean) and skew differ
  "uniform": lambda rng, size: rng.uniform(0.0, 2.0, size),  # sd 0.58, skew 0: the narrowest
  "half_normal": lambda rng, size: np.abs(rng.normal(0.0, np.sqrt(np.pi / 2), size)),  # sd 0.76, skew 1.0
  "exponential": lambda rng, size: rng.exponential(1.0, size),  # sd 1, skew 2
  "gamma_half": lambda rng, size: rng.gamma(0.5, 2.0, size),  # sd 1.41, skew 2.8: the widest
}


@dataclasses.dataclass(frozen=True)
class GapScenario:
  """Groups of `sizes` whose abs errors have the `shapes` (ERROR_SHAPES), all of MAE `mae` years."""

  name: str
  sizes: tuple[int, ...]
  shapes: tuple[str, ...]
  mae: float = 5.0


SMALL_LARGE = (30, 300, 3000)
GAP_SCENARIOS = (  # equal MAE in every group: a flag is a false alarm
  GapScenario("UTKFace races, alike", UTKFACE_RACE_SIZES, ("half_normal",) * 5),
  GapScenario(
    "UTKFace races, smallest narrowest",
    UTKFACE_RACE_SIZES,
    ("exponential", "half_normal", "gamma_half", "half_normal", "uniform"),
  ),
  GapScenario(
    "UTKFace races, smallest widest",
    UTKFACE_RACE_SIZES,
    ("uniform", "half_normal", "uniform", "exponential", "gamma_half"),
  ),
  GapScenario("30/300/3000, alike", SMALL_LARGE, ("half_normal",) * 3),
  GapScenario("30/300/3000, smallest narrowest", SMALL_LARGE, ("uniform", "half_normal", "gamma_half")),
  GapScenario("30/300/3000, smallest widest", SMALL_LARGE, ("gamma_half", "half_normal", "uniform")),
  GapScenario("30/300/3000, smallest exponential", SMALL_LARGE, ("exponential", "half_normal", "uniform")),
)
POWER_SCENARIOS = (  # the smallest group 1 year worse (its abs errors + 1): a flag finds a real gap
  GapScenario("UTKFace races, alike", UTKFACE_RACE_SIZES, ("half_normal",) * 5),
  GapScenario(
    "UTKFace races, smallest narrowest",
    UTKFACE_RACE_SIZES,
    ("exponential", "half_normal", "gamma_half", "half_normal", "uniform"),
  ),
  GapScenario("30/300/3000, alike", SMALL_LARGE, ("half_normal",) * 3),
)


def simulated_errors(scenario: GapScenario, simulations: int, shift: float, rng: np.random.Generator) -> np.ndarray:
  """abs errors [simulations, sum(sizes)], groups in order; the smallest group's `shift` years worse."""
  smallest = int(np.argmin(scenario.sizes))
  columns = [
    scenario.mae * ERROR_SHAPES[shape](rng, (simulations, size)) + (shift if g == smallest else 0.0)
    for g, (size, shape) in enumerate(zip(scenario.sizes, scenario.shapes))
  ]
  return np.concatenate(columns, axis=1)


def gap_test(
  scenario: GapScenario, shift: float, simulations: int, seed: int = 0, resamples: int = groups.GAP_RESAMPLES
) -> dict[str, Any]:
  """How often the test flags a gap (p < GAP_ALPHA) when the smallest group is `shift` years worse, and how often
  the picked pair's simultaneous interval misses its true difference."""
  rng = np.random.default_rng(seed)
  codes = np.repeat(np.arange(len(scenario.sizes)), scenario.sizes)
  truth = scenario.mae + np.where(np.arange(len(scenario.sizes)) == np.argmin(scenario.sizes), shift, 0.0)
  p, gap, missed = [], [], []
  for start in range(0, simulations, 100):  # 100 simulated splits per device call, each call its own draws
    count = min(100, simulations - start)
    errors = simulated_errors(scenario, count, shift, rng)
    test = groups.max_t_test(errors, codes, np.unique(codes), seed + start, resamples)
    high, low = np.argmax(test["mae"], axis=1), np.argmin(test["mae"], axis=1)
    rows = np.arange(count)
    margin = test["critical"] * test["se"][rows, high, low]
    error = test["mae"][rows, high] - test["mae"][rows, low] - (truth[high] - truth[low])
    p.append(test["p_value"])
    gap.append(test["mae"][rows, high] - test["mae"][rows, low])
    missed.append(np.abs(error) > margin)
  rate, miss = float(np.mean(np.concatenate(p) < groups.GAP_ALPHA)), float(np.mean(np.concatenate(missed)))
  return {
    "scenario": scenario.name,
    "sizes": "/".join(map(str, scenario.sizes)),
    "shapes": "/".join(scenario.shapes),
    "shift_years": shift,
    "simulations": simulations,
    "resamples": resamples,
    "flag_rate": rate,
    "flag_rate_se": float(np.sqrt(rate * (1 - rate) / simulations)),
    "mean_gap": float(np.mean(np.concatenate(gap))),
    "interval_miss_rate": miss,
    "interval_miss_rate_se": float(np.sqrt(miss * (1 - miss) / simulations)),
    "device": jax.devices()[0].device_kind,
  }


UTKFACE_VALIDATION = 2370  # faces in UTKFace's validation split (the interval masses' fit)


def _fixed_sigma_population(n: int, rng: np.random.Generator, model_sigma: float = 4.0) -> tuple[jax.Array, jax.Array]:
  """Logits of a fixed-std model over a population whose error grows with age (sd 1.5 + 0.08 age), and the ages."""
  shares = (0.1, 1 / 6, 0.5)  # ages 1-3, 4-17, 18-59; the rest 60-94
  sizes = [int(n * s) for s in shares]
  ages = np.concatenate(
    [rng.integers(1, 4, sizes[0]), rng.integers(4, 18, sizes[1]), rng.integers(18, 60, sizes[2])]
    + [rng.integers(60, 95, n - sum(sizes))]
  ).astype(np.float64)
  centre = ages + rng.normal(0.0, 1.5 + 0.08 * ages)
  bins = labels.age_bins(1, 100).astype(np.float64)
  logits = -0.5 * ((bins[None] - centre[:, None]) / model_sigma) ** 2
  return jnp.asarray(logits, jnp.float32), jnp.asarray(ages, jnp.float32)


def coverage_by_age(
  n_test: int = 20_000, n_validation: int = UTKFACE_VALIDATION, seed: int = 0, repeats: int = 10
) -> dict[str, Any]:
  """Coverage of the 90% interval as shown, by age bucket, for a fixed-std model whose error grows with age.

  One temperature fitted on validation (no adjustment) against the interval adjusted per age bucket
  (calibration.fit: split conformal by the true age's bucket), both scored on a test sample; each of
  `repeats` draws a new validation and test sample. Per method and bucket: the mean, std, min and
  max over the repeats, and the share of repeats within 0.85-0.95.
  """
  rng = np.random.default_rng(seed)
  bins = jnp.asarray(labels.age_bins(1, 100))
  draws: dict[str, list[dict[str, float]]] = {"one_temperature": [], "adjusted_by_bucket": []}
  temperatures = []
  for _ in range(repeats):
    logits, ages = _fixed_sigma_population(n_validation, rng)
    fitted = calibration.fit(logits, bins, ages)
    temperatures.append(fitted["temperature"])
    test_logits, test_ages = _fixed_sigma_population(n_test, rng)
    for name, c in (
      ("one_temperature", calibration.Calibration(fitted["temperature"])),
      ("adjusted_by_bucket", calibration.Calibration.from_fit(fitted)),
    ):
      report = calibration.report(test_logits, labels.tempered(test_logits, bins, c.temperature), bins, test_ages, c)
      draws[name].append(
        {
          "overall": report["coverage_shown"]["0.9"],
          **{bucket: entry["coverage_shown"]["0.9"] for bucket, entry in report["coverage_by_bucket"].items()},
        }
      )
  out: dict[str, Any] = {
    "n_validation": n_validation,
    "n_test": n_test,
    "repeats": repeats,
    "temperature_mean": float(np.mean(temperatures)),
  }
  for name, rows in draws.items():
    out[name] = {}
    for bucket in rows[0]:
      v = np.asarray([row[bucket] for row in rows])
      out[name][bucket] = {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "within_0.85_0.95": float(np.mean((v >= 0.85) & (v <= 0.95))),
      }
  return out
