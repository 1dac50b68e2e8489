"""The Open Inference Protocol (KServe V2 / Triton) over HTTP and gRPC, driven by the clients people use: tritonclient.

The first part serves test_serve's FakeModel (a one-hot distribution at each crop's first pixel) in
this process, so every answer is known exactly; the second serves the learned tiny run with
scripts/serve.py and checks that the protocol answers /v1/predict's numbers for the same faces.
"""

import base64
import contextlib
import json
import threading
import time

import httpx
import numpy as np
import pytest
import tiny_run
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from conftest import assert_same_distributions
from test_serve import ENV, SERVE, drawn_face, photo_with_a_face, png
from test_serve_limits import Model, crop
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from agejax.serving import app as serving_app
from agejax.serving import local, oip, oip_grpc

MAX_FILES = 4
PROTOCOLS = ("http", "grpc")


@contextlib.contextmanager
def fake_server(**settings):
  """(HTTP host:port, gRPC host:port) of create_app on FakeModel (S=4, ages 1..256), gRPC on the same loop."""
  settings = {"max_batch": 4, "isolation": "threads", "max_files": MAX_FILES, **settings}
  grpc_port = local.free_port()
  app = serving_app.create_app(
    Model(), None, serving_app.Settings(**settings), min_age=1, grpc=oip_grpc.Endpoint("127.0.0.1", grpc_port)
  )
  with local.in_thread(app, 10.0, log_level="warning") as url:
    yield url.removeprefix("http://"), f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def fake():
  with fake_server() as addresses:
    yield addresses


@contextlib.contextmanager
def client(protocol: str, addresses: tuple[str, str]):
  """A tritonclient of `protocol` ("http" or "grpc") to the server, closed after the block."""
  c = thttp.InferenceServerClient(addresses[0]) if protocol == "http" else tgrpc.InferenceServerClient(addresses[1])
  try:
    yield c
  finally:
    c.close()


def module_of(protocol: str):
  return thttp if protocol == "http" else tgrpc


def infer(c, protocol: str, name: str, data: np.ndarray, *, binary: bool = True, outputs=(), datatype=None, **kw):
  """Sends one input through tritonclient; returns the InferResult (binary: HTTP's binary data extension on)."""
  m = module_of(protocol)
  datatype = datatype or ("BYTES" if data.dtype == object else "UINT8")
  tensor = m.InferInput(name, list(data.shape), datatype)
  if protocol == "http":
    tensor.set_data_from_numpy(data, binary_data=binary)
    wanted = [m.InferRequestedOutput(o, binary_data=binary) for o in outputs]
  else:
    tensor.set_data_from_numpy(data)
    wanted = [m.InferRequestedOutput(o) for o in outputs]
  return c.infer("agejax", [tensor], outputs=wanted or None, **kw)


def photos_input(photos: list[bytes], binary: bool) -> np.ndarray:
  """A BYTES input of encoded photos: their bytes as binary data, their base64 in JSON (strings must be UTF-8)."""
  return np.array(photos if binary else [base64.b64encode(p) for p in photos], dtype=object)


def one_hot_ages(values) -> np.ndarray:
  """FakeModel's distributions of flat crops of these values: one-hot at the value (age value + 1)."""
  return np.eye(256, dtype=np.float32)[list(values)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_metadata_as_the_protocol_defines_them(fake, protocol):
  with client(protocol, fake) as c:
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("agejax")
    assert c.is_model_ready("agejax", "1")
    as_json = {"as_json": True} if protocol == "grpc" else {}  # gRPC: the protobuf message as JSON
    meta = c.get_model_metadata("agejax", **as_json)
    server = c.get_server_metadata(**as_json)
  if protocol == "grpc":  # protobuf's JSON writes int64 as strings
    for tensor in meta["inputs"] + meta["outputs"]:
      tensor["shape"] = [int(d) for d in tensor["shape"]]
  assert server["name"] == "agejax" and "binary_tensor_data" in server["extensions"]
  assert meta["name"] == "agejax" and meta["versions"] == ["1"]
  assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
    ("photos", "BYTES", (-1,)),
    ("images", "UINT8", (-1, 4, 4, 3)),
  }
  shapes = {t["name"]: (t["datatype"], tuple(t["shape"])) for t in meta["outputs"]}
  assert shapes["probabilities"] == ("FP32", (-1, 256)) and shapes["age"] == ("FP32", (-1,))
  assert shapes["interval80"] == ("FP32", (-1, 2)) and shapes["box"] == ("FP32", (-1, 4))
  assert shapes["photo_index"] == ("INT32", (-1,)) and shapes["faces_found"] == ("INT32", (-1,))


