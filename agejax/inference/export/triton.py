"""OUT/triton/: an NVIDIA Triton model repository of model.onnx, agejax/config.pbtxt and agejax/1/model.onnx.

`tritonserver --model-repository OUT/triton` serves it on Triton's onnxruntime backend: Triton has
no JAX backend and deprecated its TensorFlow one in 25.03, so ONNX is how this model runs there.
config.pbtxt is Triton's own `ModelConfig` message (tritonclient's model_config_pb2) printed in
protobuf text format: model.onnx's input and output names, datatypes and dims with a dynamic batch,
and in its `parameters` what a client must send and what the outputs mean. It is checked against
model.onnx's graph before anything is written. Triton itself is not run here.
"""

import os
import shutil
from typing import Any

from agejax.data import framing
from agejax.inference.export import jax_export, manifest, onnx

TRITON_DIR = "triton"
MODEL_NAME = "agejax"  # the model's name in the repository and in Triton's /v2/models/{name}
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
MAX_BATCH_SIZE = 32  # serve.py's --max_batch default: faces Triton's dynamic batcher puts in one model call
MAX_QUEUE_DELAY_US = 5000  # serve.py's --max_wait_ms default (5 ms): how long a batch waits to fill
# What Triton's own auto-complete writes for an ONNX model: both name the onnxruntime backend.
BACKEND, PLATFORM = "onnxruntime", "onnxruntime_onnx"
# model.onnx's element types by the config's datatype names (onnx.TensorProto's numbers: UINT8 2, FLOAT 1).
_ONNX_TYPES = {"TYPE_UINT8": 2, "TYPE_FP32": 1}
# The text format leaves out fields at their defaults; this header says what they are.
HEADER = f"""\
# NVIDIA Triton model configuration of an agejax export: {MODEL_NAME}/{VERSION}/{onnx.ONNX_FILE} on onnxruntime.
# Written by agejax.inference.export.triton; protobuf text format of Triton's ModelConfig (model_config.proto).
# Fields at their defaults are left out: the input's format is FORMAT_NONE, and the instance group's
# kind is KIND_AUTO (one instance on each GPU Triton sees, else one on the CPU: model.onnx runs on either).
# `parameters` say what a client sends and what the outputs mean; the export's manifest.json has the rest.
"""


def tools() -> tuple[Any, Any]:
  """Returns (tritonclient's model_config_pb2, protobuf's text_format); raises ImportError without tritonclient."""
  from google.protobuf import text_format
  from tritonclient.grpc import model_config_pb2

  return model_config_pb2, text_format


def _framing_text(traced: jax_export.Traced) -> str:
  """How a client frames each face, as the training crops were framed (what predict.py and serve.py do)."""
  record = framing.from_record({"framing": traced.framing})
  if record is None:
    from agejax.inference import photos  # the model code: only at export, never to read an export

    return (
      f"the fixed-margin crop (agejax.inference.photos.align_face): rotate the face upright about the centre of "
      f"its MTCNN box so that the eyes are level, take the square of {photos.FACE_MARGIN:g} times the longer side "
      f"of the box (black outside the photo), resize it to {traced.size} x {traced.size} with antialiasing (Lanczos)"
    )
  points = ", ".join(f"{name} ({x:.4f}, {y:.4f})" for name, (x, y) in zip(framing.LANDMARKS, record.landmarks.tolist()))
  return (
    f"as the training crops were framed (agejax.inference.photos.warp_face): map the five MTCNN landmarks by a "
    f"least-squares similarity (rotation, scale, shift) onto these (x, y) fractions of the width and height of the "
    f"crop: {points}; black outside the photo, resized to {traced.size} x {traced.size} with antialiasing (Lanczos)"
  )


def parameters(traced: jax_export.Traced) -> dict[str, str]:
  """The config's `parameters`: what a client must send and what the outputs mean, by key."""
  s, k = traced.size, len(traced.bins)
  min_age, max_age = int(traced.bins[0]), int(traced.bins[-1])
  name, output = manifest.INPUT_NAME, manifest.OUTPUT_NAME
  return {
    "input": (
      f"{name}: uint8 RGB face crops [N, {s}, {s}, 3] (rows, columns, channels R G B), pixel values as decoded: "
      f"no scaling, normalisation or resizing (model.onnx does its own), one crop per face"
    ),
    "framing": _framing_text(traced),
    "eval_crop": (
      f"{traced.eval_crop:g}: model.onnx itself takes the central {traced.eval_crop:g} of the side of each crop "
      f"before its resize, as evaluation did; send the whole {s} x {s} crop"
      if traced.eval_crop < 1
      else f"1: model.onnx sees the whole crop, as evaluation did; send the whole {s} x {s} crop"
    ),
    "output": (
      f"{output}: float32 [N, {k}], each row sums to 1; {output}[n, i] is the probability that face n is "
      f"min_age + i years old"
    ),
    "min_age": str(min_age),
    "max_age": str(max_age),
    "predicted_age": (
      f"sum over i of {output}[n, i] * (min_age + i): the expectation of the distribution, the age agejax reports"
    ),
    "temperature": (
      f"{traced.temperature!r}: the calibration temperature, applied inside model.onnx (softmax of logits / "
      f"temperature); do not apply it again"
    ),
    "flip": (
      "true: inside model.onnx the distribution of each face is the mean of those of its crop and of its mirror "
      "image; send each crop once, unmirrored"
      if traced.flip
      else "false: each crop is one view (no mirror-image averaging)"
    ),
  }


