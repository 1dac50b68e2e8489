"""UTKFace as a TFDS dataset (`agejax_utkface`), built from a manually downloaded folder or archive.

UTKFace files are named `[age]_[gender]_[race]_[date&time].jpg` (`.chip.jpg` appended in the
aligned-and-cropped set: 23,708 faces, 200x200, ages 1..116); gender 0 male / 1 female, race 0
white / 1 black / 2 asian / 3 indian / 4 others. Both are stored as class labels (`GENDERS`,
`RACES`), the groupings of `group_names()`. Three real names miss the race
(`39_1_20170116174525125.jpg.chip.jpg`, ...): they are kept with race "unknown", as is any
missing, empty or out-of-range gender or race field.

Age policy: every age >= 0 is kept as given; the trainer's label range decides what to use, so the
prepared dataset never depends on a training config. Names without an integer age, and negative
ages, are skipped and counted (`builder.info.metadata["skipped"]`).

Splits: a file goes to train / validation / test by a seeded hash of its base name, so the split
is the same whatever the file order, folder layout or archive, and stable as files are added.
Files are identified by base name (UTKFace names carry a millisecond timestamp): a second file
with the same base name, e.g. from an extracted copy beside the archive, is skipped and counted.

Source: `--manual_dir` is a folder (nested folders, and `.tar.gz` / `.tgz` / `.tar` archives in it,
read without extracting) or one archive itself. Every archive is read completely before anything is
prepared: a truncated or corrupt one fails in one line naming it, rather than losing the files after
the break. The prepared dataset records a fingerprint of its source (each archive's SHA-256, each
loose file's name, size and modification time; `metadata["source"]`). A file whose name is not
UTF-8 is skipped and counted ("non-UTF-8 file name").
"""

import dataclasses
import hashlib
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from agejax import errors
from agejax.data import builders, faces, sources

SPLITS = ("train", "validation", "test")
ARCHIVE_SUFFIXES = sources.ARCHIVE_SUFFIXES
# Group names in the order of UTKFace's codes; "unknown" last, for a missing or invalid field.
GENDERS = ("male", "female", builders.UNKNOWN)
RACES = ("white", "black", "asian", "indian", "others", builders.UNKNOWN)

# Single-digit gender and race codes tell them apart from the long date field when one is missing.
# Two files of the real archive end their date in "jpg" or a space ("...357jpg.chip.jpg", "...657 .jpg").
_NAME = re.compile(r"(?P<age>-?\d+)(?:_(?P<gender>\d?))?(?:_(?P<race>\d?))?(?:_(?P<date>\d{2,})(?:jpg| +)?)?", re.ASCII)


def _group(code: str | None, names: tuple[str, ...]) -> str:
  """Returns the group a one-digit code names, or "unknown" (the last name) when missing or out of range."""
  return names[int(code)] if code and int(code) < len(names) - 1 else names[-1]


def parse_utkface_name(name: str) -> dict | None:
  """Returns {age, gender, race, date} from a UTKFace file name, or None.

  gender and race are group names (`GENDERS`, `RACES`), "unknown" when the field is missing, empty
  or out of range; date is "" when missing.
  """
  stem = os.path.basename(name).split(".", 1)[0]
  match = _NAME.fullmatch(stem)
  if match is None:
    return None
  return {
    "age": int(match["age"]),
    "gender": _group(match["gender"], GENDERS),
    "race": _group(match["race"], RACES),
    "date": match["date"] or "",
  }


def assign_split(file_name: str, fractions: dict[str, float], seed: int) -> str:
  """Returns the split of a file name: a seeded hash of its base name against the fractions."""
  # surrogateescape: a name with non-UTF-8 bytes still lands in one split, where it is counted as skipped.
  digest = hashlib.sha256(f"{seed}/{os.path.basename(file_name)}".encode("utf-8", "surrogateescape")).digest()
  u = int.from_bytes(digest[:8], "big") / 2**64
  splits = [s for s, f in fractions.items() if f > 0]
  total = 0.0
  for split in splits[:-1]:
    total += fractions[split]
    if u < total:
      return split
  return splits[-1]  # the remainder, so rounding in the fractions never loses a file


@dataclasses.dataclass
class UtkfaceConfig(tfds.core.BuilderConfig):
  """Image size and split rule of the prepared UTKFace dataset."""

  image_size: int = 200
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validation, test
  split_seed: int = 0

  def __post_init__(self):
    fractions = self.split_fractions
    if min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
      raise errors.UserError(f"split_fractions={self.split_fractions} must be >= 0, sum to 1, with train > 0")


def _visible(rel_path: str) -> bool:
  """False for dot-files and dot-folders (macOS `._*`, `.DS_Store`): metadata, not faces."""
  return not any(part.startswith(".") for part in rel_path.split("/") if part not in ("", "."))


def _raise(error: OSError) -> None:
  """os.walk's onerror: an unlistable folder fails the preparation instead of silently losing its files."""
  raise errors.UserError(f"{sources.display(error.filename)}: cannot list this folder ({error.strerror})")


def scan(root: Path) -> tuple[list[Path], list[Path]]:
  """Returns the visible files and the archives of a manual folder, sorted; an archive path is its own source."""
  if root.is_file():
    if not root.name.endswith(ARCHIVE_SUFFIXES):
      raise errors.UserError(
        f"{sources.display(root)} is a file but not a {'/'.join(ARCHIVE_SUFFIXES)} archive; pass "
        f"the folder holding the UTKFace images or archive"
      )
    return [], [root]
  files: list[Path] = []
  archives: list[Path] = []
  for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
    dirnames[:] = sorted(d for d in dirnames if _visible(d))
    for name in sorted(filenames):
      if _visible(name):
        (archives if name.endswith(ARCHIVE_SUFFIXES) else files).append(Path(dirpath, name))
  return files, archives


