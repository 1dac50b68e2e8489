"""Every figure agejax draws (matplotlib on the Agg canvas: no pyplot state, no display needed)."""

import numpy as np
from etils import epath

from agejax import labels, storage


def save(fig, path: storage.Location, dpi: int) -> None:
  """Saves a figure as PNG to a path or URL (through a file object: matplotlib cannot open URLs)."""
  with storage.path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=dpi)


def figure(figsize: tuple[float, float]):
  """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def cs_curve_figure(report: dict):
  """Returns a Figure of the cumulative score CS@k against the error threshold k."""
  fig = figure((5, 3.5))
  ax = fig.add_subplot()
  ks = [int(k) for k in report["cumulative_score"]]
  ax.plot(ks, list(report["cumulative_score"].values()), marker="o")
  ax.set(
    xlabel="error threshold k (years)",
    ylabel="CS@k",
    ylim=(0, 1.02),
    xticks=ks,
    title=f"cumulative score ({report['split']})",
  )
  ax.grid(alpha=0.3)
  return fig


def age_group_figure(report: dict):
  """Returns a Figure of the MAE per age decade, and per bucket (children, minors, the old) with its signed error."""
  fig = figure((10, 3.5))
  ax, ax_buckets = fig.subplots(1, 2, width_ratios=(1.4, 1))
  groups = report["mae_by_age_group"]
  mae = [g["mae"] or 0.0 for g in groups.values()]
  bars = ax.bar(list(groups), mae, color="C1")
  ax.bar_label(bars, labels=[f"n={g['count']}" for g in groups.values()], fontsize=8)
  ax.axhline(report["mae"], color="k", linestyle="--", label=f"overall {report['mae']:.2f}")
  ax.set(xlabel="true age", ylabel="MAE (years)", title=f"MAE by age group ({report['split']})")
  ax.legend()
  buckets = report["mae_by_bucket"]
  names = list(buckets)
  bars = ax_buckets.bar(names, [b["mae"] or 0.0 for b in buckets.values()], color="C1", label="MAE")
  ax_buckets.bar_label(bars, labels=[f"n={b['count']}" for b in buckets.values()], fontsize=8)
  signed = [b["mean_error"] if b["mean_error"] is not None else np.nan for b in buckets.values()]
  ax_buckets.plot(names, signed, "o", color="C3", label="mean signed error")
  ax_buckets.axhline(0.0, color="k", linewidth=0.8)
  ax_buckets.set(xlabel="true age", ylabel="years", title="children, minors and the old")
  ax_buckets.legend(fontsize=8)
  return fig


def scatter_figure(age: np.ndarray, predicted: np.ndarray, split: str):
  """Returns a Figure of predicted against true age, with the identity line."""
  fig = figure((4.5, 4.5))
  ax = fig.add_subplot()
  ax.scatter(age, predicted, s=6, alpha=0.4)
  lo, hi = float(min(age.min(), predicted.min())), float(max(age.max(), predicted.max()))
  ax.plot([lo, hi], [lo, hi], color="k", linewidth=1)
  ax.set(xlabel="true age", ylabel="predicted age (expectation)", title=f"predicted vs true ({split})", aspect="equal")
  return fig


def groups_figure(report: dict):
  """Returns a Figure of the MAE of every group of people, one panel a grouping, with 95% bootstrap intervals."""
  groupings = report["groups"]
  fig = figure((3.2 * len(groupings) + 0.6, 3.6))
  for ax, (grouping, entries) in zip(np.atleast_1d(fig.subplots(1, len(groupings), sharey=True)), groupings.items()):
    present = {name: g for name, g in entries.items() if g["count"]}
    mae = np.array([g["mae"] for g in present.values()])
    ci = np.array([g["mae_ci95"] for g in present.values()]).reshape(-1, 2)
    x = np.arange(len(present))
    ax.bar(x, mae, color="C0", alpha=0.7)
    ax.errorbar(x, mae, yerr=np.abs(ci.T - mae), fmt="none", ecolor="k", capsize=3)
    ax.axhline(report["mae"], color="k", linestyle="--", linewidth=1)
    ax.set_xticks(x, [f"{name}\nn={g['count']}" for name, g in present.items()], fontsize=7, rotation=45)
    ax.set_title(grouping.replace("_", " "))
  fig.axes[0].set_ylabel("MAE (years), 95% interval")
  fig.suptitle(f"error by group ({report['split']}; dashed: overall {report['mae']:.2f})", fontsize=10)
  return fig


def calibration_figure(report: dict):
  """Returns a Figure of the reliability, nominal against actual coverage, and the shown interval's coverage by age."""
  c = report["calibration"]
  fig = figure((13, 3.8))
  ax_std, ax_cov, ax_age = fig.subplots(1, 3)
  styles = {"uncalibrated": ("C1", "raw model"), "calibrated": ("C0", f"temperature {c['temperature']:.2f}")}
  top = 0.0
  for name, (colour, label) in styles.items():
    r = c["reliability"][name]
    ax_std.plot(r["mean_std"], r["rms_error"], marker="o", color=colour, label=label)
    top = max(top, *r["mean_std"], *r["rms_error"])
    ax_cov.plot(c["coverage_curve"]["nominal"], c["coverage_curve"][name], marker=".", color=colour, label=label)
  ax_std.plot([0, top], [0, top], color="k", linewidth=1, label="ideal")
  ax_std.set(xlabel="predicted std (years, bin mean)", ylabel="RMS error (years)", title="reliability")
  ax_cov.plot([0, 1], [0, 1], color="k", linewidth=1, label="ideal")
  ax_cov.set(xlabel="nominal interval mass", ylabel="share of true ages inside", title="calibration (randomized PIT)")
  # The interval users see, bucket by bucket: where one temperature over- or under-covers.
  bars = [(name, b, "C0") for name, b in c["coverage_by_bucket"].items() if b["count"]]
  bars += [
    (name, g, "C2") for entries in c.get("coverage_by_group", {}).values() for name, g in entries.items() if g["count"]
  ]
  x = np.arange(len(bars))
  ax_age.bar(x, [b["coverage_shown"]["0.8"] for _, b, _ in bars], color=[colour for *_, colour in bars])
  ax_age.axhline(0.8, color="k", linewidth=1, label="nominal 80%")
  ax_age.set_xticks(x, [f"{name} ({b['count']})" for name, b, _ in bars], fontsize=7, rotation=60, ha="right")
  adjusted = "adjusted by age bucket" if c.get("interval_masses") else "central"
  ax_age.set(ylim=(0, 1), ylabel="share inside the 80% interval as shown", title=f"by age and group ({adjusted})")
  for ax in (ax_std, ax_cov, ax_age):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.suptitle(f"calibration ({report['split']})", fontsize=10)
  return fig


