"""Cross-validation over the benchmark's splits: python scripts/crossval.py --config FILE --workdir DIR [--splits 0-4].

Trains (or resumes) DIR/split<K> with --config.data.split=K for each split, one after the other, then
writes DIR/crossval.json and prints test MAE mean ± std over the splits, and each split's numbers, then
the benchmark's own table (scripts/table.py). The splits default to those the config's database forms
(0-4 over folders 0-9, 0 over CLAP2016's and CACD2000's 0-2); named splits are checked against it before
any training.
--print_commands prints one scripts/train.py command per split (one machine each) and exits;
--aggregate_only aggregates the splits that have finished and names the missing ones.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from agejax import cli
from agejax.training import crossval

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config(arg)).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Cross-validation folder: one workdir per split, DIR/split<K>.")
_SPLITS = flags.DEFINE_string(
  "splits",
  "",
  "Splits: a range and/or a list, e.g. 0-4 or 0,2; default: every split the config's database forms (0-4 over "
  "folders 0-9, 0 over folders 0-2).",
)
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one scripts/train.py command per split and exit.")
_AGGREGATE = flags.DEFINE_bool("aggregate_only", False, "Train nothing: aggregate the splits that have finished.")
_CLUSTER = cli.ClusterFlags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Named splits are parsed before anything is read; the default needs the prepared database's folders.
  splits = crossval.parse_splits(_SPLITS.value) if _SPLITS.value else crossval.default_splits(_CONFIG.value)
  if _PRINT.value:
    config, overrides = crossval.config_arguments(sys.argv[1:])
    print("\n".join(crossval.train_commands(config, _WORKDIR.value, splits, overrides)))
    return
  if _AGGREGATE.value:
    result = crossval.aggregate(_WORKDIR.value, splits)
  else:
    _CLUSTER.initialize()
    result = crossval.run(_CONFIG.value, _WORKDIR.value, splits)
    if result is None:
      return  # stopped by SIGTERM: the split's run saved a checkpoint and said how to resume
  print(crossval.format_table(result))
  print()
  print(crossval.benchmark_table({crossval.table_label(result, _WORKDIR.value): result}))
  print(f"wrote {_WORKDIR.value.rstrip('/')}/{crossval.RESULT_FILE}")


if __name__ == "__main__":
  cli.run(main)
