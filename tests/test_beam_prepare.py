"""A fae database prepared on Apache Beam (DirectRunner) to ArrayRecord: the one-process examples, bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fae_fixtures import make_fae_database, prepare_fae

from agejax import errors

ROOT = Path(__file__).resolve().parents[1]
# Two worker processes: the entries, the DoFns and TFDS's encoder are pickled to them, as on a cluster.
WORKERS = "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"
IN_PROCESS = "runner=DirectRunner,direct_num_workers=2"  # threads: faster, for the failure tests


def _raw_records(builder, split: str) -> list[bytes]:
  """The stored examples of a split, read from its files (TFRecord or ArrayRecord), each in canonical bytes.

  Canonical: TFDS serializes a tf.train.Example's feature map in an order that changes from process to process
  (two one-process preparations differ there too), so each record is re-serialized deterministically; every
  feature's stored bytes (the PNG's included) are compared as written.
  """
  import tensorflow as tf

  files = sorted(Path(builder.data_dir).glob(f"{builder.name}-{split}.*"))
  assert files, f"no files of {split} in {builder.data_dir}"
  if str(builder.info.file_format.value) == "array_record":
    from array_record.python import array_record_module

    records = []
    for file in files:
      reader = array_record_module.ArrayRecordReader(str(file))
      records += reader.read_all()
      reader.close()
  else:
    records = [r.numpy() for r in tf.data.TFRecordDataset([str(f) for f in files])]
  return [tf.train.Example.FromString(r).SerializeToString(deterministic=True) for r in records]


def _by_img_path(builder, split: str) -> dict[str, dict]:
  """The decoded examples of a split, keyed by img_path."""
  import tensorflow_datasets as tfds

  if str(builder.info.file_format.value) == "array_record":
    source = builder.as_data_source(split=split)
    records = [source[i] for i in range(len(source))]
  else:
    records = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
  return {r["img_path"].decode(): r for r in records}


@pytest.fixture(scope="module")
def imdb_files(tmp_path_factory):
  """An IMDB-CLEAN-FP-AGE_aligned-like database (3 subject-exclusive folders x 4 people x 3 faces, boxes, names,
  genders) with a corrupt, a missing and an unlabelled face: the JSON and images, not prepared."""
  root = tmp_path_factory.mktemp("imdb")
  json_path, images = make_fae_database(root, "imdb_fp_age_aligned", subjects_per_folder=4, images_per_subject=3)
  entries = json.loads(json_path.read_text())
  in_folder = {f: [e for e in entries if e["folder"] == f] for f in range(3)}
  corrupt = images / in_folder[1][0]["img_path"]
  corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])  # a JPEG cut halfway
  (images / in_folder[2][0]["img_path"]).unlink()
  in_folder[0][0]["age"] = -1
  json_path.write_text(json.dumps(entries, indent=4))
  return {"root": root, "json": json_path, "images": images, "corrupt": in_folder[1][0]["img_path"]}


@pytest.fixture(scope="module")
def imdb(imdb_files):
  """That database prepared by both paths: one process (TFRecord) and the DirectRunner's 2 worker processes
  (ArrayRecord). Three folders: Beam's graph grows with each."""
  json_path, images, root = imdb_files["json"], imdb_files["images"], imdb_files["root"]
  one = prepare_fae(json_path, images, root / "one", "imdb")
  beam = prepare_fae(json_path, images, root / "beam", "imdb", beam_options=WORKERS)
  return {**imdb_files, "one": one, "beam": beam}


@pytest.mark.slow  # a Beam pipeline and the one-process path: ~20-60 s on 2 busy cores
def test_beam_writes_array_record_shards_holding_the_one_process_examples_bit_for_bit(imdb):
  one, beam = imdb["one"], imdb["beam"]
  assert str(one.info.file_format.value) == "tfrecord" and str(beam.info.file_format.value) == "array_record"
  assert sorted(Path(beam.data_dir).glob("*.array_record-*")), "no ArrayRecord shards written"
  assert sorted(beam.info.splits) == sorted(one.info.splits) == ["folder0", "folder1", "folder2"]
  for split in one.info.splits:
    assert beam.info.splits[split].num_examples == one.info.splits[split].num_examples
    assert sorted(_raw_records(beam, split)) == sorted(_raw_records(one, split)), split  # the same stored bytes
    ours, theirs = _by_img_path(beam, split), _by_img_path(one, split)
    assert ours.keys() == theirs.keys()
    for img_path, record in ours.items():
      assert record.keys() == theirs[img_path].keys()
      for feature, value in record.items():
        np.testing.assert_array_equal(value, theirs[img_path][feature], err_msg=f"{img_path} {feature}")


