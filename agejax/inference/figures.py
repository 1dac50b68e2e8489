"""The figure of predict.py --plot: photos with their faces boxed and aged, beside each face's distribution."""

import numpy as np
from etils import epath

from agejax import errors, storage
from agejax.evaluation import plots
from agejax.inference import photos

PLOT_MAX_INSETS = 3


def plot_results(results: list[photos.ImageResult], bins: np.ndarray, path: storage.Location) -> None:
  """Saves a PNG: each photo with its face boxes and ages, beside the faces' predicted distributions.

  The first few faces' model inputs (aligned crops) are inset above their distributions.
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
    for i, face in enumerate(result.faces):
      x, y, w, h = face.box
      colour = colours[i % len(colours)]
      ax_photo.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2))
      ax_photo.text(
        x,
        y,
        f"{i}: {face.predicted_age:.1f}",
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
        label=f"face {i}: {face.predicted_age:.1f} ± {face.std:.1f}",
      )
      ax_dist.axvline(face.predicted_age, color=colour, linestyle="--")
      if i < PLOT_MAX_INSETS:
        inset = ax_dist.inset_axes((0.01 + 0.17 * i, 0.62, 0.16, 0.36))
        inset.imshow(face.chip)
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
          spine.set_edgecolor(colour)
          spine.set_linewidth(2)
    ax_dist.set_xlabel("age (years)")
    ax_dist.set_ylabel("probability")
    ax_dist.set_title("predicted age distribution")
    ax_dist.legend()
  plots.save(fig, path, dpi=80)
