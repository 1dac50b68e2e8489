"""The Open Inference Protocol (KServe's V2 protocol, Triton's HTTP API) over HTTP, beside /v1/predict.

One model, `Settings.model_name` ("agejax"), version "1". It takes exactly one input:

- `photos`, BYTES [N]: encoded photos (JPEG, PNG, WebP), one element each; their faces are found
  and framed as /v1/predict does (request parameter `aligned: true`: each photo is a face crop).
  In JSON a BYTES element is a string, so a photo there is its base64 (standard alphabet); as binary
  data (Triton's extension, gRPC) it is the photo's bytes.
- `images`, UINT8 [N, S, S, 3]: RGB face crops at the model's input size, the batcher's (and the
  exported model's) input as they are.

and answers one row per face: `probabilities` FP32 [F, K] (ages `min_age`..), `age` (the
expectation), `std`, `interval80` [F, 2]; for photos also `box` [F, 4] (x, y, width, height in the
photo's pixels), `photo_index` INT32 [F] (the photo each face is in) and `faces_found` INT32 [N].
A request with `images` has F = N. With the request parameter `under` (threshold ages: a string
"18,25" or an integer 18), also `p_under` FP32 [F, len(T)]: each face's P(age < T) for each age T in
the order given (repeats once), the calibrated distribution's mass on the bins below T (before that
birthday), as /v1/predict's `p_under`. Every input goes through `service.Service`: the same decode
workers, scheduler, batcher and limits as /v1/predict. `oip_grpc` speaks the same over gRPC.
"""

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import agejax
from agejax.serving.service import Service, refusal
from agejax.serving.uploads import Refused, parse_off_loop, read_body, screen_json, thresholds

VERSION = "1"
PHOTOS, IMAGES = "photos", "images"  # the inputs: encoded photos, or crops (the export's input name)
P_UNDER = "p_under"  # the output of P(age < T), answered when the request's parameter `under` gives T
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary data extension: the JSON part's bytes
EXTENSIONS = ["binary_tensor_data"]
MAX_HEADER_VALUES = 4096  # a valid JSON header (binary data after it) holds a few dozen values
# numpy's names of the protocol's datatypes that appear here
DTYPES: dict[str, type[np.generic]] = {"UINT8": np.uint8, "INT32": np.int32, "FP32": np.float32}


class ProtocolError(Exception):
  """A request the protocol answers with an error: its HTTP status and one-line message."""

  def __init__(self, status: int, message: str, retry_after_s: int | None = None):
    super().__init__(message)
    self.status, self.message, self.retry_after_s = status, message, retry_after_s


@dataclasses.dataclass
class Tensor:
  """A named tensor: BYTES data is a list of bytes, any other datatype a NumPy array of its shape."""

  name: str
  datatype: str
  shape: list[int]
  data: Any


@dataclasses.dataclass
class Output:
  """An output the model answers: its name, datatype, shape (-1 varies) and what it holds."""

  name: str
  datatype: str
  shape: list[int]
  photos_only: bool
  doc: str
  under_only: bool = False  # answered only when the request parameter `under` names threshold ages


def outputs(num_bins: int) -> list[Output]:
  """Every output, in the order the metadata lists and a response answers them."""
  return [
    Output("probabilities", "FP32", [-1, num_bins], False, "each face's age distribution, ages min_age.."),
    Output("age", "FP32", [-1], False, "the distribution's expectation: the predicted age"),
    Output("std", "FP32", [-1], False, "the distribution's standard deviation (years)"),
    Output("interval80", "FP32", [-1, 2], False, "the 80% interval's bounds (years)"),
    Output("box", "FP32", [-1, 4], True, "the face's box in its photo: x, y, width, height (pixels)"),
    Output("photo_index", "INT32", [-1], True, "the photo each face is in (its index in the input)"),
    Output("faces_found", "INT32", [-1], True, "faces found in each photo (more than answered past --max_faces)"),
    Output(P_UNDER, "FP32", [-1, -1], False, "P(age < T) per threshold age T of the parameter `under`", True),
  ]


@dataclasses.dataclass
class InferRequest:
  """A parsed infer request: its id, its one input, the outputs asked for (None: all) and its parameters."""

  id: str | None
  input: Tensor
  outputs: list[str] | None
  parameters: dict[str, Any]
  binary: dict[str, bool] = dataclasses.field(default_factory=dict)  # HTTP: the outputs answered as binary data


def server_metadata() -> dict:
  """The server metadata response."""
  return {"name": "agejax", "version": agejax.__version__, "extensions": EXTENSIONS}


