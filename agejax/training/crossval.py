"""Cross-validation over the benchmark's splits: one ordinary workdir per split, test scores aggregated.

`run` trains (or resumes) WORKDIR/split<K> for each split K with `config.data.split = K`, one after the
other, each an ordinary workdir that scripts/train.py resumes; `aggregate` reads the test scores every
finished run wrote to its final_metrics.json and writes WORKDIR/crossval.json: mean ± std over the
splits and each split's numbers. The std is NumPy's default, the population std over the splits
(ddof=0), as the unified benchmark's own table computes it (Paplham & Franc, CVPR 2024;
github.com/paplhjak/Facial-Age-Estimation-Benchmark lib/evaluation.py, ErrorSummary: `np.std(err)`);
crossval.json holds the sample std (ddof=1) beside it.

Which splits: by default the ones the config's database can form (`default_splits`: 0-4 over folders
0-9, 0 over CLAP2016's and CACD2000's folders 0-2); splits named by the user are checked against the
database before any training (`check_splits`). `benchmark_table` prints several databases' results as
the benchmark's own table does: one row per database, `mean(std)` per metric.
"""

import shlex
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from agejax import errors, storage
from agejax.data import splits as benchmark_splits
from agejax.training import checkpointing, train, workdir_lock

SPLIT_KEY = "data.split"  # the config key that picks the benchmark's split K
RESULT_FILE = "crossval.json"
STD_DDOF = 0  # the benchmark's: np.std over the splits (population std)
# (final_metrics.json key, column title, decimals) of the table: the benchmark's own MAE and CS@5 (the
# posterior median's integer age) first, then the expectation's MAE and the rest.
COLUMNS = (
  ("test_bench_mae", "benchmark MAE", 2),
  ("test_bench_cs5", "benchmark CS@5", 3),
  ("test_mae", "MAE", 2),
  ("test_cs5", "CS@5", 3),
  ("test_mae_minors", "minors' MAE", 2),
  ("test_coverage90", "90% calibration coverage", 3),
  ("test_coverage80_shown", "80% interval holds", 3),
  ("test_epsilon_error", "epsilon-error", 3),
)
TRAIN_SCRIPT = "python scripts/train.py"
# The benchmark's column titles (lib/evaluation.py: the head's tag, 'age', and its metric in brackets).
BENCHMARK_TITLES = {"test_bench_mae": "age[mae]", "test_bench_cs5": "age[cs5]"}
BENCHMARK_METRICS = ("test_bench_mae", "test_bench_cs5")


def parse_splits(text: str) -> list[str]:
  """'0-4' -> ['0', ..., '4']; '0,2,3' and '1' as written; fails in one line naming the flag."""
  splits: list[str] = []
  for part in str(text).split(","):
    first, dash, last = part.strip().partition("-")
    if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
      raise errors.UserError(f"--splits={text!r}: use split numbers and ranges, e.g. 0-4 or 0,2,3")
    splits += [str(k) for k in range(int(first), int(last if dash else first) + 1)]
  if len(set(splits)) != len(splits):
    raise errors.UserError(f"--splits={text!r} names a split twice")
  return splits


def _database(config) -> str:
  """The config's dataset as messages name it: 'fae/agedb', 'demo/tiny', 'utkface'."""
  return "/".join(p for p in (config.data.name, config.data.builder_config) if p)


def database_folders(config) -> list[int]:
  """The benchmark folders of the config's prepared dataset ([] for none); one line when it is not prepared."""
  from agejax import settings
  from agejax.data import pipeline

  return pipeline.dataset_folders(pipeline.prepared_builder(settings.Settings.from_config(config).data))


def _no_folders(config, splits: Sequence[str] = ()) -> errors.UserError:
  asked = f"--splits: split {splits[0]} of " if splits else ""
  return errors.UserError(
    f"{asked}dataset {_database(config)}: it has no benchmark folders, and crossval trains the benchmark's "
    f"splits of a database prepared with prepare_data.py fae"
  )


def _unformable(split: str, folders: Sequence[int]) -> str | None:
  """Why a dataset with `folders` cannot form benchmark split `split` (splits.resolve's reason), or None."""
  try:
    benchmark_splits.resolve(split, folders)
  except errors.UserError as e:
    return str(e).split(": ", 1)[-1]  # without resolve's config.data.split='K' prefix: the caller names the split
  return None