@pytest.mark.parametrize("protocol,binary", [("http", True), ("http", False), ("grpc", True)])
def test_a_crop_batch_gets_the_models_distributions(fake, protocol, binary):
  values = [3, 7, 200]
  crops = np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])
  with client(protocol, fake) as c:
    result = infer(c, protocol, "images", crops, binary=binary)
  np.testing.assert_array_equal(result.as_numpy("probabilities"), one_hot_ages(values))
  np.testing.assert_array_equal(result.as_numpy("age"), np.array(values, np.float32) + 1)
  assert result.as_numpy("std").tolist() == [0.0] * 3
  assert result.as_numpy("interval80").shape == (3, 2)
  assert result.as_numpy("box") is None  # photo-only outputs are not answered for crops


@pytest.mark.parametrize("protocol,binary", [("http", True), ("http", False), ("grpc", True)])
def test_photos_are_read_as_v1_reads_them_with_boxes_and_photo_index(fake, protocol, binary):
  photos = [crop(10), crop(20), png(np.full((16, 8, 3), 30, np.uint8))]  # the last: its centre square
  with client(protocol, fake) as c:
    result = infer(c, protocol, "photos", photos_input(photos, binary), binary=binary, parameters={"aligned": True})
  np.testing.assert_array_equal(result.as_numpy("age"), [11, 21, 31])
  np.testing.assert_array_equal(result.as_numpy("box"), [[0, 0, 8, 8], [0, 0, 8, 8], [0, 4, 8, 8]])
  np.testing.assert_array_equal(result.as_numpy("photo_index"), [0, 1, 2])
  np.testing.assert_array_equal(result.as_numpy("faces_found"), [1, 1, 1])


def test_the_outputs_asked_for_are_the_ones_answered_binary_or_json(fake):
  crops = np.stack([np.full((4, 4, 3), 5, np.uint8)])
  body = {
    "id": "req-7",
    "inputs": [{"name": "images", "shape": [1, 4, 4, 3], "datatype": "UINT8", "data": crops.ravel().tolist()}],
    "outputs": [{"name": "age"}, {"name": "probabilities", "parameters": {"binary_data": True}}],
  }
  response = httpx.post(f"http://{fake[0]}/v2/models/agejax/infer", json=body, timeout=30)
  assert response.status_code == 200, response.text
  header_length = int(response.headers[oip.HEADER_LENGTH])
  header = json.loads(response.content[:header_length])
  assert header["id"] == "req-7" and header["model_name"] == "agejax" and header["model_version"] == "1"
  assert header["parameters"] == {"min_age": 1, "max_age": 256}
  (age, probs) = header["outputs"]
  assert age == {"name": "age", "datatype": "FP32", "shape": [1], "data": [6.0]}
  assert probs["parameters"] == {"binary_data_size": 256 * 4} and "data" not in probs
  # The binary part: little-endian float32, row-major, right after the JSON header.
  np.testing.assert_array_equal(np.frombuffer(response.content[header_length:], "<f4"), one_hot_ages([5])[0])


def test_binary_bytes_elements_are_read_as_tritonclient_writes_them():
  elements = [b"", b"\x00\xff" * 3, bytes(range(256)) * 5]
  raw = serialize_byte_tensor(np.array(elements, dtype=object)).item()  # the client's own encoder
  assert oip.deserialize_bytes(raw, 3, "x") == elements
  for cut in (1, 3, 5, len(raw) - 1):
    with pytest.raises(oip.ProtocolError, match="input 'x'"):
      oip.deserialize_bytes(raw[:cut], 3, "x")
  with pytest.raises(oip.ProtocolError, match="elements of binary data for its shape"):
    oip.deserialize_bytes(raw, 2, "x")


def _json_infer(inputs, **extra) -> dict:
  return {"inputs": inputs, **extra}


