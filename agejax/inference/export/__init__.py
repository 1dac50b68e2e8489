"""A trained model for use without agejax: jax.export, a TensorFlow SavedModel, ONNX, a Triton repository, a manifest.

`export_workdir` (writer.py) writes OUT/model.jax (preprocessing + model + tempered softmax,
serialized with jax.export for CPU, CUDA and TPU: uint8 RGB face crops [B, S, S, 3], any B, ->
float32 probabilities [B, K], the weights inside; jax_export.py), OUT/saved_model/ (the same
function through jax2tf, the weights as variables; savedmodel.py), OUT/model.onnx (the same
function through jax2onnx, for onnxruntime; onnx.py), OUT/triton/ (a Triton model repository of that
model.onnx, its config.pbtxt Triton's ModelConfig; triton.py) and OUT/manifest.json (what the numbers mean,
every file's SHA-256 and a reference prediction; manifest.py). The formats are registered by name
in registry.py: a new format is a module and a line there. An export made with `flip` averages each
face's distribution with its mirror image's in every format, tempered by calibration.json's flip
temperature; the manifest records `flip` and the calibration (temperature, the 80% interval's masses
by age bucket), which `ExportedPredictor` carries.

An export is whole or absent: it is written into a sibling folder and swapped in by renames
(`storage.staged_folder`), so a failed or killed export leaves the previous export or nothing.
`ExportedPredictor` (loading.py) runs OUT/model.jax with only jax and numpy (no model code, Flax or
TensorFlow is imported to serve an export) and refuses, in one line naming the file, a manifest
with a bad field, a model.jax whose checksum or shapes differ from the manifest, or one whose
reference prediction is not what the export recorded. An export folder may come from anyone: a
file is read only once it is a regular file of bounded size inside the folder, and `verify` refuses
any file the manifest's checksums do not list.
"""

from agejax.inference.export.jax_export import MODEL_FILE, PLATFORMS, Traced
from agejax.inference.export.loading import (
  DEFAULT_BATCH_SIZE,
  REFERENCE_AGE_ATOL,
  REFERENCE_ATOL,
  ExportedPredictor,
  verify,
)
from agejax.inference.export.manifest import (
  EXPORT_COMMAND,
  FORMAT,
  INPUT_NAME,
  MANIFEST_FILE,
  OUTPUT_NAME,
  load_manifest,
  reference_crop,
)
from agejax.inference.export.onnx import ONNX_ATOL, ONNX_FILE
from agejax.inference.export.registry import Format, formats, register
from agejax.inference.export.savedmodel import SAVED_MODEL_DIR
from agejax.inference.export.triton import TRITON_DIR
from agejax.inference.export.writer import export_workdir

__all__ = [
  "DEFAULT_BATCH_SIZE",
  "EXPORT_COMMAND",
  "FORMAT",
  "INPUT_NAME",
  "MANIFEST_FILE",
  "MODEL_FILE",
  "ONNX_ATOL",
  "ONNX_FILE",
  "OUTPUT_NAME",
  "PLATFORMS",
  "REFERENCE_AGE_ATOL",
  "REFERENCE_ATOL",
  "SAVED_MODEL_DIR",
  "TRITON_DIR",
  "ExportedPredictor",
  "Format",
  "Traced",
  "export_workdir",
  "formats",
  "load_manifest",
  "reference_crop",
  "register",
  "verify",
]
