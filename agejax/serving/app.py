"""The HTTP app: POST /v1/predict, the page at /, /healthz and Prometheus /metrics (Starlette)."""

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
from absl import logging
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from agejax.data import faces
from agejax.data.framing import Framing
from agejax.inference import photos
from agejax.serving import batcher, guard, limits, sandbox
from agejax.serving.guard import error
from agejax.serving.uploads import Refused, Upload, read_upload

STATIC = Path(__file__).resolve().parent / "static"


@dataclasses.dataclass
class Settings:
  """The server's limits and batching."""

  max_batch: int = 32  # faces per model call
  max_wait_ms: float = 5.0  # longest a face waits for others to join its batch
  max_body_bytes: int = 20 * 1000 * 1000
  max_files: int = 64  # files per request
  workers: int = 4  # worker processes decoding photos and detecting their faces
  aligned_workers: int = 2  # workers decoding face crops (aligned=true): they never wait behind detection
  max_pixels: int = 64_000_000  # larger images are refused from their header (50 MP phone photos pass)
  decode_budget_bytes: int = 1_000_000_000  # estimated decode bytes in flight over all workers
  queue_timeout_s: float = 10.0  # work that can't start within this gets 503 with Retry-After
  body_timeout_s: float = 60.0  # a request body must arrive within this (408)
  max_buffered_bytes: int = 256 * 1000 * 1000  # request bodies held over all requests; more get 503
  # "processes": uploads are read only in worker processes under the limits below (sandbox.py);
  # "threads": in the server's own threads, under the same estimates but no hard limit (trusted input).
  isolation: str = "processes"
  formats: tuple[str, ...] = faces.FORMATS  # Pillow's names of the formats read; others get 415
  worker_memory_bytes: int = 1_024_000_000  # a worker's address space over its own once started (RLIMIT_AS)
  max_cpu_s: float = 10.0  # CPU seconds an image may take in its worker (RLIMIT_CPU)
  worker_images: int = 500  # a worker is replaced after this many images


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

  Returns:
    The ASGI app; starting it (lifespan) starts the decode workers and compiles every batch size
    before the first request.
  """
  if settings.isolation not in ("processes", "threads"):
    raise ValueError(f"isolation={settings.isolation!r}: use 'processes' or 'threads'")
  if settings.isolation == "processes" and detector is not None and not isinstance(detector, sandbox.DetectorSpec):
    raise ValueError("isolation='processes' takes a sandbox.DetectorSpec: each worker process builds its detector")
  metrics = guard.Metrics()
  upstream = Upstream()
  framing = getattr(model, "framing", None)  # the training crops' framing; an export has none yet
  model_batcher = batcher.Batcher(
    model, settings.max_batch, settings.max_wait_ms / 1000, metrics.on_batch, upstream=lambda: upstream.count
  )
  scheduler = limits.Scheduler(
    {"detect": settings.workers, "aligned": settings.aligned_workers},
    settings.decode_budget_bytes,
    settings.queue_timeout_s,
  )
  task = sandbox.Task(
    model.input_size,
    framing,
    tuple(settings.formats),
    settings.max_pixels,
    sandbox.Limits(settings.worker_memory_bytes, settings.max_cpu_s, settings.worker_images),
  )
  pool: sandbox.Pool | None = None
  in_process: sandbox.Detector | None = None
  if settings.isolation == "processes":
    # The lane threads of the scheduler each drive one worker process: as many processes as threads.
    spec = detector if isinstance(detector, sandbox.DetectorSpec) else None  # checked above: a DetectorSpec or None
    lanes = {"detect": sandbox.Lane(settings.workers, spec), "aligned": sandbox.Lane(settings.aligned_workers)}
    pool = sandbox.Pool(lanes, task)
  else:
    in_process = detector() if isinstance(detector, sandbox.DetectorSpec) else detector

  @contextlib.asynccontextmanager
  async def lifespan(app):
    try:  # the workers start (a fork server importing TensorFlow) while the model compiles
      await asyncio.gather(*[asyncio.to_thread(f) for f in (model_batcher.warm_up, pool and pool.start) if f])
    except BaseException:
      if pool is not None:
        pool.close()
      raise
    model_batcher.start()
    try:
      yield
    finally:  # uvicorn has answered every request by now
      model_batcher.close()
      scheduler.shutdown()
      if pool is not None:
        pool.close()

  def decode(lane: str, data: bytes, aligned: bool, reserved: int) -> sandbox.Outcome:
    """In a lane thread: the upload's crops (or why it can't be read), prepared in a worker process of the lane."""
    taken: list[int] = []

    def take(nbytes: int) -> bool:  # more of the budget, for a finer decode of a small face
      if not scheduler.try_take(nbytes):
        return False
      taken.append(nbytes)
      return True

    outcome: sandbox.Outcome | None = None
    try:
      if pool is not None:
        outcome = pool.run(lane, data, aligned, reserved, take)
      else:
        outcome = sandbox.prepare_untrusted(data, aligned, reserved, task, in_process, take)
      return outcome
    finally:
      for nbytes in taken:
        scheduler.give(nbytes)
      if not isinstance(outcome, sandbox.Cost):  # read, refused or failed; a Cost comes back with more budget
        metrics.images.labels(lane).inc()

  async def prepare_one(owner: limits.Owner, name: str, data: bytes, aligned: bool) -> sandbox.Prepared:
    # Nothing here reads the bytes: the header too is read in the lane's worker. Each image first
    # reserves a little of the budget; one whose header asks more comes back once for it.
    lane = "aligned" if aligned else "detect"
    reserved = min(sandbox.FIRST_RESERVATION_BYTES, settings.decode_budget_bytes)
    outcome: sandbox.Outcome = sandbox.Cost(reserved)
    for _ in range(2):
      if not isinstance(outcome, sandbox.Cost):
        break
      reserved = outcome.nbytes
      try:
        outcome = await scheduler.run(lane, owner, reserved, decode, lane, data, aligned, reserved)
      except limits.Overloaded as e:
        raise Refused(busy(str(e), e.retry_after_s)) from None
      except Exception as e:  # a bug or a detector failure on this upload
        logging.error("preparing %s failed", name, exc_info=e)
        raise Refused(error(500, f"{name}: {type(e).__name__}: {e}", file=name)) from None
    if isinstance(outcome, sandbox.Refusal):
      message = f"{name}: {outcome.reason}{outcome.hint}"
      raise Refused(error(outcome.status, message, file=name, reason=outcome.reason))
    assert isinstance(outcome, sandbox.Prepared)  # a second Cost cannot happen: the same header, the same estimate
    return outcome

  async def predict(request: Request) -> Response:
    with upstream.arriving() as handed_over:
      start = time.perf_counter()
      try:
        upload = await read_upload(request, settings)
      except Refused as e:
        return e.response
      if not upload.aligned and detector is None:
        return error(400, "this server detects no faces (started without a detector): send aligned=true")
      work = asyncio.ensure_future(answer(upload, start, handed_over))
      gone = asyncio.ensure_future(_disconnected(request))
      try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
      finally:  # also when this handler is cancelled (the graceful shutdown ran out): stop the work
        gone.cancel()
        if not work.done():
          work.cancel()
          metrics.cancelled.inc()
          with contextlib.suppress(asyncio.CancelledError):
            await work
      if work.cancelled():  # the client went away: nobody reads this
        return error(499, "the client disconnected: its work was cancelled")
      return work.result()

  async def answer(upload: Upload, start: float, handed_over: Callable[[], None]) -> Response:
    uploaded = time.perf_counter()
    owner = limits.Owner()  # this request's turn among the decoders
    tasks = [
      asyncio.ensure_future(prepare_one(owner, name, data, upload.aligned))
      for name, data in zip(upload.names, upload.datas)
    ]
    try:
      prepared = await asyncio.gather(*tasks)
    except Refused as e:
      return e.response
    finally:
      for one in tasks:  # the first refusal (or a cancel) stops this request's other images
        one.cancel()
    decoded = time.perf_counter()
    cropped = [(p.status, [photos.Face(box) for box in p.boxes], p.crops) for p in prepared]
    futures = [model_batcher.submit(chip) for _, _, chips in cropped for chip in chips]
    handed_over()
    try:
      predictions = await asyncio.gather(*map(asyncio.wrap_future, futures))
    except Exception as e:  # the model failed on one of this request's faces (even alone); the others go on
      return error(500, f"model call failed: {type(e).__name__}: {e}")
    finally:
      for future in futures:
        future.cancel()  # queued faces of a cancelled request are skipped by the batcher
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

  def busy(message: str, retry_after_s: int) -> Response:
    return error(503, message, headers={"Retry-After": str(retry_after_s)})

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
  return guard.Guard(app, metrics, settings.max_body_bytes, settings.body_timeout_s, settings.max_buffered_bytes)


async def _disconnected(request: Request) -> None:
  """Returns when the client hangs up (its body has been read: the next message is the disconnect)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


def _fill(face: photos.Face, p: batcher.Prediction) -> None:
  face.distribution, face.predicted_age, face.argmax_age, face.std, face.interval80 = (
    p.distribution,
    p.predicted_age,
    p.argmax_age,
    p.std,
    p.interval80,
  )
