"""Pins of what a trainer relies on: each face's own target sigma, the weight-decay mask, the schedule's units and
augmentation's randomness; each test's docstring names a single-line bug (file:line before -> after) it catches."""

import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import plugin_toy  # noqa: F401  # registers the toy backbone: a real train step that compiles in seconds
import pytest

from agejax import labels, metrics, models, settings
from agejax.training import augment, learner, losses, optim, train
from configs import vgg16_kl

BINS = labels.age_bins(1, 100).astype(np.float64)


def log_softmax_f64(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def gaussian_f64(age: float, sigma: float) -> np.ndarray:
  """The Gaussian N(age, sigma^2) at the bins 1..100, normalised to sum 1."""
  g = np.exp(-0.5 * ((BINS - age) / sigma) ** 2)
  return g / g.sum()


def kl_f64(target: np.ndarray, log_probs: np.ndarray) -> float:
  nz = target > 0
  return float(np.sum(target[nz] * (np.log(target[nz]) - log_probs[nz])))


# --- 1. The per-image sigma of the target -------------------------------------------------------------------------


@pytest.mark.slow
def test_make_loss_fits_each_face_to_a_gaussian_of_its_own_age_std_as_float64_numpy():
  """loss.sigma_from_data: a face's target has its own age_std (floored), loss.sigma where it has none.

  Mutant: agejax/training/losses.py:59 `target_sigma(cfg, age_std)` -> `cfg.sigma`.
  """
  ages = np.array([1, 30, 45, 60, 99, 100], np.float32)
  age_std = np.array([0.0, 6.0, 0.3, 3.5, 2.5, 0.0], np.float32)
  sigma = [2.0, 6.0, 1.0, 3.5, 2.5, 2.0]  # loss.sigma where none (0); its own, floored at loss.sigma_floor
  logits = (np.random.default_rng(0).normal(size=(6, 100)) * 2).astype(np.float32)
  cfg = settings.LossSettings(sigma=2.0, target="gaussian", sigma_from_data=True, sigma_floor=1.0)
  loss_fn = losses.make_loss(cfg, jnp.asarray(BINS, jnp.float32))
  got = loss_fn(jnp.asarray(logits), jnp.asarray(ages), jnp.asarray(age_std))
  ref = [kl_f64(gaussian_f64(a, s), z) for a, s, z in zip(ages, sigma, log_softmax_f64(logits))]
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=2e-5)


def toy_config(seed: int) -> Any:
  """The `:tiny` config (flip, brightness and contrast; no dropout) on the toy backbone, with per-face sigma."""
  config = vgg16_kl.get_config("tiny")
  config.model.name = "toy"
  config.seed = seed
  config.loss.update(sigma=2.0, sigma_from_data=True, sigma_floor=1.0)
  config.metrics.epsilon_sigma = 3.0
  return config


# The head's kernel is 0, so every face's logits are HEAD_BIAS: a known distribution peaked near 50.
HEAD_BIAS = (-0.5 * ((BINS - 50.0) / 8.0) ** 2 + 0.3 * np.random.default_rng(1).normal(size=100)).astype(np.float32)
AGES = np.array([48.0, 45.0, 51.0, 70.0], np.float32)
AGE_STDS = np.array([0.0, 6.0, 0.3, 3.5], np.float32)  # none; wide; below loss.sigma_floor; moderate
BATCH = {
  "image": np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
  "age": AGES,
  "age_std": AGE_STDS,
}

StepFn = Callable[[learner.TrainState, int], tuple[dict, float, np.ndarray]]


