"""TFDS builders for the face-age datasets: the generated demo (and the real ones added later).

Each yields RGB uint8 faces of one fixed size per builder config, an integer `age` and an
`age_std` (the per-image label spread; 0 where the dataset has none).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from agejax.data import demo_faces


def features(image_size: int, **extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """The features every agejax dataset shares, plus a dataset's `extra` ones."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="png"),
      "age": tfds.features.Scalar(np.int32),
      "age_std": tfds.features.Scalar(np.float32),
      **extra,
  })


@dataclasses.dataclass
class DemoConfig(tfds.core.BuilderConfig):
  """Size of the generated demo dataset."""
  image_size: int = 80
  num_train: int = 12_000
  num_validation: int = 1_000
  num_test: int = 1_000


class AgejaxDemo(tfds.core.GeneratorBasedBuilder):
  """Procedurally drawn faces whose appearance depends on age; generated, never downloaded."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      DemoConfig(name="default", description="The demo: 12,000 / 1,000 / 1,000 faces at 80x80."),
      DemoConfig(name="tiny", description="For tests: 192 / 50 / 50 faces at 40x40.",
                 image_size=40, num_train=192, num_validation=50, num_test=50),
      DemoConfig(name="tiny_eval1000", description="For tests at the demo's evaluation size: 192 / 1,000 / "
                 "50 faces at 40x40 (dozens of eval batches, as a real run has).",
                 image_size=40, num_train=192, num_validation=1_000, num_test=50),
      DemoConfig(name="faces200", description="For the input benchmark: 5,000 / 500 / 500 faces at "
                 "200x200, the size of UTKFace's chips.",
                 image_size=200, num_train=5_000, num_validation=500, num_test=500),
  ]
  # Distinct seeds keep the splits disjoint draws of the same generator.
  SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features(self.builder_config.image_size))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split: str, num_examples: int):
    size = self.builder_config.image_size
    for i in range(num_examples):
      image, age = demo_faces.sample_example(self.SPLIT_SEEDS[split], i, size)
      yield i, {"image": image, "age": age, "age_std": 0.0}
