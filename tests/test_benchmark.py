"""scripts/benchmark.py: every mode runs on a tiny config and ends with its documented JSON line.

Structure and sanity only (present, positive, finite): speeds depend on the machine and its load.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agejax import models, settings

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = [
  "--batch",
  "4",
  "--dtype",
  "float32",
  "--image-size",
  "32",
  "--width",
  "0.0625",
  "--steps",
  "2",
  "--repeats",
  "1",
]
TRAIN_KEYS = ("images_per_s", "step_ms_median", "compile_s")

# The GPU host has only jax, flax, optax, torch and torchvision (plus ml_collections for configs/):
# the train step and both train benchmarks must run with TensorFlow, TFDS and CLU unimportable.
WITHOUT_TENSORFLOW = """
import runpy, sys
for name in ("tensorflow", "tensorflow_datasets", "clu"):
  sys.modules[name] = None  # any import of them now raises ImportError
from agejax import models
from agejax.benchmarks import jax_step
from agejax.training import learner, losses
sys.argv = ["scripts/benchmark.py", *sys.argv[1:]]
runpy.run_path("scripts/benchmark.py", run_name="__main__")
assert all(sys.modules[name] is None for name in ("tensorflow", "tensorflow_datasets", "clu"))
"""


def _last_json(cache: str, *args: str, code: str | None = None):
  """Runs the benchmark script (or `code` with its arguments) and returns its final JSON line."""
  command = [sys.executable, "-c", code] if code else [sys.executable, "scripts/benchmark.py"]
  env = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }
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
  _positive(row, "matmul_tflops", "mfu_matmul")
  # Utilisation = model FLOP/s (3x the forward count, checked against torch below) / measured matmul rate.
  assert math.isclose(
    row["mfu_matmul"] * row["matmul_tflops"] * 1e12,
    row["images_per_s"] * 3 * models.forward_flops(settings.ModelSettings(width_multiplier=0.0625), 32, 100),
    rel_tol=1e-9,
  )
  assert (row["batch"], row["dtype"], row["image_size"], row["width"]) == (4, "float32", 32, 0.0625)


@pytest.mark.slow
def test_train_mode(compilation_cache):
  row = _last_json(compilation_cache, "train", *TINY_TRAIN)
  _check_train_row(row, "jax")
  _positive(row, "xla_gflop_per_image", "analytic_gflop_per_image")


@pytest.mark.slow
def test_torch_mode_and_the_train_step_run_without_tensorflow_tfds_and_clu(compilation_cache):
  rows = _last_json(compilation_cache, "torch", *TINY_TRAIN, "--no-compile", code=WITHOUT_TENSORFLOW)
  assert isinstance(rows, list) and len(rows) == 2, rows
  _check_train_row(rows[0], "jax")
  _check_train_row(rows[1], "torch eager")
  _positive(rows[1], "jax_speedup")


@pytest.mark.slow
def test_torch_compile_runs_at_the_batch_where_eager_was_fastest(compilation_cache):
  rows = _last_json(compilation_cache, "torch", *TINY_TRAIN[2:], "--batch", "2", "4", "--compile-at", "best")
  assert [(r["framework"], r["batch"]) for r in rows if r["framework"] != "torch.compile"] == [
    ("jax", 2),
    ("torch eager", 2),
    ("jax", 4),
    ("torch eager", 4),
  ], rows
  eager = {r["batch"]: r for r in rows if r["framework"] == "torch eager"}
  jax_rows = {r["batch"]: r for r in rows if r["framework"] == "jax"}
  (compiled,) = [r for r in rows if r["framework"] == "torch.compile"]
  assert compiled["batch"] == max(eager, key=lambda b: eager[b]["images_per_s"])
  for r in (*eager.values(), compiled):
    assert r["jax_speedup"] == jax_rows[r["batch"]]["images_per_s"] / r["images_per_s"]


@pytest.mark.slow
def test_loop_mode(compilation_cache, data_dir):
  row = _last_json(
    compilation_cache,
    "loop",
    "--config",
    "tiny",
    "--steps",
    "6",
    "--log-every",
    "2",
    "--checkpoint-every",
    "6",
    "--data_dir",
    data_dir,
    "--compilation_cache_dir",
    compilation_cache,
  )
  assert row["mode"] == "loop" and row["batch"] == 16, row
  _positive(row, "loop_steps_per_s", "bare_steps_per_s", "ratio")
  assert row["ratio"] == row["loop_steps_per_s"] / row["bare_steps_per_s"]


@pytest.mark.slow
def test_input_mode(compilation_cache, data_dir):
  row = _last_json(
    compilation_cache,
    "input",
    "--dataset",
    "demo",
    "--data_dir",
    data_dir,
    "--builder_config",
    "tiny",
    "--batch",
    "32",
    "--batches",
    "5",
  )
  assert row["mode"] == "input" and row["cores"] == 1, row
  _positive(row, "images_per_s", "images_per_s_per_core")
  assert row["images_per_s_per_core"] == row["images_per_s"] / row["cores"]
  assert row["examples"] == 192 and row["image_shape"] == [40, 40, 3] and row["batch"] == 32


def test_input_rate_is_the_images_gathered_over_the_seconds_they_took(data_dir, monkeypatch):
  """images/s = batches x batch / the timed seconds, on a clock that the test moves (mutant killed:
  benchmarks/runs.py:113 `num_batches * batch / dt` -> `num_batches * batch + dt`)."""
  import types

  from agejax.benchmarks import runs

  ticks = iter([10.0, 12.5])  # the timed loop's start and end: 2.5 s
  monkeypatch.setattr(runs, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
  row = runs.input_pipeline("demo", data_dir, "tiny", batch=16, num_batches=5)
  assert row["images_per_s"] == pytest.approx(5 * 16 / 2.5) and row["images_per_s_per_core"] == row["images_per_s"]


@pytest.mark.slow
def test_input_mode_names_an_unprepared_dataset(tmp_path):
  proc = subprocess.run(
    [sys.executable, "scripts/benchmark.py", "input", "--dataset", "utkface", "--data_dir", str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
  )
  assert proc.returncode == 1 and "prepare_data.py utkface" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


@pytest.mark.slow
def test_startup_mode_reports_cold_and_warm_time_to_first_step(data_dir):
  row = _last_json("", "startup", "--config", "tiny", "--data_dir", data_dir)
  assert row["mode"] == "startup" and row["config"] == "tiny", row
  _positive(row, "cold_first_step_s", "warm_first_step_s", "cold_process_s", "warm_process_s")
  assert row["ratio"] == row["warm_first_step_s"] / row["cold_first_step_s"]


# Counted in a subprocess: FlopCounterMode imports triton, which segfaults once TensorFlow is loaded.
TORCH_FLOPS = """
import json, sys, torch, torchvision
from torch.utils.flop_counter import FlopCounterMode
sys.path.insert(0, ".")
from agejax import settings
from agejax.models import vgg

