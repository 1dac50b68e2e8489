"""Untrusted bytes in worker processes: the red team's inputs against a real server, and the pieces on their own.

Each hostile input (agejax/benchmarks/serving.py makes them; nothing binary is committed) is sent to
scripts/serve.py on loopback with default limits (2 detection workers and 1 crop worker, to spare
this 2-core machine). Memory is the summed PSS of the server and every process under it, sampled
every 0.1 s; the bound over idle, MEMORY_BOUND_MB, is a decode worker's whole allowance (1 GB by
default) and half a GB for the worker started in place of a dead one and the sampler's slack.
Measured on this machine (docs/benchmarks.md): the worst is the CMYK progressive JPEG, ~0.6 GB.
"""

import io
import signal
import time

import httpx
import numpy as np
import pytest
import tiny_run
from PIL import Image
from test_serve import ENV, SERVE, drawn_face, photo_with_a_face

from agejax.benchmarks import serving as hostile
from agejax.data import faces
from agejax.inference import photos
from agejax.serving import local, sandbox

# Real servers with their decode workers, fed the red team's inputs one by one: the full suite only.
pytestmark = pytest.mark.slow

MEMORY_BOUND_MB = 1500
NORMAL_WITHIN_S = 2.0  # a crop or a photo by a started worker: ~0.3 s here
NORMAL_TRIES = 3
STARTED_WITHIN_S = 30.0  # a replacement worker: a second or two here, more on a busy machine
MAX_CPU_S = 20  # the crowd takes 3 to 6 s of CPU on these machines (a slow one refused it at 6 s)


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
  flags = tiny_run.serve_flags(
    request, tmp_path_factory, "--workers=2", "--aligned_workers=1", f"--max_cpu_s={MAX_CPU_S}"
  )
  with local.LocalServer(SERVE, flags, env={**ENV, sandbox.FAULT_ENV: "1"}) as running:
    yield running


def post(url: str, files: list[tuple[str, bytes]], **params: str) -> httpx.Response:
  return httpx.post(url + "/v1/predict", files=[("files", f) for f in files], params=params, timeout=300)


def workers_started(url: str) -> None:
  """Waits until /healthz says every decode worker the lanes keep has started (replacements included)."""
  deadline = time.monotonic() + STARTED_WITHIN_S
  while (decoding := httpx.get(url + "/healthz").json()["decoding"])["workers_starting"]:
    assert time.monotonic() < deadline, f"decode workers still starting after {STARTED_WITHIN_S:g} s: {decoding}"
    time.sleep(0.1)


def normal_requests_answer_quickly(url: str) -> None:
  """Once the workers have started, a face crop and a photo, each answered within NORMAL_WITHIN_S.

  The bound is on the request alone: a worker's start (a second or two, longer on a busy machine) is
  waited for first, and measured in docs/benchmarks.md rather than timed here. Each is sent up to
  NORMAL_TRIES times and the fastest counts: the other test process's server shares these 2 cores (a
  300-request burst beside it once made one 2.2 s), while a worker an attack left stuck or slow
  makes every try slow.
  """
  workers_started(url)
  photo, _ = photo_with_a_face(640, 480, at=(200, 100))
  for files, params, status in (
    ([("ok.png", drawn_face(0))], {"aligned": "true"}, "ok"),
    ([("p.png", photo)], {}, "ok"),
  ):
    took = []
    while len(took) < NORMAL_TRIES and (not took or min(took) >= NORMAL_WITHIN_S):
      start = time.monotonic()
      response = post(url, files, **params)
      took.append(time.monotonic() - start)
      assert response.status_code == 200 and response.json()["results"][0]["status"] == status, response.text
    assert min(took) < NORMAL_WITHIN_S, f"a normal request took {', '.join(f'{t:.1f}' for t in took)} s"


