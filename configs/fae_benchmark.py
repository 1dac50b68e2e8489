"""The unified age-estimation benchmark's recipe, as its own files set it (Paplham & Franc, CVPR 2024).

github.com/paplhjak/Facial-Age-Estimation-Benchmark, facebase/configs/<DB>_256x256_resnet50_imagenet.yaml:
ResNet-50 from torchvision's IMAGENET1K_V2 weights; Adam at 1e-4 (betas 0.9/0.999, eps 1e-8, no decay,
no schedule), batch 100, 50 epochs of the split's own training set, evaluated once an epoch, the best
epoch by validation MAE with ties to the later (lib/training.py: `<=`); classes 0..101 (labels0-101.yaml),
ages outside them dropped from every split (prepare_data.py); a 256 px input: the central 256 of the
stored 281 px crop at evaluation (center_crop.json), a square RandomResizedCrop(256) of 80-100% of the
crop's area and a horizontal flip in training (jitter+hflip.json), ImageNet mean and std. Its MAE is of
the posterior median in whole years at temperature 1 (`bench_mae`), which picks the best checkpoint.

`--config configs/fae_benchmark.py:VARIANTS`, a comma list:
  ce (the default)  its "Baseline Cross-Entropy" row: one-hot cross-entropy (loss.name='onehot')
  dldl              its DLDL row: KL to its Gaussian of sigma 2 cut to 0..101 and renormalised (loss.py
                    dldl_loss; cross-entropy to that target differs from KL by a constant)
  kl                agejax's own: KL to the mean-preserving Gaussian target (sigma 2)
  pretrain          its IMDB-CLEAN-EM-CNN_256x256.yaml: the first stage on IMDB-EM-CNN split 0, Adam at 1e-3
                    for 100 epochs; every folder of the other databases scored at the end, on the best
                    checkpoint (facebase/benchmarks/IMDB-CLEAN-EM-CNN.yaml: its cross-dataset rows)
  pretrained        its *_resnet50_pretrained.yaml: the backbone of a `pretrain` run (set
                    --config.model.init_from=WORKDIR), its head fresh
  tiny              test size: a narrow ResNet-50 from scratch at 32 px, 2 epochs

Prepare a database once (its `_aligned.json`, whose boxes the crops follow):
  python scripts/prepare_data.py fae --database AgeDB_aligned.json --images FACES --name agedb
Convert the backbone once:
  python scripts/convert_weights.py --weights IMAGENET1K_V2 --arch resnet50 --output weights/resnet50_imagenet
A row (5 splits of AgeDB; 1 of CLAP2016 and CACD2000):
  python scripts/crossval.py --config configs/fae_benchmark.py --workdir runs/agedb_ce \
    --config.data.builder_config=agedb
"""

import ml_collections

from configs import resnet50_kl

STORED = 281  # fae.DEFAULT_IMAGE_SIZE: the benchmark's 256 input plus 5% each side
INPUT = 256
# The other databases that facebase/benchmarks/IMDB-CLEAN-EM-CNN.yaml tests on, every folder of each, by
# the builder_config names the README's prepare commands give them.
CROSS_DATASET = ("morph", "clap2016", "agedb", "cacd2000", "afad", "utkface", "fgnet")
VARIANTS = ("ce", "dldl", "kl", "pretrain", "pretrained", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the benchmark's recipe, with the comma-separated variants in `arg` applied (see the module doc)."""
  chosen = [a.strip() for a in (arg or "").split(",") if a.strip()]
  unknown = [a for a in chosen if a not in VARIANTS]
  if unknown:
    raise ValueError(f"configs/fae_benchmark.py: unknown variant {unknown[0]!r}; use any of {', '.join(VARIANTS)}")
  config = resnet50_kl.get_config()
  config.model.pretrained = "weights/resnet50_imagenet"  # torchvision's IMAGENET1K_V2, converted

  config.batch_size = 100
  config.num_epochs = 50.0
  config.num_train_steps = 0  # set by num_epochs from the split's training set
  config.eval_every_steps = 0  # once an epoch
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 1  # the latest; the best is kept besides
  config.log_every_steps = 50

  config.data.name = "fae"
  config.data.builder_config = "agedb"
  config.data.split = "0"
  config.data.image_size = INPUT
  config.data.eval_crop = INPUT / STORED

  config.augment.flip = True
  config.augment.resized_crop_min_area = 0.8
  config.augment.scale = config.augment.translate = 0.0
  config.augment.brightness = config.augment.contrast = 0.0

  config.labels.min_age, config.labels.max_age = 0, 101
  config.labels.out_of_range = "drop"

  config.loss.name = "onehot"
  config.loss.sigma = 2.0
  config.loss.target = "gaussian"

  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = "constant"
  config.optimizer.weight_decay = 0.0

  config.eval.select_by = "bench_mae"

  if "dldl" in chosen:
    config.loss.name, config.loss.target = "kl", "gaussian"
  if "kl" in chosen:
    config.loss.name, config.loss.target = "kl", "mean_preserving"
  if "pretrain" in chosen:
    config.data.builder_config = "imdb_em_cnn"
    config.num_epochs = 100.0
    config.optimizer.learning_rate = 1e-3
    # Scored once, at the end, on the best checkpoint, like the test split: every_steps=-1.
    config.evals = tuple(
      {"name": name, "dataset": "fae", "builder_config": name, "split": "all", "every_steps": -1}
      for name in CROSS_DATASET
    )
  if "pretrained" in chosen:
    config.model.init_from = ""  # WORKDIR of a `pretrain` run: --config.model.init_from=...
    config.model.init_from_head = False  # build_jit_backbone.py exports the backbone alone
  if "tiny" in chosen:
    config.model.pretrained = ""
    config.model.width_multiplier = 0.125
    config.data.image_size = 32
    config.batch_size = 16
    config.num_epochs = 2.0
    config.log_every_steps = 5
    config.optimizer.learning_rate = 2e-3
  return config
