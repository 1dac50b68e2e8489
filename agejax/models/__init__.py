"""Backbones by name and the age model built on them.

`registry` holds the backbones (`config.model.name`) with their FLOPs, input spec and converters;
`age_model.AgeModel` is a backbone with its age bins and input as pure functions of the weights.
Importing this package registers the built-in backbones.
"""

from agejax.models import resnet, vgg  # noqa: F401  (register "resnet50", "vgg16")
from agejax.models.age_model import AgeModel, Weights, resize, split_model
from agejax.models.registry import (
  DTYPES,
  IMAGENET,
  Backbone,
  InputSpec,
  compute_dtype,
  create_model,
  forward_flops,
  get,
  load_plugins,
  names,
  register,
  to_numpy,
)

__all__ = [
  "DTYPES",
  "IMAGENET",
  "AgeModel",
  "Backbone",
  "InputSpec",
  "Weights",
  "compute_dtype",
  "create_model",
  "forward_flops",
  "get",
  "load_plugins",
  "names",
  "register",
  "resize",
  "split_model",
  "to_numpy",
]