def model_metadata(service: Service) -> dict:
  """The model metadata response: its inputs and outputs with their datatypes and shapes."""
  s = service.model.input_size
  return {
    "name": service.settings.model_name,
    "versions": [VERSION],
    "platform": "jax",
    "inputs": [
      {"name": PHOTOS, "datatype": "BYTES", "shape": [-1]},
      {"name": IMAGES, "datatype": "UINT8", "shape": [-1, s, s, 3]},
    ],
    "outputs": [{"name": o.name, "datatype": o.datatype, "shape": o.shape} for o in outputs(len(service.model.bins))],
  }


def check_model(service: Service, name: str, version: str | None) -> None:
  """Refuses a model name or version this server does not serve (404)."""
  if name != service.settings.model_name:
    raise ProtocolError(404, f"unknown model {name!r}: this server serves {service.settings.model_name!r}")
  if version not in (None, "", VERSION):
    raise ProtocolError(404, f"unknown version {version!r} of model {name!r}: it has version {VERSION!r}")


def check_input(service: Service, tensor: Tensor) -> None:
  """Refuses an input this model does not take, of the wrong datatype or shape, or over the server's limits."""
  s, most = service.model.input_size, service.settings.max_files
  expected = {PHOTOS: ("BYTES", "[N]"), IMAGES: ("UINT8", f"[N, {s}, {s}, 3]")}
  if tensor.name not in expected:
    raise ProtocolError(
      400, f"unknown input {tensor.name!r}: send {PHOTOS} (BYTES [N], photos) or {IMAGES} (UINT8 {expected[IMAGES][1]})"
    )
  datatype, shape = expected[tensor.name]
  if tensor.datatype != datatype:
    raise ProtocolError(400, f"input {tensor.name!r} has datatype {tensor.datatype}: it takes {datatype} {shape}")
  want = [None] if tensor.name == PHOTOS else [None, s, s, 3]
  if len(tensor.shape) != len(want) or any(w is not None and w != d for w, d in zip(want, tensor.shape)):
    raise ProtocolError(400, f"input {tensor.name!r} has shape {tensor.shape}: it takes {datatype} {shape}")
  if tensor.shape[0] < 1:
    raise ProtocolError(400, f"input {tensor.name!r} has shape {tensor.shape}: send at least one element")
  if tensor.shape[0] > most:
    raise ProtocolError(413, f"input {tensor.name!r} holds {tensor.shape[0]} elements: at most {most} (--max_files)")


def check_outputs(service: Service, request: InferRequest, under: Sequence[int] = ()) -> list[Output]:
  """The outputs to answer (all or those asked); refuses unknown ones, crops' photo-only ones, p_under without T."""
  known = {o.name: o for o in outputs(len(service.model.bins))}
  photos = request.input.name == PHOTOS
  if request.outputs is None:
    return [o for o in known.values() if (photos or not o.photos_only) and (under or not o.under_only)]
  for name in request.outputs:
    if name not in known:
      raise ProtocolError(400, f"unknown output {name!r}: this model answers {', '.join(known)}")
    if known[name].photos_only and not photos:
      raise ProtocolError(400, f"output {name!r} is answered for the input {PHOTOS!r} only")
    if known[name].under_only and not under:
      raise ProtocolError(400, f"output {name!r} needs the request parameter 'under': threshold ages such as '18,25'")
  return [known[name] for name in dict.fromkeys(request.outputs)]  # as asked, each once


def _aligned(parameters: dict[str, Any]) -> bool:
  aligned = parameters.get("aligned", False)
  if not isinstance(aligned, bool):
    raise ProtocolError(400, f"parameter 'aligned' must be a bool, not {ascii(aligned)[:40]}")
  return aligned


def _under(parameters: dict[str, Any]) -> tuple[int, ...]:
  """The request parameter `under`'s threshold ages ("18,25" or 18); none when it is absent."""
  under = parameters.get("under")
  if under is None:
    return ()
  if isinstance(under, bool) or not isinstance(under, str | int):
    raise ProtocolError(400, f"parameter 'under' must be ages such as '18,25' or an integer, not {ascii(under)[:40]}")
  try:
    return thresholds([str(under)])
  except ValueError as e:
    raise ProtocolError(400, f"parameter {e}") from None


