"""The learner: an age model, its optimizer and its loss, and the pure train step they make (jitted over a mesh).

No TensorFlow, TFDS or CLU here: the benchmark runs it on a machine with only jax, flax and optax.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from agejax import labels, metrics, models, settings
from agejax.evaluation import scoring
from agejax.training import augment, losses, optim

PyTree = Any
Targets = tuple[jax.Array, jax.Array]  # (ages, age stds: 0 where the data has none)


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: the step, float32 params, batch statistics, optimizer state.

  Params and model state are plain nested dicts, so a checkpoint restores with plain Orbax.
  """

  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  skipped_steps: jax.Array  # steps with a non-finite loss or gradient that changed nothing (nonfinite='skip')


def create_train_state(params: PyTree, model_state: PyTree, tx: optax.GradientTransformation) -> TrainState:
  """Returns the state at step 0."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=tx.init(params),
    skipped_steps=jnp.zeros((), jnp.int32),
  )


def create(
  cfg: settings.Settings,
  steps_per_epoch: int,
  *,
  abstract: bool = False,
  overlay: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]] | None = None,
  input_spec: models.InputSpec | None = None,
) -> tuple["Learner", TrainState, optax.Schedule]:
  """Builds the settings' model, optimizer and loss, and the state at step 0 (on the host).

  Args:
    cfg: the training settings.
    steps_per_epoch: training batches per epoch (the step schedule counts epochs).
    abstract: give shapes only (a restore target; nothing is allocated).
    overlay: `overlay(params, model_state)` replaces the initial weights (a pretrained backbone).
    input_spec: the input the weights expect; default: the backbone's own (training from scratch).

  Returns:
    (the learner, the state at step 0, the learning-rate schedule).
  """
  backbone = models.get(cfg.model.name)
  bins = labels.age_bins(cfg.labels.min_age, cfg.labels.max_age)
  make = lambda: models.create_model(cfg.model, len(bins), seed=cfg.run.seed)
  graphdef, params, model_state = models.split_model(nnx.eval_shape(make) if abstract else make())
  if overlay is not None:
    params, model_state = overlay(params, model_state)
  schedule = optim.learning_rate_schedule(cfg.optimizer, cfg.run.num_train_steps, steps_per_epoch)
  tx = optim.create_optimizer(cfg.optimizer, schedule, backbone.head)
  init = lambda p, s: create_train_state(p, s, tx)
  state = jax.eval_shape(init, params, model_state) if abstract else init(params, model_state)
  spec = input_spec or backbone.input_spec
  model = models.AgeModel(graphdef, bins, cfg.data.image_size, spec, eval_crop=float(cfg.data.eval_crop))
  return Learner(model, tx, losses.make_loss(cfg.loss, jnp.asarray(bins)), cfg), state, schedule


class Learner:
  """An age model, its optimizer and its loss: builds the pure train step.

  Args:
    model: the age model (backbone graph, bins, input size and spec).
    tx: the optimizer.
    loss_fn: loss(logits, ages, age_stds) per example.
    cfg: the training settings (seed, augmentation, gradient accumulation, epsilon-error sigma).
  """

  def __init__(
    self, model: models.AgeModel, tx: optax.GradientTransformation, loss_fn: losses.LossFn, cfg: settings.Settings
  ):
    self.model, self.tx, self.loss_fn, self.cfg = model, tx, loss_fn, cfg
    self.bins = jnp.asarray(model.bins)
    self.rules = optim.rules_for(cfg.optimizer, models.get(cfg.model.name).head)

  def evaluator(self, data: Any, mesh: jax.sharding.Mesh, *, flip: bool | None = None) -> scoring.Evaluator:
    """An Evaluator of this model on a split: the settings' loss, eval batch, epsilon-error sigma and flip (default)."""
    return scoring.Evaluator(
      self.model,
      self.loss_fn,
      data,
      self.cfg.eval.batch_size,
      mesh,
      epsilon_sigma=self.cfg.eval.epsilon_sigma,
      flip=self.cfg.eval.flip if flip is None else flip,
    )

  def sigma(self, batch: dict) -> jax.Array:
    """Per-image epsilon-error sigma of a batch (see metrics.per_image_sigma)."""
    return metrics.per_image_sigma(batch.get("age_std"), batch["age"], self.cfg.eval.epsilon_sigma)

  def frozen_modules(self, params: PyTree, model_state: PyTree) -> frozenset[str]:
    """The "/"-joined paths of the modules holding a parameter or statistic that the rules freeze.

    A norm layer counts as frozen when any of its scale, bias or statistics is. Only the trees'
    structure is read: a trace-time decision.
    """
    leaves = [path for tree in (params, model_state) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return frozenset(optim.path_name(path[:-1]) for path in leaves if optim.is_frozen(path, self.rules))

  def train_logits(
    self, params: PyTree, model_state: PyTree, images: jax.Array, key: jax.Array
  ) -> tuple[jax.Array, PyTree]:
    """The train step's forward pass: (logits, updated model state).

    Batch statistics and dropout, except that frozen norm layers normalise by their running
    statistics, as at evaluation: the trained layers learn on the features they are evaluated on.
    """
    frozen = self.frozen_modules(params, model_state)
    return self.model.logits(params, model_state, images, train=True, key=key, frozen=frozen)

  def _grads(
    self, params: PyTree, model_state: PyTree, images: jax.Array, targets: Targets, key: jax.Array
  ) -> tuple[PyTree, tuple[jax.Array, jax.Array, PyTree]]:
    """Gradient of the mean loss; aux is (per-example loss, logits, updated model state)."""

    def loss_of(params):
      logits, new_state = self.train_logits(params, model_state, images, key)
      per_example = self.loss_fn(logits, *targets)
      return jnp.mean(per_example), (per_example, logits, new_state)

    return jax.grad(loss_of, has_aux=True)(params)

  def _accumulated_grads(
    self, params: PyTree, model_state: PyTree, images: jax.Array, targets: Targets, key: jax.Array
  ) -> tuple[PyTree, tuple[jax.Array, jax.Array, PyTree]]:
    """`_grads` over `grad_accum_steps` micro-batches in a scan: the same mean gradient, less memory."""
    k = self.cfg.run.grad_accum_steps
    # Micro-batch j takes examples j, j+k, ...: each device keeps its own rows, so no data moves.
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:])

    def body(carry, xs):
      grad_sum, state = carry
      imgs, micro_targets, i = xs
      grads, (per_example, logits, state) = self._grads(params, state, imgs, micro_targets, jax.random.fold_in(key, i))
      return (jax.tree.map(jnp.add, grad_sum, grads), state), (per_example, logits)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, model_state), (per_example, logits) = jax.lax.scan(
      body, (zeros, model_state), (split(images), jax.tree.map(split, targets), jnp.arange(k))
    )
    return jax.tree.map(lambda g: g / k, grad_sum), (merge(per_example), merge(logits), model_state)

  def train_step(
    self, state: TrainState, sums: metrics.Sums, batch: dict
  ) -> tuple[TrainState, metrics.Sums, jax.Array]:
    """One optimizer step on a uint8 batch; adds its metrics to the running sums; returns its loss.

    A step whose loss or gradient is not finite changes nothing but the step counter, the state's
    `skipped_steps` and, for the first such step since the sums were reset, the sums' `nonfinite_step`.
    """
    # Randomness is a function of (seed, step): a resumed run draws exactly the same numbers.
    key = jax.random.fold_in(jax.random.key(self.cfg.run.seed), state.step)
    aug_key, dropout_key = jax.random.split(key)
    images = augment.augment(batch["image"], aug_key, self.model.image_size, self.cfg.augment, self.model.input_spec)
    ages = batch["age"].astype(jnp.float32)
    targets = (ages, batch["age_std"].astype(jnp.float32))
    grads_fn = self._grads if self.cfg.run.grad_accum_steps == 1 else self._accumulated_grads
    grads, (per_example, logits, model_state) = grads_fn(state.params, state.model_state, images, targets, dropout_key)
    # Frozen layers keep their batch-norm statistics too, not only their parameters (frozen norm
    # layers ran on them and left them as they were; this also holds any other frozen statistic).
    model_state = jax.tree_util.tree_map_with_path(
      lambda path, new, old: old if optim.is_frozen(path, self.rules) else new, model_state, state.model_state
    )
    finite = jnp.isfinite(jnp.mean(per_example)) & jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    new = (optax.apply_updates(state.params, updates), opt_state, model_state)
    # One conditional that only selects: a select per leaf compiled ~3x slower for ResNet-50's ~500
    # leaves. The update stays outside it, fused as before (the demo run matches to every printed digit).
    params, opt_state, model_state = jax.lax.cond(
      finite, lambda: new, lambda: (state.params, state.opt_state, state.model_state)
    )
    pred = labels.expected_age(jax.nn.softmax(logits), self.bins)
    mask = jnp.broadcast_to(finite, ages.shape)
    sums = metrics.add(sums, metrics.batch_sums(per_example, pred, ages, self.sigma(batch), mask))
    sums["nonfinite_step"] = jnp.where(
      (sums["nonfinite_step"] == 0) & ~finite, (state.step + 1).astype(jnp.float32), sums["nonfinite_step"]
    )
    new_state = TrainState(
      step=state.step + 1,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    return new_state, sums, jnp.mean(per_example)


def jit_train_step(
  learner: Learner, state_sharding: PyTree, batch_sharding: jax.sharding.NamedSharding
) -> jax.stages.Wrapped:
  """Returns the train step jitted with explicit shardings, donating the state and the sums."""
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    learner.train_step,
    in_shardings=(state_sharding, replicated, batch_sharding),
    out_shardings=(state_sharding, replicated, replicated),
    donate_argnums=(0, 1),
  )
