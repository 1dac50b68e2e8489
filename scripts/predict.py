"""Predicts ages in photos: python scripts/predict.py --workdir DIR IMAGE_OR_FOLDER ... [--aligned] [--json].

Prints one line per face (file, face index, box x,y,w,h, predicted age, its central 80% interval,
argmax age, std) or, with --json, one JSON object per line on stdout (the same fields plus the full
distribution over ages min_age.. ; files without a face or that could not be read give {"file",
"status"}). Progress goes to stderr. WORKDIR/calibration.json's temperature is applied when present
(--no-calibration: the raw model). Without --aligned, faces are found with MTCNN, rotated upright and cropped like the
training faces; with --aligned each file is already a face crop.
"""

import json
import sys

from absl import app, flags

from agejax import cli
from agejax.inference import figures, photos, prediction
from agejax.training import checkpointing

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", f"Checkpoint: {checkpointing.CHECKPOINT_CHOICES}.")
_ALIGNED = flags.DEFINE_bool("aligned", False, "The images are face crops already: skip detection.")
_JSON = flags.DEFINE_bool("json", False, "Write JSON lines (with the full distributions) to stdout.")
_PLOT = flags.DEFINE_string("plot", None, "Save a PNG of the photos, boxes and distributions here.")
_NO_CALIBRATION = flags.DEFINE_bool(
  "no-calibration", False, "Ignore WORKDIR/calibration.json's temperature: the raw model's distributions."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Faces per model call.", lower_bound=1)
PLOT_MAX_PHOTOS = 8
flags.mark_flags_as_required(["workdir"])


def main(argv):
  from tqdm.auto import tqdm

  if len(argv) < 2:
    raise app.UsageError("give at least one IMAGE_OR_FOLDER")
  predictor = prediction.Predictor(
    _WORKDIR.value, _CHECKPOINT.value, batch_size=_BATCH_SIZE.value, calibrated=not _NO_CALIBRATION.value
  )
  detector = None if _ALIGNED.value else photos.FaceDetector()
  files = photos.list_files(argv[1:])
  plotted = []
  for result in photos.predict_files(
    predictor,
    tqdm(files, desc="predict", unit="file"),
    aligned=_ALIGNED.value,
    detector=detector,
    keep_photos=PLOT_MAX_PHOTOS if _PLOT.value else 0,
  ):
    if _JSON.value:
      lines = [json.dumps(obj) for obj in photos.to_json(result, int(predictor.bins[0]))]
    else:
      lines = photos.to_lines(result)
    for line in lines:
      tqdm.write(line, file=sys.stdout)
    if result.photo is not None:
      plotted.append(result)
  if _PLOT.value:
    if plotted:
      figures.plot_results(plotted, predictor.bins, _PLOT.value)
      print(f"plot of {len(plotted)} photo(s) saved to {_PLOT.value}", file=sys.stderr)
    else:
      print(f"no faces: {_PLOT.value} not written", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
