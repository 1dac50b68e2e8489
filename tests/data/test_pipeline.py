import ml_collections
import numpy as np
import pytest
from conftest import data_settings, labelled_split

from agejax.data import datasets, pipeline


def make_split(n: int, size: int = 4) -> pipeline.ArraySplit:
  images = np.arange(n, dtype=np.int64)[:, None, None, None] % 251 * np.ones((1, size, size, 3), np.int64)
  return pipeline.ArraySplit(images.astype(np.uint8), np.arange(n, dtype=np.float32), np.zeros(n, np.float32))


@pytest.mark.parametrize("n,batch,processes", [(50, 16, 1), (50, 16, 2), (64, 16, 4), (7, 8, 2)])
def test_eval_batches_cover_every_example_once(n, batch, processes):
  data = make_split(n)
  seen = []
  for p in range(processes):
    for b in pipeline.eval_batches(data, batch, process_index=p, process_count=processes):
      assert len(b["age"]) == batch // processes and b["image"].dtype == np.uint8
      seen.extend(b["age"][b["mask"]].astype(int).tolist())
  assert sorted(seen) == list(range(n))


def test_train_batches_are_a_pure_function_of_seed_and_step():
  data = make_split(40)
  a = pipeline.TrainBatches(data, 8, seed=3)
  b = pipeline.TrainBatches(data, 8, seed=3)
  for step in (7, 0, 12, 3):  # any order, fresh object: same batch
    np.testing.assert_array_equal(a.global_indices(step), b.global_indices(step))
  assert not np.array_equal(a.global_indices(0), pipeline.TrainBatches(data, 8, seed=4).global_indices(0))
  # Each epoch (5 steps of 8 over 40 examples) visits every example exactly once, in a new order.
  epochs = [np.concatenate([a.global_indices(s) for s in range(5 * e, 5 * e + 5)]) for e in range(3)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(40))
  assert not np.array_equal(epochs[0], epochs[1])


def test_train_batches_cross_epoch_boundaries_and_split_over_processes():
  data = make_split(10)
  whole = pipeline.TrainBatches(data, 4, seed=0)
  stream = np.concatenate([whole.global_indices(s) for s in range(5)])  # 20 positions = 2 epochs
  assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
  for step in range(5):
    parts = [
      pipeline.TrainBatches(data, 4, seed=0, process_index=p, process_count=2).local_batch(step) for p in range(2)
    ]
    ages = np.sort(np.concatenate([p["age"] for p in parts]))
    np.testing.assert_array_equal(ages, np.sort(whole.global_indices(step)).astype(np.float32))
  with pytest.raises(ValueError, match="config.batch_size=5"):
    pipeline.TrainBatches(data, 5, seed=0, process_index=0, process_count=2)


@pytest.mark.slow
def test_load_split_equals_tfds_records(tiny_config):
  import tensorflow_datasets as tfds

  split = pipeline.load_split(data_settings(tiny_config.data), "validation")
  builder = datasets.get_builder("demo", tiny_config.data.data_dir, "tiny")
  records = list(tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False)))
  assert len(split) == len(records) == 50
  assert split.images.dtype == np.uint8 and split.images.shape == (50, 40, 40, 3)
  for i in (0, 17, 49):
    np.testing.assert_array_equal(split.images[i], records[i]["image"])
    assert split.age[i] == records[i]["age"]
  assert split.age.min() >= 1 and split.age.max() <= 90


def test_unknown_dataset_and_split_name_the_key(tiny_config):
  tiny_config.data.name = "imagenet"
  with pytest.raises(ValueError, match="config.data.name='imagenet'"):
    pipeline.load_split(data_settings(tiny_config.data), "train")
  tiny_config.data.name = "demo"
  with pytest.raises(ValueError, match="'valid'"):
    pipeline.load_split(data_settings(tiny_config.data), "valid")


