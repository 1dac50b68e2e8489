"""One trainer per workdir: a second one fails in one line naming the first, which finishes intact."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import cpu_env, start_processes, train_command

from agejax import storage
from agejax.training import workdir_lock

SHORT = ("--config.num_train_steps=20", "--config.eval_every_steps=10", "--config.checkpoint_every_steps=10")


def busy_message(workdir, holder: dict) -> str:
  return (
    f"error: workdir {workdir} is in use by another run: pid {holder['pid']} on {holder['host']} since "
    f"{holder['since']} (lock {workdir / workdir_lock.LOCK_FILE}); wait for it to end or stop it, or use another "
    f"workdir"
  )


def assert_intact_run(workdir, seed: int) -> None:
  """The workdir holds exactly one finished run with `seed`, and its lock is gone."""
  assert json.loads((workdir / "config.json").read_text())["seed"] == seed
  assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 20
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer: the first run's
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_trainer_fails_in_one_line_naming_the_first_which_finishes_intact(
  compilation_cache, data_dir, tmp_path
):
  workdir, cache = tmp_path / "run", tmp_path / "second_cache"
  cache.mkdir()
  first = subprocess.Popen(
    train_command(workdir, *SHORT, data_dir=data_dir, cache=compilation_cache),
    env=cpu_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    lock = workdir / workdir_lock.LOCK_FILE
    while not (lock.exists() and lock.read_text().endswith("\n")):  # the first holds the lock
      assert first.poll() is None, first.communicate()[1][-3000:]
      time.sleep(0.05)
    holder = json.loads(lock.read_text())
    second = subprocess.run(
      train_command(workdir, *SHORT, "--config.seed=1", data_dir=data_dir, cache=str(cache)),
      env=cpu_env(),
      capture_output=True,
      text=True,
      timeout=300,
    )
    out, err = first.communicate(timeout=600)
  finally:
    first.kill()
  assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
  assert second.returncode == 1 and second.stderr.strip().splitlines()[-1] == busy_message(workdir, holder)
  assert not list(cache.iterdir())  # the second compiled nothing
  assert first.returncode == 0, err[-3000:]
  assert_intact_run(workdir, seed=0)


@pytest.mark.slow
def test_two_trainers_started_at_the_same_instant_leave_one_intact_run(compilation_cache, data_dir, tmp_path):
  """Two whole trainers started together: one run, intact, and one line from the other naming it.

  The loser's message names the winner's pid, so the two did overlap (the loser met the lock while
  the winner held it). Whether they reached the lock in the same millisecond depends on start-up;
  test_processes_released_by_a_barrier_race_for_the_lock makes that race certain.
  """
  workdir = tmp_path / "run"
  procs = {
    seed: subprocess.Popen(
      train_command(workdir, *SHORT, f"--config.seed={seed}", data_dir=data_dir, cache=compilation_cache),
      env=cpu_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for seed in (0, 1)
  }
  try:
    outputs = {seed: p.communicate(timeout=600) for seed, p in procs.items()}
  finally:
    for p in procs.values():
      p.kill()
  [winner] = [seed for seed, p in procs.items() if p.returncode == 0]
  [loser] = [seed for seed, p in procs.items() if p.returncode != 0]
  last = outputs[loser][1].strip().splitlines()[-1]
  assert last.startswith(
    f"error: workdir {workdir} is in use by another run: pid {procs[winner].pid} on {socket.gethostname()} since "
  ), outputs[loser][1][-3000:]
  assert_intact_run(workdir, seed=winner)


# A racer: waits at a barrier (every racer's ready file, then GO), tries the lock, reports, and a winner
# holds it until RELEASE appears.
RACER = """
import os, sys, time
from agejax.training import workdir_lock
workdir, barrier, index, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
open(os.path.join(barrier, "ready" + index), "w").close()
while not os.path.exists(os.path.join(barrier, "GO")):
  time.sleep(0.001)
tried = time.monotonic()
try:
  lock = workdir_lock.WorkdirLock(workdir).acquire()
except workdir_lock.WorkdirBusy as e:
  print("busy", tried, str(e), flush=True)
  sys.exit(0)
print("won", tried, flush=True)
while not os.path.exists(os.path.join(barrier, "RELEASE")):
  time.sleep(0.01)
