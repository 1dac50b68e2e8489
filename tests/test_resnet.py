"""ResNet-50: conversion from torchvision, batch norm in both modes, FLOPs, bf16 and training, against torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_relative_error, one_train_step, randomise_batch_norms
from flax import nnx
from torch.utils import flop_counter

from agejax import convert, errors, models, settings
from agejax.models import resnet

RESNET50_PARAMS = 25_557_032  # torchvision's resnet50

_forward = nnx.jit(lambda model, x: model(x))
_train_forward = nnx.jit(lambda model, x: model(x, train=True))  # updates the model's running statistics


def narrow(width: float = 0.125, num_bins: int = 10):
  """The benchmark's width-scaled torchvision twin with random batch norms (seeded)."""
  torch.manual_seed(1)
  cfg = settings.ModelSettings(name="resnet50", width_multiplier=width)
  return randomise_batch_norms(resnet.torch_model(cfg, num_bins))


def torch_logits(net, x: np.ndarray) -> np.ndarray:
  """torch's logits on the NCHW view of an NHWC batch."""
  with torch.no_grad():
    return net(torch.from_numpy(x).permute(0, 3, 1, 2)).float().numpy()


@pytest.fixture(scope="module")
def full():
  """A random-initialised torchvision resnet50 in eval mode with non-trivial BN statistics, and its conversion."""
  import torchvision  # 4 s to import: only where a test needs it, not at every worker's collection

  torch.manual_seed(0)
  net = randomise_batch_norms(torchvision.models.resnet50(weights=None)).eval()
  return net, convert.resnet50_from_torchvision(net.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 64])
def test_converted_resnet50_equals_torchvision(full, size):
  net, model = full
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  assert max_relative_error(_forward(model, x), torch_logits(net, x)) <= 1e-4
  params = nnx.state(model, nnx.Param)
  assert sum(p.size for p in jax.tree.leaves(params)) == RESNET50_PARAMS
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_train_mode_batch_norm_and_its_running_statistics_equal_torch():
  """Batch statistics normalise; running ones move by torch's momentum 0.1 toward the UNBIASED batch variance.

  At 64 x 64 the last stage's maps are 2 x 2, so a batch of 4 has 16 values per channel there: the
  biased variance (nnx.BatchNorm's) would be 6% off.
  """
  net = narrow().train()
  model = resnet.from_torchvision(net.state_dict())
  x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
  logits = _train_forward(model, x)
  assert max_relative_error(logits, torch_logits(net, x)) <= 1e-4  # also moves torch's running statistics
  updated = resnet.from_torchvision(net.state_dict())
  got, expected = nnx.state(model, nnx.BatchStat), nnx.state(updated, nnx.BatchStat)
  before = nnx.state(resnet.from_torchvision(narrow().state_dict()), nnx.BatchStat)
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(before))]
  assert min(moved) > 1e-3  # the forward did move every statistic
  # Deep statistics carry the forward's float32 rounding: compare each tensor relative to its size.
  assert max(max_relative_error(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))) <= 1e-4
  # Eval mode reads the running statistics, and equals torch's eval mode with them.
  net.eval()
  assert max_relative_error(_forward(model, x), torch_logits(net, x)) <= 1e-4


