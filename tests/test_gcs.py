"""Workdirs and datasets in a gs:// bucket: the real scripts against the offline GCS sandbox."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, checkpoint, cpu_env, train_command
from gcs_sandbox import GcsSandbox

from agejax.training import workdir_lock

BUCKET = "agejax-test"
LONG = (
  "--config.num_train_steps=300",
  "--config.eval_every_steps=300",
  "--config.checkpoint_every_steps=100",
  "--config.log_every_steps=20",
  "--config.profile_steps=2",
)


@pytest.fixture(scope="module")
def gcs():
  with GcsSandbox((BUCKET,)) as sandbox:
    yield sandbox


def download(gcs: GcsSandbox, prefix: str, dest: Path) -> Path:
  """Copies every object under gs://BUCKET/prefix into dest (to read a checkpoint with plain Orbax)."""
  for name in gcs.list_objects(BUCKET, prefix):
    if not name.endswith("/"):  # TensorFlow's empty "directory" markers
      target = dest / name[len(prefix) :]
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(gcs.read_object(BUCKET, name))
  return dest


@pytest.mark.slow
def test_a_run_in_a_bucket_survives_sigterm_and_ends_identical_to_a_local_run(
  gcs, compilation_cache, data_dir, tmp_path
):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  # The tiny demo's TFDS records in the bucket too (the first run prepares them there).
  command = train_command(
    f"gs://{BUCKET}/run",
    *LONG,
    data_dir=f"gs://{BUCKET}/tfds",
    cache=compilation_cache,
    arrays=str(tmp_path / "arrays"),
  )
  proc = gcs.popen(command, cwd=cwd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    while not [n for n in gcs.list_objects(BUCKET, "run/") if "events.out.tfevents" in n]:  # the loop has started
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      time.sleep(0.2)
    time.sleep(random.Random(0).uniform(0.2, 1.5))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "preempted: saved checkpoint at step" in out, out[-2000:]
  step = int(out.split("preempted: saved checkpoint at step ")[1].split()[0])
  assert 0 < step < 300 and f"run/checkpoints/{step}/commit_success.txt" in gcs.list_objects(BUCKET, "run/")
  assert "run/final_metrics.json" not in gcs.list_objects(BUCKET, "run/")

  rerun = gcs.run(command, cwd=cwd, env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0 and f"resuming from step {step} of gs://{BUCKET}/run/checkpoints" in rerun.stdout, (
    rerun.stderr[-3000:]
  )
  objects = gcs.list_objects(BUCKET, "run/")
  for name in ("run/config.json", "run/final_metrics.json", "run/checkpoints/300/commit_success.txt"):
    assert name in objects, objects
  assert [n for n in objects if n.startswith("run/events.out.tfevents.")]
  assert [n for n in objects if n.startswith("run/plugins/profile/") and n.endswith(".xplane.pb")], objects
  final = json.loads(gcs.read_object(BUCKET, "run/final_metrics.json"))
  assert final["step"] == 300 and json.loads(gcs.read_object(BUCKET, "run/config.json"))["num_train_steps"] == 300
  assert not list(cwd.iterdir())  # nothing under the current directory because of a URL
  assert [p.name for p in (tmp_path / "arrays").iterdir()] == ["agejax_demo"]  # the local array cache

  local = tmp_path / "local"
  subprocess.run(
    train_command(local, *LONG, data_dir=data_dir, cache=compilation_cache),
    env=cpu_env(),
    check=True,
    capture_output=True,
    timeout=600,
  )
  in_bucket = checkpoint(download(gcs, "run/", tmp_path / "downloaded"), 300)
  jax.tree.map(np.testing.assert_array_equal, in_bucket, checkpoint(local, 300))
  assert final["eval_mae"] == json.loads((local / "final_metrics.json").read_text())["eval_mae"]


# A lock left by a run on another machine that died an hour ago (its VM was preempted, say).
STALE_HOLDER = {
  "host": "tpu-vm-w-0",
  "pid": 4242,
  "since": "2026-01-01T00:00:00Z",
  "heartbeat": "2026-01-01T00:05:00Z",
  "token": "0" * 32,
  "boot_id": "b",
  "pid_namespace": "pid:[1]",
}


@pytest.fixture(scope="module")
def trained_in_bucket(gcs, compilation_cache, tmp_path_factory):
  """A 20-step tiny run with its workdir in the bucket, where a dead run left a stale lock: (URL, the run)."""
  tmp = tmp_path_factory.mktemp("bucket_run")
  gcs.write_object(BUCKET, f"short/{workdir_lock.LOCK_FILE}", json.dumps(STALE_HOLDER).encode())
  command = train_command(
    f"gs://{BUCKET}/short",
    "--config.num_train_steps=20",
    "--config.eval_every_steps=10",
    "--config.checkpoint_every_steps=10",
    data_dir=f"gs://{BUCKET}/tfds",
    cache=compilation_cache,
    arrays=str(tmp / "arrays"),
  )
  result = gcs.run(command, cwd=tmp, env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return f"gs://{BUCKET}/short", result


@pytest.mark.slow
def test_a_stale_lock_in_the_bucket_is_taken_over_with_a_warning_naming_its_holder(gcs, trained_in_bucket):
  _, result = trained_in_bucket
  assert (
    f"workdir gs://{BUCKET}/short: took over the lock of pid 4242 on tpu-vm-w-0 since 2026-01-01T00:00:00Z (last "
    f"heartbeat 2026-01-01T00:05:00Z): its last heartbeat was "
  ) in result.stderr, result.stderr[-3000:]
  objects = gcs.list_objects(BUCKET, "short/")
  assert "short/final_metrics.json" in objects and f"short/{workdir_lock.LOCK_FILE}" not in objects  # released


@pytest.mark.slow
def test_a_held_lock_in_the_bucket_stops_a_second_trainer_in_one_line_before_compiling(gcs, data_dir, tmp_path):
  now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  holder = json.dumps({**STALE_HOLDER, "since": now, "heartbeat": now}).encode()  # alive, on another machine
  gcs.write_object(BUCKET, f"held/{workdir_lock.LOCK_FILE}", holder)
  cache = tmp_path / "compilation_cache"
  cache.mkdir()
  result = gcs.run(
    train_command(f"gs://{BUCKET}/held", data_dir=data_dir, cache=str(cache)),
    cwd=tmp_path,
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: workdir gs://{BUCKET}/held is in use by another run: pid 4242 on tpu-vm-w-0 since {now} (lock "
    f"gs://{BUCKET}/held/{workdir_lock.LOCK_FILE}); wait for it to end or stop it, or use another workdir; a lock not "
    f"refreshed for 10 min is taken over"
  )
  assert not list(cache.iterdir())  # nothing was compiled
  assert gcs.list_objects(BUCKET, "held/") == [f"held/{workdir_lock.LOCK_FILE}"]  # nothing written: no config.json
  assert gcs.read_object(BUCKET, f"held/{workdir_lock.LOCK_FILE}") == holder  # the holder's lock untouched


LOCK = r"""
import json, logging, os, socket, subprocess, sys, time
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stdout)
from google.api_core import exceptions
from google.cloud import storage as gcs
from agejax.training import workdir_lock
url = sys.argv[1]
bucket_name, prefix = url[len("gs://"):].split("/", 1)
bucket = gcs.Client(project=None).bucket(bucket_name)
name = f"{prefix}/{workdir_lock.LOCK_FILE}"
read = lambda: json.loads(bucket.blob(name).download_as_text())
write = lambda holder: bucket.blob(name).upload_from_string(json.dumps(holder))
results = {}
# google-cloud-storage uploads small objects as multipart: their preconditions must hold in the emulator.
bucket.blob(prefix + "/probe").upload_from_string("first", if_generation_match=0)
try:
  bucket.blob(prefix + "/probe").upload_from_string("second", if_generation_match=0)
except exceptions.PreconditionFailed as e:
  results["precondition"] = [e.code, bucket.blob(prefix + "/probe").download_as_text()]

lock = workdir_lock.WorkdirLock(url, heartbeat_s=0.1).acquire()
results["holder"] = read()
try:
  workdir_lock.WorkdirLock(url).acquire()
except workdir_lock.WorkdirBusy as e:
  results["busy"] = str(e)
generation = bucket.get_blob(name).generation
time.sleep(1.0)
results["heartbeats"] = bucket.get_blob(name).generation != generation and read()["token"] == lock.holder["token"]
write({"host": "other", "pid": 7, "since": "2026-01-01T00:00:00Z"})  # another run took it over meanwhile
time.sleep(1.0)
try:
  lock.check()
except workdir_lock.WorkdirBusy as e:
  results["lost"] = str(e)
lock.release()
results["after_lost"] = read()["host"]  # left to its new holder

print("STALE", flush=True)
write({"host": "elsewhere", "pid": 9, "since": "2000-01-01T00:00:00Z", "heartbeat": "2000-01-01T00:00:00Z"})
with workdir_lock.WorkdirLock(url):
  results["stale_taken"] = read()["pid"] == os.getpid()
dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
print("DEAD", flush=True)
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
dead_holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "since": now, "heartbeat": now}
write({**dead_holder, **workdir_lock._machine()})
with workdir_lock.WorkdirLock(url):
  results["dead_taken"] = read()["pid"] == os.getpid()
results["released"] = bucket.get_blob(name) is None
print("RESULTS", json.dumps(results))
"""


@pytest.mark.slow
def test_the_workdir_lock_in_a_bucket_heartbeats_is_taken_over_when_stale_and_knows_when_it_is_lost(gcs, tmp_path):
  url = f"gs://{BUCKET}/locking"
  result = gcs.run(
    [sys.executable, "-c", LOCK, url], cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  results = json.loads(out.split("RESULTS ", 1)[1])
  holder = results["holder"]
  assert results["precondition"] == [412, "first"]
  assert results["busy"] == (
    f"workdir {url} is in use by another run: pid {holder['pid']} on {holder['host']} since "
    f"{holder['since']} (lock {url}/{workdir_lock.LOCK_FILE}); wait for it to end or stop it, or "
    f"use another workdir; a lock not refreshed for 10 min is taken over"
  )
  assert results["heartbeats"] is True
  assert results["lost"] == (
    f"workdir {url}: this run's lock was taken over or removed (now held by pid 7 on other "
    f"since 2026-01-01T00:00:00Z; no heartbeat for 10 min makes a lock stale); stopped so "
    f"that two runs never write one workdir"
  )
  assert results["after_lost"] == "other"
  stale, dead = out.split("STALE\n", 1)[1].split("DEAD\n", 1)
  assert stale.startswith(
    f"WARNING workdir {url}: took over the lock of pid 9 on elsewhere since "
    f"2000-01-01T00:00:00Z: its last heartbeat was "
  )
  assert results["stale_taken"] is True
  assert dead.startswith(f"WARNING workdir {url}: took over the lock of pid ")
  assert "no longer runs on this host" in dead.splitlines()[0]
  assert results["dead_taken"] is True and results["released"] is True


@pytest.mark.slow
def test_evaluate_and_predict_read_a_workdir_in_the_bucket(gcs, trained_in_bucket, tmp_path):
  trained_in_bucket, _ = trained_in_bucket
  evaluate = gcs.run(
    [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--workdir", trained_in_bucket, "--split", "validation"],
    cwd=tmp_path,
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  report = json.loads(gcs.read_object(BUCKET, "short/eval/validation.json"))
  best = json.loads(gcs.read_object(BUCKET, "short/final_metrics.json"))["best_step"]
  assert report["num_examples"] == 50 and report["step"] == best and best in (10, 20)
  lines = gcs.read_object(BUCKET, "short/eval/validation_predictions.jsonl").decode().splitlines()
  assert len(lines) == 50
  assert gcs.read_object(BUCKET, "short/eval/validation_cs_curve.png").startswith(b"\x89PNG")

  # Photos in the bucket too: two face crops, one file that is not an image.
  from PIL import Image

  rng = np.random.default_rng(0)
  for i in range(2):
    crop = tmp_path / f"face{i}.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(crop)
    gcs.write_object(BUCKET, f"photos/face{i}.png", crop.read_bytes())
  gcs.write_object(BUCKET, "photos/notes.txt", b"not an image")
  predict = gcs.run(
    [
      sys.executable,
      str(ROOT / "scripts" / "predict.py"),
      "--workdir",
      trained_in_bucket,
      "--aligned",
      "--json",
      f"gs://{BUCKET}/photos",
      "--plot",
      f"gs://{BUCKET}/short/faces.png",
    ],
    cwd=tmp_path,
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert predict.returncode == 0, predict.stderr[-3000:]
  results = [json.loads(line) for line in predict.stdout.splitlines()]
  assert [(r["file"], r["status"]) for r in results] == [
    (f"gs://{BUCKET}/photos/face0.png", "ok"),
    (f"gs://{BUCKET}/photos/face1.png", "ok"),
    (f"gs://{BUCKET}/photos/notes.txt", "not an image"),
  ]
  assert all(abs(sum(r["distribution"]) - 1) < 1e-4 for r in results[:2])
  assert gcs.read_object(BUCKET, "short/faces.png").startswith(b"\x89PNG")
  assert not [p for p in tmp_path.iterdir() if not p.name.startswith("face")]  # nothing else written here


@pytest.mark.slow
@pytest.mark.parametrize("reachable", [True, False], ids=["missing-bucket", "unreachable-endpoint"])
def test_an_unusable_bucket_fails_in_one_line_before_compiling(gcs, data_dir, reachable, tmp_path):
  url = f"gs://{'no-such-bucket' if reachable else BUCKET}/run"
  cache = tmp_path / "compilation_cache"
  cache.mkdir()
  # Capped retries: TensorFlow's default backs off for ~195 s before giving up on a refused connection.
  result = gcs.run(
    train_command(url, data_dir=data_dir, cache=str(cache)),
    cwd=tmp_path,
    reachable=reachable,
    env=gcs.env(cpu_env(), tf_retries=0),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: workdir {url} is not writable: "), result.stderr[-2000:]
  assert not list(cache.iterdir())  # nothing was compiled
  assert sorted(p.name for p in tmp_path.iterdir()) == ["compilation_cache"]


CONVERTED = r"""
import dataclasses, sys, jax, numpy as np, ml_collections
from flax import nnx
from agejax import convert, models, settings
from agejax.models import vgg
from agejax.training import configuration
url = sys.argv[1]
config = settings.Settings.from_config({"model": {"pretrained": url + "/missing", "batch_norm": False}})
try:
  configuration.check_pretrained(config)
except FileNotFoundError as e:
  print("MISSING", e)
model = vgg.VGG16(10, width_multiplier=0.0625, rngs=nnx.Rngs(1))  # converted weights, at test width
convert.save_converted(model, url, arch="vgg16", backbone="vgg16", source="test")
configuration.check_pretrained(dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=url)))
_, params, model_state = models.split_model(vgg.VGG16(100, width_multiplier=0.0625, rngs=nnx.Rngs(2)))
params, _ = convert.backbone_from_converted(url, params, model_state)
_, want, _ = models.split_model(model)
same = all(np.array_equal(params[k][i]["kernel"], want[k][i]["kernel"]) for k in ("convs",) for i in params[k])
print("BACKBONE", same and np.array_equal(params["fc2"]["kernel"], want["fc2"]["kernel"]),
      params["head"]["kernel"].shape)
"""


@pytest.mark.slow
def test_converted_weights_go_to_and_come_from_a_bucket(gcs, tmp_path):
  url = f"gs://{BUCKET}/weights/vgg16_tiny"
  result = gcs.run(
    [sys.executable, "-c", CONVERTED, url], cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ", 1)[0].isupper())
  assert lines["MISSING"].startswith(
    f"config.model.pretrained='{url}/missing' holds no converted weights; create "
    f"them with: python scripts/convert_weights.py "
  )
  assert lines["BACKBONE"] == "True (256, 100)"
  names = gcs.list_objects(BUCKET, "weights/vgg16_tiny/")
  assert "weights/vgg16_tiny/agejax_weights.json" in names and any(n.endswith("manifest.ocdbt") for n in names)
  assert not list(tmp_path.iterdir())


# The C++ reader of ArrayRecord files (riegeli's GcsReader on google-cloud-cpp, libcurl) trusts only the system's
# CAs, not the sandbox's (CURL_CA_BUNDLE is curl's tool's variable, not libcurl's): over HTTPS it fails with "CURL
# error [60]=SSL peer certificate or SSH remote key was not OK". google-cloud-cpp's emulator variable points it
# at the sandbox's plain-HTTP port instead; every other client keeps the sandbox's HTTPS endpoint.
ARRAY_RECORD_ENDPOINT = {"CLOUD_STORAGE_EMULATOR_ENDPOINT": "http://storage.googleapis.com"}


@pytest.mark.slow
def test_an_array_record_dataset_in_the_bucket_trains_through_grain(gcs, compilation_cache, record_dir, tmp_path):
  for file in Path(record_dir).rglob("*"):  # the tiny demo prepared as ArrayRecord (TFDS writes those locally only)
    if file.is_file():
      gcs.write_object(BUCKET, f"records/{file.relative_to(record_dir)}", file.read_bytes())
  command = train_command(
    tmp_path / "run",
    "--config.data.reader=grain",
    "--config.data.grain_workers=1",
    "--config.num_train_steps=4",
    "--config.eval_every_steps=4",
    "--config.checkpoint_every_steps=4",
    data_dir=f"gs://{BUCKET}/records",
    cache=compilation_cache,
    arrays=str(tmp_path / "arrays"),
  )
  env = {**gcs.env(cpu_env()), **ARRAY_RECORD_ENDPOINT}
  result = subprocess.run(gcs.command(command, cwd=tmp_path), env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "streaming shards 0-0 of 1 (records 0-191 of 192) through Grain with 1 workers" in result.stdout
  assert "read 64 records, " in result.stdout  # 4 steps of 16, read from gs://BUCKET/records's files
  final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
  assert final["step"] == 4 and np.isfinite(final["eval_mae"])
  assert not (tmp_path / "arrays").exists()  # nothing decoded onto the local disk
