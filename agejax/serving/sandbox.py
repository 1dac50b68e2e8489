"""Untrusted bytes in worker processes: screening, headers, decoding, EXIF, face detection and crops.

Everything that reads an upload's bytes runs in `prepare_untrusted`, and the server runs it in a
pool of worker processes (`Pool`), each with hard limits set in the child: its address space
(RLIMIT_AS, `Limits.memory_bytes` over what it holds once started) and the CPU seconds of each image
(RLIMIT_CPU, moved forward before every image: past it the kernel kills the worker with SIGXCPU).
A driver thread (one of the Scheduler's lane threads) sends one image to an idle worker of its lane
and waits, with a wall-clock watchdog besides. A worker that dies or passes a limit fails that image
alone (`Refusal`, 413 or 422) and is replaced; so is one that has read `Limits.images` images. The
model and its batcher stay in the server's process; crops come back through the worker's pipe
(pickled arrays: faster than shared memory for a photo's one or few faces, docs/benchmarks.md).

Workers start from a fork server (multiprocessing's 'forkserver' context, never a fork of the server:
it runs JAX's threads) that has imported TensorFlow and MTCNN once: a worker starts in about a
second instead of five, and shares those pages. TensorFlow and MTCNN reserve ~1.7 GB of address
space as they start, so the address-space limit is set only once the detector is built and has run
once: the worker's own VmSize then, plus `memory_bytes`.
"""

import contextlib
import ctypes
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import resource
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from agejax.data import faces
from agejax.data.framing import Framing
from agejax.inference import photos
from agejax.serving import limits

READY_TIMEOUT_S = 300.0  # a worker's start (the fork server's first: importing TensorFlow) on a busy machine
NEAR_LIMIT_BYTES = 32 << 20  # a worker whose address space came this close to its limit is replaced
FIRST_RESERVATION_BYTES = 64 << 20  # the budget an image takes before its header is read: most photos need less
# Tests only: with FAULT_ENV=1 in the server's environment, a worker given FAULT_MARKER + b"segfault"
# (or b"allocate", b"spin") crashes, allocates without end or spins, as a broken decoder would.
FAULT_ENV = "AGEJAX_SANDBOX_TEST_FAULT"
FAULT_MARKER = b"AGEJAX-FAULT:"


@dataclasses.dataclass(frozen=True)
class Limits:
  """A worker's limits: address space over its own once started, CPU seconds an image, images before replacement."""

  memory_bytes: int = 1_024_000_000  # serve.py --worker_memory_mb 1024
  cpu_s: float = 10.0
  images: int = 500

  @property
  def wall_s(self) -> float:
    """How long the driver waits for one image before killing its worker (CPU time may lag on a busy machine)."""
    return max(30.0, 6 * self.cpu_s)


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
  """How a worker builds its face detector (picklable: the detector itself holds TensorFlow's state)."""

  max_side: int = photos.DETECT_MAX_SIDE
  min_confidence: float = photos.MIN_CONFIDENCE
  max_faces: int | None = 64
  max_candidates: int = photos.MAX_CANDIDATES

  def __call__(self) -> photos.FaceDetector:
    return photos.FaceDetector(self.max_side, self.min_confidence, self.max_faces, self.max_candidates)


@dataclasses.dataclass(frozen=True)
class Task:
  """What every image of a lane is prepared for: the model's crop size and framing, the accepted formats, limits."""

  size: int
  framing: Framing | None
  formats: tuple[str, ...] = faces.FORMATS
  max_pixels: int | None = 64_000_000
  limits: Limits = Limits()


@dataclasses.dataclass
class Prepared:
  """An image's outcome: its status ("ok", "no face found"), face boxes in its pixels, their crops, faces found."""

  status: str
  boxes: list[tuple[float, float, float, float]]
  crops: list[np.ndarray]
  found: int  # faces over the confidence bar; more than len(boxes) when --max_faces cut them


@dataclasses.dataclass
class Refusal:
  """Why an image is refused: the HTTP status, the reason (the answer's "reason") and the flag that sets the limit."""

  status: int
  reason: str
  hint: str = ""


