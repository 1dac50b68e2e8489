"""OUT/saved_model/: the exported function as a TensorFlow SavedModel through jax2tf, the weights as variables.

Its signature is serving_default(images: uint8 [B, S, S, 3]) -> {probabilities: float32 [B, K]}.
TensorFlow is imported only to write one.
"""

from typing import Any

from agejax import errors, parallel
from agejax.inference.export import jax_export, manifest

SAVED_MODEL_DIR = "saved_model"


def tools() -> tuple[Any, Any]:
  """Returns (tensorflow, jax2tf), or raises a one-line error saying how to do without them."""
  try:
    tf = parallel.import_tensorflow()
    from jax.experimental import jax2tf
  except ImportError as e:
    raise errors.UserError(
      f"the TensorFlow SavedModel needs tensorflow and jax.experimental.jax2tf ({e}): "
      f"pip install tensorflow-cpu, or skip it (--nosaved_model)"
    ) from None
  return tf, jax2tf


def write(traced: jax_export.Traced, target: str) -> None:
  """Writes the function as a TensorFlow SavedModel at the local folder `target`."""
  tf, jax2tf = tools()
  size = traced.size
  module = tf.Module()
  module.weights = [tf.Variable(leaf, trainable=False) for leaf in traced.leaves]  # not constants: graphs stay < 2 GB
  converted = jax2tf.convert(
    traced.fn,
    polymorphic_shapes=[None, f"(B, {size}, {size}, 3)"],
    with_gradient=False,
    native_serialization_platforms=traced.platforms,
  )

  @tf.function(
    input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=manifest.INPUT_NAME)], autograph=False
  )
  def serve(images):
    return {manifest.OUTPUT_NAME: converted(module.weights, images)}

  module.serve = serve
  tf.saved_model.save(module, target, signatures={"serving_default": serve})
