"""The server's own limits against hostile clients: bodies parsed off the loop, held bytes, connections, heads,
every error a JSON line, the page's security headers, and SIGTERM under load and during start-up.

Most tests run the real app on a real uvicorn in a thread (test_serve's FakeModel: seconds); the
shutdown and start-up tests run scripts/serve.py on the session's tiny trained model.
"""

import asyncio
import base64
import contextlib
import dataclasses
import json
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from test_serve import ENV, SERVE, FakeModel, png

from agejax.serving import app as serving_app
from agejax.serving import guard, local, runner, uploads

WAIT_S = 10.0
MULTIPART = "multipart/form-data; boundary="
CHROME_LIKE_CSP_PARTS = ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'")


class Model(FakeModel):
  """test_serve's FakeModel (one-hot at each crop's first pixel), with what /healthz reports of a model."""

  input_spec = None


def crop(value: int) -> bytes:
  """A flat 8x8 PNG: as an aligned crop, FakeModel's argmax age is value + 1."""
  return png(np.full((8, 8, 3), value, np.uint8))


@contextlib.contextmanager
def live_server(max_connections: int = runner.MAX_CONNECTIONS, **settings: Any) -> Iterator[tuple[str, Any]]:
  """(URL, the ASGI app) of create_app on uvicorn as serve.py configures it, on a free loopback port."""
  if "isolation" in {f.name for f in dataclasses.fields(serving_app.Settings)}:
    settings.setdefault("isolation", "threads")  # these tests are about HTTP, not the decode workers
  app = serving_app.create_app(Model(), None, serving_app.Settings(max_batch=4, **settings), min_age=1)
  with local.in_thread(app, WAIT_S, head_timeout_s=5.0, log_level="warning", max_connections=max_connections) as url:
    yield url, app


def port_of(url: str) -> int:
  return int(url.rsplit(":", 1)[1])


def exchange(url: str, raw: bytes, *, read_s: float = WAIT_S) -> bytes:
  """Sends `raw` on a new connection and returns everything the server answers until it closes (uvicorn reads a
  half-close as a hang-up: the request is sent with Connection: close instead)."""
  with socket.create_connection(("127.0.0.1", port_of(url)), timeout=read_s) as s:
    with contextlib.suppress(OSError):  # the server may answer and close before it has read everything
      s.sendall(raw)
    answer = b""
    with contextlib.suppress(OSError):
      while chunk := s.recv(65536):
        answer += chunk
  return answer


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
  """(status, headers with lower-case names, body) of one HTTP/1.1 answer."""
  head, _, body = raw.partition(b"\r\n\r\n")
  status_line, *lines = head.decode("latin-1").split("\r\n")
  headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
  return int(status_line.split()[1]), headers, body[: int(headers.get("content-length", len(body)))]


def request(method: str, path: str, body: bytes = b"", content_type: str | None = None, **headers: str) -> bytes:
  """A raw HTTP/1.1 request with a correct Content-Length (others passed as keyword headers, _ for -)."""
  lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close", f"Content-Length: {len(body)}"]
  if content_type is not None:
    lines.append(f"Content-Type: {content_type}")
  lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
  return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary", close: bool = True) -> bytes:
  """A multipart/form-data body of (field, filename or None, data) parts."""
  out = b""
  for field, filename, data in parts:
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
    out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
  return out + (f"--{boundary}--\r\n".encode() if close else b"")


# The parsers, without a server.


def nesting(value: Any) -> int:
  """The reference depth of a parsed JSON value (containers only)."""
  if isinstance(value, dict):
    return 1 + max(map(nesting, value.values()), default=0)
  if isinstance(value, list):
    return 1 + max(map(nesting, value), default=0)
  return 0


def random_json(rng: random.Random, depth: int) -> Any:
  """A random value nested `depth` deep, its strings full of JSON's structural characters and escapes."""
  text = lambda: "".join(rng.choice('ab[]{},:"\\/\u00e9 ') for _ in range(rng.randrange(8)))  # noqa: E731
  if depth == 0:
    return rng.choice([text(), 1.5, None, True])
  inner = [random_json(rng, depth - 1)] + [random_json(rng, rng.randrange(depth)) for _ in range(rng.randrange(3))]
  rng.shuffle(inner)
  return inner if rng.random() < 0.5 else {text(): v for v in inner}


