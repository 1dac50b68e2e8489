"""notebooks/model-analytics.ipynb runs headless against a tiny trained workdir and draws its plots."""

from pathlib import Path

import nbclient
import nbformat
import pytest
import tiny_run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "model-analytics.ipynb"


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory):
  """The session's tiny run, copied for this module."""
  return tiny_run.tiny_run(request, tmp_path_factory)[1]


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes_and_draws_its_plots(workdir, monkeypatch):
  monkeypatch.setenv("AGEJAX_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  ).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  # Age histogram, face grid, normalisation, >= 1 distribution figure, three evaluation plots, groups, calibration.
  assert len(pngs) >= 9
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert str(workdir) in text and "MAE" in text and "largest MAE gap" in text and "90% interval coverage" in text
  # The groups cell prints the table's groups part from its heading, not a stray tail of it.
  groups = next(o["text"] for c in nb.cells if "groups_start" in c.source for o in c.outputs if "text" in o)
  assert groups.startswith("  MAE by group, 95% bootstrap interval\n"), groups[:200]
  assert (workdir / "eval" / "test.json").exists()
