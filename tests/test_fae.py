"""The unified benchmark's databases as the fae dataset: crops, fields, folders, integrity, training on a split."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fae_fixtures import make_fae_database, prepare_fae
from PIL import Image

from agejax import errors, settings
from agejax.data import datasets, faces, fae, pipeline

ROOT = Path(__file__).resolve().parents[1]


def _pattern(h: int, w: int) -> np.ndarray:
  """An image whose every pixel differs from its neighbours: a misplaced sample shows."""
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([(xx * 7 + yy * 3) % 256, (xx * xx + 5 * yy) % 256, (13 * xx * yy + 11) % 256], -1).astype(np.uint8)


def _padded_slice(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
  """image[top:top + size, left:left + size] with black where that window leaves the image."""
  out = np.zeros((size, size, 3), np.uint8)
  h, w = image.shape[:2]
  y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + size, h), min(left + size, w)
  out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
  return out


@pytest.mark.parametrize("top, left", [(10, 12), (-7, 30), (25, -9)])
def test_an_upright_box_at_one_pixel_per_pixel_crops_its_extended_window(top, left):
  # A 40-pixel box extended by 5% per side spans 44 pixels: onto a 45-pixel crop, one source pixel per pixel.
  image = _pattern(60, 70)
  a = (left + 2 + 1, top + 2 + 1)  # one-based corner A of the box; the extension starts 2 pixels before it
  box = [a[0], a[1], a[0] + 40, a[1], a[0] + 40, a[1] + 40, a[0], a[1] + 40]
  np.testing.assert_array_equal(fae.crop_face(image, box, 45), _padded_slice(image, top, left, 45))


def test_a_box_turned_a_quarter_turns_the_crop_and_a_half_size_crop_takes_every_other_pixel():
  image = _pattern(80, 90)
  # Corners listed from the bottom left, counter-clockwise: the face's "up" is the image's left.
  x0, y0 = 20 + 1, 15 + 1
  turned = [x0, y0 + 40, x0, y0, x0 + 40, y0, x0 + 40, y0 + 40]
  window = _padded_slice(image, 15 - 2, 20 - 2, 45)
  np.testing.assert_array_equal(fae.crop_face(image, turned, 45), np.rot90(window, k=-1))
  # 44 extended pixels onto 23: exactly 2 source pixels per output pixel, so bilinear picks pixels.
  np.testing.assert_array_equal(
    fae.crop_face(image, [x0, y0, x0 + 40, y0, x0 + 40, y0 + 40, x0, y0 + 40], 23), window[::2, ::2]
  )


@pytest.mark.parametrize(
  "box, digest",
  [
    # cv2.warpAffine of OpenCV 4.7.0.72 (the benchmark's pin) through their crop_image, 29x29 input -> 31 px.
    ([-5, 9, 50, -3, 62, 52, 7, 64], "4a7edcb8ae942f0852d7f901ca88a6f018e272cc558ceaf8b048ead0d934f502"),
    ([10, 12, 40, 12, 40, 42, 10, 42], "3b2c309abfcd895d3cc69b7254e7185e4844bd399e3bfef4c3d499251de458a2"),
  ],
)
def test_a_tilted_box_crops_bit_for_bit_as_the_benchmarks_opencv(box, digest):
  crop = fae.crop_face(_pattern(57, 71), box, 31)
  assert hashlib.sha256(crop.tobytes()).hexdigest() == digest


def test_the_default_crop_is_the_benchmarks_stored_size():
  assert fae.DEFAULT_IMAGE_SIZE == 281 and fae.MARGIN == 0.05


def _records(builder, split: str) -> list[dict]:
  import tensorflow_datasets as tfds

  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


@pytest.fixture(scope="module")
def clap(tmp_path_factory):
  """A CLAP2016_aligned-like database (folders 0-2, std_age, aligned_bbox) prepared as 'clap2016_aligned'."""
  root = tmp_path_factory.mktemp("clap")
  json_path, images = make_fae_database(root, "clap2016_aligned", subjects_per_folder=3, images_per_subject=1)
  builder = prepare_fae(json_path, images, root / "tfds", "clap2016_aligned", image_size=36)
  return json_path, images, builder


def test_an_aligned_database_stores_each_face_cropped_at_its_box(clap):
  json_path, images, builder = clap
  entries = {e["img_path"]: e for e in json.loads(json_path.read_text())}
  assert sorted(builder.info.splits) == ["folder0", "folder1", "folder2"]
  metadata = builder.info.metadata
  assert metadata["folders"] == {"0": 3, "1": 3, "2": 3} and metadata["image_size"] == 36
  assert not metadata["has_subjects"] and metadata["boxes"] and metadata["skipped"] == {}
  assert builder.group_names() == {}  # CLAP2016 records no gender
  for split in builder.info.splits:
    for record in _records(builder, split):
      entry = entries[record["img_path"].decode()]
      assert split == f"folder{entry['folder']}" == f"folder{record['folder']}"
      assert record["age"] == entry["age"] and record["subject"] == b"" and record["gender"] == 2  # unknown
      assert record["age_std"] == np.float32(entry["std_age"])
      decoded = np.asarray(Image.open(images / entry["img_path"]).convert("RGB"))
      np.testing.assert_array_equal(record["image"], fae.crop_face(decoded, entry["aligned_bbox"], 36))


def test_a_database_without_boxes_keeps_names_genders_and_whole_images(fae_agedb):
  builder, json_path, images = fae_agedb["builder"], fae_agedb["json"], fae_agedb["images"]
  entries = {e["img_path"]: e for e in json.loads(json_path.read_text())}
  assert sorted(builder.info.splits, key=lambda s: int(s[6:])) == [f"folder{f}" for f in range(10)]
  metadata = builder.info.metadata
  assert metadata["has_subjects"] and metadata["subjects"] == 20 and not metadata["boxes"]
  assert metadata["folders"] == {str(f): 4 for f in range(10)}
  assert builder.group_names() == {"gender": ("male", "female", "unknown")}
  records = _records(builder, "folder3")
  assert len(records) == 4
  for record in records:
    entry = entries[record["img_path"].decode()]
    assert record["subject"].decode() == entry["name"] and record["folder"] == entry["folder"] == 3
    assert record["gender"] == {"M": 0, "F": 1}[entry["gender"]] and record["age_std"] == 0
    np.testing.assert_array_equal(record["image"], faces.load_rgb(images / entry["img_path"], 32))


@pytest.mark.slow
def test_every_split_takes_the_folders_it_names(fae_agedb, tmp_path):
  data = settings.DataSettings(
    name="fae", data_dir=fae_agedb["data_dir"], builder_config="agedb", cache_dir=fae_agedb["cache_dir"]
  )
  builder = fae_agedb["builder"]
  by_folder = {f: _records(builder, f"folder{f}") for f in range(10)}
  for k, (train, validation, test) in enumerate(
    [(range(0, 6), (6, 7), (8, 9)), ((2, 3, 4, 5, 6, 7), (8, 9), (0, 1)), (range(4, 10), (0, 1), (2, 3))]
    + [((5, 6, 7, 8, 9, 0), (1, 2), (3, 4)), ((6, 7, 8, 9, 0, 1), (2, 3), (4, 5))]
  ):
    for part, folders in (("train", train), ("validation", validation), ("test", test)):
      arrays = pipeline.load_split(dataclasses.replace(data, split=k), part)
      expected = [r for f in folders for r in by_folder[f]]
      assert len(arrays) == len(expected) == 4 * len(folders)
      np.testing.assert_array_equal(arrays.age, [r["age"] for r in expected])
      np.testing.assert_array_equal(arrays.gather(np.arange(len(arrays)))["image"], [r["image"] for r in expected])
  # One array cache per folder, shared by the five splits.
  caches = sorted(p.name.split("-")[0] for p in (Path(data.cache_dir) / builder.info.full_name).iterdir() if p.is_dir())
  assert caches == sorted(f"folder{f}" for f in range(10))
  spec = dataclasses.replace(data, split="train:0-3,val:4,test:9,8")
  assert [len(pipeline.load_split(spec, part)) for part in ("train", "validation", "test")] == [16, 4, 8]
  with pytest.raises(errors.UserError, match=r"^config.data.split='train:0-3,val:4,test:10': folder 10 is not in"):
    pipeline.load_split(dataclasses.replace(data, split="train:0-3,val:4,test:10"), "test")
  with pytest.raises(errors.UserError, match=r"^config.data split 'train' is not in fae: .*config.data.split"):
    pipeline.load_split(data, "train")  # no data.split: the folders are the only splits


def _edited(tmp_path: Path, json_path: Path, images: Path, edit) -> tuple[Path, Path]:
  """A copy of a database whose JSON entries `edit(entries)` changed."""
  copy = tmp_path / "db"
  shutil.copytree(json_path.parent, copy)
  entries = json.loads((copy / json_path.name).read_text())
  edit(entries)
  (copy / json_path.name).write_text(json.dumps(entries, indent=4))
  return copy / json_path.name, copy / images.name


def test_a_subject_in_two_folders_is_refused_in_one_line(fae_agedb, tmp_path):
  def move_one(entries):
    first = next(e for e in entries if e["name"] == entries[0]["name"] and e is not entries[0])
    first["folder"] = (entries[0]["folder"] + 1) % 10

  json_path, images = _edited(tmp_path, fae_agedb["json"], fae_agedb["images"], move_one)
  entries = json.loads(json_path.read_text())
  same = [e for e in entries if e["name"] == entries[0]["name"]]
  with pytest.raises(errors.UserError) as e:
    prepare_fae(json_path, images, tmp_path / "tfds", "moved")
  message = str(e.value)
  assert "\n" not in message and f"subject {entries[0]['name']!r} is in folders" in message
  assert all(f"{s['img_path']} in folder {s['folder']}" in message for s in same) and "subject-exclusive" in message
  assert "--shared_subjects FOLDERS (e.g. 0,1)" in message  # the way to prepare a database that shares on purpose
  assert not (tmp_path / "tfds" / "agejax_fae" / "moved" / "1.0.0").exists()


def _prepare_data(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  command = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *args]
  return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _folders_of_subjects(json_path: Path) -> dict[str, list[int]]:
  """Each person's folders, from the JSON as written."""
  folders: dict[str, set[int]] = {}
  for e in json.loads(json_path.read_text()):
    folders.setdefault(e["name"], set()).add(e["folder"])
  return {name: sorted(f) for name, f in folders.items()}


