"""Mutation testing across agejax: a sampled session over every package, or every mutant of named modules.

  python scripts/mutation.py sample [--per_package 10] [--seed 0] [--out mutation/sample-seed0.jsonl]
  python scripts/mutation.py run agejax/training/optim.py [MODULE ...] [--per_module N] [--out mutation/run.jsonl]
  python scripts/mutation.py rerun SESSION.jsonl     # survivors (and unverified kills) again, with today's tests
  python scripts/mutation.py report SESSION.jsonl    # per-package kill rates and the survivors

cosmic-ray (`pip install -e .[mutation]`) finds the mutants and applies each one; this script picks
them (a seeded sample per package, or all of the named modules), runs each against only the tests
that cover its module (`MODULE_TESTS`, cheapest first, `-x`: a mutant dies at its first failing
test), two at a time in private copies of the working tree, and writes one JSON line per mutant, so
an interrupted session resumes where it stopped. A kill counts only if the test that failed passes
on the unmutated code (each distinct one is run once so); a test run past --timeout counts as
killed. Mutants argued equivalent are listed in tests/mutation-equivalent.toml,
each with its one-line argument; `report` leaves them out of the kill rate and names any
survivor that is neither killed nor argued.
"""

import argparse
import ast
import collections
import concurrent.futures
import fnmatch
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "tests" / "mutation-equivalent.toml"
PACKAGES = ("agejax", "benchmarks", "convert", "data", "evaluation", "inference", "models", "serving", "training")

