"""VGG16 with torchvision's structure in Flax NNX, ending in an age head; registered as backbone "vgg16".

Also its FLOPs, its input (ImageNet's statistics, RGB in [0, 1]), its converters from torchvision's
vgg16 / vgg16_bn state dicts and from VGG-Face's two files (mcn's .pth, keras-vggface's .h5; input
VGG_FACE), and its PyTorch twin for the benchmark.
"""

import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agejax import settings
from agejax.models import registry

# torchvision's VGG16 "D" configuration: output channels of each 3x3 conv, "M" for a 2x2 max-pool.
VGG16_LAYERS: tuple[int | Literal["M"], ...]
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
POOLED_SIZE = 7  # torchvision's AdaptiveAvgPool2d((7, 7))
HIDDEN = 4096


def scaled(width: int, multiplier: float) -> int:
  """Returns a layer width scaled by the width multiplier (at least 1)."""
  return max(1, int(round(width * multiplier)))


def kaiming_normal_fan_out(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """torchvision's conv init, N(0, 2 / fan_out) for an HWIO kernel: `variance_scaling(2.0, "fan_out", "normal")`.

  The same values, drawn flat and reshaped (threefry draws each number from its flat index): XLA on a
  CPU compiled a 3x3x4x8 kernel's 4-D draw in 4.7 s and the flat one in 0.4 s (docs/testing.md).
  """
  fan_out = shape[-1] * math.prod(shape[:-2])
  variance = jnp.array(2.0 / fan_out, dtype=dtype)
  return (jax.random.normal(key, (math.prod(shape),), dtype) * jnp.sqrt(variance)).reshape(shape)


@functools.cache
def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Returns the [out, in] averaging matrix of torch's adaptive_avg_pool on one axis."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil, as torch does
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out_size: int = POOLED_SIZE) -> jax.Array:
  """Adaptive average pooling of an NHWC batch to out_size x out_size, with torch's bin edges."""
  _, h, w, _ = x.shape
  if h == out_size and w == out_size:
    return x
  ph = jnp.asarray(_adaptive_pool_matrix(h, out_size), x.dtype)
  pw = jnp.asarray(_adaptive_pool_matrix(w, out_size), x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw)


