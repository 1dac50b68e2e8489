"""Hostile export folders: the loader refuses each in one line naming the file and the problem.

One real export of the session's tiny run is copied per case and damaged the way a red team did
(a manifest number 1e999, nesting 100,000 deep, model.jax as a folder, a link to /dev/zero, a FIFO,
Infinity in the input spec, a file left out of the checksums, links out of the folder, --output onto
a link). `ExportedPredictor` (what serve.py loads) and `verify` (export.py --verify) must refuse
each; the scripts print it as one `error:` line and exit 1.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_run

from agejax import errors
from agejax.inference import export
from agejax.serving.local import free_port

# Every case damages a copy of a full export (all formats) of the shared trained model: the full suite only.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}  # as a user runs the scripts
ENV |= {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
RAW = "@@raw@@"  # a manifest value replaced by raw JSON text, for what json.dumps cannot write
MEMORY = 6 << 30  # a child that reads /dev/zero fails at this, not after taking the machine's memory
AGAIN = "; export the workdir again"
NOT_REGULAR = ", not a regular file; an export holds regular files only: export again"
OUTSIDE = ", outside the export folder; an export holds its own files only: export again"

# ExportedPredictor and verify on each folder in a child process bounded in time and memory: a
# regression could block on a FIFO or read /dev/zero until the machine runs out of memory.
LOAD_IN_CHILD = """
import json, sys, time
from agejax import errors
from agejax.inference import export
found = []
for folder in sys.argv[1:]:
  for load in (export.ExportedPredictor, export.verify):
    start = time.monotonic()
    try:
      load(folder)
      found.append([None, time.monotonic() - start])
    except errors.UserError as e:
      found.append([str(e), time.monotonic() - start])
print(json.dumps(found))
"""


def run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
  """`python ARGS` from the repository root, as a user runs it, bounded in time and memory (RLIMIT_DATA).

  The limit is set by the shell: a preexec_fn would fork this multithreaded (JAX) process.
  """
  return subprocess.run(
    ["bash", "-c", f'ulimit -d {MEMORY >> 10} && exec "$@"', "bash", sys.executable, *args],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def one_error(proc: subprocess.CompletedProcess) -> str:
  """The one `error: ...` line a failed script printed on stderr (and nothing else), its text after `error: `."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0].removeprefix("error: ")


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory) -> Path:
  """The session's tiny run, copied for this module."""
  return tiny_run.tiny_run(request, tmp_path_factory)[1]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> Path:
  """An export of the tiny run with every format (model.jax, saved_model/, model.onnx): the original of each case."""
  out, manifest = tiny_run.tiny_export(request, tmp_path_factory)
  assert manifest["files"]["onnx"] and manifest["files"]["saved_model"], manifest["files"]
  return out


def copy(exported: Path, tmp_path: Path) -> Path:
  folder = tmp_path / "out"
  shutil.copytree(exported, folder)
  return folder


def rewrite_manifest(folder: Path, raw: str = "", **changes) -> Path:
  """Writes folder's manifest with `changes` (a dict updates that object), a RAW value replaced by `raw`."""
  file = folder / export.MANIFEST_FILE
  manifest = json.loads(file.read_text())
  for key, value in changes.items():
    manifest[key] = {**manifest.get(key, {}), **value} if isinstance(value, dict) else value
  file.write_text(json.dumps(manifest, indent=2).replace(json.dumps(RAW), raw))
  return file


def refusals(folder: Path) -> tuple[str, str]:
  """ExportedPredictor's and verify's one-line refusals of `folder` (in this process)."""
  found = []
  for load in (export.ExportedPredictor, export.verify):
    with pytest.raises(errors.UserError) as error:
      load(folder)
    found.append(str(error.value))
    assert "\n" not in found[-1], found[-1]
  return found[0], found[1]


