"""A newcomer's mistakes (issue 25), each through the real script: one `error:` line, the exit code, nothing left.

And what a newcomer reads when nothing is wrong: no library log noise, the run's summary table on a
rerun, full file names, reports that say which checkpoint was scored, faces numbered from 1.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_run
from PIL import Image

from agejax import errors
from agejax.inference import figures, photos
from agejax.training import checkpointing, train
from configs import vgg16_kl

ROOT = Path(__file__).resolve().parents[1]
# As a user runs the scripts: no TF_CPP_MIN_LOG_LEVEL of the test session's own.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
ENV |= {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
# The log noise a newcomer saw on every script (TensorFlow's oneDNN banner, Orbax's read-only notices).
NOISE = ("oneDNN", "absl::InitializeLog", "read_only=True", "Given directory is read only", "Traceback")


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
  """(final metrics, workdir) of the session's tiny run, copied for this module."""
  return tiny_run.tiny_run(request, tmp_path_factory)


@pytest.fixture(scope="module")
def face(tmp_path_factory) -> Path:
  """A 40x40 face crop (one of the tiny demo's generated faces, drawn here)."""
  from agejax.data import demo_faces

  image, _, _ = demo_faces.sample_person(3, 0, 40)
  path = tmp_path_factory.mktemp("faces") / "face.png"
  Image.fromarray(image).save(path)
  return path


def script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs scripts/NAME as a user would, from the repository root."""
  return subprocess.run(
    [sys.executable, f"scripts/{name}", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
  )


def one_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
  """The one `error: ...` line a failed script printed on stderr (and nothing else), its text after `error: `."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0].removeprefix("error: ")


def assert_quiet(stderr: str) -> None:
  """No TensorFlow or Orbax log lines, no traceback."""
  assert not [line for line in stderr.splitlines() if any(n in line for n in NOISE)], stderr[-3000:]


@pytest.mark.slow
def test_predict_makes_the_plots_folder_says_age_and_counts_the_skips_without_noise(trained, face, tmp_path):
  _, workdir = trained
  folder = tmp_path / "photos"
  folder.mkdir()
  shutil.copy(face, folder / "a_face.png")
  (folder / "b_notes.txt").write_text("not a photo\n")  # unreadable inside a named folder: a skip, not an error
  plot = tmp_path / "plots" / "new" / "faces.png"  # neither folder exists
  proc = script("predict.py", "--workdir", str(workdir), "--aligned", "--json", "--plot", str(plot), str(folder))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_quiet(proc.stderr)
  with Image.open(plot) as png:
    assert png.format == "PNG"
  first, second = (json.loads(line) for line in proc.stdout.splitlines())
  assert second == {"file": str(folder / "b_notes.txt"), "status": "not an image"}
  # `age`, as the server says it; `predicted_age` the same number for a release; `face` an index from 0.
  assert first["age"] == first["predicted_age"] and first["face"] == 0 and first["status"] == "ok"
  assert first["age"] == pytest.approx(float(np.dot(first["distribution"], np.arange(1, 101))), abs=1e-3)
  assert "2 file(s): 1 face(s) predicted, 0 without a face, 1 skipped" in proc.stderr


@pytest.mark.slow
def test_predict_numbers_faces_from_1_and_verbosity_brings_the_library_logs_back(trained, face):
  _, workdir = trained
  proc = script("predict.py", "--workdir", str(workdir), "--aligned", "--verbosity=-1", str(face))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = proc.stdout.splitlines()
  assert line.startswith(f"{face}  face 1  box 0,0,40,40  age ")
  assert "Given directory is read only" in proc.stderr  # Orbax's notice: hidden by default only


@pytest.mark.slow
def test_a_named_file_that_does_not_exist_is_an_error_before_anything_loads(trained, face, tmp_path):
  _, workdir = trained
  missing = tmp_path / "holiday.jpg"
  plot = tmp_path / "plots" / "faces.png"
  proc = script("predict.py", "--workdir", str(workdir), "--plot", str(plot), str(face), str(missing))
  assert one_error(proc) == f"{missing} does not exist (no such file)"
  assert not (tmp_path / "plots").exists() and proc.stdout == ""


@pytest.mark.slow
def test_a_plot_path_inside_a_file_fails_in_one_line_before_predicting(trained, face, tmp_path):
  _, workdir = trained
  (tmp_path / "notes").write_text("a file, not a folder\n")
  proc = script("predict.py", "--workdir", str(workdir), "--plot", str(tmp_path / "notes" / "x.png"), str(face))
  assert one_error(proc) == f"--plot={tmp_path / 'notes' / 'x.png'}: {tmp_path / 'notes'} is a file, not a folder"
  assert proc.stdout == ""


