"""Pinned operations: the workdir lock's takeover, serving's timeouts, hang-ups and overload, the export's swap.

Each test names in its docstring a one-line bug (file:line, before -> after) that the other tests let pass
and that it fails on. The servers here are the real app on a real uvicorn on 127.0.0.1, in a thread, with
test_serve's FakeModel (no training run): seconds, not minutes.
"""

import asyncio
import contextlib
import datetime
import json
import os
import pathlib
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from etils import epath
from google.api_core import exceptions
from prometheus_client.parser import text_string_to_metric_families
from test_serve import FakeModel, png

from agejax import storage
from agejax.benchmarks.serving import BOUNDARY, multipart_body
from agejax.inference import export
from agejax.serving import app as serving_app
from agejax.serving import limits, local
from agejax.training import workdir_lock

WAIT_S = 10.0  # the longest any wait for the server's state may take before the test fails


# The workdir lock in a bucket: an in-memory bucket with GCS's generation preconditions.


class FakeBucket:
  """A bucket's objects as (bytes, generation); writes and deletes honour `if_generation_match` (0: none yet)."""

  def __init__(self):
    self.objects: dict[str, tuple[bytes, int]] = {}
    self.generations = 0

  def bucket(self, name: str) -> "FakeBucket":
    return self

  def blob(self, name: str) -> "FakeBlob":
    return FakeBlob(self, name)

  def get_blob(self, name: str) -> "FakeBlob | None":
    if name not in self.objects:
      return None
    blob = FakeBlob(self, name)
    blob.generation = self.objects[name][1]
    return blob

  def check(self, name: str, generation: int | None) -> None:
    current = self.objects.get(name, (b"", 0))[1]
    if generation is not None and generation != current:
      raise exceptions.PreconditionFailed(f"{name}: generation {current}, not {generation}")


class FakeBlob:
  """The calls of google.cloud.storage.Blob that the lock makes."""

  def __init__(self, bucket: FakeBucket, name: str):
    self.bucket, self.name = bucket, name
    self.generation: int | None = None
    self.updated = datetime.datetime.now(datetime.UTC)

  def upload_from_string(self, data: str, content_type: str = "", if_generation_match: int | None = None) -> None:
    self.bucket.check(self.name, if_generation_match)
    self.bucket.generations += 1
    self.generation = self.bucket.generations
    self.bucket.objects[self.name] = (data.encode(), self.generation)

  def reload(self) -> None:
    self.generation = self.bucket.objects[self.name][1]

  def download_as_bytes(self, if_generation_match: int | None = None) -> bytes:
    if self.name not in self.bucket.objects:
      raise exceptions.NotFound(self.name)
    self.bucket.check(self.name, if_generation_match)
    return self.bucket.objects[self.name][0]

  def delete(self, if_generation_match: int | None = None) -> None:
    if self.name not in self.bucket.objects:
      raise exceptions.NotFound(self.name)
    self.bucket.check(self.name, if_generation_match)
    del self.bucket.objects[self.name]


LOCK_URL = "gs://agejax-test/run"
LOCK_NAME = f"run/{workdir_lock.LOCK_FILE}"


@pytest.fixture
def bucket(monkeypatch) -> FakeBucket:
  """The bucket the workdir lock of gs://agejax-test/run talks to."""
  from google.cloud import storage as gcs

  fake = FakeBucket()
  monkeypatch.setattr(gcs, "Client", lambda project=None: fake)
  return fake


def utc(seconds_ago: float = 0.0) -> str:
  """The lock records' time format, `seconds_ago` before now."""
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def holder_record(pid: int, heartbeat_ago_s: float = 0.0, **fields: str) -> dict[str, Any]:
  """A lock record of `pid` on this machine (host, boot, pid namespace), as a run writes it, with `fields` changed."""
  now = utc(heartbeat_ago_s)
  record = {"host": socket.gethostname(), "pid": pid, "since": now, "heartbeat": now, "token": "f" * 32}
  return {**record, **workdir_lock._machine(), **fields}


def leave_lock(bucket: FakeBucket, record: dict[str, Any]) -> bytes:
  """Writes `record` as the workdir's lock object, as a run that holds it (or held it) did; returns its bytes."""
  data = json.dumps(record).encode()
  bucket.blob(LOCK_NAME).upload_from_string(data.decode())
  return data


