"""P(age < T) from the calibrated distribution: the function, Predictor, predict.py --under, the server and an export.

Every number is checked against a float64 NumPy sum of a distribution computed elsewhere: random
distributions for the function, the best checkpoint's `AgeModel.distributions` at the workdir's
temperature (test_predict's `direct_distributions`, not Predictor) for the trained tiny run, and
FakeModel's one-hot distributions (age = the crop's pixel value + 1) for the server's parsing.
"""

import base64
import json

import httpx
import numpy as np
import pytest
import tiny_run
from test_oip import client, fake_server, infer, photos_input
from test_predict import direct_distributions, run_predict
from test_serve import ENV, SERVE, drawn_face, png
from test_serve_limits import crop
from tritonclient.utils import InferenceServerException

from agejax import errors, labels
from agejax.data import faces
from agejax.evaluation import calibration
from agejax.inference import export, photos, prediction
from agejax.serving import local

THRESHOLDS = (18, 25)
ATOL = 1e-6


def reference_under(probs, bins, thresholds) -> np.ndarray:
  """[..., len(T)] P(age < T) summed in float64 over the bins whose age is below T: the formula, written again."""
  probs, bins = np.asarray(probs, np.float64), np.asarray(bins, np.float64)
  return np.stack([np.where(bins < t, probs, 0.0).sum(-1) for t in thresholds], axis=-1)


# --- the function ---


@pytest.mark.parametrize("min_age,max_age", [(1, 100), (3, 80), (16, 20)])
def test_probability_under_is_the_float64_sum_of_the_bins_below_each_age(min_age, max_age):
  rng = np.random.default_rng(min_age)
  bins = labels.age_bins(min_age, max_age)
  probs = rng.dirichlet(np.full(len(bins), 0.3), size=(3, 7)).astype(np.float32)  # [3, 7, K]: any leading shape
  thresholds = [18, 0, min_age, min_age + 1, max_age, max_age + 1, 25, 10**30]
  got = labels.probability_under(probs, bins, thresholds)
  assert got.shape == (3, 7, len(thresholds)) and got.dtype == np.float64
  np.testing.assert_allclose(got, reference_under(probs, bins, thresholds), atol=1e-12, rtol=0)
  # Ages at or below the first bin: no mass below them; past the last bin: all of it.
  assert (got[..., [1, 2]] == 0).all()
  for k in (5, 7):
    np.testing.assert_allclose(got[..., k], np.asarray(probs, np.float64).sum(-1), atol=1e-12, rtol=0)
  # Age < 18 is the bins 17 and below: the 18th birthday is not reached.
  if min_age <= 17 < max_age:
    np.testing.assert_allclose(got[..., 0], probs[..., : 17 - min_age + 1].astype(np.float64).sum(-1), atol=1e-12)


def test_a_threshold_is_answered_once_in_the_order_given_and_a_list_parses():
  probs = np.eye(5, dtype=np.float32)  # ages 1..5, one-hot
  got = labels.probability_under(probs, labels.age_bins(1, 5), [4, 2, 4])
  np.testing.assert_array_equal(got, [[1, 1], [1, 0], [1, 0], [0, 0], [0, 0]])
  assert labels.parse_thresholds(" 25, 18 ,25,+3") == (25, 18, 3)
  assert labels.parse_thresholds("18") == (18,) and labels.check_thresholds([np.int64(18)]) == (18,)


@pytest.mark.parametrize(
  "thresholds,words",
  [
    ([17.5], "age threshold 17.5: must be a whole age"),
    ([-1], "age threshold -1: must be an age of 0 or more"),
    ([True], "age threshold True"),
    (["18"], "age threshold '18'"),
    (" 18,abc", "age threshold 'abc'"),
    ("18,-3", "age threshold -3: must be an age of 0 or more"),
    ("18.5", "age threshold '18.5'"),
    ("18,", "age threshold ''"),
  ],
)
def test_a_bad_threshold_fails_in_one_line_naming_it(thresholds, words):
  with pytest.raises(errors.UserError) as caught:
    if isinstance(thresholds, str):
      labels.parse_thresholds(thresholds)
    else:
      labels.probability_under(np.ones((1, 3)) / 3, labels.age_bins(1, 3), thresholds)
  assert words in str(caught.value) and "\n" not in str(caught.value)


# --- the trained tiny run: Predictor, predict.py, an export ---


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory):
  """The session's learned tiny run (copied for this module)."""
  return tiny_run.tiny_run(request, tmp_path_factory)[1]


@pytest.fixture(scope="module")
def predictor(workdir) -> prediction.Predictor:
  return prediction.Predictor(workdir)


@pytest.fixture(scope="module")
def crops(predictor) -> np.ndarray:
  """Five generated faces (ages 5..33) at the model's input size."""
  size = predictor.input_size
  return np.stack([faces.centre_square(faces.open_rgb(drawn_face(i, size)), size) for i in range(5)])


