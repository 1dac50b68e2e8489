"""Serving a trained model over HTTP: the app, its dynamic batcher, and how scripts/serve.py runs it.

`app.create_app` builds the Starlette app (POST /v1/predict, the page at /, /healthz, /metrics);
`batcher.Batcher` gathers faces from concurrent requests into padded, precompiled model calls;
`limits.Scheduler` starts decodes fairly across requests within a byte budget; `guard` counts and
times requests for Prometheus and enforces the body's size and time limits; `loading.load_model`
restores a workdir's checkpoint or an export to serve; `runner.run` serves an app with uvicorn until
SIGTERM or Ctrl-C, finishing the requests in flight. `local` starts scripts/serve.py on a free
loopback port, and `agejax.benchmarks.serving` measures it (tests, benchmark.py serve).
"""

from agejax.serving.loading import load_model
from agejax.serving.runner import bind, config, run

__all__ = ["bind", "config", "load_model", "run"]
