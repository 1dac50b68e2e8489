"""What a prepared dataset was built from: source fingerprints, and archives read whole or not at all.

The downloaded datasets are prepared from a manual folder or archive (`--manual_dir`). Their
builders record a fingerprint of it in the prepared dataset's metadata (`metadata["source"]`:
the path it was read from, a digest, the digest of each part and a file count), so that preparing
the same dataset name again from another or a changed source is refused rather than answered with
the old examples (`datasets.prepare`). A part is a CSV list (its bytes), an archive (its bytes) or
a list of image files (name, size and modification time each): a copied or moved source with the
same contents is the same source, an edited CSV or a replaced image is not.

Archives are checked whole before anything is read from them: `tarfile` ends an archive silently
at a truncated or corrupt header after the first one, which would drop every file after it.
"""

import bz2
import gzip
import hashlib
import json
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path

from agejax import errors

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_CHUNK = 1 << 20
# Leading bytes of the compressed streams a tar archive may come in (whatever its suffix says).
_DECOMPRESSORS = (
  (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)),
  (b"BZh", bz2.BZ2File),
  (b"\xfd7zXZ\x00", lzma.LZMAFile),
)


def display(path: str | os.PathLike) -> str:
  """Returns a path as printable text: bytes that are not UTF-8 (kept by the OS as surrogates) escaped."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
  """False for a file name the OS handed over with undecodable bytes (as surrogate escapes)."""
  try:
    name.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def file_digest(path: Path) -> str:
  """Returns the SHA-256 of a file's bytes."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def files_digest(entries: Iterable[tuple[str, Path]]) -> tuple[str, int]:
  """Returns a digest of (name, size, modification time) over (name, path) pairs, and their count."""
  digest, count = hashlib.sha256(), 0
  for name, path in sorted(entries, key=lambda entry: os.fsencode(entry[0])):
    stat = path.stat()
    digest.update(os.fsencode(name) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    count += 1
  return digest.hexdigest(), count


def fingerprint(path: str | os.PathLike, parts: dict[str, str], num_files: int) -> dict:
  """Returns the metadata record of a source: its path, a digest over its parts, the parts, a file count."""
  digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
  return {"path": display(os.path.abspath(path)), "digest": digest, "parts": parts, "files": num_files}


def differences(recorded: dict, current: dict) -> str:
  """Names the parts in which two source fingerprints differ ("train.csv, images")."""
  old, new = recorded.get("parts") or {}, current.get("parts") or {}
  return ", ".join(sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name)))


def _open_stream(raw):
  """Returns a reader of the tar bytes in `raw`, decompressing gzip, bzip2 or xz by their magic bytes."""
  head = raw.read(6)
  raw.seek(0)
  for magic, opener in _DECOMPRESSORS:
    if head.startswith(magic):
      return opener(raw)
  return raw


def verify_archive(path: Path) -> str:
  """Reads a tar archive (optionally compressed) completely; returns its SHA-256 or raises ValueError.

  Every member is read to its end, the block where the member list stops must be the end-of-archive
  marker (zeros), nothing but zero padding may follow it, and a compressed stream must end with its
  trailer (gzip's CRC and length are checked on the way).
  """
  stopped_at: list[bytes] = []

  class _RecordingTarInfo(tarfile.TarInfo):
    """Remembers the header block read last: the one tarfile stopped at, when the member list ends."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
      stopped_at[:] = [buf]
      return super().frombuf(buf, encoding, errors)

  try:
    sha256 = file_digest(path)
  except OSError as e:
    raise errors.UserError(f"{display(path)}: cannot read it ({e.strerror or e})") from None
  try:
    with open(path, "rb") as raw, _open_stream(raw) as stream:
      with tarfile.open(fileobj=stream, mode="r:", tarinfo=_RecordingTarInfo) as tar:
        for member in tar:
          if member.isfile():
            data = tar.extractfile(member)
            assert data is not None  # isfile(): a regular member always has a stream
            while data.read(_CHUNK):  # a member cut short raises ReadError("unexpected end of data")
              pass
        end = tar.offset
      marker = stopped_at[-1] if stopped_at else b""
      if len(marker) < tarfile.BLOCKSIZE:
        raise errors.UserError(
          f"{display(path)} is truncated: its tar data ends at byte {end + len(marker)}, before "
          f"the end-of-archive marker; download it again"
        )
      if marker.count(0) != tarfile.BLOCKSIZE:
        raise errors.UserError(
          f"{display(path)} is corrupt: the tar header at byte {end} is invalid; download it again"
        )
      length = end + tarfile.BLOCKSIZE
      while chunk := stream.read(_CHUNK):  # to the end, so a compressed stream's trailer is checked too
        if chunk.count(0) != len(chunk):
          raise errors.UserError(
            f"{display(path)} has data after its end-of-archive marker at byte {end} (archives "
            f"joined?); extract it and pass the folder instead"
          )
        length += len(chunk)
      if length % tarfile.BLOCKSIZE:
        raise errors.UserError(
          f"{display(path)} is truncated: its {length} bytes of tar data are not a whole number "
          f"of 512-byte blocks; download it again"
        )
  except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
    raise errors.UserError(f"{display(path)} is truncated or corrupt ({e}); download it again") from None
  return sha256
