"""Scaling out must not change the model: 8 devices, or 2 processes, equal 1 device / 1 process."""

import json
import signal
import subprocess
import time

from conftest import assert_close_relative, checkpoint, cpu_env, start_processes, train_command

# The project's default learning rate (`:tiny` raises it to learn fast): float32 reassociation
# differences then stay far below 1e-5, while a real mismatch (data, shards, rng) stays far above.
STEPS = (
  "--config.num_train_steps=20",
  "--config.eval_every_steps=20",
  "--config.checkpoint_every_steps=20",
  "--config.log_every_steps=10",
  "--config.optimizer.learning_rate=1e-4",
)


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
  assert abs(a["temperature"] - b["temperature"]) <= 1e-3 * b["temperature"]


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