@pytest.mark.parametrize(
  ("raw", "changes", "message"),
  [
    # json reads 1e999 as inf, and Infinity and NaN as Python's: each refused by key.
    ("1e999", {"temperature": RAW}, "'temperature' is Infinity, not a finite number"),
    ("Infinity", {"input_spec": {"mean": [0.4, RAW, 0.4]}}, "'input_spec.mean[1]' is Infinity, not a finite number"),
    ("NaN", {"reference": {"expected_age": RAW}}, "'reference.expected_age' is NaN, not a finite number"),
    ("-1e999", {"interval_masses": RAW}, "'interval_masses' is -Infinity, not a finite number"),
    # int(inf) raised OverflowError here: a traceback.
    (
      "1e999",
      {"framing": {"landmarks": [[0.4, 0.4]] * 5, "measured_on": RAW}},
      "'framing.measured_on' is Infinity, not a finite number",
    ),
    # 100,000 deep: beyond json's recursion; 40 deep: parsed, and refused before anything walks it.
    ("[" * 100_000 + "]" * 100_000, {"notes": RAW}, "nested more than 16 deep, not an export's manifest"),
    ("[" * 40 + "]" * 40, {"notes": RAW}, f"nested more than 16 deep at 'notes{'[0]' * 15}', not an export's manifest"),
    (str(10**30), {"step": RAW}, f"'step' is {10**30}, not a whole number within +-2**63"),
  ],
  ids=["1e999", "Infinity", "NaN", "-1e999", "framing-1e999", "100000-deep", "40-deep", "10**30"],
)
def test_a_manifest_number_that_is_not_finite_or_nested_too_deep_is_refused_by_key(
  exported, tmp_path, raw, changes, message
):
  folder = copy(exported, tmp_path)
  file = rewrite_manifest(folder, raw, **changes)
  predictor, verified = refusals(folder)
  assert predictor == verified == f"{file}: {message}{AGAIN}"


@pytest.mark.parametrize(
  ("changes", "message"),
  [
    ({"input_spec": {"std": [0.229, 0.0, 0.225]}}, r"'input_spec' is \{.*, not null or an object with 'pixel_range'"),
    ({"input_spec": {"pixel_range": -1.0}}, r"'input_spec' is \{.*, not null or an object with 'pixel_range' > 0"),
    ({"input_spec": {"channels": "RGBA"}}, r"'input_spec' is \{.*, not null or an object"),
    ({"input_spec": {"mean": [0.5, 0.5]}}, r"'input_spec' is \{.*, not null or an object"),
    ({"input_spec": "imagenet"}, r"'input_spec' is \"imagenet\", not null or an object"),
    ({"input_size": 100_000}, r"'input_size' is 100000, not a whole number of pixels, 1 to 4096"),
    ({"input_size": 0}, r"'input_size' is 0, not a whole number of pixels, 1 to 4096"),
    ({"image_size": -3}, r"'image_size' is -3, not a whole number of pixels, 1 to 4096"),
    ({"min_age": -5}, r"'min_age' is -5, not a whole number of years, 0 to 1000"),
    ({"max_age": 10**9, "num_bins": 10**9}, r"'max_age' is 1000000000, not a whole number, min_age..1000"),
    ({"temperature": 0}, r"'temperature' is 0, not a finite number > 0"),
    ({"eval_crop": 1.5}, r"'eval_crop' is 1.5, not a number in \(0, 1\]"),
    ({"reference": {"distribution": [2.0] * 100}}, r"'reference' is .*, not an object with a finite 'expected_age'"),
    ({"sha256": {"model.jax": "0" * 64, "./x": "0" * 64}}, r"'sha256' is .*, not an object of files in the folder"),
    ({"framing": {"landmarks": [[0.3, 0.4]] * 5, "measured_on": "many"}}, r"'framing' is .*, not a framing"),
  ],
  ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else "",
)
def test_a_manifest_number_out_of_range_is_refused_naming_key_and_value(exported, tmp_path, changes, message):
  """The numbers a server reports (/healthz) or computes with: finite, positive where a size, bounded."""
  folder = copy(exported, tmp_path)
  file = rewrite_manifest(folder, **changes)
  predictor, verified = refusals(folder)
  assert predictor == verified and predictor.startswith(f"{file}: "), predictor
  assert re.search(message, predictor), predictor


def test_a_manifest_too_large_or_not_a_file_is_refused_before_it_is_parsed(exported, tmp_path):
  folder = copy(exported, tmp_path)
  file = folder / export.MANIFEST_FILE
  text = file.read_text()
  file.write_text(text[:-2] + " " * (1 << 20) + "}\n")  # still valid JSON, over 1 MiB
  size = file.stat().st_size
  assert refusals(folder) == (f"{file}: {size:,} bytes, more than the 1,048,576 it may have; export again",) * 2
  file.unlink()
  file.mkdir()
  assert refusals(folder) == (f"{file}: a folder{NOT_REGULAR}",) * 2