def calibrated_under(workdir, images: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
  """P(age < T) of the best checkpoint's distributions at the workdir's fitted temperature, called without Predictor."""
  fitted = calibration.load(workdir)
  assert fitted is not None and fitted.temperature != 1.0  # the trainer fitted one: the test sees it applied
  probs = direct_distributions(workdir, images, fitted.temperature, flip=False)
  return reference_under(probs, labels.age_bins(1, 100), thresholds)


@pytest.mark.slow  # ~20 s: restores and compiles the model twice (Predictor and the direct reference)
def test_the_predictor_gives_the_calibrated_distributions_mass_below_each_age(workdir, predictor, crops, tmp_path):
  expected = calibrated_under(workdir, crops)
  assert ((expected > 1e-3) & (expected < 1 - 1e-3)).any()  # some face is neither surely under nor surely over
  np.testing.assert_allclose(predictor.probability_under(predictor(crops), THRESHOLDS), expected, atol=ATOL, rtol=0)
  files = []
  for i, image in enumerate(crops):
    files.append(tmp_path / f"{i}.png")
    files[-1].write_bytes(png(image))
  results = list(photos.predict_files(predictor, files, aligned=True, under=[25, 18, 25]))
  got = [[r.faces[0].p_under[t] for t in THRESHOLDS] for r in results]
  assert [list(r.faces[0].p_under) for r in results] == [[25, 18]] * len(files)  # as asked, each once
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
  assert photos.face_json(results[0].faces[0])["p_under"] == {"25": got[0][1], "18": got[0][0]}
  assert "P(age<25) " in photos.to_lines(results[0])[0]
  with pytest.raises(errors.UserError, match="age threshold -1"):
    list(photos.predict_files(predictor, files, aligned=True, under=[-1]))


@pytest.mark.slow  # the session's export (~1 min when no other test has made it) and the model compiled twice
def test_an_export_returns_the_workdirs_p_under(request, tmp_path_factory, workdir, predictor, crops):
  out, manifest = tiny_run.tiny_export(request, tmp_path_factory)
  loaded = export.ExportedPredictor(out)
  assert manifest["temperature"] == predictor.temperature
  from_export = loaded.probability_under(loaded(crops), THRESHOLDS)
  np.testing.assert_allclose(from_export, predictor.probability_under(predictor(crops), THRESHOLDS), atol=ATOL)
  np.testing.assert_allclose(from_export, calibrated_under(workdir, crops), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_predict_py_under_prints_p_under_per_face_and_refuses_a_bad_age(workdir, crops, tmp_path):
  folder = tmp_path / "crops"
  folder.mkdir()
  for i, image in enumerate(crops):
    (folder / f"{i}.png").write_bytes(png(image))
  proc = run_predict("--workdir", str(workdir), "--aligned", "--json", "--under", "18,25", str(folder))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [set(face["p_under"]) for face in lines] == [{"18", "25"}] * len(crops)
  got = np.asarray([[face["p_under"][str(t)] for t in THRESHOLDS] for face in lines])
  np.testing.assert_allclose(
    got, reference_under([face["distribution"] for face in lines], labels.age_bins(1, 100), THRESHOLDS), atol=ATOL
  )
  np.testing.assert_allclose(got, calibrated_under(workdir, crops), atol=ATOL, rtol=0)

  proc = run_predict("--workdir", str(workdir), "--aligned", "--under", "18", str(folder / "0.png"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = proc.stdout.splitlines()
  assert line.endswith(f"  P(age<18) {got[0, 0]:.4f}"), line

  proc = run_predict("--workdir", str(workdir), "--under", "18,x", str(folder))
  assert proc.returncode != 0
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .endswith("age threshold 'x': give whole ages in years separated by commas, e.g. 18,25")
  )


# --- the server: parsing `under` on FakeModel (one-hot: age = pixel value + 1), numbers on the tiny run ---


@pytest.fixture(scope="module")
def fake():
  with fake_server() as addresses:
    yield addresses


def one_hot_under(values, thresholds) -> list[list[float]]:
  """FakeModel's P(age < T) of flat crops of these values: 1 where value + 1 < T."""
  return [[float(v + 1 < t) for t in thresholds] for v in values]


def test_v1_takes_under_as_a_query_form_or_json_field(fake):
  url = "http://" + fake[0] + "/v1/predict"
  values = [10, 20]
  files = [("files", (f"{v}.png", crop(v))) for v in values]
  by_query = httpx.post(url, files=files, params={"aligned": "true", "under": "18,25"}, timeout=30)
  by_form = httpx.post(url, files=files, data={"aligned": "true", "under": "18,25"}, timeout=30)
  images = [base64.b64encode(crop(v)).decode() for v in values]
  by_json = httpx.post(url, json={"images": images, "aligned": True, "under": [18, 25]}, timeout=30)
  by_int = httpx.post(url, json={"images": images[:1], "aligned": True, "under": 18}, timeout=30)
  without = httpx.post(url, files=files, params={"aligned": "true"}, timeout=30)
  expected = [{"18": a, "25": b} for a, b in one_hot_under(values, THRESHOLDS)]
  for response in (by_query, by_form, by_json):
    assert response.status_code == 200, response.text
    assert [r["faces"][0]["p_under"] for r in response.json()["results"]] == expected
  assert by_int.json()["results"][0]["faces"][0]["p_under"] == {"18": 1.0}
  assert "p_under" not in without.json()["results"][0]["faces"][0]


@pytest.mark.parametrize(
  "params,json_under,words",
  [
    ({"under": "18,abc"}, None, "under: age threshold 'abc'"),
    ({"under": "-1"}, None, "under: age threshold -1: must be an age of 0 or more"),
    ({"under": ",".join(map(str, range(40)))}, None, "under: 40 ages, at most 32 in one request"),
    ({}, True, '"under" must be ages such as "18,25", 18 or [18, 25], not True'),
    ({}, [18.5], '"under" must be ages such as "18,25", 18 or [18, 25], not [18.5]'),
    ({}, "18;25", "under: age threshold '18;25'"),
  ],
)
def test_v1_refuses_a_bad_under_in_one_line_and_keeps_serving(fake, params, json_under, words):
  url = "http://" + fake[0] + "/v1/predict"
  if json_under is None:
    response = httpx.post(url, files=[("files", ("a.png", crop(3)))], params={"aligned": "true", **params}, timeout=30)
  else:
    body = {"images": [base64.b64encode(crop(3)).decode()], "aligned": True, "under": json_under}
    response = httpx.post(url, json=body, timeout=30)
  assert response.status_code == 400 and words in response.json()["error"], response.text
  assert "\n" not in response.json()["error"]
  ok = httpx.post(url, files=[("files", ("a.png", crop(3)))], params={"aligned": "true", "under": "5"}, timeout=30)
  assert ok.json()["results"][0]["faces"][0]["p_under"] == {"5": 1.0}


@pytest.mark.parametrize("protocol,binary", [("http", True), ("http", False), ("grpc", True)])
def test_the_protocol_answers_p_under_when_the_parameter_under_is_given(fake, protocol, binary):
  values = [3, 30, 200]
  crops = np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])
  with client(protocol, fake) as c:
    got = infer(c, protocol, "images", crops, binary=binary, parameters={"under": "25,18"}).as_numpy("p_under")
    one = infer(
      c, protocol, "photos", photos_input([crop(10)], binary), binary=binary, parameters={"aligned": True, "under": 18}
    )
    without = infer(c, protocol, "images", crops, binary=binary)
    with pytest.raises(InferenceServerException, match="needs the request parameter 'under'"):
      infer(c, protocol, "images", crops, binary=binary, outputs=["p_under"])
    with pytest.raises(InferenceServerException, match="parameter under: age threshold 'x'"):
      infer(c, protocol, "images", crops, binary=binary, parameters={"under": "18,x"})
  assert got.dtype == np.float32 and got.shape == (3, 2)
  np.testing.assert_array_equal(got, one_hot_under(values, (25, 18)))
  np.testing.assert_array_equal(one.as_numpy("p_under"), [[1.0]])
  assert without.as_numpy("p_under") is None  # answered only when asked for with ages


def test_the_metadata_lists_p_under(fake):
  meta = httpx.get("http://" + fake[0] + "/v2/models/agejax", timeout=30).json()
  assert {"name": "p_under", "datatype": "FP32", "shape": [-1, -1]} in meta["outputs"]


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
  """(serve.py on the tiny run with --grpc_port, its gRPC port); --max_batch=1 as test_oip's (one padded size)."""
  grpc_port = local.free_port()
  flags = tiny_run.serve_flags(request, tmp_path_factory, "--grpc_port", str(grpc_port), "--max_batch=1")
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    yield running, grpc_port


@pytest.mark.slow
def test_the_server_answers_the_calibrated_p_under_over_v1_and_the_protocol(served, workdir, crops):
  running, grpc_port = served
  response = httpx.post(
    running.url + "/v1/predict",
    files=[("files", (f"{i}.png", png(x))) for i, x in enumerate(crops)],
    params={"aligned": "true", "under": "18,25"},
    timeout=120,
  )
  assert response.status_code == 200, response.text
  v1 = [face for result in response.json()["results"] for face in result["faces"]]
  got = np.asarray([[face["p_under"][str(t)] for t in THRESHOLDS] for face in v1])
  bins = labels.age_bins(1, 100)
  np.testing.assert_allclose(got, reference_under([f["distribution"] for f in v1], bins, THRESHOLDS), atol=ATOL)
  np.testing.assert_allclose(got, calibrated_under(workdir, crops), atol=ATOL, rtol=0)
  addresses = (running.url.removeprefix("http://"), f"127.0.0.1:{grpc_port}")
  for protocol in ("http", "grpc"):
    with client(protocol, addresses) as c:
      result = infer(c, protocol, "images", crops, parameters={"under": "18,25"})
    np.testing.assert_allclose(result.as_numpy("p_under"), got, atol=ATOL, rtol=0)