class VGG16(nnx.Module):
  """torchvision's VGG16 (optionally with batch norm) on NHWC input; `head` gives the logits.

  `width_multiplier` scales every conv and hidden width, so tests and the demo run on a CPU.
  `dtype` is the compute dtype (bfloat16 on accelerators); parameters stay float32 and the logits
  are returned in float32.
  """

  fresh_groups: tuple[str, ...] = ()  # converted from a file without these layers (a notop file): they start new

  def __init__(
    self,
    num_classes: int = 1000,
    *,
    width_multiplier: float = 1.0,
    batch_norm: bool = False,
    dropout_rate: float = 0.5,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    # torchvision's initialisation: kaiming-normal (fan_out) convs, N(0, 0.01) linears, zero biases.
    conv_init = kaiming_normal_fan_out
    linear_init = nnx.initializers.normal(0.01)
    convs, norms = [], []
    channels = 3
    for v in VGG16_LAYERS:
      if v == "M":
        continue
      out = scaled(v, width_multiplier)
      convs.append(
        nnx.Conv(channels, out, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init, dtype=dtype, rngs=rngs)
      )
      if batch_norm:
        # torch's BatchNorm2d: eps 1e-5, running stats updated with momentum 0.1.
        # use_running_average: what training uses (True for a frozen layer: AgeModel.logits sets it).
        norms.append(nnx.BatchNorm(out, use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs))
      channels = out
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms) if batch_norm else None
    hidden = scaled(HIDDEN, width_multiplier)
    self.fc1 = nnx.Linear(POOLED_SIZE * POOLED_SIZE * channels, hidden, kernel_init=linear_init, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, kernel_init=linear_init, dtype=dtype, rngs=rngs)
    # The head computes in float32: its logits feed a log-softmax over ~100 bins.
    self.head = nnx.Linear(hidden, num_classes, kernel_init=linear_init, dtype=jnp.float32, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.dtype = dtype

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Returns the pooled conv features, NHWC [B, 7, 7, C]."""
    x = x.astype(self.dtype)
    i = 0
    for v in VGG16_LAYERS:
      if v == "M":
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = self.convs[i](x)
      if self.norms is not None:
        x = self.norms[i](x, use_running_average=None if train else True)  # None: the layer's own setting
      x = nnx.relu(x)
      i += 1
    return adaptive_avg_pool(x)

  def embed(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Returns the 4096-wide (scaled) representation that feeds the head."""
    x = self.features(x, train=train)
    x = x.reshape(x.shape[0], -1)  # H, W, C order; convert.py permutes torch's C, H, W rows to it
    x = self.dropout(nnx.relu(self.fc1(x)), deterministic=not train, rngs=rngs)
    return self.dropout(nnx.relu(self.fc2(x)), deterministic=not train, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Returns float32 logits [B, num_classes] for an NHWC batch of normalised images."""
    return self.head(self.embed(x, train=train, rngs=rngs).astype(jnp.float32))


def create(model: settings.ModelSettings, num_bins: int, dtype: Any, rngs: nnx.Rngs) -> VGG16:
  """The age model of `model` settings: VGG16 (with batch norm if asked) and `num_bins` outputs."""
  return VGG16(
    num_bins,
    width_multiplier=model.width_multiplier,
    batch_norm=model.batch_norm,
    dropout_rate=model.dropout_rate,
    dtype=dtype,
    rngs=rngs,
  )


def forward_flops(model: settings.ModelSettings, image_size: int, num_bins: int) -> float:
  """Analytic FLOPs (2 per multiply-add) of one image's forward pass; ~30.9e9 for VGG16 at 224."""
  flops, size, channels = 0.0, image_size, 3
  for v in VGG16_LAYERS:
    if v == "M":
      size //= 2
      continue
    out = scaled(v, model.width_multiplier)
    flops += 2.0 * size * size * 9 * channels * out
    channels = out
  hidden = scaled(HIDDEN, model.width_multiplier)
  return flops + 2.0 * (POOLED_SIZE * POOLED_SIZE * channels * hidden + hidden * hidden + hidden * num_bins)


# torchvision's state dicts.


def identify(state_dict: Mapping[str, Any]) -> str | None:
  """The architecture of a VGG16 state dict: 'vgg16' or 'vgg16_bn' (torchvision: features.1 is BN in the
  second), 'vggface' (mcn's vgg_face_dag.pth) or 'vggface_keras' (keras-vggface's .h5, read by convert)."""
  if "conv1_1.weight" in state_dict:
    return "vggface"
  if "conv1_1/kernel" in state_dict:
    return "vggface_keras"
  if "features.0.weight" not in state_dict or "classifier.0.weight" not in state_dict:
    return None
  return "vgg16_bn" if any(k.startswith("features.1.") for k in state_dict) else "vgg16"


def _feature_layers(batch_norm: bool) -> Iterator[tuple[int, int, int, int]]:
  """Yields (conv number, torch index of the conv in `features`, in channels, out channels)."""
  index, conv, channels = 0, 0, 3
  for v in VGG16_LAYERS:
    if v == "M":
      index += 1
      continue
    assert isinstance(v, int)
    yield conv, index, channels, v
    index += 3 if batch_norm else 2  # conv, [bn,] relu
    conv, channels = conv + 1, v


def _expected_shapes(batch_norm: bool, num_classes: int | None) -> dict[str, tuple[int | None, ...]]:
  """torchvision's key -> tensor shape; None stands for any size (the class count is read from the dict)."""
  shapes: dict[str, tuple[int | None, ...]] = {}
  for _, i, cin, cout in _feature_layers(batch_norm):
    shapes[f"features.{i}.weight"] = (cout, cin, 3, 3)
    shapes[f"features.{i}.bias"] = (cout,)
    if batch_norm:
      for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"features.{i + 1}.{name}"] = (cout,)
  pooled = POOLED_SIZE * POOLED_SIZE * int(VGG16_LAYERS[-2])
  shapes.update(
    {
      "classifier.0.weight": (HIDDEN, pooled),
      "classifier.0.bias": (HIDDEN,),
      "classifier.3.weight": (HIDDEN, HIDDEN),
      "classifier.3.bias": (HIDDEN,),
      "classifier.6.weight": (None, HIDDEN),
      "classifier.6.bias": (num_classes,),
    }
  )
  return shapes


def _check_keys(state_dict: Mapping[str, np.ndarray], batch_norm: bool) -> None:
  """Raises one UserError naming every unknown, missing and mis-shaped key of a torchvision state dict."""
  head = state_dict.get("classifier.6.weight")
  num_classes = head.shape[0] if head is not None and head.ndim == 2 else None
  ignored = frozenset(
    f"features.{i + 1}.num_batches_tracked" for _, i, _, _ in _feature_layers(batch_norm) if batch_norm
  )
  arch = "vgg16_bn" if batch_norm else "vgg16"
  registry.check_shapes(
    state_dict, _expected_shapes(batch_norm, num_classes), f"a torchvision {arch} state dict", ignored
  )


def from_torchvision(state_dict: Mapping[str, Any], *, dtype: jnp.dtype = jnp.float32) -> VGG16:
  """Returns a full-width Flax VGG16 whose logits on NHWC input equal torchvision's eval() logits on NCHW.

  Args:
    state_dict: torchvision's vgg16 or vgg16_bn state dict (tensors or NumPy arrays).
    dtype: the model's compute dtype (parameters stay float32).

  Returns:
    The Flax model with the converted weights (its 1000-class ImageNet head included).
  """
  sd = {k: registry.to_numpy(v) for k, v in state_dict.items()}
  batch_norm = identify(sd) == "vgg16_bn"
  _check_keys(sd, batch_norm)
  f32 = lambda k: np.asarray(sd[k], np.float32)
  params: dict[str, Any] = {"convs": {}}
  stats: dict[str, Any] = {}
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
  cells = POOLED_SIZE * POOLED_SIZE
  params["fc1"] = {
    "kernel": jnp.asarray(fc1.reshape(fc1.shape[0], -1, cells).transpose(2, 1, 0)).reshape(-1, fc1.shape[0]),
    "bias": f32("classifier.0.bias"),
  }
  params["fc2"] = {"kernel": f32("classifier.3.weight").T, "bias": f32("classifier.3.bias")}
  params["head"] = {"kernel": f32("classifier.6.weight").T, "bias": f32("classifier.6.bias")}
  num_classes = params["head"]["bias"].shape[0]
  # Build abstractly: random-initialising 138M parameters only to overwrite them costs seconds.
  abstract = nnx.eval_shape(
    lambda: VGG16(num_classes, width_multiplier=1.0, batch_norm=batch_norm, dtype=dtype, rngs=nnx.Rngs(0))
  )
  graphdef, param_state, rest = nnx.split(abstract, nnx.Param, ...)  # type: ignore[misc]  # flax: a variadic tuple
  nnx.replace_by_pure_dict(param_state, jax.tree.map(jnp.asarray, params))
  nnx.replace_by_pure_dict(rest, jax.tree.map(jnp.asarray, stats))
  return nnx.merge(graphdef, param_state, rest)


# VGG-Face (Parkhi et al. 2015): VGG16 without batch norm, trained to recognise 2,622 people. Its two
# common files: mcn's PyTorch import (vgg_face_dag.pth: conv1_1 ... conv5_3, fc6, fc7, fc8, RGB input) and
# keras-vggface's .h5 (the same layers in Keras's layout, BGR input; the notop file stops at conv5_3).
# Both take 0..255 pixels minus a per-channel mean, std 1, at 224 x 224 (pool5 is then 7 x 7).
VGG_FACE = registry.InputSpec(
  pixel_range=255.0, channels="RGB", mean=(129.186279296875, 104.76238250732422, 93.59396362304688), std=(1.0, 1.0, 1.0)
)
VGG_FACE_CONVS = tuple(f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1))
FRESH_WITHOUT_TOP = ("fc1", "fc2", "head")  # what a notop file leaves new