def dead_pid() -> int:
  """The pid of a process that has exited."""
  finished = subprocess.Popen(["true"])
  finished.wait()
  return finished.pid


# Run by a process that may not signal other users' processes: what it makes of a live holder's lock record.
TAKEOVER = """
import json, sys
from agejax import storage
from agejax.training import workdir_lock
holder = json.loads(sys.argv[1])
reason = workdir_lock.WorkdirLock("gs://agejax-test/run")._takeover_reason(holder, 0.0)
print(json.dumps([storage.process_running(holder["pid"]), reason]))
"""


@pytest.mark.slow
def test_a_bucket_lock_of_a_live_run_on_this_machine_is_kept_and_a_dead_ones_taken_over_with_a_warning(bucket, caplog):
  """A holder's pid is checked for what it is: a dead one's lock is taken over; a live one's, any user's, stays.

  Kills storage.py:130 (PermissionError: another user's process) `return True` -> `return False`. Also kills, as
  test_gcs.py does where its sandbox can run: workdir_lock.py:256 `and not storage.process_running(holder["pid"])`
  -> `and storage.process_running(...)`, workdir_lock.py:255 `and isinstance(holder.get("pid"), int)` -> `and not
  isinstance(...)`, workdir_lock.py:281 `if reason is None:` -> `if reason is not None:`, storage.py:128
  (ProcessLookupError) `return False` -> `return True`.
  """
  gone = dead_pid()
  record = holder_record(gone)
  leave_lock(bucket, record)
  with workdir_lock.WorkdirLock(LOCK_URL):
    assert json.loads(bucket.objects[LOCK_NAME][0])["pid"] == os.getpid()
  assert LOCK_NAME not in bucket.objects  # released
  assert (
    f"workdir {LOCK_URL}: took over the lock of pid {gone} on {record['host']} since {record['since']}: "
    f"pid {gone} no longer runs on this host"
  ) in caplog.text
  live = subprocess.Popen(["sleep", "60"])
  try:
    record = holder_record(live.pid)
    left = leave_lock(bucket, record)
    with pytest.raises(workdir_lock.WorkdirBusy) as busy:
      workdir_lock.WorkdirLock(LOCK_URL).acquire()
    assert str(busy.value).startswith(
      f"workdir {LOCK_URL} is in use by another run: pid {live.pid} on {record['host']} since {record['since']} "
    )
    assert bucket.objects[LOCK_NAME][0] == left  # the live holder's lock untouched
  finally:
    live.kill()
    live.wait()
  # Another user's live run, seen from a process that may not signal it (kill(pid, 0) answers EPERM).
  other = None
  if os.getuid() == 0:  # a process of nobody's, looked at without CAP_KILL
    if shutil.which("setpriv") is None:
      pytest.skip("needs setpriv to look at another user's process without CAP_KILL")
    other = subprocess.Popen(["sleep", "60"], user=65534)
    pid, command = other.pid, ["setpriv", "--bounding-set", "-kill", "--inh-caps", "-kill", sys.executable]
  elif os.stat("/proc/1").st_uid != os.getuid():
    pid, command = 1, [sys.executable]
  else:
    pytest.skip("no process of another user to hold the lock")
  try:
    result = subprocess.run(
      [*command, "-c", TAKEOVER, json.dumps(holder_record(pid))], capture_output=True, text=True, timeout=120
    )
  finally:
    if other is not None:
      other.kill()
      other.wait()
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout) == [True, None]  # running, and no reason to take its lock over


def test_a_fresh_bucket_lock_from_another_machine_or_container_is_never_taken_over_for_its_pid(bucket, caplog):
  """A pid means something only on the holder's host, boot and pid namespace; until the lock is stale it stays.

  The initial pid namespace has the same name (pid:[4026531836]) on every Linux machine, and containers
  share a host's name: a free pid here says nothing about a run there.
  Kills workdir_lock.py:254 `and all(holder.get(k) == v ...)` -> `and any(holder.get(k) == v ...)`.
  """
  gone = dead_pid()
  elsewhere = {
    "another machine": holder_record(gone, host="tpu-vm-w-1", boot_id="another-boot"),
    "another container": holder_record(gone, pid_namespace="pid:[1]"),
  }
  for what, record in elsewhere.items():
    left = leave_lock(bucket, record)
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"in use by another run: pid {gone} on {record['host']} "):
      workdir_lock.WorkdirLock(LOCK_URL).acquire()
    assert bucket.objects[LOCK_NAME][0] == left, what
  assert "took over" not in caplog.text


