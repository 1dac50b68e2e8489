"""Checks a training config before anything is compiled; resolves its derived values."""

import jax
import jax.numpy as jnp

from agejax import losses, optim, storage

DTYPES = ("auto", "float32", "bfloat16", "float16")


def compute_dtype(name: str) -> jnp.dtype:
  """Resolves `config.model.dtype`: 'auto' is bfloat16 on accelerators and float32 on CPU."""
  if name == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  return jnp.dtype(name)


def _require(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}={value!r}: {why}")


def check_pretrained(config) -> None:
  """Fails, with the command that creates them, when `config.model.pretrained` names no converted weights."""
  if not config.model.pretrained:
    return
  path = storage.path(config.model.pretrained)
  if not (path / "agejax_weights.json").exists():
    arch = "vgg16_bn" if config.model.get("batch_norm", False) else "vgg16"
    raise FileNotFoundError(
        f"config.model.pretrained={str(path)!r} holds no converted weights; create them with: python "
        f"scripts/convert_torchvision.py --weights IMAGENET1K_V1 --arch {arch} --output {path} "
        f"(or --checkpoint FILE.pth instead of --weights), or set --config.model.pretrained='' to train from scratch")


def validate(config) -> None:
  """Raises ValueError with one line naming the offending key and value; returns None if valid."""
  n = jax.device_count()
  _require(config.batch_size > 0 and config.batch_size % n == 0, "batch_size", config.batch_size,
           f"must be a positive multiple of the {n} devices")
  accum = config.get("grad_accum_steps", 1)
  _require(accum >= 1 and (config.batch_size // n) % accum == 0, "grad_accum_steps", accum,
           f"must be >= 1 and divide the per-device batch {config.batch_size // n}")
  _require(config.get("nonfinite", "stop") in ("stop", "skip"), "nonfinite", config.get("nonfinite"),
           "must be 'stop' or 'skip'")
  eval_bs = config.get("eval_batch_size", 0)
  _require(eval_bs == 0 or (eval_bs > 0 and eval_bs % n == 0), "eval_batch_size", eval_bs,
           f"must be 0 (use batch_size) or a positive multiple of the {n} devices")
  _require(config.labels.max_age >= config.labels.min_age, "labels.max_age", config.labels.max_age,
           f"empty age range: below labels.min_age={config.labels.min_age}")
  _require(config.labels.out_of_range in ("clip", "drop"), "labels.out_of_range", config.labels.out_of_range,
           "must be 'clip' or 'drop'")
  _require(config.loss.sigma > 0, "loss.sigma", config.loss.sigma, "must be positive")
  _require(config.metrics.epsilon_sigma > 0, "metrics.epsilon_sigma", config.metrics.epsilon_sigma,
           "must be positive")
  _require(config.loss.name in losses.LOSSES, "loss.name", config.loss.name, f"must be one of {losses.LOSSES}")
  _require(config.loss.l1_weight >= 0, "loss.l1_weight", config.loss.l1_weight, "must be >= 0")
  _require(config.num_train_steps > 0, "num_train_steps", config.num_train_steps, "must be positive")
  for key in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps"):
    _require(config[key] > 0, key, config[key], "must be positive")
  _require(config.data.image_size >= 32, "data.image_size", config.data.image_size,
           "must be at least 32 (five 2x2 max-pools)")
  _require(config.model.width_multiplier > 0, "model.width_multiplier", config.model.width_multiplier,
           "must be positive")
  _require(config.model.dtype in DTYPES, "model.dtype", config.model.dtype, f"must be one of {DTYPES}")
  _require(config.optimizer.learning_rate > 0, "optimizer.learning_rate", config.optimizer.learning_rate,
           "must be positive")
  _require(config.keep_checkpoints >= 1, "keep_checkpoints", config.keep_checkpoints,
           "must be >= 1 (the latest checkpoint is what a resumed run starts from)")
  _require(0 <= config.model.get("dropout_rate", 0.5) < 1, "model.dropout_rate", config.model.get("dropout_rate"),
           "must be in [0, 1)")
  opt = config.optimizer
  _require(opt.get("grad_clip_norm", 0.0) >= 0, "optimizer.grad_clip_norm", opt.get("grad_clip_norm"),
           "must be >= 0 (0 disables clipping)")
  _require(opt.get("weight_decay", 0.0) >= 0, "optimizer.weight_decay", opt.get("weight_decay"), "must be >= 0")
  if opt.schedule == "step":
    _require(opt.step_every_epochs > 0, "optimizer.step_every_epochs", opt.step_every_epochs, "must be positive")
    _require(opt.step_gamma > 0, "optimizer.step_gamma", opt.step_gamma, "must be positive")
  if opt.schedule == "cosine":
    _require(opt.warmup_steps >= 0, "optimizer.warmup_steps", opt.warmup_steps, "must be >= 0")
    _require(0 <= opt.end_learning_rate_factor <= 1, "optimizer.end_learning_rate_factor",
             opt.end_learning_rate_factor, "must be in [0, 1]")
  _require(opt.get("backbone_lr_multiplier", 1.0) >= 0, "optimizer.backbone_lr_multiplier",
           opt.get("backbone_lr_multiplier"), "must be >= 0")
  _require(opt.get("head_warmup_steps", 0) >= 0, "optimizer.head_warmup_steps", opt.get("head_warmup_steps"),
           "must be >= 0")
  _require(config.get("profile_steps", 0) >= 0, "profile_steps", config.get("profile_steps"),
           "must be >= 0 (0 disables profiling)")
  cache_dir = config.data.get("cache_dir", "")
  _require(bool(cache_dir) and not storage.is_url(cache_dir), "data.cache_dir", cache_dir,
           "must be a local folder: the arrays are memory-mapped (data.data_dir may be a URL)")
  check_pretrained(config)
  _require(config.optimizer.schedule in optim.SCHEDULES, "optimizer.schedule", config.optimizer.schedule,
           f"must be one of {optim.SCHEDULES}")
