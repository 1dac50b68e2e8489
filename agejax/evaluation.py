"""Evaluator: one jitted eval step for every score of a split; used by the train loop and scripts/evaluate.py."""

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agejax import augment, checkpointing, labels, metrics, parallel, plots, steps, storage
from agejax.data import pipeline

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
      outputs: jax.jit(
        functools.partial(self._step, outputs=outputs),
        in_shardings=(replicated, replicated, sharded),
        out_shardings=replicated,
      )
      for outputs in (False, True)
    }
    self._zeros = jax.device_put(metrics.report_zeros(), replicated)

  def _step(self, state: steps.TrainState, sums: metrics.Sums, batch: dict, *, outputs: bool):
    fns, size = self.fns, self.fns.cfg.image_size
    logits, _ = fns.logits(state.params, state.model_state, augment.preprocess(batch["image"], size), train=False)
    probs = jax.nn.softmax(logits)
    if self.flip:
      mirrored, _ = fns.logits(
        state.params, state.model_state, augment.preprocess(batch["image"][:, :, ::-1], size), train=False
      )
      probs = 0.5 * (probs + jax.nn.softmax(mirrored))
      logits = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))  # the loss of the averaged distribution
    ages = batch["age"].astype(jnp.float32)
    out = {
      "predicted_age": labels.expected_age(probs, fns.bins),
      "argmax_age": labels.argmax_age(probs, fns.bins),
      "std": labels.distribution_std(probs, fns.bins),
    }
    batch_sums = metrics.report_sums(
      fns.loss_fn(logits, ages), out["predicted_age"], ages, fns.sigma(batch), out["std"], batch["mask"]
    )
    sums = metrics.add(sums, batch_sums)
    return (sums, {**out, "distribution": probs}) if outputs else sums

  def run(
    self, state: steps.TrainState, *, outputs: bool = False
  ) -> dict[str, Any] | tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluates `state` on the whole split.

    Args:
      state: the model state, replicated over the mesh.
      outputs: also return the per-example outputs, in the split's order.

    Returns:
      The report (see `report`), and with `outputs` a dict of per-example arrays [N, ...].
    """
    step, sums = self._steps[outputs], self._zeros
    in_flight, collected = parallel.InFlight(), []
    batches = pipeline.device_prefetch(
      pipeline.eval_batches(self.data, self.batch_size), parallel.data_sharded(self.mesh)
    )
    for batch in batches:
      result = step(state, sums, batch)
      sums = result[0] if outputs else result
      if outputs:
        collected.append(result[1])
      in_flight.add(sums)
    with jax.transfer_guard("allow"):  # the evaluation's one fetch
      host = {k: metrics.fetch_array(v).astype(np.float64) for k, v in sums.items()}
      per_example = (
        {
          k: np.concatenate([metrics.fetch_array(o[k]) for o in collected])[: len(self.data)]
          for k in (*OUTPUT_KEYS, "distribution")
        }
        if outputs
        else None
      )
    report = self.report(host)
    return (report, per_example) if outputs else report

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


def evaluate_workdir(
  config: ml_collections.ConfigDict | None,
  workdir: storage.Location,
  split: str = "test",
  *,
  checkpoint: str | int = "best",
  flip: bool = False,
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

  Returns:
    The report, with the workdir, split, checkpoint, step and flip.
  """
  config, fns, state = checkpointing.load_trained(workdir, checkpoint, config)
  data = pipeline.load_labelled_split(config, split)
  batch_size = config.get("eval_batch_size", 0) or config.batch_size
  report, per_example = Evaluator(fns, data, batch_size, parallel.make_mesh(), flip=flip).run(state, outputs=True)
  report = {
    "workdir": str(workdir),
    "split": split,
    "checkpoint": str(checkpoint),
    "step": int(state.step),
    "flip": flip,
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
  return "\n".join(lines)
