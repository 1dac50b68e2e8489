"""Tests for what a prepared dataset is built from: archives read whole or not at all, source
fingerprints, CSV datasets named by the user, and refusing to reuse a dataset prepared from another
or a changed source."""

import bz2
import csv
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import data_settings
from PIL import Image

from agejax.data import datasets, pipeline, sources

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(rng, size: int = 16) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _members(n: int, seed: int = 0) -> dict[str, bytes]:
  """n UTKFace-named JPEG files: {archive path: bytes}."""
  rng = np.random.default_rng(seed)
  return {f"UTKFace/{10 + i}_{i % 2}_{i % 5}_20170101{seed:03d}{i:06d}.jpg.chip.jpg": _jpeg(rng) for i in range(n)}


def _tar(members: dict[str, bytes], compression: str = "") -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
  """Asserts the error is one line starting with `path`; returns the rest of it."""
  message = str(error.value)
  assert "\n" not in message and message.startswith(str(path)), message
  return message[len(str(path)) :]


# --- archives: read completely or not at all ------------------------------------------------------

MEMBERS = _members(40)


def _layout(data: bytes) -> tuple[list[tarfile.TarInfo], int]:
  """The members of an uncompressed tar and the offset of its end-of-archive marker."""
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
    members = tar.getmembers()
  last = members[-1]
  return members, last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def test_a_whole_archive_verifies_in_every_compression(tmp_path):
  for suffix, data in (
    (".tar", _tar(MEMBERS)),
    (".tar.gz", _tar(MEMBERS, "gz")),
    (".tar", _tar(MEMBERS, "bz2")),
    (".tar", _tar(MEMBERS, "xz")),
  ):
    path = tmp_path / f"UTKFace{suffix}"
    path.write_bytes(data)
    assert sources.verify_archive(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_a_tar_cut_anywhere_fails_or_keeps_every_member(tmp_path):
  data = _tar(MEMBERS)
  members, end = _layout(data)
  # Python's tarfile reads a tar cut inside a later member header as a complete, shorter archive.
  cuts = {len(data) - 1, end, end + 1, end + 511}  # one byte short; at, and inside, the end marker
  for member in members[1:]:
    cuts |= {member.offset + 1, member.offset + 100, member.offset + 511}  # inside a member header
  for member in members:
    cuts |= {member.offset_data, member.offset_data + 1, member.offset_data + member.size - 1}  # inside its data
  path = tmp_path / "UTKFace.tar"
  for cut in sorted(cuts):
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError) as error:
      sources.verify_archive(path)
    assert re.fullmatch(r" is truncated(: .*| or corrupt \(.*\)); download it again", _one_line_naming(error, path))

  for cut in range(1, len(data), 97):  # everywhere else: an accepted cut must have lost nothing
    path.write_bytes(data[:cut])
    try:
      sources.verify_archive(path)
    except ValueError:
      continue
    assert cut >= end + tarfile.BLOCKSIZE and cut % tarfile.BLOCKSIZE == 0, cut  # only zero padding is gone
    with tarfile.open(path) as tar:
      assert {m.name: tar.extractfile(m).read() for m in tar} == MEMBERS


def test_a_tar_gz_cut_anywhere_fails(tmp_path):
  data = _tar(MEMBERS, "gz")
  path = tmp_path / "UTKFace.tar.gz"
  # The gzip header, the deflate stream every 13 bytes, and each byte of the CRC and length trailer.
  for cut in [*range(1, 12), *range(12, len(data) - 8, 13), *range(len(data) - 8, len(data))]:
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError) as error:
      sources.verify_archive(path)
    assert re.fullmatch(r" is truncated(: .*| or corrupt \(.*\)); download it again", _one_line_naming(error, path))


