"""The HTTP app: POST /v1/predict, the page at /, /healthz and Prometheus /metrics (Starlette)."""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import prometheus_client
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

if TYPE_CHECKING:
  from agejax.serving import oip_grpc

from agejax.data import faces
from agejax.data.framing import Framing
from agejax.inference import photos
from agejax.serving import batcher, guard, oip, runner, sandbox
from agejax.serving.guard import error
from agejax.serving.service import Service, Settings, busy
from agejax.serving.uploads import Refused, Upload, read_upload

STATIC = Path(__file__).resolve().parent / "static"


def prepare(
  data: bytes,
  aligned: bool,
  size: int,
  detector: "sandbox.Detector | None",
  framing: Framing | None = None,
  *,
  max_pixels: int | None = None,
  reopen: Callable[[int], faces.Decoded | None] | None = None,
) -> tuple[str, list[photos.Face], list[np.ndarray]] | str:
  """Decodes one upload (at reduced scale when large) and crops its faces as predict.py does.

  Returns (status, faces, crops), or why the upload can't be read. `reopen(factor)` gives a finer
  decode for a face too small in the reduced one (the server's, when its memory budget allows).
  """
  decoded = photos.open_photo(data, size, aligned=aligned, max_pixels=max_pixels)
  if isinstance(decoded, str):
    return decoded
  return photos.find_faces(decoded, size, aligned=aligned, detector=detector, framing=framing, reopen=reopen)


def results_json(
  names: list[str],
  cropped: list[tuple[str, list[photos.Face], list[np.ndarray]]],
  predictions: list,
  faces_found: list[int] | None = None,
) -> list[dict]:
  """Each upload's JSON result, its faces filled in with their predictions (in the order the faces were queued).

  `faces_found`: how many faces each photo had; where more than were answered (--max_faces), the
  result says so ("faces_found" and a "note").
  """
  remaining = iter(predictions)
  results = []
  for i, (name, (status, found, _)) in enumerate(zip(names, cropped)):
    for face in found:
      _fill(face, next(remaining))
    result: dict[str, Any] = {"file": name, "status": status, "faces": [photos.face_json(f, "age") for f in found]}
    total = faces_found[i] if faces_found is not None else len(found)
    if total > len(found):
      result["faces_found"] = total
      result["note"] = f"{total} faces found: the {len(found)} most confident are answered (--max_faces)"
    results.append(result)
  return results


