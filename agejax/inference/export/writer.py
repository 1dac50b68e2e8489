"""`export_workdir`: a trained workdir's checkpoint to an export folder, every registered format and its manifest.

The folder is staged beside its place and swapped in whole (`storage.staged_folder`), and only once
the new export has loaded and passed its checks, so a failed or killed export leaves the previous
export or nothing.
"""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from agejax import errors, storage
from agejax.inference.export import jax_export, loading, manifest, registry


def _follow_links(out: epath.Path) -> epath.Path:
  """The folder a local output names through its symbolic links: an export replaces it, and the links stay.

  Swapping the link itself would put a folder where the link was and leave the link aside, dangling
  or pointing at the old export; a loop of links is refused in one line.
  """
  if storage.is_url(out):
    return out
  real = os.path.realpath(out)  # a dangling link resolves to the folder it names, made by the export
  if os.path.islink(real):  # realpath leaves a loop unresolved
    raise errors.UserError(f"export folder {out} is a loop of symbolic links: give a folder, or a link to one")
  return epath.Path(real)


def _check_destination(out: epath.Path) -> None:
  """Refuses, before any work, an output that is a file, cannot be written, or holds more than an export."""
  if out.exists():
    if not out.is_dir():
      raise errors.UserError(f"export folder {out} is not writable: it is a file")
    entries = {manifest.MANIFEST_FILE, *(fmt.entry for fmt in registry.formats())}  # all an export folder may hold
    foreign = sorted(p.name for p in out.iterdir() if p.name not in entries)
    if foreign:
      raise errors.UserError(
        f"export folder {out} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, which no "
        f"export writes: give a new or empty folder (an export replaces its folder whole)"
      )
  if storage.is_url(out):
    storage.check_writable(out.parent, "export folder")  # object stores have no folders to create
    return
  existing = out.parent
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    reason = "a file" if not existing.is_dir() else "read-only"
    raise errors.UserError(f"export folder {out} is not writable: {existing} is {reason}")


def export_workdir(
  workdir: storage.Location,
  output: storage.Location,
  checkpoint: str | int = "best",
  *,
  calibrated: bool = True,
  flip: bool = False,
  saved_model: bool = True,
  onnx: bool = True,
  triton: bool = True,
  platforms: Sequence[str] = jax_export.PLATFORMS,
) -> dict[str, Any]:
  """Exports a trained workdir's checkpoint to OUT/model.jax, saved_model/, model.onnx, triton/ and manifest.json.

  The exported function is the evaluation path's preprocessing (resize to the model's image size,
  normalise), the model (with `flip`, the mean of each face's and its mirror image's distributions)
  and the tempered distribution (`labels.tempered`), on uint8 crops of the stored face size S.
  The folder is replaced whole, and only once the new export has loaded and passed its checks.

  Args:
    workdir: the training workdir (a path or a gs:// URL).
    output: the export folder (a path or a gs:// URL): new, empty, or an earlier export, which is replaced.
      A symbolic link is followed: the folder it points to is replaced (or made), and the link kept.
    checkpoint: 'best' (lowest eval MAE), 'latest' or a step number.
    calibrated: apply WORKDIR/calibration.json's calibration of this way of predicting when the workdir has one.
    flip: every format averages each face's distribution with its mirror image's (and applies the
      flip way's calibration); the manifest records it.
    saved_model: also write the TensorFlow SavedModel.
    onnx: also write model.onnx (skipped with a warning naming the op when jax2onnx or onnxruntime cannot).
    triton: also write OUT/triton/, a Triton model repository of model.onnx (skipped, with the reason, without
      model.onnx or tritonclient).
    platforms: where model.jax and the SavedModel may run (a subset of 'cpu', 'cuda', 'rocm', 'tpu').

  Returns:
    The manifest (also written to OUT/manifest.json), with `onnx_skipped` (`triton_skipped`) saying why when
    model.onnx (triton/) is absent.
  """
  from agejax.inference import prediction  # the model code: ExportedPredictor must not need it

  if not storage.path(workdir).is_dir():
    raise errors.MissingInput(f"workdir {storage.path(workdir)} does not exist")
  unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
  if unknown or not platforms:
    raise errors.UserError(f"platforms={list(platforms)}: use some of cpu, cuda, rocm, tpu")
  # Every registered format but those turned off here (model.jax always: it is what a server loads).
  skip = {"saved_model": not saved_model, "onnx": not onnx, "triton": not triton}
  chosen = [fmt for fmt in registry.formats() if not skip.get(fmt.name, False)]
  for fmt in chosen:
    if fmt.prepare is not None:
      fmt.prepare()  # before any work
  out = _follow_links(storage.path(output))
  _check_destination(out)
  predictor = prediction.Predictor(workdir, checkpoint, calibrated=calibrated, flip=flip)  # nothing written before
  # The reference crop, its mirror and its negative: one fixed input recorded, three checked in ONNX (batches 1 and 2).
  crop = manifest.reference_crop(predictor.input_size)
  traced = jax_export.trace(predictor, platforms, np.concatenate([crop, crop[:, :, ::-1], 255 - crop]))
  record = manifest.build(predictor, traced, checkpoint, workdir)
  with storage.staged_folder(out, last=manifest.MANIFEST_FILE, scratch_prefix="agejax-export-") as stage:
    for fmt in chosen:
      skipped = fmt.write(traced, os.path.join(stage, fmt.entry))
      if skipped:
        logging.warning("%s not written: %s; model.jax and the other formats are", fmt.entry, skipped)
        record[f"{fmt.name}_skipped"] = skipped
    record["files"] = {
      fmt.name: fmt.entry if os.path.exists(os.path.join(stage, fmt.entry)) else None for fmt in registry.formats()
    }
    record["sha256"] = manifest.checksums(stage)
    storage.write_json(os.path.join(stage, manifest.MANIFEST_FILE), record)
    if jax_export.local_platform() in traced.exported.platforms:
      loading.verify(stage)  # what a server will check, before the export replaces anything
  return record
