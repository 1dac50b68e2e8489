"""Shared fixtures: a tiny generated demo dataset, prepared once per test session."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

try:
  # torch must load before TensorFlow: the reverse order segfaults (torch 2.14, TensorFlow 2.21).
  import torch  # noqa: F401
except ImportError:
  pass

import jax
import numpy as np

from agejax.serving.local import free_port
from configs import vgg16_kl

# Bytecode caches (__pycache__/, ignored by git) even where PYTHONDONTWRITEBYTECODE is set, as on this
# project's machines: without them every xdist worker compiles agejax and rewrites the tests' asserts
# again (8 of a worker's 21 s before its first test), and every script the tests start compiles agejax.
sys.dont_write_bytecode = False

pytest_plugins = ("fae_fixtures",)  # fae_agedb: a prepared benchmark-style database


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the prepared `tiny` demo dataset."""
  from agejax.data import datasets

  path = tmp_path_factory.mktemp("tensorflow_datasets")
  datasets.prepare("demo", str(path), builder_config="tiny")
  return str(path)


@pytest.fixture(scope="session")
def record_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the tiny demo prepared as ArrayRecord (the same examples as `data_dir`'s)."""
  from agejax.data import datasets

  tfds = datasets.import_tfds()
  path = str(tmp_path_factory.mktemp("array_record"))
  builder = datasets.get_builder("demo", path, "tiny")
  builder.download_and_prepare(file_format="array_record", download_config=tfds.download.DownloadConfig())
  return path


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory) -> str:
  """A JAX compilation cache shared by this session's subprocesses: the same tiny model compiles once."""
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_compilation_cache"
  # scripts/mutation.py runs the same tests hundreds of times: one cache across its sessions.
  path = Path(os.environ.get("AGEJAX_TEST_COMPILATION_CACHE", path))
  path.mkdir(parents=True, exist_ok=True)
  return str(path)


def array_cache(data_dir: str) -> str:
  """The local array cache beside a test session's local TFDS data_dir (never the user's ~/.cache)."""
  return str(Path(data_dir).parent / "agejax_arrays")


@pytest.fixture
def tiny_config(data_dir, compilation_cache):
  """The `:tiny` training config reading the session's tiny demo dataset."""
  config = vgg16_kl.get_config("tiny")
  config.data.data_dir = data_dir
  config.data.cache_dir = array_cache(data_dir)
  config.compilation_cache_dir = compilation_cache  # never the user's ~/.cache
  return config


def data_settings(data):
  """The data settings (settings.DataSettings) of a config's `data` section (a ConfigDict or dict)."""
  from agejax import settings

  return settings.DataSettings(**dict(data))


def labelled_split(config, split: str, *, training: bool = False):
  """A config's split with its labels' out-of-range policy applied (data.pipeline.load_labelled_split)."""
  from agejax import settings
  from agejax.data import pipeline

  cfg = settings.Settings.from_config(config)
  return pipeline.load_labelled_split(cfg.data, cfg.labels, split, training=training)


ROOT = Path(__file__).resolve().parents[1]


def train_command(
  workdir, *overrides: str, data_dir: str, cache: str = "", variant: str = "tiny", arrays: str = ""
) -> list[str]:
  """The command line of scripts/train.py on the tiny demo data, with `--config.KEY=VALUE` overrides.

  `arrays` is the local array cache; by default the one beside a local `data_dir`.
  """
  return [
    sys.executable,
    str(ROOT / "scripts" / "train.py"),
    "--config",
    f"{ROOT}/configs/vgg16_kl.py:{variant}",
    "--workdir",
    str(workdir),
    f"--config.data.data_dir={data_dir}",
    f"--config.compilation_cache_dir={cache}",
    f"--config.data.cache_dir={arrays or array_cache(data_dir)}",
    *overrides,
  ]


