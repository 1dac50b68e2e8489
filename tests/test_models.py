import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agejax.models import vgg


def adaptive_avg_pool_loop(x: np.ndarray, out: int) -> np.ndarray:
  """Direct loop over torch's adaptive pooling windows, in float64."""
  b, h, w, c = x.shape
  y = np.zeros((b, out, out, c))
  for i in range(out):
    h0, h1 = (i * h) // out, int(np.ceil((i + 1) * h / out))
    for j in range(out):
      w0, w1 = (j * w) // out, int(np.ceil((j + 1) * w / out))
      y[:, i, j] = x[:, h0:h1, w0:w1].astype(np.float64).mean(axis=(1, 2))
  return y


@pytest.mark.parametrize("size", [1, 2, 3, 7, 9, 14])
def test_adaptive_avg_pool_matches_torch_windows(size):
  x = np.random.default_rng(size).normal(size=(2, size, size, 5)).astype(np.float32)
  got = vgg.adaptive_avg_pool(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), adaptive_avg_pool_loop(x, 7), atol=1e-6)


def test_vgg16_structure_at_full_width():
  model = nnx.eval_shape(lambda: vgg.VGG16(1000, rngs=nnx.Rngs(0)))
  kernels = [c.kernel.shape for c in model.convs]
  assert [k[-1] for k in kernels] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  assert all(k[:2] == (3, 3) for k in kernels)
  assert model.fc1.kernel.shape == (25088, 4096) and model.fc2.kernel.shape == (4096, 4096)
  assert model.head.kernel.shape == (4096, 1000)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 138_357_544  # torchvision's vgg16 parameter count


@pytest.mark.slow
def test_dtype_policy_and_dropout():
  model = vgg.VGG16(100, width_multiplier=0.0625, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  x = jax.random.normal(jax.random.key(0), (3, 40, 40, 3))
  evaluate = nnx.jit(lambda m, x: m(x))
  train = nnx.jit(lambda m, x, key: m(x, train=True, rngs=key))
  out = evaluate(model, x)
  assert out.shape == (3, 100) and out.dtype == jnp.float32
  np.testing.assert_array_equal(evaluate(model, x), out)  # eval mode is deterministic
  a = train(model, x, jax.random.key(1))
  b = train(model, x, jax.random.key(2))
  assert not np.allclose(a, b)  # dropout is active in training, keyed by the rng
  np.testing.assert_array_equal(a, train(model, x, jax.random.key(1)))


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (1, 1, 16, 32), (7, 7, 3, 64)])
def test_the_conv_init_draws_jaxs_variance_scaling_values_flat(shape):
  """Bit for bit JAX's own kaiming-normal (fan_out) initializer (shapes whose 4-D draw compiles in under a second)."""
  key = jax.random.key(3)
  reference = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")(key, shape, jnp.float32)
  got = vgg.kaiming_normal_fan_out(key, shape, jnp.float32)
  assert got.shape == shape and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(reference))
  # torchvision's std, sqrt(2 / fan_out) with fan_out = 3 x 3 x out: independent of JAX's initializer.
  draws = np.asarray(got, np.float64) / np.sqrt(2 / (shape[0] * shape[1] * shape[3]))
  np.testing.assert_allclose(draws, np.asarray(jax.random.normal(key, (draws.size,))).reshape(shape), rtol=1e-6)
