"""The figure of predict.py --plot: photos with their faces boxed and aged, beside each face's distribution."""

import os

import numpy as np
from etils import epath

from agejax import errors, storage
from agejax.evaluation import plots
from agejax.inference import photos

PLOT_MAX_INSETS = 3
INSET_BOTTOM = 0.6  # the crops' lower edge, as a fraction of the axes' height


def check_plot_path(path: storage.Location) -> None:
  """Fails in one line, before any work, when `path` cannot become a PNG file (missing folders are made later)."""
  target = storage.path(path)
  if storage.is_url(target):
    return  # object stores have no folders to check; a write error names the URL
  if target.is_dir():
    raise errors.UserError(f"--plot={path} is a folder: name the PNG file to write, e.g. {target / 'faces.png'}")
  existing = target.parent
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise errors.UserError(f"--plot={path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK):
    raise errors.UserError(f"--plot={path}: the folder {existing} is not writable")


def plot_results(results: list[photos.ImageResult], bins: np.ndarray, path: storage.Location) -> None:
  """Saves `results_figure` as a PNG at `path`, making its missing folders."""
  fig = results_figure(results, bins)
  target = storage.path(path)
  if not storage.is_url(target):
    target.parent.mkdir(parents=True, exist_ok=True)
  plots.save(fig, target, dpi=80)


def results_figure(results: list[photos.ImageResult], bins: np.ndarray):
  """Each photo with its face boxes and ages, beside the faces' predicted distributions.

  Faces are numbered from 1, as predict.py's lines and the server's page number them. The first
  few faces' model inputs (aligned crops) are inset above their distributions, in headroom above
  the tallest bar, so they hide no bar.
  """
  from matplotlib.patches import Rectangle

  rows = [r for r in results if r.photo is not None]
  if not rows:
    raise errors.UserError("no faces to plot")
  fig = plots.figure((10, 4 * len(rows)))
  colours = [f"C{i}" for i in range(10)]
  for row, result in enumerate(rows):
    ax_photo, ax_dist = fig.add_subplot(len(rows), 2, 2 * row + 1), fig.add_subplot(len(rows), 2, 2 * row + 2)
    ax_photo.imshow(result.photo)
    ax_photo.set_title(epath.Path(result.file).name)
    ax_photo.axis("off")
    tallest = 0.0
    for i, face in enumerate(result.faces):
      x, y, w, h = face.box
      colour = colours[i % len(colours)]
      ax_photo.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2))
      ax_photo.text(
        x,
        y,
        f"{i + 1}: {face.predicted_age:.1f}",
        color="white",
        fontsize=11,
        va="bottom",
        bbox=dict(facecolor=colour, edgecolor="none", pad=2),
      )
      ax_dist.bar(
        bins,
        face.distribution,
        width=1.0,
        color=colour,
        alpha=0.6,
        label=f"face {i + 1}: {face.predicted_age:.1f} ± {face.std:.1f}",
      )
      ax_dist.axvline(face.predicted_age, color=colour, linestyle="--")
      assert face.distribution is not None  # plotted results are predicted
      tallest = max(tallest, float(np.max(face.distribution)))
    insets = min(len(result.faces), PLOT_MAX_INSETS)
    if insets:
      # The bars fill the lower part of the axes; the crops (left) and the legend (right) the rest.
      ax_dist.set_ylim(0, tallest / (INSET_BOTTOM - 0.02))
    for i, face in enumerate(result.faces[:insets]):
      inset = ax_dist.inset_axes((0.01 + 0.17 * i, INSET_BOTTOM, 0.16, 0.98 - INSET_BOTTOM))
      inset.imshow(face.chip)
      inset.set_xticks([])
      inset.set_yticks([])
      for spine in inset.spines.values():
        spine.set_edgecolor(colours[i % len(colours)])
        spine.set_linewidth(2)
    ax_dist.set_xlabel("age (years)")
    ax_dist.set_ylabel("probability")
    ax_dist.set_title("predicted age distribution")
    ax_dist.legend(loc="upper right")
  return fig