def _vgg_face_shapes(num_classes: int | None) -> tuple[dict[str, tuple], dict[str, tuple]]:
  """(conv keys, fc keys) -> shapes of mcn's vgg_face_dag state dict; fc6 comes flat or as a 7 x 7 conv."""
  convs: dict[str, tuple] = {}
  for (_, _, cin, cout), name in zip(_feature_layers(False), VGG_FACE_CONVS):
    convs[f"{name}.weight"], convs[f"{name}.bias"] = (cout, cin, 3, 3), (cout,)
  channels = int(VGG16_LAYERS[-2])
  fc6 = ((HIDDEN, POOLED_SIZE * POOLED_SIZE * channels), (HIDDEN, channels, POOLED_SIZE, POOLED_SIZE))
  fcs = {
    "fc6.weight": fc6,
    "fc6.bias": (HIDDEN,),
    "fc7.weight": (HIDDEN, HIDDEN),
    "fc7.bias": (HIDDEN,),
    "fc8.weight": (None, HIDDEN),
    "fc8.bias": (num_classes,),
  }
  return convs, fcs


def from_vgg_face(state_dict: Mapping[str, Any], *, dtype: jnp.dtype = jnp.float32) -> VGG16:
  """Returns VGG-Face as a Flax VGG16 whose logits equal mcn's Vgg_face_dag on 224 x 224 input (see VGG_FACE).

  Args:
    state_dict: mcn's vgg_face_dag state dict (fc6 flat [4096, 25088] or [4096, 512, 7, 7]), or its
      conv layers alone (a notop file): fc6, fc7 and the head are then zeros, listed in `fresh_groups`.
    dtype: the model's compute dtype (parameters stay float32).

  Returns:
    The Flax model with the converted weights (fc8, the 2,622 identities, as its head).
  """
  sd = {k: registry.to_numpy(v) for k, v in state_dict.items()}
  head = sd.get("fc8.weight")
  convs, fcs = _vgg_face_shapes(head.shape[0] if head is not None and head.ndim == 2 else None)
  notop = not any(k in sd for k in fcs)
  registry.check_shapes(sd, convs if notop else {**convs, **fcs}, "a VGG-Face (vgg_face_dag) state dict")
  tv = {}  # renamed to torchvision's keys: the same network, so from_torchvision converts it
  for (_, index, _, _), name in zip(_feature_layers(False), VGG_FACE_CONVS):
    tv[f"features.{index}.weight"], tv[f"features.{index}.bias"] = sd[f"{name}.weight"], sd[f"{name}.bias"]
  if notop:
    pooled = POOLED_SIZE * POOLED_SIZE * int(VGG16_LAYERS[-2])
    sd.update(
      {
        "fc6.weight": np.zeros((HIDDEN, pooled), np.float32),
        "fc7.weight": np.zeros((HIDDEN, HIDDEN), np.float32),
        "fc8.weight": np.zeros((1, HIDDEN), np.float32),
        **{f"fc{n}.bias": np.zeros((1 if n == 8 else HIDDEN,), np.float32) for n in (6, 7, 8)},
      }
    )
  for key, fc in (("classifier.0", "fc6"), ("classifier.3", "fc7"), ("classifier.6", "fc8")):
    # A conv-shaped fc6 is [out, C, 7, 7]: flattened it is torch's channel-major flatten of pool5.
    tv[f"{key}.weight"] = sd[f"{fc}.weight"].reshape(sd[f"{fc}.weight"].shape[0], -1)
    tv[f"{key}.bias"] = sd[f"{fc}.bias"]
  model = from_torchvision(tv, dtype=dtype)
  model.fresh_groups = FRESH_WITHOUT_TOP if notop else ()
  return model


