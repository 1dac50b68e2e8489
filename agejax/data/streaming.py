"""Streaming a prepared split from its ArrayRecord files through Grain, for datasets too large for a host's array cache.

The cache (data/array_cache.py) decodes a whole split onto every host's disk; past a host's disk the
records are read where they lie (a local folder or a bucket) by Grain's random-access
`ArrayRecordDataSource` and decoded in Grain worker processes (`data.grain_workers`).

The training order is `ShardedOrder`: the split is cut into `data.shards` contiguous shards (Grain's
`even_split`), and shard k gives global_batch / shards examples of every step from its own permutation
per epoch, so the global batch at a step is a pure function of (seed, step, shards) whatever the
process count. Each JAX process reads only the shards assigned to it. With one shard the order is
`pipeline.TrainBatches`' exactly. The Grain iterator's state after each step goes into the Orbax
checkpoint beside the train state (`Position`), and a resumed run restores it before the loop.
"""

import dataclasses
import functools
import io
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from agejax import errors, settings
from agejax.data import grouping

READERS = ("auto", "cache", "grain")
CACHE, GRAIN = "cache", "grain"
ARRAY_RECORD = "array_record"
# Training ages read at start-up for the mean-age baseline (final_metrics.json's baseline_mae): every
# one up to this many, else a seeded sample; reading them all would read the whole split once more.
BASELINE_SAMPLE = 4096

# tf.train.Example's schema (tensorflow/core/example/{example,feature}.proto), so that Grain workers
# parse records without importing TensorFlow (~10 s a worker here). Parsing with protobuf and
# decoding with PIL measured 1.7x TFDS's deserialize_example_np at 40 px and 1.3x at 281 px.
_EXAMPLE_PROTO = """
name: "agejax_example.proto" package: "agejax_example" syntax: "proto3"
message_type { name: "BytesList" field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES } }
message_type { name: "FloatList" field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_FLOAT } }
message_type { name: "Int64List" field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_INT64 } }
message_type {
  name: "Feature"
  field { name: "bytes_list" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".agejax_example.BytesList" }
  field { name: "float_list" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".agejax_example.FloatList" }
  field { name: "int64_list" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".agejax_example.Int64List" }
}
message_type {
  name: "Features"
  field {
    name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
    type_name: ".agejax_example.Features.FeatureEntry"
  }
  nested_type {
    name: "FeatureEntry" options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".agejax_example.Feature" }
  }
}
message_type {
  name: "Example"
  field { name: "features" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".agejax_example.Features" }
}
"""


_SETUP = threading.Lock()
_decoding: tuple[Any, Any] | None = None


def _decoders() -> tuple[Any, Any]:
  """(the Example message class, PIL's Image), set up once per process under a lock.

  A Grain worker reads with several threads: two of them building the protobuf class and importing
  PIL at once crashed the worker with SIGSEGV (every time in tests/test_streaming.py's race test).
  """
  global _decoding
  with _SETUP:
    if _decoding is None:
      from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
      from PIL import Image, PngImagePlugin  # noqa: F401  (the PNG plugin registered before any thread opens one)

      pool = descriptor_pool.DescriptorPool()
      pool.Add(text_format.Parse(_EXAMPLE_PROTO, descriptor_pb2.FileDescriptorProto()))
      _decoding = message_factory.GetMessageClass(pool.FindMessageTypeByName("agejax_example.Example")), Image
    return _decoding


def _value(feature) -> Any:
  """The one value of a scalar feature: an int, a float or bytes."""
  for name in ("int64_list", "float_list", "bytes_list"):
    if feature.HasField(name):
      return getattr(feature, name).value[0]
  raise ValueError("an empty feature")


def parse_example(record: bytes, image: bool = True, groups: Sequence[str] = ()) -> dict[str, Any]:
  """A serialized TFDS example as the cache stores it: uint8 image [H, W, 3], float32 age and age_std, group values."""
  example, image_module = _decoders()
  feature = example.FromString(record).features.feature
  out: dict[str, Any] = {
    "age": np.float32(_value(feature["age"])),
    "age_std": np.float32(_value(feature["age_std"])),
  }
  if image:
    out["image"] = np.asarray(image_module.open(io.BytesIO(feature["image"].bytes_list.value[0]), formats=("PNG",)))
  for name in groups:
    out[name] = _value(feature[name])
  return out


