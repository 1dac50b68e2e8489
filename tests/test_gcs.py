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

BUCKET = "agejax-test"
LONG = ("--config.num_train_steps=300", "--config.eval_every_steps=300", "--config.checkpoint_every_steps=100",
        "--config.log_every_steps=20", "--config.profile_steps=2")


@pytest.fixture(scope="module")
def gcs():
  with GcsSandbox((BUCKET,)) as sandbox:
    yield sandbox


def download(gcs: GcsSandbox, prefix: str, dest: Path) -> Path:
  """Copies every object under gs://BUCKET/prefix into dest (to read a checkpoint with plain Orbax)."""
  for name in gcs.list_objects(BUCKET, prefix):
    if not name.endswith("/"):  # TensorFlow's empty "directory" markers
      target = dest / name[len(prefix):]
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(gcs.read_object(BUCKET, name))
  return dest


def test_a_run_in_a_bucket_survives_sigterm_and_ends_identical_to_a_local_run(gcs, compilation_cache, data_dir,
                                                                               tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  # The tiny demo's TFDS records in the bucket too (the first run prepares them there).
  command = train_command(f"gs://{BUCKET}/run", *LONG, data_dir=f"gs://{BUCKET}/tfds", cache=compilation_cache,
                          arrays=str(tmp_path / "arrays"))
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
  assert rerun.returncode == 0 and f"resuming from step {step} of gs://{BUCKET}/run/checkpoints" in rerun.stdout, \
      rerun.stderr[-3000:]
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
  subprocess.run(train_command(local, *LONG, data_dir=data_dir, cache=compilation_cache), env=cpu_env(), check=True,
                 capture_output=True, timeout=600)
  in_bucket = checkpoint(download(gcs, "run/", tmp_path / "downloaded"), 300)
  jax.tree.map(np.testing.assert_array_equal, in_bucket, checkpoint(local, 300))
  assert final["eval_mae"] == json.loads((local / "final_metrics.json").read_text())["eval_mae"]


@pytest.fixture(scope="module")
def trained_in_bucket(gcs, compilation_cache, tmp_path_factory):
  """A 20-step tiny run with its workdir in the bucket."""
  tmp = tmp_path_factory.mktemp("bucket_run")
  command = train_command(f"gs://{BUCKET}/short", "--config.num_train_steps=20", "--config.eval_every_steps=10",
                          "--config.checkpoint_every_steps=10", data_dir=f"gs://{BUCKET}/tfds",
                          cache=compilation_cache, arrays=str(tmp / "arrays"))
  result = gcs.run(command, cwd=tmp, env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return f"gs://{BUCKET}/short"


def test_evaluate_and_predict_read_a_workdir_in_the_bucket(gcs, trained_in_bucket, tmp_path):
  evaluate = gcs.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--workdir", trained_in_bucket,
                      "--split", "validation"], cwd=tmp_path, env=cpu_env(), capture_output=True, text=True,
                     timeout=600)
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
  predict = gcs.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--workdir", trained_in_bucket,
                     "--aligned", "--json", f"gs://{BUCKET}/photos", "--plot", f"gs://{BUCKET}/short/faces.png"],
                    cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert predict.returncode == 0, predict.stderr[-3000:]
  results = [json.loads(line) for line in predict.stdout.splitlines()]
  assert [(r["file"], r["status"]) for r in results] == [
      (f"gs://{BUCKET}/photos/face0.png", "ok"), (f"gs://{BUCKET}/photos/face1.png", "ok"),
      (f"gs://{BUCKET}/photos/notes.txt", "not an image")]
  assert all(abs(sum(r["distribution"]) - 1) < 1e-4 for r in results[:2])
  assert gcs.read_object(BUCKET, "short/faces.png").startswith(b"\x89PNG")
  assert not [p for p in tmp_path.iterdir() if not p.name.startswith("face")]  # nothing else written here


@pytest.mark.parametrize("reachable", [True, False], ids=["missing-bucket", "unreachable-endpoint"])
def test_an_unusable_bucket_fails_in_one_line_before_compiling(gcs, data_dir, reachable, tmp_path):
  url = f"gs://{'no-such-bucket' if reachable else BUCKET}/run"
  cache = tmp_path / "compilation_cache"
  cache.mkdir()
  # Capped retries: TensorFlow's default backs off for ~195 s before giving up on a refused connection.
  result = gcs.run(train_command(url, data_dir=data_dir, cache=str(cache)), cwd=tmp_path, reachable=reachable,
                   env=gcs.env(cpu_env(), tf_retries=0), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: workdir {url} is not writable: "), result.stderr[-2000:]
  assert not list(cache.iterdir())  # nothing was compiled
  assert sorted(p.name for p in tmp_path.iterdir()) == ["compilation_cache"]


CONVERTED = r"""
import sys, jax, numpy as np, ml_collections
from flax import nnx
from agejax import configuration, convert, models, steps
url = sys.argv[1]
config = ml_collections.ConfigDict({"model": {"pretrained": url + "/missing", "batch_norm": False}})
try:
  configuration.check_pretrained(config)
except FileNotFoundError as e:
  print("MISSING", e)
model = models.VGG16(10, width_multiplier=0.0625, rngs=nnx.Rngs(1))  # converted weights, at test width
convert.save_converted(model, url, source="test")
config.model.pretrained = url
configuration.check_pretrained(config)
_, params, model_state = steps.split_model(models.VGG16(100, width_multiplier=0.0625, rngs=nnx.Rngs(2)))
params, _ = convert.backbone_from_converted(url, params, model_state)
_, want, _ = steps.split_model(model)
same = all(np.array_equal(params[k][i]["kernel"], want[k][i]["kernel"]) for k in ("convs",) for i in params[k])
print("BACKBONE", same and np.array_equal(params["fc2"]["kernel"], want["fc2"]["kernel"]),
      params["head"]["kernel"].shape)
"""


def test_converted_weights_go_to_and_come_from_a_bucket(gcs, tmp_path):
  url = f"gs://{BUCKET}/weights/vgg16_tiny"
  result = gcs.run([sys.executable, "-c", CONVERTED, url], cwd=tmp_path, env=cpu_env(), capture_output=True,
                   text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ", 1)[0].isupper())
  assert lines["MISSING"].startswith(f"config.model.pretrained='{url}/missing' holds no converted weights; create "
                                     f"them with: python scripts/convert_torchvision.py ")
  assert lines["BACKBONE"] == "True (256, 100)"
  names = gcs.list_objects(BUCKET, "weights/vgg16_tiny/")
  assert "weights/vgg16_tiny/agejax_weights.json" in names and any(n.endswith("manifest.ocdbt") for n in names)
  assert not list(tmp_path.iterdir())
