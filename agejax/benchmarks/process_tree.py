"""Wall time and peak memory of a command with all its child processes (Beam's workers, Grain's).

python -m agejax.benchmarks.process_tree [--interval 0.5] -- COMMAND ARGS...

`/usr/bin/time -v` reports the largest single process's max RSS, which misses a pipeline spread over
worker processes. This samples the command's whole process tree (psutil) every `--interval` seconds and
reports the peak of the sum of the processes' RSS (pages shared between processes counted once per
process: an upper bound) and of their PSS (shared pages split between their sharers: the tree's real
footprint), and the peak process count. Peaks between samples are missed. `cpu_s` is the user + system
CPU time of the command and every descendant that was waited for (getrusage RUSAGE_CHILDREN), and
`max_single_rss_mb` the largest one process reached (what `/usr/bin/time -v` says). The last line is JSON.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil


def measure(command: list[str], interval: float = 0.5) -> dict:
  """Runs `command`, sampling its process tree; returns wall_s, peak_rss_sum_mb, peak_pss_sum_mb, peak_processes."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  child = subprocess.Popen(command)
  root = psutil.Process(child.pid)
  peak_rss = peak_pss = peak_procs = 0
  while child.poll() is None:
    rss = pss = 0
    try:
      procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
      break
    for p in procs:
      try:
        info = p.memory_full_info()
      except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        continue
      rss += info.rss
      pss += getattr(info, "pss", info.rss)
    peak_rss, peak_pss, peak_procs = max(peak_rss, rss), max(peak_pss, pss), max(peak_procs, len(procs))
    time.sleep(interval)
  code = child.wait()
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {
    "returncode": code,
    "wall_s": wall,
    "cpu_s": cpu,
    "max_single_rss_mb": after.ru_maxrss / 1024,
    "peak_rss_sum_mb": peak_rss / 2**20,
    "peak_pss_sum_mb": peak_pss / 2**20,
    "peak_processes": peak_procs,
    "interval_s": interval,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--interval", type=float, default=0.5)
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command given")
  row = measure(command, args.interval)
  print(json.dumps(row))
  sys.exit(row["returncode"])


if __name__ == "__main__":
  main()
