"""SIGTERM during training: a flag the loop checks between steps, so the run saves where it is and exits 0."""

import signal
import threading

import jax


class Stopped(BaseException):
  """SIGTERM before the loop started: nothing to save. A BaseException, so no `except Exception` swallows it."""


class Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (no host sync, no lost work).

  Before the loop (`arm()`), SIGTERM raises Stopped instead: start-up (data, model, restore) can
  take minutes, the run holds the workdir's lock, and there is nothing to save yet.
  Single-process only: with several processes JAX's preemption service owns SIGTERM (it was set up
  by jax.distributed.initialize) and Orbax's `reached_preemption` decides; a Python handler here
  would replace JAX's and the sync point would never be reached.
  """

  def __init__(self):
    self.event = threading.Event()
    self._previous = None
    self._armed = False

  def _handle(self, *_) -> None:
    self.event.set()
    if not self._armed:
      raise Stopped()

  def arm(self) -> None:
    """From now on SIGTERM sets the flag (the loop saves a checkpoint and returns).

    A SIGTERM that came before stops the run here: its Stopped is lost when the signal lands in a
    callback whose exceptions Python ignores (JAX's garbage-collection callback, seen in 3 of 12 runs).
    """
    if self.event.is_set():
      raise Stopped()
    self._armed = True

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def __bool__(self) -> bool:
    return self.event.is_set()
