"""OUT/model.jax: the exported function serialized with jax.export, and the traced function every format is made from.

The function is the evaluation path's preprocessing, the model and the tempered distribution
(`AgeModel.distributions`) on uint8 RGB crops [B, S, S, 3], any B, -> float32 probabilities [B, K],
with the weights inside; one file runs on CPU, CUDA and TPU. The other formats convert the same
function (`Traced`): jax2tf for the SavedModel, jax2onnx for ONNX.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np
from jax import export

if TYPE_CHECKING:  # the model code is imported only to export, never to serve an export
  from agejax.inference import prediction

MODEL_FILE = "model.jax"
# One file runs on any of these: jax.export lowers for platforms this machine lacks.
PLATFORMS = ("cpu", "cuda", "tpu")


class _Weights(NamedTuple):
  params: Any
  model_state: Any


@dataclasses.dataclass(frozen=True)
class Traced:
  """What every format is written from: the function, its weights, its jax.export and its answers on check crops."""

  fn: Callable[[list, jax.Array], jax.Array]  # f(weight leaves, uint8 images) -> probabilities
  leaves: list  # the weights, host arrays
  size: int  # S: the function takes uint8 [B, S, S, 3]
  platforms: tuple[str, ...]  # where model.jax and the SavedModel may run
  exported: export.Exported  # fn with the weights inside, a symbolic batch, for `platforms`
  crops: np.ndarray  # uint8 [N, S, S, 3]: the reference crop first
  expected: np.ndarray  # fn's probabilities on `crops`, [N, K]
  # What the numbers mean, for formats that state it beside the model (Triton's config.pbtxt):
  bins: np.ndarray  # the age of each of the K probabilities, years
  temperature: float  # the calibration temperature inside fn
  flip: bool  # fn averages each crop's distribution with its mirror image's
  eval_crop: float  # the central fraction of each crop's side fn sees before its resize
  framing: dict[str, Any] | None  # inference.json's record of the training crops' framing; None: the fixed margin


def _probabilities_fn(
  predictor: "prediction.Predictor", treedef: jax.tree_util.PyTreeDef
) -> Callable[[list, jax.Array], jax.Array]:
  """Returns f(weight leaves, uint8 images) -> probabilities through `AgeModel.distributions`: the same numbers.

  The predictor's way of predicting (single views or flip averages) with that way's temperature.
  """
  temperature, flip = np.float32(predictor.temperature), predictor.flip

  def probabilities(leaves: list, images: jax.Array) -> jax.Array:
    params, model_state = jax.tree.unflatten(treedef, leaves)
    return predictor.model.distributions(_Weights(params, model_state), images, temperature, flip)

  return probabilities


def input_spec(size: int) -> jax.ShapeDtypeStruct:
  """uint8 [B, size, size, 3] with a symbolic batch B >= 1."""
  (batch,) = export.symbolic_shape("B")
  return jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8)


def trace(predictor: "prediction.Predictor", platforms: Sequence[str], crops: np.ndarray) -> Traced:
  """The predictor's probabilities as one function of its weights, exported for `platforms` and run on `crops`."""
  size = predictor.input_size
  # Host copies: the export holds plain arrays, not arrays laid out over this machine's devices.
  leaves, treedef = jax.tree.flatten(jax.device_get((predictor.state.params, predictor.state.model_state)))
  fn = _probabilities_fn(predictor, treedef)
  exported = export.export(jax.jit(lambda images: fn(leaves, images)), platforms=tuple(platforms))(input_spec(size))
  expected = np.asarray(jax.jit(fn)(leaves, crops))
  return Traced(
    fn,
    leaves,
    size,
    tuple(platforms),
    exported,
    crops,
    expected,
    np.asarray(predictor.bins),
    float(predictor.temperature),
    bool(predictor.flip),
    float(predictor.eval_crop),
    predictor.record.get("framing"),
  )


def write(traced: Traced, target: str) -> None:
  """Writes the serialized jax.export at `target` (model.jax)."""
  with open(target, "wb") as f:
    f.write(bytes(traced.exported.serialize()))


def local_platform() -> str:
  """This process's default JAX platform as jax.export names it ('cpu', 'cuda', 'rocm' or 'tpu')."""
  platform = jax.default_backend()
  if platform == "gpu":
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
  return platform
