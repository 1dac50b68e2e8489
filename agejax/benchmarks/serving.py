"""The serve benchmark: requests/s and latency of scripts/serve.py on loopback, batching on and off, by protocol."""

import asyncio
import io
import json
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
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
  return histogram_totals(metrics_text, "agejax_batch_faces")


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


# --- The same server over each protocol: /v1/predict, the Open Inference Protocol over HTTP and over gRPC ---

PROTOCOLS = ("v1", "oip-http", "oip-grpc")
MODEL = "agejax"  # serve.py's --model_name default
# An answer whose age differs more from /v1/predict's for the same face (alone in its model call) counts as
# wrong. Not 1e-6: a face's age moves with the size of the batch it shares, by up to 3.1e-4 years on the
# tiny test run under XLA:CPU (/v1/predict alone at 8 and 32 clients too, 2026-12-07).
AGE_TOLERANCE = 1e-3
# Each protocol's path label in agejax_http_request_duration_seconds (guard.path_label, oip_grpc's "grpc:METHOD").
LATENCY_LABELS = {"v1": "/v1/predict", "oip-http": "/v2/models/*/infer", "oip-grpc": "grpc:ModelInfer"}


def parse_protocols(text: str) -> list[str]:
  """The protocols of a comma list such as "v1,oip-http,oip-grpc", in the order given; raises ValueError."""
  names = [name.strip() for name in text.split(",") if name.strip()]
  unknown = [name for name in names if name not in PROTOCOLS]
  if unknown or not names:
    raise ValueError(f"--protocol {text!r}: a comma list of {', '.join(PROTOCOLS)}")
  return list(dict.fromkeys(names))


def histogram_totals(metrics_text: str, name: str, **labels: str) -> tuple[float, float]:
  """Returns (sum, count) of the server's histogram `name` (its series with `labels`) from /metrics' text."""
  from prometheus_client.parser import text_string_to_metric_families

  totals = {"_sum": 0.0, "_count": 0.0}
  for family in text_string_to_metric_families(metrics_text):
    if family.name == name:
      for s in family.samples:
        suffix = s.name[len(name) :]
        if suffix in totals and all(s.labels.get(k) == v for k, v in labels.items()):
          totals[suffix] += s.value
  return totals["_sum"], totals["_count"]


def _server_totals(metrics_text: str, label: str) -> tuple[float, float, float, float]:
  """(faces, model calls, request seconds, requests) so far, from /metrics; the requests of one path `label`."""
  latency = histogram_totals(metrics_text, "agejax_http_request_duration_seconds", path=label)
  return (*mean_batch(metrics_text), *latency)


def _tritonclient(protocol: str) -> Any:
  """tritonclient's asyncio client module for an OIP protocol; RuntimeError in one line when it is not installed."""
  import importlib

  module = "tritonclient.http.aio" if protocol == "oip-http" else "tritonclient.grpc.aio"
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise RuntimeError(f"--protocol {protocol} needs {module} ({e}): pip install 'tritonclient[http,grpc]'") from None


class _Client:
  """One benchmark client: its own connection, one request at a time; `send(i)` sends face i."""

  async def send(self, i: int) -> tuple[bool, float, float | None]:
    """Returns (answered, the age answered for the face, the server's own seconds if the answer says)."""
    raise NotImplementedError

  async def close(self) -> None:
    """Closes the client's connection."""


class _V1Client(_Client):
  """POST /v1/predict, multipart, on prebuilt requests (as `load` sends them)."""

  def __init__(self, prebuilt: list[bytes], connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]):
    self.prebuilt, (self.reader, self.writer) = prebuilt, connection

  async def send(self, i: int) -> tuple[bool, float, float | None]:
    status, body = await exchange(self.reader, self.writer, self.prebuilt[i % len(self.prebuilt)])
    if status != 200:
      return False, math.nan, None
    answer = json.loads(body)
    return True, float(answer["results"][0]["faces"][0]["age"]), answer["timing_ms"]["total"] / 1000

  async def close(self) -> None:
    self.writer.close()