@pytest.mark.slow
def test_a_workdir_that_does_not_exist_says_so_and_names_a_close_one(trained, face, tmp_path):
  _, workdir = trained
  typo = workdir.parent / (workdir.name + "o")
  proc = script("predict.py", "--workdir", str(typo), "--aligned", str(face))
  assert one_error(proc) == (
    f"{typo} does not exist (did you mean {workdir}?); train a model first: "
    f"python scripts/train.py --config configs/vgg16_kl.py --workdir {typo}"
  )
  assert not typo.exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["demo", "tiny"])
def test_a_workdir_without_checkpoints_suggests_the_variant_its_config_records(variant, face, tmp_path):
  workdir = tmp_path / "runs" / "demo"
  workdir.mkdir(parents=True)
  (workdir / checkpointing.CONFIG_FILE).write_text(json.dumps(vgg16_kl.get_config(variant).to_dict()))
  proc = script("predict.py", "--workdir", str(workdir), "--aligned", str(face))
  assert one_error(proc) == (
    f"{workdir} holds no checkpoints; train a model first: "
    f"python scripts/train.py --config configs/vgg16_kl.py:{variant} --workdir {workdir}"
  )
  assert sorted(p.name for p in workdir.iterdir()) == [checkpointing.CONFIG_FILE]


@pytest.mark.slow
def test_an_unknown_split_fails_in_one_line_before_loading_and_writes_nothing(trained):
  _, workdir = trained
  proc = script("evaluate.py", "--workdir", str(workdir), "--split", "testing")
  assert one_error(proc) == "--split='testing': demo has the splits test, train, validation"
  assert not (workdir / "eval").exists()


