"""The benchmark's train / validation / test parts over folders (config.data.split), read across folders."""

import json

import numpy as np
import pytest
from conftest import data_settings

from agejax import errors
from agejax.data import pipeline, splits

# Transcribed from facebase/benchmarks/{AgeDB,MORPH,UTKFace}.yaml (paplhjak/Facial-Age-Estimation-Benchmark).
PUBLISHED = {
  0: {"trn": [0, 1, 2, 3, 4, 5], "val": [6, 7], "tst": [8, 9]},
  1: {"trn": [2, 3, 4, 5, 6, 7], "val": [8, 9], "tst": [0, 1]},
  2: {"trn": [4, 5, 6, 7, 8, 9], "val": [0, 1], "tst": [2, 3]},
  3: {"trn": [5, 6, 7, 8, 9, 0], "val": [1, 2], "tst": [3, 4]},
  4: {"trn": [6, 7, 8, 9, 0, 1], "val": [2, 3], "tst": [4, 5]},
}


@pytest.mark.parametrize("k", range(5))
def test_the_five_splits_are_the_published_ones_and_partition_folders_0_to_9(k):
  split = splits.resolve(k, range(10))
  assert (list(split.train), list(split.validation), list(split.test)) == (
    PUBLISHED[k]["trn"],
    PUBLISHED[k]["val"],
    PUBLISHED[k]["tst"],
  )
  assert sorted(split.train + split.validation + split.test) == list(range(10))


def test_every_split_counts_its_parts_from_the_folders():
  counts = {f: 10 + 3 * f for f in range(10)}  # distinct per folder: a wrong folder changes a sum
  expected = {k: tuple(sum(counts[f] for f in PUBLISHED[k][part]) for part in ("trn", "val", "tst")) for k in PUBLISHED}
  got = {k: tuple(splits.part_sizes(splits.resolve(k, counts), counts).values()) for k in splits.formable(counts)}
  assert got == expected
  assert got[0] == (10 + 13 + 16 + 19 + 22 + 25, 28 + 31, 34 + 37)
  assert all(sum(sizes) == sum(counts.values()) for sizes in got.values())
  # As published, the five test parts are not a partition: folders 6-7 are never tested, 3 and 4 twice.
  tested = [f for k in PUBLISHED for f in splits.resolve(k, counts).test]
  assert sorted(tested) == [0, 1, 2, 3, 3, 4, 4, 5, 8, 9]


def test_a_three_folder_database_has_its_one_split():
  counts = {0: 4113, 1: 1500, 2: 1978}  # CLAP2016's folders
  split = splits.resolve(0, counts)
  assert (split.train, split.validation, split.test) == ((0,), (1,), (2,))
  assert splits.part_sizes(split, counts) == {"train": 4113, "validation": 1500, "test": 1978}
  assert splits.formable(counts) == [0]
  with pytest.raises(errors.UserError, match=r"^config.data.split='1': .*folders 0-2 .*only split 0$"):
    splits.resolve("1", counts)


def test_an_explicit_spec_names_any_folders():
  fgnet = range(1, 83)  # FG-NET: one folder per person
  split = splits.resolve("train:1-70,val:71-76,test:77-82", fgnet)
  assert split.train == tuple(range(1, 71)) and split.validation == tuple(range(71, 77))
  assert split.test == tuple(range(77, 83))
  assert splits.formable(fgnet) == []
  mixed = splits.resolve(" trn:0,2, 4-5 , validation:1,tst:3", range(6))
  assert (mixed.train, mixed.validation, mixed.test) == ((0, 2, 4, 5), (1,), (3,))
  with pytest.raises(errors.UserError, match=r"^config.data.split=0: benchmark split 0 needs folders 0-9 .*1-82"):
    splits.resolve(0, fgnet)


def test_an_int_and_its_text_name_the_same_split():
  assert splits.resolve(2, range(10)) == splits.resolve("2", range(10)) == splits.resolve(" 2 ", range(10))
  assert splits.resolve("", range(10)) is None and splits.resolve(None, range(10)) is None


@pytest.mark.parametrize(
  "value, message",
  [
    ("5", r"the benchmark has splits 0-4"),
    (7, r"the benchmark has splits 0-4"),
    ("train:0-5,val:5-7,test:8-9", r"folder 5 is in parts 'train' and 'validation'"),
    ("train:0-5,val:6,6,test:8", r"folder 6 is twice"),
    ("train:,val:6-7,test:8-9", r"part 'train' is empty"),
    ("train:0-5,val:6-7", r"part 'test' is missing"),
    ("train:0-5,dev:6-7,test:8-9", r"part 'dev' is not train \(trn\), validation \(val\) or test \(tst\)"),
    ("train:0-5,val:7-6,test:8-9", r"folder range '7-6' in part 'validation' is empty or reversed"),
    ("train:0-5,,val:6-7,test:8-9", r"part 'train' has an empty folder entry"),
    ("train:0-5,val:six,test:8-9", r"'six' in part 'validation' is not a folder number"),
    ("0-5,val:6-7,test:8-9", r"a spec starts with a part name"),
    ("train:0-5,train:6,test:8-9", r"part 'train' is given twice"),
    ("abc", r"a spec starts with a part name"),
    ("train:0-5,val:6-7,test:8-10", r"folder 10 is not in this dataset, whose folders are 0-9"),
  ],
)
def test_a_bad_split_fails_in_one_line_naming_it(value, message):
  with pytest.raises(errors.UserError, match=rf"^config.data.split={value!r}: {message}") as e:
    splits.resolve(value, range(10))
  assert "\n" not in str(e.value)


