"""Error by group of people: count, MAE, signed error and CS@5 per group, with seeded bootstrap intervals.

Each grouping (gender, race, age group, ...) assigns every example exactly one group. The bootstrap
resamples the whole split with replacement (so group sizes vary between replicates, as they would
in a new sample of people) and reads each group's MAE off every replicate; the 2.5th and 97.5th
percentiles of those MAEs are its 95% interval.

The largest gap between groups is picked from the data (the worst minus the best group), so it is
never below 0 and overstates the truth: five groups of UTKFace's sizes that err alike show about
half a year. Whether the groups' MAEs differ at all is a test of equal MAE (`max_t_test`): the
largest Welch-type |t| over all pairs of groups (of their log MAE ratio), calibrated by a bootstrap
of each group from its own errors, so unequal spreads or shapes alone are not a gap. The gap's
interval comes from the same bootstrap: simultaneous 95% intervals of every pair's difference, so
the picked pair's holds despite the picking. The p-values of all the groupings in one report are
adjusted together by Holm's step-down method: the chance that any "a real gap" of a report is
wrong is at most 5%.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax import metrics

RESAMPLES = 1000
SEED = 0
MIN_GAP_COUNT = 20  # groups smaller than this are reported but not ranked for the largest gap
GAP_RESAMPLES = 1000  # bootstrap replicates of the equal-MAE test: p-values in steps of 1/1001
GAP_ALPHA = 0.05  # a gap whose Holm-adjusted p-value is below this is reported as one
_TINY = 1e-30  # a group's MAE of 0 has a log
_BLOCK = 50  # bootstrap replicates drawn at once: [_BLOCK, N] weights stay small on the device
_COLUMNS = 32  # bootstrap_means pads its columns to a multiple of this (one compilation for most tables)

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


def bootstrap_means(
  values: np.ndarray, one_hot: np.ndarray, *, seed: int = SEED, resamples: int = RESAMPLES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each column's count, mean of the non-negative `values` [N] and bootstrap replicate means [R, G] (`report`'s).

  The columns of one_hot [N, G] mark any sets of examples (they may overlap): a rate is the mean of
  a 0/1 indicator over its denominator's column. A replicate without a column's examples has NaN there.
  """
  if resamples % _BLOCK:
    raise ValueError(f"resamples={resamples} must be a multiple of {_BLOCK}")
  one_hot = np.asarray(one_hot, np.float32)
  g = one_hot.shape[1]
  # Empty columns up to a multiple of _COLUMNS: the callers' few table shapes share one compilation.
  padded = np.pad(one_hot, ((0, 0), (0, -g % _COLUMNS)))
  device_values = jnp.asarray(values, jnp.float32)
  sums, replicates = _group_sums(
    device_values, jnp.zeros_like(device_values), jnp.asarray(padded), jax.random.key(seed), resamples
  )
  count = np.asarray(metrics.fetch_array(sums["count"]), np.float64)[:g]
  total = np.asarray(metrics.fetch_array(sums["abs_error"]), np.float64)[:g]
  mean = np.where(count > 0, total / np.maximum(count, 1.0), np.nan)
  return count, mean, np.asarray(metrics.fetch_array(replicates), np.float64)[:, :g]


def _max_abs_t(estimate, variance, count):
  """Welch's |t| of every pair of groups and its maximum over pairs.

  Args:
    estimate: [..., G] each group's estimate minus its value under test (a difference of two is
      tested against 0).
    variance: [..., G] the variance of one example's contribution (n - 1 divisor).
    count: [G] examples per group.

  Returns:
    (max |t| over pairs [...], the pairwise standard errors sqrt(v_i / n_i + v_j / n_j) [..., G, G]);
    a pair without spread has |t| infinite if its estimates differ and 0 if they are equal.
  """
  se = jnp.sqrt(variance[..., :, None] / count[:, None] + variance[..., None, :] / count[None, :])
  diff = jnp.abs(estimate[..., :, None] - estimate[..., None, :])
  t = jnp.where(diff > 0, diff / jnp.where(se > 0, se, 1.0), 0.0)
  t = jnp.where((se > 0) | (diff == 0), t, jnp.inf)
  return jnp.max(t, axis=(-2, -1)), se