# Each module's tests, cheapest first. The first pattern that matches a module wins; every module
# of agejax must match one (tests/test_mutation.py checks it, and that every file named exists).
MODULE_TESTS: dict[str, tuple[str, ...]] = {
  "agejax/__init__.py": ("tests/test_layout.py",),
  "agejax/errors.py": ("tests/test_train.py",),
  "agejax/labels.py": ("tests/test_labels.py", "tests/test_losses.py", "tests/test_edges.py"),
  "agejax/metrics.py": ("tests/test_metrics.py", "tests/test_edges.py", "tests/test_steps.py"),
  "agejax/parallel.py": ("tests/data/test_sharding.py", "tests/test_steps.py", "tests/test_scale.py"),
  "agejax/storage.py": ("tests/test_pin_operations.py", "tests/test_workdir_lock.py", "tests/test_train.py"),
  "agejax/settings.py": (
    "tests/test_labels.py",
    "tests/test_augment.py",
    "tests/test_losses.py",
    "tests/test_splits.py",
    "tests/test_train.py",
  ),
  "agejax/cli.py": ("tests/test_newcomer.py", "tests/test_train.py"),
  "agejax/benchmarks/statistics.py": ("tests/test_edges.py", "tests/test_benchmark.py"),
  "agejax/benchmarks/serving.py": ("tests/test_pin_operations.py", "tests/test_hostile.py", "tests/test_benchmark.py"),
  "agejax/benchmarks/*.py": ("tests/test_benchmark.py", "tests/test_steps.py"),
  "agejax/convert/*.py": ("tests/test_convert.py", "tests/test_vggface.py", "tests/test_resnet.py"),
  "agejax/data/array_cache.py": ("tests/data/test_pipeline.py", "tests/data/test_sharding.py"),
  "agejax/data/builders.py": (
    "tests/data/test_demo_faces.py",
    "tests/data/test_csv_faces.py",
    "tests/data/test_utkface.py",
  ),
  "agejax/data/csv_faces.py": ("tests/data/test_csv_faces.py",),
  "agejax/data/datasets.py": (
    "tests/data/test_pipeline.py",
    "tests/data/test_csv_faces.py",
    "tests/data/test_utkface.py",
  ),
  "agejax/data/demo_faces.py": ("tests/data/test_demo_faces.py", "tests/data/test_pipeline.py"),
  "agejax/data/faces.py": ("tests/data/test_utkface.py", "tests/test_framing.py", "tests/test_hostile.py"),
  "agejax/data/fae.py": ("tests/test_fae.py", "tests/test_beam_prepare.py"),
  "agejax/data/fae_beam.py": ("tests/test_beam_prepare.py",),
  "agejax/data/grouping.py": ("tests/data/test_pipeline.py", "tests/test_streaming.py"),
  "agejax/data/framing.py": ("tests/test_framing.py", "tests/test_pin_evaluation.py"),
  "agejax/data/pipeline.py": ("tests/data/test_pipeline.py", "tests/data/test_sharding.py", "tests/test_splits.py"),
  "agejax/data/streaming.py": ("tests/test_streaming.py", "tests/test_benchmark_input.py"),
  "agejax/data/sources.py": ("tests/data/test_sources.py",),
  "agejax/data/splits.py": ("tests/test_splits.py", "tests/test_fae.py"),
  "agejax/data/utkface.py": ("tests/data/test_utkface.py", "tests/data/test_train_real.py"),
  "agejax/data/__init__.py": ("tests/data/test_pipeline.py",),
  "agejax/evaluation/calibration.py": ("tests/test_calibration.py", "tests/test_edges.py"),
  "agejax/evaluation/groups.py": ("tests/test_groups.py", "tests/test_edges.py"),
  "agejax/evaluation/*.py": ("tests/test_pin_evaluation.py", "tests/test_pin_survivors.py", "tests/test_evaluate.py"),
  "agejax/inference/evaluate.py": ("tests/test_pin_evaluation.py", "tests/test_evaluate.py", "tests/test_crossval.py"),
  "agejax/inference/export/*.py": ("tests/test_pin_operations.py", "tests/test_export.py", "tests/test_onnx.py"),
  "agejax/inference/figures.py": ("tests/test_predict.py", "tests/test_newcomer.py"),
  "agejax/inference/photos.py": ("tests/test_framing.py", "tests/test_predict.py", "tests/test_hostile.py"),
  "agejax/inference/*.py": ("tests/test_predict.py", "tests/test_evaluate.py", "tests/test_legacy_workdir.py"),
  "agejax/models/resnet.py": ("tests/test_resnet.py",),
  "agejax/models/*.py": (
    "tests/test_models.py",
    "tests/test_convert.py",
    "tests/test_plugins.py",
    "tests/test_vggface.py",
  ),
  "agejax/serving/batcher.py": ("tests/test_serve.py",),
  "agejax/serving/*.py": ("tests/test_pin_operations.py", "tests/test_hostile.py", "tests/test_serve.py"),
  "agejax/training/augment.py": ("tests/test_augment.py", "tests/test_pin_training.py"),
  "agejax/training/checkpointing.py": (
    "tests/test_pin_checkpoints.py",
    "tests/test_train.py",
    "tests/test_newcomer.py",
  ),
  "agejax/training/configuration.py": ("tests/test_plugins.py", "tests/test_splits.py", "tests/test_train.py"),
  "agejax/training/crossval.py": ("tests/test_pin_evaluation.py", "tests/test_crossval.py"),
  "agejax/training/learner.py": (
    "tests/test_losses.py",
    "tests/test_pin_training.py",
    "tests/test_pin_survivors.py",
    "tests/test_steps.py",
  ),
  "agejax/training/losses.py": ("tests/test_losses.py", "tests/test_edges.py", "tests/test_pin_training.py"),
  "agejax/training/optim.py": ("tests/test_pin_training.py", "tests/test_edges.py", "tests/test_finetune.py"),
  "agejax/training/preemption.py": ("tests/test_resilience.py",),
  "agejax/training/profiling.py": ("tests/test_train.py",),
  "agejax/training/workdir_lock.py": ("tests/test_pin_operations.py", "tests/test_workdir_lock.py"),
  "agejax/training/*.py": ("tests/test_pin_checkpoints.py", "tests/test_train.py", "tests/test_init_from.py"),
}

