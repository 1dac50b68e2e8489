"""Evaluator: one jitted eval step for every score of a split; the train loop and evaluate.py both use it."""

import copy
from collections.abc import Callable
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from agejax import labels, metrics, models, parallel, storage
from agejax.data import pipeline
from agejax.evaluation import age_checks, calibration, groups

# Per-example outputs kept in <split>_predictions.jsonl (with the raw model's probabilities).
OUTPUT_KEYS = ("predicted_age", "argmax_age", "std", "bench_age")


class Evaluator:
  """Scores a model on every example of a split exactly once, in padded batches over the device mesh.

  One jitted step adds a batch's masked sums (loss, MAE, epsilon-error, CS@1..10, predicted std,
  counts and errors per age group) to the running sums and, when asked, returns the batch's
  per-example outputs (distribution, expected age, argmax age, std) from the same call.

  Args:
    model: the age model (its bins and input included).
    loss_fn: the training loss, loss(logits, ages, age_stds) per example (the report's `loss`).
    data: the split, with true ages.
    batch_size: global eval batch, rounded up to a multiple of the device count.
    mesh: the device mesh.
    epsilon_sigma: the epsilon-error sigma of images without their own age_std.
    flip: average each face's distribution with its mirror image's (test-time augmentation).
  """

  def __init__(
    self,
    model: models.AgeModel,
    loss_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    data: pipeline.ArraySplit,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    *,
    epsilon_sigma: float,
    flip: bool = False,
  ):
    self.model, self.loss_fn, self.data, self.mesh = model, loss_fn, data, mesh
    self.epsilon_sigma, self.flip = epsilon_sigma, flip
    self.bins = jnp.asarray(model.bins)
    self.batch_size = parallel.device_multiple(batch_size)
    replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
    # The sums are a few small arrays, not donated: the loop waits on them to bound the dispatch.
    self._steps = {
      outputs: jax.jit(fn, in_shardings=(replicated, replicated, sharded, replicated), out_shardings=replicated)
      for outputs, fn in ((False, self._sums_step), (True, self._outputs_step))
    }
    self._gather = self._gatherer(len(data), replicated)
    self._zeros = jax.device_put(metrics.report_zeros(), replicated)
    self._replicated = replicated

  @staticmethod
  def _gatherer(n: int, replicated: jax.sharding.Sharding) -> Callable:
    """The per-example outputs of all batches, in the split's order without the padding, on every device."""
    gather = lambda batches: jax.tree.map(lambda *xs: jnp.concatenate(xs)[:n], *batches)  # noqa: E731
    return jax.jit(gather, out_shardings=replicated)

  def on(self, data: pipeline.ArraySplit) -> "Evaluator":
    """This evaluator on another split: the same jitted steps, so nothing compiles again (the split is not in them)."""
    other = copy.copy(self)
    other.data = data
    other._gather = self._gatherer(len(data), self._replicated)
    return other

  def _sums_step(self, state: models.Weights, sums: metrics.Sums, batch: dict, temperature: jax.Array):
    return self._step(state, sums, batch, temperature, outputs=False)

  def _outputs_step(self, state: models.Weights, sums: metrics.Sums, batch: dict, temperature: jax.Array):
    return self._step(state, sums, batch, temperature, outputs=True)

  def _step(self, state: models.Weights, sums: metrics.Sums, batch: dict, temperature: jax.Array, *, outputs: bool):
    logits, probs = self.model.outputs(state, batch["image"], temperature, self.flip)
    scored = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))  # the loss of the distribution reported
    ages = batch["age"].astype(jnp.float32)
    raw = jax.nn.softmax(logits)  # the raw model's distribution (temperature 1)
    out = {
      # The point prediction is the raw model's (the tempered distribution keeps it, to ~1e-4 years).
      "predicted_age": labels.expected_age(raw, self.bins),
      "argmax_age": labels.argmax_age(probs, self.bins),
      "std": labels.distribution_std(probs, self.bins),
      # The benchmark's whole-year prediction: the raw model's posterior median (temperature 1).
      "bench_age": metrics.posterior_median(raw, self.bins),
    }
    sigma = metrics.per_image_sigma(batch.get("age_std"), ages, self.epsilon_sigma)
    batch_sums = metrics.report_sums(
      self.loss_fn(scored, ages, batch["age_std"].astype(jnp.float32)),
      out["predicted_age"],
      ages,
      sigma,
      out["std"],
      batch["mask"],
      out["bench_age"],
    )
    sums = metrics.add(sums, batch_sums)
    return (sums, {**out, "distribution": probs, "logits": logits, "raw": raw}) if outputs else sums

  def _collect(self, state: models.Weights, temperature: float, outputs: bool):
    """Runs the eval step over the split; returns the device sums and, with `outputs`, the per-example outputs."""
    step, sums = self._steps[outputs], self._zeros
    temperature = jax.device_put(np.float32(temperature), self._replicated)
    in_flight, collected = parallel.InFlight(), []
    batches = pipeline.device_prefetch(
      pipeline.eval_batches(self.data, self.batch_size), parallel.data_sharded(self.mesh)
    )
    for batch in batches:
      result = step(state, sums, batch, temperature)
      sums = result[0] if outputs else result
      if outputs:
        collected.append(result[1])
      in_flight.add(sums)
    return sums, (self._gather(collected) if outputs else None)

  def _device_ages(self) -> jax.Array:
    """The split's true ages [N] as float32, on every device (for the reports of per-example outputs)."""
    return jax.device_put(np.asarray(self.data.age, np.float32), self._replicated)

  def groupings(self) -> groups.Groupings:
    """The split's groupings: the dataset's own (e.g. gender, race), then age groups by decade."""
    age_codes = np.asarray(metrics.age_group(np.asarray(self.data.age, np.float32)))
    return {
      **{name: (codes, self.data.group_names[name]) for name, codes in self.data.groups.items()},
      "age_group": (age_codes, metrics.AGE_GROUPS),
    }

  @overload
  def run(
    self,
    state: models.Weights,
    *,
    temperature: "float | calibration.Calibration" = ...,
    outputs: Literal[False] = ...,
    seed: int = ...,
  ) -> dict[str, Any]: ...

  @overload
  def run(
    self,
    state: models.Weights,
    *,
    temperature: "float | calibration.Calibration" = ...,
    outputs: Literal[True],
    seed: int = ...,
  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...

  def run(
    self,
    state: models.Weights,
    *,
    temperature: "float | calibration.Calibration" = 1.0,
    outputs: bool = False,
    seed: int = groups.SEED,
  ) -> dict[str, Any] | tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluates `state` on the whole split.

    Point scores (MAE, CS@k, epsilon-error) are the raw model's whatever the temperature.

    Args:
      state: the model state, replicated over the mesh.
      temperature: the calibration of this way of predicting (calibration.json's; a float: a
        temperature with central intervals; 1.0: the raw model).
      outputs: also report error by group and calibration, and return the per-example outputs.
      seed: the seed of the groups' bootstrap intervals.

    Returns:
      The report (see `report`), and with `outputs` the report's `groups`, `largest_mae_gap` and
      `calibration`, and a dict of per-example host arrays [N, ...] in the split's order.
    """
    fitted = temperature if isinstance(temperature, calibration.Calibration) else calibration.Calibration(temperature)
    sums, per_example = self._collect(state, fitted.temperature, outputs)
    with jax.transfer_guard("allow"):  # the evaluation's fetches
      report = self.report({k: metrics.fetch_array(v).astype(np.float64) for k, v in sums.items()})
      if not outputs:
        return report
      age = self._device_ages()
      groupings = self.groupings()
      by_group = groups.report(per_example["predicted_age"], age, groupings, seed=seed)
      report["groups"], report["largest_mae_gap"] = by_group["groups"], by_group["largest_gaps"]
      report["calibration"] = calibration.report(
        per_example["logits"], per_example["distribution"], self.bins, age, fitted, groupings
      )
      host = {k: metrics.fetch_array(per_example[k]) for k in (*OUTPUT_KEYS, "distribution", "raw")}
      # NIST's age-check rates of the point prediction (Challenge-T, 13-16, MAE 18-30), by group.
      report["age_checks"] = age_checks.nist_rates(host["predicted_age"], self.data.age, groupings, seed=seed)
    return report, host

  def per_example(self, state: models.Weights, temperature: "float | calibration.Calibration" = 1.0) -> dict:
    """The split's per-example host outputs alone (`run`'s with outputs, without its reports): for age checks."""
    fitted = temperature if isinstance(temperature, calibration.Calibration) else calibration.Calibration(temperature)
    _, per_example = self._collect(state, fitted.temperature, True)
    with jax.transfer_guard("allow"):
      return {k: metrics.fetch_array(per_example[k]) for k in (*OUTPUT_KEYS, "distribution")}

  def run_age_checks(self, state: models.Weights, threshold: int, target: float) -> dict[str, Any]:
    """`run`'s report (without outputs) and the split's age-check point rates (`age_checks.point_report`).

    The trainer's evaluation with config.eval.age_check: one pass gives the sums and the per-example
    outputs. P(age < T) is the raw model's (temperature 1): no temperature is fitted until the run ends.
    """
    sums, per_example = self._collect(state, 1.0, True)
    with jax.transfer_guard("allow"):  # the evaluation's fetches
      report = self.report({k: metrics.fetch_array(v).astype(np.float64) for k, v in sums.items()})
      estimate, raw = (metrics.fetch_array(per_example[k]) for k in ("predicted_age", "raw"))
    under = age_checks.under_probability(raw, np.asarray(self.bins), threshold) if threshold else None
    return {**report, **age_checks.point_report(estimate, under, self.data.age, self.groupings(), threshold, target)}

  def flipped(self, flip: bool) -> "Evaluator":
    """This evaluator with flip averaging on or off (its own jitted steps)."""
    if flip == self.flip:
      return self
    return Evaluator(
      self.model, self.loss_fn, self.data, self.batch_size, self.mesh, epsilon_sigma=self.epsilon_sigma, flip=flip
    )

  def fit_calibration(self, state: models.Weights) -> dict[str, Any]:
    """Fits this way of predicting's calibration (calibration.fit) to this split."""
    _, per_example = self._collect(state, 1.0, True)
    with jax.transfer_guard("allow"):
      return calibration.fit(per_example["logits"], self.bins, self._device_ages())

  def report(self, sums: dict[str, np.ndarray]) -> dict[str, Any]:
    """The report of host sums: means, CS@k, MAE per age group, mean predicted std, which sigma scored."""
    count = float(sums["count"])
    mean = lambda key: float(sums[key]) / count  # noqa: E731
    groups = {
      name: {"count": int(c), "mae": float(e / c) if c else None}
      for name, c, e in zip(metrics.AGE_GROUPS, sums["group_count"], sums["group_abs_error"])
    }
    buckets = {
      name: {"count": int(c), "mae": float(e / c) if c else None, "mean_error": float(d / c) if c else None}
      for (name, _, _), c, e, d in zip(
        metrics.AGE_BUCKETS, sums["bucket_count"], sums["bucket_abs_error"], sums["bucket_error"]
      )
    }
    with_std = int((self.data.age_std > 0).sum())
    return {
      "num_examples": int(count),
      "loss": mean("loss"),
      "mae": mean("mae"),
      # The unified benchmark's MAE and CS@5: of the raw model's posterior median in whole years.
      "bench_mae": mean("bench_mae"),
      "bench_cs5": mean("bench_cs5"),
      "epsilon_error": mean("epsilon_error"),
      "cumulative_score": {str(k): float(v) / count for k, v in zip(metrics.CS_THRESHOLDS, sums["cs"])},
      "mae_by_age_group": groups,
      "mae_by_bucket": buckets,  # children, teenagers, minors, adults, the old: MAE and signed mean error
      "mae_minors": buckets["minors"]["mae"],  # None when the split has no one under 18
      "mean_predicted_std": mean("std"),
      "epsilon_sigma": {"default": float(self.epsilon_sigma), "per_image_age_std": with_std},
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
  """The scores the trainer logs and keeps in final_metrics.json: loss, MAE, epsilon-error, CS@5, minors' MAE.

  And the benchmark's MAE and CS@5 (`bench_mae`, `bench_cs5`: of the posterior median in whole years).

  `mae_minors` is None when the split has no one under 18 (nothing is logged for it then).
  """
  return {
    "loss": report["loss"],
    "mae": report["mae"],
    "epsilon_error": report["epsilon_error"],
    "cs5": report["cumulative_score"]["5"],
    "mae_minors": report["mae_minors"],
    "bench_mae": report["bench_mae"],
    "bench_cs5": report["bench_cs5"],
  }


def calibrate(evaluator: Evaluator, state: Any, workdir: storage.Location, split: str) -> dict[str, Any]:
  """Fits single views' and flip averages' calibrations on `evaluator`'s split; writes WORKDIR/calibration.json.

  Returns the record (process 0 writes it): split, step, and `calibration.fit`'s record per way.
  """
  record = {
    "split": split,
    "step": int(metrics.fetch_array(state.step)),
    "interval_buckets": [b[0] for b in calibration.INTERVAL_BUCKETS],
    **{calibration.way(flip): evaluator.flipped(flip).fit_calibration(state) for flip in (False, True)},
  }
  if jax.process_index() == 0:
    calibration.write(workdir, record)
  return record


def age_check(
  evaluator: Evaluator,
  state: Any,
  fitted: calibration.Calibration,
  per_example: dict[str, Any],
  validation: Evaluator | None,
  threshold: int,
  target: float,
  splits: tuple[str, str],
) -> dict[str, Any]:
  """`age_checks.check` of `evaluator`'s split (its `run` outputs): the rules chosen on `validation`'s split.

  `validation` None: chosen on the same split (the report says it is not held out); `splits` names
  (the split chosen on, the split checked on).
  """
  bins = np.asarray(evaluator.bins)
  if validation is None:
    val_outputs, val_age = per_example, evaluator.data.age
  else:
    val_outputs, val_age = validation.per_example(state, fitted), validation.data.age

  def arrays(outputs: dict[str, Any], age: np.ndarray) -> dict[str, np.ndarray]:
    under = age_checks.under_probability(outputs["distribution"], bins, threshold)
    return {"under": under, "estimate": np.asarray(outputs["predicted_age"], np.float64), "age": np.asarray(age)}

  result = age_checks.check(
    threshold, target, arrays(val_outputs, val_age), arrays(per_example, evaluator.data.age), evaluator.groupings()
  )
  result.update(validation_split=splits[0], test_split=splits[1], held_out=validation is not None)
  return result


def format_table(report: dict[str, Any]) -> str:
  """Formats an evaluation report as a short human-readable table."""
  lines = [
    f"{report['split']} split, checkpoint {report['checkpoint']} (step {report['step']})"
    f"{', flip-averaged' if report['flip'] else ''}: {report['num_examples']} examples",
    f"  MAE                 {report['mae']:.3f} years",
    f"  benchmark's MAE     {report['bench_mae']:.3f} years, CS@5 {report['bench_cs5']:.3f}  "
    "(posterior median in whole years, temperature 1)",
    f"  epsilon-error       {report['epsilon_error']:.4f}",
    f"  mean predicted std  {report['mean_predicted_std']:.2f} years",
    "  CS@k                " + "  ".join(f"{k}:{v:.3f}" for k, v in report["cumulative_score"].items()),
    "  MAE by age group",
  ]
  for name, group in report["mae_by_age_group"].items():
    mae = "-" if group["mae"] is None else f"{group['mae']:.3f}"
    lines.append(f"    {name:>6}  {mae:>8}  ({group['count']} examples)")
  lines.append("  children and the old: MAE, mean signed error (+: predicted too old)")
  for name, bucket in report["mae_by_bucket"].items():
    if bucket["mae"] is None:
      lines.append(f"    {name:>6}  {'-':>8}  ({bucket['count']} examples)")
    else:
      lines.append(f"    {name:>6}  {bucket['mae']:>8.3f}  {bucket['mean_error']:+8.3f}  ({bucket['count']} examples)")
  if "groups" in report:
    lines.append("  MAE by group, 95% bootstrap interval")
    for grouping, entries in report["groups"].items():
      if grouping == "age_group":
        continue  # above
      for name, g in entries.items():
        ci = "" if g["mae"] is None else f"{g['mae']:8.3f}  [{g['mae_ci95'][0]:.2f}, {g['mae_ci95'][1]:.2f}]"
        lines.append(f"    {grouping:>10} {name:<10}{ci:<26}({g['count']} examples)")
    lines.append("  largest MAE gap between groups (gap [95% interval]: worst vs best group)")
    lines.extend(groups.format_gaps(report["largest_mae_gap"], report["groups"]))
  if "calibration" in report:
    c = report["calibration"]
    coverage = lambda key: "  ".join(f"{float(k):.0%}:{v:.3f}" for k, v in c[key].items())  # noqa: E731
    adjusted = "adjusted by age bucket" if c["interval_masses"] else "central, not adjusted"
    lines += [
      f"  calibration (temperature {c['temperature']:.3f})",
      f"    NLL       {c['nll']:.4f}   raw model {c['nll_uncalibrated']:.4f}",
      f"    calibration coverage (randomized PIT)  {coverage('coverage')}",
      f"      raw model                            {coverage('coverage_uncalibrated')}",
      f"    interval as shown ({adjusted}, whole years)  {coverage('coverage_shown')}",
      "    interval as shown by age bucket and group: 80%, 90% (calibration coverage 90%)",
    ]
    rows = [("age", name, b) for name, b in c["coverage_by_bucket"].items()]
    rows += [(grouping, name, g) for grouping, entries in c["coverage_by_group"].items() for name, g in entries.items()]
    for kind, name, entry in rows:
      shown, pit = entry["coverage_shown"], entry["coverage"]["0.9"]
      cells = "-" if pit is None else f"{shown['0.8']:.3f}  {shown['0.9']:.3f}  ({pit:.3f})"
      lines.append(f"      {kind:>10} {name:<10} {cells:<26}({entry['count']} examples)")
  if "age_checks" in report:
    lines += age_checks.format_lines(report)
  return "\n".join(lines)
