"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), on the HTTP server's event loop.

The messages and the service are the protocol's: the code generated from Triton's
`grpc_service.proto` (a superset of KServe's `grpc_predict_v2.proto`, the same package and
service) that the `tritonclient` package ships (`tritonclient.grpc.service_pb2`,
`service_pb2_grpc`). Liveness, readiness, server and model metadata, and ModelInfer are answered;
Triton's other RPCs (repository, shared memory, statistics) are UNIMPLEMENTED. Every infer goes
through `oip.infer` on the server's `service.Service`: the same decoders, batcher and limits as HTTP,
its message counted against the request bodies held over all requests (--max_buffered_mb).
"""

import asyncio
import dataclasses
import socket
import time
from typing import Any

import grpc
import numpy as np
from absl import logging

from agejax import errors
from agejax.serving import oip
from agejax.serving.guard import BUSY_RETRY_AFTER_S, one_line
from agejax.serving.service import Service

SERVICE = "inference.GRPCInferenceService"
# The protocol's HTTP statuses as gRPC codes (KServe's V2 spec maps them the same way).
CODES = {
  400: grpc.StatusCode.INVALID_ARGUMENT,
  404: grpc.StatusCode.NOT_FOUND,
  408: grpc.StatusCode.DEADLINE_EXCEEDED,
  413: grpc.StatusCode.RESOURCE_EXHAUSTED,
  415: grpc.StatusCode.INVALID_ARGUMENT,
  422: grpc.StatusCode.INVALID_ARGUMENT,
  499: grpc.StatusCode.CANCELLED,
  503: grpc.StatusCode.UNAVAILABLE,
}
CONTENTS = {"UINT8": "uint_contents", "INT32": "int_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}


def _pb():
  """(service_pb2, service_pb2_grpc): the protocol's generated code, from tritonclient (one line if missing)."""
  try:
    from tritonclient.grpc import service_pb2, service_pb2_grpc
  except ImportError as e:
    raise errors.UserError(f"--grpc_port needs tritonclient ({e}): pip install tritonclient[grpc]") from None
  return service_pb2, service_pb2_grpc


def check_installed() -> None:
  """Fails in one line, before the model loads, when the protocol's generated code (tritonclient) is missing."""
  _pb()


def _parameter(value: Any) -> Any:
  """A parameter's Python value from an InferParameter message."""
  kind = value.WhichOneof("parameter_choice")
  return getattr(value, kind) if kind else None


def parse_request(request: Any) -> oip.InferRequest:
  """An `oip.InferRequest` from a ModelInferRequest (data in raw_input_contents or in contents)."""
  if len(request.inputs) != 1:
    raise oip.ProtocolError(400, f"{len(request.inputs)} inputs: send one, {oip.PHOTOS} or {oip.IMAGES}")
  spec = request.inputs[0]
  shape = [int(d) for d in spec.shape]
  if any(d < 0 for d in shape):
    raise oip.ProtocolError(400, f"input {spec.name!r}: shape {shape} has a negative dimension")
  count = int(np.prod(shape, dtype=np.int64))
  if len(request.raw_input_contents) > 1:
    raise oip.ProtocolError(400, f"{len(request.raw_input_contents)} raw_input_contents for one input")
  tensor: oip.Tensor
  if request.raw_input_contents:
    tensor = oip.from_binary(spec.name, spec.datatype, shape, request.raw_input_contents[0])
  else:
    field = CONTENTS.get(spec.datatype)
    if field is None:
      raise oip.ProtocolError(400, f"input {spec.name!r}: datatype {spec.datatype!r} is not one this model takes")
    values = list(getattr(spec.contents, field))
    if len(values) != count:
      raise oip.ProtocolError(400, f"input {spec.name!r}: {len(values)} elements of data for shape {shape}")
    data: Any
    if spec.datatype == "BYTES":
      data = [bytes(v) for v in values]
    else:
      array = np.asarray(values)
      if spec.datatype == "UINT8" and array.size and array.max() > 255:  # uint_contents holds uint32
        raise oip.ProtocolError(400, f"input {spec.name!r}: UINT8 data must be integers 0..255")
      data = array.astype(oip.DTYPES[spec.datatype]).reshape(shape)
    tensor = oip.Tensor(spec.name, spec.datatype, shape, data)
  parameters = {key: _parameter(value) for key, value in request.parameters.items()}
  outputs = [o.name for o in request.outputs] or None
  return oip.InferRequest(request.id or None, tensor, outputs, parameters)


@dataclasses.dataclass
class Endpoint:
  """Where the gRPC server listens: its address and, until it binds, the socket that holds the port.

  scripts/serve.py binds the port at once (`runner.bind(..., reuse_port=True)`: a port in use fails
  before the model loads); gRPC binds it again (SO_REUSEPORT) once the model is ready, and the
  placeholder is closed.
  """

  host: str
  port: int
  placeholder: socket.socket | None = None
  max_concurrent_rpcs: int | None = None  # more get RESOURCE_EXHAUSTED


