"""Predictor: a trained model as a function of uint8 face crops -> age distributions, over every device."""

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agejax import errors, labels, metrics, parallel, storage
from agejax.data import framing, pipeline
from agejax.evaluation import calibration


@jax.jit
def summaries(probs: jax.Array, bins: jax.Array, masses: jax.Array | None = None) -> dict[str, jax.Array]:
  """Returns each distribution's expected age, peak (argmax_age, its mode), std and 80% interval.

  Args:
    probs: [..., K] distributions over the age bins.
    bins: [K] the ages of the bins.
    masses: [len(calibration.INTERVAL_BUCKETS)] the 80% interval's mass per age bucket
      (`Calibration.shown_masses()`): the whole-year interval that holds by age bucket; None: the
      central 80% interval.
  """
  if masses is None:
    low, high = calibration.interval(probs, bins, calibration.INTERVAL_MASS)
  else:
    low, high = calibration.adjusted_interval(probs, bins, masses)
  return {
    "predicted_age": labels.expected_age(probs, bins),
    "argmax_age": labels.argmax_age(probs, bins),
    "std": labels.distribution_std(probs, bins),
    "interval80": jnp.stack([low, high], axis=-1),
  }


class Predictor:
  """A restored model with a jitted, data-parallel prediction over the device mesh.

  Args:
    workdir: the training workdir (a path or a gs:// URL).
    checkpoint: 'best' (lowest eval MAE), 'latest' or a step number.
    config: the training config; default: WORKDIR/config.json.
    flip: average each face's distribution with its mirror image's (calibrated by the flip way's
      temperature and interval masses).
    batch_size: faces per model call (rounded up to a multiple of the device count); default: the
      config's eval batch size.
    calibrated: apply WORKDIR/calibration.json's calibration of this way of predicting (single
      views or flip averages) when the workdir has one.

  Attributes:
    calibration: what the distributions and intervals are calibrated by (temperature 1 and central
      intervals when uncalibrated); pass `calibration.shown_masses()` to `summaries`.
    calibrated: whether a calibration.json way was applied.
  """

  def __init__(
    self,
    workdir: storage.Location,
    checkpoint: str | int = "best",
    config: ml_collections.ConfigDict | None = None,
    *,
    flip: bool = False,
    batch_size: int | None = None,
    calibrated: bool = True,
  ):
    if batch_size is not None and batch_size < 1:
      raise errors.UserError(
        f"batch_size={batch_size}: must be a positive number of faces per model call (None: the config's eval batch)"
      )
    # The trainer's modules (Orbax, the learner, SciPy through the evaluation): imported here, where a
    # workdir is read, so that an export's server, its photo workers and summaries() start without them.
    from agejax.inference import loading

    self.cfg, self.learner, self.state = loading.load_trained(workdir, checkpoint, config)
    self.model = self.learner.model
    self.record = loading.load_inference_record(workdir)
    # Where new faces' landmarks go in their crops (the training crops' framing); None: the fixed margin.
    self.framing = framing.from_record(self.record)
    self.step = int(self.state.step)
    self.flip = flip
    fitted = calibration.load(workdir, self.step, flip=flip) if calibrated else None
    self.calibrated = fitted is not None
    self.calibration = fitted or calibration.Calibration()
    self.temperature = self.calibration.temperature
    self.bins = np.asarray(self.model.bins)
    self.mesh = parallel.make_mesh()
    self.batch_size = parallel.device_multiple(batch_size or self.cfg.eval.batch_size)
    self.sharding = parallel.data_sharded(self.mesh)
    replicated = parallel.replicated(self.mesh)
    self._temperature = jax.device_put(np.float32(self.temperature), replicated)
    self.predict_device = jax.jit(
      lambda state, images, temperature: self.model.distributions(state, images, temperature, flip),
      in_shardings=(replicated, self.sharding, replicated),
      out_shardings=replicated,
    )

  @property
  def input_spec(self) -> dict:
    """The input the weights expect (pixel range, channel order, mean, std), as inference.json records it."""
    return self.model.input_spec.to_json()

  @property
  def eval_crop(self) -> float:
    """The central fraction of each crop's side the model sees before its resize (config.json's `data.eval_crop`)."""
    return self.model.eval_crop

  @property
  def input_size(self) -> int:
    """The side of the training data's stored faces: new faces are cropped to it, as the training data was."""
    return int(self.record["input_size"])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Returns distributions [N, K] for uint8 images [N, H, W, 3], run in padded batches.

    Args:
      images: uint8 RGB face crops, [N, H, W, 3].

    Returns:
      float32 probabilities over the age bins, [N, K].
    """
    if not len(images):
      return np.zeros((0, len(self.bins)), np.float32)
    data = pipeline.ArraySplit(np.asarray(images), np.zeros(len(images), np.float32), np.zeros(len(images), np.float32))
    out, in_flight = [], parallel.InFlight()
    for batch in pipeline.eval_batches(data, self.batch_size):  # the pipeline's one padding routine
      images_device = parallel.global_batch({"image": batch["image"]}, self.sharding)["image"]
      out.append(in_flight.add(self.predict_device(self.state, images_device, self._temperature)))
    return np.concatenate([metrics.fetch_array(o) for o in out])[: len(images)]

  def probability_under(self, probs: np.ndarray, thresholds: Iterable[int]) -> np.ndarray:
    """Returns P(age < T) [N, len(T)] of distributions [N, K] this predictor returned (`labels.probability_under`).

    The distributions are already calibrated (the temperature is applied inside the model call), so
    this is the calibrated probability of being under each threshold age.
    """
    return labels.probability_under(probs, self.bins, thresholds)

  def predict_padded(self, images: np.ndarray) -> np.ndarray:
    """Returns distributions [B, K] of exactly this batch, in one call compiled for batch size B.

    A server pads its batches to a few fixed sizes and calls this, so each size compiles once
    (`__call__` always pads to `batch_size`, which wastes compute on a batch of one).

    Args:
      images: uint8 RGB face crops, [B, H, W, 3], B a multiple of the device count (already padded).

    Returns:
      float32 probabilities over the age bins, [B, K].
    """
    if len(images) % jax.device_count():
      raise ValueError(f"batch of {len(images)} images: must be a multiple of the {jax.device_count()} devices")
    images_device = parallel.global_batch({"image": np.asarray(images)}, self.sharding)["image"]
    return metrics.fetch_array(self.predict_device(self.state, images_device, self._temperature))
