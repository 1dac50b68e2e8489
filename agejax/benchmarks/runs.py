"""Whole-run benchmarks: the training loop against its bare step, start-up time, the host input pipeline."""

import os
import time
from typing import Any

from agejax import errors
from agejax.benchmarks.jax_step import bare_steps_per_s


def loop(config, workdir: str, num_steps: int = 60) -> dict[str, Any]:
  """Full training loop (host pipeline, logging, metrics, checkpoints) vs the bare jitted step."""
  from agejax.training import train

  if num_steps <= config.log_every_steps:
    raise errors.UserError(
      f"loop: num_steps={num_steps} must exceed log_every_steps={config.log_every_steps}: the "
      f"loop rate is timed between the first and last log fetch"
    )
  config.num_train_steps = num_steps
  final = train.train_and_evaluate(config, workdir)
  assert final is not None  # None only when a SIGTERM stopped the benchmark's run
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

  from agejax import settings
  from agejax.data import pipeline

  config = config.copy_and_resolve_references()
  config.data.data_dir = data_dir
  data = settings.Settings.from_config(config).data
  for split in ("train", data.eval_split):  # prepare outside the timed runs
    pipeline.load_split(data, split)
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
  from agejax import settings
  from agejax.data import pipeline

  data = pipeline.load_split(settings.DataSettings(name, data_dir, builder_config=builder_config), split)
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
