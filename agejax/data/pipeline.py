"""Host input pipeline: prepared splits as arrays -> batches, a pure function of (seed, step) -> device arrays.

A batch is one gather from each host's memory-mapped copy of the split (data/array_cache.py). Batch
order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would.

With `config.data.split` set (data/splits.py), "train", "validation" and "test" are parts of the
benchmark's folders: each folder has its own array cache, built once and shared by every split
that uses it, and a part's images are gathered across its folders' memory maps (`FolderImages`).
"""

import dataclasses
import functools
import logging
import queue
import re
import threading
import typing
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from agejax import errors, parallel, settings
from agejax.data import array_cache, datasets, grouping, splits, streaming

OUT_OF_RANGE = ("clip", "drop")
ALL_FOLDERS = "all"  # the split name of a fae database's every folder together (without config.data.split)


class FolderImages:
  """The images of several folders as one read-only [N, H, W, C] array: a gather reads each folder's memory map.

  Nothing is copied into memory until rows are read (a part of UTKFace is gigabytes); indexing with
  an int, a slice or an integer array returns what the concatenated array would.
  """

  def __init__(self, parts: Sequence[np.ndarray]):
    if not parts or len({p.shape[1:] for p in parts}) != 1 or len({p.dtype for p in parts}) != 1:
      raise ValueError(f"folders of one shape and dtype are needed, got {[(p.shape, p.dtype) for p in parts]}")
    self.parts = parts
    self.offsets = np.cumsum([0] + [len(p) for p in parts])
    self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
    self.dtype = parts[0].dtype
    self.ndim = len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, tuple):  # rows first, then the rest as NumPy would
      return self[index[0]][(slice(None), *index[1:])] if not np.isscalar(index[0]) else self[index[0]][index[1:]]
    if isinstance(index, slice):
      index = np.arange(len(self))[index]
    rows = np.asarray(index)
    if rows.dtype.kind not in "iu":
      raise IndexError(f"only integers, slices and integer arrays index rows, not {rows.dtype}")
    n = len(self)
    if rows.size and (rows.min() < -n or rows.max() >= n):
      raise IndexError(f"row index out of range for {n} rows")
    flat = np.where(rows < 0, rows + n, rows).ravel()
    part = np.searchsorted(self.offsets, flat, side="right") - 1
    out = np.empty((flat.size, *self.shape[1:]), self.dtype)
    for p in np.unique(part):
      sel = part == p
      out[sel] = self.parts[p][flat[sel] - self.offsets[p]]
    return out.reshape(*rows.shape, *self.shape[1:])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = np.concatenate(self.parts)
    return out if dtype is None else out.astype(dtype)

  def astype(self, dtype) -> np.ndarray:
    """All rows, read into memory, as `dtype` (as an ndarray's astype)."""
    return np.asarray(self, dtype)


@dataclasses.dataclass
class ArraySplit:
  """One split as arrays: uint8 images (memory-mapped), ages and age stds [N].

  `rows` maps example i to its image row; None means the identity (no example was dropped).
  `groups` holds, for each grouping the dataset has (e.g. "gender", "race"), an int32 code per
  example [N], aligned with `age`; `group_names` maps each grouping to its names in code order
  ("unknown", when the dataset can lack the field, last). Both are empty for a dataset without groups.
  """

  images: np.ndarray | FolderImages | streaming.RecordImages  # FolderImages: a benchmark part over several folders
  age: np.ndarray
  age_std: np.ndarray
  rows: np.ndarray | None = None
  groups: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  group_names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

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
      groups = {name: codes[keep] for name, codes in self.groups.items()}
      return dataclasses.replace(self, age=self.age[keep], age_std=self.age_std[keep], rows=rows, groups=groups), n
    raise errors.UserError(f"config.labels.out_of_range={policy!r} is not one of {OUT_OF_RANGE}")


def load_split(data: settings.DataSettings, split: str) -> ArraySplit:
  """Returns a split of the configured dataset as arrays, preparing the demo or the local array cache if needed.

  Args:
    data: the data settings (name, data_dir, builder_config, cache_dir, split, reader).
    split: the TFDS split name; with `data.split` set, "train", "validation" or "test": that part of the
      benchmark's folders; "all" (without it): every folder of a fae database.

  Returns:
    The split: uint8 images (memory-mapped, or read from the ArrayRecord files on demand with
    data.reader='grain'), ages, age stds and the dataset's groups.
  """
  builder = prepared_builder(data)
  parts = split_parts(data, builder, split)
  reader = resolve_reader(data, builder, parts)
  return _concatenate([_load_part(builder, part, data.cache_dir, reader) for part in parts])