def toy_step(seed: int, seen: list) -> tuple[learner.TrainState, StepFn]:
  """The state at step 0 and `run(state, step) -> (sums, loss, the images the step augmented)` on BATCH."""
  fns, abstract, _ = learner.create(settings.Settings.from_config(toy_config(seed)), steps_per_epoch=10, abstract=True)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype), abstract.params)
  params["head"] = {"kernel": np.zeros_like(params["head"]["kernel"]), "bias": HEAD_BIAS}
  state = learner.create_train_state(params, abstract.model_state, fns.tx)
  step_fn = jax.jit(fns.train_step)

  def run(state: learner.TrainState, step: int) -> tuple[dict, float, np.ndarray]:
    seen.clear()
    _, sums, loss = step_fn(state.replace(step=jnp.asarray(step, jnp.int32)), metrics.zeros(), BATCH)
    jax.block_until_ready(loss)
    jax.effects_barrier()
    assert len(seen) == 1
    return {k: float(v) for k, v in sums.items()}, float(loss), seen[0]

  return state, run


@pytest.fixture(scope="module")
def toy_steps():
  """{seed: (state, run)} for seeds 0 and 1; augment.augment is wrapped to hand the step's augmented batch back."""
  seen: list[np.ndarray] = []
  original = augment.augment

  def spy(*args: Any) -> jax.Array:
    out = original(*args)
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), out)
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(augment, "augment", spy)
    yield {seed: toy_step(seed, seen) for seed in (0, 1)}


@pytest.mark.slow
def test_the_train_step_fits_each_face_to_its_own_sigma_and_scores_epsilon_error_with_its_age_std(toy_steps):
  """The step's loss is the mean float64 KL to each face's own-sigma Gaussian; its epsilon-error uses the raw age_std.

  Mutants: agejax/training/learner.py:161 `targets = (ages, batch["age_std"].astype(jnp.float32))` ->
  `targets = (ages, jnp.zeros_like(ages))`; agejax/training/learner.py:113 `batch.get("age_std")` -> `None` (the
  epsilon-error's sigma); agejax/training/losses.py:59 `target_sigma(cfg, age_std)` -> `cfg.sigma`.
  """
  state, run = toy_steps[0]
  sums, loss, _ = run(state, 0)
  log_probs = log_softmax_f64(HEAD_BIAS)
  pred = float(np.exp(log_probs) @ BINS)
  loss_sigma = [2.0, 6.0, 1.0, 3.5]  # loss.sigma where none; its own; floored at loss.sigma_floor; its own
  # Ages 7 sigma or more from the ends: the config's mean-preserving target is this Gaussian (to 1e-10).
  kl = np.array([kl_f64(gaussian_f64(a, s), log_probs) for a, s in zip(AGES, loss_sigma)])
  assert sums["count"] == 4
  assert loss == pytest.approx(kl.mean(), abs=2e-5)
  assert sums["loss"] == pytest.approx(kl.sum(), abs=1e-4)
  epsilon_sigma = np.array([3.0, 6.0, 0.3, 3.5])  # metrics.epsilon_sigma where none; else its own, not floored
  epsilon = 1.0 - np.exp(-((pred - AGES.astype(np.float64)) ** 2) / (2.0 * epsilon_sigma**2))
  assert sums["epsilon_error"] == pytest.approx(epsilon.sum(), abs=1e-4)
  assert sums["mae"] == pytest.approx(np.abs(pred - AGES).sum(), abs=1e-3)


# --- 4. Augmentation's randomness across steps (and across the faces of a batch) -----------------------------------


@pytest.mark.slow
def test_augmentation_differs_from_step_to_step_and_repeats_for_the_same_seed_and_step(toy_steps):
  """Every face is augmented anew at each step; (seed, step) alone decides how, so a resumed run repeats it.

  Mutants: agejax/training/learner.py:157 `jax.random.fold_in(jax.random.key(self.cfg.run.seed), state.step)` ->
  `jax.random.key(self.cfg.run.seed)` (every step the same augmentation), and -> `jax.random.fold_in(jax.random.key(0),
  state.step)` (the seed ignored).
  """
  state0, run0 = toy_steps[0]
  state1, run1 = toy_steps[1]
  at5, at6 = run0(state0, 5)[2], run0(state0, 6)[2]
  again = run0(state0, 5)[2]
  other_seed = run1(state1, 5)[2]
  assert at5.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(again, at5)
  for i in range(4):
    assert not np.allclose(at5[i], at6[i], atol=1e-3), f"face {i}: the same augmentation at steps 5 and 6"
    assert not np.allclose(at5[i], other_seed[i], atol=1e-3), f"face {i}: the same augmentation for seeds 0 and 1"