def test_bad_state_dicts_name_their_keys_in_one_line():
  sd = {k: v.numpy() for k, v in narrow().state_dict().items()}
  assert resnet.identify(sd) == "resnet50"
  assert convert.find(sd)[1] == "resnet50"
  assert resnet.identify({"features.0.weight": 0, "classifier.0.weight": 0}) is None
  sd.pop("layer2.0.downsample.1.running_var")
  sd["layer3.1.conv2.weight"] = sd["layer3.1.conv2.weight"][:, :3]
  sd["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(errors.UserError) as e:
    convert.from_published(sd, "resnet50")
  message = str(e.value)
  assert "\n" not in message and message.startswith("not a torchvision resnet50 state dict")
  assert "unknown keys: layer5.0.conv1.weight" in message
  assert "missing keys: layer2.0.downsample.1.running_var" in message
  assert "mis-shaped keys: layer3.1.conv2.weight (32, 3, 3, 3) (expected (32, 32, 3, 3))" in message


def counted_flops(net, size: int) -> int:
  """FLOPs torch counts on one image: 2 per multiply-add of convs and linears (BN, ReLU, pools and adds not)."""
  with flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
    net.eval()(torch.zeros(1, 3, size, size))
  return counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize(("width", "size", "bins"), [(1.0, 224, 1000), (0.25, 97, 101), (0.0625, 32, 100)])
def test_flops_equal_torchs_count(width, size, bins):
  cfg = settings.ModelSettings(name="resnet50", width_multiplier=width)
  assert models.forward_flops(cfg, size, bins) == counted_flops(resnet.torch_model(cfg, bins), size)


def test_full_resnet50_costs_8_2_gflops_at_224():
  flops = models.forward_flops(settings.ModelSettings(name="resnet50"), 224, 1000)
  assert flops == pytest.approx(8.18e9, rel=1e-3)  # torchvision's documented 4.09 GMACs


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits_and_is_as_close_as_torch_autocast():
  """bfloat16's error against float32 is no larger than PyTorch autocast's on the same net and mode.

  At random initialisation, train mode's batch statistics on 2 x 2 maps amplify rounding: both
  frameworks' bfloat16 logits then differ by ~37%, against ~1% in eval mode.
  """
  net = narrow()
  f32 = resnet.from_torchvision(net.state_dict())
  bf16 = resnet.from_torchvision(net.state_dict(), dtype=jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16))} == {jnp.dtype(jnp.float32)}
  assert bf16.conv1.dtype == jnp.bfloat16
  x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
  for train in (False, True):
    net.train(train)
    with torch.autocast("cpu", dtype=torch.bfloat16):
      autocast = torch_logits(net, x)
    torch_error = max_relative_error(autocast, torch_logits(net, x))
    low = bf16(x, train=train)
    assert low.dtype == jnp.float32
    assert max_relative_error(low, f32(x, train=train)) <= max(1.5 * torch_error, 0.02), (train, torch_error)


def test_config_builds_resnet50_and_says_how_to_convert():
  from configs import resnet50_kl

  config = resnet50_kl.get_config()
  assert config.model.name == "resnet50" and config.model.pretrained == "weights/resnet50_imagenet"
  assert resnet50_kl.get_config("tiny").model.pretrained == ""
  cfg = settings.ModelSettings(name="resnet50", width_multiplier=0.0625)
  model = nnx.eval_shape(lambda: models.create_model(cfg, 7))
  assert model.head.kernel.shape == (4 * 8 * 4, 7)  # the stem's 64 x 0.0625 = 4 channels, x 8 x 4 at the end
  command = models.get("resnet50").convert_command(cfg, "weights/r50")
  expected = "python scripts/convert_weights.py --weights IMAGENET1K_V2 --arch resnet50 --output weights/r50"
  assert command.startswith(expected)


@pytest.mark.slow
def test_a_tiny_train_step_with_a_frozen_backbone_keeps_its_statistics_and_trains_the_head(tiny_config):
  """Every conv, norm and statistic of ResNet-50 is backbone: frozen, it keeps its batch-norm statistics.

  (Unfrozen, statistics move: test_scale's ResNet-50 runs check that on the whole trainer.)
  """
  config = tiny_config
  config.model.name = "resnet50"
  config.optimizer.freeze_backbone = True
  config.optimizer.warmup_steps = 0  # the first step's learning rate is not 0
  _, state, after = one_train_step(config)
  assert set(after.params) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "head"}
  assert len(jax.tree.leaves(state.model_state)) == 2 * 53  # mean and var of every norm
  jax.tree.map(np.testing.assert_array_equal, after.model_state, state.model_state)
  backbone = {k: v for k, v in state.params.items() if k != "head"}
  jax.tree.map(np.testing.assert_array_equal, {k: after.params[k] for k in backbone}, backbone)
  assert np.abs(np.asarray(after.params["head"]["kernel"] - state.params["head"]["kernel"])).max() > 0
