"""Conversion of torchvision VGG16 / VGG16-BN, checked against torchvision's own forward pass."""

import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import jax
import numpy as np
import pytest
import torch
from conftest import max_relative_error, randomise_batch_norms
from flax import nnx, traverse_util

from agejax import convert, models
from agejax.models import vgg

REPO = pathlib.Path(__file__).resolve().parents[1]
VGG16_PARAMS = "138,357,544"  # torchvision's vgg16 parameter count

_forward = nnx.jit(lambda model, x: model(x))


def _write_marker(path: str) -> None:
  """The payload of _Exploit: runs only if a loader unpickles arbitrary callables."""
  pathlib.Path(path).write_text("unpickled")


class _Exploit:
  """A pickled object whose unpickling would write a marker file."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return _write_marker, (str(self.marker),)


@pytest.fixture(scope="module")
def torch_models() -> dict:
  """Random-initialised torchvision models in eval mode, keyed by arch."""
  import torchvision  # 4 s to import: only where a test needs it, not at every worker's collection

  torch.manual_seed(0)
  plain = torchvision.models.vgg16(weights=None)
  with_bn = torchvision.models.vgg16_bn(weights=None)
  return {"vgg16": plain.eval(), "vgg16_bn": randomise_batch_norms(with_bn).eval()}


@pytest.fixture(scope="module")
def converted(torch_models) -> dict:
  """The Flax conversions of torch_models."""
  return {arch: convert.vgg16_from_torchvision(m.state_dict()) for arch, m in torch_models.items()}


@pytest.fixture
def scratch(tmp_path) -> Iterator[pathlib.Path]:
  """A tmp_path deleted afterwards: each full-size checkpoint is 0.5 GB and pytest keeps old tmp dirs."""
  yield tmp_path
  shutil.rmtree(tmp_path)


@pytest.fixture(scope="module")
def cli_output(torch_models, tmp_path_factory) -> Iterator[tuple[pathlib.Path, subprocess.CompletedProcess]]:
  """Runs the conversion script on a saved random vgg16 state dict."""
  tmp = tmp_path_factory.mktemp("cli")
  torch.save(torch_models["vgg16"].state_dict(), tmp / "vgg16.pth")
  result = subprocess.run(
    [
      sys.executable,
      "scripts/convert_torchvision.py",
      "--checkpoint",
      str(tmp / "vgg16.pth"),
      "--arch",
      "vgg16",
      "--output",
      str(tmp / "out"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  yield tmp / "out", result
  shutil.rmtree(tmp)


def _pure(model: nnx.Module) -> tuple[dict, dict]:
  """The (params, model_state) pure dicts the trainer uses."""
  _, params, rest = models.split_model(model)
  return params, rest


def _age_model_dicts(width: float, batch_norm: bool) -> tuple[dict, dict]:
  """The trainer's param/state pure dicts for a 100-bin age model (zeros: only shapes matter here)."""
  abstract = nnx.eval_shape(lambda: vgg.VGG16(100, width_multiplier=width, batch_norm=batch_norm, rngs=nnx.Rngs(0)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _pure(abstract))


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 64])  # at 64 the final map is 2x2, which adaptive pooling spreads to 7x7
@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_logits_match_torchvision(torch_models, converted, arch, size):
  x = np.random.default_rng([size, len(arch)]).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    expected = torch_models[arch](torch.from_numpy(x)).numpy()
  got = np.asarray(_forward(converted[arch], x.transpose(0, 2, 3, 1)))
  rel = max_relative_error(got, expected)
  assert rel <= 1e-4, f"{arch} at {size}: max|diff| / max|logit| = {rel:.2e}"


