"""One tiny training run per test session that has learned, shared by the xdist workers.

It is the model behind the evaluate, predict, export, serve and calibration tests: on near-uniform
distributions (an untrained model gives every age ~1%) a drift in preprocessing or a wrong
temperature hides inside any tolerance, so the run must beat the mean-age baseline clearly. The
`:tiny` config with batch norm, a batch of 32 and 300 steps (50 epochs of the 192 tiny faces) gets
an eval MAE of about 0.27x the baseline in ~15 s on 2 cores; 20 steps without batch norm got 1.0x.
"""

import fcntl
import json
import os
import shutil
from pathlib import Path

from conftest import array_cache

from agejax.training import train
from configs import vgg16_kl

STEPS = 300
CHECKPOINTS = (150, 300)  # both evaluated; the best is either
LEARNED = 0.6  # eval MAE at most this fraction of the mean-age baseline's
RUN_DIR = "agejax_tiny_run"  # in the session's shared folder


def shared_folder(tmp_path_factory) -> Path:
  """The folder every xdist worker of this session sees (the session's root), or this process's base."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def trained(request, tmp_path_factory) -> Path:
  """The session's learned tiny run (shared: read it, never write it); the first caller trains it.

  The first caller trains on its `data_dir` fixture; the others wait for it and read the same data
  (the workdir's config.json names it).
  """
  shared = shared_folder(tmp_path_factory)
  run = shared / RUN_DIR
  with open(shared / "agejax_tiny_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (run / train.FINAL_METRICS).exists():
      config = vgg16_kl.get_config("tiny")
      config.data.data_dir = request.getfixturevalue("data_dir")
      config.data.cache_dir = array_cache(config.data.data_dir)
      config.compilation_cache_dir = request.getfixturevalue("compilation_cache")
      config.model.batch_norm = True  # from scratch at this width, plain VGG16 often stalls at the mean age
      config.batch_size = 32
      config.num_train_steps = STEPS
      config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = CHECKPOINTS[0]
      shutil.rmtree(run, ignore_errors=True)
      final = train.train_and_evaluate(config, run)
      # Every test on this model assumes it learned: fail here, by name, if it ever stops doing so.
      assert final["eval_mae"] <= LEARNED * final["baseline_mae"], final
  return run


def tiny_run(request, tmp_path_factory) -> tuple[dict, Path]:
  """Returns (final metrics, a private copy of the workdir) of the session's learned tiny run."""
  run = trained(request, tmp_path_factory)
  # A private copy: each module writes its own eval/ reports.
  workdir = tmp_path_factory.mktemp("run")
  shutil.copytree(run, workdir, dirs_exist_ok=True)
  return json.loads((workdir / train.FINAL_METRICS).read_text()), workdir


def tiny_export(request, tmp_path_factory) -> tuple[Path, dict]:
  """Returns (a private copy of the folder, its manifest) of the session's export of the learned tiny run.

  Every format (model.jax, saved_model/, model.onnx), the temperature applied: the export that the
  export tests read and damage. It is written once per session (about half a minute of jax2tf and
  jax2onnx) and copied for each module, as the run is.
  """
  from agejax.inference import export

  shared = shared_folder(tmp_path_factory)
  out = shared / "agejax_tiny_export"
  with open(shared / "agejax_tiny_export.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out / "manifest.json").exists():
      run = trained(request, tmp_path_factory)  # export only reads the workdir
      shutil.rmtree(out, ignore_errors=True)
      export.export_workdir(run, out)
  copy = tmp_path_factory.mktemp("export") / "demo"
  shutil.copytree(out, copy, symlinks=True)
  return copy, json.loads((copy / "manifest.json").read_text())


def serve_flags(request, tmp_path_factory, *flags: str) -> list[str]:
  """scripts/serve.py's flags for a private copy of the learned tiny run, on the session's compilation cache."""
  _, workdir = tiny_run(request, tmp_path_factory)
  cache = request.getfixturevalue("compilation_cache")
  return ["--workdir", str(workdir), f"--compilation_cache_dir={cache}", *flags]