def default_splits(config) -> list[str]:
  """The benchmark splits the config's database can form: 0-4 over folders 0-9, 0 over folders 0-2 (CLAP2016)."""
  folders = database_folders(config)
  if not folders:
    raise _no_folders(config)
  formable = benchmark_splits.formable(folders)
  if not formable:
    raise errors.UserError(f"dataset {_database(config)} forms no benchmark split: {_unformable('0', folders)}")
  return [str(k) for k in formable]


def check_splits(config, splits: Sequence[str]) -> None:
  """Raises one line naming the first split the config's database cannot form, its name and its folders."""
  folders = database_folders(config)
  if not folders:
    raise _no_folders(config, splits)
  for split in splits:
    if why := _unformable(split, folders):
      raise errors.UserError(f"--splits: split {split} of dataset {_database(config)}: {why}")


def split_workdir(workdir: storage.Location, split: str) -> str:
  """WORKDIR/split<K>, written as the user wrote WORKDIR (a path or a gs:// URL)."""
  return f"{str(workdir).rstrip('/')}/split{split}"


def split_config(config, split: str, key: str = SPLIT_KEY):
  """A copy of `config` with `key` (default data.split) set to the split, as the key's type reads it."""
  config = config.copy_and_resolve_references()
  *path, name = key.split(".")
  node = config
  try:
    for part in path:
      node = node[part]
    current = node[name]
  except (KeyError, AttributeError):
    raise errors.UserError(f"the config has no key {key!r}: it cannot pick split {split}") from None
  node[name] = type(current)(split) if isinstance(current, int) and not isinstance(current, bool) else split
  return config


def run(
  config: ml_collections.ConfigDict, workdir: storage.Location, splits: Sequence[str], *, key: str = SPLIT_KEY
) -> dict[str, Any] | None:
  """Trains or resumes WORKDIR/split<K> for each split in turn, then aggregates (see `aggregate`).

  A split whose workdir another run holds (its lock) is skipped with one line, so crossval.py on several
  machines shares the splits out; a finished split returns its final metrics without training. With the
  split key data.split, every split is checked against the database first (`check_splits`).

  Args:
    config: the training config; `key` is set to each split.
    workdir: the cross-validation folder (a path or a gs:// URL).
    splits: the split names, e.g. ['0', ..., '4'].
    key: the config key that picks a split.

  Returns:
    The aggregate (also WORKDIR/crossval.json), or None when a SIGTERM stopped a split's run.
  """
  if key == SPLIT_KEY:  # before any training: not split 0's hours, then split 1 refused
    check_splits(config, splits)
  for split in splits:
    directory = split_workdir(workdir, split)
    print(f"split {split}: {directory}")
    try:
      final = train.train_and_evaluate(split_config(config, split, key), directory)
    except workdir_lock.WorkdirBusy as e:
      print(f"split {split}: skipped, another run holds it: {e}")
      continue
    if final is None:
      print(f"stopped by SIGTERM during split {split}; rerun the same command to resume")
      return None
  return aggregate(workdir, splits, write=jax.process_index() == 0)


def _summary(values: list[float]) -> dict[str, Any]:
  array = np.asarray(values, np.float64)
  return {
    "mean": float(np.mean(array)),
    "std": float(np.std(array, ddof=STD_DDOF)),
    "std_ddof1": float(np.std(array, ddof=1)) if len(array) > 1 else None,
    "n": len(array),
  }


