"""Age checks: every rate against a float64 NumPy formula, and the threshold choice's promise by simulation."""

import json
import math

import numpy as np
import pytest
import tiny_run
from conftest import labelled_split
from PIL import Image
from scipy import stats
from test_evaluate import run_script
from test_train import scalars

from agejax import errors
from agejax.evaluation import age_checks
from agejax.inference import evaluate
from agejax.training import configuration, train
from configs import vgg16_kl

BINS = np.arange(1, 101, dtype=np.float64)


def population(seed: int = 0, types: int = 300) -> np.ndarray:
  """A known calibrated model: face types, each a discretised Gaussian over ages 1..100 [K, 100]."""
  rng = np.random.default_rng(seed)
  centre, std = rng.uniform(2, 60, types), rng.uniform(1.5, 6.0, types)
  density = np.exp(-0.5 * ((BINS[None] - centre[:, None]) / std[:, None]) ** 2)
  return density / density.sum(axis=1, keepdims=True)


def draw(dist: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """n faces: a type each (equal weights), and a true age drawn from that type's distribution itself."""
  kind = rng.integers(len(dist), size=n)
  cdf = np.cumsum(dist, axis=1)[kind]
  index = np.minimum((rng.uniform(size=n)[:, None] > cdf).sum(axis=1), len(BINS) - 1)
  return kind, BINS[index]


def test_under_probability_is_the_mass_below_the_threshold():
  dist = population(1, 20)
  for t in (1, 13, 18, 25, 100, 101):
    expected = [sum(p for a, p in zip(BINS, row) if a < t) for row in dist]
    np.testing.assert_allclose(age_checks.under_probability(dist, BINS, t), expected, atol=1e-12)


def test_error_rates_and_their_exact_intervals_equal_numpy_and_scipy():
  rng = np.random.default_rng(2)
  age = rng.integers(1, 80, 500).astype(np.float64)
  passed = rng.uniform(size=500) < np.where(age < 18, 0.05, 0.8)
  out = age_checks.error_rates(passed, age, 18)
  minors, adults = age < 18, age >= 18
  assert out["minors"] == minors.sum() and out["adults"] == adults.sum()
  assert out["fpr"] == pytest.approx(np.mean(passed[minors]), abs=1e-15)
  assert out["fnr"] == pytest.approx(np.mean(~passed[adults]), abs=1e-15)
  ci = stats.binomtest(int(passed[minors].sum()), int(minors.sum())).proportion_ci(0.95, method="exact")
  assert out["fpr_ci95"] == pytest.approx([ci.low, ci.high], abs=1e-10)
  for name, bucket in out["fnr_by_age"].items():
    lo, hi = (int(name[:-1]), 999) if name.endswith("+") else map(int, name.split("-"))
    inside = (age >= lo) & (age <= hi)
    assert bucket["count"] == inside.sum()
    assert bucket["fnr"] == pytest.approx(np.mean(~passed[inside]), abs=1e-15)
  assert sum(b["count"] for b in out["fnr_by_age"].values()) == adults.sum()
  assert age_checks.error_rates(passed[adults], age[adults], 18)["fpr"] is None  # no minors: no rate


@pytest.mark.slow  # ~10 s: the bootstrap's compilation
def test_nist_rates_by_group_equal_numpy_formulas():
  rng = np.random.default_rng(3)
  n = 1500
  age = rng.integers(5, 70, n).astype(np.float64)
  estimate = age + rng.normal(0, 5, n)
  gender = rng.integers(0, 2, n)
  race = rng.integers(0, 3, n)
  groupings = {"gender": (gender, ("male", "female")), "race": (race, ("a", "b", "c"))}
  out = age_checks.nist_rates(estimate, age, groupings, resamples=200)

  def check(entry, indicator, mask):
    assert entry["count"] == mask.sum()
    assert entry["rate"] == pytest.approx(np.mean(indicator[mask]), abs=1e-6)
    assert entry["ci95"][0] <= entry["rate"] <= entry["ci95"][1]
    for name, (codes, names) in groupings.items():
      for j, group in enumerate(names):
        sub = mask & (codes == j)
        assert entry["groups"][name][group]["count"] == sub.sum()
        assert entry["groups"][name][group]["rate"] == pytest.approx(np.mean(indicator[sub]), abs=1e-6)

  for t in (21, 25, 30):
    check(out["challenge"][str(t)], estimate >= t, age < 18)
  in_band, estimated_in = (age >= 13) & (age <= 16), (estimate >= 13) & (estimate < 17)
  check(out["band_13_16"]["tpr"], estimated_in, in_band)
  check(out["band_13_16"]["fpr"], estimated_in, ~in_band)
  check(out["band_13_16"]["fpr_8_12"], estimated_in, (age >= 8) & (age <= 12))
  check(out["band_13_16"]["fpr_17_22"], estimated_in, (age >= 17) & (age <= 22))
  cells = [
    np.mean(np.abs(estimate - age)[(age == a) & (gender == s)]) for a in range(18, 31) for s in (0, 1)
  ]  # NIST: 26 MAEs, two sexes and 13 ages, averaged unweighted
  m = out["mae_18_30"]
  assert m["cells"] == m["of_cells"] == 26 and m["averaged_over"] == "sex and age"
  assert m["mae"] == pytest.approx(np.mean(cells), rel=1e-6)
  assert m["ci95"][0] <= m["mae"] <= m["ci95"][1]
  no_sex = age_checks.mae_18_30(estimate, age, {"race": groupings["race"]}, resamples=50)
  assert no_sex["averaged_over"].startswith("age") and no_sex["of_cells"] == 13
  per_age = [np.mean(np.abs(estimate - age)[age == a]) for a in range(18, 31)]
  assert no_sex["mae"] == pytest.approx(np.mean(per_age), rel=1e-6)


def reference_choice(score: np.ndarray, age: np.ndarray, t: int, target: float) -> np.ndarray:
  """Which faces the largest certified cutoff passes, by brute force over every candidate cutoff."""
  minors = age < t
  n = int(minors.sum())
  best = None
  for c in np.unique(np.r_[score, -np.inf]):
    k = int((score[minors] <= c).sum())
    upper = 1.0 if k == n else stats.binomtest(k, n, alternative="less").proportion_ci(0.95, method="exact").high
    if upper <= target:
      best = c
  assert best is not None
  # The largest cutoff keeps what passes until the next minor's score: every face strictly below it.
  above = np.sort(score[minors & (score > best)])
  return score < above[0] if len(above) else np.ones_like(score, bool)


@pytest.mark.parametrize("rule", age_checks.RULES)
def test_choose_passes_the_faces_the_brute_force_choice_passes(rule):
  rng = np.random.default_rng(4)
  age = rng.integers(5, 60, 1000).astype(np.float64)
  estimate = np.round(age + rng.normal(0, 4, 1000), 1)  # rounding: ties at the cutoff
  under = np.clip(stats.norm.cdf((18 - estimate) / 4), 0, 1).round(3)
  score = age_checks.rule_score(rule, under, estimate)
  cutoff, certified, n = age_checks.choose(score, age, 18, 0.03)
  assert certified and n == (age < 18).sum()
  np.testing.assert_array_equal(score <= cutoff, reference_choice(score, age, 18, 0.03))
  setting = age_checks.cutoff_to_setting(rule, cutoff, 18)
  passed = under <= setting if rule == "probability" else estimate >= 18 + setting
  np.testing.assert_array_equal(passed, score <= cutoff)
  # Too few minors for any bound to reach 1%: the plug-in choice, said to be uncertified.
  few = (age >= 18) | (np.arange(1000) < 100)
  cutoff, certified, _ = age_checks.choose(score[few], age[few], 18, 0.01)
  assert not certified and np.mean(score[few][age[few] < 18] <= cutoff) <= 0.01


def test_curve_equals_the_rates_at_each_cutoff():
  rng = np.random.default_rng(5)
  age = rng.integers(5, 60, 300).astype(np.float64)
  score = np.round(rng.uniform(size=300), 2)
  c = age_checks.curve(score, age, 18, points=10_000)
  for cut, fpr, fnr in zip(c["cutoff"], c["fpr"], c["fnr"]):
    passed = score <= cut
    assert fpr == pytest.approx(np.mean(passed[age < 18])) and fnr == pytest.approx(np.mean(~passed[age >= 18]))
  assert c["fpr"][0] == 0 and c["fnr"][-1] == 0


def test_bad_age_check_settings_fail_in_one_line_before_compiling():
  for key, value in (("age_check", 101), ("age_check", 1), ("age_check", -3), ("age_check_target_fpr", 0.0)):
    config = vgg16_kl.get_config("tiny")
    config.eval[key] = value
    with pytest.raises(errors.UserError) as raised:
      configuration.validate(config)
    assert f"config.eval.{key}=" in str(raised.value) and "\n" not in str(raised.value)


def test_p_under_18_of_a_calibrated_model_is_calibrated():
  """Reliability: among faces given P(age < 18) in a bin, the share under 18 is the bin's mean P, within 4 SE."""
  dist = population()
  kind, age = draw(dist, 40_000, np.random.default_rng(6))
  q = age_checks.under_probability(dist, BINS, 18)[kind]
  bins = np.digitize(q, np.linspace(0, 1, 11)[1:-1])
  checked = 0
  for b in range(10):
    inside = bins == b
    if inside.sum() < 100:
      continue
    se = math.sqrt(np.sum(q[inside] * (1 - q[inside]))) / inside.sum()
    observed, expected = np.mean(age[inside] < 18), np.mean(q[inside])
    assert abs(observed - expected) <= 4 * max(se, 1e-3), (b, observed, expected, se)
    checked += 1
  assert checked >= 5


def most_misses(repetitions: int, nominal: float = 0.05) -> float:
  """The largest miss rate accepted of a procedure whose miss rate is at most `nominal`: 3 binomial SEs over it."""
  return nominal + 3 * math.sqrt(nominal * (1 - nominal) / repetitions)


@pytest.mark.slow  # ~8 s
def test_a_threshold_chosen_for_1_percent_holds_it_on_new_faces():
  """Chosen on validation for 1%, the true FPR exceeds 1% at most ~5% of the time; the test interval covers it.

  The truth is exact: with types of equal weight and true ages drawn from each type's distribution,
  the rule "P(age < 18) <= p" passes a share sum_k q_k [q_k <= p] / sum_k q_k of minors.
  """
  dist = population()
  q = age_checks.under_probability(dist, BINS, 18)
  rng = np.random.default_rng(7)
  repetitions, target = 1000, 0.01
  exceed = missed = 0
  test_fprs = []
  for _ in range(repetitions):
    kind, age = draw(dist, 3000, rng)
    cutoff, certified, _ = age_checks.choose(q[kind], age, 18, target)
    assert certified
    truth = np.sum(q * (q <= cutoff)) / np.sum(q)
    exceed += truth > target
    kind, age = draw(dist, 3000, rng)
    test = age_checks.error_rates(q[kind] <= cutoff, age, 18)
    lo, hi = test["fpr_ci95"]
    missed += not lo <= truth <= hi
    test_fprs.append(test["fpr"])
  print(
    f"true FPR over the target in {exceed}/{repetitions}; the test's 95% interval missed the truth in "
    f"{missed}/{repetitions}; mean test FPR {np.mean(test_fprs):.4f}"
  )
  assert exceed / repetitions <= most_misses(repetitions)
  assert missed / repetitions <= most_misses(repetitions)


@pytest.mark.slow  # ~25 s: 200 bootstraps
def test_challenge_25_bootstrap_interval_covers_the_truth_near_95_percent():
  """NIST's rate with the groups' bootstrap interval, against the exact Challenge-25 FPR of a known model."""
  dist = population()
  q = age_checks.under_probability(dist, BINS, 18)
  estimate = dist @ BINS  # the expected age of each type
  truth = np.sum(q * (estimate >= 25)) / np.sum(q)
  rng = np.random.default_rng(8)
  repetitions = 200
  missed = 0
  for i in range(repetitions):
    kind, age = draw(dist, 3000, rng)
    entry = age_checks.rates(estimate[kind] >= 25, {"fpr": age < 18}, {}, seed=i)["fpr"]  # nist_rates' Challenge-25
    missed += not entry["ci95"][0] <= truth <= entry["ci95"][1]
  print(f"Challenge-25 FPR {truth:.4f}: the 95% bootstrap interval missed it in {missed}/{repetitions}")
  rate, se = missed / repetitions, math.sqrt(0.05 * 0.95 / repetitions)
  assert abs(rate - 0.05) <= 3 * se


@pytest.mark.slow
def test_evaluate_age_check_on_the_tiny_run(request, tmp_path_factory):
  _, workdir = tiny_run.tiny_run(request, tmp_path_factory)
  proc = run_script("scripts/evaluate.py", "--workdir", str(workdir), "--age_check", "18")
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(proc.stdout)  # the guide's example output (docs/guides/age-checks.md)
  for text in ("Challenge-21 FPR", "Challenge-25 FPR", "Challenge-30 FPR", "13-16 TPR", "13-16 FPR", "age check"):
    assert text in proc.stdout
  report = json.loads((workdir / "eval" / "test.json").read_text())
  check = report["age_check"]
  assert check["validation_split"] == "validation" and check["test_split"] == "test" and check["held_out"]
  rule = check["rules"]["probability"]
  assert rule["certified"] is False  # the tiny run's validation split holds far fewer than 299 minors
  preds = [json.loads(line) for line in (workdir / "eval" / "test_predictions.jsonl").read_text().splitlines()]
  age = np.array([r["age"] for r in preds])
  estimate = np.array([r["predicted_age"] for r in preds])
  c25 = report["age_checks"]["challenge"]["25"]
  assert c25["count"] == (age < 18).sum()
  if c25["count"]:
    assert c25["rate"] == pytest.approx(np.mean(estimate[age < 18] >= 25), abs=1e-6)
  with Image.open(workdir / "eval" / "test_age_checks.png") as png:
    assert png.format == "PNG" and png.width > 100
  proc = run_script("scripts/evaluate.py", "--workdir", str(workdir), "--age_check", "300")
  assert proc.returncode != 0 and "--age_check=300" in proc.stderr and "Traceback" not in proc.stderr


# --- TensorBoard during training: the rates at every evaluation ---

AGE_CHECK_TAGS = (
  "eval/fpr_challenge21",
  "eval/fpr_challenge25",
  "eval/fpr_challenge30",
  "eval/tpr_band13_16",
  "eval/fpr_band13_16",
  "eval/mae_18_30_nist",
  "eval/age_check_p",
  "eval/age_check_fpr",
  "eval/age_check_fnr",
)
EVAL_STEPS = (30, 60)


def certified_count(n: int, target: float, confidence: float = 0.95) -> int | None:
  """The most minors of n a rule may pass for a certified target: the largest k < n with P(Bin(n, target) <= k) <= 5%.

  The one-sided Clopper-Pearson bound of k in n is at most the target exactly when the binomial
  probability of k or fewer at the target is at most 1 - confidence (the bound is where it equals it);
  written as a sum of float64 binomial terms, not with the beta quantile age_checks uses. None: no k.
  """
  terms = [math.comb(n, j) * target**j * (1 - target) ** (n - j) for j in range(n)]
  ok = [k for k in range(n) if sum(terms[: k + 1]) <= 1 - confidence]
  return ok[-1] if ok else None


def reference_rates(estimate, probs, age, gender, threshold: int, target: float) -> dict[str, float | None]:
  """The TensorBoard age-check rates of a split in float64 NumPy, from its predicted ages, raw distributions, ages."""
  estimate, age = np.asarray(estimate, np.float64), np.asarray(age, np.float64)
  mean = lambda x: float(np.mean(x)) if len(x) else None  # noqa: E731
  minor = age < 18
  out = {f"fpr_challenge{t}": mean(estimate[minor] >= t) for t in (21, 25, 30)}
  in_band, estimated_in = (age >= 13) & (age <= 16), (estimate >= 13) & (estimate < 17)
  out.update(tpr_band13_16=mean(estimated_in[in_band]), fpr_band13_16=mean(estimated_in[~in_band]))
  cells = [np.abs(estimate - age)[(age == a) & (gender == s)] for a in range(18, 31) for s in ("male", "female")]
  out["mae_18_30_nist"] = mean([c.mean() for c in cells if len(c)])
  # "pass when P(age < T) <= p", p chosen on this split: the faces scored below the (k+1)-th smallest minor's P pass.
  under = np.where(BINS < threshold, np.asarray(probs, np.float64), 0.0).sum(axis=1)
  minors = np.sort(under[age < threshold])
  k = certified_count(len(minors), target)
  k = math.floor(target * len(minors)) if k is None else k  # too few minors: the plug-in choice
  passed = under < minors[k]  # k < the number of minors: the certified k is, and so is the plug-in's at a target < 1
  out.update(
    age_check_p=float(minors[k]),  # the rule's p is the largest float below it
    age_check_fpr=mean(passed[age < threshold]),
    age_check_fnr=mean(~passed[age >= threshold]),
  )
  return out


@pytest.mark.parametrize("target", [0.01, 0.2])  # too few minors to certify 1%: the plug-in; 20%: certified
def test_the_point_rates_the_trainer_logs_equal_numpy_formulas(target):
  rng = np.random.default_rng(9)
  n = 400
  kind, age = draw(population(10), n, rng)  # true ages drawn from the faces' own distributions
  probs = population(10)[kind]
  estimate = np.round(probs @ BINS)  # whole years: ties at the Challenge and band edges
  gender = np.array(["male", "female"])[rng.integers(0, 2, n)]
  groupings = {"gender": (np.asarray(gender == "female", int), ("male", "female"))}
  under = age_checks.under_probability(probs, BINS, 18)
  report = age_checks.point_report(estimate, under, age, groupings, 18, target)
  assert report["age_checks"]["challenge"]["25"]["ci95"] is None  # point rates: no bootstrap
  assert report["age_check"]["rules"]["probability"]["certified"] is (target == 0.2)
  got = age_checks.headline(report)
  expected = reference_rates(estimate, probs, age, gender, 18, target)
  assert set(got) == set(expected)
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, rel=1e-6 if key == "mae_18_30_nist" else 1e-12), key
  assert set(age_checks.headline(age_checks.point_report(estimate, None, age, groupings, 0, target))) == {
    key for key in expected if not key.startswith("age_check")
  }


