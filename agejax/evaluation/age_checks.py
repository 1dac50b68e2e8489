"""Age checks on a labelled split: the error rates of "under T?" rules, NIST's way, and a threshold for a stated error.

Definitions (NIST, Face Analysis Technology Evaluation (FATE) Age Estimation and Verification,
NIST IR 8525 and its results page pages.nist.gov/frvt/html/frvt_age_estimation.html). The estimate
is the point prediction (the raw model's expected age); ages are whole years; "estimated at T or
older" is estimate >= T.

- **Challenge-T false positive rate** (T = 21, 25, 30; the "Challenge-25" age-restriction
  application): the fraction of people under 18 (true age) estimated at T or older, i.e. let
  through a "looks under T? then check ID" policy. NIST's photos hold no one under 14, so its
  minors are 14-17; here they are every face under 18 the split has (by age bucket in the rule
  report below).
- **13-16 online access** ("children age 13-16 online chatroom access"): the true positive rate
  is the fraction of people of true age 13-16 estimated within 13-16 (13 <= estimate < 17); the
  false positive rate is the fraction of people outside 13-16 estimated within it. NIST publishes
  the false positive rate for ages 8-12 and 17-22; both are reported beside the rate over everyone
  outside the band.
- **MAE over ages 18-30 averaged over sex**: the unweighted mean of the 26 MAEs of each sex
  (male, female) at each true age 18..30, as NIST's headline MAE ("averages of 26 MAE estimates
  from two sexes and 13 ages"). A split without sex labels gets the mean of the 13 ages' MAEs,
  and says so (`averaged_over`); empty cells are left out and counted.
- Intervals of the rates: 95% percentile bootstrap (NIST's "span 95% of bootstrap estimates"),
  the groups module's bootstrap of the whole split (`groups.bootstrap_means`), by group (gender,
  race, ... as the split has them).

An age check at T (`evaluate.py --age_check 18`) is one of two rules: "pass when P(age < T) <= p"
(P from the calibrated distribution: the mass of the bins below T) or "pass when the estimate >=
T + buffer" (Challenge style). Its false positive rate is the fraction of minors (true age < T)
passed; its false negative rate the fraction of adults (true age >= T) sent to a further check,
also by age bucket.

Choosing the threshold (`choose`): on the validation split, the largest p (the smallest buffer)
whose one-sided 95% Clopper-Pearson upper bound on the minors' false positive rate is at most the
target. Why not "the largest p whose validation rate is at most the target": that rule's true rate
exceeds the target about half of the time (its validation rate is an estimate at the edge). The
bound's guarantee: passing is monotone in p, so if the chosen p's true rate exceeded the target,
the smallest p* whose true rate does would have had a validation count no larger than the chosen
one's, and so a bound at most the target; that happens with probability at most 5% (Clopper-Pearson
is exact-or-conservative for the count of minors at p*), whatever the number of candidates tried.
So the chosen rule's true false positive rate is at most the target with probability >= 95% over
the validation draw (faces exchangeable between validation and deployment). It needs at least
log(0.05) / log(1 - target) minors (299 for 1%); with fewer no p is certified, and the plug-in
choice is reported instead, marked `certified: false`. The chosen rule is then scored on the test
split, its false positive rate with an exact two-sided 95% Clopper-Pearson interval (one fixed rule,
a binomial count: exact, so the simulation in tests/test_age_checks.py can state how often it misses).
"""

import math
from typing import Any

import numpy as np
from scipy import stats

from agejax import errors, labels
from agejax.evaluation import groups

MINOR_AGE = 18
CHALLENGE_AGES = (21, 25, 30)
BAND = (13, 16)  # whole years, both included
BAND_FPR_WINDOWS = ((8, 12), (17, 22))  # the ages NIST publishes the band's false positive rates for
MAE_AGES = (18, 30)
SEX_GROUPINGS = ("gender", "sex")
SEXES = ("male", "female")
CONFIDENCE = 0.95
DEFAULT_TARGET_FPR = 0.01
# Adults' false negative rates by age, as offsets from T: [T, T+3), [T+3, T+7), [T+7, T+12), [T+12, T+22), T+22 on.
FNR_BUCKET_EDGES = (0, 3, 7, 12, 22)
RULES = ("probability", "buffer")
CURVE_POINTS = 200  # the FPR/FNR curves kept in the report, thinned to about this many points


