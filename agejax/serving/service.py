"""What every endpoint of the server shares: the decode workers, their fair scheduler, the batcher, the limits.

`Service` turns uploads into face crops (in the sandbox's worker processes, fairly across requests,
within the decode budget) and crops into predictions (the dynamic batcher). /v1/predict
(`app.py`) and the Open Inference Protocol over HTTP and gRPC (`oip.py`, `oip_grpc.py`) are each a
thin codec around it, so they answer the same faces with the same model calls under the same limits.
"""

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from absl import logging

from agejax import labels
from agejax.data import faces
from agejax.serving import batcher, guard, limits, sandbox
from agejax.serving.guard import error
from agejax.serving.uploads import Refused


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
  model_name: str = "agejax"  # the Open Inference Protocol's name of the model (/v2/models/NAME)


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


class Service:
  """The server's decode workers, scheduler and batcher around one model, shared by every endpoint."""

  def __init__(
    self,
    model: batcher.Model,
    detector: "sandbox.DetectorSpec | sandbox.Detector | None",
    settings: Settings,
    min_age: int,
    step: int | None = None,
  ):
    if settings.isolation not in ("processes", "threads"):
      raise ValueError(f"isolation={settings.isolation!r}: use 'processes' or 'threads'")
    if settings.isolation == "processes" and detector is not None and not isinstance(detector, sandbox.DetectorSpec):
      raise ValueError("isolation='processes' takes a sandbox.DetectorSpec: each worker process builds its detector")
    self.model, self.settings, self.min_age, self.step = model, settings, min_age, step
    self.detects = detector is not None  # None serves only aligned crops
    self.metrics = guard.Metrics()
    self.upstream = Upstream()
    self.framing = getattr(model, "framing", None)  # the training crops' framing; an export has none yet
    self.batcher = batcher.Batcher(
      model, settings.max_batch, settings.max_wait_ms / 1000, self.metrics.on_batch, upstream=self._upstream_count
    )
    # Without a detector there is no photo lane: nothing would ever run in it.
    lane_workers = {"detect": settings.workers} if self.detects else {}
    lane_workers["aligned"] = settings.aligned_workers
    self.scheduler = limits.Scheduler(
      lane_workers,
      settings.decode_budget_bytes,
      settings.queue_timeout_s,
    )
    self.task = sandbox.Task(
      model.input_size,
      self.framing,
      tuple(settings.formats),
      settings.max_pixels,
      sandbox.Limits(settings.worker_memory_bytes, settings.max_cpu_s, settings.worker_images),
    )
    self.pool: sandbox.Pool | None = None
    self._in_process: sandbox.Detector | None = None
    if settings.isolation == "processes":
      # The lane threads of the scheduler each drive one worker process: as many processes as threads.
      spec = detector if isinstance(detector, sandbox.DetectorSpec) else None  # checked above: a DetectorSpec or None
      lanes = {name: sandbox.Lane(n, spec if name == "detect" else None) for name, n in lane_workers.items()}
      self.pool = sandbox.Pool(lanes, self.task)
    else:
      self._in_process = detector() if isinstance(detector, sandbox.DetectorSpec) else detector
    self.buffers = guard.Buffers(settings.max_buffered_bytes)  # request bodies held, over every endpoint

  def _upstream_count(self) -> int:
    return self.upstream.count

  async def start(self) -> None:
    """Starts the decode workers (a fork server importing TensorFlow) while every batch size compiles."""
    try:
      await asyncio.gather(*[asyncio.to_thread(f) for f in (self.batcher.warm_up, self.pool and self.pool.start) if f])
    except BaseException:
      if self.pool is not None:
        self.pool.close()
      raise
    self.batcher.start()

  def close(self) -> None:
    """Stops the batcher, the scheduler and the workers (every request has been answered)."""
    self.batcher.close()
    self.scheduler.shutdown()
    if self.pool is not None:
      self.pool.close()

  def _decode(self, lane: str, data: bytes, aligned: bool, reserved: int) -> sandbox.Outcome:
    """In a lane thread: the upload's crops (or why it can't be read), prepared in a worker process of the lane."""
    taken: list[int] = []

    def take(nbytes: int) -> bool:  # more of the budget, for a finer decode of a small face
      if not self.scheduler.try_take(nbytes):
        return False
      taken.append(nbytes)
      return True

    outcome: sandbox.Outcome | None = None
    try:
      if self.pool is not None:
        outcome = self.pool.run(lane, data, aligned, reserved, take)
      else:
        outcome = sandbox.prepare_untrusted(data, aligned, reserved, self.task, self._in_process, take)
      return outcome
    finally:
      for nbytes in taken:
        self.scheduler.give(nbytes)
      if not isinstance(outcome, sandbox.Cost):  # read, refused or failed; a Cost comes back with more budget
        self.metrics.images.labels(lane).inc()

  async def prepare_one(self, owner: limits.Owner, name: str, data: bytes, aligned: bool) -> sandbox.Prepared:
    """One upload's faces and crops, decoded in a worker of its lane; raises `Refused` (its JSON answer)."""
    # Nothing here reads the bytes: the header too is read in the lane's worker. Each image first
    # reserves a little of the budget; one whose header asks more comes back once for it.
    lane = "aligned" if aligned else "detect"
    reserved = min(sandbox.FIRST_RESERVATION_BYTES, self.settings.decode_budget_bytes)
    outcome: sandbox.Outcome = sandbox.Cost(reserved)
    for _ in range(2):
      if not isinstance(outcome, sandbox.Cost):
        break
      reserved = outcome.nbytes
      try:
        outcome = await self.scheduler.run(lane, owner, reserved, self._decode, lane, data, aligned, reserved)
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

  async def prepare(self, names: list[str], datas: list[bytes], aligned: bool) -> list[sandbox.Prepared]:
    """A request's uploads prepared concurrently, in one turn among the decoders; the first refusal stops the rest."""
    if not aligned and not self.detects:
      raise Refused(error(400, "this server detects no faces (started without a detector): send aligned=true"))
    owner = limits.Owner()  # this request's turn among the decoders
    tasks = [asyncio.ensure_future(self.prepare_one(owner, name, data, aligned)) for name, data in zip(names, datas)]
    try:
      return await asyncio.gather(*tasks)
    finally:
      for one in tasks:  # the first refusal (or a cancel) stops this request's other images
        one.cancel()

  async def predict(
    self, chips: list[np.ndarray], handed_over: Callable[[], None] = lambda: None, under: Sequence[int] = ()
  ) -> list:
    """Each uint8 crop's `batcher.Prediction`, riding in model calls shared with other requests; raises `Refused`.

    `handed_over` is called once the crops are queued (the request no longer counts as upstream).
    With threshold ages `under`, each prediction's `p_under` holds P(age < T) of its (calibrated)
    distribution: the same sum `Predictor.probability_under` and an export's give.
    """
    futures = [self.batcher.submit(chip) for chip in chips]
    handed_over()
    try:
      predictions = await asyncio.gather(*map(asyncio.wrap_future, futures))
    except Exception as e:  # the model failed on one of this request's faces (even alone); the others go on
      raise Refused(error(500, f"model call failed: {type(e).__name__}: {e}")) from None
    finally:
      for future in futures:
        future.cancel()  # queued faces of a cancelled request are skipped by the batcher
    if under and predictions:
      ages = labels.check_thresholds(under)
      p = labels.probability_under(np.stack([p.distribution for p in predictions]), self.model.bins, ages)
      for prediction, row in zip(predictions, p):
        prediction.p_under = dict(zip(ages, map(float, row)))
    return predictions

  def overloaded(self) -> dict | None:
    """The scheduler's load when work has waited too long to start (then /readyz answers 503), else None."""
    load = self.scheduler.load()
    return load if load["overloaded"] else None


def busy(message: str, retry_after_s: int):
  """The 503 answer with Retry-After."""
  return error(503, message, headers={"Retry-After": str(retry_after_s)})


def refusal(e: Refused) -> tuple[int, str]:
  """(status, one-line message) of a refusal's JSON answer: what the other protocols answer instead."""
  body = json.loads(bytes(e.response.body))
  return e.response.status_code, str(body.get("error", ""))
