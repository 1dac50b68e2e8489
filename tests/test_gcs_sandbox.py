"""The offline GCS sandbox: every gs:// client the project uses reaches the emulator, and only it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gcs_sandbox import GcsSandbox

BUCKET = "agejax-test"

# One TensorFlow-importing subprocess runs every client check and reports each as JSON (TF import ~3 s).
CLIENTS = r"""
import json, sys, traceback
results = {}
def check(name):
  def run(fn):
    try:
      results[name] = fn()
    except Exception:
      results[name] = {"error": traceback.format_exc()[-2000:]}
  return run

import tensorflow as tf

@check("gfile")
def _():
  root = "gs://agejax-test/gfile"
  tf.io.gfile.makedirs(root)
  with tf.io.gfile.GFile(root + "/a.txt", "w") as f:
    f.write("hello")
  before = sorted(tf.io.gfile.listdir(root))
  tf.io.gfile.rename(root + "/a.txt", root + "/b.txt")
  with tf.io.gfile.GFile(root + "/b.txt") as f:
    text = f.read()
  tf.io.gfile.makedirs(root + "/sub")
  with tf.io.gfile.GFile(root + "/sub/c.txt", "w") as f:
    f.write("c")
  tf.io.gfile.rename(root + "/sub", root + "/moved")  # asks for the bucket's storageLayout first
  return {"before": before, "after": sorted(tf.io.gfile.listdir(root)), "text": text,
          "old_exists": tf.io.gfile.exists(root + "/a.txt"), "moved": tf.io.gfile.listdir(root + "/moved")}

@check("epath")
def _():
  from etils import epath
  path = epath.Path("gs://agejax-test/epath/note.txt")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("über")
  return {"text": path.read_text(), "backend": type(path._backend).__name__}

@check("clu")
def _():
  from clu import metric_writers
  writer = metric_writers.create_default_writer("gs://agejax-test/tb")
  writer.write_scalars(1, {"loss": 0.5})
  writer.close()
  return {}

@check("orbax")
def _():
  import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.int32)}
  with ocp.CheckpointManager("gs://agejax-test/ckpt") as manager:
    manager.save(1, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
  with ocp.CheckpointManager("gs://agejax-test/ckpt") as manager:
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.StandardRestore(tree))
  return {"step": step, "equal": bool(all(np.array_equal(restored[k], tree[k]) for k in tree))}

@check("missing_bucket")
def _():
  try:
    with tf.io.gfile.GFile("gs://no-such-bucket/x.txt", "w") as f:
      f.write("x")
  except tf.errors.OpError as error:
    return {"error_type": type(error).__name__}
  return {"error_type": None}

print("RESULTS", json.dumps(results))
"""


@pytest.fixture(scope="module")
def gcs():
  with GcsSandbox((BUCKET,)) as sandbox:
    yield sandbox


@pytest.mark.slow
def test_tensorflow_epath_clu_orbax_reach_the_sandbox(gcs):
  # One test, not one per client: under pytest-xdist each worker would import TensorFlow and JAX again.
  result = gcs.run(
    [sys.executable, "-c", CLIENTS],
    env={**gcs.env(), "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
  assert result.returncode == 0 and lines, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}\n{gcs.log()[-2000:]}"
  got = json.loads(lines[-1].removeprefix("RESULTS "))
  events = [name for name in gcs.list_objects(BUCKET, "tb/") if name.startswith("tb/events.out.tfevents.")]
  checkpoint = gcs.list_objects(BUCKET, "ckpt/1/")
  expected = {
    "gfile": {
      "before": ["a.txt"],
      "after": ["b.txt", "moved/"],
      "text": "hello",
      "old_exists": False,
      "moved": ["c.txt"],
    },
    "epath": {"text": "über", "backend": "_TfBackend"},
    "clu": {},
    "orbax": {"step": 1, "equal": True},
    "missing_bucket": {"error_type": "NotFoundError"},
  }
  failures = [f"{name}: {got.get(name)}" for name in expected if got.get(name) != expected[name]]
  assert not failures, "\n".join(failures)
  assert gcs.read_object(BUCKET, "gfile/b.txt") == b"hello"
  assert gcs.read_object(BUCKET, "epath/note.txt") == "über".encode()
  assert len(events) == 1 and gcs.read_object(BUCKET, events[0]), events
  assert "ckpt/1/commit_success.txt" in checkpoint and "ckpt/1/default/manifest.ocdbt" in checkpoint, checkpoint
  with pytest.raises(FileNotFoundError):
    gcs.list_objects("no-such-bucket")


@pytest.mark.slow
def test_objects_round_trip_and_sandboxes_are_isolated(gcs, tmp_path):
  gcs.write_object(BUCKET, "raw/a b+é", b"first")
  gcs.write_object(BUCKET, "raw/empty", b"")
  with GcsSandbox(("other",)) as second:  # its own namespace: its :443 and :80 do not clash
    second.write_object("other", "raw/a b+é", b"second")
    assert second.list_objects("other") == ["raw/a b+é"]
    with pytest.raises(FileNotFoundError):
      second.list_objects(BUCKET)
  assert gcs.list_objects(BUCKET, "raw/") == ["raw/a b+é", "raw/empty"]
  assert gcs.read_object(BUCKET, "raw/a b+é") == b"first" and gcs.read_object(BUCKET, "raw/empty") == b""
  # Commands run in the caller's directory, even one made after the sandbox started.
  result = gcs.run(
    [sys.executable, "-c", "import os; print(os.getcwd())"], cwd=tmp_path, capture_output=True, text=True, timeout=30
  )
  assert result.stdout.strip() == str(tmp_path)


def test_only_loopback_and_google_names_lead_to_it(gcs):
  probe = (
    "import socket; print([n for _, n in socket.if_nameindex()], socket.gethostbyname('www.googleapis.com'),"
    " socket.gethostbyname('storage.googleapis.com'))"
  )
  result = gcs.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True)
  assert result.stdout.split() == ["['lo']", "127.0.0.1", "127.0.0.1"]


@pytest.mark.slow
def test_unreachable_fails_fast_with_tf_retries_capped(gcs):
  script = (
    "import tensorflow as tf, time\nstart = time.monotonic()\n"
    "try:\n  tf.io.gfile.exists('gs://agejax-test/x')\nexcept tf.errors.OpError as e:\n"
    "  print(type(e).__name__, time.monotonic() - start)\n"
  )
  # The default retries would take ~195 s here; the subprocess timeout bounds the capped ones.
  result = gcs.run(
    [sys.executable, "-c", script],
    env=gcs.env(tf_retries=0),
    reachable=False,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[0] == "AbortedError", result.stdout


def test_without_privileges_the_error_says_why():
  script = "from gcs_sandbox import GcsSandbox\nwith GcsSandbox():\n  pass\n"
  result = subprocess.run(
    ["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-c", script],
    cwd=Path(__file__).parent,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert result.returncode != 0 and "SandboxUnavailable: GCS sandbox needs root (CAP_SYS_ADMIN)" in result.stderr, (
    result.stderr[-2000:]
  )
