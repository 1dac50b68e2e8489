"""Orbax checkpoints in WORKDIR/checkpoints (the latest few plus the best by MAE) and what the trainer records.

Also restoring a trained workdir's checkpoint (`restore_trained`, which inference's loading wraps) and
starting a run from another run's weights (`model.init_from`: `parse_init_from`, `weights_from_run`).
"""

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers

from agejax import cli, errors, metrics, models, parallel, settings, storage
from agejax.training import learner

BEST_METRIC = "eval_mae"  # what checkpoints written before eval.select_by are ranked by
# Each evaluated checkpoint's value of the metric eval.select_by names: "best" is the lowest, and of
# equal values the later step (Orbax sorts stably; the benchmark's `<=` keeps the later epoch).
SELECTED = "selected"
CONFIG_FILE = "config.json"
# What inference needs besides the weights, recorded by the trainer: the stored face size that new
# photos are cropped to, the age bins and the preprocessing. Nothing has to ask the dataset.
INFERENCE_FILE = "inference.json"
STATE_ITEM = "default"  # each step folder's train state: the item name Orbax gives a single item
INPUT_ITEM = "input"  # data.reader='grain': the Grain iterator's position, one JSON file per process


def _mae(metrics: dict) -> float:
  return metrics.get(SELECTED, metrics[BEST_METRIC])


def checkpoint_metrics(eval_metrics: dict[str, Any], select_by: str) -> dict[str, float]:
  """What an evaluated checkpoint is saved with: its eval MAE, the benchmark's, and the value that ranks it."""
  scored = {BEST_METRIC: eval_metrics["mae"], "eval_bench_mae": eval_metrics["bench_mae"]}
  return {**scored, SELECTED: eval_metrics[select_by]}