def snapshot(folder: Path) -> dict[str, bytes]:
  """Every file under `folder` with its content."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_demo_workdir_rerun_without_the_variant_reports_the_config_mismatch_first(tmp_path):
  # A finished demo run, as far as the check can tell: its config.json and a checkpoint step folder.
  workdir = tmp_path / "runs" / "demo"
  (workdir / "checkpoints" / "800").mkdir(parents=True)
  (workdir / checkpointing.CONFIG_FILE).write_text(json.dumps(vgg16_kl.get_config("demo").to_dict()))
  before = snapshot(workdir)
  proc = script("train.py", "--config", "configs/vgg16_kl.py", "--workdir", str(workdir))
  message = one_error(proc)
  # Not the default config's missing ImageNet weights: the run's own config.json comes first.
  assert message.startswith("config.model.width_multiplier=1.0, ") and "pretrained" not in message, message
  assert message.endswith(
    f"in {workdir / 'config.json'}, which this workdir's checkpoints were trained with: these keys set what the "
    "checkpoints mean and cannot change on resume; use a new workdir, or the run's values "
    "(it was trained with --config configs/vgg16_kl.py:demo)"
  )
  assert snapshot(workdir) == before and sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json"]


@pytest.mark.slow
def test_rerunning_a_finished_run_prints_its_summary_table(trained, compilation_cache, tmp_path):
  final, workdir = trained
  before = json.loads((workdir / train.FINAL_METRICS).read_text())
  # The data it was trained on (another xdist worker's, whose array cache exists): a worker's own would
  # print its cache being built first.
  data = json.loads((workdir / checkpointing.CONFIG_FILE).read_text())["data"]
  overrides = [
    f"--config.data.data_dir={data['data_dir']}",
    f"--config.data.cache_dir={data['cache_dir']}",
    f"--config.compilation_cache_dir={compilation_cache}",
    "--config.model.batch_norm=True",
    "--config.batch_size=32",
    f"--config.num_train_steps={tiny_run.STEPS}",
    *(f"--config.{k}_every_steps={tiny_run.CHECKPOINTS[0]}" for k in ("eval", "checkpoint", "log")),
  ]
  proc = script("train.py", "--config", "configs/vgg16_kl.py:tiny", "--workdir", str(workdir), *overrides)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == (
    f"{workdir} finished at step {tiny_run.STEPS}: nothing to train (raise num_train_steps to go on)\n"
    f"{train.summary(final)}\n"
  )
  assert "resuming" not in proc.stdout and "{" not in proc.stdout
  assert_quiet(proc.stderr)
  assert json.loads((workdir / train.FINAL_METRICS).read_text()) == before


@pytest.mark.slow
def test_flip_reports_are_named_apart_and_an_unevaluated_run_reports_its_latest_checkpoint(trained, tmp_path):
  _, workdir = trained
  run = tmp_path / "unevaluated"
  shutil.copytree(workdir, run)
  for metrics in run.glob("checkpoints/*/metrics"):  # as a run stopped before its first evaluation has them
    shutil.rmtree(metrics)
  (run / "eval").mkdir(exist_ok=True)
  (run / "eval" / "test.json").write_text('{"the no-flip report": true}')
  proc = script("evaluate.py", "--workdir", str(run), "--flip", "--no-calibration")  # the README's old spelling
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_quiet(proc.stderr)
  names = ["test_flip.json", "test_flip_predictions.jsonl"] + [
    f"test_flip_{n}.png"
    for n in ("cs_curve", "mae_by_age_group", "predicted_vs_true", "groups", "calibration", "age_checks")
  ]
  wrote = proc.stdout[proc.stdout.index("wrote ") :].removeprefix("wrote ").split()
  assert wrote == [os.path.join(str(run), "eval", n) for n in names]
  assert all((run / "eval" / n).is_file() for n in names)
  assert (run / "eval" / "test.json").read_text() == '{"the no-flip report": true}'
  report = json.loads((run / "eval" / "test_flip.json").read_text())
  assert (report["checkpoint"], report["step"], report["flip"], report["temperature"]) == (
    "latest",
    tiny_run.STEPS,
    True,
    1.0,
  )
  assert f"checkpoint latest (step {tiny_run.STEPS})" in proc.stdout
  assert f"has no evaluated checkpoint; using the latest, step {tiny_run.STEPS}" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["predict.py", "evaluate.py", "serve.py", "export.py"])
def test_help_shows_a_positive_calibration_flag(name):
  proc = script(name, "--help")  # absl's --help exits 1
  assert "--[no]calibration" in proc.stdout and "no-calibration:" not in proc.stdout and "[no]no-" not in proc.stdout
  assert "--nocalibration (or --no-calibration)" in " ".join(proc.stdout.split())
  assert "-v,--verbosity: Logging verbosity. Default: agejax's own warnings only" in proc.stdout


@pytest.mark.slow
def test_train_help_lists_the_flags_defined_for_it_in_cli():
  proc = script("train.py", "--help")  # absl's --help exits 1
  for flag in ("--[no]multihost", "--coordinator_address", "--num_processes", "--process_id", "-v,--verbosity"):
    assert f"  {flag}: " in proc.stdout, proc.stdout


@pytest.mark.slow
def test_the_demo_is_generated_not_downloaded(tmp_path):
  proc = script("prepare_data.py", "demo", "--builder_config", "tiny", "--data_dir", str(tmp_path / "tfds"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  where = tmp_path / "tfds" / "agejax_demo" / "tiny" / "2.0.0"
  assert f"generating the demo dataset (192 / 50 / 50 faces at 40x40, nothing to download) in {where}" in proc.stdout
  assert "Download" not in proc.stdout + proc.stderr and "dataset_info.json" not in proc.stderr
  assert_quiet(proc.stderr)


@pytest.mark.slow
def test_the_plots_face_crops_hide_no_bar():
  """Each inset's lower edge, in data units, is above every bar (whatever side the mass is on)."""
  bins = np.arange(1, 101)
  rng = np.random.default_rng(0)
  results = []
  for centre in (5, 50, 95):  # mass under the insets (left), in the middle, at the right
    faces = []
    for shift in (0, 3, -4, 8):  # four faces: three insets
      p = np.exp(-0.5 * ((bins - np.clip(centre + shift, 1, 100)) / 2.0) ** 2)
      p /= p.sum()
      faces.append(
        photos.Face((0, 0, 40, 40), chip=rng.integers(0, 255, (40, 40, 3), np.uint8), distribution=p, std=2.0)
      )
    photo = Image.new("RGB", (40, 40))
    results.append(photos.ImageResult(f"{centre}.png", "ok", faces, photo=photo))
  fig = figures.results_figure(results, bins)
  fig.canvas.draw()
  dist_axes = [ax for ax in fig.axes if ax.get_title() == "predicted age distribution"]
  assert len(dist_axes) == 3
  for ax, result in zip(dist_axes, results):
    insets = ax.child_axes
    assert len(insets) == figures.PLOT_MAX_INSETS
    to_data = ax.transData.inverted()
    tallest = max(float(np.max(f.distribution)) for f in result.faces)
    for inset in insets:
      (x0, y0), (x1, _) = to_data.transform(inset.get_window_extent().get_points())
      under = [f.distribution[(bins >= x0 - 0.5) & (bins <= x1 + 0.5)] for f in result.faces]
      assert max(float(np.max(u, initial=0)) for u in under) < y0 and tallest < y0
    assert [t.get_text().split(":")[0] for t in ax.get_legend().get_texts()] == ["face 1", "face 2", "face 3", "face 4"]


def test_a_plot_path_that_is_a_folder_is_refused(tmp_path):
  with pytest.raises(errors.UserError, match=r"is a folder: name the PNG file to write"):
    figures.check_plot_path(tmp_path)