def per_image(model, size, backward):
  with FlopCounterMode(display=False) as counter:  # the input needs no gradient, as in training
    out = model(torch.zeros(2, 3, size, size))
    if backward:
      out.sum().backward()
  return counter.get_total_flops() // 2

print(json.dumps({"224,1.0": per_image(torchvision.models.vgg16(num_classes=100), 224, False),
                  "64,0.25": per_image(vgg.torch_model(settings.ModelSettings(width_multiplier=0.25), 100), 64, False),
                  "train": per_image(torchvision.models.vgg16(num_classes=100), 224, True)}))
"""


@pytest.fixture(scope="module")
def torch_flops() -> dict[str, int]:
  """Per-image FLOPs counted by torch itself for torchvision's VGG16 (forward; forward and backward)."""
  proc = subprocess.run(
    [sys.executable, "-c", TORCH_FLOPS],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("image_size,width", [(224, 1.0), (64, 0.25)])
def test_analytic_forward_flops_match_torch_flop_counter(torch_flops, image_size, width):
  assert (
    models.forward_flops(settings.ModelSettings(width_multiplier=width), image_size, 100)
    == torch_flops[f"{image_size},{width}"]
  )


@pytest.mark.slow
def test_xla_and_analytic_train_step_flops_match_torch_forward_and_backward(torch_flops):
  """The MFU numerator: XLA's count of the real train step and 3x the analytic forward, at 224."""
  import jax
  import jax.numpy as jnp

  from agejax import metrics, settings
  from agejax.benchmarks import jax_step
  from agejax.training import learner
  from configs import vgg16_kl

  reference = torch_flops["train"]  # ~92.6 GFLOP
  config = jax_step.bench_config(vgg16_kl.get_config(), 2, "bfloat16", 224, 1.0)
  fns, state, _ = learner.create(settings.Settings.from_config(config), steps_per_epoch=100, abstract=True)
  batch = {
    "image": jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8),
    "age": jax.ShapeDtypeStruct((2,), jnp.float32),
    "age_std": jax.ShapeDtypeStruct((2,), jnp.float32),
  }
  compiled = jax.jit(fns.train_step).lower(state, jax.eval_shape(metrics.zeros), batch).compile()
  xla = jax_step.xla_flops(compiled) / 2
  # torch skips the first layer's input gradient (0.2%); XLA adds augmentation and Adam. XLA's
  # count, 91.51 GFLOP an image, is 1.2% under torch's: until the non-finite guard became one
  # lax.cond, ~415M per-leaf selects added 0.73 GFLOP an image of no arithmetic (92.24).
  assert abs(3 * models.forward_flops(settings.ModelSettings(), 224, 100) / reference - 1) < 0.005
  assert abs(xla / reference - 1) < 0.015, (xla, reference)