def test_corrupt_joined_or_bad_checksum_archives_fail(tmp_path):
  data = _tar(MEMBERS)
  members, end = _layout(data)
  path = tmp_path / "UTKFace.tar"
  corrupt = bytearray(data)
  corrupt[members[10].offset + 5] ^= 0xFF  # a byte of the 11th member's name: its header checksum fails
  path.write_bytes(bytes(corrupt))
  with pytest.raises(ValueError) as error:
    sources.verify_archive(path)
  assert _one_line_naming(error, path) == (
    f" is corrupt: the tar header at byte {members[10].offset} is invalid; download it again"
  )

  path.write_bytes(data + _tar(_members(3, seed=1)))  # two archives joined: tarfile reads only the first
  with pytest.raises(ValueError) as error:
    sources.verify_archive(path)
  assert _one_line_naming(error, path) == (
    f" has data after its end-of-archive marker at byte {end} (archives "
    f"joined?); extract it and pass the folder instead"
  )

  gz = bytearray(_tar(MEMBERS, "gz"))
  gz[-6] ^= 0xFF  # the CRC in the gzip trailer
  path = tmp_path / "UTKFace.tar.gz"
  path.write_bytes(bytes(gz))
  with pytest.raises(ValueError) as error:
    sources.verify_archive(path)
  assert re.fullmatch(
    r" is truncated or corrupt \(CRC check failed .*\); download it again", _one_line_naming(error, path)
  )
  for compress in (bz2.compress, lzma.compress):
    path = tmp_path / "UTKFace.tar"
    path.write_bytes(compress(data)[:-30])
    with pytest.raises(ValueError) as error:
      sources.verify_archive(path)
    assert re.fullmatch(r" is truncated or corrupt \(.*\); download it again", _one_line_naming(error, path))


