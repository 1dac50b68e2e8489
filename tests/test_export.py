"""export.py: model.jax runs with only jax + numpy, the SavedModel with only TensorFlow, both as Predictor does."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_run
from conftest import assert_same_distributions, cpu_env
from gcs_sandbox import GcsSandbox
from PIL import Image

from agejax import errors
from agejax.evaluation import calibration
from agejax.inference import export, loading, photos, prediction

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
BUCKET = "agejax-test"

# Runs in a process that imports jax and numpy only: the export needs none of agejax's model code.
JAX_ONLY = """
import sys
import jax, numpy as np
export_dir, crops, result = sys.argv[1:4]
with open(export_dir + "/model.jax", "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
x = np.load(crops)
one, five = np.asarray(exported.call(x[:1])), np.asarray(exported.call(x))  # one file, two batch sizes
assert one.dtype == five.dtype == np.float32, (one.dtype, five.dtype)
loaded = [m for m in ("agejax", "flax", "tensorflow") if m in sys.modules]
assert not loaded, loaded
np.save(result, np.concatenate([one, five]))
"""

# Runs in a process that imports TensorFlow and numpy only.
TF_ONLY = """
import sys
import numpy as np, tensorflow as tf
export_dir, crops, result = sys.argv[1:4]
serve = tf.saved_model.load(export_dir + "/saved_model").signatures["serving_default"]
x = np.load(crops)
out = [serve(images=tf.constant(b))["probabilities"].numpy() for b in (x[:1], x)]
loaded = [m for m in ("agejax", "flax") if m in sys.modules]
assert not loaded, loaded
np.save(result, np.concatenate(out))
"""

# Exports to the bucket and serves from it, in the GCS sandbox's network namespace.
TO_BUCKET = """
import sys
import numpy as np
from agejax.inference import export
workdir, out, crops, result = sys.argv[1:5]
export.export_workdir(workdir, out)
np.save(result, export.ExportedPredictor(out)(np.load(crops)))
"""


def run_python(code: str, *args) -> None:
  proc = subprocess.run(
    [sys.executable, "-c", code, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def run_export(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "scripts/export.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180
  )


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory) -> Path:
  """The session's tiny run, copied for this module (no calibration.json)."""
  return tiny_run.tiny_run(request, tmp_path_factory)[1]


@pytest.fixture(scope="module")
def crops(workdir, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
  """(a .npy file of 5 random S x S uint8 crops, those crops, Predictor's distributions of them)."""
  predictor = prediction.Predictor(workdir)
  size = predictor.input_size
  x = np.random.default_rng(0).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
  x[1] = 0  # a black face and a white one: the ends of the uint8 range
  x[2] = 255
  path = tmp_path_factory.mktemp("crops") / "crops.npy"
  np.save(path, x)
  return path, x, predictor(x)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory) -> tuple[Path, dict]:
  """(the export folder, its manifest) of the tiny run's best checkpoint, temperature applied, with a SavedModel."""
  out = tmp_path_factory.mktemp("export")
  return out, export.export_workdir(workdir, out)


def test_model_jax_runs_with_only_jax_and_matches_the_predictor(exported, crops, tmp_path):
  out, manifest = exported
  crops_file, x, expected = crops
  run_python(JAX_ONLY, out, crops_file, tmp_path / "jax.npy")
  got = np.load(tmp_path / "jax.npy")
  assert_same_distributions(got[:1], expected[:1])
  assert_same_distributions(got[1:], expected)
  assert got.shape == (6, 100)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)

  on_disk = json.loads((out / export.MANIFEST_FILE).read_text())
  assert on_disk == manifest
  record = loading.load_inference_record(exported[1]["workdir"])
  assert manifest["input_size"] == record["input_size"] == x.shape[1]
  temperature = calibration.load_temperature(manifest["workdir"])  # the trainer fitted one at the end
  assert (manifest["min_age"], manifest["max_age"]) == (1, 100)
  assert (manifest["temperature"], manifest["calibrated"]) == (temperature or 1.0, temperature is not None)
  assert manifest["step"] == prediction.Predictor(manifest["workdir"]).step
  assert manifest["agejax_version"] and manifest["jax_version"]
  assert set(manifest["platforms"]) == set(export.PLATFORMS)


def test_the_shared_tolerance_sees_one_grey_level_of_brightness(workdir, crops):
  """The export, SavedModel and server tests compare with `assert_same_distributions`: drift fails them."""
  _, x, expected = crops
  brighter = prediction.Predictor(workdir)(np.minimum(x.astype(np.int16) + 1, 255).astype(np.uint8))
  with pytest.raises(AssertionError):
    assert_same_distributions(brighter, expected)
  assert_same_distributions(prediction.Predictor(workdir, batch_size=2)(x), expected)  # another batching is no drift


def test_saved_model_runs_with_only_tensorflow_and_matches_the_predictor(exported, crops, tmp_path):
  out, _ = exported
  crops_file, _, expected = crops
  run_python(TF_ONLY, out, crops_file, tmp_path / "tf.npy")
  got = np.load(tmp_path / "tf.npy")
  assert_same_distributions(got[:1], expected[:1])
  assert_same_distributions(got[1:], expected)


