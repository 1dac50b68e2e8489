"""Typed, frozen settings per concern, read once from a training config (configs/*.py or a config.json).

`Settings.from_config` is the one place that reads config keys: every module below training/ takes
these dataclasses, not the ConfigDict. A default here is what a workdir's config.json meant when it
lacked the key (it was written before the key existed); new runs get every key from configs/*.py.
`training.configuration.validate` checks the values and returns these settings.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

DEFAULT_CACHE_DIR = "~/.cache/agejax/arrays"  # data.cache_dir of configs that predate the key


def _section(config: Any, name: str) -> Mapping[str, Any]:
  section = config.get(name) if hasattr(config, "get") else None
  return {} if section is None else dict(section.items())


def _pick(cls: type, section: Mapping[str, Any], **renames: str) -> dict[str, Any]:
  """The fields of dataclass `cls` that `section` has (by field name, or by renames[field])."""
  out = {}
  for field in dataclasses.fields(cls):
    key = renames.get(field.name, field.name)
    if key in section:
      value = section[key]
      out[field.name] = tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value
  return out


def _freeze(value: Any) -> Any:
  """Lists (as config.json stores tuples) and dicts inside a tuple-valued key as hashable tuples."""
  if isinstance(value, list | tuple):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """config.data: which prepared dataset, where, and the model's input size."""

  name: str = ""
  data_dir: str = ""
  cache_dir: str = DEFAULT_CACHE_DIR
  builder_config: str = ""
  eval_split: str = "validation"
  image_size: int = 224
  split: str = ""  # '' the dataset's own splits; K (0-4) or a spec: the benchmark's folders (data/splits.py)
  # The central fraction of each stored crop (per side) the model sees at evaluation, prediction, export
  # and serving, before the resize; 1.0: the whole crop. The benchmark's: 256/281 (the box itself).
  eval_crop: float = 1.0
  # How splits are read: 'cache' (each host's memory-mapped uint8 copy), 'grain' (the ArrayRecord files
  # streamed through Grain, data/streaming.py) or 'auto' (grain when the cache would not fit the disk).
  reader: str = "cache"  # what workdirs from before the key read
  shards: int = 0  # the training order's data shards (grain); 0: one per JAX process
  grain_workers: int = 2  # Grain worker processes decoding the records; 0: in the training process


