"""Evaluating a trained workdir: its checkpoint scored on a whole split, the reports written to WORKDIR/eval/."""

import json
from typing import Any

import jax
import ml_collections
from absl import logging

from agejax import parallel, storage
from agejax.data import pipeline
from agejax.evaluation import calibration, plots, scoring
from agejax.inference import loading


def evaluate_workdir(
  config: ml_collections.ConfigDict | None,
  workdir: storage.Location,
  split: str = "test",
  *,
  checkpoint: str | int = "best",
  flip: bool = False,
  calibrated: bool = True,
  fit_calibration: bool = False,
) -> dict[str, Any]:
  """Evaluates a trained workdir's checkpoint on every example of a split and writes WORKDIR/eval/.

  Writes `<split>.json` (the report), `<split>_predictions.jsonl` (one line per example) and
  `<split>_*.png` plots.

  Args:
    config: the training config; None: WORKDIR/config.json.
    workdir: the training workdir (a path or a gs:// URL).
    split: the dataset split to score.
    checkpoint: 'best', 'latest' or a step number.
    flip: average each face's distribution with its mirror image's.
    calibrated: apply WORKDIR/calibration.json's temperature when present (False: the raw model).
    fit_calibration: first fit the temperature of this checkpoint on the config's eval split (the
      validation split) and write WORKDIR/calibration.json.

  Returns:
    The report, with the workdir, split, checkpoint, step, flip and temperature.
  """
  cfg, trained, state = loading.load_trained(workdir, checkpoint, config)
  mesh = parallel.make_mesh()
  if fit_calibration:
    fit_split = cfg.data.eval_split
    fit_data = pipeline.load_labelled_split(cfg.data, cfg.labels, fit_split)
    fitted = scoring.calibrate(trained.evaluator(fit_data, mesh, flip=flip), state, workdir, fit_split)
    logging.info("calibration: temperature %.4f on %s", fitted["temperature"], fit_split)
  temperature = calibration.load_temperature(workdir, int(state.step), flip=flip) if calibrated else None
  data = pipeline.load_labelled_split(cfg.data, cfg.labels, split)
  report, per_example = trained.evaluator(data, mesh, flip=flip).run(
    state, temperature=temperature or 1.0, outputs=True
  )
  report = {
    "workdir": str(workdir),
    "split": split,
    "checkpoint": str(checkpoint),
    "step": int(state.step),
    "flip": flip,
    "temperature": temperature or 1.0,
    **report,
  }
  if jax.process_index() == 0:
    out = storage.check_writable(storage.path(workdir) / "eval", "evaluation output folder")
    storage.write_json(out / f"{split}.json", report)
    storage.write_text(
      out / f"{split}_predictions.jsonl",
      "".join(
        json.dumps(
          {"index": i, "age": float(data.age[i]), **{k: float(per_example[k][i]) for k in scoring.OUTPUT_KEYS}}
        )
        + "\n"
        for i in range(len(data))
      ),
    )
    plots.write_plots(report, data.age, per_example["predicted_age"], out, split)
  return report
