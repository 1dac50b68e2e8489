"""model.onnx: onnxruntime alone (no agejax, flax or jax) answers as Predictor does; what can't convert is named."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_run

from agejax.inference import export, prediction

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # onnxruntime's float32 against XLA's: measured ~5e-8 on the tiny run


GUIDE = ROOT / "docs/guides/export-and-serve.md"


def guide_snippet() -> str:
  """The export guide's onnxruntime lines, exactly as printed; `crops` is the user's batch."""
  block = re.search(r"```python\n(import onnxruntime as ort\n.*?)```", GUIDE.read_text(), re.S)
  assert block, f"{GUIDE.relative_to(ROOT)} shows no onnxruntime snippet"
  return block.group(1)


SNIPPET = guide_snippet()

# Runs the snippet at batch sizes 1 and 5 in a process that imports numpy and onnxruntime only.
ONNX_ONLY = """
import sys
import numpy as np
model, crops_file, result, snippet = sys.argv[1:5]
x = np.load(crops_file)
out = []
for crops in (x[:1], x):
  scope = {"crops": crops}
  exec(snippet.replace("exports/demo/model.onnx", model), scope)
  out.append(scope["probabilities"])
loaded = [m for m in ("agejax", "flax", "jax", "tensorflow") if m in sys.modules]
assert not loaded, loaded
np.save(result, np.concatenate(out))
"""


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory) -> Path:
  """The session's tiny run, copied for this module."""
  return tiny_run.tiny_run(request, tmp_path_factory)[1]


@pytest.mark.slow
def test_model_onnx_runs_in_onnxruntime_alone_and_matches_the_predictor(workdir, tmp_path):
  out = tmp_path / "export"
  manifest = export.export_workdir(workdir, out, saved_model=False)
  assert manifest["files"]["onnx"] == export.ONNX_FILE and "onnx_skipped" not in manifest
  predictor = prediction.Predictor(workdir)
  size = predictor.input_size
  x = np.random.default_rng(1).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
  x[1], x[2] = 0, 255  # the ends of the uint8 range
  np.save(tmp_path / "crops.npy", x)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # agejax could not even be imported
  proc = subprocess.run(
    [sys.executable, "-c", ONNX_ONLY, str(out / export.ONNX_FILE), tmp_path / "crops.npy", tmp_path / "o.npy", SNIPPET],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "o.npy")
  expected = predictor(x)
  assert got.shape == (6, len(predictor.bins)) and got.dtype == np.float32
  np.testing.assert_allclose(got[:1], expected[:1], atol=ATOL, rtol=0)  # batch 1
  np.testing.assert_allclose(got[1:], expected, atol=ATOL, rtol=0)  # batch 5: the batch is dynamic
  on_disk = json.loads((out / export.MANIFEST_FILE).read_text())
  assert on_disk["sha256"][export.ONNX_FILE] == export.manifest.sha256(out / export.ONNX_FILE)


def _unconvertible(monkeypatch) -> None:
  """jax2onnx without its plug-in for `exp` (softmax's)."""
  from jax2onnx.plugins import plugin_system

  plugin_system.import_all_plugins()
  monkeypatch.delitem(plugin_system.PLUGIN_REGISTRY, "exp")


def _rank4_max_pool(monkeypatch) -> None:
  """Max-pools left to jax2onnx, which writes a MaxPool over 4 axes that onnxruntime cannot run."""
  monkeypatch.setattr(export.onnx, "_tiles", lambda params, shape: False)


@pytest.mark.slow
@pytest.mark.parametrize(
  ("breaks", "message"),
  [
    (_unconvertible, "jax2onnx cannot convert the op 'exp'"),
    (_rank4_max_pool, "onnxruntime cannot run the op 'MaxPool'"),
  ],
)
def test_an_op_that_cannot_go_to_onnx_is_named_and_the_other_formats_are_written(
  workdir, tmp_path, monkeypatch, caplog, breaks, message
):
  breaks(monkeypatch)
  out = tmp_path / "export"
  manifest = export.export_workdir(workdir, out, saved_model=False)
  assert manifest["onnx_skipped"].startswith(message), manifest["onnx_skipped"]
  assert manifest["files"]["onnx"] is None and not (out / export.ONNX_FILE).exists()
  assert f"{export.ONNX_FILE} not written: {message}" in caplog.text
  assert sorted(p.name for p in out.iterdir()) == [export.MANIFEST_FILE, export.MODEL_FILE]
  export.verify(out)  # the rest is a whole export
