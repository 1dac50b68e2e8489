"""How scripts/serve.py runs an app: uvicorn on a socket bound before the model loads, until SIGTERM or Ctrl-C.

`bind` takes the port at once; `run` serves until the signal and finishes the requests in flight; `config`
holds uvicorn's settings, with a deadline on each request's head and a gentle close of idle connections.
"""

import asyncio
import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable

from agejax import errors

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
  app: Callable[..., Awaitable[None]],
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
