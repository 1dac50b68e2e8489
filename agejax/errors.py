"""Errors that bad input causes: one-line messages naming the file, key or value. Scripts catch only these."""


class UserError(ValueError):
  """Bad input (a config value, a flag, a file): the message is one line that says what and where."""


class MissingInput(UserError, FileNotFoundError):
  """A file, folder, dataset or checkpoint that the command needs does not exist; the message says how to make it."""


class Diverged(UserError, FloatingPointError):
  """Training reached a non-finite loss or gradient; the message names the step and what to change."""
