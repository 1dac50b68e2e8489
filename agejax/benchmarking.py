"""Throughput benchmarks: the real train step (JAX and PyTorch side by side), loop overhead, input.

Imports neither TensorFlow, TFDS nor CLU unless a mode needs a dataset, so `train` and `torch`
run on a GPU host with only jax, flax, optax, torch and torchvision.
"""

import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agejax import augment, errors, metrics, models, parallel, steps

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
  image_size: int,
  num_bins: int,
  width: float,
  dtype: str,
  devices: int = 1,
  peak: float | None = None,
) -> dict[str, float | None]:
  """Images/s, step times and model FLOP utilisation (3x the analytic forward) of per-step `times`.

  `mfu_matmul` is over the measured matrix-product rate in `dtype`; `mfu` over the datasheet
  `peak`, for bfloat16 only.
  """
  step_s = statistics.median(times)
  model_flops_per_s = 3.0 * models.forward_flops(image_size, num_bins, width) * batch / step_s
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


def jax_train(config, num_steps: int = 20, repeats: int = 3) -> dict[str, Any]:
  """Times the trainer's own jitted train step (augmentation included) on device-resident uint8 data.

  Args:
    config: the training config (see `bench_config`): model, batch, dtype and input size.
    num_steps: chained steps per timed repeat.
    repeats: timed repeats; the step time is their median.

  Returns:
    A row: images/s, step times, utilisation, compile time and FLOP counts.
  """
  mesh = parallel.make_mesh()
  fns, state, _ = steps.create(config, steps_per_epoch=100)
  rep, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state = jax.device_put(state, rep)
  train_step = steps.jit_train_step(fns, rep, sharded)
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
  return {
    "mode": "train",
    "framework": "jax",
    "device": jax.devices()[0].device_kind,
    "devices": n,
    "batch": config.batch_size,
    "dtype": config.model.dtype,
    "image_size": size,
    "width": width,
    **speed(times, config.batch_size, size, len(fns.bins), width, compute, n, peak_flops()),
    "compile_s": compile_s,
    "xla_gflop_per_image": flops / config.batch_size / 1e9,
    "analytic_gflop_per_image": 3.0 * models.forward_flops(size, len(fns.bins), width) / 1e9,
  }


def bare_steps_per_s(config, num_steps: int = 50) -> float:
  """Steps/s of only the jitted train step, chained on one device-resident batch."""
  r = jax_train(config, num_steps=num_steps, repeats=1)
  return 1e3 / r["step_ms_median"]


def loop(config, workdir: str, num_steps: int = 60) -> dict[str, Any]:
  """Full training loop (host pipeline, logging, metrics, checkpoints) vs the bare jitted step."""
  from agejax import train

  if num_steps <= config.log_every_steps:
    raise errors.UserError(
      f"loop: num_steps={num_steps} must exceed log_every_steps={config.log_every_steps}: the "
      f"loop rate is timed between the first and last log fetch"
    )
  config.num_train_steps = num_steps
  final = train.train_and_evaluate(config, workdir)
  bare = bare_steps_per_s(config, num_steps)
  return {
    "mode": "loop",
    "loop_steps_per_s": final["train_steps_per_s"],
    "bare_steps_per_s": bare,
    "ratio": final["train_steps_per_s"] / bare,
    "batch": config.batch_size,
  }


