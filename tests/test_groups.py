"""Error by group of people against hand-computed values, and the bootstrap's intervals."""

import numpy as np
import pytest

from agejax import groups


def small_set():
  """Eight labelled predictions in two groupings, one with an empty group."""
  pred = np.array([20.0, 31.0, 44.0, 18.0, 60.0, 25.0, 39.0, 70.0])
  age = np.array([22.0, 30.0, 40.0, 18.0, 50.0, 27.0, 41.0, 66.0])
  gender = (np.array([0, 1, 0, 2, 1, 0, 1, 0]), ("male", "female", "unknown"))
  race = (np.array([0, 0, 1, 1, 2, 2, 0, 1]), ("white", "black", "asian", "others"))
  return pred, age, {"gender": gender, "race": race}


def test_group_metrics_equal_hand_computed_values():
  pred, age, groupings = small_set()
  out = groups.report(pred, age, groupings, resamples=100)["groups"]
  # gender: male = examples 0, 2, 5, 7: errors -2, +4, -2, +4
  male = out["gender"]["male"]
  assert male["count"] == 4
  assert male["mae"] == pytest.approx((2 + 4 + 2 + 4) / 4)
  assert male["mean_error"] == pytest.approx((-2 + 4 - 2 + 4) / 4)
  assert male["cs5"] == pytest.approx(1.0)
  female = out["gender"]["female"]  # examples 1, 4, 6: errors +1, +10, -2
  assert (female["count"], female["mae"], female["mean_error"], female["cs5"]) == pytest.approx(
    (3, 13 / 3, 9 / 3, 2 / 3)
  )
  assert out["gender"]["unknown"]["count"] == 1 and out["gender"]["unknown"]["mae"] == 0.0
  assert out["race"]["others"] == {"count": 0, "mae": None, "mean_error": None, "cs5": None, "mae_ci95": None}
  for grouping, (codes, names) in groupings.items():  # every example in exactly one group
    counts = [out[grouping][name]["count"] for name in names]
    assert counts == [int(np.sum(codes == i)) for i in range(len(names))]
    assert sum(counts) == len(age)


def test_bootstrap_interval_is_reproducible_and_contains_the_estimate():
  rng = np.random.default_rng(0)
  n = 3000
  age = rng.uniform(1, 90, n)
  codes = rng.integers(0, 3, n)
  pred = age + rng.normal(0, 1.0 + 2.0 * codes)  # the groups really differ: MAE ~0.8, ~2.4, ~4.0
  groupings = {"g": (codes, ("a", "b", "c"))}
  first = groups.report(pred, age, groupings, seed=7)
  again = groups.report(pred, age, groupings, seed=7)
  other = groups.report(pred, age, groupings, seed=8)
  assert first == again
  assert first["groups"]["g"]["a"]["mae_ci95"] != other["groups"]["g"]["a"]["mae_ci95"]
  for name, entry in first["groups"]["g"].items():
    low, high = entry["mae_ci95"]
    assert low < entry["mae"] < high, name
    # ~ the normal approximation's half-width: 1.96 * std(|error|) / sqrt(count)
    errors = np.abs(pred - age)[codes == "abc".index(name)]
    assert (high - low) / 2 == pytest.approx(1.96 * errors.std() / np.sqrt(len(errors)), rel=0.25)
  gap = first["largest_gaps"]["g"]
  assert (gap["high"], gap["low"]) == ("c", "a")
  assert gap["gap_ci95"][0] < gap["gap"] < gap["gap_ci95"][1]
  assert gap["gap_ci95"][0] > 0  # a real difference: the interval excludes 0


def test_largest_gap_ignores_unknown_and_small_groups():
  rng = np.random.default_rng(1)
  n = 500
  age = rng.uniform(1, 90, n)
  codes = np.where(np.arange(n) < 10, 2, np.arange(n) % 2)  # "unknown": 10 examples
  pred = age + np.where(codes == 2, 30.0, rng.normal(0, 2, n))
  out = groups.report(pred, age, {"gender": (codes, ("male", "female", "unknown"))}, resamples=100)
  assert out["largest_gaps"]["gender"]["high"] != "unknown"
  assert out["groups"]["gender"]["unknown"]["mae"] == pytest.approx(30.0)
  assert groups.largest_gap({"male": {"count": 5, "mae": 1.0}}, {}) is None
