"""Where files live: every user-given location is a local path or a URL (gs://...), through etils.epath.

Local paths are made absolute (Orbax needs that) and small files are written atomically with a
rename; object stores have no cheap rename but their object writes are atomic, so files there are
written directly. A folder written whole (an export) is staged beside its place and swapped in
(`staged_folder`). Nothing here ever turns a URL into a local path.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from etils import epath

from agejax import errors

Location = str | os.PathLike

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")  # write_text's `.NAME.tmpPID`
_STAGING = r"^{name}\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{{8}}$"  # the sibling folders staged_folder's swap uses


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


def _swap(staged: epath.Path, out: epath.Path, tag: str) -> None:
  """Puts the complete local folder `staged` at `out` by renames (atomic): the old one moves aside first."""
  old = None
  if out.exists():
    old = out.parent / f"{out.name}.old-{tag}"
    out.rename(old)
  try:
    staged.rename(out)
  except BaseException:
    if old is not None and not out.exists():
      old.rename(out)  # the previous folder back in place
    raise
  if old is not None:
    old.rmtree()


def _replace_objects(staged: epath.Path, out: epath.Path, names: Sequence[str], last: str | None) -> None:
  """Puts the complete folder `staged` (files `names`) at the URL `out`, where no rename is atomic.

  The old `last` file (the one readers look for) goes first and the new one comes last, so a reader
  finds the new folder whole, or no `last` file, never one beside another version's files.
  """
  if last is not None and (out / last).exists():
    (out / last).unlink()
  for name in sorted(names, key=lambda n: n == last):  # `last` last
    (staged / name).copy(out / name, overwrite=True)
  for folder, _, files in out.walk():  # the old version's files the new one lacks (a format no longer written)
    for name in files:
      if os.path.relpath(os.fspath(folder / name), os.fspath(out)) not in names:
        (folder / name).unlink()


def _remove_stale(out: epath.Path) -> None:
  """Removes the staging folders that killed writers of a local `out` left beside it."""
  if is_url(out):
    return  # a process on another host may own them
  pattern = re.compile(_STAGING.format(name=re.escape(out.name)))
  for entry in out.parent.iterdir():
    match = pattern.match(entry.name)
    if match and not process_running(int(match["pid"])):
      shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(folder: Location, *, last: str | None = None, scratch_prefix: str = "agejax-") -> Iterator[str]:
  """Yields a local folder to write into; on success it replaces `folder` whole, else `folder` is untouched.

  Locally the folder is FOLDER.tmp-PID-XXXXXXXX beside FOLDER (same file system: the swap is
  renames, the old folder set aside as FOLDER.old-PID-XXXXXXXX until the new one is in place); a URL
  is written in a local scratch folder (`scratch_prefix`...), uploaded to that sibling and then
  copied into FOLDER with `last` (the file readers look for, e.g. a manifest) removed first and
  written last, as object stores have no atomic rename. A failure also removes the empty folders
  above FOLDER that it made; a success removes the staging folders killed writers left beside it.
  """
  out = path(folder)
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  staged = out.parent / f"{out.name}.tmp-{tag}"
  url = is_url(out)
  created = None  # the first folder above OUT this write makes: removed again if it fails
  if not url:
    created = next((p for p in reversed([out.parent, *out.parent.parents]) if not p.exists()), None)
  local = tempfile.mkdtemp(prefix=scratch_prefix) if url else os.fspath(staged)
  try:
    if not url:
      staged.mkdir(parents=True)
    yield local
    if url:
      names = [os.path.relpath(os.path.join(root, n), local) for root, _, files in os.walk(local) for n in files]
      for name in names:  # uploaded beside OUT first: a failed upload leaves the previous folder as it was
        epath.Path(local, name).copy(staged / name, overwrite=True)
      _replace_objects(staged, out, names, last)
    else:
      _swap(staged, out, tag)
  except BaseException:
    if not url and staged.exists():
      staged.rmtree()
    if created is not None:
      for parent in [out.parent, *out.parent.parents]:  # only the empty folders this write made
        if not parent.exists() or any(parent.iterdir()):
          break
        parent.rmdir()
        if parent == created:
          break
    raise
  finally:
    if url:
      shutil.rmtree(local, ignore_errors=True)
      if staged.exists():
        staged.rmtree()
  _remove_stale(out)


def set_aside(folder: Location) -> list[str]:
  """The names, sorted, of earlier versions of a local `folder` that a killed staged_folder swap left beside it."""
  target = path(folder)
  if is_url(target) or not target.parent.is_dir():
    return []
  pattern = re.compile(_STAGING.format(name=re.escape(target.name)))
  return sorted(p.name for p in target.parent.iterdir() if pattern.match(p.name) and ".old-" in p.name)
