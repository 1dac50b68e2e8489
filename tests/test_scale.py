"""Scaling out must not change the model: 8 devices, or 2 processes, equal 1 device / 1 process."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, assert_close_relative, checkpoint, cpu_env, start_processes, train_command

# The project's default learning rate (`:tiny` raises it to learn fast): float32 reassociation
# differences then stay far below 1e-5, while a real mismatch (data, shards, rng) stays far above.
STEPS = (
  "--config.num_train_steps=20",
  "--config.eval_every_steps=20",
  "--config.checkpoint_every_steps=20",
  "--config.log_every_steps=10",
  "--config.optimizer.learning_rate=1e-4",
)


@pytest.mark.slow
def test_eight_devices_equal_one_with_a_demo_size_eval_split(compilation_cache, data_dir, tmp_path):
  """125 eval batches, as a real run has: dispatched without bound, they aborted XLA:CPU's rendezvous."""
  from agejax.data import datasets

  datasets.prepare("demo", data_dir, builder_config="tiny_eval1000")  # 1,000 validation faces
  runs = {}
  for devices in (1, 8):
    workdir = tmp_path / f"d{devices}"
    proc = subprocess.run(
      train_command(
        workdir,
        *STEPS,
        "--config.data.builder_config=tiny_eval1000",
        "--config.eval_batch_size=8",
        data_dir=data_dir,
        cache=compilation_cache,
      ),
      env=cpu_env(devices),
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[devices] = workdir
  assert_close_relative(checkpoint(runs[8], 20)["params"], checkpoint(runs[1], 20)["params"], 1e-5)
  a, b = (json.loads((runs[d] / "final_metrics.json").read_text()) for d in (8, 1))
  for key in ("eval_mae", "eval_loss", "eval_cs5", "eval_epsilon_error"):
    assert abs(a[key] - b[key]) <= 1e-5 * max(abs(b[key]), 1.0), key
  # The temperature fitted on the per-example outputs at the end: float32 NLLs near its flat minimum
  # place it to ~1e-4, so 1e-3 separates rounding from a mismatch.
  assert abs(a["temperature"] - b["temperature"]) <= 1e-3 * b["temperature"]


@pytest.mark.slow
def test_two_processes_equal_one_process(compilation_cache, data_dir, tmp_path):
  single = tmp_path / "single"
  subprocess.run(
    train_command(single, *STEPS, data_dir=data_dir, cache=compilation_cache),
    env=cpu_env(4),
    check=True,
    capture_output=True,
    timeout=600,
  )
  multi = tmp_path / "multi"
  procs = start_processes(multi, *STEPS, data_dir=data_dir, cache=compilation_cache)
  outputs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  assert_close_relative(checkpoint(multi, 20)["params"], checkpoint(single, 20)["params"], 1e-5)
  a, b = (json.loads((w / "final_metrics.json").read_text()) for w in (multi, single))
  for key in ("eval_mae", "eval_loss", "eval_cs5", "eval_epsilon_error", "baseline_mae"):
    assert abs(a[key] - b[key]) <= 1e-5 * max(abs(b[key]), 1.0), key
  # The same calibration: equally good fits (the NLL at each fitted temperature), and temperatures
  # within 2%: this 20-step model's optimum sits near T 0.08, where the tilted NLL is flat in T and
  # float32 sums of another order move the golden-section minimum by ~1.5% (measured 0.0758 vs 0.0770).
  fits = [json.loads((w / "calibration.json").read_text()) for w in (multi, single)]
  for way in ("single", "flip"):
    assert fits[0][way]["nll_after"] == pytest.approx(fits[1][way]["nll_after"], rel=1e-4), way
  assert abs(a["temperature"] - b["temperature"]) <= 2e-2 * b["temperature"]


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_of_array_record_files_and_equal_one_process(
  compilation_cache, record_dir, tmp_path
):
  """data.reader=grain, 2 shards: each process reads only its own shard; the model is the 1-process run's."""
  grain = ("--config.data.reader=grain", "--config.data.shards=2", "--config.data.grain_workers=0", *STEPS)
  single = tmp_path / "single"
  one = subprocess.run(
    train_command(single, *grain, data_dir=record_dir, cache=compilation_cache),
    env=cpu_env(4),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  assert "read 320 records, 192 distinct (records 0-191) of 192" in one.stdout  # 20 steps of 16
  multi = tmp_path / "multi"
  procs = start_processes(multi, *grain, data_dir=record_dir, cache=compilation_cache)
  outputs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  # Each process's 8 of every step from its own 96 records: the two halves of the split, each read whole.
  assert "process 0: read 160 records, 96 distinct (records 0-95) of 192" in outputs[0][0], outputs[0][0][-2000:]
  assert "process 1: read 160 records, 96 distinct (records 96-191) of 192" in outputs[1][0], outputs[1][0][-2000:]
  assert_close_relative(checkpoint(multi, 20)["params"], checkpoint(single, 20)["params"], 1e-5)
  a, b = (json.loads((w / "final_metrics.json").read_text()) for w in (multi, single))
  for key in ("eval_mae", "eval_loss"):
    assert abs(a[key] - b[key]) <= 1e-5 * max(abs(b[key]), 1.0), key


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(compilation_cache, data_dir, tmp_path):
  """JAX's preemption service owns SIGTERM with several processes; all stop at its sync step."""
  workdir = tmp_path / "multi"
  long = (
    "--config.num_train_steps=5000",
    "--config.eval_every_steps=5000",
    "--config.checkpoint_every_steps=5000",
    "--config.log_every_steps=20",
  )
  procs = start_processes(workdir, *long, data_dir=data_dir, cache=compilation_cache)
  try:
    while not list(workdir.glob("events.out.tfevents.*")):  # process 0's loop has started
      assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
      time.sleep(0.05)
    time.sleep(1.0)
    procs[0].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()  # no stray trainers if the run did not stop
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
  assert len(saved) == 1 and 0 < saved[0] < 5000, saved
  for out, _ in outputs:
    assert f"preempted: saved checkpoint at step {saved[0]}" in out, out[-2000:]


# Three train steps of a `:tiny`-sized ResNet-50 on seeded random batches sharded over every device, at
# the default learning rate; saves params and batch statistics. Only the train step compiles: the
# whole trainer (evaluations, checkpoints) compiles ResNet-50 several times and took 6 minutes here.
RESNET_STEPS = """
import sys
import jax, numpy as np
from flax import traverse_util
from agejax import metrics, parallel
from agejax.training import configuration, learner
from configs import vgg16_kl

config = vgg16_kl.get_config("tiny")
config.model.name = "resnet50"
config.optimizer.learning_rate = 1e-4
config.optimizer.schedule = "constant"
fns, state, _ = learner.create(configuration.validate(config), steps_per_epoch=10)
mesh = parallel.make_mesh()
state, sums = jax.device_put((state, metrics.zeros()), parallel.replicated(mesh))
step = jax.jit(fns.train_step)
rng = np.random.default_rng(0)
for _ in range(3):
  batch = {
    "image": rng.integers(0, 256, (16, 40, 40, 3), dtype=np.uint8),
    "age": rng.integers(1, 91, 16).astype(np.float32),
    "age_std": np.zeros(16, np.float32),
  }
  state, sums, _ = jax.block_until_ready(step(state, sums, parallel.global_batch(batch, parallel.data_sharded(mesh))))
tree = traverse_util.flatten_dict({"params": state.params, "model_state": state.model_state})
np.savez(sys.argv[1], devices=jax.device_count(), **{"/".join(map(str, k)): np.asarray(v) for k, v in tree.items()})
"""


# LLVM's optimisations (not XLA's, which shard the program) took 2/3 of the train step's compile time.
FAST_COMPILE = " --xla_backend_optimization_level=0"


@pytest.mark.slow
def test_resnet50_on_eight_devices_equals_one_device_batch_norm_statistics_included(tmp_path):
  """Batch statistics are the global batch's under jit: 8 shards of 2 faces normalise as one device's 16."""
  runs = {devices: tmp_path / f"d{devices}.npz" for devices in (1, 8)}
  # Both at once: XLA compiles on about one core, and compiling is most of each run.
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", RESNET_STEPS, str(out)],
      env=dict(env := cpu_env(devices), PYTHONPATH=str(ROOT), XLA_FLAGS=env["XLA_FLAGS"] + FAST_COMPILE),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for devices, out in runs.items()
  ]
  try:
    errors = [p.communicate(timeout=600)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()  # no stray processes if one hangs
  assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
  a, b = (dict(np.load(runs[d])) for d in (8, 1))
  assert (a.pop("devices"), b.pop("devices")) == (8, 1)
  for group in ("params/", "model_state/"):
    assert_close_relative(*({k: v for k, v in run.items() if k.startswith(group)} for run in (a, b)), 1e-5)
  # The statistics moved from their start (means 0): the comparison is not of constants.
  assert max(float(np.abs(v).max()) for k, v in b.items() if k.endswith("/mean")) > 1e-2
