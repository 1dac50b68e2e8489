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

from agejax import errors
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
  assert lines[2].startswith("mean ± std") and f"{mae['mean']:.2f} ± {mae['std']:.2f}" in lines[2]
  assert lines[3].startswith("split 0") and f"{values[0]['test_mae']:.2f}" in lines[3]
  [missing] = [line for line in lines if line.startswith("missing")]
  assert missing == f"missing 1 of 3 splits: split 2 (no final_metrics.json in {workdir}/split2)"
  assert json.loads((workdir / crossval.RESULT_FILE).read_text())["missing"] == result["missing"]
  # Then the benchmark's table: one row, this database (the demo's tiny config), 2 of the 3 splits finished.
  assert result["database"] == "demo/tiny"
  [row] = [line for line in lines if line.startswith("demo/tiny ")]
  bench = [v.get("test_bench_mae") for v in values]
  cell = "-" if None in bench else f"{np.mean(bench):.2f}({np.std(bench):.2f})"
  assert row.split()[1] == cell and row.split()[-1] == "2/3"


@pytest.mark.slow
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


@pytest.mark.slow
def test_bad_splits_fail_in_one_line():
  proc = script("--config", "configs/vgg16_kl.py", "--workdir", "w", "--splits", "3-1", "--aggregate_only")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == ["error: --splits='3-1': use split numbers and ranges, e.g. 0-4 or 0,2,3"]
  assert crossval.parse_splits("0,2-3") == ["0", "2", "3"]


@pytest.mark.slow
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


@pytest.mark.slow
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
  crossval.run's `continue` -> `break`, which stopped at the first busy split)."""
  from agejax.training import workdir_lock

  trained = []

  def train_and_evaluate(config, directory):
    if str(directory).endswith("split1"):
      raise workdir_lock.WorkdirBusy(f"{directory} is held by another run")
    trained.append(Path(directory).name)
    return {"step": 1}

  monkeypatch.setattr(crossval.train, "train_and_evaluate", train_and_evaluate)
  monkeypatch.setattr(crossval, "aggregate", lambda workdir, splits, write: {"splits": list(splits)})
  # The demo has no benchmark folders: the seed stands for data.split (as the `cv` fixture's).
  assert crossval.run(tiny_config, str(tmp_path), ["0", "1", "2", "3"], key=KEY) == {"splits": ["0", "1", "2", "3"]}
  assert trained == ["split0", "split2", "split3"]
  assert "split 1: skipped, another run holds it:" in capsys.readouterr().out


def write_split(workdir: Path, split: str, database: tuple[str, str], **scores) -> None:
  """A finished split as train.py leaves it: final_metrics.json with these test scores, config.json's data."""
  directory = workdir / f"split{split}"
  directory.mkdir(parents=True)
  final = {"step": 100, "best_step": 50, "eval_mae": 6.0, "eval_bench_mae": 6.1, "temperature": 1.0, **scores}
  (directory / train.FINAL_METRICS).write_text(json.dumps(final))
  name, builder_config = database
  (directory / "config.json").write_text(json.dumps({"data": {"name": name, "builder_config": builder_config}}))


