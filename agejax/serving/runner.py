"""How scripts/serve.py runs an app: uvicorn on a socket bound before the model loads, until SIGTERM or Ctrl-C.

`exit_on_signal_while_starting` makes a signal during start-up end the process at once (exit 0, one
line); `bind` takes the port at once; `run` serves until the signal and answers every request sent
before it; `finish` then ends the process. `config` holds uvicorn's settings: a deadline on each
request's head and a 16 KB cap on it, a cap on open connections, and a gentle close of idle ones.
"""

import asyncio
import atexit
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from agejax import errors

logger = logging.getLogger("uvicorn.error")

SHUTDOWN_GRACE_S = 0.5  # after SIGTERM, how long an idle connection may still bring a request sent just before
MAX_HEAD_BYTES = 16 * 1024  # a request line and headers, however they arrive
MAX_CONNECTIONS = 1000  # open connections (--max_connections)
REFUSED_HEAD_TIMEOUT_S = 1.0  # a connection over the cap gets this long to send the head its 503 answers
AFTER_GRACE_S = 1.0  # the 503s of requests cut at the grace, and the app's own shutdown, get this long
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The app's lifespan state may list, under this key, `stop(grace_s)` coroutines of its other servers
# (gRPC): called at the signal, when HTTP stops accepting, and awaited within the same grace.
DRAINS = "agejax_drains"


def exit_on_signal_while_starting() -> None:
  """From now until `run` serves, SIGTERM or Ctrl-C ends the process at once: one line, exit 0.

  Called first thing by scripts/serve.py, before it imports JAX or TensorFlow. An exception raised
  from a signal handler lands wherever the main thread happens to be, half-way through importing a
  native library or restoring a checkpoint, and the half-initialised state then crashed the
  interpreter's teardown (segfaults, tracebacks). Nothing has been served yet, so nothing needs to
  be finished: `os._exit` skips the teardown. Its worker processes are killed first.
  """
  for sig in SIGNALS:
    signal.signal(sig, _exit_while_starting)


def _exit_while_starting(signum: int, frame) -> None:
  _exit_now(f"stopped by signal {signal.Signals(signum).name} while starting: nothing was served")


def _exit_now(line: str) -> None:
  """Writes `line` and ends the process with exit code 0, without the interpreter's teardown.

  Its worker processes (the decode sandbox's, still starting) and multiprocessing's fork server are
  killed first: left to find their pipe broken, the workers printed tracebacks.
  """
  with contextlib.suppress(Exception):
    if (multiprocessing := sys.modules.get("multiprocessing")) is not None:
      for child in multiprocessing.active_children():
        child.kill()
    # A worker the fork server is still forking is nobody's child here yet: killing the fork server
    # kills it too (the sandbox's workers die with their parent).
    forkserver = getattr(sys.modules.get("multiprocessing.forkserver"), "_forkserver", None)
    if pid := getattr(forkserver, "_forkserver_pid", None):
      os.kill(pid, signal.SIGKILL)
  with contextlib.suppress(Exception):
    sys.stdout.flush()
    sys.stderr.flush()
  with contextlib.suppress(OSError):
    os.write(2, (line + "\n").encode())
  os._exit(0)


def finish() -> None:
  """Ends the process after `run` returned: atexit handlers run, then exit 0 without the interpreter's teardown.

  Tearing JAX and TensorFlow down took 2-4 s here after every request had been answered; the
  atexit handlers (logs, multiprocessing's children) are all that matters of it.
  """
  for sig in SIGNALS:  # a second signal now changes nothing
    signal.signal(sig, signal.SIG_IGN)
  with contextlib.suppress(Exception):
    atexit._run_exitfuncs()
  with contextlib.suppress(Exception):
    sys.stdout.flush()
    sys.stderr.flush()
  os._exit(0)


def bind(host: str, port: int, *, reuse_port: bool = False, flag: str = "--port") -> socket.socket:
  """Binds the server's TCP socket now (before the model loads): a port in use is one line, at once.

  `reuse_port`: the socket only holds the port for a server that binds it again later (gRPC, with
  SO_REUSEPORT) and then closes this one.
  """
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT does not block a restart
  if reuse_port:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise errors.UserError(
      f"cannot listen on {host}:{port}: {e.strerror or e} (another server on that port? choose one with {flag})"
    ) from None
  return sock