lock.release()
"""


@pytest.mark.slow
def test_processes_released_by_a_barrier_race_for_the_lock_and_exactly_one_wins(tmp_path):
  workdir, barrier, count = tmp_path / "run", tmp_path / "barrier", 4
  workdir.mkdir()
  barrier.mkdir()
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", RACER, str(workdir), str(barrier), str(i), str(count)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(count)
  ]
  try:
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready*"))) < count:  # every racer imported agejax and waits at the barrier
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
      time.sleep(0.01)
    (barrier / "GO").touch()
    while sum(p.poll() is not None for p in procs) < count - 1:  # the losers report and exit; the winner holds
      assert time.monotonic() < deadline
      time.sleep(0.01)
    (barrier / "RELEASE").touch()
    outputs = [p.communicate(timeout=60) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), outputs
  reports = [out.split(" ", 2) for out, _ in outputs]
  [winner] = [procs[i].pid for i, r in enumerate(reports) if r[0] == "won"]
  losers = [r for r in reports if r[0] == "busy"]
  assert len(losers) == count - 1
  for _, _, message in losers:
    assert message.startswith(f"workdir {workdir} is in use by another run: pid {winner} on "), message
  tried = [float(r[1]) for r in reports]
  # Released together: all tried within a moment of each other, while the winner held the lock.
  assert max(tried) - min(tried) < 0.5, tried
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def test_a_lock_is_released_on_errors_and_leftover_temporaries_of_dead_writers_are_removed(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  dead_pid = int(dead.stdout)  # a process that has exited
  (workdir / f".config.json.tmp{dead_pid}").write_text("{")  # a write its process never finished
  alive = workdir / f".final_metrics.json.tmp{os.getpid()}"  # still being written by a live process
  alive.write_text("{")
  (workdir / "notes.tmp1").write_text("mine")  # not write_text's pattern
  with workdir_lock.WorkdirLock(workdir) as lock:
    assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"is in use by another run: pid {os.getpid()} on "):
      workdir_lock.WorkdirLock(workdir).acquire()  # a second lock, even in the same process
    removed = storage.remove_interrupted_writes(workdir)
    lock.check()  # a local lock cannot be lost
  assert [p.name for p in removed] == [f".config.json.tmp{dead_pid}"]
  assert sorted(p.name for p in workdir.iterdir()) == [alive.name, "notes.tmp1"]  # and the lock file is gone
  with pytest.raises(RuntimeError, match="boom"):
    with workdir_lock.WorkdirLock(workdir):
      raise RuntimeError("boom")
  workdir_lock.WorkdirLock(workdir).acquire().release()  # released by the error


@pytest.mark.slow
def test_a_lock_file_left_by_a_killed_holder_is_taken_over_with_a_warning(tmp_path, caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time\nfrom agejax.training import workdir_lock\n"
      "workdir_lock.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
      str(workdir),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(workdir_lock.WorkdirBusy):
      workdir_lock.WorkdirLock(workdir).acquire()
  finally:
    holder.kill()  # no release: the file stays, the kernel drops the flock
    holder.wait()
  left = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
  assert left["pid"] == holder.pid
  with workdir_lock.WorkdirLock(workdir):
    assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert (
    f"the previous run, pid {holder.pid} on {left['host']} since {left['since']}, ended without releasing "
    f"its lock (killed?); taking it over"
  ) in caplog.text


@pytest.mark.slow
def test_with_two_processes_both_fail_in_one_line_when_the_workdir_is_busy(compilation_cache, data_dir, tmp_path):
  """Process 0 takes the lock for the run; the other learns that it failed instead of waiting for it."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  with workdir_lock.WorkdirLock(workdir) as lock:
    procs = start_processes(workdir, *SHORT, data_dir=data_dir, cache=compilation_cache)
    try:
      outputs = [p.communicate(timeout=300) for p in procs]
    finally:
      for p in procs:
        p.kill()
    holder = lock.holder
  assert [p.returncode for p in procs] == [1, 1], outputs[0][1][-2000:] + outputs[1][1][-2000:]
  assert outputs[0][1].strip().splitlines()[-1] == busy_message(workdir, holder)
  assert outputs[1][1].strip().splitlines()[-1] == (
    f"error: workdir {workdir}: process 0 could not take its lock (see its error)"
  )
  assert sorted(p.name for p in workdir.iterdir()) == []  # nothing written; the test's lock is released


@pytest.mark.slow
def test_sigterm_while_starting_up_exits_0_and_releases_the_lock(data_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    train_command(workdir, *SHORT, data_dir=data_dir, cache=str(tmp_path / "cache")),
    env=cpu_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    while not (workdir / workdir_lock.LOCK_FILE).exists():  # from here the run holds the workdir
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # data, model and a cold compile are still ahead
    out, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  # Almost always before the loop; should the signal come late, the loop saves its first step instead.
  assert (
    f"stopped by SIGTERM before training started: nothing to save in {workdir}" in out
    or "preempted: saved checkpoint at step 1 " in out
  ), out[-2000:]
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
