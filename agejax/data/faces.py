"""Preparation helpers shared by the downloaded-dataset builders: image loading and skip counts.

Real face datasets hold a few broken, oddly coloured or mislabelled files. The builders skip
those rather than fail, count them by reason, and publish the counts in the prepared dataset's
metadata.json, so a user sees what was dropped and why: `builder.info.metadata` holds `skipped`
({reason: count} over all splits), `skipped_by_split` ({split: {reason: count}}) and
`skipped_examples` ({reason: [a few file names]}).

Colour policy of `open_rgb` (and so of `load_rgb`, which crops its result): grayscale, palette,
CMYK and 16-bit images become RGB; images with transparency are composited on black, the value a
zoomed-out or shifted augmented face is padded with (`jax.image.scale_and_translate` fills with
0), so the model meets one background convention. predict.py reads photos the same way.
EXIF orientation is applied (phone photos). Gray levels beyond 8 bits are scaled, not clipped:
16-bit images ("I;16", "I;16B", ...) by the type's range (65535 is white), 32-bit integer and float
images (modes "I" and "F", e.g. TIFFs; signed 16-bit TIFFs open as "I" too) by their own finite
value range (its minimum black, its maximum white; a constant image is mid-gray), since their type's
range says nothing about where a picture's values lie.
Skip reasons: "empty file", "unreadable file", "not an image" (no format recognised, including a
file cut inside its header), "corrupt image" (recognised but undecodable, e.g. truncated), "image
too large" (PIL's decompression-bomb limit).
"""

import collections
import io
import os

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from agejax import storage


def load_rgb(path_or_bytes: str | os.PathLike | bytes, size: int) -> np.ndarray | str:
  """Returns the image as a centre-cropped size x size RGB uint8 array, or a skip reason."""
  img = open_rgb(path_or_bytes)
  return img if isinstance(img, str) else centre_square(img, size)


def open_rgb(path_or_bytes: str | os.PathLike | bytes) -> Image.Image | str:
  """Decodes an image file (or its bytes) to an upright RGB PIL image, or returns a skip reason."""
  if isinstance(path_or_bytes, bytes):
    data = path_or_bytes
  else:
    try:
      data = storage.path(path_or_bytes).read_bytes()
    except Exception:  # OSError locally; TensorFlow's or fsspec's own errors for a URL
      return "unreadable file"
  if not data:
    return "empty file"
  try:
    img: Image.Image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError:
    return "image too large"
  except Exception:  # any decoder error on untrusted bytes means "not something PIL can open"
    return "not an image"
  try:
    # open() only reads the header: load() forces the full decode that reveals truncation.
    img.load()
  except Image.DecompressionBombError:
    return "image too large"
  except Exception:  # PIL plugins raise many types (OSError, SyntaxError, struct.error, ...)
    return "corrupt image"
  try:
    img = ImageOps.exif_transpose(img)
  except Exception:  # malformed EXIF must not cost a decodable face: keep the stored orientation
    pass
  return _to_rgb(img)


def centre_square_box(width: int, height: int) -> tuple[int, int, int, int]:
  """Returns the largest centred square of a width x height image as (left, top, side, side)."""
  side = min(width, height)
  return (width - side) // 2, (height - side) // 2, side, side


def centre_square(img: Image.Image, size: int) -> np.ndarray:
  """Centre-crops an RGB image to a square and resizes it to size x size uint8."""
  left, top, side, _ = centre_square_box(*img.size)
  img = img.crop((left, top, left + side, top + side))
  if side != size:  # an already-sized face (e.g. a 200x200 UTKFace chip) keeps its exact pixels
    img = img.resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to RGB, compositing transparency on black."""
  # convert() would clip gray levels beyond 255: a 16- or 32-bit face would come out white or black.
  if img.mode.startswith("I;16"):
    img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))  # the high byte
  elif img.mode in ("I", "F"):
    img = Image.fromarray(_stretch_to_uint8(np.asarray(img)))
  if img.has_transparency_data:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), rgba).convert("RGB")
  return img.convert("RGB")


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
  """Maps an array's finite range linearly onto 0..255 (NaN and -inf black, +inf white, constant 128)."""
  values = values.astype(np.float64)
  finite = values[np.isfinite(values)]
  if finite.size == 0 or finite.min() == finite.max():
    return np.full(values.shape, 128, np.uint8)
  lo, hi = finite.min(), finite.max()
  values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
  return np.rint((values - lo) * (255 / (hi - lo))).astype(np.uint8)


def age_skip_reason(age: int) -> str | None:
  """Returns why an integer age can't be stored (negative, or beyond int32), or None if it can."""
  if age < 0:
    return "negative age"
  if age > np.iinfo(np.int32).max:
    return "age too large"
  return None


class SkipCounter:
  """Counts skipped files by reason and remembers the first few names per reason."""

  def __init__(self, max_examples: int = 5):
    self.max_examples = max_examples
    self.counts: dict[str, int] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)

  def add(self, reason: str, name: str) -> None:
    """Records that `name` was skipped for `reason`."""
    self.counts[reason] += 1
    if len(self.examples[reason]) < self.max_examples:
      self.examples[reason].append(name)

  def record(self, metadata: dict, dataset: str, split: str) -> None:
    """Adds this split's skips to the dataset metadata and logs them at INFO."""
    by_split = metadata.setdefault("skipped_by_split", {})
    by_split[split] = dict(sorted(self.counts.items()))
    totals: collections.Counter[str] = collections.Counter()
    for counts in by_split.values():
      totals.update(counts)
    metadata["skipped"] = dict(sorted(totals.items()))
    examples = metadata.setdefault("skipped_examples", {})
    for reason, names in self.examples.items():
      examples[reason] = (examples.get(reason, []) + names)[: self.max_examples]
    if not self.counts:
      logging.info("%s %s: no files skipped", dataset, split)
    for reason, count in sorted(self.counts.items()):
      logging.info(
        "%s %s: skipped %d file(s): %s, e.g. %s", dataset, split, count, reason, ", ".join(self.examples[reason])
      )
