"""The picture of a training run: loss curves, lr and validation AP, from the rows of ``metrics.jsonl``.

matplotlib is optional (``pip install paadet[train]``); :func:`plot_metrics` says whether it could draw.
The figure is drawn on matplotlib's object API (``Figure`` + the Agg canvas), so no global pyplot state
or GUI backend is touched.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paadet.fileio import atomic_write_bytes

__all__ = ["LOSS_KEYS", "PLOT_NAME", "plot_metrics", "smooth"]

PLOT_NAME = "metrics.png"
LOSS_KEYS = ("loss", "loss_cls", "loss_bbox", "loss_iou")


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values (the first ones average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_metrics(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Draw the losses and lr by iteration and the validation AP by epoch into a PNG at ``path``.

    Args:
        rows: ``metrics.jsonl`` rows: training rows (``iter`` and :data:`LOSS_KEYS`, ``lr``) and
            validation rows (``epoch`` and ``val`` with ``AP``, ``AP50``).
        path: the PNG to write (atomically).

    Returns:
        ``path``, or None when matplotlib is not installed (nothing is written).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if isinstance(r.get("val"), dict)]
    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_ap = fig.subplots(1, 3)
    iters = [r["iter"] for r in train]
    window = max(1, len(train) // 50)
    for key in LOSS_KEYS:
        values = [float(r[key]) for r in train]
        if values:
            ax_loss.plot(iters, smooth(values, window), label=key, linewidth=1.5 if key == "loss" else 1.0)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training loss" + (f" ({window}-iteration mean)" if window > 1 else ""))
    if train:
        ax_loss.legend()
    ax_lr.plot(iters, [float(r["lr"]) for r in train], color="tab:gray")
    ax_lr.set_xlabel("iteration")
    ax_lr.set_title("learning rate")
    if val:
        epochs = [r["epoch"] for r in val]
        for key in ("AP", "AP50"):
            ax_ap.plot(epochs, [float(r["val"].get(key, float("nan"))) for r in val], marker="o", label=key)
        ax_ap.legend()
    else:
        ax_ap.text(
            0.5, 0.5, "no validation\n(--val-ann, --val-images)", ha="center", va="center", transform=ax_ap.transAxes
        )
    ax_ap.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ap.set_xlabel("epoch")
    ax_ap.set_title("validation")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