def attacks() -> dict[str, tuple[list[tuple[str, bytes]], int, str]]:
  """name -> (files, the status answered, text its answer holds)."""
  marker = sandbox.FAULT_MARKER
  return {
    "crowd of 900 faces": ([("crowd.jpg", hostile.crowd_jpeg())], 200, "the 64 most confident are answered"),
    "4 MB of iCCP chunks": ([("iccp.png", hostile.iccp_png())], 422, "iccp.png: a PNG of over 256 ancillary chunks"),
    "64 PNGs of 64 zTXt": ([(f"{i}.png", hostile.ztxt_png()) for i in range(64)], 200, "no face found"),
    "1.5 M empty chunks": ([("chunks.png", hostile.empty_chunks_png())], 422, "a PNG of over 256 ancillary"),
    "38-byte lossless WebP": (
      [("tiny.webp", hostile.webp_lossless_claiming())],
      413,
      "over a decode worker's 1024 MB (--worker_memory_mb)",
    ),
    "CMYK progressive JPEG": ([("cmyk.jpg", hostile.jpeg_claiming_as(7800))], 200, "no face found"),
    "scan bomb": ([("scans.jpg", hostile.scan_bomb_jpeg())], 422, "scans.jpg: a progressive JPEG of over 100 scans"),
    "a decoder that segfaults": (
      [("segv.jpg", marker + b"segfault")],
      422,
      "segv.jpg: its decode worker crashed (SIGSEGV)",
    ),
    "a decoder that allocates": ([("hog.jpg", marker + b"allocate")], 413, "hog.jpg: decoding it took over"),
    "a decoder that spins": (
      [("spin.jpg", marker + b"spin")],
      422,
      f"spin.jpg: reading it took over {MAX_CPU_S} s of CPU (--max_cpu_s)",
    ),
  }


def test_every_attack_fails_alone_within_the_memory_bound_and_normal_requests_go_on(server):
  rows = []
  normal_requests_answer_quickly(server.url)
  for name, (files, status, text) in attacks().items():
    with hostile.TreePeak(server.process.pid) as memory:
      start = time.monotonic()
      response = post(server.url, files)
      took = time.monotonic() - start
    assert response.status_code == status and text in response.text, (name, response.text[:300])
    if status != 200:
      answer = response.json()
      assert set(answer) == {"error", "file", "reason"} and "\n" not in answer["error"], answer
    rows.append((name, status, round(took, 2), round(memory.over_idle_mb)))
    assert memory.over_idle_mb < MEMORY_BOUND_MB, rows
    normal_requests_answer_quickly(server.url)
  print("\n".join(map(str, rows)))
  crowd = post(server.url, [("crowd.jpg", hostile.crowd_jpeg())]).json()["results"][0]
  assert len(crowd["faces"]) == 64 and crowd["faces_found"] > 64
  decoding = httpx.get(server.url + "/healthz").json()["decoding"]
  assert decoding["isolation"] == "processes" and decoding["workers_replaced"] >= 3  # segfault, allocate, spin
  assert decoding["workers"] == 3 and decoding["workers_starting"] == 0, decoding


def test_other_formats_are_refused_by_name_unless_allowed(server):
  gif = io.BytesIO()
  Image.new("P", (8, 8)).save(gif, "GIF")
  response = post(server.url, [("a.gif", gif.getvalue())])
  assert response.status_code == 415
  assert response.json() == {
    "error": "a.gif: a GIF image: this server reads JPEG, PNG, WEBP (--formats)",
    "file": "a.gif",
    "reason": "a GIF image: this server reads JPEG, PNG, WEBP (--formats)",
  }