@pytest.fixture(scope="module")
def fp_age(tmp_path_factory):
  """An IMDB-CLEAN-FP-AGE-like database: 3 people in both folders 0 and 1, 3 others in folder 2, 2 photos each."""
  root = tmp_path_factory.mktemp("fp_age")
  json_path, images = make_fae_database(
    root, "imdb_fp_age_aligned", subjects_per_folder=3, images_per_subject=2, shared_folders=(0, 1)
  )
  return json_path, images


@pytest.mark.slow
def test_a_database_whose_training_and_validation_folders_share_people_prepares_with_shared_subjects(fp_age, tmp_path):
  json_path, images = fp_age
  subjects = _folders_of_subjects(json_path)
  shared = {name: f for name, f in subjects.items() if len(f) > 1}
  assert len(shared) == 3 and set(map(tuple, shared.values())) == {(0, 1)}  # the generated layout, as FP-AGE's
  data_dir = tmp_path / "tfds"
  with pytest.raises(errors.UserError) as e:  # without the flag: refused, naming the flag
    prepare_fae(json_path, images, data_dir, "imdb")
  assert "\n" not in str(e.value) and "subject-exclusive" in str(e.value) and "--shared_subjects" in str(e.value)

  flags = [f"--database={json_path}", f"--images={images}", f"--data_dir={data_dir}", "--image_size=24"]
  out = _prepare_data("fae", "--name=imdb", "--shared_subjects=0,1", *flags)
  assert out.returncode == 0, out.stderr[-2000:]
  example = min(shared)
  said = [line for line in out.stdout.splitlines() if "subject" in line and "folders 0,1" in line]
  assert said == [
    f"IMDB-CLEAN-FP-AGE_aligned.json: 3 subjects are in more than one of folders 0,1 (e.g. {example!r} in 0 and 1): "
    f"prepared as given; these folders are not subject-exclusive"
  ], out.stdout
  assert "  split 0      train       6  validation       6  test       6   (--config.data.split=0)" in out.stdout
  metadata = datasets.get_builder("fae", str(data_dir), "imdb").info.metadata
  assert metadata["shared_subjects"] == [0, 1] and metadata["shared_subject_count"] == 3
  assert metadata["subjects"] == len(subjects) == 6

  # The flag is part of the source: the same value keeps the dataset, another one is refused as another source.
  again = _prepare_data("fae", "--name=imdb", "--shared_subjects=1,0", *flags)
  assert again.returncode == 0 and "was already prepared" in again.stdout, again.stderr[-2000:]
  other = _prepare_data("fae", "--name=imdb", "--shared_subjects=all", *flags)
  assert other.returncode == 1
  [line] = other.stderr.strip().splitlines()
  assert line.startswith("error: ") and "(different: shared_subjects): pass --rebuild" in line
  without = _prepare_data("fae", "--name=imdb", *flags)
  assert without.returncode == 1 and "--shared_subjects" in without.stderr.strip().splitlines()[-1]


