"""evaluate(config, workdir, split): a trained model's metrics, per-example predictions and plots."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from agejax import errors, labels, metrics, parallel, predict, storage, train
from agejax.data import pipeline

CS_THRESHOLDS = tuple(range(1, 11))
AGE_GROUPS = ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")


def age_group(age: np.ndarray) -> np.ndarray:
  """Returns the index into AGE_GROUPS of each age (decades, 70 and over together)."""
  return np.clip(np.floor(np.asarray(age) / 10).astype(int), 0, len(AGE_GROUPS) - 1)


def predict_split(predictor: predict.Predictor, data: pipeline.ArraySplit) -> np.ndarray:
  """Returns the distributions [N, K] of every example of `data`, once each, in order."""
  images = ({"image": b["image"]} for b in pipeline.eval_batches(data, predictor.batch_size))
  # Each global batch holds consecutive examples, so the concatenation is in index order and
  # only the last batch's padding (rows past N) is dropped.
  in_flight = parallel.InFlight()
  out = [in_flight.add(predictor.predict_device(predictor.state, b["image"]))
         for b in pipeline.device_prefetch(images, predictor.sharding)]
  return np.concatenate(jax.device_get(out))[:len(data)]


@jax.jit
def _per_example(probs: jax.Array, bins: jax.Array, age: jax.Array, sigma: jax.Array) -> dict[str, jax.Array]:
  """The per-example summaries and metric terms of predicted distributions (one compiled call)."""
  out = predict.summaries(probs, bins)
  pred = out["predicted_age"]
  return {**out, "abs_error": metrics.absolute_error(pred, age),
          "epsilon_error": metrics.epsilon_error(pred, age, sigma),
          "cs": jnp.stack([metrics.cumulative_score(pred, age, k) for k in CS_THRESHOLDS], axis=-1)}


def summarize(probs: np.ndarray, age: np.ndarray, age_std: np.ndarray, bins: np.ndarray,
              epsilon_sigma: float) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns the metrics of predicted distributions and the per-example predictions they come from.

  The epsilon-error uses each image's age_std where the dataset has one (> 0), else `epsilon_sigma`.
  """
  age = np.asarray(age, np.float32)
  sigma = np.where(age_std > 0, age_std, epsilon_sigma).astype(np.float32)
  terms = jax.device_get(_per_example(probs, bins, age, sigma))
  error = terms["abs_error"].astype(np.float64)
  groups = age_group(age)
  by_group = {}
  for g, name in enumerate(AGE_GROUPS):
    in_group = groups == g
    by_group[name] = {"count": int(in_group.sum()),
                      "mae": float(error[in_group].mean()) if in_group.any() else None}
  report = {
      "num_examples": len(age),
      "mae": float(error.mean()),
      "epsilon_error": float(terms["epsilon_error"].mean(dtype=np.float64)),
      "cumulative_score": {str(k): float(v)
                           for k, v in zip(CS_THRESHOLDS, terms["cs"].mean(axis=0, dtype=np.float64))},
      "mae_by_age_group": by_group,
      "mean_predicted_std": float(terms["std"].mean(dtype=np.float64)),
      "epsilon_sigma": {"default": float(epsilon_sigma), "per_image_age_std": int((age_std > 0).sum())},
  }
  return report, {k: terms[k] for k in ("predicted_age", "argmax_age", "std")}


def evaluate(config: ml_collections.ConfigDict | None, workdir: storage.Location, split: str = "test", *,
             checkpoint: str | int = "best", flip: bool = False) -> dict:
  """Evaluates WORKDIR's checkpoint on every example of `split`; writes WORKDIR/eval/ reports.

  `config` defaults to WORKDIR/config.json. Writes `<split>.json` (metrics),
  `<split>_predictions.jsonl` (one line per example) and `<split>_*.png` plots; returns the metrics.
  """
  predictor = predict.Predictor(workdir, checkpoint, config, flip=flip)
  config = predictor.config
  data = train.load_labelled_split(config, split)
  if not len(data):
    raise errors.UserError(f"split {split!r} of {config.data.name} has no examples with ages in the label range")
  probs = predict_split(predictor, data)
  report, per_example = summarize(probs, data.age, data.age_std, predictor.bins, config.metrics.epsilon_sigma)
  report = {"workdir": str(workdir), "split": split, "checkpoint": str(checkpoint), "step": predictor.step,
            "flip": flip, **report}
  if jax.process_index() == 0:
    out = storage.check_writable(storage.path(workdir) / "eval", "evaluation output folder")
    storage.write_json(out / f"{split}.json", report)
    storage.write_text(out / f"{split}_predictions.jsonl", "".join(
        json.dumps({"index": i, "age": float(data.age[i]), **{k: float(v[i]) for k, v in per_example.items()}})
        + "\n" for i in range(len(data))))
    write_plots(report, data.age, per_example["predicted_age"], out, split)
  return report