# Bit and shift operators: on the floats, arrays and booleans of this package a replacement of or by
# one only raises a TypeError or names the same boolean operation. Mutants inside type annotations
# are left out too (`float | None` and the like are evaluated at import or not at all).
EXCLUDED_OPERATORS = re.compile(
  r"core/ReplaceBinaryOperator_(\w+_(BitOr|BitAnd|BitXor|LShift|RShift)|(BitOr|BitAnd|BitXor|LShift|RShift)_\w+)$"
)


def package_of(module: str) -> str:
  """The package a module belongs to: agejax/<package>/... or 'agejax' for the top-level leaves."""
  parts = Path(module).parts
  return parts[1] if len(parts) > 2 else "agejax"


def tests_for(module: str) -> tuple[str, ...]:
  """The test files that cover a module, cheapest first."""
  for pattern, tests in MODULE_TESTS.items():
    if fnmatch.fnmatch(module, pattern):
      return tests
  raise KeyError(f"no tests mapped for {module}: add it to MODULE_TESTS in scripts/mutation.py")


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """(start, end) positions of every type annotation in a module's source."""
  nodes = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
      nodes.append(node.annotation)
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
      nodes.append(node.returns)
  return [((n.lineno, n.col_offset), (n.end_lineno or n.lineno, n.end_col_offset or 0)) for n in nodes]


def enumerate_mutants(modules: list[str]) -> list[dict]:
  """Every mutant cosmic-ray makes of the modules, less the excluded operators and annotations."""
  from cosmic_ray.commands.init import _all_work_items  # cosmic-ray==8.7.0 (pinned): its own enumeration

  mutants = []
  for module in modules:
    spans = annotation_spans((ROOT / module).read_text())
    for item in _all_work_items([ROOT / module], {}):
      mutation = item.mutations[0]
      if EXCLUDED_OPERATORS.match(mutation.operator_name):
        continue
      start = tuple(mutation.start_pos)
      if any(a <= start < b for a, b in spans):
        continue
      mutants.append(
        {
          "key": f"{module}:{mutation.operator_name}:{mutation.occurrence}",
          "module": module,
          "package": package_of(module),
          "operator": mutation.operator_name,
          "occurrence": mutation.occurrence,
          "line": start[0],
        }
      )
  return mutants


def all_modules(packages: tuple[str, ...] = PACKAGES) -> list[str]:
  """Every agejax module of the given packages, as paths relative to the repository."""
  modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "agejax").rglob("*.py"))
  return [m for m in modules if package_of(m) in packages]


def sample(mutants: list[dict], per_package: int, seed: int) -> list[dict]:
  """A seeded sample of `per_package` mutants from each package (all of a smaller package's)."""
  by_package: dict[str, list[dict]] = collections.defaultdict(list)
  for mutant in sorted(mutants, key=lambda m: m["key"]):
    by_package[mutant["package"]].append(mutant)
  # Each package its own seeded order, of which the sample is a prefix: a larger sample of the same
  # seed extends a smaller one.
  drawn = [
    random.Random(f"{seed}:{p}").sample(group, len(group))[:per_package] for p, group in sorted(by_package.items())
  ]
  # Interleaved by package, so that a session stopped early has sampled every package alike.
  return [m for row in itertools.zip_longest(*drawn) for m in row if m is not None]


