"""What every script shares: flags parsed into one-line errors, quiet logs, and `error: ...` for bad input.

Each of scripts/*.py defines its flags and a `main(argv)`, and ends with `cli.run(main)`. A bad
flag or `--config.KEY` override, and any errors.UserError that main raises, end the script with one
line `error: ...` on stderr and exit code 1; a real bug keeps its traceback.

Logs: by default a script shows agejax's own warnings and errors only; TensorFlow's C++ banners and
the libraries' notices (Orbax's "read only" on every restore) are not the user's business. absl's
`--verbosity` brings them back: -1 every library's warnings, 0 info, 1 debug.
"""

import logging as std_logging
import os
import sys
from collections.abc import Callable
from typing import Any

# Before anything imports TensorFlow. Its INFO/WARNING C++ lines go unless the user asked for logs.
# TensorFlow 2.21 prints its oneDNN banner ("oneDNN custom operations are on", twice per import)
# whatever TF_CPP_MIN_LOG_LEVEL says; off, the banner goes and TensorFlow's own ops (TFDS decoding,
# MTCNN) use Eigen: MTCNN found the same box on a 1024-pixel photo in 0.94 s against 0.88 s.
# Set either variable to override.
_VERBOSE_ARGV = any(arg.startswith(("--verbosity", "-v")) for arg in sys.argv[1:])
if not _VERBOSE_ARGV:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402

from agejax import errors  # noqa: E402

# Libraries whose warnings are notices for their developers, not the user (shown with --verbosity).
QUIET_LIBRARIES = ("orbax", "tensorflow_datasets")
VERBOSITY_HELP = (
  "Logging verbosity. Default: agejax's own warnings only; -1: every library's warnings too "
  "(Orbax, TensorFlow's C++ lines); 0: info; 1: debug."
)


def run(main: Callable[[list[str]], Any]) -> None:
  """Runs a script's `main(argv)` under absl: one-line errors for bad flags and UserErrors, logs at WARNING.

  Args:
    main: the script's body; it gets the positional arguments (argv[0] is the script).
  """

  def body(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:  # Orbax, CLU and TFDS are chatty at INFO; -v 0 restores it
      logging.set_verbosity(logging.WARNING)
      logging.get_absl_handler().addFilter(_quiet_libraries)
    try:
      main(argv)
    except errors.UserError as e:
      sys.exit(f"error: {e}")

  flags.FLAGS["verbosity"].help = VERBOSITY_HELP
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["verbosity"])  # listed by the script's --help
  app.run(body, flags_parser=parse_flags)


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
  """A log filter: False (drop) for a QUIET_LIBRARIES warning; their errors and everything else pass."""
  parts = record.pathname.replace(os.sep, "/").split("/")
  return record.levelno >= std_logging.ERROR or not any(name in parts for name in QUIET_LIBRARIES)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flags_parser: a bad flag or `--config` override ends the script in one line.

  ml_collections raises a bare AttributeError/KeyError for an override of a key the config lacks
  (its "did you mean" hint buried in a traceback) and defers a config file it cannot read to the
  first use; both become `error: ...` here.
  """
  argv = [_RENAMED.get(arg, arg) if _renamed_applies(arg) else arg for arg in argv]
  _config_package_on_path(argv)
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:  # absl: unknown flag, bad value; a config file whose get_config raised
    sys.exit(f"error: {_flag_error(str(e))}")
  except (AttributeError, KeyError) as e:  # ml_collections: --config.KEY=... for a KEY the config does not have
    sys.exit(f"error: {_unknown_key(e, argv)}")
  except OSError as e:  # an override of a config file that could not be loaded
    sys.exit(f"error: --config: {_last_line(e)}")
  if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
    try:
      flags.FLAGS["config"].value.keys()  # config_flags keeps a file's load error until the config is used
    except OSError as e:
      sys.exit(f"error: --config: {_last_line(e)}")
  return argv


def _config_package_on_path(argv: list[str]) -> None:
  """Puts the folder above a `--config` file's package (configs/ with an __init__.py) on sys.path.

  A variant config imports the config it varies (`from configs import resnet50_kl`); a script's
  sys.path starts at scripts/, not at the project that holds configs/.
  """
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name in ("--config", "-config"):
      value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
      package = os.path.dirname(os.path.abspath(value.split(":", 1)[0]))
      if os.path.exists(os.path.join(package, "__init__.py")) and os.path.dirname(package) not in sys.path:
        sys.path.append(os.path.dirname(package))
      return


# Spellings the README documented before a flag was renamed: old -> new, kept working for a release.
_RENAMED = {"--no-calibration": "--nocalibration", "--no-calibration=true": "--nocalibration"}
_RENAMED["--no-calibration=false"] = "--calibration"


def _renamed_applies(arg: str) -> bool:
  """True when `arg` is an old spelling and the script defines the new flag (not the old one as its own)."""
  if arg not in _RENAMED:
    return False
  new = _RENAMED[arg].removeprefix("--no").removeprefix("--")
  old = arg.removeprefix("--").split("=", 1)[0]
  return new in flags.FLAGS and old not in flags.FLAGS


CHECKPOINT_CHOICES = "best, latest or a step number"  # what --checkpoint takes (training.checkpointing reads it)


def checkpoint_flag() -> flags.FlagHolder[str]:
  """Defines `--checkpoint` (default best): which checkpoint of the workdir to load."""
  return flags.DEFINE_string("checkpoint", "best", f"Checkpoint: {CHECKPOINT_CHOICES}.", module_name=_caller_module())


def calibration_flag(what: str) -> flags.FlagHolder[bool]:
  """Defines `--calibration` (default on; `--nocalibration`, and the older `--no-calibration`, turn it off).

  Args:
    what: what the raw model is used for without it, e.g. "score the raw model".
  """
  return flags.DEFINE_bool(
    "calibration",
    True,
    f"Apply WORKDIR/calibration.json's temperature when there is one; --nocalibration (or --no-calibration): {what}.",
    module_name=_caller_module(),
  )


def flip_flag(what: str) -> flags.FlagHolder[bool]:
  """Defines `--flip` (default off): average each face's distribution with its mirror image's.

  Args:
    what: where the choice shows, e.g. "recorded in the manifest".
  """
  return flags.DEFINE_bool(
    "flip",
    False,
    "Average each face's distribution with its mirror image's, calibrated by WORKDIR/calibration.json's flip "
    f"temperature and interval masses; {what}.",
    module_name=_caller_module(),
  )


def _caller_module() -> str:
  """The module that called the caller, as absl names it: a flag defined here for a script is listed by its --help.

  absl's --help lists the flags of the main module (named by its path, sys.argv[0]) only.
  """
  name = sys._getframe(2).f_globals.get("__name__", "")
  return sys.argv[0] if name == "__main__" else name


def _last_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _flag_error(message: str) -> str:
  """The first line of a flag error and, for a multi-line one (a traceback, a list of attempts), its last."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  if len(lines) <= 1:
    return lines[0] if lines else "bad flags"
  return f"{lines[0].rstrip(':')}: {lines[-1]}"


