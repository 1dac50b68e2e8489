"""OUT/model.onnx: the exported function through jax2onnx with a dynamic batch, checked in onnxruntime.

jax2onnx traces the function's primitives after two rewrites (`_inline`): nested jits inlined, and
max-pools whose windows tile the input written as reshape + max, as onnxruntime cannot run a rank-4
MaxPool. An op that jax2onnx or onnxruntime cannot handle skips model.onnx with the reason, and the
other formats are written.
"""

import contextlib
import io
import logging as std_logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from agejax import storage
from agejax.inference.export import jax_export, manifest

ONNX_FILE = "model.onnx"
ONNX_ATOL = 1e-4  # onnxruntime against jax on the reference crops, checked at export


def _block_max(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """A max-pool whose windows tile the input, as reshape + max (ONNX's MaxPool takes at most 3 spatial axes)."""
  shape: list[Any] = []
  axes = []
  for n, w in zip(x.shape, window):
    if w > 1:
      axes.append(len(shape) + 1)
      shape += [n // w, w]
    else:
      shape.append(n)
  return jnp.max(jnp.reshape(x, shape), axis=tuple(axes))


def _tiles(params: dict[str, Any], shape: Sequence[Any]) -> bool:
  """True for a reduce_window whose windows are its strides, unpadded, undilated, and divide the input."""
  window = params["window_dimensions"]
  return (
    tuple(params["window_strides"]) == tuple(window)
    and all(p == (0, 0) for p in params["padding"])
    and all(d == 1 for d in (*params["base_dilation"], *params["window_dilation"]))
    and all(w == 1 or (isinstance(n, int) and n % w == 0) for n, w in zip(shape, window))
  )


def _inline(jaxpr: jax_core.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
  """Evaluates a jaxpr equation by equation: nested jits inlined, tiling max-pools as reshape + max.

  jax2onnx then traces primitives only, never its own plug-ins for jax.image.resize (which refuses
  antialiasing and a symbolic batch) or flax's max_pool, and it writes no rank-4 MaxPool, which
  onnxruntime cannot run.
  """
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]  # noqa: E731
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in ("jit", "pjit"):
      inner = eqn.params["jaxpr"]
      outs = _inline(inner.jaxpr, inner.consts, *ins)
    elif name == "reduce_window_max" and _tiles(eqn.params, ins[0].shape):
      outs = [_block_max(ins[0], eqn.params["window_dimensions"])]
    else:
      out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
      outs = out if eqn.primitive.multiple_results else [out]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def write(traced: jax_export.Traced, target: str) -> str | None:
  """Writes the function as ONNX with a dynamic batch through jax2onnx, checked in onnxruntime on the traced crops.

  Returns None, or why model.onnx was not written (an op jax2onnx or onnxruntime cannot handle).
  """
  try:
    import jax2onnx
  except ImportError as e:
    return f"jax2onnx is not installed ({e}; pip install jax2onnx)"
  spec = jax_export.input_spec(traced.size)
  fn, leaves, crops = traced.fn, traced.leaves, traced.crops
  closed = jax.make_jaxpr(lambda images: fn(leaves, images))(spec)  # the weights become the jaxpr's constants
  # onnx_ir warns of every constant's value type; jax2onnx logs a traceback for each optional plug-in
  # (dm_pix, equinox) that fails to import. None of it is the user's business.
  quiet = [std_logging.getLogger(name) for name in ("onnx_ir", "jax2onnx")]
  levels = [logger.level for logger in quiet]
  try:
    for logger in quiet:
      logger.setLevel(std_logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx prints debug lines
      model = jax2onnx.to_onnx(
        lambda images: _inline(closed.jaxpr, closed.consts, images)[0],
        inputs=[spec],
        input_names=[manifest.INPUT_NAME],
        output_names=[manifest.OUTPUT_NAME],
        model_name="agejax",
      )
  except Exception as e:  # jax2onnx raises NotImplementedError, TypeError or ValueError for what it cannot convert
    op = re.search(r"primitive '([^']+)'", str(e))
    return f"jax2onnx cannot convert {f'the op {op[1]!r}' if op else 'the model'} ({storage.first_line(e)})"
  finally:
    for logger, level in zip(quiet, levels):
      logger.setLevel(level)
  with open(target, "wb") as f:
    f.write(model.SerializeToString())
  try:
    import onnxruntime
  except ImportError:
    return None  # written, but not checked here
  try:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its shape-merging warnings are about intermediate values
    session = onnxruntime.InferenceSession(target, options, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {manifest.INPUT_NAME: crops[i : i + n]})[0] for i, n in ((0, 1), (1, 2))])
  except Exception as e:  # onnxruntime's errors name the node: "... running MaxPool node. Name:..."
    os.remove(target)
    op = re.search(r"running (\w+) node", str(e))
    return f"onnxruntime cannot run {f'the op {op[1]!r}' if op else 'it'} ({storage.first_line(e)})"
  error = float(np.abs(got - traced.expected).max()) if np.all(np.isfinite(got)) else math.inf
  if error > ONNX_ATOL:
    os.remove(target)
    return f"onnxruntime's probabilities differ from jax's by {error:.2g} (more than {ONNX_ATOL:g})"
  return None
