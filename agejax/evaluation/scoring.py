"""Evaluator: one jitted eval step for every score of a split; used by the train loop and scripts/evaluate.py."""

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from agejax import labels, metrics, parallel, storage
from agejax.data import pipeline
from agejax.evaluation import calibration, groups, plots
from agejax.inference import prediction
from agejax.training import checkpointing, steps

OUTPUT_KEYS = ("predicted_age", "argmax_age", "std")  # per-example outputs kept in <split>_predictions.jsonl


class Evaluator:
  """Scores a model on every example of a split exactly once, in padded batches over the device mesh.

  One jitted step adds a batch's masked sums (loss, MAE, epsilon-error, CS@1..10, predicted std,
  counts and errors per age group) to the running sums and, when asked, returns the batch's
  per-example outputs (distribution, expected age, argmax age, std) from the same call.

  Args:
    fns: the model's step functions (steps.create).
    data: the split, with true ages.
    batch_size: global eval batch, rounded up to a multiple of the device count.
    mesh: the device mesh.
    flip: average each face's distribution with its mirror image's (test-time augmentation).
  """

  def __init__(
    self, fns: steps.Steps, data: pipeline.ArraySplit, batch_size: int, mesh: jax.sharding.Mesh, *, flip: bool = False
  ):
    self.fns, self.data, self.mesh, self.flip = fns, data, mesh, flip
    n = jax.device_count()
    self.batch_size = -(-batch_size // n) * n
    replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
    # The sums are a few small arrays, not donated: the loop waits on them to bound the dispatch.
    self._steps = {
      outputs: jax.jit(fn, in_shardings=(replicated, replicated, sharded, replicated), out_shardings=replicated)
      for outputs, fn in ((False, self._sums_step), (True, self._outputs_step))
    }
    # The per-example outputs of all batches, in the split's order without the padding, on every device.
    self._gather = jax.jit(
      lambda batches: jax.tree.map(lambda *xs: jnp.concatenate(xs)[: len(data)], *batches), out_shardings=replicated
    )
    self._zeros = jax.device_put(metrics.report_zeros(), replicated)
    self._replicated = replicated

  def _sums_step(self, state: steps.TrainState, sums: metrics.Sums, batch: dict, temperature: jax.Array):
    return self._step(state, sums, batch, temperature, outputs=False)

  def _outputs_step(self, state: steps.TrainState, sums: metrics.Sums, batch: dict, temperature: jax.Array):
    return self._step(state, sums, batch, temperature, outputs=True)

  def _step(self, state: steps.TrainState, sums: metrics.Sums, batch: dict, temperature: jax.Array, *, outputs: bool):
    fns = self.fns
    logits, probs = prediction.outputs(fns, state, batch["image"], temperature, self.flip)
    # The loss of the distribution reported (exactly the raw logits' loss at temperature 1).
    scored = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny)) if self.flip else logits / temperature
    ages = batch["age"].astype(jnp.float32)
    out = {
      "predicted_age": labels.expected_age(probs, fns.bins),
      "argmax_age": labels.argmax_age(probs, fns.bins),
      "std": labels.distribution_std(probs, fns.bins),
    }
    batch_sums = metrics.report_sums(
      fns.loss_fn(scored, ages), out["predicted_age"], ages, fns.sigma(batch), out["std"], batch["mask"]
    )
    sums = metrics.add(sums, batch_sums)
    return (sums, {**out, "distribution": probs, "logits": logits}) if outputs else sums

  def _collect(self, state: steps.TrainState, temperature: float, outputs: bool):
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

  def run(
    self, state: steps.TrainState, *, temperature: float = 1.0, outputs: bool = False, seed: int = groups.SEED
  ) -> dict[str, Any] | tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluates `state` on the whole split.

    Args:
      state: the model state, replicated over the mesh.
      temperature: divides the logits (calibration.json's; 1.0: the raw model).
      outputs: also report error by group and calibration, and return the per-example outputs.
      seed: the seed of the groups' bootstrap intervals.

    Returns:
      The report (see `report`), and with `outputs` the report's `groups`, `largest_mae_gap` and
      `calibration`, and a dict of per-example host arrays [N, ...] in the split's order.
    """
    sums, per_example = self._collect(state, temperature, outputs)
    with jax.transfer_guard("allow"):  # the evaluation's fetches
      report = self.report({k: metrics.fetch_array(v).astype(np.float64) for k, v in sums.items()})
      if not outputs:
        return report
      age = self._device_ages()
      by_group = groups.report(per_example["predicted_age"], age, self.groupings(), seed=seed)
      report["groups"], report["largest_mae_gap"] = by_group["groups"], by_group["largest_gaps"]
      report["calibration"] = calibration.report(
        per_example["logits"], per_example["distribution"], self.fns.bins, age, temperature
      )
      host = {k: metrics.fetch_array(per_example[k]) for k in (*OUTPUT_KEYS, "distribution")}
    return report, host

  def fit_temperature(self, state: steps.TrainState) -> dict[str, float]:
    """Fits calibration's temperature to this split; returns temperature, nll_before and nll_after."""
    _, per_example = self._collect(state, 1.0, True)
    with jax.transfer_guard("allow"):
      age = self._device_ages()
      logits, mask = per_example["logits"], jnp.ones_like(age)
      temperature = calibration.fit_temperature(logits, self.fns.bins, age, mask)
      nll = lambda t: float(calibration.mean_nll(logits, self.fns.bins, age, mask, jnp.log(t)))  # noqa: E731
      t = float(metrics.fetch_array(temperature))
      return {"temperature": t, "nll_before": nll(1.0), "nll_after": nll(t)}

  def report(self, sums: dict[str, np.ndarray]) -> dict[str, Any]:
    """The report of host sums: means, CS@k, MAE per age group, mean predicted std, which sigma scored."""
    count = float(sums["count"])
    mean = lambda key: float(sums[key]) / count  # noqa: E731
    groups = {
      name: {"count": int(c), "mae": float(e / c) if c else None}
      for name, c, e in zip(metrics.AGE_GROUPS, sums["group_count"], sums["group_abs_error"])
    }
    with_std = int((self.data.age_std > 0).sum())
    return {
      "num_examples": int(count),
      "loss": mean("loss"),
      "mae": mean("mae"),
      "epsilon_error": mean("epsilon_error"),
      "cumulative_score": {str(k): float(v) / count for k, v in zip(metrics.CS_THRESHOLDS, sums["cs"])},
      "mae_by_age_group": groups,
      "mean_predicted_std": mean("std"),
      "epsilon_sigma": {"default": float(self.fns.cfg.epsilon_sigma), "per_image_age_std": with_std},
    }


def headline(report: dict[str, Any]) -> dict[str, float]:
  """The scores the trainer logs and keeps in final_metrics.json: loss, MAE, epsilon-error, CS@5."""
  return {
    "loss": report["loss"],
    "mae": report["mae"],
    "epsilon_error": report["epsilon_error"],
    "cs5": report["cumulative_score"]["5"],
  }


def calibrate(evaluator: Evaluator, state: steps.TrainState, workdir: storage.Location, split: str) -> dict[str, Any]:
  """Fits the temperature on `evaluator`'s split and writes WORKDIR/calibration.json (process 0); returns it."""
  record = {"split": split, "step": int(metrics.fetch_array(state.step)), **evaluator.fit_temperature(state)}
  if jax.process_index() == 0:
    calibration.write(workdir, record)
  return record


def evaluate_workdir(
  config: ml_collections.ConfigDict | None,
  workdir: storage.Location,
  split: str = "test",
  *,
  checkpoint: str | int = "best",
  flip: bool = False,
  calibrated: bool = True,
  fit_calibration: bool = False,
) -> dict[str, Any]:
  """Evaluates a trained workdir's checkpoint on every example of a split and writes WORKDIR/eval/.

  Writes `<split>.json` (the report), `<split>_predictions.jsonl` (one line per example) and
  `<split>_*.png` plots.

  Args:
    config: the training config; None: WORKDIR/config.json.
    workdir: the training workdir (a path or a gs:// URL).
    split: the dataset split to score.
    checkpoint: 'best', 'latest' or a step number.
    flip: average each face's distribution with its mirror image's.
    calibrated: apply WORKDIR/calibration.json's temperature when present (False: the raw model).
    fit_calibration: first fit the temperature of this checkpoint on the config's eval split (the
      validation split) and write WORKDIR/calibration.json.

  Returns:
    The report, with the workdir, split, checkpoint, step, flip and temperature.
  """
  config, fns, state = checkpointing.load_trained(workdir, checkpoint, config)
  batch_size = config.get("eval_batch_size", 0) or config.batch_size
  mesh = parallel.make_mesh()
  if fit_calibration:
    fit_split = config.data.eval_split
    fitted = calibrate(
      Evaluator(fns, pipeline.load_labelled_split(config, fit_split), batch_size, mesh), state, workdir, fit_split
    )
    logging.info("calibration: temperature %.4f on %s", fitted["temperature"], fit_split)
  temperature = calibration.load_temperature(workdir, int(state.step)) if calibrated else None
  data = pipeline.load_labelled_split(config, split)
  report, per_example = Evaluator(fns, data, batch_size, mesh, flip=flip).run(
    state, temperature=temperature or 1.0, outputs=True
  )
  report = {
    "workdir": str(workdir),
    "split": split,
    "checkpoint": str(checkpoint),
    "step": int(state.step),
    "flip": flip,
    "temperature": temperature or 1.0,
    **report,
  }
  if jax.process_index() == 0:
    out = storage.check_writable(storage.path(workdir) / "eval", "evaluation output folder")
    storage.write_json(out / f"{split}.json", report)
    storage.write_text(
      out / f"{split}_predictions.jsonl",
      "".join(
        json.dumps({"index": i, "age": float(data.age[i]), **{k: float(per_example[k][i]) for k in OUTPUT_KEYS}}) + "\n"
        for i in range(len(data))
      ),
    )
    plots.write_plots(report, data.age, per_example["predicted_age"], out, split)
  return report


def format_table(report: dict[str, Any]) -> str:
  """Formats an evaluation report as a short human-readable table."""
  lines = [
    f"{report['split']} split, checkpoint {report['checkpoint']} (step {report['step']})"
    f"{', flip-averaged' if report['flip'] else ''}: {report['num_examples']} examples",
    f"  MAE                 {report['mae']:.3f} years",
    f"  epsilon-error       {report['epsilon_error']:.4f}",
    f"  mean predicted std  {report['mean_predicted_std']:.2f} years",
    "  CS@k                " + "  ".join(f"{k}:{v:.3f}" for k, v in report["cumulative_score"].items()),
    "  MAE by age group",
  ]
  for name, group in report["mae_by_age_group"].items():
    mae = "-" if group["mae"] is None else f"{group['mae']:.3f}"
    lines.append(f"    {name:>6}  {mae:>8}  ({group['count']} examples)")
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
    lines += [
      f"  calibration (temperature {c['temperature']:.3f})",
      f"    NLL       {c['nll']:.4f}   raw model {c['nll_uncalibrated']:.4f}",
      f"    coverage  {coverage('coverage')}",
      f"    raw model {coverage('coverage_uncalibrated')}",
    ]
  return "\n".join(lines)
