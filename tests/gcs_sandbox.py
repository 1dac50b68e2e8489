"""A private, offline Google Cloud Storage for tests: gcp-storage-emulator in a loopback-only namespace.

TensorFlow's GCS filesystem has `https://www.googleapis.com/storage/v1/` hard-coded, so the emulator
answers on the real host names: a private network and mount namespace (`unshare -n -m`) maps them to
127.0.0.1 in its own /etc/hosts, and a throwaway CA signs the emulator's certificate. Clients run in
that namespace (`nsenter`), so nothing can reach the real Google, nor the emulator anything outside.

  with GcsSandbox() as gcs:
    gcs.run([sys.executable, "scripts/train.py", "--workdir", "gs://agejax-test/run", ...], check=True)
    gcs.list_objects("agejax-test", "run/")

Run as a script (`serve`), this file is the server inside the namespace. Needs root (or CAP_SYS_ADMIN).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOSTS = (
  "www.googleapis.com",
  "storage.googleapis.com",
  "oauth2.googleapis.com",
  "accounts.google.com",
  "metadata.google.internal",
  "metadata",
)
CLOSED = "127.0.0.1:9"  # a loopback port nothing listens on: metadata-server look-ups fail at once
READY_TIMEOUT_S = 30.0
PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")

# Reads the emulator from inside the namespace with the standard library only (no TensorFlow import).
_CLIENT = """
import json, ssl, sys, urllib.error, urllib.parse, urllib.request
op, bucket, arg = sys.argv[1:4]
host = "https://storage.googleapis.com"
base = host + "/storage/v1/b/" + urllib.parse.quote(bucket, safe="")
context = ssl.create_default_context(cafile=sys.argv[4])
def get(url, data=None):
  try:
    with urllib.request.urlopen(url, data, context=context, timeout=30) as response:
      return response.read()
  except urllib.error.HTTPError as error:
    sys.exit(f"{error.code} {error.reason}: {url}")
if op == "write":
  query = urllib.parse.urlencode({"uploadType": "media", "name": arg})
  get(host + "/upload" + base[len(host):] + "/o?" + query, sys.stdin.buffer.read())
elif op == "read":
  sys.stdout.buffer.write(get(base + "/o/" + urllib.parse.quote(arg, safe="") + "?alt=media"))
else:
  names, token = [], ""
  while True:
    page = json.loads(get(base + "/o?" + urllib.parse.urlencode({"prefix": arg, "pageToken": token})))
    names += [item["name"] for item in page.get("items") or []]
    token = page.get("nextPageToken")
    if not token:
      break
  print(json.dumps(names))