def startup(
  config, config_file: str, variant: str, train_script: str, data_dir: str = "", num_steps: int = 2
) -> dict[str, Any]:
  """Time to the first finished train step of `scripts/train.py`, with a cold then a warm compilation cache.

  Both runs start from scratch in fresh workdirs with the dataset already prepared, so they differ
  only in the cache; `first_step_s` counts from `train_and_evaluate`'s start (data, model, compile).
  """
  import json
  import subprocess
  import sys
  import tempfile
  from pathlib import Path

  from agejax.data import pipeline

  config = config.copy_and_resolve_references()
  config.data.data_dir = data_dir
  for split in ("train", config.data.eval_split):  # prepare outside the timed runs
    pipeline.load_split(config.data, split)
  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in ("cold", "warm"):
      workdir = Path(tmp) / name
      t0 = time.perf_counter()
      subprocess.run(
        [
          sys.executable,
          train_script,
          "--config",
          f"{config_file}:{variant}",
          "--workdir",
          str(workdir),
          f"--config.data.data_dir={data_dir}",
          f"--config.compilation_cache_dir={tmp}/cache",
          f"--config.num_train_steps={num_steps}",
          f"--config.eval_every_steps={num_steps}",
          f"--config.log_every_steps={num_steps}",
        ],
        check=True,
        capture_output=True,
      )
      runs[name] = (json.loads((workdir / "final_metrics.json").read_text())["first_step_s"], time.perf_counter() - t0)
  return {
    "mode": "startup",
    "config": variant,
    "cold_first_step_s": runs["cold"][0],
    "warm_first_step_s": runs["warm"][0],
    "ratio": runs["warm"][0] / runs["cold"][0],
    "cold_process_s": runs["cold"][1],
    "warm_process_s": runs["warm"][1],
  }


def input_pipeline(
  name: str,
  data_dir: str = "",
  builder_config: str = "",
  batch: int = 256,
  num_batches: int = 200,
  split: str = "train",
) -> dict[str, Any]:
  """Images/s of the host pipeline delivering ready uint8 batches, timed after a short warm-up.

  The gather runs in one thread (the trainer's prefetch thread), so `images_per_s_per_core` is the
  single-thread rate and `cores` is 1; `host_cpus` is only what the machine has.
  """
  import ml_collections

  from agejax.data import pipeline

  cfg = ml_collections.ConfigDict({"name": name, "data_dir": data_dir, "builder_config": builder_config})
  data = pipeline.load_split(cfg, split)
  batches = pipeline.TrainBatches(data, batch, seed=0, process_index=0, process_count=1)
  for s in range(3):  # warm the page cache and the permutation
    batches.local_batch(s)
  t0 = time.perf_counter()
  for s in range(num_batches):
    out = batches.local_batch(s)
  dt = time.perf_counter() - t0
  rate = num_batches * batch / dt
  cores = 1  # the gather runs in one thread
  return {
    "mode": "input",
    "dataset": name,
    "examples": len(data),
    "image_shape": list(out["image"].shape[1:]),
    "batch": batch,
    "images_per_s": rate,
    "images_per_s_per_core": rate / cores,
    "cores": cores,
    "host_cpus": os.cpu_count(),
  }


def torch_vgg16(num_bins: int, width: float = 1.0):
  """torchvision's VGG16 with its classifier's last layer replaced by the age head (scaled by width)."""
  import torch
  from torchvision.models import vgg

  cfg = [v if v == "M" else models.scaled(v, width) for v in models.VGG16_LAYERS]
  model = vgg.VGG(vgg.make_layers(cfg), num_classes=num_bins, init_weights=True)
  hidden, channels = models.scaled(models.HIDDEN, width), cfg[-2]
  if width != 1.0:
    model.classifier = torch.nn.Sequential(
      torch.nn.Linear(channels * 49, hidden),
      torch.nn.ReLU(True),
      torch.nn.Dropout(),
      torch.nn.Linear(hidden, hidden),
      torch.nn.ReLU(True),
      torch.nn.Dropout(),
      torch.nn.Linear(hidden, num_bins),
    )
  return model


