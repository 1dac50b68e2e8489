"""Evaluating a trained workdir: its checkpoint scored on a whole split, the reports written to WORKDIR/eval/."""

import json
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from agejax import errors, parallel, settings, storage
from agejax.data import datasets, pipeline, splits
from agejax.evaluation import age_checks, calibration, plots, scoring
from agejax.inference import loading
from agejax.training import checkpointing


def check_split(data: settings.DataSettings, split: str) -> None:
  """Fails in one line, before any model or data loads, when `split` is not one of the dataset's splits.

  With `data.split` (benchmark folders) the splits are its parts; a dataset not prepared yet is
  checked when it is loaded (the demo is generated then; the others say how to prepare them).
  """
  if splits.normalise(data.split):
    names = list(splits.PARTS)
  else:
    builder = datasets.get_builder(data.name, data.data_dir, data.builder_config)
    if not builder.is_prepared():
      return
    names = sorted(builder.info.splits)
    if pipeline.dataset_folders(builder):
      names.append(pipeline.ALL_FOLDERS)  # every folder together: a cross-dataset test set
  if split not in names:
    raise errors.UserError(f"--split={split!r}: {data.name} has the splits {', '.join(names)}")


def output_prefix(split: str, flip: bool) -> str:
  """The name the reports of a split start with in WORKDIR/eval/: 'test', or 'test_flip' with --flip."""
  return f"{split}_flip" if flip else split


def evaluate_workdir(
  config: ml_collections.ConfigDict | None, workdir: storage.Location, split: str = "test", **options: Any
) -> dict[str, Any]:
  """`run_evaluation`'s report alone (the notebook's and crossval's call); `options` are its keyword arguments."""
  return run_evaluation(config, workdir, split, **options)[0]


def run_evaluation(
  config: ml_collections.ConfigDict | None,
  workdir: storage.Location,
  split: str = "test",
  *,
  checkpoint: str | int = "best",
  flip: bool = False,
  calibrated: bool = True,
  fit_calibration: bool = False,
  age_check: int | None = None,
  age_check_target_fpr: float | None = None,
) -> tuple[dict[str, Any], list[epath.Path]]:
  """Evaluates a trained workdir's checkpoint on every example of a split and writes WORKDIR/eval/.

  Writes `<split>.json` (the report), `<split>_predictions.jsonl` (one line per example) and
  `<split>_*.png` plots; with `flip`, `<split>_flip.json` and so on (the two never overwrite each
  other). The split's name is checked before anything loads.

  Args:
    config: the training config; None: WORKDIR/config.json.
    workdir: the training workdir (a path or a gs:// URL).
    split: the dataset split to score.
    checkpoint: 'best', 'latest' or a step number.
    flip: average each face's distribution with its mirror image's.
    calibrated: apply WORKDIR/calibration.json's calibration of this way (flip or single views) when
      present (False: the raw model's distributions and central intervals). Point scores are the
      raw model's either way.
    fit_calibration: first fit both ways' calibrations of this checkpoint on the config's eval split
      (the validation split) and write WORKDIR/calibration.json.
    age_check: T of the age check "is this person under T?": its rules chosen on the config's eval
      split for `age_check_target_fpr` and scored on `split` (the report's `age_check`); None: the
      config's eval.age_check (0: off).
    age_check_target_fpr: the largest minors' false positive rate to choose for; None: the config's.

  Returns:
    (the report, with the workdir, split, checkpoint, step, flip and temperature; the files written,
    none on processes other than 0). The report's checkpoint is the one scored: 'latest' when 'best'
    was asked of a run with no evaluated checkpoint.
  """
  folder = storage.path(workdir)
  if not checkpointing.has_checkpoints(folder):
    raise errors.MissingInput(checkpointing.no_checkpoints_message(workdir))
  given = settings.Settings.from_config(loading.load_config(folder) if config is None else config)
  check_split(given.data, split)
  age_check = given.eval.age_check if age_check is None else age_check
  target = given.eval.age_check_target_fpr if age_check_target_fpr is None else age_check_target_fpr
  age_checks.check_age_check(age_check, target, given.labels.min_age, given.labels.max_age, what="--")
  cfg, trained, state = loading.load_trained(workdir, checkpoint, config)
  mesh = parallel.make_mesh()
  if fit_calibration:
    fit_split = cfg.data.eval_split
    fit_data = pipeline.load_labelled_split(cfg.data, cfg.labels, fit_split)
    fitted = scoring.calibrate(trained.evaluator(fit_data, mesh, flip=flip), state, workdir, fit_split)
    for way in calibration.WAYS:
      logging.info("calibration of %s: temperature %.4f on %s", way, fitted[way]["temperature"], fit_split)
  fitted_way = (
    calibration.load(workdir, int(state.step), flip=flip) if calibrated else None
  ) or calibration.Calibration()
  data = pipeline.load_labelled_split(cfg.data, cfg.labels, split)
  evaluator = trained.evaluator(data, mesh, flip=flip)
  report, per_example = evaluator.run(state, temperature=fitted_way, outputs=True)
  if age_check:
    chosen_on = cfg.data.eval_split
    validation = (
      None if chosen_on == split else evaluator.on(pipeline.load_labelled_split(cfg.data, cfg.labels, chosen_on))
    )
    report["age_check"] = scoring.age_check(
      evaluator, state, fitted_way, per_example, validation, age_check, target, (chosen_on, split)
    )
  report = {
    "workdir": str(workdir),
    "split": split,
    "checkpoint": checkpointing.scored_checkpoint(folder, checkpoint),
    "step": int(state.step),
    "flip": flip,
    "temperature": fitted_way.temperature,
    **report,
  }
  written: list[epath.Path] = []
  if jax.process_index() == 0:
    out = storage.check_writable(folder / "eval", "evaluation output folder")
    prefix = output_prefix(split, flip)
    written = [out / f"{prefix}.json", out / f"{prefix}_predictions.jsonl"]
    storage.write_json(written[0], report)
    storage.write_text(
      written[1],
      "".join(
        json.dumps(
          {
            "index": i,
            "age": float(data.age[i]),
            **{k: float(per_example[k][i]) for k in scoring.OUTPUT_KEYS},
            # The raw model's distribution (temperature 1): any point score can be recomputed from it.
            "probabilities": per_example["raw"][i].tolist(),
          }
        )
        + "\n"
        for i in range(len(data))
      ),
    )
    written += plots.write_plots(report, data.age, per_example["predicted_age"], out, prefix)
  return report, written
