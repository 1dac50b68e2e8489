"""Dynamic batching: faces from concurrent requests share one padded, precompiled model call."""

import concurrent.futures
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging

from agejax.evaluation import calibration
from agejax.inference import prediction

POLL_S = 0.0005  # how often a waiting batch checks whether requests are still on their way


class Model(Protocol):
  """What the batcher needs of a model: `prediction.Predictor` or `export.ExportedPredictor`."""

  input_size: int
  bins: np.ndarray
  batch_size: int
  flip: bool  # each face's distribution averaged with its mirror image's
  calibration: calibration.Calibration  # the temperature applied and the interval masses shown

  @property
  def input_spec(self) -> dict[str, Any] | None:
    """The input the model normalises to (InputSpec.to_json()); None for an export made before specs."""

  def __call__(self, images: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass
class Prediction:
  """One face's distribution and summaries, with the batch it rode in."""

  distribution: np.ndarray  # [K]
  predicted_age: float
  argmax_age: float
  std: float
  interval80: tuple[float, float]
  batch_faces: int  # real faces in its model call
  batch_size: int  # the call's padded size
  model_ms: float  # the call's duration (model + summaries)
  # P(age < T) per threshold age T its request asked (`under`), filled in by `service.Service.predict`; None: none.
  p_under: dict[int, float] | None = None


@dataclasses.dataclass
class _Item:
  chip: np.ndarray
  future: concurrent.futures.Future
  enqueued: float  # time.monotonic()


def padded_sizes(max_batch: int, devices: int) -> list[int]:
  """Returns the batch sizes a call is padded to: powers of two up to `max_batch`, and it, each a multiple of `devices`.

  A handful of sizes keeps compilation to warm-up, and padding wastes at most half a call.
  """
  sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch}
  return sorted({-(-s // devices) * devices for s in sizes})


class Batcher:
  """Gathers face crops from any request into padded batches, one model call each, in a worker thread.

  A batch closes when it holds `max_batch` faces, when its oldest face has waited `max_wait_s`, or
  as soon as nothing is queued and no request is still decoding (`upstream` returns 0): a lone
  request never waits for company that is not coming. It is padded to the smallest of `sizes`
  that fits, so every call runs a program compiled at warm-up.
  When a call fails, its faces are retried one by one, so only a failing face's future fails.
  A model without `predict_padded` (an export) is called on the padded batch and batches at most
  its own `batch_size` faces.

  Args:
    model: the restored model.
    max_batch: most faces in one call.
    max_wait_s: longest a face waits for others to join its batch.
    on_batch: called with (faces, padded size, seconds) after each successful call (metrics).
    upstream: returns how many requests are still decoding or detecting (default: always wait).
  """

  def __init__(
    self,
    model: Model,
    max_batch: int,
    max_wait_s: float,
    on_batch: Callable[[int, int, float], None] | None = None,
    upstream: Callable[[], int] | None = None,
  ):
    self.model, self.max_wait_s, self.on_batch = model, max_wait_s, on_batch
    self._masses = model.calibration.shown_masses()  # the 80% interval by age bucket; None: the central one
    self.upstream = upstream or (lambda: 1)
    if hasattr(model, "predict_padded"):
      self.sizes = padded_sizes(max_batch, jax.device_count())
      self._run = model.predict_padded
    else:  # an export: its call takes any batch up to its batch size, padding within to powers of two
      self.sizes = padded_sizes(min(max_batch, model.batch_size), 1)
      self._run = model
    self.max_batch = min(max_batch, self.sizes[-1])
    self._queue: queue.Queue[_Item | None] = queue.Queue()
    self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

  def warm_up(self) -> None:
    """Compiles the model and the summaries at every padded size, so no request waits for a compile."""
    size = self.model.input_size
    for n in self.sizes:
      self._predict(np.zeros((n, size, size, 3), np.uint8))

  def start(self) -> None:
    """Starts the worker thread."""
    self._thread.start()

  def close(self) -> None:
    """Lets the worker finish the faces already queued, then stops it."""
    if self._thread.is_alive():
      self._queue.put(None)
      self._thread.join()

  def submit(self, chip: np.ndarray) -> concurrent.futures.Future:
    """Queues one uint8 face crop [S, S, 3]; the future resolves to its `Prediction`."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put(_Item(chip, future, time.monotonic()))
    return future

  def _predict(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    probs = self._run(images)
    return probs, jax.device_get(prediction.summaries(probs, self.model.bins, self._masses))

  def _loop(self) -> None:
    stopping = False
    while not stopping:
      first = self._queue.get()
      if first is None:
        break
      batch = [first]
      # The wait counts from the oldest face's arrival: time spent queued behind a running call counts.
      deadline = first.enqueued + self.max_wait_s
      while len(batch) < self.max_batch:
        try:
          item = self._queue.get_nowait()
        except queue.Empty:
          left = deadline - time.monotonic()
          if left <= 0 or not self.upstream():
            break
          try:  # short naps, rechecking `upstream`: the batch goes once the last request on its way has queued
            item = self._queue.get(timeout=min(left, POLL_S))
          except queue.Empty:
            continue
        if item is None:
          stopping = True
          break
        batch.append(item)
      # A request that went away (client disconnect) cancelled its futures: skip its faces.
      batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
      try:
        self._call(batch)
      except Exception as e:  # a bug past the model call: fail these faces, keep the worker alive for the rest
        logging.exception("batch of %d faces failed", len(batch))
        for item in batch:
          if not item.future.done():
            item.future.set_exception(e)

  def _call(self, batch: list[_Item]) -> None:
    if not batch:
      return
    n = len(batch)
    size = next(s for s in self.sizes if s >= n)
    images = np.zeros((size, *batch[0].chip.shape), np.uint8)  # black padding, discarded
    images[:n] = np.stack([item.chip for item in batch])
    start = time.perf_counter()
    try:
      probs, stats = self._predict(images)
    except Exception as e:
      if n > 1:  # find the face at fault: each alone, so only its own request fails (with a 500)
        logging.warning("model call on a batch of %d faces failed (%s); retrying them one by one", n, e)
        for item in batch:
          self._call([item])
      else:
        logging.exception("model call on one face failed")
        batch[0].future.set_exception(e)
      return
    seconds = time.perf_counter() - start
    if self.on_batch:
      self.on_batch(n, size, seconds)
    for i, item in enumerate(batch):
      item.future.set_result(
        Prediction(
          distribution=np.asarray(probs[i], np.float32),
          predicted_age=float(stats["predicted_age"][i]),
          argmax_age=float(stats["argmax_age"][i]),
          std=float(stats["std"][i]),
          interval80=(float(stats["interval80"][i][0]), float(stats["interval80"][i][1])),
          batch_faces=n,
          batch_size=size,
          model_ms=1000 * seconds,
        )
      )
