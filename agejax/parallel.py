"""Device mesh, shardings and host-local -> global arrays for data-parallel training; the JAX process's set-up."""

import collections
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from agejax import storage

DATA_AXIS = "data"


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False) -> None:
  """Joins a multi-process run before any device is touched; a no-op for a single process.

  `auto` lets JAX discover the cluster (TPU VMs, SLURM); otherwise pass the coordinator's
  host:port, the process count and this process's id (other GPU clusters, or CPU tests).
  """
  if not (auto or coordinator_address):
    return
  # Cross-process collectives of the CPU backend need gloo (CPU clusters, tests); GPUs and TPUs
  # use their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ('' leaves it off): a restart skips recompiling."""
  if directory:
    jax.config.update("jax_compilation_cache_dir", str(storage.path(directory)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def make_mesh() -> jax.sharding.Mesh:
  """Returns a 1-D mesh over every device of every process, named 'data'."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def device_multiple(batch_size: int) -> int:
  """A global batch rounded up to a multiple of the device count, so every device gets an equal slice."""
  n = jax.device_count()
  return -(-batch_size // n) * n


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (params, optimizer state)."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global jax.Array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class InFlight:
  """Bounds how far the host runs ahead of the devices: at most `depth` dispatched programs unfinished.

  Every loop that dispatches multi-device programs goes through one: XLA:CPU with several devices
  aborts in its all-reduce rendezvous when dozens are queued, and on accelerators a longer queue
  only holds memory. Pass an output that is not donated to a later call.
  """

  def __init__(self, depth: int = 2):
    self.depth = depth
    self._pending: collections.deque = collections.deque()

  def add(self, output: Any) -> Any:
    """Records a just-dispatched program's `output`, waits for the oldest beyond `depth`; returns `output`."""
    self._pending.append(output)
    while len(self._pending) > self.depth:
      jax.block_until_ready(self._pending.popleft())
    return output

  def wait(self) -> None:
    """Waits for every recorded program."""
    while self._pending:
      jax.block_until_ready(self._pending.popleft())


def import_tensorflow():
  """Imports TensorFlow with every GPU hidden from it (JAX owns the accelerators); returns the module."""
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  return tf
