"""The unified benchmark's train / validation / test parts over a dataset's folders (`config.data.split`).

Paplham & Franc's benchmark (CVPR 2024) assigns every face of a database to a subject-exclusive
folder; a split names the folders of each part. `config.data.split` chooses one:

- '' (the default): the dataset's own TFDS splits train / validation / test (demo, utkface, csv_faces);
- K in 0..4 (an int, or its text from the command line): the benchmark's split K over folders 0-9,
  `BENCHMARK_SPLITS[K]`, e.g. K=0 trains on 0-5, validates on 6-7, tests on 8-9; a database with
  folders 0-2 only (CLAP2016, CACD2000) has the one split train 0, validation 1, test 2 (K=0);
- an explicit spec such as `train:1-70,val:71-76,test:77-82` (folder ranges and comma lists; the
  parts `train`/`trn`, `validation`/`val`, `test`/`tst`) for other layouts, e.g. FG-NET's one folder
  per person.

`check(value)` checks what a config alone can tell (syntax, K's range); `resolve(value, folders)`
checks it against a prepared dataset's folders and returns each part's folders. Pure Python: the
training config checks import it without TFDS.
"""

import dataclasses
import re
from collections.abc import Iterable

from agejax import errors

PARTS = ("train", "validation", "test")
_PART_NAMES = {
  "train": "train",
  "trn": "train",
  "validation": "validation",
  "val": "validation",
  "test": "test",
  "tst": "test",
}
# facebase/benchmarks/{AgeDB,MORPH,UTKFace,AFAD}.yaml: (trn, val, tst) of splits 0..4 over folders 0-9.
BENCHMARK_SPLITS = (
  ((0, 1, 2, 3, 4, 5), (6, 7), (8, 9)),
  ((2, 3, 4, 5, 6, 7), (8, 9), (0, 1)),
  ((4, 5, 6, 7, 8, 9), (0, 1), (2, 3)),
  ((5, 6, 7, 8, 9, 0), (1, 2), (3, 4)),
  ((6, 7, 8, 9, 0, 1), (2, 3), (4, 5)),
)
# facebase/benchmarks/{CLAP2016,CACD2000}.yaml: the databases that define one split of their own.
THREE_FOLDER_SPLIT = ((0,), (1,), (2,))
_FOLDERS = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)
_MAX_FOLDER = 1_000_000  # a range this long is a typo, not a layout


@dataclasses.dataclass(frozen=True)
class Split:
  """The folders of each part of one split, in the order given."""

  train: tuple[int, ...]
  validation: tuple[int, ...]
  test: tuple[int, ...]

  def folders(self, part: str) -> tuple[int, ...]:
    """The folders of a part: "train", "validation" or "test"."""
    if part not in PARTS:
      raise errors.UserError(
        f"split {part!r} is not one of {PARTS}: with config.data.split set, the dataset's parts are "
        f"train, validation and test"
      )
    return getattr(self, part)


def normalise(value: str | int | None) -> str:
  """The text of a config.data.split value: '' when unset; an int K as 'K'."""
  if value is None:
    return ""
  if isinstance(value, bool):  # an int subclass: True is no split number
    raise errors.UserError(f"config.data.split={value!r}: must be '', a benchmark split 0-4 or a spec")
  return str(value).strip()


def _error(value, why: str) -> errors.UserError:
  return errors.UserError(f"config.data.split={value!r}: {why}")