class Worker:
  """A private copy of the working tree in which one mutant at a time is applied and tested."""

  def __init__(self, index: int, base: Path, source: Path = ROOT):
    self.dir = base / f"w{index}"
    self.tmp = base / f"w{index}-pytest"
    if self.dir.exists():
      shutil.rmtree(self.dir)
    files = subprocess.run(
      ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=source, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
      source_file = source / os.fsdecode(name)
      if source_file.is_file():
        (self.dir / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_file, self.dir / os.fsdecode(name))

  def tests_for(self, module: str) -> tuple[str, ...]:
    """The module's test files that this copy has (a tree from before a test file was written lacks it)."""
    return tuple(t for t in tests_for(module) if (self.dir / t).is_file())

  def test(self, tests: tuple[str, ...], timeout: float, cache: Path | None) -> dict:
    """Runs the tests (stopping at the first failure); returns rc, seconds and the first failure."""
    env = dict(os.environ, PYTHONPATH=str(self.dir), PYTHONDONTWRITEBYTECODE="1", JAX_PLATFORMS="cpu")
    env.update(TF_CPP_MIN_LOG_LEVEL="2")
    if cache is not None:  # else each run compiles into its own basetemp, as a plain pytest run does
      env["AGEJAX_TEST_COMPILATION_CACHE"] = str(cache)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={self.tmp}"]
    start = time.monotonic()
    process = subprocess.Popen(
      [*command, *tests],
      cwd=self.dir,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    try:
      output, _ = process.communicate(timeout=timeout)
      rc = process.returncode
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      output, _ = process.communicate()
      rc = None
    # "FAILED tests/x.py::test[id with spaces] - message": the node id runs to " - " or the line's end.
    failed = re.findall(rb"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.M)
    why = re.findall(rb"^E +(.+)$", output, re.M)  # pytest's lines for the failure: the assertion and its values
    return {
      "rc": rc,
      "seconds": round(time.monotonic() - start, 1),
      "failed": failed[0].decode() if failed else None,
      "why": b" | ".join(why[:4]).decode(errors="replace")[:600] or None,
      "tail": output[-600:].decode(errors="replace") if rc not in (0, 1) else None,
    }

  @staticmethod
  def find(path: Path, operator, diff: list[str], occurrence: int) -> int | None:
    """The occurrence of `operator` in the module at `path` that makes `diff` (its recorded one first), or None."""
    from cosmic_ray.mutating import use_mutation

    tried = itertools.chain([occurrence], (i for i in itertools.count() if i != occurrence))
    for i in tried:
      with use_mutation(path, operator, i) as (original, mutated):
        if mutated is None:
          if i != occurrence:
            return None  # past the last occurrence
          continue
        if _code(_changed(original, mutated)[:3]) == _code(diff):
          return i
    return None

  def mutate_and_test(self, mutant: dict, timeout: float, cache: Path | None) -> dict:
    """Applies the mutant in this copy, runs its module's tests, restores the module; returns the result."""
    import cosmic_ray.plugins
    from cosmic_ray.mutating import use_mutation

    path = self.dir / mutant["module"]
    operator = cosmic_ray.plugins.get_operator(mutant["operator"])()
    mutant = {k: v for k, v in mutant.items() if k != "baseline"}  # a rerun's record says how this run went only
    if mutant.get("diff"):  # a rerun: the module may have been edited since, renumbering its occurrences
      occurrence = self.find(path, operator, mutant["diff"], mutant["occurrence"])
      if occurrence is None:
        return {**mutant, "outcome": "no-mutation"}  # the code it changed is gone
      mutant = {**mutant, "occurrence": occurrence}
    with use_mutation(path, operator, mutant["occurrence"]) as (original, mutated):
      if mutated is None:
        return {**mutant, "outcome": "no-mutation"}
      shutil.rmtree(path.parent / "__pycache__", ignore_errors=True)
      changed = _changed(original, mutated)
      result = self.test(self.tests_for(mutant["module"]), timeout, cache)
    shutil.rmtree(path.parent / "__pycache__", ignore_errors=True)
    if result["rc"] is None:
      outcome = "timeout"  # counted as killed: the tests did not pass
    elif result["rc"] == 0:
      outcome = "survived"
    else:
      outcome = "killed"
    return {**mutant, "outcome": outcome, "diff": changed[:3], **result}


def _changed(original: str, mutated: str) -> list[str]:
  """The lines a mutant changes, as `before  ->  after`."""
  return [f"{a.strip()}  ->  {b.strip()}" for a, b in zip(original.splitlines(), mutated.splitlines()) if a != b]


def _code(diff: list[str]) -> list[str]:
  """A recorded change without its lines' trailing comments (an edit of a comment leaves the mutant the same)."""
  return ["  ->  ".join(side.split("  #")[0].rstrip() for side in line.split("  ->  ")) for line in diff]


def read_session(path: Path) -> dict[str, dict]:
  """The results in a session file, by mutant key (the last line of a key wins)."""
  results: dict[str, dict] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        record = json.loads(line)
        results[record["key"]] = record
  return results


def execute(
  mutants: list[dict],
  out: Path,
  workers: int,
  timeout: float,
  again: bool = False,
  source: Path = ROOT,
  shared_cache: bool = True,
) -> None:
  """Runs the mutants not yet in `out` (all of them if `again`) on copies of `source`, appending each result."""
  from tqdm import tqdm

  done = read_session(out)
  todo = [m for m in mutants if again or m["key"] not in done]
  out.parent.mkdir(parents=True, exist_ok=True)
  base = Path(os.environ.get("AGEJAX_MUTATION_DIR", "/tmp/agejax-mutation"))
  cache: Path | None = None
  if shared_cache:
    cache = base / "jax_compilation_cache"
    cache.mkdir(parents=True, exist_ok=True)
  pool = [Worker(i, base, source) for i in range(workers)]
  free = list(pool)
  lock = threading.Lock()

  def take() -> Worker:
    with lock:
      return free.pop()

  def give(worker: Worker) -> None:
    with lock:
      free.append(worker)

  # A kill counts only if the test that failed passes on the unmutated code: each distinct failing
  # test runs once unmutated (a collection error: its file is collected), and a kill by a test that
  # fails there too is set aside as "baseline-failed". Survivors passed, so they need no baseline.
  verified: dict[str, bool] = {}
  failures: dict[str, str | None] = {}  # how each such test failed unmutated

  def check(result: dict) -> dict:
    test = result.get("failed")
    if result["outcome"] != "killed" or test is None:
      return result
    if test not in verified:
      worker = take()
      try:
        extra = ("--collect-only",) if "::" not in test else ()
        unmutated = worker.test((*extra, test), timeout, cache)
        verified[test] = unmutated["rc"] == 0
        failures[test] = unmutated["why"] or unmutated["tail"]
      finally:
        give(worker)
    return result if verified[test] else {**result, "outcome": "baseline-failed", "baseline": failures[test]}

  def one(mutant: dict) -> dict:
    worker = take()
    try:
      result = worker.mutate_and_test(mutant, timeout, cache)
    finally:
      give(worker)
    return check(result)

  started = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(workers) as executor, out.open("a") as sink:
    for result in tqdm(executor.map(one, todo), total=len(todo), desc="mutants"):
      sink.write(json.dumps(result) + "\n")
      sink.flush()
  minutes = (time.monotonic() - started) / 60
  print(f"{len(todo)} mutants and {len(verified)} kills checked unmutated in {minutes:.1f} min -> {out}")


def equivalents() -> dict[str, str]:
  """Mutants argued equivalent (key -> one-line argument), from tests/mutation-equivalent.toml."""
  if not EQUIVALENT_FILE.exists():
    return {}
  return dict(tomllib.loads(EQUIVALENT_FILE.read_text()).get("equivalent", {}))


def report(results: dict[str, dict]) -> str:
  """A Markdown table of kill rates per package, then the survivors: argued equivalent or not."""
  argued = equivalents()
  rows = collections.defaultdict(collections.Counter)
  for r in results.values():
    outcome = "equivalent" if r["outcome"] == "survived" and r["key"] in argued else r["outcome"]
    rows[r["package"]][outcome] += 1
  lines = [
    "| package | sampled | killed (timeouts) | survived: equivalent | survived: not equivalent | kill rate |",
    "| --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  total: collections.Counter = collections.Counter()
  for package in sorted(rows) + ["all"]:
    c = rows[package] if package != "all" else total
    if package != "all":
      total.update(c)
    killed = c["killed"] + c["timeout"]
    counted = killed + c["survived"]
    rate = f"{100 * killed / counted:.0f}%" if counted else "-"
    sampled = sum(c.values())
    lines.append(
      f"| {package} | {sampled} | {killed} ({c['timeout']}) | {c['equivalent']} | {c['survived']} | {rate} |"
    )
  other = {k: v for k in ("no-mutation", "baseline-failed") if (v := total[k])}
  if other:
    lines.append(f"\nnot run: {other}")
  for title, kind in (("Survivors, not equivalent", False), ("Survivors argued equivalent", True)):
    found = [r for r in results.values() if r["outcome"] == "survived" and (r["key"] in argued) == kind]
    if found:
      lines.append(f"\n{title}:\n")
      for r in sorted(found, key=lambda r: (r["module"], r["line"])):
        why = f" — {argued[r['key']]}" if kind else ""
        lines.append(f"- `{r['module']}:{r['line']}` `{'; '.join(r.get('diff') or [])}`{why}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  one = sub.add_parser("sample", help="a seeded sample of mutants from every package")
  one.add_argument("--per_package", type=int, default=10)
  one.add_argument("--seed", type=int, default=0)
  one.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated, of " + ", ".join(PACKAGES))
  run = sub.add_parser("run", help="every mutant of the named modules (a full session)")
  run.add_argument("modules", nargs="+")
  run.add_argument("--per_module", type=int, default=0, help="a seeded sample of this many a module (0: all)")
  run.add_argument("--seed", type=int, default=0)
  rerun = sub.add_parser("rerun", help="survivors and unverified kills again, with the tests as they are now")
  rerun.add_argument("session", type=Path)
  rerun.add_argument(
    "--keys",
    nargs="*",
    default=None,
    help="only these mutants (keys as the session writes them; default: all but those argued equivalent)",
  )
  show = sub.add_parser("report", help="per-package kill rates and survivors of a session")
  show.add_argument("session", type=Path)
  for p in (one, run):
    p.add_argument("--out", type=Path, default=None)
  for p in (one, run, rerun):
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="seconds a mutant's tests may run (then: killed)")
    p.add_argument("--source", type=Path, default=ROOT, help="the tree to copy (default: this working tree)")
    p.add_argument(
      "--no_shared_cache",
      action="store_true",
      help="compile in each test run, as plain pytest does (a warm shared cache lowers a server's idle memory, which"
      " test_hostile's memory bound reads)",
    )
  args = parser.parse_args()

  os.chdir(ROOT)
  if args.command == "report":
    print(report(read_session(args.session)))
    return
  if args.command == "sample":
    packages = tuple(args.packages.split(","))
    unknown = set(packages) - set(PACKAGES)
    if unknown:
      parser.error(f"unknown packages {sorted(unknown)}: choose from {', '.join(PACKAGES)}")
    mutants = sample(enumerate_mutants(all_modules(packages)), args.per_package, args.seed)
    out = args.out or Path(f"mutation/sample-seed{args.seed}.jsonl")
  elif args.command == "run":
    missing = [m for m in args.modules if not (ROOT / m).is_file()]
    if missing:
      parser.error(f"no such module: {', '.join(missing)}")
    for module in args.modules:
      tests_for(module)
    mutants = enumerate_mutants(args.modules)
    if args.per_module:
      for mutant in mutants:
        mutant["package"] = mutant["module"]  # sampled, and reported, module by module
      mutants = sample(mutants, args.per_module, args.seed)
    out = args.out or Path("mutation/run.jsonl")
  else:
    out = args.session
    again = ("survived", "baseline-failed", "no-mutation")  # no-mutation: not found after an edit, perhaps now
    mutants = [r for r in read_session(out).values() if r["outcome"] in again]
    if args.keys is not None:
      mutants = [m for m in mutants if m["key"] in args.keys]
    else:  # a survivor argued equivalent survives again: named with --keys only
      argued = equivalents()
      mutants = [m for m in mutants if m["key"] not in argued]
  print(f"{len(mutants)} mutants -> {out}")
  execute(
    mutants,
    out,
    args.workers,
    args.timeout,
    again=args.command == "rerun",
    source=args.source,
    shared_cache=not args.no_shared_cache,
  )
  print(report(read_session(out)))


if __name__ == "__main__":
  main()
