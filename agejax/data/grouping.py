"""The groupings of a prepared dataset (gender, race, ...): names in code order, and int32 codes of feature values.

Light on purpose (NumPy only): the array cache and the streaming reader both code groups with it.
"""

import numpy as np

UNKNOWN = "unknown"  # builders.UNKNOWN (not imported: that module needs TFDS)


def group_names(builder) -> dict[str, tuple[str, ...]]:
  """Returns a builder's groupings, {grouping: names in code order}; {} for a builder without any."""
  method = getattr(builder, "group_names", None)
  return {name: tuple(names) for name, names in method().items()} if method else {}


def group_codes(values: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
  """Returns the int32 codes of a batch of one grouping's feature values: class labels, or texts by name.

  An empty text is "unknown"; a text that is not among the names is a bug in the builder (it raises).
  """
  if values.dtype.kind in "iu":
    codes = values.astype(np.int32)
  else:
    index = {name: code for code, name in enumerate(names)}
    texts = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    try:
      codes = np.array([index[t or UNKNOWN] for t in texts], np.int32)
    except KeyError as e:
      raise RuntimeError(f"group {e.args[0]!r} is not one of the recorded names {names}") from None
  if codes.size and (codes.min() < 0 or codes.max() >= len(names)):
    raise RuntimeError(f"group codes {sorted(set(codes.tolist()))} are not all codes of {names}")
  return codes
