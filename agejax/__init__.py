"""agejax: facial age estimation by label-distribution learning with a VGG16 in JAX/Flax NNX."""

__version__ = "0.1.0"
