"""The HTTP app: POST /v1/predict, the page at /, /healthz and Prometheus /metrics (Starlette)."""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import prometheus_client
from absl import logging
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from agejax.data import faces
from agejax.data.framing import Framing
from agejax.inference import photos
from agejax.serving import batcher, guard
from agejax.serving.guard import error

STATIC = Path(__file__).resolve().parent / "static"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclasses.dataclass
class Settings:
  """The server's limits and batching."""

  max_batch: int = 32  # faces per model call
  max_wait_ms: float = 5.0  # longest a face waits for others to join its batch
  max_body_bytes: int = 20 * 1000 * 1000
  max_files: int = 64  # files per request
  workers: int = 4  # threads decoding and detecting


class Upstream:
  """Counts the requests that have arrived but not yet handed their faces to the batcher."""

  def __init__(self):
    self.count = 0  # changed on the event loop only; the batcher's thread just reads it

  @contextlib.contextmanager
  def arriving(self) -> Iterator[Callable[[], None]]:
    """Counts a request for the block; yields a function that uncounts it early (once its faces are queued)."""
    self.count += 1
    counted = True

    def leave() -> None:
      nonlocal counted
      if counted:
        counted, self.count = False, self.count - 1

    try:
      yield leave
    finally:
      leave()


def prepare(
  data: bytes, aligned: bool, size: int, detector: photos.FaceDetector | None, framing: Framing | None = None
) -> tuple[str, list[photos.Face], list[np.ndarray]] | str:
  """Decodes one upload and crops its faces as predict.py does: (status, faces, crops), or why it can't be read."""
  photo = faces.open_rgb(data)
  if isinstance(photo, str):
    return photo
  # Detection runs on a copy at most photos.DETECT_MAX_SIDE long: huge photos stay fast.
  return photos.find_faces(photo, size, aligned=aligned, detector=detector, framing=framing)


async def read_uploads(request: Request, settings: Settings) -> tuple[list[str], list[bytes], bool] | Response:
  """(file names, their bytes, aligned) of a multipart request, or the error answer to send instead."""
  try:
    form = await request.form(max_files=settings.max_files, max_fields=8)
    uploads = form.getlist("files")
    aligned = _flag(request.query_params.get("aligned", form.get("aligned", "")))
    names = [u.filename or f"files[{i}]" for i, u in enumerate(uploads) if isinstance(u, UploadFile)]
    if len(names) < len(uploads):
      return error(400, 'the form field "files" must hold files (multipart file parts), not text')
    files = [u for u in uploads if isinstance(u, UploadFile)]  # all of them: text parts were refused above
    datas = [await u.read() for u in files]
  except guard.BodyTooLarge:
    return guard.too_large(settings.max_body_bytes)
  except HTTPException as e:  # the multipart parser's complaint, e.g. too many files
    return error(e.status_code, f"bad multipart body: {e.detail}")
  except ClientDisconnect:  # nobody is left to read an answer
    return error(400, "the client disconnected before sending the whole body")
  except ValueError as e:
    return error(400, str(e))
  if not datas:
    return error(
      400, 'no complete file in the body: send images as multipart form field "files" (a truncated upload has none)'
    )
  return names, datas, aligned


def results_json(
  names: list[str], cropped: list[tuple[str, list[photos.Face], list[np.ndarray]]], predictions: list
) -> list[dict]:
  """Each upload's JSON result, its faces filled in with their predictions (in the order the faces were queued)."""
  remaining = iter(predictions)
  results = []
  for name, (status, found, _) in zip(names, cropped):
    for face in found:
      _fill(face, next(remaining))
    results.append({"file": name, "status": status, "faces": [photos.face_json(f, "age") for f in found]})
  return results