def test_a_bucket_lock_is_taken_over_once_its_heartbeat_is_older_than_stale_s(bucket, caplog):
  """Another machine's lock: kept 5 min after its last heartbeat (2 h into its run), taken over after 20 (stale at 10).

  Kills workdir_lock.py:243 `_seconds((holder or {})["heartbeat"])` -> `_seconds((holder or {})["since"])` (a long
  run's live lock taken over), workdir_lock.py:249 `if age > self.stale_s:` -> `if age > self.heartbeat_s:`,
  workdir_lock.py:250 `{age / 60:.0f} min ago` -> `{age:.0f} min ago`. Also kills, as test_gcs.py does:
  workdir_lock.py:249 `>` -> `<`, workdir_lock.py:246 `time.time() - beat` -> `beat - time.time()`,
  workdir_lock.py:28 `LOCK_STALE_S = 600.0` -> `60.0`.
  """
  other = {"host": "tpu-vm-w-1", "boot_id": "another-boot"}
  recent = holder_record(4242, heartbeat_ago_s=5 * 60, since=utc(2 * 3600), **other)  # a long run, beating
  left = leave_lock(bucket, recent)
  with pytest.raises(workdir_lock.WorkdirBusy, match="in use by another run: pid 4242 on tpu-vm-w-1 "):
    workdir_lock.WorkdirLock(LOCK_URL).acquire()
  assert bucket.objects[LOCK_NAME][0] == left
  stale = holder_record(4242, heartbeat_ago_s=20 * 60, **other)
  leave_lock(bucket, stale)
  with workdir_lock.WorkdirLock(LOCK_URL):
    assert json.loads(bucket.objects[LOCK_NAME][0])["pid"] == os.getpid()
  assert (
    f"workdir {LOCK_URL}: took over the lock of pid 4242 on tpu-vm-w-1 since {stale['since']}: its last heartbeat "
    f"was 20 min ago (stale after 10 min)"
  ) in caplog.text


# Serving: the real app on a real uvicorn in a thread, with a model and a detector that can be held.


class HeldModel(FakeModel):
  """test_serve's FakeModel (one-hot at each crop's first pixel) that records the pixels it ran on and can be held."""

  input_spec = None  # what /healthz reports of it

  def __init__(self):
    super().__init__()
    self.seconds, self.seen = 0.0, []
    self.gate, self.holding = threading.Event(), threading.Event()
    self.gate.set()

  def predict_padded(self, images: np.ndarray) -> np.ndarray:
    self.holding.set()
    self.gate.wait(WAIT_S)
    time.sleep(self.seconds)
    self.seen.extend(int(v) for v in images.reshape(len(images), -1)[:, 0])
    return super().predict_padded(images)


class HeldDetector:
  """A face detector that finds nothing, after `gate` opens."""

  def __init__(self):
    self.gate, self.calls = threading.Event(), 0

  def __call__(self, photo) -> list:
    self.calls += 1
    self.gate.wait(WAIT_S)
    return []


@contextlib.contextmanager
def live_server(model: HeldModel, detector: HeldDetector | None = None, **settings: Any) -> Iterator[tuple[str, Any]]:
  """(URL, the Starlette app) of create_app served by uvicorn as serve.py serves it, on a free loopback port."""
  # A held detector lives in this process: the server reads uploads in its own threads (the lanes, turns and
  # timeouts are the same; tests/test_sandbox.py covers the worker processes).
  isolation = "threads" if detector is not None else "processes"
  app = serving_app.create_app(
    model, detector, serving_app.Settings(max_batch=4, isolation=isolation, **settings), min_age=1
  )
  with local.in_thread(app, WAIT_S, head_timeout_s=5.0, log_level="warning") as url:
    try:
      yield url, app.app
    finally:  # release held work before the server stops
      model.gate.set()
      if detector is not None:
        detector.gate.set()


def image(value: int) -> tuple[str, bytes]:
  """A flat 8x8 PNG of grey level `value`: as an aligned crop, FakeModel's argmax age is value + 1."""
  return f"v{value}.png", png(np.full((8, 8, 3), value, np.uint8))


