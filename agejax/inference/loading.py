"""Loading a trained workdir: its config, what inference needs (inference.json), its checkpoints restored."""

import logging
from typing import Any

import jax
import ml_collections

from agejax import errors, models, parallel, settings, storage
from agejax.training import checkpointing, learner

TRAIN_COMMAND = "python scripts/train.py --config configs/vgg16_kl.py --workdir {workdir}"


def load_config(workdir: storage.Location) -> ml_collections.ConfigDict:
  """Returns the training config the trainer saved as WORKDIR/config.json."""
  path = storage.path(workdir) / checkpointing.CONFIG_FILE
  if not path.exists():
    raise errors.MissingInput(f"{path} does not exist: pass the training config with --config")
  return ml_collections.ConfigDict(storage.read_json_object(path))


def load_inference_record(workdir: storage.Location) -> dict[str, Any]:
  """Returns WORKDIR/inference.json, which the trainer writes when it starts."""
  path = storage.path(workdir) / checkpointing.INFERENCE_FILE
  if not path.exists():
    raise errors.MissingInput(
      f"{path} does not exist (the workdir predates it): rerun its training command once "
      f"to record it; a finished run records it and exits"
    )
  return storage.read_json_object(path)


def input_spec(record: dict[str, Any]) -> models.InputSpec:
  """The input the trained weights expect; ImageNet's for workdirs trained before specs were recorded."""
  return models.InputSpec.from_json(record.get("input_spec"))


def no_checkpoints_message(workdir: storage.Location) -> str:
  """The one-line error for a workdir that holds no trained model."""
  return f"{workdir} holds no checkpoints; train a model first: " + TRAIN_COMMAND.format(workdir=workdir)


def resolve_step(ckpts: checkpointing.Checkpoints, checkpoint: str | int, workdir: storage.Location) -> int:
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
    raise errors.UserError(
      f"--checkpoint={checkpoint!r}: use {checkpointing.CHECKPOINT_CHOICES} (available steps: {available})"
    )
  if int(checkpoint) not in available:
    raise errors.UserError(f"--checkpoint={checkpoint}: no such step in {ckpts.directory} (available: {available})")
  return int(checkpoint)


def load_trained(
  workdir: storage.Location, checkpoint: str | int = "best", config: ml_collections.ConfigDict | None = None
) -> tuple[settings.Settings, learner.Learner, learner.TrainState]:
  """Restores a trained workdir's checkpoint, replicated over every device.

  Nothing is allocated before the restore: the target is the abstract shape of the state the
  trainer builds. The model reads its input the way the weights expect (WORKDIR/inference.json).

  Args:
    workdir: the training workdir (a path or a gs:// URL).
    checkpoint: 'best' (lowest eval MAE), 'latest' or a step number.
    config: the training config; default: the WORKDIR/config.json the trainer wrote.

  Returns:
    (the settings, the learner (model, optimizer, loss), the restored state).
  """
  folder = storage.path(workdir)
  if not (folder / "checkpoints").is_dir():
    raise errors.MissingInput(no_checkpoints_message(folder))
  cfg = settings.Settings.from_config(load_config(folder) if config is None else config)
  models.load_plugins(cfg.run.plugins)
  # Workdirs from before inference.json (and before input specs) were all trained on ImageNet's input.
  has_record = (folder / checkpointing.INFERENCE_FILE).exists()
  spec = input_spec(load_inference_record(folder)) if has_record else models.IMAGENET
  ckpts = checkpointing.Checkpoints(folder / "checkpoints", read_only=True)
  try:
    step = resolve_step(ckpts, checkpoint, folder)
    # Restoring needs the optimizer state's structure, not the schedule's values, so one step per
    # epoch stands in for the training set's size (the data need not be on this machine).
    trained, abstract, _ = learner.create(cfg, 1, abstract=True, input_spec=spec)
    replicated = parallel.replicated(parallel.make_mesh())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    state = ckpts.restore(target, step)
  finally:
    ckpts.close()
  return cfg, trained, state
