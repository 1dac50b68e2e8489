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

Untrusted bytes (the server's uploads) go through `screen` first: it walks a JPEG's, PNG's or WebP's
structure without decoding anything and refuses what no camera writes (over MAX_JPEG_SCANS
progressive scans, over MAX_PNG_CHUNKS chunks or MAX_PNG_ANCILLARY ancillary ones, an oversized
EXIF block), and drops the PNG chunks decoding never needs (text, ICC profiles, animation), so
Pillow inflates none of them. `read_header` and `open_reduced` then take an allow-list of formats
(`formats`; None: every format Pillow reads, as predict.py does on local files).
"""

import collections
import dataclasses
import io
import math
import os
import re
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from agejax import storage


def load_rgb(path_or_bytes: str | os.PathLike | bytes, size: int) -> np.ndarray | str:
  """Returns the image as a centre-cropped size x size RGB uint8 array, or a skip reason."""
  img = open_rgb(path_or_bytes)
  return img if isinstance(img, str) else centre_square(img, size)


FORMATS = ("JPEG", "PNG", "WEBP")  # what the server reads unless told more (serve.py --formats)
MAX_JPEG_SCANS = 100  # cameras and encoders write 1 (baseline) or ~10 (progressive); each scan walks every block
MAX_JPEG_SEGMENTS = 1000  # marker segments (APPn, tables, scans): a progressive JPEG has about 2 a scan
MAX_PNG_CHUNKS = 16384  # a 20 MB PNG of 8 KB IDAT chunks (libpng's size) has 2,500
MAX_PNG_ANCILLARY = 256  # text, ICC, time, animation... chunks: a photo has a handful
MAX_EXIF_BYTES = 1 << 20  # a JPEG's EXIF is at most 64 KB (one APP1 segment)
MAX_WEBP_CHUNKS = 4096  # an animated WebP's frames are chunks too: only its first is decoded
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The PNG chunks that change a decoded PNG's pixels or orientation; every other ancillary chunk is dropped.
_PNG_KEPT = (b"tRNS", b"eXIf")
# After a JPEG scan's header, its entropy-coded data runs to the next marker: 0xFF followed by neither a
# stuffed 0x00, a restart marker (D0-D7) nor a fill byte.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD9)}
_JPEG_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
# Magic numbers of formats outside the allow-list, to name them in the refusal (no parser touches them).
_MAGIC = (
  (b"GIF87a", "GIF"),
  (b"GIF89a", "GIF"),
  (b"BM", "BMP"),
  (b"II*\0", "TIFF"),
  (b"MM\0*", "TIFF"),
  (b"\0\0\0\x0cjP  ", "JPEG2000"),
  (b"\xffO\xffQ", "JPEG2000"),
  (b"8BPS", "PSD"),
  (b"\0\0\1\0", "ICO"),
  (b"%PDF", "PDF"),
  (b"\xff\xd8\xff", "JPEG"),
  (PNG_SIGNATURE, "PNG"),
)


@dataclasses.dataclass(frozen=True)
class Header:
  """What an image file's header says, read without decoding its pixels."""

  width: int
  height: int
  mode: str
  format: str | None
  # A progressive JPEG's sample planes over all its components (YCbCr 4:2:0: 1.5, CMYK: 4): its decoder
  # holds every coefficient of the full-size image, 2 bytes a sample, whatever the scale it outputs.
  progressive_planes: float = 0.0
  transparent: bool = False  # composited on black once reduced: three more copies of the reduced image

  @property
  def pixels(self) -> int:
    """Width x height."""
    return self.width * self.height

  def reduction(self, min_side: int | None) -> int:
    """The integer factor a decode shrinks the image by so its shorter side stays at least `min_side` (1: none)."""
    return max(1, min(self.width, self.height) // min_side) if min_side else 1

  def decode_bytes(self, min_side: int | None = None) -> int:
    """About the most bytes `open_rgb(..., min_side=min_side)` holds at once for this image.

    Measured per format and mode (`benchmarks.serving.decode_costs`, docs/benchmarks.md): the full-size
    decode (Pillow keeps RGB at 4 bytes a pixel, libwebp and OpenJPEG hold buffers of their own beside
    it; modes Image.reduce lacks are converted at full size), then the reduced copy's conversion to RGB
    (4 bytes a pixel; 16 where transparency is composited or float values are stretched), and a few MB
    of the libraries' own.
    """
    factor = self.reduction(min_side)
    reduced = self.pixels // (factor * factor)
    to_rgb = reduced * (16 if self.transparent or self.mode in ("I", "F") or self.mode.startswith("I;16") else 4)
    if self.format in ("JPEG", "MPO"):  # decoded at 1/2, 1/4 or 1/8 scale (draft): the full-size pixels never exist
      scale = min(8, 1 << (factor.bit_length() - 1))
      coefficients = math.ceil(2 * self.progressive_planes * self.pixels)
      out = self.pixels // (scale * scale) * _STORED_BYTES.get(self.mode, 4)
      return out + coefficients + to_rgb + _LIBRARY_BYTES
    return math.ceil(self.pixels * _full_decode_bytes(self.format, self.mode)) + to_rgb + _LIBRARY_BYTES


@dataclasses.dataclass
class Decoded:
  """An upright RGB image decoded at reduced scale: `image` is `full_size` (width, height) shrunk by `factor`."""

  image: Image.Image
  full_size: tuple[int, int]

  @property
  def scale(self) -> tuple[float, float]:
    """The image's pixels per full-size pixel, along x and y."""
    return self.image.width / self.full_size[0], self.image.height / self.full_size[1]


def read_header(data: bytes, formats: Sequence[str] | None = None) -> Header | str:
  """Reads the size, mode and format of image bytes without decoding them, or returns a skip reason.

  `formats`: Pillow's format names to try (None: all); bytes of another format get "a GIF image: ...".
  """
  if not data:
    return "empty file"
  try:
    with Image.open(io.BytesIO(data), formats=_with_mpo(formats)) as img:
      planes = 0.0
      if img.format in ("JPEG", "MPO") and img.info.get("progressive"):
        sampling = [(h, v) for _, h, v, _ in getattr(img, "layer", [])] or [(1, 1)] * 4
        most = max(h * v for h, v in sampling)
        planes = sum(h * v for h, v in sampling) / most
      return Header(img.width, img.height, img.mode, img.format, planes, img.has_transparency_data)
  except Image.DecompressionBombError:
    return "image too large"
  except MemoryError:  # a limit of the caller's (the server's decode workers), not the file's fault
    raise
  except Exception:  # any decoder error on untrusted bytes means "not something PIL can open"
    return _unaccepted(data, formats) or "not an image"


def screen(data: bytes) -> bytes | str:
  """The bytes to hand the decoder, or why they are refused: caps on a JPEG's, PNG's or WebP's structure.

  Nothing is decompressed. A PNG comes back without the ancillary chunks decoding does not need
  (all but tRNS and a small eXIf), so Pillow inflates no text or ICC profile, and an animated PNG
  reads as its default image; other bytes come back as they are.
  """
  if data.startswith(PNG_SIGNATURE):
    return _screen_png(data)
  if data.startswith(b"\xff\xd8"):
    return _screen_jpeg(data)
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return _screen_webp(data)
  return data


def _screen_png(data: bytes) -> bytes | str:
  kept, pos, chunks, ancillary, kind = [data[:8]], 8, 0, 0, b""
  while pos + 8 <= len(data):
    length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
    end = pos + 12 + length
    chunks += 1
    if chunks > MAX_PNG_CHUNKS:
      return f"a PNG of over {MAX_PNG_CHUNKS} chunks"
    if kind[:1].islower():  # ancillary (the type's first letter in lower case)
      ancillary += 1
      if ancillary > MAX_PNG_ANCILLARY:
        return f"a PNG of over {MAX_PNG_ANCILLARY} ancillary chunks (text, profiles, animation)"
      if kind in _PNG_KEPT and length <= MAX_EXIF_BYTES:
        kept.append(data[pos:end])
    else:
      kept.append(data[pos:end])  # a truncated last chunk too: the decoder says "corrupt image"
    pos = end
    if kind == b"IEND":
      break
  return b"".join(kept) + (b"" if kind == b"IEND" else data[pos:])  # a cut tail stays cut


def _screen_jpeg(data: bytes) -> bytes | str:
  pos, segments, scans = 2, 0, 0
  while pos < len(data):
    if data[pos] != 0xFF:  # garbage between segments (libjpeg skips it, with a warning)
      pos = data.find(b"\xff", pos)
      if pos < 0:
        break
    while pos < len(data) and data[pos] == 0xFF:  # fill bytes
      pos += 1
    if pos + 2 >= len(data):
      break
    marker = data[pos]
    pos += 1
    if marker == 0xD9:  # end of image
      break
    if marker in _JPEG_STANDALONE:
      continue
    segments += 1
    if segments > MAX_JPEG_SEGMENTS:
      return f"a JPEG of over {MAX_JPEG_SEGMENTS} segments"
    length = int.from_bytes(data[pos : pos + 2], "big")
    if marker == 0xE1 and length > MAX_EXIF_BYTES:  # cannot happen in a valid JPEG (a length has 16 bits)
      return "a JPEG with an oversized EXIF block"
    pos += length
    if marker == 0xDA:  # a scan: its entropy-coded data runs to the next marker
      scans += 1
      if scans > MAX_JPEG_SCANS:
        return f"a progressive JPEG of over {MAX_JPEG_SCANS} scans"
      found = _JPEG_MARKER.search(data, pos)
      if found is None:
        break
      pos = found.start()
  return data


def _screen_webp(data: bytes) -> bytes | str:
  pos, chunks = 12, 0
  while pos + 8 <= len(data):
    kind, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
    chunks += 1
    if chunks > MAX_WEBP_CHUNKS:
      return f"a WebP of over {MAX_WEBP_CHUNKS} chunks (animation frames)"
    if kind == b"EXIF" and length > MAX_EXIF_BYTES:
      return f"a WebP with an EXIF block over {MAX_EXIF_BYTES >> 20} MB"
    pos += 8 + length + (length & 1)  # chunks are padded to an even size
  return data


def webp_size(data: bytes) -> tuple[int, int] | None:
  """A WebP's width and height from its first chunk (VP8X, VP8L or VP8), or None for other bytes.

  Pillow's WebP reader allocates two canvases of the full size as it opens a file (8 bytes a pixel):
  this reads the size first, without libwebp.
  """
  if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or len(data) < 30:
    return None
  kind, body = data[12:16], data[20:30]
  if kind == b"VP8X":
    return 1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")
  if kind == b"VP8L" and body[0] == 0x2F:
    bits = int.from_bytes(body[1:5], "little")
    return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
  if kind == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":
    return int.from_bytes(body[6:8], "little") & 0x3FFF, int.from_bytes(body[8:10], "little") & 0x3FFF
  return None


def sniff(data: bytes) -> str | None:
  """The format of image bytes by their magic number alone (a few common ones), or None."""
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "WEBP"
  if data[4:12] in (b"ftypavif", b"ftypavis"):
    return "AVIF"
  if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1"):
    return "HEIF"
  return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _unaccepted(data: bytes, formats: Sequence[str] | None) -> str | None:
  """Why bytes of a format outside `formats` are refused ("a GIF image: ..."), or None for unknown bytes."""
  found = sniff(data)
  if formats is None or found is None or found in formats or found == "JPEG" and "MPO" in formats:
    return None
  return f"a {found} image: this server reads {', '.join(formats)} (--formats)"


def _with_mpo(formats: Sequence[str] | None) -> list[str] | None:
  """Pillow opens a JPEG carrying more pictures (phones' MPO: the photo and a preview) as "MPO"."""
  if formats is None:
    return None
  return [*formats, "MPO"] if "JPEG" in formats and "MPO" not in formats else list(formats)


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
  formats: Sequence[str] | None = None,
) -> Decoded | str:
  """`open_rgb`, also returning the image's full size (to map the reduced image's pixels back).

  `factor` (instead of `min_side`) asks for at most that reduction; `formats` limits the formats
  tried (None: all), as in `read_header`. An animated image reads as its first frame.
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
    img: Image.Image = Image.open(io.BytesIO(data), formats=_with_mpo(formats))
  except Image.DecompressionBombError:
    return "image too large"
  except MemoryError:  # a limit of the caller's (the server's decode workers), not the file's fault
    raise
  except Exception:  # any decoder error on untrusted bytes means "not something PIL can open"
    return _unaccepted(data, formats) or "not an image"
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
  except MemoryError:  # a limit of the caller's (the server's decode workers), not the file's fault
    raise
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


# Bytes a pixel Pillow stores each mode in (RGB is padded to 4).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Peak bytes a full-size pixel while decoding, besides the reduced copy's conversion, measured at 16 MP
# (docs/benchmarks.md, "Decoding cost by format"). Modes Image.reduce lacks (P, I;16) are converted at
# full size first; libwebp holds two canvases and its own buffers beside Pillow's, OpenJPEG 4 bytes a sample.
_MEASURED_BYTES = {
  ("PNG", "RGB"): 4,
  ("PNG", "RGBA"): 8,
  ("PNG", "L"): 1,
  ("PNG", "LA"): 8,
  ("PNG", "P"): 5,
  ("PNG", "I;16"): 6,
  ("GIF", "P"): 5,
  ("BMP", "RGB"): 4,
  ("TIFF", "RGB"): 4,
  ("TIFF", "F"): 4,
}
_LIBRARY_BYTES = 2 << 20  # libjpeg's, zlib's and Pillow's working buffers: what a small image peaks at


def _full_decode_bytes(fmt: str | None, mode: str) -> float:
  if fmt == "WEBP":
    return 19
  if fmt == "JPEG2000":
    return 20
  return _MEASURED_BYTES.get((fmt or "", mode), _STORED_BYTES.get(mode, 4) + 4)  # unmeasured: and a converted copy


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
