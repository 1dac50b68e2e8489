"""data.reader='grain': the prepared ArrayRecord files streamed through Grain, in the cache's batches and order."""

import dataclasses
import json
import shutil
import subprocess

import jax
import numpy as np
import pytest
from conftest import array_cache as array_cache_dir
from conftest import checkpoint, cpu_env, preempt, train_command
from fae_fixtures import make_fae_database, prepare_fae

from agejax import errors, settings
from agejax.data import array_cache, pipeline, streaming
from agejax.training import checkpointing, configuration


def data(directory: str, reader: str, **changes) -> settings.DataSettings:
  """The tiny demo's data settings in `directory`, read by `reader`, with the session's array cache."""
  return dataclasses.replace(
    settings.DataSettings("demo", directory, array_cache_dir(directory), "tiny", reader=reader), **changes
  )


def test_streamed_splits_equal_the_array_cache_of_the_tfrecord_preparation(record_dir, data_dir):
  streamed = pipeline.load_split(data(record_dir, "grain"), "validation")
  cached = pipeline.load_split(data(data_dir, "cache"), "validation")
  assert isinstance(streamed.images, streaming.RecordImages)
  np.testing.assert_array_equal(streamed.images[np.arange(len(streamed))], cached.images[:])
  for key in ("age", "age_std"):
    np.testing.assert_array_equal(getattr(streamed, key), getattr(cached, key))
  assert streamed.group_names == cached.group_names and streamed.groups.keys() == cached.groups.keys()
  for name in cached.groups:
    np.testing.assert_array_equal(streamed.groups[name], cached.groups[name])
  index = np.array([7, 0, 7, 49])
  jax.tree.map(np.testing.assert_array_equal, streamed.gather(index), cached.gather(index))


def test_one_shard_streams_exactly_the_cache_readers_batches_and_resumes_from_its_saved_position(record_dir, data_dir):
  labels = settings.LabelSettings()
  split = pipeline.streamed_train_split(data(record_dir, "grain"), labels)
  cached = pipeline.load_labelled_split(data(data_dir, "cache"), labels, "train", training=True)
  expected = pipeline.TrainBatches(cached, 16, seed=5, process_index=0, process_count=1)
  order = streaming.ShardedOrder(len(split), 16, 5, shards=1)

  def stream():
    return streaming.TrainStream(split.files, order, 30, 0, (1.0, 100.0), 0, 1)

  first = stream()
  batches = first.batches(0)
  for step in range(1, 21):  # 192 examples: the second epoch starts at step 13
    jax.tree.map(np.testing.assert_array_equal, next(batches), expected.local_batch(step - 1))
  saved = first.position.at(20).get_state()
  batches.close()
  resumed = stream()
  resumed.position.set_state(saved)
  for step, batch in enumerate(resumed.batches(20), start=21):
    jax.tree.map(np.testing.assert_array_equal, batch, expected.local_batch(step - 1))
  assert step == 30


class CountingSource:
  """An ArrayRecord source that records every index read."""

  reads: list[int] = []

  def __init__(self, files):
    import grain

    self.source = grain.sources.ArrayRecordDataSource(list(files))

  def __len__(self):
    return len(self.source)

  def __getitems__(self, index):
    CountingSource.reads.extend(index)
    return self.source.__getitems__(index)