def torch_train_step(num_bins: int, width: float, device: str, amp: bool, fused: bool) -> Callable:
  """A PyTorch train step(images, ages) of torchvision's VGG16 + age head with KL loss and Adam.

  It converts uint8 to float, flips and normalises on the device; it does not do the JAX step's
  random crop, brightness and contrast, which only favours PyTorch.
  """
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  bins = torch.arange(1, num_bins + 1, device=device, dtype=torch.float32)
  model = torch_vgg16(num_bins, width).to(device).to(memory_format=torch.channels_last).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
  mean = torch.tensor(augment.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(augment.IMAGENET_STD, device=device).view(1, 3, 1, 1)

  def step(images, ages):
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    flip = torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5
    x = torch.where(flip, x.flip(3), x)
    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
      logits = model(x)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    target = torch.softmax(-0.5 * ((bins[None] - ages[:, None]) / 2.0) ** 2, dim=-1)
    loss = F.kl_div(log_probs, target, reduction="batchmean")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return step


def torch_train(
  batch: int = 64,
  dtype: str = "bfloat16",
  image_size: int = 224,
  num_steps: int = 20,
  repeats: int = 3,
  width: float = 1.0,
  *,
  compiled: bool = False,
) -> dict[str, Any]:
  """Times the same model, KL loss, Adam and batch in PyTorch: eager AMP + channels_last, or torch.compile.

  Eager on CUDA uses the fused Adam kernel, PyTorch's fastest eager optimizer.
  """
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  num_bins, amp = 100, dtype == "bfloat16"
  step = torch_train_step(num_bins, width, device, amp, fused=device == "cuda" and not compiled)
  fn = torch.compile(step) if compiled else step
  images = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, device=device)
  ages = torch.randint(1, 91, (batch,), device=device).float()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(3):  # warm-up (and compilation)
    fn(images, ages)
  sync()
  warmup_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(num_steps):
      fn(images, ages)
    sync()
    times.append((time.perf_counter() - t0) / num_steps)
  del fn, step, images, ages  # give the memory back before the next run
  if compiled:
    torch._dynamo.reset()  # compiled graphs keep references to the parameters
  if device == "cuda":
    torch.cuda.empty_cache()
  name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  # The matrix-product rate is measured through JAX, on the same machine.
  return {
    "mode": "train",
    "framework": "torch.compile" if compiled else "torch eager" + (" amp" if amp else ""),
    "device": name,
    "devices": 1,
    "batch": batch,
    "dtype": dtype,
    "image_size": image_size,
    "width": width,
    **speed(times, batch, image_size, num_bins, width, dtype, peak=peak_flops() if device == "cuda" else None),
    "compile_s": warmup_s,
  }


def side_by_side(
  base,
  batches: list[int],
  dtype: str = "bfloat16",
  image_size: int = 224,
  num_steps: int = 20,
  repeats: int = 3,
  width: float = 1.0,
  *,
  torch_modes: str = "eager+compile",
  compile_at: str = "all",
) -> list[dict[str, Any]]:
  """JAX, PyTorch eager and torch.compile at each batch; each PyTorch row gets `jax_speedup` at its batch.

  `torch_modes` is 'none', 'eager' or 'eager+compile'; `compile_at='best'` compiles only at the
  batch where PyTorch eager was fastest (torch.compile takes minutes per batch on VGG16).
  """
  jax_rows = {b: jax_train(bench_config(base, b, dtype, image_size, width), num_steps, repeats) for b in batches}
  rows = list(jax_rows.values())
  if torch_modes == "none":
    return rows
  eager = {b: torch_train(b, dtype, image_size, num_steps, repeats, width) for b in batches}
  compile_batches = (
    []
    if torch_modes == "eager"
    else (batches if compile_at == "all" else [max(eager, key=lambda b: eager[b]["images_per_s"])])
  )
  compiled = [torch_train(b, dtype, image_size, num_steps, repeats, width, compiled=True) for b in compile_batches]
  for r in (*eager.values(), *compiled):
    r["jax_speedup"] = jax_rows[r["batch"]]["images_per_s"] / r["images_per_s"]
  return sorted(rows + list(eager.values()) + compiled, key=lambda r: r["batch"])  # stable: JAX first


def best_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """The fastest row of each framework, by images/s."""
  best = {}
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