def aggregate(workdir: storage.Location, splits: Sequence[str], *, write: bool = True) -> dict[str, Any]:
  """Reads each split's final_metrics.json; writes WORKDIR/crossval.json over the finished ones and returns it.

  A split without final_metrics.json (or without test scores) is missing: named in the result's
  `missing` with the reason, left out of the means.
  """
  per_split: dict[str, dict[str, Any]] = {}
  missing: dict[str, str] = {}
  for split in splits:
    directory = split_workdir(workdir, split)
    path = storage.path(directory) / train.FINAL_METRICS
    if not path.exists():
      missing[split] = f"no {train.FINAL_METRICS} in {directory}"
      continue
    final = storage.read_json_object(path)
    if final.get("test_mae") is None:
      missing[split] = f"{path} has no test scores (its dataset has no test split, or the run predates them)"
      continue
    keys = ("step", "best_step", "eval_mae", "eval_bench_mae", "temperature", *(k for k, _, _ in COLUMNS))
    per_split[split] = {"workdir": directory, **{k: final.get(k) for k in keys}}
  if not per_split:
    raise errors.MissingInput(
      f"none of splits {', '.join(splits)} has finished in {workdir} ({'; '.join(missing.values())}); train them "
      f"with scripts/crossval.py, or the commands of --print_commands"
    )
  summary = {}
  for key, _, _ in COLUMNS:
    values = [s[key] for s in per_split.values() if s.get(key) is not None]
    summary[key] = _summary(values) if values else None
  result = {
    "workdir": str(workdir),
    "database": _trained_database(per_split),
    "splits": list(splits),
    "finished": list(per_split),
    "missing": missing,
    "std_ddof": STD_DDOF,
    "std": "population std over the finished splits (ddof=0), as the benchmark's own table; std_ddof1: sample std",
    "summary": summary,
    "per_split": per_split,
  }
  if write:  # one process of a multi-process run
    storage.write_json(storage.path(workdir) / RESULT_FILE, result)
  return result


def _trained_database(per_split: dict[str, dict[str, Any]]) -> str | None:
  """The dataset the first finished split trained on (its config.json), as benchmark_table's row name."""
  for scores in per_split.values():
    path = storage.path(scores["workdir"]) / checkpointing.CONFIG_FILE
    if not path.exists():
      continue
    data = storage.read_json_object(path).get("data") or {}
    name, builder_config = data.get("name"), data.get("builder_config")
    if name == "fae" and builder_config:  # the user's name of the database, e.g. "agedb"
      return str(builder_config)
    return "/".join(str(p) for p in (name, builder_config) if p) or None
  return None


def missing_line(result: dict[str, Any]) -> str | None:
  """One line naming the splits left out, or None."""
  missing = result["missing"]
  if not missing:
    return None
  return f"missing {len(missing)} of {len(result['splits'])} splits: " + "; ".join(
    f"split {k} ({why})" for k, why in missing.items()
  )


def format_table(result: dict[str, Any]) -> str:
  """The aggregate as the benchmark reports it: test MAE mean ± std over the splits, then each split."""
  n = len(result["finished"])
  cell = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
  spread = lambda s, d: "-" if s is None else f"{s['mean']:.{d}f} ± {s['std']:.{d}f}"  # noqa: E731
  widths = [max(18, len(title) + 2) for _, title, _ in COLUMNS]  # a long title keeps a space before it
  header = f"{'':<12}" + "".join(f"{title:>{w}}" for (_, title, _), w in zip(COLUMNS, widths))
  mean_row = f"{'mean ± std':<12}" + "".join(
    f"{spread(result['summary'].get(k), d):>{w}}" for (k, _, d), w in zip(COLUMNS, widths)
  )
  rows = [
    f"{f'split {split}':<12}" + "".join(f"{cell(scores.get(k), d):>{w}}" for (k, _, d), w in zip(COLUMNS, widths))
    for split, scores in result["per_split"].items()
  ]
  lines = [
    f"test split of {n} of {len(result['splits'])} splits, best checkpoint of each (90% coverage: calibrated); "
    f"std: population std over the {n} splits (ddof={STD_DDOF}), as the benchmark reports",
    header,
    mean_row,
    *rows,
  ]
  missing = missing_line(result)
  return "\n".join(lines + ([missing] if missing else []))


def config_arguments(argv: Sequence[str]) -> tuple[str, list[str]]:
  """(the --config file argument, the --config.KEY=VALUE overrides) of a command line, as written."""
  config, overrides = "", []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, eq, value = arg.partition("=")
    takes_next = not eq and i + 1 < len(args)
    if name in ("--config", "-config"):
      config = value if eq else (args[i + 1] if takes_next else "")
      i += 1 if eq else 2
      continue
    if name.startswith(("--config.", "--noconfig.", "-config.")):
      if eq or name.startswith("--noconfig.") or not takes_next or args[i + 1].startswith("-"):
        overrides.append(arg)
        i += 1
      else:
        overrides.append(f"{name}={args[i + 1]}")
        i += 2
      continue
    i += 1
  return config, overrides