"""


class SandboxUnavailable(RuntimeError):
  """This machine or user cannot make the sandbox (no root, missing tools)."""


class GcsSandbox:
  """A gcp-storage-emulator on 127.0.0.1:443 (HTTPS) and :80 in its own network and mount namespace."""

  def __init__(self, buckets: tuple[str, ...] = ("agejax-test",), timeout: float = READY_TIMEOUT_S):
    self.buckets = tuple(buckets)
    self.timeout = timeout
    self.root: Path | None = None
    self.process: subprocess.Popen | None = None

  @property
  def ca(self) -> str:
    """The CA bundle that clients must trust."""
    return str(self.root / "ca.pem")

  @property
  def pid(self) -> int:
    """The server's process id: the namespaces to enter."""
    if self.process is None or self.process.poll() is not None:
      raise RuntimeError("the GCS sandbox is not running")
    return self.process.pid

  def __enter__(self) -> GcsSandbox:
    _check_privileges()
    self.root = Path(tempfile.mkdtemp(prefix="gcs_sandbox_"))
    try:
      _make_certificates(self.root)
      self._start()
    except BaseException:
      self.__exit__()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.stop_server()
    if self.root is not None:
      shutil.rmtree(self.root, ignore_errors=True)
      self.root = None

  def _start(self) -> None:
    log = open(self.root / "server.log", "wb")
    # stdin is a pipe whose end the server watches: it exits when this process closes it or dies.
    self.process = subprocess.Popen(
      ["unshare", "-n", "-m", sys.executable, __file__, "serve", str(self.root), *self.buckets],
      stdin=subprocess.PIPE,
      stdout=log,
      stderr=subprocess.STDOUT,
      env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    log.close()
    deadline = time.monotonic() + self.timeout
    while not (self.root / "ready").exists():
      if self.process.poll() is not None or time.monotonic() > deadline:
        problem = (
          f"exited with status {self.process.returncode}"
          if self.process.poll() is not None
          else f"not ready after {self.timeout:.0f} s"
        )
        raise RuntimeError(f"GCS sandbox server {problem}:\n{self.log()[-4000:]}")
      time.sleep(0.02)

  def log(self) -> str:
    """The server's output so far."""
    path = self.root / "server.log" if self.root else None
    return path.read_text(errors="replace") if path and path.exists() else ""

  def stop_server(self) -> None:
    """Stops the server; its namespaces go with it."""
    process, self.process = self.process, None
    if process is None:
      return
    for stop in (process.stdin.close, process.terminate, process.kill):
      try:
        stop()
        process.wait(timeout=5)
        return
      except (subprocess.TimeoutExpired, OSError):
        pass

  def env(self, base: dict[str, str] | None = None, *, tf_retries: int | None = None) -> dict[str, str]:
    """The environment of a client process (over `base`, default os.environ): sandbox CA, fake auth, no metadata.

    `tf_retries` caps TensorFlow's GCS retries (default 10, backing off to 32 s: a refused connection
    fails a call after ~195 s; 0 fails it at once).
    """
    env = dict(os.environ if base is None else base)
    for name in (
      "GOOGLE_APPLICATION_CREDENTIALS",
      "CLOUD_STORAGE_EMULATOR_ENDPOINT",
      "TENSORSTORE_GCS_HTTP_URL",
      *PROXIES,
    ):
      env.pop(name, None)  # every client talks to the real host names, which lead to the sandbox
    env.update(
      {name: self.ca for name in ("CURL_CA_BUNDLE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "TENSORSTORE_CA_BUNDLE")}
    )
    env.update(
      GOOGLE_AUTH_TOKEN_FOR_TESTING="fake",
      NO_GCE_CHECK="true",
      GCE_METADATA_HOST=CLOSED,
      GCE_METADATA_IP=CLOSED,
      GCE_METADATA_ROOT=CLOSED,
      CLOUDSDK_CONFIG=str(self.root / "gcloud"),
      FSSPEC_GCS_TOKEN="anon",
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
      # google-cloud-storage (Orbax asks it whether a bucket is hierarchical) then needs no credentials.
      STORAGE_EMULATOR_HOST="https://storage.googleapis.com",
    )
    if tf_retries is not None:
      env.update(
        GCS_RETRY_CONFIG_MAX_RETRIES=str(tf_retries),
        GCS_RETRY_CONFIG_INIT_DELAY_TIME_US="1000",
        GCS_RETRY_CONFIG_MAX_DELAY_TIME_US="1000",
      )  # TF adds up to 1 s of jitter per retry anyway
    return env

  def command(self, argv: list[str], cwd: str | os.PathLike | None = None, reachable: bool = True) -> list[str]:
    """`argv` wrapped to run inside the sandbox's namespaces, in `cwd` (default: the current directory).

    With reachable=False it gets the sandbox's host names but a network namespace of its own, where
    nothing listens: every GCS connection is refused.
    """
    # Entering a mount namespace moves to its root, so nsenter must be told the directory.
    wd = os.path.abspath(cwd if cwd is not None else os.getcwd())
    nsenter = ["nsenter", "-t", str(self.pid), "-m", f"--wd={wd}"]
    if reachable:
      return [*nsenter, "-n", "--", *map(str, argv)]
    return [*nsenter, "--", "unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *map(str, argv)]

  def _wrap(self, argv: list[str], kwargs: dict) -> tuple[list[str], dict]:
    reachable = kwargs.pop("reachable", True)
    env = kwargs.get("env")
    return (
      self.command(argv, kwargs.get("cwd"), reachable),
      dict(kwargs, env=self.env(env) if env is not None else self.env()),
    )

  def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run of `command(argv)`; an explicit `env` replaces os.environ under `env()`; `reachable=`."""
    command, kwargs = self._wrap(argv, kwargs)
    return subprocess.run(command, **kwargs)

  def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen of `command(argv)`; an explicit `env` replaces os.environ under `env()`; `reachable=`."""
    command, kwargs = self._wrap(argv, kwargs)
    return subprocess.Popen(command, **kwargs)

  def _query(self, op: str, bucket: str, arg: str, data: bytes = b"") -> bytes:
    result = subprocess.run(
      self.command([sys.executable, "-I", "-c", _CLIENT, op, bucket, arg, self.ca]),
      input=data,
      capture_output=True,
      timeout=60,
    )
    if result.returncode:
      lines = result.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {result.returncode}"]
      error = FileNotFoundError if lines[-1].startswith("404 ") else RuntimeError
      raise error(f"gs://{bucket}/{arg}: {lines[-1]}")
    return result.stdout

  def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Names of the objects in `bucket` that start with `prefix`, as the emulator holds them."""
    return json.loads(self._query("list", bucket, prefix))

  def read_object(self, bucket: str, name: str) -> bytes:
    """The content of object `name` in `bucket`."""
    return self._query("read", bucket, name)

  def write_object(self, bucket: str, name: str, data: bytes) -> None:
    """Creates or replaces object `name` in `bucket`."""
    self._query("write", bucket, name, data)


def _check_privileges() -> None:
  """Raises a clear error where namespaces cannot be made, before starting anything."""
  missing = [tool for tool in ("unshare", "nsenter", "ip", "mount", "openssl") if shutil.which(tool) is None]
  if missing:
    raise SandboxUnavailable(f"GCS sandbox needs {', '.join(missing)} on PATH")
  probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True, timeout=10)
  if probe.returncode:
    raise SandboxUnavailable(
      "GCS sandbox needs root (CAP_SYS_ADMIN) to create network and mount namespaces: "
      f"`unshare -n -m` failed as uid {os.getuid()}: {probe.stderr.strip()}"
    )


def _make_certificates(root: Path) -> None:
  """A throwaway CA (ca.pem) and a certificate for HOSTS signed by it (server.pem, server.key)."""

  def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True, timeout=30)

  key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
  openssl(
    "req",
    "-x509",
    *key,
    "-keyout",
    "ca.key",
    "-out",
    "ca.pem",
    "-days",
    "2",
    "-subj",
    "/CN=gcs-sandbox CA",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  )
  openssl("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=www.googleapis.com")
  (root / "server.ext").write_text(
    "subjectAltName=" + ",".join(f"DNS:{host}" for host in HOSTS) + ",IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
  )
  openssl(
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    "ca.pem",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-days",
    "2",
    "-extfile",
    "server.ext",
    "-out",
    "server.pem",
  )


def _patch_emulator() -> None:
  """Makes gcp-storage-emulator serve TensorFlow's GCS filesystem and serialises its requests."""
  import threading
  from http import HTTPStatus

  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  read_raw_data = server._read_raw_data

  def read_chunked_first(handler):
    # TF's resumable upload sends both Transfer-Encoding: chunked and Content-Length; chunked wins (RFC 9112).
    if (handler.headers.get("Transfer-Encoding") or "").lower() == "chunked" and "Content-Length" in handler.headers:
      del handler.headers["Content-Length"]
    return read_raw_data(handler)

  media_upload = objects._media_upload

  def media_upload_empty(request, response, storage):
    if request.data is None:  # TF writes empty "dir/" marker objects
      request._data = b""
    return media_upload(request, response, storage)

  def storage_layout(request, response, storage):
    # TF 2.21 asks before a rename whether the bucket has a hierarchical namespace.
    name = request.params["bucket_name"]
    if not storage.buckets.get(name):
      response.status = HTTPStatus.NOT_FOUND
      return
    response.json(
      {
        "kind": "storage#storageLayout",
        "bucket": name,
        "location": "US",
        "locationType": "multi-region",
        "hierarchicalNamespace": {"enabled": False},
      }
    )

  from gcp_storage_emulator.exceptions import NotFound

  def generation(storage, bucket: str, name: str) -> str:
    try:
      return storage.get_file_obj(bucket, name)["generation"]
    except NotFound:
      return "0"  # GCS's "no live object" generation

  def preconditions(handler, reading: bool, object_name):
    # Tensorstore (Orbax's OCDBT manifests) and agejax's workdir lock rely on GCS's conditional
    # requests and on the x-goog-generation header of every read; the emulator has neither.
    def wrapped(request, response, storage, *args, **kwargs):
      bucket, name = request.params["bucket_name"], object_name(request)
      current = generation(storage, bucket, name)
      match, not_match = (request.query.get(k, [None])[0] for k in ("ifGenerationMatch", "ifGenerationNotMatch"))
      if not (reading and current == "0"):  # a missing object reads as 404 whatever the conditions
        if match is not None and match != current:
          response.status = HTTPStatus.PRECONDITION_FAILED
          return None
        if not_match is not None and not_match == current:
          response.status = HTTPStatus.NOT_MODIFIED if reading else HTTPStatus.PRECONDITION_FAILED
          response["x-goog-generation"] = current
          return None
      result = handler(request, response, storage, *args, **kwargs)
      if reading and current != "0":
        response["x-goog-generation"] = current
        response["x-goog-metageneration"] = storage.get_file_obj(bucket, name)["metageneration"]
      return result

    return wrapped

  from_path = lambda request: request.params["object_id"]  # noqa: E731
  replaced = {
    fn: preconditions(fn, reading, from_path)
    for fn, reading in ((objects.download, True), (objects.get, True), (objects.delete, False))
  }
  for _, methods in server.HANDLERS:  # the routing table holds the functions themselves
    for method, fn in methods.items():
      methods[method] = replaced.get(fn, fn)
  objects._media_upload = preconditions(media_upload_empty, False, lambda request: request.query["name"][0])
  # google-cloud-storage uploads small objects as multipart (metadata + content); the name is in either.
  objects._multipart_upload = preconditions(
    objects._multipart_upload,
    False,
    lambda request: request.query["name"][0] if "name" in request.query else request.data["meta"].get("name"),
  )
  server._read_raw_data = read_chunked_first
  server.HANDLERS = (
    (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$", {"GET": storage_layout}),
    *server.HANDLERS,
  )

  lock = threading.Lock()  # the emulator's storage is not thread-safe; HTTP and HTTPS threads share it
  handle = server.Router.handle

  def locked_handle(self, method):
    with lock:
      handle(self, method)

  server.Router.handle = locked_handle


def _serve(root: Path, buckets: list[str]) -> None:
  """Inside fresh namespaces: loopback up, HOSTS on 127.0.0.1, emulator on :443 and :80 until stdin closes."""
  import functools
  import logging
  import socket
  import socketserver
  import ssl
  import threading
  from http.server import HTTPServer

  if [name for _, name in socket.if_nameindex()] != ["lo"]:  # nothing may leave the machine
    sys.exit(f"refusing to serve: not in a private network namespace ({socket.if_nameindex()})")
  for command in (["ip", "link", "set", "lo", "up"], ["mount", "--make-rprivate", "/"]):
    subprocess.run(command, check=True, timeout=10)
  hosts = root / "hosts"
  hosts.write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 " + " ".join(HOSTS) + "\n")
  subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True, timeout=10)

  # GCS_SANDBOX_LOG=INFO logs every request to GcsSandbox.log().
  logging.basicConfig(
    level=os.environ.get("GCS_SANDBOX_LOG", "ERROR"),
    stream=sys.stdout,
    format="%(relativeCreated)d ms %(levelname)s %(name)s: %(message)s",
  )
  _patch_emulator()
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import buckets as bucket_handlers
  from gcp_storage_emulator.storage import Storage

  storage = Storage(use_memory_fs=True, data_dir=str(root))
  for bucket in buckets:
    bucket_handlers.create_bucket(bucket, storage)

  class Handler(server.RequestHandler):
    timeout = 60  # a stalled client (or TLS handshake) cannot hold a thread forever

    def parse_request(self) -> bool:
      # An HTTP/1.0 server skips "Expect: 100-continue"; curl (TF, tensorstore) then waits 1 s per upload.
      ok = super().parse_request()
      if ok and (self.headers.get("Expect") or "").lower() == "100-continue":
        self.send_response_only(100)
        self.end_headers()
      return ok

  class ThreadingServer(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True

  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(root / "server.pem", root / "server.key")
  for port, tls in ((443, True), (80, False)):  # :80 for the plain-http upload URLs the emulator hands out
    httpd = ThreadingServer(("127.0.0.1", port), functools.partial(Handler, storage))
    if tls:  # the handshake runs in the request thread, under Handler.timeout
      httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  (root / "ready").write_text(str(os.getpid()))
  print("ready", flush=True)
  sys.stdin.buffer.read()  # returns when the harness closes the pipe or dies; the daemon threads go with us


if __name__ == "__main__":
  if sys.argv[1:2] != ["serve"] or len(sys.argv) < 3:
    sys.exit(f"usage: unshare -n -m {sys.executable} {__file__} serve DIR [BUCKET...] (GcsSandbox runs this)")
  _serve(Path(sys.argv[2]), sys.argv[3:])