def age_checks_figure(report: dict):
  """Returns a Figure of NIST's age-check rates and, with an age check, its FPR against FNR as its threshold moves."""
  r, check = report["age_checks"], report.get("age_check")
  panels = 1 + (len(check["rules"]) if check else 0)
  fig = figure((4.6 * panels + 0.6, 3.8))
  axes = np.atleast_1d(fig.subplots(1, panels))
  entries = {f"Challenge-{t}\nFPR": e for t, e in r["challenge"].items()}
  band = r["band_13_16"]
  entries.update({"13-16\nTPR": band["tpr"], "13-16\nFPR": band["fpr"]})
  x = np.arange(len(entries))
  rates = np.array([e["rate"] if e["rate"] is not None else np.nan for e in entries.values()])
  ci = np.array([e["ci95"] or [np.nan, np.nan] for e in entries.values()]).reshape(-1, 2)
  axes[0].bar(x, rates, color="C0", alpha=0.7)
  axes[0].errorbar(x, rates, yerr=np.abs(ci.T - rates), fmt="none", ecolor="k", capsize=3)
  axes[0].set_xticks(x, [f"{k}\nn={e['count']}" for k, e in entries.items()], fontsize=7)
  axes[0].set(ylim=(0, 1), ylabel="rate, 95% bootstrap interval", title="NIST FATE age-check rates")
  if check:
    t = check["threshold"]
    for ax, (rule, entry) in zip(axes[1:], check["rules"].items()):
      for split_name, colour in (("validation", "C1"), ("test", "C0")):
        c = entry["curve"][split_name]
        ax.plot(c["fpr"], c["fnr"], color=colour, label=check.get(f"{split_name}_split", split_name))
        if split_name in entry:
          chosen = entry[split_name]
          ax.plot([chosen["fpr"]], [chosen["fnr"]], "o", color=colour, markersize=7)
      ax.axvline(check["target_fpr"], color="k", linestyle=":", label=f"target FPR {check['target_fpr']:.2%}")
      rule_text = f"P(age<{t}) <= p" if rule == "probability" else f"estimate >= {t} + buffer"
      ax.set(
        xlabel=f"FPR: minors (under {t}) passed",
        ylabel=f"FNR: adults ({t}+) sent to a check",
        title=f"pass when {rule_text}",
      )
      ax.set_xscale("symlog", linthresh=0.01)
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3)
  fig.suptitle(f"age checks ({report['split']}; dots: the chosen threshold)", fontsize=10)
  return fig


