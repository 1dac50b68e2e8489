"""The real host-to-device path on 4 devices: TrainBatches / eval_batches -> device_prefetch -> shards.

JAX fixes its device count when it starts, so the pipeline runs in subprocesses (this file is
also their script) with 4 fake CPU devices: one process with 4 devices, and two processes with 2
devices each (multi-host, gloo collectives). Each subprocess writes what every one of its
devices received; the tests here check it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BATCH = 16  # global; 4 examples per device
DEVICES = 4
N_EPOCH = 48  # 3 steps an epoch
EPOCH_STEPS = N_EPOCH // BATCH
N_RAGGED = 40  # 2.5 steps an epoch: batches straddle the epoch boundary
N_EVAL = 50  # 4 eval batches, the last one padded
RESUME_AT = 2  # mid-epoch: the resumed run crosses into the second epoch
SEED = 7


# --- subprocess side --------------------------------------------------------------------------------


def _split(n: int):
  """A split whose example i has age i and images filled with i, so every shard tells its examples."""
  from agejax.data import pipeline

  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
  return pipeline.ArraySplit(images, np.arange(n, dtype=np.float32), np.full(n, 0.5, np.float32))


def _shards(batch: dict) -> list[dict]:
  """Returns what each addressable device holds of a global batch."""
  out = {}
  for key, arr in batch.items():
    assert arr.shape[0] == BATCH, (key, arr.shape)
    for shard in arr.addressable_shards:
      row = out.setdefault(shard.device.id, {"device": shard.device.id})
      rows = shard.index[0]
      row[f"{key}_rows"] = [rows.start, rows.stop]
      data = np.asarray(shard.data)
      if key == "image":
        row["image_shape"] = list(data.shape)
        # Every pixel of an image holds its index: one value per example, or -1 if mixed.
        row["image"] = [int(x.flat[0]) if (x == x.flat[0]).all() else -1 for x in data]
      else:
        row[key] = data.tolist()
  return [out[d] for d in sorted(out)]


def _collect(out_path: str, process_id: int, num_processes: int, port: int) -> None:
  """Runs the pipeline onto the mesh and writes every device's shards to `out_path` as JSON."""
  import jax

  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
  from agejax import parallel
  from agejax.data import pipeline

  mesh = parallel.make_mesh()
  sharding = parallel.data_sharded(mesh)

  def train(n: int, start: int, stop: int) -> list[list[dict]]:
    batches = pipeline.TrainBatches(_split(n), BATCH, SEED)  # fresh: nothing cached from another run
    steps = []
    for batch in pipeline.device_prefetch((batches.local_batch(s) for s in range(start, stop)), sharding):
      assert all(arr.sharding == sharding for arr in batch.values())
      steps.append(_shards(batch))
    return steps

  whole = pipeline.TrainBatches(_split(N_EPOCH), BATCH, SEED)
  result = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "devices": sorted(d.id for d in jax.devices()),
    "local_devices": sorted(d.id for d in jax.local_devices()),
    "global_indices": [whole.global_indices(s).tolist() for s in range(2 * EPOCH_STEPS)],
    "train": train(N_EPOCH, 0, 2 * EPOCH_STEPS),
    "resumed": train(N_EPOCH, RESUME_AT, 2 * EPOCH_STEPS),
    "ragged": train(N_RAGGED, 0, 2 * N_RAGGED // BATCH),
    "eval": [_shards(b) for b in pipeline.device_prefetch(pipeline.eval_batches(_split(N_EVAL), BATCH), sharding)],
  }
  Path(out_path).write_text(json.dumps(result))
  if num_processes > 1:
    jax.distributed.shutdown()


# --- pytest side ------------------------------------------------------------------------------------