@pytest.mark.slow
def test_statistics_mode_simulates_coverage_and_the_gap_test(compilation_cache):
  from agejax.benchmarks import statistics

  row = _last_json(
    compilation_cache,
    "statistics",
    *("--simulations", "100", "--power_simulations", "100", "--resamples", "50"),
    *("--coverage_repeats", "2", "--coverage_test_faces", "2000"),
  )
  assert row["mode"] == "statistics" and [c["sigma"] for c in row["coverage"]] == [1.0, 2.0]
  for c in row["coverage"]:
    assert all(abs(c[level] - float(level)) < 0.02 for level in ("0.5", "0.8", "0.9", "0.95")), c
  gaps = row["gap_test"]  # every equal-MAE scenario, then every 1-year gap, as docs/testing.md's table
  scenarios = [*statistics.GAP_SCENARIOS, *statistics.POWER_SCENARIOS]
  assert [(g["scenario"], g["shift_years"]) for g in gaps] == [
    (s.name, 0.0 if i < len(statistics.GAP_SCENARIOS) else 1.0) for i, s in enumerate(scenarios)
  ]
  assert {(g["simulations"], g["resamples"]) for g in gaps} == {(100, 50)}
  assert gaps[1]["sizes"] == "1000/450/355/400/165" and gaps[4]["shapes"] == "uniform/half_normal/gamma_half"
  null, power = gaps[: len(statistics.GAP_SCENARIOS)], gaps[len(statistics.GAP_SCENARIOS) :]
  assert all(g["flag_rate"] < 0.15 for g in null) and power[0]["flag_rate"] > 0.5, gaps
  by_age = row["coverage_by_age"]
  assert (by_age["repeats"], by_age["n_test"]) == (2, 2000)
  assert by_age["one_temperature"]["60+"]["mean"] < 0.85 < by_age["adjusted_by_bucket"]["60+"]["mean"], by_age


