"""Shared fixtures: a tiny generated demo dataset, prepared once per test session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

try:
  # torch must load before TensorFlow: the reverse order segfaults (torch 2.14, TensorFlow 2.21).
  import torch  # noqa: F401
except ImportError:
  pass

from configs import vgg16_kl


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the prepared `tiny` demo dataset."""
  from agejax.data import pipeline
  path = tmp_path_factory.mktemp("tensorflow_datasets")
  pipeline.prepare("demo", str(path), builder_config="tiny")
  return str(path)


@pytest.fixture
def tiny_config(data_dir):
  """The `:tiny` training config reading the session's tiny demo dataset."""
  config = vgg16_kl.get_config("tiny")
  config.data.data_dir = data_dir
  return config