def post(url: str, *files: tuple[str, bytes], timeout: float = WAIT_S, **params: str) -> httpx.Response:
  return httpx.post(url + "/v1/predict", files=[("files", f) for f in files], params=params, timeout=timeout)


def in_background(fn, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list]:
  """Runs fn(*args, **kwargs) in a thread; its result lands in the returned list."""
  out: list = []
  thread = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)), daemon=True)
  thread.start()
  return thread, out


def counter(url: str, name: str, **labels: str) -> float:
  """A counter's value from /metrics."""
  for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=WAIT_S).text):
    for sample in family.samples:
      if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
        return sample.value
  return 0.0


def wait_until(condition, what: str) -> None:
  """Polls `condition` until it holds; fails naming `what` after WAIT_S."""
  deadline = time.monotonic() + WAIT_S
  while not condition():
    assert time.monotonic() < deadline, f"never: {what}"
    time.sleep(0.01)


def load(url: str) -> dict[str, Any]:
  """/healthz's load: waiting and running work, the oldest wait, refusals."""
  return httpx.get(url + "/healthz", timeout=WAIT_S).json()["load"]


def head(url: str, length: int, query: str = "", close: bool = True) -> bytes:
  """The head of a multipart POST /v1/predict whose body has `length` bytes."""
  port = url.rsplit(":", 1)[1]
  return (
    f"POST /v1/predict{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n"
    + ("Connection: close\r\n" if close else "")
    + "\r\n"
  ).encode()


def connect(url: str) -> socket.socket:
  """A raw TCP connection to the server, for clients that stall or hang up."""
  host, port = url.removeprefix("http://").split(":")
  return socket.create_connection((host, int(port)), timeout=WAIT_S)


def send_in_pieces(
  url: str, pieces: list[bytes], every_s: float, *, query: str = "", missing: int = 0, close: bool = True
) -> tuple[int, dict[str, str], bytes, float]:
  """Sends a multipart POST whose body is `pieces`, one every `every_s` (the head with the first), until answered.

  Its Content-Length counts `missing` bytes more than the pieces hold. Returns (status, headers, body, seconds
  from the head to the answer); reads until the server closes.
  """
  with connect(url) as s:
    start = time.monotonic()
    s.sendall(head(url, sum(map(len, pieces)) + missing, query, close) + pieces[0])
    for piece in pieces[1:]:
      if select.select([s], [], [], every_s)[0]:
        break  # answered (or closed) before the body was whole
      with contextlib.suppress(OSError):
        s.sendall(piece)
    raw = s.recv(65536)
    answered = time.monotonic() - start
    while chunk := s.recv(65536):  # to the close: a timeout here fails the test
      raw += chunk
  status_line, _, rest = raw.partition(b"\r\n")
  header_block, _, body = rest.partition(b"\r\n\r\n")
  headers = dict(line.decode().lower().split(": ", 1) for line in header_block.split(b"\r\n"))
  return int(status_line.split()[1]), headers, body, answered


@pytest.mark.slow
def test_a_stalled_body_gets_408_at_the_body_timeout_and_the_connection_is_closed():
  """Headers, then part of the body, then nothing: 408 about --body_timeout_s (0.5 s) after the request, then a close.

  Kills serving/uploads.py's (then app.py:135) `guard.too_slow(settings.body_timeout_s)` ->
  `guard.too_slow(settings.queue_timeout_s)` (the 408 names the wrong limit). Also kills, as test_hostile.py's
  server test does: guard.py:105 `if body_done:` -> `if not body_done:` (no timeout at all: the answer never comes).
  """
  with live_server(HeldModel(), body_timeout_s=0.5) as (url, _):
    body = multipart_body([image(7)])
    status, headers, answer, seconds = send_in_pieces(url, [body], 0.0, missing=1000, close=False)
  assert status == 408 and headers["connection"] == "close"
  assert json.loads(answer) == {"error": "the request body did not arrive within 0.5 s (--body_timeout_s)"}
  assert 0.45 <= seconds < 1.5, seconds