def check_age_check(threshold: Any, target_fpr: Any, min_age: int, max_age: int, what: str = "config.eval.") -> None:
  """Fails in one line unless threshold is 0 (off) or an age inside the bins, and the target a rate in (0, 1)."""
  if (
    not isinstance(threshold, int)
    or isinstance(threshold, bool)
    or not (threshold == 0 or min_age < threshold <= max_age)
  ):
    raise errors.UserError(
      f"{what}age_check={threshold!r}: must be 0 (off) or a whole age in ({min_age}, {max_age}] (the model's bins), "
      "e.g. 18: the check 'is this person under 18?'"
    )
  if not isinstance(target_fpr, int | float) or isinstance(target_fpr, bool) or not 0 < target_fpr < 1:
    raise errors.UserError(
      f"{what}age_check_target_fpr={target_fpr!r}: must be a rate in (0, 1), e.g. 0.01: at most 1% of minors passed"
    )


def under_probability(probs: np.ndarray, bins: np.ndarray, threshold: int) -> np.ndarray:
  """P(age < threshold) per distribution: the mass of the bins below it (float64), as labels.probability_under."""
  return labels.probability_under(probs, bins, [threshold])[..., 0]


def upper_bound(k: np.ndarray | int, n: int, confidence: float = CONFIDENCE) -> np.ndarray:
  """One-sided Clopper-Pearson upper bound on a rate from k events in n trials (1 at k = n)."""
  k = np.asarray(k, np.float64)
  inside = k < n
  bound = stats.beta.ppf(confidence, np.where(inside, k + 1, 1.0), np.where(inside, n - k, 1.0))
  return np.where(inside, bound, 1.0)


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
  """The exact two-sided interval of a binomial rate from k events in n trials; None when n is 0."""
  if n == 0:
    return None
  alpha = 1.0 - confidence
  low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
  high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
  return [low, high]


def rule_score(rule: str, under: np.ndarray, estimate: np.ndarray) -> np.ndarray:
  """The score a rule passes at or below a cutoff: P(age < T) for "probability", -estimate for "buffer"."""
  return np.asarray(under if rule == "probability" else -np.asarray(estimate, np.float64), np.float64)


def cutoff_to_setting(rule: str, cutoff: float, threshold: int) -> float:
  """The rule's setting of a score cutoff: p itself, or the buffer b of "estimate >= T + b"."""
  return float(cutoff) if rule == "probability" else float(-cutoff - threshold)


def setting_to_cutoff(rule: str, setting: float, threshold: int) -> float:
  """The score cutoff of a rule's setting (`cutoff_to_setting`'s inverse)."""
  return float(setting) if rule == "probability" else float(-(threshold + setting))


def error_rates(passed: np.ndarray, age: np.ndarray, threshold: int) -> dict[str, Any]:
  """The rule's false positive rate (minors passed) and false negative rate (adults stopped), with exact intervals.

  Returns:
    {minors, fpr, fpr_ci95, adults, fnr, fnr_ci95, fnr_by_age: {bucket: {count, fnr}}}; a rate of
    no one is None.
  """
  passed, age = np.asarray(passed, bool), np.asarray(age, np.float64)
  minor = age < threshold
  n_minor, n_adult = int(minor.sum()), int((~minor).sum())
  k_fp, k_fn = int((passed & minor).sum()), int((~passed & ~minor).sum())
  by_age = {}
  edges = [threshold + e for e in FNR_BUCKET_EDGES] + [math.inf]
  for lo, hi in zip(edges, edges[1:]):
    name = f"{lo}+" if hi == math.inf else f"{lo}-{hi - 1}"
    inside = (age >= lo) & (age < hi)
    count = int(inside.sum())
    by_age[name] = {"count": count, "fnr": float((~passed & inside).sum() / count) if count else None}
  return {
    "minors": n_minor,
    "fpr": k_fp / n_minor if n_minor else None,
    "fpr_ci95": clopper_pearson(k_fp, n_minor),
    "adults": n_adult,
    "fnr": k_fn / n_adult if n_adult else None,
    "fnr_ci95": clopper_pearson(k_fn, n_adult),
    "fnr_by_age": by_age,
  }


