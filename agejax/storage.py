"""Where files live: every user-given location is a local path or a URL (gs://...), through etils.epath.

Local paths are made absolute (Orbax needs that) and small files are written atomically with a
rename; object stores have no cheap rename but their object writes are atomic, so files there are
written directly. Nothing here ever turns a URL into a local path.
"""

import json
import os
import uuid
from typing import Any

from etils import epath

Location = str | os.PathLike


def is_url(location: Location) -> bool:
  """True for a location with a scheme (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(location)


def path(location: Location) -> epath.Path:
  """Returns `location` as an epath.Path: a URL as it is, a local path expanded (~) and absolute."""
  text = os.fspath(location)
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_text(file: Location, text: str) -> None:
  """Writes `text` so that readers see the old or the new content, never a partial file."""
  file = path(file)
  if is_url(file):
    file.write_text(text)  # one object write: atomic on object stores
    return
  tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, file)  # a rename is atomic on a local file system


def write_json(file: Location, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically (see write_text)."""
  write_text(file, json.dumps(obj, indent=2) + "\n")


def read_json(file: Location) -> Any:
  """Reads a JSON file; raises FileNotFoundError or ValueError naming the file."""
  file = path(file)
  if not file.exists():
    raise FileNotFoundError(f"{file} does not exist")
  try:
    return json.loads(file.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  # TensorFlow's GCS errors put the HTTP status and reason on their first line.
  return (text.splitlines()[0] if text else type(error).__name__)[:300]


def check_writable(directory: Location, what: str = "workdir") -> epath.Path:
  """Makes `directory` ready for writing and proves it with a probe file; returns it as an epath.Path.

  A local folder is created. A URL is not: object stores have no folders, and TensorFlow's
  recursive mkdir retries a missing bucket forever. Raises ValueError in one line naming the
  location when writing fails (a missing bucket, no permission, an unreachable endpoint, a file
  in the way), so a run fails before any compilation, not at its first save.
  """
  directory = path(directory)
  probe = directory / f".agejax-write-probe-{uuid.uuid4().hex}"
  try:
    if not is_url(directory):
      if directory.exists() and not directory.is_dir():
        raise NotADirectoryError("it is a file")
      directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # TensorFlow, fsspec and the OS each raise their own error types
    reason = _first_line(e)
    if is_url(directory) and "404" in reason:
      reason += " (does the bucket exist?)"
    raise ValueError(f"{what} {directory} is not writable: {reason}") from None
  return directory
