"""A fae database prepared on Apache Beam through TFDS's own Beam support (`prepare_data.py fae --beam_options`).

With beam options, `AgejaxFae._split_generators` returns one PTransform per folder (`split_transforms`):
its entries are decoded and cropped by `fae.example`, the one-process path's function, so the examples are
the same bit for bit (same keys, the entry index; same features, encoded by TFDS). TFDS runs every folder in
one pipeline and writes the shards (ArrayRecord by default on this path).

Integrity on Beam:
- skips are Beam counters, one per folder and reason ("folder3 skipped: corrupt image"), with the first few
  skipped entries of each (the smallest indices, found by a Beam Top per key) as distributions whose value is
  the entry index; `record_metrics` (from `_process_pipeline_result`, after the pipeline) turns them into the
  metadata keys the one-process path writes (faces.SkipCounter.record) and the kept counts per folder;
- the subject-exclusivity check is a Beam aggregation: subject -> its folders (CombinePerKey), failing with
  read_database's one-line message for the first subject (in JSON order) found in two folders; the same
  aggregation counts the subjects and those shared under --shared_subjects;
- a UserError raised in a worker reaches the user as its one line (`unwrap_error`), not a runner traceback.

The launching process still parses the JSON (read_database, which also stats every image for the source
fingerprint); it holds one row per entry, never a table per subject.
"""

import json
import re

import apache_beam as beam
from apache_beam.metrics.metric import Metrics, MetricsFilter

from agejax import errors
from agejax.data import faces, fae

NAMESPACE = "agejax_fae"
_SKIPPED = re.compile(r"folder(\d+) (?:example (\d+) )?skipped: (.*)")
_SHARED_EXAMPLE = "shared subject example: "
_MAX_EXAMPLES = faces.SkipCounter().max_examples
# How runners suffix a re-raised worker error, and how one's text names the original.
_STEP_SUFFIX = re.compile(r"( \[while running '.*'\])+$")
_RAISED = re.compile(r"^agejax\.errors\.(\w+): (.*)$", re.MULTILINE)


def parse_options(text: str) -> dict[str, str]:
  """--beam_options 'runner=DirectRunner,direct_num_workers=2' -> {option: value}; a one-line error when malformed."""
  options = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, equals, value = part.partition("=")
    if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
      raise errors.UserError(f"--beam_options={text!r}: {part!r} is not OPTION=VALUE (e.g. runner=DirectRunner)")
    options[key.strip()] = value.strip()
  if not options:
    raise errors.UserError(f"--beam_options={text!r}: give OPTION=VALUE pairs, e.g. runner=DirectRunner")
  return options


def unwrap_error(error: BaseException) -> errors.UserError | None:
  """The UserError a pipeline step raised, as its one line, from the runner's wrapped exception; else None."""
  if isinstance(error, errors.UserError):  # in-process runners re-raise it with the step's name appended
    return type(error)(_STEP_SUFFIX.sub("", str(error)))
  found = _RAISED.search(str(error))  # runners with worker processes pass the worker's traceback as text
  cls = getattr(errors, found.group(1), None) if found else None
  if found is None or not (isinstance(cls, type) and issubclass(cls, errors.UserError)):
    return None
  return cls(_STEP_SUFFIX.sub("", found.group(2)))


class _Examples(beam.DoFn):
  """An entry -> its (key, features), or a skip counted and sent to the "skipped" output."""

  def __init__(self, size: int):
    self.size = size

  def process(self, entry: fae.Entry):
    result = fae.example(entry, self.size)
    if isinstance(result, str):
      Metrics.counter(NAMESPACE, f"folder{entry.folder} skipped: {result}").inc()
      yield beam.pvalue.TaggedOutput("skipped", ((entry.folder, result), entry.index))
      return
    Metrics.counter(NAMESPACE, f"folder{entry.folder} kept").inc()
    yield result


def _report_examples(skipped):
  """The first skipped entries of a folder and reason, by index, as distributions (their value the index)."""
  (folder, reason), indices = skipped
  for rank, index in enumerate(indices):
    Metrics.distribution(NAMESPACE, f"folder{folder} example {rank} skipped: {reason}").update(index)


class _SubjectFolders(beam.CombineFn):
  """A subject's (folder, index, img_path, kept) rows -> ({folder: (first index, its img_path)}, any kept)."""

  def create_accumulator(self):
    return {}, False

  def add_input(self, accumulator, row):
    folder, index, img_path, kept = row
    return self.merge_accumulators([accumulator, ({folder: (index, img_path)}, kept)])

  def merge_accumulators(self, accumulators):
    folders: dict[int, tuple[int, str]] = {}
    kept = False
    for first, any_kept in accumulators:
      kept |= any_kept
      for folder, seen in first.items():
        folders[folder] = min(folders.get(folder, seen), seen)
    return folders, kept

  def extract_output(self, accumulator):
    return accumulator


