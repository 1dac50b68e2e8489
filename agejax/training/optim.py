"""Optimizer and learning-rate schedules (optax): Adam/AdamW with step or warmup-cosine decay."""

import jax
import optax

from agejax import errors

SCHEDULES = ("constant", "step", "cosine")


def learning_rate_schedule(cfg, num_train_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Returns the schedule of `config.optimizer` (`step` mimics torch's StepLR by epochs)."""
  lr = cfg.learning_rate
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.schedule == "step":
    every = max(1, int(cfg.step_every_epochs * steps_per_epoch))
    boundaries = {k * every: cfg.step_gamma for k in range(1, num_train_steps // every + 1)}
    return optax.piecewise_constant_schedule(lr, boundaries)
  if cfg.schedule == "cosine":
    warmup = min(cfg.warmup_steps, max(num_train_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(num_train_steps, warmup + 1), end_value=lr * cfg.end_learning_rate_factor
    )
  raise errors.UserError(f"config.optimizer.schedule={cfg.schedule!r} is not one of {SCHEDULES}")


def _adam(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(schedule, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(schedule)


def backbone_schedule(cfg, schedule: optax.Schedule) -> optax.Schedule:
  """The backbone's schedule: scaled by backbone_lr_multiplier, zero during the head-only warm-up."""
  warmup, multiplier = cfg.get("head_warmup_steps", 0), cfg.get("backbone_lr_multiplier", 1.0)
  return lambda step: multiplier * schedule(step) * (step >= warmup)


def param_labels(params) -> dict:
  """Labels each top-level parameter group 'head' (the age head) or 'backbone' (everything else)."""
  return {k: jax.tree.map(lambda _, k=k: "head" if k == "head" else "backbone", v) for k, v in params.items()}


def create_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Returns Adam(W) with optional clipping; the backbone can be frozen, slowed or held for a warm-up."""
  frozen = cfg.get("freeze_backbone", False)
  backbone = optax.set_to_zero() if frozen else _adam(cfg, backbone_schedule(cfg, schedule))
  opt = optax.multi_transform({"head": _adam(cfg, schedule), "backbone": backbone}, param_labels)
  if cfg.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  return opt