CROP = {"name": "images", "shape": [1, 4, 4, 3], "datatype": "UINT8", "data": [1] * 48}
# (case, HTTP body or tritonclient input, status, words of the message). Each goes through the real clients
# where they can express it, and as raw HTTP where only a broken client would send it.
BAD_HTTP = [
  ("wrong datatype", _json_infer([{**CROP, "datatype": "FP32", "data": [1.0] * 48}]), 400, "datatype FP32"),
  ("wrong shape", _json_infer([{**CROP, "shape": [1, 5, 4, 3], "data": [1] * 60}]), 400, "has shape [1, 5, 4, 3]"),
  ("too many elements", _json_infer([{**CROP, "data": [1] * 49}]), 400, "49 elements"),
  ("too many crops", _json_infer([{**CROP, "shape": [5, 4, 4, 3], "data": [1] * 240}]), 413, "at most 4"),
  ("out of range", _json_infer([{**CROP, "data": [256] * 48}]), 400, "integers 0..255"),
  (
    "undecodable",
    _json_infer(
      [{"name": "photos", "shape": [1], "datatype": "BYTES", "data": ["anVuaw=="]}], parameters={"aligned": True}
    ),
    400,
    "photos[0]",
  ),
  ("not base64", _json_infer([{"name": "photos", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]), 400, "base64"),
  (
    "no detector",
    _json_infer([{"name": "photos", "shape": [1], "datatype": "BYTES", "data": ["anVuaw=="]}]),
    400,
    "detects no faces",
  ),
  ("unknown input", _json_infer([{**CROP, "name": "pixels"}]), 400, "unknown input 'pixels'"),
  ("two inputs", _json_infer([CROP, CROP]), 400, "2 inputs"),
  ("unknown output", _json_infer([CROP], outputs=[{"name": "gender"}]), 400, "unknown output 'gender'"),
  ("photo output of crops", _json_infer([CROP], outputs=[{"name": "box"}]), 400, "'box' is answered for"),
  ("aligned not a bool", _json_infer([CROP], parameters={"aligned": "yes"}), 400, "'aligned' must be a bool"),
  ("not json", b"{inputs: oops", 400, "not JSON"),
  ("no inputs", {"outputs": []}, 400, '"inputs"'),
  ("deep json", b"[" * 100 + b"]" * 100, 400, "nests deeper"),
]


@pytest.mark.parametrize("case,body,status,words", BAD_HTTP, ids=[c[0] for c in BAD_HTTP])
def test_every_bad_http_input_gets_the_protocols_json_error_and_the_server_keeps_serving(
  fake, case, body, status, words
):
  url = f"http://{fake[0]}/v2/models/agejax/infer"
  content = body if isinstance(body, bytes) else json.dumps(body).encode()
  response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
  assert response.status_code == status, response.text
  assert set(response.json()) == {"error"} and words in response.json()["error"], response.json()
  assert_answers_a_crop(fake, "http")


def test_bad_binary_data_is_refused_in_one_line(fake):
  url = f"http://{fake[0]}/v2/models/agejax/infer"
  header = json.dumps(
    {"inputs": [{**{k: v for k, v in CROP.items() if k != "data"}, "parameters": {"binary_data_size": 48}}]}
  )
  cases = [
    (header.encode() + b"\x01" * 40, len(header), "more than the 40 bytes left"),  # cut short
    (header.encode() + b"\x01" * 50, len(header), "2 bytes of binary data after"),  # too long
    (header.encode() + b"\x01" * 48, len(header) + 100, "not within the body"),  # header length past the body
  ]
  for content, length, words in cases:
    response = httpx.post(url, content=content, headers={oip.HEADER_LENGTH: str(length)}, timeout=30)
    assert response.status_code == 400 and words in response.json()["error"], response.text
  assert_answers_a_crop(fake, "http")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_bad_input_through_the_clients_is_an_error_and_the_server_keeps_serving(fake, protocol):
  cases = [
    ("images", np.zeros((1, 4, 4, 3), np.float32), "FP32", {}, "datatype FP32"),
    ("images", np.zeros((1, 5, 4, 3), np.uint8), None, {}, "has shape [1, 5, 4, 3]"),
    ("images", np.zeros((MAX_FILES + 1, 4, 4, 3), np.uint8), None, {}, f"at most {MAX_FILES}"),
    ("photos", np.array([b"not an image"], dtype=object), None, {"aligned": True}, "photos[0]"),
    ("photos", np.array([crop(1), b"\x89PNG\r\n\x1a\n"], dtype=object), None, {"aligned": True}, "photos[1]"),
  ]
  with client(protocol, fake) as c:
    for name, data, datatype, parameters, words in cases:
      with pytest.raises(InferenceServerException) as caught:
        infer(c, protocol, name, data, datatype=datatype, parameters=parameters)
      assert words in caught.value.message(), caught.value.message()
      want = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}[protocol]
      if "at most" in words:
        want = {"http": "413", "grpc": "StatusCode.RESOURCE_EXHAUSTED"}[protocol]
      assert caught.value.status() == want, (words, caught.value.status())
    with pytest.raises(InferenceServerException) as caught:
      c.get_model_metadata("nobody")
    assert "unknown model 'nobody'" in caught.value.message()
  assert_answers_a_crop(fake, protocol)


def assert_answers_a_crop(addresses, protocol: str) -> None:
  """A normal request right after is answered."""
  with client(protocol, addresses) as c:
    result = infer(c, protocol, "images", np.full((1, 4, 4, 3), 9, np.uint8))
  assert result.as_numpy("age").tolist() == [10.0]