def test_a_subject_shared_with_a_folder_outside_shared_subjects_is_still_refused(fp_age, tmp_path):
  json_path, images = fp_age
  entries = json.loads(json_path.read_text())
  person = next(e["name"] for e in entries if e["folder"] == 2)

  def into_validation(es):  # one photo of a test person moved into folder 1: test is no longer subject-exclusive
    next(e for e in es if e["name"] == person).update(folder=1)

  edited, edited_images = _edited(tmp_path, json_path, images, into_validation)
  with pytest.raises(errors.UserError) as e:
    prepare_fae(edited, edited_images, tmp_path / "tfds", "imdb", shared_subjects="0,1")
  message = str(e.value)
  assert "\n" not in message and f"subject {person!r} is in folders [1, 2]" in message
  assert "--shared_subjects 0,1 lets only folders 0,1 share subjects" in message
  assert not (tmp_path / "tfds" / "agejax_fae" / "imdb" / "1.0.0").exists()
  # "all" allows it; the subjects counted are every one in two folders.
  builder = prepare_fae(edited, edited_images, tmp_path / "tfds", "imdb", shared_subjects="all")
  assert builder.info.metadata["shared_subjects"] == [0, 1, 2] and builder.info.metadata["shared_subject_count"] == 4


@pytest.mark.parametrize(
  "text, expected",
  [("", ()), ("0,1", (0, 1)), (" 1, 0 ", (0, 1)), ("ALL", "all"), ("0", None), ("0,0", None), ("0-1", None)],
)
def test_shared_subjects_reads_folder_lists_and_all_and_refuses_the_rest_in_one_line(text, expected):
  if expected is not None:
    assert fae.parse_shared_subjects(text) == expected
  else:
    with pytest.raises(errors.UserError, match=rf"^--shared_subjects={text!r}: "):
      fae.parse_shared_subjects(text)