def create_app(
  model: batcher.Model, detector: photos.FaceDetector | None, settings: Settings, min_age: int, step: int | None = None
) -> ASGIApp:
  """Builds the server's ASGI app around a restored model.

  Args:
    model: an `inference.Predictor` (or an exported model with the same interface).
    detector: finds faces in photos; None serves only `aligned=true` requests.
    settings: limits and batching.
    min_age: the age of the distributions' first bin.
    step: the model's training step, reported by /healthz.

  Returns:
    The ASGI app; starting it (lifespan) compiles every batch size before the first request.
  """
  metrics = guard.Metrics()
  upstream = Upstream()
  framing = getattr(model, "framing", None)  # the training crops' framing; an export has none yet
  model_batcher = batcher.Batcher(
    model, settings.max_batch, settings.max_wait_ms / 1000, metrics.on_batch, upstream=lambda: upstream.count
  )
  pool = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="decode")

  @contextlib.asynccontextmanager
  async def lifespan(app):
    await asyncio.to_thread(model_batcher.warm_up)
    model_batcher.start()
    try:
      yield
    finally:  # uvicorn has answered every request by now
      model_batcher.close()
      pool.shutdown()

  async def predict(request: Request) -> Response:
    with upstream.arriving() as handed_over:
      return await answer(request, handed_over)

  async def answer(request: Request, handed_over: Callable[[], None]) -> Response:
    start = time.perf_counter()
    read = await read_uploads(request, settings)
    if isinstance(read, Response):
      return read
    names, datas, aligned = read
    if not aligned and detector is None:
      return error(400, "this server detects no faces (started without a detector): send aligned=true")
    uploaded = time.perf_counter()
    loop = asyncio.get_running_loop()
    prepared = await asyncio.gather(
      *(loop.run_in_executor(pool, prepare, data, aligned, model.input_size, detector, framing) for data in datas),
      return_exceptions=True,
    )
    cropped: list[tuple[str, list[photos.Face], list[np.ndarray]]] = []
    for name, p in zip(names, prepared):
      if isinstance(p, str):
        return error(400, f"{name}: {p}", file=name, reason=p)
      if isinstance(p, Exception):  # a bug or a detector failure on this upload: the others go on
        logging.error("preparing %s failed", name, exc_info=p)
        return error(500, f"{name}: {type(p).__name__}: {p}", file=name)
      assert not isinstance(p, BaseException)  # only a SystemExit or KeyboardInterrupt in a decode thread
      cropped.append(p)
    decoded = time.perf_counter()
    futures = [model_batcher.submit(chip) for _, _, chips in cropped for chip in chips]
    handed_over()
    try:
      predictions = await asyncio.gather(*map(asyncio.wrap_future, futures))
    except Exception as e:  # the model failed on one of this request's faces (even alone); the others go on
      return error(500, f"model call failed: {type(e).__name__}: {e}")
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
    return JSONResponse({"results": results_json(names, cropped, predictions), "min_age": min_age, "timing_ms": timing})

  async def healthz(request: Request) -> Response:
    return JSONResponse(
      {
        "status": "ok",
        "step": step,
        "input_size": model.input_size,
        "input_spec": model.input_spec,
        "batch_sizes": model_batcher.sizes,
      }
    )

  async def metrics_page(request: Request) -> Response:
    body = prometheus_client.generate_latest(metrics.registry)
    return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)

  async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")

  app = Starlette(
    routes=[
      Route("/", index),
      Route("/v1/predict", predict, methods=["POST"]),
      Route("/healthz", healthz),
      Route("/metrics", metrics_page),
      Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ],
    exception_handlers={HTTPException: lambda request, e: error(e.status_code, str(e.detail))},
    lifespan=lifespan,
  )
  app.state.batcher, app.state.metrics = model_batcher, metrics
  return guard.Guard(app, metrics, settings.max_body_bytes)


def _fill(face: photos.Face, p: batcher.Prediction) -> None:
  face.distribution, face.predicted_age, face.argmax_age, face.std, face.interval80 = (
    p.distribution,
    p.predicted_age,
    p.argmax_age,
    p.std,
    p.interval80,
  )


def _flag(value: str | UploadFile) -> bool:
  value = str(value).strip().lower()
  if value not in _TRUE + _FALSE:
    raise ValueError(f"aligned={value!r}: use true or false")
  return value in _TRUE
