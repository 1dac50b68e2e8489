"""The server against hostile and careless clients: decompression bombs, hang-ups, queues, slow clients.

Memory is the server process's own, read from /proc (peak RSS reset before each bomb). The bombs
are the issue's at a size CI affords (4000² instead of 13000²); the full-size run is recorded in
docs/benchmarks.md.
"""

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import tiny_run
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_serve import ENV, SERVE, FakeModel, drawn_face, png

from agejax.benchmarks.serving import TreePeak, float_tiff, grey_png, jpeg_claiming, pss_mb, tree_pids
from agejax.inference import photos
from agejax.serving import app as serving_app
from agejax.serving import limits, local

SIDE = 4000  # the bombs' side: 16 MP, 64 MB as float32
MAX_PIXELS = 20_000_000


def counter(url: str, name: str, **labels: str) -> float:
  """A counter's value from /metrics."""
  for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
    for sample in family.samples:
      if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
        return sample.value
  return 0.0


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
  """A server with two detection threads and small limits, so that queues and timeouts show quickly."""
  flags = tiny_run.serve_flags(
    request,
    tmp_path_factory,
    f"--max_pixels={MAX_PIXELS}",
    "--workers=2",
    "--aligned_workers=1",
    "--decode_budget_mb=300",
    "--head_timeout_s=1",
    "--body_timeout_s=2",
    "--max_batch=4",
    "--formats=jpeg,png,webp,tiff",  # the float TIFF bomb: TIFF is read only when asked for
  )
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    yield running


def post(url: str, files: list[tuple[str, bytes]], timeout: float = 120, **params: str) -> httpx.Response:
  return httpx.post(url + "/v1/predict", files=[("files", f) for f in files], params=params, timeout=timeout)


def assert_quick_answer(url: str, within_s: float = 3.0) -> None:
  start = time.monotonic()
  response = post(url, [("ok.png", drawn_face(0))], aligned="true")
  assert response.status_code == 200, response.text
  assert time.monotonic() - start < within_s


@pytest.mark.slow
def test_bombs_keep_memory_bounded_and_it_returns(server):
  pid = server.process.pid
  bombs = {
    "grey PNG": [grey_png(SIDE)],
    "float32 TIFF": [float_tiff(SIDE)],
    "4 grey PNGs": [grey_png(SIDE)] * 4,
    "4 JPEGs claiming 4000²": [jpeg_claiming(SIDE)] * 4,
  }
  # The images are decoded in the server's worker processes: memory is the PSS of the server and all under it.
  idle = pss_mb(tree_pids(pid))
  for name, files in bombs.items():
    with TreePeak(pid) as memory:
      response = post(server.url, [(f"{i}.img", f) for i, f in enumerate(files)])
    assert response.status_code == 200, (name, response.text)
    assert all(r["status"] == "no face found" for r in response.json()["results"]), name
    # Before: 34 bytes a pixel for the TIFF (544 MB), 4 full-size grey-to-RGB copies at once for the PNGs.
    assert memory.over_idle_mb < 250, f"{name}: peak PSS {memory.peak_mb:.0f} MB, idle {memory.idle_mb:.0f} MB"
    assert_quick_answer(server.url)
  assert pss_mb(tree_pids(pid)) - idle < 100, "memory did not come back after the burst"


@pytest.mark.slow
def test_images_over_max_pixels_are_refused_from_their_header(server):
  start = time.monotonic()
  response = post(server.url, [("bomb.jpg", jpeg_claiming(13000))] * 64)
  assert time.monotonic() - start < 5
  assert response.status_code == 413
  assert response.json() == {
    "error": "bomb.jpg: image too large: 13000x13000 pixels is over the limit of 20 megapixels (--max_pixels)",
    "file": "bomb.jpg",
    "reason": "image too large: 13000x13000 pixels is over the limit of 20 megapixels",
  }
  beyond_pil = post(server.url, [("huge.jpg", jpeg_claiming(20000))])  # 400 MP: PIL refuses to open it
  assert beyond_pil.status_code == 413 and beyond_pil.json()["error"] == "huge.jpg: image too large"