@pytest.mark.slow  # waits out a body timeout on purpose (~12 s)
def test_the_body_timeout_counts_the_whole_body_from_its_request_and_never_the_answer():
  """At 0.5 s: a body trickled over 1.2 s gets 408 at ~0.5 s; one whole in 0.2 s is served, its answer taking 0.8 s.

  Kills guard.py:108 `max(0.0, start + self.body_timeout_s - time.perf_counter())` -> `max(0.0, self.body_timeout_s)`
  (a timeout per piece: a client sending a byte every 0.4 s holds the request forever). Also kills, as
  test_hostile.py's bomb test does when its requests outlast its 2 s timeout: guard.py:112 `body_done =
  message["type"] != "http.request" or not ...` -> `... and not ...` (the body is never done: the wait for a
  hang-up after it times out, 499).
  """
  body = multipart_body([image(7)])
  step = len(body) // 6 + 1
  pieces = [body[i : i + step] for i in range(0, len(body), step)]
  assert len(pieces) == 6
  model = HeldModel()
  with live_server(model, body_timeout_s=0.5) as (url, _):
    status, _, answer, seconds = send_in_pieces(url, pieces, 0.2, query="?aligned=true")
    assert status == 408, answer
    assert 0.45 <= seconds < 1.5, seconds
    model.seconds = 0.8  # the warm-up's calls are done
    status, _, answer, seconds = send_in_pieces(url, [body[:100], body[100:]], 0.2, query="?aligned=true")
    cancelled = counter(url, "agejax_requests_cancelled_total")
  assert status == 200, answer
  ((face,),) = [r["faces"] for r in json.loads(answer)["results"]]
  assert face["argmax_age"] == 8.0 and seconds >= 0.8
  assert cancelled == 0


def test_a_hung_up_clients_faces_queued_for_the_model_are_never_computed():
  """Faces queued behind a running model call, whose client then hangs up, are skipped; the hang-up is counted.

  Kills batcher.py:154 `batch = [item for item in batch if item.future.set_running_or_notify_cancel()]` ->
  `batch = [item for item in batch]`. Also kills app.py:372 `work.cancel()` -> `pass` and app.py:373
  `metrics.cancelled.inc()` -> `pass`.
  """
  model = HeldModel()
  with live_server(model) as (url, app):
    model.gate.clear()
    model.holding.clear()
    first, first_answer = in_background(post, url, image(10), aligned="true")
    assert model.holding.wait(WAIT_S)  # the model runs the first request's face, and is held there
    before = counter(url, "agejax_requests_cancelled_total")
    body = multipart_body([image(77), image(78)])
    with connect(url) as gone:
      gone.sendall(head(url, len(body), "?aligned=true") + body)
      wait_until(lambda: app.state.batcher._queue.qsize() == 2, "the hung-up request's faces queued")
    wait_until(lambda: counter(url, "agejax_requests_cancelled_total") == before + 1, "the hang-up was counted")
    model.gate.set()
    first.join(WAIT_S)
    after = post(url, image(30), aligned="true")  # queued after the skipped faces: they are behind the batcher now
  assert first_answer[0].status_code == 200 and after.status_code == 200, after.text
  assert [r["faces"][0]["argmax_age"] for r in (first_answer[0].json()["results"][0], after.json()["results"][0])] == [
    11.0,
    31.0,
  ]
  assert 10 in model.seen and 30 in model.seen
  assert 77 not in model.seen and 78 not in model.seen


def test_a_hung_up_clients_queued_photos_are_dropped_and_the_decode_thread_stays_free():
  """Photos waiting for the one detection thread, whose client hangs up: never decoded, not waiting, the lane free.

  Kills limits.py:103 `self._forget(lane, owner, waiter)` -> `pass` and limits.py:175 `queue.remove(waiter)` ->
  `pass` (/healthz counts the gone client's photos as waiting). Also kills, as test_hostile.py's server test does:
  limits.py:98 `except BaseException as e:` -> `except Exception as e:` (a cancelled wait keeps its place and later
  takes the thread for good).
  """
  detector = HeldDetector()
  with live_server(HeldModel(), detector, workers=1, queue_timeout_s=2.0) as (url, _):
    first, first_answer = in_background(post, url, image(10))
    wait_until(lambda: detector.calls == 1, "the first photo is being decoded")
    before = counter(url, "agejax_requests_cancelled_total")
    body = multipart_body([image(i) for i in (20, 21, 22)])
    with connect(url) as gone:
      gone.sendall(head(url, len(body)) + body)
      wait_until(lambda: load(url)["waiting"] == 3, "the three photos wait for the thread")
    wait_until(lambda: counter(url, "agejax_requests_cancelled_total") == before + 1, "the hang-up was counted")
    held = load(url)  # the first photo still holds the thread
    detector.gate.set()
    first.join(WAIT_S)
    later = post(url, image(30))
    decoded = counter(url, "agejax_images_decoded_total", lane="detect")
  assert (held["waiting"], held["running"], held["overloaded"]) == (0, 1, False), held
  assert first_answer[0].status_code == 200 and later.status_code == 200, later.text
  assert later.json()["results"][0]["status"] == "no face found"
  assert decoded == 2 and detector.calls == 2  # the first photo and the later one: none of the gone client's