class _OipClient(_Client):
  """tritonclient's asyncio client (HTTP with binary data, its default; or gRPC) on prebuilt inputs."""

  def __init__(self, client: Any, inputs: list[list[Any]], parameters: dict[str, Any], error: type[Exception]):
    self.client, self.inputs, self.parameters, self.error = client, inputs, parameters, error

  async def send(self, i: int) -> tuple[bool, float, float | None]:
    try:
      result = await self.client.infer(MODEL, self.inputs[i % len(self.inputs)], parameters=self.parameters)
    except self.error:  # the protocol's error answer (or a dropped connection): counted, not raised
      return False, math.nan, None
    return True, float(result.as_numpy("age")[0]), None

  async def close(self) -> None:
    await self.client.close()


def _crops(bodies: Sequence[bytes]) -> list[np.ndarray]:
  """The drawn faces' pixels: each PNG decoded to a UINT8 [1, S, S, 3] batch of one."""
  from PIL import Image

  return [np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))[None] for body in bodies]


async def _open_clients(
  protocol: str, kind: str, url: str, grpc_port: int | None, bodies: list[bytes], aligned: bool, n: int
) -> list[_Client]:
  """`n` clients of `protocol` sending `kind` ("png" multipart to /v1/predict, OIP "photos" or "images")."""
  host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
  assert host is not None and port is not None  # the local server's URL names both
  if protocol == "v1":
    prebuilt = [request_bytes(port, body, aligned) for body in bodies]
    return [_V1Client(prebuilt, await asyncio.open_connection(host, port)) for _ in range(n)]
  triton = _tritonclient(protocol)
  from tritonclient.utils import InferenceServerException

  # An InferInput holds its serialized data: built once per face and resent, as v1's prebuilt requests are.
  if kind == "photos":
    inputs = [triton.InferInput("photos", [1], "BYTES") for _ in bodies]
    for tensor, body in zip(inputs, bodies):
      tensor.set_data_from_numpy(np.array([body], dtype=object))
    parameters = {"aligned": aligned}
  else:
    crops = _crops(bodies)
    inputs = [triton.InferInput("images", list(crop.shape), "UINT8") for crop in crops]
    for tensor, crop in zip(inputs, crops):
      tensor.set_data_from_numpy(crop)
    parameters = {}
  clients: list[_Client] = []
  for _ in range(n):
    if protocol == "oip-http":
      client = triton.InferenceServerClient(f"{host}:{port}")
    else:
      # gRPC channels to one address share one connection unless told not to; v1's and HTTP's clients have one each.
      client = triton.InferenceServerClient(f"{host}:{grpc_port}", channel_args=[("grpc.use_local_subchannel_pool", 1)])
    clients.append(_OipClient(client, [[tensor] for tensor in inputs], parameters, InferenceServerException))
  return clients