def write_plots(report: dict, age: np.ndarray, predicted: np.ndarray, out: epath.Path, split: str) -> list[epath.Path]:
  """Saves the CS curve, MAE-by-age-group, scatter, group and calibration plots as `<split>_*.png` in `out`."""
  figures = {
    "cs_curve": cs_curve_figure(report),
    "mae_by_age_group": age_group_figure(report),
    "predicted_vs_true": scatter_figure(np.asarray(age), predicted, split),
  }
  if "groups" in report:
    figures["groups"] = groups_figure(report)
  if "calibration" in report:
    figures["calibration"] = calibration_figure(report)
  if "age_checks" in report:
    figures["age_checks"] = age_checks_figure(report)
  paths = []
  for name, fig in figures.items():
    paths.append(out / f"{split}_{name}.png")
    save(fig, paths[-1], dpi=100)
  return paths


def distribution_figure(
  image: np.ndarray, age: float, probs: np.ndarray, bins: np.ndarray, sigma: float, mean_preserving: bool = False
):
  """Returns a Figure of a face beside its predicted distribution and its training target (loss.target)."""
  fig = figure((6.4, 2.4))
  ax_face, ax_dist = fig.subplots(1, 2, width_ratios=(1, 2.6))
  ax_face.imshow(image)
  ax_face.axis("off")
  ax_face.set_title(f"age {age:g}")
  target = np.asarray(labels.label_distribution(age, bins, sigma, mean_preserving=mean_preserving))
  predicted = float(labels.expected_age(probs, bins))
  # One filled outline of unit-wide bins: a bar chart's 100 patches took twice as long to draw.
  edges = np.append(bins - 0.5, bins[-1] + 0.5)
  ax_dist.stairs(probs, edges, fill=True, color="C0", alpha=0.6, label=f"predicted (E={predicted:.1f})")
  ax_dist.plot(bins, target, color="C3", label=f"target N({age:g}, {sigma:g}²)")
  ax_dist.axvline(age, color="C3", linestyle=":")
  ax_dist.axvline(predicted, color="C0", linestyle="--")
  ax_dist.set(xlabel="age (years)", ylabel="probability")
  ax_dist.legend(fontsize=7)
  return fig


def distribution_figure_images(
  images_uint8: np.ndarray,
  ages: np.ndarray,
  probs: np.ndarray,
  bins: np.ndarray,
  sigma: float | np.ndarray,
  mean_preserving: bool = False,
) -> np.ndarray:
  """Renders each face's `distribution_figure` as uint8 RGB [N, H, W, 3] (for TensorBoard images).

  `sigma`: the targets' std, one for all faces (loss.sigma) or one per face (losses.target_sigma:
  with loss.sigma_from_data each face's own age_std, as its training target has it).
  """
  images_uint8, ages, probs = (np.asarray(x) for x in (images_uint8, ages, probs))
  sigmas = np.broadcast_to(np.asarray(sigma, np.float64), ages.shape)
  out = []
  for image, age, p, s in zip(images_uint8, ages, probs, sigmas):
    fig = distribution_figure(image, float(age), p, np.asarray(bins), float(s), mean_preserving)
    fig.canvas.draw()
    out.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
  return np.stack(out)