def choose(score: np.ndarray, age: np.ndarray, threshold: int, target: float, confidence: float = CONFIDENCE):
  """The largest cutoff c of "pass when score <= c" whose minors' false positive rate is certified at most `target`.

  Certified: its one-sided `confidence` Clopper-Pearson upper bound from these faces is at most the
  target (see the module docstring for why this holds the target on new faces). With too few
  minors for any bound to reach the target, the plug-in cutoff (the largest whose rate here is at
  most the target) is returned, marked uncertified.

  Returns:
    (cutoff, certified, minors): cutoff None when the split has no minors.
  """
  score, age = np.asarray(score, np.float64), np.asarray(age, np.float64)
  minors = np.sort(score[age < threshold])
  n = len(minors)
  if n == 0:
    return None, False, 0
  bounds = upper_bound(np.arange(n + 1), n, confidence)
  allowed = int(np.sum(bounds <= target)) - 1  # the most minors it may pass (bounds rise with k)
  certified = allowed >= 0
  if not certified:
    allowed = int(math.floor(target * n))  # the plug-in: rate here <= target
  # Just below the (allowed + 1)-th smallest minor's score: at most `allowed` minors pass (ties too).
  cutoff = math.inf if allowed >= n else float(np.nextafter(minors[allowed], -np.inf))
  return cutoff, certified, n


def curve(score: np.ndarray, age: np.ndarray, threshold: int, points: int = CURVE_POINTS) -> dict[str, list[float]]:
  """The false positive and false negative rates of "pass when score <= c" as c moves over the scores, thinned."""
  score, age = np.asarray(score, np.float64), np.asarray(age, np.float64)
  order = np.argsort(score, kind="stable")
  s, minor = score[order], age[order] < threshold
  last = np.r_[s[1:] != s[:-1], True]  # cut after each distinct score: every face at or below it passes
  n_minor, n_adult = max(int(minor.sum()), 1), max(int((~minor).sum()), 1)
  fpr = np.cumsum(minor)[last] / n_minor
  fnr = 1.0 - np.cumsum(~minor)[last] / n_adult
  cut = s[last]
  fpr, fnr, cut = np.r_[0.0, fpr], np.r_[1.0, fnr], np.r_[-math.inf, cut]
  keep = np.unique(np.linspace(0, len(cut) - 1, min(points, len(cut))).round().astype(int))
  return {"fpr": fpr[keep].tolist(), "fnr": fnr[keep].tolist(), "cutoff": cut[keep].tolist()}


def _columns(
  groupings: groups.Groupings, masks: dict[str, np.ndarray]
) -> tuple[list[tuple[str, str, str]], np.ndarray]:
  """Every (denominator, grouping, group) cell: its name and its 0/1 column [N, C] ('all' first for each)."""
  names, cols = [], []
  for rate, mask in masks.items():
    names.append((rate, "all", "all"))
    cols.append(mask)
    for grouping, (codes, group_names) in groupings.items():
      for j, group in enumerate(group_names):
        names.append((rate, grouping, group))
        cols.append(mask & (np.asarray(codes) == j))
  return names, np.stack(cols, axis=1).astype(np.float32)


def rates(
  indicator: np.ndarray,
  masks: dict[str, np.ndarray],
  groupings: groups.Groupings,
  *,
  seed: int = groups.SEED,
  resamples: int = groups.RESAMPLES,
) -> dict[str, dict[str, Any]]:
  """The share of each mask's examples with the indicator set, overall and by group, with 95% bootstrap intervals.

  Returns:
    {rate: {"count", "rate", "ci95", "groups": {grouping: {group: {"count", "rate", "ci95"}}}}};
    a cell without examples has rate and ci95 None; `resamples` 0: point rates, every ci95 None.
  """
  names, one_hot = _columns(groupings, {k: np.asarray(v, bool) for k, v in masks.items()})
  count, mean, replicates = groups.bootstrap_means(
    np.asarray(indicator, np.float32), one_hot, seed=seed, resamples=resamples
  )
  out: dict[str, dict[str, Any]] = {}
  for j, (rate, grouping, group) in enumerate(names):
    n = int(count[j])
    entry = {
      "count": n,
      "rate": float(mean[j]) if n else None,
      "ci95": [float(v) for v in np.nanpercentile(replicates[:, j], [2.5, 97.5])] if n and resamples else None,
    }
    if grouping == "all":
      out[rate] = {**entry, "groups": {}}
    else:
      out[rate]["groups"].setdefault(grouping, {})[group] = entry
  return out