def format_table(report: dict) -> str:
  """Formats an evaluation report as a short human-readable table."""
  lines = [f"{report['split']} split, checkpoint {report['checkpoint']} (step {report['step']})"
           f"{', flip-averaged' if report['flip'] else ''}: {report['num_examples']} examples",
           f"  MAE                 {report['mae']:.3f} years",
           f"  epsilon-error       {report['epsilon_error']:.4f}",
           f"  mean predicted std  {report['mean_predicted_std']:.2f} years",
           "  CS@k                " + "  ".join(f"{k}:{v:.3f}" for k, v in report["cumulative_score"].items()),
           "  MAE by age group"]
  for name, group in report["mae_by_age_group"].items():
    mae = "-" if group["mae"] is None else f"{group['mae']:.3f}"
    lines.append(f"    {name:>6}  {mae:>8}  ({group['count']} examples)")
  return "\n".join(lines)


def _figure(figsize: tuple[float, float]):
  """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def cs_curve_figure(report: dict):
  """Returns a Figure of the cumulative score CS@k against the error threshold k."""
  fig = _figure((5, 3.5))
  ax = fig.add_subplot()
  ks = [int(k) for k in report["cumulative_score"]]
  ax.plot(ks, list(report["cumulative_score"].values()), marker="o")
  ax.set(xlabel="error threshold k (years)", ylabel="CS@k", ylim=(0, 1.02), xticks=ks,
         title=f"cumulative score ({report['split']})")
  ax.grid(alpha=0.3)
  return fig


def age_group_figure(report: dict):
  """Returns a Figure of the MAE per age group, each bar labelled with its example count."""
  fig = _figure((6, 3.5))
  ax = fig.add_subplot()
  groups = report["mae_by_age_group"]
  mae = [g["mae"] or 0.0 for g in groups.values()]
  bars = ax.bar(list(groups), mae, color="C1")
  ax.bar_label(bars, labels=[f"n={g['count']}" for g in groups.values()], fontsize=8)
  ax.axhline(report["mae"], color="k", linestyle="--", label=f"overall {report['mae']:.2f}")
  ax.set(xlabel="true age", ylabel="MAE (years)", title=f"MAE by age group ({report['split']})")
  ax.legend()
  return fig


def scatter_figure(age: np.ndarray, predicted: np.ndarray, split: str):
  """Returns a Figure of predicted against true age, with the identity line."""
  fig = _figure((4.5, 4.5))
  ax = fig.add_subplot()
  ax.scatter(age, predicted, s=6, alpha=0.4)
  lo, hi = float(min(age.min(), predicted.min())), float(max(age.max(), predicted.max()))
  ax.plot([lo, hi], [lo, hi], color="k", linewidth=1)
  ax.set(xlabel="true age", ylabel="predicted age (expectation)", title=f"predicted vs true ({split})",
         aspect="equal")
  return fig


def write_plots(report: dict, age: np.ndarray, predicted: np.ndarray, out: epath.Path, split: str
                ) -> list[epath.Path]:
  """Saves the CS curve, MAE-by-age-group and scatter plots as `<split>_*.png` in `out`."""
  figures = {"cs_curve": cs_curve_figure(report), "mae_by_age_group": age_group_figure(report),
             "predicted_vs_true": scatter_figure(np.asarray(age), predicted, split)}
  paths = []
  for name, fig in figures.items():
    paths.append(out / f"{split}_{name}.png")
    with paths[-1].open("wb") as f:  # a file object: matplotlib cannot open URLs
      fig.savefig(f, format="png", dpi=100)
  return paths


def distribution_figure(image: np.ndarray, age: float, probs: np.ndarray, bins: np.ndarray, sigma: float):
  """Returns a Figure of a face beside its predicted distribution and its Gaussian training target."""
  fig = _figure((6.4, 2.4))
  ax_face, ax_dist = fig.subplots(1, 2, width_ratios=(1, 2.6))
  ax_face.imshow(image)
  ax_face.axis("off")
  ax_face.set_title(f"age {age:g}")
  target = np.asarray(labels.label_distribution(age, bins, sigma))
  predicted = float(labels.expected_age(probs, bins))
  ax_dist.bar(bins, probs, width=1.0, color="C0", alpha=0.6, label=f"predicted (E={predicted:.1f})")
  ax_dist.plot(bins, target, color="C3", label=f"target N({age:g}, {sigma:g}²)")
  ax_dist.axvline(age, color="C3", linestyle=":")
  ax_dist.axvline(predicted, color="C0", linestyle="--")
  ax_dist.set(xlabel="age (years)", ylabel="probability")
  ax_dist.legend(fontsize=7)
  return fig


def distribution_figure_images(images_uint8: np.ndarray, ages: np.ndarray, probs: np.ndarray, bins: np.ndarray,
                               sigma: float) -> np.ndarray:
  """Renders each face's `distribution_figure` as uint8 RGB [N, H, W, 3] (for TensorBoard images)."""
  images_uint8, ages, probs = (np.asarray(x) for x in (images_uint8, ages, probs))
  out = []
  for image, age, p in zip(images_uint8, ages, probs):
    fig = distribution_figure(image, float(age), p, np.asarray(bins), sigma)
    fig.canvas.draw()
    out.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
  return np.stack(out)
