"""Error by group of people: count, MAE, signed error and CS@5 per group, with seeded bootstrap intervals.

Each grouping (gender, race, age group, ...) assigns every example exactly one group. The bootstrap
resamples the whole split with replacement (so group sizes vary between replicates, as they would
in a new sample of people) and reads each group's MAE off every replicate; the 2.5th and 97.5th
percentiles of those MAEs are its 95% interval.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax import metrics

RESAMPLES = 1000
SEED = 0
MIN_GAP_COUNT = 20  # groups smaller than this are reported but not ranked for the largest gap
_BLOCK = 50  # bootstrap replicates drawn at once: [_BLOCK, N] weights stay small on the device

Groupings = dict[str, tuple[np.ndarray, tuple[str, ...]]]  # name -> (code per example, group names)


@functools.partial(jax.jit, static_argnames=("resamples",))
def _group_sums(pred, age, one_hot, key, resamples: int):
  """Per-group sums of the point estimates and the per-replicate MAEs [R, G] (one compiled call)."""
  error = pred - age
  sums = {
    "count": jnp.sum(one_hot, axis=0),
    "abs_error": jnp.sum(one_hot * jnp.abs(error)[:, None], axis=0),
    "error": jnp.sum(one_hot * error[:, None], axis=0),
    "cs5": jnp.sum(one_hot * metrics.cumulative_score(pred, age, 5.0)[:, None], axis=0),
  }
  n = age.shape[0]
  weighted = jnp.concatenate([one_hot * jnp.abs(error)[:, None], one_hot], axis=1)  # [N, 2G]

  def block(key):
    index = jax.random.randint(key, (_BLOCK, n), 0, n)
    weights = jax.vmap(lambda i: jnp.bincount(i, length=n))(index).astype(jnp.float32)  # a multinomial draw
    return weights @ weighted

  per_block = jax.lax.map(block, jax.random.split(key, resamples // _BLOCK))
  replicates = per_block.reshape(-1, weighted.shape[1])
  g = one_hot.shape[1]
  # A group absent from a replicate has no MAE there: NaN, left out of its percentiles.
  mae = jnp.where(replicates[:, g:] > 0, replicates[:, :g] / jnp.maximum(replicates[:, g:], 1.0), jnp.nan)
  return sums, mae


def report(
  pred: jax.Array,
  age: jax.Array,
  groupings: Groupings,
  *,
  seed: int = SEED,
  resamples: int = RESAMPLES,
) -> dict[str, Any]:
  """Returns {grouping: {group: {count, mae, mean_error, cs5, mae_ci95}}} and each grouping's largest MAE gap.

  Args:
    pred: [N] predicted ages (on the device or the host).
    age: [N] true ages.
    groupings: name -> (int code per example in [0, len(names)), group names).
    seed: the bootstrap's random seed; the same seed gives the same intervals.
    resamples: bootstrap replicates (a multiple of 50).

  Returns:
    {"groups": {...}, "largest_gaps": {grouping: gap or None}}; a group without examples has count 0
    and null metrics.
  """
  if resamples % _BLOCK:
    raise ValueError(f"resamples={resamples} must be a multiple of {_BLOCK}")
  names = [(grouping, group) for grouping, (_, groups) in groupings.items() for group in groups]
  one_hot = jnp.concatenate(
    [jax.nn.one_hot(jnp.asarray(codes), len(groups), dtype=jnp.float32) for codes, groups in groupings.values()],
    axis=1,
  )
  sums, replicate_mae = _group_sums(
    jnp.asarray(pred, jnp.float32), jnp.asarray(age, jnp.float32), one_hot, jax.random.key(seed), resamples
  )
  sums = {k: np.asarray(metrics.fetch_array(v), np.float64) for k, v in sums.items()}
  replicate_mae = np.asarray(metrics.fetch_array(replicate_mae), np.float64)
  out: dict[str, dict[str, dict]] = {grouping: {} for grouping in groupings}
  for j, (grouping, group) in enumerate(names):
    count = int(sums["count"][j])
    entry: dict[str, Any] = {"count": count, "mae": None, "mean_error": None, "cs5": None, "mae_ci95": None}
    if count:
      column = replicate_mae[:, j]
      entry.update(
        mae=sums["abs_error"][j] / count,
        mean_error=sums["error"][j] / count,
        cs5=sums["cs5"][j] / count,
        mae_ci95=[float(v) for v in np.nanpercentile(column, [2.5, 97.5])],
      )
    out[grouping][group] = entry
  gaps = {
    grouping: largest_gap(out[grouping], {g: replicate_mae[:, names.index((grouping, g))] for g in out[grouping]})
    for grouping in groupings
  }
  return {"groups": out, "largest_gaps": gaps}


def largest_gap(groups: dict[str, dict], replicates: dict[str, np.ndarray]) -> dict[str, Any] | None:
  """The largest MAE difference between two known groups of >= MIN_GAP_COUNT examples, with its 95% interval."""
  ranked = {g: v for g, v in groups.items() if g != "unknown" and v["count"] >= MIN_GAP_COUNT}
  if len(ranked) < 2:
    return None
  high = max(ranked, key=lambda g: ranked[g]["mae"])
  low = min(ranked, key=lambda g: ranked[g]["mae"])
  difference = replicates[high] - replicates[low]
  return {
    "high": high,
    "low": low,
    "gap": ranked[high]["mae"] - ranked[low]["mae"],
    "gap_ci95": [float(v) for v in np.nanpercentile(difference, [2.5, 97.5])],
  }


def format_gaps(gaps: dict[str, dict | None], groups: dict[str, dict]) -> list[str]:
  """Lines naming each grouping's largest MAE gap with the two groups' intervals."""
  lines = []
  for grouping, gap in gaps.items():
    if gap is None:
      lines.append(f"    {grouping}: fewer than two groups of >= {MIN_GAP_COUNT} examples")
      continue
    hi, lo = groups[grouping][gap["high"]], groups[grouping][gap["low"]]
    lines.append(
      f"    {grouping}: {gap['gap']:.2f} years [{gap['gap_ci95'][0]:.2f}, {gap['gap_ci95'][1]:.2f}]  "
      f"{gap['high']} {hi['mae']:.2f} [{hi['mae_ci95'][0]:.2f}, {hi['mae_ci95'][1]:.2f}] vs "
      f"{gap['low']} {lo['mae']:.2f} [{lo['mae_ci95'][0]:.2f}, {lo['mae_ci95'][1]:.2f}]"
    )
  return lines