def test_the_json_screen_refuses_exactly_what_nests_deeper_than_its_limit_whatever_the_strings_hold():
  rng = random.Random(0)
  for trial in range(300):
    value = random_json(rng, rng.randrange(1, 2 * uploads.MAX_JSON_DEPTH))
    body = json.dumps(value, ensure_ascii=trial % 2 == 0).encode()
    try:
      uploads.screen_json(body, max_values=10**6)
      refused = False
    except uploads.Refused as e:
      assert e.response.status_code == 400 and b"nests deeper" in e.response.body
      refused = True
    assert refused == (nesting(value) > uploads.MAX_JSON_DEPTH), (trial, body[:200])


def structural(value: Any) -> int:
  """The reference count of a JSON text's structural characters outside strings, plus one per string."""
  if isinstance(value, dict):
    return 2 + max(len(value) - 1, 0) + sum(2 + structural(v) for v in value.values())  # key and colon each
  if isinstance(value, list):
    return 2 + max(len(value) - 1, 0) + sum(map(structural, value))
  return int(isinstance(value, str))  # numbers, true, null: none


def test_the_json_screen_counts_values_as_the_parsed_document_holds_them():
  rng = random.Random(1)
  docs = [{"images": ["QUJD"] * n, "names": [f'a"[{i}],b' for i in range(n)], "aligned": True} for n in (0, 1, 40)]
  docs += [random_json(rng, rng.randrange(1, uploads.MAX_JSON_DEPTH)) for _ in range(100)]
  for doc in docs:
    body, count = json.dumps(doc).encode(), structural(doc)
    uploads.screen_json(body, max_values=count)
    with pytest.raises(uploads.Refused, match="413"):
      uploads.screen_json(body, max_values=count - 1)


@pytest.mark.parametrize(
  "body, status, text",
  [
    (b"[" * 100_000 + b"]" * 100_000, 400, "nests deeper than 8 levels"),
    (b'{"images": [' + b"{}," * 6_000_000 + b"{}]}", 413, "holds over"),
    (b'{"images": ["' + b'\\"' * 70_000 + b'"]}', 400, "escapes"),
    ('{"images": ["QUJD"]}'.encode("utf-16"), 400, "not UTF-8"),
    (b'{"images": [' + b"1" * 5000 + b"]}", 400, "not JSON"),
    (b'{"images": ["QUJD", "QUJD"], "names": ["ok", "\\ud800"]}', 400, "names[1] is not valid Unicode"),
  ],
  ids=["deep", "millions-of-objects", "escapes", "utf-16", "huge-int", "surrogate-name"],
)
def test_hostile_json_is_refused_in_one_line_without_building_it(body, status, text):
  tracemalloc.start()
  start = time.perf_counter()
  try:
    with pytest.raises(uploads.Refused) as refused:
      uploads._parse_json([body], max_files=64)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  answer = json.loads(refused.value.response.body)
  assert refused.value.response.status_code == status and text in answer["error"], answer
  assert "\n" not in answer["error"]
  assert peak < 3 * len(body) + (1 << 20), f"{peak / 1e6:.0f} MB to refuse {len(body) / 1e6:.0f} MB"
  assert seconds < 2.0, seconds


def test_a_name_with_a_lone_surrogate_is_refused_naming_its_field():
  body = json.dumps({"images": [base64.b64encode(crop(3)).decode()] * 2, "names": ["a.png", "\ud800.png"]})
  with pytest.raises(uploads.Refused) as refused:
    uploads._parse_json([body.encode()], max_files=64)
  assert json.loads(refused.value.response.body)["field"] == "names[1]"
  # RFC 2231 lets a multipart filename name its codec: unicode_escape makes a lone surrogate of "\ud800".
  disposition = b"Content-Disposition: form-data; name=\"files\"; filename*=unicode_escape''%5Cud800.png"
  part = b"--b\r\n" + disposition + b"\r\n\r\nx\r\n--b--\r\n"
  with pytest.raises(uploads.Refused) as refused:
    uploads._parse_multipart("b", [part], max_files=64)
  assert json.loads(refused.value.response.body)["field"] == "files[0]'s filename"


