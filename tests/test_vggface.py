"""VGG-Face (Parkhi et al. 2015) from its two common files, against mcn's PyTorch definition written out here.

mcn's `Vgg_face_dag` (vgg_face_dag.py, the module its vgg_face_dag.pth state dict loads into) is
copied below layer for layer; keras-vggface's .h5 is written with h5py in Keras 2's save_weights
layout from the same random weights, with the Keras model's BGR first layer and [7, 7, C] flatten.
"""

import pathlib
import shutil
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_relative_error
from flax import nnx

from agejax import convert, models
from agejax.models import vgg

torch = pytest.importorskip("torch")
nn = torch.nn

REPO = pathlib.Path(__file__).resolve().parents[1]
MCN_MEAN = [129.186279296875, 104.76238250732422, 93.59396362304688]  # mcn's meta["mean"], RGB
KERAS_BGR_MEAN = [93.5940, 104.7624, 129.1863]  # keras-vggface's utils.preprocess_input, version 1


class Vgg_face_dag(nn.Module):  # noqa: N801  (mcn's name)
  """mcn's VGG-Face module, as vgg_face_dag.py defines it (ReLUs not in place, so fc7 can be read)."""

  def __init__(self, conv_fc6: bool = False):
    super().__init__()
    self.meta = {"mean": MCN_MEAN, "std": [1, 1, 1], "imageSize": [224, 224, 3]}
    blocks = ((1, 2, 3, 64), (2, 2, 64, 128), (3, 3, 128, 256), (4, 3, 256, 512), (5, 3, 512, 512))
    self.order = []
    for block, n, cin, cout in blocks:
      for i in range(1, n + 1):
        name = f"conv{block}_{i}"
        setattr(self, name, nn.Conv2d(cin if i == 1 else cout, cout, kernel_size=[3, 3], stride=(1, 1), padding=(1, 1)))
        self.order.append(name)
      self.order.append(f"pool{block}")
    self.pool = nn.MaxPool2d(kernel_size=[2, 2], stride=[2, 2], padding=0, dilation=1, ceil_mode=False)
    # Some copies hold fc6 as the 7 x 7 convolution of MatConvNet's original: the same numbers, [4096, 512, 7, 7].
    self.fc6 = nn.Conv2d(512, 4096, kernel_size=[7, 7]) if conv_fc6 else nn.Linear(25088, 4096, bias=True)
    self.fc7 = nn.Linear(in_features=4096, out_features=4096, bias=True)
    self.fc8 = nn.Linear(in_features=4096, out_features=2622, bias=True)
    self.dropout = nn.Dropout(p=0.5)

  def forward(self, x):
    """(fc7's output after its ReLU, fc8's logits), as mcn's forward computes x36 and x38."""
    for name in self.order:
      x = self.pool(x) if name.startswith("pool") else torch.relu(getattr(self, name)(x))
    x = self.fc6(x).flatten(1) if isinstance(self.fc6, nn.Conv2d) else self.fc6(x.view(x.size(0), -1))
    fc7 = torch.relu(self.fc7(self.dropout(torch.relu(x))))
    return fc7, self.fc8(self.dropout(fc7))


@pytest.fixture(scope="module")
def mcn():
  """A random-initialised Vgg_face_dag in eval mode, and the same weights with fc6 as a convolution."""
  torch.manual_seed(0)
  flat = Vgg_face_dag().eval()
  conv = Vgg_face_dag(conv_fc6=True).eval()
  state = {k: v.reshape(conv.state_dict()[k].shape) for k, v in flat.state_dict().items()}
  conv.load_state_dict(state)
  return flat, conv


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  """Two uint8 RGB images, 224 x 224."""
  return np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), np.uint8)


