"""ResNet-50 with torchvision's structure in Flax NNX, ending in an age head; registered as backbone "resnet50".

The unified age-estimation benchmark's backbone (Paplham & Franc, CVPR 2024). Also its FLOPs, its
input (ImageNet's statistics, RGB in [0, 1]), its converter from torchvision's resnet50 state dicts,
and its PyTorch twin for the benchmark.
"""

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from agejax import settings
from agejax.models import registry
from agejax.models.vgg import kaiming_normal_fan_out, scaled

STEM = 64  # the stem's channels; stage i's bottleneck width is STEM * 2**i, its output 4x that
STAGES = ((3, 1), (4, 2), (6, 2), (3, 2))  # (bottleneck blocks, stride of the first) of layer1..layer4
EXPANSION = 4
# torchvision's initialisation: kaiming-normal (fan_out) convs; the head as torch's Linear weight.
CONV_INIT = kaiming_normal_fan_out
HEAD_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nnx.Module):
  """torch's BatchNorm2d on NHWC: eps 1e-5, momentum 0.1, and the UNBIASED batch variance in the running average.

  nnx.BatchNorm averages the biased variance into its running statistics; torch, whose weights and
  recipes this backbone reproduces, the unbiased one (x n / (n - 1)), which matters on small maps.
  Statistics and normalisation are computed in float32, the output is cast to the compute dtype.
  `use_running_average` (nnx.BatchNorm's name) set True makes it normalise by its running statistics,
  and keep them, even when training: a frozen layer (AgeModel.logits sets it).
  """

  def __init__(self, features: int, *, momentum: float = 0.1, epsilon: float = 1e-5, dtype: Any = jnp.float32):
    self.scale = nnx.Param(jnp.ones(features, jnp.float32))
    self.bias = nnx.Param(jnp.zeros(features, jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros(features, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(features, jnp.float32))
    self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
    self.use_running_average = False

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Normalises by the batch's statistics (and updates the running ones) when training, else by the running ones.

    A frozen norm (`use_running_average`) normalises by its running statistics in training too.
    """
    xf = x.astype(jnp.float32)
    if train and not self.use_running_average:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)  # two-pass: E[x^2] - E[x]^2 loses digits
      n = x.size // x.shape[-1]
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient((1 - m) * self.mean[...] + m * mean)
      self.var[...] = jax.lax.stop_gradient((1 - m) * self.var[...] + m * var * (n / max(n - 1, 1)))
    else:
      mean, var = self.mean[...], self.var[...]
    inv = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    return ((xf - mean) * inv + self.bias[...]).astype(self.dtype)


class Bottleneck(nnx.Module):
  """torchvision's Bottleneck (v1.5: the stride on the 3x3 conv) with a projection shortcut where shapes change."""

  def __init__(self, channels: int, width: int, stride: int, *, dtype: Any, rngs: nnx.Rngs):
    conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=CONV_INIT, dtype=dtype, rngs=rngs)
    out = width * EXPANSION
    self.conv1 = conv(channels, width, (1, 1), padding="VALID")
    self.bn1 = BatchNorm(width, dtype=dtype)
    self.conv2 = conv(width, width, (3, 3), strides=stride, padding=((1, 1), (1, 1)))
    self.bn2 = BatchNorm(width, dtype=dtype)
    self.conv3 = conv(width, out, (1, 1), padding="VALID")
    self.bn3 = BatchNorm(out, dtype=dtype)
    project = stride != 1 or channels != out
    self.down_conv = conv(channels, out, (1, 1), strides=stride, padding="VALID") if project else None
    self.down_bn = BatchNorm(out, dtype=dtype) if project else None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x), train=train))
    y = nnx.relu(self.bn2(self.conv2(y), train=train))
    y = self.bn3(self.conv3(y), train=train)
    if self.down_conv is not None and self.down_bn is not None:
      x = self.down_bn(self.down_conv(x), train=train)
    return nnx.relu(y + x)


def stage_widths(width_multiplier: float) -> tuple[int, ...]:
  """Bottleneck widths of layer1..layer4: the scaled stem width doubled per stage, as torchvision's 64..512."""
  stem = scaled(STEM, width_multiplier)
  return tuple(stem * 2**i for i in range(len(STAGES)))


