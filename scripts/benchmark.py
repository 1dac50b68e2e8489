"""Benchmarks: python scripts/benchmark.py {train,torch,loop,startup,input,serve,statistics} [options].

Each mode prints a human table, then last a single JSON line (a list when several configs ran).
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for configs/


def default_config(variant: str | None = None):
  """configs/vgg16_kl.py's config (a variant of it); needs only ml_collections."""
  try:
    from configs import vgg16_kl
  except ModuleNotFoundError as e:
    raise SystemExit(
      f"benchmark: configs/vgg16_kl.py needs the {e.name!r} package (pip install ml-collections)"
    ) from None
  return vgg16_kl.get_config(variant)


def table(rows: list[dict], keys: list[str]) -> str:
  """Formats result dicts as an aligned text table."""

  def fmt(v):
    if isinstance(v, int | float) and not isinstance(v, bool) and abs(v) >= 1000:
      return f"{v:,.0f}"  # 67,683, not 6.768e+04
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

  cells = [keys] + [[fmt(r.get(k)) for k in keys] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


TRAIN_KEYS = [
  "framework",
  "device",
  "batch",
  "dtype",
  "image_size",
  "images_per_s",
  "step_ms_median",
  "step_ms_min",
  "step_ms_max",
  "compile_s",
  "mfu",
  "mfu_matmul",
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  sub = parser.add_subparsers(dest="mode", required=True)
  for mode in ("train", "torch"):
    p = sub.add_parser(
      mode,
      help="the jitted JAX train step's images/s and MFU"
      if mode == "train"
      else "the JAX train step beside PyTorch eager and torch.compile on the same model",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[64])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--model", default="vgg16", help="backbone (config.model.name)")
    p.add_argument("--width", type=float, default=1.0, help="the backbone's width multiplier")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    if mode == "torch":
      p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
      p.add_argument(
        "--compile-at",
        choices=["all", "best"],
        default="all",
        help="torch.compile at every batch, or only where PyTorch eager was fastest",
      )
  p = sub.add_parser("loop", help="the whole train loop's steps/s against the bare step's (the loop's overhead)")
  p.add_argument("--config", default="tiny", help="variant of configs/vgg16_kl.py")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--log-every", type=int, default=100)
  p.add_argument("--checkpoint-every", type=int, default=1000)
  p.add_argument("--data_dir", default="")
  p.add_argument(
    "--compilation_cache_dir",
    default=None,
    help="JAX persistent compilation cache ('' disables it; default: the config's)",
  )
  p = sub.add_parser("startup", help="time to the first step with a cold, then a warm, compilation cache")
  p.add_argument("--config", default="demo", help="variant of configs/vgg16_kl.py")
  p.add_argument("--data_dir", default="")
  p = sub.add_parser(
    "input", help="the input pipeline's images/s from a prepared dataset: its array cache, or Grain over ArrayRecord"
  )
  p.add_argument("--dataset", required=True)
  p.add_argument("--data_dir", default="")
  p.add_argument("--builder_config", default="")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--reader", default="cache", choices=["cache", "grain"], help="data.reader: the cache or Grain")
  p.add_argument("--grain_workers", type=int, default=2, help="Grain's decoding processes (0: in this process)")
  p.add_argument("--split", default="", help="data.split: a fae dataset's benchmark split (0-4 or a spec)")
  p.add_argument("--cache_dir", default="", help="data.cache_dir (default: the config's)")
  p = sub.add_parser("statistics", help="simulations where the truth is known: coverage and the group-gap test")
  p.add_argument("--coverage_repeats", type=int, default=10, help="validation/test draws of the coverage-by-age case")
  p.add_argument("--coverage_test_faces", type=int, default=20_000, help="test faces per coverage-by-age draw")
  p.add_argument("--simulations", type=int, default=10_000, help="simulations of each equal-MAE gap scenario")
  p.add_argument("--power_simulations", type=int, default=2000, help="simulations with a real 1-year gap")
  p.add_argument("--resamples", type=int, default=200, help="bootstrap replicates per gap test (the report's: 1000)")
  p = sub.add_parser(
    "serve", help="scripts/serve.py on loopback: requests/s and latency, batching on and off, or by --protocol"
  )
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--workdir", help="training workdir to serve")
  model.add_argument("--export", help="export folder to serve (scripts/export.py)")
  p.add_argument(
    "--concurrency", type=int, nargs="+", help="numbers of concurrent clients (default: 1 8 32; with --protocol: 1 32)"
  )
  p.add_argument(
    "--protocol",
    default="v1",
    help="comma list of v1, oip-http, oip-grpc: one server (batching on), measured over each in turn on the same "
    "faces (OIP: tritonclient's clients, photos as BYTES and crops as UINT8); default: v1 only, batching on and off",
  )
  p.add_argument("--requests", type=int, default=1000, help="requests per measurement")
  p.add_argument("--max_seconds", type=float, default=20.0, help="longest measurement")
  p.add_argument("--max_batch", type=int, default=32, help="the server's --max_batch with batching on")
  p.add_argument("--max_wait_ms", type=float, default=5.0, help="the server's --max_wait_ms with batching on")
  p.add_argument("--photo", help="send this photo (faces detected) instead of drawn face crops (aligned=true)")
  p.add_argument(
    "--hostile",
    action="store_true",
    help="instead: normal clients' latency alone and beside a client sending the 64-PNG request in a loop",
  )
  p.add_argument("--hostile_side", type=int, default=2000, help="side of the hostile request's grey PNGs")
  p.add_argument(
    "--bombs",
    type=int,
    metavar="SIDE",
    help="instead: issue 24's four decompression bombs at SIDE x SIDE pixels and issue 35's hostile inputs, "
    "the peak and kept memory of the server and its decode workers",
  )
  p.add_argument(
    "--cost",
    action="store_true",
    help="instead: one client's --requests in a row, the wall and CPU ms a request of the server and its workers",
  )
  p.add_argument("--server_flags", default="", help='more flags for serve.py, e.g. "--max_pixels=200e6"')
  p.add_argument("--serve_script", default=str(ROOT / "scripts" / "serve.py"), help="the serve.py to measure")
  args = parser.parse_args()

  if args.mode == "torch":
    # JAX would otherwise take 75% of the GPU up front and leave PyTorch too little at large batches.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from agejax import errors
  from agejax.benchmarks import jax_step, runs, torch_baseline

  if args.mode in ("train", "torch"):
    print("environment:", json.dumps(jax_step.environment()))
    torch_modes = "none" if args.mode == "train" else ("eager" if args.no_compile else "eager+compile")
    base = default_config()
    base.model.name = args.model
    rows = torch_baseline.side_by_side(
      base,
      args.batch,
      args.dtype,
      args.image_size,
      args.steps,
      args.repeats,
      args.width,
      torch_modes=torch_modes,
      compile_at=getattr(args, "compile_at", "all"),
    )
    print(table(rows, TRAIN_KEYS + (["jax_speedup"] if args.mode == "torch" else [])))
    best = jax_step.best_of(rows)
    print("best:", ", ".join(f"{k} {r['images_per_s']:.1f} images/s at batch {r['batch']}" for k, r in best.items()))
    if len(best) > 1:
      jax_best = best["jax"]["images_per_s"]
      print(
        "jax best / best:", ", ".join(f"{k} {jax_best / r['images_per_s']:.3f}" for k, r in best.items() if k != "jax")
      )
    print(json.dumps(rows if len(rows) > 1 else rows[0]))
  elif args.mode == "loop":
    config = default_config(args.config)
    config.data.data_dir = args.data_dir
    if args.compilation_cache_dir is not None:
      config.compilation_cache_dir = args.compilation_cache_dir
    config.eval_every_steps = args.steps  # evaluate once, at the end, outside the timed window
    config.log_every_steps, config.checkpoint_every_steps = args.log_every, args.checkpoint_every
    with tempfile.TemporaryDirectory() as workdir:
      row = runs.loop(config, workdir, args.steps)
    print(table([row], ["loop_steps_per_s", "bare_steps_per_s", "ratio", "batch"]))
    print(json.dumps(row))
  elif args.mode == "serve":
    from agejax.benchmarks import serving as serve_benchmark

    model_flags = ["--workdir", args.workdir] if args.workdir else ["--export", args.export]
    model_flags += shlex.split(args.server_flags)
    print("environment:", json.dumps(jax_step.environment() | serve_benchmark.versions()))
    if args.bombs:
      try:
        rows = serve_benchmark.bombs(args.serve_script, model_flags, args.bombs)
      except RuntimeError as e:
        sys.exit(f"error: {e}")
      keys = ["bomb", "bytes_sent", "status", "seconds", "idle_mb", "peak_over_idle_mb", "after_over_idle_mb"]
      keys += ["server_peak_over_idle_mb"]
      print(table(rows, [*keys, "normal_status", "normal_s"]))
      print(json.dumps(rows))
      return
    if args.cost:
      try:
        row = serve_benchmark.request_cost(args.serve_script, model_flags, args.photo, args.requests)
      except RuntimeError as e:
        sys.exit(f"error: {e}")
      print(table([row], ["detect", "requests", "errors", "wall_ms", "cpu_ms", "p50_ms", "startup_s", "idle_pss_mb"]))
      print(json.dumps(row))
      return
    if args.hostile:
      try:
        rows = serve_benchmark.hostile_neighbour(
          args.serve_script,
          model_flags,
          concurrency=(args.concurrency or [1])[0],
          requests=args.requests,
          max_seconds=args.max_seconds,
          hostile_side=args.hostile_side,
          photo=args.photo,
        )
      except RuntimeError as e:
        sys.exit(f"error: {e}")
      keys = ["neighbour", "concurrency", "requests", "errors", "requests_per_s", "p50_ms", "p95_ms", "max_ms"]
      print(table(rows, [*keys, "hostile_requests"]))
      print(json.dumps(rows))
      return
    try:
      protocols = serve_benchmark.parse_protocols(args.protocol)
    except ValueError as e:
      sys.exit(f"error: {e}")
    if protocols != ["v1"]:
      try:
        rows = serve_benchmark.serve_protocols(
          args.serve_script,
          model_flags,
          protocols,
          concurrency=args.concurrency or [1, 32],
          requests=args.requests,
          max_seconds=args.max_seconds,
          max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms,
          photo=args.photo,
        )
      except RuntimeError as e:  # tritonclient missing, or the server did not start: one line says why
        sys.exit(f"error: {e}")
      keys = ["protocol", "input", "concurrency", "requests", "errors", "wrong", "requests_per_s", "p50_ms", "p95_ms"]
      print(table(rows, [*keys, "server_mean_ms", "mean_batch", "client_cpu_ms", "server_cpu_ms"]))
      print(
        f"(clients and server share this machine's {os.cpu_count()} cores: client_cpu_ms is this process's CPU a "
        f"request, server_cpu_ms the server's and its workers'; wrong: ages not /v1/predict's to "
        f"{serve_benchmark.AGE_TOLERANCE:g} years)"
      )
      print(json.dumps(rows))
      return
    try:
      rows = serve_benchmark.serve(
        args.serve_script,
        model_flags,
        concurrency=args.concurrency or [1, 8, 32],
        requests=args.requests,
        max_seconds=args.max_seconds,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        photo=args.photo,
      )
    except RuntimeError as e:  # the server did not start: its log's last lines say why
      sys.exit(f"error: {e}")
    keys = ["batching", "concurrency", "requests", "errors", "requests_per_s", "p50_ms", "p95_ms"]
    keys += ["server_p50_ms", "server_p95_ms", "mean_batch"]
    print(table(rows, keys))
    print(json.dumps(rows))
  elif args.mode == "statistics":
    from agejax.benchmarks import statistics

    rows = [{"sigma": sigma, **statistics.coverage(sigma)} for sigma in (1.0, 2.0)]
    print(table(rows, ["sigma", "0.5", "0.8", "0.9", "0.95"]))
    gaps = [
      statistics.gap_test(s, 0.0, args.simulations, seed=i, resamples=args.resamples)
      for i, s in enumerate(statistics.GAP_SCENARIOS)
    ]
    gaps += [
      statistics.gap_test(s, 1.0, args.power_simulations, seed=100 + i, resamples=args.resamples)
      for i, s in enumerate(statistics.POWER_SCENARIOS)
    ]
    keys = ["scenario", "shapes", "shift_years", "simulations", "resamples", "flag_rate", "flag_rate_se", "mean_gap"]
    print(table(gaps, [*keys, "interval_miss_rate"]))
    by_age = statistics.coverage_by_age(n_test=args.coverage_test_faces, repeats=args.coverage_repeats)
    ages = [
      {"interval": name, **{b: f"{v['mean']:.3f} ± {v['std']:.3f}" for b, v in by_age[name].items()}}
      for name in ("one_temperature", "adjusted_by_bucket")
    ]
    print(table(ages, ["interval", *by_age["adjusted_by_bucket"]]))
    print(json.dumps({"mode": "statistics", "coverage": rows, "gap_test": gaps, "coverage_by_age": by_age}))
  elif args.mode == "startup":
    row = runs.startup(
      default_config(args.config),
      str(ROOT / "configs" / "vgg16_kl.py"),
      args.config,
      str(ROOT / "scripts" / "train.py"),
      args.data_dir,
    )
    print(
      table([row], ["config", "cold_first_step_s", "warm_first_step_s", "ratio", "cold_process_s", "warm_process_s"])
    )
    print(json.dumps(row))
  else:
    try:
      row = runs.input_pipeline(
        args.dataset,
        args.data_dir,
        args.builder_config,
        args.batch,
        args.batches,
        reader=args.reader,
        grain_workers=args.grain_workers,
        data_split=args.split,
        cache_dir=args.cache_dir,
      )
    except errors.UserError as e:  # unknown or unprepared dataset, or not ArrayRecord for grain: one line
      sys.exit(f"error: {e}")
    keys = ["dataset", "reader", "grain_workers", "examples", "image_shape", "batch", "images_per_s"]
    print(table([row], [*keys, "images_per_s_per_core", "cores", "cpu_s", "images_per_cpu_s"]))
    if args.reader == "cache":
      print("(the gather runs in one thread: images_per_s_per_core is the single-thread rate)")
    else:
      print("(Grain decodes in grain_workers processes, at least 1 core: images_per_s_per_core is the rate over them)")
    print("(images_per_cpu_s: images per CPU second of this process and its workers, whatever else the machine runs)")
    print(json.dumps(row))


if __name__ == "__main__":
  main()