def torch_features(module: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """mcn's own preparation: RGB 0..255 minus meta['mean'], NCHW; then its forward."""
  x = torch.from_numpy(images.astype(np.float32)) - torch.tensor(module.meta["mean"])
  with torch.no_grad():
    fc7, fc8 = module(x.permute(0, 3, 1, 2).contiguous())
  return fc7.numpy(), fc8.numpy()


def flax_features(model: vgg.VGG16, spec: models.InputSpec, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """agejax's preparation (the weights' input spec on uint8 / 255), then embed (fc7) and the head (fc8)."""
  x = spec.normalize(jnp.asarray(images, jnp.float32) / 255.0)
  fc7 = nnx.jit(lambda m, x: m.embed(x))(model, x)
  return np.asarray(fc7), np.asarray(model.head(fc7))


def assert_relative(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-4) -> None:
  """max |actual - expected| / max |expected| within tolerance."""
  error = max_relative_error(actual, expected)
  assert error < tolerance, error


def backbone_spec(arch: str) -> models.InputSpec:
  """The input spec the vgg16 backbone records for converted `arch` weights."""
  return models.get("vgg16").spec_for(arch)


@pytest.mark.slow
@pytest.mark.parametrize("fc6", ["flat", "conv"])
def test_vgg_face_dag_converts_to_mcns_fc7_and_fc8(mcn, images, fc6):
  module = mcn[0] if fc6 == "flat" else mcn[1]
  state = {k: v.numpy() for k, v in module.state_dict().items()}
  assert state["fc6.weight"].shape == ((4096, 25088) if fc6 == "flat" else (4096, 512, 7, 7))
  backbone, arch = convert.find(state)
  assert (backbone.name, arch) == ("vgg16", "vggface")
  spec = backbone_spec(arch)
  assert (spec.pixel_range, spec.channels, spec.mean, spec.std) == (255.0, "RGB", tuple(MCN_MEAN), (1.0, 1.0, 1.0))
  model = convert.from_published(state, arch)
  assert model.fresh_groups == () and model.head.kernel.shape == (4096, 2622)
  expected_fc7, expected_fc8 = torch_features(module, images)
  fc7, fc8 = flax_features(model, spec, images)
  assert_relative(fc7, expected_fc7)
  assert_relative(fc8, expected_fc8)
  assert np.argmax(fc8, -1).tolist() == np.argmax(expected_fc8, -1).tolist()


def write_keras_h5(path: pathlib.Path, state: dict[str, np.ndarray], top: bool = True, keras1: bool = False) -> None:
  """The weights of keras-vggface's VGG16 (models.VGG16) holding mcn's network, as Keras 2's save_weights writes them
  (or Keras 1's, whose weights are named 'conv1_1_W:0' and 'conv1_1_b:0').

  Keras's conv kernels are HWIO and its first layer reads BGR; its Flatten of pool5 is [7, 7, C], so
  fc6's rows are in that order; Dense kernels are [in, out].
  """
  layers: list[tuple[str, dict[str, np.ndarray]]] = [("input_1", {})]
  for name in vgg.VGG_FACE_CONVS:
    kernel = state[f"{name}.weight"].transpose(2, 3, 1, 0)
    if name == "conv1_1":
      kernel = kernel[:, :, ::-1, :]  # Keras's model reads BGR
    layers.append((name, {"kernel": kernel, "bias": state[f"{name}.bias"]}))
    if name.endswith(("1_2", "2_2", "3_3", "4_3", "5_3")):
      layers.append((f"pool{name[4]}", {}))
  if top:
    fc6 = state["fc6.weight"].reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0).reshape(25088, 4096)
    layers += [
      ("flatten", {}),
      ("fc6", {"kernel": fc6, "bias": state["fc6.bias"]}),
      ("fc6/relu", {}),
      ("fc7", {"kernel": state["fc7.weight"].T, "bias": state["fc7.bias"]}),
      ("fc7/relu", {}),
      ("fc8", {"kernel": state["fc8.weight"].T, "bias": state["fc8.bias"]}),
      ("fc8/softmax", {}),
    ]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [n.encode() for n, _ in layers]
    f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.0.8"
    for name, weights in layers:
      group = f.require_group(name)
      names = {w: f"{name}_{'W' if w == 'kernel' else 'b'}:0" if keras1 else f"{name}/{w}:0" for w in weights}
      group.attrs["weight_names"] = [n.encode() for n in names.values()]
      for w, array in weights.items():
        group.create_dataset(names[w], data=np.ascontiguousarray(array))


@pytest.fixture(scope="module")
def keras_files(mcn, tmp_path_factory):
  """keras-vggface-layout .h5 files (full and notop) from the mcn module's random weights."""
  tmp = tmp_path_factory.mktemp("keras")
  state = {k: v.numpy() for k, v in mcn[0].state_dict().items()}
  write_keras_h5(tmp / "rcmalli_vggface_tf_vgg16.h5", state)
  write_keras_h5(tmp / "rcmalli_vggface_tf_notop_vgg16.h5", state, top=False)
  yield tmp / "rcmalli_vggface_tf_vgg16.h5", tmp / "rcmalli_vggface_tf_notop_vgg16.h5"
  shutil.rmtree(tmp)


def pure_params(model: nnx.Module) -> dict:
  """The converted model's parameters as a pure dict."""
  return models.split_model(model)[1]


@pytest.mark.slow
def test_keras_vggface_h5_converts_to_the_same_arrays(mcn, keras_files, images):
  full, notop = keras_files
  weights = convert.load_weights_file(full)
  assert weights["conv1_1/kernel"].shape == (3, 3, 3, 64) and weights["fc6/kernel"].shape == (25088, 4096)
  backbone, arch = convert.find(weights)
  assert (backbone.name, arch) == ("vgg16", "vggface_keras") and backbone_spec(arch) == backbone_spec("vggface")
  # keras-vggface's own preparation reaches the same numbers: BGR minus its (rounded) BGR mean.
  bgr = images[..., ::-1].astype(np.float32) - np.array(KERAS_BGR_MEAN, np.float32)
  rgb = backbone_spec(arch).normalize(jnp.asarray(images, jnp.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(rgb), bgr[..., ::-1], atol=1e-4)

  from_keras = pure_params(convert.from_published(weights, arch))
  from_dag = pure_params(convert.from_published({k: v.numpy() for k, v in mcn[0].state_dict().items()}, "vggface"))
  assert jax.tree.structure(from_keras) == jax.tree.structure(from_dag)
  jax.tree.map(np.testing.assert_array_equal, from_keras, from_dag)

  no_top = convert.from_published(convert.load_weights_file(notop), "vggface_keras")
  assert no_top.fresh_groups == ("fc1", "fc2", "head")
  jax.tree.map(np.testing.assert_array_equal, pure_params(no_top)["convs"], from_dag["convs"])


@pytest.mark.slow
def test_keras_1_weight_names_load_as_the_same_arrays_as_keras_2s(mcn, keras_files, tmp_path):
  """rcmalli's first files were written by Keras 1 ('conv1_1_W:0'): they load as the Keras 2 names' arrays (mutant
  killed: convert/__init__.py:129 `base.rsplit("_", 1)` -> `rsplit("_", 0)`, which kept 'conv1_1_W' as the kind)."""
  state = {k: v.numpy() for k, v in mcn[0].state_dict().items()}
  write_keras_h5(tmp_path / "keras1.h5", state, keras1=True)
  old, new = convert.load_weights_file(tmp_path / "keras1.h5"), convert.load_weights_file(keras_files[0])
  assert sorted(old) == sorted(new) and "fc8/bias" in old
  for name in new:
    np.testing.assert_array_equal(old[name], new[name], err_msg=name)


@pytest.mark.slow
def test_convert_weights_cli_on_a_notop_h5_leaves_the_top_new(keras_files, mcn, tmp_path):
  _, notop = keras_files
  out = tmp_path / "vggface"
  proc = subprocess.run(
    [sys.executable, "scripts/convert_weights.py", "--checkpoint", str(notop), "--output", str(out)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "vggface_keras for backbone vgg16" in proc.stdout and "fc1, fc2, head start new" in proc.stdout
  meta = convert.load_meta(out)
  assert meta["fresh"] == ["fc1", "fc2", "head"] and convert.input_spec(out) == vgg.VGG_FACE
  # An age model on these weights: the convs are VGG-Face's, fc1, fc2 and the head stay as initialised.
  abstract = nnx.eval_shape(lambda: vgg.VGG16(100, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), models.split_model(abstract)[1])
  new_params, new_state = convert.backbone_from_converted(out, params, {})
  state = mcn[0].state_dict()
  np.testing.assert_array_equal(new_params["convs"][0]["kernel"], state["conv1_1.weight"].numpy().transpose(2, 3, 1, 0))
  for group in ("fc1", "fc2", "head"):
    jax.tree.map(np.testing.assert_array_equal, new_params[group], params[group])
  assert new_state == {}


def test_bad_vgg_face_files_fail_in_one_line(mcn, tmp_path):
  state = {k: v.numpy() for k, v in mcn[0].state_dict().items()}
  del state["conv3_2.bias"]
  state["fc7.weight"] = state["fc7.weight"][:100]
  with pytest.raises(ValueError) as error:
    convert.from_published(state, "vggface")
  message = str(error.value)
  assert "\n" not in message and "missing keys: conv3_2.bias" in message
  assert "mis-shaped keys: fc7.weight (100, 4096) (expected (4096, 4096))" in message
  (tmp_path / "x.h5").write_bytes(b"not hdf5")
  with pytest.raises(ValueError, match=r"x.h5: not a readable HDF5 file"):
    convert.load_weights_file(tmp_path / "x.h5")
  with h5py.File(tmp_path / "y.h5", "w") as f:
    f.create_dataset("w", data=np.zeros(3))
  with pytest.raises(ValueError, match=r"y.h5: not a Keras HDF5 weights file"):
    convert.load_weights_file(tmp_path / "y.h5")
