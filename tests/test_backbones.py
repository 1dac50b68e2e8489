"""Each built-in backbone and each input spec its weights bring, through every path at `:tiny` size.

VGG16 starting from VGG-Face weights (0..255 RGB minus VGG-Face's mean: the spec comes from the
converted weights, not from the backbone) and ResNet-50 (ImageNet's spec): trained by train.py, then
Predictor, evaluate.py, predict.py, the export's manifest and the server give the distributions
computed by hand from the spec.
"""

import pipeline
import pytest
from flax import nnx
from pipeline import check_every_path, train

from agejax import convert, models
from agejax.models import vgg
from configs import vgg16_kl


@pytest.fixture(scope="module")
def tiny_vgg_face(tmp_path_factory):
  """Converted-weights folder of a `:tiny`-width VGG16 recorded as VGG-Face weights (full-size
  conversion is tested in test_vggface.py; here what matters is the spec they carry)."""
  width = vgg16_kl.get_config("tiny").model.width_multiplier
  model = vgg.VGG16(1, width_multiplier=width, rngs=nnx.Rngs(7))
  out = tmp_path_factory.mktemp("weights") / "vggface"
  return convert.save_converted(
    model, out, arch="vggface", backbone="vgg16", input_spec=vgg.VGG_FACE, source="test: tiny random"
  )


@pytest.mark.slow
def test_vgg16_from_vgg_face_weights_uses_their_input_everywhere(tiny_vgg_face, data_dir, compilation_cache, tmp_path):
  workdir = train(
    tmp_path / "run", f"--config.model.pretrained={tiny_vgg_face}", data_dir=data_dir, cache=compilation_cache
  )
  check_every_path(workdir, "vgg16", vgg.VGG_FACE, compilation_cache, tmp_path)


@pytest.mark.slow
def test_resnet50_trains_evaluates_predicts_exports_and_serves(data_dir, compilation_cache, tmp_path, monkeypatch):
  # ResNet-50's ~160 layers take XLA:CPU minutes to code-generate at full optimisation; level 0
  # changes code generation only (the tiny model's run time does not matter here).
  monkeypatch.setitem(pipeline.ENV, "XLA_FLAGS", "--xla_backend_optimization_level=0")
  workdir = train(tmp_path / "run", "--config.model.name=resnet50", data_dir=data_dir, cache=compilation_cache)
  check_every_path(workdir, "resnet50", models.IMAGENET, compilation_cache, tmp_path)
