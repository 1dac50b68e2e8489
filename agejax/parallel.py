"""Device mesh, shardings and host-local -> global arrays for data-parallel training."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               auto: bool = False) -> None:
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


def make_mesh() -> jax.sharding.Mesh:
  """Returns a 1-D mesh over every device of every process, named 'data'."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (params, optimizer state)."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global jax.Array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_batch_size(batch_size: int, key: str = "batch_size") -> None:
  """Fails unless the global batch splits evenly over devices and processes."""
  n = jax.device_count()
  if batch_size <= 0 or batch_size % n:
    raise ValueError(f"config.{key}={batch_size} must be a positive multiple of the {n} devices")
