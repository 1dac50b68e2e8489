"""Host input pipeline: prepared TFDS splits -> memory-mapped uint8 arrays -> sharded batches.

TFDS stores and versions the prepared datasets (locally or in a bucket). Decoding records one by one
is slow (~530 images/s measured), so each host decodes each split once into a memory-mapped uint8
array on its local disk (`config.data.cache_dir`); a batch is then one gather from it (~44,000
images/s per core). Batch order is a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted run would.
"""

import dataclasses
import fcntl
import functools
import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from etils import epath

from agejax import errors, parallel
from agejax.data import sources

# data.name -> (TFDS builder name, needs a manually downloaded folder)
DATASETS = {"demo": ("agejax_demo", False), "utkface": ("agejax_utkface", True),
            "csv_faces": ("agejax_csv_faces", True)}


def _tfds():
  """Imports TFDS with TensorFlow kept off any GPU (JAX owns the accelerators)."""
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import tensorflow_datasets as tfds
  from agejax.data import builders, csv_faces, utkface  # noqa: F401  (registers the builders)
  return tfds


def get_builder(name: str, data_dir: str = "", builder_config: str = ""):
  """Returns the TFDS builder of an agejax dataset name (`config.data.name`) and builder config.

  `builder_config` is a predefined config ('' for the default) or, for csv_faces, a name of the
  user's own (`prepare_data.py csv_faces --name NAME`), so several CSV datasets live side by side.
  """
  if name not in DATASETS:
    raise errors.UserError(f"config.data.name={name!r} is not one of {sorted(DATASETS)}")
  tfds = _tfds()
  cls = tfds.builder_cls(DATASETS[name][0])
  config = None
  if builder_config:
    # The config object rather than its name: TFDS looks a user-named config up in the prepared
    # files only, and would not know it when preparing.
    config = cls.get_builder_config(builder_config)
    if config is None:
      predefined = sorted(cls.builder_configs)
      hint = ("; a name of your own is 1-64 lowercase letters, digits, '_' or '-'" if name == "csv_faces"
              else "; only csv_faces takes names of your own")
      raise errors.UserError(f"builder config {builder_config!r} of {name} is not one of {predefined}{hint}")
  return tfds.builder(DATASETS[name][0], config=config, data_dir=data_dir or None)


def prepare(name: str, data_dir: str = "", manual_dir: str = "", builder_config: str = "",
            rebuild: bool = False):
  """Builds the TFDS dataset once (from `manual_dir` for downloaded datasets); returns the builder.

  A dataset prepared already is kept when `manual_dir` is the source it was prepared from (the
  fingerprint in its metadata matches) and refused with a ValueError when the source differs or
  changed since; `rebuild` deletes its version folder and prepares it again. The source is read
  (archives verified) before anything is written or deleted.
  """
  tfds = _tfds()
  builder = get_builder(name, data_dir, builder_config)
  manual = DATASETS[name][1]
  source = builder.describe_source(manual_dir) if manual and manual_dir else None
  if builder.is_prepared():
    if rebuild:
      if manual and source is None:
        raise errors.UserError(f"rebuilding {name} deletes {builder.data_dir}: pass --manual_dir, the source to "
                         f"prepare it from again")
      epath.Path(builder.data_dir).rmtree()
      builder = get_builder(name, data_dir, builder_config)
    elif source is not None:
      _check_same_source(name, builder, source)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None, try_download_gcs=False)
  builder.download_and_prepare(download_config=download_config)
  return builder


def _check_same_source(name: str, builder, source: dict) -> None:
  """Raises a one-line ValueError unless the prepared dataset was built from `source` as it is now."""
  recorded = (builder.info.metadata or {}).get("source") or {}
  if recorded.get("digest") == source["digest"]:
    return
  dataset = f"{builder.info.full_name} in {builder.data_dir_root}"
  if not recorded:
    problem = f"{dataset} has no record of its source, so {source['path']} can't be checked against it"
  elif recorded["path"] == source["path"]:
    problem = (f"{dataset} was prepared from {recorded['path']}, which has changed since "
               f"(different: {sources.differences(recorded, source)})")
  else:
    problem = (f"{dataset} was prepared from {recorded['path']}, not from {source['path']} "
               f"(different: {sources.differences(recorded, source)})")
  other = ", or --name NAME to prepare it as another dataset" if name == "csv_faces" else ""
  raise errors.UserError(f"{problem}: pass --rebuild to delete it and prepare it again{other}")


OUT_OF_RANGE = ("clip", "drop")
DEFAULT_CACHE_DIR = "~/.cache/agejax/arrays"


