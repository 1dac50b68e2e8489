"""Training losses by name (`config.loss.name`): KL to a Gaussian label distribution, one-hot NLL, DLDL-v2's L1.

`LOSSES` maps a name to a factory of (loss settings, age bins) -> loss(logits, ages, age_stds) per
example (age_std 0 where the data has none). A new loss is one function and one `register` call
(from a plug-in module listed in config.plugins); `make_loss` adds `l1_weight` times the
expectation L1 term to whichever loss is named.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from agejax import errors, labels, settings

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (logits [B, K], ages [B], age stds [B]) -> loss [B]
LossFactory = Callable[[settings.LossSettings, jax.Array], LossFn]  # (config.loss, bins [K]) -> loss


def kl_loss(
  logits: jax.Array, ages: jax.Array, bins: jax.Array, sigma: float | jax.Array, mean_preserving: bool = False
) -> jax.Array:
  """Returns KL(target || softmax(logits)) per example, the target a Gaussian of std `sigma` on the bins.

  `mean_preserving`: the target's mean is the age itself, also next to the ends of the bins (see
  labels.label_distribution), so the loss's minimiser predicts the age without bias.
  """
  target = labels.label_distribution(ages, bins, sigma, mean_preserving=mean_preserving)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  # Bins where the target underflows to 0 contribute 0, even where log_probs is -inf.
  return optax.losses.kl_divergence(log_probs, target, where=target > 0)


def onehot_nll(logits: jax.Array, ages: jax.Array, bins: jax.Array) -> jax.Array:
  """Returns the NLL of the age's own bin (the original project's loss), per example."""
  index = jnp.clip(jnp.round(ages - bins[0]).astype(jnp.int32), 0, bins.shape[0] - 1)
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), index)


def expectation_l1(logits: jax.Array, ages: jax.Array, bins: jax.Array) -> jax.Array:
  """Returns |E[age] - age| per example (the DLDL-v2 expectation term)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32))
  return jnp.abs(labels.expected_age(probs, bins) - ages)


TARGETS = ("gaussian", "mean_preserving")


def target_sigma(cfg: settings.LossSettings, age_std: jax.Array) -> jax.Array:
  """Each example's target std: loss.sigma, or with loss.sigma_from_data its age_std (floored) where it has one."""
  if not cfg.sigma_from_data:
    return jnp.full_like(age_std, cfg.sigma)
  return jnp.where(age_std > 0, jnp.maximum(age_std, cfg.sigma_floor), cfg.sigma)


def _kl(cfg: settings.LossSettings, bins: jax.Array) -> LossFn:
  mean_preserving = cfg.target == "mean_preserving"
  return lambda logits, ages, age_std: kl_loss(logits, ages, bins, target_sigma(cfg, age_std), mean_preserving)


LOSSES: dict[str, LossFactory] = {
  "kl": _kl,
  "onehot": lambda cfg, bins: lambda logits, ages, age_std: onehot_nll(logits, ages, bins),
}


def register(name: str, factory: LossFactory) -> None:
  """Adds a loss under `name` (a plug-in module calls this at import; the same module again replaces it)."""
  known = LOSSES.get(name)
  if known is not None and known.__module__ != factory.__module__:
    raise ValueError(f"a loss named {name!r} is already registered by {known.__module__}")
  LOSSES[name] = factory


def make_loss(cfg: settings.LossSettings, bins: jax.Array) -> LossFn:
  """Returns `loss(logits, ages) -> per-example loss` for `config.loss`, with its DLDL-v2 L1 term."""
  if cfg.name not in LOSSES:
    raise errors.UserError(f"config.loss.name={cfg.name!r} is not one of {tuple(LOSSES)}")
  base = LOSSES[cfg.name](cfg, bins)
  if not cfg.l1_weight:
    return base
  return lambda logits, ages, age_std: base(logits, ages, age_std) + cfg.l1_weight * expectation_l1(logits, ages, bins)
