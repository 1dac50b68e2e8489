"""Converts published weights for agejax's backbones into the format --config.model.pretrained reads.

python scripts/convert_weights.py --checkpoint FILE --output DIR [--arch ARCH]
python scripts/convert_weights.py --weights IMAGENET1K_V1 --arch vgg16|vgg16_bn|resnet50 --output DIR

FILE is a PyTorch state dict (.pth, .pt, .safetensors; torchvision's, or VGG-Face's vgg_face_dag.pth)
or a Keras HDF5 file (keras-vggface's rcmalli_vggface_tf_vgg16.h5 or its notop variant); its
architecture is recognised from its keys. --weights downloads torchvision's (needs internet).
scripts/convert_torchvision.py is this script under its earlier name.
"""

import jax
from absl import flags
from flax import nnx

from agejax import cli, convert, errors

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Published weights: .pth, .pt, .safetensors (PyTorch) or .h5 (Keras)."
)
_WEIGHTS = flags.DEFINE_string("weights", None, "torchvision weights to download instead, e.g. IMAGENET1K_V1.")
_ARCH = flags.DEFINE_string(
  "arch", None, "Architecture of the weights (e.g. vgg16, vgg16_bn, vggface, resnet50); read from the file if unset."
)
_OUTPUT = flags.DEFINE_string("output", None, "New directory for the converted weights.")
flags.mark_flags_as_required(["output"])
flags.mark_flags_as_mutual_exclusive(["checkpoint", "weights"], required=True)


def download_state_dict(arch: str, name: str) -> dict:
  """Fetches torchvision's official weights (needs internet); raises ValueError with one line otherwise."""
  from torchvision.models import get_model_weights

  try:
    enum = get_model_weights(arch)
  except ValueError:
    raise errors.UserError(
      f"torchvision publishes no {arch!r} weights; pass the file you downloaded with --checkpoint"
    ) from None
  try:
    weights = enum[name]
  except KeyError:
    known = ", ".join(w.name for w in enum)
    raise errors.UserError(f"torchvision has no {enum.__name__}.{name} (it has {known})") from None
  try:
    # weights_only: never unpickle code, also from a file already in torch's hub cache (not hash-checked).
    return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
  except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise errors.UserError(f"could not download {weights.url} (needs internet access): {reason}") from None


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _WEIGHTS.value and not _ARCH.value:
    raise errors.UserError("--weights needs --arch (e.g. --arch vgg16)")
  if _ARCH.value:
    convert.backbone_for(_ARCH.value)  # an unknown --arch fails before anything is read
  if _CHECKPOINT.value:
    state_dict, source = convert.load_weights_file(_CHECKPOINT.value), _CHECKPOINT.value
  else:
    state_dict, source = download_state_dict(_ARCH.value, _WEIGHTS.value), f"torchvision:{_WEIGHTS.value}"
  backbone, found = convert.find(state_dict)
  arch = _ARCH.value or found
  if found != arch:
    raise errors.UserError(f"{source} holds {found} weights, not --arch={arch}")
  model = convert.from_published(state_dict, arch)  # names every missing or mis-shaped key
  spec = backbone.spec_for(arch)
  output = convert.save_converted(
    model, _OUTPUT.value, arch=arch, backbone=backbone.name, input_spec=spec, source=source
  )
  meta = convert.load_meta(output)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  fresh = f"; {', '.join(meta['fresh'])} start new (the file has no such layers)" if meta["fresh"] else ""
  print(
    f"wrote {output / convert.WEIGHTS_DIR} and {output / convert.META_FILE}: {arch} for backbone {backbone.name}, "
    f"{meta['num_classes']} classes, {count:,} parameters, from {source}{fresh}\n"
    f"input: {spec.channels} x {spec.pixel_range:g}, mean {list(spec.mean)}, std {list(spec.std)}; "
    f"train with --config.model.name={backbone.name} --config.model.pretrained={output}"
  )


if __name__ == "__main__":
  cli.run(main)
