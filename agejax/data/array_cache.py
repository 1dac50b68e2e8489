"""Each host's local, memory-mapped uint8 copy of a prepared split, keyed by the prepared files themselves.

Decoding TFDS records one by one is slow (~530 images/s measured), so each host decodes each split
once into a memory-mapped uint8 array on its local disk (`config.data.cache_dir`, also when the TFDS
data is in a bucket); a batch is then one gather from it (~44,000 images/s per core).

A split's folder holds `images.npy` and `labels.npz`: `age`, `age_std`, and for each grouping of the
dataset (the builder's `group_names()`, see data/builders.py) `group.NAME` (an int32 code per
example) and `names.NAME` (the code -> name strings). `read_labels` reads them back.
"""

import fcntl
import hashlib
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from etils import epath

from agejax import errors
from agejax.data import datasets, streaming
from agejax.data.grouping import group_codes, group_names


def read_labels(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, tuple[str, ...]]]:
  """Returns a split folder's ages, age stds, group codes {grouping: int32 [N]} and names {grouping: names}."""
  with np.load(folder / "labels.npz") as labels:
    groups = {key.removeprefix("group."): labels[key] for key in labels.files if key.startswith("group.")}
    names = {name: tuple(labels[f"names.{name}"].tolist()) for name in groups}
    return labels["age"], labels["age_std"], groups, names


def cache_key(builder, split: str) -> str:
  """A digest of the prepared split's identity: where it is, its metadata, and its files' sizes and times.

  Re-preparing the dataset (or copying a new one over it) changes the files, so the key; the array
  cache is then rebuilt instead of silently serving the old examples.
  """
  data_dir = epath.Path(builder.data_dir)
  digest = hashlib.sha256(str(data_dir).encode())
  digest.update((data_dir / "dataset_info.json").read_bytes())
  for file in sorted(builder.info.splits[split].filepaths, key=str):
    stat = epath.Path(file).stat()
    digest.update(f"{epath.Path(file).name} {stat.length} {stat.mtime}".encode())
  return digest.hexdigest()[:16]


def _decode_split(builder, split: str, folder: Path) -> None:
  """Decodes a prepared TFDS split once into folder/images.npy (memory-mappable) and folder/labels.npz."""
  from tqdm.auto import tqdm

  tfds = datasets.import_tfds()
  n = builder.info.splits[split].num_examples
  shape = builder.info.features["image"].shape
  images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))
  ages, stds = np.zeros(n, np.float32), np.zeros(n, np.float32)
  names = group_names(builder)
  codes = {name: np.zeros(n, np.int32) for name in names}
  start = 0
  if streaming.stored_format(builder) == streaming.ARRAY_RECORD:  # TFDS's as_dataset reads no ArrayRecord
    dataset = streaming.read_batches(streaming.split_files(builder, split), tuple(names))
  else:
    dataset = tfds.as_numpy(builder.as_dataset(split=split, batch_size=256, shuffle_files=False))
  with tqdm(total=n, desc=f"array cache {split}", unit="img", disable=jax.process_index() > 0) as bar:
    for batch in dataset:
      end = start + len(batch["age"])
      images[start:end], ages[start:end], stds[start:end] = batch["image"], batch["age"], batch["age_std"]
      for name in names:
        codes[name][start:end] = group_codes(batch[name], names[name])
      start = end
      bar.update(len(batch["age"]))
  if start != n:
    raise RuntimeError(f"{builder.data_dir}: split {split!r} has {start} examples, its metadata says {n}")
  images.flush()
  del images
  groups = {f"group.{name}": codes[name] for name in names}
  groups.update({f"names.{name}": np.array(names[name], dtype=str) for name in names})
  np.savez(folder / "labels.npz", age=ages, age_std=stds, **groups)  # type: ignore[arg-type]  # no "allow_pickle" key


def size_text(num_bytes: float) -> str:
  """Bytes for messages: '1.23 GB' or '4.5 MB'."""
  return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def _root(builder, cache_dir: str) -> Path:
  return Path(cache_dir).expanduser().absolute() / builder.info.full_name  # name/config/version


def _folder(builder, split: str, cache_dir: str) -> Path:
  return _root(builder, cache_dir) / f"{split}-{cache_key(builder, split)}"


def is_cached(builder, split: str, cache_dir: str) -> bool:
  """True when this host holds `split`'s array cache for the prepared files as they are now."""
  return (_folder(builder, split, cache_dir) / "labels.npz").exists()


def needed_bytes(builder, split: str) -> int:
  """The disk space `split`'s array cache takes: its uint8 images, labels, and a margin."""
  n = builder.info.splits[split].num_examples
  labels = 8 + 4 * len(group_names(builder))  # bytes per example: age, age_std, a code per grouping
  return n * int(np.prod(builder.info.features["image"].shape)) + labels * n + (1 << 20)


def free_bytes(cache_dir: str) -> int:
  """Free space on the disk that holds `cache_dir` (its nearest existing folder, before it is created)."""
  folder = Path(cache_dir).expanduser().absolute()
  while not folder.exists():
    folder = folder.parent
  return shutil.disk_usage(folder).free


def build(builder, split: str, cache_dir: str) -> Path:
  """Returns the local folder of `split`'s uint8 arrays, decoding the TFDS records into it once.

  The folder is keyed by dataset, builder config, TFDS version, split and `cache_key`. Each host
  builds its own (TFDS may be on GCS; a memory map needs a local file). One process per host
  builds while the others wait on a lock; the folder appears complete or not at all (a rename).
  """
  tfds_name = builder.info.full_name
  root, folder = _root(builder, cache_dir), _folder(builder, split, cache_dir)
  if (folder / "labels.npz").exists():
    return folder
  root.mkdir(parents=True, exist_ok=True)
  with open(root / f"{split}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if (folder / "labels.npz").exists():  # another process built it while this one waited
      return folder
    # Under the lock no other process builds this split: older keys and interrupted builds are garbage.
    for stale in root.glob(f"{split}-" + "?" * 16):
      shutil.rmtree(stale, ignore_errors=True)
    for partial in root.glob(f".{split}-" + "?" * 16 + ".tmp*"):
      shutil.rmtree(partial, ignore_errors=True)
    n = builder.info.splits[split].num_examples
    needed, free = needed_bytes(builder, split), free_bytes(str(root))
    if needed > free:
      raise errors.UserError(
        f"config.data.cache_dir={cache_dir!r}: the {tfds_name} {split} array cache needs "
        f"{size_text(needed)} and {root} has {size_text(free)} free; set "
        f"--config.data.cache_dir to a local disk with more space"
      )
    tmp = root / f".{folder.name}.tmp{os.getpid()}"
    tmp.mkdir()
    started = time.perf_counter()
    try:
      _decode_split(builder, split, tmp)
      os.rename(tmp, folder)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    size = sum(f.stat().st_size for f in folder.iterdir())
    where = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    print(
      f"{where}built the {tfds_name} {split} array cache ({n} examples, {size_text(size)}) in "
      f"{time.perf_counter() - started:.1f} s: {folder}",
      flush=True,
    )
  return folder
