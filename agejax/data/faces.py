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
too large" (PIL's decompression-bomb limit; with `max_pixels`, "image too large: WxH pixels is over
the limit of N megapixels", from the header before any pixel is decoded).
Large images can be decoded at reduced scale (`min_side`): JPEGs by libjpeg's DCT scaling (the
full size is never held), other formats by one box reduction right after decoding, before any
mode conversion, so at most one full-size copy exists (`Header.decode_bytes` estimates it).
"""

import collections
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Header:
  """What an image file's header says, read without decoding its pixels."""

  width: int
  height: int
  mode: str
  format: str | None

  @property
  def pixels(self) -> int:
    """Width x height."""
    return self.width * self.height

  def reduction(self, min_side: int | None) -> int:
    """The integer factor a decode shrinks the image by so its shorter side stays at least `min_side` (1: none)."""
    return max(1, min(self.width, self.height) // min_side) if min_side else 1

  def decode_bytes(self, min_side: int | None = None) -> int:
    """About the most bytes of pixels `open_rgb(..., min_side=min_side)` holds at once for this image."""
    factor = self.reduction(min_side)
    full = self.pixels * _BYTES_PER_PIXEL.get(self.mode, 4)
    if self.format == "JPEG":  # decoded at 1/2, 1/4 or 1/8 scale (draft): the full size never exists
      scale = min(8, 1 << (factor.bit_length() - 1))
      return full // (scale * scale) + self.pixels // (factor * factor) * 3
    return full + self.pixels // (factor * factor) * 3


@dataclasses.dataclass
class Decoded:
  """An upright RGB image decoded at reduced scale: `image` is `full_size` (width, height) shrunk by `factor`."""

  image: Image.Image
  full_size: tuple[int, int]

  @property
  def scale(self) -> tuple[float, float]:
    """The image's pixels per full-size pixel, along x and y."""
    return self.image.width / self.full_size[0], self.image.height / self.full_size[1]


def read_header(data: bytes) -> Header | str:
  """Reads the size, mode and format of image bytes without decoding them, or returns a skip reason."""
  if not data:
    return "empty file"
  try:
    with Image.open(io.BytesIO(data)) as img:
      return Header(img.width, img.height, img.mode, img.format)
  except Image.DecompressionBombError:
    return "image too large"
  except Exception:  # any decoder error on untrusted bytes means "not something PIL can open"
    return "not an image"


def too_large(header: Header, max_pixels: int) -> str:
  """The skip reason of an image over `max_pixels`."""
  return f"image too large: {header.width}x{header.height} pixels is over the limit of {max_pixels / 1e6:g} megapixels"


def open_rgb(
  path_or_bytes: str | os.PathLike | bytes, *, max_pixels: int | None = None, min_side: int | None = None
) -> Image.Image | str:
  """Decodes an image file (or its bytes) to an upright RGB PIL image, or returns a skip reason.

  Args:
    path_or_bytes: a path, URL or the file's bytes.
    max_pixels: refuse images with more pixels, from the header, before decoding anything.
    min_side: decode at reduced scale (JPEG's DCT scaling, else one box reduction of the decoded
      image) while the shorter side stays at least this long; None: full size.
  """
  decoded = open_reduced(path_or_bytes, max_pixels=max_pixels, min_side=min_side)
  return decoded if isinstance(decoded, str) else decoded.image


def open_reduced(
  path_or_bytes: str | os.PathLike | bytes,
  *,
  max_pixels: int | None = None,
  min_side: int | None = None,
  factor: int | None = None,
) -> Decoded | str:
  """`open_rgb`, also returning the image's full size (to map the reduced image's pixels back).

  `factor` (instead of `min_side`) asks for at most that reduction.
  """
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
  header = Header(img.width, img.height, img.mode, img.format)
  if max_pixels is not None and header.pixels > max_pixels:
    return too_large(header, max_pixels)
  factor = factor or header.reduction(min_side)
  try:
    if factor > 1 and img.format == "JPEG":  # the decoder skips DCT detail: the full size is never held
      img.draft(None, (-(-img.width // factor), -(-img.height // factor)))
    # open() only reads the header: load() forces the full decode that reveals truncation.
    img.load()
  except Image.DecompressionBombError:
    return "image too large"
  except Exception:  # PIL plugins raise many types (OSError, SyntaxError, struct.error, ...)
    return "corrupt image"
  img = _reduce(img, factor // max(1, round(header.width / img.width)))  # what the JPEG draft left to do
  try:
    img = ImageOps.exif_transpose(img)
  except Exception:  # malformed EXIF must not cost a decodable face: keep the stored orientation
    pass
  full = (header.width, header.height)
  if img.width != img.height and (img.width > img.height) != (header.width > header.height):
    full = full[::-1]  # rotated a quarter turn by its EXIF orientation
  return Decoded(_to_rgb(img), full)


def _reduce(img: Image.Image, factor: int) -> Image.Image:
  """Shrinks a decoded image by an integer factor (box filter) in one step; modes reduce() lacks go 8-bit first."""
  if factor < 2:
    return img
  if img.mode.startswith("I;16"):
    img = _high_byte(img)
  elif img.mode not in ("L", "LA", "RGB", "RGBA", "RGBa", "La", "CMYK", "I", "F", "YCbCr"):
    img = img.convert("RGBA" if img.has_transparency_data else "RGB")
  return img.reduce(factor)


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
    img = _high_byte(img)
  elif img.mode in ("I", "F"):
    img = Image.fromarray(_stretch_to_uint8(np.asarray(img)))
  if img.has_transparency_data:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), rgba).convert("RGB")
  return img.convert("RGB")


def _high_byte(img: Image.Image) -> Image.Image:
  """A 16-bit gray image's high byte as an 8-bit one (65535 is white)."""
  values = np.array(img)  # a writable copy, shifted in place: 2 bytes a pixel, not 8
  values >>= 8
  return Image.fromarray(values.astype(np.uint8))


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
  """Maps an array's finite range linearly onto 0..255 (NaN and -inf black, +inf white, constant 128)."""
  # In float32, in place: about 9 bytes a pixel at the peak (one working copy, a mask, the result), not 34.
  finite = np.isfinite(values)
  if not finite.any():
    return np.full(values.shape, 128, np.uint8)
  if finite.all():  # integer images always are
    lo, hi = float(values.min()), float(values.max())
  else:
    lo, hi = float(values.min(where=finite, initial=np.inf)), float(values.max(where=finite, initial=-np.inf))
  if lo == hi:
    return np.full(values.shape, 128, np.uint8)
  work: np.ndarray = values.astype(np.float64 if values.dtype == np.float64 else np.float32)
  if not finite.all():
    bad = ~finite
    positive = bad & (work > 0)  # +inf (NaN compares false)
    work[bad] = lo  # NaN and -inf: black
    work[positive] = hi  # +inf: white
  del finite
  work -= lo
  work *= 255 / (hi - lo)
  np.rint(work, out=work)
  return work.astype(np.uint8)


_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 4, "LA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4, "I": 4, "F": 4}


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