IDENTITY = models.InputSpec(pixel_range=1.0, channels="RGB", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
augment_jit = jax.jit(augment.augment, static_argnums=(2, 3, 4))  # one compilation instead of many eager ones


def same_face(n: int, size: int = 16) -> jax.Array:
  """n copies of one face whose pixels stay inside [0.3, 0.6] (no clipping under brightness and contrast)."""
  face = np.random.default_rng(4).uniform(0.3 * 255, 0.6 * 255, (size, size, 3)).astype(np.uint8)
  return jnp.asarray(np.broadcast_to(face, (n, size, size, 3)))


def test_each_face_of_a_batch_gets_its_own_independent_brightness_and_contrast_within_their_ranges():
  """Brightness b in 1 +- augment.brightness and contrast c in 1 +- augment.contrast are drawn per face, independently.

  out = b * (c * (x - mean) + mean), so b = mean(out) / mean(x) and c = std(out) / (b * std(x)).
  Mutants: agejax/training/augment.py:64 `jax.random.uniform(k_contrast, ...)` -> `jax.random.uniform(k_bright, ...)`
  (c follows b); augment.py:61 `minval=-cfg.brightness` -> `minval=0.0` (only brighter);
  augment.py:61 `k_bright, (b, 1, 1, 1)` -> `k_bright, (1, 1, 1, 1)` (one brightness for the whole batch).
  """
  x = same_face(64)
  plain = np.asarray(augment_jit(x, jax.random.key(0), 16, settings.AugmentSettings(flip=False), IDENTITY), float)
  cfg = settings.AugmentSettings(flip=False, brightness=0.2, contrast=0.3)
  out = np.asarray(augment_jit(x, jax.random.key(7), 16, cfg, IDENTITY), np.float64)
  b = out.mean(axis=(1, 2, 3)) / plain[0].mean()
  c = out.std(axis=(1, 2, 3)) / (b * plain[0].std())
  assert np.all((b >= 0.8 - 1e-4) & (b <= 1.2 + 1e-4)) and np.all((c >= 0.7 - 1e-4) & (c <= 1.3 + 1e-4))
  assert b.min() < 0.9 and b.max() > 1.1 and c.min() < 0.85 and c.max() > 1.15  # the whole ranges, both ways
  assert len(np.unique(np.round(b, 5))) == 64 and len(np.unique(np.round(c, 5))) == 64
  assert abs(np.corrcoef(b, c)[0, 1]) < 0.5


@pytest.mark.parametrize(
  "part",
  [{"scale": 0.1}, {"translate": 0.1}, {"contrast": 0.2}, {"blur": 1.0}, {"sharpness": 1.0}],
  ids=lambda p: next(iter(p)),
)
def test_each_random_part_transforms_every_copy_of_a_face_differently(part: dict):
  """8 copies of one face come out 8 different ways under each random part alone.

  Mutants: agejax/training/augment.py:54 `k_scale, (b, 1)` -> `k_scale, (1, 1)` (one zoom per batch); augment.py:64
  `k_contrast, (b, 1, 1, 1)` -> `(1, 1, 1, 1)` (one contrast per batch); augment.py:68 `k_blur, (b, 1, 1, 1)` ->
  `(1, 1, 1, 1)` (one blur or sharpening weight per batch).
  """
  cfg = settings.AugmentSettings(flip=False, **part)
  out = np.asarray(augment_jit(same_face(8), jax.random.key(5), 16, cfg, IDENTITY))
  for i in range(8):
    for j in range(i):
      assert not np.allclose(out[i], out[j], atol=1e-4), f"copies {j} and {i} were transformed alike"


# --- 2. The weight-decay mask ---------------------------------------------------------------------------------------

LR, WD = 0.1, 0.5
RULES = (
  ("convs/1", {"decay": False}),  # a regex must match the whole path: this names no parameter
  ("fc[12]/.*", {"lr": 0.1, "decay": False}),  # README's example
  ("convs/0/.*", {"lr": 0.5}),
)


@pytest.mark.slow
def test_weight_decay_moves_exactly_the_kernels_the_rules_decay_by_lr_times_decay_times_the_weight():
  """Zero gradients: the kernels a rule decays move by -lr multiplier * lr * weight_decay * w, nothing else moves.

  On the tiny VGG16-BN with README's rule `fc[12]/.*: decay False`: every conv kernel and the head's kernel decay;
  fc1/fc2, biases and batch-norm scales do not; "convs/1" alone names no parameter (a rule must match a whole path).

  Mutants: agejax/training/optim.py:126 `if cfg.weight_decay and rule.decay:` -> `if cfg.weight_decay:`;
  optim.py:77 `re.fullmatch(rule.pattern, name)` -> `re.match(rule.pattern, name)`; optim.py:127
  `optax.adamw(lr, ...)` -> `optax.adamw(schedule, ...)` (a rule's lr multiplier ignored by the decay).
  """
  config = vgg16_kl.get_config("tiny")
  config.model.batch_norm = True
  config.optimizer.update(learning_rate=LR, schedule="constant", weight_decay=WD, rules=RULES)
  fns, abstract, _ = learner.create(settings.Settings.from_config(config), steps_per_epoch=10, abstract=True)
  rng = np.random.default_rng(6)
  params = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), abstract.params)
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = jax.jit(fns.tx.update)(zero, fns.tx.init(params), params)
  flat = {optim.path_name(path): (np.asarray(u, np.float64), p) for path, u, p in _leaves(updates, params)}
  decayed = {f"convs/{i}/kernel": 1.0 for i in range(1, 13)} | {"convs/0/kernel": 0.5, "head/kernel": 1.0}
  assert any(name.startswith("norms/") for name in flat) and "fc1/kernel" in flat
  for name, (update, p) in flat.items():
    expected = -decayed.get(name, 0.0) * LR * WD * p.astype(np.float64)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=0, err_msg=name)


