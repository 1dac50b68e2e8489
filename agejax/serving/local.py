"""scripts/serve.py in a subprocess on a free loopback port, for the tests and the benchmark."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


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
