"""Simulations where the truth is known, for the statistics every report prints (`benchmark.py statistics`).

- Coverage: ages drawn from discretised Gaussians that are exactly the predicted distributions; a
  calibrated report's coverage of each mass should be that mass.
- The largest group gap: five groups with UTKFace's validation race sizes whose errors come from one
  distribution (no real gap: how often is one flagged?), and the same with one group 1 year worse
  (how often is it found?).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax import labels
from agejax.evaluation import calibration, groups

UTKFACE_RACE_SIZES = (1000, 450, 355, 400, 165)  # white, black, asian, indian, others of 2,370 faces
ERROR_STD = 6.27  # |N(0, 6.27)| errors: an MAE of 5 years


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


def gap_test(shift: float, simulations: int, seed: int = 0, permutations: int = groups.PERMUTATIONS) -> dict[str, Any]:
  """How often the report flags the largest gap (p < GAP_ALPHA) when the last group's errors are `shift` years worse."""
  rng = np.random.default_rng(seed)
  codes = np.repeat(np.arange(len(UTKFACE_RACE_SIZES)), UTKFACE_RACE_SIZES)
  p_values = []
  for start in range(0, simulations, 100):  # 100 simulated validation splits per device call
    count = min(100, simulations - start)
    errors = np.abs(rng.normal(0, ERROR_STD, (count, codes.size))) + np.where(codes == codes.max(), shift, 0.0)
    p_values.append(groups.gap_p_values(errors, codes, np.unique(codes), seed + start, permutations))
  p = np.concatenate(p_values)
  rate = float(np.mean(p < groups.GAP_ALPHA))
  return {
    "shift_years": shift,
    "simulations": simulations,
    "permutations": permutations,
    "flag_rate": rate,
    "flag_rate_se": float(np.sqrt(rate * (1 - rate) / simulations)),
    "mean_p": float(np.mean(p)),
    "n": int(codes.size),
    "device": jax.devices()[0].device_kind,
  }