def test_no_worker_outlives_the_server(request, tmp_path_factory):
  flags = tiny_run.serve_flags(request, tmp_path_factory, "--workers=1", "--aligned_workers=1")
  with local.LocalServer(SERVE, flags, env={**ENV, sandbox.FAULT_ENV: "1"}) as running:
    assert post(running.url, [("segv.jpg", sandbox.FAULT_MARKER + b"segfault")]).status_code == 422  # one replaced
    normal_requests_answer_quickly(running.url)
    family = hostile.tree_pids(running.process.pid)
    assert len(family) >= 4  # the server, the fork server, two workers
    assert running.stop() == 0
  deadline = time.monotonic() + 10
  while alive := [pid for pid in family if _running(pid)]:
    assert time.monotonic() < deadline, f"still running after the server stopped: {alive}"
    time.sleep(0.1)


def test_workers_outlive_no_killed_server(request, tmp_path_factory):
  """SIGKILL leaves no lifespan to stop them: the fork server sees its pipe close, the workers their parent go."""
  flags = tiny_run.serve_flags(request, tmp_path_factory, "--workers=1", "--aligned_workers=1")
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    family = hostile.tree_pids(running.process.pid)
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(10)
  deadline = time.monotonic() + 10
  while alive := [pid for pid in family if _running(pid)]:
    assert time.monotonic() < deadline, f"still running after the server was killed: {alive}"
    time.sleep(0.1)


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
  except OSError:
    return False


# The pieces, without a server.


def test_screening_drops_what_decoding_does_not_need_and_keeps_the_pixels():
  """A PNG's text, profile and animation chunks are dropped (Pillow decodes the same pixels, EXIF orientation
  kept); the caps count chunks and scans as the formats define them."""
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (20, 30, 4), np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotated a quarter turn
  buf = io.BytesIO()
  image.save(buf, "PNG", exif=exif)
  plain = buf.getvalue()
  decorated = hostile.png_with_chunks([(b"tEXt", b"k\0v")] * 200 + [(b"iCCP", b"p\0\0" + b"x" * 10)], side=8)
  for data in (plain, decorated):
    screened = faces.screen(data + b"trailing")
    assert isinstance(screened, bytes)
    with Image.open(io.BytesIO(data)) as before, Image.open(io.BytesIO(screened)) as after:
      np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
      assert after.getexif().get(0x0112) == before.getexif().get(0x0112)
      assert "icc_profile" not in after.info and not after.text
  assert len(faces.screen(decorated)) < len(decorated) - 200 * 12
  # An animated PNG reads as its first frame.
  frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 200, 0))]
  buf = io.BytesIO()
  frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
  with Image.open(io.BytesIO(faces.screen(buf.getvalue()))) as first:
    assert first.getpixel((0, 0)) == (200, 0, 0) and getattr(first, "n_frames", 1) == 1
  # Caps: one over each is refused, at the cap passes.
  assert isinstance(faces.screen(hostile.png_with_chunks([(b"abCd", b"")] * 256)), bytes)
  assert isinstance(faces.screen(hostile.png_with_chunks([(b"abCd", b"")] * 257)), str)
  scans = faces.MAX_JPEG_SCANS
  one = hostile.scan_bomb_jpeg(side=64, scans=1)
  total = one.count(b"\xff\xda")  # a flat image's entropy-coded data holds no 0xFF: every FFDA is a scan
  assert isinstance(faces.screen(hostile.scan_bomb_jpeg(side=64, scans=scans - total + 1)), bytes)
  assert faces.screen(hostile.scan_bomb_jpeg(side=64, scans=scans - total + 2)) == (
    f"a progressive JPEG of over {scans} scans"
  )


def test_the_decode_estimate_covers_what_each_format_takes():
  """`Header.decode_bytes` against each format's measured peak (a fresh process each, as the server decodes): never
  under it by more than 10% (the red team's WebP was charged 304 MB and took 1,042; CMYK progressive 4 MB and 492)."""
  for row in hostile.decode_costs(side=2400, min_side=photos.WORK_MIN_SIDE):
    assert row["estimate_mb"] >= 0.9 * row["peak_mb"], row