def test_each_process_reads_only_its_shards_and_two_processes_see_one_processs_global_batches(record_dir, monkeypatch):
  split = pipeline.streamed_train_split(data(record_dir, "grain"), settings.LabelSettings())
  monkeypatch.setattr(streaming, "_open", CountingSource)
  order = streaming.ShardedOrder(len(split), 16, 0, shards=2)
  steps = 14  # more than an epoch of each 96-record shard (8 a step)

  def read(process_index: int, process_count: int):
    CountingSource.reads = []
    stream = streaming.TrainStream(split.files, order, steps, 0, (1.0, 100.0), process_index, process_count)
    return list(stream.batches(0)), set(CountingSource.reads), stream.summary()

  single, everything, said = read(0, 1)
  (first, reads0, said0), (second, reads1, said1) = read(0, 2), read(1, 2)
  assert reads0 == set(range(96)) and reads1 == set(range(96, 192)) and everything == reads0 | reads1
  # What a run prints at the end of its stream (test_scale reads it from two processes).
  assert said == "read 224 records, 192 distinct (records 0-191) of 192"
  assert said0 == "process 0: read 112 records, 96 distinct (records 0-95) of 192"
  assert said1 == "process 1: read 112 records, 96 distinct (records 96-191) of 192"
  for whole, a, b in zip(single, first, second, strict=True):
    jax.tree.map(lambda w, x, y: np.testing.assert_array_equal(w, np.concatenate([x, y])), whole, a, b)
  assert len({tuple(order.global_indices(s)) for s in range(steps)}) == steps  # not one batch repeated
  with pytest.raises(errors.UserError, match=r"data.shards=2 must be a multiple of the 4 processes"):
    order.process_shards(0, 4)


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("reader", "stream", r"config.data.reader='stream': must be one of \('auto', 'cache', 'grain'\)"),
    ("shards", 3, r"config.data.shards=3: must be 0 \(one a process\) or a count that divides batch_size=16"),
    ("grain_workers", -1, r"config.data.grain_workers=-1: must be >= 0"),
  ],
)
def test_reader_keys_are_checked_before_anything_is_built(tiny_config, key, value, message):
  tiny_config.data[key] = value
  with pytest.raises(errors.UserError, match=message):
    configuration.validate(tiny_config)


def test_auto_streams_when_the_cache_would_not_fit_and_says_how_to_force_either(
  record_dir, monkeypatch, capsys, tmp_path
):
  builder = pipeline.prepared_builder(data(record_dir, "auto"))
  auto = data(record_dir, "auto", cache_dir=str(tmp_path / "no_arrays_yet"))
  usage = shutil.disk_usage(record_dir)
  assert pipeline.resolve_reader(auto, builder, ["train"]) == streaming.CACHE and not capsys.readouterr().out
  needed = array_cache.needed_bytes(builder, "train")
  monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=needed - 1))
  assert pipeline.resolve_reader(auto, builder, ["train"]) == streaming.GRAIN
  (line,) = capsys.readouterr().out.splitlines()
  assert line.startswith("data.reader=auto: the array cache of agejax_demo/tiny/2.0.0 needs ")
  assert line.endswith("(--config.data.reader=cache or =grain forces either)")
  assert pipeline.resolve_reader(dataclasses.replace(auto, reader="cache"), builder, ["train"]) == streaming.CACHE


def test_a_tfrecord_dataset_cannot_be_streamed_and_auto_keeps_the_cache(data_dir, monkeypatch):
  builder = pipeline.prepared_builder(data(data_dir, "grain"))
  with pytest.raises(errors.UserError) as raised:
    pipeline.resolve_reader(data(data_dir, "grain"), builder, ["train"])
  message = str(raised.value)
  assert "\n" not in message and "is stored as tfrecord" in message and "file_format='array_record'" in message
  usage = shutil.disk_usage(data_dir)
  monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=0))
  assert pipeline.resolve_reader(data(data_dir, "auto"), builder, ["train"]) == streaming.CACHE  # build() then says why


def test_the_checkpoint_holds_the_position_beside_the_state_where_plain_orbax_finds_it(tmp_path):
  position = streaming.Position(shards=2, workers=0)
  position.record(3, {"next_index": 3})
  ckpts = checkpointing.Checkpoints(tmp_path, input_state=True, asynchronous=False)
  state = {"w": np.arange(4.0)}
  ckpts.save(3, state, position=position.at(3))
  ckpts.wait()
  restored = streaming.Position(shards=2, workers=0)
  assert ckpts.restore_position(restored, 3) and restored.restored["iterator"] == {"next_index": 3}
  np.testing.assert_array_equal(ckpts.restore({"w": np.zeros(4)})["w"], state["w"])
  ckpts.close()
  assert (tmp_path / "3" / "default").is_dir()  # the train state where plain Orbax (conftest.checkpoint) reads it
  assert (tmp_path / "3" / "input" / "process_0-of-1.json").exists()