async def protocol_load(
  protocol: str,
  kind: str,
  server: local.LocalServer,
  grpc_port: int | None,
  bodies: list[bytes],
  aligned: bool,
  reference: Sequence[float],
  concurrency: int,
  requests: int,
  max_seconds: float,
) -> dict[str, Any]:
  """`concurrency` clients of one protocol, one face a request each: `requests` or `max_seconds`; returns its row.

  The clients are asyncio coroutines in this one thread, each with its own client object and connection,
  like `load`'s: tritonclient's asyncio clients (http.aio, grpc.aio) rather than a thread per client,
  because on this 2-core machine 32 client threads measured the GIL, not the server: tritonclient.http
  in threads spent 0.7-0.9 ms of CPU a request (aio: 0.9-1.1) but its p95 at 32 clients was 730-780 ms
  against aio's 410-460 (two rounds of 600 requests, 2026-12-07, load average 8.9-9.6). The sync HTTP
  client must also be created in the thread that uses it (gevent: "Cannot switch to a different thread").
  """
  label = LATENCY_LABELS[protocol]
  clients = await _open_clients(protocol, kind, server.url, grpc_port, bodies, aligned, concurrency)
  latencies: list[float] = []
  server_times: list[float] = []
  ages: list[float] = []
  deviations: list[float] = []
  wrong = errors = issued = 0
  try:
    # One untimed request each: every protocol's connection is open and warm before the clock starts.
    await asyncio.gather(*(client.send(0) for client in clients))
    before = _server_totals(await asyncio.to_thread(fetch, server.url + "/metrics"), label)
    client_cpu, server_cpu = time.process_time(), tree_cpu_s(server.process.pid)
    start = time.perf_counter()
    deadline = start + max_seconds

    async def run(client: _Client) -> None:
      nonlocal errors, issued, wrong
      while issued < requests and time.perf_counter() < deadline:
        face = issued % len(bodies)
        issued += 1
        t = time.perf_counter()
        answered, age, server_s = await client.send(face)
        if not answered:
          errors += 1
          continue
        latencies.append(time.perf_counter() - t)
        if server_s is not None:
          server_times.append(server_s)
        ages.append(age)
        deviations.append(abs(age - reference[face]))
        wrong += not deviations[-1] <= AGE_TOLERANCE  # NaN counts as wrong

    await asyncio.wait_for(asyncio.gather(*(run(c) for c in clients)), max_seconds + 60)
    wall = time.perf_counter() - start
    client_cpu, server_cpu = time.process_time() - client_cpu, tree_cpu_s(server.process.pid) - server_cpu
    after = _server_totals(await asyncio.to_thread(fetch, server.url + "/metrics"), label)
  finally:
    for client in clients:
      await client.close()
  faces, calls, seconds, timed = (a - b for a, b in zip(after, before))
  ms = 1000 * np.asarray(latencies or [np.nan])
  server_ms = 1000 * np.asarray(server_times or [np.nan])
  done = len(latencies) or 1
  return {
    "protocol": protocol,
    "input": kind,
    "concurrency": concurrency,
    "requests": len(latencies),
    "errors": errors,
    "wrong": wrong,
    "requests_per_s": len(latencies) / wall,
    "p50_ms": float(np.percentile(ms, 50)),
    "p95_ms": float(np.percentile(ms, 95)),
    "server_p50_ms": float(np.percentile(server_ms, 50)) if server_times else None,
    "server_p95_ms": float(np.percentile(server_ms, 95)) if server_times else None,
    "server_mean_ms": 1000 * seconds / timed if timed else None,
    "mean_batch": faces / calls if calls else float("nan"),
    "client_cpu_ms": 1000 * client_cpu / done,
    "server_cpu_ms": 1000 * server_cpu / done,
    "mean_age": float(np.mean(ages)) if ages else None,
    "max_age_deviation": float(np.max(deviations)) if deviations else None,
  }


def reference_ages(url: str, bodies: Sequence[bytes], aligned: bool) -> list[float]:
  """/v1/predict's age for each body's first face, one request each: what every protocol's answers must equal."""
  headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
  ages = []
  for body in bodies:
    request = urllib.request.Request(
      url + "/v1/predict" + ("?aligned=true" if aligned else ""), multipart_body([("face.png", body)]), headers
    )
    try:
      with urllib.request.urlopen(request, timeout=60) as response:
        ages.append(float(json.loads(response.read())["results"][0]["faces"][0]["age"]))
    except urllib.error.HTTPError as e:
      raise RuntimeError(f"/v1/predict answered {e.code} to a benchmark face: {e.read(200)!r}") from None
  return ages


def serve_protocols(
  script: str | os.PathLike,
  model_flags: Sequence[str],
  protocols: Sequence[str] = PROTOCOLS,
  *,
  concurrency: Sequence[int] = (1, 32),
  requests: int = 1000,
  max_seconds: float = 20.0,
  max_batch: int = 32,
  max_wait_ms: float = 5.0,
  photo: str | None = None,
) -> list[dict[str, Any]]:
  """One server (with --grpc_port when gRPC is asked for) measured over each protocol in turn, the same faces.

  v1 sends each face as a multipart PNG (aligned=true); each OIP protocol sends it as `photos` BYTES
  (aligned=true: the same decode path as v1) and as `images` UINT8 crops (no decode: what the protocol
  adds). With `photo` every protocol sends the photo (faces detected) and `images` is skipped.

  Returns:
    One row per (protocol, input, concurrency): the keys of `serve`'s rows (server p50/p95 only where the
    answer says, i.e. v1), and `wrong` (answers whose age differs from /v1/predict's for the same face by
    more than AGE_TOLERANCE), `server_mean_ms` (the server's own latency histogram), `client_cpu_ms` and
    `server_cpu_ms` (CPU a request of this process's clients, and of the server's process tree: both share
    this machine's cores), `mean_age` (over the answers).
  """
  for protocol in protocols:
    if protocol != "v1":
      _tritonclient(protocol)  # fails here, in one line, before the server starts
  grpc_port = local.free_port() if "oip-grpc" in protocols else None
  flags = [*model_flags, f"--max_batch={max_batch}", f"--max_wait_ms={max_wait_ms if max_batch > 1 else 0}"]
  flags += [f"--grpc_port={grpc_port}"] if grpc_port else []
  oip_inputs = ["photos"] if photo else ["photos", "images"]
  cases = [(p, kind) for p in protocols for kind in (["png"] if p == "v1" else oip_inputs)]
  batching: dict[str, Any] = {"batching": "on" if max_batch > 1 else "off", "max_batch": max_batch}
  batching["max_wait_ms"] = max_wait_ms if max_batch > 1 else 0
  rows = []
  with local.LocalServer(script, flags) as server:
    bodies, aligned = payloads(json.loads(fetch(server.url + "/healthz"))["input_size"], photo)
    reference = reference_ages(server.url, bodies, aligned)
    for protocol, kind in cases:
      warm = protocol_load(protocol, kind, server, grpc_port, bodies, aligned, reference, 4, 32, max_seconds)
      asyncio.run(warm)  # this protocol's path (connections, caches) warm before its measurements
      for c in concurrency:
        row = asyncio.run(
          protocol_load(protocol, kind, server, grpc_port, bodies, aligned, reference, c, requests, max_seconds)
        )
        rows.append({"mode": "serve", **batching, **row, "detect": not aligned})
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


