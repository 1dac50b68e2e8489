"""The PyTorch baseline: the backbone's PyTorch twin with the same age head, its train step timed as the JAX one is.

`side_by_side` runs JAX, PyTorch eager and torch.compile at the same batches (`benchmark.py train`).
"""

import time
from collections.abc import Callable
from typing import Any

from agejax import errors, models, settings
from agejax.benchmarks.jax_step import bench_config, jax_train, peak_flops, speed


def torch_train_step(
  model_settings: settings.ModelSettings, num_bins: int, device: str, amp: bool, fused: bool
) -> Callable:
  """A PyTorch train step(images, ages) of the backbone's PyTorch twin + age head with KL loss and Adam.

  It converts uint8 to float, flips and normalises on the device; it does not do the JAX step's
  random crop, brightness and contrast, which only favours PyTorch.
  """
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  bins = torch.arange(1, num_bins + 1, device=device, dtype=torch.float32)
  backbone = models.get(model_settings.name)
  if backbone.torch_model is None:
    raise errors.UserError(f"backbone {backbone.name!r} registers no PyTorch twin (Backbone.torch_model)")
  model = backbone.torch_model(model_settings, num_bins).to(device).to(memory_format=torch.channels_last).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
  spec = backbone.input_spec
  mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
  std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

  def step(images, ages):
    x = images.permute(0, 3, 1, 2).float().mul(spec.pixel_range / 255.0)
    flip = torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5
    x = torch.where(flip, x.flip(3), x)
    if spec.channels == "BGR":
      x = x.flip(1)
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
  model: str = "vgg16",
) -> dict[str, Any]:
  """Times the same model, KL loss, Adam and batch in PyTorch: eager AMP + channels_last, or torch.compile.

  Eager on CUDA uses the fused Adam kernel, PyTorch's fastest eager optimizer.
  """
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  num_bins, amp = 100, dtype == "bfloat16"
  model_settings = settings.ModelSettings(name=model, width_multiplier=width)
  step = torch_train_step(model_settings, num_bins, device, amp, fused=device == "cuda" and not compiled)
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
    "model": model,
    **speed(
      times,
      batch,
      models.forward_flops(model_settings, image_size, num_bins),
      dtype,
      peak=peak_flops() if device == "cuda" else None,
    ),
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
  model = settings.Settings.from_config(base).model.name
  eager = {b: torch_train(b, dtype, image_size, num_steps, repeats, width, model=model) for b in batches}
  compile_batches = (
    []
    if torch_modes == "eager"
    else (batches if compile_at == "all" else [max(eager, key=lambda b: eager[b]["images_per_s"])])
  )
  compiled = [
    torch_train(b, dtype, image_size, num_steps, repeats, width, compiled=True, model=model) for b in compile_batches
  ]
  for r in (*eager.values(), *compiled):
    r["jax_speedup"] = jax_rows[r["batch"]]["images_per_s"] / r["images_per_s"]
  return sorted(rows + list(eager.values()) + compiled, key=lambda r: r["batch"])  # stable: JAX first
