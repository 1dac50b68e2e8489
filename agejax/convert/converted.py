"""Converted weights out: the arrays on disk with agejax_weights.json, and overlaid on a new age model.

`save_converted` writes a plain-Orbax checkpoint plus agejax_weights.json (architecture, backbone,
input spec, source); `backbone_from_converted` overlays those arrays on a new age model, whose head stays new.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from agejax import errors, models, storage

PyTree = Any
META_FILE = "agejax_weights.json"
WEIGHTS_DIR = "weights"  # the Orbax checkpoint inside save_converted's output directory


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
