"""scripts/serve.py in a subprocess on a free loopback port, for the tests and the benchmark; or an app in a thread."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
  """Returns a TCP port that was free on 127.0.0.1 a moment ago."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LocalServer:
  """Starts `python SCRIPT FLAGS --host 127.0.0.1 --port P` and waits until /healthz answers; a context manager.

  Args:
    script: the path of scripts/serve.py.
    flags: its flags, e.g. ['--workdir', DIR, '--max_batch=1'].
    env: the subprocess's environment (default: this one's).
    startup_timeout_s: longest wait for /healthz (restoring and compiling every batch size).
  """

  def __init__(
    self, script: str | os.PathLike, flags: list[str], env: dict[str, str] | None = None, startup_timeout_s: float = 180
  ):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = tempfile.NamedTemporaryFile("w+", prefix="agejax-serve-", suffix=".log", delete=False)
    command = [sys.executable, str(script), *flags, "--host", "127.0.0.1", "--port", str(self.port)]
    self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + startup_timeout_s
    while not self._healthy():
      code = self.process.poll()
      if code is not None or time.monotonic() > deadline:
        self.stop(timeout_s=10)
        what = f"exited with code {code}" if code is not None else f"did not answer in {startup_timeout_s:g} s"
        raise RuntimeError(f"{script} {what}; its log ends:\n{self.output()[-3000:]}")
      time.sleep(0.2)

  def _healthy(self) -> bool:
    try:
      with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
        return response.status == 200
    except OSError:
      return False

  def output(self) -> str:
    """The server's log so far."""
    return Path(self.log.name).read_text(errors="replace")

  def stop(self, timeout_s: float = 30) -> int:
    """Sends SIGTERM, waits up to `timeout_s` for a graceful exit (then kills it); returns the exit code."""
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.log.close()
    return self.process.returncode

  def __enter__(self) -> "LocalServer":
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
    os.unlink(self.log.name)


@contextlib.contextmanager
def in_thread(app: Any, stop_wait_s: float = 10.0, **config: Any) -> Iterator[str]:
  """The URL of APP served by uvicorn in a thread of this process as serve.py configures it, on a free loopback port.

  Args:
    app: the ASGI app (`app.create_app`'s).
    stop_wait_s: how long leaving the block waits for the server's thread to end.
    **config: `runner.config`'s keyword arguments (head_timeout_s, log_level, max_connections, ...).
  """
  import uvicorn

  from agejax.serving import runner

  sock = runner.bind("127.0.0.1", 0)
  server = uvicorn.Server(runner.config(app, 1.0, **config))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      raise RuntimeError("uvicorn did not start")
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(stop_wait_s)
    sock.close()
