"""The commands the README and the documentation site print are commands the scripts accept.

Every `python scripts/NAME.py ...` line in a bash block of README.md or docs/ is read: the script
must exist, each `--flag` must be one it defines (absl's `--noflag` for booleans), each `--config
configs/F.py[:ARG]` must build, and each `--config.a.b=V` override must name a key of that config.
The flags are read from the scripts themselves, imported in one child process, so a flag renamed in
a script fails here until the pages say the new name.
"""

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}

# Imports each script without running it and prints the flags it defines: absl's (absl's own excluded),
# or an argparse script's options by subcommand (its main() stopped at parse_args).
FLAGS_OF_SCRIPTS = """
import argparse, json, runpy, sys
from absl import flags

class Parsed(Exception):
  pass

def options(parser):
  return sorted(o.lstrip("-") for o in parser._option_string_actions)

def stop(parser, *args, **kwargs):
  raise Parsed(parser)

argparse.ArgumentParser.parse_args = stop
names = {}
base = set(flags.FLAGS)
for path in sys.argv[1:]:
  before = set(flags.FLAGS)
  module = runpy.run_path(path, run_name="agejax_docs_check")
  defined = set(flags.FLAGS) - base
  if defined:
    booleans = {f"no{n}" for n in defined if isinstance(flags.FLAGS[n], flags.BooleanFlag)}
    names[path] = {"": sorted(defined | booleans)}
  else:
    try:
      module["main"]()
    except Parsed as parsed:
      parser = parsed.args[0]
      names[path] = {"": options(parser)}
      for action in parser._subparsers._group_actions if parser._subparsers else []:
        names[path] |= {name: options(sub) for name, sub in action.choices.items()}
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)  # the next script may define the same name
print(json.dumps(names))
"""


def bash_commands(page: Path) -> list[tuple[int, list[str]]]:
  """(line number, tokens) of every command in PAGE's bash blocks, `\\` continuations joined, comments dropped."""
  commands, block, start, pending = [], False, 0, ""
  for number, line in enumerate(page.read_text().splitlines(), 1):
    if line.startswith("```"):
      block = line.strip() in ("```bash", "```sh", "```shell") if not block else False
      continue
    if not block:
      continue
    if not pending:
      start = number
    pending += line
    if pending.endswith("\\"):
      pending = pending[:-1] + " "
      continue
    try:
      commands.append((start, shlex.split(pending, comments=True)))
    except ValueError:  # an unbalanced quote spans lines (a heredoc's body): not a script's command line
      pass
    pending = ""
  return commands


def script_calls(tokens: list[str]) -> list[tuple[str, list[str]]]:
  """(script name, its arguments up to a shell operator) for each `python scripts/NAME.py` in TOKENS."""
  calls = []
  for i, token in enumerate(tokens):
    if " " in token and "scripts/" in token:  # a command inside a quoted argument (gcloud --command="...")
      calls += script_calls(shlex.split(token, comments=True))
    elif re.fullmatch(r"scripts/\w+\.py", token) and i and re.fullmatch(r"(.*/)?python3?", tokens[i - 1]):
      args = []
      for arg in tokens[i + 1 :]:
        if arg in SHELL_OPERATORS or arg.startswith(("2>", ">")):
          break
        args.append(arg)
      calls.append((token, args))
  return calls


def documented_calls() -> list[tuple[str, str, list[str]]]:
  """(page:line, script, arguments) for every script call the pages print."""
  return [
    (f"{page.relative_to(ROOT)}:{number}", script, args)
    for page in PAGES
    for number, tokens in bash_commands(page)
    for script, args in script_calls(tokens)
  ]


def config_key_exists(config, dotted: str) -> bool:
  """Whether `a.b.c` names a field of the ConfigDict CONFIG."""
  node = config
  for part in dotted.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


@pytest.fixture(scope="module")
def calls() -> list[tuple[str, str, list[str]]]:
  return documented_calls()


def test_the_pages_print_script_commands_to_check(calls):
  """The reader finds every script: a change that hid the commands from this test would leave nothing checked."""
  scripts = {script for _, script, _ in calls}
  assert len(calls) >= 60 and {"scripts/train.py", "scripts/evaluate.py", "scripts/serve.py"} <= scripts, scripts


