"""VGG16 with torchvision's structure in Flax NNX, ending in an age head (one logit per age bin)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torchvision's VGG16 "D" configuration: output channels of each 3x3 conv, "M" for a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
POOLED_SIZE = 7  # torchvision's AdaptiveAvgPool2d((7, 7))
HIDDEN = 4096


def scaled(width: int, multiplier: float) -> int:
  """Returns a layer width scaled by the width multiplier (at least 1)."""
  return max(1, int(round(width * multiplier)))


@functools.cache
def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Returns the [out, in] averaging matrix of torch's adaptive_avg_pool on one axis."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil, as torch does
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out_size: int = POOLED_SIZE) -> jax.Array:
  """Adaptive average pooling of an NHWC batch to out_size x out_size, with torch's bin edges."""
  _, h, w, _ = x.shape
  if h == out_size and w == out_size:
    return x
  ph = jnp.asarray(_adaptive_pool_matrix(h, out_size), x.dtype)
  pw = jnp.asarray(_adaptive_pool_matrix(w, out_size), x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw)


class VGG16(nnx.Module):
  """torchvision's VGG16 (optionally with batch norm) on NHWC input; `head` gives the logits.

  `width_multiplier` scales every conv and hidden width, so tests and the demo run on a CPU.
  `dtype` is the compute dtype (bfloat16 on accelerators); parameters stay float32 and the logits
  are returned in float32.
  """

  def __init__(
    self,
    num_classes: int = 1000,
    *,
    width_multiplier: float = 1.0,
    batch_norm: bool = False,
    dropout_rate: float = 0.5,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    # torchvision's initialisation: kaiming-normal (fan_out) convs, N(0, 0.01) linears, zero biases.
    conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
    linear_init = nnx.initializers.normal(0.01)
    convs, norms = [], []
    channels = 3
    for v in VGG16_LAYERS:
      if v == "M":
        continue
      out = scaled(v, width_multiplier)
      convs.append(
        nnx.Conv(channels, out, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init, dtype=dtype, rngs=rngs)
      )
      if batch_norm:
        # torch's BatchNorm2d: eps 1e-5, running stats updated with momentum 0.1.
        norms.append(nnx.BatchNorm(out, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs))
      channels = out
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms) if batch_norm else None
    hidden = scaled(HIDDEN, width_multiplier)
    self.fc1 = nnx.Linear(POOLED_SIZE * POOLED_SIZE * channels, hidden, kernel_init=linear_init, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, kernel_init=linear_init, dtype=dtype, rngs=rngs)
    # The head computes in float32: its logits feed a log-softmax over ~100 bins.
    self.head = nnx.Linear(hidden, num_classes, kernel_init=linear_init, dtype=jnp.float32, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.dtype = dtype

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Returns the pooled conv features, NHWC [B, 7, 7, C]."""
    x = x.astype(self.dtype)
    i = 0
    for v in VGG16_LAYERS:
      if v == "M":
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = self.convs[i](x)
      if self.norms is not None:
        x = self.norms[i](x, use_running_average=not train)
      x = nnx.relu(x)
      i += 1
    return adaptive_avg_pool(x)

  def embed(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Returns the 4096-wide (scaled) representation that feeds the head."""
    x = self.features(x, train=train)
    x = x.reshape(x.shape[0], -1)  # H, W, C order; convert.py permutes torch's C, H, W rows to it
    x = self.dropout(nnx.relu(self.fc1(x)), deterministic=not train, rngs=rngs)
    return self.dropout(nnx.relu(self.fc2(x)), deterministic=not train, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Returns float32 logits [B, num_classes] for an NHWC batch of normalised images."""
    return self.head(self.embed(x, train=train, rngs=rngs).astype(jnp.float32))


DTYPES = ("auto", "float32", "bfloat16", "float16")


def compute_dtype(name: str) -> jnp.dtype:
  """Resolves `config.model.dtype`: 'auto' is bfloat16 on accelerators and float32 on CPU."""
  if name == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  return jnp.dtype(name)


def create_model(model_config, num_bins: int, *, seed: int = 0) -> VGG16:
  """Builds the age model described by `config.model` with `num_bins` outputs."""
  dtype = compute_dtype(model_config.dtype)
  return VGG16(
    num_bins,
    width_multiplier=model_config.width_multiplier,
    batch_norm=model_config.get("batch_norm", False),
    dropout_rate=model_config.get("dropout_rate", 0.5),
    dtype=dtype,
    rngs=nnx.Rngs(seed),
  )


def forward_flops(image_size: int, num_classes: int, width_multiplier: float = 1.0) -> float:
  """Analytic FLOPs (2 per multiply-add) of one image's forward pass; ~30.9e9 for VGG16 at 224."""
  flops, size, channels = 0.0, image_size, 3
  for v in VGG16_LAYERS:
    if v == "M":
      size //= 2
      continue
    out = scaled(v, width_multiplier)
    flops += 2.0 * size * size * 9 * channels * out
    channels = out
  hidden = scaled(HIDDEN, width_multiplier)
  return flops + 2.0 * (POOLED_SIZE * POOLED_SIZE * channels * hidden + hidden * hidden + hidden * num_classes)