@pytest.mark.slow
def test_weight_layouts(torch_models, converted):
  sd = {k: v.numpy() for k, v in torch_models["vgg16_bn"].state_dict().items()}
  model = converted["vgg16_bn"]
  np.testing.assert_array_equal(model.convs[0].kernel[...], sd["features.0.weight"].transpose(2, 3, 1, 0))
  # In vgg16_bn the second conv is features.3: features.1 is its batch norm and features.2 its ReLU.
  np.testing.assert_array_equal(model.convs[1].kernel[...], sd["features.3.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.norms[0].scale[...], sd["features.1.weight"])
  np.testing.assert_array_equal(model.norms[0].mean[...], sd["features.1.running_mean"])
  np.testing.assert_array_equal(model.norms[12].var[...], sd["features.41.running_var"])
  np.testing.assert_array_equal(model.fc2.kernel[...], sd["classifier.3.weight"].T)
  # fc1: torch's input index is c*49 + h*7 + w, ours (NHWC flatten) is (h*7 + w)*512 + c.
  fc1, torch_fc1 = np.asarray(model.fc1.kernel[...]), sd["classifier.0.weight"]
  for c, h, w, j in [(0, 0, 0, 0), (511, 6, 6, 4095), (17, 2, 5, 123), (300, 6, 0, 7)]:
    assert fc1[(h * 7 + w) * 512 + c, j] == torch_fc1[j, c * 49 + h * 7 + w]


@pytest.mark.slow
def test_bad_keys_are_all_named(torch_models):
  sd = {k: v.numpy() for k, v in torch_models["vgg16"].state_dict().items()}
  del sd["features.0.bias"]
  sd["features.99.weight"] = np.zeros(3, np.float32)
  sd["classifier.3.bias"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError) as error:
    convert.vgg16_from_torchvision(sd)
  for name in ("features.0.bias", "features.99.weight", "classifier.3.bias"):
    assert name in str(error.value)


@pytest.mark.slow
def test_numpy_input_needs_no_torch():
  code = (
    "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
    "import numpy as np\n"
    "from agejax import convert\n"
    "try:\n"
    "  convert.vgg16_from_torchvision({'features.0.weight': np.zeros((64, 3, 3, 3), np.float32)})\n"
    "except ValueError as e:\n"
    "  assert 'missing keys' in str(e) and 'features.0.bias' in str(e), e\n"
    "  print('ok')\n"
  )
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_save_load_round_trip(converted, scratch):
  model = converted["vgg16_bn"]
  out = convert.save_converted(model, scratch / "weights", arch="vgg16_bn", backbone="vgg16", source="test")
  params, model_state, meta = convert.load_converted(out)
  assert meta == {
    "arch": "vgg16_bn",
    "fresh": [],
    "backbone": "vgg16",
    "num_classes": 1000,
    "input_spec": models.IMAGENET.to_json(),
    "source": "test",
  }
  assert convert.input_spec(out) == models.IMAGENET
  want_params, want_state = _pure(model)
  jax.tree.map(np.testing.assert_array_equal, params, want_params)
  jax.tree.map(np.testing.assert_array_equal, model_state, want_state)
  with pytest.raises(ValueError, match="already exists"):
    convert.save_converted(model, out, arch="vgg16_bn", backbone="vgg16")


@pytest.mark.slow
def test_cli_converts_a_pth(cli_output, converted):
  out, result = cli_output
  assert result.returncode == 0, result.stderr
  assert str(out) in result.stdout and "vgg16" in result.stdout and VGG16_PARAMS in result.stdout
  params, model_state, meta = convert.load_converted(out)
  assert meta["arch"] == "vgg16" and meta["num_classes"] == 1000 and meta["source"].endswith("vgg16.pth")
  jax.tree.map(np.testing.assert_array_equal, params, _pure(converted["vgg16"])[0])
  assert model_state == {}


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
  bad = tmp_path / "weights.npz"
  bad.write_bytes(b"not a checkpoint")
  result = subprocess.run(
    [
      sys.executable,
      "scripts/convert_torchvision.py",
      "--checkpoint",
      str(bad),
      "--arch",
      "vgg16",
      "--output",
      str(tmp_path / "out"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert result.stderr.strip().startswith("error:") and str(bad) in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_backbone_from_converted(cli_output, converted):
  out, _ = cli_output
  params, model_state = _age_model_dicts(1.0, batch_norm=False)
  head = {"kernel": np.full((4096, 100), 0.25, np.float32), "bias": np.arange(100, dtype=np.float32)}
  params["head"] = head
  new_params, new_state = convert.backbone_from_converted(out, params, model_state)
  source = _pure(converted["vgg16"])[0]
  for layer in ("convs", "fc1", "fc2"):
    jax.tree.map(np.testing.assert_array_equal, new_params[layer], source[layer])
  jax.tree.map(np.testing.assert_array_equal, new_params["head"], head)
  assert new_state == {}
  assert not params["fc1"]["kernel"].any()  # the caller's dicts are not modified


@pytest.mark.slow
@pytest.mark.parametrize(
  "width, batch_norm, key",
  [
    (0.5, False, "params/convs/0/kernel: converted (3, 3, 3, 64), model (3, 3, 3, 32)"),
    (1.0, True, "params/norms/0/bias: converted absent, model (64,)"),
  ],
)
def test_backbone_mismatch_names_the_key(cli_output, width, batch_norm, key):
  out, _ = cli_output
  params, model_state = _age_model_dicts(width, batch_norm)
  with pytest.raises(ValueError) as error:
    convert.backbone_from_converted(out, params, model_state)
  assert key in str(error.value)
  # Three named, the rest counted (mutant killed: backbone_from_converted's `len(mismatches) - 3` -> `** 3`).
  converted_params, converted_state, _ = convert.load_converted(out)
  n = _mismatched_leaves(converted_params, params) + _mismatched_leaves(converted_state, model_state)
  assert n > 3 and str(error.value).endswith(f"; and {n - 3} more"), (n, str(error.value)[-80:])


def _mismatched_leaves(converted: dict, given: dict) -> int:
  """How many backbone arrays (all but the head) are absent from one tree or shaped otherwise in the two."""
  a, b = traverse_util.flatten_dict(converted), traverse_util.flatten_dict(given)
  keys = {k for k in a | b if k[0] != "head"}
  return sum(k not in a or k not in b or a[k].shape != b[k].shape for k in keys)


def test_pickled_objects_are_refused(tmp_path):
  marker, path = tmp_path / "marker", tmp_path / "evil.pth"
  torch.save({"x": _Exploit(marker)}, path)
  with pytest.raises(ValueError) as error:
    convert.load_torch_checkpoint(path)
  message = str(error.value)
  assert str(path) in message and "_write_marker" in message and "\n" not in message
  assert not marker.exists()
  torch.load(path, weights_only=False)  # the file is live: plain unpickling does run the payload
  assert marker.exists()


def test_checkpoint_formats(tmp_path):
  from safetensors.numpy import save_file

  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}
  as_torch = {k: torch.from_numpy(v) for k, v in tensors.items()}
  torch.save(as_torch, tmp_path / "bare.pth")
  torch.save({"state_dict": as_torch, "epoch": 3}, tmp_path / "wrapped.pt")
  save_file(tensors, tmp_path / "w.safetensors")
  for name in ("bare.pth", "wrapped.pt", "w.safetensors"):
    loaded = convert.load_torch_checkpoint(tmp_path / name)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
      np.testing.assert_array_equal(loaded[k], v)
      assert loaded[k].dtype == v.dtype
  torch.save({"a": 1, "b": as_torch["b"]}, tmp_path / "mixed.pth")
  with pytest.raises(ValueError, match="not tensors: a$"):
    convert.load_torch_checkpoint(tmp_path / "mixed.pth")
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="w.npz: unsupported"):
    convert.load_torch_checkpoint(tmp_path / "w.npz")


def test_only_registered_architectures_from_torchvision_are_converter_names():
  """`<arch>_from_torchvision` exists for each registered architecture and no other name does (mutant killed:
  published.py torchvision_converter's `source == "torchvision"` -> `>=`, which made up `vgg16_from_vgg_face`)."""
  assert callable(convert.vgg16_from_torchvision) and callable(convert.vgg16_bn_from_torchvision)
  for name in ("vgg16_from_vgg_face", "vgg16_from_zoo", "vgg16_from_", "vgg19_from_torchvision"):
    assert not hasattr(convert, name), name
