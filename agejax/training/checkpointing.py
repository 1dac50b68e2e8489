"""Orbax checkpoints in WORKDIR/checkpoints (the latest few plus the best by MAE); loading a trained workdir."""

import logging
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from agejax import errors, parallel, storage
from agejax.training import augment, steps

BEST_METRIC = "eval_mae"
CONFIG_FILE = "config.json"
# What inference needs besides the weights, recorded by the trainer: the stored face size that new
# photos are cropped to, the age bins and the preprocessing. Nothing has to ask the dataset.
INFERENCE_FILE = "inference.json"
TRAIN_COMMAND = "python scripts/train.py --config configs/vgg16_kl.py --workdir {workdir}"
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


def inference_record(config: ml_collections.ConfigDict, input_size: int) -> dict[str, Any]:
  """What a trained model needs at inference (WORKDIR/inference.json): crop size, age bins, preprocessing."""
  return {
    "input_size": int(input_size),
    "image_size": config.data.image_size,
    "min_age": config.labels.min_age,
    "max_age": config.labels.max_age,
    "mean": list(augment.IMAGENET_MEAN),
    "std": list(augment.IMAGENET_STD),
  }


def load_config(workdir: storage.Location) -> ml_collections.ConfigDict:
  """Returns the training config the trainer saved as WORKDIR/config.json."""
  path = storage.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise errors.MissingInput(f"{path} does not exist: pass the training config with --config")
  return ml_collections.ConfigDict(storage.read_json_object(path))


def load_inference_record(workdir: storage.Location) -> dict[str, Any]:
  """Returns WORKDIR/inference.json, which the trainer writes when it starts."""
  path = storage.path(workdir) / INFERENCE_FILE
  if not path.exists():
    raise errors.MissingInput(
      f"{path} does not exist (the workdir predates it): rerun its training command once "
      f"to record it; a finished run records it and exits"
    )
  return storage.read_json_object(path)


def no_checkpoints_message(workdir: storage.Location) -> str:
  """The one-line error for a workdir that holds no trained model."""
  return f"{workdir} holds no checkpoints; train a model first: " + TRAIN_COMMAND.format(workdir=workdir)


def resolve_step(ckpts: Checkpoints, checkpoint: str | int, workdir: storage.Location) -> int:
  """Returns the step that `checkpoint` ('best', 'latest' or a step number) names in WORKDIR."""
  latest = ckpts.latest_step()
  if latest is None:
    raise errors.MissingInput(no_checkpoints_message(workdir))
  checkpoint = str(checkpoint)
  if checkpoint == "latest":
    return latest
  if checkpoint == "best":
    best = ckpts.best_step()
    if best is None:  # a run stopped before its first evaluation has no ranked checkpoint
      logging.warning("%s has no evaluated checkpoint; using the latest, step %d", ckpts.directory, latest)
      return latest
    return best
  available = sorted(ckpts.manager.all_steps())
  if not checkpoint.isdigit():
    raise errors.UserError(f"--checkpoint={checkpoint!r}: use {CHECKPOINT_CHOICES} (available steps: {available})")
  if int(checkpoint) not in available:
    raise errors.UserError(f"--checkpoint={checkpoint}: no such step in {ckpts.directory} (available: {available})")
  return int(checkpoint)


def load_trained(
  workdir: storage.Location, checkpoint: str | int = "best", config: ml_collections.ConfigDict | None = None
) -> tuple[ml_collections.ConfigDict, steps.Steps, steps.TrainState]:
  """Restores a trained workdir's checkpoint, replicated over every device.

  Nothing is allocated before the restore: the target is the abstract shape of the state the
  trainer builds.

  Args:
    workdir: the training workdir (a path or a gs:// URL).
    checkpoint: 'best' (lowest eval MAE), 'latest' or a step number.
    config: the training config; default: the WORKDIR/config.json the trainer wrote.

  Returns:
    (config, the model's step functions, the restored state).
  """
  workdir = storage.path(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise errors.MissingInput(no_checkpoints_message(workdir))
  config = load_config(workdir) if config is None else config
  ckpts = Checkpoints(workdir / "checkpoints", read_only=True)
  try:
    step = resolve_step(ckpts, checkpoint, workdir)
    # Restoring needs the optimizer state's structure, not the schedule's values, so one step per
    # epoch stands in for the training set's size (the data need not be on this machine).
    fns, abstract, _ = steps.create(config, 1, abstract=True)
    replicated = parallel.replicated(parallel.make_mesh())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    state = ckpts.restore(target, step)
  finally:
    ckpts.close()
  return config, fns, state
