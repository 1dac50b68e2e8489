"""Fair, bounded decoding: worker lanes, a byte budget shared by the decoders, round-robin across requests.

Every image's decode (and its face detection) waits here for a thread of its lane and for room in
the budget of decoded pixels in flight. Waiting requests are served in turn, one image each, so a
request of 64 huge images delays a later one by at most one decode; face crops sent with
`aligned=true` have a lane of their own and never queue behind detection. Work that can't start
within `queue_timeout_s` raises `Overloaded` (the app answers 503 with Retry-After); a request
whose client went away cancels its waiting work by cancelling its tasks.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
TRIM_AFTER_BYTES = 32 << 20  # after a decode this large, hand freed heap pages back to the OS (glibc)
OVERLOADED_AFTER_S = 1.0  # /healthz and /readyz say "overloaded" while work has waited longer (or half the timeout)


class Overloaded(Exception):
  """Work could not start within the queue timeout."""

  def __init__(self, retry_after_s: int):
    super().__init__(f"server busy: the work could not start in time, retry after {retry_after_s} s")
    self.retry_after_s = retry_after_s


class Owner:
  """Whose work it is (one request): turns are taken by owner."""

  def __init__(self):
    self.started = 0.0  # time.monotonic() when its latest job started
    self.running = 0  # its jobs in the threads now


@dataclasses.dataclass
class _Waiter:
  future: asyncio.Future
  cost: int
  since: float


@dataclasses.dataclass
class _Lane:
  pool: concurrent.futures.ThreadPoolExecutor
  workers: int
  running: int = 0
  waiting: dict["Owner", collections.deque[_Waiter]] = dataclasses.field(default_factory=dict)  # in arrival order


class Scheduler:
  """Starts work in thread lanes fairly across owners (requests) within a shared budget of bytes.

  Args:
    lanes: lane name -> number of worker threads.
    budget_bytes: most decoded bytes in flight over all lanes (a single larger job runs alone).
    queue_timeout_s: longest a job waits to start before `Overloaded`.
  """

  def __init__(self, lanes: dict[str, int], budget_bytes: int, queue_timeout_s: float):
    self.lanes = {
      name: _Lane(concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix=f"decode-{name}"), n)
      for name, n in lanes.items()
    }
    self.budget_bytes, self.queue_timeout_s = budget_bytes, queue_timeout_s
    self.in_flight_bytes = 0
    self._lock = threading.Lock()  # in_flight_bytes changes in worker threads too (`try_take`)
    self._loop: asyncio.AbstractEventLoop | None = None
    self.refused = 0

  async def run(self, lane: str, owner: "Owner", cost: int, fn: Callable[..., T], *args: Any) -> T:
    """Runs `fn(*args)` in `lane`'s threads once it is `owner`'s turn and `cost` bytes fit the budget."""
    self._loop = asyncio.get_running_loop()
    waiter = _Waiter(self._loop.create_future(), cost, time.monotonic())
    self.lanes[lane].waiting.setdefault(owner, collections.deque()).append(waiter)
    self._grant()
    try:
      # The timeout counts while none of this owner's work runs or starts: a request's 64th image
      # may wait behind its own first 63, but not for `queue_timeout_s` behind everybody else's.
      while True:
        progress = max(waiter.since, owner.started)
        left = progress + self.queue_timeout_s - time.monotonic()
        try:
          await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, left))
          break
        except TimeoutError:
          if owner.running == 0 and max(waiter.since, owner.started) == progress:
            raise
    except BaseException as e:  # timed out or cancelled (client gone): leave the queue, or give back a grant
      if waiter.future.done() and not waiter.future.cancelled():
        self._finish(lane, cost, owner)
      else:
        waiter.future.cancel()
        self._forget(lane, owner, waiter)
      if isinstance(e, TimeoutError):
        self.refused += 1
        raise Overloaded(max(1, math.ceil(self.queue_timeout_s))) from None
      raise
    job = self.lanes[lane].pool.submit(self._call, cost, fn, *args)
    # The slot and the bytes are held until the thread is done, even when this request is cancelled.
    job.add_done_callback(lambda _: self._threadsafe(self._finish, lane, cost, owner))
    return await asyncio.wrap_future(job)

  def try_take(self, nbytes: int) -> bool:
    """Takes `nbytes` more of the budget now if they fit (any thread); pair with `give`."""
    with self._lock:
      if self.in_flight_bytes + nbytes > self.budget_bytes:
        return False
      self.in_flight_bytes += nbytes
      return True

  def give(self, nbytes: int) -> None:
    """Returns bytes taken with `try_take` (any thread)."""
    with self._lock:
      self.in_flight_bytes -= nbytes
    self._threadsafe(self._grant)

  def load(self) -> dict[str, Any]:
    """Waiting and running work, bytes in flight, the oldest wait, and whether that counts as overloaded."""
    now = time.monotonic()
    waits = [now - w.since for lane in self.lanes.values() for q in lane.waiting.values() for w in q]
    oldest = max(waits, default=0.0)
    return {
      "overloaded": oldest > min(OVERLOADED_AFTER_S, self.queue_timeout_s / 2),
      "waiting": len(waits),
      "running": sum(lane.running for lane in self.lanes.values()),
      "decode_bytes_in_flight": self.in_flight_bytes,
      "decode_budget_bytes": self.budget_bytes,
      "oldest_wait_s": round(oldest, 3),
      "refused": self.refused,
    }

  def shutdown(self) -> None:
    """Waits for the running work; drops what has not started."""
    for lane in self.lanes.values():
      lane.pool.shutdown(cancel_futures=True)

  def _call(self, cost: int, fn: Callable[..., T], *args: Any) -> T:
    try:
      return fn(*args)
    finally:
      if cost >= TRIM_AFTER_BYTES:
        trim_heap()

  def _threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
    if self._loop is None or self._loop.is_closed():
      return
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
      self._loop.call_soon_threadsafe(fn, *args)

  def _finish(self, lane: str, cost: int, owner: Owner) -> None:
    self.lanes[lane].running -= 1
    owner.running -= 1
    with self._lock:
      self.in_flight_bytes -= cost
    self._grant()
    if not any(lane.running or lane.waiting for lane in self.lanes.values()) and self._loop is not None:
      # A burst is over: the decode threads' heaps (many small images add up) go back to the OS.
      with contextlib.suppress(RuntimeError):  # the loop is closing (shutdown)
        self._loop.run_in_executor(None, trim_heap)

  def _forget(self, lane: str, owner: Owner, waiter: _Waiter) -> None:
    queue = self.lanes[lane].waiting.get(owner)
    if queue is not None:
      with contextlib.suppress(ValueError):
        queue.remove(waiter)
      if not queue:
        del self.lanes[lane].waiting[owner]

  def _grant(self) -> None:
    """Starts what can start: in each lane, owners in turn, each owner's oldest job, while slots and bytes last."""
    for lane in self.lanes.values():
      progress = True
      while progress and lane.running < lane.workers and lane.waiting:
        progress = False
        # The owner served longest ago goes first (one never served before all): a request's turn
        # comes after every other waiting request's, however many images it queued.
        for owner in sorted(lane.waiting, key=lambda o: o.started):
          queue = lane.waiting[owner]
          while queue and queue[0].future.done():  # cancelled meanwhile
            queue.popleft()
          if not queue:
            del lane.waiting[owner]
            continue
          waiter = queue[0]
          with self._lock:
            fits = self.in_flight_bytes == 0 or self.in_flight_bytes + waiter.cost <= self.budget_bytes
            if fits:
              self.in_flight_bytes += waiter.cost
          if not fits:
            continue
          queue.popleft()
          lane.running += 1
          waiter.future.set_result(None)
          owner.started, owner.running = time.monotonic(), owner.running + 1
          if not queue:
            del lane.waiting[owner]
          progress = True
          break


_LIBC: Any = None


def trim_heap() -> None:
  """Asks glibc to return freed heap memory to the OS (a no-op elsewhere)."""
  global _LIBC
  if _LIBC is None:
    name = ctypes.util.find_library("c")
    try:
      _LIBC = ctypes.CDLL(name) if name else False
      _LIBC and _LIBC.malloc_trim  # noqa: B018  (musl and macOS have none)
    except (OSError, AttributeError):
      _LIBC = False
  if _LIBC:
    _LIBC.malloc_trim(0)


def use_mmap_for_large_allocations(threshold_bytes: int = 4 << 20) -> None:
  """glibc: allocations from `threshold_bytes` up are mmapped, so freeing an image returns it to the OS at once.

  glibc's default threshold grows with the largest block freed (up to 32 MB): after one big image,
  later ones land on the heap of their decode thread and stay in the process's memory.
  """
  trim_heap()  # loads libc
  if _LIBC:
    M_MMAP_THRESHOLD = -3  # malloc.h
    _LIBC.mallopt(M_MMAP_THRESHOLD, threshold_bytes)