# The real app on uvicorn.


def test_every_malformed_request_is_answered_with_one_json_line_and_the_server_keeps_serving(monkeypatch):
  ok = multipart([("files", "a.png", crop(3))])
  good_json = json.dumps({"images": [base64.b64encode(crop(3)).decode()]}).encode()
  corpus = {
    "not JSON": (request("POST", "/v1/predict", b"{nope", "application/json"), 400),
    "deep JSON": (request("POST", "/v1/predict", b"[" * 100_000 + b"]" * 100_000, "application/json"), 400),
    "empty objects": (request("POST", "/v1/predict", b"[" + b"{}," * 300_000 + b"{}]", "application/json"), 413),
    "surrogate name": (
      request("POST", "/v1/predict", good_json[:-1] + b', "names": ["\\udfff"]}', "application/json"),
      400,
    ),
    "JSON not an object": (request("POST", "/v1/predict", b"[1, 2]", "application/json"), 400),
    "no boundary": (request("POST", "/v1/predict", ok, "multipart/form-data"), 400),
    "300-character boundary": (
      request(
        "POST",
        "/v1/predict",
        multipart([("files", "a.png", crop(3))], "x" * 300),
        MULTIPART + "x" * 300,
      ),
      400,
    ),
    "wrong boundary": (request("POST", "/v1/predict", ok, MULTIPART + "other"), 400),
    "truncated multipart": (request("POST", "/v1/predict", ok[:-30], MULTIPART + "b0undary"), 400),
    "garbage multipart": (
      request("POST", "/v1/predict", b"\x00" * 1000, MULTIPART + "b0undary"),
      400,
    ),
    "text/plain": (request("POST", "/v1/predict", b"hello", "text/plain"), 415),
    "no content type": (request("POST", "/v1/predict", b"hello"), 415),
    "body over max_body": (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n", 413),
    "unknown method": (request("BREW", "/v1/predict"), 405),
    "GET predict": (request("GET", "/v1/predict"), 405),
    "unknown path": (request("GET", "/nope"), 404),
    "path traversal": (request("GET", "/static/../../etc/passwd"), 404),
    "60 KB head in one write": (request("GET", "/healthz", x_pad="a" * 60_000), 400),
    "not HTTP": (b"HELLO THERE\r\n\r\n", 400),
    "bad Content-Length": (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    "two Content-Lengths": (
      b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
      400,
    ),
    "bug in the app": (request("POST", "/v1/predict", ok, MULTIPART + "b0undary"), 500),
  }
  with live_server(max_body_bytes=200_000) as (url, app):
    for name, (raw, status) in corpus.items():
      if name == "bug in the app":  # any exception the app lets out: the JSON 500, not uvicorn's plain text
        monkeypatch.setattr(serving_app, "read_upload", lambda *a: (_ for _ in ()).throw(KeyError("boom")))
      answer = exchange(url, raw)
      assert answer, f"{name}: no answer"
      got, headers, body = parse_answer(answer)
      assert (got, headers["content-type"]) == (status, "application/json"), (name, got, headers, body[:300])
      answer = json.loads(body)
      assert answer["error"] and b"\n" not in body, (name, body)
      assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY", name
      monkeypatch.undo()
    # A head trickled in past 16 KB: h11's own check, answered in JSON too.
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=WAIT_S) as s:
      s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 16_500)
      time.sleep(0.3)
      s.sendall(b"a" * 1000 + b"\r\n\r\n")
      got, headers, body = parse_answer(s.recv(65536))
    assert (got, headers["content-type"]) == (400, "application/json") and "16 KB" in json.loads(body)["error"]
    # A 15 KB head in one write is served; the server serves on.
    assert parse_answer(exchange(url, request("GET", "/healthz", x_pad="a" * 15_000)))[0] == 200
    response = httpx.post(url + "/v1/predict", files={"files": ("a.png", crop(3))}, params={"aligned": "true"})
    assert response.status_code == 200 and response.json()["results"][0]["faces"][0]["argmax_age"] == 4.0