def _env(devices_per_process: int) -> dict[str, str]:
  """The environment of a subprocess with `devices_per_process` fake CPU devices."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
  )
  return env


def _free_port() -> int:
  """A TCP port free now on localhost, for the coordinator of the two processes."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(tmp_path: Path, num_processes: int) -> list[dict]:
  """Runs `_collect` in `num_processes` processes over 4 devices in all; returns their results."""
  port = _free_port()
  outs = [tmp_path / f"process{i}.json" for i in range(num_processes)]
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, str(out), str(i), str(num_processes), str(port)],
      env=_env(DEVICES // num_processes),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i, out in enumerate(outs)
  ]
  logs = [p.communicate(timeout=120)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return [json.loads(out.read_text()) for out in outs]


@pytest.fixture(scope="module", params=[1, 2], ids=["1process", "2processes"])
def collected(request, tmp_path_factory) -> list[dict]:
  """What each device received, from one process with 4 devices or two processes with 2 each."""
  results = _run(tmp_path_factory.mktemp("sharding"), request.param)
  assert [r["process_index"] for r in results] == list(range(request.param))
  assert all(r["process_count"] == request.param and len(r["devices"]) == DEVICES for r in results)
  return results


def _merge(results: list[dict], key: str) -> list[list[dict]]:
  """Returns, per step, the shards of all processes' devices."""
  steps = [r[key] for r in results]
  assert len({len(s) for s in steps}) == 1, "processes ran different numbers of steps"
  return [[shard for process in step for shard in process] for step in zip(*steps)]


def _check_layout(step: list[dict], keys: tuple[str, ...], devices: list[int]) -> None:
  """Each of the 4 devices holds its own batch/4 rows of every key, and the shards tile the batch."""
  assert sorted(s["device"] for s in step) == devices
  local = BATCH // DEVICES
  for key in keys:
    rows = sorted(tuple(s[f"{key}_rows"]) for s in step)
    assert rows == [(i * local, (i + 1) * local) for i in range(DEVICES)], (key, rows)
  for s in step:
    assert s["image_shape"] == [local, 4, 4, 3]
    assert all(len(s[k]) == local for k in keys if k != "image")
    assert s["image"] == [int(a) for a in s["age"]]  # images travel with their labels


def _examples(step: list[dict]) -> list[int]:
  """The example indices the devices received at one step."""
  return [int(a) for s in step for a in s["age"]]


@pytest.mark.slow
def test_each_process_sees_only_its_devices(collected):
  local = [r["local_devices"] for r in collected]
  assert sorted(d for devices in local for d in devices) == collected[0]["devices"]
  for r, devices in zip(collected, local):
    assert {s["device"] for step in r["train"] for s in step} == set(devices)


def test_train_epoch_sees_every_example_exactly_once_across_devices(collected):
  steps = _merge(collected, "train")
  assert len(steps) == 2 * EPOCH_STEPS
  for step in steps:
    _check_layout(step, ("image", "age", "age_std"), collected[0]["devices"])
    assert all(x == 0.5 for s in step for x in s["age_std"])
  indices = collected[0]["global_indices"]
  epochs = []
  for e in range(2):
    epoch = steps[e * EPOCH_STEPS : (e + 1) * EPOCH_STEPS]
    seen = [i for step in epoch for i in _examples(step)]
    assert sorted(seen) == list(range(N_EPOCH))
    for step, expected in zip(epoch, indices[e * EPOCH_STEPS :]):
      assert sorted(_examples(step)) == sorted(expected)  # the batch of (seed, step), no other
    epochs.append([sorted(_examples(step)) for step in epoch])
  assert epochs[0] != epochs[1]  # a new order each epoch


def test_batches_straddling_the_epoch_boundary_lose_and_repeat_nothing(collected):
  steps = _merge(collected, "ragged")
  assert len(steps) == 2 * N_RAGGED // BATCH  # exactly two epochs of positions
  for step in steps:
    _check_layout(step, ("image", "age", "age_std"), collected[0]["devices"])
  counts = np.bincount([i for step in steps for i in _examples(step)], minlength=N_RAGGED)
  assert counts.tolist() == [2] * N_RAGGED


def test_eval_sees_every_example_exactly_once_with_padding_masked(collected):
  steps = _merge(collected, "eval")
  assert len(steps) == -(-N_EVAL // BATCH)
  real, padding = [], 0
  for step in steps:
    _check_layout(step, ("image", "age", "age_std", "mask"), collected[0]["devices"])
    for s in step:
      real += [int(a) for a, m in zip(s["age"], s["mask"]) if m]
      padding += s["mask"].count(False)
  assert sorted(real) == list(range(N_EVAL))
  assert padding == len(steps) * BATCH - N_EVAL


@pytest.mark.slow
def test_resumed_run_gives_each_device_exactly_the_uninterrupted_shards(collected):
  whole, resumed = _merge(collected, "train"), _merge(collected, "resumed")
  assert len(resumed) == len(whole) - RESUME_AT
  for step, (a, b) in enumerate(zip(whole[RESUME_AT:], resumed), RESUME_AT):
    assert a == b, f"step {step}"


if __name__ == "__main__":
  _collect(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