@dataclasses.dataclass(frozen=True)
class LabelSettings:
  """config.labels: the age bins and what happens to ages outside them."""

  min_age: int = 1
  max_age: int = 100
  out_of_range: str = "clip"


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """config.model: the backbone by name and its options."""

  name: str = "vgg16"  # the only backbone before the registry
  width_multiplier: float = 1.0
  dtype: str = "auto"
  batch_norm: bool = False
  dropout_rate: float = 0.5
  pretrained: str = ""
  init_from: str = ""  # another agejax run's WORKDIR[:STEP]: its trained weights start a new run
  init_from_head: bool = True  # False: only init_from's backbone comes across, the head starts fresh


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """config.augment: the on-device training augmentation."""

  flip: bool = True
  scale: float = 0.0
  translate: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  blur: float = 0.0
  sharpness: float = 0.0
  # > 0: a square random resized crop of this to 100% of the stored crop's area (torchvision's and
  # albumentations' RandomResizedCrop with ratio 1), in place of the scale/translate zoom.
  resized_crop_min_area: float = 0.0


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """config.loss: the loss by name (training.losses.LOSSES), its target, the DLDL-v2 L1 weight.

  `options` holds any other config.loss key, as (key, value) pairs, for plug-in losses.
  """

  name: str = "kl"
  sigma: float = 2.0
  l1_weight: float = 0.0
  target: str = "gaussian"  # configs before the key trained on the Gaussian cut at the ends of the bins
  sigma_from_data: bool = False
  sigma_floor: float = 1.0
  options: tuple[tuple[str, Any], ...] = ()

  def option(self, key: str, default: Any = None) -> Any:
    """A plug-in loss's own config.loss key."""
    return dict(self.options).get(key, default)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """config.optimizer: Adam(W), the schedule, clipping and the per-parameter rules."""

  learning_rate: float = 1e-4
  weight_decay: float = 0.0
  grad_clip_norm: float = 0.0
  schedule: str = "step"
  step_every_epochs: float = 15
  step_gamma: float = 0.1
  warmup_steps: int = 0
  end_learning_rate_factor: float = 0.0
  backbone_lr_multiplier: float = 1.0
  freeze_backbone: bool = False
  head_warmup_steps: int = 0
  # (regex over "/"-joined parameter paths, {"lr": multiplier, "decay": bool, "frozen": bool,
  # "start_step": int}); the first match wins (training.optim.Rule).
  rules: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How the model is scored: the eval batch, the epsilon-error sigma, extra evaluations (config.evals)."""

  batch_size: int  # global: config.eval_batch_size, or batch_size when that is 0
  epsilon_sigma: float = 3.0
  evals: tuple["ExtraEval", ...] = ()
  flip: bool = False  # config.eval.flip: score (and calibrate, and pick the best checkpoint by) flip averages
  select_by: str = "mae"  # the eval metric that picks the best checkpoint: "mae" or "bench_mae" (ties: the later)
  age_check: int = 0  # config.eval.age_check: T of the check "under T?" (chosen on eval_split); 0: off
  age_check_target_fpr: float = 0.01  # the largest minors' false positive rate the age check is chosen for


@dataclasses.dataclass(frozen=True)
class ExtraEval:
  """One of config.evals: another dataset or split, scored like the eval split, logged under eval/<name>/."""

  name: str
  dataset: str
  split: str = "test"
  builder_config: str = ""
  data_dir: str = ""  # '' is the training data's data_dir
  every_steps: int = 0  # 0: with every evaluation of the eval split; -1: once, at the end, on the best checkpoint


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The loop: seed, global batch, length, intervals, checkpoints, what to do with a non-finite step."""

  seed: int = 0
  batch_size: int = 64
  num_train_steps: int = 30_000
  num_epochs: float = 0.0  # > 0: the length in epochs of the training split (num_train_steps is then derived)
  log_every_steps: int = 100
  eval_every_steps: int = 1_000
  checkpoint_every_steps: int = 1_000
  keep_checkpoints: int = 3
  grad_accum_steps: int = 1
  nonfinite: str = "stop"
  compilation_cache_dir: str = ""
  profile_steps: int = 0
  plugins: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Settings:
  """A training config, typed: one frozen dataclass per concern."""

  run: RunSettings
  data: DataSettings
  labels: LabelSettings
  model: ModelSettings
  augment: AugmentSettings
  loss: LossSettings
  optimizer: OptimizerSettings
  eval: EvalSettings

  @classmethod
  def from_config(cls, config: Any) -> "Settings":
    """Reads a ConfigDict or a config.json dict (values are not checked here: see configuration.validate)."""
    top = dict(config.items())
    run = RunSettings(**_pick(RunSettings, top))
    loss = _section(config, "loss")
    known = {f.name for f in dataclasses.fields(LossSettings)} - {"options"}
    return cls(
      run=run,
      data=DataSettings(**_pick(DataSettings, _section(config, "data"))),
      labels=LabelSettings(**_pick(LabelSettings, _section(config, "labels"))),
      model=ModelSettings(**_pick(ModelSettings, _section(config, "model"))),
      augment=AugmentSettings(**_pick(AugmentSettings, _section(config, "augment"))),
      loss=LossSettings(
        **_pick(LossSettings, loss), options=tuple(sorted((k, _freeze(v)) for k, v in loss.items() if k not in known))
      ),
      optimizer=OptimizerSettings(**_pick(OptimizerSettings, _section(config, "optimizer"))),
      eval=EvalSettings(
        batch_size=top.get("eval_batch_size") or run.batch_size,
        evals=tuple(ExtraEval(**dict(e)) for e in top.get("evals", ()) or ()),
        **_pick(EvalSettings, _section(config, "metrics")),  # metrics.epsilon_sigma
        **_pick(EvalSettings, _section(config, "eval")),  # eval.flip
      ),
    )
