"""Plug-ins from outside agejax (tests/plugin_toy.py): a backbone with its own input spec, a loss, optimizer rules.

No file in agejax/ names them: the config lists the module in `config.plugins`, and every script
that reads the workdir imports it again from its config.json.
"""

import jax
import numpy as np
import plugin_toy
import pytest
from conftest import one_train_step
from pipeline import check_every_path, train

from agejax import errors
from agejax.training import configuration, learner

TOY = ("--config.model.name=toy", "--config.plugins=('plugin_toy',)")


@pytest.fixture(scope="module")
def toy_run(data_dir, compilation_cache, tmp_path_factory):
  """A `:tiny` run of the toy backbone, trained by scripts/train.py."""
  return train(tmp_path_factory.mktemp("toy"), *TOY, data_dir=data_dir, cache=compilation_cache)


@pytest.mark.slow
def test_a_toy_backbone_trains_evaluates_predicts_exports_and_serves_with_its_input_spec(
  toy_run, compilation_cache, tmp_path
):
  check_every_path(toy_run, "toy", plugin_toy.SPEC, compilation_cache, tmp_path)


def one_step(tiny_config, **optimizer) -> tuple[learner.TrainState, learner.TrainState, learner.Learner]:
  """(the state at step 0, after one train step, the learner) of the tiny VGG16 with the plug-in loss."""
  config = tiny_config.copy_and_resolve_references()
  config.plugins = ("plugin_toy",)
  config.loss.name = "expectation_l2"
  config.loss.scale = 50.0  # the plug-in loss's own key
  config.optimizer.update(schedule="constant", **optimizer)
  fns, state, after = one_train_step(config)
  return state, after, fns


@pytest.mark.slow
def test_a_plugin_loss_and_optimizer_rules_by_parameter_path(tiny_config):
  rules = (("convs/0/.*", {"frozen": True}), ("fc1/kernel", {"lr": 0.5}))
  before, plain, fns = one_step(tiny_config)
  _, ruled, _ = one_step(tiny_config, rules=rules)
  # The plug-in loss, with its own config key: (E[age] - age)^2 / 50, against NumPy.
  logits = np.random.default_rng(1).normal(size=(4, 100)).astype(np.float32)
  ages = np.array([3.0, 30.0, 60.0, 90.0], np.float32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(
    fns.loss_fn(logits, ages, np.zeros(4)), (p @ np.arange(1, 101) - ages) ** 2 / 50, rtol=1e-5
  )
  # Rules: the first conv is frozen; fc1's kernel moves half as far (Adam's first step is lr * g / |g|).
  jax.tree.map(np.testing.assert_array_equal, ruled.params["convs"][0], before.params["convs"][0])
  assert np.abs(plain.params["convs"][0]["kernel"] - before.params["convs"][0]["kernel"]).max() > 0
  half = ruled.params["fc1"]["kernel"] - before.params["fc1"]["kernel"]
  full = plain.params["fc1"]["kernel"] - before.params["fc1"]["kernel"]
  np.testing.assert_allclose(half, 0.5 * full, rtol=1e-4, atol=1e-9)
  np.testing.assert_array_equal(ruled.params["fc1"]["bias"], plain.params["fc1"]["bias"])  # not matched: as before
  np.testing.assert_array_equal(ruled.params["head"]["kernel"], plain.params["head"]["kernel"])


@pytest.mark.parametrize(
  "rules, message",
  [
    ((("head/.*", {"speed": 2}),), "config.optimizer.rules[0]: unknown options ['speed']"),
    ((("head/(", {"lr": 2}),), "config.optimizer.rules[0]="),
  ],
)
def test_a_bad_rule_fails_in_one_line_before_anything_is_built(tiny_config, rules, message):
  tiny_config.optimizer.rules = rules
  with pytest.raises(errors.UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
    configuration.validate(tiny_config)


def test_an_unknown_backbone_or_plugin_fails_in_one_line(tiny_config):
  tiny_config.model.name = "resnet7"
  with pytest.raises(errors.UserError, match=r"config.model.name='resnet7' is not a registered backbone \(.*vgg16"):
    configuration.validate(tiny_config)
  tiny_config.plugins = ("no_such_plugin_module",)
  with pytest.raises(errors.UserError, match="config.plugins: cannot import 'no_such_plugin_module'"):
    configuration.validate(tiny_config)
