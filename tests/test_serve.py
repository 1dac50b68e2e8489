"""scripts/serve.py over real HTTP: answers, bad inputs, dynamic batching under load, metrics, SIGTERM."""

import asyncio
import concurrent.futures
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tiny_run
from conftest import DISTRIBUTION_ATOL, assert_same_distributions
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_predict import FLIP_T, SINGLE_T, calibrated_two_ways, direct_distributions, shown_intervals

from agejax import errors
from agejax.data import demo_faces, faces
from agejax.evaluation import calibration
from agejax.inference import prediction
from agejax.serving import batcher, local

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "scripts" / "serve.py"
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
TIMEOUT = httpx.Timeout(60.0)
MAX_BODY_MB = 2  # small, so the over-limit bodies are quick to send


def png(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
  """Encodes an image."""
  buf = io.BytesIO()
  (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, fmt)
  return buf.getvalue()


def drawn_face(i: int, size: int = 96) -> bytes:
  """A generated face crop (the demo dataset's drawing) as PNG bytes: one per index, ages 5..95."""
  return png(demo_faces.draw_face(5 + (7 * i) % 90, np.random.default_rng(i), size))


def photo_with_a_face(width: int, height: int, at: tuple[int, int]) -> tuple[bytes, tuple[int, int, int, int]]:
  """PNG of scikit-image's public-domain astronaut face pasted on a flat background; returns it and the face's box."""
  from skimage import data

  face = data.astronaut()[20:260, 120:330]
  image = np.full((height, width, 3), (96, 128, 160), np.uint8)
  x, y = at
  image[y : y + face.shape[0], x : x + face.shape[1]] = face
  return png(image), (x, y, face.shape[1], face.shape[0])


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory) -> Path:
  """The session's tiny trained workdir (copied for this module)."""
  return tiny_run.tiny_run(request, tmp_path_factory)[1]


@pytest.fixture(scope="module")
def predictor(workdir) -> prediction.Predictor:
  """The model the server serves, in this process: the reference answers."""
  return prediction.Predictor(workdir)


@pytest.fixture(scope="module")
def server(workdir, compilation_cache):
  """One server for the module, batching up to 32 faces for up to 50 ms."""
  flags = ["--workdir", str(workdir), f"--compilation_cache_dir={compilation_cache}", f"--max_body_mb={MAX_BODY_MB}"]
  with local.LocalServer(SERVE, [*flags, "--max_batch=32", "--max_wait_ms=50"], env=ENV) as running:
    yield running


def expected(predictor: prediction.Predictor, image: bytes) -> np.ndarray:
  """The distribution Predictor gives for an aligned upload (the centre square, as the server crops it)."""
  chip = faces.centre_square(faces.open_rgb(image), predictor.input_size)
  return predictor(chip[None])[0]


def post(url: str, *files: tuple[str, bytes], **params: str) -> httpx.Response:
  return httpx.post(url + "/v1/predict", files=[("files", f) for f in files], params=params, timeout=TIMEOUT)


def assert_serves(url: str) -> None:
  """A good request still gets its face."""
  response = post(url, ("ok.png", drawn_face(0)), aligned="true")
  assert response.status_code == 200, response.text
  assert len(response.json()["results"][0]["faces"]) == 1


@pytest.mark.slow
def test_answers_a_generated_face_with_predictors_numbers(server, predictor):
  images = [drawn_face(1), drawn_face(2, size=120)]
  response = post(server.url, ("a.png", images[0]), ("b.png", images[1]), aligned="true")
  assert response.status_code == 200, response.text
  answer = response.json()
  assert answer["min_age"] == int(predictor.bins[0])
  assert set(answer["timing_ms"]) == {"upload", "decode_detect", "batch", "model", "total"}
  assert [r["file"] for r in answer["results"]] == ["a.png", "b.png"]
  for result, image, side in zip(answer["results"], images, (96, 120)):
    assert result["status"] == "ok"
    (face,) = result["faces"]
    assert set(face) == {"box", "age", "argmax_age", "std", "interval80", "distribution"}
    assert face["box"] == [0, 0, side, side] and all(isinstance(v, int) for v in face["box"])
    probs = expected(predictor, image)
    assert_same_distributions(face["distribution"], probs)
    stats = prediction.summaries(probs[None], predictor.bins, predictor.calibration.shown_masses())
    assert face["age"] == pytest.approx(float(stats["predicted_age"][0]), abs=1e-3)
    assert face["argmax_age"] == float(stats["argmax_age"][0])
    assert face["std"] == pytest.approx(float(stats["std"][0]), abs=1e-3)
    low, high = face["interval80"]
    assert predictor.bins[0] <= low <= face["age"] <= high <= predictor.bins[-1]
    assert [low, high] == [float(v) for v in stats["interval80"][0]]  # adjusted by age bucket: the trainer fitted it