def _sex_grouping(groupings: groups.Groupings) -> tuple[np.ndarray, list[int]] | None:
  """(codes, the codes of male and female) of the split's sex grouping, or None without one."""
  for name in SEX_GROUPINGS:
    if name in groupings:
      codes, group_names = groupings[name]
      if all(s in group_names for s in SEXES):
        return np.asarray(codes), [group_names.index(s) for s in SEXES]
  return None


def mae_18_30(
  estimate: np.ndarray,
  age: np.ndarray,
  groupings: groups.Groupings,
  *,
  seed: int = groups.SEED,
  resamples: int = groups.RESAMPLES,
) -> dict[str, Any]:
  """NIST's MAE: the unweighted mean of the MAEs of each sex at each age 18..30, with a 95% bootstrap interval.

  Without sex labels, the mean over the 13 ages (`averaged_over` says which); cells without faces
  are left out (`cells` counts those averaged). `resamples` 0: the point MAE, ci95 None.
  """
  estimate, age = np.asarray(estimate, np.float64), np.asarray(age, np.float64)
  ages = range(MAE_AGES[0], MAE_AGES[1] + 1)
  sex = _sex_grouping(groupings)
  cells = [age == a for a in ages]
  if sex is not None:
    codes, which = sex
    cells = [c & (codes == s) for c in cells for s in which]
  one_hot = np.stack(cells, axis=1).astype(np.float32)
  count, mean, replicates = groups.bootstrap_means(
    np.abs(estimate - age).astype(np.float32), one_hot, seed=seed, resamples=resamples
  )
  present = count > 0
  n_cells = len(cells)
  out: dict[str, Any] = {
    "averaged_over": "sex and age" if sex is not None else "age (the split has no sex labels)",
    "cells": int(present.sum()),
    "of_cells": n_cells,
    "count": int(count.sum()),
    "mae": None,
    "ci95": None,
  }
  if present.any():
    out["mae"] = float(mean[present].mean())
  if present.any() and resamples:
    # A replicate that drew no one of a small cell averages the cells it has (dropping it would keep
    # only the rare replicates that hold every cell: a far too narrow interval).
    per_replicate = np.nanmean(replicates[:, present], axis=1)
    out["ci95"] = [float(v) for v in np.nanpercentile(per_replicate, [2.5, 97.5])]
  return out


def nist_rates(
  estimate: np.ndarray,
  age: np.ndarray,
  groupings: groups.Groupings,
  *,
  seed: int = groups.SEED,
  resamples: int = groups.RESAMPLES,
) -> dict[str, Any]:
  """The Challenge-21/25/30 false positive rates, the 13-16 band's rates and the MAE over 18-30, by group.

  Returns:
    {"challenge": {"21": rate entry, ...}, "band_13_16": {"tpr", "fpr", "fpr_8_12", "fpr_17_22"},
    "mae_18_30": `mae_18_30`'s}; rate entries as `rates` returns them.
  """
  estimate, age = np.asarray(estimate, np.float64), np.asarray(age, np.float64)
  groupings = {k: v for k, v in groupings.items() if k != "age_group"}  # the rates are of age ranges already
  minors = age < MINOR_AGE
  challenge = {}
  for t in CHALLENGE_AGES:
    challenge[str(t)] = rates(estimate >= t, {"fpr": minors}, groupings, seed=seed, resamples=resamples)["fpr"]
  lo, hi = BAND
  in_band = (age >= lo) & (age < hi + 1)
  masks = {"tpr": in_band, "fpr": ~in_band}
  masks.update({f"fpr_{a}_{b}": (age >= a) & (age < b + 1) for a, b in BAND_FPR_WINDOWS})
  estimated_in = (estimate >= lo) & (estimate < hi + 1)
  band = rates(estimated_in, masks, groupings, seed=seed, resamples=resamples)
  return {
    "minors": int(minors.sum()),
    "challenge": challenge,
    "band_13_16": band,
    "mae_18_30": mae_18_30(estimate, age, groupings, seed=seed, resamples=resamples),
  }