@pytest.mark.slow  # ~40 s: a 60-step tiny run and the eval split scored again at both checkpoints
def test_training_writes_the_age_check_rates_at_every_evaluation(tmp_path, tiny_config):
  """eval/<rate> at each evaluation equals the rate recomputed from that checkpoint's predictions (evaluate.py's)."""
  config = tiny_config
  config.model.batch_norm = True  # learns at this width: ages spread, so the rates are not all 0 or 1
  config.batch_size, config.num_train_steps = 32, EVAL_STEPS[-1]
  config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = EVAL_STEPS[0]
  config.eval.age_check, config.eval.age_check_target_fpr = 18, 0.3  # certified with the split's few minors
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, workdir)
  logged = scalars(workdir)
  data = labelled_split(config, "validation")
  gender = np.asarray(data.group_names["gender"])[np.asarray(data.groups["gender"])]
  assert (data.age < 18).sum() >= 3 and (data.age >= 18).sum() >= 3
  expected: dict[str, list] = {}
  for step in EVAL_STEPS:
    evaluate.run_evaluation(None, workdir, "validation", checkpoint=step, calibrated=False, age_check=0)
    rows = [json.loads(line) for line in (workdir / "eval" / "validation_predictions.jsonl").read_text().splitlines()]
    np.testing.assert_array_equal([r["age"] for r in rows], data.age)
    estimate = np.array([r["predicted_age"] for r in rows])
    probs = np.array([r["probabilities"] for r in rows])  # the raw model's (temperature 1), as the trainer's P
    for key, value in reference_rates(estimate, probs, data.age, gender, 18, 0.3).items():
      expected.setdefault(f"eval/{key}", []).append(value)
  assert set(expected) == set(AGE_CHECK_TAGS)
  for tag, values in expected.items():
    if None in values:  # no one in the rate's denominator: nothing logged
      assert tag not in logged, tag
      continue
    # One value per evaluation; TensorBoard keeps float32 (the rates are multiples of 1/count, far apart).
    np.testing.assert_allclose(logged[tag], values, rtol=1e-6, atol=1e-7, err_msg=tag)
  assert sum(tag in logged for tag in AGE_CHECK_TAGS) >= 7  # the tiny split has minors, adults and ages 18-30