def test_ages_outside_the_bins_are_clipped_or_dropped_and_counted():
  data = pipeline.ArraySplit(
    np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8),
    np.array([0, 5, 50, 100, 116], np.float32),
    np.zeros(5, np.float32),
  )
  clipped, n = data.restrict_ages(1, 100, "clip")
  assert n == 2 and clipped.age.tolist() == [1, 5, 50, 100, 100]
  dropped, n = data.restrict_ages(1, 100, "drop")
  assert n == 2 and len(dropped) == 3 and dropped.age.tolist() == [5, 50, 100]
  batch = dropped.gather(np.array([0, 2]))
  assert batch["image"][:, 0, 0, 0].tolist() == [1, 3]  # image rows follow the kept examples
  assert dropped.groups == {} and dropped.group_names == {}  # none by default
  twice, _ = dropped.restrict_ages(6, 100, "drop")
  assert twice.gather(np.array([0]))["image"][0, 0, 0, 0] == 2
  with pytest.raises(ValueError, match="config.labels.out_of_range='wrap'"):
    data.restrict_ages(1, 100, "wrap")


def test_dropping_ages_keeps_the_groups_aligned():
  names = {"gender": ("male", "female", "unknown")}
  data = pipeline.ArraySplit(
    np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8),
    np.array([0, 5, 50, 100, 116], np.float32),
    np.zeros(5, np.float32),
    groups={"gender": np.array([0, 1, 2, 0, 1], np.int32)},
    group_names=names,
  )
  clipped, _ = data.restrict_ages(1, 100, "clip")
  assert clipped.groups["gender"].tolist() == [0, 1, 2, 0, 1] and clipped.group_names == names
  dropped, _ = data.restrict_ages(1, 100, "drop")
  assert dropped.groups["gender"].tolist() == [1, 2, 0] and dropped.group_names == names
  twice, _ = dropped.restrict_ages(6, 100, "drop")
  assert twice.groups["gender"].tolist() == [2, 0] and twice.age.tolist() == [50, 100]
  assert data.groups["gender"].tolist() == [0, 1, 2, 0, 1]  # the original is untouched


def test_the_demo_split_has_its_groups(tiny_config):
  from agejax.data import demo_faces

  data = labelled_split(tiny_config, "validation")
  assert data.group_names == {"skin_tone": ("light", "medium", "dark"), "gender": ("male", "female")}
  assert data.group_names == demo_faces.GROUPS
  for grouping, names in data.group_names.items():
    codes = data.groups[grouping]
    assert codes.dtype == np.int32 and codes.shape == data.age.shape
    counts = np.bincount(codes, minlength=len(names))
    assert len(counts) == len(names) and counts.sum() == len(data) and (counts > 0).all(), (grouping, counts)
  # Each example's codes name what the generator drew for its image (TFDS stores them in another order).
  seed = datasets.get_builder("demo", tiny_config.data.data_dir, "tiny").SPLIT_SEEDS["validation"]
  drawn = {}
  for index in range(len(data)):
    image, _, groups = demo_faces.sample_person(seed, index, data.images.shape[1])
    drawn[image.tobytes()] = groups
  for i in range(len(data)):
    groups = drawn[np.asarray(data.images[i]).tobytes()]
    assert {g: names[data.groups[g][i]] for g, names in data.group_names.items()} == groups, i


def _cache_folders(cache_dir, split: str) -> list:
  return sorted((cache_dir / "agejax_demo" / "tiny" / "2.0.0").glob(f"{split}-*"))


