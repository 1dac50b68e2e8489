"""The unified age-estimation benchmark's input: its central evaluation crop and its square random resized crop.

The benchmark (Paplham & Franc, CVPR 2024) stores 281 px faces (the box plus 5% a side), evaluates
albumentations' CenterCrop(256, 256) of them and trains on RandomResizedCrop(256, scale=(0.8, 1),
ratio=(1, 1)) with a horizontal flip. `data.eval_crop` and `augment.resized_crop_min_area` give both.
"""

import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import DISTRIBUTION_ATOL, array_cache, assert_same_distributions
from PIL import Image

from agejax import errors, models, settings
from agejax.inference import export, loading, photos, prediction
from agejax.training import augment, checkpointing, configuration, learner, train
from configs import vgg16_kl

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
# Pixels as they are: augment's output reads back in grey levels 0..255.
RAW = models.InputSpec(pixel_range=255.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def preprocess(images, image_size: int, eval_crop: float) -> np.ndarray:
  """The evaluation input of a model (no network needed) with this input size and crop."""
  model = models.AgeModel(None, np.zeros(1, np.float32), image_size, models.IMAGENET, eval_crop=eval_crop)
  return np.asarray(jax.jit(model.preprocess)(jnp.asarray(images)), np.float64)


def normalised(pixels: np.ndarray) -> np.ndarray:
  """uint8-valued pixels -> ImageNet-normalised floats, in float64."""
  return (np.asarray(pixels, np.float64) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


# --- the evaluation crop ---------------------------------------------------------------------------


def test_the_benchmarks_eval_crop_of_a_281_face_is_its_central_256_pixels_normalised():
  images = np.random.default_rng(0).integers(0, 256, (2, 281, 281, 3), dtype=np.uint8)
  got = preprocess(images, 256, 256 / 281)
  # albumentations' CenterCrop(256, 256) on 281 px: rows and columns (281 - 256) // 2 = 12 .. 267.
  np.testing.assert_allclose(got, normalised(images[:, 12:268, 12:268]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
  "shape, eval_crop, image_size, window",
  [
    ((281, 281), 256 / 281, 64, (12, 268, 12, 268)),
    ((40, 40), 0.75, 32, (5, 35, 5, 35)),  # a 30 px crop enlarged to 32
    ((30, 45), 0.6, 16, (6, 24, 9, 36)),  # per side: 18 x 27 from (6, 9)
  ],
)
def test_the_eval_crop_comes_before_the_resize(shape, eval_crop, image_size, window):
  images = np.random.default_rng(1).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
  top, bottom, left, right = window
  crop = images[:, top:bottom, left:right].astype(np.float32) / 255.0
  resized = jax.image.resize(crop, (2, image_size, image_size, 3), method="linear", antialias=True)
  expected = (np.asarray(resized, np.float64) - IMAGENET_MEAN) / IMAGENET_STD
  np.testing.assert_allclose(preprocess(images, image_size, eval_crop), expected, atol=1e-5, rtol=0)
  # The crop is what differs from the whole face resized.
  assert np.abs(preprocess(images, image_size, 1.0) - expected).max() > 0.1


def test_an_eval_crop_of_one_is_the_whole_face_resized():
  images = np.random.default_rng(2).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  whole = jax.image.resize(images.astype(np.float32) / 255.0, (2, 32, 32, 3), method="linear", antialias=True)
  np.testing.assert_allclose(
    preprocess(images, 32, 1.0), (np.asarray(whole, np.float64) - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5, rtol=0
  )


# --- the square random resized crop ----------------------------------------------------------------

STEP = 5  # grey levels per pixel of the ramps
TOL = 0.1  # pixels: how well a window is read back from a shrunk ramp


def ramps(h: int, w: int, n: int) -> jnp.ndarray:
  """n copies of a uint8 image whose red channel is STEP * row + 2 and green STEP * column + 2 (blue flat)."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  image = np.stack([STEP * rows + 2, STEP * cols + 2, np.full_like(rows, 128)], -1).astype(np.uint8)
  return jnp.asarray(np.broadcast_to(image, (n, h, w, 3)))


def read_window(profile: np.ndarray, size: int, length: int) -> tuple[float, float, bool, float]:
  """(the window's side, its start, whether it runs backwards (a mirrored ramp), the fit's worst residual).

  A ramp value STEP * (u - 0.5) + 2 at input coordinate u (pixel i's centre is i + 0.5), resized from
  the window [start, start + side) to `size` pixels, gives output pixel k the value at
  u = start + (k + 0.5) * side / size: a line in k whose slope is STEP * side / size. The first and
  last few pixels are left out: there the resampling kernel reaches past the window, toward the image's edge.
  """
  k = np.arange(3, size - 3)
  t = k + 0.5
  slope, intercept = np.polyfit(t, profile[k], 1)
  residual = float(np.abs(profile[k] - (slope * t + intercept)).max())
  side = abs(slope) * size / STEP
  if slope > 0:
    start = (intercept - 2 + STEP * 0.5) / STEP
  else:  # mirrored: column j holds STEP * (length - 1 - j) + 2
    start = (STEP * (length - 1) + 2 + STEP * 0.5 - intercept) / STEP
  return side, start, slope < 0, residual


def windows(out: np.ndarray, h: int, w: int) -> list[tuple[float, float, float, float, bool, float]]:
  """Each output's (side read from rows, from columns, top, left, mirrored, worst residual)."""
  size = out.shape[1]
  found = []
  for image in np.asarray(out, np.float64):
    side_y, top, backwards, res_y = read_window(image[:, :, 0].mean(axis=1), size, h)
    side_x, left, mirrored, res_x = read_window(image[:, :, 1].mean(axis=0), size, w)
    assert not backwards  # flips are horizontal
    found.append((side_y, side_x, top, left, mirrored, max(res_y, res_x)))
  return found


@pytest.mark.slow
@pytest.mark.parametrize(
  "size, linear",
  [
    # Shrinking (as 251-281 px windows to 256): antialiased linear weights on a pixel grid bend a ramp
    # by up to ~0.4 grey levels (0.06 px); windows read back within 0.08 px (measured): TOL below.
    (32, 0.5),
    (64, 1e-3),  # enlarging: plain linear interpolation, a ramp stays a ramp
  ],
)
def test_each_resized_crop_is_a_square_window_inside_the_face_of_80_to_100_percent_of_its_area(size, linear):
  h = w = 48
  n = 200
  c = settings.AugmentSettings(flip=True, scale=0.0, translate=0.0, resized_crop_min_area=0.8)
  out = jax.jit(lambda x, key: augment.augment(x, key, size, c, RAW))(ramps(h, w, n), jax.random.key(0))
  assert out.shape == (n, size, size, 3)
  found = windows(np.asarray(out), h, w)
  areas, starts = [], []
  for side_y, side_x, top, left, _, residual in found:
    assert residual < linear, residual  # a line: the resize of one window of the ramp
    assert abs(side_y - side_x) < 2 * TOL, (side_y, side_x)  # square
    side = (side_y + side_x) / 2
    areas.append(side * side / (h * w))
    assert -TOL < top and top + side < h + TOL, (top, side)  # inside the face: nothing padded
    assert -TOL < left and left + side < w + TOL, (left, side)
    starts.append(top / max(h - side, 1e-6))
  areas = np.array(areas)
  assert areas.min() > 0.8 - 0.01 and areas.max() < 1 + 0.01, (areas.min(), areas.max())
  assert areas.min() < 0.82 and areas.max() > 0.98  # the whole range is drawn
  assert np.min(starts) < 0.1 and np.max(starts) > 0.9  # and the whole room to place it
  flips = sum(f[4] for f in found)
  assert 70 <= flips <= 130, flips  # p = 0.5 over 200 draws: 4 standard deviations either side


@pytest.mark.slow
def test_a_resized_crop_of_a_wide_face_is_at_most_its_height_and_inside_it():
  h, w = 36, 50  # areas above 36 * 36 / (36 * 50) = 0.72 of the face are clipped to the height
  c = settings.AugmentSettings(flip=False, resized_crop_min_area=0.5)
  out = augment.augment(ramps(h, w, 64), jax.random.key(1), 32, c, RAW)
  sides = []
  for side_y, side_x, top, left, mirrored, residual in windows(np.asarray(out), h, w):
    side = (side_y + side_x) / 2
    assert residual < 0.5 and abs(side_y - side_x) < 2 * TOL and not mirrored
    assert np.sqrt(0.5 * h * w) - TOL < side < h + TOL  # the area's side, clipped to the height
    assert -TOL < top and top + side < h + TOL and -TOL < left and left + side < w + TOL
    sides.append(side)
  assert min(sides) < 31 and sum(s > h - TOL for s in sides) > 10  # both: drawn areas and clipped ones


def scale_translate_augment(images, key, size: int, cfg: settings.AugmentSettings, spec: models.InputSpec):
  """augment.augment as it was before the resized crop (agejax 8c30c5d), verbatim: the zero default's reference."""
  b = images.shape[0]
  x = images.astype(jnp.float32) / 255.0
  k_flip, k_scale, k_shift, k_bright, k_contrast, k_blur = jax.random.split(key, 6)
  if cfg.flip:
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1, :], x)
  if cfg.scale or cfg.translate:
    scale = 1.0 + jax.random.uniform(k_scale, (b, 1), minval=-cfg.scale, maxval=cfg.scale)
    scale = jnp.broadcast_to(scale, (b, 2))
    shift = jax.random.uniform(k_shift, (b, 2), minval=-cfg.translate, maxval=cfg.translate) * size
    x = jax.vmap(lambda im, s, t: augment._scale_crop(im, s, t, size))(x, scale, shift)
  else:
    x = models.resize(x, size)
  if cfg.brightness:
    x = x * (1.0 + jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-cfg.brightness, maxval=cfg.brightness))
  if cfg.contrast:
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    factor = 1.0 + jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=-cfg.contrast, maxval=cfg.contrast)
    x = (x - mean) * factor + mean
  if cfg.blur or cfg.sharpness:
    t = jax.random.uniform(k_blur, (b, 1, 1, 1), minval=-cfg.sharpness, maxval=cfg.blur)
    x = x + t * (augment.gaussian_blur(x) - x)
  return spec.normalize(jnp.clip(x, 0.0, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("zoom", [(0.2, 0.1), (0.0, 0.0)])
def test_no_resized_crop_leaves_the_scale_translate_augmentation_bit_identical(zoom):
  x = jnp.asarray(np.random.default_rng(3).integers(0, 256, (8, 40, 40, 3), dtype=np.uint8))
  c = settings.AugmentSettings(
    flip=True, scale=zoom[0], translate=zoom[1], brightness=0.2, contrast=0.2, blur=0.3, sharpness=0.3
  )
  assert c.resized_crop_min_area == 0.0  # the default
  key = jax.random.key(4)
  got = jax.jit(lambda x, k: augment.augment(x, k, 32, c, models.IMAGENET))(x, key)
  np.testing.assert_array_equal(
    got, jax.jit(lambda x, k: scale_translate_augment(x, k, 32, c, models.IMAGENET))(x, key)
  )
  cropped = dataclasses.replace(c, resized_crop_min_area=0.8)
  assert np.abs(np.asarray(augment.augment(x, key, 32, cropped, models.IMAGENET)) - np.asarray(got)).max() > 0.1


# --- config checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "key, value",
  [
    ("data.eval_crop", 0.0),
    ("data.eval_crop", 1.5),
    ("data.eval_crop", -0.5),
    ("augment.resized_crop_min_area", 1.5),
    ("augment.resized_crop_min_area", -0.1),
  ],
)
def test_a_crop_out_of_range_fails_in_one_line_naming_the_key(key, value):
  config = vgg16_kl.get_config("tiny")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(errors.UserError) as e:
    configuration.validate(config)
  assert str(e.value).startswith(f"config.{key}={value!r}: ") and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("key, value", [("data.eval_crop", 256 / 281), ("augment.resized_crop_min_area", 0.8)])
def test_the_benchmarks_values_pass(key, value):
  config = vgg16_kl.get_config("tiny")
  section, name = key.split(".")
  config[section][name] = value
  cfg = configuration.validate(config)
  assert getattr(getattr(cfg, section), name) == value


def test_a_default_run_records_no_eval_crop_and_reads_as_the_whole_crop():
  cfg = settings.Settings.from_config(vgg16_kl.get_config("tiny"))
  model = learner.create(cfg, 1, abstract=True)[0].model
  assert model.eval_crop == 1.0
  assert "eval_crop" not in checkpointing.inference_record(cfg, model, 40)  # as workdirs from before the crop


# --- a trained workdir with an eval crop ------------------------------------------------------------

EVAL_CROP = 0.75  # of the tiny demo's 40 px faces: round(30) px from (40 - 30) // 2 = 5, enlarged to 32
TOP = 5


@pytest.fixture(scope="module")
def workdir(data_dir, compilation_cache, tmp_path_factory):
  """A tiny run (tiny_run's recipe, half as long) trained and evaluated with data.eval_crop = EVAL_CROP."""
  config = vgg16_kl.get_config("tiny")
  config.data.data_dir = data_dir
  config.data.cache_dir = array_cache(data_dir)
  config.compilation_cache_dir = compilation_cache
  config.data.eval_crop = EVAL_CROP
  config.model.batch_norm = True
  config.batch_size = 32
  config.num_train_steps = 150
  config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = 150
  run = tmp_path_factory.mktemp("eval_crop_run")
  train.train_and_evaluate(config, run)
  return run


@pytest.fixture(scope="module")
def predictor(workdir) -> prediction.Predictor:
  return prediction.Predictor(workdir, batch_size=4)


@pytest.fixture(scope="module")
def faces(predictor) -> tuple[np.ndarray, np.ndarray]:
  """(4 stored-size uint8 crops, the distributions of their central crops cut here and seen whole by the model)."""
  size = predictor.input_size
  x = np.random.default_rng(5).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
  x[1] = 255 - x[0]
  side = size - 2 * TOP
  central = x[:, TOP : TOP + side, TOP : TOP + side]
  whole = dataclasses.replace(predictor.model, eval_crop=1.0)
  expected = jax.jit(whole.distributions)(predictor.state, jnp.asarray(central), predictor.temperature)
  return x, np.asarray(expected)


@pytest.mark.slow
def test_the_run_records_its_eval_crop_and_loading_builds_the_model_with_it(workdir, predictor):
  record = json.loads((workdir / checkpointing.INFERENCE_FILE).read_text())
  assert record["eval_crop"] == EVAL_CROP and record["input_size"] == 40
  assert predictor.eval_crop == predictor.model.eval_crop == EVAL_CROP
  assert loading.load_trained(workdir)[1].model.eval_crop == EVAL_CROP
  # A config.json from before the key: the whole crop, as such runs were evaluated.
  old = json.loads((workdir / checkpointing.CONFIG_FILE).read_text())
  del old["data"]["eval_crop"]
  assert loading.load_trained(workdir, config=ml_collections.ConfigDict(old))[1].model.eval_crop == 1.0


@pytest.mark.slow
def test_the_predictor_and_aligned_photos_see_the_central_crop(predictor, faces, tmp_path):
  x, expected = faces
  assert_same_distributions(predictor(x), expected)
  whole = dataclasses.replace(predictor.model, eval_crop=1.0)
  uncropped = np.asarray(jax.jit(whole.distributions)(predictor.state, jnp.asarray(x), predictor.temperature))
  assert np.abs(uncropped - expected).max() > 100 * DISTRIBUTION_ATOL  # the crop is seen
  files = []
  for i, crop in enumerate(x):  # scripts/predict.py --aligned: each file a stored-size face crop
    files.append(tmp_path / f"face{i}.png")
    Image.fromarray(crop).save(files[-1])
  results = list(photos.predict_files(predictor, files, aligned=True))
  assert_same_distributions(np.stack([r.faces[0].distribution for r in results]), expected)


@pytest.mark.slow
def test_an_export_records_the_crop_and_applies_it_inside_model_jax(workdir, faces, tmp_path):
  x, expected = faces
  out = tmp_path / "export"
  manifest = export.export_workdir(workdir, out, saved_model=False, platforms=("cpu",))
  assert manifest["eval_crop"] == EVAL_CROP and manifest["input_size"] == 40 and manifest["image_size"] == 32
  exported = export.ExportedPredictor(out)
  assert exported.eval_crop == EVAL_CROP
  assert_same_distributions(exported(x), expected)
  if manifest["files"]["onnx"]:  # written only after onnxruntime agreed with jax (export.ONNX_ATOL) on its crops
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / export.ONNX_FILE), providers=["CPUExecutionProvider"])
    got = session.run(None, {export.INPUT_NAME: x})[0]
    np.testing.assert_allclose(got, expected, atol=export.ONNX_ATOL, rtol=0)


