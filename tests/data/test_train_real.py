"""End to end on downloaded-style datasets: a UTKFace folder and CSV lists -> prepare_data.py -> train.py.

The faces are drawn by `demo_faces` and saved as JPEG files the way the real datasets ship them;
both scripts run as subprocesses, exactly as a user types them.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agejax.data import demo_faces, utkface

ROOT = Path(__file__).resolve().parents[2]
NUM_FACES = 120
FRACTIONS = dict(zip(utkface.SPLITS, utkface.UtkfaceConfig(name="x").split_fractions))
TRAIN_FLAGS = [
  "--config.num_train_steps=4",
  "--config.log_every_steps=2",
  "--config.eval_every_steps=4",
  "--config.checkpoint_every_steps=4",
]


def _env() -> dict[str, str]:
  """The environment of the scripts: CPU only, TensorFlow quiet."""
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}


def _run(*args: str) -> str:
  """Runs a script of scripts/ as a user would; returns its output, failing with it on error."""
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> tuple[Path, dict[str, int]]:
  """A UTKFace-style folder of JPEG faces plus two junk files; returns it and {file name: age}."""
  root = tmp_path_factory.mktemp("UTKFace")
  rng = np.random.default_rng(0)
  ages = {}
  for i in range(NUM_FACES):
    age = int(rng.integers(demo_faces.MIN_AGE, demo_faces.MAX_AGE + 1))
    name = f"{age}_{i % 2}_{i % 5}_2017011{i:010d}.jpg.chip.jpg"
    Image.fromarray(demo_faces.draw_face(age, rng, 64)).save(root / name, "JPEG", quality=90)
    ages[name] = age
  (root / "notes.txt").write_text("downloaded from the UTKFace page\n")
  (root / "30_0_1_20170119999999999.jpg.chip.jpg").write_bytes(b"")
  return root, ages


def _prepared(output: str) -> tuple[dict[str, int], dict[str, int]]:
  """Parses prepare_data.py's report: ({split: examples}, {skip reason: files})."""
  splits = {m[1]: int(m[2]) for m in re.finditer(r"^  (\w+) +(\d+) examples$", output, re.M)}
  skipped = {m[2]: int(m[1]) for m in re.finditer(r"^ +(\d+)  ([a-z ]+?)(?:  \(e\.g\. .*\))?$", output, re.M)}
  total = re.search(r"^  skipped +(\d+) files", output, re.M)
  assert total and int(total[1]) == sum(skipped.values()), output
  return splits, skipped


def _baseline_mae(train_ages: list[int], eval_ages: list[int]) -> float:
  """MAE on the eval ages of always predicting the mean training age."""
  return float(np.mean(np.abs(np.array(eval_ages, float) - np.mean(train_ages))))


def _train(tmp_path: Path, name: str, data_dir: Path, cache: str) -> dict:
  """Runs scripts/train.py for 4 steps of the tiny config on dataset `name`; returns final_metrics.json."""
  workdir = tmp_path / "run"
  out = _run(
    "scripts/train.py",
    "--config",
    "configs/vgg16_kl.py:tiny",
    "--workdir",
    str(workdir),
    f"--config.data.name={name}",
    f"--config.data.data_dir={data_dir}",
    "--config.data.builder_config=tiny",
    f"--config.compilation_cache_dir={cache}",
    f"--config.data.cache_dir={tmp_path / 'arrays'}",
    *TRAIN_FLAGS,
  )
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["step"] == 4 and final["eval_split"] == "validation", final
  for key in ("eval_mae", "eval_epsilon_error", "eval_cs5", "eval_loss", "baseline_mae"):
    assert math.isfinite(final[key]), (key, final)
  assert 0 <= final["eval_cs5"] <= 1 and 0 <= final["eval_epsilon_error"] <= 1
  assert "step 4" in out and (workdir / "checkpoints" / "4").is_dir()
  return final


@pytest.mark.slow
def test_utkface_folder_prepares_and_trains(faces, tmp_path, compilation_cache):
  root, ages = faces
  data_dir = tmp_path / "tfds"
  out = _run(
    "scripts/prepare_data.py",
    "utkface",
    "--manual_dir",
    str(root),
    "--data_dir",
    str(data_dir),
    "--builder_config",
    "tiny",
  )
  by_split = {
    s: [a for n, a in ages.items() if utkface.assign_split(n, FRACTIONS, seed=0) == s] for s in utkface.SPLITS
  }
  splits, skipped = _prepared(out)
  assert splits == {s: len(a) for s, a in by_split.items()}, out
  assert skipped == {"unparseable name": 1, "empty file": 1}, out
  assert "agejax_utkface" in out and str(data_dir) in out

  final = _train(tmp_path, "utkface", data_dir, compilation_cache)
  # The trainer read exactly these faces' labels: the mean-age baseline follows from them.
  assert final["baseline_mae"] == pytest.approx(_baseline_mae(by_split["train"], by_split["validation"]), rel=1e-5)


@pytest.mark.slow
def test_csv_lists_prepare_and_train(faces, tmp_path, compilation_cache):
  root, ages = faces
  manual = tmp_path / "lists"
  manual.mkdir()
  names = sorted(ages)
  split_names = {"train": names[:96], "validation": names[96:]}
  for split, listed in split_names.items():
    with open(manual / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["file_name", "age", "age_std"])
      writer.writerows([str(root / n), ages[n], 2.5 if i % 2 else ""] for i, n in enumerate(listed))
  with open(manual / "train.csv", "a", newline="") as f:
    csv.writer(f).writerows(
      [
        [str(root / "absent.jpg"), 20, ""],
        [str(root / names[0]) + "x", 20, ""],
        [str(root / "30_0_1_20170119999999999.jpg.chip.jpg"), 30, ""],
      ]
    )
  data_dir = tmp_path / "tfds"
  out = _run(
    "scripts/prepare_data.py",
    "csv_faces",
    "--manual_dir",
    str(manual),
    "--data_dir",
    str(data_dir),
    "--builder_config",
    "tiny",
  )
  splits, skipped = _prepared(out)
  assert splits == {"train": 96, "validation": NUM_FACES - 96}, out
  assert skipped == {"missing file": 2, "empty file": 1}, out

  final = _train(tmp_path, "csv_faces", data_dir, compilation_cache)
  train_ages = [ages[n] for n in split_names["train"]]
  eval_ages = [ages[n] for n in split_names["validation"]]
  assert final["baseline_mae"] == pytest.approx(_baseline_mae(train_ages, eval_ages), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bad header", "missing folder"])
def test_prepare_data_fails_in_one_line_naming_the_file_or_folder(tmp_path, case):
  manual = tmp_path / "lists"
  if case == "bad header":
    manual.mkdir()
    (manual / "train.csv").write_text("file,age\na.jpg,3\n")
    (manual / "validation.csv").write_text("file_name,age\n")
  proc = subprocess.run(
    [
      sys.executable,
      "scripts/prepare_data.py",
      "csv_faces",
      "--manual_dir",
      str(manual),
      "--data_dir",
      str(tmp_path / "tfds"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and str(manual) in last, last
  assert ("file_name" in last) if case == "bad header" else ("--manual_dir" in last)
