"""ResNet-50 label-distribution learning: configs/vgg16_kl.py with the unified benchmark's backbone.

The unified age-estimation benchmark (Paplham & Franc, CVPR 2024) trains a ResNet-50. Variants as
vgg16_kl's: `:demo` (a narrow ResNet-50 on the demo faces, from scratch) and `:tiny` (test size).
Convert torchvision's ImageNet weights first:
python scripts/convert_weights.py --weights IMAGENET1K_V2 --arch resnet50 --output weights/resnet50_imagenet
"""

import ml_collections

from configs import vgg16_kl


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns vgg16_kl's config (or its variant `arg`) with model.name="resnet50"."""
  config = vgg16_kl.get_config(arg)
  config.model.name = "resnet50"  # always batch norm, no dropout: model.batch_norm and dropout_rate are ignored
  if arg not in ("demo", "tiny"):
    config.model.pretrained = "weights/resnet50_imagenet"
  return config