@pytest.mark.slow
def test_the_server_sees_the_central_crop_and_healthz_says_so(workdir, predictor, faces):
  from starlette.testclient import TestClient

  from agejax import serving
  from agejax.serving import app as serving_app

  x, expected = faces
  model = serving.load_model(workdir, None, max_batch=2)
  app = serving_app.create_app(model, None, serving_app.Settings(max_batch=2), min_age=int(model.bins[0]))
  with TestClient(app) as client:
    assert client.get("/healthz").json()["eval_crop"] == EVAL_CROP
    for crop, want in zip(x[:2], expected[:2]):
      png = io.BytesIO()
      Image.fromarray(crop).save(png, "PNG")
      response = client.post("/v1/predict", files=[("files", ("face.png", png.getvalue()))], params={"aligned": "true"})
      assert response.status_code == 200, response.text
      (face,) = response.json()["results"][0]["faces"]
      assert_same_distributions(face["distribution"], want)


# --- scripts/benchmark.py input --reader grain (issue 37) -------------------------------------------


@pytest.fixture(scope="module")
def array_record_demo(tmp_path_factory) -> dict:
  """The tiny demo prepared as ArrayRecord (Grain reads it by index), and a cache folder of its own."""
  from agejax.data import datasets

  root = tmp_path_factory.mktemp("demo_array_record")
  datasets.prepare("demo", str(root / "tfds"), builder_config="tiny", file_format="array_record")
  return {"data_dir": str(root / "tfds"), "cache_dir": str(root / "arrays")}