def check(
  threshold: int,
  target: float,
  validation: dict[str, np.ndarray],
  test: dict[str, np.ndarray],
  groupings: groups.Groupings,
  *,
  confidence: float = CONFIDENCE,
  seed: int = groups.SEED,
  resamples: int = groups.RESAMPLES,
) -> dict[str, Any]:
  """Chooses each rule's setting on validation for a target minors' FPR and scores it on test.

  Args:
    threshold: the age T of "is this person under T?".
    target: the largest false positive rate for minors the deployer accepts.
    validation: {"under": P(age < T), "estimate", "age"} per face of the split the rule is chosen on.
    test: the same of the split it is checked on.
    groupings: the test split's groupings (the rates by group, with bootstrap intervals).
    confidence: the level of the validation bound and of the test interval.
    seed: the groups' bootstrap seed.
    resamples: the groups' bootstrap replicates.

  Returns:
    {threshold, target, confidence, validation_minors, rules: {rule: {setting, certified,
    validation: error_rates, test: error_rates, test_by_group, curve: {validation, test}}}}.
  """
  out: dict[str, Any] = {
    "threshold": threshold,
    "target_fpr": target,
    "confidence": confidence,
    "validation_minors": int((np.asarray(validation["age"]) < threshold).sum()),
    "minors_needed": math.ceil(math.log(1 - confidence) / math.log(1 - target)),
    "rules": {},
  }
  plain = {k: v for k, v in groupings.items() if k != "age_group"}
  for rule in RULES:
    v_score = rule_score(rule, validation["under"], validation["estimate"])
    t_score = rule_score(rule, test["under"], test["estimate"])
    cutoff, certified, _ = choose(v_score, validation["age"], threshold, target, confidence)
    entry: dict[str, Any] = {"setting": None, "certified": False}
    if cutoff is not None:
      setting = 1.0 if rule == "probability" and cutoff == math.inf else cutoff_to_setting(rule, cutoff, threshold)
      t_passed = t_score <= cutoff
      age = np.asarray(test["age"], np.float64)
      entry = {
        "setting": setting if math.isfinite(setting) else None,
        "certified": certified,
        "validation": error_rates(v_score <= cutoff, validation["age"], threshold),
        "test": error_rates(t_passed, age, threshold),
        "test_by_group": rates(t_passed, {"fpr": age < threshold}, plain, seed=seed, resamples=resamples)["fpr"][
          "groups"
        ],
      }
    entry["curve"] = {
      "validation": curve(v_score, validation["age"], threshold),
      "test": curve(t_score, test["age"], threshold),
    }
    out["rules"][rule] = entry
  return out


def point_report(
  estimate: np.ndarray,
  under: np.ndarray | None,
  age: np.ndarray,
  groupings: groups.Groupings,
  threshold: int,
  target: float,
) -> dict[str, Any]:
  """`nist_rates` and, with a threshold, `check` of one split, as point rates: what the trainer logs at each evaluation.

  No bootstrap: 1,000 replicates of every rate by group at every evaluation would cost more than the
  evaluation; the intervals come once, on the best checkpoint (final_metrics.json, evaluate.py). The
  rule is chosen and scored on this same split (in-sample: the false negative rate the target costs here).

  Args:
    estimate: the point predictions [N].
    under: P(age < threshold) [N] (None without a threshold).
    age: the true ages [N].
    groupings: the split's groupings (a sex grouping makes the MAE over 18-30 NIST's mean over sex and age).
    threshold: T of "under T?"; 0: the NIST rates only.
    target: the minors' false positive rate the rule is chosen for.

  Returns:
    {"age_checks": nist_rates', "age_check": check's (with a threshold)}: `headline` reads it.
  """
  report: dict[str, Any] = {"age_checks": nist_rates(estimate, age, groupings, resamples=0)}
  if threshold and under is not None:
    split = {"under": under, "estimate": np.asarray(estimate, np.float64), "age": np.asarray(age)}
    report["age_check"] = check(threshold, target, split, split, groupings, resamples=0)
  return report


def headline(report: dict[str, Any]) -> dict[str, float | None]:
  """The age-check numbers the trainer logs and keeps in final_metrics.json (test_ + these names)."""
  rates_ = report["age_checks"]
  out: dict[str, float | None] = {f"fpr_challenge{t}": rates_["challenge"][t]["rate"] for t in rates_["challenge"]}
  band = rates_["band_13_16"]
  out.update(tpr_band13_16=band["tpr"]["rate"], fpr_band13_16=band["fpr"]["rate"])
  out["mae_18_30_nist"] = rates_["mae_18_30"]["mae"]
  if "age_check" in report:
    rule = report["age_check"]["rules"]["probability"]
    out["age_check_p"] = rule["setting"]
    out["age_check_fpr"] = rule["test"]["fpr"] if "test" in rule else None
    out["age_check_fnr"] = rule["test"]["fnr"] if "test" in rule else None
  return out