def test_a_wait_cancelled_just_as_its_turn_comes_gives_the_thread_and_bytes_back():
  """A client that hangs up the moment its decode is granted leaves the lane and the byte budget as they were.

  Kills limits.py:100 `self._finish(lane, cost, owner)` -> `pass` (the thread stays taken: the lane's next photo
  never starts).
  """
  ran: list[str] = []

  async def scenario() -> dict[str, Any]:
    scheduler = limits.Scheduler({"detect": 1}, budget_bytes=100, queue_timeout_s=30)
    assert scheduler.try_take(100)  # the budget is in use (a finer decode in flight)
    gone = asyncio.ensure_future(scheduler.run("detect", limits.Owner(), 10, ran.append, "gone"))
    await asyncio.sleep(0.05)
    scheduler.give(100)  # its turn comes on the loop's next round...
    gone.cancel()  # ...and its client hangs up in this one
    with contextlib.suppress(asyncio.CancelledError):
      await gone
    after = scheduler.load()
    await asyncio.wait_for(scheduler.run("detect", limits.Owner(), 10, ran.append, "next"), WAIT_S)
    scheduler.shutdown()
    return after

  after = asyncio.run(scenario())
  assert (after["running"], after["waiting"], after["decode_bytes_in_flight"]) == (0, 0, 0), after
  assert ran == ["next"]


@pytest.mark.slow
def test_overload_shows_in_healthz_and_readyz_refuses_with_503_and_both_recover():
  """Work waiting past half --queue_timeout_s (0.8 s): /healthz overloaded, /readyz 503; it gets 503 with Retry-After.

  Four photos arrive 0.25 s apart behind a photo that holds the one detection thread: one of them has waited
  0.4-0.8 s for about a second. Once none waits (all refused; the first still decodes) both say ok again.
  Kills limits.py:133 `oldest > min(OVERLOADED_AFTER_S, self.queue_timeout_s / 2)` -> `oldest > max(...)` (overload
  never shows before the 503s), limits.py:175 `queue.remove(waiter)` -> `pass` and limits.py:103
  `self._forget(lane, owner, waiter)` -> `pass` (refused requests count as waiting until the thread frees). Also
  kills app.py:430 `"overloaded" if load["overloaded"] else "ok"` -> `"ok" if ... else "overloaded"` and app.py:422
  `if load["overloaded"]:` -> `if not load["overloaded"]:`.
  """
  detector = HeldDetector()
  with live_server(HeldModel(), detector, workers=1, queue_timeout_s=0.8) as (url, _):
    idle = httpx.get(url + "/healthz", timeout=WAIT_S).json()
    idle_ready = httpx.get(url + "/readyz", timeout=WAIT_S)
    first, first_answer = in_background(post, url, image(10))
    wait_until(lambda: detector.calls == 1, "the first photo is being decoded")
    refused: list[tuple[threading.Thread, list]] = []

    def one_every_quarter_second() -> None:
      for i in range(4):
        refused.append(in_background(post, url, image(20 + i)))
        time.sleep(0.25)

    arrivals = threading.Thread(target=one_every_quarter_second, daemon=True)
    arrivals.start()
    health, ready = None, None
    deadline = time.monotonic() + WAIT_S
    while health is None or ready is None:
      assert time.monotonic() < deadline, f"never overloaded: /healthz {health}, /readyz {ready}"
      answer = httpx.get(url + "/healthz", timeout=WAIT_S).json()
      health = answer if answer["status"] == "overloaded" else health
      answer = httpx.get(url + "/readyz", timeout=WAIT_S)
      ready = answer if answer.status_code == 503 else ready
    arrivals.join(WAIT_S)
    for thread, _ in refused:
      thread.join(WAIT_S)
    after = httpx.get(url + "/healthz", timeout=WAIT_S).json()
    after_ready = httpx.get(url + "/readyz", timeout=WAIT_S)
    detector.gate.set()
    first.join(WAIT_S)
  assert idle["status"] == "ok" and idle_ready.status_code == 200 and idle_ready.json()["status"] == "ready"
  # Overloaded means the oldest wait passed 0.4 s; /healthz shows it rounded to 1 ms, so 0.4004 reads 0.4.
  assert health["load"]["oldest_wait_s"] >= 0.4 and health["load"]["waiting"] >= 1
  assert ready.headers["Retry-After"] == "1" and ready.json()["error"].startswith("overloaded: work has waited ")
  for _, (busy,) in refused:
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1", busy.text
    assert busy.json() == {"error": "server busy: the work could not start in time, retry after 1 s"}
  assert (after["status"], after["load"]["waiting"], after["load"]["running"], after["load"]["refused"]) == (
    "ok",
    0,
    1,
    4,
  )
  assert after_ready.status_code == 200
  assert first_answer[0].status_code == 200


