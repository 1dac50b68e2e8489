"""Training losses on age logits: KL to a Gaussian label distribution, DLDL-v2 L1, one-hot NLL."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from agejax import errors, labels

LOSSES = ("kl", "onehot")

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def kl_loss(logits: jax.Array, ages: jax.Array, bins: jax.Array, sigma: float) -> jax.Array:
  """Returns KL(N(age, sigma^2) on the bins || softmax(logits)) per example."""
  target = labels.label_distribution(ages, bins, sigma)
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


def make_loss(name: str, bins: jax.Array, sigma: float, l1_weight: float = 0.0) -> LossFn:
  """Returns `loss(logits, ages) -> per-example loss` for a `config.loss`."""
  if name == "kl":
    base = lambda logits, ages: kl_loss(logits, ages, bins, sigma)
  elif name == "onehot":
    base = lambda logits, ages: onehot_nll(logits, ages, bins)
  else:
    raise errors.UserError(f"config.loss.name={name!r} is not one of {LOSSES}")
  if not l1_weight:
    return base
  return lambda logits, ages: base(logits, ages) + l1_weight * expectation_l1(logits, ages, bins)
