"""Cross-validation (scripts/crossval.py) and the test-split scores every run writes to final_metrics.json."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_init_from import tiny

from agejax.training import crossval, train

ROOT = Path(__file__).resolve().parents[1]
# The demo has no benchmark folders: each "split" is another seed, passed as data.split will be.
KEY = "seed"
TEST_KEYS = ("test_mae", "test_cs5", "test_epsilon_error", "test_mae_minors", "test_coverage90")


@pytest.fixture(scope="module")
def cv(tmp_path_factory, data_dir, compilation_cache):
  """Splits 0 and 1 of the tiny config trained through crossval.run (20 steps each)."""
  workdir = tmp_path_factory.mktemp("cv")
  config = tiny(data_dir, compilation_cache)
  result = crossval.run(config, workdir, ["0", "1"], key=KEY)
  return config, workdir, result


def script(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run(
    [sys.executable, "scripts/crossval.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
  )


def finals(workdir: Path, splits=("0", "1")) -> list[dict]:
  return [json.loads((workdir / f"split{k}" / train.FINAL_METRICS).read_text()) for k in splits]


def test_each_split_is_an_ordinary_workdir_with_its_test_scores(cv):
  _, workdir, result = cv
  for k, final in zip(("0", "1"), finals(workdir)):
    recorded = json.loads((workdir / f"split{k}" / "config.json").read_text())
    assert recorded["seed"] == int(k) and final["step"] == 20
    for key in TEST_KEYS:
      assert final[key] is not None and np.isfinite(final[key]), key
    assert 0 <= final["test_cs5"] <= 1 and 0 <= final["test_coverage90"] <= 1
  assert result["finished"] == ["0", "1"] and result["missing"] == {}
  assert json.loads((workdir / crossval.RESULT_FILE).read_text()) == result


def test_final_test_scores_are_evaluate_py_s_numbers_on_the_best_checkpoint(cv, tmp_path):
  from agejax.inference import evaluate

  _, workdir, _ = cv
  run = tmp_path / "split0"
  shutil.copytree(workdir / "split0", run)
  final = json.loads((run / train.FINAL_METRICS).read_text())
  report = evaluate.evaluate_workdir(None, run, "test")  # best checkpoint, calibration.json's temperature
  assert report["step"] == final["best_step"] and report["temperature"] == final["temperature"]
  expected = {
    "test_mae": report["mae"],
    "test_cs5": report["cumulative_score"]["5"],
    "test_epsilon_error": report["epsilon_error"],
    "test_mae_minors": report["mae_minors"],
    "test_coverage90": report["calibration"]["coverage"]["0.9"],
  }
  for key, value in expected.items():
    assert final[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_aggregate_names_a_missing_split_and_computes_mean_and_std_as_numpy(cv):
  _, workdir, _ = cv
  result = crossval.aggregate(workdir, ["0", "1", "2"])
  assert result["finished"] == ["0", "1"] and list(result["missing"]) == ["2"]
  values = finals(workdir)
  for key in TEST_KEYS:
    column = np.asarray([v[key] for v in values], np.float64)
    summary = result["summary"][key]
    assert summary["n"] == 2
    assert summary["mean"] == pytest.approx(np.mean(column), rel=1e-12)
    assert summary["std"] == pytest.approx(np.std(column), rel=1e-12)  # ddof=0: the benchmark's np.std
    assert summary["std_ddof1"] == pytest.approx(np.std(column, ddof=1), rel=1e-12)
  assert result["summary"]["test_mae"]["std"] > 0  # two seeds, two models
  # As a user runs it: the table, and one line naming the missing split.
  proc = script(
    "--config", "configs/vgg16_kl.py:tiny", "--workdir", str(workdir), "--splits", "0-2", "--aggregate_only"
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  mae = result["summary"]["test_mae"]
  assert lines[2].split()[:5] == ["mean", "±", "std", f"{mae['mean']:.2f}", "±"] and f"± {mae['std']:.2f}" in lines[2]
  assert lines[3].startswith("split 0") and f"{values[0]['test_mae']:.2f}" in lines[3]
  [missing] = [line for line in lines if line.startswith("missing")]
  assert missing == f"missing 1 of 3 splits: split 2 (no final_metrics.json in {workdir}/split2)"
  assert json.loads((workdir / crossval.RESULT_FILE).read_text())["missing"] == result["missing"]


def test_print_commands_prints_one_train_command_per_split():
  proc = script(
    "--config=configs/vgg16_kl.py",
    "--workdir",
    "gs://bucket/utk_cv",
    "--splits",
    "0-4",
    "--config.model.init_from",
    "gs://bucket/imdb:300",
    "--print_commands",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines() == [
    f"python scripts/train.py --config configs/vgg16_kl.py --workdir gs://bucket/utk_cv/split{k} "
    f"--config.model.init_from=gs://bucket/imdb:300 --config.data.split={k}"
    for k in range(5)
  ]
  # A split key among the overrides is replaced by each command's own.
  assert crossval.train_commands("c.py:tiny", "w", ["3"], ["--config.data.split=9", "--config.seed=2"]) == [
    "python scripts/train.py --config c.py:tiny --workdir w/split3 --config.seed=2 --config.data.split=3"
  ]


def test_bad_splits_fail_in_one_line():
  proc = script("--config", "configs/vgg16_kl.py", "--workdir", "w", "--splits", "3-1", "--aggregate_only")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == ["error: --splits='3-1': use split numbers and ranges, e.g. 0-4 or 0,2,3"]
  assert crossval.parse_splits("0,2-3") == ["0", "2", "3"]


def test_rerunning_finished_splits_does_not_train_again(cv):
  config, workdir, result = cv
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and "checkpoints" in p.parts}
  start = time.perf_counter()
  again = crossval.run(config, workdir, ["0", "1"], key=KEY)
  assert time.perf_counter() - start < 60
  assert again == result
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and "checkpoints" in p.parts} == before


def test_a_dataset_without_a_test_split_skips_it_in_one_log_line(tiny_config, monkeypatch, caplog):
  import logging

  from agejax import settings

  cfg = settings.Settings.from_config(tiny_config)
  assert len(train.test_data(cfg)) == 50  # the demo's test split
  monkeypatch.setattr(train, "TEST_SPLIT", "holdout")  # a split the demo does not have
  caplog.set_level(logging.WARNING)
  assert train.test_data(cfg) is None
  assert [r.getMessage() for r in caplog.records] == [
    "demo has no 'holdout' split: final_metrics.json gets no test scores"
  ]


def test_benchmark_splits_of_a_fae_database_train_and_score_their_own_test_folders(
  fae_agedb,
  data_dir,
  compilation_cache,
  tmp_path,
):
  from agejax import settings
  from agejax.data import pipeline
  from agejax.inference import evaluate

  config = tiny(data_dir, compilation_cache)
  config.data.name, config.data.builder_config = "fae", fae_agedb["name"]
  config.data.data_dir, config.data.cache_dir = fae_agedb["data_dir"], fae_agedb["cache_dir"]
  # The tiny config as it is (20 steps, batch 16 of the 24 training faces): the compilation cache has its steps.
  result = crossval.run(config, tmp_path / "cv", ["0", "1"])  # data.split, the real key
  assert result["finished"] == ["0", "1"] and result["missing"] == {}
  for k in ("0", "1"):
    run = tmp_path / "cv" / f"split{k}"
    assert json.loads((run / "config.json").read_text())["data"]["split"] == k
    cfg = settings.Settings.from_config(config)
    test_ages = pipeline.load_labelled_split(dataclasses.replace(cfg.data, split=k), cfg.labels, "test").age
    report = evaluate.evaluate_workdir(None, run, "test")
    assert report["num_examples"] == len(test_ages) == 8  # folders 8-9 (split 0), 0-1 (split 1): 2 x 2 people x 2
    assert result["per_split"][k]["test_mae"] == pytest.approx(report["mae"], rel=1e-6)


def test_a_split_another_machine_holds_is_skipped_and_the_rest_still_train(tiny_config, tmp_path, monkeypatch, capsys):
  """crossval.py on several machines shares the splits: a busy split is skipped, never the rest (mutant killed:
  crossval.py:92 `continue` -> `break`, which stopped at the first busy split)."""
  from agejax.training import workdir_lock

  trained = []

  def train_and_evaluate(config, directory):
    if str(directory).endswith("split1"):
      raise workdir_lock.WorkdirBusy(f"{directory} is held by another run")
    trained.append(Path(directory).name)
    return {"step": 1}

  monkeypatch.setattr(crossval.train, "train_and_evaluate", train_and_evaluate)
  monkeypatch.setattr(crossval, "aggregate", lambda workdir, splits, write: {"splits": list(splits)})
  assert crossval.run(tiny_config, str(tmp_path), ["0", "1", "2", "3"]) == {"splits": ["0", "1", "2", "3"]}
  assert trained == ["split0", "split2", "split3"]
  assert "split 1: skipped, another run holds it:" in capsys.readouterr().out