async def infer(service: Service, request: InferRequest) -> tuple[list[Tensor], dict[str, Any]]:
  """Answers an infer request: (its output tensors, the response's parameters); raises `ProtocolError`.

  Args:
    service: the server's shared decode workers, batcher and limits.
    request: a parsed request (`parse_http` or `oip_grpc`); its input is checked here.

  Returns:
    The outputs asked for (as asked; all: in metadata order), and {"min_age", "max_age"}.
  """
  check_input(service, request.input)
  under = _under(request.parameters)
  wanted = check_outputs(service, request, under)
  aligned = _aligned(request.parameters)
  with service.upstream.arriving() as handed_over:
    try:
      if request.input.name == PHOTOS:
        names = [f"{PHOTOS}[{i}]" for i in range(len(request.input.data))]
        prepared = await service.prepare(names, list(request.input.data), aligned)
        chips = [chip for p in prepared for chip in p.crops]
        boxes = [box for p in prepared for box in p.boxes]
        index = [i for i, p in enumerate(prepared) for _ in p.crops]
        found = [p.found for p in prepared]
      else:
        chips = list(request.input.data)
        boxes, index, found = [], [], []
      predictions = await service.predict(chips, handed_over, under)
    except Refused as e:
      status, message = refusal(e)
      retry = e.response.headers.get("retry-after")
      raise ProtocolError(status, message, int(retry) if retry and retry.isdigit() else None) from None
  k = len(service.model.bins)
  values = {
    "probabilities": np.asarray([p.distribution for p in predictions], np.float32).reshape(-1, k),
    "age": np.asarray([p.predicted_age for p in predictions], np.float32),
    "std": np.asarray([p.std for p in predictions], np.float32),
    "interval80": np.asarray([p.interval80 for p in predictions], np.float32).reshape(-1, 2),
    "box": np.asarray(boxes, np.float32).reshape(-1, 4),
    "photo_index": np.asarray(index, np.int32),
    "faces_found": np.asarray(found, np.int32),
  }
  if under:  # service.predict filled in each face's P(age < T), in the order of `under`
    rows = [[p.p_under[t] for t in under] for p in predictions]
    values[P_UNDER] = np.asarray(rows, np.float32).reshape(-1, len(under))
  tensors = [Tensor(o.name, o.datatype, list(values[o.name].shape), values[o.name]) for o in wanted]
  return tensors, {"min_age": service.min_age, "max_age": service.min_age + k - 1}


# --- HTTP (JSON, with Triton's binary data extension) ---


def _parse_tensor(spec: Any, i: int, binary: memoryview, at: int) -> tuple[Tensor, int]:
  """An input from its JSON object, its data inline or in `binary` from `at`; returns it and the offset past it."""
  if not isinstance(spec, dict):
    raise ProtocolError(400, f"inputs[{i}] must be an object with name, shape, datatype and data")
  name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
  if not isinstance(name, str) or not isinstance(datatype, str):
    raise ProtocolError(400, f"inputs[{i}] must have a string name and datatype")
  if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
    raise ProtocolError(400, f"input {name!r}: shape must be a list of non-negative integers, not {ascii(shape)[:60]}")
  count = math.prod(shape)
  parameters = spec.get("parameters") or {}
  if not isinstance(parameters, dict):
    raise ProtocolError(400, f"input {name!r}: parameters must be an object")
  size = parameters.get("binary_data_size")
  if size is not None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(binary):
      raise ProtocolError(
        400, f"input {name!r}: binary_data_size {ascii(size)[:30]} is more than the {len(binary) - at} bytes left"
      )
    if "data" in spec:
      raise ProtocolError(400, f"input {name!r} has both data and binary_data_size: send one")
    return from_binary(name, datatype, shape, binary[at : at + size]), at + size
  if "data" not in spec:
    raise ProtocolError(400, f"input {name!r} has no data (and no binary_data_size)")
  data = spec["data"]
  if datatype == "BYTES":
    return Tensor(name, datatype, shape, _json_bytes(data, count, name)), at
  dtype = DTYPES.get(datatype)
  if dtype is None:
    raise ProtocolError(400, f"input {name!r}: datatype {datatype!r} is not one this model takes")
  try:
    array = np.asarray(data)
  except ValueError:
    raise ProtocolError(400, f"input {name!r}: data is not a (nested) list of numbers of one shape") from None
  if array.size != count:
    raise ProtocolError(400, f"input {name!r}: {array.size} elements of data for shape {shape} ({count} elements)")
  info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None  # type: ignore[type-var]
  if info is not None and (array.dtype.kind not in "iu" or array.min() < info.min or array.max() > info.max):
    raise ProtocolError(400, f"input {name!r}: {datatype} data must be integers {info.min}..{info.max}")
  return Tensor(name, datatype, shape, array.astype(dtype).reshape(shape)), at