def run(
  app: Callable[..., Awaitable[None]],
  sock: socket.socket,
  graceful_timeout_s: float | None = None,
  *,
  head_timeout_s: float = 10.0,
  keep_alive_s: float = 5.0,
  max_connections: int = MAX_CONNECTIONS,
) -> None:
  """Serves `app` until SIGTERM or Ctrl-C: stops accepting, answers every request sent before the signal, returns.

  A signal before the app has started (its lifespan compiles the model) ends the process at once,
  as `exit_on_signal_while_starting`. After the signal, connections already queued on the socket
  are accepted and answered; requests still running after `graceful_timeout_s` get a JSON 503, and
  `run` returns at most `AFTER_GRACE_S` later (a watchdog ends the process if the app's own
  shutdown hangs).

  Args:
    app: the ASGI app.
    sock: a bound TCP socket (`bind`).
    graceful_timeout_s: how long to wait for requests in flight after the signal (None: as long as they take);
      requests still running then are answered 503.
    head_timeout_s: a connection whose request line and headers take longer is closed (slow clients).
    keep_alive_s: an idle kept-alive connection is closed after this.
    max_connections: open connections; past it the longest idle one is closed, or the new one answered 503.
  """
  server = _Server(
    config(
      app,
      graceful_timeout_s,
      head_timeout_s=head_timeout_s,
      keep_alive_s=keep_alive_s,
      max_connections=max_connections,
    )
  )
  server.run(sockets=[sock])
  if not server.started and not server.should_exit:
    host, port = sock.getsockname()[:2]
    raise errors.UserError(f"could not serve on {host}:{port} (see the log above)")


def config(
  app,
  graceful_timeout_s: float | None = None,
  *,
  head_timeout_s: float = 10.0,
  keep_alive_s: float = 5.0,
  max_connections: int = MAX_CONNECTIONS,
  **options,
):
  """uvicorn's settings for `app` as `run` serves it (`options`: other uvicorn.Config arguments, e.g. log_level)."""
  import uvicorn

  return uvicorn.Config(
    app,
    timeout_graceful_shutdown=graceful_timeout_s,  # type: ignore[arg-type]  # annotated int; a float works
    timeout_keep_alive=keep_alive_s,  # type: ignore[arg-type]
    http=_protocol(head_timeout_s, max_connections),
    # A request head still incomplete with over 16 KB buffered is refused (400); h11 checks between reads,
    # and the protocol checks a head that came whole in one read.
    h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    **{"log_level": "info", **options},
  )


def json_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
  """A whole HTTP/1.1 answer with the one-line JSON error body, closing the connection."""
  from agejax.serving import guard

  body = json.dumps({"error": message}).encode()
  lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, '')}", "content-type: application/json"]
  lines += [f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in headers)]
  lines += [f"{k.decode()}: {v.decode()}" for k, v in guard.SECURITY_HEADERS]
  return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_PHRASES = {400: "Bad Request", 503: "Service Unavailable"}


def _protocol(head_timeout_s: float, max_connections: int):
  """uvicorn's h11 protocol with a deadline and a size cap on each request's head, a cap on connections,
  JSON for its own errors, and a gentler shutdown of idle connections."""
  import h11
  from uvicorn.protocols.http.h11_impl import H11Protocol

  class Connection(h11.Connection):
    """h11's connection, refusing a request head over MAX_HEAD_BYTES however it arrived, and keeping its last error.

    h11 checks its limit only on a head still incomplete after a read: a whole 60 KB head sent in
    one write passed.
    """

    last_error = ""

    def next_event(self):
      try:
        event = super().next_event()
      except h11.RemoteProtocolError as e:
        self.last_error = str(e)
        raise
      if isinstance(event, h11.Request):
        size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) + 14
        if size > MAX_HEAD_BYTES:
          self.last_error = "Receive buffer too long"
          raise h11.RemoteProtocolError(self.last_error, error_status_hint=431)
      return event

  open_connections: dict[Any, float] = {}  # every open connection (a Protocol) -> when it last became idle

  class Protocol(H11Protocol):
    _head_timer: asyncio.TimerHandle | None = None
    _stopping = False
    server_stopping = False  # set on the class at shutdown: the queued connections are all answered

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.conn = Connection(h11.SERVER, self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES)

    def connection_made(self, transport) -> None:
      super().connection_made(transport)
      open_connections[self] = self.loop.time()
      head_timeout = head_timeout_s
      over = len(open_connections) > max_connections and not self.server_stopping
      if over and not self._evict_idle():
        # Every connection is busy with a request: this one is answered 503 once its head is in.
        self.app = _busy
        head_timeout = min(head_timeout_s, REFUSED_HEAD_TIMEOUT_S)
      self._head_timer = self.loop.call_later(head_timeout, self._head_too_slow)

    def _evict_idle(self) -> bool:
      """Closes the connection idle the longest (no request in the app): idle sockets can't crowd out requests."""
      idle = [(since, c) for c, since in open_connections.items() if c is not self and c._waiting_for_head()]
      if not idle:
        return False
      _, oldest = min(idle, key=lambda pair: pair[0])
      oldest._close()
      return True

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

    def on_response_complete(self) -> None:
      if self in open_connections:
        open_connections[self] = self.loop.time()
      super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
      open_connections.pop(self, None)
      self._cancel_head_timer()
      super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
      # uvicorn's own is plain text; every answer of this server is one JSON line.
      reason = getattr(self.conn, "last_error", "")
      if reason == "Receive buffer too long":
        message = f"request head over {MAX_HEAD_BYTES // 1024} KB"
      else:
        message = f"bad HTTP request: {reason or msg}"
      self.logger.warning("refused a request: %s", message)
      with contextlib.suppress(Exception):
        self.transport.write(json_response(400, message))
      self._close()

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

    def _waiting_for_head(self) -> bool:
      return self._idle() and not self.transport.is_closing()

    def _close_if_idle(self) -> None:
      # Part of a head already here: its request was sent before the signal (the head timer ends a stalled one).
      if self._idle() and not self.transport.is_closing() and not self.conn.trailing_data[0]:
        super().shutdown()

    def _close(self) -> None:
      with contextlib.suppress(h11.LocalProtocolError):
        self.conn.send(h11.ConnectionClosed())
      self.transport.close()

    def _cancel_head_timer(self) -> None:
      if self._head_timer is not None:
        self._head_timer.cancel()
        self._head_timer = None

    def _head_too_slow(self) -> None:
      self._head_timer = None
      if self._idle() and not self.transport.is_closing():
        if self.app is not _busy:
          self.logger.warning("closed a connection whose request head took over %g s", head_timeout_s)
        self._close()

  return Protocol