def test_shared_subjects_is_for_fae_only(tmp_path):
  with pytest.raises(errors.UserError, match=r"^--shared_subjects='0,1' is for fae databases only, not demo$"):
    datasets.prepare("demo", str(tmp_path / "tfds"), builder_config="tiny", shared_subjects="0,1")
  assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda es: es[3].pop("age"), r"AgeDB.json entry 3: field 'age' is missing"),
    (lambda es: es[5].update(folder="x"), r"AgeDB.json entry 5 \(AgeDB/.*\): field 'folder' is 'x', not an integer"),
    (lambda es: es[2].update(age=23.5), r"AgeDB.json entry 2 \(.*\): field 'age' is 23.5, not an integer"),
    (lambda es: es[1].update(gender="X"), r"AgeDB.json entry 1 \(.*\): field 'gender' is 'X', not 'M', 'F' or 'U'"),
    (lambda es: es[4].update(std_age=-1), r"AgeDB.json entry 4 \(.*\): field 'std_age' is -1, not a number >= 0"),
    (
      lambda es: es[0].update(aligned_bbox=[1, 2, 3, 4, 5, 6]),
      r"AgeDB.json entry 0 \(.*\): field 'aligned_bbox' must be 8 numbers",
    ),
    (lambda es: es[6].update(img_path=7), r"AgeDB.json entry 6: field 'img_path' is 7, not a path"),
    (lambda es: es.__setitem__(7, "a.jpg"), r"AgeDB.json entry 7: an entry is an object"),
  ],
)
def test_a_malformed_entry_fails_naming_its_index_and_field(fae_agedb, tmp_path, edit, message):
  json_path, images = _edited(tmp_path, fae_agedb["json"], fae_agedb["images"], edit)
  with pytest.raises(errors.UserError, match=f"^{message}") as e:
    prepare_fae(json_path, images, tmp_path / "tfds", "broken")
  assert "\n" not in str(e.value)


