"""Checks a training config before anything is compiled and turns it into typed settings (`validate`).

Also what may change when a run resumes (`check_resume`): every config key is classified in
RESUME_MUST_MATCH or RESUME_MAY_CHANGE.
"""

import json
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from agejax import errors, models, settings, storage
from agejax.data import splits, streaming
from agejax.evaluation import age_checks
from agejax.training import checkpointing, losses, optim

TEST_SPLIT = "test"  # the split train.py scores at the end (train.TEST_SPLIT); never data.eval_split
# The eval metrics eval.select_by may pick the best checkpoint by: the expected age's MAE, or the
# unified benchmark's (the posterior median in whole years, metrics.posterior_median).
SELECT_BY = ("mae", "bench_mae")
SEED_LIMIT = 2**32  # numpy's default_rng takes no negative seed; jax.random.key keeps 32 bits without x64
# The Gaussian target gives the bins next to the age exp(-1 / (2 sigma^2)) of the centre's mass:
# below this sigma that underflows float32's smallest normal number (devices flush subnormals),
# and the target degenerates to one-hot (or to 0/0 when sigma itself underflows).
MIN_SIGMA = 1.0 / math.sqrt(-2.0 * math.log(float(np.finfo(np.float32).tiny)))

# Resuming a workdir: keys that set what its checkpoints, logged curves and final metrics mean must
# equal the run's recorded config.json; keys for how long, how often, where and how to compute may change.
RESUME_MUST_MATCH = (
  "seed",  # data order, augmentation and dropout are functions of (seed, step)
  "model.name",
  "model.width_multiplier",
  "model.batch_norm",  # the network
  "labels.min_age",
  "labels.max_age",
  "labels.out_of_range",  # what each output bin means; which ages count
  "data.name",
  "data.builder_config",
  "data.image_size",
  "data.eval_split",  # the data, the input, "best"
  "data.split",  # which folders train, validate and test
  "data.shards",  # the streamed training order (data.reader='grain')
  "loss.name",
  "loss.sigma",
  "loss.l1_weight",  # the objective (sigma: the width of the learnt distributions)
  "loss.target",
  "loss.sigma_from_data",
  "loss.sigma_floor",
  "metrics.epsilon_sigma",  # the logged epsilon-error
  "eval.flip",  # what the logged evaluations and "best" mean
  "eval.select_by",
  "data.eval_crop",  # what the network sees at evaluation
  "plugins",  # the modules that define the backbone, loss or rules these checkpoints were made with
)
RESUME_MAY_CHANGE = (
  "num_train_steps",
  "num_epochs",
  "log_every_steps",
  "eval_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "profile_steps",
  "compilation_cache_dir",
  "data.data_dir",
  "data.cache_dir",  # how long, how often, where
  "data.reader",
  "data.grain_workers",  # how the records are read
  "batch_size",
  "eval_batch_size",
  "grad_accum_steps",
  "model.dtype",  # other hardware, less memory
  "nonfinite",
  "optimizer.",
  "augment.",
  "model.dropout_rate",  # recovering from divergence; the regime
  "model.pretrained",  # initial weights only: a resumed run restores its checkpoint (the file may move)
  "model.init_from",  # the same: read only when a run starts; a resumed run restores its own checkpoint
  "model.init_from_head",
  "evals",  # extra evaluations only report: they never choose the best checkpoint
  "eval.age_check",
  "eval.age_check_target_fpr",  # the age check's threshold choice only reports
)


