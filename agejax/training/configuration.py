"""Checks a training config before anything is compiled; resolves its derived values.

Also what may change when a run resumes (`check_resume`), and the scripts' flag parsing, which
turns a bad flag or config override into one line.
"""

import json
import math
import sys
from typing import Any

import jax
import numpy as np

from agejax import errors, models, storage
from agejax.training import losses, optim

SEED_LIMIT = 2**32  # numpy's default_rng takes no negative seed; jax.random.key keeps 32 bits without x64
# The Gaussian target gives the bins next to the age exp(-1 / (2 sigma^2)) of the centre's mass:
# below this sigma that underflows float32's smallest normal number (devices flush subnormals),
# and the target degenerates to one-hot (or to 0/0 when sigma itself underflows).
MIN_SIGMA = 1.0 / math.sqrt(-2.0 * math.log(float(np.finfo(np.float32).tiny)))

# Resuming a workdir: keys that set what its checkpoints, logged curves and final metrics mean must
# equal the run's recorded config.json; keys for how long, how often, where and how to compute may change.
RESUME_MUST_MATCH = (
  "seed",  # data order, augmentation and dropout are functions of (seed, step)
  "model.width_multiplier",
  "model.batch_norm",  # the network
  "labels.min_age",
  "labels.max_age",
  "labels.out_of_range",  # what each output bin means; which ages count
  "data.name",
  "data.builder_config",
  "data.image_size",
  "data.eval_split",  # the data, the input, "best"
  "loss.name",
  "loss.sigma",
  "loss.l1_weight",  # the objective (sigma: the width of the learnt distributions)
  "metrics.epsilon_sigma",  # the logged epsilon-error
)
RESUME_MAY_CHANGE = (
  "num_train_steps",
  "log_every_steps",
  "eval_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "profile_steps",
  "compilation_cache_dir",
  "data.data_dir",
  "data.cache_dir",  # how long, how often, where
  "batch_size",
  "eval_batch_size",
  "grad_accum_steps",
  "model.dtype",  # other hardware, less memory
  "nonfinite",
  "optimizer.",
  "augment.",
  "model.dropout_rate",  # recovering from divergence; the regime
  "model.pretrained",  # initial weights only: a resumed run restores its checkpoint (the file may move)
)


