"""--config.profile_steps: a jax.profiler trace of a few train steps in WORKDIR/plugins/profile (TensorBoard)."""

import os
import shutil
import socket
import tempfile

import jax
from etils import epath

from agejax import parallel, storage


class Profiler:
  """Traces `num_steps` train steps after the first log step into WORKDIR/plugins/profile.

  The trace goes to a local folder first and is then copied: the profiler writes local files, and
  the workdir may be a bucket. TensorBoard's profile tab shows it.
  """

  def __init__(self, workdir: epath.Path, num_steps: int, log_every: int, start: int):
    self.workdir, self.num_steps = workdir, num_steps
    self.first = (start // log_every + 1) * log_every  # the first log step of this run
    self.last = self.first + num_steps
    self._local: str | None = None

  def before(self, step: int) -> None:
    """Starts tracing before `step` when it is the first traced one."""
    if self.num_steps and step == self.first + 1:
      self._local = tempfile.mkdtemp(prefix="agejax-profile-")
      jax.profiler.start_trace(self._local)

  def after(self, step: int, in_flight: parallel.InFlight, last: bool) -> None:
    """Stops tracing after `step` when it is the last traced one (or the run's last), and copies the trace."""
    if self._local is None or not (step == self.last or last):
      return
    in_flight.wait()  # the traced steps have run on the device
    jax.profiler.stop_trace()
    run = storage.check_writable(
      self.workdir / "plugins" / "profile" / f"train_steps_{self.first + 1}-{step}", "profile folder"
    )
    # Several processes share a host name on one machine: keep their files apart.
    prefix = f"process{jax.process_index()}." if jax.process_count() > 1 else ""
    for root, _, files in os.walk(self._local):
      for name in files:
        epath.Path(root, name).copy(run / f"{prefix}{name}", overwrite=True)
    shutil.rmtree(self._local, ignore_errors=True)
    self._local = None
    print(f"profiled train steps {self.first + 1}-{step} on {socket.gethostname()}: {run}", flush=True)