def _open(files: Sequence[str]):
  """The random-access reader of a split's ArrayRecord files (one index over them all, in order)."""
  import grain

  return grain.sources.ArrayRecordDataSource(list(files))


def split_files(builder, split: str) -> list[str]:
  """The ArrayRecord files of a prepared split, in record order."""
  return [str(f) for f in builder.info.splits[split].filepaths]


def stored_format(builder) -> str:
  """How a prepared dataset's records are stored: 'array_record', 'tfrecord', ..."""
  file_format = builder.info.file_format
  return str(getattr(file_format, "value", file_format or "tfrecord"))


def check_streamable(builder, data: settings.DataSettings) -> None:
  """Fails in one line, saying how to prepare it, when a dataset is not stored as ArrayRecord."""
  stored = stored_format(builder)
  if stored != ARRAY_RECORD:
    raise errors.UserError(
      f"config.data.reader='grain': {builder.info.full_name} in {builder.data_dir} is stored as {stored}, which "
      f"Grain cannot read by index; prepare it again as ArrayRecord (prepare_data.py ... --rebuild --file_format "
      f"array_record, or TFDS download_and_prepare(file_format='array_record')) or set --config.data.reader=cache"
    )


class RecordImages:
  """A split's images as a read-only [N, H, W, C] uint8 array: indexing reads and decodes those records only."""

  def __init__(self, files: Sequence[str], shape: tuple[int, ...]):
    self.files = list(files)
    self._source: Any = None
    self.shape = tuple(shape)
    self.dtype = np.dtype(np.uint8)
    self.ndim = len(self.shape)

  @property
  def source(self):
    if self._source is None:
      self._source = _open(self.files)
    return self._source

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, tuple):
      return self[index[0]][(slice(None), *index[1:])] if not np.isscalar(index[0]) else self[index[0]][index[1:]]
    if isinstance(index, slice):
      index = np.arange(len(self))[index]
    rows = np.asarray(index)
    flat = np.where(rows < 0, rows + len(self), rows).ravel().tolist()
    out = np.empty((len(flat), *self.shape[1:]), np.uint8)
    for i, record in enumerate(self.source.__getitems__(flat) if flat else []):
      out[i] = parse_example(record)["image"]
    return out.reshape(*rows.shape, *self.shape[1:])


def read_batches(
  files: Sequence[str],
  groups: Sequence[str] = (),
  rows: Sequence[int] | np.ndarray | None = None,
  *,
  image: bool = True,
  size: int = 256,
) -> Iterator[dict[str, np.ndarray]]:
  """The records at `rows` (default all, in order) as batches of `size`, as TFDS's as_numpy gives them."""
  source = _open(files)
  rows = range(len(source)) if rows is None else rows
  for start in range(0, len(rows), size):
    chunk = [int(i) for i in rows[start : start + size]]
    parsed = [parse_example(r, image=image, groups=groups) for r in source.__getitems__(chunk)]
    batch = {name: np.array([p[name] for p in parsed]) for name in ("age", "age_std", *groups)}
    if image:
      batch["image"] = np.stack([p["image"] for p in parsed])
    yield batch