def _memmaps(tmp_path, sizes):
  rng = np.random.default_rng(0)
  parts = []
  for i, n in enumerate(sizes):
    np.save(tmp_path / f"images{i}.npy", rng.integers(0, 256, (n, 3, 2, 3), dtype=np.uint8))
    parts.append(np.load(tmp_path / f"images{i}.npy", mmap_mode="r"))
  return parts


def test_folder_images_gather_exactly_the_rows_of_the_concatenation(tmp_path):
  parts = _memmaps(tmp_path, [5, 1, 0, 7, 3])
  images, whole = pipeline.FolderImages(parts), np.concatenate(parts)
  assert images.shape == whole.shape == (16, 3, 2, 3) and images.dtype == np.uint8 and len(images) == 16
  rng = np.random.default_rng(1)
  for index in (
    np.arange(16),
    rng.permutation(16),
    np.sort(rng.integers(0, 16, 40)),  # duplicates, as a batch running over an epoch's end has
    np.array([], np.int64),
    np.array([[15, 0], [5, 6]]),
    np.array([-1, -16]),
    7,
    -2,
    slice(3, 12, 2),
    (np.array([2, 9]), 1),
  ):
    np.testing.assert_array_equal(images[index], whole[index])
  np.testing.assert_array_equal(np.asarray(images), whole)
  with pytest.raises(IndexError):
    images[np.array([16])]


def test_a_part_over_several_folders_batches_and_drops_as_one_array(tmp_path):
  parts = _memmaps(tmp_path, [4, 6, 5])
  ages = [np.array([1, 50, 120, 30], np.float32), np.arange(6, dtype=np.float32) * 30, np.full(5, 7, np.float32)]
  folders = [
    pipeline.ArraySplit(p, a, a / 10, groups={"gender": (np.arange(len(a)) % 3).astype(np.int32)})
    for p, a in zip(parts, ages)
  ]
  for split in folders:
    split.group_names = {"gender": ("male", "female", "unknown")}
  joined = pipeline._concatenate(folders)
  plain = pipeline.ArraySplit(
    np.concatenate(parts),
    np.concatenate(ages),
    np.concatenate(ages) / 10,
    groups={"gender": np.concatenate([f.groups["gender"] for f in folders])},
  )
  assert isinstance(joined.images, pipeline.FolderImages) and len(joined) == 15
  index = np.array([14, 0, 4, 9, 10, 3, 3])
  for key, value in joined.gather(index).items():
    np.testing.assert_array_equal(value, plain.gather(index)[key])
  kept, dropped = joined.restrict_ages(1, 100, "drop")
  plain_kept, plain_dropped = plain.restrict_ages(1, 100, "drop")
  assert dropped == plain_dropped == 4  # 120; 0, 120, 150
  everything = np.arange(len(kept))
  np.testing.assert_array_equal(kept.gather(everything)["image"], plain_kept.gather(everything)["image"])
  np.testing.assert_array_equal(kept.groups["gender"], plain_kept.groups["gender"])
  batches = list(pipeline.eval_batches(joined, 4, 0, 1))
  np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]), np.concatenate(parts))


def test_a_malformed_split_fails_config_validation_before_anything_is_built():
  from agejax.training import configuration
  from configs import vgg16_kl

  config = vgg16_kl.get_config("tiny")
  assert config.data.split == ""
  config.data.split = "train:0-5,val:5-7,test:8-9"
  with pytest.raises(errors.UserError, match=r"^config.data.split='train:0-5,val:5-7,test:8-9': folder 5 is in"):
    configuration.validate(config)
  config.data.split = "3"
  assert configuration.validate(config).data.split == "3"


def test_a_changed_split_is_refused_on_resume():
  from agejax.training import configuration
  from configs import vgg16_kl

  config = vgg16_kl.get_config("tiny")
  config.data.split = "0"
  recorded = json.loads(json.dumps(config.to_dict()))  # as config.json stores it
  config.data.split = "1"
  with pytest.raises(errors.UserError, match=r"^config.data.split='1' differs from data.split='0' in config.json, "):
    configuration.check_resume(config, recorded, "config.json")
  assert "data.split" in configuration.RESUME_MUST_MATCH


def test_a_split_on_a_dataset_without_folders_fails_naming_the_key(tiny_config):
  tiny_config.data.split = "0"
  with pytest.raises(errors.UserError, match=r"^config.data.split='0': dataset 'demo' has no benchmark folders"):
    pipeline.load_split(data_settings(tiny_config.data), "train")