@pytest.mark.slow  # a Beam pipeline and the one-process path: ~20-60 s on 2 busy cores
def test_beam_records_the_same_metadata_skips_from_its_metrics(imdb):
  one, beam = imdb["one"].info.metadata, imdb["beam"].info.metadata
  assert beam == one  # source fingerprint, folders' kept counts, skips and their examples, subjects
  assert beam["skipped"] == {"corrupt image": 1, "missing file": 1, "unknown age (-1)": 1}
  assert beam["skipped_by_split"]["folder1"] == {"corrupt image": 1}
  assert beam["skipped_examples"]["corrupt image"] == [imdb["corrupt"]]
  assert beam["folders"] == {"0": 11, "1": 11, "2": 11} and beam["subjects"] == 12


@pytest.mark.slow  # a Beam pipeline on the generated database: ~10 s, ~60 s with its fixture
def test_a_subject_in_two_folders_fails_in_the_pipeline_in_one_line(imdb, tmp_path):
  entries = json.loads(imdb["json"].read_text())
  moved = next(e for e in entries if e["name"] == entries[0]["name"] and e is not entries[0])
  moved["folder"] = (entries[0]["folder"] + 1) % 3
  json_path = tmp_path / "IMDB-CLEAN-FP-AGE_aligned.json"
  json_path.write_text(json.dumps(entries, indent=4))
  same = [e for e in entries if e["name"] == entries[0]["name"]]
  with pytest.raises(errors.UserError) as raised:
    prepare_fae(json_path, imdb["images"], tmp_path / "tfds", "moved", beam_options=IN_PROCESS)
  message = str(raised.value)
  folders = sorted(e["folder"] for e in same)
  name = entries[0]["name"]
  assert "\n" not in message and message.startswith(f"IMDB-CLEAN-FP-AGE_aligned.json: subject '{name}' is in")
  assert f" is in folders {sorted(set(folders))} (" in message
  assert message.endswith("prepares a database whose folders share subjects on purpose")
  first = {}  # each folder's first img_path of the subject, as read_database names them
  for e in same:
    first.setdefault(e["folder"], e["img_path"])
  assert all(f"{path} in folder {f}" in message for f, path in first.items())
  assert not (tmp_path / "tfds" / "agejax_fae" / "moved" / "1.0.0").exists()


def test_a_malformed_entry_fails_naming_it_before_the_pipeline_starts(imdb_files, tmp_path):
  entries = json.loads(imdb_files["json"].read_text())
  entries[5]["folder"] = "x"
  json_path = tmp_path / "IMDB-CLEAN-FP-AGE_aligned.json"
  json_path.write_text(json.dumps(entries, indent=4))
  with pytest.raises(
    errors.UserError, match=r"^IMDB-CLEAN-FP-AGE_aligned.json entry 5 \(IMDB_WIKI/.*\): field 'folder' is"
  ):
    prepare_fae(json_path, imdb_files["images"], tmp_path / "tfds", "broken", beam_options=IN_PROCESS)


def test_a_user_error_raised_in_a_worker_comes_back_as_its_one_line():
  from agejax.data import fae_beam  # apache_beam: 2 s to import, here and not at every worker's collection

  wrapped = RuntimeError(
    "Traceback (most recent call last):\n  File ...\nagejax.errors.UserError: a.json entry 3: bad "
    "[while running 'folder0/Decode']\n\nDuring handling ...\nRuntimeError: ..."
  )
  error = fae_beam.unwrap_error(wrapped)
  assert type(error) is errors.UserError and str(error) == "a.json entry 3: bad"
  assert str(fae_beam.unwrap_error(errors.MissingInput("gone [while running 'x']"))) == "gone"
  assert fae_beam.unwrap_error(RuntimeError("ValueError: not ours")) is None
  assert fae_beam.parse_options("runner=DirectRunner, direct_num_workers=2") == {
    "runner": "DirectRunner",
    "direct_num_workers": "2",
  }
  with pytest.raises(errors.UserError, match=r"^--beam_options='runner': 'runner' is not OPTION=VALUE"):
    fae_beam.parse_options("runner")


@pytest.mark.slow  # a Beam pipeline and the one-process path: ~20-60 s on 2 busy cores
def test_prepare_data_on_beam_prints_the_counted_skips(imdb, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  command = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "fae", f"--database={imdb['json']}"]
  command += [f"--images={imdb['images']}", f"--data_dir={tmp_path}", "--image_size=32", "--name=imdb"]
  out = subprocess.run(command + [f"--beam_options={IN_PROCESS}"], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert "  folder1            11 examples" in lines
  assert f"           1  corrupt image  (e.g. {imdb['corrupt']})" in lines
  assert "  skipped             3 files:" in lines
  assert sorted(p.name for p in (tmp_path / "agejax_fae" / "imdb" / "1.0.0").glob("*folder1.array_record-*"))