def read_labels(
  files: Sequence[str], names: dict[str, tuple[str, ...]], rows: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(ages, age stds, group codes) of the records at `rows` (default all), parsed without decoding an image."""
  batches = list(read_batches(files, tuple(names), rows, image=False, size=1024))
  if not batches:
    return np.zeros(0, np.float32), np.zeros(0, np.float32), {g: np.zeros(0, np.int32) for g in names}
  age = np.concatenate([b["age"] for b in batches]).astype(np.float32)
  age_std = np.concatenate([b["age_std"] for b in batches]).astype(np.float32)
  codes = {g: grouping.group_codes(np.concatenate([b[g] for b in batches]), names[g]) for g in names}
  return age, age_std, codes


# -- choosing the reader ------------------------------------------------------------------------------------------


# -- the training order -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardedOrder:
  """The global batch of every step as a pure function of (seed, step, shards): each shard its own part."""

  num_examples: int
  global_batch_size: int
  seed: int
  shards: int

  def __post_init__(self):
    if self.global_batch_size % self.shards:
      raise errors.UserError(f"config.batch_size={self.global_batch_size} must divide over data.shards={self.shards}")
    if self.num_examples < self.shards:
      raise errors.UserError(f"config.data.shards={self.shards} is more than the split's {self.num_examples} examples")

  def bounds(self, shard: int) -> tuple[int, int]:
    """The records [start, end) of `shard`: Grain's even split of the split's index."""
    from grain._src.core import sharding

    return sharding.even_split(self.num_examples, sharding.ShardOptions(shard, self.shards))

  @functools.lru_cache(maxsize=4)  # noqa: B019  (a shard's two epochs around a boundary)
  def _permutation(self, shard: int, epoch: int) -> np.ndarray:
    start, end = self.bounds(shard)
    key = [self.seed, epoch] if self.shards == 1 else [self.seed, epoch, shard]  # one shard: TrainBatches' order
    return start + np.random.default_rng(key).permutation(end - start)

  def shard_indices(self, shard: int, step: int) -> np.ndarray:
    """The sorted record indices of `shard`'s part of the global batch at `step` (0-based)."""
    start, end = self.bounds(shard)
    per = self.global_batch_size // self.shards
    positions = np.arange(step * per, (step + 1) * per, dtype=np.int64)
    epochs, offsets = np.divmod(positions, end - start)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      out[epochs == e] = self._permutation(shard, int(e))[offsets[epochs == e]]
    # Sorted: reads go in file order, and with one shard the batch is TrainBatches' sorted batch.
    return np.sort(out)

  def global_indices(self, step: int) -> np.ndarray:
    """The record indices of the whole global batch at `step`, shard by shard."""
    return np.concatenate([self.shard_indices(k, step) for k in range(self.shards)])

  def process_shards(self, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` reads (as ShardByJaxProcess with shards = processes)."""
    if self.shards % process_count:
      raise errors.UserError(
        f"config.data.shards={self.shards} must be a multiple of the {process_count} processes (0: one a process)"
      )
    per = self.shards // process_count
    return range(process_index * per, (process_index + 1) * per)


class ReadBatch:
  """Grain map (step -> this process's host batch), run in the Grain workers: reads and decodes its records."""

  def __init__(self, files: Sequence[str], order: ShardedOrder, shards: Sequence[int], ages: tuple[float, float]):
    self.files, self.order, self.shards, self.ages = list(files), order, list(shards), ages
    self._source: Any = None

  def __getstate__(self):
    return {**self.__dict__, "_source": None}  # each worker opens its own readers

  def __call__(self, step: int) -> dict[str, Any]:
    if self._source is None:
      self._source = _open(self.files)
    index = np.concatenate([self.order.shard_indices(k, step) for k in self.shards]).tolist()
    parsed = [parse_example(r) for r in self._source.__getitems__(index)]
    batch: dict[str, Any] = {
      "image": np.stack([p["image"] for p in parsed]),
      "age": np.array([p["age"] for p in parsed], np.float32),
      "age_std": np.array([p["age_std"] for p in parsed], np.float32),
    }
    batch["age"] = np.clip(batch["age"], *self.ages)  # labels.out_of_range='clip': training targets only
    batch["step"] = np.int64(step)
    batch["records"] = np.asarray(index, np.int64)  # what was read, counted by TrainStream
    return batch


class Position:
  """The training input's position for Orbax: the Grain iterator state after a step (grain.checkpoint's handler).

  The host reads ahead of the devices, so the state after each step is recorded as the batches are
  read, and the one after the step being saved goes into that step's checkpoint. Grain's handler
  writes one file per JAX process; `set_state` receives it back on restore.
  """

  def __init__(self, shards: int, workers: int):
    self.shards, self.workers = shards, workers
    self._after: dict[int, dict[str, Any]] = {}
    self._lock = threading.Lock()
    self.restored: dict[str, Any] | None = None

  def record(self, step: int, iterator_state: dict[str, Any]) -> None:
    """Records the iterator's state once the batch of `step` (1-based, as the loop counts) has been read."""
    with self._lock:
      self._after[step] = {"step": step, "shards": self.shards, "workers": self.workers, "iterator": iterator_state}
      for old in [s for s in self._after if s < step - 16]:
        del self._after[old]

  def at(self, step: int) -> "_Snapshot":
    """What checkpoint `step` saves: the state after that step's batch."""
    with self._lock:
      return _Snapshot(json.dumps(self._after[step]).encode())

  def set_state(self, state: bytes) -> None:
    """Orbax restore (grain.checkpoint.CheckpointRestore): keeps the saved position for the stream."""
    self.restored = json.loads(state)

  def start_prefetch(self) -> None:
    """Called by Grain's handler after a restore; the stream starts when the loop asks for batches."""


@dataclasses.dataclass(frozen=True)
class _Snapshot:
  state: bytes

  def get_state(self) -> bytes:
    """The saved position (Grain's handler writes it as this process's JSON file)."""
    return self.state


class TrainStream:
  """This process's training batches read through Grain (`data.reader='grain'`), with their position."""

  def __init__(
    self,
    files: Sequence[str],
    order: ShardedOrder,
    num_steps: int,
    workers: int,
    ages: tuple[float, float],
    process_index: int,
    process_count: int,
  ):
    self.files, self.order, self.num_steps, self.workers = list(files), order, num_steps, workers
    self.shards = order.process_shards(process_index, process_count)
    self.read = ReadBatch(files, order, self.shards, ages)
    self.position = Position(order.shards, workers)
    self.seen = np.zeros(order.num_examples, bool)  # the records this process has read (a byte each)
    self.reads = 0
    first, last = order.bounds(self.shards[0])[0], order.bounds(self.shards[-1])[1]
    self.where = where = f"process {process_index}: " if process_count > 1 else ""
    print(
      f"{where}streaming shards {self.shards.start}-{self.shards.stop - 1} of {order.shards} "
      f"(records {first}-{last - 1} of {order.num_examples}) through Grain with {workers} workers",
      flush=True,
    )

  def summary(self) -> str:
    """What this process has read: records read, distinct records and their range (the shards' bounds when whole)."""
    rows = np.flatnonzero(self.seen)
    where = f"records {rows[0]}-{rows[-1]}" if len(rows) else "none"
    return f"{self.where}read {self.reads} records, {len(rows)} distinct ({where}) of {self.order.num_examples}"

  def _iterator(self, first: int):
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # a notebook or a test: Grain reads its options from absl's flags
      flags.FLAGS.mark_as_parsed()

    dataset = grain.MapDataset.range(first, self.num_steps).map(self.read)
    # Each element is a whole batch: a couple of threads overlap reads, and little is held ahead.
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    return iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers)))

  def batches(self, start: int) -> Iterator[dict[str, np.ndarray]]:
    """Host batches for steps start+1, start+2, ... (1-based), from the restored Grain state when there is one."""
    saved = self.position.restored or {}
    usable = saved.get("step") == start
    if usable and (saved["shards"], saved["workers"]) != (self.order.shards, self.workers):
      if saved["shards"] != self.order.shards:
        logging.warning(
          "the checkpoint's input was read in %d shards, this run's in %d: the order from step %d differs from an "
          "uninterrupted run's",
          saved["shards"],
          self.order.shards,
          start,
        )
      usable = False  # another worker count: Grain's state is per worker; the step says where to go on
    iterator = self._iterator(0 if usable else start)
    if usable:
      iterator.set_state(saved["iterator"])
    try:
      for step in range(start + 1, self.num_steps + 1):
        batch = next(iterator)
        read = int(batch.pop("step")) + 1
        if read != step:
          raise RuntimeError(f"the restored input stream gave the batch of step {read} for step {step}")
        records = batch.pop("records")
        self.seen[records] = True
        self.reads += len(records)
        self.position.record(step, iterator.get_state())
        yield batch
      print(self.summary(), flush=True)
    finally:
      close = getattr(iterator, "close", None)
      if close is not None:
        close()


def train_stream(
  files: Sequence[str],
  num_examples: int,
  run: settings.RunSettings,
  data: settings.DataSettings,
  labels: settings.LabelSettings,
  num_steps: int,
) -> TrainStream:
  """The Grain stream of the training records in `files` (its folders' in order) for this JAX process."""
  import jax

  order = ShardedOrder(num_examples, run.batch_size, run.seed, data.shards or jax.process_count())
  ages = (float(labels.min_age), float(labels.max_age))
  return TrainStream(files, order, num_steps, data.grain_workers, ages, jax.process_index(), jax.process_count())