def _rate(entry: dict[str, Any] | None) -> str:
  if not entry or entry.get("rate", entry.get("fpr")) is None:
    return "-"
  return f"{entry['rate']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"


def format_lines(report: dict[str, Any]) -> list[str]:
  """The age checks of an evaluation report as lines of its printed table."""
  r = report["age_checks"]
  lines = [
    f"  age checks (NIST FATE AEV definitions; estimate = expected age; 95% bootstrap intervals; {r['minors']} minors)",
  ]
  for t, entry in r["challenge"].items():
    lines.append(f"    Challenge-{t} FPR (under 18 estimated {t}+)   {_rate(entry)}  ({entry['count']} minors)")
  band = r["band_13_16"]
  lines.append(f"    13-16 TPR (13-16 estimated 13-16)        {_rate(band['tpr'])}  ({band['tpr']['count']} faces)")
  lines.append(f"    13-16 FPR (others estimated 13-16)       {_rate(band['fpr'])}  ({band['fpr']['count']} faces)")
  for (a, b), key in zip(BAND_FPR_WINDOWS, ("fpr_8_12", "fpr_17_22")):
    lines.append(f"      of ages {a}-{b}{' ' * (27 - len(f'{a}-{b}'))}{_rate(band[key])}  ({band[key]['count']} faces)")
  m = r["mae_18_30"]
  mae = "-" if m["mae"] is None else f"{m['mae']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"
  lines.append(f"    MAE ages 18-30, mean over {m['averaged_over']}: {mae}  ({m['cells']} of {m['of_cells']} cells)")
  by_group = [(g, name) for g, names in r["challenge"]["25"]["groups"].items() for name in names]
  if by_group:
    lines.append("    by group: Challenge-25 FPR | 13-16 TPR | 13-16 FPR")
    for grouping, name in by_group:
      c25 = r["challenge"]["25"]["groups"][grouping][name]
      tpr, fpr = band["tpr"]["groups"][grouping][name], band["fpr"]["groups"][grouping][name]
      lines.append(
        f"      {grouping:>10} {name:<8} {_rate(c25):<22} n={c25['count']:<5} {_rate(tpr):<22} n={tpr['count']:<5} "
        f"{_rate(fpr):<22} n={fpr['count']}"
      )
  if "age_check" in report:
    lines += format_check(report["age_check"])
  return lines


def _pct(value: float | None, ci: list[float] | None = None) -> str:
  if value is None:
    return "-"
  return f"{value:.2%}" + (f" [{ci[0]:.2%}, {ci[1]:.2%}]" if ci else "")


def format_check(check_: dict[str, Any]) -> list[str]:
  """The threshold choice (`check`) as lines: per rule its setting, validation and test rates."""
  t, target = check_["threshold"], check_["target_fpr"]
  lines = [
    f"  age check 'under {t}?': chosen on {check_.get('validation_split', 'validation')} for a minors' FPR of at most "
    f"{target:.2%} (one-sided {check_['confidence']:.0%} Clopper-Pearson bound; needs >= {check_['minors_needed']} "
    f"minors, has {check_['validation_minors']}), checked on {check_.get('test_split', 'test')} (exact 95% interval)",
  ]
  for rule, entry in check_["rules"].items():
    if entry["setting"] is None and "test" not in entry:
      lines.append(f"    {rule}: the validation split has no one under {t}: nothing to choose on")
      continue
    how = "certified" if entry["certified"] else "NOT certified (too few minors): the plug-in choice"
    if rule == "probability":
      setting = f"pass when P(age < {t}) <= {entry['setting']:.4g}"
    else:
      setting = f"pass when estimate >= {t} + {entry['setting']:.2f}"
    v, s = entry["validation"], entry["test"]
    lines.append(f"    {setting}  ({how})")
    lines.append(
      f"      validation FPR {_pct(v['fpr'])} ({v['minors']} minors), FNR {_pct(v['fnr'])} ({v['adults']} adults)"
    )
    lines.append(
      f"      test FPR {_pct(s['fpr'], s['fpr_ci95'])} ({s['minors']} minors), "
      f"FNR {_pct(s['fnr'], s['fnr_ci95'])} ({s['adults']} adults)"
    )
    lines.append(
      "      test FNR by age: "
      + "  ".join(f"{k}: {_pct(b['fnr'])} (n={b['count']})" for k, b in s["fnr_by_age"].items())
    )
  return lines
