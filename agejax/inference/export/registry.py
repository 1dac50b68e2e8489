"""The formats an export writes, by name: each its entry in the export folder and its writer.

A format is a module with a writer, `write(traced, target) -> None or why it wrote nothing`, given
the traced function (`jax_export.Traced`) and the path of its entry inside the staging folder, and
a line below. The order of the lines is the order an export writes them and its manifest's `files`
lists them. model.jax comes first: it is what `ExportedPredictor` runs.
"""

import dataclasses
from collections.abc import Callable

from agejax import errors
from agejax.inference.export import jax_export, onnx, savedmodel, triton


@dataclasses.dataclass  # not frozen: a caller may replace a writer (a test, a disk that fills)
class Format:
  """One format: the manifest's `files` key, its file or folder in the export, its writer and its tools' check."""

  name: str  # the manifest's `files` key; export_workdir's keyword of the same name skips it (saved_model=False)
  entry: str  # its file or folder in the export folder
  write: Callable[[jax_export.Traced, str], str | None]  # None, or why it wrote nothing (the manifest's NAME_skipped)
  prepare: Callable[[], object] | None = None  # raises, before any work, when the format's tools are missing


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
  """Adds a format under its name (after those registered before it); returns it."""
  if fmt.name in _REGISTRY and _REGISTRY[fmt.name].write.__module__ != fmt.write.__module__:
    raise ValueError(
      f"an export format named {fmt.name!r} is already registered by {_REGISTRY[fmt.name].write.__module__}"
    )
  _REGISTRY[fmt.name] = fmt
  return fmt


def names() -> tuple[str, ...]:
  """The registered formats' names, in the order an export writes them."""
  return tuple(_REGISTRY)


def formats() -> tuple[Format, ...]:
  """The registered formats, in the order an export writes them."""
  return tuple(_REGISTRY.values())


def get(name: str) -> Format:
  """The format registered as `name`, or a one-line error listing the known ones."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise errors.UserError(f"{name!r} is not a registered export format ({', '.join(names())})") from None


register(Format("jax", jax_export.MODEL_FILE, jax_export.write))
register(Format("saved_model", savedmodel.SAVED_MODEL_DIR, savedmodel.write, prepare=savedmodel.tools))
register(Format("onnx", onnx.ONNX_FILE, onnx.write))
register(Format("triton", triton.TRITON_DIR, triton.write))  # after onnx: it copies model.onnx
