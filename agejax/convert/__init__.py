"""torchvision VGG16 / VGG16-BN state dicts -> Flax NNX `models.VGG16`, and the converted weights on disk."""

import json
import re
import sys
from collections.abc import Iterator, Mapping
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


def torchvision_arch(state_dict: Mapping[str, Any]) -> str:
  """Returns 'vgg16_bn' if the state dict has batch-norm layers (features.1 is BN there, ReLU otherwise)."""
  return "vgg16_bn" if any(k.startswith("features.1.") for k in state_dict) else "vgg16"


def _feature_layers(batch_norm: bool) -> Iterator[tuple[int, int, int, int]]:
  """Yields (conv number, torch index of the conv in `features`, in channels, out channels)."""
  index, conv, channels = 0, 0, 3
  for v in models.VGG16_LAYERS:
    if v == "M":
      index += 1
      continue
    yield conv, index, channels, v
    index += 3 if batch_norm else 2  # conv, [bn,] relu
    conv, channels = conv + 1, v


def _expected_shapes(batch_norm: bool, num_classes: int | None) -> dict[str, tuple[int | None, ...]]:
  """torchvision's key -> tensor shape; None stands for any size (the class count is read from the dict)."""
  shapes = {}
  for _, i, cin, cout in _feature_layers(batch_norm):
    shapes[f"features.{i}.weight"] = (cout, cin, 3, 3)
    shapes[f"features.{i}.bias"] = (cout,)
    if batch_norm:
      for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"features.{i + 1}.{name}"] = (cout,)
  pooled = models.POOLED_SIZE * models.POOLED_SIZE * models.VGG16_LAYERS[-2]
  shapes.update(
    {
      "classifier.0.weight": (models.HIDDEN, pooled),
      "classifier.0.bias": (models.HIDDEN,),
      "classifier.3.weight": (models.HIDDEN, models.HIDDEN),
      "classifier.3.bias": (models.HIDDEN,),
      "classifier.6.weight": (None, models.HIDDEN),
      "classifier.6.bias": (num_classes,),
    }
  )
  return shapes


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy view/copy of a numpy array or torch tensor, without importing torch for numpy input."""
  torch = sys.modules.get("torch")  # a torch.Tensor can only exist if torch was imported
  if torch is not None and isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return np.asarray(value)


def _check_keys(state_dict: Mapping[str, np.ndarray], batch_norm: bool) -> None:
  """Raises one ValueError naming every unknown, missing and mis-shaped key."""
  head = state_dict.get("classifier.6.weight")
  num_classes = head.shape[0] if head is not None and head.ndim == 2 else None
  expected = _expected_shapes(batch_norm, num_classes)
  fits = lambda shape, want: len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))
  ignored = {f"features.{i + 1}.num_batches_tracked" for _, i, _, _ in _feature_layers(batch_norm) if batch_norm}
  unknown = [k for k in state_dict if k not in expected and k not in ignored]
  missing = [k for k in expected if k not in state_dict]
  misshaped = [
    f"{k} {tuple(state_dict[k].shape)} (expected {shape})"
    for k, shape in expected.items()
    if k in state_dict and not fits(state_dict[k].shape, shape)
  ]
  problems = [
    f"{what}: {', '.join(keys)}"
    for what, keys in (("unknown keys", unknown), ("missing keys", missing), ("mis-shaped keys", misshaped))
    if keys
  ]
  if problems:
    arch = "vgg16_bn" if batch_norm else "vgg16"
    raise errors.UserError(f"not a torchvision {arch} state dict: {'; '.join(problems)}")


def vgg16_from_torchvision(
  state_dict: Mapping[str, np.ndarray | Any], *, dtype: jnp.dtype = jnp.float32
) -> models.VGG16:
  """Returns a full-width Flax VGG16 whose logits on NHWC input equal torchvision's eval() logits on NCHW.

  Args:
    state_dict: torchvision's vgg16 or vgg16_bn state dict (tensors or NumPy arrays).
    dtype: the model's compute dtype (parameters stay float32).

  Returns:
    The Flax model with the converted weights (its 1000-class ImageNet head included).
  """
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  batch_norm = torchvision_arch(sd) == "vgg16_bn"
  _check_keys(sd, batch_norm)
  f32 = lambda k: np.asarray(sd[k], np.float32)
  params, stats = {"convs": {}}, {}
  if batch_norm:
    params["norms"], stats["norms"] = {}, {}
  for n, i, _, _ in _feature_layers(batch_norm):
    params["convs"][n] = {
      "kernel": f32(f"features.{i}.weight").transpose(2, 3, 1, 0),  # OIHW -> HWIO
      "bias": f32(f"features.{i}.bias"),
    }
    if batch_norm:
      params["norms"][n] = {"scale": f32(f"features.{i + 1}.weight"), "bias": f32(f"features.{i + 1}.bias")}
      stats["norms"][n] = {"mean": f32(f"features.{i + 1}.running_mean"), "var": f32(f"features.{i + 1}.running_var")}
  # torch flattens the pooled [C, 7, 7] map channel-major; our NHWC flatten is [7, 7, C]: reorder fc1's rows.
  # One strided copy straight into a jax array: numpy reshapes would copy these 400 MB twice, ~3x slower.
  fc1 = f32("classifier.0.weight")
  cells = models.POOLED_SIZE * models.POOLED_SIZE
  fc1 = jnp.asarray(fc1.reshape(fc1.shape[0], -1, cells).transpose(2, 1, 0)).reshape(-1, fc1.shape[0])
  params["fc1"] = {"kernel": fc1, "bias": f32("classifier.0.bias")}
  params["fc2"] = {"kernel": f32("classifier.3.weight").T, "bias": f32("classifier.3.bias")}
  params["head"] = {"kernel": f32("classifier.6.weight").T, "bias": f32("classifier.6.bias")}
  num_classes = params["head"]["bias"].shape[0]
  # Build abstractly: random-initialising 138M parameters only to overwrite them costs seconds.
  abstract = nnx.eval_shape(
    lambda: models.VGG16(num_classes, width_multiplier=1.0, batch_norm=batch_norm, dtype=dtype, rngs=nnx.Rngs(0))
  )
  graphdef, param_state, rest = nnx.split(abstract, nnx.Param, ...)
  nnx.replace_by_pure_dict(param_state, jax.tree.map(jnp.asarray, params))
  nnx.replace_by_pure_dict(rest, jax.tree.map(jnp.asarray, stats))
  return nnx.merge(graphdef, param_state, rest)


def load_torch_checkpoint(path: storage.Location) -> dict[str, np.ndarray]:
  """Reads a state dict from .pth/.pt (tensors only, never arbitrary pickles) or .safetensors."""
  path = storage.path(path)
  if not path.is_file():
    raise errors.MissingInput(f"{path}: no such checkpoint file")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load

    try:
      return load(path.read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) on a bad header
      raise errors.UserError(f"{path}: not a readable safetensors file ({e})") from None
  if path.suffix not in (".pth", ".pt"):
    raise errors.UserError(f"{path}: unsupported checkpoint format; expected .pth, .pt or .safetensors")
  import pickle

  import torch

  try:
    with path.open("rb") as f:
      loaded = torch.load(f, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
    # torch's message spans paragraphs; its one informative sentence follows "WeightsUnpickler error:".
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not|\n\n|$)", str(e), re.DOTALL)
    reason = detail.group(1).strip() if detail else str(e).splitlines()[0]
    raise errors.UserError(
      f"{path}: refused: not a tensors-only PyTorch checkpoint ({reason}); "
      "agejax loads .pth files with weights_only=True and never unpickles code"
    ) from None
  if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
    loaded = loaded["state_dict"]
  if not isinstance(loaded, Mapping):
    raise errors.UserError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
  not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
  if not_tensors:
    raise errors.UserError(f"{path}: not a state dict; these entries are not tensors: {', '.join(not_tensors)}")
  return {k: _to_numpy(v) for k, v in loaded.items()}


def _numpy_tree(tree: PyTree) -> PyTree:
  """Host copies of every leaf."""
  return jax.tree.map(np.asarray, tree)


def save_converted(model: models.VGG16, output_dir: storage.Location, *, source: str = "") -> epath.Path:
  """Writes the model's weights as a plain-Orbax checkpoint plus agejax_weights.json; returns output_dir."""
  import orbax.checkpoint as ocp

  output_dir = storage.path(output_dir)  # Orbax wants local paths absolute
  if (output_dir / WEIGHTS_DIR).exists():
    raise errors.UserError(f"{output_dir / WEIGHTS_DIR} already exists; choose a new output directory")
  storage.check_writable(output_dir, "--output")
  _, params, rest = nnx.split(model, nnx.Param, ...)
  # numpy leaves: the checkpoint then restores on any host and device layout without a target.
  tree = {"params": _numpy_tree(nnx.to_pure_dict(params)), "model_state": _numpy_tree(nnx.to_pure_dict(rest))}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(output_dir / WEIGHTS_DIR, tree)
  meta = {
    "arch": "vgg16_bn" if model.norms is not None else "vgg16",
    "num_classes": int(model.head.kernel.shape[1]),
    "source": source,
  }
  storage.write_json(output_dir / META_FILE, meta)
  return output_dir


