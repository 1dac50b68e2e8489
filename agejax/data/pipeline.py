"""Host input pipeline: prepared splits as arrays -> batches, a pure function of (seed, step) -> device arrays.

A batch is one gather from each host's memory-mapped copy of the split (data/array_cache.py). Batch
order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would.
"""

import dataclasses
import functools
import logging
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np

from agejax import errors, parallel, settings
from agejax.data import array_cache, datasets

OUT_OF_RANGE = ("clip", "drop")


@dataclasses.dataclass
class ArraySplit:
  """One split as arrays: uint8 images (memory-mapped), ages and age stds [N].

  `rows` maps example i to its image row; None means the identity (no example was dropped).
  `groups` holds, for each grouping the dataset has (e.g. "gender", "race"), an int32 code per
  example [N], aligned with `age`; `group_names` maps each grouping to its names in code order
  ("unknown", when the dataset can lack the field, last). Both are empty for a dataset without groups.
  """

  images: np.ndarray
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
    data: the data settings (name, data_dir, builder_config, cache_dir).
    split: the TFDS split name.

  Returns:
    The split: memory-mapped uint8 images, ages, age stds and the dataset's groups.
  """
  builder = datasets.get_builder(data.name, data.data_dir, data.builder_config)
  if not builder.is_prepared():
    if datasets.DATASETS[data.name][1]:
      raise errors.MissingInput(
        f"dataset {data.name!r} is not prepared in {builder.data_dir}; run: python scripts/prepare_data.py "
        f"{data.name} --manual_dir DOWNLOADED_FOLDER"
        + (f" --name {data.builder_config}" if data.builder_config else "")
        + (f" --data_dir {data.data_dir}" if data.data_dir else "")
      )
    builder = datasets.prepare(data.name, data.data_dir, builder_config=data.builder_config)
  if split not in builder.info.splits:
    raise errors.UserError(f"config.data split {split!r} is not in {data.name}: {sorted(builder.info.splits)}")
  folder = array_cache.build(builder, split, data.cache_dir)
  age, age_std, groups, names = array_cache.read_labels(folder)
  return ArraySplit(np.load(folder / "images.npy", mmap_mode="r"), age, age_std, groups=groups, group_names=names)


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
