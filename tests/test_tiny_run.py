"""The session's shared tiny run (tests/tiny_run.py): it learned, and its export holds every format.

conftest.py runs this test first, so one xdist worker trains and exports while the other runs the unit
tests, and the modules that read the run come last.
"""

import json

import tiny_run

from agejax.training import train


def test_the_shared_run_learned_and_its_export_holds_every_format(request, tmp_path_factory):
  out, manifest = tiny_run.tiny_export(request, tmp_path_factory)  # trains first
  final = json.loads((tiny_run.shared_folder(tmp_path_factory) / tiny_run.RUN_DIR / train.FINAL_METRICS).read_text())
  assert final["step"] == tiny_run.STEPS and final["nonfinite_steps"] == 0
  assert final["eval_mae"] <= tiny_run.LEARNED * final["baseline_mae"], final
  assert manifest["step"] in tiny_run.CHECKPOINTS  # the best checkpoint
  assert {"model.jax", "saved_model", "model.onnx"} <= {p.name for p in out.iterdir()}