def _unknown_key(error: BaseException, argv: list[str]) -> str:
  """'--config.a.b=V: config has no key a.b (did you mean ...?)' from ml_collections' error."""
  text: Any = error
  while isinstance(text, BaseException) and text.args:  # AttributeError(KeyError("'key'\nDid you mean ..."))
    text = text.args[0]
  lines = str(text).splitlines()
  missing = lines[0].strip("'\"") if lines else ""
  hint = next((line.strip() for line in lines[1:] if line.strip()), "")
  hint = f" ({hint[0].lower()}{hint[1:].rstrip('?')}?)" if hint else ""
  for arg in argv[1:]:
    name = arg.split("=", 1)[0].lstrip("-")
    if name.startswith(("config.", "noconfig.")) and missing in name.split(".")[1:]:
      key = name.split(".", 1)[1]
      return f"{arg}: the config has no key {key!r}{hint}"
  return f"the config has no key {missing!r}{hint}"


class ClusterFlags:
  """The flags that join a process to a multi-process run (scripts/train.py, scripts/crossval.py)."""

  def __init__(self):
    module = _caller_module()  # the script's flags: its --help lists them
    self.multihost = flags.DEFINE_bool(
      "multihost", False, "Multi-process run that JAX discovers (TPU VM pods, SLURM).", module_name=module
    )
    self.coordinator = flags.DEFINE_string(
      "coordinator_address", "", "host:port of process 0, for other clusters.", module_name=module
    )
    self.num_processes = flags.DEFINE_integer(
      "num_processes", 0, "Process count, with --coordinator_address.", module_name=module
    )
    self.process_id = flags.DEFINE_integer(
      "process_id", -1, "This process's id, with --coordinator_address.", module_name=module
    )

  def initialize(self) -> None:
    """Starts JAX's distributed runtime as the flags say (nothing for a single process)."""
    from agejax import parallel

    parallel.initialize(
      self.coordinator.value, self.num_processes.value, self.process_id.value, auto=self.multihost.value
    )
