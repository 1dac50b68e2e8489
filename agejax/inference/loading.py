"""Loading a trained workdir: its config, what inference needs (inference.json), its checkpoints restored."""

from typing import Any

import ml_collections

from agejax import errors, models, settings, storage
from agejax.training import checkpointing, learner


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
    raise errors.MissingInput(checkpointing.no_checkpoints_message(folder))
  cfg = settings.Settings.from_config(load_config(folder) if config is None else config)
  models.load_plugins(cfg.run.plugins)
  trained, state = checkpointing.restore_trained(folder, checkpoint, cfg, checkpointing.recorded_input_spec(folder))
  return cfg, trained, state
