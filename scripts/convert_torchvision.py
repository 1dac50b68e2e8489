"""Converts torchvision weights for agejax's backbones (each backbone registers the architectures it reads).

python scripts/convert_torchvision.py (--checkpoint FILE.pth|FILE.safetensors | --weights IMAGENET1K_V1)
    --arch vgg16|vgg16_bn --output DIR
"""

import jax
from absl import flags
from flax import nnx

from agejax import cli, convert, errors

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A torchvision state dict: .pth, .pt or .safetensors.")
_WEIGHTS = flags.DEFINE_string("weights", None, "torchvision weights to download instead, e.g. IMAGENET1K_V1.")
_ARCH = flags.DEFINE_enum("arch", None, ["vgg16", "vgg16_bn"], "Architecture of the weights.")
_OUTPUT = flags.DEFINE_string("output", None, "New directory for the converted weights.")
flags.mark_flags_as_required(["arch", "output"])
flags.mark_flags_as_mutual_exclusive(["checkpoint", "weights"], required=True)


def download_state_dict(arch: str, name: str) -> dict:
  """Fetches torchvision's official weights (needs internet); raises ValueError with one line otherwise."""
  from torchvision.models import get_weight

  enum = "VGG16_Weights" if arch == "vgg16" else "VGG16_BN_Weights"
  try:
    weights = get_weight(f"{enum}.{name}")
  except (KeyError, ValueError):
    raise errors.UserError(f"torchvision has no {enum}.{name}") from None
  try:
    # weights_only: never unpickle code, also from a file already in torch's hub cache (not hash-checked).
    return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
  except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise errors.UserError(f"could not download {weights.url} (needs internet access): {reason}") from None


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CHECKPOINT.value:
    state_dict, source = convert.load_torch_checkpoint(_CHECKPOINT.value), _CHECKPOINT.value
  else:
    state_dict, source = download_state_dict(_ARCH.value, _WEIGHTS.value), f"torchvision:{_WEIGHTS.value}"
  backbone = convert.backbone_for(_ARCH.value)
  found = backbone.identify(state_dict) if backbone.identify else _ARCH.value
  if found not in (None, _ARCH.value):
    raise errors.UserError(f"{source} holds {found} weights, not --arch={_ARCH.value}")
  model = convert.from_published(state_dict, _ARCH.value)  # names every missing or mis-shaped key
  output = convert.save_converted(
    model, _OUTPUT.value, arch=_ARCH.value, backbone=backbone.name, input_spec=backbone.input_spec, source=source
  )
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(
    f"wrote {output / convert.WEIGHTS_DIR} and {output / convert.META_FILE}: "
    f"{_ARCH.value}, {convert.load_meta(output)['num_classes']} classes, {count:,} parameters, from {source}"
  )


if __name__ == "__main__":
  cli.run(main)
