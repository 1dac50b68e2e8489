"""The age model as functions: a backbone's graph, its age bins and its input, from uint8 crops to distributions."""

import dataclasses
from collections.abc import Collection
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from agejax import labels
from agejax.models import registry

PyTree = Any


class Weights(Protocol):
  """Anything holding a model's parameters and its other state (batch statistics), e.g. a TrainState."""

  @property
  def params(self) -> PyTree: ...

  @property
  def model_state(self) -> PyTree: ...


def resize(images: jax.Array, size: int) -> jax.Array:
  """Resizes an NHWC batch to size x size (antialiased bilinear), or returns it unchanged."""
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), method="linear", antialias=True)


def centre_crop(images: jax.Array, fraction: float) -> jax.Array:
  """The central round(fraction * H) x round(fraction * W) pixels of an NHWC batch (albumentations' CenterCrop).

  Its rows start at (H - round(fraction * H)) // 2, its columns likewise, as albumentations' CenterCrop's:
  the benchmark's evaluation crop of its 281 px faces (256/281) is rows and columns 12..267. Shapes
  are static, so the slice is too.
  """
  _, h, w, _ = images.shape
  ch, cw = max(1, round(fraction * h)), max(1, round(fraction * w))
  if (ch, cw) == (h, w):
    return images
  top, left = (h - ch) // 2, (w - cw) // 2
  return images[:, top : top + ch, left : left + cw]


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """Splits an NNX model into its graph definition, params and other state as plain dicts."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # flax: a variadic tuple
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


@dataclasses.dataclass(frozen=True, eq=False)
class AgeModel:
  """A backbone's graph with the age bins it predicts over, its input size and the input its weights expect.

  Pure functions of (weights, images): jit them, or call them inside a jitted step.
  """

  graphdef: nnx.GraphDef
  bins: np.ndarray  # [K] float32 ages
  image_size: int
  input_spec: registry.InputSpec
  # The central fraction (per side) of each stored crop that evaluation, prediction, export and serving
  # see before the resize (`data.eval_crop`); 1.0: the whole crop. Training crops by its own augmentation.
  eval_crop: float = 1.0

  def logits(
    self,
    params: PyTree,
    model_state: PyTree,
    images: jax.Array,
    *,
    train: bool,
    key: jax.Array | None = None,
    frozen: Collection[str] = (),
  ) -> tuple[jax.Array, PyTree]:
    """Runs the backbone on normalised images; returns the logits and the updated model state.

    `frozen` names modules by their "/"-joined paths (e.g. "norms/3", "layer1/0/bn1"). Its norm
    layers (modules with a `use_running_average` attribute, as nnx.BatchNorm) normalise by their
    running statistics, and keep them, even when training: a frozen layer computes in the train step
    what it computes at evaluation. Dropout is not affected.
    """
    model = nnx.merge(self.graphdef, params, model_state)
    if train and frozen:  # trace-time: the frozen norms' mode is part of the compiled step
      for path, node in nnx.iter_graph(model):  # iter_graph: in every flax with nnx.List
        if isinstance(node, nnx.Module) and hasattr(node, "use_running_average") and "/".join(map(str, path)) in frozen:
          node.use_running_average = True
    out = model(images, train=train, rngs=key)
    _, _, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # flax: a variadic tuple
    return out, nnx.to_pure_dict(rest)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """Evaluation input: uint8 NHWC -> its central `eval_crop`, resized to the model's size and normalised."""
    x = centre_crop(images, self.eval_crop).astype(jnp.float32) / 255.0
    return self.input_spec.normalize(resize(x, self.image_size))

  def outputs(
    self, weights: Weights, images: jax.Array, temperature: ArrayLike = 1.0, flip: bool = False
  ) -> tuple[jax.Array, jax.Array]:
    """Returns (the raw model's log-probabilities, the calibrated distributions), each [B, K], of a uint8 batch.

    The distributions are `labels.tempered(log-probabilities, bins, temperature)`: tempered around
    the raw model's expected age, which they keep. `flip` first averages each face's distribution
    with its mirror image's (test-time augmentation: a mirrored face is an equally valid view), and
    the temperature tempers that average: flip averages have their own temperature.
    """
    view = lambda x: self.logits(weights.params, weights.model_state, self.preprocess(x), train=False)[0]  # noqa: E731
    logits = view(images)
    if flip:
      mirrored = view(images[:, :, ::-1])
      averaged = 0.5 * (jax.nn.softmax(logits) + jax.nn.softmax(mirrored))
      logits = jnp.log(jnp.maximum(averaged, jnp.finfo(jnp.float32).tiny))
    return logits, labels.tempered(logits, self.bins, temperature)

  def distributions(
    self, weights: Weights, images: jax.Array, temperature: ArrayLike = 1.0, flip: bool = False
  ) -> jax.Array:
    """Returns the calibrated age distributions [B, K] of a uint8 batch (see `outputs`)."""
    return self.outputs(weights, images, temperature, flip)[1]