def bombs(
  script: str | os.PathLike, model_flags: Sequence[str], side: int = 13000, red_team: bool = True
) -> list[dict[str, Any]]:
  """Issue 24's four bombs at `side` and (`red_team`) issue 35's inputs, each followed by one normal request.

  Returns:
    One row a bomb: the answer's status and time; the PSS of the server and every process under it
    (its decode workers) at idle, its peak during the bomb (sampled, `TreePeak`) and after; the
    server process's own peak RSS (VmHWM, reset before); the normal request's status and time.
  """
  grey, jpeg = grey_png(side), jpeg_claiming(side)
  cases = {
    "grey PNG": [grey],
    "float32 TIFF": [float_tiff(side)],
    "64 grey PNGs": [grey] * 64,
    "64 JPEG headers": [jpeg] * 64,
  }
  if red_team:
    cases |= {
      "crowd of 900 faces": [crowd_jpeg()],
      "4 MB of iCCP chunks": [iccp_png()],
      "64 PNGs of 64 zTXt": [ztxt_png()] * 64,
      "1.5 M empty PNG chunks": [empty_chunks_png()],
      "38-byte lossless WebP": [webp_lossless_claiming()],
      "CMYK progressive JPEG": [jpeg_claiming_as(7800)],
      "scan bomb": [scan_bomb_jpeg()],
    }
  rows = []
  with local.LocalServer(script, list(model_flags)) as server:
    pid = server.process.pid
    crop = payloads(json.loads(fetch(server.url + "/healthz"))["input_size"], None)[0][0]
    for name, files in cases.items():
      server_idle = rss_mb(pid)
      reset_peak(pid)
      with TreePeak(pid) as memory:
        status, text, seconds = _post_files(server.url, files)
      after = pss_mb(tree_pids(pid))
      normal_status, _, normal_s = _post_files(server.url, [crop], aligned=True)
      rows.append(
        {
          "bomb": name,
          "bytes_sent": sum(map(len, files)),
          "status": status,
          "seconds": seconds,
          "idle_mb": memory.idle_mb,
          "peak_over_idle_mb": memory.over_idle_mb,
          "after_over_idle_mb": after - memory.idle_mb,
          "server_peak_over_idle_mb": rss_mb(pid, "VmHWM") - server_idle,
          "normal_status": normal_status,
          "normal_s": normal_s,
          "answer": text[:80],
        }
      )
  return rows


# The red team's inputs against the decode path (issue 35): each small on the wire, costly to read.


