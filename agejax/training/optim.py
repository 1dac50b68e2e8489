"""Optimizer and learning-rate schedules (optax): Adam/AdamW, step or warmup-cosine decay, rules by parameter path.

Parameters are grouped by rules in the manner of big_vision's optax.py: the first rule whose regex
fully matches a parameter's "/"-joined path (e.g. "convs/3/kernel", "head/bias") sets its
learning-rate multiplier, whether weight decay applies, whether it is frozen, and the step its
updates start at. `config.optimizer.rules` come first; the age head, then everything else (the
backbone, shaped by the shorthands backbone_lr_multiplier, freeze_backbone and head_warmup_steps)
close the list, so the default groups are exactly "head" and "backbone".
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from agejax import errors, settings

SCHEDULES = ("constant", "step", "cosine")
RULE_OPTIONS = ("lr", "decay", "frozen", "start_step")


@dataclasses.dataclass(frozen=True)
class Rule:
  """How the parameters whose path fully matches `pattern` are updated."""

  name: str  # the optimizer-state group (checkpoints record it): "head", "backbone" or "rule<i>"
  pattern: str
  lr: float = 1.0  # multiplier of the schedule
  decay: bool = True  # weight decay, when optimizer.weight_decay > 0
  frozen: bool = False  # never updated (and no optimizer state)
  start_step: int = 0  # no update before this step (e.g. the head trains alone first)


def parse_rules(raw: Sequence[Any]) -> list[Rule]:
  """config.optimizer.rules: (regex, {"lr": ..., "decay": ..., "frozen": ..., "start_step": ...}) pairs."""
  rules = []
  for i, entry in enumerate(raw):
    try:
      pattern, options = entry
      options = dict(options)
      re.compile(pattern)
    except (TypeError, ValueError, re.error) as e:
      raise errors.UserError(
        f"config.optimizer.rules[{i}]={entry!r}: must be (regex, {{option: value}}) with a valid regex ({e})"
      ) from None
    unknown = sorted(set(options) - set(RULE_OPTIONS))
    if unknown:
      raise errors.UserError(f"config.optimizer.rules[{i}]: unknown options {unknown}; known: {RULE_OPTIONS}")
    rules.append(Rule(f"rule{i}", pattern, **options))
  return rules


def rules_for(cfg: settings.OptimizerSettings, head: str = "head") -> list[Rule]:
  """The rules in order: config.optimizer.rules, the age head's, the backbone's (from the shorthands)."""
  backbone = Rule(
    "backbone",
    ".*",
    lr=cfg.backbone_lr_multiplier,
    frozen=cfg.freeze_backbone,
    start_step=cfg.head_warmup_steps,
  )
  return [*parse_rules(cfg.rules), Rule("head", f"{re.escape(head)}/.*"), backbone]


def path_name(path: tuple) -> str:
  """'convs/3/kernel' for a parameter's key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def rule_for(path: tuple, rules: Sequence[Rule]) -> Rule:
  """The first rule matching a parameter's (or batch statistic's) key path."""
  name = path_name(path)
  return next(rule for rule in rules if re.fullmatch(rule.pattern, name))


def is_frozen(path: tuple, rules: Sequence[Rule]) -> bool:
  """Whether the rules freeze the parameter or batch statistic at this key path."""
  return rule_for(path, rules).frozen


def param_labels(params: Any, rules: Sequence[Rule]) -> Any:
  """The name of the first rule matching each parameter's path."""

  return jax.tree_util.tree_map_with_path(lambda path, _: rule_for(path, rules).name, params)


def learning_rate_schedule(
  cfg: settings.OptimizerSettings, num_train_steps: int, steps_per_epoch: int
) -> optax.Schedule:
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


def rule_schedule(rule: Rule, schedule: optax.Schedule) -> optax.Schedule:
  """The schedule scaled by the rule's multiplier, zero before its start step."""
  if rule.lr == 1.0 and not rule.start_step:
    return schedule
  return lambda step: rule.lr * schedule(step) * (step >= rule.start_step)


def decays(params: Any) -> Any:
  """Weight decay applies to kernels (matrices, convolutions), never to biases or normalisation scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _adam(cfg: settings.OptimizerSettings, rule: Rule, schedule: optax.Schedule) -> optax.GradientTransformation:
  if rule.frozen:
    return optax.set_to_zero()
  lr = rule_schedule(rule, schedule)
  if cfg.weight_decay and rule.decay:
    return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=decays)
  return optax.adam(lr)


def clip_trained_by_global_norm(max_norm: float, rules: Sequence[Rule]) -> optax.GradientTransformation:
  """optax.clip_by_global_norm over the trained parameters only: frozen ones neither count nor change.

  A frozen backbone's gradient would otherwise set the norm and shrink the head's update. Its state
  is clip_by_global_norm's (empty), so checkpoints of either restore into the other.
  """

  def update(updates, state, params=None):
    trained = jax.tree_util.tree_map_with_path(lambda path, _: not is_frozen(path, rules), updates)
    norm = optax.tree.norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), updates, trained))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create_optimizer(
  cfg: settings.OptimizerSettings, schedule: optax.Schedule, head: str = "head"
) -> optax.GradientTransformation:
  """Returns Adam(W) with optional clipping, each parameter group updated as its rule says."""
  rules = rules_for(cfg, head)
  opt = optax.multi_transform({r.name: _adam(cfg, r, schedule) for r in rules}, lambda p: param_labels(p, rules))
  if cfg.grad_clip_norm:
    opt = optax.chain(clip_trained_by_global_norm(cfg.grad_clip_norm, rules), opt)
  return opt