def _json_bytes(data: Any, count: int, name: str) -> list[bytes]:
  """A BYTES input's elements from JSON: strings, each the base64 of one element's bytes."""
  import base64
  import binascii

  flat = data
  while isinstance(flat, list) and flat and isinstance(flat[0], list):  # nested lists of one element each
    flat = [x for row in flat for x in (row if isinstance(row, list) else [row])]
  if not isinstance(flat, list) or not all(isinstance(x, str) for x in flat):
    raise ProtocolError(400, f"input {name!r}: BYTES data in JSON must be a list of strings (base64)")
  if len(flat) != count:
    raise ProtocolError(400, f"input {name!r}: {len(flat)} elements of data for its shape ({count} elements)")
  out = []
  for i, text in enumerate(flat):
    try:
      out.append(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as e:
      raise ProtocolError(400, f"{name}[{i}] is not valid base64 (BYTES in JSON are base64): {e}") from None
  return out


def from_binary(name: str, datatype: str, shape: list[int], raw: memoryview | bytes) -> Tensor:
  """An input from its binary data (Triton's extension, gRPC's raw contents): little-endian, row-major."""
  count = math.prod(shape)
  if datatype == "BYTES":
    return Tensor(name, datatype, shape, deserialize_bytes(raw, count, name))
  dtype = DTYPES.get(datatype)
  if dtype is None:
    raise ProtocolError(400, f"input {name!r}: datatype {datatype!r} is not one this model takes")
  if len(raw) != count * np.dtype(dtype).itemsize:
    raise ProtocolError(400, f"input {name!r}: {len(raw)} bytes of binary data for shape {shape} of {datatype}")
  return Tensor(name, datatype, shape, np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).reshape(shape))


def to_binary(tensor: Tensor) -> bytes:
  """An output's binary data (Triton's extension, gRPC's raw contents): little-endian, row-major."""
  dtype = np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")
  return np.ascontiguousarray(tensor.data, dtype).tobytes()


def deserialize_bytes(raw: memoryview | bytes, count: int, name: str) -> list[bytes]:
  """A BYTES tensor's elements from its binary form: each a 4-byte little-endian length, then its bytes."""
  out: list[bytes] = []
  at = 0
  while at < len(raw):
    if at + 4 > len(raw):
      raise ProtocolError(400, f"input {name!r}: its binary BYTES data ends inside an element's length")
    (n,) = struct.unpack_from("<I", raw, at)
    if at + 4 + n > len(raw):
      raise ProtocolError(400, f"input {name!r}: element {len(out)} of its binary BYTES data is cut short")
    out.append(bytes(raw[at + 4 : at + 4 + n]))
    at += 4 + n
    if len(out) > count:
      break
  if len(out) != count:
    more = "+" if at < len(raw) else ""
    raise ProtocolError(400, f"input {name!r}: {len(out)}{more} elements of binary data for its shape ({count})")
  return out