@functools.partial(jax.jit, static_argnames=("resamples", "alpha"))
def _max_t_test(abs_errors, one_hot, low, high, key, resamples: int, alpha: float):
  """The equal-MAE test of each row of abs errors [S, N], the examples sorted by group (one_hot [N, G]).

  The test's statistic is the largest |t| of the groups' log MAE ratios (delta-method standard errors
  sqrt(v_i / (n_i m_i^2) + v_j / (n_j m_j^2))); the intervals in years use the MAE differences' |t|
  (sqrt(v_i / n_i + v_j / n_j)). Each replicate resamples every group from its own examples (example i
  from positions [low_i, high_i)) and measures each pair against its observed value: the bootstrap-t
  max-t of Westfall & Young, whose null has every group's MAE equal and its spread and shape as observed.
  One set of resampling indices serves every row of a call: each row's p-value is a bootstrap p-value
  of its own errors, and rows of independent data stay independent but for which of their examples a
  replicate draws together (calls with another seed redraw the indices).
  """
  count = jnp.sum(one_hot, axis=0)
  mae = abs_errors @ one_hot / count  # [S, G]
  centred = abs_errors - mae @ one_hot.T  # sums of squares without float32 cancellation
  variance = (centred * centred) @ one_hot / (count - 1)
  log_mae = jnp.log(jnp.maximum(mae, _TINY))
  _, se = _max_abs_t(mae, variance, count)
  observed, se_log = _max_abs_t(log_mae, variance / jnp.maximum(mae, _TINY) ** 2, count)

  def block(key):  # _BLOCK replicates of every row
    index = jax.random.randint(key, (_BLOCK, abs_errors.shape[1]), low, high)
    drawn = centred[:, index]  # [S, _BLOCK, N]
    shift = drawn @ one_hot / count  # each group's replicate MAE minus its observed MAE
    var = ((drawn * drawn) @ one_hot - count * shift * shift) / (count - 1)
    years = _max_abs_t(shift, var, count)[0]
    replicate = jnp.maximum(mae[:, None] + shift, _TINY)
    ratio = _max_abs_t(jnp.log(replicate) - log_mae[:, None], var / replicate**2, count)[0]
    return years, ratio  # [S, _BLOCK] each

  years, ratio = jax.lax.map(block, jax.random.split(key, resamples // _BLOCK))  # [R / _BLOCK, S, _BLOCK]
  years, ratio = (jnp.moveaxis(x, 1, 0).reshape(abs_errors.shape[0], resamples) for x in (years, ratio))
  # An exact tie (e.g. a gap of exactly 0 drawn again) counts as at least as large; float32 rounding aside.
  exceed = jnp.sum(ratio >= observed[:, None] - 1e-6 * observed[:, None], axis=1)
  rank = min(math.ceil((1 - alpha) * (resamples + 1)), resamples) - 1  # bootstrap-t: T > it iff p < alpha
  return {
    "mae": mae,
    "t_max": observed,
    "exceed": exceed,
    "se_log": se_log,
    "critical_log": jnp.sort(ratio, axis=1)[:, rank],
    "se": se,
    "critical": jnp.sort(years, axis=1)[:, rank],
  }


def max_t_test(
  abs_errors: np.ndarray,
  codes: np.ndarray,
  ranked: np.ndarray,
  seed: int = SEED,
  resamples: int = GAP_RESAMPLES,
  alpha: float = GAP_ALPHA,
) -> dict[str, np.ndarray]:
  """The test of equal MAE across the `ranked` groups, for each row of abs errors [S, N] (many simulations in one call).

  The statistic is the largest |t| over all pairs of ranked groups of the log of their MAE ratio, over
  its Welch-type standard error sqrt(cv_i^2 / n_i + cv_j^2 / n_j) (cv: a group's abs errors' std over
  their mean). It is calibrated by a bootstrap of each group from its own abs errors, each pair's
  replicate |t| measured from the pair's observed ratio (Westfall & Young's bootstrap max-t): the null
  of equal MAE, each group's spread and skew as observed. So the test asks whether the MAEs differ,
  not whether the errors' distributions do. On the log scale a small, skewed group's |t| is closer to
  its bootstrap's than in years (for gamma-shaped errors the mean and the cv are independent), which
  holds the level where the same test in years flagged a group of 30 with the widest errors too often
  (docs/testing.md). Only examples of ranked groups take part.

  Returns:
    host arrays: mae [S, G] (in the order of `ranked`); t_max [S]; p_value [S] ((1 + replicates at
    least as large) / (1 + resamples)); se_log [S, G, G] and critical_log [S]: every pair's log MAE
    ratio lies within `critical_log` of its standard errors of the truth at once with probability
    1 - alpha (an interval excludes 0 for the pair of the largest |t| exactly when p < alpha); se [S,
    G, G] and critical [S]: the same for the MAE differences in years, from the same replicates.
  """
  if resamples % _BLOCK:
    raise ValueError(f"resamples={resamples} must be a multiple of {_BLOCK}")
  ranked = np.asarray(ranked)
  keep = np.flatnonzero(np.isin(codes, ranked))
  group = np.argmax(np.asarray(codes)[keep, None] == ranked[None], axis=1)  # index into ranked
  order = np.argsort(group, kind="stable")  # each group's examples side by side, in the data's order
  keep, group = keep[order], group[order]
  sizes = np.bincount(group, minlength=len(ranked))
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  one_hot = jnp.asarray(group[:, None] == np.arange(len(ranked))[None], jnp.float32)
  errors = jnp.asarray(np.atleast_2d(abs_errors)[:, keep], jnp.float32)
  low, high = jnp.asarray(starts[group], jnp.int32), jnp.asarray((starts + sizes)[group], jnp.int32)
  out = _max_t_test(errors, one_hot, low, high, jax.random.key(seed), resamples, alpha)
  host = {k: np.asarray(metrics.fetch_array(v), np.float64) for k, v in out.items()}
  host["p_value"] = (1 + host.pop("exceed")) / (1 + resamples)
  return host


def gap_p_values(
  abs_errors: np.ndarray, codes: np.ndarray, ranked: np.ndarray, seed: int = SEED, resamples: int = GAP_RESAMPLES
) -> np.ndarray:
  """p-values [S] of `max_t_test` (equal MAE across the `ranked` groups) for each row of abs errors [S, N]."""
  return max_t_test(abs_errors, codes, ranked, seed, resamples)["p_value"]


def holm(p_values: list[float]) -> list[float]:
  """Holm's step-down adjusted p-values: reject those below alpha and the family-wise error rate is at most alpha.

  The k-th smallest p-value of m is multiplied by m - k + 1, capped at 1, and made non-decreasing
  in that order.
  """
  m = len(p_values)
  adjusted = [0.0] * m
  running = 0.0
  for k, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
    running = max(running, min(1.0, (m - k) * p_values[i]))
    adjusted[i] = running
  return adjusted


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
    seed: the bootstraps' random seed; the same seed gives the same intervals and p-values.
    resamples: bootstrap replicates of the groups' intervals (a multiple of 50).

  Returns:
    {"groups": {...}, "largest_gaps": {grouping: gap or None}} (see `largest_gap`; the gaps' p-values
    are Holm-adjusted over every grouping that has one); a group without examples has count 0 and
    null metrics.
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
  gaps = {grouping: largest_gap(abs_error, codes, names, seed) for grouping, (codes, names) in groupings.items()}
  tested = {grouping: gap for grouping, gap in gaps.items() if gap is not None}
  for gap, adjusted in zip(tested.values(), holm([gap["p_value"] for gap in tested.values()])):
    gap.update(p_value_holm=adjusted, significant=adjusted < GAP_ALPHA, groupings_tested=len(tested))
  return {"groups": out, "largest_gaps": gaps}


def largest_gap(
  abs_error: np.ndarray, codes: np.ndarray, names: tuple[str, ...], seed: int = SEED
) -> dict[str, Any] | None:
  """The worst and best of a grouping's known groups of >= MIN_GAP_COUNT examples, and the test of equal MAE.

  Returns:
    None with fewer than two such groups, else {high, low: the groups of the highest and lowest MAE;
    gap: their MAE difference as observed (picked as the largest, so it overstates the truth);
    gap_ci95: its simultaneous 95% interval, in years (every pair's difference lies within its
    interval at once with probability 95%, so the picked pair's holds despite the picking; it may
    reach below 0); mae_ratio, mae_ratio_ci95: the high group's MAE over the low one's with its
    simultaneous 95% interval, on the scale of the test; p_value: `max_t_test`'s (equal MAE in every
    ranked group); significant: p_value < GAP_ALPHA (`report` decides it over all its groupings);
    ranked: the groups tested}.
  """
  codes = np.asarray(codes)
  counts = np.bincount(codes, minlength=len(names))
  ranked = [i for i, name in enumerate(names) if name != "unknown" and counts[i] >= MIN_GAP_COUNT]
  if len(ranked) < 2:
    return None
  test = {k: v[0] for k, v in max_t_test(abs_error, codes, np.array(ranked), seed).items()}
  mae = np.bincount(codes, abs_error, len(names))[ranked] / counts[ranked]  # float64, as the groups' entries
  high, low = int(np.argmax(mae)), int(np.argmin(mae))
  gap, margin = mae[high] - mae[low], test["critical"] * test["se"][high, low]
  mae_ratio: float | None = None  # none to a group without errors
  mae_ratio_ci95: list[float] | None = None
  if mae[low] > 0:
    log_ratio, log_margin = np.log(mae[high] / mae[low]), test["critical_log"] * test["se_log"][high, low]
    mae_ratio = float(np.exp(log_ratio))
    mae_ratio_ci95 = [float(np.exp(log_ratio - log_margin)), float(np.exp(log_ratio + log_margin))]
  return {
    "high": names[ranked[high]],
    "low": names[ranked[low]],
    "gap": float(gap),
    "gap_ci95": [float(gap - margin), float(gap + margin)],
    "mae_ratio": mae_ratio,
    "mae_ratio_ci95": mae_ratio_ci95,
    "p_value": float(test["p_value"]),
    "significant": bool(test["p_value"] < GAP_ALPHA),
    "ranked": [names[i] for i in ranked],
  }


def format_gaps(gaps: dict[str, dict | None], groups: dict[str, dict]) -> list[str]:
  """Lines naming each grouping's largest MAE gap with the two groups' intervals, and what its level means."""
  tested = sum(gap is not None for gap in gaps.values())
  lines = []
  if tested:
    lines.append(
      f"    (p: the test of equal MAE in a grouping's ranked groups; 'a real gap': below {GAP_ALPHA} after Holm's "
      f"adjustment over the {tested} grouping{'s' * (tested > 1)} here, so any of them is wrong at most "
      f"{GAP_ALPHA:.0%} of the time; interval: simultaneous 95% over all pairs, valid for the picked worst and best)"
    )
  for grouping, gap in gaps.items():
    if gap is None:
      lines.append(f"    {grouping}: fewer than two groups of >= {MIN_GAP_COUNT} examples")
      continue
    hi, lo = groups[grouping][gap["high"]], groups[grouping][gap["low"]]
    p = f"p={gap['p_value']:.3f}"
    if "p_value_holm" in gap:
      p += f" (Holm {gap['p_value_holm']:.3f})"
    verdict = p + (", a real gap" if gap["significant"] else ", no evidence of a gap")
    lines.append(
      f"    {grouping}: {gap['gap']:.2f} years [{gap['gap_ci95'][0]:.2f}, {gap['gap_ci95'][1]:.2f}] {verdict}  "
      f"{gap['high']} {hi['mae']:.2f} [{hi['mae_ci95'][0]:.2f}, {hi['mae_ci95'][1]:.2f}] vs "
      f"{gap['low']} {lo['mae']:.2f} [{lo['mae_ci95'][0]:.2f}, {lo['mae_ci95'][1]:.2f}]"
    )
  return lines