def test_json_is_parsed_off_the_event_loop():
  """While a big JSON body is parsed, the loop still answers /healthz at once."""
  parsed, release = threading.Event(), threading.Event()
  original = uploads._parse_json

  def held(chunks, max_files):
    parsed.set()
    release.wait(WAIT_S)
    return original(chunks, max_files)

  with live_server() as (url, _), pytest.MonkeyPatch.context() as mp:
    mp.setattr(uploads, "_parse_json", held)
    body = json.dumps({"images": [base64.b64encode(crop(7)).decode()]})
    out: list = []
    thread = threading.Thread(
      target=lambda: out.append(
        httpx.post(url + "/v1/predict?aligned=true", content=body, headers={"content-type": "application/json"})
      )
    )
    thread.start()
    assert parsed.wait(WAIT_S)
    start = time.monotonic()
    assert httpx.get(url + "/healthz", timeout=WAIT_S).status_code == 200
    assert time.monotonic() - start < 1.0
    release.set()
    thread.join(WAIT_S)
  assert out[0].status_code == 200 and out[0].json()["results"][0]["faces"][0]["argmax_age"] == 8.0


def held_upload(url: str, length: int, sent: int, chunked: bool = False) -> socket.socket:
  """A connection whose multipart upload declares `length` bytes (or is chunked) and sends `sent` of them."""
  s = socket.create_connection(("127.0.0.1", port_of(url)), timeout=WAIT_S)
  size = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
  s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART}b0undary\r\n{size}\r\n\r\n".encode())
  if chunked and sent:
    s.sendall(f"{sent:x}\r\n".encode() + b"x" * sent + b"\r\n")
  elif not chunked:
    s.sendall(b"x" * sent)
  return s


def test_bodies_held_over_all_requests_are_capped_with_503_and_retry_after():
  mb = 1_000_000
  with live_server(max_body_bytes=4 * mb, max_buffered_bytes=10 * mb, body_timeout_s=30) as (url, app):
    held = [held_upload(url, 4 * mb, 4 * mb - 10) for _ in range(2)]  # 8 MB taken of 10
    try:
      # A third declared 4 MB does not fit: refused before any of its body is read.
      start = time.monotonic()
      raw = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {4 * mb}\r\n\r\n".encode()  # its body: never
      got, headers, body = parse_answer(exchange(url, raw))
      assert (got, headers["retry-after"], headers["content-type"]) == (503, "2", "application/json")
      assert "--max_buffered_mb" in json.loads(body)["error"] and time.monotonic() - start < 5
      # A chunked body is counted as it comes: past the 2 MB left, 503.
      chunked = held_upload(url, 0, 0, chunked=True)
      for _ in range(12):  # 256 KB at a time, until answered
        if select.select([chunked], [], [], 0.2)[0]:
          break
        chunked.sendall(f"{256 * 1024:x}\r\n".encode() + b"x" * 256 * 1024 + b"\r\n")
      chunked.settimeout(WAIT_S)
      got, headers, _ = parse_answer(chunked.recv(65536))
      chunked.close()
      assert (got, headers["retry-after"]) == (503, "2")
      # A small request still fits and is answered.
      small = httpx.post(url + "/v1/predict?aligned=true", files={"files": ("a.png", crop(5))}, timeout=WAIT_S)
      assert small.status_code == 200
    finally:
      for s in held:
        s.close()
    # The held uploads gave their bytes back when they hung up: a big one fits again.
    deadline = time.monotonic() + WAIT_S
    while app.buffers.held_bytes > 0:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    big = multipart([("files", "a.png", crop(6) + b"\x00" * (3 * mb))])
    got, _, _ = parse_answer(exchange(url, request("POST", "/v1/predict?aligned=true", big, MULTIPART + "b0undary")))
    assert got != 503


def test_idle_connections_past_the_cap_never_crowd_out_requests():
  with live_server(max_connections=20) as (url, _):
    idle = [socket.create_connection(("127.0.0.1", port_of(url))) for _ in range(200)]
    try:
      ok = 0
      for i in range(18):
        response = httpx.post(url + "/v1/predict?aligned=true", files={"files": ("a.png", crop(i))}, timeout=WAIT_S)
        ok += response.status_code == 200
      assert ok == 18
      # The idle ones were closed, oldest first, to make room: most of them are gone.
      closed = 0
      for s in idle:
        s.settimeout(0.01)
        with contextlib.suppress(TimeoutError):
          closed += s.recv(1) == b""
      assert closed >= 200 - 20
    finally:
      for s in idle:
        s.close()