def _vgg_face_keras_shapes() -> tuple[dict[str, tuple], dict[str, tuple]]:
  """(conv keys, fc keys) -> shapes of keras-vggface's VGG16 weights (HWIO kernels, [in, out] dense kernels)."""
  convs, fcs = _vgg_face_shapes(None)
  keras: dict[str, tuple] = {}
  for name in VGG_FACE_CONVS:
    out, cin, kh, kw = convs[f"{name}.weight"]
    keras[f"{name}/kernel"], keras[f"{name}/bias"] = (kh, kw, cin, out), (out,)
  pooled = fcs["fc6.weight"][0][1]
  dense = {"fc6/kernel": (pooled, HIDDEN), "fc7/kernel": (HIDDEN, HIDDEN), "fc8/kernel": (HIDDEN, None)}
  return keras, {**dense, "fc6/bias": (HIDDEN,), "fc7/bias": (HIDDEN,), "fc8/bias": (None,)}


def from_vgg_face_keras(weights: Mapping[str, Any], *, dtype: jnp.dtype = jnp.float32) -> VGG16:
  """Returns VGG-Face from keras-vggface's weights ("layer/kernel" -> array, see convert.load_keras_h5).

  Keras's VGG-Face reads BGR and flattens pool5 as [7, 7, C]; the result takes VGG_FACE's RGB input
  and equals from_vgg_face of the same network's vgg_face_dag weights, array for array.
  """
  sd = {k: registry.to_numpy(v) for k, v in weights.items()}
  convs, fcs = _vgg_face_keras_shapes()
  notop = not any(k in sd for k in fcs)
  registry.check_shapes(sd, convs if notop else {**convs, **fcs}, "keras-vggface's VGG16 weights")
  dag = {}
  for name in VGG_FACE_CONVS:
    kernel = sd[f"{name}/kernel"]
    if name == "conv1_1":
      kernel = kernel[:, :, ::-1, :]  # its input channels in BGR order: ours are RGB
    dag[f"{name}.weight"], dag[f"{name}.bias"] = kernel.transpose(3, 2, 0, 1), sd[f"{name}/bias"]
  if not notop:
    fc6 = sd["fc6/kernel"]  # rows in Keras's [7, 7, C] flatten order; vgg_face_dag's columns are [C, 7, 7]
    side, channels = POOLED_SIZE, int(VGG16_LAYERS[-2])
    dag["fc6.weight"] = fc6.reshape(side, side, channels, -1).transpose(3, 2, 0, 1).reshape(fc6.shape[1], -1)
    dag["fc7.weight"], dag["fc8.weight"] = sd["fc7/kernel"].T, sd["fc8/kernel"].T
    dag.update({f"fc{n}.bias": sd[f"fc{n}/bias"] for n in (6, 7, 8)})
  return from_vgg_face(dag, dtype=dtype)


