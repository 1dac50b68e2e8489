"""Frozen means frozen: a frozen norm layer normalises by its running statistics in the train step, as at evaluation.

The head then trains on the features it is evaluated on. The tests read the train step's own
forward pass (`Learner.train_logits`, which `train_step` differentiates) and the train step itself.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agejax import metrics
from agejax.training import configuration, learner, optim
from configs import vgg16_kl

# A rule per backbone that freezes its early layers only (the first four convs, or the stem and layer1).
EARLY = {"vgg16": r"(convs|norms)/[0-3]/.*", "resnet50": r"(conv1|bn1|layer1)/.*"}
# (a frozen norm, a trained norm) of each backbone under its EARLY rule.
NORMS = {"vgg16": (("norms", 2), ("norms", 9)), "resnet50": (("layer1", 1, "bn2"), ("layer3", 0, "bn1"))}


def make(name: str, *, freeze: bool = False, rules: tuple = ()):
  """(learner, state at step 0 with random running statistics) of a tiny batch-normed `name` without augmentation."""
  config = vgg16_kl.get_config("tiny")
  config.model.name = name
  config.model.batch_norm = True  # VGG16-BN; ResNet-50 always has it
  config.optimizer.update(freeze_backbone=freeze, rules=rules, warmup_steps=0)  # warmup 0: step 0 moves
  config.augment.update(flip=False, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0)
  fns, state, _ = learner.create(configuration.validate(config), steps_per_epoch=10)
  # Running statistics unlike any batch's (fresh ones are 0 and 1): evaluation and batch statistics differ.
  rng = np.random.default_rng(1)

  def moved(path, x):
    var = optim.path_name(path).endswith("var")
    return jnp.asarray(rng.uniform(0.5, 2.0, x.shape) if var else rng.normal(0.0, 0.3, x.shape), jnp.float32)

  return fns, state.replace(model_state=jax.tree_util.tree_map_with_path(moved, state.model_state))


def batch(size: int = 8) -> dict:
  rng = np.random.default_rng(0)
  return {
    "image": rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8),  # the tiny config's image size
    "age": rng.integers(1, 91, size).astype(np.float32),
    "age_std": np.zeros(size, np.float32),
  }


@functools.cache
def forward(fns):
  """The jitted (params, model state, uint8 images) -> ((train-step logits, their model state), evaluation logits)."""

  def both(params, model_state, images):
    x = fns.model.preprocess(images)
    train = fns.train_logits(params, model_state, x, jax.random.key(0))
    return train, fns.model.logits(params, model_state, x, train=False)[0]

  return jax.jit(both)


def train_and_eval_logits(fns, state, images):
  """((the train step's forward-pass logits, its model state), the evaluation logits) on one uint8 batch."""
  return forward(fns)(state.params, state.model_state, jnp.asarray(images))


def early_leaves(tree, pattern: str) -> list:
  """The leaves whose "/"-joined path fully matches `pattern`, in order."""
  return [x for path, x in jax.tree_util.tree_leaves_with_path(tree) if re.fullmatch(pattern, optim.path_name(path))]


def norm(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def with_moved_stats(state, path):
  """The state with one norm's running mean shifted."""
  stats = jax.tree.map(lambda x: x, state.model_state)
  parent = norm(stats, path[:-1])
  parent[path[-1]] = {**parent[path[-1]], "mean": norm(stats, path)["mean"] + 0.5}
  return state.replace(model_state=stats)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_a_frozen_backbone_trains_the_head_on_its_evaluation_features(name):
  """With freeze_backbone, the train step's logits are the evaluation's; unfrozen (the control) they are not.

  (test_edges and test_resnet check that a frozen backbone's train step keeps its weights and statistics.)
  """
  frozen, state = make(name, freeze=True)
  images = batch()["image"]
  (logits, stats), evaluated = train_and_eval_logits(frozen, state, images)
  scale = float(jnp.max(jnp.abs(evaluated)))
  np.testing.assert_allclose(logits, evaluated, rtol=1e-5, atol=1e-5 * scale)
  jax.tree.map(np.testing.assert_array_equal, stats, state.model_state)  # normalised by them, kept them
  # The control: the same weights unfrozen normalise by the batch's statistics in training.
  unfrozen, _ = make(name)
  (trained, _), _ = train_and_eval_logits(unfrozen, state, images)
  assert float(jnp.max(jnp.abs(trained - evaluated))) > 1e-2 * scale


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_a_partly_frozen_backbone_uses_running_statistics_in_its_frozen_norms_only(name):
  """Rules freezing the early layers: those norms run on their running statistics, the later ones on the batch's."""
  fns, state = make(name, rules=((EARLY[name], {"frozen": True}),))
  frozen_norm, trained_norm = NORMS[name]
  images = batch()["image"]
  (logits, stats), evaluated = train_and_eval_logits(fns, state, images)
  assert float(jnp.max(jnp.abs(logits - evaluated))) > 1e-3  # the trained norms use the batch's statistics
  # A norm's running statistics change the train step's output exactly when that norm is frozen.
  (moved_frozen, _), _ = train_and_eval_logits(fns, with_moved_stats(state, frozen_norm), images)
  (moved_trained, _), _ = train_and_eval_logits(fns, with_moved_stats(state, trained_norm), images)
  assert float(jnp.max(jnp.abs(moved_frozen - logits))) > 1e-3
  np.testing.assert_array_equal(moved_trained, logits)
  # Frozen norms keep their statistics; trained ones update theirs from the batch.
  jax.tree.map(np.testing.assert_array_equal, norm(stats, frozen_norm), norm(state.model_state, frozen_norm))
  assert not np.array_equal(norm(stats, trained_norm)["mean"], norm(state.model_state, trained_norm)["mean"])


@pytest.mark.slow
def test_one_train_step_of_a_partly_frozen_backbone_trains_on_those_features_and_keeps_the_frozen_layers():
  """The train step's loss is that of `train_logits` (frozen norms on running statistics, the rest on the
  batch's; no augmentation here); the frozen layers' weights and statistics stay bit-identical, the rest train."""
  fns, state = make("vgg16", rules=((EARLY["vgg16"], {"frozen": True}),))
  frozen_norm, trained_norm = NORMS["vgg16"]
  images = batch()
  (logits, _), evaluated = train_and_eval_logits(fns, state, images["image"])
  after, _, loss = jax.jit(fns.train_step)(state, metrics.zeros(), images)
  targets = (jnp.asarray(images["age"]), jnp.asarray(images["age_std"]))
  np.testing.assert_allclose(loss, jnp.mean(fns.loss_fn(logits, *targets)), rtol=1e-5)
  assert abs(float(loss - jnp.mean(fns.loss_fn(evaluated, *targets)))) > 1e-4  # trained norms: batch statistics
  for tree in ("params", "model_state"):
    kept = early_leaves(getattr(state, tree), EARLY["vgg16"])
    assert len(kept) == (16 if tree == "params" else 8)  # 4 convs' kernel and bias, 4 norms' scale and bias; stats
    for old, new in zip(kept, early_leaves(getattr(after, tree), EARLY["vgg16"])):
      np.testing.assert_array_equal(new, old)
  assert not np.array_equal(norm(after.params, trained_norm)["scale"], norm(state.params, trained_norm)["scale"])
  assert not np.array_equal(norm(after.model_state, trained_norm)["var"], norm(state.model_state, trained_norm)["var"])
  assert not np.array_equal(after.params["head"]["kernel"], state.params["head"]["kernel"])


@pytest.mark.slow  # ~20 s alone, 49 s in a loaded fast tier: builds both backbones
def test_a_norm_counts_as_frozen_when_its_scale_bias_or_statistics_are():
  """Learner.frozen_modules: the modules holding any frozen parameter or statistic, by "/"-joined path."""
  rules = (
    (r"norms/0/(scale|bias)", {"frozen": True}),
    (r"norms/1/(mean|var)", {"frozen": True}),
    (r"norms/2/scale", {"frozen": True}),
    (r"convs/3/.*", {"frozen": True}),
  )
  fns, state = make("vgg16", rules=rules)
  assert fns.frozen_modules(state.params, state.model_state) == {"norms/0", "norms/1", "norms/2", "convs/3"}
  fns, state = make("vgg16", freeze=True)
  names = fns.frozen_modules(state.params, state.model_state)
  assert {f"norms/{i}" for i in range(13)} <= names and "fc2" in names and "head" not in names