def start_processes(workdir, *overrides: str, data_dir: str, cache: str, count: int = 2) -> list:
  """Starts `count` scripts/train.py processes of one multi-process run (2 CPU devices each) on loopback."""
  import subprocess

  port = free_port()
  return [
    subprocess.Popen(
      train_command(
        workdir,
        *overrides,
        "--coordinator_address",
        f"127.0.0.1:{port}",
        "--num_processes",
        str(count),
        "--process_id",
        str(i),
        data_dir=data_dir,
        cache=cache,
      ),
      env=cpu_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(count)
  ]


def preempt(command: list[str], workdir, delay: float) -> tuple[int, str, str]:
  """Starts `command` (scripts/train.py), sends SIGTERM `delay` s after its loop started; (return code, out, err)."""
  import signal
  import subprocess
  import time

  proc = subprocess.Popen(command, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    while not list(Path(workdir).glob("events.out.tfevents.*")):  # the loop has started
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
  finally:
    proc.kill()  # no stray trainer if it did not stop
  return proc.returncode, out, err


def cpu_env(devices: int = 1) -> dict[str, str]:
  """Environment for a subprocess that sees `devices` CPU devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def checkpoint(workdir, step: int) -> dict:
  """Restores a checkpoint as NumPy arrays with plain Orbax, as anyone could without agejax."""
  import orbax.checkpoint as ocp

  path = Path(workdir) / "checkpoints" / str(step) / "default"
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), checkpointer.metadata(path).item_metadata.tree
  )
  return checkpointer.restore(path, restore_args=as_numpy)


# Two routes to the same model's distributions (Predictor, an export, the SavedModel, the server) agree
# to float32 rounding: measured 5e-8 for model.jax and 2e-7 for the SavedModel on the learned tiny run,
# where one grey level of brightness moves a probability by ~5e-3 (test_export proves this sees it).
DISTRIBUTION_ATOL = 1e-6


def assert_same_distributions(got, expected) -> None:
  """Asserts two [..., K] age distributions are the same model's answer on the same pixels."""
  np.testing.assert_allclose(
    np.asarray(got, np.float64), np.asarray(expected, np.float64), atol=DISTRIBUTION_ATOL, rtol=0
  )


def assert_close_relative(a, b, rtol: float) -> None:
  """||a - b|| <= rtol ||b|| over all parameters together.

  Reductions over 8 devices add the same gradients in another order; float32 rounding then differs
  by ~1e-7 relative, and Adam, which normalises each gradient, can grow that on a parameter whose
  gradient nearly cancels (a bias near zero), so single small tensors are not compared alone.
  """
  diff = sum(
    float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  norm = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert np.sqrt(diff) <= rtol * np.sqrt(norm), np.sqrt(diff / norm)


def max_relative_error(got, expected) -> float:
  """max |got - expected| / max |expected|, in float64: one scale for a whole vector of logits or features."""
  expected = np.asarray(expected, np.float64)
  scale = np.abs(expected).max()
  assert scale > 0, "the reference is all zeros"
  return float(np.abs(np.asarray(got, np.float64) - expected).max() / scale)


def randomise_batch_norms(net):
  """Fresh torch BN layers are an identity in eval mode: make every scale, shift and running statistic count."""
  import torch

  with torch.no_grad():
    for layer in net.modules():
      if isinstance(layer, torch.nn.BatchNorm2d):
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_(0.0, 0.1)
        layer.running_mean.normal_(0.0, 0.1)
        layer.running_var.uniform_(0.5, 2.0)
  return net


def one_train_step(config, steps_per_epoch: int = 10):
  """(learner, the state at step 0, the state after one train step) of `config` on a seeded random tiny batch."""
  from agejax import metrics
  from agejax.training import configuration, learner

  fns, state, _ = learner.create(configuration.validate(config), steps_per_epoch=steps_per_epoch)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (16, 40, 40, 3), dtype=np.uint8),
    "age": rng.integers(1, 91, 16).astype(np.float32),
    "age_std": np.zeros(16, np.float32),
  }
  after, _, _ = jax.jit(fns.train_step)(state, metrics.zeros(), batch)
  return fns, state, after


@pytest.fixture(scope="session", autouse=True)
def _own_compilations_cached() -> None:
  """With AGEJAX_TEST_COMPILATION_CACHE set, the tests' own compilations use that cache too.

  The variable keeps one JAX compilation cache across test sessions (scripts/mutation.py, a developer
  rerunning the fast tier); without it each session compiles everything, as CI does. A fixture, not
  pytest_configure: only the processes that run tests compile (xdist's controller does not).
  """
  if cache := os.environ.get("AGEJAX_TEST_COMPILATION_CACHE"):
    from agejax import parallel

    Path(cache).mkdir(parents=True, exist_ok=True)
    parallel.enable_compilation_cache(cache)


TINY_RUN_FIRST = "tests/test_tiny_run.py::test_the_shared_run_learned_and_its_export_holds_every_format"


def pytest_collection_modifyitems(items) -> None:
  """The shared tiny run's test first and the modules that read the run last, the rest in between.

  xdist hands each worker a block of consecutive tests: the first worker trains and exports (a minute,
  three on a first run) while the other runs unit tests, and no worker waits on the run's lock.
  """

  def place(item) -> int:
    if item.nodeid == TINY_RUN_FIRST:
      return 0
    module = getattr(item, "module", None)
    return 2 if module is not None and "tiny_run" in vars(module) else 1

  items.sort(key=place)  # stable: each group keeps pytest's order


def pytest_sessionfinish(session):
  """One gc pass and gc.freeze() before an xdist worker reports that it finished.

  execnet interrupts a finished worker after 5 s, and pytest's later gc passes over the ~800k live
  objects of TensorFlow, torch and JAX took longer on a loaded machine: the SIGINT then landed in
  jax's gc callback and printed an unraisable KeyboardInterrupt after [100%]. Frozen objects are skipped.
  """
  import gc

  gc.collect()
  gc.freeze()