def test_model_jax_as_a_folder_is_refused(exported, tmp_path):
  folder = copy(exported, tmp_path)
  model = folder / export.MODEL_FILE
  model.unlink()
  model.mkdir()
  assert refusals(folder) == (f"{model}: a folder{NOT_REGULAR}",) * 2


def test_a_link_to_dev_zero_and_a_fifo_are_refused_at_once_and_through_the_scripts(exported, tmp_path):
  """A link to /dev/zero grew the server by 5.6 GB in 6 s and a FIFO hung it: refused before any read."""
  zero = copy(exported, tmp_path / "zero")
  (zero / export.MODEL_FILE).unlink()
  (zero / export.MODEL_FILE).symlink_to("/dev/zero")
  fifo = copy(exported, tmp_path / "fifo")
  (fifo / export.MODEL_FILE).unlink()
  os.mkfifo(fifo / export.MODEL_FILE)
  fifo_manifest = copy(exported, tmp_path / "fifo_manifest")
  (fifo_manifest / export.MANIFEST_FILE).unlink()
  os.mkfifo(fifo_manifest / export.MANIFEST_FILE)

  proc = run("-c", LOAD_IN_CHILD, str(zero), str(fifo), str(fifo_manifest), timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = json.loads(proc.stdout)
  expected = [
    f"{zero / export.MODEL_FILE}: a symbolic link to /dev/zero{OUTSIDE}",
    f"{fifo / export.MODEL_FILE}: a FIFO (named pipe){NOT_REGULAR}",
    f"{fifo_manifest / export.MANIFEST_FILE}: a FIFO (named pipe){NOT_REGULAR}",
  ]
  assert [message for message, _ in found] == [m for m in expected for _ in range(2)]  # ExportedPredictor, verify
  assert max(seconds for _, seconds in found) < 2.0, found

  for folder, message in ((zero, expected[0]), (fifo, expected[1])):
    proc = run("scripts/serve.py", "--export", str(folder), "--port", str(free_port()), timeout=120)
    assert one_error(proc) == message
  proc = run("scripts/export.py", "--output", str(zero), "--verify", timeout=120)
  assert one_error(proc) == expected[0]


def test_links_out_of_the_folder_are_refused_even_to_an_identical_file(exported, tmp_path):
  """A link to a copy of the export's own model.jax has the right checksum; it is still another folder's file."""
  folder = copy(exported, tmp_path)
  elsewhere = Path(os.path.realpath(tmp_path)) / "elsewhere"  # how the message names it
  elsewhere.mkdir()
  for name in (export.MODEL_FILE, export.ONNX_FILE):
    shutil.copy(folder / name, elsewhere / name)
    (folder / name).unlink()
    (folder / name).symlink_to(elsewhere / name)
  model = folder / export.MODEL_FILE
  assert refusals(folder) == (f"{model}: a symbolic link to {elsewhere / export.MODEL_FILE}{OUTSIDE}",) * 2

  model.unlink()
  shutil.copy(elsewhere / export.MODEL_FILE, model)  # model.jax whole again: only model.onnx leads out
  export.ExportedPredictor(folder)  # it loads model.jax alone
  with pytest.raises(errors.UserError) as error:
    export.verify(folder)
  assert str(error.value) == f"{folder / export.ONNX_FILE}: a symbolic link to {elsewhere / export.ONNX_FILE}{OUTSIDE}"

  (folder / export.ONNX_FILE).unlink()  # a link whose folder leads out: saved_model/ itself
  shutil.copy(elsewhere / export.ONNX_FILE, folder / export.ONNX_FILE)
  shutil.move(folder / export.SAVED_MODEL_DIR, elsewhere / export.SAVED_MODEL_DIR)
  (folder / export.SAVED_MODEL_DIR).symlink_to(elsewhere / export.SAVED_MODEL_DIR)
  with pytest.raises(errors.UserError) as error:
    export.verify(folder)
  saved_model = folder / export.SAVED_MODEL_DIR
  assert str(error.value) == f"{saved_model}: a symbolic link to {elsewhere / export.SAVED_MODEL_DIR}{OUTSIDE}"


def test_an_export_reached_through_a_link_loads_and_verifies(exported, tmp_path):
  """Links to the export folder itself are how deployments switch versions: they are not links out of it."""
  folder = copy(exported, tmp_path)
  (tmp_path / "current").symlink_to(folder)
  assert export.verify(tmp_path / "current").step == export.ExportedPredictor(folder).step


def test_a_checksum_entry_naming_a_folder_is_refused(exported, tmp_path):
  folder = copy(exported, tmp_path)
  listed = json.loads((folder / export.MANIFEST_FILE).read_text())["sha256"]
  rewrite_manifest(folder, sha256={**listed, "saved_model/variables": "0" * 64})
  export.ExportedPredictor(folder)  # what the server runs is whole
  with pytest.raises(errors.UserError) as error:
    export.verify(folder)
  assert str(error.value) == f"{folder / 'saved_model' / 'variables'}: a folder{NOT_REGULAR}"


def test_every_file_the_export_holds_must_be_listed_in_its_checksums(exported, tmp_path):
  """Without model.onnx in the checksums, --verify passed a garbage model.onnx."""
  folder = copy(exported, tmp_path)
  file = folder / export.MANIFEST_FILE
  manifest = json.loads(file.read_text())
  del manifest["sha256"][export.ONNX_FILE]
  file.write_text(json.dumps(manifest))
  (folder / export.ONNX_FILE).write_bytes(b"garbage")
  unlisted = f"not listed in {file}'s 'sha256' (an export lists every file it holds); export again"
  export.ExportedPredictor(folder)
  with pytest.raises(errors.UserError) as error:
    export.verify(folder)
  assert str(error.value) == f"{folder / export.ONNX_FILE}: {unlisted}"
  proc = run("scripts/export.py", "--output", str(folder), "--verify")
  assert one_error(proc) == str(error.value)

  (folder / export.ONNX_FILE).unlink()
  (folder / export.SAVED_MODEL_DIR / "assets" / "notes.txt").write_text("not the export's")  # deeper down
  with pytest.raises(errors.UserError) as error:
    export.verify(folder)
  assert str(error.value) == f"{folder / 'saved_model/assets/notes.txt'}: {unlisted}"


def test_infinity_in_the_input_spec_stops_the_server_from_starting(exported, tmp_path):
  """It was accepted, and then /healthz answered 500 forever (its JSON cannot hold Infinity)."""
  folder = copy(exported, tmp_path)
  file = rewrite_manifest(folder, "Infinity", input_spec={"mean": [0.485, RAW, 0.406]})
  proc = run("scripts/serve.py", "--export", str(folder), "--port", str(free_port()))
  assert one_error(proc) == f"{file}: 'input_spec.mean[1]' is Infinity, not a finite number{AGAIN}"


def test_output_onto_a_link_replaces_the_folder_it_points_to_and_keeps_the_link(workdir, exported, tmp_path):
  """It crashed and left a dangling link: now the link is followed whole (docs/guides/export-and-serve.md)."""
  versions = tmp_path / "versions"
  target = copy(exported, versions)  # versions/out: a whole export, with model.onnx and saved_model/
  link = tmp_path / "current"
  link.symlink_to(target)
  proc = run("scripts/export.py", "--workdir", str(workdir), "--output", str(link), "--nosaved_model", "--noonnx")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert link.is_symlink() and os.readlink(link) == str(target)
  assert sorted(p.name for p in target.iterdir()) == [export.MANIFEST_FILE, export.MODEL_FILE]  # replaced whole
  assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "versions"]  # nothing staged or set aside
  assert sorted(p.name for p in versions.iterdir()) == ["out"]
  export.verify(link)

  dangling = tmp_path / "next"
  dangling.symlink_to(tmp_path / "made" / "v2")  # to a folder that does not exist yet, nor its parent
  export.export_workdir(workdir, dangling, saved_model=False, onnx=False)
  assert dangling.is_symlink() and (tmp_path / "made" / "v2" / export.MODEL_FILE).is_file()
  assert sorted(p.name for p in (tmp_path / "made").iterdir()) == ["v2"]
  export.verify(dangling)

  loop = tmp_path / "loop"
  loop.symlink_to(tmp_path / "loop2")
  (tmp_path / "loop2").symlink_to(loop)
  with pytest.raises(errors.UserError) as error:
    export.export_workdir(workdir, loop, saved_model=False, onnx=False)
  assert str(error.value) == f"export folder {loop} is a loop of symbolic links: give a folder, or a link to one"
  assert loop.is_symlink() and (tmp_path / "loop2").is_symlink()