def test_a_file_that_is_not_a_database_fails_in_one_line(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  (tmp_path / "a.json").write_text('[{"img_path": "a.jpg",')
  with pytest.raises(errors.UserError, match=r"a.json line 1 column 23: not valid JSON"):
    prepare_fae(tmp_path / "a.json", images, tmp_path / "tfds", "a")
  (tmp_path / "a.json").write_text('{"img_path": "a.jpg"}')
  with pytest.raises(errors.UserError, match=r"a.json: a database JSON is a list of entries, one per face"):
    prepare_fae(tmp_path / "a.json", images, tmp_path / "tfds", "a")
  with pytest.raises(errors.MissingInput, match=r"the database JSON .*b.json does not exist"):
    prepare_fae(tmp_path / "b.json", images, tmp_path / "tfds", "a")
  with pytest.raises(errors.MissingInput, match=r"fae needs .*--database FILE.json --images DIR"):
    datasets.prepare("fae", str(tmp_path / "tfds"), str(images), "a")


def test_missing_corrupt_unlabelled_and_boxless_faces_are_skipped_and_counted(tmp_path):
  json_path, images = make_fae_database(tmp_path, "morph_aligned", subjects_per_folder=1)
  entries = json.loads(json_path.read_text())
  by_folder = {f: [e for e in entries if e["folder"] == f] for f in range(10)}
  (images / by_folder[0][0]["img_path"]).unlink()  # missing
  corrupt = images / by_folder[1][0]["img_path"]
  corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])  # a JPEG cut halfway
  by_folder[2][0]["age"] = -1  # the benchmark's unknown age
  by_folder[3][0]["aligned_bbox"] = []  # no face found, as one entry of the real CLAP2016_aligned.json
  by_folder[4][0]["folder"] = -1  # in no folder
  json_path.write_text(json.dumps(entries, indent=4))
  builder = prepare_fae(json_path, images, tmp_path / "tfds", "morph")
  metadata = builder.info.metadata
  assert metadata["skipped"] == {
    "corrupt image": 1,
    "missing file": 1,
    "no face box": 1,
    "no folder (-1)": 1,
    "unknown age (-1)": 1,
  }
  assert metadata["skipped_examples"]["missing file"] == [by_folder[0][0]["img_path"]]
  counts = {int(f): n for f, n in metadata["folders"].items()}
  assert counts == {f: 1 if f < 5 else 2 for f in range(10)}
  assert {f: builder.info.splits[f"folder{f}"].num_examples for f in range(10)} == counts