def _parse_spec(value, text: str) -> Split:
  """Parses `train:0-5,val:6,7,test:8-9` into a Split; a bad spec raises naming what is wrong."""
  parts: dict[str, list[int]] = {}
  current = None
  for token in text.split(","):
    token = token.strip()
    if ":" in token:
      name, token = (s.strip() for s in token.split(":", 1))
      if name.lower() not in _PART_NAMES:
        raise _error(value, f"part {name!r} is not train (trn), validation (val) or test (tst)")
      current = _PART_NAMES[name.lower()]
      if current in parts:
        raise _error(value, f"part {current!r} is given twice")
      parts[current] = []
      if not token:
        continue
    if current is None:
      raise _error(value, "a spec starts with a part name, e.g. 'train:0-5,val:6-7,test:8-9'")
    if not token:
      raise _error(value, f"part {current!r} has an empty folder entry (two commas?)")
    match = _FOLDERS.fullmatch(token)
    if not match:
      raise _error(value, f"{token!r} in part {current!r} is not a folder number or range like 3-7")
    first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
    if last < first or last - first > _MAX_FOLDER:
      raise _error(value, f"folder range {token!r} in part {current!r} is empty or reversed")
    parts[current].extend(range(first, last + 1))
  for part in PARTS:
    if part not in parts:
      raise _error(value, f"part {part!r} is missing; a spec names train, val and test")
    if not parts[part]:
      raise _error(value, f"part {part!r} is empty")
  seen: dict[int, str] = {}
  for part in PARTS:
    for folder in parts[part]:
      if folder in seen:
        where = "twice" if seen[folder] == part else f"in parts {seen[folder]!r} and {part!r}"
        raise _error(value, f"folder {folder} is {where}: the parts must not share folders")
      seen[folder] = part
  return Split(*(tuple(parts[p]) for p in PARTS))


def parse(value: str | int | None) -> int | Split | None:
  """The split a config value names: None for '', K for a benchmark split, or an explicit spec's Split."""
  text = normalise(value)
  if not text:
    return None
  if text.isdigit() and text.isascii():
    k = int(text)
    if k >= len(BENCHMARK_SPLITS):
      raise _error(value, f"the benchmark has splits 0-{len(BENCHMARK_SPLITS) - 1}")
    return k
  return _parse_spec(value, text)


def check(value: str | int | None) -> None:
  """Raises a one-line UserError when a config.data.split value is malformed (nothing else is read)."""
  parse(value)


def _folders_text(folders: Iterable[int]) -> str:
  """Folders as short text: 0-9, or 1-70,72."""
  folders = sorted(set(folders))
  runs: list[str] = []
  start: int | None = None
  prev = -2
  for f in [*folders, None]:
    if start is not None and (f is None or f != prev + 1):
      runs.append(str(start) if start == prev else f"{start}-{prev}")
      start = None
    if f is not None:
      start = f if start is None else start
      prev = f
  return ",".join(runs) or "none"


def resolve(value: str | int | None, folders: Iterable[int]) -> Split | None:
  """The folders of each part of the split `value` names, over a dataset that has `folders`; None for ''."""
  chosen = parse(value)
  available = set(folders)
  if chosen is None:
    return None
  if isinstance(chosen, int):
    if available == set(range(3)):
      if chosen:
        raise _error(
          value, "this dataset has folders 0-2 (one split of its own, as CLAP2016 and CACD2000): only split 0"
        )
      return Split(*THREE_FOLDER_SPLIT)
    if not set(range(10)) <= available:
      raise _error(
        value,
        f"benchmark split {chosen} needs folders 0-9 and this dataset has folders {_folders_text(available)}; "
        f"give the parts instead, e.g. 'train:...,val:...,test:...'",
      )
    return Split(*BENCHMARK_SPLITS[chosen])
  missing = sorted({f for part in PARTS for f in chosen.folders(part)} - available)
  if missing:
    raise _error(value, f"folder {missing[0]} is not in this dataset, whose folders are {_folders_text(available)}")
  return chosen


def formable(folders: Iterable[int]) -> list[int]:
  """The benchmark splits K a dataset with `folders` can use: 0-4 over folders 0-9, 0 over folders 0-2, else none."""
  available = set(folders)
  if available == set(range(3)):
    return [0]
  return list(range(len(BENCHMARK_SPLITS))) if set(range(10)) <= available else []


def part_sizes(split: Split, counts: dict[int, int]) -> dict[str, int]:
  """The number of examples of each part, from the examples per folder."""
  return {part: sum(counts.get(f, 0) for f in split.folders(part)) for part in PARTS}
