"""Throughput of the real JAX train step (images/s, FLOPs, utilisation) and what every benchmark shares.

The PyTorch baseline is `benchmarking_torch`, whole-run benchmarks (loop, start-up, input) are
`benchmarking_runs`. Imports neither TensorFlow, TFDS nor CLU, so `benchmark.py train` and `torch`
run on a GPU host with only jax, flax, optax, torch and torchvision.
"""

import functools
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agejax import metrics, models, parallel, settings
from agejax.training import learner

# Dense bf16 matrix peak per chip (datasheet), for model FLOP utilisation.
PEAK_BF16_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "L4": 121e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6": 918e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Datasheet bf16 peak of the device, or None where unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in kind.lower()), None)


@functools.cache
def matmul_flops_per_s(dtype: str, size: int | None = None, repeats: int = 5) -> float:
  """Measured FLOP/s of one device's square matrix product in `dtype`: the practical peak for MFU.

  Datasheet peaks overstate what any program reaches (the H200's 989 TFLOP/s bf16 vs ~790 measured
  by plain matrix products), so utilisation is also reported against this rate.
  """
  device = jax.devices()[0]
  n = size or (8192 if device.platform != "cpu" else 1024)
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  dot = jax.jit(lambda x: x @ x)
  jax.block_until_ready(dot(a))  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(dot(a))
    times.append(time.perf_counter() - t0)
  return 2.0 * n**3 / statistics.median(times)


def xla_flops(compiled: jax.stages.Compiled) -> float:
  """FLOPs that XLA's cost analysis counts for one call of a compiled function (0 if it has none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def bench_config(base, batch: int, dtype: str, image_size: int, width: float):
  """A copy of the training config `base` at the benchmark's batch, dtype, input size and width."""
  config = base.copy_and_resolve_references()
  config.batch_size, config.model.dtype = batch, dtype
  config.data.image_size, config.model.width_multiplier = image_size, width
  return config


def speed(
  times: list[float],
  batch: int,
  forward_flops: float,
  dtype: str,
  devices: int = 1,
  peak: float | None = None,
) -> dict[str, float | None]:
  """Images/s, step times and model FLOP utilisation (3x the analytic forward) of per-step `times`.

  `forward_flops` is one image's analytic forward pass; `mfu_matmul` is over the measured
  matrix-product rate in `dtype`; `mfu` over the datasheet `peak`, for bfloat16 only.
  """
  step_s = statistics.median(times)
  model_flops_per_s = 3.0 * forward_flops * batch / step_s
  matmul = matmul_flops_per_s(dtype)
  return {
    "images_per_s": batch / step_s,
    "step_ms_median": 1e3 * step_s,
    "step_ms_min": 1e3 * min(times),
    "step_ms_max": 1e3 * max(times),
    "matmul_tflops": matmul / 1e12,
    "mfu_matmul": model_flops_per_s / (matmul * devices),
    "mfu": model_flops_per_s / (peak * devices) if peak and dtype == "bfloat16" else None,
  }


def time_steps(fn, carry, batch, num_steps: int, repeats: int) -> list[float]:
  """Per-step seconds of `num_steps` chained calls, once per repeat, after the carry is ready."""
  times = []
  for _ in range(repeats):
    jax.block_until_ready(carry)
    in_flight = parallel.InFlight()  # two steps queued keep the device busy, as in the train loop
    t0 = time.perf_counter()
    for _ in range(num_steps):
      carry = fn(*carry[:2], batch)
      in_flight.add(carry[2])  # the loss: not donated to the next step
    jax.block_until_ready(carry)
    times.append((time.perf_counter() - t0) / num_steps)
  return times


def jax_train(config: ml_collections.ConfigDict, num_steps: int = 20, repeats: int = 3) -> dict[str, Any]:
  """Times the trainer's own jitted train step (augmentation included) on device-resident uint8 data.

  Args:
    config: the training config (see `bench_config`): model, batch, dtype and input size.
    num_steps: chained steps per timed repeat.
    repeats: timed repeats; the step time is their median.

  Returns:
    A row: images/s, step times, utilisation, compile time and FLOP counts.
  """
  mesh = parallel.make_mesh()
  cfg = settings.Settings.from_config(config)  # no check of model.pretrained: timing needs no weights
  models.load_plugins(cfg.run.plugins)
  fns, state, _ = learner.create(cfg, steps_per_epoch=100)
  rep, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state = jax.device_put(state, rep)
  train_step = learner.jit_train_step(fns, rep, sharded)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  host = {
    "image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
    "age": rng.integers(1, 91, config.batch_size).astype(np.float32),
    "age_std": np.zeros(config.batch_size, np.float32),
  }
  data = jax.device_put(host, sharded)
  sums = jax.device_put(metrics.zeros(), rep)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, sums, data).compile()
  compile_s = time.perf_counter() - t0
  flops = xla_flops(compiled)
  carry = compiled(state, sums, data)  # warm-up
  times = time_steps(compiled, carry, data, num_steps, repeats)
  width, n = config.model.width_multiplier, jax.device_count()
  compute = models.compute_dtype(config.model.dtype).name
  forward = models.forward_flops(cfg.model, size, len(fns.bins))
  return {
    "mode": "train",
    "framework": "jax",
    "device": jax.devices()[0].device_kind,
    "devices": n,
    "batch": config.batch_size,
    "dtype": config.model.dtype,
    "image_size": size,
    "width": width,
    "model": cfg.model.name,
    **speed(times, config.batch_size, forward, compute, n, peak_flops()),
    "compile_s": compile_s,
    "xla_gflop_per_image": flops / config.batch_size / 1e9,
    "analytic_gflop_per_image": 3.0 * forward / 1e9,
  }


def bare_steps_per_s(config, num_steps: int = 50) -> float:
  """Steps/s of only the jitted train step, chained on one device-resident batch."""
  r = jax_train(config, num_steps=num_steps, repeats=1)
  return 1e3 / r["step_ms_median"]


def best_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """The fastest row of each framework, by images/s."""
  best: dict[str, dict[str, Any]] = {}
  for r in rows:
    if r["framework"] not in best or r["images_per_s"] > best[r["framework"]]["images_per_s"]:
      best[r["framework"]] = r
  return best


def environment() -> dict[str, Any]:
  """Hardware and library versions to record beside benchmark numbers."""
  import importlib.metadata
  import platform
  import subprocess

  env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision"):
    try:
      env[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      env[name] = None
  device = jax.devices()[0]
  env.update(
    backend=device.platform,
    device_kind=device.device_kind,
    devices=jax.device_count(),
    platform_version=getattr(device.client, "platform_version", None),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
  )
  try:
    env["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
  return env
