"""Published weights in: the registered backbone whose converter reads them, and their files read safely.

Each backbone registers converters by architecture name (models.Backbone.converters); `find` and
`backbone_for` pick the one for a state dict or an architecture; PyTorch files are read as tensors only
(never unpickled code), Keras HDF5 files as "layer/weight" arrays.
"""

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from agejax import errors, models, storage


def find(state_dict: Mapping[str, Any]) -> tuple[models.Backbone, str]:
  """(the backbone, the architecture name) whose converter reads this state dict, or a one-line error."""
  for name in models.names():
    backbone = models.get(name)
    arch = backbone.identify(state_dict) if backbone.identify else None
    if arch is not None:
      return backbone, arch
  raise errors.UserError(
    f"no registered backbone ({', '.join(models.names())}) recognises this state dict; "
    f"its first keys: {', '.join(list(state_dict)[:4])}"
  )


def backbone_for(arch: str) -> models.Backbone:
  """The registered backbone with a converter for published architecture `arch` (e.g. "vgg16_bn")."""
  for name in models.names():
    if arch in models.get(name).converters:
      return models.get(name)
  known = sorted(a for n in models.names() for a in models.get(n).converters)
  raise errors.UserError(f"no converter for architecture {arch!r}; known: {', '.join(known)}")


def from_published(state_dict: Mapping[str, Any], arch: str, *, dtype: Any = jnp.float32) -> nnx.Module:
  """Converts published weights of architecture `arch` (e.g. torchvision's vgg16_bn) with its backbone's converter."""
  return backbone_for(arch).converters[arch](state_dict, dtype=dtype)


def torchvision_converter(name: str) -> Callable[..., nnx.Module]:
  """`<arch>_from_torchvision(state_dict, dtype=...)` for every registered architecture (the documented names)."""
  # agejax.convert hands this on as its module __getattr__: an unknown name is the package's missing attribute.
  arch, _, source = name.partition("_from_")
  if source == "torchvision" and any(arch in models.get(n).converters for n in models.names()):
    return functools.partial(from_published, arch=arch)
  raise AttributeError(f"module {__package__!r} has no attribute {name!r}")


def load_torch_checkpoint(path: storage.Location) -> dict[str, np.ndarray]:
  """Reads a state dict from .pth/.pt (tensors only, never arbitrary pickles) or .safetensors."""
  checkpoint = storage.path(path)
  if not checkpoint.is_file():
    raise errors.MissingInput(f"{checkpoint}: no such checkpoint file")
  if checkpoint.suffix == ".safetensors":
    from safetensors.numpy import load

    try:
      return load(checkpoint.read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) on a bad header
      raise errors.UserError(f"{checkpoint}: not a readable safetensors file ({e})") from None
  if checkpoint.suffix not in (".pth", ".pt"):
    raise errors.UserError(f"{checkpoint}: unsupported checkpoint format; expected .pth, .pt, .safetensors or .h5")
  import pickle

  import torch

  try:
    with checkpoint.open("rb") as f:
      loaded = torch.load(f, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
    # torch's message spans paragraphs; its one informative sentence follows "WeightsUnpickler error:".
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not|\n\n|$)", str(e), re.DOTALL)
    reason = detail.group(1).strip() if detail else str(e).splitlines()[0]
    raise errors.UserError(
      f"{checkpoint}: refused: not a tensors-only PyTorch checkpoint ({reason}); "
      "agejax loads .pth files with weights_only=True and never unpickles code"
    ) from None
  if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
    loaded = loaded["state_dict"]
  if not isinstance(loaded, Mapping):
    raise errors.UserError(f"{checkpoint}: holds a {type(loaded).__name__}, not a state dict")
  not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
  if not_tensors:
    raise errors.UserError(f"{checkpoint}: not a state dict; these entries are not tensors: {', '.join(not_tensors)}")
  return {k: models.to_numpy(v) for k, v in loaded.items()}


def load_keras_h5(path: storage.Location) -> dict[str, np.ndarray]:
  """Reads a Keras 2 HDF5 weights file (model.save_weights, or model.save's model_weights) as "layer/weight" -> array.

  E.g. keras-vggface's rcmalli_vggface_tf_vgg16.h5: group conv1_1 lists its weight_names
  ("conv1_1/kernel:0", "conv1_1/bias:0"); the result has "conv1_1/kernel" and "conv1_1/bias".
  """
  import h5py

  file = storage.path(path)
  if not file.is_file():
    raise errors.MissingInput(f"{file}: no such weights file")
  try:
    with file.open("rb") as raw, h5py.File(raw, "r") as h5:
      root = h5["model_weights"] if "model_weights" in h5 else h5
      if "layer_names" not in root.attrs:
        raise errors.UserError(f"{file}: not a Keras HDF5 weights file (no layer_names attribute)")
      weights = {}
      for layer in (_text(n) for n in root.attrs["layer_names"]):
        for name in (_text(n) for n in root[layer].attrs.get("weight_names", [])):
          weights[f"{layer}/{_weight_kind(name)}"] = np.asarray(root[layer][name])
  except OSError as e:  # h5py's error for a file that is not HDF5
    raise errors.UserError(f"{file}: not a readable HDF5 file ({e})") from None
  return weights


def _weight_kind(name: str) -> str:
  """A Keras weight's kind: 'conv1_1/kernel:0' -> 'kernel'; Keras 1's 'conv1_1_W:0' / '_b:0' -> 'kernel' / 'bias'."""
  base = name.rsplit("/", 1)[-1].split(":")[0]
  return {"W": "kernel", "b": "bias"}.get(base.rsplit("_", 1)[-1], base) if "/" not in name else base


def _text(value: Any) -> str:
  """h5py attributes hold names as bytes or str."""
  return value.decode() if isinstance(value, bytes) else str(value)


def load_weights_file(path: storage.Location) -> dict[str, np.ndarray]:
  """Reads published weights: a PyTorch state dict (.pth, .pt, .safetensors) or a Keras HDF5 file (.h5)."""
  if str(path).endswith((".h5", ".hdf5")):
    return load_keras_h5(path)
  return load_torch_checkpoint(path)