@pytest.mark.slow
def test_a_client_that_hangs_up_cancels_its_queued_work_and_crops_do_not_wait(server):
  url = server.url
  decoded_before = counter(url, "agejax_images_decoded_total", lane="detect")
  cancelled_before = counter(url, "agejax_requests_cancelled_total")
  with pytest.raises(httpx.TimeoutException):  # hangs up 1 s after sending 16 photos of ~1 s each
    post(url, [(f"{i}.png", grey_png(SIDE)) for i in range(16)], timeout=1.0)
  assert_quick_answer(url)  # the aligned lane: not behind the photos
  deadline = time.monotonic() + 10
  while counter(url, "agejax_requests_cancelled_total") == cancelled_before:
    assert time.monotonic() < deadline, "the hung-up request was not cancelled"
    time.sleep(0.1)
  time.sleep(3)  # the one decode that was running finishes; no other starts
  decoded = counter(url, "agejax_images_decoded_total", lane="detect") - decoded_before
  assert decoded <= 4, f"{decoded} of 16 images decoded after the client left"


@pytest.mark.slow
def test_a_photo_waits_for_one_turn_behind_a_request_of_many(server):
  url = server.url
  many = [(f"{i}.png", grey_png(2000)) for i in range(10)]
  hostile = threading.Thread(target=lambda: post(url, many))
  hostile.start()
  try:
    deadline = time.monotonic() + 10
    while httpx.get(url + "/healthz").json()["status"] != "overloaded":  # its images wait over a second
      assert time.monotonic() < deadline, "/healthz never said overloaded"
      time.sleep(0.1)
    ready = httpx.get(url + "/readyz")
    assert ready.status_code == 503 and "Retry-After" in ready.headers
    photo, _ = photo_with_face()
    start = time.monotonic()
    response = post(url, [("photo.png", photo)])
    waited = time.monotonic() - start
    assert response.status_code == 200 and response.json()["results"][0]["status"] == "ok"
    assert waited < 6, f"a photo behind a 10-photo request took {waited:.1f} s"
  finally:
    hostile.join()
  assert httpx.get(url + "/readyz").status_code == 200


def photo_with_face() -> tuple[bytes, tuple[int, int, int, int]]:
  from test_serve import photo_with_a_face

  return photo_with_a_face(640, 480, at=(200, 100))


@pytest.mark.slow
def test_slow_clients_are_cut_off(server):
  host, port = "127.0.0.1", server.port
  # A head trickled a byte at a time: closed after --head_timeout_s (1 s).
  with socket.create_connection((host, port)) as s:
    start = time.monotonic()
    s.settimeout(10)
    closed = False
    for byte in b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
      try:
        s.sendall(bytes([byte]))
        time.sleep(0.2)
        s.setblocking(False)
        try:
          closed = s.recv(1024) == b""
        except BlockingIOError:
          pass
        s.setblocking(True)
      except (BrokenPipeError, ConnectionResetError):
        closed = True
      if closed:
        break
    assert closed and time.monotonic() - start < 5
  # A body 1,000 bytes shorter than its Content-Length: 408 after --body_timeout_s (2 s).
  body = b"--b\r\nContent-Disposition: form-data; name=files; filename=a.png\r\n\r\n" + drawn_face(0)
  with socket.create_connection((host, port)) as s:
    s.settimeout(20)
    start = time.monotonic()
    head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    s.sendall(f"{head}Content-Length: {len(body) + 1000}\r\n\r\n".encode() + body)
    answer = b""
    while chunk := s.recv(65536):  # the server closes the connection after its answer
      answer += chunk
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "--body_timeout_s" in answer and 1.5 < time.monotonic() - start < 10


# In-process: the scheduler's turns and timeouts, and the app's 503, with a detector that blocks.


class BlockingDetector:
  """A face detector that finds nothing, after waiting for `release`."""

  def __init__(self):
    self.release, self.calls = threading.Event(), 0

  def __call__(self, photo: Image.Image) -> list[photos.Detection]:
    self.calls += 1
    self.release.wait(30)
    return []


