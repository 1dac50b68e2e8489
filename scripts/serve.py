"""Serves a trained model over HTTP: python scripts/serve.py (--workdir DIR | --export OUT) [--host H] [--port P].

POST /v1/predict takes images (multipart field `files`, or JSON {"images": [base64, ...]}; optional
`aligned=true`) and answers the faces' ages as JSON; GET / is a page to drop photos on; GET
/healthz and /readyz (503 while overloaded); GET /metrics (Prometheus). The Open Inference Protocol
(KServe V2, Triton's API) is served beside it under /v2 (model --model_name), and over gRPC on
--grpc_port: photos as BYTES `photos`, or crops as UINT8 `images` (agejax/serving/oip.py). Faces from concurrent
requests share model calls (--max_batch, --max_wait_ms). Uploads are read only in worker processes
(--workers, --aligned_workers), each under a memory limit (--worker_memory_mb) and a CPU limit an
image (--max_cpu_s): a crash or a limit fails that image alone. Only --formats are read (JPEG, PNG,
WebP); images over --max_pixels are refused from their header; decoding shares a byte budget
(--decode_budget_mb); a photo answers at most --max_faces faces; work that can't start within
--queue_timeout_s gets 503 with Retry-After. SIGTERM or Ctrl-C (also while the model
loads) stops accepting, finishes the requests in flight and exits 0. --flip averages each face
with its mirror image, calibrated by calibration.json's flip temperature; an export predicts as it
was exported (export.py --flip). /healthz reports `flip`, the `temperature` and the 80% interval's
`interval_masses` by age bucket (null: the central interval; calibration.json's when calibrated).
"""

# Before anything else, JAX and TensorFlow above all: a signal from here until the server serves ends
# it at once, exit 0 in one line (raised into a native library's import, it crashed the teardown).
from agejax.serving import runner  # isort: skip

runner.exit_on_signal_while_starting()

from absl import app, flags  # noqa: E402