def crowd_jpeg(side: int = 1536, across: int = 30) -> bytes:
  """scikit-image's astronaut face tiled across x across times in a side x side JPEG (900 faces: MTCNN's worst)."""
  from PIL import Image
  from skimage import data

  tile = side // across
  face = Image.fromarray(data.astronaut()[20:260, 120:330]).resize((tile, tile), Image.Resampling.BILINEAR)
  photo = Image.new("RGB", (side, side))
  for i in range(across):
    for j in range(across):
      photo.paste(face, (i * tile, j * tile))
  buf = io.BytesIO()
  photo.save(buf, "JPEG", quality=85)
  return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
  return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def png_with_chunks(chunks: Sequence[tuple[bytes, bytes]], side: int = 8) -> bytes:
  """A small grey PNG carrying `chunks` (type, body) between its header and its pixels."""
  from PIL import Image

  buf = io.BytesIO()
  Image.new("L", (side, side), 128).save(buf, "PNG")
  plain = buf.getvalue()
  first_idat = plain.index(b"IDAT") - 4
  return plain[:first_idat] + b"".join(_png_chunk(k, b) for k, b in chunks) + plain[first_idat:]


def iccp_png(count: int = 4000) -> bytes:
  """`count` iCCP chunks, each a ~1 KB deflate stream of 1 MB less a byte (Pillow inflates each: no total cap)."""
  profile = b"icc\0\0" + zlib.compress(b"\0" * ((1 << 20) - 1), 9)
  return png_with_chunks([(b"iCCP", profile)] * count)


def ztxt_png(count: int = 64) -> bytes:
  """`count` zTXt chunks of 1 MB less a byte each, compressed to ~1 KB (Pillow's text cap stops at 64 MB)."""
  text = b"comment\0\0" + zlib.compress(b"a" * ((1 << 20) - 1), 9)
  return png_with_chunks([(b"zTXt", text)] * count)


def empty_chunks_png(count: int = 1_500_000) -> bytes:
  """`count` empty private ancillary chunks (12 bytes each): Pillow walks them one by one."""
  return png_with_chunks([(b"abCd", b"")] * count)


def webp_lossless_claiming(width: int = 16383, height: int = 3906) -> bytes:
  """A 38-byte lossless WebP of one colour whose header claims width x height (its codes take no bits a pixel)."""
  from PIL import Image

  buf = io.BytesIO()
  Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, "WEBP", lossless=True)
  data = bytearray(buf.getvalue())
  at = data.index(b"VP8L") + 9  # past the chunk's type, size and its 0x2f signature byte
  bits = int.from_bytes(data[at : at + 4], "little") & ~((1 << 28) - 1)  # keep alpha and version
  data[at : at + 4] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
  return bytes(data)


def jpeg_claiming_as(side: int, mode: str = "CMYK", progressive: bool = True) -> bytes:
  """A few KB of (progressive, CMYK) JPEG whose header claims side x side: the coefficients of all of it are held."""
  from PIL import Image

  buf = io.BytesIO()
  Image.new(mode, (16, 16), (10, 20, 30, 40) if mode == "CMYK" else 128).save(buf, "JPEG", progressive=progressive)
  data = bytearray(buf.getvalue())
  sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
  data[sof + 5 : sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
  return bytes(data)


def scan_bomb_jpeg(side: int = 4096, scans: int = 4800) -> bytes:
  """A flat grey progressive JPEG whose last AC scan is repeated `scans` times: each few-byte scan walks every block."""
  from PIL import Image

  buf = io.BytesIO()
  Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
  data = buf.getvalue()
  last = data.rindex(b"\xff\xda")  # the last scan's header and its entropy-coded data, up to the end marker
  return data[:last] + data[last:-2] * scans + data[-2:]


def format_samples(side: int) -> dict[str, bytes]:
  """A side x side photo-like image (a gradient with noise) in each format and mode the server may be asked to read."""
  from PIL import Image

  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 255, side, dtype=np.float32)
  rgb = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1), np.full((side, side), 100.0)], -1)
  rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
  photo = Image.fromarray(rgb)
  grey, rgba = photo.convert("L"), photo.convert("RGBA")
  rgba.putalpha(Image.fromarray(ramp.astype(np.uint8)[None, :].repeat(side, 0)))  # a real alpha channel
  cases: dict[str, tuple[Image.Image, str, dict[str, Any]]] = {
    "JPEG RGB": (photo, "JPEG", {"quality": 90}),
    "JPEG RGB progressive": (photo, "JPEG", {"quality": 90, "progressive": True}),
    "JPEG L": (grey, "JPEG", {"quality": 90}),
    "JPEG CMYK": (photo.convert("CMYK"), "JPEG", {"quality": 90}),
    "JPEG CMYK progressive": (photo.convert("CMYK"), "JPEG", {"quality": 90, "progressive": True}),
    "PNG RGB": (photo, "PNG", {"compress_level": 1}),
    "PNG RGBA": (rgba, "PNG", {"compress_level": 1}),
    "PNG L": (grey, "PNG", {"compress_level": 1}),
    "PNG P": (photo.quantize(64), "PNG", {"compress_level": 1}),
    "PNG I;16": (Image.fromarray(np.asarray(grey, np.uint16) * 257), "PNG", {"compress_level": 1}),
    "WEBP lossy": (photo, "WEBP", {"quality": 80, "method": 0}),
    "WEBP lossless": (photo, "WEBP", {"lossless": True, "method": 0, "quality": 0}),
    "WEBP lossless RGBA": (rgba, "WEBP", {"lossless": True, "method": 0, "quality": 0}),
    "GIF": (photo.quantize(64), "GIF", {}),
    "BMP": (photo, "BMP", {}),
    "TIFF RGB": (photo, "TIFF", {"compression": "tiff_adobe_deflate"}),
    "TIFF F": (Image.fromarray(np.asarray(grey, np.float32)), "TIFF", {"compression": "tiff_adobe_deflate"}),
    "JPEG2000": (photo, "JPEG2000", {"quality_mode": "rates", "quality_layers": [40]}),
  }
  out = {}
  for name, (image, fmt, options) in cases.items():
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    out[name] = buf.getvalue()
  return out