def test_the_array_cache_is_local_keyed_and_rebuilt_when_the_dataset_changes(data_dir, tmp_path, capsys):
  import os
  import shutil

  import tensorflow_datasets as tfds

  data = tmp_path / "tfds"
  shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("agejax_arrays"))
  cfg = ml_collections.ConfigDict(
    {"name": "demo", "data_dir": str(data), "builder_config": "tiny", "cache_dir": str(tmp_path / "arrays")}
  )
  first = pipeline.load_split(data_settings(cfg), "validation")
  out = capsys.readouterr().out
  assert "built the agejax_demo/tiny/2.0.0 validation array cache (50 examples, 0.2 MB) in " in out, out
  [folder] = _cache_folders(tmp_path / "arrays", "validation")
  assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "labels.npz"]
  assert not list(data.rglob("*.npy"))  # nothing beside the TFDS files
  again = pipeline.load_split(data_settings(cfg), "validation")
  assert again.images.filename == first.images.filename  # reused, not rebuilt
  assert "built" not in capsys.readouterr().out
  # The groups survive the round trip through the cache, as the TFDS records hold them.
  builder = datasets.get_builder("demo", str(data), "tiny")
  records = list(tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False)))
  assert set(first.groups) == set(first.group_names) == {"skin_tone", "gender"}
  assert again.group_names == first.group_names == builder.group_names()
  for grouping, codes in first.groups.items():
    assert codes.dtype == np.int32 and codes.tolist() == [int(r[grouping]) for r in records]
    np.testing.assert_array_equal(again.groups[grouping], codes)
  # The dataset changes under the same name: the validation records are replaced by the test split's.
  files = {
    s: next((data / "agejax_demo" / "tiny" / "2.0.0").glob(f"agejax_demo-{s}.tfrecord*"))
    for s in ("validation", "test")
  }
  shutil.copyfile(files["test"], files["validation"])
  os.utime(files["validation"], (1, 1))
  changed = pipeline.load_split(data_settings(cfg), "validation")
  builder = datasets.get_builder("demo", str(data_dir), "tiny")
  records = list(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)))
  np.testing.assert_array_equal(changed.images, np.stack([r["image"] for r in records]))
  np.testing.assert_array_equal(changed.age, [r["age"] for r in records])
  np.testing.assert_array_equal(changed.groups["gender"], [r["gender"] for r in records])
  assert [f.name for f in _cache_folders(tmp_path / "arrays", "validation")] != [folder.name]  # the stale one went
  assert len(_cache_folders(tmp_path / "arrays", "validation")) == 1


def test_an_interrupted_build_is_cleaned_up_and_a_full_disk_fails_in_one_line(tiny_config, tmp_path, monkeypatch):
  import collections
  import shutil

  tiny_config.data.cache_dir = str(tmp_path / "arrays")
  root = tmp_path / "arrays" / "agejax_demo" / "tiny" / "2.0.0"
  partial = root / ".validation-0123456789abcdef.tmp99999"  # a build killed mid-way
  partial.mkdir(parents=True)
  (partial / "images.npy").write_bytes(b"\0" * 1000)
  pipeline.load_split(data_settings(tiny_config.data), "validation")
  assert not partial.exists()
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
  with pytest.raises(
    ValueError,
    match=r"^config.data.cache_dir='.*': the agejax_demo/tiny/2.0.0 train array cache "
    r"needs 2.0 MB and .* has 0.0 MB free; set --config.data.cache_dir",
  ):
    pipeline.load_split(data_settings(tiny_config.data), "train")
  assert not list(root.glob("train-*")) and not list(root.glob(".train-*"))


@pytest.mark.slow
def test_two_processes_building_the_same_cache_at_once_agree(data_dir, tmp_path):
  import subprocess
  import sys

  code = (
    "import sys, numpy as np; from agejax import settings; from agejax.data import pipeline; "
    "cfg = settings.DataSettings(name='demo', data_dir=sys.argv[1], builder_config='tiny', "
    "cache_dir=sys.argv[2]); s = pipeline.load_split(cfg, 'train'); "
    "print('sum', int(s.images.astype(np.int64).sum()), int(s.age.sum()))"
  )
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", code, data_dir, str(tmp_path / "arrays")],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  sums = [next(line for line in out.splitlines() if line.startswith("sum ")) for out, _ in outputs]
  expected = pipeline.load_split(
    data_settings(
      ml_collections.ConfigDict(
        {"name": "demo", "data_dir": data_dir, "builder_config": "tiny", "cache_dir": str(tmp_path / "fresh")}
      )
    ),
    "train",
  )
  assert sums == [f"sum {int(expected.images.astype(np.int64).sum())} {int(expected.age.sum())}"] * 2
  assert sum("built the" in out for out, _ in outputs) == 1  # one built, the other waited and reused it
  assert len(_cache_folders(tmp_path / "arrays", "train")) == 1