def test_past_the_connection_cap_with_every_connection_busy_a_request_gets_a_json_503():
  with live_server(max_connections=5, body_timeout_s=30) as (url, _):
    busy = [held_upload(url, 1000, 10) for _ in range(5)]  # five requests inside the app, reading their bodies
    try:
      time.sleep(0.3)
      got, headers, body = parse_answer(exchange(url, request("GET", "/healthz")))
      assert (got, headers["retry-after"], headers["content-type"]) == (503, "2", "application/json")
      assert "--max_connections" in json.loads(body)["error"]
    finally:
      for s in busy:
        s.close()
    time.sleep(0.3)
    assert httpx.get(url + "/healthz", timeout=WAIT_S).status_code == 200


def test_the_page_and_the_api_carry_the_security_headers_and_the_page_has_no_inline_script_or_style():
  static = serving_app.STATIC
  page = (static / "index.html").read_text()
  assert "<style" not in page and " style=" not in page and "javascript:" not in page
  for tag in page.split("<script")[1:]:
    assert tag.split(">", 1)[0].strip().startswith('src="/static/') and tag.split(">", 1)[1].startswith("</script>")
  assert re.search(r"<[^>]*\son\w+\s*=", page, re.IGNORECASE) is None  # no onload= and the like
  assert '"style"' not in (static / "app.js").read_text()  # no style attributes set from the script
  with live_server() as (url, _):
    for path in ("/", "/static/app.js", "/static/style.css", "/healthz", "/nope"):
      headers = httpx.get(url + path, timeout=WAIT_S).headers
      csp = headers["content-security-policy"]
      assert all(part in csp for part in CHROME_LIKE_CSP_PARTS) and "unsafe-inline" not in csp, path
      assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY", path
    assert guard.CONTENT_SECURITY_POLICY == csp


# scripts/serve.py on the tiny trained model.


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory):
  import tiny_run

  return tiny_run.tiny_run(request, tmp_path_factory)[1]