_MEASURE = """
import sys, time, resource
from agejax.data import faces
data = sys.stdin.buffer.read()
def status(key):
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
header = faces.read_header(data)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")
cpu = time.process_time()
decoded = faces.open_reduced(data, min_side=int(sys.argv[1]))
cpu = time.process_time() - cpu
assert not isinstance(decoded, str), decoded
print(status("VmHWM") - before, cpu, header.decode_bytes(int(sys.argv[1])))
"""


def decode_costs(side: int = 4000, min_side: int = 1536) -> list[dict[str, Any]]:
  """Each format's peak memory and CPU to decode a side x side image as the server does (a fresh process each).

  Returns:
    One row a format: bytes sent, the peak RSS over the process's before the decode (MB) and per full-size
    pixel, CPU seconds, and what `Header.decode_bytes` estimates (MB).
  """
  import subprocess
  import sys

  rows = []
  for name, data in format_samples(side).items():
    out = subprocess.run(
      [sys.executable, "-c", _MEASURE, str(min_side)], input=data, capture_output=True, check=True
    ).stdout.split()
    peak, cpu, estimate = int(out[0]), float(out[1]), int(out[2])
    rows.append(
      {
        "format": name,
        "side": side,
        "bytes_sent": len(data),
        "peak_mb": peak / 1e6,
        "bytes_per_pixel": peak / side**2,
        "cpu_s": cpu,
        "estimate_mb": estimate / 1e6,
      }
    )
  return rows


def tree_pids(pid: int) -> list[int]:
  """A process and all its descendants (Linux: read from /proc), the server's decode workers included."""
  parents: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          parent = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):  # gone meanwhile
        continue
      parents.setdefault(parent, []).append(int(entry))
  out, todo = [], [pid]
  while todo:
    out.append(todo.pop())
    todo.extend(parents.get(out[-1], []))
  return out


def pss_mb(pids: Sequence[int]) -> float:
  """The summed proportional set size of processes (shared pages split between their sharers), in MB."""
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/smaps_rollup") as f:
        total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):  # gone meanwhile
      pass
  return total / 1024


class TreePeak:
  """The peak summed PSS of a process tree (the server and its workers) while the block runs, sampled in a thread.

  `idle_mb` is the sum when the block starts; `peak_mb` the highest sum seen. A worker that lived and
  died between two samples (every `interval_s`, plus the time to read the tree) may be missed: its own
  address-space limit bounds it. Reading a TensorFlow worker's PSS takes ~20 ms.
  """

  def __init__(self, pid: int, interval_s: float = 0.1):
    self.pid, self.interval_s = pid, interval_s
    self.idle_mb = self.peak_mb = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self) -> None:
    while not self._stop.wait(self.interval_s):
      self.peak_mb = max(self.peak_mb, pss_mb(tree_pids(self.pid)))

  def __enter__(self) -> "TreePeak":
    self.idle_mb = self.peak_mb = pss_mb(tree_pids(self.pid))
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak_mb = max(self.peak_mb, pss_mb(tree_pids(self.pid)))

  @property
  def over_idle_mb(self) -> float:
    """The peak over the idle sum, in MB."""
    return self.peak_mb - self.idle_mb