def test_preparing_again_from_an_edited_database_is_refused(clap, tmp_path):
  json_path, images, builder = clap
  again = prepare_fae(json_path, images, Path(builder.data_dir_root), "clap2016_aligned", image_size=36)
  assert again.info.metadata["source"]["digest"] == builder.info.metadata["source"]["digest"]  # kept, unchanged
  edited, edited_images = _edited(tmp_path, json_path, images, lambda es: es[0].update(age=es[0]["age"] + 1))
  with pytest.raises(
    errors.UserError, match=r"was prepared from .*, not from .*\(different: database\): pass --rebuild"
  ):
    prepare_fae(edited, edited_images, Path(builder.data_dir_root), "clap2016_aligned", image_size=36)
  with pytest.raises(errors.UserError, match=r"was prepared at --image_size 36, not 40: pass --rebuild"):
    prepare_fae(json_path, images, Path(builder.data_dir_root), "clap2016_aligned", image_size=40)


@pytest.mark.slow
def test_prepare_data_fae_names_the_dataset_after_the_json_and_prints_each_split(tmp_path):
  json_path, images = make_fae_database(tmp_path, "agedb", subjects_per_folder=1, images_per_subject=1)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  command = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "fae", f"--database={json_path}"]
  command += [f"--images={images}", f"--data_dir={tmp_path / 'tfds'}", "--image_size=24"]
  out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert any(line.startswith("fae --name agedb prepared in ") for line in lines), out.stdout
  assert "  folder0             1 examples" in lines
  for k in range(5):
    assert f"  split {k}      train       6  validation       2  test       2   (--config.data.split={k})" in lines
  assert lines[-1] == "  skipped             0 files"
  assert fae.config_name("FG-Net_aligned.json") == "fg-net_aligned" and fae.config_name("Ä.json") == "fae"


@pytest.mark.slow
def test_a_tiny_run_trains_and_evaluates_on_benchmark_split_0_and_refuses_another_split_on_resume(
  fae_agedb,
  tiny_config,
  tmp_path,
):
  from agejax.training import train

  config = tiny_config
  config.data.name, config.data.builder_config, config.data.split = "fae", fae_agedb["name"], "0"
  config.data.data_dir, config.data.cache_dir = fae_agedb["data_dir"], fae_agedb["cache_dir"]
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps, config.log_every_steps = (
    20,
    20,
    20,
    10,
  )
  config.batch_size = 8
  final = train.train_and_evaluate(config, tmp_path / "run")
  assert final["step"] == 20 and np.isfinite(final["eval_mae"])
  recorded = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
  assert recorded["eval_mae"] == final["eval_mae"]
  config.data.split = "1"
  config.num_train_steps = 40
  with pytest.raises(errors.UserError, match=r"^config.data.split='1' differs from data.split='0' in .*config.json"):
    train.train_and_evaluate(config, tmp_path / "run")


def test_an_extra_evaluation_of_another_dataset_ignores_data_split_and_of_the_same_keeps_it(fae_agedb, tiny_config):
  from agejax.training import configuration, train

  config = tiny_config
  demo_dir = config.data.data_dir
  config.data.update(name="fae", builder_config="agedb", data_dir=fae_agedb["data_dir"], split="0")
  config.data.cache_dir = fae_agedb["cache_dir"]
  cfg = configuration.validate(config)
  demo = settings.ExtraEval(name="demo", dataset="demo", builder_config="tiny", data_dir=demo_dir, split="test")
  assert len(train.extra_eval_data(cfg, demo)) == 50  # the demo's own test split: it has no folders
  same = settings.ExtraEval(name="again", dataset="fae", builder_config="agedb", split="test")
  test_part = pipeline.load_split(cfg.data, "test")  # split 0's test part: folders 8-9
  np.testing.assert_array_equal(train.extra_eval_data(cfg, same).age, test_part.age)
