"""Cross-validation over the benchmark's splits: one ordinary workdir per split, test scores aggregated.

`run` trains (or resumes) WORKDIR/split<K> for each split K with `config.data.split = K`, one after the
other, each an ordinary workdir that scripts/train.py resumes; `aggregate` reads the test scores every
finished run wrote to its final_metrics.json and writes WORKDIR/crossval.json: mean ± std over the
splits and each split's numbers. The std is NumPy's default, the population std over the splits
(ddof=0), as the unified benchmark's own table computes it (Paplham & Franc, CVPR 2024;
github.com/paplhjak/Facial-Age-Estimation-Benchmark lib/evaluation.py, ErrorSummary: `np.std(err)`);
crossval.json holds the sample std (ddof=1) beside it.
"""

import shlex
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from agejax import errors, storage
from agejax.training import train, workdir_lock

SPLIT_KEY = "data.split"  # the config key that picks the benchmark's split K
DEFAULT_SPLITS = "0-4"  # the benchmark's five train/validation/test splits
RESULT_FILE = "crossval.json"
STD_DDOF = 0  # the benchmark's: np.std over the splits (population std)
# (final_metrics.json key, column title, decimals) of the table, MAE first.
COLUMNS = (
  ("test_mae", "MAE", 2),
  ("test_cs5", "CS@5", 3),
  ("test_mae_minors", "minors' MAE", 2),
  ("test_coverage90", "90% calibration coverage", 3),
  ("test_coverage80_shown", "80% interval holds", 3),
  ("test_epsilon_error", "epsilon-error", 3),
)
TRAIN_SCRIPT = "python scripts/train.py"


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


def run(config, workdir: storage.Location, splits: Sequence[str], *, key: str = SPLIT_KEY) -> dict[str, Any] | None:
  """Trains or resumes WORKDIR/split<K> for each split in turn, then aggregates (see `aggregate`).

  A split whose workdir another run holds (its lock) is skipped with one line, so crossval.py on several
  machines shares the splits out; a finished split returns its final metrics without training.

  Args:
    config: the training config; `key` is set to each split.
    workdir: the cross-validation folder (a path or a gs:// URL).
    splits: the split names, e.g. ['0', ..., '4'].
    key: the config key that picks a split.

  Returns:
    The aggregate (also WORKDIR/crossval.json), or None when a SIGTERM stopped a split's run.
  """
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
    keys = ("step", "best_step", "eval_mae", "temperature", *(k for k, _, _ in COLUMNS))
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
  header = f"{'':<12}" + "".join(f"{title:>18}" for _, title, _ in COLUMNS)
  mean_row = f"{'mean ± std':<12}" + "".join(f"{spread(result['summary'][k], d):>18}" for k, _, d in COLUMNS)
  rows = [
    f"{f'split {split}':<12}" + "".join(f"{cell(scores[k], d):>18}" for k, _, d in COLUMNS)
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