from agejax import cli, errors  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
_EXPORT = flags.DEFINE_string("export", None, "A model exported by scripts/export.py (instead of --workdir).")
_CHECKPOINT = cli.checkpoint_flag()
_CALIBRATION = cli.calibration_flag("serve the raw model's distributions")
_FLIP = cli.flip_flag("/healthz reports it (with --export: the export must have been made with --flip)")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.", lower_bound=1, upper_bound=65535)
_GRPC_PORT = flags.DEFINE_integer(
  "grpc_port", None, "Also serve the Open Inference Protocol over gRPC on this port.", lower_bound=1, upper_bound=65535
)
_MODEL_NAME = flags.DEFINE_string("model_name", "agejax", "The model's name in the Open Inference Protocol.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "Most faces in one model call (1: no batching).", lower_bound=1)
_MAX_WAIT_MS = flags.DEFINE_float(
  "max_wait_ms", 5.0, "Longest a face waits for faces of other requests to join its call.", lower_bound=0
)
_MAX_BODY_MB = flags.DEFINE_float("max_body_mb", 20.0, "Largest request body (MB); larger ones get 413.", lower_bound=0)
_MAX_FILES = flags.DEFINE_integer("max_files", 64, "Most images in one request.", lower_bound=1)
_WORKERS = flags.DEFINE_integer(
  "workers",
  4,
  "Worker processes decoding photos and detecting their faces (0: no face detector, no TensorFlow: face crops only).",
  lower_bound=0,
)
_ALIGNED_WORKERS = flags.DEFINE_integer(
  "aligned_workers", 2, "Worker processes decoding face crops (aligned=true): never behind detection.", lower_bound=1
)
_ISOLATION = flags.DEFINE_enum(
  "isolation",
  "processes",
  ["processes", "threads"],
  "Where uploads are read: worker processes under hard limits, or the server's own threads (trusted input only).",
)
_WORKER_MEMORY_MB = flags.DEFINE_float(
  "worker_memory_mb", 1024.0, "A worker's address space beyond its own once started (MB); past it: 413.", lower_bound=64
)
_MAX_CPU_S = flags.DEFINE_float(
  "max_cpu_s", 10.0, "CPU seconds one image may take in its worker; past it: 422.", lower_bound=1
)
_WORKER_IMAGES = flags.DEFINE_integer(
  "worker_images", 500, "A worker is replaced after this many images.", lower_bound=1
)
_FORMATS = flags.DEFINE_list(
  "formats", ["jpeg", "png", "webp"], "Image formats read (Pillow's names, e.g. gif, bmp, tiff); others get 415."
)
_MAX_FACES = flags.DEFINE_integer(
  "max_faces",
  64,
  "Most faces answered a photo (the most confident); the answer says how many were found.",
  lower_bound=1,
)
_MAX_PIXELS = flags.DEFINE_float(
  "max_pixels", 64e6, "Largest image (width x height, from its header); larger ones get 413.", lower_bound=1
)
_DECODE_BUDGET_MB = flags.DEFINE_float(
  "decode_budget_mb", 1000.0, "Estimated decode memory in flight over all workers (MB); more work waits.", lower_bound=1
)
_QUEUE_TIMEOUT_S = flags.DEFINE_float(
  "queue_timeout_s", 10.0, "Work that can't start within this gets 503 with Retry-After.", lower_bound=0
)
_BODY_TIMEOUT_S = flags.DEFINE_float(
  "body_timeout_s", 60.0, "A request body must arrive within this (else 408).", lower_bound=0
)
_HEAD_TIMEOUT_S = flags.DEFINE_float(
  "head_timeout_s",
  10.0,
  "A request line and headers must arrive within this (else the connection closes).",
  lower_bound=0,
)
_KEEP_ALIVE_S = flags.DEFINE_float(
  "keep_alive_s", 5.0, "An idle kept-alive connection closes after this.", lower_bound=0
)
_MAX_BUFFERED_MB = flags.DEFINE_float(
  "max_buffered_mb",
  256.0,
  "Request bodies held over all requests (MB); a body that does not fit gets 503 with Retry-After.",
  lower_bound=0,
)
_MAX_CONNECTIONS = flags.DEFINE_integer(
  "max_connections",
  1000,
  "Open connections; past it the longest idle one is closed, or the new one gets 503 with Retry-After.",
  lower_bound=1,
)
_GRACE_S = flags.DEFINE_float(
  "graceful_timeout_s", 60.0, "After SIGTERM, longest wait for requests in flight.", lower_bound=0
)
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache_dir", None, "JAX persistent compilation cache ('' disables it; default: the workdir config's)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from agejax import serving

  if _MAX_BUFFERED_MB.value < _MAX_BODY_MB.value:
    raise errors.UserError(f"--max_buffered_mb={_MAX_BUFFERED_MB.value:g} must be at least --max_body_mb")
  sock = serving.bind(_HOST.value, _PORT.value)  # a port in use fails here, before minutes of loading
  grpc = None
  if _GRPC_PORT.value is not None:
    from agejax.serving import oip_grpc

    if _GRPC_PORT.value == _PORT.value:
      raise errors.UserError(f"--grpc_port={_GRPC_PORT.value} is --port's: give gRPC a port of its own")
    oip_grpc.check_installed()
    held = serving.bind(_HOST.value, _GRPC_PORT.value, reuse_port=True, flag="--grpc_port")
    grpc = oip_grpc.Endpoint(_HOST.value, _GRPC_PORT.value, held, _MAX_CONNECTIONS.value)
  server = build(grpc)  # SIGTERM or Ctrl-C meanwhile: runner.exit_on_signal_while_starting
  from agejax.serving import limits

  # Freed images go back to the OS: costs MTCNN about 7% (0.159 -> 0.170 s a photo), keeps peaks bounded.
  limits.use_mmap_for_large_allocations()
  serving.run(
    server,
    sock,
    _GRACE_S.value,
    head_timeout_s=_HEAD_TIMEOUT_S.value,
    keep_alive_s=_KEEP_ALIVE_S.value,
    max_connections=_MAX_CONNECTIONS.value,
  )
  runner.finish()  # exit 0 now: every request is answered, and JAX's and TensorFlow's teardown takes seconds


def build(grpc=None):
  """Loads the model and the face detector into the server's ASGI app (`grpc`: its gRPC endpoint, if any)."""
  from agejax import parallel, serving
  from agejax.serving import app as serving_app
  from agejax.serving import sandbox

  formats = sandbox.accepted_formats(_FORMATS.value)  # a typo fails here, in one line, before the model loads

  model = serving.load_model(
    _WORKDIR.value, _EXPORT.value, _CHECKPOINT.value, _MAX_BATCH.value, calibrated=_CALIBRATION.value, flip=_FLIP.value
  )
  cfg = getattr(model, "cfg", None)  # a workdir's settings; an export has none
  cache = _COMPILATION_CACHE.value
  parallel.enable_compilation_cache(cfg.run.compilation_cache_dir if cache is None and cfg else cache or "")
  limits = serving_app.Settings(
    max_batch=_MAX_BATCH.value,
    max_wait_ms=_MAX_WAIT_MS.value,
    max_body_bytes=int(_MAX_BODY_MB.value * 1e6),
    max_files=_MAX_FILES.value,
    workers=_WORKERS.value,
    aligned_workers=_ALIGNED_WORKERS.value,
    max_pixels=int(_MAX_PIXELS.value),
    decode_budget_bytes=int(_DECODE_BUDGET_MB.value * 1e6),
    queue_timeout_s=_QUEUE_TIMEOUT_S.value,
    body_timeout_s=_BODY_TIMEOUT_S.value,
    max_buffered_bytes=int(_MAX_BUFFERED_MB.value * 1e6),
    isolation=_ISOLATION.value,
    formats=formats,
    worker_memory_bytes=int(_WORKER_MEMORY_MB.value * 1e6),
    max_cpu_s=_MAX_CPU_S.value,
    worker_images=_WORKER_IMAGES.value,
    model_name=_MODEL_NAME.value,
  )
  min_age = int(model.bins[0])
  # --workers=0: no photo workers, so no detector (photos get a 400 asking for aligned=true).
  detector = sandbox.DetectorSpec(max_faces=_MAX_FACES.value) if _WORKERS.value else None
  return serving_app.create_app(model, detector, limits, min_age, getattr(model, "step", None), grpc=grpc)


if __name__ == "__main__":
  cli.run(main)
