"""The export package: model.jax runs with only jax + numpy, the SavedModel with only TensorFlow, as Predictor does."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_run
from conftest import assert_same_distributions, cpu_env
from gcs_sandbox import GcsSandbox
from PIL import Image
from test_predict import FLIP_T, SINGLE_T, calibrated_two_ways, direct_distributions, shown_intervals

from agejax import errors
from agejax.evaluation import calibration
from agejax.inference import export, loading, photos, prediction
from agejax.serving.local import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
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
export.export_workdir(workdir, out, calibrated=False, saved_model=False, onnx=False)
export.export_workdir(workdir, out)  # over the first: the swap's renames are copies in a bucket
np.save(result, export.ExportedPredictor(out)(np.load(crops)))
"""


def run_python(code: str, *args) -> None:
  proc = subprocess.run(
    [sys.executable, "-c", code, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def edit_manifest(source: Path, folder: Path, **changes) -> Path:
  """Writes source's manifest into `folder` with `changes` (a dict value updates that object); returns the file."""
  manifest = json.loads((source / export.MANIFEST_FILE).read_text())
  for key, value in changes.items():
    manifest[key] = {**manifest[key], **value} if isinstance(value, dict) else value
  file = folder / export.MANIFEST_FILE
  file.write_text(json.dumps(manifest))
  return file


def copy_export(source: Path, folder: Path) -> Path:
  shutil.copytree(source, folder)
  return folder


def tree(folder: Path) -> dict[str, bytes]:
  """Every file under `folder` by relative path, with its bytes."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
  """What an export to `folder` left beside it (staging folders)."""
  return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(folder.name + "."))


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  """The single `error: ...` line a script ended with (exit 1, no traceback)."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors_ = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors_) == 1 and proc.stderr.strip().splitlines()[-1] == errors_[0], proc.stderr[-3000:]
  return errors_[0]


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
def exported(request, tmp_path_factory) -> tuple[Path, dict]:
  """(the export folder, its manifest) of the tiny run's best checkpoint, temperature applied, with a SavedModel."""
  return tiny_run.tiny_export(request, tmp_path_factory)


@pytest.fixture(scope="module")
def two_ways(workdir, tmp_path_factory) -> tuple[Path, dict[bool, calibration.Calibration]]:
  """`calibrated_two_ways` of the tiny run: single views at SINGLE_T, flip averages at FLIP_T, each its own masses."""
  return calibrated_two_ways(workdir, tmp_path_factory.mktemp("two_ways") / "run")


@pytest.fixture(scope="module")
def flip_exported(two_ways, tmp_path_factory) -> tuple[Path, dict]:
  """(the export folder, its manifest) of `two_ways` made with flip: every format, the flip way's calibration."""
  out = tmp_path_factory.mktemp("flip_export")
  return out, export.export_workdir(two_ways[0], out, flip=True)


def test_model_jax_runs_with_only_jax_and_matches_the_predictor(workdir, exported, crops, tmp_path):
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
  record = loading.load_inference_record(workdir)
  assert manifest["input_size"] == record["input_size"] == x.shape[1]
  fitted = calibration.load(workdir)  # the trainer fitted one at the end: single views', with interval masses
  assert fitted is not None and fitted.interval_masses is not None
  assert (manifest["min_age"], manifest["max_age"]) == (1, 100)
  assert (manifest["temperature"], manifest["calibrated"], manifest["flip"]) == (fitted.temperature, True, False)
  assert manifest["interval_masses"] == fitted.to_json()["interval_masses"]
  assert manifest["step"] == prediction.Predictor(workdir).step
  assert manifest["agejax_version"] and manifest["jax_version"]
  assert set(manifest["platforms"]) == set(export.PLATFORMS)


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_calibration_temperature_is_exported_and_no_calibration_leaves_it_out(two_ways, crops, tmp_path):
  """Without flip, the single-view way's temperature and interval masses (calibration.json holds both ways)."""
  calibrated_run, ways = two_ways
  _, x, _ = crops

  manifest = export.export_workdir(calibrated_run, tmp_path / "calibrated", saved_model=False, onnx=False)
  assert (manifest["temperature"], manifest["calibrated"], manifest["flip"]) == (SINGLE_T, True, False)
  assert manifest["interval_masses"] == ways[False].to_json()["interval_masses"]
  assert not (tmp_path / "calibrated" / export.SAVED_MODEL_DIR).exists()
  loaded = export.ExportedPredictor(tmp_path / "calibrated")
  assert (loaded.flip, loaded.calibration.to_json()) == (False, ways[False].to_json())
  tempered = loaded(x)
  assert_same_distributions(tempered, direct_distributions(calibrated_run, x, SINGLE_T, False))

  proc = run_export("--workdir", str(calibrated_run), "--output", str(tmp_path / "raw"), "--no-calibration")
  assert proc.returncode == 0, proc.stderr[-3000:]
  raw_manifest = json.loads((tmp_path / "raw" / export.MANIFEST_FILE).read_text())
  assert (raw_manifest["temperature"], raw_manifest["calibrated"]) == (1.0, False)
  assert raw_manifest["interval_masses"] is None  # central intervals
  raw = export.ExportedPredictor(tmp_path / "raw")(x)
  assert_same_distributions(raw, prediction.Predictor(calibrated_run, calibrated=False)(x))
  assert np.abs(tempered - raw).max() > 1e-3
  assert np.all(tempered.max(-1) < raw.max(-1))  # T = 2 flattens every distribution


@pytest.mark.slow
def test_a_flip_export_averages_each_face_with_its_mirror_in_every_format(two_ways, flip_exported, crops, tmp_path):
  """export_workdir(flip=True): model.jax, the SavedModel and model.onnx give flip averages tempered by the flip
  way's temperature; the manifest records flip and that way's calibration, which ExportedPredictor shows with."""
  run, ways = two_ways
  out, manifest = flip_exported
  crops_file, x, _ = crops
  expected = direct_distributions(run, x, FLIP_T, True)
  assert np.abs(direct_distributions(run, x, FLIP_T, False) - expected).max() > 1e-3  # the mirror image counts

  assert (manifest["flip"], manifest["temperature"], manifest["calibrated"]) == (True, FLIP_T, True)
  assert manifest["interval_masses"] == ways[True].to_json()["interval_masses"]
  assert json.loads((out / export.MANIFEST_FILE).read_text()) == manifest
  run_python(JAX_ONLY, out, crops_file, tmp_path / "jax.npy")
  run_python(TF_ONLY, out, crops_file, tmp_path / "tf.npy")
  for name in ("jax", "tf"):
    got = np.load(tmp_path / f"{name}.npy")
    assert_same_distributions(got[:1], expected[:1])
    assert_same_distributions(got[1:], expected)
  if manifest["files"]["onnx"]:  # jax2onnx converts the mirror image's reversed axis and the unrolled tilt
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(out / export.ONNX_FILE), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {export.INPUT_NAME: x})
    np.testing.assert_allclose(got, expected, atol=export.ONNX_ATOL, rtol=0)
  else:
    assert "jax2onnx" in manifest["onnx_skipped"], manifest["onnx_skipped"]  # not installed: nothing else may fail

  loaded = export.ExportedPredictor(out)
  assert (loaded.flip, loaded.temperature, loaded.calibration.to_json()) == (True, FLIP_T, ways[True].to_json())
  files = []
  for i, crop in enumerate(x):
    files.append(tmp_path / f"face{i}.png")
    Image.fromarray(crop).save(files[-1])
  faces = [r.faces[0] for r in photos.predict_files(loaded, files, aligned=True)]
  assert_same_distributions([f.distribution for f in faces], expected)
  bins = loaded.bins
  np.testing.assert_array_equal([f.interval80 for f in faces], shown_intervals(expected, bins, ways[True]))

  old = tmp_path / "old_calibration"
  shutil.copytree(run, old)
  calibration.write(old, {"split": "validation", "temperature": 1.5, "flip": False})  # from before one per way
  with pytest.raises(errors.UserError) as error:
    export.export_workdir(old, tmp_path / "refused", flip=True)
  assert "was fitted without flip averaging" in str(error.value) and "\n" not in str(error.value)
  assert not (tmp_path / "refused").exists()


def test_an_export_from_before_flip_and_interval_masses_loads_as_single_views_with_central_intervals(
  exported, tmp_path
):
  folder = copy_export(exported[0], tmp_path / "out")
  manifest = json.loads((folder / export.MANIFEST_FILE).read_text())
  del manifest["flip"], manifest["interval_masses"]
  (folder / export.MANIFEST_FILE).write_text(json.dumps(manifest))
  loaded = export.ExportedPredictor(folder)
  assert (loaded.flip, loaded.temperature, loaded.calibration.interval_masses) == (False, manifest["temperature"], None)


@pytest.mark.slow
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


@pytest.mark.slow
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
  (tmp_path / export.MODEL_FILE).write_bytes(b"not a model")
  edit_manifest(out, tmp_path, sha256={export.MODEL_FILE: hashlib.sha256(b"not a model").hexdigest()})
  with pytest.raises(errors.UserError, match="not a jax.export file"):
    export.ExportedPredictor(tmp_path)


@pytest.mark.slow
def test_an_export_goes_to_a_bucket_and_serves_from_it(workdir, crops, tmp_path):
  crops_file, _, expected = crops
  args = [str(workdir), f"gs://{BUCKET}/export", str(crops_file), str(tmp_path / "gs.npy")]
  with GcsSandbox((BUCKET,)) as gcs:
    proc = gcs.run([sys.executable, "-c", TO_BUCKET, *args], env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = set(gcs.list_objects(BUCKET, "export/"))
    manifest = json.loads(gcs.read_object(BUCKET, "export/manifest.json"))
    leftovers = [n for n in gcs.list_objects(BUCKET, "") if n.startswith("export.")]
  for name in ("model.jax", "model.onnx", "saved_model/saved_model.pb", "saved_model/variables/variables.index"):
    assert f"export/{name}" in names, names
  assert not leftovers, leftovers  # no staging or old folder beside the export
  assert sorted(manifest["sha256"]) == sorted(n.removeprefix("export/") for n in names - {"export/manifest.json"})
  assert manifest["step"] == prediction.Predictor(workdir).step
  assert_same_distributions(np.load(tmp_path / "gs.npy"), expected)


# Re-exports over an export and dies by SIGKILL once model.jax is written, before the SavedModel.
KILLED_EXPORT = """
import os, signal, sys
from agejax.inference import export
def killed(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)
export.registry.get("saved_model").write = killed
export.export_workdir(sys.argv[1], sys.argv[2], calibrated=False)
"""


@pytest.mark.slow
def test_a_killed_or_failed_reexport_leaves_the_previous_export_byte_equal(
  workdir, exported, crops, tmp_path, monkeypatch
):
  out = copy_export(exported[0], tmp_path / "out")
  before = tree(out)
  proc = subprocess.run(
    [sys.executable, "-c", KILLED_EXPORT, str(workdir), str(out)], env=ENV, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert tree(out) == before
  (staged,) = siblings(out)  # the killed export's half-written folder, beside the export, not in it
  assert ".tmp-" in staged and (out.parent / staged / export.MODEL_FILE).exists()
  assert_same_distributions(export.ExportedPredictor(out)(crops[1]), crops[2])

  def disk_full(*args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(export.registry.get("onnx"), "write", disk_full)
  with pytest.raises(OSError, match="No space"):
    export.export_workdir(workdir, out, calibrated=False, saved_model=False)
  assert tree(out) == before and siblings(out) == [staged]
  with pytest.raises(OSError, match="No space"):  # into a new folder: no folder at all is left
    export.export_workdir(workdir, tmp_path / "new" / "out", saved_model=False)
  assert not (tmp_path / "new").exists()

  monkeypatch.undo()
  manifest = export.export_workdir(workdir, out, calibrated=False, saved_model=False, onnx=False)
  assert siblings(out) == []  # the killed export's remains went with the next export
  assert sorted(p.name for p in out.iterdir()) == [export.MANIFEST_FILE, export.MODEL_FILE]  # replaced whole
  assert (manifest["calibrated"], manifest["files"]["saved_model"], manifest["files"]["onnx"]) == (False, None, None)


@pytest.mark.slow
def test_a_failed_export_leaves_no_folder(workdir, tmp_path):
  untrained = tmp_path / "untrained"  # a run that has not saved a checkpoint yet
  untrained.mkdir()
  shutil.copy(workdir / "config.json", untrained)
  for args in (["--workdir", str(workdir), "--checkpoint", "999"], ["--workdir", str(untrained)]):
    line = one_error_line(run_export(*args, "--output", str(tmp_path / "exports" / "demo")))
    assert not (tmp_path / "exports").exists(), line
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("mine")  # a folder that is not an export is never replaced
  line = one_error_line(run_export("--workdir", str(workdir), "--output", str(tmp_path / "notes")))
  assert "todo.txt, which no export writes" in line and (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_the_manifest_records_checksums_and_no_path_of_the_builder(exported, tmp_path_factory):
  out, manifest = exported
  files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != export.MANIFEST_FILE)
  assert sorted(manifest["sha256"]) == files and export.ONNX_FILE in files
  for name, digest in manifest["sha256"].items():
    assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
  assert manifest["run"] == tiny_run.RUN_DIR and "workdir" not in manifest  # exported from the shared run
  assert str(tiny_run.shared_folder(tmp_path_factory)) not in (out / export.MANIFEST_FILE).read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
  "name", [export.MODEL_FILE, "saved_model/variables/variables.data-00000-of-00001", "model.onnx"]
)
def test_a_file_changed_after_export_is_named(exported, tmp_path, name):
  folder = copy_export(exported[0], tmp_path / "out")
  file = folder / name
  data = bytearray(file.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 1024] = bytes(b ^ 0x01 for b in data[middle : middle + 1024])  # the same length
  file.write_bytes(bytes(data))
  with pytest.raises(errors.UserError) as error:
    export.verify(folder)
  assert str(error.value).startswith(f"{file}: SHA-256 ") and "\n" not in str(error.value)
  if name == export.MODEL_FILE:  # the server loads through ExportedPredictor: it refuses to start, in one line
    with pytest.raises(errors.UserError, match="SHA-256"):
      export.ExportedPredictor(folder)
    proc = subprocess.run(
      [sys.executable, "scripts/serve.py", "--export", str(folder), "--port", str(free_port())],
      cwd=ROOT,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=180,
    )
    assert one_error_line(proc) == f"error: {error.value}"
  else:
    export.ExportedPredictor(folder)  # what it runs is whole; `verify` and export.py --verify check the rest
    line = one_error_line(run_export("--verify", "--output", str(folder)))
    assert line == f"error: {error.value}"


@pytest.mark.slow
def test_crops_run_in_batches_padded_to_a_power_of_two_and_come_back_unpadded(exported, crops):
  """Any number of crops compiles few shapes: 1, 2, 4, ... up to batch_size (mutant killed: export/loading.py
  `(len(batch) - 1).bit_length()` -> `(len(batch) % 1).bit_length()`, one program per batch size)."""
  predictor = export.ExportedPredictor(exported[0])
  shapes: list[int] = []
  call = predictor._call
  predictor._call = lambda batch: shapes.append(len(batch)) or call(batch)
  images = np.concatenate([crops[1]] * 3)[:7]
  whole = predictor(images)
  for n in (1, 3, 5, 6):
    assert_same_distributions(predictor(images[:n]), whole[:n])
  assert predictor.batch_size >= 8 and shapes == [8, 1, 4, 8, 8], shapes


def test_a_file_the_manifest_lists_but_the_folder_lacks_is_named_with_the_manifest(exported, tmp_path):
  """One line naming the lost file and the manifest that lists it (mutant killed: export/manifest.py
  `predictor.path / MANIFEST_FILE` -> `predictor.path // MANIFEST_FILE`, a TypeError instead)."""
  folder = copy_export(exported[0], tmp_path / "out")
  lost = folder / export.ONNX_FILE
  lost.unlink()
  with pytest.raises(errors.MissingInput) as error:
    export.verify(folder)
  assert str(error.value) == f"{lost} does not exist, but {folder / export.MANIFEST_FILE} lists it; export again"


@pytest.mark.parametrize(
  ("changes", "message"),
  [
    ({"input_size": 80}, r"'input_size' is 80, but \S+model\.jax takes uint8 \[B, 40, 40, 3\] crops"),
    ({"step": None}, r"'step' is null, not a whole number"),
    ({"temperature": "hot"}, r"'temperature' is \"hot\", not a finite number > 0"),
    ({"temperature": -1.0}, r"'temperature' is -1.0, not a finite number > 0"),
    ({"input_size": "forty"}, r"'input_size' is \"forty\", not a whole number of pixels"),
    ({"num_bins": 99}, r"'num_bins' is 99, not max_age - min_age \+ 1 = 100"),
    ({"min_age": 11, "max_age": 110}, r"expected age is \d+\.\d\d under 'min_age'..'max_age' 11..110, but the export"),
    ({"format": "agejax-export/1"}, r"'format' is \"agejax-export/1\", not 'agejax-export/2'"),
    ({"sha256": {"../model.jax": "0" * 64}}, r"'sha256' is .*, not an object of files in the folder"),
    ({"flip": "yes"}, r"'flip' is \"yes\", not true or false"),
    ({"interval_masses": [0.8]}, r"'interval_masses' is \[0.8\], not null or, for each level 0.5, 0.8, 0.9, 0.95,"),
    ({"interval_masses": {"0.8": {"0-2": 1.5}}}, r"'interval_masses' is .*, not null or, for each level"),
  ],
)
def test_a_bad_manifest_is_refused_in_one_line_naming_the_file_key_and_value(exported, tmp_path, changes, message):
  folder = copy_export(exported[0], tmp_path / "out")
  file = edit_manifest(exported[0], folder, **changes)
  with pytest.raises(errors.UserError) as error:
    export.ExportedPredictor(folder)
  text = str(error.value)
  assert text.startswith(f"{file}: ") and "\n" not in text and re.search(message, text), text


def serialized(fn, size: int) -> bytes:
  """A jax.export file of `fn` on uint8 crops [B, size, size, 3]."""
  (batch,) = jax.export.symbolic_shape("B")
  return bytes(jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8)).serialize())


@pytest.mark.parametrize(
  ("fn", "message"),
  [
    (lambda x: jnp.full((x.shape[0], 100), jnp.nan, jnp.float32), "probabilities are not finite"),
    (lambda x: jnp.full((x.shape[0], 100), 0.01, jnp.float32), "probabilities differ from those in"),
  ],
)
def test_a_model_jax_that_predicts_otherwise_than_recorded_is_refused(exported, tmp_path, fn, message):
  """Loadable, the right shapes and a matching checksum (a tool rewrote both): the reference prediction catches it."""
  folder = copy_export(exported[0], tmp_path / "out")
  data = serialized(fn, exported[1]["input_size"])
  (folder / export.MODEL_FILE).write_bytes(data)
  edit_manifest(exported[0], folder, sha256={export.MODEL_FILE: hashlib.sha256(data).hexdigest()})
  with pytest.raises(errors.UserError, match=message) as error:
    export.ExportedPredictor(folder)
  assert str(error.value).startswith(str(folder / export.MODEL_FILE)) and "\n" not in str(error.value)


def test_the_reference_crop_is_a_fixed_gradient(exported):
  crop = export.reference_crop(5)[0]
  ramp = np.arange(5) * 255 / 4
  np.testing.assert_array_equal(crop[..., 0], np.round(np.repeat(ramp[:, None], 5, 1)))  # red down the rows
  np.testing.assert_array_equal(crop[..., 1], np.round(np.repeat(ramp[None, :], 5, 0)))  # green across
  np.testing.assert_array_equal(crop[..., 2], np.round((ramp[:, None] + ramp[None, :]) / 2))
  out, manifest = exported
  got = export.ExportedPredictor(out)(export.reference_crop(manifest["input_size"]))[0]
  np.testing.assert_allclose(got, manifest["reference"]["distribution"], atol=1e-6)
  assert abs(float(got.astype(np.float64) @ np.arange(1, 101)) - manifest["reference"]["expected_age"]) < 1e-4


def test_an_export_killed_between_its_renames_points_at_the_previous_one(exported, tmp_path):
  # The swap moved the old export aside and died before renaming the new one into place.
  aside = copy_export(exported[0], tmp_path / "out.old-4194305-0123abcd")
  with pytest.raises(errors.MissingInput) as error:
    export.ExportedPredictor(tmp_path / "out")
  assert f"left the previous one in {aside} (rename it to out, or export again)" in str(error.value)
  with pytest.raises(errors.MissingInput, match="not an export folder"):
    export.ExportedPredictor(tmp_path / "other")


@pytest.mark.parametrize(
  ("size", "window", "strides", "padding"),
  [
    (8, 2, 2, "VALID"),  # VGG's pools: rewritten as reshape + max
    (6, 2, 2, ((1, 1), (1, 1))),  # window = stride, but padded
    (7, 2, 2, "SAME"),  # padded at the end
    (9, 3, 2, ((1, 1), (1, 1))),  # ResNet's stem pool
  ],
)
def test_the_onnx_paths_rewriting_of_max_pools_leaves_the_function_unchanged(size, window, strides, padding):
  """The jaxpr handed to jax2onnx (`_inline`) computes what JAX computes, for tiling pools and every other kind (mutant
  killed: export/onnx.py `all(p == (0, 0) ...)` -> `all(p is not (0, 0) ...)`, which took padded pools for tiles)."""
  import flax.nnx as nnx

  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  pool = lambda v: nnx.max_pool(v, (window, window), strides=(strides, strides), padding=padding)  # noqa: E731
  closed = jax.make_jaxpr(pool)(x)
  (got,) = export.onnx._inline(closed.jaxpr, closed.consts, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(pool(x)))