def _int_keys(tree: PyTree) -> PyTree:
  """Orbax stores dict keys as strings; nnx.to_pure_dict uses ints for list indices."""
  if not isinstance(tree, Mapping):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def load_converted(path: storage.Location) -> tuple[dict, dict, dict]:
  """Reads save_converted's output: (params, model_state, meta), pure dicts of numpy arrays."""
  import orbax.checkpoint as ocp

  path = storage.path(path)
  meta_file = path / META_FILE
  if not meta_file.is_file():
    raise errors.MissingInput(f"{path}: no {META_FILE}; not a directory written by convert_torchvision.py")
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(path / WEIGHTS_DIR)
  return _int_keys(tree["params"]), _int_keys(tree["model_state"]), json.loads(meta_file.read_text())


def _overlay_backbone(kind: str, converted: PyTree, given: PyTree, mismatches: list[str]) -> PyTree:
  """Returns `given` with every non-head leaf taken from `converted`; appends shape mismatches to `mismatches`."""
  flat_given = traverse_util.flatten_dict(given)
  flat_converted = {k: v for k, v in traverse_util.flatten_dict(converted).items() if k[0] != "head"}
  keys = [k for k in flat_given if k[0] != "head"] + [k for k in flat_converted if k not in flat_given]
  for key in keys:
    new, old = flat_converted.get(key), flat_given.get(key)
    if new is None or old is None or new.shape != old.shape:
      shape = lambda a: "absent" if a is None else tuple(a.shape)
      mismatches.append(f"{kind}/{'/'.join(map(str, key))}: converted {shape(new)}, model {shape(old)}")
    else:
      flat_given[key] = np.asarray(new, old.dtype)
  return traverse_util.unflatten_dict(flat_given)


def backbone_from_converted(path: storage.Location, params: PyTree, model_state: PyTree) -> tuple[PyTree, PyTree]:
  """Returns copies of the age model's params and model_state with the converted backbone and the given head."""
  new_params, new_state, meta = load_converted(path)
  mismatches = []
  params = _overlay_backbone("params", new_params, params, mismatches)
  model_state = _overlay_backbone("model_state", new_state, model_state, mismatches)
  if mismatches:
    more = f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else ""  # a width mismatch hits every layer
    raise errors.UserError(
      f"{path} holds full-width {meta['arch']} weights that do not fit this model (use "
      f"model.width_multiplier=1.0 and a matching model.batch_norm): {'; '.join(mismatches[:3])}{more}"
    )
  return params, model_state