class ResNet50(nnx.Module):
  """torchvision's ResNet-50 (v1.5) on NHWC input; `head` gives the logits.

  `width_multiplier` scales the stem's 64 channels (rounded) and with them every stage, so tests and
  the demo run on a CPU. `dtype` is the compute dtype (bfloat16 on accelerators); parameters stay
  float32, batch norm and the head compute in float32 and the logits are float32. Like
  torchvision's, it has no dropout: the head reads the globally average-pooled features.
  """

  def __init__(
    self, num_classes: int = 1000, *, width_multiplier: float = 1.0, dtype: Any = jnp.float32, rngs: nnx.Rngs
  ):
    widths = stage_widths(width_multiplier)
    stem = widths[0]
    conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=CONV_INIT, dtype=dtype, rngs=rngs)
    self.conv1 = conv(3, stem, (7, 7), strides=2, padding=((3, 3), (3, 3)))
    self.bn1 = BatchNorm(stem, dtype=dtype)
    stages = []
    channels = stem
    for width, (blocks, stride) in zip(widths, STAGES):
      stage = []
      for b in range(blocks):
        stage.append(Bottleneck(channels, width, stride if b == 0 else 1, dtype=dtype, rngs=rngs))
        channels = width * EXPANSION
      stages.append(nnx.List(stage))
    # torchvision's names (layer1..layer4), so parameter paths read like its state dict's keys.
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    # The head computes in float32: its logits feed a log-softmax over ~100 bins.
    self.head = nnx.Linear(channels, num_classes, kernel_init=HEAD_INIT, dtype=jnp.float32, rngs=rngs)
    self.dtype = dtype

  def embed(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Returns the globally average-pooled 2048-wide (scaled) features that feed the head, in float32."""
    del rngs  # no dropout
    x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype)), train=train))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x, train=train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Returns float32 logits [B, num_classes] for an NHWC batch of normalised images."""
    return self.head(self.embed(x, train=train, rngs=rngs))


def create(model: settings.ModelSettings, num_bins: int, dtype: Any, rngs: nnx.Rngs) -> ResNet50:
  """The age model of `model` settings: ResNet-50 with `num_bins` outputs (always batch norm; no dropout).

  model.batch_norm and model.dropout_rate are VGG16's options and do not apply.
  """
  return ResNet50(num_bins, width_multiplier=model.width_multiplier, dtype=dtype, rngs=rngs)


def _out(size: int, stride: int) -> int:
  """Output size of every strided layer here (7x7/3, 3x3/1 convs, 3x3/1 max-pool, 1x1/0 convs): ceil(size / stride)."""
  return (size - 1) // stride + 1


def forward_flops(model: settings.ModelSettings, image_size: int, num_bins: int) -> float:
  """Analytic FLOPs (2 per multiply-add) of the convs and the head; ~8.2e9 at 224 with 1000 classes."""
  widths = stage_widths(model.width_multiplier)
  conv = lambda size, k, cin, cout: 2.0 * size * size * k * k * cin * cout
  size = _out(image_size, 2)
  flops = conv(size, 7, 3, widths[0])
  size, channels = _out(size, 2), widths[0]  # max-pool
  for width, (blocks, stride) in zip(widths, STAGES):
    out = width * EXPANSION
    for b in range(blocks):
      s = stride if b == 0 else 1
      strided = _out(size, s)
      flops += conv(size, 1, channels, width) + conv(strided, 3, width, width) + conv(strided, 1, width, out)
      if s != 1 or channels != out:
        flops += conv(strided, 1, channels, out)
      size, channels = strided, out
  return flops + 2.0 * channels * num_bins


# torchvision's state dicts.


def identify(state_dict: Mapping[str, Any]) -> str | None:
  """'resnet50' for a torchvision ResNet-50 state dict (its last bottleneck and its fc), else None."""
  return "resnet50" if "layer4.2.conv3.weight" in state_dict and "fc.weight" in state_dict else None


def _blocks(stem: int) -> Iterator[tuple[str, int, int, bool]]:
  """Yields (torch prefix 'layerS.B', in channels, bottleneck width, has a projection) of every block."""
  channels = stem
  for s, (blocks, stride) in enumerate(STAGES):
    width = stem * 2**s
    for b in range(blocks):
      yield f"layer{s + 1}.{b}", channels, width, b == 0 and (stride != 1 or channels != width * EXPANSION)
      channels = width * EXPANSION


def _expected_shapes(stem: int, num_classes: int | None) -> dict[str, tuple[int | None, ...]]:
  """torchvision's key -> tensor shape for a stem width; None stands for any size (the class count)."""
  shapes: dict[str, tuple[int | None, ...]] = {}

  def conv_bn(conv: str, bn: str, cout: int, cin: int, k: int) -> None:
    shapes[f"{conv}.weight"] = (cout, cin, k, k)
    for name in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{bn}.{name}"] = (cout,)

  conv_bn("conv1", "bn1", stem, 3, 7)
  for prefix, cin, width, project in _blocks(stem):
    conv_bn(f"{prefix}.conv1", f"{prefix}.bn1", width, cin, 1)
    conv_bn(f"{prefix}.conv2", f"{prefix}.bn2", width, width, 3)
    conv_bn(f"{prefix}.conv3", f"{prefix}.bn3", width * EXPANSION, width, 1)
    if project:
      conv_bn(f"{prefix}.downsample.0", f"{prefix}.downsample.1", width * EXPANSION, cin, 1)
  features = stem * 2 ** (len(STAGES) - 1) * EXPANSION
  shapes.update({"fc.weight": (None, features), "fc.bias": (num_classes,)})
  return shapes


def _check_keys(state_dict: Mapping[str, np.ndarray], stem: int) -> None:
  """Raises one UserError naming every unknown, missing and mis-shaped key."""
  fc = state_dict.get("fc.weight")
  expected = _expected_shapes(stem, fc.shape[0] if fc is not None and fc.ndim == 2 else None)
  ignored = frozenset(k.replace("running_mean", "num_batches_tracked") for k in expected if k.endswith(".running_mean"))
  registry.check_shapes(state_dict, expected, "a torchvision resnet50 state dict", ignored)


# torch tensor names -> this module's (a weight is a conv's or the head's kernel, or a norm's scale).
_TENSORS = {"running_mean": "mean", "running_var": "var", "bias": "bias"}


def _flax_path(key: str, ndim: int) -> tuple[bool, tuple[str | int, ...]]:
  """(is a parameter, not a statistic; the pure-dict path) of a torchvision key such as 'layer1.0.downsample.1.bias'."""
  module, _, tensor = key.rpartition(".")
  # fc is the head; a block's downsample.0 and .1 are its shortcut's conv and norm.
  module = "head" if module == "fc" else module.replace("downsample.0", "down_conv").replace("downsample.1", "down_bn")
  name = _TENSORS.get(tensor) or ("kernel" if ndim > 1 else "scale")
  return tensor in ("weight", "bias"), (*(int(p) if p.isdigit() else p for p in module.split(".")), name)


def from_torchvision(state_dict: Mapping[str, Any], *, dtype: Any = jnp.float32) -> ResNet50:
  """Returns a Flax ResNet50 whose logits on NHWC input equal torchvision's eval() logits on NCHW.

  Args:
    state_dict: torchvision's resnet50 state dict (tensors or NumPy arrays); a width-scaled one (the
      benchmark's `torch_model` twin) converts too, its width read from conv1.
    dtype: the model's compute dtype (parameters stay float32).

  Returns:
    The Flax model with the converted weights (its 1000-class ImageNet head included).
  """
  sd = {k: registry.to_numpy(v) for k, v in state_dict.items()}
  conv1 = sd.get("conv1.weight")
  stem = int(conv1.shape[0]) if conv1 is not None and conv1.ndim == 4 else STEM
  _check_keys(sd, stem)
  params: dict[tuple, Any] = {}
  stats: dict[tuple, Any] = {}
  for key, value in sd.items():
    if key.endswith("num_batches_tracked"):
      continue
    value = np.asarray(value, np.float32)
    is_param, path = _flax_path(key, value.ndim)
    # OIHW -> HWIO for convs, [out, in] -> [in, out] for the head.
    value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    (params if is_param else stats)[path] = jnp.asarray(value)
  num_classes = params[("head", "bias")].shape[0]
  # Build abstractly: random-initialising 25M parameters only to overwrite them costs seconds.
  abstract = nnx.eval_shape(lambda: ResNet50(num_classes, width_multiplier=stem / STEM, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, param_state, rest = nnx.split(abstract, nnx.Param, ...)  # type: ignore[misc]  # flax: a variadic tuple
  nnx.replace_by_pure_dict(param_state, traverse_util.unflatten_dict(params))
  nnx.replace_by_pure_dict(rest, traverse_util.unflatten_dict(stats))
  return nnx.merge(graphdef, param_state, rest)


def convert_command(model: settings.ModelSettings, output: str) -> str:
  """The command that writes torchvision's ImageNet weights for ResNet-50 to `output`."""
  return (
    f"python scripts/convert_weights.py --weights IMAGENET1K_V2 --arch resnet50 --output {output} "
    f"(or --checkpoint FILE.pth instead of --weights)"
  )


def torch_model(model: settings.ModelSettings, num_bins: int) -> Any:
  """torchvision's ResNet-50 with an age head of `num_bins` for fc, every width scaled like ResNet50's."""
  import torch
  from torchvision.models import resnet

  widths = stage_widths(model.width_multiplier)
  if widths[0] == STEM:
    return resnet.resnet50(num_classes=num_bins)
  # torchvision fixes the widths at 64..512: rebuild the stem, stages and fc with torchvision's blocks.
  net = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=num_bins)
  net.conv1 = torch.nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
  net.bn1 = torch.nn.BatchNorm2d(widths[0])
  net.inplanes = widths[0]
  net.layer1, net.layer2, net.layer3, net.layer4 = (
    net._make_layer(resnet.Bottleneck, width, blocks, stride=stride) for width, (blocks, stride) in zip(widths, STAGES)
  )
  net.fc = torch.nn.Linear(widths[-1] * EXPANSION, num_bins)
  for m in net.modules():  # torchvision's initialisation of convs (batch norms start at 1 and 0)
    if isinstance(m, torch.nn.Conv2d):
      torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
  return net


BACKBONE = registry.register(
  registry.Backbone(
    name="resnet50",
    create=create,
    flops=forward_flops,
    input_spec=registry.IMAGENET,
    min_image_size=32,  # five stride-2 stages
    head="head",
    converters={"resnet50": from_torchvision},
    identify=identify,
    convert_command=convert_command,
    torch_model=torch_model,
  )
)