# --- preparing UTKFace from archives ----------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
  """Every file under a folder: {relative path: (mtime_ns, sha256)}, to show nothing was lost or rewritten."""
  return {
    p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def _ages(builder) -> dict[str, dict[str, int]]:
  """{split: {file_name: age}} of a prepared dataset, read back from disk."""
  out = {}
  for split in builder.info.splits:
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    out[split] = {ex["file_name"].decode(): int(ex["age"]) for ex in examples}
  return out


@pytest.mark.slow
@pytest.mark.parametrize(
  "suffix, cut",
  [
    (".tar", "inside a member header"),
    (".tar", "inside member data"),
    (".tar.gz", "one byte short"),
    (".tar.gz", "inside the gzip stream"),
  ],
)
def test_a_truncated_archive_fails_before_anything_is_written(tmp_path, suffix, cut):
  data = _tar(MEMBERS, "gz" if suffix == ".tar.gz" else "")
  members, _ = _layout(_tar(MEMBERS))
  at = {
    "inside a member header": members[23].offset + 300,
    "inside member data": members[23].offset_data + 7,
    "one byte short": len(data) - 1,
    "inside the gzip stream": len(data) // 2,
  }[cut]
  manual = tmp_path / "manual"
  manual.mkdir()
  archive = manual / f"UTKFace{suffix}"
  archive.write_bytes(data[:at])
  for manual_dir in (manual, archive):  # the folder holding it, or the archive itself
    with pytest.raises(ValueError) as error:
      datasets.prepare("utkface", str(tmp_path / "tfds"), str(manual_dir), "tiny")
    assert re.fullmatch(r" is truncated(: .*| or corrupt \(.*\)); download it again", _one_line_naming(error, archive))
  assert archive.read_bytes() == data[:at] and not (tmp_path / "tfds").exists()


@pytest.mark.slow
def test_utkface_from_an_archive_path_and_another_archive_refused(tmp_path):
  data_dir = tmp_path / "tfds"
  first, second = tmp_path / "a" / "UTKFace.tar.gz", tmp_path / "b" / "UTKFace.tar.gz"
  for path, members in ((first, MEMBERS), (second, _members(30, seed=1))):
    path.parent.mkdir()
    path.write_bytes(_tar(members, "gz"))
  builder = datasets.prepare("utkface", str(data_dir), str(first), "tiny")  # the archive itself as --manual_dir
  assert sum(len(split) for split in _ages(builder).values()) == 40
  source = builder.info.metadata["source"]
  assert source["path"] == str(first) and source["parts"] == {"UTKFace.tar.gz": sources.file_digest(first)}
  prepared = data_dir / "agejax_utkface"
  before = _snapshot(prepared)

  datasets.prepare("utkface", str(data_dir), str(first), "tiny")  # the same source: kept as it is
  assert _snapshot(prepared) == before
  with pytest.raises(ValueError) as error:
    datasets.prepare("utkface", str(data_dir), str(second), "tiny")
  assert str(error.value) == (
    f"agejax_utkface/tiny/3.0.0 in {data_dir} was prepared from {first}, not from "
    f"{second} (different: UTKFace.tar.gz): pass --rebuild to delete it and prepare it "
    f"again"
  )
  assert _snapshot(prepared) == before

  good = second.read_bytes()
  second.write_bytes(good[:-1])  # a rebuild from a broken archive fails before deleting anything
  with pytest.raises(ValueError) as error:
    datasets.prepare("utkface", str(data_dir), str(second), "tiny", rebuild=True)
  _one_line_naming(error, second)
  assert _snapshot(prepared) == before
  second.write_bytes(good)
  builder = datasets.prepare("utkface", str(data_dir), str(second), "tiny", rebuild=True)
  assert sum(len(split) for split in _ages(builder).values()) == 30
  assert datasets.get_builder("utkface", str(data_dir), "tiny").info.metadata["source"]["path"] == str(second)


# --- CSV datasets: named, side by side, refused when the source differs ----------------------------


def _csv_folder(root: Path, ages: dict[str, list[int]], seed: int) -> Path:
  """A manual folder with one image per age and train / validation CSV files; returns it."""
  rng = np.random.default_rng(seed)
  (root / "images").mkdir(parents=True)
  for split, split_ages in ages.items():
    with open(root / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["file_name", "age"])
      for i, age in enumerate(split_ages):
        (root / "images" / f"{split}{i}.jpg").write_bytes(_jpeg(rng, 24))
        writer.writerow([f"{split}{i}.jpg", age])
  return root


APPA = {"train": [20, 31, 42, 53], "validation": [25, 35]}
MORPH = {"train": [60, 61, 62], "validation": [70]}


def _csv_ages(builder) -> dict[str, list[int]]:
  return {split: sorted(ages.values()) for split, ages in _ages(builder).items()}


@pytest.mark.slow
def test_named_csv_datasets_live_side_by_side_and_train_on_them(tmp_path):
  appa, morph = _csv_folder(tmp_path / "appa", APPA, 0), _csv_folder(tmp_path / "morph", MORPH, 1)
  data_dir = str(tmp_path / "tfds")
  datasets.prepare("csv_faces", data_dir, str(appa), "appa")
  datasets.prepare("csv_faces", data_dir, str(morph), "morph")
  datasets.prepare("csv_faces", data_dir, str(morph))  # unnamed: the default config, as before
  for name, ages in (("appa", APPA), ("morph", MORPH), ("", MORPH)):
    builder = datasets.get_builder("csv_faces", data_dir, name)
    assert builder.info.full_name == f"agejax_csv_faces/{name or 'default'}/3.0.0"
    assert builder.info.features["image"].shape == (224, 224, 3)
    assert _csv_ages(builder) == ages
  # The trainer selects one with --config.data.builder_config=NAME.
  data = ml_collections.ConfigDict(
    {"name": "csv_faces", "data_dir": data_dir, "builder_config": "appa", "cache_dir": str(tmp_path / "arrays")}
  )
  assert sorted(pipeline.load_split(data_settings(data), "train").age.tolist()) == APPA["train"]

  with pytest.raises(
    ValueError,
    match=r"^builder config 'APPA' of csv_faces is not one of \['default', 'tiny'\]; "
    r"a name of your own is 1-64 lowercase letters, digits, '_' or '-'$",
  ):
    datasets.get_builder("csv_faces", data_dir, "APPA")
  with pytest.raises(
    ValueError,
    match=r"^builder config 'appa' of utkface is not one of \['default', 'tiny'\]; "
    r"only csv_faces takes names of your own$",
  ):
    datasets.get_builder("utkface", data_dir, "appa")


@pytest.mark.parametrize("name", ["", "appa"])
def test_a_name_prepared_from_another_folder_is_refused(tmp_path, name):
  appa, morph = _csv_folder(tmp_path / "appa", APPA, 0), _csv_folder(tmp_path / "morph", MORPH, 1)
  data_dir = tmp_path / "tfds"
  datasets.prepare("csv_faces", str(data_dir), str(appa), name)
  before = _snapshot(data_dir / "agejax_csv_faces")
  with pytest.raises(ValueError) as error:
    datasets.prepare("csv_faces", str(data_dir), str(morph), name)
  assert str(error.value) == (
    f"agejax_csv_faces/{name or 'default'}/3.0.0 in {data_dir} was prepared from {appa}, not from {morph} "
    f"(different: images, train.csv, validation.csv): pass --rebuild to delete it and prepare it again, or "
    f"--name NAME to prepare it as another dataset"
  )
  assert _snapshot(data_dir / "agejax_csv_faces") == before
  assert _csv_ages(datasets.get_builder("csv_faces", str(data_dir), name)) == APPA


def test_a_changed_folder_is_refused_until_rebuilt(tmp_path):
  appa = _csv_folder(tmp_path / "appa", APPA, 0)
  data_dir = tmp_path / "tfds"
  first = datasets.prepare("csv_faces", str(data_dir), str(appa), "tiny").info.metadata["source"]
  prepared = data_dir / "agejax_csv_faces"
  before = _snapshot(prepared)
  train_csv = appa / "train.csv"
  original = train_csv.read_bytes()
  train_csv.write_bytes(original.replace(b"train0.jpg,20", b"train0.jpg,21"))  # a fixed age
  refusal = (
    f"agejax_csv_faces/tiny/3.0.0 in {data_dir} was prepared from {appa}, which has changed since "
    f"(different: {{}}): pass --rebuild to delete it and prepare it again, or --name NAME to prepare it "
    f"as another dataset"
  )
  with pytest.raises(ValueError) as error:
    datasets.prepare("csv_faces", str(data_dir), str(appa), "tiny")
  assert str(error.value) == refusal.format("train.csv")

  train_csv.write_bytes(original)  # the same bytes again: the same source
  datasets.prepare("csv_faces", str(data_dir), str(appa), "tiny")
  copy = tmp_path / "copy"
  shutil.copytree(appa, copy)  # copy2 keeps sizes and times: a copy is the same source too
  datasets.prepare("csv_faces", str(data_dir), str(copy), "tiny")
  assert _snapshot(prepared) == before

  (appa / "images" / "validation1.jpg").write_bytes(_jpeg(np.random.default_rng(9), 24))  # a replaced image
  with pytest.raises(ValueError) as error:
    datasets.prepare("csv_faces", str(data_dir), str(appa), "tiny")
  assert str(error.value) == refusal.format("images")
  assert _snapshot(prepared) == before

  train_csv.write_bytes(original.replace(b"train0.jpg,20", b"train0.jpg,21"))
  rebuilt = datasets.prepare("csv_faces", str(data_dir), str(appa), "tiny", rebuild=True)
  assert _csv_ages(rebuilt)["train"] == [21, 31, 42, 53]
  assert rebuilt.info.metadata["source"]["digest"] != first["digest"]
  assert _csv_ages(datasets.get_builder("csv_faces", str(data_dir), "tiny"))["train"] == [21, 31, 42, 53]


def _script(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_prepare_data_script_refuses_then_rebuilds(tmp_path):
  appa, morph = _csv_folder(tmp_path / "appa", APPA, 0), _csv_folder(tmp_path / "morph", MORPH, 1)
  data_dir = tmp_path / "tfds"
  datasets.prepare("csv_faces", str(data_dir), str(appa), "appa")
  before = _snapshot(data_dir)
  args = ["csv_faces", "--name", "appa", "--manual_dir", str(morph), "--data_dir", str(data_dir)]

  refused = _script(*args)
  assert refused.returncode == 1 and refused.stdout == ""
  assert refused.stderr.splitlines()[-1] == (
    f"error: agejax_csv_faces/appa/3.0.0 in {data_dir} was prepared from {appa}, not from {morph} (different: "
    f"images, train.csv, validation.csv): pass --rebuild to delete it and prepare it again, or --name NAME to "
    f"prepare it as another dataset"
  )
  assert _snapshot(data_dir) == before

  rebuilt = _script(*args, "--rebuild")
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  report = rebuilt.stdout[rebuilt.stdout.index("csv_faces --name") :]  # after TFDS's own progress lines
  assert report.splitlines()[:4] == [
    f"csv_faces --name appa prepared in {data_dir}/agejax_csv_faces/appa/3.0.0",
    f"  from         {morph}",
    "  train               3 examples",
    "  validation          1 examples",
  ]
  again = _script(*args)
  assert again.returncode == 0 and again.stdout.splitlines()[:2] == [
    f"csv_faces --name appa was already prepared in {data_dir}/agejax_csv_faces/appa/3.0.0",
    f"  from         {morph} (unchanged)",
  ]