@dataclasses.dataclass
class ArraySplit:
  """One split as arrays: uint8 images (memory-mapped), ages and age stds [N].

  `rows` maps example i to its image row; None means the identity (no example was dropped).
  """
  images: np.ndarray
  age: np.ndarray
  age_std: np.ndarray
  rows: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.age)

  def gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the examples at `index` as a host batch."""
    rows = index if self.rows is None else self.rows[index]
    return {"image": self.images[rows], "age": self.age[index], "age_std": self.age_std[index]}

  def restrict_ages(self, min_age: int, max_age: int, policy: str) -> tuple["ArraySplit", int]:
    """Clips ages to [min_age, max_age] or drops the examples outside; returns the split and the count."""
    outside = (self.age < min_age) | (self.age > max_age)
    n = int(outside.sum())
    if policy == "clip":
      return dataclasses.replace(self, age=np.clip(self.age, min_age, max_age)), n
    if policy == "drop":
      keep = np.flatnonzero(~outside)
      rows = keep if self.rows is None else self.rows[keep]
      return ArraySplit(self.images, self.age[keep], self.age_std[keep], rows), n
    raise errors.UserError(f"config.labels.out_of_range={policy!r} is not one of {OUT_OF_RANGE}")


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
  tfds = _tfds()
  n = builder.info.splits[split].num_examples
  shape = builder.info.features["image"].shape
  images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))
  ages, stds = np.zeros(n, np.float32), np.zeros(n, np.float32)
  start = 0
  dataset = tfds.as_numpy(builder.as_dataset(split=split, batch_size=256, shuffle_files=False))
  with tqdm(total=n, desc=f"array cache {split}", unit="img", disable=jax.process_index() > 0) as bar:
    for batch in dataset:
      end = start + len(batch["age"])
      images[start:end], ages[start:end], stds[start:end] = batch["image"], batch["age"], batch["age_std"]
      start = end
      bar.update(len(batch["age"]))
  if start != n:
    raise RuntimeError(f"{builder.data_dir}: split {split!r} has {start} examples, its metadata says {n}")
  images.flush()
  del images
  np.savez(folder / "labels.npz", age=ages, age_std=stds)


def _size(num_bytes: float) -> str:
  return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def array_cache(builder, split: str, cache_dir: str) -> Path:
  """Returns the local folder of `split`'s uint8 arrays, decoding the TFDS records into it once.

  The folder is keyed by dataset, builder config, TFDS version, split and `cache_key`. Each host
  builds its own (TFDS may be on GCS; a memory map needs a local file). One process per host
  builds while the others wait on a lock; the folder appears complete or not at all (a rename).
  """
  tfds_name = builder.info.full_name  # name/config/version
  root = Path(cache_dir).expanduser().absolute() / tfds_name
  folder = root / f"{split}-{cache_key(builder, split)}"
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
    info = builder.info
    n = info.splits[split].num_examples
    needed = n * int(np.prod(info.features["image"].shape)) + 8 * n + (1 << 20)
    free = shutil.disk_usage(root).free
    if needed > free:
      raise errors.UserError(f"config.data.cache_dir={cache_dir!r}: the {tfds_name} {split} array cache needs "
                       f"{_size(needed)} and {root} has {_size(free)} free; set "
                       f"--config.data.cache_dir to a local disk with more space")
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
    print(f"{where}built the {tfds_name} {split} array cache ({n} examples, {_size(size)}) in "
          f"{time.perf_counter() - started:.1f} s: {folder}", flush=True)
  return folder


def load_split(data_cfg, split: str) -> ArraySplit:
  """Returns a split of `config.data` as arrays, preparing the demo or the local array cache if needed."""
  builder = get_builder(data_cfg.name, data_cfg.data_dir, data_cfg.get("builder_config", ""))
  if not builder.is_prepared():
    if DATASETS[data_cfg.name][1]:
      raise errors.MissingInput(
          f"dataset {data_cfg.name!r} is not prepared in {builder.data_dir}; run: python scripts/prepare_data.py "
          f"{data_cfg.name} --manual_dir DOWNLOADED_FOLDER"
          + (f" --name {data_cfg.builder_config}" if data_cfg.get("builder_config") else "")
          + (f" --data_dir {data_cfg.data_dir}" if data_cfg.data_dir else ""))
    builder = prepare(data_cfg.name, data_cfg.data_dir, builder_config=data_cfg.get("builder_config", ""))
  if split not in builder.info.splits:
    raise errors.UserError(f"config.data split {split!r} is not in {data_cfg.name}: {sorted(builder.info.splits)}")
  folder = array_cache(builder, split, data_cfg.get("cache_dir", DEFAULT_CACHE_DIR))
  labels = np.load(folder / "labels.npz")
  return ArraySplit(np.load(folder / "images.npy", mmap_mode="r"), labels["age"], labels["age_std"])


class TrainBatches:
  """Shuffled training batches as a pure function of (seed, step), sliced for this process.

  Epoch e visits the examples in the order of a permutation seeded by (seed, e); batches run
  across epoch boundaries, so every example is seen once per epoch and nothing is dropped.
  """

  def __init__(self, data: ArraySplit, global_batch_size: int, seed: int,
               process_index: int | None = None, process_count: int | None = None):
    self.data, self.batch_size, self.seed = data, global_batch_size, seed
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise errors.UserError(f"config.batch_size={global_batch_size} must divide over {self.process_count} processes")
    self.local_batch_size = global_batch_size // self.process_count

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

  def global_indices(self, step: int) -> np.ndarray:
    """Returns the dataset indices of the whole global batch at `step`."""
    n = len(self.data)
    positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      out[epochs == e] = self._permutation(int(e))[offsets[epochs == e]]
    return out

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """Returns this process's slice of the global batch at `step`."""
    # Sorted before slicing: reads go in file order (kinder to the page cache), and each example
    # keeps its position in the global batch (so its augmentation draw) whatever the process count.
    start = self.process_index * self.local_batch_size
    return self.data.gather(np.sort(self.global_indices(step))[start:start + self.local_batch_size])


def eval_batches(data: ArraySplit, global_batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example once, in order, in padded batches with a `mask` of real examples."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local = global_batch_size // pc
  n = len(data)
  for start in range(0, n, global_batch_size):
    index = np.arange(start + pi * local, start + (pi + 1) * local)
    mask = index < n
    batch = data.gather(np.minimum(index, n - 1))
    batch["mask"] = mask
    yield batch


def device_prefetch(batches: Iterator[dict[str, np.ndarray]], sharding: jax.sharding.NamedSharding,
                    depth: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Assembles host batches into global device arrays in a background thread, `depth` ahead."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for batch in batches:
        if stop.is_set():
          return
        q.put(parallel.global_batch(batch, sharding))
      q.put(done)
    except BaseException as e:  # surface producer errors in the consumer
      q.put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while (item := q.get()) is not done:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