def test_retry_after_is_the_queue_timeout_rounded_up_to_whole_seconds():
  """--queue_timeout_s=1.2: the work is refused after about 1.2 s with Retry-After 2.

  Kills limits.py:106 `max(1, math.ceil(self.queue_timeout_s))` -> `max(1, math.floor(...))` and
  -> `min(1, math.ceil(...))`.
  """
  hold = threading.Event()

  async def scenario() -> tuple[limits.Overloaded, float, dict]:
    scheduler = limits.Scheduler({"detect": 1}, budget_bytes=100, queue_timeout_s=1.2)
    first = asyncio.ensure_future(scheduler.run("detect", limits.Owner(), 10, hold.wait, WAIT_S))
    await asyncio.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(limits.Overloaded) as refused:
      await scheduler.run("detect", limits.Owner(), 10, int)
    waited = time.monotonic() - start
    hold.set()
    await first
    scheduler.shutdown()
    return refused.value, waited, scheduler.load()

  refused, waited, after = asyncio.run(scenario())
  assert refused.retry_after_s == 2 and str(refused) == "server busy: the work could not start in time, retry after 2 s"
  assert 1.15 <= waited < 3.0, waited
  assert (after["refused"], after["overloaded"], after["waiting"]) == (1, False, 0)


# The export's swap: a rename that fails leaves the previous export as it was.


def files_of(folder: epath.Path) -> dict[str, bytes]:
  """Every file under `folder`: relative path -> bytes."""
  root = pathlib.Path(folder)
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failed_swap_leaves_the_previous_export_byte_equal_and_nothing_beside_it(tmp_path, monkeypatch, failing):
  """The swap's renames (the old export aside, the new one in): either failing leaves OUT byte-equal, and no sibling.

  Kills (with failing=2) storage.staged_folder's `old.rename(out)` -> `pass`, its
  `if old is not None and not out.exists():` -> `... and out.exists():`, its `raise` -> `pass` (the error
  is lost and the export reported done).
  """
  out = epath.Path(tmp_path) / "out"
  (out / "saved_model").mkdir(parents=True)
  (out / export.MANIFEST_FILE).write_text('{"step": 1}\n')
  (out / export.MODEL_FILE).write_bytes(bytes(range(256)))
  (out / "saved_model" / "saved_model.pb").write_bytes(b"old graph")
  before = files_of(out)
  rename, calls = os.rename, []

  def flaky(source, target) -> None:
    calls.append((os.path.basename(source), os.path.basename(target)))
    if len(calls) == failing:
      raise OSError(f"injected failure of rename {failing}")
    rename(source, target)

  monkeypatch.setattr(os, "rename", flaky)
  with pytest.raises(OSError, match=f"injected failure of rename {failing}"):
    with storage.staged_folder(out, last=export.MANIFEST_FILE) as folder:
      epath.Path(folder, export.MANIFEST_FILE).write_text('{"step": 2}\n')
      epath.Path(folder, export.MODEL_FILE).write_bytes(b"new model")
  assert calls[0][0] == "out" and ".old-" in calls[0][1]  # the old export went aside first (or tried to)
  assert files_of(out) == before
  assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
  monkeypatch.undo()
  with storage.staged_folder(out, last=export.MANIFEST_FILE) as folder:  # and the next export replaces it whole
    epath.Path(folder, export.MODEL_FILE).write_bytes(b"new model")
  assert files_of(out) == {export.MODEL_FILE: b"new model"}
  assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_max_files_images_are_answered_and_one_more_is_refused_with_413_in_json_and_multipart():
  """--max_files is the most a request may carry, by either body (mutant killed: serving/uploads.py's, then
  app.py:225, JSON `len(images) > settings.max_files` -> `>=`, which refused exactly max_files)."""
  import base64

  model = HeldModel()
  model.gate.set()
  with live_server(model, max_files=3) as (url, _):
    for count, status in ((3, 200), (4, 413)):
      files = [image(10 + i) for i in range(count)]
      assert post(url, *files, aligned="true").status_code == status, count
      body = {"images": [base64.b64encode(data).decode() for _, data in files], "aligned": True}
      answer = httpx.post(url + "/v1/predict", json=body, timeout=WAIT_S)
      assert answer.status_code == status, (count, answer.text)
      if status == 200:
        assert [r["faces"][0]["argmax_age"] for r in answer.json()["results"]] == [11, 12, 13], answer.json()


