"""Serving a trained model over HTTP: the app, its dynamic batcher, and how scripts/serve.py runs it.

`app.create_app` builds the Starlette app (POST /v1/predict, the page at /, /healthz, /metrics);
`batcher.Batcher` gathers faces from concurrent requests into padded, precompiled model calls;
`guard` counts and times requests for Prometheus and enforces the body size limit; `run` serves
an app with uvicorn until SIGTERM or Ctrl-C, finishing the requests in flight. `local` starts
scripts/serve.py on a free loopback port and `benchmark` measures it (tests, benchmark.py serve).
"""

import signal

from agejax import errors, storage


def load_model(
  workdir: storage.Location | None,
  export: storage.Location | None,
  checkpoint: str = "best",
  max_batch: int = 32,
  *,
  calibrated: bool = True,
):
  """Restores the model to serve: a training workdir's checkpoint, or an exported model.

  Args:
    workdir: a training workdir (exclusive with `export`).
    export: a folder written by scripts/export.py.
    checkpoint: the workdir's checkpoint: 'best', 'latest' or a step number.
    max_batch: the most faces the server puts in one model call.
    calibrated: apply the workdir's calibration.json temperature (an export has its own baked in).

  Returns:
    An `prediction.Predictor` or an `export.ExportedPredictor`.
  """
  if (workdir is None) == (export is None):
    raise errors.UserError("give exactly one of --workdir DIR (a training workdir) or --export OUT (export.py's)")
  if export is not None:
    if not calibrated:
      raise errors.UserError("--no-calibration applies to --workdir: an export carries its temperature (export.py)")
    from agejax.inference import export as exporting

    return exporting.ExportedPredictor(export, batch_size=max_batch)
  from agejax.inference import prediction

  assert workdir is not None  # exactly one of the two was given, and it is not export
  return prediction.Predictor(workdir, checkpoint, batch_size=max_batch, calibrated=calibrated)


def run(app, host: str, port: int, graceful_timeout_s: float | None = None) -> None:
  """Serves `app` until SIGTERM or Ctrl-C: stops accepting, finishes the requests in flight, returns.

  Args:
    app: the ASGI app.
    host: the address to listen on.
    port: the TCP port.
    graceful_timeout_s: how long to wait for requests in flight after the signal (None: as long as they take).
  """
  import uvicorn

  # uvicorn re-raises the signal it shut down on once it is done; a handler of our own turns that
  # into a normal return, so the process exits 0 after a graceful stop (the default would kill it).
  previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    server = uvicorn.Server(
      uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=graceful_timeout_s,  # type: ignore[arg-type]  # annotated int; a float works
        log_level="info",
      )
    )
    server.run()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if not server.started:
    raise errors.UserError(f"could not serve on {host}:{port} (see the log above: is the port in use?)")