async def start(service: Service, endpoint: Endpoint) -> Any:
  """Starts the gRPC server on the running event loop; returns it (`await server.stop(grace)` ends it)."""
  pb, pb_grpc = _pb()
  limit = service.settings.max_body_bytes + 64 * 1024  # the body limit, and the message's own fields
  server = grpc.aio.server(
    maximum_concurrent_rpcs=endpoint.max_concurrent_rpcs,
    options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 1)],
  )
  pb_grpc.add_GRPCInferenceServiceServicer_to_server(_servicer(pb, pb_grpc, service), server)
  host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
  reason = "the port is taken"
  try:
    bound = server.add_insecure_port(f"{host}:{endpoint.port}")
  except RuntimeError as e:  # newer grpcio raises where older returned 0
    bound, reason = 0, one_line(e)
  if not bound:
    raise errors.UserError(f"cannot serve gRPC on {endpoint.host}:{endpoint.port}: {reason}")
  await server.start()
  if endpoint.placeholder is not None:
    endpoint.placeholder.close()
    endpoint.placeholder = None
  return server


def _servicer(pb: Any, pb_grpc: Any, service: Service) -> Any:
  """The GRPCInferenceService implementation on `service`."""
  metrics = service.metrics

  async def answer(context: Any, method: str, work) -> Any:
    """Runs an RPC's work, counts it (path label grpc:METHOD) and answers a ProtocolError with its code."""
    start, code = time.perf_counter(), grpc.StatusCode.OK
    metrics.in_flight.inc()
    try:
      return await work()
    except oip.ProtocolError as e:
      code = CODES.get(e.status, grpc.StatusCode.INTERNAL)
      if e.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
      await context.abort(code, e.message)
    except asyncio.CancelledError:  # the client went away, or its deadline passed: its work stops
      code = grpc.StatusCode.CANCELLED
      metrics.cancelled.inc()
      raise
    except Exception as e:  # a bug: one log line, and INTERNAL as HTTP answers 500
      if isinstance(e, grpc.aio.AbortError):
        raise
      code = grpc.StatusCode.INTERNAL
      logging.error("gRPC %s failed: %s: %s", method, type(e).__name__, one_line(e))
      await context.abort(code, f"internal error: {type(e).__name__} (logged by the server)")
    finally:
      metrics.in_flight.dec()
      label = f"grpc:{method}"
      metrics.requests.labels(label, code.name).inc()
      metrics.latency.labels(label).observe(time.perf_counter() - start)

  class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request, context):  # noqa: N802  (the protocol's names)
      return await answer(context, "ServerLive", lambda: _value(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request, context):  # noqa: N802
      ready = pb.ServerReadyResponse(ready=not service.overloaded())
      return await answer(context, "ServerReady", lambda: _value(ready))

    async def ModelReady(self, request, context):  # noqa: N802
      async def work():
        oip.check_model(service, request.name, request.version)
        return pb.ModelReadyResponse(ready=not service.overloaded())

      return await answer(context, "ModelReady", work)

    async def ServerMetadata(self, request, context):  # noqa: N802
      return await answer(context, "ServerMetadata", lambda: _value(pb.ServerMetadataResponse(**oip.server_metadata())))

    async def ModelMetadata(self, request, context):  # noqa: N802
      async def work():
        oip.check_model(service, request.name, request.version)
        meta = oip.model_metadata(service)
        tensors = {
          key: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[key]] for key in ("inputs", "outputs")
        }
        return pb.ModelMetadataResponse(
          name=meta["name"], versions=meta["versions"], platform=meta["platform"], **tensors
        )

      return await answer(context, "ModelMetadata", work)

    async def ModelInfer(self, request, context):  # noqa: N802
      async def work():
        oip.check_model(service, request.model_name, request.model_version)
        size = request.ByteSize()
        if not service.buffers.take(size):
          raise oip.ProtocolError(
            503,
            f"busy: the server holds {service.buffers.held_bytes / 1e6:.0f} MB of requests (--max_buffered_mb)",
            BUSY_RETRY_AFTER_S,
          )
        try:
          parsed = parse_request(request)
          tensors, parameters = await oip.infer(service, parsed)
        finally:
          service.buffers.give(size)
        response = pb.ModelInferResponse(model_name=service.settings.model_name, model_version=oip.VERSION)
        if parsed.id is not None:
          response.id = parsed.id
        for key, value in parameters.items():
          response.parameters[key].int64_param = int(value)
        for t in tensors:
          response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
          response.raw_output_contents.append(oip.to_binary(t))
        return response

      return await answer(context, "ModelInfer", work)

  return Servicer()


async def _value(value: Any) -> Any:
  return value
