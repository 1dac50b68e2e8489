"""TFDS builders for the face-age datasets: the features they share, the generated demo, and the base
of the builders prepared from a manually downloaded source (`utkface`, `csv_faces`).

Each yields RGB uint8 faces of one fixed size per builder config, an integer `age` and an
`age_std` (the per-image label spread; 0 where the dataset has none).

Groups: each builder's `group_names()` names the groupings its prepared dataset has (e.g. gender,
race, skin tone) and, for each, its groups in code order, `UNKNOWN` last where the dataset can lack
the field. Each grouping is a feature of the same name: a `ClassLabel` (its code) or, for free-form
labels, `Text` (the label; empty when missing). Evaluation reports errors per group from them.
"""

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from agejax import errors
from agejax.data import demo_faces, sources

UNKNOWN = "unknown"  # the group of an example that lacks the field


def class_label(names: Sequence[str], doc: str) -> tfds.features.ClassLabel:
  """A grouping stored as a class label: the example's group by name, its code in the prepared files."""
  return tfds.features.ClassLabel(names=list(names), doc=doc)


def class_label_groups(builder: tfds.core.DatasetBuilder, *groupings: str) -> dict[str, tuple[str, ...]]:
  """Returns {grouping: names} of a builder's ClassLabel features, read from its (prepared) features."""
  return {name: tuple(builder.info.features[name].names) for name in groupings}


def features(image_size: int, **extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """The features every agejax dataset shares, plus a dataset's `extra` ones."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="png"),
      "age": tfds.features.Scalar(np.int32),
      "age_std": tfds.features.Scalar(np.float32),
      **extra,
    }
  )


@dataclasses.dataclass
class DemoConfig(tfds.core.BuilderConfig):
  """Size of the generated demo dataset."""

  image_size: int = 80
  num_train: int = 12_000
  num_validation: int = 1_000
  num_test: int = 1_000


class AgejaxDemo(tfds.core.GeneratorBasedBuilder):
  """Procedurally drawn faces whose appearance depends on age; generated, never downloaded.

  Besides the age, each face records the groups it was drawn in (`demo_faces.GROUPS`): `skin_tone`
  (light, medium, dark) and `gender` (male, female).
  """

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "2.0.0": "Records each face's skin_tone and gender (the images are unchanged).",
  }
  BUILDER_CONFIGS = [
    DemoConfig(name="default", description="The demo: 12,000 / 1,000 / 1,000 faces at 80x80."),
    DemoConfig(
      name="tiny",
      description="For tests: 192 / 50 / 50 faces at 40x40.",
      image_size=40,
      num_train=192,
      num_validation=50,
      num_test=50,
    ),
    DemoConfig(
      name="tiny_eval1000",
      description="For tests at the demo's evaluation size: 192 / 1,000 / "
      "50 faces at 40x40 (dozens of eval batches, as a real run has).",
      image_size=40,
      num_train=192,
      num_validation=1_000,
      num_test=50,
    ),
    DemoConfig(
      name="faces200",
      description="For the input benchmark: 5,000 / 500 / 500 faces at 200x200, the size of UTKFace's chips.",
      image_size=200,
      num_train=5_000,
      num_validation=500,
      num_test=500,
    ),
  ]
  # Distinct seeds keep the splits disjoint draws of the same generator.
  SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}

  def _info(self) -> tfds.core.DatasetInfo:
    groups = {
      "skin_tone": class_label(demo_faces.SKIN_TONES, "skin palette drawn, light to dark"),
      "gender": class_label(demo_faces.GENDERS, "the trait that decides hair style, balding and beard"),
    }
    return self.dataset_info_from_configs(features=features(self.builder_config.image_size, **groups))

  def group_names(self) -> dict[str, tuple[str, ...]]:
    """The groupings of the demo: skin_tone and gender (never unknown)."""
    return class_label_groups(self, *demo_faces.GROUPS)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _log_download_bytes(self) -> None:
    # TFDS would say "Downloading and preparing dataset Unknown size": nothing is downloaded.
    cfg = self.builder_config
    print(
      f"generating the demo dataset ({cfg.num_train:,} / {cfg.num_validation:,} / {cfg.num_test:,} faces at "
      f"{cfg.image_size}x{cfg.image_size}, nothing to download) in {self.data_dir}"
    )

  def _log_download_done(self) -> None:
    print(f"generated the demo dataset in {self.data_dir}; later runs reuse it")

  def _generate_examples(self, split: str, num_examples: int):
    size = self.builder_config.image_size
    for i in range(num_examples):
      image, age, groups = demo_faces.sample_person(self.SPLIT_SEEDS[split], i, size)
      yield i, {"image": image, "age": age, "age_std": 0.0, **groups}


class ManualSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]  # tfds untyped
  """A dataset prepared from a manually downloaded folder or archive, whose fingerprint it records.

  `describe_source(manual_dir)` returns the fingerprint (see `sources`); the builder stores it as
  `info.metadata["source"]`, and `datasets.prepare` compares the two before preparing again.
  """

  def describe_source(self, manual_dir: str | os.PathLike) -> dict:
    """Returns the fingerprint of a manual folder or archive; raises a one-line error if it can't be read."""
    path = Path(os.fspath(manual_dir)).expanduser()
    if not path.exists():
      raise errors.MissingInput(
        f"the manual folder {sources.display(path)} does not exist; pass --manual_dir "
        f"FOLDER holding the downloaded files (docs/guides/datasets.md)"
      )
    return self._describe_source(path)

  def _describe_source(self, path: Path) -> dict:
    raise NotImplementedError

  def download_and_prepare(
    self,
    *,
    download_dir: str | os.PathLike | None = None,
    download_config: tfds.download.DownloadConfig | None = None,
    **kwargs,
  ) -> None:
    """TFDS's download_and_prepare, remembering `download_config.manual_dir` (it may be an archive)."""
    self._manual_path = download_config.manual_dir if download_config else None
    super().download_and_prepare(download_dir=download_dir, download_config=download_config, **kwargs)

  def _manual_root(self, dl_manager) -> Path:
    """The manual folder, or the archive passed in its place (TFDS's `manual_dir` insists on a folder)."""
    given = getattr(self, "_manual_path", None)
    if given and os.path.isfile(os.path.expanduser(os.fspath(given))):
      return Path(os.fspath(given)).expanduser()
    return Path(os.fspath(dl_manager.manual_dir)).expanduser()

  def _record_source(self, source: dict) -> None:
    """Starts this preparation's metadata with the source's fingerprint (nothing stale carried over)."""
    self.info.metadata.clear()
    self.info.metadata["source"] = source