def _in_fresh_python(code: str, *args: str) -> Any:
  """Runs `code` (with `args`) in a new interpreter; returns the JSON it prints last. PyTorch's lazy imports (dynamo,
  triton) crashed the test process once TensorFlow and JAX were loaded, so these torch tests run on their own."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_torch_train_runs_autocast_for_a_bfloat16_named_at_run_time():
  """The dtype comes from the command line, a string built at run time: bfloat16 turns on autocast (mutant killed:
  torch_baseline.py:74 `dtype == "bfloat16"` -> `dtype is "bfloat16"`, true only for the interned literal)."""
  rows = _in_fresh_python(
    """
import json
from agejax.benchmarks import torch_baseline
tiny = dict(batch=2, image_size=32, num_steps=1, repeats=1, width=0.0625)
dtype = "".join(["bfloat", "16"])  # not the interned literal, as from argparse
rows = [torch_baseline.torch_train(dtype=d, **tiny) for d in (dtype, "float32")]
print(json.dumps([(r["framework"], r["dtype"]) for r in rows]))
"""
  )
  assert rows == [["torch eager amp", "bfloat16"], ["torch eager", "float32"]], rows


def test_xla_flops_reads_the_cost_analysis_in_each_form_jax_has_returned():
  """cost_analysis's type is undefined across JAX versions and backends (a dict, a one-element list of dicts, None):
  each gives the count or 0 (mutant killed: jax_step.py:64 `cost[0]` -> `cost[1]`)."""
  import types

  import jax
  import jax.numpy as jnp

  from agejax.benchmarks import jax_step

  compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((8, 8), jnp.float32)).compile()
  flops = jax_step.xla_flops(compiled)
  assert flops >= 2 * 8**3, flops  # 8x8 @ 8x8: 512 multiply-adds
  for answer, expected in (([{"flops": 12.0}], 12.0), ({"flops": 12.0}, 12.0), (None, 0.0), ([{}], 0.0)):
    assert jax_step.xla_flops(types.SimpleNamespace(cost_analysis=lambda a=answer: a)) == expected, answer


TORCH_STEP_LOSS = """
import dataclasses, json, sys
import numpy as np, torch
from agejax import models, settings
from agejax.benchmarks import torch_baseline

channels = sys.argv[1]
vgg16 = models.get("vgg16")
spec = dataclasses.replace(vgg16.input_spec, channels=channels, mean=(0.3, 0.5, 0.7), pixel_range=2.0)
torch_baseline.models.get = lambda name: dataclasses.replace(vgg16, input_spec=spec)
model_settings = settings.ModelSettings(width_multiplier=0.0625)
step = torch_baseline.torch_train_step(model_settings, 100, "cpu", amp=False, fused=False)
rows = np.random.default_rng(0).integers(0, 256, (2, 32, 1, 3), dtype=np.uint8)
images = np.repeat(rows, 32, axis=2)  # the same in every column: the step's random flip changes nothing
ages = np.array([3.0, 57.5])
loss = float(step(torch.from_numpy(images), torch.tensor(ages, dtype=torch.float32)))

torch.manual_seed(0)  # the step's model before its first update, and its random draws (the flip, then dropout)
model = vgg16.torch_model(model_settings, 100).train()
torch.rand(len(ages), 1, 1, 1)
x = images.transpose(0, 3, 1, 2) / 255.0 * spec.pixel_range
x = x[:, ::-1] if channels == "BGR" else x
x = (x - np.reshape(spec.mean, (1, 3, 1, 1))) / np.reshape(spec.std, (1, 3, 1, 1))
with torch.no_grad():
  logits = model(torch.tensor(x.copy(), dtype=torch.float32)).double().numpy()
