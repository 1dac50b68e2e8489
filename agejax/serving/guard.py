"""The server's outermost layer: metrics, the body limits, security headers, and JSON for every error.

Prometheus metrics of every request and model call; each body's size and time limits and the total
of body bytes held over all requests; the page's security headers (CSP without inline script) on
every answer; and any exception the app lets out answered as the one-line JSON 500, logged in one line.
"""

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import prometheus_client
from absl import logging
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PATHS = (
  "/",
  "/v1/predict",
  "/healthz",
  "/readyz",
  "/metrics",
  "/v2",
  "/v2/health/live",
  "/v2/health/ready",
)  # metric labels, with "/static" (the page's files), the models' "/v2/models/*" paths and "other"


class BodyTooLarge(Exception):
  """The request body passed the size limit while it was being read."""


class BodyTimeout(Exception):
  """The request body did not arrive within the body timeout."""


class BuffersFull(Exception):
  """A body without Content-Length grew past what the server may hold over all requests (--max_buffered_mb)."""

  def __init__(self, response: JSONResponse):
    super().__init__(response.status_code)
    self.response = response


# The page is three static files (no inline script or style): a CSP that allows only those, on
# every answer, and no framing (clickjacking) nor MIME sniffing of the JSON answers.
CONTENT_SECURITY_POLICY = (
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
  "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
  (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
  (b"x-content-type-options", b"nosniff"),
  (b"x-frame-options", b"DENY"),
  (b"referrer-policy", b"no-referrer"),
)
BUSY_RETRY_AFTER_S = 2  # a client refused for the buffers' limit tries again after this


class Buffers:
  """Request-body bytes the server holds over all requests, against one limit (on the event loop only).

  A body with a Content-Length takes it all before its first byte is read; one without takes its
  bytes as they come. Each request gives back what it took when it is answered: the bytes are held
  (as the upload, then its images) until then.
  """

  def __init__(self, limit_bytes: int):
    self.limit_bytes, self.held_bytes = limit_bytes, 0

  def take(self, nbytes: int) -> bool:
    """Takes `nbytes` if they fit under the limit."""
    if self.held_bytes + nbytes > self.limit_bytes:
      return False
    self.held_bytes += nbytes
    return True

  def give(self, nbytes: int) -> None:
    self.held_bytes -= nbytes

  def full(self) -> JSONResponse:
    """The 503 answer: try again shortly."""
    message = (
      f"busy: the server holds {self.held_bytes / 1e6:.0f} MB of request bodies, its limit "
      f"(--max_buffered_mb={self.limit_bytes / 1e6:g}); try again shortly"
    )
    return error(503, message, headers={"Retry-After": str(BUSY_RETRY_AFTER_S), "Connection": "close"})


class Metrics:
  """The server's Prometheus metrics, in a registry of its own (several apps can share a process)."""

  def __init__(self):
    self.registry = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter(
      "agejax_http_requests", "HTTP requests answered, by path and status.", ["path", "status"], registry=self.registry
    )
    self.latency = prometheus_client.Histogram(
      "agejax_http_request_duration_seconds",
      "Time from a request's arrival to its answer's end, by path.",
      ["path"],
      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
      registry=self.registry,
    )
    self.in_flight = prometheus_client.Gauge(
      "agejax_http_requests_in_flight", "Requests being answered now.", registry=self.registry
    )
    self.batch_faces = prometheus_client.Histogram(
      "agejax_batch_faces",
      "Faces in each model call (before padding).",
      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
      registry=self.registry,
    )
    self.padded_faces = prometheus_client.Counter(
      "agejax_batch_padding_faces", "Padding rows added to model calls.", registry=self.registry
    )
    self.images = prometheus_client.Counter(
      "agejax_images_decoded", "Images decoded (and their faces found), by lane.", ["lane"], registry=self.registry
    )
    self.cancelled = prometheus_client.Counter(
      "agejax_requests_cancelled",
      "Requests whose work was cancelled: the client went away, or the graceful shutdown ran out.",
      registry=self.registry,
    )
    self.body_bytes = prometheus_client.Gauge(
      "agejax_http_body_bytes_held",
      "Request-body bytes held over all requests (limited by --max_buffered_mb).",
      registry=self.registry,
    )
    self.model_seconds = prometheus_client.Histogram(
      "agejax_model_call_seconds",
      "Duration of each model call (distributions and summaries).",
      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
      registry=self.registry,
    )

  def on_batch(self, faces: int, size: int, seconds: float) -> None:
    """Records one model call."""
    self.batch_faces.observe(faces)
    self.padded_faces.inc(size - faces)
    self.model_seconds.observe(seconds)


class Guard:
  """Outermost ASGI layer: counts and times every request, enforces the body's limits, answers every error in JSON.

  A declared Content-Length over the limit is answered 413 before any byte of the body is read;
  a body without one (chunked) raises `BodyTooLarge` from `receive` once it passes the limit. A
  body still incomplete `body_timeout_s` after the request arrived raises `BodyTimeout` (408).
  Bodies share `max_buffered_bytes` (`Buffers`): a Content-Length that does not fit is answered 503
  with Retry-After before its body is read, a chunked body that outgrows it raises `BuffersFull`.
  A request cancelled before it answered (the graceful shutdown ran out) gets a JSON 503; an
  exception the app lets out gets the JSON 500 (if nothing was sent yet) and one log line.
  """

  def __init__(
    self,
    app: ASGIApp,
    metrics: Metrics,
    max_body_bytes: int,
    body_timeout_s: float = 60.0,
    max_buffered_bytes: int | None = None,
    *,
    buffers: Buffers | None = None,
  ):
    self.app, self.metrics, self.max_body_bytes, self.body_timeout_s = app, metrics, max_body_bytes, body_timeout_s
    # `buffers`: shared with the server's other endpoints (gRPC); else its own, of `max_buffered_bytes`.
    self.buffers = buffers or Buffers(max_buffered_bytes if max_buffered_bytes is not None else 10 * max_body_bytes)

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = path_label(scope["path"])
    start, status, received, body_done, started = time.perf_counter(), 500, 0, False, False
    held = 0  # body bytes this request took from the shared buffers

    async def counted_send(message: Message) -> None:
      nonlocal status, started
      if message["type"] == "http.response.start":
        status, started = message["status"], True
        message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
      await send(message)

    async def limited_receive() -> Message:
      nonlocal received, body_done
      if body_done:  # the body is in: what comes next is the disconnect, whenever it comes
        return await receive()
      try:
        message = await asyncio.wait_for(receive(), max(0.0, start + self.body_timeout_s - time.perf_counter()))
      except TimeoutError:
        raise BodyTimeout from None
      received += len(message.get("body", b""))
      body_done = message["type"] != "http.request" or not message.get("more_body", False)
      if received > self.max_body_bytes:
        raise BodyTooLarge
      take(received - held)
      return message

    def take(nbytes: int) -> None:
      nonlocal held
      if nbytes > 0:
        if not self.buffers.take(nbytes):
          raise BuffersFull(self.buffers.full())
        held += nbytes
        self.metrics.body_bytes.set(self.buffers.held_bytes)

    self.metrics.in_flight.inc()
    try:
      declared = dict(scope["headers"]).get(b"content-length", b"")
      if declared.isdigit() and int(declared) > self.max_body_bytes:
        await too_large(self.max_body_bytes)(scope, receive, counted_send)
      else:
        try:
          take(int(declared) if declared.isdigit() else 0)  # all of it, before a byte is read
        except BuffersFull as e:
          await e.response(scope, receive, counted_send)
        else:
          await self.app(scope, limited_receive, counted_send)
    except asyncio.CancelledError:  # uvicorn cancels what is left when --graceful_timeout_s runs out
      if started:  # part of an answer went out: uvicorn closes the connection
        raise
      message = "the server is shutting down and this request did not finish in time (--graceful_timeout_s)"
      answered = False
      with contextlib.suppress(Exception):
        await error(503, message, headers={"Connection": "close"})(scope, receive, counted_send)
        answered = True
      if not answered:
        raise
      # Answered: the request ends here. Raising on would have uvicorn log a traceback for each of
      # them, which at a shutdown with hundreds still waiting outlasted the watchdog's second.
      if (task := asyncio.current_task()) is not None:
        task.uncancel()
    except Exception as e:  # a bug, or input nothing refused: JSON like every other error, one log line
      logging.error("%s %s failed: %s: %s", scope["method"], path, type(e).__name__, one_line(e))
      if not started:
        with contextlib.suppress(Exception):
          await internal_error(None, e)(scope, receive, counted_send)
    finally:
      self.buffers.give(held)
      self.metrics.body_bytes.set(self.buffers.held_bytes)
      self.metrics.in_flight.dec()
      self.metrics.requests.labels(path, str(status)).inc()
      self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def path_label(path: str) -> str:
  """A request path's metric label: one of PATHS, "/static", "/v2/models/*/infer" (ready, metadata) or "other"."""
  if path in PATHS:
    return path
  if path.startswith("/static/"):
    return "/static"
  if path.startswith("/v2/models/"):  # the model's name and version are the client's: not labels
    last = path.rsplit("/", 1)[-1]
    return f"/v2/models/*/{last}" if last in ("infer", "ready") else "/v2/models/*"
  return "other"


def too_slow(timeout_s: float) -> JSONResponse:
  """The 408 answer."""
  return error(
    408, f"the request body did not arrive within {timeout_s:g} s (--body_timeout_s)", headers={"Connection": "close"}
  )


def too_large(limit: int) -> JSONResponse:
  """The 413 answer."""
  return error(413, f"request body over the {limit / 1e6:g} MB limit (--max_body_mb)")


def internal_error(request: Any, exc: Exception) -> JSONResponse:
  """The 500 answer of an exception nothing else handled (Starlette's handler for Exception, and Guard's)."""
  return error(500, f"internal error: {type(exc).__name__} (logged by the server)")


def one_line(e: BaseException, limit: int = 300) -> str:
  """An exception's message on one line, cut to `limit` characters."""
  return " ".join(str(e).split())[:limit]


def error(status: int, message: str, *, headers: Mapping[str, str] | None = None, **fields: Any) -> JSONResponse:
  """A JSON error answer: {"error": message, ...fields}."""
  return JSONResponse({"error": message, **fields}, status_code=status, headers=headers)