@pytest.mark.slow
def test_finds_the_face_in_a_photo_too_large_to_detect_at_full_size(server):
  # 8000x6000 pixels: detection runs on a copy 1024 pixels long; the box comes back in the photo's pixels.
  image, (x, y, w, h) = photo_with_a_face(8000, 6000, at=(5000, 3000))
  response = post(server.url, ("huge.png", image))
  assert response.status_code == 200, response.text
  (result,) = response.json()["results"]
  assert result["status"] == "ok" and len(result["faces"]) == 1
  bx, by, bw, bh = box = result["faces"][0]["box"]
  assert all(isinstance(v, int) for v in box)  # whole pixels, as for aligned crops
  assert x - 10 <= bx and bx + bw <= x + w + 10 and y - 10 <= by and by + bh <= y + h + 10
  assert bw > 0.3 * w and bh > 0.3 * h


@pytest.mark.slow
def test_every_bad_input_is_answered_and_the_server_keeps_serving(server):
  url = server.url
  jpeg = png(demo_faces.draw_face(40, np.random.default_rng(0), 200), "JPEG")
  cases = {  # name -> (response, expected status, text the error must hold)
    "not an image": (post(url, ("notes.txt", b"just some text\n")), 400, "notes.txt: not an image"),
    "truncated image": (post(url, ("cut.jpg", jpeg[: len(jpeg) // 3])), 400, "cut.jpg: corrupt image"),
    "empty file": (post(url, ("empty.png", b"")), 400, "empty.png: empty file"),
    "no files": (
      httpx.post(url + "/v1/predict", files={"aligned": (None, "true")}, timeout=TIMEOUT),
      400,
      "no complete file",
    ),
    "not a form": (httpx.post(url + "/v1/predict", data={"x": "1"}, timeout=TIMEOUT), 415, "send multipart/form-data"),
    "bad aligned": (post(url, ("a.png", drawn_face(0)), aligned="maybe"), 400, "aligned='maybe'"),
    "over the limit": (post(url, ("big.png", os.urandom(MAX_BODY_MB * 1_000_000 + 1))), 413, "MB limit"),
  }
  # A truncated upload: the multipart body stops inside the file, before its closing boundary.
  whole = httpx.Request("POST", url + "/v1/predict", files={"files": ("face.png", drawn_face(3))})
  body = whole.read()
  cases["truncated upload"] = (
    httpx.post(
      url + "/v1/predict", content=body[: len(body) // 2], headers={"content-type": whole.headers["content-type"]}
    ),
    400,
    "truncated upload",
  )

  # A body without Content-Length (chunked) that passes the limit while streaming.
  def chunks():
    yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
    for _ in range(MAX_BODY_MB + 1):
      yield b"\0" * 1_000_000
    yield b"\r\n--b--\r\n"

  cases["over the limit, chunked"] = (
    httpx.post(
      url + "/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}, timeout=60
    ),
    413,
    "MB limit",
  )
  for name, (response, status, text) in cases.items():
    assert response.status_code == status, (name, response.text)
    assert text in response.json()["error"], (name, response.text)
  assert cases["not an image"][0].json() == {
    "error": "notes.txt: not an image",
    "file": "notes.txt",
    "reason": "not an image",
  }
  blank = post(url, ("blank.png", png(np.full((300, 400, 3), 128, np.uint8))))
  assert blank.status_code == 200
  assert blank.json()["results"] == [{"file": "blank.png", "status": "no face found", "faces": []}]
  assert_serves(url)


@pytest.mark.slow
def test_concurrent_clients_share_batches_and_get_their_own_faces(server, predictor):
  clients, rounds = 32, 4
  images = [drawn_face(i) for i in range(clients)]
  references = [expected(predictor, image) for image in images]
  metrics_before = batch_faces(server.url)

  async def client(c: httpx.AsyncClient, i: int) -> list[httpx.Response]:
    return [
      await c.post("/v1/predict", files={"files": (f"{i}.png", images[i])}, params={"aligned": "true"})
      for _ in range(rounds)
    ]

  async def run() -> list[list[httpx.Response]]:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as c:
      return await asyncio.gather(*(client(c, i) for i in range(clients)))

  answers = asyncio.run(run())
  for i, responses in enumerate(answers):
    for response in responses:
      assert response.status_code == 200, response.text
      (result,) = response.json()["results"]
      assert result["file"] == f"{i}.png"
      assert_same_distributions(result["faces"][0]["distribution"], references[i])
  total, calls = (a - b for a, b in zip(batch_faces(server.url), metrics_before))
  assert total == clients * rounds
  assert total / calls > 1, f"{calls} model calls for {total} faces: no batching"


def batch_faces(url: str) -> tuple[float, float]:
  """(faces, model calls) so far, from /metrics."""
  families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
  samples = {s.name: s.value for s in families["agejax_batch_faces"].samples}
  return samples["agejax_batch_faces_sum"], samples["agejax_batch_faces_count"]


@pytest.mark.slow
def test_healthz_metrics_and_the_page_are_served(server, predictor, workdir):
  health = httpx.get(server.url + "/healthz").json()
  assert health["status"] == "ok" and health["input_size"] == predictor.input_size
  fitted = calibration.load(workdir)  # the trainer's: single views' temperature and interval masses
  assert fitted is not None and fitted.interval_masses is not None
  assert (health["flip"], health["temperature"], health["interval_masses"]) == (
    False,
    fitted.temperature,
    fitted.to_json()["interval_masses"],
  )
  assert health["batch_sizes"] == [1, 2, 4, 8, 16, 32]
  post(server.url, ("notes.txt", b"x"))
  metrics = httpx.get(server.url + "/metrics")
  assert metrics.headers["content-type"].startswith("text/plain")
  families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
  statuses = {s.labels["status"] for s in families["agejax_http_requests"].samples if s.name.endswith("_total")}
  assert "400" in statuses
  assert any(s.name.endswith("_count") for s in families["agejax_http_request_duration_seconds"].samples)
  page = httpx.get(server.url + "/")
  assert page.status_code == 200 and "text/html" in page.headers["content-type"]
  for asset in ("/static/app.js", "/static/style.css"):
    assert asset in page.text
    response = httpx.get(server.url + asset)
    assert response.status_code == 200
    # Everything the page needs comes from this server: no CDN, no absolute URL but the SVG namespace.
    assert "https://" not in response.text and "//cdn" not in response.text
  assert "https://" not in page.text and "http://" not in page.text


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits_0(workdir, compilation_cache):
  slow, _ = photo_with_a_face(8000, 6000, at=(100, 100))  # about a second to decode and detect
  flags = ["--workdir", str(workdir), f"--compilation_cache_dir={compilation_cache}", "--max_batch=2"]
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(response=post(running.url, ("slow.png", slow))))
    thread.start()
    deadline = time.monotonic() + 30
    while in_flight(running.url) < 2:  # the slow request, and this /metrics request itself
      assert time.monotonic() < deadline
      time.sleep(0.02)
    running.process.terminate()  # SIGTERM
    while True:  # the server stops accepting connections soon after, with the slow request still in flight
      try:
        httpx.get(running.url + "/healthz", timeout=5)
      except httpx.ConnectError:
        break
      except (httpx.ReadError, httpx.RemoteProtocolError):
        pass  # accepted just before the listener closed, then dropped unanswered (seen once in ~12 runs)
      assert time.monotonic() < deadline and thread.is_alive(), "still accepting connections"
      time.sleep(0.02)
    thread.join(60)
    assert answer["response"].status_code == 200, answer["response"].text
    assert answer["response"].json()["results"][0]["status"] == "ok"
    assert running.process.wait(60) == 0, running.output()[-3000:]


def test_serves_an_export_with_the_same_numbers(request, tmp_path_factory, predictor, compilation_cache):
  from agejax import serving

  out, _ = tiny_run.tiny_export(request, tmp_path_factory)  # the session's export of this workdir's run
  with pytest.raises(errors.UserError, match="exported without flip averaging; export it with --flip"):
    serving.load_model(None, out, flip=True)
  # --workers=0: crops only, no face detector (it starts without TensorFlow, in half the time).
  flags = ["--export", str(out), f"--compilation_cache_dir={compilation_cache}", "--max_batch=8", "--workers=0"]
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    health = httpx.get(running.url + "/healthz").json()
    assert health["batch_sizes"] == [1, 2, 4, 8]
    assert health["decoding"]["workers"] == 2  # the two --aligned_workers alone
    photo = post(running.url, ("photo.png", drawn_face(4)))
    assert photo.status_code == 400 and "detects no faces" in photo.json()["error"], photo.text
    # The manifest's calibration: what the server computes the intervals with, as from the workdir.
    assert (health["flip"], health["temperature"], health["interval_masses"]) == (
      False,
      predictor.temperature,
      predictor.calibration.to_json()["interval_masses"],
    )
    image = drawn_face(4)
    response = post(running.url, ("a.png", image), aligned="true")
    assert response.status_code == 200, response.text
    (face,) = response.json()["results"][0]["faces"]
    assert_same_distributions(face["distribution"], expected(predictor, image))
    stats = prediction.summaries(expected(predictor, image)[None], predictor.bins, predictor.calibration.shown_masses())
    assert face["interval80"] == [float(v) for v in stats["interval80"][0]]


@pytest.mark.slow
def test_no_calibration_serves_the_raw_model_over_http(workdir, predictor, compilation_cache):
  raw = prediction.Predictor(workdir, calibrated=False)
  assert predictor.temperature != 1.0 == raw.temperature  # the trainer fitted a temperature at the end
  flags = [
    "--workdir",
    str(workdir),
    "--no-calibration",
    f"--compilation_cache_dir={compilation_cache}",
    "--max_batch=4",
  ]
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    image = drawn_face(5)
    response = post(running.url, ("a.png", image), aligned="true")
    assert response.status_code == 200, response.text
    (face,) = response.json()["results"][0]["faces"]
  assert_same_distributions(face["distribution"], expected(raw, image))
  assert np.abs(np.asarray(face["distribution"]) - expected(predictor, image)).max() > 100 * DISTRIBUTION_ATOL


def in_flight(url: str) -> float:
  """The server's count of requests being answered, from /metrics."""
  families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
  return families["agejax_http_requests_in_flight"].samples[0].value


class FakeModel:
  """A model that returns each image's mean pixel as a one-hot distribution, and fails on a white image."""

  input_size, batch_size = 4, 8
  bins = np.arange(1.0, 257.0, dtype=np.float32)
  flip = False
  calibration = calibration.Calibration()  # uncalibrated: temperature 1, central intervals

  def __init__(self):
    self.calls = []

  def predict_padded(self, images: np.ndarray) -> np.ndarray:
    self.calls.append(len(images))
    if (images == 255).all(axis=(1, 2, 3)).any():
      raise RuntimeError("bad batch")
    return np.eye(256, dtype=np.float32)[images.reshape(len(images), -1)[:, 0]]


def test_a_failing_face_fails_only_its_own_future():
  model = FakeModel()
  faces_batcher = batcher.Batcher(model, max_batch=4, max_wait_s=0.2)
  faces_batcher.warm_up()
  assert model.calls == [1, 2, 4]
  faces_batcher.start()
  try:
    first = [faces_batcher.submit(np.full((4, 4, 3), v, np.uint8)) for v in (10, 255, 30)]  # one batch of 3
    concurrent.futures.wait(first, timeout=10)
    second = [faces_batcher.submit(np.full((4, 4, 3), v, np.uint8)) for v in (40, 50)]  # the next
    assert first[0].result(10).argmax_age == 11.0 and first[2].result(10).argmax_age == 31.0
    with pytest.raises(RuntimeError, match="bad batch"):
      first[1].result(10)
    assert [f.result(10).argmax_age for f in second] == [41.0, 51.0]
    assert [f.result().batch_faces for f in second] == [2, 2]
    assert model.calls[3:] == [4, 1, 1, 1, 2]  # 3 faces padded to 4 fail, are retried alone; then 2
  finally:
    faces_batcher.close()


@pytest.mark.slow
def test_serve_without_a_model_fails_in_one_line():
  proc = subprocess.run([sys.executable, str(SERVE)], env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: give exactly one of --workdir DIR (a training workdir) or --export OUT (export.py's)"
  )


def test_padded_sizes_are_powers_of_two_up_to_the_maximum_on_every_device():
  assert batcher.padded_sizes(32, 1) == [1, 2, 4, 8, 16, 32]
  assert batcher.padded_sizes(1, 1) == [1]
  assert batcher.padded_sizes(24, 1) == [1, 2, 4, 8, 16, 24]
  assert batcher.padded_sizes(10, 4) == [4, 8, 12]


@pytest.mark.slow
def test_the_served_workdir_model_is_calibrated_unless_no_calibration(workdir, tmp_path):
  from agejax import serving

  fitted = calibration.load(workdir)  # the trainer fitted one at the end of the run
  assert fitted is not None and serving.load_model(workdir, None).temperature == fitted.temperature
  assert serving.load_model(workdir, None, calibrated=False).temperature == 1.0
  with pytest.raises(errors.UserError, match="--no-calibration applies to --workdir"):
    serving.load_model(None, tmp_path, calibrated=False)


@pytest.mark.slow
def test_http_details_are_answered_in_one_json_line(server):
  url, face = server.url, drawn_face(6)
  put = httpx.put(url + "/v1/predict")
  assert put.status_code == 405 and put.headers["Allow"] == "POST" and "error" in put.json()
  # No redirect built from the Host header a client sends.
  static = httpx.get(url + "/static", headers={"Host": "evil.example"})
  assert static.status_code == 307 and static.headers["Location"] == "/"
  assert "evil.example" not in str(static.headers) + static.text
  # A file part named only by RFC 5987's filename*.
  body = (
    b"--b\r\nContent-Disposition: form-data; name=files; filename*=UTF-8''%C3%A9t%C3%A9.png\r\n\r\n"
    + face
    + b"\r\n--b--\r\n"
  )
  star = httpx.post(
    url + "/v1/predict?aligned=true", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
  )
  assert star.status_code == 200, star.text
  assert star.json()["results"][0]["file"] == "été.png" and len(star.json()["results"][0]["faces"]) == 1
  cases = {  # (response, status, the one-line error)
    "aligned as a file": (
      httpx.post(url + "/v1/predict", files=[("files", ("a.png", face)), ("aligned", ("x.txt", b"true"))]),
      400,
      'the form field "aligned" must be text (true or false), not a file',
    ),
    "aligned twice": (
      post(url, ("a.png", face), aligned=["true", "false"]),  # type: ignore[arg-type]
      400,
      "aligned given 2 times with different values ['true', 'false']: send it once",
    ),
    "another field": (
      httpx.post(url + "/v1/predict", files=[("images", ("a.png", face))]),
      400,
      """unexpected form field 'images' (part 0): send images in the field "files" (and "aligned", "under")""",
    ),
  }
  for name, (response, status, message) in cases.items():
    assert response.status_code == status and response.json() == {"error": message}, (name, response.text)
  long = post(url, ("x" * 8000 + ".png", face), aligned="true")
  assert long.status_code == 200, long.text
  (result,) = long.json()["results"]
  assert result["file"] == "x" * 254 + "…" and len(result["faces"]) == 1


@pytest.mark.slow
def test_the_json_api_answers_like_multipart(server):
  import base64

  from test_hostile import jpeg_claiming

  image, _ = photo_with_a_face(640, 480, at=(200, 100))
  crop = drawn_face(7)
  for aligned, data in ((False, image), (True, crop)):
    form = post(server.url, ("images[0]", data), aligned=str(aligned).lower()).json()
    sent = {"images": [base64.b64encode(data).decode()], "aligned": aligned}
    answer = httpx.post(server.url + "/v1/predict", json=sent, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"] == form["results"] and answer.json()["min_age"] == form["min_age"]
  named = {"images": ["data:image/png;base64," + base64.b64encode(crop).decode()], "aligned": True, "names": ["c.png"]}
  assert httpx.post(server.url + "/v1/predict", json=named).json()["results"][0]["file"] == "c.png"
  bad = {
    "not base64": ({"images": ["not base64!"]}, 400, "images[0] is not valid base64"),
    "not a list": ({"images": "x"}, 400, '"images": a list of base64 strings'),
    "a bomb": ({"images": [base64.b64encode(jpeg_claiming(13000)).decode()]}, 413, "--max_pixels"),
    "too many": ({"images": ["AAAA"] * 65}, 413, "at most 64"),
    "over the body limit": ({"images": ["A" * (MAX_BODY_MB * 1_000_000)]}, 413, "MB limit"),
  }
  for name, (doc, status, text) in bad.items():
    response = httpx.post(server.url + "/v1/predict", json=doc, timeout=TIMEOUT)
    assert response.status_code == status and text in response.json()["error"], (name, response.text)


@pytest.mark.slow
def test_serve_on_a_port_in_use_fails_in_one_line_before_loading(workdir):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    start = time.monotonic()
    proc = subprocess.run(
      [sys.executable, str(SERVE), "--workdir", str(workdir), "--port", str(port)],
      env=ENV,
      capture_output=True,
      text=True,
      timeout=120,
    )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
    f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    " (another server on that port? choose one with --port)"
  ]
  assert time.monotonic() - start < 30  # no model was loaded


@pytest.mark.slow
def test_sigterm_while_loading_the_model_exits_0(workdir):
  port = local.free_port()
  proc = subprocess.Popen(
    [sys.executable, str(SERVE), "--workdir", str(workdir), "--port", str(port), "--compilation_cache_dir="],
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.monotonic() + 60
  while True:  # serve.py binds its port first thing in main(), with its signal handlers
    with socket.socket() as probe:
      try:
        probe.bind(("127.0.0.1", port))
      except OSError:
        break
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)
  time.sleep(0.5)  # into the model's restoring
  proc.terminate()
  output, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, output[-3000:]
  assert "stopped by signal" in output


@pytest.mark.slow
def test_sigterm_answers_every_request_sent_before_it_and_503s_what_runs_past_the_grace(workdir, compilation_cache):
  from test_hostile import grey_png

  flags = [
    "--workdir",
    str(workdir),
    f"--compilation_cache_dir={compilation_cache}",
    "--workers=1",
    "--graceful_timeout_s=3",
  ]
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    slow: dict = {}
    # 32 photos on one detection thread: far longer than the 3 s of grace.
    photos = [(f"{i}.png", grey_png(2000)) for i in range(32)]
    long = threading.Thread(target=lambda: slow.update(response=post(running.url, *photos)))
    long.start()
    deadline = time.monotonic() + 30
    while in_flight(running.url) < 2:
      assert time.monotonic() < deadline
      time.sleep(0.02)

    async def burst() -> list:
      async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as c:
        requests = [
          asyncio.ensure_future(c.post("/v1/predict?aligned=true", files={"files": (f"{i}.png", drawn_face(i))}))
          for i in range(24)
        ]
        await asyncio.sleep(0.05)  # sent: now the signal
        running.process.terminate()
        return await asyncio.gather(*requests, return_exceptions=True)

    answers = asyncio.run(burst())
    long.join(60)
    code = running.process.wait(60)
  failed = [a for a in answers if not isinstance(a, httpx.Response) or a.status_code != 200]
  assert not failed, failed
  assert slow["response"].status_code == 503, slow["response"].text
  assert "shutting down" in slow["response"].json()["error"]
  assert code == 0


@pytest.mark.slow
def test_flip_serves_the_flip_calibration_and_healthz_says_so(workdir, compilation_cache, tmp_path):
  """serve.py --flip: flip averages tempered by calibration.json's flip temperature, intervals by its masses;
  without it the single-view way's; an old calibration.json fitted without flip refuses --flip in one line."""
  from agejax import serving

  run, ways = calibrated_two_ways(workdir, tmp_path / "run")
  for flip, t in ((False, SINGLE_T), (True, FLIP_T)):
    model = serving.load_model(run, None, flip=flip)
    assert (model.flip, model.temperature, model.calibration.to_json()) == (flip, t, ways[flip].to_json())
  images = [drawn_face(6), drawn_face(7)]
  flags = ["--workdir", str(run), "--flip", f"--compilation_cache_dir={compilation_cache}", "--max_batch=2"]
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    health = httpx.get(running.url + "/healthz").json()
    response = post(running.url, *[(f"{i}.png", image) for i, image in enumerate(images)], aligned="true")
  assert (health["flip"], health["temperature"]) == (True, FLIP_T)
  assert health["interval_masses"] == ways[True].to_json()["interval_masses"]
  assert response.status_code == 200, response.text
  answered = [result["faces"][0] for result in response.json()["results"]]
  size = health["input_size"]
  crops = np.stack([faces.centre_square(faces.open_rgb(image), size) for image in images])
  direct = direct_distributions(run, crops, FLIP_T, True)
  assert_same_distributions([face["distribution"] for face in answered], direct)
  bins = np.arange(1, len(direct[0]) + 1, dtype=np.float32)
  np.testing.assert_array_equal([face["interval80"] for face in answered], shown_intervals(direct, bins, ways[True]))

  calibration.write(run, {"split": "validation", "temperature": 1.5, "flip": False})  # from before one per way
  assert serving.load_model(run, None).temperature == 1.5
  with pytest.raises(errors.UserError) as error:
    serving.load_model(run, None, flip=True)
  assert "was fitted without flip averaging" in str(error.value) and "\n" not in str(error.value)
