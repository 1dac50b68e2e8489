"""The benchmark's results table over crossval workdirs: python scripts/table.py DIR [DIR ...] [--metrics ...].

Reads each DIR/crossval.json (scripts/crossval.py; a path or a gs:// URL) and prints one row per
database with `mean(std)` over its finished splits per metric (a DIR of one run without it: its test
part and each of its config.evals, e.g. `configs/fae_benchmark.py:pretrain`'s other databases, a row
each), as the unified benchmark's lib/evaluation.py writes its table: `age[mae]` and `age[cs5]` of the
posterior median's integer age.
"""

from absl import app, flags

from agejax import cli, errors, storage
from agejax.training import crossval, train

_METRICS = flags.DEFINE_list(
  "metrics",
  list(crossval.BENCHMARK_METRICS),
  f"final_metrics.json test scores to show, one column each: {', '.join(k for k, _, _ in crossval.COLUMNS)}.",
)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("name one or more crossval workdirs: python scripts/table.py DIR [DIR ...]")
  known = [k for k, _, _ in crossval.COLUMNS]
  if unknown := [m for m in _METRICS.value if m not in known]:
    raise errors.UserError(f"--metrics: {unknown[0]!r} is not one of {', '.join(known)}")
  results: dict[str, dict] = {}
  for workdir in argv[1:]:
    if (
      not (storage.path(workdir) / crossval.RESULT_FILE).exists()
      and (storage.path(workdir) / train.FINAL_METRICS).exists()
    ):  # one run: its test part and its cross-dataset evaluations
      results.update(crossval.cross_dataset_results(workdir))
      continue
    result = crossval.read_result(workdir)
    label = crossval.table_label(result, workdir)
    results[label if label not in results else str(workdir)] = result  # two runs of one database: by path
  print(crossval.benchmark_table(results, _METRICS.value))


if __name__ == "__main__":
  cli.run(main)