# One worker process: ~50 s on 2 busy cores (the worker's imports), so slow; 0 decodes in this process.
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_the_grain_reader_gives_the_caches_batches_and_count(array_record_demo, workers):
  from agejax.benchmarks import runs

  data = settings.DataSettings("demo", array_record_demo["data_dir"], array_record_demo["cache_dir"], "tiny")
  steps = 7  # 7 x 32 > the 192 examples: across an epoch boundary
  n_cache, cache = runs.input_batches(data, "cache", batch=32, num_steps=steps)
  n_grain, grain = runs.input_batches(data, "grain", batch=32, num_steps=steps, grain_workers=workers)
  cache, grain = list(cache), list(grain)
  assert n_cache == n_grain == 192 and len(cache) == len(grain) == steps
  for want, got in zip(cache, grain):
    for key in ("image", "age", "age_std"):
      np.testing.assert_array_equal(got[key], want[key])
  row = runs.input_pipeline(
    "demo",
    array_record_demo["data_dir"],
    "tiny",
    batch=16,
    num_batches=4,
    reader="grain",
    grain_workers=workers,
    cache_dir=array_record_demo["cache_dir"],
  )
  assert row["reader"] == "grain" and row["grain_workers"] == workers and row["cores"] == max(1, workers), row
  assert row["batches"] == 4 and row["examples"] == 192 and row["image_shape"] == [40, 40, 3], row
  assert row["images_per_s"] > 0 and row["images_per_s_per_core"] == row["images_per_s"] / row["cores"]


def test_an_unknown_reader_fails_in_one_line(array_record_demo):
  from agejax.benchmarks import runs

  data = settings.DataSettings("demo", array_record_demo["data_dir"], array_record_demo["cache_dir"], "tiny")
  with pytest.raises(errors.UserError, match=r"^--reader='tfrecord' is not one of \('cache', 'grain'\)$"):
    runs.input_batches(data, "tfrecord")