def _require(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise errors.UserError(f"config.{key}={value!r}: {why}")


def check_pretrained(config) -> None:
  """Fails, with the command that creates them, when `config.model.pretrained` names no converted weights."""
  if not config.model.pretrained:
    return
  path = storage.path(config.model.pretrained)
  if not (path / "agejax_weights.json").exists():
    arch = "vgg16_bn" if config.model.get("batch_norm", False) else "vgg16"
    raise errors.MissingInput(
      f"config.model.pretrained={str(path)!r} holds no converted weights; create them with: python "
      f"scripts/convert_torchvision.py --weights IMAGENET1K_V1 --arch {arch} --output {path} "
      f"(or --checkpoint FILE.pth instead of --weights), or set --config.model.pretrained='' to train from scratch"
    )


def validate(config) -> None:
  """Raises ValueError with one line naming the offending key and value; returns None if valid."""
  n = jax.device_count()
  _require(
    isinstance(config.seed, int) and 0 <= config.seed < SEED_LIMIT,
    "seed",
    config.seed,
    "must be an integer in [0, 2**32): numpy's default_rng refuses negative seeds and jax.random.key keeps 32 bits",
  )
  _require(
    config.batch_size > 0 and config.batch_size % n == 0,
    "batch_size",
    config.batch_size,
    f"must be a positive multiple of the {n} devices",
  )
  accum = config.get("grad_accum_steps", 1)
  _require(
    accum >= 1 and (config.batch_size // n) % accum == 0,
    "grad_accum_steps",
    accum,
    f"must be >= 1 and divide the per-device batch {config.batch_size // n}",
  )
  _require(
    config.get("nonfinite", "stop") in ("stop", "skip"),
    "nonfinite",
    config.get("nonfinite"),
    "must be 'stop' or 'skip'",
  )
  eval_bs = config.get("eval_batch_size", 0)
  _require(
    eval_bs == 0 or (eval_bs > 0 and eval_bs % n == 0),
    "eval_batch_size",
    eval_bs,
    f"must be 0 (use batch_size) or a positive multiple of the {n} devices",
  )
  _require(
    config.labels.max_age >= config.labels.min_age,
    "labels.max_age",
    config.labels.max_age,
    f"empty age range: below labels.min_age={config.labels.min_age}",
  )
  _require(
    config.labels.out_of_range in ("clip", "drop"),
    "labels.out_of_range",
    config.labels.out_of_range,
    "must be 'clip' or 'drop'",
  )
  _require(
    config.loss.sigma >= MIN_SIGMA,
    "loss.sigma",
    config.loss.sigma,
    f"must be at least {MIN_SIGMA:.4f} years: below it the Gaussian target's neighbouring bins underflow "
    f"float32 and the target is one-hot (loss.name='onehot' trains on one-hot targets)",
  )
  _require(config.metrics.epsilon_sigma > 0, "metrics.epsilon_sigma", config.metrics.epsilon_sigma, "must be positive")
  _require(config.loss.name in losses.LOSSES, "loss.name", config.loss.name, f"must be one of {losses.LOSSES}")
  _require(config.loss.l1_weight >= 0, "loss.l1_weight", config.loss.l1_weight, "must be >= 0")
  _require(config.num_train_steps > 0, "num_train_steps", config.num_train_steps, "must be positive")
  for key in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps"):
    _require(config[key] > 0, key, config[key], "must be positive")
  _require(
    config.data.image_size >= 32, "data.image_size", config.data.image_size, "must be at least 32 (five 2x2 max-pools)"
  )
  _require(
    config.model.width_multiplier > 0, "model.width_multiplier", config.model.width_multiplier, "must be positive"
  )
  _require(config.model.dtype in models.DTYPES, "model.dtype", config.model.dtype, f"must be one of {models.DTYPES}")
  _require(
    config.optimizer.learning_rate > 0, "optimizer.learning_rate", config.optimizer.learning_rate, "must be positive"
  )
  _require(
    config.keep_checkpoints >= 1,
    "keep_checkpoints",
    config.keep_checkpoints,
    "must be >= 1 (the latest checkpoint is what a resumed run starts from)",
  )
  _require(
    0 <= config.model.get("dropout_rate", 0.5) < 1,
    "model.dropout_rate",
    config.model.get("dropout_rate"),
    "must be in [0, 1)",
  )
  opt = config.optimizer
  _require(
    opt.get("grad_clip_norm", 0.0) >= 0,
    "optimizer.grad_clip_norm",
    opt.get("grad_clip_norm"),
    "must be >= 0 (0 disables clipping)",
  )
  _require(opt.get("weight_decay", 0.0) >= 0, "optimizer.weight_decay", opt.get("weight_decay"), "must be >= 0")
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
    opt.get("backbone_lr_multiplier", 1.0) >= 0,
    "optimizer.backbone_lr_multiplier",
    opt.get("backbone_lr_multiplier"),
    "must be >= 0",
  )
  _require(
    opt.get("head_warmup_steps", 0) >= 0, "optimizer.head_warmup_steps", opt.get("head_warmup_steps"), "must be >= 0"
  )
  _require(
    config.get("profile_steps", 0) >= 0,
    "profile_steps",
    config.get("profile_steps"),
    "must be >= 0 (0 disables profiling)",
  )
  cache_dir = config.data.get("cache_dir", "")
  _require(
    bool(cache_dir) and not storage.is_url(cache_dir),
    "data.cache_dir",
    cache_dir,
    "must be a local folder: the arrays are memory-mapped (data.data_dir may be a URL)",
  )
  check_pretrained(config)
  _require(
    config.optimizer.schedule in optim.SCHEDULES,
    "optimizer.schedule",
    config.optimizer.schedule,
    f"must be one of {optim.SCHEDULES}",
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
    raise errors.UserError(
      f"{', '.join(f'config.{k}={new[k]!r}' for k in changed)} {'differs' if one else 'differ'} from "
      f"{', '.join(f'{k}={old[k]!r}' for k in changed)} in {source}, which this workdir's checkpoints were trained "
      f"with: {'this key sets' if one else 'these keys set'} what the checkpoints mean and cannot change on "
      f"resume; use a new workdir, or the run's {'value' if one else 'values'}"
    )


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flags_parser for the scripts: a bad flag or `--config` override ends the script in one line.

  ml_collections raises a bare AttributeError/KeyError for an override of a key the config lacks
  (its "did you mean" hint buried in a traceback) and defers a config file it cannot read to the
  first use; both become `error: ...` here.
  """
  from absl import flags

  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:  # absl: unknown flag, bad value; a config file whose get_config raised
    sys.exit(f"error: {_flag_error(str(e))}")
  except (AttributeError, KeyError) as e:  # ml_collections: --config.KEY=... for a KEY the config does not have
    sys.exit(f"error: {_unknown_key(e, argv)}")
  except OSError as e:  # an override of a config file that could not be loaded
    sys.exit(f"error: --config: {_last_line(e)}")
  if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
    try:
      flags.FLAGS["config"].value.keys()  # config_flags keeps a file's load error until the config is used
    except OSError as e:
      sys.exit(f"error: --config: {_last_line(e)}")
  return argv


def _last_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _flag_error(message: str) -> str:
  """The first line of a flag error and, for a multi-line one (a traceback, a list of attempts), its last."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  if len(lines) <= 1:
    return lines[0] if lines else "bad flags"
  return f"{lines[0].rstrip(':')}: {lines[-1]}"


def _unknown_key(error: BaseException, argv: list[str]) -> str:
  """'--config.a.b=V: config has no key a.b (did you mean ...?)' from ml_collections' error."""
  text: Any = error
  while isinstance(text, BaseException) and text.args:  # AttributeError(KeyError("'key'\nDid you mean ..."))
    text = text.args[0]
  lines = str(text).splitlines()
  missing = lines[0].strip("'\"") if lines else ""
  hint = next((line.strip() for line in lines[1:] if line.strip()), "")
  hint = f" ({hint[0].lower()}{hint[1:].rstrip('?')}?)" if hint else ""
  for arg in argv[1:]:
    name = arg.split("=", 1)[0].lstrip("-")
    if name.startswith(("config.", "noconfig.")) and missing in name.split(".")[1:]:
      key = name.split(".", 1)[1]
      return f"{arg}: the config has no key {key!r}{hint}"
  return f"the config has no key {missing!r}{hint}"
