"""scripts/benchmark.py: every mode runs on a tiny config and ends with its documented JSON line.

Structure and sanity only (present, positive, finite): speeds depend on the machine and its load.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--batch", "4", "--dtype", "float32", "--image-size", "32", "--width", "0.0625", "--steps", "2",
              "--repeats", "1"]
TRAIN_KEYS = ("images_per_s", "step_ms_median", "compile_s")

# The GPU host has only jax, flax, optax, torch and torchvision (plus ml_collections for configs/):
# the train step and both train benchmarks must run with TensorFlow, TFDS and CLU unimportable.
WITHOUT_TENSORFLOW = """
import runpy, sys
for name in ("tensorflow", "tensorflow_datasets", "clu"):
  sys.modules[name] = None  # any import of them now raises ImportError
from agejax import benchmarking, losses, models, steps
sys.argv = ["scripts/benchmark.py", *sys.argv[1:]]
runpy.run_path("scripts/benchmark.py", run_name="__main__")
assert all(sys.modules[name] is None for name in ("tensorflow", "tensorflow_datasets", "clu"))
"""


def _last_json(cache: str, *args: str, code: str | None = None):
  """Runs the benchmark script (or `code` with its arguments) and returns its final JSON line."""
  command = [sys.executable, "-c", code] if code else [sys.executable, "scripts/benchmark.py"]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  proc = subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  lines = proc.stdout.strip().splitlines()
  assert len(lines) >= 3, proc.stdout  # the human table first
  return json.loads(lines[-1])


def _positive(row: dict, *keys: str) -> None:
  """Asserts that each key holds a positive, finite number."""
  for key in keys:
    value = row[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, row)


def _check_train_row(row: dict, framework: str) -> None:
  """Asserts the documented keys of one `train` result of the tiny config."""
  assert row["mode"] == "train" and row["framework"] == framework, row
  _positive(row, *TRAIN_KEYS)
  assert "mfu" in row and row["mfu"] is None  # no datasheet peak for CPUs, and float32
  assert (row["batch"], row["dtype"], row["image_size"], row["width"]) == (4, "float32", 32, 0.0625)


def test_train_mode(compilation_cache):
  row = _last_json(compilation_cache, "train", *TINY_TRAIN)
  _check_train_row(row, "jax")
  _positive(row, "xla_gflop_per_image", "analytic_gflop_per_image")


def test_torch_mode_and_the_train_step_run_without_tensorflow_tfds_and_clu(compilation_cache):
  rows = _last_json(compilation_cache, "torch", *TINY_TRAIN, "--no-compile", code=WITHOUT_TENSORFLOW)
  assert isinstance(rows, list) and len(rows) == 2, rows
  _check_train_row(rows[0], "jax")
  _check_train_row(rows[1], "torch eager")
  _positive(rows[1], "jax_speedup")


def test_loop_mode(compilation_cache, data_dir):
  row = _last_json(compilation_cache, "loop", "--config", "tiny", "--steps", "6", "--log-every", "2",
                   "--checkpoint-every", "6", "--data_dir", data_dir, "--compilation_cache_dir", compilation_cache)
  assert row["mode"] == "loop" and row["batch"] == 16, row
  _positive(row, "loop_steps_per_s", "bare_steps_per_s", "ratio")
  assert row["ratio"] == row["loop_steps_per_s"] / row["bare_steps_per_s"]


def test_input_mode(compilation_cache, data_dir):
  row = _last_json(compilation_cache, "input", "--dataset", "demo", "--data_dir", data_dir, "--builder_config", "tiny",
                   "--batch", "32", "--batches", "5")
  assert row["mode"] == "input" and row["cores"] == 1, row
  _positive(row, "images_per_s", "images_per_s_per_core")
  assert row["images_per_s_per_core"] == row["images_per_s"] / row["cores"]
  assert row["examples"] == 192 and row["image_shape"] == [40, 40, 3] and row["batch"] == 32


def test_input_mode_names_an_unprepared_dataset(tmp_path):
  proc = subprocess.run([sys.executable, "scripts/benchmark.py", "input", "--dataset", "utkface",
                         "--data_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 1 and "prepare_data.py utkface" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_startup_mode_reports_cold_and_warm_time_to_first_step(data_dir):
  row = _last_json("", "startup", "--config", "tiny", "--data_dir", data_dir)
  assert row["mode"] == "startup" and row["config"] == "tiny", row
  _positive(row, "cold_first_step_s", "warm_first_step_s", "cold_process_s", "warm_process_s")
  assert row["ratio"] == row["warm_first_step_s"] / row["cold_first_step_s"]