def _crops_by_pipe(conn) -> None:
  """A worker that answers (faces, size) with that many uint8 crops through its pipe, until None."""
  while (message := conn.recv()) is not None:
    n, size = message
    conn.send([np.full((size, size, 3), i, np.uint8) for i in range(n)])


def _crops_by_shared_memory(conn) -> None:
  """A worker that writes (faces, size) crops into the shared-memory block the server names, then answers."""
  from multiprocessing import shared_memory

  while (message := conn.recv()) is not None:
    name, n, size = message
    block = shared_memory.SharedMemory(name=name)
    crops = np.ndarray((n, size, size, 3), np.uint8, buffer=block.buf)
    for i in range(n):
      crops[i] = i
    del crops
    block.close()
    conn.send(n)


def transport(faces: Sequence[int] = (1, 8, 64), size: int = 200, repeats: int = 50) -> list[dict[str, Any]]:
  """Milliseconds for the server to get `faces` uint8 crops of size x size x 3 made in a worker process.

  "pipe": pickled through the worker's pipe (the sandbox's way); "shared memory": written by the worker
  into a block the server creates, then copied out (the block is freed at once). Forkserver workers.
  """
  import multiprocessing
  from multiprocessing import shared_memory

  context = multiprocessing.get_context("forkserver")
  rows = []
  for mode, target in (("pipe", _crops_by_pipe), ("shared memory", _crops_by_shared_memory)):
    parent, child = context.Pipe()
    worker = context.Process(target=target, args=(child,), daemon=True)
    worker.start()
    for n in faces:
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        if mode == "pipe":
          parent.send((n, size))
          crops = parent.recv()
        else:
          block = shared_memory.SharedMemory(create=True, size=n * size * size * 3)
          parent.send((block.name, n, size))
          parent.recv()
          crops = list(np.ndarray((n, size, size, 3), np.uint8, buffer=block.buf).copy())
          block.close()
          block.unlink()
        times.append(time.perf_counter() - start)
        assert len(crops) == n and crops[-1][0, 0, 0] == (n - 1) % 256
      rows.append({"transport": mode, "faces": n, "size": size, "ms_median": 1000 * float(np.median(times))})
    parent.send(None)
    worker.join(10)
  return rows


def tree_cpu_s(pid: int) -> float:
  """CPU seconds (user and system) used so far by a process and its live descendants (Linux: /proc)."""
  tick = os.sysconf("SC_CLK_TCK")
  total = 0
  for member in tree_pids(pid):
    try:
      with open(f"/proc/{member}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
      continue
    total += int(fields[11]) + int(fields[12])  # utime, stime
  return total / tick


def request_cost(
  script: str | os.PathLike, model_flags: Sequence[str], photo: str | None = None, requests: int = 200
) -> dict[str, Any]:
  """One client's requests one after another: wall and CPU milliseconds a request of the server and its workers.

  CPU is counted over the server's whole process tree (its decode workers too), so it measures the cost of a
  request even on a machine that other work shares; the wall time does not. Also: start-up seconds (to the
  first /healthz) and the tree's summed PSS at idle.
  """
  start = time.perf_counter()
  with local.LocalServer(script, list(model_flags)) as server:
    started = time.perf_counter() - start
    bodies, aligned = payloads(json.loads(fetch(server.url + "/healthz"))["input_size"], photo)
    asyncio.run(load(server.url, bodies, aligned, 1, 16, 60))  # warm connections, caches and every worker
    idle = pss_mb(tree_pids(server.process.pid))
    cpu = tree_cpu_s(server.process.pid)
    latencies, _, errors, wall, _ = asyncio.run(load(server.url, bodies, aligned, 1, requests, 600))
    cpu = tree_cpu_s(server.process.pid) - cpu
  done = len(latencies) or 1
  return {
    "mode": "serve",
    "detect": not aligned,
    "requests": len(latencies),
    "errors": errors,
    "wall_ms": 1000 * wall / done,
    "cpu_ms": 1000 * cpu / done,
    "p50_ms": float(np.percentile(1000 * np.asarray(latencies or [np.nan]), 50)),
    "startup_s": started,
    "idle_pss_mb": idle,
  }
