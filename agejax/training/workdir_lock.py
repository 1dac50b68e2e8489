"""One writer per workdir: a lock held for a training run's life (a file lock locally, a guarded object on gs://)."""

import calendar
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from agejax import errors, storage

if TYPE_CHECKING:  # imported where used at run time: only gs:// locks need it
  from google.cloud.storage import Blob

LOCK_FILE = ".agejax-lock.json"
LOCK_HEARTBEAT_S = 60.0  # how often the holder of a gs:// lock rewrites it
# A gs:// lock not rewritten for this long belongs to a run that died (crash, lost VM): it is taken
# over with a warning. Many heartbeats, so a slow request or a few minutes of clock skew never trip it.
LOCK_STALE_S = 600.0


class WorkdirBusy(errors.UserError):
  """Another run holds the workdir's lock, or took it over from this run; the message is one line."""


def _utc(seconds: float) -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _seconds(utc: str) -> float:
  return float(calendar.timegm(time.strptime(utc, "%Y-%m-%dT%H:%M:%SZ")))


def _machine() -> dict[str, str]:
  """What makes a pid meaningful: the kernel's boot and the pid namespace (containers share host names)."""

  def read(reader, name: str) -> str:
    try:
      return reader(name).strip()
    except OSError:
      return ""

  return {
    "boot_id": read(lambda n: open(n).read(), "/proc/sys/kernel/random/boot_id"),
    "pid_namespace": read(os.readlink, "/proc/self/ns/pid"),
  }


def describe_holder(holder: dict[str, Any] | None) -> str:
  """'pid P on HOST since T' for a lock's holder record."""
  if not holder:
    return "an unknown run (the lock holds no readable holder)"
  text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
  if holder.get("heartbeat") and holder.get("heartbeat") != holder.get("since"):
    text += f" (last heartbeat {holder['heartbeat']})"
  return text


def _parse_holder(data: bytes) -> dict[str, Any] | None:
  try:
    holder = json.loads(data)
  except (ValueError, UnicodeDecodeError):
    return None
  return holder if isinstance(holder, dict) else None