@dataclasses.dataclass
class Cost:
  """The image needs more of the decode budget than was reserved for it: run it again with `nbytes`."""

  nbytes: int


Outcome = Prepared | Refusal | Cost
Detector = Callable[[Image.Image], list[photos.Detection]]


def accepted_formats(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
  """Pillow's format names for `names` (any case; "jpg" and "tif" too), or a UserError naming the unknown one."""
  from agejax import errors

  Image.init()
  aliases = {"JPG": "JPEG", "TIF": "TIFF", "J2K": "JPEG2000", "JP2": "JPEG2000"}
  out = []
  for name in names:
    known = aliases.get(name.strip().upper(), name.strip().upper())
    if known not in Image.OPEN:
      choices = ", ".join(sorted(f.lower() for f in Image.OPEN))
      raise errors.UserError(f"--formats: {name!r} is not an image format Pillow reads; choose from {choices}")
    out.append(known)
  return tuple(dict.fromkeys(out))


def prepare_untrusted(
  data: bytes,
  aligned: bool,
  reserved: int,
  task: Task,
  detector: Detector | None,
  take: Callable[[int], bool] = lambda nbytes: False,
  costs: list[int] | None = None,
) -> Outcome:
  """Screens, reads the header of, decodes and crops one upload, as `predict.py` crops its photos.

  Args:
    data: the upload's bytes.
    aligned: the image is a face crop (its centre square), not a photo to detect faces in.
    reserved: decode bytes already reserved for it; a header asking more returns `Cost`.
    task: the crop size, framing, formats and limits.
    detector: finds faces in photos (None serves only `aligned`).
    take: takes more of the budget for a finer decode of a small face (`Scheduler.try_take`).
    costs: if given, gets the estimated decode bytes of each decode tried (the worker judges failures by it).
  """
  costs = [] if costs is None else costs
  screened = faces.screen(data)
  if isinstance(screened, str):
    return Refusal(422, screened)
  min_side = photos.min_side(task.size, aligned)
  size = faces.webp_size(screened)
  if size is not None and "WEBP" in task.formats:  # checked before Pillow opens it: opening allocates the canvases
    early = _afford(faces.Header(*size, "RGBA", "WEBP"), min_side, reserved, task, costs)
    if early is not None:
      return early
  header = faces.read_header(screened, task.formats)
  if isinstance(header, str):  # "image too large" here: over PIL's own limit (179 MP)
    if header.startswith("image too large"):
      return Refusal(413, header)
    return Refusal(415, header) if header.endswith("(--formats)") else Refusal(400, header)
  if task.max_pixels is not None and header.pixels > task.max_pixels:
    return Refusal(413, faces.too_large(header, task.max_pixels), " (--max_pixels)")
  min_side = photos.min_side(task.size, aligned)
  cost = header.decode_bytes(min_side)
  if cost > task.limits.memory_bytes:
    reason = (
      f"decoding it takes about {cost / 1e6:.0f} MB, over a decode worker's {task.limits.memory_bytes / 1e6:g} MB"
    )
    return Refusal(413, reason, " (--worker_memory_mb)")
  if cost > reserved:
    return Cost(cost)
  decoded = faces.open_reduced(screened, max_pixels=task.max_pixels, min_side=min_side, formats=task.formats)
  if isinstance(decoded, str):
    return Refusal(400, decoded)
  found: list[int] = []

  def detect(image: Image.Image) -> list[photos.Detection]:  # remembers how many faces there were before the cap
    assert detector is not None  # the app refuses photos when it has no detector
    detections = detector(image)
    found.append(getattr(detections, "found", len(detections)))
    return detections

  def reopen(factor: int) -> faces.Decoded | None:  # a finer decode for a small face, only if the budget allows
    cost = header.decode_bytes(max(1, min(header.width, header.height) // factor))
    if not take(cost):
      return None
    costs.append(cost)
    finer = faces.open_reduced(screened, factor=factor, formats=task.formats)
    return None if isinstance(finer, str) else finer

  status, boxes, crops = photos.find_faces(
    decoded, task.size, aligned=aligned, detector=detect, framing=task.framing, reopen=reopen
  )
  return Prepared(status, [b.box for b in boxes], crops, found[0] if found else len(boxes))


def _afford(header: faces.Header, min_side: int, reserved: int, task: Task, costs: list[int]) -> Refusal | Cost | None:
  """Refuses an image too large for the limits, asks for more budget than `reserved` (`Cost`), or None: go on."""
  if task.max_pixels is not None and header.pixels > task.max_pixels:
    return Refusal(413, faces.too_large(header, task.max_pixels), " (--max_pixels)")
  cost = header.decode_bytes(min_side)
  costs.append(cost)
  if cost > task.limits.memory_bytes:
    limit = task.limits.memory_bytes / 1e6
    reason = f"decoding it takes about {cost / 1e6:.0f} MB, over a decode worker's {limit:g} MB"
    return Refusal(413, reason, " (--worker_memory_mb)")
  return Cost(cost) if cost > reserved else None


# The worker process.


def _worker_main(conn: multiprocessing.connection.Connection, task: Task, detector_spec: Callable | None) -> None:
  """A worker's life: build the detector, set the limits, then prepare images until told to stop or worn out."""
  _die_with_parent()
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash writes no core file
  detector = None
  if detector_spec is not None:
    _single_threaded_tensorflow()
    detector = detector_spec()
    detector(Image.new("RGB", (64, 64), (128, 128, 128)))  # TensorFlow's kernels and threads exist before the limit
  _malloc_arenas(2)  # a thread's new malloc arena reserves 64 MB of address space
  limits.use_mmap_for_large_allocations()  # a freed image goes back to the OS at once, as in the server
  vm = _status_bytes("VmSize")
  limit = vm + task.limits.memory_bytes
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  fault = os.environ.get(FAULT_ENV, "") == "1"
  conn.send(("ready", {"pid": os.getpid(), "vm_bytes": vm, "rss_bytes": _status_bytes("VmRSS"), "limit": limit}))
  for left in range(task.limits.images, 0, -1):
    try:
      message = conn.recv()
    except (EOFError, OSError):  # the server is gone
      return
    if message[0] == "stop":
      return
    _, data, aligned, reserved = message
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used + task.limits.cpu_s), hard))

    def take(nbytes: int) -> bool:
      conn.send(("take", nbytes))
      return bool(conn.recv())

    costs: list[int] = []
    out_of_memory = False
    try:
      if fault and data.startswith(FAULT_MARKER):
        _misbehave(data[len(FAULT_MARKER) :].decode(errors="replace"))
      outcome: Outcome = prepare_untrusted(data, aligned, reserved, task, detector, take, costs)
    except MemoryError:
      outcome, out_of_memory = _over_memory(task.limits), True
    except Exception as e:  # a bug, or an error the code does not expect (TensorFlow's own out of memory)
      outcome = Refusal(500, f"{type(e).__name__}: {e}".splitlines()[0])
    # Decoders turn a failed allocation into errors of their own ("corrupt image", TensorFlow's
    # ResourceExhaustedError): a failure where memory ran out, or would have had the estimate been
    # right, is refused as too large, and the worker (its heap in pieces) replaced.
    now = _status_bytes("VmSize")
    failed = isinstance(outcome, Refusal) and outcome.status in (400, 500)  # not a refusal from the estimate
    if (
      out_of_memory
      or failed
      and (_status_bytes("VmPeak") >= limit - NEAR_LIMIT_BYTES or now + max(costs, default=0) >= limit)
    ):
      conn.send(("done", _over_memory(task.limits), True))
      return
    if isinstance(outcome, Refusal) and outcome.status == 500:
      logging.error("preparing an image failed: %s", outcome.reason)
    # A worker whose address space grew by half its allowance (TensorFlow's allocator keeps what a crowd
    # of faces took) is replaced after this image: the next one gets the whole allowance.
    worn = left == 1 or now - vm > task.limits.memory_bytes // 2
    conn.send(("done", outcome, worn))
    if worn:
      return
    limits.trim_heap()  # what many small images left on the heap, too


