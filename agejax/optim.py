"""Optimizer and learning-rate schedules (optax): Adam/AdamW with step or warmup-cosine decay."""

import optax

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
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_train_steps, warmup + 1),
                                              end_value=lr * cfg.end_learning_rate_factor)
  raise ValueError(f"config.optimizer.schedule={cfg.schedule!r} is not one of {SCHEDULES}")


def create_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Returns Adam (AdamW when weight_decay > 0) with optional global-norm gradient clipping."""
  opt = optax.adamw(schedule, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(schedule)
  if cfg.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  return opt