def test_a_failed_export_removes_only_the_folders_it_made_even_when_they_vanished_first(tmp_path):
  """A failed export removes the empty folders above OUT that it created and never a folder the user had, here an
  empty one, even when its own folders were already gone (mutant killed: storage.staged_folder's `break` ->
  `continue`, which walked on past a missing folder and removed the user's empty folder above it)."""
  mine = epath.Path(tmp_path) / "mine"  # the user's, empty
  mine.mkdir()
  out = mine / "a" / "b" / "out"
  with pytest.raises(RuntimeError, match="failed export"):
    with storage.staged_folder(out, last=export.MANIFEST_FILE):
      raise RuntimeError("failed export")
  assert mine.is_dir() and list(mine.iterdir()) == []  # a and b, which it made, are gone
  with pytest.raises(RuntimeError, match="failed export"):
    with storage.staged_folder(out, last=export.MANIFEST_FILE):
      shutil.rmtree(mine / "a")  # its folders removed under it (another process, a user)
      raise RuntimeError("failed export")
  assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_request_head_buffered_past_16_kb_is_refused_with_400_and_one_under_it_is_answered():
  """h11 checks an incomplete request head between reads: one with over 16 KB buffered and still incomplete is refused
  before the app sees it, one under it is answered (mutant killed: serving/runner.py
  `h11_max_incomplete_event_size=16 * 1024` -> `16 ** 1024`, no limit on a head that trickles in)."""

  def head_in_two_reads(port: int, pad: int, first: int) -> bytes:
    head = f"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: {'a' * pad}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
      sock.sendall(head[:first])
      time.sleep(0.3)  # the server reads the first part on its own
      sock.sendall(head[first:])
      return sock.recv(64)

  with live_server(HeldModel()) as (url, _):
    port = int(url.rsplit(":", 1)[1])
    assert head_in_two_reads(port, 15_000, 14_000).startswith(b"HTTP/1.1 200 ")
    assert head_in_two_reads(port, 17_000, 16_500).startswith(b"HTTP/1.1 400 ")
    assert httpx.get(url + "/healthz", timeout=WAIT_S).status_code == 200  # and it serves on


def test_the_load_benchmark_times_each_answered_request_from_send_to_answer():
  """`benchmark.py serving`'s latencies: one per answered request, each at least the server's own time for it and
  within the run's wall time (mutant killed: benchmarks/serving.py:124 `perf_counter() - t` -> `perf_counter() **
  t`)."""
  from agejax.benchmarks import serving as serving_benchmark

  model = HeldModel()
  model.gate.set()
  with live_server(model) as (url, _):
    run = serving_benchmark.load(url, [image(3)[1], image(4)[1]], True, concurrency=2, requests=6, max_seconds=60)
    latencies, server_times, errors, wall, _ = asyncio.run(run)
  assert (len(latencies), len(server_times), errors) == (6, 6, 0)
  for client_s, server_s in zip(latencies, server_times):
    assert 0 < server_s <= client_s <= wall, (server_s, client_s, wall)
