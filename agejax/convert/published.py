"""Published weights -> a registered backbone's arrays plus the input they expect, and those arrays on disk.

Each backbone registers converters by architecture name (models.Backbone.converters); this package
finds the one for a state dict, reads PyTorch files safely (tensors only) and Keras HDF5 files, writes the converted
arrays with agejax_weights.json (architecture, backbone, input spec, source), and overlays them on
a new age model, whose head stays new. `<arch>_from_torchvision(state_dict)` names each converter.
"""

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from agejax import errors, models, storage

PyTree = Any
META_FILE = "agejax_weights.json"
WEIGHTS_DIR = "weights"  # the Orbax checkpoint inside save_converted's output directory


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


def __getattr__(name: str) -> Callable[..., nnx.Module]:
  """`<arch>_from_torchvision(state_dict, dtype=...)` for every registered architecture (the documented names)."""
  arch, _, source = name.partition("_from_")
  if source == "torchvision" and any(arch in models.get(n).converters for n in models.names()):
    return functools.partial(from_published, arch=arch)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _numpy_tree(tree: PyTree) -> PyTree:
  """Host copies of every leaf."""
  return jax.tree.map(np.asarray, tree)


def save_converted(
  model: nnx.Module,
  output_dir: storage.Location,
  *,
  arch: str,
  backbone: str,
  input_spec: models.InputSpec = models.IMAGENET,
  source: str = "",
) -> epath.Path:
  """Writes a converted model's weights as a plain-Orbax checkpoint plus agejax_weights.json; returns output_dir.

  Args:
    model: the converted model (its original head included).
    output_dir: a new folder (a path or a gs:// URL).
    arch: the published architecture (e.g. "vgg16_bn").
    backbone: the registered backbone that uses these weights (config.model.name).
    input_spec: the input the weights expect; trainers record it in WORKDIR/inference.json.
    source: where the weights came from (a file or a published name).

  Returns:
    output_dir.

  Parameter groups in the model's `fresh_groups` (a notop file's missing layers) are not written: a
  model built on these weights initialises them anew, as it does its head.
  """
  import orbax.checkpoint as ocp

  folder = storage.path(output_dir)  # Orbax wants local paths absolute
  if (folder / WEIGHTS_DIR).exists():
    raise errors.UserError(f"{folder / WEIGHTS_DIR} already exists; choose a new output directory")
  storage.check_writable(folder, "--output")
  fresh = tuple(getattr(model, "fresh_groups", ()))
  _, params, rest = models.split_model(model)
  params = {k: v for k, v in params.items() if k not in fresh}
  rest = {k: v for k, v in rest.items() if k not in fresh}
  # numpy leaves: the checkpoint then restores on any host and device layout without a target.
  tree = {"params": _numpy_tree(params), "model_state": _numpy_tree(rest)}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(folder / WEIGHTS_DIR, tree)
  head = jax.tree.leaves(params.get(models.get(backbone).head, {}))
  meta = {
    "arch": arch,
    "fresh": list(fresh),
    "backbone": backbone,
    "num_classes": int(head[-1].shape[-1]) if head else None,
    "input_spec": input_spec.to_json(),
    "source": source,
  }
  storage.write_json(folder / META_FILE, meta)
  return folder


def _int_keys(tree: PyTree) -> PyTree:
  """Orbax stores dict keys as strings; nnx.to_pure_dict uses ints for list indices."""
  if not isinstance(tree, Mapping):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def load_converted(path: storage.Location) -> tuple[dict, dict, dict]:
  """Reads save_converted's output: (params, model_state, meta), pure dicts of numpy arrays."""
  import orbax.checkpoint as ocp

  meta = load_meta(path)
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(storage.path(path) / WEIGHTS_DIR)
  return _int_keys(tree["params"]), _int_keys(tree["model_state"]), meta


def input_spec(path: storage.Location) -> models.InputSpec:
  """The input converted weights expect (agejax_weights.json); ImageNet's for weights converted before specs."""
  return models.InputSpec.from_json(load_meta(path).get("input_spec"))


def load_meta(path: storage.Location) -> dict[str, Any]:
  """save_converted's agejax_weights.json, or a one-line error for a folder that lacks it."""
  meta_file = storage.path(path) / META_FILE
  if not meta_file.is_file():
    raise errors.MissingInput(f"{path}: no {META_FILE}; not a directory written by convert_weights.py")
  return storage.read_json_object(meta_file)


def _overlay_backbone(
  kind: str, converted: PyTree, given: PyTree, fresh: tuple[str, ...], mismatches: list[str]
) -> PyTree:
  """Returns `given` with every leaf outside the `fresh` groups taken from `converted`; appends shape mismatches."""
  flat_given = traverse_util.flatten_dict(given)
  flat_converted = {k: v for k, v in traverse_util.flatten_dict(converted).items() if k[0] not in fresh}
  keys = [k for k in flat_given if k[0] not in fresh] + [k for k in flat_converted if k not in flat_given]
  for key in keys:
    new, old = flat_converted.get(key), flat_given.get(key)
    if new is None or old is None or new.shape != old.shape:
      shape = lambda a: "absent" if a is None else tuple(a.shape)
      mismatches.append(f"{kind}/{'/'.join(map(str, key))}: converted {shape(new)}, model {shape(old)}")
    else:
      flat_given[key] = np.asarray(new, old.dtype)
  return traverse_util.unflatten_dict(flat_given)


def backbone_from_converted(
  path: storage.Location, params: PyTree, model_state: PyTree, head: str = "head"
) -> tuple[PyTree, PyTree]:
  """Returns copies of the age model's params and model_state with the converted backbone and the given head.

  `head` is the top-level parameter group that stays new (the backbone's `Backbone.head`), as do the
  groups the converted file lacks (meta "fresh", e.g. a notop file's fully connected layers).
  """
  new_params, new_state, meta = load_converted(path)
  fresh = (head, *meta.get("fresh", ()))
  mismatches: list[str] = []
  params = _overlay_backbone("params", new_params, params, fresh, mismatches)
  model_state = _overlay_backbone("model_state", new_state, model_state, fresh, mismatches)
  if mismatches:
    more = f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else ""  # a width mismatch hits every layer
    raise errors.UserError(
      f"{path} holds full-width {meta['arch']} weights that do not fit this model (use the converted "
      f"architecture's width and options, e.g. model.width_multiplier=1.0): {'; '.join(mismatches[:3])}{more}"
    )
  return params, model_state