def parse_http(chunks: list[bytes], header_length: int | None, max_inputs: int = 8) -> InferRequest:
  """An infer request from an HTTP body (the JSON object, then any binary data); raises `ProtocolError`."""
  body = b"".join(chunks)
  chunks.clear()
  if header_length is None:
    header_length = len(body)
  elif not 0 < header_length <= len(body):
    raise ProtocolError(400, f"{HEADER_LENGTH}: {header_length} is not within the body's {len(body)} bytes")
  header, binary = body[:header_length], memoryview(body)[header_length:]
  try:
    # A JSON body of crops holds a value per pixel; with binary data the JSON part is small.
    screen_json(header, MAX_HEADER_VALUES if len(binary) else len(header), "an infer request's inputs and outputs")
  except Refused as e:
    raise ProtocolError(*refusal(e)) from None
  try:
    doc = json.loads(header.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise ProtocolError(400, f"the request is not JSON: {' '.join(str(e).split())[:200]}") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
    raise ProtocolError(400, 'an infer request is a JSON object with "inputs": a list of tensors')
  parameters = doc.get("parameters") or {}
  if not isinstance(parameters, dict):
    raise ProtocolError(400, '"parameters" must be an object')
  if len(doc["inputs"]) != 1:
    raise ProtocolError(400, f"{len(doc['inputs'])} inputs: send one, {PHOTOS} or {IMAGES}")
  tensor, at = _parse_tensor(doc["inputs"][0], 0, binary, 0)
  if at != len(binary):
    raise ProtocolError(400, f"{len(binary) - at} bytes of binary data after the inputs that declare theirs")
  default_binary = parameters.get("binary_data_output", False)
  names, binary_out = None, {}
  if doc.get("outputs") is not None:
    if not isinstance(doc["outputs"], list) or not all(isinstance(o, dict) and "name" in o for o in doc["outputs"]):
      raise ProtocolError(400, '"outputs" must be a list of objects with a name')
    names = [str(o["name"]) for o in doc["outputs"]]
    binary_out = {
      str(o["name"]): bool((o.get("parameters") or {}).get("binary_data", default_binary)) for o in doc["outputs"]
    }
  request_id = doc.get("id")
  return InferRequest(
    None if request_id is None else str(request_id),
    tensor,
    names,
    parameters,
    binary_out or {"*": bool(default_binary)},
  )


def http_response(service: Service, request: InferRequest, tensors: list[Tensor], parameters: dict) -> Response:
  """The infer response: JSON, or JSON then the binary outputs (Inference-Header-Content-Length)."""
  described, blobs = [], []
  for t in tensors:
    out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
    if request.binary.get(t.name, request.binary.get("*", False)):
      blobs.append(to_binary(t))
      out["parameters"] = {"binary_data_size": len(blobs[-1])}
    else:
      out["data"] = np.asarray(t.data).ravel().tolist()
    described.append(out)
  doc: dict[str, Any] = {"model_name": service.settings.model_name, "model_version": VERSION}
  if request.id is not None:
    doc["id"] = request.id
  doc["parameters"] = parameters
  doc["outputs"] = described
  header = json.dumps(doc, separators=(",", ":")).encode()
  if not blobs:
    return Response(header, media_type="application/json")
  return Response(
    b"".join([header, *blobs]),
    media_type="application/octet-stream",
    headers={HEADER_LENGTH: str(len(header))},
  )


def error_response(e: ProtocolError) -> JSONResponse:
  """The protocol's error: {"error": message} with its status (and Retry-After when busy)."""
  headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
  return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)


def routes(service: Service, unless_gone: Callable) -> Sequence[Route]:
  """The protocol's HTTP routes on `service` (`unless_gone`: app.unless_gone, cancelling work when the client goes)."""

  def answers(handler):
    async def route(request: Request) -> Response:
      try:
        return await handler(request, **request.path_params)
      except ProtocolError as e:
        return error_response(e)

    return route

  async def live(request: Request) -> Response:
    return Response(status_code=200)

  async def ready(request: Request, name: str | None = None, version: str | None = None) -> Response:
    if name is not None:
      check_model(service, name, version)
    if load := service.overloaded():
      raise ProtocolError(400, f"not ready: overloaded, work has waited {load['oldest_wait_s']} s to start")
    return Response(status_code=200)

  async def server(request: Request) -> Response:
    return JSONResponse(server_metadata())

  async def model(request: Request, name: str, version: str | None = None) -> Response:
    check_model(service, name, version)
    return JSONResponse(model_metadata(service))

  async def infer_route(request: Request, name: str, version: str | None = None) -> Response:
    check_model(service, name, version)
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind not in ("application/json", "application/octet-stream", ""):
      raise ProtocolError(415, f"Content-Type {kind!r}: send application/json (or binary data with {HEADER_LENGTH})")
    declared = request.headers.get(HEADER_LENGTH)
    if declared is not None and not declared.isdigit():
      raise ProtocolError(400, f"{HEADER_LENGTH}: {declared[:40]!r} is not a number of bytes")
    try:
      chunks = await read_body(request, service.settings)
    except Refused as e:
      raise ProtocolError(*refusal(e)) from None
    parsed = await parse_off_loop(parse_http, chunks, None if declared is None else int(declared))

    async def work() -> Response:
      try:
        tensors, parameters = await infer(service, parsed)
      except ProtocolError as e:
        return error_response(e)
      return http_response(service, parsed, tensors, parameters)

    return await unless_gone(request, work(), service.metrics)

  model_path = "/v2/models/{name}"
  versioned = "/v2/models/{name}/versions/{version}"
  return [
    Route("/v2/health/live", answers(live)),
    Route("/v2/health/ready", answers(ready)),
    Route("/v2", answers(server)),
    *(Route(path, answers(model)) for path in (model_path, versioned)),
    *(Route(path + "/ready", answers(ready)) for path in (model_path, versioned)),
    *(Route(path + "/infer", answers(infer_route), methods=["POST"]) for path in (model_path, versioned)),
  ]