def _leaves(updates: Any, params: Any) -> list:
  pairs = jax.tree_util.tree_flatten_with_path(updates)[0]
  return [(path, u, p) for (path, u), p in zip(pairs, jax.tree.leaves(params))]


# --- 3. The schedule's units ----------------------------------------------------------------------------------------


def rates(schedule: optax.Schedule, steps: int) -> np.ndarray:
  return np.asarray([float(schedule(s)) for s in range(steps)], np.float64)


@pytest.mark.parametrize(("every_epochs", "steps_per_epoch", "every_steps"), [(2, 5, 10), (1.5, 4, 6)])
def test_the_step_schedule_multiplies_by_gamma_every_n_epochs_of_steps(every_epochs, steps_per_epoch, every_steps):
  """`step`: lr * gamma^floor(step / (step_every_epochs * steps_per_epoch)), as torch's StepLR, up to the last step.

  Mutants: agejax/training/optim.py:99 `int(cfg.step_every_epochs * steps_per_epoch)` -> `int(cfg.step_every_epochs)`
  (epochs read as steps); optim.py:100 `range(1, num_train_steps // every + 1)` -> `range(1, num_train_steps // every)`
  (no decay in the run's last stretch); optim.py:100 `k * every` -> `k * every + 1` (one step late); optim.py:99
  `int(cfg.step_every_epochs * steps_per_epoch)` -> `int(cfg.step_every_epochs) * steps_per_epoch` (whole epochs).
  """
  cfg = settings.OptimizerSettings(learning_rate=0.1, schedule="step", step_every_epochs=every_epochs, step_gamma=0.5)
  steps = 3 * every_steps + every_steps // 2
  got = rates(optim.learning_rate_schedule(cfg, steps, steps_per_epoch), steps)
  expected = 0.1 * 0.5 ** (np.arange(steps) // every_steps)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def cosine_f64(step: np.ndarray, peak: float, warmup: int, total: int, end: float) -> np.ndarray:
  """Linear warm-up from 0 over `warmup` steps, then cosine decay to `end` at step `total`."""
  cosine = end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * (step - warmup) / (total - warmup)))
  return np.where(step < warmup, peak * step / max(warmup, 1), cosine)