print(json.dumps({"loss": loss, "logits": logits.tolist(), "ages": ages.tolist()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("channels", ["RGB", "BGR"])
def test_the_torch_step_minimises_the_same_kl_to_a_sigma_2_gaussian_as_the_jax_step(channels):
  """The side-by-side is fair only if PyTorch trains on the same loss and input: its first step's loss equals KL(the
  Gaussian target of sigma 2 || the model's softmax) in float64 NumPy, the input prepared by the backbone's spec, in
  RGB or BGR order (mutants killed: torch_baseline.py:46 the target's `-0.5 * z ** 2` -> `-0.5 + z ** 2`; :40
  `if spec.channels == "BGR"` -> `if not ...`)."""
  import numpy as np

  out = _in_fresh_python(TORCH_STEP_LOSS, channels)
  logits, ages = np.asarray(out["logits"]), np.asarray(out["ages"])
  log_q = logits - logits.max(1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
  target = np.exp(-0.5 * ((np.arange(1, 101)[None] - ages[:, None]) / 2.0) ** 2)
  target /= target.sum(1, keepdims=True)
  expected = (target * (np.log(np.maximum(target, 1e-300)) - log_q)).sum() / len(ages)
  assert np.isclose(out["loss"], expected, rtol=1e-4), (out["loss"], expected)


def test_serve_protocols_are_a_comma_list_of_the_known_ones():
  """`serve --protocol`: a comma list in the order given, each once; an unknown or empty one is refused by name."""
  from agejax.benchmarks import serving

  assert serving.parse_protocols("oip-grpc, v1,oip-grpc") == ["oip-grpc", "v1"]
  for bad in ("v1,v2", "", ","):
    with pytest.raises(ValueError, match="a comma list of v1, oip-http, oip-grpc"):
      serving.parse_protocols(bad)


@pytest.mark.slow
def test_serve_mode_measures_each_protocol_on_one_server_and_checks_its_answers(
  request, tmp_path_factory, compilation_cache
):
  """`benchmark.py serve --protocol v1,oip-http,oip-grpc` on the learned tiny run, as a user runs it: a row for
  every protocol, input and client count, in the units of the v1 row, and every answer timed was the age that
  /v1/predict gives the same face (a benchmark of errors or wrong answers fails here)."""
  import tiny_run

  _, workdir = tiny_run.tiny_run(request, tmp_path_factory)
  requests = 64  # each of the 32 drawn faces twice: every row's answers are about the same faces
  rows = _last_json(
    compilation_cache,
    "serve",
    "--workdir",
    str(workdir),
    "--protocol",
    "v1,oip-http,oip-grpc",
    "--requests",
    str(requests),
    f"--server_flags=--compilation_cache_dir={compilation_cache}",
  )
  cases = [("v1", "png")] + [(protocol, kind) for protocol in ("oip-http", "oip-grpc") for kind in ("photos", "images")]
  assert [(r["protocol"], r["input"], r["concurrency"]) for r in rows] == [(*c, n) for c in cases for n in (1, 32)]
  v1 = rows[0]
  for row in rows:
    assert row["mode"] == "serve" and row["batching"] == "on" and not row["detect"], row
    assert (row["requests"], row["errors"], row["wrong"]) == (requests, 0, 0), row
    _positive(row, "requests_per_s", "p50_ms", "p95_ms", "server_mean_ms", "mean_batch", "client_cpu_ms")
    assert row["p95_ms"] >= row["p50_ms"] and row["server_cpu_ms"] >= 0, row
    # Little's law in the row's own units: clients = requests/s x seconds a request (loose: p50, not the mean).
    assert 0.2 < row["requests_per_s"] * row["p50_ms"] / 1000 / row["concurrency"] < 5, row
    assert math.isclose(row["mean_age"], v1["mean_age"], abs_tol=1e-3), (row, v1)
    if row["concurrency"] == 1:  # alone in its model call, as the reference was: the same program, the same age
      assert row["mean_batch"] == 1 and row["max_age_deviation"] <= 1e-4, row
  for row in rows[:2]:  # v1's answers carry the server's own time: within the client's, in the same unit
    assert 0 < row["server_p50_ms"] <= row["p50_ms"] and 0 < row["server_p95_ms"] <= row["p95_ms"], row
  assert all(r["server_p50_ms"] is None for r in rows[2:])  # an OIP answer does not say
