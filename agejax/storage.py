"""Where files live: every user-given location is a local path or a URL (gs://...), through etils.epath.

Local paths are made absolute (Orbax needs that) and small files are written atomically with a
rename; object stores have no cheap rename but their object writes are atomic, so files there are
written directly. Nothing here ever turns a URL into a local path.
"""

import json
import os
import re
import uuid
from typing import Any

from etils import epath

from agejax import errors

Location = str | os.PathLike

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")  # write_text's `.NAME.tmpPID`


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
  target = path(file)
  if is_url(target):
    target.write_text(text)  # one object write: atomic on object stores
    return
  tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, target)  # a rename is atomic on a local file system


def remove_interrupted_writes(directory: Location) -> list[epath.Path]:
  """Removes the `.NAME.tmpPID` files that write_text left in a local `directory` when its process died.

  Call it holding the directory's WorkdirLock; a file whose process still runs on this host is kept.
  Returns the removed files (none for a URL: object writes leave no temporaries).
  """
  folder = path(directory)
  if is_url(folder) or not folder.is_dir():
    return []
  removed: list[epath.Path] = []
  for entry in os.scandir(folder):
    match = _TEMPORARY.match(entry.name)
    if match and entry.is_file(follow_symlinks=False) and not process_running(int(match["pid"])):
      os.unlink(entry.path)
      removed.append(epath.Path(entry.path))
  return removed


def write_json(file: Location, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically (see write_text)."""
  write_text(file, json.dumps(obj, indent=2) + "\n")


def read_json(file: Location) -> Any:
  """Reads a JSON file; raises FileNotFoundError or ValueError naming the file."""
  source = path(file)
  if not source.exists():
    raise errors.MissingInput(f"{source} does not exist")
  try:
    return json.loads(source.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.UserError(f"{source}: not valid JSON ({e})") from None


def read_json_object(file: Location) -> dict[str, Any]:
  """Reads a file that must hold one JSON object (a config, metrics); raises as read_json does."""
  obj = read_json(file)
  if not isinstance(obj, dict):
    raise errors.UserError(f"{path(file)}: not a JSON object (found {type(obj).__name__})")
  return obj


def first_line(error: BaseException) -> str:
  """An error's first line (at most 300 characters), for one-line messages."""
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
  folder = path(directory)
  probe = folder / f".agejax-write-probe-{uuid.uuid4().hex}"
  try:
    if not is_url(folder):
      if folder.exists() and not folder.is_dir():
        raise NotADirectoryError("it is a file")
      folder.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # TensorFlow, fsspec and the OS each raise their own error types
    reason = first_line(e)
    if is_url(folder) and "404" in reason:
      reason += " (does the bucket exist?)"
    raise errors.UserError(f"{what} {folder} is not writable: {reason}") from None
  return folder


def process_running(pid: int) -> bool:
  """True when a process `pid` exists on this host (in this pid namespace)."""
  if pid <= 0:  # kill(0) and kill(-1) would address process groups
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True