def resolve_reader(data: settings.DataSettings, builder, parts: Sequence[str]) -> str:
  """'cache' or 'grain' for `data.reader`; 'auto' streams when the splits' array cache would not fit the disk (said)."""
  if data.reader not in streaming.READERS:
    raise errors.UserError(f"config.data.reader={data.reader!r} must be one of {streaming.READERS}")
  if data.reader == streaming.GRAIN:
    streaming.check_streamable(builder, data)
    return streaming.GRAIN
  if data.reader == streaming.CACHE or streaming.stored_format(builder) != streaming.ARRAY_RECORD:
    return streaming.CACHE  # a tfrecord dataset too large for the disk: array_cache.build says so, naming cache_dir
  missing = [s for s in dict.fromkeys(parts) if not array_cache.is_cached(builder, s, data.cache_dir)]
  needed = sum(array_cache.needed_bytes(builder, s) for s in missing)
  free = array_cache.free_bytes(data.cache_dir)
  if needed <= free:
    return streaming.CACHE
  print(
    f"data.reader=auto: the array cache of {builder.info.full_name} needs {array_cache.size_text(needed)} and "
    f"{data.cache_dir} has {array_cache.size_text(free)} free: streaming its ArrayRecord files through Grain "
    f"(--config.data.reader=cache or =grain forces either)",
    flush=True,
  )
  return streaming.GRAIN


def split_parts(data: settings.DataSettings, builder, split: str) -> list[str]:
  """The prepared TFDS splits that make up `split`: itself, or with `data.split` (or "all") benchmark folders."""
  folders = dataset_folders(builder)
  if splits.normalise(data.split):
    if not folders:
      raise errors.UserError(
        f"config.data.split={data.split!r}: dataset {data.name!r} has no benchmark folders (its splits are "
        f"{sorted(builder.info.splits)}); set --config.data.split='' or prepare a fae dataset"
      )
    chosen = splits.resolve(data.split, folders)
    assert chosen is not None  # normalise() said a split is set
    return [f"folder{f}" for f in chosen.folders(split)]
  if split == ALL_FOLDERS and folders:  # a database's every folder: a cross-dataset test set
    return [f"folder{f}" for f in folders]
  if split not in builder.info.splits:
    hint = "; its folders form train/validation/test with --config.data.split (0-4 or a spec)" if folders else ""
    raise errors.UserError(f"config.data split {split!r} is not in {data.name}: {sorted(builder.info.splits)}{hint}")
  return [split]


def prepared_builder(data: settings.DataSettings):
  """The configured dataset's prepared builder: the demo is generated; another unprepared one fails in one line."""
  builder = datasets.get_builder(data.name, data.data_dir, data.builder_config)
  if builder.is_prepared():
    return builder
  if datasets.DATASETS[data.name][1]:
    how = "--database FILE.json --images DIR" if data.name == "fae" else "--manual_dir DOWNLOADED_FOLDER"
    raise errors.MissingInput(
      f"dataset {data.name!r} is not prepared in {builder.data_dir}; run: python scripts/prepare_data.py "
      f"{data.name} {how}"
      + (f" --name {data.builder_config}" if data.builder_config else "")
      + (f" --data_dir {data.data_dir}" if data.data_dir else "")
    )
  return datasets.prepare(data.name, data.data_dir, builder_config=data.builder_config)


def dataset_folders(builder) -> list[int]:
  """The benchmark folders a prepared dataset has (its splits named folder0, folder1, ...); [] for none."""
  found = (re.fullmatch(r"folder(\d+)", name) for name in builder.info.splits)
  return sorted(int(m[1]) for m in found if m)


def _load_part(builder, split: str, cache_dir: str, reader: str) -> ArraySplit:
  """One TFDS split from its array cache (built once per prepared split and host), or from its ArrayRecord files."""
  if reader == streaming.GRAIN:  # labels parsed once (no image decoded); images read where a batch needs them
    files = streaming.split_files(builder, split)
    shape = (builder.info.splits[split].num_examples, *builder.info.features["image"].shape)
    images = streaming.RecordImages(files, shape)
    names = grouping.group_names(builder)
    age, age_std, groups = streaming.read_labels(files, names)
    return ArraySplit(images, age, age_std, groups=groups, group_names=names)
  folder = array_cache.build(builder, split, cache_dir)
  age, age_std, groups, names = array_cache.read_labels(folder)
  return ArraySplit(np.load(folder / "images.npy", mmap_mode="r"), age, age_std, groups=groups, group_names=names)