def start_serve(workdir, flags: list[str], port: int) -> subprocess.Popen:
  command = [sys.executable, str(SERVE), "--workdir", str(workdir), "--port", str(port), *flags]
  return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def catches(pid: int, sig: int) -> bool:
  """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
  with open(f"/proc/{pid}/status") as status:
    mask = next(line for line in status if line.startswith("SigCgt:")).split()[1]
  return bool(int(mask, 16) >> (sig - 1) & 1)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 180) -> float:
  start = time.monotonic()
  while True:
    assert process.poll() is None, process.stdout.read()[-3000:]
    with contextlib.suppress(httpx.HTTPError):
      if httpx.get(url + "/healthz", timeout=2).status_code == 200:
        return time.monotonic() - start
    assert time.monotonic() - start < timeout_s
    time.sleep(0.1)


@pytest.mark.parametrize("answer_begun", [False, True], ids=["before-its-answer", "mid-answer"])
def test_a_request_cancelled_at_the_grace_gets_its_503_and_ends_quietly(answer_begun):
  """uvicorn cancels what runs past --graceful_timeout_s: the Guard answers the JSON 503 and returns.

  Re-raising the cancellation after the 503 had uvicorn log "Exception in ASGI application" and a
  traceback for each such request; at a shutdown with a hundred waiting that outlasted the watchdog's
  second, and the rest were never answered. An answer already begun cannot become a 503: the
  cancellation goes on, and uvicorn closes the connection.
  """
  sent: list[dict] = []

  async def app(scope, receive, send):
    if answer_begun:
      await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.Event().wait()  # the work that runs past the grace

  async def receive():
    return {"type": "http.request", "body": b"", "more_body": False}

  async def send(message):
    sent.append(message)

  async def scenario() -> asyncio.Task:
    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": []}
    task = asyncio.ensure_future(guard.Guard(app, guard.Metrics(), 1000)(scope, receive, send))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait({task}, timeout=WAIT_S)
    return task

  task = asyncio.run(scenario())
  assert task.done()
  statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
  if answer_begun:
    assert task.cancelled() and statuses == [200]
  else:
    assert not task.cancelled() and task.exception() is None
    assert statuses == [503] and "shutting down" in json.loads(sent[-1]["body"])["error"]


@pytest.mark.slow
def test_sigterm_answers_300_backlogged_requests_and_exits_within_the_grace_and_a_second(workdir, compilation_cache):
  from agejax.serving import local

  grace = 3.0
  port = local.free_port()
  process = start_serve(
    workdir, [f"--compilation_cache_dir={compilation_cache}", f"--graceful_timeout_s={grace}"], port
  )
  url = f"http://127.0.0.1:{port}"
  try:
    wait_ready(url, process)
    body = multipart([("files", "a.png", png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))])
    raw = request("POST", "/v1/predict?aligned=true", body, MULTIPART + "b0undary")
    sockets = []
    for _ in range(300):  # written whole; no answer read until the server has exited
      s = socket.create_connection(("127.0.0.1", port), timeout=60)
      s.sendall(raw)
      sockets.append(s)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(60)
    exit_s = time.monotonic() - signalled
    answers = []
    for s in sockets:
      data = b""
      with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
          data += chunk
      s.close()
      answers.append(parse_answer(data) if data else (None, {}, b""))
  finally:
    if process.poll() is None:
      process.kill()
  output = process.stdout.read()
  statuses = [a[0] for a in answers]
  assert statuses.count(None) == 0, f"{statuses.count(None)} of 300 unanswered"
  assert set(statuses) <= {200, 503}, statuses
  for status, headers, body in answers:
    assert headers["content-type"] == "application/json"
    if status == 503:
      assert "shutting down" in json.loads(body)["error"]
  assert code == 0, output[-3000:]
  assert "Exception in ASGI application" not in output, output[-3000:]  # one log line per 503, no traceback
  assert exit_s <= grace + 1.0 + 0.5, exit_s  # the watchdog's bound, and the reaping on a busy machine
  print(f"300 backlogged: {statuses.count(200)} answered 200, {statuses.count(503)} 503; exit after {exit_s:.2f} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_at_any_moment_of_start_up_exits_0_in_one_line(workdir, compilation_cache, sig):
  from agejax.serving import local

  flags = [f"--compilation_cache_dir={compilation_cache}"]
  port = local.free_port()
  process = start_serve(workdir, flags, port)
  start = time.monotonic()
  while not catches(process.pid, signal.SIGTERM):  # serve.py's first lines install the handler
    assert process.poll() is None and time.monotonic() - start < 60
    time.sleep(0.005)
  handled_s = time.monotonic() - start
  ready_s = wait_ready(f"http://127.0.0.1:{port}", process) + handled_s
  process.send_signal(signal.SIGTERM)
  process.wait(60)
  # Ten moments, from the moment serve.py's first lines installed its handler (before that, ~0.15 s
  # here, the signal's default action ends the interpreter: nothing of the script has run) to after
  # the server is ready.
  delays = [0.0, *np.linspace(handled_s + 0.1, ready_s, 8).tolist(), ready_s + 1.0]
  print(f"handler installed after {handled_s:.2f} s, ready after {ready_s:.2f} s")
  for delay in delays:
    port = local.free_port()
    process = start_serve(workdir, flags, port)
    start = time.monotonic()
    while not catches(process.pid, signal.SIGTERM):  # on a busy machine the interpreter starts later
      time.sleep(0.002)
    time.sleep(max(0.0, delay - (time.monotonic() - start)))
    process.send_signal(sig)
    try:
      output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      process.kill()
      output, _ = process.communicate()
    assert process.returncode == 0, (delay, process.returncode, output[-3000:])
    assert "Traceback" not in output and "Fatal Python error" not in output, (delay, output[-3000:])
    stopped = [line for line in output.splitlines() if "stopped by signal" in line]
    assert len(stopped) <= 1, (delay, output[-3000:])
    if not stopped:  # it was serving: a graceful stop
      assert "Finished server process" in output, (delay, output[-3000:])