def convert_command(model: settings.ModelSettings, output: str) -> str:
  """The command that writes torchvision's ImageNet weights for this model to `output`."""
  arch = "vgg16_bn" if model.batch_norm else "vgg16"
  return (
    f"python scripts/convert_weights.py --weights IMAGENET1K_V1 --arch {arch} --output {output} "
    f"(or --checkpoint FILE.pth instead of --weights)"
  )


def torch_model(model: settings.ModelSettings, num_bins: int) -> Any:
  """torchvision's VGG16 with its classifier's last layer replaced by the age head (scaled by the width)."""
  import torch
  from torchvision.models import vgg

  width = model.width_multiplier
  cfg = [v if v == "M" else scaled(int(v), width) for v in VGG16_LAYERS]
  net = vgg.VGG(vgg.make_layers(cfg, batch_norm=model.batch_norm), num_classes=num_bins, init_weights=True)
  hidden, channels = scaled(HIDDEN, width), int(cfg[-2])
  if width != 1.0:
    net.classifier = torch.nn.Sequential(
      torch.nn.Linear(channels * POOLED_SIZE * POOLED_SIZE, hidden),
      torch.nn.ReLU(True),
      torch.nn.Dropout(),
      torch.nn.Linear(hidden, hidden),
      torch.nn.ReLU(True),
      torch.nn.Dropout(),
      torch.nn.Linear(hidden, num_bins),
    )
  return net


BACKBONE = registry.register(
  registry.Backbone(
    name="vgg16",
    create=create,
    flops=forward_flops,
    input_spec=registry.IMAGENET,
    min_image_size=32,  # five 2x2 max-pools
    head="head",
    converters={
      "vgg16": from_torchvision,
      "vgg16_bn": from_torchvision,
      "vggface": from_vgg_face,
      "vggface_keras": from_vgg_face_keras,
    },
    input_specs={"vggface": VGG_FACE, "vggface_keras": VGG_FACE},
    identify=identify,
    convert_command=convert_command,
    torch_model=torch_model,
  )
)
