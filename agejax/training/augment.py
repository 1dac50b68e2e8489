"""On-device training augmentation of uint8 face batches (runs inside the jitted step), normalised for the backbone."""

import jax
import jax.numpy as jnp

from agejax import models, settings


def gaussian_blur(images: jax.Array, sigma: float = 1.0, radius: int = 2) -> jax.Array:
  """Blurs an NHWC float batch with a separable Gaussian (edge-padded), channel by channel."""
  taps = jnp.exp(-0.5 * jnp.square(jnp.arange(-radius, radius + 1, dtype=jnp.float32) / sigma))
  taps = taps / jnp.sum(taps)
  c = images.shape[-1]
  x = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
  for kernel in (taps.reshape(-1, 1, 1, 1), taps.reshape(1, -1, 1, 1)):
    x = jax.lax.conv_general_dilated(
      x,
      jnp.tile(kernel, (1, 1, 1, c)),
      (1, 1),
      "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c,
    )
  return x


def _scale_crop(image: jax.Array, scale: jax.Array, shift: jax.Array, size: int) -> jax.Array:
  """Zooms one HWC image by `scale` about its centre, shifts it by `shift` (output pixels), resizes."""
  h, w, c = image.shape
  base = jnp.array([size / h, size / w], jnp.float32) * scale
  # Keep the image centre at the output centre, then move it by the shift.
  translation = 0.5 * size - base * jnp.array([h, w], jnp.float32) / 2.0 + shift
  return jax.image.scale_and_translate(
    image, (size, size, c), (0, 1), base, translation, method="linear", antialias=True
  )


def _window_crop(image: jax.Array, top_left: jax.Array, side: jax.Array, size: int) -> jax.Array:
  """Resizes the square window of one HWC image at `top_left` (y, x, in pixels) with side `side` to size x size."""
  c = image.shape[-1]
  scale = jnp.full((2,), size / side, jnp.float32)
  # Input coordinate u maps to (u - top_left) * scale: the window's edges to the output's.
  return jax.image.scale_and_translate(
    image, (size, size, c), (0, 1), scale, -top_left * scale, method="linear", antialias=True
  )


def resized_crop(images: jax.Array, key: jax.Array, size: int, min_area: float) -> jax.Array:
  """A square random resized crop of each image of an NHWC float batch (RandomResizedCrop with ratio 1).

  The window's area is uniform in [min_area, 1] of the image's, its side sqrt(area * H * W) at most
  min(H, W), its position uniform among those inside the image: no padding is ever sampled.
  """
  b, h, w, _ = images.shape
  k_area, k_position = jax.random.split(key)
  area = jax.random.uniform(k_area, (b,), minval=min_area, maxval=1.0)
  side = jnp.minimum(jnp.sqrt(area * h * w), min(h, w))
  room = jnp.stack([h - side, w - side], axis=-1)
  top_left = jax.random.uniform(k_position, (b, 2)) * room
  return jax.vmap(lambda im, t, s: _window_crop(im, t, s, size))(images, top_left, side)


def augment(
  images: jax.Array, key: jax.Array, size: int, cfg: settings.AugmentSettings, spec: models.InputSpec
) -> jax.Array:
  """Training path: random flip, scale/translation or resized crop, brightness, contrast, blur/sharpness; normalise.

  `cfg`: flip (bool), scale (max relative zoom), translate (max shift as a fraction of the size),
  resized_crop_min_area (> 0: a square random resized crop of this to all of the image's area in
  place of scale and translate, as the benchmark trains), brightness and contrast (max relative
  change), blur and sharpness (max weight of a move toward, or away from, a Gaussian-blurred copy;
  0 disables). `spec` is the input the weights expect.
  """
  b = images.shape[0]
  x = images.astype(jnp.float32) / 255.0
  k_flip, k_scale, k_shift, k_bright, k_contrast, k_blur = jax.random.split(key, 6)
  if cfg.flip:
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1, :], x)
  if cfg.resized_crop_min_area > 0:  # the benchmark's crop in place of the zoom, drawn from the zoom's key
    x = resized_crop(x, k_scale, size, cfg.resized_crop_min_area)
  elif cfg.scale or cfg.translate:
    scale = 1.0 + jax.random.uniform(k_scale, (b, 1), minval=-cfg.scale, maxval=cfg.scale)
    scale = jnp.broadcast_to(scale, (b, 2))
    shift = jax.random.uniform(k_shift, (b, 2), minval=-cfg.translate, maxval=cfg.translate) * size
    x = jax.vmap(lambda im, s, t: _scale_crop(im, s, t, size))(x, scale, shift)
  else:
    x = models.resize(x, size)
  if cfg.brightness:
    x = x * (1.0 + jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-cfg.brightness, maxval=cfg.brightness))
  if cfg.contrast:
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    factor = 1.0 + jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=-cfg.contrast, maxval=cfg.contrast)
    x = (x - mean) * factor + mean
  if cfg.blur or cfg.sharpness:
    # t > 0 blends toward the blurred copy (blur); t < 0 away from it (unsharp-mask sharpening).
    t = jax.random.uniform(k_blur, (b, 1, 1, 1), minval=-cfg.sharpness, maxval=cfg.blur)
    x = x + t * (gaussian_blur(x) - x)
  return spec.normalize(jnp.clip(x, 0.0, 1.0))
