"""VGG16 label-distribution learning (KL to a Gaussian target), ages 1..100.

Variants: `configs/vgg16_kl.py:demo` trains a small VGG16 on the generated demo faces on a CPU in a
few minutes; `:tiny` is the same at test size. Any field: `--config.KEY=VALUE`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config, or the variant named by `arg` ('demo', 'tiny')."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # The recipe of the unified age-estimation benchmark (Paplham & Franc, CVPR 2024; their
  # facebase/configs/UTKFace_256x256_*.yaml): Adam at a constant 1e-4 with no warm-up, 50 epochs,
  # the best checkpoint by validation MAE (evaluated about once an epoch). Their batch is 100; 64
  # divides over 8 devices. 15,000 steps are 50.6 epochs of UTKFace's 18,966 training faces.
  config.batch_size = 64  # global, split over all devices of all processes
  config.eval_batch_size = 0  # 0: same as batch_size
  config.num_train_steps = 15_000
  config.num_epochs = 0.0  # > 0: train this many epochs of the training split instead (sets num_train_steps)
  config.log_every_steps = 100
  config.eval_every_steps = 300  # ~1 UTKFace epoch
  config.checkpoint_every_steps = 300
  config.keep_checkpoints = 3  # the latest few; the best by eval MAE is kept as well
  config.grad_accum_steps = 1  # >1: split each batch into micro-batches, one update per batch
  config.nonfinite = "stop"  # a non-finite loss/gradient: "stop" the run, or "skip" the step (counted)
  config.compilation_cache_dir = "~/.cache/agejax/jax_compilation_cache"  # '' disables it
  config.profile_steps = 0  # > 0: a jax.profiler trace of this many train steps after the first log step
  # Modules to import before anything is built: plug-ins that register a backbone, a loss or rules.
  config.plugins = ()

  config.data = ml_collections.ConfigDict()
  config.data.name = "utkface"  # prepare once: python scripts/prepare_data.py utkface --manual_dir DIR
  config.data.data_dir = ""  # TFDS data_dir, a local path or gs:// URL; '' is TFDS's ~/tensorflow_datasets
  # Local disk for each host's memory-mapped uint8 copy of the splits (rebuilt when the dataset changes).
  config.data.cache_dir = "~/.cache/agejax/arrays"
  config.data.builder_config = ""  # TFDS builder config; '' is the builder's default
  config.data.eval_split = "validation"
  config.data.image_size = 224  # model input; stored images are resized on the device
  # The benchmark's subject-exclusive split of a fae dataset's folders: 0-4 (or a spec such as
  # "train:1-70,val:71-76,test:77-82"); '' reads the dataset's own train/validation/test splits.
  config.data.split = ""
  # The central fraction (per side) of each stored crop that the model sees at evaluation, prediction,
  # export and serving, before the resize to image_size; 1.0: all of it.
  config.data.eval_crop = 1.0
  # "cache": each host decodes the splits once into a local memory-mapped array (fastest); "grain": the
  # prepared ArrayRecord files are streamed through Grain, each process reading its own shards; "auto":
  # grain when the cache would not fit data.cache_dir's disk (said in one line).
  config.data.reader = "auto"
  config.data.shards = 0  # grain: the order's data shards (0: one per process); fixed, runs of any size agree
  config.data.grain_workers = 2  # grain: worker processes reading and decoding records (0: none)

  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True
  config.augment.scale = 0.1  # zoom in/out by up to 10%
  config.augment.translate = 0.05  # shift by up to 5% of the image size
  config.augment.brightness = 0.2
  config.augment.contrast = 0.2
  config.augment.blur = 0.0  # up to this weight toward a Gaussian-blurred copy
  config.augment.sharpness = 0.0  # up to this weight of unsharp masking
  # > 0: a square random resized crop of this to 100% of the crop's area, in place of scale/translate.
  config.augment.resized_crop_min_area = 0.0

  config.model = ml_collections.ConfigDict()
  config.model.name = "vgg16"  # a registered backbone (agejax.models)
  config.model.width_multiplier = 1.0
  config.model.dtype = "auto"  # bfloat16 compute on accelerators, float32 on CPU; params are float32
  config.model.batch_norm = False
  config.model.dropout_rate = 0.5
  # Converted torchvision weights (scripts/convert_weights.py --output PATH); '' trains from scratch.
  config.model.pretrained = "weights/vgg16_imagenet"
  # Two-stage training: WORKDIR[:STEP] of another agejax run (default: its best checkpoint) starts this
  # one from its params and batch-norm statistics (the head too when labels.min_age/max_age match;
  # model.pretrained is then not read). Optimizer and step start fresh; a resumed run restores its own.
  config.model.init_from = ""
  config.model.init_from_head = True  # False: only init_from's backbone comes across; the head starts fresh

  config.labels = ml_collections.ConfigDict()
  config.labels.min_age = 1
  config.labels.max_age = 100
  config.labels.out_of_range = "clip"  # ages outside the bins: "clip" to the range or "drop" the example

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "kl"  # training.losses.LOSSES; "onehot": the original project's one-hot NLL, for comparison
  config.loss.sigma = 2.0  # std of the Gaussian label distribution, in years
  # "mean_preserving": the target's mean is the age also at the ends of the bins (no pull toward the
  # middle for babies and the old); "gaussian": the Gaussian cut at the ends (configs before 2026-12).
  config.loss.target = "mean_preserving"
  config.loss.sigma_from_data = False  # True: each face's own age_std (APPA-REAL, ChaLearn lists), floored
  config.loss.sigma_floor = 1.0  # the smallest per-face std with sigma_from_data
  config.loss.l1_weight = 0.0  # DLDL-v2: add l1_weight * |E[age] - age|

  config.metrics = ml_collections.ConfigDict()
  config.metrics.epsilon_sigma = 3.0  # epsilon-error sigma where the data has no per-image age_std

  config.eval = ml_collections.ConfigDict()
  # True: evaluations score each face's distribution averaged with its mirror image's, and so do the
  # best-checkpoint choice and the fitted temperature (as evaluate.py --flip scores them).
  config.eval.flip = False
  # The validation score that picks the best checkpoint (ties: the later one): "mae", the expected age's,
  # or "bench_mae", the benchmark's (the posterior median's whole years at temperature 1).
  config.eval.select_by = "mae"
  # The age check "is this person under T?" (0: off): its rule chosen on data.eval_split for a minors' false
  # positive rate of at most age_check_target_fpr, scored on the test split (final_metrics.json, evaluate.py).
  config.eval.age_check = 0
  config.eval.age_check_target_fpr = 0.01

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 0.0  # > 0 switches Adam to AdamW
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.schedule = "constant"  # "constant", "step" (x step_gamma every N epochs) or "cosine"
  config.optimizer.step_every_epochs = 15
  config.optimizer.step_gamma = 0.1
  config.optimizer.warmup_steps = 0  # cosine only
  config.optimizer.end_learning_rate_factor = 0.0  # cosine only
  # Fine-tuning a pretrained backbone (everything but the age head):
  config.optimizer.backbone_lr_multiplier = 1.0
  config.optimizer.freeze_backbone = False
  config.optimizer.head_warmup_steps = 0  # train the head alone for this many steps first
  # Per-parameter rules before those: (regex over paths like "convs/3/kernel", {"lr": multiplier,
  # "decay": bool, "frozen": bool, "start_step": int}); the first match wins.
  config.optimizer.rules = ()

  # More evaluations beside data.eval_split, logged as eval/<name>/... and in final_metrics.json's
  # "evals": dicts of name, dataset, split (default "test"), builder_config, data_dir, every_steps.
  config.evals = ()

  if arg in ("demo", "tiny"):
    config.data.name = "demo"
    config.model.pretrained = ""  # a narrow VGG16 from scratch: ImageNet weights are full width
    config.data.image_size = 64
    config.model.width_multiplier = 0.125
    config.batch_size = 64
    config.num_train_steps = 800  # ~4 epochs of the 12,000 demo faces; about 4 minutes on 2 cores
    config.log_every_steps = 50
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 50
  if arg == "tiny":
    config.data.builder_config = "tiny"
    config.data.image_size = 32
    config.model.width_multiplier = 0.0625
    config.batch_size = 16
    config.num_train_steps = 100
    config.log_every_steps = 10
    config.eval_every_steps = 50
    config.checkpoint_every_steps = 50
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 10
    # A tiny model learns faster without dropout and crops; tests cover those separately.
    config.model.dropout_rate = 0.0
    config.augment.scale = 0.0
    config.augment.translate = 0.0
  elif arg not in (None, "", "demo"):
    raise ValueError(f"configs/vgg16_kl.py: unknown variant {arg!r}; use 'demo' or 'tiny'")
  return config
