"""Whole-run benchmarks: the training loop against its bare step, start-up time, the host input pipeline."""

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

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


INPUT_READERS = ("cache", "grain")


def input_batches(
  data, reader: str = "cache", batch: int = 256, num_steps: int = 200, grain_workers: int = 2, split: str = "train"
) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
  """(the split's example count, its training batches for steps 0..num_steps-1 with seed 0 in one process).

  reader 'cache': the memory-mapped array cache's gather (pipeline.TrainBatches; the cache is built first
  when missing); 'grain': the ArrayRecord records through Grain (streaming.TrainStream, one shard,
  `grain_workers` decoding processes). Both give the same batches: one shard's order is TrainBatches'.
  Ages are not clipped to any label range (the benchmark has none).
  """
  from agejax import settings
  from agejax.data import pipeline, streaming

  if reader not in INPUT_READERS:
    raise errors.UserError(f"--reader={reader!r} is not one of {INPUT_READERS}")
  data = dataclasses.replace(data, reader=reader)
  if reader == "cache":
    arrays = pipeline.load_split(data, split)
    batches = pipeline.TrainBatches(arrays, batch, seed=0, process_index=0, process_count=1)
    return len(arrays), (batches.local_batch(s) for s in range(num_steps))
  if split != "train":  # the streaming path reads training splits only
    raise errors.UserError(f"--reader=grain reads the training split, not {split!r}")
  pipeline.train_reader(data)  # a dataset not stored as ArrayRecord fails here, in one line
  streamed = pipeline.streamed_train_split(data, settings.LabelSettings())
  order = streaming.ShardedOrder(len(streamed), batch, seed=0, shards=1)
  stream = streaming.TrainStream(streamed.files, order, num_steps, grain_workers, (-np.inf, np.inf), 0, 1)
  return len(streamed), stream.batches(0)


def _tree_cpu_s() -> float:
  """User + system CPU seconds of this process and its live children (Grain's workers) so far."""
  import psutil

  total = 0.0
  me = psutil.Process()
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
    except psutil.NoSuchProcess:
      continue
    total += t.user + t.system
  return total


def input_pipeline(
  name: str,
  data_dir: str = "",
  builder_config: str = "",
  batch: int = 256,
  num_batches: int = 200,
  split: str = "train",
  *,
  reader: str = "cache",
  grain_workers: int = 2,
  data_split: str = "",
  cache_dir: str = "",
) -> dict[str, Any]:
  """Images/s of the host pipeline delivering ready uint8 batches, timed after a short warm-up.

  reader 'cache': the gather runs in one thread (the trainer's prefetch thread), so `cores` is 1 and
  `images_per_s_per_core` the single-thread rate. reader 'grain': decoding runs in `grain_workers`
  processes (0: in this one), so `cores` is max(1, grain_workers) and `images_per_s_per_core` the rate
  over them. Either way `cpu_s` is the CPU time this process and its children (Grain's workers) spent in
  the timed window and `images_per_cpu_s` the images per CPU second: the per-core rate that other
  processes on a shared machine do not depress. `host_cpus` is only what the machine has.
  """
  from agejax import settings

  data = settings.DataSettings(name, data_dir, builder_config=builder_config, split=data_split)
  if cache_dir:
    data = dataclasses.replace(data, cache_dir=cache_dir)
  warmup = 3  # the page cache, the permutation, Grain's workers starting
  examples, batches = input_batches(data, reader, batch, warmup + num_batches, grain_workers, split)
  for _ in range(warmup):
    next(batches)
  cpu0, t0 = _tree_cpu_s(), time.perf_counter()
  count, shape = 0, None
  for _ in range(num_batches):  # not to the stream's end: that stops Grain's workers before their CPU is read
    out = next(batches)
    count, shape = count + 1, out["image"].shape
  dt = time.perf_counter() - t0
  cpu_s = _tree_cpu_s() - cpu0
  getattr(batches, "close", lambda: None)()
  rate = count * batch / dt
  cores = 1 if reader == "cache" else max(1, grain_workers)
  return {
    "mode": "input",
    "dataset": name,
    "reader": reader,
    "grain_workers": grain_workers if reader == "grain" else None,
    "examples": examples,
    "image_shape": list(shape[1:]) if shape else None,
    "batch": batch,
    "batches": count,
    "images_per_s": rate,
    "images_per_s_per_core": rate / cores,
    "cores": cores,
    "cpu_s": cpu_s,
    "images_per_cpu_s": count * batch / cpu_s if cpu_s > 0 else None,
    "host_cpus": os.cpu_count(),
  }