class _CheckSubjects(beam.DoFn):
  """Counts a subject (when one of its faces is kept); a subject in two folders is a violation or, allowed, shared."""

  def __init__(self, shared_subjects):
    self.shared_subjects = shared_subjects

  def process(self, subject_folders):
    subject, (folders, kept) = subject_folders
    if kept:
      Metrics.counter(NAMESPACE, "subjects").inc()
    if len(folders) < 2:
      return
    if fae.may_share(folders, self.shared_subjects):
      Metrics.counter(NAMESPACE, "shared subjects").inc()
      yield beam.pvalue.TaggedOutput("shared", (subject, sorted(folders)))
      return
    first = min(index for index, _ in folders.values())
    yield first, subject, sorted((f, path) for f, (_, path) in folders.items())


def _fail(violations, name: str, shared_subjects) -> None:
  """Raises read_database's error for the first subject (in JSON order) found in two folders, if any."""
  for _, subject, folders in violations:
    raise fae.subject_error(name, subject, dict(folders), shared_subjects)


def _report_shared(examples) -> None:
  # The one string the launcher needs back rides in a counter's name: Beam metrics carry numbers only.
  for subject, folders in examples:
    Metrics.counter(NAMESPACE, _SHARED_EXAMPLE + json.dumps([subject, folders])).inc()


@beam.ptransform_fn
def _check_subjects(pbegin, rows, name: str, shared_subjects):
  """The subject-exclusivity check and the subject counts, aggregated by subject on the workers."""
  rows = pbegin | "Rows" >> beam.Create([(subject, row) for subject, *row in rows])
  checked = (
    rows
    | "FoldersBySubject" >> beam.CombinePerKey(_SubjectFolders())
    | "Check" >> beam.ParDo(_CheckSubjects(shared_subjects)).with_outputs("shared", main="violations")
  )
  _ = (
    checked.violations
    | "FirstViolation" >> beam.combiners.Top.Smallest(1)
    | "Fail" >> beam.Map(_fail, name, shared_subjects)
  )
  _ = checked.shared | "FirstShared" >> beam.combiners.Top.Smallest(1) | "ReportShared" >> beam.Map(_report_shared)


@beam.ptransform_fn
def _folder_examples(pbegin, entries: list, size: int, checks: dict | None = None):
  """A folder's (key, features) examples; the first folder's transform also runs the whole database's checks."""
  if checks is not None:
    _ = pbegin | "Subjects" >> _check_subjects(**checks)
  decoded = (
    pbegin
    | "Entries" >> beam.Create(entries)
    | "Decode" >> beam.ParDo(_Examples(size)).with_outputs("skipped", main="examples")
  )
  _ = (
    decoded.skipped
    | "FirstSkipped" >> beam.combiners.Top.SmallestPerKey(_MAX_EXAMPLES)
    | "ReportSkipped" >> beam.Map(_report_examples)
  )
  return decoded.examples


def split_transforms(db: "fae.Database", size: int, name: str, shared_subjects) -> dict:
  """{"folderN": PTransform} for TFDS to run in one pipeline, as _split_generators returns on Beam."""
  checks = {"rows": db.subject_rows, "name": name, "shared_subjects": shared_subjects}
  return {
    f"folder{f}": _folder_examples(kept, size, checks if i == 0 else None)
    for i, (f, kept) in enumerate(db.entries.items())
  }


def _metrics(pipeline_result) -> tuple[dict[str, int], dict[str, int]]:
  """The pipeline's counters {name: total over steps} and the skip examples {name: entry index}."""
  found = pipeline_result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))

  def value(result):
    return result.committed if result.committed is not None else result.attempted

  counters: dict[str, int] = {}
  for result in found["counters"]:
    counters[result.key.metric.name] = counters.get(result.key.metric.name, 0) + value(result)
  examples = {result.key.metric.name: value(result).min for result in found["distributions"]}
  return counters, examples


def record_metrics(builder: "fae.AgejaxFae", pipeline_result, db: "fae.Database") -> None:
  """Writes the pipeline's skips, kept counts and subjects into the metadata keys of the one-process path."""
  counters, examples = _metrics(pipeline_result)
  skipped: dict[int, dict[str, int]] = {}
  first: dict[tuple[int, str], dict[int, int]] = {}  # (folder, reason) -> {rank: entry index}
  for metric, count in counters.items():
    if match := _SKIPPED.fullmatch(metric):
      skipped.setdefault(int(match[1]), {})[match[3]] = count
  for metric, index in examples.items():
    if match := _SKIPPED.fullmatch(metric):
      first.setdefault((int(match[1]), match[3]), {})[int(match[2])] = index
  for folder, entries in db.entries.items():
    paths = {e.index: e.img_path for e in entries}
    skips = db.skips[folder]  # read_database's skips of this folder; the decoding's are added to them
    for reason, count in sorted(skipped.get(folder, {}).items()):
      skips.counts[reason] += count
      ranked = first.get((folder, reason), {})
      skips.examples[reason] = [paths[ranked[rank]] for rank in sorted(ranked)][: skips.max_examples]
    builder.record_folder(folder, counters.get(f"folder{folder} kept", 0), skips)
  metadata = builder.info.metadata
  metadata["subjects"] = counters.get("subjects", 0)
  if db.shared_folders:
    shared = [json.loads(m.removeprefix(_SHARED_EXAMPLE)) for m in counters if m.startswith(_SHARED_EXAMPLE)]
    fae.record_shared(metadata, db.shared_folders, counters.get("shared subjects", 0), min(shared, default=None))
