"""One tiny training run per test session, shared by the xdist workers (a cold compile takes ~25 s)."""

import fcntl
import json
import os
import shutil
from pathlib import Path

from conftest import array_cache

from agejax import train
from configs import vgg16_kl


def tiny_run(request, tmp_path_factory) -> tuple[dict, Path]:
  """Returns (final metrics, a private copy of the workdir) of a 20-step `:tiny` run.

  Checkpoints at steps 10 and 20, both evaluated. The first caller trains on its `data_dir`
  fixture; the others wait for it and read the same data (the workdir's config.json names it).
  """
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: the session's root
  run = shared / "agejax_tiny_run"
  with open(shared / "agejax_tiny_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (run / train.FINAL_METRICS).exists():
      config = vgg16_kl.get_config("tiny")
      config.data.data_dir = request.getfixturevalue("data_dir")
      config.data.cache_dir = array_cache(config.data.data_dir)
      config.compilation_cache_dir = request.getfixturevalue("compilation_cache")
      config.num_train_steps = 20
      config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = 10
      shutil.rmtree(run, ignore_errors=True)
      train.train_and_evaluate(config, run)
  # A private copy: each module writes its own eval/ reports.
  workdir = tmp_path_factory.mktemp("run")
  shutil.copytree(run, workdir, dirs_exist_ok=True)
  return json.loads((workdir / train.FINAL_METRICS).read_text()), workdir