def _concatenate(parts: list[ArraySplit]) -> ArraySplit:
  """Folders' splits as one, in the order given; the images stay in their memory maps."""
  if len(parts) == 1:
    return parts[0]
  names = parts[0].group_names
  if any(p.group_names != names for p in parts):  # one builder writes one set of names
    raise RuntimeError(f"folders with different group names: {[p.group_names for p in parts]}")
  return ArraySplit(
    FolderImages([typing.cast(np.ndarray, p.images) for p in parts]),  # each folder's is its memory map
    np.concatenate([p.age for p in parts]),
    np.concatenate([p.age_std for p in parts]),
    groups={g: np.concatenate([p.groups[g] for p in parts]) for g in names},
    group_names=names,
  )


def load_labelled_split(
  data: settings.DataSettings, labels: settings.LabelSettings, split: str, *, training: bool = False
) -> ArraySplit:
  """Loads a split and applies `labels.out_of_range` to ages outside the bins, saying how many.

  'clip' changes training targets only: evaluation always scores the true ages ('drop' drops them).
  """
  arrays = load_split(data, split)
  policy = labels.out_of_range
  if policy == "clip" and not training:
    _, outside = arrays.restrict_ages(labels.min_age, labels.max_age, policy)
    policy = "kept: scored against the true ages"
  else:
    arrays, outside = arrays.restrict_ages(labels.min_age, labels.max_age, policy)
  if outside:
    logging.warning(
      "%s/%s: %d ages outside %d..%d (%s)", data.name, split, outside, labels.min_age, labels.max_age, policy
    )
  if not len(arrays):  # would end in a ZeroDivisionError or IndexError after training
    if outside:
      raise errors.UserError(
        f"config.labels.out_of_range='drop' empties split {split!r} of {data.name}: none of its {outside} "
        f"ages is in labels.min_age..labels.max_age = {labels.min_age}..{labels.max_age}"
      )
    raise errors.UserError(f"split {split!r} of {data.name} has no examples")
  return arrays


@dataclasses.dataclass
class StreamedSplit:
  """The training split read through Grain (data.reader='grain'): its files, images on demand, a sample of its ages."""

  files: list[str]
  images: streaming.RecordImages
  age: np.ndarray  # every training age up to streaming.BASELINE_SAMPLE, else a seeded sample: the mean-age baseline's

  def __len__(self) -> int:
    return len(self.images)


def train_reader(data: settings.DataSettings) -> str:
  """'cache' or 'grain': how the training split is read (data.reader; 'auto' decides by the local disk, said)."""
  builder = prepared_builder(data)
  return resolve_reader(data, builder, split_parts(data, builder, "train"))


def streamed_train_split(data: settings.DataSettings, labels: settings.LabelSettings) -> StreamedSplit:
  """The training split on the streaming path; only a sample of its labels is read (no image)."""
  if labels.out_of_range == "drop":
    raise errors.UserError(
      "config.labels.out_of_range='drop' needs every training label before the first step, and "
      "data.reader='grain' reads the records as it trains: use 'clip' or --config.data.reader=cache"
    )
  builder = prepared_builder(data)
  parts = split_parts(data, builder, "train")
  files = [f for part in parts for f in streaming.split_files(builder, part)]
  n = sum(builder.info.splits[part].num_examples for part in parts)
  sample = min(n, streaming.BASELINE_SAMPLE)
  rows = np.arange(n) if sample == n else np.sort(np.random.default_rng(0).choice(n, sample, replace=False))
  age, _, _ = streaming.read_labels(files, {}, rows)
  images = streaming.RecordImages(files, (n, *builder.info.features["image"].shape))
  return StreamedSplit(files, images, np.clip(age, labels.min_age, labels.max_age))  # 'clip', as trained


class TrainBatches:
  """Shuffled training batches as a pure function of (seed, step), sliced for this process.

  Epoch e visits the examples in the order of a permutation seeded by (seed, e); batches run
  across epoch boundaries, so every example is seen once per epoch and nothing is dropped.
  """

  def __init__(
    self,
    data: ArraySplit,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    self.data, self.batch_size, self.seed = data, global_batch_size, seed
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise errors.UserError(f"config.batch_size={global_batch_size} must divide over {self.process_count} processes")
    self.local_batch_size = global_batch_size // self.process_count

  @functools.lru_cache(maxsize=2)  # noqa: B019  (two epochs of one long-lived object: no leak worth a class)
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
    return self.data.gather(np.sort(self.global_indices(step))[start : start + self.local_batch_size])


def eval_batches(
  data: ArraySplit, global_batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
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


def device_prefetch(
  batches: Iterator[dict[str, np.ndarray]], sharding: jax.sharding.NamedSharding, depth: int = 2
) -> Iterator[dict[str, jax.Array]]:
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
