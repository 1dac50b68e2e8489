"""Fine-tuning from converted torchvision weights: loading, freezing, backbone multiplier, head warm-up."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import checkpoint

from agejax import convert, models, settings
from agejax.training import configuration, optim, train


def opt_cfg(**kw) -> settings.OptimizerSettings:
  return settings.OptimizerSettings(**{"learning_rate": 1e-3, **kw})


def first_updates(cfg, steps: int = 1):
  params = {"convs": {0: {"kernel": jnp.ones((3, 3))}}, "head": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.create_optimizer(cfg, optax.constant_schedule(cfg.learning_rate))
  state = tx.init(params)
  out = []
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    out.append(updates)
  return out


def test_backbone_multiplier_freeze_and_head_warmup():
  plain = first_updates(opt_cfg())[0]
  slow = first_updates(opt_cfg(backbone_lr_multiplier=0.1))[0]
  np.testing.assert_allclose(slow["convs"][0]["kernel"], 0.1 * plain["convs"][0]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(slow["head"]["kernel"], plain["head"]["kernel"])
  frozen = first_updates(opt_cfg(freeze_backbone=True))[0]
  assert not np.any(frozen["convs"][0]["kernel"]) and np.all(frozen["head"]["kernel"] != 0)
  warm = first_updates(opt_cfg(head_warmup_steps=2), steps=3)
  assert [bool(np.any(u["convs"][0]["kernel"])) for u in warm] == [False, False, True]
  assert all(np.all(u["head"]["kernel"] != 0) for u in warm)


def test_missing_pretrained_weights_fail_with_the_command(tiny_config, tmp_path):
  tiny_config.model.pretrained = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="scripts/convert_weights.py --weights IMAGENET1K_V1 --arch vgg16"):
    configuration.validate(tiny_config)


@pytest.mark.slow
def test_training_from_converted_weights_loads_backbone_and_trains_head(tiny_config, tmp_path):
  # torchvision runs in its own process: loaded after TensorFlow (the data pipeline), torch crashes.
  source = tmp_path / "vgg16.safetensors"
  subprocess.run(
    [
      sys.executable,
      "-c",
      (
        "import sys, torch, torchvision, safetensors.torch\n"
        "torch.manual_seed(0)\n"
        "sd = torchvision.models.vgg16(weights=None).state_dict()\n"
        "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[1])\n"
      ),
      str(source),
    ],
    check=True,
    timeout=300,
  )
  reference = convert.load_torch_checkpoint(source)
  weights = tmp_path / "vgg16"
  convert.save_converted(convert.vgg16_from_torchvision(reference), weights, arch="vgg16", backbone="vgg16")
  config = tiny_config
  config.model.update(width_multiplier=1.0, pretrained=str(weights), dtype="float32")
  config.optimizer.freeze_backbone = True
  config.update(batch_size=2, num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2, log_every_steps=1)
  train.train_and_evaluate(config, tmp_path / "run")
  params = checkpoint(tmp_path / "run", 2)["params"]
  np.testing.assert_array_equal(params["convs"]["0"]["kernel"], reference["features.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["convs"]["12"]["bias"], reference["features.28.bias"])
  np.testing.assert_array_equal(params["fc2"]["kernel"], reference["classifier.3.weight"].T)
  model_settings = settings.Settings.from_config(config).model
  fresh_head = models.create_model(model_settings, 100, seed=config.seed).head.kernel[...]
  assert params["head"]["kernel"].shape == (4096, 100)
  assert not np.allclose(params["head"]["kernel"], fresh_head)  # the new head trained