def test_the_calibration_temperature_is_exported_and_no_calibration_leaves_it_out(workdir, crops, tmp_path):
  calibrated_run = tmp_path / "run"
  shutil.copytree(workdir, calibrated_run)
  calibration.write(calibrated_run, {"temperature": 2.0})
  _, x, _ = crops

  manifest = export.export_workdir(calibrated_run, tmp_path / "calibrated", saved_model=False)
  assert (manifest["temperature"], manifest["calibrated"]) == (2.0, True)
  assert not (tmp_path / "calibrated" / export.SAVED_MODEL_DIR).exists()
  tempered = export.ExportedPredictor(tmp_path / "calibrated")(x)
  assert_same_distributions(tempered, prediction.Predictor(calibrated_run, calibrated=True)(x))

  proc = run_export("--workdir", str(calibrated_run), "--output", str(tmp_path / "raw"), "--no-calibration")
  assert proc.returncode == 0, proc.stderr[-3000:]
  raw_manifest = json.loads((tmp_path / "raw" / export.MANIFEST_FILE).read_text())
  assert (raw_manifest["temperature"], raw_manifest["calibrated"]) == (1.0, False)
  raw = export.ExportedPredictor(tmp_path / "raw")(x)
  assert_same_distributions(raw, prediction.Predictor(calibrated_run, calibrated=False)(x))
  assert np.abs(tempered - raw).max() > 1e-3
  assert np.all(tempered.max(-1) < raw.max(-1))  # T = 2 flattens every distribution


def test_the_script_exports_a_chosen_checkpoint_and_fails_in_one_line(workdir, tmp_path):
  out = tmp_path / "out"
  proc = run_export("--workdir", str(workdir), "--output", str(out), "--checkpoint", "latest", "--nosaved_model")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert str(out / export.MODEL_FILE) in proc.stdout
  manifest = json.loads((out / export.MANIFEST_FILE).read_text())
  assert (manifest["step"], manifest["checkpoint"], manifest["files"]["saved_model"]) == (
    tiny_run.STEPS,
    "latest",
    None,
  )
  assert export.ExportedPredictor(out).step == tiny_run.STEPS

  (tmp_path / "a_file").write_text("")
  for args, message in [
    (["--workdir", str(tmp_path / "absent"), "--output", str(out)], "does not exist"),
    (["--workdir", str(workdir), "--output", str(tmp_path / "a_file" / "out")], "is not writable"),
  ]:
    proc = run_export(*args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_aligned_photos_through_the_export_match_the_predictor(workdir, exported, crops, tmp_path):
  out, _ = exported
  _, x, _ = crops
  files = []
  for i, crop in enumerate(np.concatenate([x, x[::-1]])):  # 10 faces: batches of 4, 4 and 2 (padded to 2)
    files.append(tmp_path / f"face{i}.png")
    Image.fromarray(crop).save(files[-1])
  from_export = list(photos.predict_files(export.ExportedPredictor(out, batch_size=4), files, aligned=True))
  from_workdir = list(photos.predict_files(prediction.Predictor(workdir, batch_size=4), files, aligned=True))
  assert len(from_export) == len(from_workdir) == 10
  for a, b in zip(from_export, from_workdir):
    (fa,), (fb,) = a.faces, b.faces
    assert_same_distributions(fa.distribution, fb.distribution)
    assert abs(fa.predicted_age - fb.predicted_age) < 1e-3


def test_the_exported_predictor_rejects_what_it_cannot_run(exported, tmp_path):
  out, manifest = exported
  predictor = export.ExportedPredictor(out)
  s = manifest["input_size"]
  assert (predictor.input_size, predictor.step) == (s, manifest["step"])
  assert predictor.temperature == manifest["temperature"]
  assert predictor.bins.dtype == np.float32 and predictor.bins[0] == 1 and len(predictor.bins) == 100
  assert predictor(np.zeros((0, s, s, 3), np.uint8)).shape == (0, 100)
  with pytest.raises(errors.UserError, match=rf"uint8 RGB face crops \[N, {s}, {s}, 3\]"):
    predictor(np.zeros((1, s + 1, s + 1, 3), np.uint8))
  with pytest.raises(errors.UserError, match="not an export folder"):
    export.ExportedPredictor(tmp_path)
  shutil.copy(out / export.MANIFEST_FILE, tmp_path)
  (tmp_path / export.MODEL_FILE).write_bytes(b"not a model")
  with pytest.raises(errors.UserError, match="not a jax.export file"):
    export.ExportedPredictor(tmp_path)


def test_an_export_goes_to_a_bucket_and_serves_from_it(workdir, crops, tmp_path):
  crops_file, _, expected = crops
  args = [str(workdir), f"gs://{BUCKET}/export", str(crops_file), str(tmp_path / "gs.npy")]
  with GcsSandbox((BUCKET,)) as gcs:
    proc = gcs.run([sys.executable, "-c", TO_BUCKET, *args], env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = set(gcs.list_objects(BUCKET, "export/"))
    manifest = json.loads(gcs.read_object(BUCKET, "export/manifest.json"))
  for name in ("model.jax", "saved_model/saved_model.pb", "saved_model/variables/variables.index"):
    assert f"export/{name}" in names, names
  assert manifest["step"] == prediction.Predictor(workdir).step
  assert_same_distributions(np.load(tmp_path / "gs.npy"), expected)