@pytest.mark.slow
def test_work_that_cannot_start_in_time_gets_503_with_retry_after():
  from starlette.testclient import TestClient

  detector = BlockingDetector()
  settings = serving_app.Settings(max_batch=4, workers=1, queue_timeout_s=0.5, isolation="threads")  # its detector
  model = FakeModel()
  model.input_spec = None  # type: ignore[attr-defined]  # what /healthz reports of it
  app = serving_app.create_app(model, detector, settings, min_age=1)
  with TestClient(app) as client:
    image = png(np.full((8, 8, 3), 7, np.uint8))
    answers = []
    # Two photos: the second waits behind the first (blocked), its own request's work: no 503 for it.
    both = [("files", ("a1.png", image)), ("files", ("a2.png", image))]
    first = threading.Thread(target=lambda: answers.append(client.post("/v1/predict", files=both)))
    first.start()
    while detector.calls == 0:
      time.sleep(0.01)
    start = time.monotonic()
    busy = client.post("/v1/predict", files={"files": ("b.png", image)})
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"].startswith("server busy") and 0.4 < time.monotonic() - start < 3
    assert client.get("/healthz").json()["load"]["refused"] == 1
    aligned = client.post("/v1/predict", files={"files": ("c.png", image)}, params={"aligned": "true"})
    assert aligned.status_code == 200  # its own lane
    time.sleep(0.5)  # the first request's second photo has now waited past the timeout too
    detector.release.set()
    first.join()
    assert answers[0].status_code == 200, answers[0].text
    assert [r["status"] for r in answers[0].json()["results"]] == ["no face found"] * 2


def test_the_scheduler_serves_owners_in_turn_within_its_byte_budget():
  started: list[str] = []

  async def scenario() -> None:
    scheduler = limits.Scheduler({"detect": 1}, budget_bytes=100, queue_timeout_s=30)
    gate = threading.Event()

    def job(name: str) -> None:
      started.append(name)
      gate.wait(10)

    greedy, polite = limits.Owner(), limits.Owner()
    tasks = [asyncio.ensure_future(scheduler.run("detect", greedy, 10, job, f"greedy{i}")) for i in range(4)]
    await asyncio.sleep(0.05)
    tasks.append(asyncio.ensure_future(scheduler.run("detect", polite, 10, job, "polite")))
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(*tasks)
    assert scheduler.in_flight_bytes == 0 and scheduler.load()["running"] == 0
    # A job larger than what is left waits; one larger than the whole budget runs alone.
    assert scheduler.try_take(95)
    big = asyncio.ensure_future(scheduler.run("detect", greedy, 500, lambda: started.append("big")))
    await asyncio.sleep(0.05)
    assert "big" not in started
    scheduler.give(95)
    await big

  asyncio.run(scenario())
  assert started == ["greedy0", "polite", "greedy1", "greedy2", "greedy3", "big"]


@pytest.mark.slow
def test_decoding_reduces_large_images_once_and_maps_boxes_back():
  from agejax.data import faces

  header = faces.read_header(grey_png(SIDE))
  assert header == faces.Header(SIDE, SIDE, "L", "PNG")
  decoded = faces.open_reduced(grey_png(SIDE), min_side=1000)
  assert decoded.image.size == (1000, 1000) and decoded.full_size == (SIDE, SIDE)
  jpeg = faces.open_reduced(jpeg_claiming(13000), min_side=1536)
  assert jpeg.image.size == (1625, 1625) and jpeg.full_size == (13000, 13000)  # DCT scaling by 8: 5 MB, not 507
  assert faces.open_rgb(jpeg_claiming(13000), max_pixels=MAX_PIXELS).startswith("image too large: 13000x13000")
  # Float images are stretched on the reduced copy: the top half 1.0 is white, the bottom 0.0 black.
  tiff = np.asarray(faces.open_rgb(float_tiff(SIDE), min_side=500))
  assert tiff.shape == (500, 500, 3) and (tiff[:250] == 255).all() and (tiff[250:] == 0).all()


@pytest.mark.slow
def test_the_bombs_benchmark_reports_each_bomb_and_the_normal_request_after_it(
  request, tmp_path_factory, compilation_cache
):
  """`benchmark.py serving`'s bomb rows (docs/benchmarks.md), at a small side: one row a bomb, each answered, and
  the normal request after it answered (mutant killed: benchmarks/serving.py:365 the loop over the bombs emptied,
  which reported none)."""
  from agejax.benchmarks import serving as serving_benchmark

  _, workdir = tiny_run.tiny_run(request, tmp_path_factory)
  flags = ["--workdir", str(workdir), "--workers=2", f"--compilation_cache_dir={compilation_cache}"]
  rows = serving_benchmark.bombs(SERVE, flags, side=600, red_team=False)  # issue 35's: tests/test_sandbox.py
  assert [r["bomb"] for r in rows] == ["grey PNG", "float32 TIFF", "64 grey PNGs", "64 JPEG headers"]
  for row in rows:  # TIFF is read only when --formats asks for it
    assert (row["status"], row["normal_status"]) == (415 if "TIFF" in row["bomb"] else 200, 200), row
    assert row["bytes_sent"] > 0 and row["idle_mb"] > 0 and row["peak_over_idle_mb"] >= 0, row
