"""Serving a trained model over HTTP: the app, its dynamic batcher, and how scripts/serve.py runs it.

`app.create_app` builds the Starlette app (POST /v1/predict, the page at /, /healthz, /metrics);
`batcher.Batcher` gathers faces from concurrent requests into padded, precompiled model calls;
`limits.Scheduler` starts decodes fairly across requests within a byte budget; `guard` counts and
times requests for Prometheus and enforces the body's size and time limits; `run` serves
an app with uvicorn until SIGTERM or Ctrl-C, finishing the requests in flight. `local` starts
scripts/serve.py on a free loopback port and `benchmark` measures it (tests, benchmark.py serve).
"""

import asyncio
import contextlib
import signal
import socket

from agejax import errors, storage


def load_model(
  workdir: storage.Location | None,
  export: storage.Location | None,
  checkpoint: str = "best",
  max_batch: int = 32,
  *,
  calibrated: bool = True,
  flip: bool = False,
):
  """Restores the model to serve: a training workdir's checkpoint, or an exported model.

  Args:
    workdir: a training workdir (exclusive with `export`).
    export: a folder written by scripts/export.py.
    checkpoint: the workdir's checkpoint: 'best', 'latest' or a step number.
    max_batch: the most faces the server puts in one model call.
    calibrated: apply the workdir's calibration.json calibration (an export has its own baked in).
    flip: average each face's distribution with its mirror image's, calibrated by calibration.json's
      flip temperature; an export predicts as it was exported, and refuses `flip` if made without it.

  Returns:
    An `prediction.Predictor` or an `export.ExportedPredictor`.
  """
  if (workdir is None) == (export is None):
    raise errors.UserError("give exactly one of --workdir DIR (a training workdir) or --export OUT (export.py's)")
  if export is not None:
    if not calibrated:
      raise errors.UserError("--no-calibration applies to --workdir: an export carries its temperature (export.py)")
    from agejax.inference import export as exporting

    exported = exporting.ExportedPredictor(export, batch_size=max_batch)
    if flip and not exported.flip:
      raise errors.UserError(
        f"--flip: {export} was exported without flip averaging; export it with --flip (an export predicts as it "
        f"was exported)"
      )
    return exported
  from agejax.inference import prediction

  assert workdir is not None  # exactly one of the two was given, and it is not export
  return prediction.Predictor(workdir, checkpoint, batch_size=max_batch, calibrated=calibrated, flip=flip)


SHUTDOWN_GRACE_S = 0.5  # after SIGTERM, how long an idle connection may still bring a request sent just before


def bind(host: str, port: int) -> socket.socket:
  """Binds the server's TCP socket now (before the model loads): a port in use is one line, at once."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT does not block a restart
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise errors.UserError(
      f"cannot listen on {host}:{port}: {e.strerror or e} (another server on that port? choose one with --port)"
    ) from None
  return sock


def run(
  app,
  sock: socket.socket,
  graceful_timeout_s: float | None = None,
  *,
  head_timeout_s: float = 10.0,
  keep_alive_s: float = 5.0,
) -> None:
  """Serves `app` until SIGTERM or Ctrl-C: stops accepting, finishes the requests in flight, returns.

  Args:
    app: the ASGI app.
    sock: a bound TCP socket (`bind`).
    graceful_timeout_s: how long to wait for requests in flight after the signal (None: as long as they take);
      requests still running then are answered 503.
    head_timeout_s: a connection whose request line and headers take longer is closed (slow clients).
    keep_alive_s: an idle kept-alive connection is closed after this.
  """
  # uvicorn re-raises the signal it shut down on once it is done; a handler of our own turns that
  # into a normal return, so the process exits 0 after a graceful stop (the default would kill it).
  previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    server = _Server(config(app, graceful_timeout_s, head_timeout_s=head_timeout_s, keep_alive_s=keep_alive_s))
    server.run(sockets=[sock])
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if not server.started and not server.should_exit:
    host, port = sock.getsockname()[:2]
    raise errors.UserError(f"could not serve on {host}:{port} (see the log above)")


def config(
  app, graceful_timeout_s: float | None = None, *, head_timeout_s: float = 10.0, keep_alive_s: float = 5.0, **options
):
  """uvicorn's settings for `app` as `run` serves it (`options`: other uvicorn.Config arguments, e.g. log_level)."""
  import uvicorn

  return uvicorn.Config(
    app,
    timeout_graceful_shutdown=graceful_timeout_s,  # type: ignore[arg-type]  # annotated int; a float works
    timeout_keep_alive=keep_alive_s,  # type: ignore[arg-type]
    http=_protocol(head_timeout_s),
    # A request head still incomplete with over 16 KB buffered is refused (400); h11 checks between reads.
    h11_max_incomplete_event_size=16 * 1024,
    **{"log_level": "info", **options},
  )


def _protocol(head_timeout_s: float):
  """uvicorn's h11 protocol, with a deadline on each request's head and a gentler shutdown of idle connections."""
  import h11
  from uvicorn.protocols.http.h11_impl import H11Protocol

  class Protocol(H11Protocol):
    _head_timer: asyncio.TimerHandle | None = None
    _stopping = False

    def connection_made(self, transport) -> None:
      super().connection_made(transport)
      self._head_timer = self.loop.call_later(head_timeout_s, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
      if self._idle() and self._head_timer is None:  # the first bytes of the next request's head
        self._head_timer = self.loop.call_later(head_timeout_s, self._head_too_slow)
      super().data_received(data)

    def handle_events(self) -> None:
      super().handle_events()
      if not self._idle():  # a request's head is complete: its body has the app's own timeout
        self._cancel_head_timer()
        if self._stopping:
          self.cycle.keep_alive = False

    def connection_lost(self, exc: Exception | None) -> None:
      self._cancel_head_timer()
      super().connection_lost(exc)

    def shutdown(self) -> None:
      # A request sent just before the signal may still be on its way on an idle connection:
      # give it a moment before closing, and close after answering it.
      self._stopping = True
      if self._idle():
        self.loop.call_later(SHUTDOWN_GRACE_S, self._close_if_idle)
      else:
        super().shutdown()

    def _idle(self) -> bool:
      return self.cycle is None or self.cycle.response_complete

    def _close_if_idle(self) -> None:
      if self._idle() and not self.transport.is_closing():
        super().shutdown()

    def _cancel_head_timer(self) -> None:
      if self._head_timer is not None:
        self._head_timer.cancel()
        self._head_timer = None

    def _head_too_slow(self) -> None:
      self._head_timer = None
      if self._idle() and not self.transport.is_closing():
        self.logger.warning("closed a connection whose request head took over %g s", head_timeout_s)
        with contextlib.suppress(h11.LocalProtocolError):
          self.conn.send(h11.ConnectionClosed())
        self.transport.close()

  return Protocol


def _server_class():
  import uvicorn

  class Server(uvicorn.Server):
    async def shutdown(self, sockets=None) -> None:
      # Connections already queued on the listening socket when the signal came are accepted and answered.
      await asyncio.sleep(SHUTDOWN_GRACE_S / 5)
      await super().shutdown(sockets)

  return Server


def _Server(config):  # noqa: N802  (a class made on first use: uvicorn is imported lazily)
  return _server_class()(config)