def test_the_cosine_schedule_warms_up_for_warmup_steps_steps_not_epochs_and_decays_to_its_end_at_the_last_step():
  """`cosine`: 0 -> lr linearly over warmup_steps *steps*, then cosine down to lr * end_learning_rate_factor.

  Mutants: agejax/training/optim.py:103 `min(cfg.warmup_steps, ...)` -> `min(cfg.warmup_steps * steps_per_epoch, ...)`
  (warm-up in epochs); optim.py:105 `max(num_train_steps, warmup + 1)` -> `max(num_train_steps - warmup, warmup + 1)`;
  optim.py:105 `end_value=lr * cfg.end_learning_rate_factor` -> `end_value=cfg.end_learning_rate_factor`.
  """
  cfg = settings.OptimizerSettings(learning_rate=0.1, schedule="cosine", warmup_steps=4, end_learning_rate_factor=0.1)
  got = rates(optim.learning_rate_schedule(cfg, 30, 10), 31)
  np.testing.assert_allclose(got, cosine_f64(np.arange(31.0), 0.1, 4, 30, 0.01), rtol=1e-5, atol=1e-9)


def test_a_warmup_longer_than_the_run_reaches_the_peak_at_the_last_step():
  """warmup_steps past num_train_steps: the rate rises linearly to the peak at the last step (num_train_steps - 1).

  Mutant: agejax/training/optim.py:103 `max(num_train_steps - 1, 0)` -> `max(num_train_steps, 0)`.
  """
  cfg = settings.OptimizerSettings(learning_rate=0.1, schedule="cosine", warmup_steps=50)
  got = rates(optim.learning_rate_schedule(cfg, 20, 10), 20)
  np.testing.assert_allclose(got, 0.1 * np.arange(20) / 19, rtol=1e-6)


def test_the_logged_learning_rate_is_the_rate_the_optimizer_applied_in_its_last_update():
  """train/learning_rate after n updates is the rate the n-th update applied (the schedule at step n - 1).

  Measured from Adam's updates on constant gradients: each moves a weight by the rate (to 1e-5, float32's rounding
  of the bias corrections).

  Mutant: agejax/training/train.py:318 `self.b.schedule(applied - 1)` -> `self.b.schedule(applied)`.
  """
  cfg = settings.OptimizerSettings(learning_rate=0.1, schedule="cosine", warmup_steps=4)
  schedule = optim.learning_rate_schedule(cfg, 12, 3)
  tx = optim.create_optimizer(cfg, schedule)
  params = {"head": {"kernel": jnp.ones((2, 2))}, "convs": {0: {"kernel": jnp.ones((3, 3))}}}
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state, applied = tx.init(params), []
  update = jax.jit(tx.update)
  for _ in range(8):
    updates, opt_state = update(grads, opt_state, params)
    applied.append(-float(updates["head"]["kernel"][0, 0]))
  run = train._Run.__new__(train._Run)  # only its schedule is read
  run.b = types.SimpleNamespace(schedule=schedule)
  logged = [run._learning_rate(n) for n in range(1, 9)]
  np.testing.assert_allclose(logged, applied, rtol=1e-4)  # Adam's float32 bias corrections
  np.testing.assert_allclose(applied, cosine_f64(np.arange(8.0), 0.1, 4, 12, 0.0), rtol=1e-4, atol=1e-9)
