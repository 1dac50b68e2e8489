"""The model a server runs: a training workdir's checkpoint or a folder written by scripts/export.py."""

from typing import TYPE_CHECKING

from agejax import errors, storage

if TYPE_CHECKING:  # imported where used: serving an export imports no Flax or TensorFlow
  from agejax.inference.export import ExportedPredictor
  from agejax.inference.prediction import Predictor


def load_model(
  workdir: storage.Location | None,
  export: storage.Location | None,
  checkpoint: str = "best",
  max_batch: int = 32,
  *,
  calibrated: bool = True,
  flip: bool = False,
) -> "Predictor | ExportedPredictor":
  """Restores the model to serve: a training workdir's checkpoint, or an exported model.

  Args:
    workdir: a training workdir (exclusive with `export`).
    export: a folder written by scripts/export.py.
    checkpoint: the workdir's checkpoint: 'best', 'latest' or a step number.
    max_batch: the most faces the server puts in one model call.
    calibrated: apply the workdir's calibration.json calibration (an export has its own baked in).
    flip: average each face's distribution with its mirror image's, calibrated by calibration.json's
      flip temperature; an export predicts as it was exported, and refuses `flip` if made without it.

  Returns:
    An `prediction.Predictor` or an `export.ExportedPredictor`.
  """
  if (workdir is None) == (export is None):
    raise errors.UserError("give exactly one of --workdir DIR (a training workdir) or --export OUT (export.py's)")
  if export is not None:
    if not calibrated:
      raise errors.UserError("--no-calibration applies to --workdir: an export carries its temperature (export.py)")
    from agejax.inference import export as exporting

    exported = exporting.ExportedPredictor(export, batch_size=max_batch)
    if flip and not exported.flip:
      raise errors.UserError(
        f"--flip: {export} was exported without flip averaging; export it with --flip (an export predicts as it "
        f"was exported)"
      )
    return exported
  from agejax.inference import prediction

  assert workdir is not None  # exactly one of the two was given, and it is not export
  return prediction.Predictor(workdir, checkpoint, batch_size=max_batch, calibrated=calibrated, flip=flip)