class WorkdirLock:
  """One writer per workdir for a run's life: WORKDIR/.agejax-lock.json names the holder (host, pid, start).

  On a local disk (or NFS) the file carries an advisory `fcntl.flock`: the kernel drops it when the
  holder exits in any way, so a crashed run never blocks the next. In a gs:// bucket the object is
  created only if it does not exist (`if_generation_match=0`), rewritten every `heartbeat_s` by a
  thread, and deleted at release; a lock whose heartbeat is older than `stale_s`, or whose holder
  ran on this machine and is gone, is taken over with a warning naming it. `acquire` raises
  WorkdirBusy naming the holder. Other URL schemes have no lock (a warning says so).
  """

  def __init__(
    self, workdir: storage.Location, *, heartbeat_s: float = LOCK_HEARTBEAT_S, stale_s: float = LOCK_STALE_S
  ):
    self.workdir = storage.path(workdir)
    self.file = self.workdir / LOCK_FILE
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    now = _utc(time.time())
    self.holder = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "since": now,
      "heartbeat": now,
      "token": uuid.uuid4().hex,
      **_machine(),
    }
    self._fd: int | None = None
    self._blob: Blob | None = None
    self._generation: int | None = None
    self._lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def _busy(self, holder: dict[str, Any] | None) -> WorkdirBusy:
    stale = (
      f"; a lock not refreshed for {self.stale_s / 60:g} min is taken over" if storage.is_url(self.workdir) else ""
    )
    return WorkdirBusy(
      f"workdir {self.workdir} is in use by another run: {describe_holder(holder)} (lock "
      f"{self.file}); wait for it to end or stop it, or use another workdir{stale}"
    )

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirBusy naming its holder; returns self."""
    try:
      if not storage.is_url(self.workdir):
        self._acquire_file()
      elif str(self.workdir).startswith("gs://"):
        self._acquire_object()
        self._thread = threading.Thread(target=self._heartbeat, name="agejax-workdir-lock", daemon=True)
        self._thread.start()
      else:
        logging.warning("%s: no workdir lock for this kind of URL; make sure no other run writes there", self.workdir)
    except BaseException:  # a SIGTERM (or any error) half-way through taking it leaves nothing behind
      self.release()
      raise
    return self

  def check(self) -> None:
    """Raises WorkdirBusy when another run took the lock over (this run stalled past `stale_s`)."""
    if self._lost:
      raise WorkdirBusy(self._lost)

  def release(self) -> None:
    """Gives the lock up (the file or object goes); idempotent."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._fd is not None:
      if self._is_our_file():
        os.unlink(self.file)
      os.close(self._fd)  # drops the flock
      self._fd = None
    if self._blob is not None and not self._lost:
      self._delete_object()
    self._blob = None

  def _delete_object(self) -> None:
    from google.api_core import exceptions

    blob = self._blob
    assert blob is not None  # called only while this run holds the object
    try:
      blob.delete(if_generation_match=self._generation)
    except exceptions.NotFound:
      pass  # gone already (a retried delete whose first reply was lost)
    except exceptions.PreconditionFailed:
      found = self._read_object(blob.bucket, blob.name)
      if found and found[1] and found[1].get("token") == self.holder["token"]:
        self._generation = found[0]  # our last heartbeat landed after all
        self._delete_object()
      else:
        logging.warning("the workdir lock %s is no longer this run's; left as it is", self.file)
    except Exception as e:  # the network: the next run takes the lock over once it is stale
      logging.warning("could not remove the workdir lock %s: %s", self.file, storage.first_line(e))

  # Local files: flock.

  def _is_our_file(self) -> bool:
    assert self._fd is not None  # called only while holding the open lock file
    try:
      return os.path.samestat(os.fstat(self._fd), os.stat(self.file))
    except FileNotFoundError:
      return False

  def _acquire_file(self) -> None:
    while True:
      fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise self._busy(self._read_file_holder()) from None
      self._fd = fd  # only once locked: release() then may remove the file
      if self._is_our_file():
        break
      os.close(fd)  # its holder removed it between our open and flock: lock the file there now
      self._fd = None
    previous = _parse_holder(os.pread(self._fd, 1 << 16, 0))
    if previous:
      logging.warning(
        "workdir %s: the previous run, %s, ended without releasing its lock (killed?); taking it over",
        self.workdir,
        describe_holder(previous),
      )
    assert self._fd is not None  # the loop above ends only with the file locked
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, (json.dumps(self.holder) + "\n").encode(), 0)
    os.fsync(self._fd)

  def _read_file_holder(self) -> dict[str, Any] | None:
    for _ in range(40):  # the holder writes its record right after taking the flock
      try:
        holder = _parse_holder(self.file.read_bytes())
      except FileNotFoundError:
        holder = None
      if holder:
        return holder
      time.sleep(0.05)
    return None

  # gs:// objects: generation preconditions and a heartbeat.

  def _payload(self) -> str:
    return json.dumps(self.holder) + "\n"

  def _read_object(self, bucket, name: str) -> tuple[int, dict[str, Any] | None, float] | None:
    """(generation, holder, age in seconds of its last heartbeat) of the lock object, or None if there is none."""
    from google.api_core import exceptions

    while True:
      blob = bucket.get_blob(name)
      if blob is None:
        return None
      try:
        holder = _parse_holder(blob.download_as_bytes(if_generation_match=blob.generation))
        break
      except (exceptions.PreconditionFailed, exceptions.NotFound):  # rewritten or removed meanwhile: read again
        continue
    try:
      beat = _seconds((holder or {})["heartbeat"])  # no holder: a KeyError
    except (TypeError, KeyError, ValueError):  # unreadable: the object's own time stands in
      beat = blob.updated.timestamp() if blob.updated else time.time()
    return blob.generation, holder, time.time() - beat

  def _takeover_reason(self, holder: dict[str, Any] | None, age: float) -> str | None:
    if age > self.stale_s:
      return f"its last heartbeat was {age / 60:.0f} min ago (stale after {self.stale_s / 60:g} min)"
    ours = {"host": self.holder["host"], **_machine()}
    if (
      holder
      and all(holder.get(k) == v for k, v in ours.items())
      and isinstance(holder.get("pid"), int)
      and not storage.process_running(holder["pid"])
    ):
      return f"pid {holder['pid']} no longer runs on this host"
    return None

  def _acquire_object(self) -> None:
    from google.api_core import exceptions
    from google.cloud import storage as gcs

    bucket_name, _, name = str(self.file)[len("gs://") :].partition("/")
    bucket = gcs.Client(project=None).bucket(bucket_name)  # bucket and object calls need no project
    blob = bucket.blob(name)
    for _ in range(5):
      try:
        blob.upload_from_string(self._payload(), content_type="application/json", if_generation_match=0)
        break
      except exceptions.PreconditionFailed:
        found = self._read_object(bucket, name)
      if found is None:
        continue  # released between our two requests: try again
      generation, holder, age = found
      if holder and holder.get("token") == self.holder["token"]:  # our own create, retried after a lost reply
        blob.reload()
        break
      reason = self._takeover_reason(holder, age)
      if reason is None:
        raise self._busy(holder)
      try:
        blob.upload_from_string(self._payload(), content_type="application/json", if_generation_match=generation)
      except exceptions.PreconditionFailed:
        continue  # another run changed it first: look again
      logging.warning("workdir %s: took over the lock of %s: %s", self.workdir, describe_holder(holder), reason)
      break
    else:
      raise self._busy(None)
    self._blob, self._generation = blob, blob.generation

  def _heartbeat(self) -> None:
    from google.api_core import exceptions

    blob = self._blob
    assert blob is not None  # the thread starts once the object is ours; release() clears it after joining
    while not self._stop.wait(self.heartbeat_s):
      self.holder["heartbeat"] = _utc(time.time())
      try:
        blob.upload_from_string(self._payload(), content_type="application/json", if_generation_match=self._generation)
        self._generation = blob.generation
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        found = self._read_object(blob.bucket, blob.name)
        if found and found[1] and found[1].get("token") == self.holder["token"]:
          self._generation = found[0]  # our own write, retried after a lost reply
          continue
        holder = describe_holder(found[1]) if found else "nobody (it was removed)"
        self._lost = (
          f"workdir {self.workdir}: this run's lock was taken over or removed (now held by {holder}; "
          f"no heartbeat for {self.stale_s / 60:g} min makes a lock stale); stopped so that two runs "
          f"never write one workdir"
        )
        logging.error("%s", self._lost)
        return
      except Exception as e:  # a network hiccup: the next beat tries again, long before the lock is stale
        logging.warning("could not refresh the workdir lock %s: %s", self.file, storage.first_line(e))


@contextlib.contextmanager
def hold(workdir: storage.Location) -> Iterator[WorkdirLock | None]:
  """Holds WORKDIR's lock for a training run: process 0 takes it (the others share its run); all fail alike when busy.

  Under the lock, the temporaries of interrupted writes left in the workdir are removed.
  """
  lock, failure = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except Exception as e:  # every process must learn the outcome, or the others would wait for process 0
      failure = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if not multihost_utils.broadcast_one_to_all(np.int32(failure is None)) and failure is None:
      failure = WorkdirBusy(f"workdir {workdir}: process 0 could not take its lock (see its error)")
  if failure is not None:
    raise failure
  try:
    if lock is not None:
      # Under the lock no other trainer writes here: temporaries left in the workdir are a dead run's.
      for file in storage.remove_interrupted_writes(workdir):
        logging.warning("removed %s, left by an interrupted write", file)
    yield lock
  finally:
    if lock is not None:
      lock.release()