def config(traced: jax_export.Traced) -> Any:
  """Triton's ModelConfig for model.onnx: names, datatypes and dims from the traced function, a dynamic batch."""
  model_config_pb2, _ = tools()
  s, k = traced.size, len(traced.bins)
  message = model_config_pb2.ModelConfig(
    name=MODEL_NAME,
    platform=PLATFORM,
    backend=BACKEND,
    max_batch_size=MAX_BATCH_SIZE,  # Triton adds the batch dimension: dims below are one face's
    version_policy=model_config_pb2.ModelVersionPolicy(
      latest=model_config_pb2.ModelVersionPolicy.Latest(num_versions=1)
    ),
    input=[
      model_config_pb2.ModelInput(
        name=manifest.INPUT_NAME,
        data_type=model_config_pb2.TYPE_UINT8,
        format=model_config_pb2.ModelInput.FORMAT_NONE,  # informational in Triton: `parameters` give the layout
        dims=[s, s, 3],
      )
    ],
    output=[model_config_pb2.ModelOutput(name=manifest.OUTPUT_NAME, data_type=model_config_pb2.TYPE_FP32, dims=[k])],
    dynamic_batching=model_config_pb2.ModelDynamicBatching(max_queue_delay_microseconds=MAX_QUEUE_DELAY_US),
    # KIND_AUTO: one instance on each GPU Triton sees, else on the CPU. model.onnx runs on onnxruntime's CPU
    # and CUDA providers alike, so one repository serves on either machine (checked here on the CPU only).
    instance_group=[model_config_pb2.ModelInstanceGroup(kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO, count=1)],
  )
  for key, value in parameters(traced).items():
    message.parameters[key].string_value = value
  return message


def config_text(message: Any) -> str:
  """config.pbtxt's text: the header, then the message in protobuf text format."""
  _, text_format = tools()
  return HEADER + text_format.MessageToString(message)


def mismatch(message: Any, model: Any) -> str | None:
  """Why Triton's config `message` does not describe the ONNX ModelProto `model`'s inputs and outputs, or None.

  Names, element types and dims must agree, the batch dimension first and dynamic (any size) in model.onnx
  when the config batches (max_batch_size > 0), as Triton's onnxruntime backend checks when it loads the model.
  """
  model_config_pb2, _ = tools()
  initializers = {t.name for t in model.graph.initializer}  # older ONNX files list weights among the inputs
  batched = message.max_batch_size > 0
  for kind, declared, actual in (
    ("input", message.input, model.graph.input),
    ("output", message.output, model.graph.output),
  ):
    tensors = {v.name: v.type.tensor_type for v in actual if v.name not in initializers}
    if sorted(tensors) != sorted(t.name for t in declared):
      return f"the config's {kind}s {sorted(t.name for t in declared)} are not model.onnx's {sorted(tensors)}"
    for t in declared:
      tensor, dtype = tensors[t.name], model_config_pb2.DataType.Name(t.data_type)
      if tensor.elem_type != _ONNX_TYPES.get(dtype):
        return f"{kind} {t.name!r} is {dtype} in the config but ONNX element type {tensor.elem_type} in model.onnx"
      dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]  # -1: any size
      wanted = ([-1] if batched else []) + list(t.dims)
      if dims != wanted:
        return f"{kind} {t.name!r} has dims {dims} in model.onnx (-1: any size), the config {wanted} (batch first)"
  return None


def write(traced: jax_export.Traced, target: str) -> str | None:
  """Writes the repository at `target` from the model.onnx beside it, checked against its graph.

  Returns None, or why nothing was written: no model.onnx (turned off, or not convertible), no
  tritonclient to write Triton's ModelConfig with, or a config that disagrees with the ONNX graph.
  """
  source = os.path.join(os.path.dirname(target), onnx.ONNX_FILE)
  if not os.path.isfile(source):
    return f"{onnx.ONNX_FILE} was not written (--noonnx, or see the manifest's onnx_skipped): the repository serves it"
  try:
    message = config(traced)
    text = config_text(message)
  except ImportError as e:
    return f"tritonclient is not installed ({e}; pip install 'tritonclient[grpc]')"
  try:
    import onnx as onnx_lib
  except ImportError:
    checked = None  # the config is written, but not checked against the graph here
  else:
    checked = mismatch(message, onnx_lib.load(source))
  if checked:
    return f"its config.pbtxt would disagree with model.onnx: {checked}"
  version = os.path.join(target, MODEL_NAME, VERSION)
  os.makedirs(version)
  shutil.copyfile(source, os.path.join(version, onnx.ONNX_FILE))  # the same bytes: the manifest lists both
  with open(os.path.join(target, MODEL_NAME, CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(text)
  return None