class Checkpoints:
  """Async Orbax CheckpointManager of plain pytrees; restorable with plain Orbax too."""

  def __init__(
    self,
    directory: storage.Location,
    keep: int = 3,
    *,
    asynchronous: bool = True,
    read_only: bool = False,
    input_state: bool = False,
  ):
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
      cleanup_tmp_directories=not read_only,  # a reader leaves the writer's temporaries alone
    )
    self.directory = storage.path(directory)  # Orbax wants local paths absolute
    if not read_only:
      for partial in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
        # An interrupted write; Orbax deletes it and never restores from it.
        logging.warning("ignoring incomplete checkpoint %s (its write was interrupted)", partial)
    # One item of plain pytrees: its metadata (names, shapes) can be read without restoring. With
    # `input_state` (data.reader='grain') the Grain input's position is a second item, INPUT_ITEM, in the
    # same step folder; the train state stays where plain Orbax finds it (STATE_ITEM).
    handlers: Any = ocp.StandardCheckpointHandler()
    self.input_state = input_state
    if input_state:
      import grain

      handlers = {STATE_ITEM: handlers, INPUT_ITEM: grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._closed = False

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step of the checkpoint with the lowest eval.select_by metric (of equal ones the later), or None."""
    steps_with_metrics = [s for s in self.manager.all_steps() if self.manager.metrics(s)]
    return self.manager.best_step() if steps_with_metrics else None

  def save(
    self, step: int, state: Any, metrics: dict[str, float] | None = None, *, force: bool = False, position: Any = None
  ) -> None:
    """Starts writing `state` at `step` in the background (metrics rank it for 'best'), and the input's `position`."""
    args: Any = ocp.args.StandardSave(state)
    if self.input_state:
      import grain

      args = ocp.args.Composite(**{STATE_ITEM: args, INPUT_ITEM: grain.checkpoint.CheckpointSave(position)})
    self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore_position(self, position: Any, step: int) -> bool:
    """Restores the input's position saved at `step` into `position`; False when that checkpoint has none."""
    import grain

    if not (self.directory / str(step) / INPUT_ITEM).is_dir():
      return False  # written by the cache reader (or before the key): the step alone says where to go on
    self.manager.restore(step, args=ocp.args.Composite(**{INPUT_ITEM: grain.checkpoint.CheckpointRestore(position)}))
    return True

  def mismatch(self, target: Any, step: int) -> str | None:
    """The first array whose name or shape differs between checkpoint `step` and `target`, or None."""
    metadata = self.manager.item_metadata(step)
    saved = _shapes(metadata[STATE_ITEM] if self.input_state else metadata)
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
    if self.input_state:
      args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
      return self.manager.restore(step, args=args)[STATE_ITEM]
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


def no_checkpoints_message(workdir: storage.Location) -> str:
  """The one-line error for a workdir that holds no trained model: it does not exist, or has no checkpoints yet.

  The training command it suggests carries the config variant of WORKDIR/config.json when there is
  one (`:demo` for a run on the demo dataset).
  """
  folder = storage.path(workdir)
  if folder.exists():
    state = "holds no checkpoints"
  else:
    state = f"does not exist{_did_you_mean(folder)}"
  recorded = folder / CONFIG_FILE
  config = None
  if recorded.exists():
    try:
      config = storage.read_json_object(recorded)
    except ValueError:  # a corrupt config.json: the command without its variant still helps
      config = None
  return f"{workdir} {state}; train a model first: {train_command(workdir, config)}"


def _did_you_mean(folder: epath.Path) -> str:
  """' (did you mean DIR?)' naming a sibling workdir with checkpoints whose name is close (a typo); '' for none."""
  import difflib

  parent = folder.parent
  if storage.is_url(folder) or not parent.is_dir():
    return ""
  names = [p.name for p in parent.iterdir() if has_checkpoints(p)]
  close = difflib.get_close_matches(folder.name, names, n=1)
  return f" (did you mean {parent / close[0]}?)" if close else ""


# The config file of each backbone's recipe (configs/), for suggested commands.
CONFIG_FILES = {"vgg16": "configs/vgg16_kl.py", "resnet50": "configs/resnet50_kl.py"}


def config_argument(recorded: dict[str, Any] | None) -> str:
  """The `--config` value that gives a recorded config's recipe: 'configs/vgg16_kl.py:demo' for a demo run.

  Without a record (a workdir not trained yet), the default recipe's.
  """
  recorded = recorded or {}
  data, model = recorded.get("data") or {}, recorded.get("model") or {}
  file = CONFIG_FILES.get(str(model.get("name", "vgg16")), CONFIG_FILES["vgg16"])
  if data.get("name") != "demo":
    return file
  return f"{file}:{'tiny' if data.get('builder_config') == 'tiny' else 'demo'}"


def train_command(workdir: storage.Location, recorded: dict[str, Any] | None = None) -> str:
  """The command that trains WORKDIR with the recipe of its recorded config (`config_argument`)."""
  return f"python scripts/train.py --config {config_argument(recorded)} --workdir {workdir}"


def has_checkpoints(workdir: storage.Location) -> bool:
  """True when WORKDIR/checkpoints holds a step folder (read without opening, creating or cleaning anything)."""
  folder = storage.path(workdir) / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


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
    raise errors.UserError(f"--checkpoint={checkpoint!r}: use {cli.CHECKPOINT_CHOICES} (available steps: {available})")
  if int(checkpoint) not in available:
    raise errors.UserError(f"--checkpoint={checkpoint}: no such step in {ckpts.directory} (available: {available})")
  return int(checkpoint)


def scored_checkpoint(workdir: storage.Location, checkpoint: str | int) -> str:
  """What `checkpoint` named in WORKDIR, for reports: 'latest' where 'best' fell back to it (nothing evaluated yet)."""
  if str(checkpoint) != "best":
    return str(checkpoint)
  ckpts = Checkpoints(storage.path(workdir) / "checkpoints", read_only=True)
  try:
    return "best" if ckpts.best_step() is not None else "latest"
  finally:
    ckpts.close()


def recorded_input_spec(workdir: storage.Location) -> models.InputSpec:
  """The input a trained workdir's weights expect (its inference.json); ImageNet's for workdirs that predate it."""
  path = storage.path(workdir) / INFERENCE_FILE
  # Workdirs from before inference.json (and before input specs) were all trained on ImageNet's input.
  if not path.exists():
    return models.IMAGENET
  return models.InputSpec.from_json(storage.read_json_object(path).get("input_spec"))


def restore_trained(
  workdir: storage.Location, checkpoint: str | int, cfg: settings.Settings, spec: models.InputSpec
) -> tuple[learner.Learner, learner.TrainState]:
  """Restores a trained workdir's checkpoint ('best', 'latest' or a step), replicated over every device.

  Nothing is allocated before the restore: the target is the abstract shape of the state the
  trainer builds from `cfg` (the settings the workdir was trained with).

  Returns:
    (the learner (model with `spec`, optimizer, loss), the restored state).
  """
  folder = storage.path(workdir)
  if not (folder / "checkpoints").is_dir():
    raise errors.MissingInput(no_checkpoints_message(folder))
  ckpts = Checkpoints(folder / "checkpoints", read_only=True)
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
  return trained, state


def parse_init_from(value: str) -> tuple[str, str]:
  """`model.init_from` as (workdir, checkpoint): 'WORKDIR' is its best checkpoint, 'WORKDIR:STEP' that step.

  'WORKDIR:best' and 'WORKDIR:latest' work too; a gs:// URL's own colon is not a step.
  """
  head, sep, tail = value.rpartition(":")
  if sep and head and (tail.isdigit() or tail in ("best", "latest")):
    return head, tail
  return value, "best"


def source_settings(init_from: str) -> tuple[str, str, settings.Settings]:
  """(workdir, checkpoint, the settings it was trained with) of `model.init_from`; fails in one line naming it."""
  workdir, checkpoint = parse_init_from(init_from)
  where = f"config.model.init_from={init_from!r}"
  folder = storage.path(workdir)
  if not has_checkpoints(folder):
    state = "does not exist" if not folder.exists() else "holds no checkpoints"
    raise errors.MissingInput(f"{where}: {folder} {state}; name a finished agejax workdir (WORKDIR or WORKDIR:STEP)")
  recorded = folder / CONFIG_FILE
  if not recorded.exists():
    raise errors.MissingInput(f"{where}: {recorded} does not exist (the run that wrote those checkpoints records it)")
  if checkpoint.isdigit() and not (folder / "checkpoints" / checkpoint).is_dir():
    steps = sorted(int(p.name) for p in (folder / "checkpoints").iterdir() if p.name.isdigit())
    raise errors.UserError(f"{where}: no checkpoint step {checkpoint} in {folder / 'checkpoints'} (available: {steps})")
  return workdir, checkpoint, settings.Settings.from_config(storage.read_json_object(recorded))


def architecture(model: settings.ModelSettings) -> str:
  """The settings that shape a backbone's parameters, for messages: 'vgg16 (width_multiplier=1.0, batch_norm=False)'."""
  return f"{model.name} (width_multiplier={model.width_multiplier}, batch_norm={model.batch_norm})"


def check_same_backbone(cfg: settings.Settings, source: settings.Settings, init_from: str) -> None:
  """Fails in one line naming both when `model.init_from`'s run trained another backbone than `cfg` builds."""
  if architecture(cfg.model) != architecture(source.model):
    raise errors.UserError(
      f"config.model.init_from={init_from!r} trained backbone {architecture(source.model)}, which does not fit "
      f"this config's {architecture(cfg.model)}: set the same model.name, model.width_multiplier and model.batch_norm"
    )


def same_bins(a: settings.LabelSettings, b: settings.LabelSettings) -> bool:
  """True when two label settings give the same age bins (the head's outputs mean the same ages)."""
  return (a.min_age, a.max_age) == (b.min_age, b.max_age)


def weights_from_run(
  init_from: str,
  labels: settings.LabelSettings,
  params: Any,
  model_state: Any,
  *,
  head: str = "head",
  with_head: bool = True,
) -> tuple[Any, Any]:
  """Copies of `params` and `model_state` with `model.init_from`'s trained weights (an `overlay` of learner.create).

  The whole network comes across when the age bins match and `with_head` (model.init_from_head);
  otherwise the head (the parameter group `head`) keeps its fresh initialisation, as the benchmark's
  `*_pretrained` recipes start theirs, and where the bins differ a warning names both ranges.
  Optimizer state and step are not read: the new run starts them fresh.
  """
  workdir, checkpoint, source = source_settings(init_from)
  models.load_plugins(source.run.plugins)
  _, state = restore_trained(workdir, checkpoint, source, recorded_input_spec(workdir))
  whole = with_head and same_bins(source.labels, labels)
  if with_head and not whole:
    logging.warning(
      "model.init_from=%s: its age bins %d..%d differ from this config's %d..%d; the head (%s) starts fresh, "
      "the backbone comes across",
      init_from,
      source.labels.min_age,
      source.labels.max_age,
      labels.min_age,
      labels.max_age,
      head,
    )
  mismatches: list[str] = []
  new_params = _overlay(state.params, params, None if whole else head, "params", mismatches)
  new_state = _overlay(state.model_state, model_state, None if whole else head, "model_state", mismatches)
  if mismatches:  # a backstop: check_same_backbone compares the settings that shape the parameters
    raise errors.UserError(f"config.model.init_from={init_from!r} does not fit this model: {'; '.join(mismatches[:3])}")
  step = int(metrics.fetch_array(state.step))
  print(f"initialised from step {step} of {workdir}{'' if whole else f' (all but its {head})'}")
  return new_params, new_state


def _overlay(trained: Any, fresh: Any, skip: str | None, kind: str, mismatches: list[str]) -> Any:
  """`fresh` with every leaf outside the top-level group `skip` taken from `trained` (host copies)."""
  flat_fresh = traverse_util.flatten_dict(fresh, keep_empty_nodes=True)
  # Orbax restores dicts keyed as the target; nnx's pure dicts key list items by int, so compare as text.
  flat_trained = {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(trained).items()}
  for key, old in flat_fresh.items():
    if (skip is not None and str(key[0]) == skip) or not hasattr(old, "shape"):  # the head stays new; empty nodes
      continue
    new = flat_trained.get(tuple(map(str, key)))
    if new is None or new.shape != old.shape:
      shape = "absent" if new is None else tuple(new.shape)
      mismatches.append(f"{kind}/{'/'.join(map(str, key))}: {shape} there, {tuple(old.shape)} here")
    else:
      flat_fresh[key] = np.asarray(metrics.fetch_array(new), old.dtype)
  return traverse_util.unflatten_dict(flat_fresh)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Array shapes of a pytree (or of Orbax tree metadata) by '/'-joined key names."""

  def name(key) -> str:
    return str(next(getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)))

  return {
    "/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def inference_record(
  cfg: settings.Settings, model: models.AgeModel, input_size: int, framing: dict[str, Any] | None = None
) -> dict[str, Any]:
  """What a trained model needs at inference besides config.json (WORKDIR/inference.json).

  The stored face size new photos are cropped to (the data's, not the model's input size), the
  backbone's name, the input its weights expect, the central fraction of a crop the model sees
  (`eval_crop`, only when not 1) and, when measured, the stored crops' framing
  (`data.framing.framing_record`: where new faces' landmarks go; without it, the fixed-margin crop).
  """
  record = {"input_size": int(input_size), "model": cfg.model.name, "input_spec": model.input_spec.to_json()}
  if model.eval_crop != 1.0:  # absent reads as 1.0: a workdir without it reads exactly as one from before the crop
    record["eval_crop"] = float(model.eval_crop)
  if framing is not None:  # absent, not null: a workdir without it reads exactly as one from before framing
    record["framing"] = framing
  return record
