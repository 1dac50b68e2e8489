"""Orbax checkpoints in WORKDIR/checkpoints (the latest few plus the best by MAE) and what the trainer records."""

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from agejax import errors, models, settings, storage

BEST_METRIC = "eval_mae"
CONFIG_FILE = "config.json"
# What inference needs besides the weights, recorded by the trainer: the stored face size that new
# photos are cropped to, the age bins and the preprocessing. Nothing has to ask the dataset.
INFERENCE_FILE = "inference.json"
CHECKPOINT_CHOICES = "best, latest or a step number"


def _mae(metrics: dict) -> float:
  return metrics[BEST_METRIC]


class Checkpoints:
  """Async Orbax CheckpointManager of plain pytrees; restorable with plain Orbax too."""

  def __init__(self, directory: storage.Location, keep: int = 3, *, asynchronous: bool = True, read_only: bool = False):
    policy = checkpoint_managers.AnyPreservationPolicy(
      [
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_mae, reverse=True, n=1, keep_checkpoints_without_metrics=False),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      best_fn=_mae,
      best_mode="min",
      preservation_policy=None if read_only else policy,
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=asynchronous,
      cleanup_tmp_directories=True,
    )
    self.directory = storage.path(directory)  # Orbax wants local paths absolute
    if not read_only:
      for partial in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
        # An interrupted write; Orbax deletes it and never restores from it.
        logging.warning("ignoring incomplete checkpoint %s (its write was interrupted)", partial)
    # One item of plain pytrees: its metadata (names, shapes) can be read without restoring.
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler())
    self._closed = False

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step of the checkpoint with the lowest eval MAE, or None."""
    steps_with_metrics = [s for s in self.manager.all_steps() if self.manager.metrics(s)]
    return self.manager.best_step() if steps_with_metrics else None

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None, *, force: bool = False) -> None:
    """Starts writing `state` at `step` in the background (metrics rank it for 'best')."""
    self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=force)

  def mismatch(self, target: Any, step: int) -> str | None:
    """The first array whose name or shape differs between checkpoint `step` and `target`, or None."""
    saved = _shapes(self.manager.item_metadata(step))
    wanted = _shapes(target)
    for name in sorted(saved.keys() | wanted.keys(), key=lambda n: (n.startswith("opt_state"), n)):  # params first
      if name not in saved:
        return f"{name} is not in the checkpoint"
      if name not in wanted:
        return f"{name} is in the checkpoint but not in this config's state"
      if saved[name] != wanted[name]:
        return f"{name} has shape {saved[name]} there and {wanted[name]} in this config"
    return None

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores the checkpoint at `step` (default latest) into the structure and shardings of `target`.

    Raises ValueError naming the first differing array when the checkpoint was written by another
    config (a changed model or optimizer), before anything is read.
    """
    step = self.latest_step() if step is None else step
    assert step is not None  # callers restore only once a checkpoint exists (train resumes, loading resolves one)
    problem = self.mismatch(target, step)
    if problem:
      raise errors.UserError(
        f"{self.directory}: checkpoint step {step} does not fit this config: {problem} (model or "
        f"optimizer settings changed? use a new workdir, or the config that wrote it)"
      )
    return self.manager.restore(step, args=ocp.args.StandardRestore(target))

  def reached_preemption(self, step: int) -> bool:
    """True, on every process at the same step, once any process got a preemption notice."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until every pending write is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and releases the manager; idempotent."""
    if not self._closed:
      self._closed = True
      self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Array shapes of a pytree (or of Orbax tree metadata) by '/'-joined key names."""

  def name(key) -> str:
    return str(next(getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)))

  return {
    "/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def inference_record(cfg: settings.Settings, model: models.AgeModel, input_size: int) -> dict[str, Any]:
  """What a trained model needs at inference besides config.json (WORKDIR/inference.json).

  The stored face size new photos are cropped to (the data's, not the model's input size), the
  backbone's name and the input its weights expect.
  """
  return {"input_size": int(input_size), "model": cfg.model.name, "input_spec": model.input_spec.to_json()}