def train_commands(
  config: str, workdir: storage.Location, splits: Sequence[str], overrides: Sequence[str], key: str = SPLIT_KEY
) -> list[str]:
  """One scripts/train.py command per split (for one machine each): the same config, overrides and split key."""
  own = (f"--config.{key}=", f"--config.{key} ")
  kept = [o for o in overrides if not o.startswith(own)]  # the split key is each command's own
  return [
    " ".join(
      [
        TRAIN_SCRIPT,
        "--config",
        shlex.quote(config),
        "--workdir",
        shlex.quote(split_workdir(workdir, split)),
        *map(shlex.quote, kept),
        shlex.quote(f"--config.{key}={split}"),
      ]
    )
    for split in splits
  ]


def read_result(workdir: storage.Location) -> dict[str, Any]:
  """WORKDIR/crossval.json; one line when it is missing or is not an aggregate."""
  path = storage.path(workdir) / RESULT_FILE
  if not path.exists():
    raise errors.MissingInput(
      f"{str(workdir).rstrip('/')}/{RESULT_FILE} does not exist: aggregate its splits first with "
      f"scripts/crossval.py --config ... --workdir {workdir} --aggregate_only"
    )
  result = storage.read_json_object(path)
  if not isinstance(result.get("per_split"), dict) or not isinstance(result.get("finished"), list):
    raise errors.UserError(f"{path}: not a crossval.json (no 'per_split' and 'finished')")
  return result


def cross_dataset_results(workdir: storage.Location) -> dict[str, dict[str, Any]]:
  """A finished run's own test part and its config.evals (e.g. `:pretrain`'s every folder of other databases) as rows.

  Shaped as crossval results of one split each, for `benchmark_table`: the benchmark's cross-dataset
  layout (facebase/benchmarks/IMDB-CLEAN-EM-CNN.yaml: trained on one database, tested on the others).
  """
  path = storage.path(workdir) / train.FINAL_METRICS
  if not path.exists():
    raise errors.MissingInput(
      f"{str(workdir).rstrip('/')} has neither {RESULT_FILE} nor {train.FINAL_METRICS}: train or aggregate it first"
    )
  final = storage.read_json_object(path)
  one = lambda scores: {"finished": ["0"], "splits": ["0"], "per_split": {"0": scores}}  # noqa: E731
  rows = {}
  if final.get("test_mae") is not None:
    rows[f"{storage.path(workdir).name} (test)"] = one(final)
  for name, scores in (final.get("evals") or {}).items():
    rows[name] = one({f"test_{k}": v for k, v in scores.items()})
  return rows


def table_label(result: dict[str, Any], workdir: storage.Location) -> str:
  """A crossval result's row name: the database it trained on, else its workdir's name."""
  return result.get("database") or storage.path(workdir).name


def benchmark_table(results: dict[str, dict[str, Any]], metrics: Sequence[str] = BENCHMARK_METRICS) -> str:
  """Several crossval results as the benchmark's table: a row per database, `mean(std)` over its splits per metric.

  As lib/evaluation.py's ErrorSummary writes each cell, f"{np.mean(err):.2f}({np.std(err):.2f})" (ddof 0,
  CS@5 a fraction), over the finished splits that have the metric; "-" where none has it. The last
  column counts the finished splits of the splits asked for.
  """
  titles = [BENCHMARK_TITLES.get(m, m) for m in metrics]
  rows = []
  for label, result in results.items():
    cells = []
    for metric in metrics:
      values = [result["per_split"][s].get(metric) for s in result["finished"]]
      err = np.asarray([v for v in values if v is not None], np.float64)
      cells.append(f"{np.mean(err):.2f}({np.std(err):.2f})" if err.size else "-")
    cells.append(f"{len(result['finished'])}/{len(result.get('splits') or result['finished'])}")
    rows.append((label, cells))
  width = max([len(label) for label, _ in rows] + [0])
  widths = [max([len(t)] + [len(cells[i]) for _, cells in rows]) for i, t in enumerate([*titles, "splits"])]
  line = lambda name, cells: "  ".join([f"{name:<{width}}", *(f"{c:>{w}}" for c, w in zip(cells, widths))])  # noqa: E731
  return "\n".join(
    [
      "benchmark table (lib/evaluation.py): test part, mean(std) over each database's finished splits, std ddof=0",
      line("", [*titles, "splits"]),
      *(line(label, cells) for label, cells in rows),
    ]
  )