@pytest.mark.slow
def test_every_documented_flag_is_one_its_script_defines(calls):
  scripts = sorted({script for _, script, _ in calls})
  missing = [f"{where}: {script} does not exist" for where, script, _ in calls if not (ROOT / script).exists()]
  assert not missing, "\n".join(missing)
  proc = subprocess.run(
    [sys.executable, "-c", FLAGS_OF_SCRIPTS, *scripts], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  defined = json.loads(proc.stdout.strip().splitlines()[-1])
  unknown = []
  for where, script, args in calls:
    command = args[0] if args and args[0] in defined[script] else ""  # an argparse subcommand
    known = set(defined[script][command]) | set(defined[script][""]) | {"help", "helpfull"}
    for arg in args:
      name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
      if name and name.split(".")[0] not in known:
        unknown.append(f"{where}: {script} {command} has no flag --{name}".replace("  ", " "))
  assert not unknown, "\n".join(unknown)


def test_every_documented_config_builds_and_its_overrides_name_its_keys(calls):
  problems, checked = [], 0
  for where, _, args in calls:
    config, overrides = None, []
    for i, arg in enumerate(args):
      spec = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg.removeprefix("--config=")
      if (arg == "--config" or arg.startswith("--config=")) and spec.startswith("configs/"):
        file, _, option = spec.partition(":")
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        config = module.get_config(option) if option else module.get_config()
        checked += 1
      elif arg.startswith("--config."):
        overrides.append(arg[len("--config.") :].split("=", 1)[0])
    problems += [
      f"{where}: no key {key} in the config" for key in overrides if config and not config_key_exists(config, key)
    ]
  assert checked >= 10 and not problems, "\n".join(problems)


def test_the_readme_test_command_is_the_one_ci_runs():
  """`.ci/run` runs exactly the README's test command, and the quick start prints the same two commands."""
  readme, quickstart = (ROOT / "README.md").read_text(), (ROOT / "docs/guides/quickstart.md").read_text()
  test_command = re.search(r"^pip install -r requirements-dev\.txt && .*$", readme, re.M)
  train_command = re.search(r"^pip install -r requirements\.txt && python scripts/train\.py .*$", readme, re.M)
  assert test_command and train_command, "README.md lost one of its two commands"
  assert (ROOT / ".ci/run").read_text().rstrip().splitlines()[-1] == test_command.group(0)
  assert test_command.group(0) in quickstart and train_command.group(0) in quickstart


def test_the_readme_stays_a_front_door():
  """Under 250 lines: the guides live on the site (docs/)."""
  assert len((ROOT / "README.md").read_text().splitlines()) < 250


def heading_anchors(page: Path) -> set[str]:
  """The anchors of PAGE's headings as the site (Python-Markdown's toc) and GitHub spell them."""
  anchors, block = set(), False
  for line in page.read_text().splitlines():
    block = block != line.startswith("```")
    if not block and re.match(r"#{1,6} ", line):
      title = re.sub(r"[^\w\s-]", "", line.lstrip("#").strip()).lower()
      anchors.add(re.sub(r"[-\s]+", "-", title))
  return anchors


def test_the_readmes_links_reach_pages_and_headings_that_exist():
  """The site's build checks its own links (mkdocs --strict); the README is outside it, so it is checked here."""
  broken = []
  for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text()):
    if re.match(r"[a-z]+:", target):
      continue
    path, _, anchor = target.partition("#")
    if not (ROOT / path).exists() or (anchor and anchor not in heading_anchors(ROOT / path)):
      broken.append(target)
  assert not broken, broken


def audit_catchers() -> list[str]:
  """The test ids docs/testing.md's audit table names as catching each planted bug (`::name` continues a file)."""
  text = (ROOT / "docs/testing.md").read_text()
  table = text.split("## The audit's bugs, and the tests that catch them", 1)[1].split("\n## ", 1)[0]
  ids = []
  for row in table.splitlines():
    if not row.startswith("| ") or row.startswith(("| bug", "| ---")):
      continue
    file = ""
    for item in re.findall(r"`([^`]*::[^`]*)`", row.rsplit(" | ", 1)[1]):
      file = item.split("::")[0] or file
      ids.append(f"tests/{file}::{item.split('::', 1)[1]}")
  return ids


@pytest.mark.slow
def test_the_fast_tier_runs_every_test_that_catches_an_audit_bug():
  """`pytest -m "not slow"` collects each test docs/testing.md names for a planted bug."""
  catchers = audit_catchers()
  assert len(catchers) >= 10, catchers
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p", "no:cacheprovider", *catchers],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  collected = set(proc.stdout.split())
  assert not [c for c in catchers if c not in collected], proc.stdout[-3000:] + proc.stderr[-3000:]