def _over_memory(limits: Limits) -> Refusal:
  return Refusal(
    413, f"decoding it took over a decode worker's {limits.memory_bytes / 1e6:g} MB", " (--worker_memory_mb)"
  )


def _misbehave(fault: str) -> None:
  """Tests only (FAULT_ENV): crash, allocate without end, or spin, as a broken decoder would."""
  if fault == "segfault":
    ctypes.string_at(0)
  elif fault == "allocate":
    hoard = []
    while True:
      hoard.append(np.ones(64 << 20, np.uint8))
  elif fault == "spin":
    while True:
      pass


def _die_with_parent() -> None:
  """Linux: the kernel kills this worker when its parent (the fork server) exits, e.g. after the server was killed."""
  with contextlib.suppress(OSError, AttributeError):
    libc = ctypes.CDLL(None)
    PR_SET_PDEATHSIG = 1  # noqa: N806  (prctl.h)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _malloc_arenas(count: int) -> None:
  with contextlib.suppress(OSError, AttributeError):
    M_ARENA_MAX = -8  # noqa: N806  (malloc.h)
    ctypes.CDLL(None).mallopt(M_ARENA_MAX, count)


def _single_threaded_tensorflow() -> None:
  """One worker, one core: TensorFlow's own thread pools would share the cores the other workers use."""
  import tensorflow as tf

  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def _status_bytes(key: str, pid: int | str = "self") -> int:
  with open(f"/proc/{pid}/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


# The server's side.


@dataclasses.dataclass(eq=False)  # by identity: kept in a set
class _Worker:
  process: Any  # multiprocessing's Process of the forkserver context
  conn: multiprocessing.connection.Connection
  ready: dict[str, Any] | None = None  # its "ready" report, once it came


@dataclasses.dataclass
class Lane:
  """A lane's workers: how many, and the detector they build (None: face crops only)."""

  workers: int
  detector: Callable[[], Detector] | None = None


class Pool:
  """Worker processes by lane; `run` prepares one image in an idle worker of a lane (one calling thread a worker).

  Args:
    lanes: lane name -> its workers and detector.
    task: what every image is prepared for.
  """

  def __init__(self, lanes: dict[str, Lane], task: Task):
    self.lanes, self.task = lanes, task
    self._context = multiprocessing.get_context("forkserver")
    if any(lane.detector is not None for lane in lanes.values()):
      # Imported once in the fork server, shared by every worker forked from it.
      self._context.set_forkserver_preload(["agejax.serving.sandbox", "tensorflow", "mtcnn"])
    else:
      self._context.set_forkserver_preload(["agejax.serving.sandbox"])
    self._idle: dict[str, queue.SimpleQueue[_Worker]] = {name: queue.SimpleQueue() for name in lanes}
    self._workers: set[_Worker] = set()
    self._lock = threading.Lock()
    self._closed = False
    self.replaced = 0  # workers replaced after a crash, a limit or their images

  def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Starts every worker and waits until each is ready; raises RuntimeError naming the first that failed."""
    started = [(name, self._spawn(name)) for name, lane in self.lanes.items() for _ in range(lane.workers)]
    deadline = time.monotonic() + timeout_s
    for name, worker in started:
      self._await_ready(worker, deadline)
      self._idle[name].put(worker)

  def run(self, lane: str, data: bytes, aligned: bool, reserved: int, take: Callable[[int], bool]) -> Outcome:
    """Prepares one image in an idle worker of `lane`: its outcome, or a `Refusal` when the worker failed."""
    worker = self._idle[lane].get()
    retire, kill = False, False
    try:
      if worker.ready is None:  # a replacement still starting
        try:
          self._await_ready(worker, time.monotonic() + READY_TIMEOUT_S)
        except RuntimeError as e:
          logging.error("%s", e)
          retire = kill = True
          return Refusal(503, "its decode worker failed to start; try again")
      worker.conn.send(("job", data, aligned, reserved))
      deadline = time.monotonic() + self.task.limits.wall_s
      while True:
        if not worker.conn.poll(max(0.0, min(1.0, deadline - time.monotonic()))):
          if time.monotonic() >= deadline:
            retire = kill = True
            return Refusal(422, f"reading it took over {self.task.limits.wall_s:g} s", " (--max_cpu_s)")
          if not worker.process.is_alive():
            raise EOFError
          continue
        message = worker.conn.recv()
        if message[0] == "take":
          worker.conn.send(take(message[1]))
        else:
          _, outcome, retire = message
          return outcome
    except (EOFError, OSError, BrokenPipeError):  # the worker died on this image
      retire = True
      return self._death(worker)
    finally:
      if retire:
        self._retire(worker, 0.0 if kill else 2.0)
        worker = self._spawn(lane)
      self._idle[lane].put(worker)

  @property
  def size(self) -> int:
    """The workers the lanes keep, ready or starting."""
    return sum(lane.workers for lane in self.lanes.values())

  def pids(self) -> list[int]:
    """The workers' process ids (alive or starting)."""
    with self._lock:
      return [w.process.pid for w in self._workers if w.process.pid is not None]

  def starting(self) -> int:
    """How many workers have not sent their start-up report yet (a replacement takes a second or more)."""
    with self._lock:
      waiting = [w for w in self._workers if w.ready is None]
    count = 0
    for worker in waiting:
      with contextlib.suppress(OSError, ValueError):  # retired meanwhile
        count += not worker.conn.poll(0)  # poll only looks: the report stays for the driver that takes the worker
    return count

  def workers_ready(self) -> list[dict[str, Any]]:
    """Each ready worker's start-up report: pid, VmSize and RSS once started, its address-space limit."""
    with self._lock:
      return [dict(w.ready) for w in self._workers if w.ready is not None]

  def close(self, timeout_s: float = 5.0) -> None:
    """Stops every worker: asks, waits up to `timeout_s`, then kills."""
    with self._lock:
      self._closed = True
      workers = list(self._workers)
    for worker in workers:
      with contextlib.suppress(OSError, ValueError):
        worker.conn.send(("stop",))
    deadline = time.monotonic() + timeout_s
    for worker in workers:
      self._retire(worker, max(0.0, deadline - time.monotonic()))

  def _spawn(self, lane: str) -> _Worker:
    parent, child = self._context.Pipe()
    detector = self.lanes[lane].detector
    process = self._context.Process(
      target=_worker_main, args=(child, self.task, detector), name=f"decode-{lane}", daemon=True
    )
    with self._lock:
      if self._closed:
        raise RuntimeError("the decode workers are shut down")
      process.start()
      worker = _Worker(process, parent)
      self._workers.add(worker)
    child.close()
    return worker

  def _await_ready(self, worker: _Worker, deadline: float) -> None:
    if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
      raise RuntimeError(f"a decode worker did not start in {READY_TIMEOUT_S:g} s")
    try:
      message = worker.conn.recv()
    except (EOFError, OSError):
      worker.process.join(5)
      raise RuntimeError(f"a decode worker exited while starting (exit code {worker.process.exitcode})") from None
    worker.ready = message[1]

  def _death(self, worker: _Worker) -> Refusal:
    """Why a worker died on an image, from its exit status."""
    worker.process.join(2)
    code = worker.process.exitcode
    if code == -signal.SIGXCPU:
      return Refusal(422, f"reading it took over {self.task.limits.cpu_s:g} s of CPU", " (--max_cpu_s)")
    if code is not None and code < 0:
      name = signal.Signals(-code).name
      if -code == signal.SIGKILL:  # not ours: the kernel's OOM killer, most likely
        return Refusal(413, f"its decode worker was killed ({name}), out of memory", " (--worker_memory_mb)")
      return Refusal(422, f"its decode worker crashed ({name})")
    return Refusal(422, f"its decode worker exited (code {code})")

  def _retire(self, worker: _Worker, timeout_s: float = 2.0) -> None:
    """Ends a worker (politely if it is idle: the "stop" was sent or it is exiting), and forgets it."""
    worker.process.join(timeout_s)
    if worker.process.is_alive():
      worker.process.kill()
      worker.process.join(5)
    with contextlib.suppress(OSError):
      worker.conn.close()
    with self._lock:
      self._workers.discard(worker)
      self.replaced += not self._closed