def create_app(
  model: batcher.Model,
  detector: "sandbox.DetectorSpec | sandbox.Detector | None",
  settings: Settings,
  min_age: int,
  step: int | None = None,
  grpc: "oip_grpc.Endpoint | None" = None,
) -> ASGIApp:
  """Builds the server's ASGI app around a restored model.

  Args:
    model: an `inference.Predictor` (or an exported model with the same interface).
    detector: how to find faces in photos: a `sandbox.DetectorSpec` (each worker process builds its
      own MTCNN), or, with `settings.isolation == "threads"`, any detector of PIL images; None
      serves only `aligned=true` requests.
    settings: limits and batching.
    min_age: the age of the distributions' first bin.
    step: the model's training step, reported by /healthz.
    grpc: where to serve the Open Inference Protocol over gRPC too (started with the app, on its loop).

  Returns:
    The ASGI app; starting it (lifespan) starts the decode workers and compiles every batch size
    before the first request.
  """
  service = Service(model, detector, settings, min_age, step)
  model_batcher, metrics, scheduler, pool = service.batcher, service.metrics, service.scheduler, service.pool

  @contextlib.asynccontextmanager
  async def lifespan(app):
    await service.start()
    grpc_server = None
    try:
      if grpc is not None:
        from agejax.serving import oip_grpc

        grpc_server = await oip_grpc.start(service, grpc)
      # runner.run stops accepting gRPC calls with HTTP's at the signal, and waits for both within the grace.
      yield {runner.DRAINS: [grpc_server.stop] if grpc_server is not None else []}
    finally:  # uvicorn has answered every request by now
      if grpc_server is not None:
        await grpc_server.stop(0)
      service.close()

  async def predict(request: Request) -> Response:
    with service.upstream.arriving() as handed_over:
      start = time.perf_counter()
      try:
        upload = await read_upload(request, settings)
      except Refused as e:
        return e.response
      return await unless_gone(request, answer(upload, start, handed_over), metrics)

  async def answer(upload: Upload, start: float, handed_over: Callable[[], None]) -> Response:
    uploaded = time.perf_counter()
    try:
      prepared = await service.prepare(upload.names, upload.datas, upload.aligned)
      decoded = time.perf_counter()
      cropped = [(p.status, [photos.Face(box) for box in p.boxes], p.crops) for p in prepared]
      chips = [chip for _, _, crops in cropped for chip in crops]
      predictions = await service.predict(chips, handed_over, upload.under)
    except Refused as e:
      return e.response
    done = time.perf_counter()
    model_ms = max((p.model_ms for p in predictions), default=0.0)
    ms = lambda a, b: round(1000 * (b - a), 2)
    timing = {
      "upload": ms(start, uploaded),
      "decode_detect": ms(uploaded, decoded),
      "batch": ms(decoded, done),
      "model": round(model_ms, 2),
      "total": ms(start, time.perf_counter()),
    }
    results = results_json(upload.names, cropped, predictions, [p.found for p in prepared])
    return JSONResponse({"results": results, "min_age": min_age, "timing_ms": timing})

  async def readyz(request: Request) -> Response:
    load = scheduler.load()
    if load["overloaded"]:
      return busy(f"overloaded: work has waited {load['oldest_wait_s']} s to start", 1)
    return JSONResponse({"status": "ready", "load": load})

  async def healthz(request: Request) -> Response:
    load = scheduler.load()
    return JSONResponse(
      {
        "status": "overloaded" if load["overloaded"] else "ok",
        "load": load,
        "step": step,
        "flip": model.flip,
        **model.calibration.to_json(),  # the temperature applied and the 80% interval's masses by age bucket
        "input_size": model.input_size,
        "eval_crop": getattr(model, "eval_crop", 1.0),  # the central part of each crop the model sees; 1: all
        "input_spec": model.input_spec,
        "batch_sizes": model_batcher.sizes,
        "decoding": {  # where uploads are read, and how many workers were replaced (a crash, a limit, worn out)
          "isolation": settings.isolation,
          "formats": list(settings.formats),
          "workers_replaced": pool.replaced if pool is not None else 0,
          # a replacement takes a second or more to start: until then its lane has one worker fewer
          "workers": pool.size if pool is not None else 0,
          "workers_starting": pool.starting() if pool is not None else 0,
        },
      }
    )

  async def metrics_page(request: Request) -> Response:
    body = prometheus_client.generate_latest(metrics.registry)
    return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)

  async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")

  async def to_page(request: Request) -> Response:
    return RedirectResponse("/", 307)  # relative: never built from the request's Host header

  app = Starlette(
    routes=[
      Route("/", index),
      Route("/v1/predict", predict, methods=["POST"]),
      Route("/healthz", healthz),
      Route("/readyz", readyz),
      Route("/metrics", metrics_page),
      *oip.routes(service, unless_gone),
      Route("/static", to_page),
      Route("/static/", to_page),
      Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ],
    # Starlette's errors (404, 405 with its Allow header) as JSON, their headers kept; any other exception as
    # the JSON 500 (Guard logs it in one line).
    exception_handlers={
      HTTPException: lambda request, e: error(e.status_code, str(e.detail), headers=e.headers),
      Exception: guard.internal_error,
    },
    lifespan=lifespan,
  )
  app.router.redirect_slashes = False  # its redirects are absolute URLs built from the Host header
  app.state.batcher, app.state.metrics, app.state.scheduler, app.state.pool = model_batcher, metrics, scheduler, pool
  return guard.Guard(app, metrics, settings.max_body_bytes, settings.body_timeout_s, buffers=service.buffers)


async def unless_gone(request: Request, work: Awaitable[Response], metrics: guard.Metrics) -> Response:
  """Awaits a request's answer; cancels its work if the client hangs up first (its body has been read).

  Also when this handler is cancelled (the graceful shutdown ran out): the work stops with it.
  """
  task = asyncio.ensure_future(work)
  gone = asyncio.ensure_future(_disconnected(request))
  try:
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    gone.cancel()
    if not task.done():
      task.cancel()
      metrics.cancelled.inc()
      with contextlib.suppress(asyncio.CancelledError):
        await task
  if task.cancelled():  # the client went away: nobody reads this
    return error(499, "the client disconnected: its work was cancelled")
  return task.result()


async def _disconnected(request: Request) -> None:
  """Returns when the client hangs up (its body has been read: the next message is the disconnect)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


def _fill(face: photos.Face, p: batcher.Prediction) -> None:
  face.distribution, face.predicted_age, face.argmax_age, face.std, face.interval80, face.p_under = (
    p.distribution,
    p.predicted_age,
    p.argmax_age,
    p.std,
    p.interval80,
    p.p_under,
  )
