import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax import errors, models, settings
from agejax.training import augment

IMAGENET = models.IMAGENET


def cfg(**kw) -> settings.AugmentSettings:
  return settings.AugmentSettings(**{"flip": False, **kw})


def preprocess(x, size: int, spec: models.InputSpec = IMAGENET):
  """The evaluation path of a model with this input size and spec."""
  return models.AgeModel(None, np.zeros(1, np.float32), size, spec).preprocess(x)


def images(n=4, size=24, seed=0) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_preprocess_normalises_with_imagenet_statistics():
  x = images()
  got = np.asarray(preprocess(x, 24))
  ref = (np.asarray(x, np.float64) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_no_random_part_enabled_equals_eval_preprocessing():
  x = images()
  np.testing.assert_allclose(augment.augment(x, jax.random.key(0), 24, cfg(), IMAGENET), preprocess(x, 24), atol=1e-6)


def test_flip_mirrors_some_images_and_keeps_the_others():
  x = images(n=16)
  out = np.asarray(augment.augment(x, jax.random.key(1), 24, cfg(flip=True), IMAGENET))
  plain = np.asarray(preprocess(x, 24))
  flipped = [np.allclose(o, p[:, ::-1]) for o, p in zip(out, plain)]
  kept = [np.allclose(o, p) for o, p in zip(out, plain)]
  assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 16


@pytest.mark.slow
def test_scale_and_translate_resize_to_the_model_size_and_depend_on_the_key():
  x = images(size=40)
  c = cfg(scale=0.2, translate=0.1)
  a = augment.augment(x, jax.random.key(0), 32, c, IMAGENET)
  assert a.shape == (4, 32, 32, 3) and np.all(np.isfinite(a))
  assert not np.allclose(a, augment.augment(x, jax.random.key(1), 32, c, IMAGENET))
  np.testing.assert_array_equal(a, augment.augment(x, jax.random.key(0), 32, c, IMAGENET))


@pytest.mark.slow
def test_zero_scale_and_shift_crop_is_the_plain_resize():
  x = jnp.asarray(images(size=40), jnp.float32) / 255.0
  got = augment._scale_crop(x[0], jnp.ones(2), jnp.zeros(2), 32)
  np.testing.assert_allclose(got, models.resize(x, 32)[0], atol=1e-5)


@pytest.mark.slow
def test_blur_preserves_constant_images_and_smooths_noise():
  flat = jnp.full((1, 16, 16, 3), 0.25)
  np.testing.assert_allclose(augment.gaussian_blur(flat), flat, atol=1e-6)
  noise = jnp.asarray(np.random.default_rng(0).random((1, 16, 16, 3)), jnp.float32)
  assert float(jnp.std(augment.gaussian_blur(noise))) < 0.6 * float(jnp.std(noise))
  x = images()
  sharp = augment.augment(x, jax.random.key(3), 24, cfg(sharpness=1.0), IMAGENET)
  assert not np.allclose(sharp, preprocess(x, 24))


def test_an_input_spec_sets_range_channel_order_mean_and_std():
  """VGG-Face-like weights: pixels 0..255 in BGR order minus a mean, no std; augmentation normalises the same way."""
  x = images()
  spec = models.InputSpec(pixel_range=255.0, channels="BGR", mean=(93.5, 104.8, 129.2), std=(1.0, 1.0, 1.0))
  ref = np.asarray(x, np.float64)[..., ::-1] - np.array([93.5, 104.8, 129.2])
  np.testing.assert_allclose(preprocess(x, 24, spec), ref, atol=1e-4)
  np.testing.assert_allclose(augment.augment(x, jax.random.key(0), 24, cfg(), spec), ref, atol=1e-3)
  assert models.InputSpec.from_json(spec.to_json()) == spec
  assert models.InputSpec.from_json(None) == IMAGENET  # records from before specs were all ImageNet's
  with pytest.raises(errors.UserError, match="channels='GBR'"):
    models.InputSpec(channels="GBR")


@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_blur_equals_scipys_gaussian_filter_with_edge_padding(sigma):
  """The blur the `blur` augmentation mixes in is a Gaussian of std sigma over a radius of 2, edges repeated: scipy's
  filter in float64 (mutant killed: augment.py:11 `arange(...) / sigma` -> `- sigma`, a kernel shifted off centre)."""
  from scipy import ndimage

  images = np.random.default_rng(0).uniform(0, 1, (2, 9, 11, 3))
  got = np.asarray(augment.gaussian_blur(jnp.asarray(images, jnp.float32), sigma=sigma))
  expected = ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=2 / sigma)
  np.testing.assert_allclose(got, expected, atol=2e-6)