async def _busy(scope, receive, send) -> None:
  """The answer of a connection over --max_connections while every other one is busy."""
  from agejax.serving import guard

  message = "busy: the server has as many connections open as it takes (--max_connections); try again shortly"
  headers = {"Retry-After": str(guard.BUSY_RETRY_AFTER_S), "Connection": "close"}
  headers.update((k.decode(), v.decode()) for k, v in guard.SECURITY_HEADERS)
  await guard.error(503, message, headers=headers)(scope, receive, send)


def _server_class():
  import uvicorn

  class Server(uvicorn.Server):
    """uvicorn's server: signals handled as `run` says, the listen queue answered, the shutdown bounded."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
      # uvicorn's own re-raises the signal once it is done, which a default handler turns into a
      # kill; here a graceful stop returns, and the process exits 0.
      if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
      previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
      try:
        yield
      finally:
        for sig, handler in previous.items():  # serve.py's start-up handler no longer applies: finish() follows
          signal.signal(sig, signal.SIG_IGN if handler is _exit_while_starting else handler)

    def handle_exit(self, sig: int, frame) -> None:
      if not self.started:  # the lifespan is still compiling the model: nothing to finish
        _exit_while_starting(sig, frame)
      if not self.should_exit:
        self.signalled_at = time.monotonic()
        if self.config.timeout_graceful_shutdown is not None:
          deadline = self.config.timeout_graceful_shutdown + AFTER_GRACE_S
          threading.Thread(target=_watchdog, args=(deadline,), name="shutdown-watchdog", daemon=True).start()
      super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
      # uvicorn's, with the connections already queued on the listening socket accepted first (closing
      # it would reset them, their requests sent but unanswered), and the time after the grace bounded.
      logger.info("Shutting down")
      self.config.http_protocol_class.server_stopping = True  # type: ignore[attr-defined]
      await self._accept_queued(sockets or [])
      for server in self.servers:
        server.close()
      for sock in sockets or []:
        sock.close()
      for connection in list(self.server_state.connections):
        connection.shutdown()
      grace = self.config.timeout_graceful_shutdown  # counted from the signal
      since = time.monotonic() - getattr(self, "signalled_at", time.monotonic())
      left = None if grace is None else max(0.0, grace - since)
      drains = [asyncio.ensure_future(stop(left)) for stop in self.lifespan.state.get(DRAINS, ())]
      await asyncio.sleep(0.1)
      try:
        await asyncio.wait_for(self._wait_tasks_to_complete(), timeout=left)
      except TimeoutError:
        tasks = list(self.server_state.tasks)
        logger.error("Cancel %s running task(s), timeout graceful shutdown exceeded", len(tasks))
        for task in tasks:
          task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if tasks:  # their JSON 503s go out (guard.Guard) before the app shuts down
          await asyncio.wait(tasks, timeout=AFTER_GRACE_S / 2)
      if drains:  # the other servers' calls: those still running at the grace were cancelled by their stop
        await asyncio.wait(drains, timeout=None if left is None else left + AFTER_GRACE_S / 2)
      if not self.force_exit:
        await self.lifespan.shutdown()

    async def _accept_queued(self, sockets: list[socket.socket]) -> None:
      loop = asyncio.get_running_loop()
      for listener in sockets:
        while True:
          try:
            conn, _ = listener.accept()
          except (BlockingIOError, InterruptedError):
            break
          except OSError as e:  # e.g. out of file descriptors: the rest stay queued, and are reset
            logger.warning("could not accept a queued connection at shutdown: %s", e)
            break
          conn.setblocking(False)
          protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
          )
          await loop.connect_accepted_socket(functools.partial(_same, protocol), conn)

  return Server


def _same(protocol: asyncio.Protocol) -> asyncio.Protocol:
  return protocol


def _watchdog(deadline_s: float) -> None:
  """Ends the process if the shutdown is still running `deadline_s` after the signal (the app's own shutdown hung)."""
  time.sleep(deadline_s)
  _exit_now(f"the shutdown was still running {deadline_s:g} s after the signal (--graceful_timeout_s + 1): exiting")


def _Server(config):  # noqa: N802  (a class made on first use: uvicorn is imported lazily)
  return _server_class()(config)
