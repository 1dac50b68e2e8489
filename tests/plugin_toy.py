"""A plug-in from outside agejax, written as a user would: a toy backbone with its own input spec, and a loss.

Importing it registers backbone "toy" and loss "expectation_l2"; a config lists it in
`config.plugins` (the module must be importable: tests put tests/ on PYTHONPATH).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from agejax import labels, models, settings
from agejax.training import losses

# Not ImageNet's: 0..255 pixels in BGR order, with means and stds of that range.
SPEC = models.InputSpec(pixel_range=255.0, channels="BGR", mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0))
WIDTHS = (8, 16, 32)  # conv, conv, hidden


class Toy(nnx.Module):
  """Two strided 3x3 convs, global average pooling, a hidden layer and the age head."""

  def __init__(self, num_bins: int, *, dtype, rngs: nnx.Rngs):
    c1, c2, hidden = WIDTHS
    self.conv1 = nnx.Conv(3, c1, (3, 3), strides=2, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=2, dtype=dtype, rngs=rngs)
    self.hidden = nnx.Linear(c2, hidden, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(hidden, num_bins, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, train: bool = False, rngs=None) -> jax.Array:
    x = nnx.relu(self.conv1(x.astype(self.dtype)))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.hidden(jnp.mean(x, axis=(1, 2))))
    return self.head(x.astype(jnp.float32))


def flops(model: settings.ModelSettings, image_size: int, num_bins: int) -> float:
  """2 FLOPs per multiply-add of one image's forward pass."""
  c1, c2, hidden = WIDTHS
  s1 = -(-image_size // 2)
  s2 = -(-s1 // 2)
  return 2.0 * (s1 * s1 * 9 * 3 * c1 + s2 * s2 * 9 * c1 * c2 + c2 * hidden + hidden * num_bins)


BACKBONE = models.register(
  models.Backbone(
    name="toy",
    create=lambda model, num_bins, dtype, rngs: Toy(num_bins, dtype=dtype, rngs=rngs),
    flops=flops,
    input_spec=SPEC,
    min_image_size=8,
  )
)


def expectation_l2(cfg: settings.LossSettings, bins: jax.Array) -> losses.LossFn:
  """(E[age] - age)^2 / scale per example; `scale` is this loss's own key, config.loss.scale."""
  scale = float(cfg.option("scale", 100.0))

  def loss(logits: jax.Array, ages: jax.Array, age_std: jax.Array) -> jax.Array:
    return jnp.square(labels.expected_age(jax.nn.softmax(logits), bins) - ages) / scale

  return loss


losses.register("expectation_l2", expectation_l2)