def test_allowed_formats_read_and_animated_ones_as_their_first_frame():
  task = sandbox.Task(size=32, framing=None, formats=("JPEG", "PNG", "WEBP", "GIF"))
  frames = [Image.new("RGB", (64, 64), c) for c in ((200, 0, 0), (0, 0, 200))]
  for fmt in ("GIF", "WEBP", "PNG"):
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], lossless=True)
    outcome = sandbox.prepare_untrusted(buf.getvalue(), True, 1 << 30, task, None)
    assert isinstance(outcome, sandbox.Prepared), (fmt, outcome)
    np.testing.assert_allclose(outcome.crops[0].reshape(-1, 3).mean(0), (200, 0, 0), atol=2, err_msg=fmt)
  buf = io.BytesIO()
  frames[0].save(buf, "BMP")
  refused = sandbox.prepare_untrusted(buf.getvalue(), True, 1 << 30, task, None)
  assert refused == sandbox.Refusal(415, "a BMP image: this server reads JPEG, PNG, WEBP, GIF (--formats)")


def test_suppression_in_blocks_keeps_the_boxes_mtcnns_own_keeps():
  """`photos.suppress` against mtcnn 1.0's smart_nms_from_bboxes on random boxes with ties and empty boxes, both
  overlap measures, sorted or not; the cap keeps the most confident."""
  from mtcnn.utils.bboxes import smart_nms_from_bboxes

  rng = np.random.default_rng(0)
  for n in (1, 2, 7, 300, 700):
    corner, size = rng.uniform(0, 200, (n, 2)), rng.uniform(5, 60, (n, 2))
    boxes = np.concatenate(
      [np.zeros((n, 1)), corner, corner + size, rng.uniform(size=(n, 1)), rng.normal(size=(n, 10))], 1
    )
    boxes[: n // 5, 5] = 0.5  # ties
    boxes[n // 2, 3] = boxes[n // 2, 1]  # an empty box
    for method in ("union", "min"):
      for initial_sort in (True, False):
        expected = smart_nms_from_bboxes(boxes.copy(), threshold=0.5, method=method, initial_sort=initial_sort)
        got = photos.suppress(boxes.copy(), 0.5, method, initial_sort, max_boxes=10**6)
        np.testing.assert_array_equal(got, expected)
  ordered = boxes[np.argsort(boxes[:, 5])[::-1]]
  np.testing.assert_array_equal(
    photos.suppress(boxes, 0.5, "union", True, max_boxes=50),
    smart_nms_from_bboxes(ordered[:50].copy(), threshold=0.5, method="union", initial_sort=False),
  )


def test_a_replacement_counts_as_starting_until_its_report_comes():
  """A worker worn out after one image is replaced; /healthz's workers_starting counts it until it has started."""
  pool = sandbox.Pool({"crops": sandbox.Lane(1)}, sandbox.Task(size=64, framing=None, limits=sandbox.Limits(images=1)))
  pool.start()
  try:
    assert pool.size == 1 and pool.starting() == 0
    first = [w["pid"] for w in pool.workers_ready()]
    crop = pool.run("crops", drawn_face(0), aligned=True, reserved=64 << 20, take=lambda nbytes: True)
    assert isinstance(crop, sandbox.Prepared) and crop.status == "ok", crop
    assert pool.starting() == 1  # forked a moment ago: it is still setting its limits
    deadline = time.monotonic() + STARTED_WITHIN_S
    while pool.starting():
      assert time.monotonic() < deadline, "the replacement did not start"
      time.sleep(0.01)
    assert pool.replaced == 1 and pool.workers_ready() == []  # its report waits in the pipe for the next image
    again = pool.run("crops", drawn_face(1), aligned=True, reserved=64 << 20, take=lambda nbytes: True)
    assert isinstance(again, sandbox.Prepared) and again.status == "ok"
    assert pool.replaced == 2 and first[0] not in pool.pids()
  finally:
    pool.close()
