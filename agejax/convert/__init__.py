"""Published weights -> a registered backbone's arrays plus the input they expect, and those arrays on disk.

Each backbone registers converters by architecture name (models.Backbone.converters); `published`
finds the one for a state dict, reads PyTorch files safely (tensors only) and Keras HDF5 files;
`converted` writes the converted arrays with agejax_weights.json (architecture, backbone, input spec,
source), and overlays them on a new age model, whose head stays new. `<arch>_from_torchvision(state_dict)`
names each converter.
"""

from agejax.convert.converted import (
  META_FILE,
  WEIGHTS_DIR,
  backbone_from_converted,
  input_spec,
  load_converted,
  load_meta,
  save_converted,
)
from agejax.convert.published import (
  backbone_for,
  find,
  from_published,
  load_keras_h5,
  load_torch_checkpoint,
  load_weights_file,
)
from agejax.convert.published import torchvision_converter as __getattr__  # noqa: F401  (<arch>_from_torchvision)

__all__ = [
  "META_FILE",
  "WEIGHTS_DIR",
  "backbone_for",
  "backbone_from_converted",
  "find",
  "from_published",
  "input_spec",
  "load_converted",
  "load_keras_h5",
  "load_meta",
  "load_torch_checkpoint",
  "load_weights_file",
  "save_converted",
]
