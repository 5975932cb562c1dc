"""PNG figures: reliability diagrams and the ECE-vs-temperature curve (matplotlib, Agg)."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from first_jax.runtime import io_util


def _save(fig, path: str) -> None:
  with io_util.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)


def reliability_diagram(path: str, panels: Sequence[dict]) -> None:
  """One panel per model: dict(title, count, confidence, accuracy, ece) of per-bin arrays."""
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
  for ax, p in zip(axes[0], panels):
    count = np.asarray(p["count"], float)
    nb = len(count)
    centers = (np.arange(nb) + 0.5) / nb
    acc = np.where(count > 0, p["accuracy"], 0.0)
    conf = np.where(count > 0, p["confidence"], 0.0)
    ax.bar(centers, acc, width=1 / nb, edgecolor="k", color="tab:blue", alpha=0.8,
           label="accuracy")
    ax.bar(centers, conf - acc, bottom=acc, width=1 / nb, edgecolor="r", color="tab:red",
           alpha=0.25, label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{p['title']}\nECE {p['ece']:.3f}")
  axes[0][0].set_ylabel("accuracy")
  axes[0][0].legend(loc="upper left", fontsize=7)
  _save(fig, path)


def temperature_curve(path: str, temperatures: np.ndarray, ece: np.ndarray, best_t: float,
                      title: str) -> None:
  order = np.argsort(temperatures)
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.plot(np.asarray(temperatures)[order], np.asarray(ece)[order], ".-")
  ax.axvline(best_t, color="r", ls="--", label=f"best t = {best_t:.3g}")
  ax.set(xscale="log", xlabel="teacher temperature", ylabel="ECE", title=title)
  ax.legend()
  _save(fig, path)


def histogram(path: str, values: np.ndarray, bins: int, xlabel: str, title: str) -> None:
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.hist(np.asarray(values), bins=bins, range=(0, 1))
  ax.set(xlabel=xlabel, ylabel="positions", title=title)
  _save(fig, path)
