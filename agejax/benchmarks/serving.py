"""The serve benchmark: requests/s and latency of scripts/serve.py on loopback, with batching on and off."""

import asyncio
import io
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from agejax.serving import local

NUM_FACES = 32  # distinct payloads, cycled


def versions() -> dict[str, str | None]:
  """The serving stack's package versions, to record beside the numbers."""
  import importlib.metadata

  out: dict[str, str | None] = {}
  for name in ("starlette", "uvicorn", "h11", "python-multipart", "prometheus-client", "httpx", "mtcnn"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def payloads(input_size: int, photo: str | None) -> tuple[list[bytes], bool]:
  """Returns (PNG/JPEG bodies to cycle through, aligned): drawn demo faces, or the given photo (detected)."""
  from PIL import Image

  from agejax.data import demo_faces

  if photo:
    with open(photo, "rb") as f:
      return [f.read()], False
  out = []
  for i in range(NUM_FACES):
    buf = io.BytesIO()
    Image.fromarray(demo_faces.draw_face(5 + 3 * i, np.random.default_rng(i), input_size)).save(buf, "PNG")
    out.append(buf.getvalue())
  return out, True


def mean_batch(metrics_text: str) -> tuple[float, float]:
  """Returns (sum, count) of the server's `agejax_batch_faces` histogram."""
  from prometheus_client.parser import text_string_to_metric_families

  values = {}
  for family in text_string_to_metric_families(metrics_text):
    if family.name == "agejax_batch_faces":
      values = {s.name: s.value for s in family.samples if s.name.endswith(("_sum", "_count"))}
  return values.get("agejax_batch_faces_sum", 0.0), values.get("agejax_batch_faces_count", 0.0)


BOUNDARY = "agejax-benchmark"


def multipart_body(files: Sequence[tuple[str, bytes]], content_type: str = "application/octet-stream") -> bytes:
  """A multipart/form-data body (boundary BOUNDARY) holding (file name, bytes) pairs in the field `files`."""
  parts = [
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'.encode()
    + f"Content-Type: {content_type}\r\n\r\n".encode()
    + data
    for name, data in files
  ]
  return b"\r\n".join(parts) + f"\r\n--{BOUNDARY}--\r\n".encode()


def request_bytes(port: int, image: bytes, aligned: bool) -> bytes:
  """A whole HTTP/1.1 POST /v1/predict of one image (multipart field `files`), built once and resent."""
  body = multipart_body([("face.png", image)])
  head = (
    f"POST /v1/predict{'?aligned=true' if aligned else ''} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
  )
  return head.encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
  """Sends one request on a kept-alive connection; returns (status, body). The server always sends Content-Length."""
  writer.write(request)
  head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
  headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
  length = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
  return int(head[0].split()[1]), await reader.readexactly(length)


async def load(
  url: str, bodies: list[bytes], aligned: bool, concurrency: int, requests: int, max_seconds: float
) -> tuple[list[float], list[float], int, float, float]:
  """Runs `concurrency` clients, one image at a time each on its own connection: `requests` or `max_seconds`.

  The client is raw asyncio HTTP/1.1 on prebuilt requests (~0.1 ms of CPU a request): it shares the
  machine with the server, and a full HTTP library would spend more CPU than the server at 32 clients.

  Returns:
    (client latencies of the successful requests in seconds, the server's own times for them (its
    timing_ms.total, in seconds), errors, wall seconds, mean faces per model call).
  """
  host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
  assert port is not None  # the local server's URL names its port
  prebuilt = [request_bytes(port, body, aligned) for body in bodies]
  # Connect before the clock starts: the measurement is of requests, not TCP handshakes.
  connections = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
  latencies, server_times, errors, issued = [], [], 0, 0
  before = mean_batch(await asyncio.to_thread(fetch, url + "/metrics"))
  start = time.perf_counter()
  deadline = start + max_seconds

  async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    nonlocal errors, issued
    while issued < requests and time.perf_counter() < deadline:
      request = prebuilt[issued % len(prebuilt)]
      issued += 1
      t = time.perf_counter()
      status, body = await exchange(reader, writer, request)
      if status == 200:
        latencies.append(time.perf_counter() - t)
        server_times.append(json.loads(body)["timing_ms"]["total"] / 1000)
      else:
        errors += 1

  try:
    await asyncio.wait_for(asyncio.gather(*(client(*c) for c in connections)), max_seconds + 60)
  finally:
    wall = time.perf_counter() - start
    for _, writer in connections:
      writer.close()
  after = mean_batch(await asyncio.to_thread(fetch, url + "/metrics"))
  calls = after[1] - before[1]
  return latencies, server_times, errors, wall, (after[0] - before[0]) / calls if calls else float("nan")


def fetch(url: str) -> str:
  """GETs a page as text."""
  with urllib.request.urlopen(url, timeout=30) as response:
    return response.read().decode()


def serve(
  script: str | os.PathLike,
  model_flags: Sequence[str],
  *,
  concurrency: Sequence[int] = (1, 8, 32),
  requests: int = 1000,
  max_seconds: float = 20.0,
  max_batch: int = 32,
  max_wait_ms: float = 5.0,
  photo: str | None = None,
) -> list[dict[str, Any]]:
  """Measures the server with batching on (`max_batch`) and off (1) at each concurrency.

  Args:
    script: scripts/serve.py.
    model_flags: what to serve, e.g. ['--workdir', DIR].
    concurrency: numbers of concurrent clients.
    requests: requests per measurement (fewer if `max_seconds` runs out).
    max_seconds: longest measurement.
    max_batch: --max_batch with batching on.
    max_wait_ms: --max_wait_ms with batching on.
    photo: a photo to send (faces detected); default: drawn face crops sent with aligned=true.

  Returns:
    One row per (batching, concurrency): requests/s, p50/p95 latency (ms) at the client and inside
    the server (from the request's arrival in the app to its answer), mean faces per model call.
  """
  rows = []
  for batching, batch in (("on", max_batch), ("off", 1)):
    flags = [*model_flags, f"--max_batch={batch}", f"--max_wait_ms={max_wait_ms if batch > 1 else 0}"]
    with local.LocalServer(script, flags) as server:
      bodies, aligned = payloads(json.loads(fetch(server.url + "/healthz"))["input_size"], photo)
      asyncio.run(load(server.url, bodies, aligned, 4, 32, max_seconds))  # warm connections and caches
      for c in concurrency:
        latencies, server_times, errors, wall, faces = asyncio.run(
          load(server.url, bodies, aligned, c, requests, max_seconds)
        )
        ms, server_ms = (1000 * np.asarray(t or [np.nan]) for t in (latencies, server_times))
        rows.append(
          {
            "mode": "serve",
            "batching": batching,
            "max_batch": batch,
            "max_wait_ms": max_wait_ms if batch > 1 else 0,
            "concurrency": c,
            "requests": len(latencies),
            "errors": errors,
            "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "server_p50_ms": float(np.percentile(server_ms, 50)),
            "server_p95_ms": float(np.percentile(server_ms, 95)),
            "mean_batch": faces,
            "detect": not aligned,
          }
        )
  return rows


def hostile_payload(images: int, side: int) -> tuple[bytes, str]:
  """The hostile neighbour's request body: `images` flat grey side x side PNGs (small to send, slow to decode)."""
  from PIL import Image

  buf = io.BytesIO()
  Image.new("L", (side, side), 128).save(buf, "PNG")
  body = multipart_body([("grey.png", buf.getvalue())] * images, "image/png")
  return body, f"multipart/form-data; boundary={BOUNDARY}"


def _hostile_loop(url: str, body: bytes, content_type: str, stop: threading.Event, sent: list[int]) -> None:
  """Sends the hostile request again and again until `stop` (each waits for its answer)."""
  while not stop.is_set():
    request = urllib.request.Request(url + "/v1/predict", body, {"Content-Type": content_type}, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    except OSError:  # a 4xx/5xx answer (HTTPError) or a dropped connection: send it again
      pass
    sent.append(1)


def hostile_neighbour(
  script: str | os.PathLike,
  model_flags: Sequence[str],
  *,
  concurrency: int = 4,
  requests: int = 1000,
  max_seconds: float = 20.0,
  hostile_images: int = 64,
  hostile_side: int = 2000,
  photo: str | None = None,
) -> list[dict[str, Any]]:
  """Normal clients' latency alone, then while one more client sends `hostile_images` PNGs in a loop.

  Returns:
    Two rows ("none", then the neighbour): requests/s, p50/p95 latency (ms), errors (e.g. 503s) of
    the normal clients, and how many hostile requests were answered meanwhile.
  """
  body, content_type = hostile_payload(hostile_images, hostile_side)
  rows = []
  with local.LocalServer(script, list(model_flags)) as server:
    bodies, aligned = payloads(json.loads(fetch(server.url + "/healthz"))["input_size"], photo)
    asyncio.run(load(server.url, bodies, aligned, 4, 32, max_seconds))  # warm connections and caches
    for neighbour in (False, True):
      stop, sent = threading.Event(), list[int]()
      thread = threading.Thread(target=_hostile_loop, args=(server.url, body, content_type, stop, sent), daemon=True)
      if neighbour:
        thread.start()
        time.sleep(2)  # its images are queued by now
      try:
        latencies, _, errors, wall, _ = asyncio.run(
          load(server.url, bodies, aligned, concurrency, requests, max_seconds)
        )
      finally:
        stop.set()
      if neighbour:
        thread.join()
      ms = 1000 * np.asarray(latencies or [np.nan])
      rows.append(
        {
          "mode": "serve",
          "neighbour": f"{hostile_images} x {hostile_side}x{hostile_side} PNGs in a loop" if neighbour else "none",
          "concurrency": concurrency,
          "requests": len(latencies),
          "errors": errors,
          "requests_per_s": len(latencies) / wall,
          "p50_ms": float(np.percentile(ms, 50)),
          "p95_ms": float(np.percentile(ms, 95)),
          "max_ms": float(np.max(ms)),
          "hostile_requests": len(sent),
          "detect": not aligned,
        }
      )
  return rows


# Issue 24's decompression bombs: small on the wire, huge decoded.


def grey_png(side: int) -> bytes:
  """A flat grey PNG: tens of KB on the wire, side² bytes decoded."""
  from PIL import Image

  buf = io.BytesIO()
  Image.new("L", (side, side), 128).save(buf, "PNG", optimize=True)
  return buf.getvalue()


def float_tiff(side: int) -> bytes:
  """A deflated float32 TIFF: hundreds of KB on the wire, 4 side² bytes decoded."""
  from PIL import Image

  values = np.zeros((side, side), np.float32)
  values[: side // 2] = 1.0
  buf = io.BytesIO()
  Image.fromarray(values).save(buf, "TIFF", compression="tiff_adobe_deflate")
  return buf.getvalue()


def jpeg_claiming(side: int) -> bytes:
  """A few hundred bytes of JPEG whose header claims side x side: libjpeg 'decodes' it to grey."""
  from PIL import Image

  buf = io.BytesIO()
  Image.new("L", (16, 16), 128).save(buf, "JPEG")
  data = bytearray(buf.getvalue())
  sof = data.find(b"\xff\xc0")
  data[sof + 5 : sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
  return bytes(data)


def rss_mb(pid: int, key: str = "VmRSS") -> float:
  """A process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in MB (Linux)."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 1024
  raise KeyError(key)


def reset_peak(pid: int) -> None:
  """Linux: sets a process's VmHWM to its VmRSS."""
  with open(f"/proc/{pid}/clear_refs", "w") as f:
    f.write("5")


def _post_files(url: str, files: Sequence[bytes], aligned: bool = False) -> tuple[int, str, float]:
  """(status, the answer's start, seconds) of one multipart POST /v1/predict."""
  body = multipart_body([(f"{i}.img", f) for i, f in enumerate(files)])
  query = "?aligned=true" if aligned else ""
  headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
  request = urllib.request.Request(url + "/v1/predict" + query, body, headers, method="POST")
  start = time.perf_counter()
  try:
    with urllib.request.urlopen(request, timeout=900) as response:
      status, text = response.status, response.read(120).decode(errors="replace")
  except urllib.error.HTTPError as e:
    status, text = e.code, e.read(120).decode(errors="replace")
  return status, text, time.perf_counter() - start


def bombs(script: str | os.PathLike, model_flags: Sequence[str], side: int = 13000) -> list[dict[str, Any]]:
  """Issue 24's four bombs at `side`, each followed by one normal request (a drawn face crop).

  Returns:
    One row a bomb: the answer's status and time, the server's RSS at idle, its peak during the bomb
    (VmHWM, reset before) and after, and the normal request's status and time.
  """
  grey, jpeg = grey_png(side), jpeg_claiming(side)
  cases = {
    "grey PNG": [grey],
    "float32 TIFF": [float_tiff(side)],
    "64 grey PNGs": [grey] * 64,
    "64 JPEG headers": [jpeg] * 64,
  }
  rows = []
  with local.LocalServer(script, list(model_flags)) as server:
    pid = server.process.pid
    crop = payloads(json.loads(fetch(server.url + "/healthz"))["input_size"], None)[0][0]
    for name, files in cases.items():
      idle = rss_mb(pid)
      reset_peak(pid)
      status, text, seconds = _post_files(server.url, files)
      peak, after = rss_mb(pid, "VmHWM"), rss_mb(pid)
      normal_status, _, normal_s = _post_files(server.url, [crop], aligned=True)
      rows.append(
        {
          "bomb": name,
          "bytes_sent": sum(map(len, files)),
          "status": status,
          "seconds": seconds,
          "idle_mb": idle,
          "peak_over_idle_mb": peak - idle,
          "after_over_idle_mb": after - idle,
          "normal_status": normal_status,
          "normal_s": normal_s,
          "answer": text[:80],
        }
      )
  return rows
