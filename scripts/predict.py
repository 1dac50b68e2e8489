"""Predicts ages in photos: python scripts/predict.py --workdir DIR IMAGE_OR_FOLDER ... [--aligned] [--json] [--flip].

Prints one line per face (file, face number from 1, box x,y,w,h, predicted age, its 80% interval,
argmax age, std, and P(age < T) with --under) or, with --json, one JSON object per line on stdout:
`face` (the face's index in its photo, from 0), `box`, `age` (the expected age; `predicted_age`
repeats it for one release), `argmax_age`, `std`, `interval80`, with --under T1,T2 `p_under`
({"18": P(age < 18), ...}: the calibrated distribution's mass below each age, i.e. before that
birthday) and the full distribution over ages min_age.. ; files
without a face or that could not be read give {"file", "status"}. A named path that does not exist
is an error; an unreadable file inside a named folder is a skip. Progress goes to stderr.
WORKDIR/calibration.json's temperature is applied when present (--nocalibration: the raw model),
and the 80% interval is adjusted by age bucket (its interval_masses); else it is the central one.
--flip averages each face with its mirror image, calibrated by calibration.json's flip temperature.
Without --aligned, faces are found with MTCNN, rotated upright and cropped like the training faces;
with --aligned each file is already a face crop.
"""

import json
import os
import sys

from absl import app, flags

from agejax import cli, errors, labels, storage
from agejax.inference import figures, photos, prediction

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
_CHECKPOINT = cli.checkpoint_flag()
_ALIGNED = flags.DEFINE_bool("aligned", False, "The images are face crops already: skip detection.")
_JSON = flags.DEFINE_bool("json", False, "Write JSON lines (with the full distributions) to stdout.")
_PLOT = flags.DEFINE_string("plot", None, "Save a PNG of the photos, boxes and distributions here (folders are made).")
_CALIBRATION = cli.calibration_flag("the raw model's distributions")
_FLIP = cli.flip_flag("slower (two model calls a face)")
_UNDER = flags.DEFINE_string(
  "under", None, "Also give each face's calibrated P(age < T) for these whole ages T, e.g. 18,25 (`p_under`)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Faces per model call.", lower_bound=1)
PLOT_MAX_PHOTOS = 8
flags.mark_flags_as_required(["workdir"])


def main(argv):
  from tqdm.auto import tqdm

  if len(argv) < 2:
    raise app.UsageError("give at least one IMAGE_OR_FOLDER")
  check_inputs(argv[1:])
  under = labels.parse_thresholds(_UNDER.value) if _UNDER.value is not None else ()
  if _PLOT.value:
    figures.check_plot_path(_PLOT.value)
  predictor = prediction.Predictor(
    _WORKDIR.value, _CHECKPOINT.value, batch_size=_BATCH_SIZE.value, calibrated=_CALIBRATION.value, flip=_FLIP.value
  )
  detector = None if _ALIGNED.value else photos.FaceDetector()
  files = photos.list_files(argv[1:])
  plotted = []
  counts = {"faces": 0, "no face": 0, "skipped": 0}
  for result in photos.predict_files(
    predictor,
    tqdm(files, desc="predict", unit="file"),
    aligned=_ALIGNED.value,
    detector=detector,
    keep_photos=PLOT_MAX_PHOTOS if _PLOT.value else 0,
    under=under,
  ):
    if _JSON.value:
      lines = [json.dumps(obj) for obj in json_objects(result, int(predictor.bins[0]))]
    else:
      lines = human_lines(result)
    for line in lines:
      tqdm.write(line, file=sys.stdout)
    if result.photo is not None:
      plotted.append(result)
    counts["faces"] += len(result.faces)
    counts["no face"] += result.status == "no face found"
    counts["skipped"] += not result.faces and result.status != "no face found"
  print(
    f"{len(files)} file(s): {counts['faces']} face(s) predicted, {counts['no face']} without a face, "
    f"{counts['skipped']} skipped (not readable as an image)",
    file=sys.stderr,
  )
  if _PLOT.value:
    if plotted:
      figures.plot_results(plotted, predictor.bins, _PLOT.value)
      print(f"plot of {len(plotted)} photo(s) saved to {_PLOT.value}", file=sys.stderr)
    else:
      print(f"no faces: {_PLOT.value} not written", file=sys.stderr)


def check_inputs(inputs: list[str]) -> None:
  """Fails in one line, before the model loads, on a named file or folder that does not exist."""
  for item in inputs:
    if not storage.path(item).exists():
      kind = "folder" if item.endswith(("/", os.sep)) else "file"
      raise errors.MissingInput(f"{item} does not exist (no such {kind})")


def json_objects(result: photos.ImageResult, min_age: int) -> list[dict]:
  """A result's JSON objects, the expected age as `age` (the server's name) and, for one release, `predicted_age`."""
  objects = []
  for obj in photos.to_json(result, min_age):
    if "predicted_age" in obj:
      age = obj["predicted_age"]
      obj = {("age" if k == "predicted_age" else k): v for k, v in obj.items()} | {"predicted_age": age}
    objects.append(obj)
  return objects


def human_lines(result: photos.ImageResult) -> list[str]:
  """A result's lines for people: one per face, numbered from 1 as the plot and the server's page do; or its status."""
  if not result.faces:
    return [f"{result.file}  {'' if result.status == 'no face found' else 'skipped: '}{result.status}"]
  return [
    f"{result.file}  face {number}  box {','.join(str(round(v)) for v in f.box)}  age {f.predicted_age:.1f}"
    f"  (80%: {f.interval80[0]:.0f}-{f.interval80[1]:.0f})  argmax {f.argmax_age:.0f}  std {f.std:.1f}"
    f"{photos.under_text(f)}"
    for number, f in enumerate(result.faces, start=1)
  ]


if __name__ == "__main__":
  cli.run(main)