BEAM = "runner=DirectRunner,direct_num_workers=2"
# A benchmark-style database (3 folders: benchmark split 0 trains on folder 0, validates on 1, tests on 2).
FAE = (
  "--config.data.name=fae",
  "--config.data.builder_config=clap",
  "--config.data.split=0",
  "--config.data.reader=grain",
  "--config.data.grain_workers=2",
  "--config.num_train_steps=120",
  "--config.eval_every_steps=120",
  "--config.checkpoint_every_steps=60",
  "--config.log_every_steps=20",
)


@pytest.mark.slow
def test_a_fae_database_prepared_on_beam_trains_evaluates_and_resumes_bitwise_after_sigterm_with_no_array_cache(
  compilation_cache, tmp_path
):
  root = tmp_path / "clap"
  json_path, images = make_fae_database(root, "clap2016_aligned", subjects_per_folder=4, images_per_subject=4)
  builder = prepare_fae(json_path, images, root / "tfds", "clap", beam_options=BEAM)
  assert streaming.stored_format(builder) == streaming.ARRAY_RECORD
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {f"folder{f}": 16 for f in range(3)}
  arrays = str(tmp_path / "arrays")

  def command(workdir):
    return train_command(workdir, *FAE, data_dir=str(root / "tfds"), cache=compilation_cache, arrays=arrays)

  uninterrupted = subprocess.run(
    command(tmp_path / "uninterrupted"), env=cpu_env(), capture_output=True, text=True, timeout=600
  )
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
  assert "through Grain with 2 workers" in uninterrupted.stdout
  assert "read 1920 records, 16 distinct (records 0-15) of 16" in uninterrupted.stdout
  workdir = tmp_path / "preempted"
  returncode, out, err = preempt(command(workdir), workdir, 1.0)
  assert returncode == 0, err[-3000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
  assert 0 < steps[-1] < 120 and f"saved checkpoint at step {steps[-1]}" in out, out[-2000:]
  assert list((workdir / "checkpoints" / str(steps[-1]) / "input").glob("process_0-of-1.json"))
  rerun = subprocess.run(command(workdir), env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0 and f"resuming from step {steps[-1]}" in rerun.stdout, rerun.stderr[-3000:]
  jax.tree.map(np.testing.assert_array_equal, checkpoint(workdir, 120), checkpoint(tmp_path / "uninterrupted", 120))
  for run in (workdir, tmp_path / "uninterrupted"):  # evaluated on the validation and test folders
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 120 and all(np.isfinite(final[k]) for k in ("eval_mae", "test_mae", "baseline_mae"))
  assert not (tmp_path / "arrays").exists()  # no array cache written: eval streams too


RACE = """
import sys, threading
from agejax.data import streaming
record = open(sys.argv[1], "rb").read()
start = threading.Barrier(4)
def read():
  start.wait()  # four read threads meet the first record at once, as a Grain worker's do
  streaming.parse_example(record)
threads = [threading.Thread(target=read) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


@pytest.mark.slow  # five fresh interpreters, ~2 s each
def test_read_threads_meeting_their_first_record_together_do_not_crash_the_worker(tmp_path):
  # Before the decoders were set up under a lock, this crashed with SIGSEGV in 30 of 30 fresh processes.
  import io

  from PIL import Image

  png = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(png, format="PNG")
  example = streaming._decoders()[0]()
  feature = example.features.feature
  feature["image"].bytes_list.value.append(png.getvalue())
  feature["age"].int64_list.value.append(30)
  feature["age_std"].float_list.value.append(0.0)
  record = tmp_path / "record.bin"
  record.write_bytes(example.SerializeToString())
  for _ in range(5):
    done = subprocess.run(["python", "-c", RACE, str(record)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
