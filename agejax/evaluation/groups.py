"""Error by group of people: count, MAE, signed error and CS@5 per group, with seeded bootstrap intervals.

Each grouping (gender, race, age group, ...) assigns every example exactly one group. The bootstrap
resamples the whole split with replacement (so group sizes vary between replicates, as they would
in a new sample of people) and reads each group's MAE off every replicate; the 2.5th and 97.5th
percentiles of those MAEs are its 95% interval.

The largest gap between groups is picked from the data, so a fixed-pair interval of it finds gaps
where there are none (29% of null simulations excluded 0 at UTKFace's size). Its p-value comes from
a permutation test of the same selection: the largest gap of the groups' MAEs after shuffling the
errors across the ranked groups, against the one observed. Its interval re-picks the worst and the
best group in every bootstrap replicate.
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
PERMUTATIONS = 1000  # of the largest-gap test: p-values in steps of 1/1001
GAP_ALPHA = 0.05  # a gap whose p-value is below this is reported as one
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


@functools.partial(jax.jit, static_argnames=("permutations",))
def _p_values(abs_errors, one_hot, key, permutations: int):
  """Permutation p-values [S] of the largest group-MAE gap of each row of errors [S, N] (groups: one_hot [N, G])."""
  counts = jnp.sum(one_hot, axis=0)
  gap = lambda mae: jnp.max(mae, axis=-1) - jnp.min(mae, axis=-1)  # noqa: E731
  observed = gap(abs_errors @ one_hot / counts)  # [S]

  def block(key):  # _BLOCK shuffles of every row
    keys = jax.random.split(key, _BLOCK)
    shuffled = jax.vmap(lambda k: jax.random.permutation(k, abs_errors, axis=1, independent=True))(keys)
    return gap(shuffled @ one_hot / counts)  # [_BLOCK, S]

  null = jax.lax.map(block, jax.random.split(key, permutations // _BLOCK)).reshape(-1, abs_errors.shape[0])
  # An exact tie (the observed order drawn again) counts as at least as large; float32 rounding aside.
  exceed = jnp.sum(null >= observed - 1e-6 * jnp.abs(observed), axis=0)
  return (1 + exceed) / (1 + permutations)


def gap_p_values(
  abs_errors: np.ndarray, codes: np.ndarray, ranked: np.ndarray, seed: int = SEED, permutations: int = PERMUTATIONS
) -> np.ndarray:
  """Permutation p-values of the largest MAE gap between the `ranked` groups, for each row of errors [S, N].

  Only examples of ranked groups take part; shuffling their errors keeps every group's size, and
  each shuffle's statistic re-picks the worst and best group, as the reported gap was picked. Many
  rows (simulations) run in one call.
  """
  keep = np.isin(codes, ranked)
  one_hot = jnp.asarray(codes[keep][:, None] == np.asarray(ranked)[None], jnp.float32)
  errors = jnp.asarray(np.atleast_2d(abs_errors)[:, keep], jnp.float32)
  return np.asarray(metrics.fetch_array(_p_values(errors, one_hot, jax.random.key(seed), permutations)))


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
  host = lambda x: np.asarray(metrics.fetch_array(jnp.asarray(x)), np.float64)  # noqa: E731  (works on every process)
  abs_error = np.abs(host(pred) - host(age))
  gaps = {}
  for grouping, (codes, group_names) in groupings.items():
    columns = {g: replicate_mae[:, names.index((grouping, g))] for g in out[grouping]}
    gap = largest_gap(out[grouping], columns)
    if gap is not None:
      ranked = np.array([group_names.index(g) for g in gap.pop("ranked")])
      gap["p_value"] = float(gap_p_values(abs_error, np.asarray(codes), ranked, seed)[0])
      gap["significant"] = gap["p_value"] < GAP_ALPHA
    gaps[grouping] = gap
  return {"groups": out, "largest_gaps": gaps}


def largest_gap(groups: dict[str, dict], replicates: dict[str, np.ndarray]) -> dict[str, Any] | None:
  """The largest MAE difference between two known groups of >= MIN_GAP_COUNT examples, with its 95% interval.

  The interval re-picks the worst and best of the ranked groups in each bootstrap replicate (the
  largest gap is never below 0: whether there is one at all is `report`'s permutation p-value).
  `ranked` names the groups that took part.
  """
  ranked = {g: v for g, v in groups.items() if g != "unknown" and v["count"] >= MIN_GAP_COUNT}
  if len(ranked) < 2:
    return None
  high = max(ranked, key=lambda g: ranked[g]["mae"])
  low = min(ranked, key=lambda g: ranked[g]["mae"])
  columns = np.stack([replicates[g] for g in ranked], axis=1)  # [R, ranked groups]
  repicked = np.nanmax(columns, axis=1) - np.nanmin(columns, axis=1)
  return {
    "high": high,
    "low": low,
    "gap": ranked[high]["mae"] - ranked[low]["mae"],
    "gap_ci95": [float(v) for v in np.nanpercentile(repicked, [2.5, 97.5])],
    "ranked": list(ranked),
  }


def format_gaps(gaps: dict[str, dict | None], groups: dict[str, dict]) -> list[str]:
  """Lines naming each grouping's largest MAE gap with the two groups' intervals."""
  lines = []
  for grouping, gap in gaps.items():
    if gap is None:
      lines.append(f"    {grouping}: fewer than two groups of >= {MIN_GAP_COUNT} examples")
      continue
    hi, lo = groups[grouping][gap["high"]], groups[grouping][gap["low"]]
    verdict = f"p={gap['p_value']:.3f}" + (", a real gap" if gap["significant"] else ", no evidence of a gap")
    lines.append(
      f"    {grouping}: {gap['gap']:.2f} years [{gap['gap_ci95'][0]:.2f}, {gap['gap_ci95'][1]:.2f}] {verdict}  "
      f"{gap['high']} {hi['mae']:.2f} [{hi['mae_ci95'][0]:.2f}, {hi['mae_ci95'][1]:.2f}] vs "
      f"{gap['low']} {lo['mae']:.2f} [{lo['mae_ci95'][0]:.2f}, {lo['mae_ci95'][1]:.2f}]"
    )
  return lines