@pytest.mark.slow
def test_the_benchmark_table_writes_mean_and_population_std_per_database_as_the_benchmarks_evaluation(tmp_path):
  # AgeDB: three splits; [5.1, 5.3, 5.2] -> mean 5.2, std sqrt((0.01 + 0.01 + 0) / 3) = 0.0816 -> "5.20(0.08)";
  # CS@5 [0.61, 0.64, 0.58] -> 0.61, sqrt((0 + 0.0009 + 0.0009) / 3) = 0.0245 -> "0.61(0.02)".
  agedb = tmp_path / "agedb_cv"
  for k, (mae, cs5) in enumerate([(5.1, 0.61), (5.3, 0.64), (5.2, 0.58)]):
    write_split(agedb, str(k), ("fae", "agedb"), test_mae=mae + 0.1, test_bench_mae=mae, test_bench_cs5=cs5)
  # CLAP2016: its one split; an older run without the benchmark's scores: "-".
  clap = tmp_path / "clap_cv"
  write_split(clap, "0", ("fae", "clap2016"), test_mae=4.4, test_bench_mae=4.5, test_bench_cs5=0.7)
  old = tmp_path / "old_cv"
  write_split(old, "0", ("utkface", ""), test_mae=4.9)
  results = {
    "agedb": crossval.aggregate(agedb, ["0", "1", "2", "3", "4"]),  # splits 3 and 4 not finished
    "clap2016": crossval.aggregate(clap, ["0"]),
    "utkface": crossval.aggregate(old, ["0"]),
  }
  assert [r["database"] for r in results.values()] == ["agedb", "clap2016", "utkface"]
  assert results["agedb"]["per_split"]["1"]["eval_bench_mae"] == 6.1
  assert crossval.benchmark_table(results).splitlines() == [
    "benchmark table (lib/evaluation.py): test part, mean(std) over each database's finished splits, std ddof=0",
    "            age[mae]    age[cs5]  splits",
    "agedb     5.20(0.08)  0.61(0.02)     3/5",
    "clap2016  4.50(0.00)  0.70(0.00)     1/1",
    "utkface            -           -     1/1",
  ]
  # Any column of crossval.json's: the expectation's MAE, [5.2, 5.4, 5.3] -> "5.30(0.08)".
  assert crossval.benchmark_table(results, ["test_mae"]).splitlines()[2].split() == ["agedb", "5.30(0.08)", "3/5"]

  # scripts/table.py over the crossval.json files just written; a second workdir of the same database is
  # named by its path.
  again = tmp_path / "agedb_again"
  write_split(again, "0", ("fae", "agedb"), test_mae=5.0, test_bench_mae=5.0, test_bench_cs5=0.5)
  crossval.aggregate(again, ["0"])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  command = [sys.executable, "scripts/table.py", str(agedb), str(clap), str(again)]
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line.split() for line in proc.stdout.splitlines()[2:]]
  assert rows == [
    ["agedb", "5.20(0.08)", "0.61(0.02)", "3/5"],
    ["clap2016", "4.50(0.00)", "0.70(0.00)", "1/1"],
    [str(again), "5.00(0.00)", "0.50(0.00)", "1/1"],
  ]
  missing = subprocess.run([*command[:2], str(tmp_path / "nothing")], cwd=ROOT, env=env, capture_output=True, text=True)
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
    f"error: {tmp_path / 'nothing'}/crossval.json does not exist: aggregate its splits first with "
    f"scripts/crossval.py --config ... --workdir {tmp_path / 'nothing'} --aggregate_only"
  ]
  bad = subprocess.run([*command, "--metrics=test_mae,age"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[0].startswith("error: --metrics: 'age' is not one")


def test_one_run_s_cross_dataset_evaluations_are_rows_of_the_benchmark_table(tmp_path):
  """configs/fae_benchmark.py:pretrain's run: its own test part and every other database's folders, a row each."""
  run = tmp_path / "imdb_em_cnn"
  run.mkdir()
  final = {
    "test_mae": 4.1,
    "test_bench_mae": 4.0,
    "test_bench_cs5": 0.66,
    "evals": {"morph": {"mae": 5.2, "bench_mae": 5.25, "bench_cs5": 0.5}, "agedb": {"mae": 6.0, "bench_mae": 6.01}},
  }
  (run / "final_metrics.json").write_text(json.dumps(final))
  table = crossval.benchmark_table(crossval.cross_dataset_results(run)).splitlines()
  assert [line.split() for line in table[1:]] == [
    ["age[mae]", "age[cs5]", "splits"],
    ["imdb_em_cnn", "(test)", "4.00(0.00)", "0.66(0.00)", "1/1"],
    ["morph", "5.25(0.00)", "0.50(0.00)", "1/1"],
    ["agedb", "6.01(0.00)", "-", "1/1"],
  ]
  with pytest.raises(errors.MissingInput, match="has neither crossval.json nor final_metrics.json"):
    crossval.cross_dataset_results(tmp_path / "nothing")


@pytest.mark.slow
def test_crossval_runs_the_one_split_of_a_three_folder_database_and_refuses_another_before_training(
  tmp_path, compilation_cache
):
  from fae_fixtures import make_fae_database, prepare_fae

  # CLAP2016's layout: folders 0-2 and the one split train 0, validation 1, test 2.
  json_path, images = make_fae_database(tmp_path, "clap2016_aligned", subjects_per_folder=8, images_per_subject=1)
  prepare_fae(json_path, images, tmp_path / "tfds", "clap")
  flags = [
    "--config",
    "configs/vgg16_kl.py:tiny",
    "--config.data.name=fae",
    "--config.data.builder_config=clap",
    f"--config.data.data_dir={tmp_path / 'tfds'}",
    f"--config.data.cache_dir={tmp_path / 'arrays'}",
    f"--config.compilation_cache_dir={compilation_cache}",
    # test_init_from.tiny's run, whose steps the session's compilation cache holds.
    "--config.model.batch_norm=True",
    "--config.num_train_steps=20",
    "--config.eval_every_steps=10",
    "--config.checkpoint_every_steps=10",
    "--config.log_every_steps=10",
  ]
  refused = tmp_path / "refused"
  proc = script(*flags, "--workdir", str(refused), "--splits", "0-1")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
    "error: --splits: split 1 of dataset fae/clap: this dataset has folders 0-2 (one split of its own, as CLAP2016 "
    "and CACD2000): only split 0"
  ]
  assert not (refused / "split0").exists() and not (refused / "split1").exists()  # nothing trained

  commands = script(*flags, "--workdir", "gs://bucket/clap_cv", "--print_commands")  # the default: split 0 only
  assert commands.returncode == 0, commands.stderr[-2000:]
  assert [line.split()[-1] for line in commands.stdout.splitlines()] == ["--config.data.split=0"]

  workdir = tmp_path / "cv"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
    [sys.executable, "scripts/crossval.py", *flags, "--workdir", str(workdir)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((workdir / crossval.RESULT_FILE).read_text())
  assert result["splits"] == result["finished"] == ["0"] and result["missing"] == {}
  assert sorted(p.name for p in workdir.iterdir() if p.is_dir()) == ["split0"]
  assert json.loads((workdir / "split0" / "config.json").read_text())["data"]["split"] == "0"
  final = json.loads((workdir / "split0" / train.FINAL_METRICS).read_text())
  assert result["per_split"]["0"]["test_mae"] == final["test_mae"] and np.isfinite(final["test_mae"])
  assert result["database"] == "clap"
  [row] = [line for line in proc.stdout.splitlines() if line.startswith("clap ")]
  assert row.split()[-1] == "1/1"


def test_named_splits_need_a_database_with_benchmark_folders_and_a_prepared_one(tiny_config, tmp_path):
  with pytest.raises(crossval.errors.UserError) as e:  # the demo has train/validation/test, no folders
    crossval.run(tiny_config, tmp_path / "demo_cv", ["0"])
  assert str(e.value) == (
    "--splits: split 0 of dataset demo/tiny: it has no benchmark folders, and crossval trains the benchmark's "
    "splits of a database prepared with prepare_data.py fae"
  )
  assert not (tmp_path / "demo_cv").exists()
  tiny_config.data.update(name="fae", builder_config="notprepared", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(crossval.errors.MissingInput) as missing:
    crossval.default_splits(tiny_config)
  assert str(missing.value) == (
    f"dataset 'fae' is not prepared in {tmp_path / 'tfds'}/agejax_fae/notprepared/1.0.0; run: python "
    f"scripts/prepare_data.py fae --database FILE.json --images DIR --name notprepared --data_dir {tmp_path / 'tfds'}"
  )