def _require(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise errors.UserError(f"config.{key}={value!r}: {why}")


def check_pretrained(cfg: settings.Settings) -> None:
  """Fails, with the command that creates them, when `model.pretrained` names no converted weights."""
  if not cfg.model.pretrained:
    return
  from agejax import convert

  path = storage.path(cfg.model.pretrained)
  if not (path / convert.META_FILE).exists():
    make = models.get(cfg.model.name).convert_command
    how = f"create them with: {make(cfg.model, str(path))}, or " if make else ""
    raise errors.MissingInput(
      f"config.model.pretrained={str(path)!r} holds no converted weights; {how}set "
      f"--config.model.pretrained='' to train from scratch"
    )


def check_init_from(cfg: settings.Settings) -> None:
  """Checks `model.init_from`'s form: '' or WORKDIR[:STEP] (the run it names: `check_init_source`)."""
  value = cfg.model.init_from
  _require(isinstance(value, str), "model.init_from", value, "must be a string: WORKDIR or WORKDIR:STEP")
  workdir, _ = checkpointing.parse_init_from(value)
  _require(
    not value or (bool(workdir.strip()) and not workdir.endswith(":")),
    "model.init_from",
    value,
    "must be '' or another run's WORKDIR, WORKDIR:STEP, WORKDIR:best or WORKDIR:latest",
  )


def check_init_source(cfg: settings.Settings) -> None:
  """Fails in one line when `model.init_from` names no trained run, a missing step, or another backbone.

  Checked only when a run starts (a resumed run restores its own checkpoint and never reads the source).
  """
  _, _, source = checkpointing.source_settings(cfg.model.init_from)
  checkpointing.check_same_backbone(cfg, source, cfg.model.init_from)


def validate(config: ml_collections.ConfigDict | dict[str, Any]) -> settings.Settings:
  """Checks a config and returns its settings; raises a UserError of one line naming the key and value.

  Plug-in modules (config.plugins) are imported first: they may define the backbone or loss named.

  Args:
    config: a training config (ConfigDict) or a workdir's config.json as a dict.

  Returns:
    The typed settings every module takes.
  """
  cfg = settings.Settings.from_config(config)
  models.load_plugins(cfg.run.plugins)
  _check_run(cfg.run, jax.device_count())
  _check_data_and_model(cfg)
  _check_loss(cfg)
  _check_optimizer(cfg.optimizer)
  _check_evals(cfg)
  check_init_from(cfg)
  _require(
    cfg.model.init_from_head or bool(cfg.model.init_from),
    "model.init_from_head",
    cfg.model.init_from_head,
    "starts init_from's run without its head, and model.init_from is not set: set it to the first stage's WORKDIR",
  )
  if not cfg.model.init_from:  # init_from's weights replace the converted ones: those are not read
    check_pretrained(cfg)
  return cfg


def _check_run(run: settings.RunSettings, n: int) -> None:
  _require(
    isinstance(run.seed, int) and 0 <= run.seed < SEED_LIMIT,
    "seed",
    run.seed,
    "must be an integer in [0, 2**32): numpy's default_rng refuses negative seeds and jax.random.key keeps 32 bits",
  )
  _require(
    run.batch_size > 0 and run.batch_size % n == 0,
    "batch_size",
    run.batch_size,
    f"must be a positive multiple of the {n} devices",
  )
  _require(
    run.grad_accum_steps >= 1 and (run.batch_size // n) % run.grad_accum_steps == 0,
    "grad_accum_steps",
    run.grad_accum_steps,
    f"must be >= 1 and divide the per-device batch {run.batch_size // n}",
  )
  _require(run.nonfinite in ("stop", "skip"), "nonfinite", run.nonfinite, "must be 'stop' or 'skip'")
  _require(run.num_epochs >= 0, "num_epochs", run.num_epochs, "must be >= 0 (0: num_train_steps sets the length)")
  _require(
    run.num_epochs > 0 or run.num_train_steps > 0,
    "num_train_steps",
    run.num_train_steps,
    "must be positive (or set num_epochs)",
  )
  _require(run.log_every_steps > 0, "log_every_steps", run.log_every_steps, "must be positive")
  for key in ("eval_every_steps", "checkpoint_every_steps"):
    _require(getattr(run, key) >= 0, key, getattr(run, key), "must be >= 0 (0: once an epoch)")
  _require(
    run.keep_checkpoints >= 1,
    "keep_checkpoints",
    run.keep_checkpoints,
    "must be >= 1 (the latest checkpoint is what a resumed run starts from)",
  )
  _require(run.profile_steps >= 0, "profile_steps", run.profile_steps, "must be >= 0 (0 disables profiling)")


def _check_data_and_model(cfg: settings.Settings) -> None:
  n = jax.device_count()
  eval_bs = cfg.eval.batch_size
  _require(
    eval_bs > 0 and eval_bs % n == 0,
    "eval_batch_size",
    eval_bs,
    f"must be 0 (use batch_size) or a positive multiple of the {n} devices",
  )
  labels = cfg.labels
  _require(
    labels.max_age >= labels.min_age,
    "labels.max_age",
    labels.max_age,
    f"empty age range: below labels.min_age={labels.min_age}",
  )
  _require(
    labels.out_of_range in ("clip", "drop"), "labels.out_of_range", labels.out_of_range, "must be 'clip' or 'drop'"
  )
  _require(cfg.eval.epsilon_sigma > 0, "metrics.epsilon_sigma", cfg.eval.epsilon_sigma, "must be positive")
  model = cfg.model
  backbone = models.get(model.name)
  _require(
    cfg.data.image_size >= backbone.min_image_size,
    "data.image_size",
    cfg.data.image_size,
    f"must be at least {backbone.min_image_size} for backbone {backbone.name!r}",
  )
  _require(model.width_multiplier > 0, "model.width_multiplier", model.width_multiplier, "must be positive")
  _require(model.dtype in models.DTYPES, "model.dtype", model.dtype, f"must be one of {models.DTYPES}")
  _require(0 <= model.dropout_rate < 1, "model.dropout_rate", model.dropout_rate, "must be in [0, 1)")
  splits.check(cfg.data.split)  # its syntax; the folders are checked against the dataset when it loads
  _require(
    0 < cfg.data.eval_crop <= 1,
    "data.eval_crop",
    cfg.data.eval_crop,
    "must be in (0, 1]: the central fraction of each stored crop's side the model sees (1: all of it)",
  )
  _require(
    0 <= cfg.augment.resized_crop_min_area <= 1,
    "augment.resized_crop_min_area",
    cfg.augment.resized_crop_min_area,
    "must be in [0, 1]: the smallest random crop's share of the stored crop's area (0: the scale/translate zoom)",
  )
  _require(
    cfg.data.eval_split != TEST_SPLIT,
    "data.eval_split",
    cfg.data.eval_split,
    f"the best checkpoint and the temperature are chosen on this split, so the {TEST_SPLIT!r} split scored at "
    "the end would no longer be held out; use 'validation'",
  )
  _check_reader(cfg.data, cfg.run.batch_size)
  _require(
    bool(cfg.data.cache_dir) and not storage.is_url(cfg.data.cache_dir),
    "data.cache_dir",
    cfg.data.cache_dir,
    "must be a local folder: the arrays are memory-mapped (data.data_dir may be a URL)",
  )


def _check_reader(data: settings.DataSettings, batch_size: int) -> None:
  _require(data.reader in streaming.READERS, "data.reader", data.reader, f"must be one of {streaming.READERS}")
  _require(
    isinstance(data.shards, int) and data.shards >= 0 and (data.shards == 0 or batch_size % data.shards == 0),
    "data.shards",
    data.shards,
    f"must be 0 (one a process) or a count that divides batch_size={batch_size}",
  )
  _require(
    isinstance(data.grain_workers, int) and data.grain_workers >= 0,
    "data.grain_workers",
    data.grain_workers,
    "must be >= 0 (0: the records are decoded in the training process)",
  )


def _check_loss(cfg: settings.Settings) -> None:
  loss = cfg.loss
  _require(
    loss.sigma >= MIN_SIGMA,
    "loss.sigma",
    loss.sigma,
    f"must be at least {MIN_SIGMA:.4f} years: below it the Gaussian target's neighbouring bins underflow "
    f"float32 and the target is one-hot (loss.name='onehot' trains on one-hot targets)",
  )
  _require(loss.name in losses.LOSSES, "loss.name", loss.name, f"must be one of {tuple(losses.LOSSES)}")
  _require(loss.target in losses.TARGETS, "loss.target", loss.target, f"must be one of {losses.TARGETS}")
  _require(
    loss.sigma_floor >= MIN_SIGMA,
    "loss.sigma_floor",
    loss.sigma_floor,
    f"must be at least {MIN_SIGMA:.4f} years (see loss.sigma): it floors the data's per-image age_std",
  )
  _require(loss.l1_weight >= 0, "loss.l1_weight", loss.l1_weight, "must be >= 0")


def _check_optimizer(opt: settings.OptimizerSettings) -> None:
  _require(opt.learning_rate > 0, "optimizer.learning_rate", opt.learning_rate, "must be positive")
  _require(
    opt.grad_clip_norm >= 0, "optimizer.grad_clip_norm", opt.grad_clip_norm, "must be >= 0 (0 disables clipping)"
  )
  _require(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "must be >= 0")
  _require(opt.schedule in optim.SCHEDULES, "optimizer.schedule", opt.schedule, f"must be one of {optim.SCHEDULES}")
  if opt.schedule == "step":
    _require(opt.step_every_epochs > 0, "optimizer.step_every_epochs", opt.step_every_epochs, "must be positive")
    _require(opt.step_gamma > 0, "optimizer.step_gamma", opt.step_gamma, "must be positive")
  if opt.schedule == "cosine":
    _require(opt.warmup_steps >= 0, "optimizer.warmup_steps", opt.warmup_steps, "must be >= 0")
    _require(
      0 <= opt.end_learning_rate_factor <= 1,
      "optimizer.end_learning_rate_factor",
      opt.end_learning_rate_factor,
      "must be in [0, 1]",
    )
  _require(
    opt.backbone_lr_multiplier >= 0, "optimizer.backbone_lr_multiplier", opt.backbone_lr_multiplier, "must be >= 0"
  )
  _require(opt.head_warmup_steps >= 0, "optimizer.head_warmup_steps", opt.head_warmup_steps, "must be >= 0")
  optim.parse_rules(opt.rules)  # a bad rule: one line naming it


def _check_evals(cfg: settings.Settings) -> None:
  _require(cfg.eval.select_by in SELECT_BY, "eval.select_by", cfg.eval.select_by, f"must be one of {SELECT_BY}")
  age_checks.check_age_check(cfg.eval.age_check, cfg.eval.age_check_target_fpr, cfg.labels.min_age, cfg.labels.max_age)
  names = [e.name for e in cfg.eval.evals]
  for i, e in enumerate(cfg.eval.evals):
    _require(bool(e.name) and "/" not in e.name, f"evals[{i}].name", e.name, "must be a non-empty name without '/'")
    _require(names.count(e.name) == 1, f"evals[{i}].name", e.name, "is used by another evaluation")
    _require(
      e.every_steps >= -1,
      f"evals[{i}].every_steps",
      e.every_steps,
      "must be >= 0 (0: with the eval split), or -1: once, at the end, on the best checkpoint",
    )


def resume_may_change(key: str) -> bool:
  """True for a config key (dotted) that may differ from the recorded config when a run resumes."""
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def check_resume(config, recorded: dict[str, Any], source: storage.Location) -> None:
  """Fails in one line naming every key that differs from `recorded` (the run's config.json) and may not.

  Keys that only one side has (a config from an older or newer agejax) are not compared; keys in
  neither list must match (a new key is safe until someone decides it may change).
  """
  new = flatten(json.loads(json.dumps(config.to_dict())))  # as config.json stores it: tuples are lists
  old = flatten(recorded)
  shared = new.keys() & old.keys()
  keys = [k for k in RESUME_MUST_MATCH if k in shared] + sorted(shared - set(RESUME_MUST_MATCH))
  changed = [k for k in keys if new[k] != old[k] and not resume_may_change(k)]
  if changed:
    one = len(changed) == 1
    # A rerun of a demo workdir without `:demo` changes a dozen keys: the recipe says it in a word.
    recipe = checkpointing.config_argument(recorded)
    same = recipe == checkpointing.config_argument(config.to_dict())
    hint = "" if same else f" (it was trained with --config {recipe})"
    raise errors.UserError(
      f"{', '.join(f'config.{k}={new[k]!r}' for k in changed)} {'differs' if one else 'differ'} from "
      f"{', '.join(f'{k}={old[k]!r}' for k in changed)} in {source}, which this workdir's checkpoints were trained "
      f"with: {'this key sets' if one else 'these keys set'} what the checkpoints mean and cannot change on "
      f"resume; use a new workdir, or the run's {'value' if one else 'values'}{hint}"
    )
