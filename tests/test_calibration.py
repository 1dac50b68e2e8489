"""Calibration against float64 NumPy references: NLL, intervals, coverage, temperature fitting."""

import jax.numpy as jnp
import numpy as np
import pytest

from agejax import labels
from agejax.evaluation import calibration

BINS = labels.age_bins(1, 100)


def gaussian_distributions(rng, n):
  """Discretised Gaussians over the bins with random centres and widths, float64 [n, K]."""
  mean, std = rng.uniform(5, 95, n), rng.uniform(1.5, 10, n)
  log_p = -0.5 * ((BINS[None].astype(np.float64) - mean[:, None]) / std[:, None]) ** 2
  p = np.exp(log_p - log_p.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


def sample_ages(rng, p):
  """One age drawn from each row's distribution."""
  u = rng.uniform(size=(len(p), 1))
  return BINS[np.minimum((np.cumsum(p, axis=1) < u).sum(1), len(BINS) - 1)].astype(np.float64)


def reference_quantile(p, q):
  """float64: the age where the piecewise-uniform CDF (each bin spread over [age - 0.5, age + 0.5]) reaches q."""
  edges = np.concatenate([[BINS[0] - 0.5], BINS + 0.5])
  cdf = np.concatenate([[0.0], np.cumsum(p)])
  keep = np.concatenate([[True], np.diff(cdf) > 0])  # np.interp needs increasing x
  return float(np.interp(q, cdf[keep], edges[keep]))


def test_nll_and_interval_match_float64_references():
  rng = np.random.default_rng(0)
  p = gaussian_distributions(rng, 50)
  ages = sample_ages(rng, p)  # where float32 holds the probability (its floor caps the NLL at ~87.3)
  got = calibration.nll(jnp.asarray(p, jnp.float32), BINS, jnp.asarray(ages, jnp.float32))
  np.testing.assert_allclose(got, -np.log(p[np.arange(50), (ages - 1).astype(int)]), rtol=1e-5)
  low, high = calibration.interval(jnp.asarray(p, jnp.float32), BINS, 0.8)
  np.testing.assert_allclose(low, [reference_quantile(row, 0.1) for row in p], atol=2e-3)
  np.testing.assert_allclose(high, [reference_quantile(row, 0.9) for row in p], atol=2e-3)
  # A wide Gaussian's 80% interval is its mean +- 1.2816 std (up to the one-year binning).
  wide = np.exp(-0.5 * ((BINS - 50.0) / 8.0) ** 2)
  low, high = calibration.interval(jnp.asarray(wide / wide.sum(), jnp.float32)[None], BINS, 0.8)
  assert float(low[0]) == pytest.approx(50 - 1.2816 * 8, abs=0.1)
  assert float(high[0]) == pytest.approx(50 + 1.2816 * 8, abs=0.1)


def test_true_distributions_cover_each_nominal_level_within_binomial_error():
  rng = np.random.default_rng(1)
  n = 20_000
  p = gaussian_distributions(rng, n)
  ages = sample_ages(rng, p)
  for mass in calibration.COVERAGE_LEVELS:
    share = float(jnp.mean(calibration.covered(jnp.asarray(p, jnp.float32), BINS, jnp.asarray(ages), [mass])))
    assert abs(share - mass) <= 4 * np.sqrt(mass * (1 - mass) / n), (mass, share)
  # An overconfident model (each distribution twice as sharp) covers visibly less.
  sharp = p**4 / np.sum(p**4, axis=1, keepdims=True)
  share = float(jnp.mean(calibration.covered(jnp.asarray(sharp, jnp.float32), BINS, jnp.asarray(ages), [0.9])))
  assert share < 0.8


@pytest.mark.parametrize("planted", [0.6, 1.0, 2.5])
def test_a_planted_temperature_is_recovered_within_2_percent(planted):
  rng = np.random.default_rng(2)
  n = 20_000
  logits = rng.normal(size=(n, len(BINS))) * 3.0 + np.linspace(0, 4, len(BINS))
  p = np.exp(logits / planted)
  p /= p.sum(1, keepdims=True)
  ages = sample_ages(rng, p)
  fitted = float(calibration.fit_temperature(jnp.asarray(logits, jnp.float32), BINS, jnp.asarray(ages, jnp.float32)))
  assert fitted == pytest.approx(planted, rel=0.02)
  # The fit minimises the NLL: nudging the temperature either way only raises it.
  nll = lambda t: float(calibration.mean_nll(jnp.asarray(logits), BINS, jnp.asarray(ages), jnp.ones(n), np.log(t)))  # noqa: E731
  assert nll(fitted) <= min(nll(fitted * 1.05), nll(fitted / 1.05))


def test_calibration_report_matches_float64_numpy():
  rng = np.random.default_rng(3)
  n = 400
  logits = rng.normal(size=(n, len(BINS))) * 2.0
  ages = rng.integers(1, 101, n).astype(np.float64)
  temperature = 1.7
  probs = np.exp(logits / temperature)
  probs /= probs.sum(1, keepdims=True)
  got = calibration.report(
    jnp.asarray(logits, jnp.float32), jnp.asarray(probs, jnp.float32), BINS, jnp.asarray(ages, jnp.float32), temperature
  )
  raw = np.exp(logits - logits.max(1, keepdims=True))
  raw /= raw.sum(1, keepdims=True)
  for p, nll_key, coverage_key in ((probs, "nll", "coverage"), (raw, "nll_uncalibrated", "coverage_uncalibrated")):
    assert got[nll_key] == pytest.approx(np.mean(-np.log(p[np.arange(n), (ages - 1).astype(int)])), rel=1e-5)
    for level, share in got[coverage_key].items():
      m = float(level)
      inside = [
        reference_quantile(row, (1 - m) / 2) <= a <= reference_quantile(row, (1 + m) / 2) for row, a in zip(p, ages)
      ]
      assert share == pytest.approx(np.mean(inside), abs=1.5 / n)  # one example may sit on an edge
  assert got["temperature"] == temperature
  curve = got["coverage_curve"]
  assert curve["nominal"] == pytest.approx(list(calibration.CURVE_LEVELS))
  for p, name in ((probs, "calibrated"), (raw, "uncalibrated")):
    for m, share in zip(curve["nominal"], curve[name]):
      inside = [
        reference_quantile(row, (1 - m) / 2) <= a <= reference_quantile(row, (1 + m) / 2) for row, a in zip(p, ages)
      ]
      assert share == pytest.approx(np.mean(inside), abs=1.5 / n), (name, m)
    reliability = got["reliability"][name]
    expected = reference_reliability(p, ages)
    assert reliability["count"] == expected["count"], name
    np.testing.assert_allclose(reliability["mean_std"], expected["mean_std"], rtol=1e-4)
    np.testing.assert_allclose(reliability["rms_error"], expected["rms_error"], rtol=1e-4)


def reference_reliability(p: np.ndarray, ages: np.ndarray) -> dict[str, list]:
  """float64: predicted std in RELIABILITY_BINS bins of equal counts, each bin's mean std and RMS error."""
  bins = BINS.astype(np.float64)
  mean = p @ bins
  std = np.sqrt(np.maximum(p @ bins**2 - mean**2, 0.0))
  edges = np.quantile(std, np.linspace(0, 1, calibration.RELIABILITY_BINS + 1))
  which = np.searchsorted(edges[1:-1], std, side="right")
  out = {"count": [], "mean_std": [], "rms_error": []}
  for b in range(calibration.RELIABILITY_BINS):
    inside = which == b
    out["count"].append(int(inside.sum()))
    out["mean_std"].append(std[inside].mean())
    out["rms_error"].append(np.sqrt(np.mean((mean[inside] - ages[inside]) ** 2)))
  return out


def test_load_temperature_refuses_a_bad_file(tmp_path):
  assert calibration.load_temperature(tmp_path) is None
  (tmp_path / calibration.FILE).write_text('{"temperature": -1}')
  with pytest.raises(calibration.errors.UserError, match="calibration.json: temperature=-1"):
    calibration.load_temperature(tmp_path)
  calibration.write(tmp_path, {"temperature": 1.25, "split": "validation", "nll_before": 3.0, "nll_after": 2.9})
  assert calibration.load_temperature(tmp_path) == 1.25


def test_a_temperature_fitted_for_another_checkpoint_is_applied_with_a_warning(tmp_path, caplog):
  calibration.write(tmp_path, {"temperature": 0.8, "split": "validation", "step": 10})
  with caplog.at_level("WARNING"):
    assert calibration.load_temperature(tmp_path, 10) == 0.8
    assert not caplog.records
    assert calibration.load_temperature(tmp_path, 20) == 0.8
  assert "fitted for step 10, not step 20" in caplog.text