def test_the_protocol_is_counted_in_metrics_by_path_and_method(fake):
  with client("http", fake) as c:
    infer(c, "http", "images", np.full((1, 4, 4, 3), 2, np.uint8))
  with client("grpc", fake) as c:
    infer(c, "grpc", "images", np.full((1, 4, 4, 3), 2, np.uint8))
  text = httpx.get(f"http://{fake[0]}/metrics", timeout=30).text
  assert 'agejax_http_requests_total{path="/v2/models/*/infer",status="200"}' in text
  assert 'agejax_http_requests_total{path="grpc:ModelInfer",status="OK"}' in text


# --- the learned tiny run, served by scripts/serve.py ---


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
  """(serve.py with --grpc_port, its gRPC port) on the learned tiny run; detection on.

  --max_batch=1: a face's float32 rounding depends on the padded size of the call it rides in
  (benchmark.py measured ages 3e-4 years apart), and the same faces reach the batcher together over
  the protocol but one by one from /v1/predict's decode workers. Batching is FakeModel's tests' concern.
  """
  grpc_port = local.free_port()
  flags = tiny_run.serve_flags(request, tmp_path_factory, "--grpc_port", str(grpc_port), "--max_batch=1")
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    yield running, grpc_port


def v1_faces(url: str, files: list[bytes], aligned: bool) -> list[dict]:
  response = httpx.post(
    url + "/v1/predict",
    files=[("files", (f"{i}.png", data)) for i, data in enumerate(files)],
    params={"aligned": str(aligned).lower()},
    timeout=120,
  )
  assert response.status_code == 200, response.text
  return [face for result in response.json()["results"] for face in result["faces"]]


@pytest.mark.slow
@pytest.mark.parametrize("protocol,binary", [("http", True), ("http", False), ("grpc", True)])
def test_the_clients_get_v1s_numbers_for_the_same_crops_and_photos(served, protocol, binary):
  running, grpc_port = served
  addresses = (running.url.removeprefix("http://"), f"127.0.0.1:{grpc_port}")
  size = running_size(running.url)
  from PIL import Image

  crops = [np.asarray(Image.open(__import__("io").BytesIO(drawn_face(i, size))).convert("RGB")) for i in range(5)]
  photo, _ = photo_with_a_face(640, 480, at=(200, 120))
  with client(protocol, addresses) as c:
    by_crops = infer(c, protocol, "images", np.stack(crops), binary=binary)
    by_photos = infer(
      c, protocol, "photos", photos_input([png(x) for x in crops], binary), binary=binary, parameters={"aligned": True}
    )
    detected = infer(c, protocol, "photos", photos_input([photo], binary), binary=binary)
  reference = v1_faces(running.url, [png(x) for x in crops], aligned=True)
  for result in (by_crops, by_photos):
    assert_same_distributions(result.as_numpy("probabilities"), [f["distribution"] for f in reference])
    np.testing.assert_allclose(result.as_numpy("age"), [f["age"] for f in reference], atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.as_numpy("interval80"), [f["interval80"] for f in reference], atol=0.006)
  (face,) = v1_faces(running.url, [photo], aligned=False)
  assert detected.as_numpy("faces_found").tolist() == [1] and detected.as_numpy("photo_index").tolist() == [0]
  assert_same_distributions(detected.as_numpy("probabilities"), [face["distribution"]])
  np.testing.assert_array_equal(np.round(detected.as_numpy("box")[0]), face["box"])


def running_size(url: str) -> int:
  return httpx.get(url + "/healthz", timeout=30).json()["input_size"]


@pytest.mark.slow
def test_sigterm_finishes_a_grpc_call_in_flight_and_refuses_new_ones(request, tmp_path_factory):
  grpc_port = local.free_port()
  flags = tiny_run.serve_flags(request, tmp_path_factory, "--grpc_port", str(grpc_port), "--max_batch=2")
  slow, _ = photo_with_a_face(8000, 6000, at=(100, 100))  # about a second to decode and detect
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    answer = {}

    def call():
      with client("grpc", ("", f"127.0.0.1:{grpc_port}")) as c:
        try:
          answer["result"] = infer(c, "grpc", "photos", np.array([slow], dtype=object))
        except InferenceServerException as e:
          answer["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 30
    while running_in_flight(running.url) < 2:  # the gRPC call, and this /metrics request itself
      assert time.monotonic() < deadline and thread.is_alive()
      time.sleep(0.02)
    running.process.terminate()  # SIGTERM
    thread.join(60)
    assert "result" in answer, answer.get("error")
    assert answer["result"].as_numpy("faces_found").tolist() == [1]
    assert running.process.wait(60) == 0, running.output()[-3000:]
  with client("grpc", ("", f"127.0.0.1:{grpc_port}")) as c, pytest.raises(InferenceServerException):
    c.is_server_live()


def running_in_flight(url: str) -> float:
  text = httpx.get(url + "/metrics", timeout=5).text
  line = next(x for x in text.splitlines() if x.startswith("agejax_http_requests_in_flight "))
  return float(line.split()[1])