def _relative(path: Path, root: Path) -> str:
  """A file's name relative to the manual folder (an archive passed as the source: its own name)."""
  return path.name if path == root else path.relative_to(root).as_posix()


def describe(root: Path, files: list[Path], archives: list[Path]) -> dict:
  """Returns the source fingerprint, reading every archive completely (a broken one raises ValueError)."""
  parts = {sources.display(_relative(archive, root)): sources.verify_archive(archive) for archive in archives}
  if files:
    parts["files"], _ = sources.files_digest((_relative(path, root), path) for path in files)
  return sources.fingerprint(root, parts, len(files) + len(archives))


class AgejaxUtkface(builders.ManualSourceBuilder):
  """UTKFace faces with age, gender and race parsed from the file names."""

  VERSION = tfds.core.Version("3.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "2.0.0": "Records the source's fingerprint (metadata['source']); archives are read completely or not at "
    "all; non-UTF-8 file names skipped and counted; 32-bit grayscale images scaled by their value "
    "range instead of clipped.",
    "3.0.0": "gender and race are class labels named male/female and white/black/asian/indian/others, "
    "with 'unknown' (was -1) for a missing or invalid field.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  UTKFace (https://susanqq.github.io/UTKFace/) is for non-commercial research only and has no
  stable download URL. Download the aligned and cropped faces, `UTKFace.tar.gz` (23,708 images),
  and put the archive in the manual folder, or extract it there: nested folders, `.tar.gz`, `.tgz`
  and `.tar` archives are all read, without extracting (extract a `.zip`, e.g. Kaggle's, first).
  Then pass the folder, or the archive itself, as `--manual_dir`.
  """
  BUILDER_CONFIGS = [
    UtkfaceConfig(name="default", description="Faces at 200x200, the size of UTKFace's chips."),
    UtkfaceConfig(name="tiny", description="For tests: faces at 32x32.", image_size=32),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    features = builders.features(
      self.builder_config.image_size,
      gender=builders.class_label(GENDERS, "from the name's gender field (0 male, 1 female)"),
      race=builders.class_label(RACES, "from the name's race field (0 white, 1 black, 2 asian, 3 indian, 4 others)"),
      file_name=tfds.features.Text(doc="base name of the UTKFace file"),
    )
    return self.dataset_info_from_configs(
      features=features,
      homepage="https://susanqq.github.io/UTKFace/",
      metadata=tfds.core.MetadataDict(),
    )

  def group_names(self) -> dict[str, tuple[str, ...]]:
    """The groupings of UTKFace: gender and race, each with "unknown" last."""
    return builders.class_label_groups(self, "gender", "race")

  def _describe_source(self, path: Path) -> dict:
    return describe(path, *scan(path))

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    files, archives = scan(root)
    self._record_source(describe(root, files, archives))  # checks every archive before any example
    fractions = dict(zip(SPLITS, self.builder_config.split_fractions))
    return {
      split: self._generate_examples(root, files, archives, split)
      for split, fraction in fractions.items()
      if fraction > 0
    }

  def _sources(
    self, root: Path, files: list[Path], archives: list[Path], split: str
  ) -> Iterator[tuple[str, str, Path | bytes]]:
    """Yields (base name, where, path or bytes) of the split's files, archive members streamed."""
    cfg = self.builder_config
    fractions = dict(zip(SPLITS, cfg.split_fractions))
    for path in files:
      if assign_split(path.name, fractions, cfg.split_seed) == split:
        yield path.name, sources.display(_relative(path, root)), path
    for archive in archives:
      try:
        with tarfile.open(archive, "r|*") as tar:  # "|": one sequential pass, nothing on disk
          for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and _visible(member.name) and assign_split(name, fractions, cfg.split_seed) == split:
              where = sources.display(f"{_relative(archive, root)}:{member.name}")
              data = tar.extractfile(member)
              assert data is not None  # isfile(): a regular member always has a stream
              yield name, where, data.read()
      except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        # It was read whole moments before (describe): it changed while being prepared.
        raise errors.UserError(
          f"{sources.display(archive)} is not a complete tar archive any more ({e}); was it "
          f"replaced during preparation?"
        ) from e

  def _generate_examples(self, root: Path, files: list[Path], archives: list[Path], split: str):
    skips = faces.SkipCounter()
    size = self.builder_config.image_size
    kept = set()
    for name, where, content in self._sources(root, files, archives, split):
      if not sources.is_utf8(name):
        skips.add("non-UTF-8 file name", where)
        continue
      if name in kept:
        skips.add("duplicate file name", where)
        continue
      label = parse_utkface_name(name)
      if label is None:
        skips.add("unparseable name", where)
        continue
      if reason := faces.age_skip_reason(label["age"]):
        skips.add(reason, where)
        continue
      image = faces.load_rgb(content, size)
      if isinstance(image, str):
        skips.add(image, where)
        continue
      kept.add(name)
      yield (
        name,
        {
          "image": image,
          "age": label["age"],
          "age_std": 0.0,
          "gender": label["gender"],
          "race": label["race"],
          "file_name": name,
        },
      )
    skips.record(self.info.metadata, self.name, split)
    if not kept:
      raise errors.UserError(
        f"no usable UTKFace image for split {split!r} in {sources.display(root)} (skipped: "
        f"{dict(skips.counts)}); it needs the UTKFace images, named AGE_GENDER_RACE_DATE.jpg, "
        f"or UTKFace.tar.gz"
      )
