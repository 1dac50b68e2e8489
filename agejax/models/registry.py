"""Backbones by name (`config.model.name`): each registers its module, FLOPs, input spec and converters.

A backbone is a Flax NNX module mapping a normalised NHWC float batch to one logit per age bin. Its
`Backbone` entry says how to build it from the model settings, its forward FLOPs (the MFU figures),
the input its weights expect (`InputSpec`: pixel range, colour order, mean, std), the smallest image
it takes, which parameters form the age head (what pretrained weights leave new), and its
converters from published weights. `vgg.py` registers vgg16; a plug-in module outside agejax calls
`register` when it is imported (list it in `config.plugins`).
"""

import dataclasses
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agejax import errors, settings

DTYPES = ("auto", "float32", "bfloat16", "float16")
# torchvision's ImageNet statistics, for RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What a backbone's weights expect: (pixel / 255 * pixel_range, in `channels` order - mean) / std.

  The spec belongs to the weights: the converter records it beside converted arrays, the trainer in
  WORKDIR/inference.json, an export in its manifest.
  """

  pixel_range: float = 1.0  # 1.0: values in [0, 1]; 255.0: in [0, 255] (e.g. VGG-Face)
  channels: str = "RGB"  # or "BGR" (Caffe-converted weights)
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if self.channels not in ("RGB", "BGR"):
      raise errors.UserError(f"input spec: channels={self.channels!r} must be 'RGB' or 'BGR'")
    if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std) or self.pixel_range <= 0:
      raise errors.UserError(f"input spec: {self} needs 3 means, 3 positive stds and a positive pixel_range")
    object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
    object.__setattr__(self, "std", tuple(float(v) for v in self.std))

  def normalize(self, images: jax.Array) -> jax.Array:
    """Maps float RGB in [0, 1] (NHWC) to the normalised input the weights expect."""
    x = images * self.pixel_range
    if self.channels == "BGR":
      x = x[..., ::-1]
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def to_json(self) -> dict[str, Any]:
    return {"pixel_range": self.pixel_range, "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}

  @classmethod
  def from_json(cls, record: Mapping[str, Any] | None) -> "InputSpec":
    """The spec a record holds; ImageNet's for records that predate specs (they were all ImageNet's)."""
    if not record:
      return IMAGENET
    try:
      return cls(
        pixel_range=float(record.get("pixel_range", 1.0)),
        channels=str(record.get("channels", "RGB")),
        mean=tuple(record["mean"]),
        std=tuple(record["std"]),
      )
    except (KeyError, TypeError, ValueError) as e:
      raise errors.UserError(f"input spec {dict(record)!r} is not valid ({e})") from None


IMAGENET = InputSpec()


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A registered backbone: how to build it, what it costs, what input its weights expect."""

  name: str
  create: Callable[[settings.ModelSettings, int, Any, nnx.Rngs], nnx.Module]  # (settings, bins, dtype, rngs)
  flops: Callable[[settings.ModelSettings, int, int], float]  # (settings, image size, bins) -> one forward
  input_spec: InputSpec = IMAGENET  # for training from scratch; pretrained weights bring their own
  min_image_size: int = 1
  head: str = "head"  # the top-level parameter group of the age head; everything else is backbone
  # Converters from published weights, by the weights' architecture name (e.g. "vgg16_bn"):
  # converter(state_dict, dtype=...) -> the full model with those weights (its original head included).
  converters: Mapping[str, Callable[..., nnx.Module]] = dataclasses.field(default_factory=dict)
  # The input each converted architecture expects, where it is not `input_spec` (e.g. VGG-Face's 0..255 RGB).
  input_specs: Mapping[str, InputSpec] = dataclasses.field(default_factory=dict)
  identify: Callable[[Mapping[str, Any]], str | None] | None = None  # a state dict's architecture, or None
  convert_command: Callable[[settings.ModelSettings, str], str] | None = None  # how to make model.pretrained
  torch_model: Callable[[settings.ModelSettings, int], Any] | None = None  # the PyTorch twin (benchmark.py torch)

  def spec_for(self, arch: str) -> InputSpec:
    """The input that weights of published architecture `arch` expect."""
    return self.input_specs.get(arch, self.input_spec)


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
  """Adds a backbone under its name (a plug-in module calls this at import); returns it.

  Registering a name again from the same module (a module imported twice) replaces the entry;
  from another module it is an error.
  """
  known = _REGISTRY.get(backbone.name)
  if known is not None and known.create.__module__ != backbone.create.__module__:
    raise ValueError(f"a backbone named {backbone.name!r} is already registered by {known.create.__module__}")
  _REGISTRY[backbone.name] = backbone
  return backbone


def names() -> tuple[str, ...]:
  """The registered backbones' names."""
  return tuple(sorted(_REGISTRY))


def get(name: str) -> Backbone:
  """The backbone registered as `name`, or a one-line error listing the known ones."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise errors.UserError(
      f"config.model.name={name!r} is not a registered backbone ({', '.join(names())}); a plug-in module "
      f"registers its own: list it in config.plugins"
    ) from None


def load_plugins(modules: Sequence[str]) -> None:
  """Imports the plug-in modules (config.plugins) that register backbones, losses or optimizer rules."""
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise errors.UserError(f"config.plugins: cannot import {module!r} ({e}); is it on PYTHONPATH?") from None


def to_numpy(value: Any) -> np.ndarray:
  """A numpy view/copy of a numpy array or torch tensor, without importing torch for numpy input."""
  torch = sys.modules.get("torch")  # a torch.Tensor can only exist if torch was imported
  if torch is not None and isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return np.asarray(value)


def check_shapes(
  state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str, ignored: frozenset[str] = frozenset()
) -> None:
  """Raises one UserError, "not {what}: ...", naming every unknown, missing and mis-shaped key of a state dict.

  `expected` maps each key to its shape (None: any size) or to a tuple of allowed shapes; keys in
  `ignored` may be present or not.
  """
  allowed = lambda want: want if want and isinstance(want[0], tuple) else (want,)
  fits = lambda shape, want: len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))
  unknown = [k for k in state_dict if k not in expected and k not in ignored]
  missing = [k for k in expected if k not in state_dict]
  misshaped = [
    f"{k} {tuple(state_dict[k].shape)} (expected {' or '.join(map(str, allowed(shape)))})"
    for k, shape in expected.items()
    if k in state_dict and not any(fits(state_dict[k].shape, w) for w in allowed(shape))
  ]
  problems = [
    f"{kind}: {', '.join(keys)}"
    for kind, keys in (("unknown keys", unknown), ("missing keys", missing), ("mis-shaped keys", misshaped))
    if keys
  ]
  if problems:
    raise errors.UserError(f"not {what}: {'; '.join(problems)}")


def compute_dtype(name: str) -> jnp.dtype:
  """Resolves `config.model.dtype`: 'auto' is bfloat16 on accelerators and float32 on CPU."""
  if name == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  return jnp.dtype(name)


def create_model(model: settings.ModelSettings, num_bins: int, *, seed: int = 0) -> nnx.Module:
  """Builds the age model `model` describes, with `num_bins` outputs."""
  return get(model.name).create(model, num_bins, compute_dtype(model.dtype), nnx.Rngs(seed))


def forward_flops(model: settings.ModelSettings, image_size: int, num_bins: int) -> float:
  """Analytic FLOPs (2 per multiply-add) of one image's forward pass."""
  return float(get(model.name).flops(model, image_size, num_bins))
