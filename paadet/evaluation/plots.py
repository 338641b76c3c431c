"""The evaluation pictures that ``paadet eval --plots`` writes beside ``metrics.json``.

* ``pr_curves.png``: precision against recall for all classes together (bold) and each class (thin), at IoU 0.5
  and averaged over 0.5:0.95, from pycocotools' own precision array (:mod:`paadet.evaluation.curves`);
* ``pr_curves_per_class.png``: one small panel per category, both curves and both APs in its title;
* ``confusion_matrix.png`` (counts) and ``confusion_matrix_normalized.png`` (each row's shares): the categories
  present plus background, at one IoU and score threshold (:mod:`paadet.evaluation.matching`);
* ``examples.jpg``: images with their ground truth beside their detections, the worst by boxes missed first
  (:mod:`paadet.evaluation.examples`);
* ``plots.json``: the numbers drawn (the curves, the matrix's counts, which images were shown).

matplotlib is optional (``pip install 'paadet[plots]'``): :func:`require_matplotlib` says so in one line, before
any work. Figures are drawn on matplotlib's object API (``Figure`` + the Agg canvas): no pyplot state, no GUI.
Every file is written atomically.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pycocotools.coco import COCO

from paadet.errors import PaadetError
from paadet.evaluation.curves import IOU_RANGES, PRCurves, pr_curves
from paadet.evaluation.examples import STATUS_COLORS, Example, draw_pair, pick_examples
from paadet.evaluation.matching import CONFUSED, FP, TP, ConfusionMatrix, match_detections
from paadet.evaluation.metrics import CocoMetrics
from paadet.fileio import atomic_write_bytes, atomic_write_json, writing

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOT_FILES",
    "EvalPlots",
    "PlotOptions",
    "PlotsUnavailable",
    "remove_plots",
    "require_matplotlib",
    "write_eval_plots",
]

PLOT_FILES = (
    "pr_curves.png",
    "pr_curves_per_class.png",
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "examples.jpg",
    "plots.json",
)
"""What :func:`write_eval_plots` writes (``examples.jpg`` only when there are images to show)."""

ANNOTATE_CELLS = 30
"""Confusion matrices with at most this many rows print their numbers in the cells; larger ones only colour them."""


def remove_plots(folder: str | os.PathLike) -> None:
    """Delete an earlier run's pictures (:data:`PLOT_FILES`) from ``folder``: they describe other detections."""
    for name in PLOT_FILES:
        path = Path(folder) / name
        with writing(path):
            path.unlink(missing_ok=True)


class PlotsUnavailable(PaadetError):
    """The pictures were asked for but matplotlib is not installed."""


def require_matplotlib(flag: str = "--plots") -> None:
    """Raise :class:`PlotsUnavailable` (one line naming the extra to install) unless matplotlib can be imported."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotsUnavailable(f"{flag} needs matplotlib, which is not installed: pip install 'paadet[plots]'")


@dataclass(frozen=True)
class PlotOptions:
    """How the pictures are made.

    Attributes:
        score_thr: the lowest detection score counted by the confusion matrix and drawn on the examples.
        iou_thr: the IoU a detection needs with a box to match it (confusion matrix, examples).
        worst: example images with the most boxes missed.
        samples: other example images, evenly spread over the rest by image id.
        max_side: the longer side of each example picture, in pixels.
    """

    score_thr: float = 0.3
    iou_thr: float = 0.5
    worst: int = 4
    samples: int = 4
    max_side: int = 480


@dataclass
class EvalPlots:
    """What :func:`write_eval_plots` drew, with the numbers behind each picture.

    Attributes:
        curves: the precision-recall curves drawn.
        confusion: the confusion matrix drawn.
        examples: the images shown, in grid order.
        files: the files written.
    """

    curves: PRCurves
    confusion: ConfusionMatrix
    examples: list[Example]
    files: list[Path] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` says of the pictures: the files and the confusion matrix's thresholds."""
        return {
            "files": [f.name for f in self.files],
            "iou_thr": self.confusion.iou_thr,
            "score_thr": self.confusion.score_thr,
        }


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` atomically: PNG, or for a ``.jpg`` (photographs) JPEG at quality 90 through OpenCV."""
    if path.suffix == ".jpg":
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgba[:, :, 2::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError(f"{path}: JPEG encoding failed")
        return atomic_write_bytes(path, data.tobytes())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def _pr_axes(ax: Axes, small: bool = False) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if not small:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_aspect("equal")


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _ap(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def draw_pr_curves(curves: PRCurves) -> Figure:
    """All classes together (bold) over each class (thin; coloured with a legend for up to 12 classes)."""
    fig = _figure(13, 6.2)
    few = len(curves.names) <= 12
    for ax, key in zip(fig.subplots(1, 2), IOU_RANGES, strict=True):
        areas = curves.class_area(key)
        for k, name in enumerate(curves.names):
            if np.isnan(areas[k]):
                continue
            if few:
                ax.plot(curves.recall, curves.per_class[key][k], linewidth=1, label=f"{name} {_ap(areas[k])}")
            else:
                ax.plot(curves.recall, curves.per_class[key][k], color="0.6", linewidth=0.6, alpha=0.5)
        label = f"all classes, AP {_ap(curves.area(key))}"
        ax.plot(curves.recall, curves.all_classes[key], color="tab:blue", linewidth=3, label=label)
        _pr_axes(ax)
        title = "IoU 0.5" if key == "0.50" else "IoU 0.5:0.95 (mean of 10 thresholds)"
        ax.set_title(f"{title}; area all, 100 detections")
        ax.legend(loc="lower left", fontsize=8 if few else 10)
    thin = "each class a thin line" if few else f"each of the {len(curves.names)} classes a thin grey line"
    fig.suptitle(f"precision-recall (pycocotools' 101-point interpolated precision; {thin})")
    fig.tight_layout()
    return fig


def draw_pr_per_class(curves: PRCurves) -> Figure:
    """One small panel per category: IoU 0.5 (solid) and 0.5:0.95 (dashed), both APs in the title.

    Laid out by hand (fixed margins, three ticks, tick labels on the outer panels only): for COCO's 80 classes
    ``tight_layout`` and shared axes took 25 s of CPU time, this about 5.
    """
    count = len(curves.names)
    cols = min(10, max(1, math.ceil(math.sqrt(count))))
    rows = max(1, math.ceil(count / cols))
    width, height = 1.9 * cols + 0.6, 1.8 * rows + 0.9
    fig = _figure(width, height)
    fig.subplots_adjust(
        left=0.5 / width, right=1 - 0.15 / width, bottom=0.35 / height, top=1 - 0.85 / height, wspace=0.12, hspace=0.5
    )
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False))
    ap50, ap = curves.class_area("0.50"), curves.class_area("0.50:0.95")
    for (row, col), ax in np.ndenumerate(axes):
        k = row * cols + col
        if k >= count:
            ax.set_axis_off()
            continue
        _pr_axes(ax, small=True)
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        below = k + cols >= count  # no panel under this one
        ax.tick_params(labelsize=6, labelbottom=below, labelleft=col == 0)
        name = curves.names[k] if len(curves.names[k]) <= 22 else curves.names[k][:21] + "…"
        if np.isnan(ap[k]):
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=7, color="0.4")
            ax.set_title(name, fontsize=8)
            continue
        ax.plot(curves.recall, curves.per_class["0.50"][k], color="tab:blue", linewidth=1.2)
        ax.plot(curves.recall, curves.per_class["0.50:0.95"][k], color="tab:red", linewidth=1.2, linestyle="--")
        ax.set_title(f"{name}\nAP50 {_ap(ap50[k])}  AP {_ap(ap[k])}", fontsize=8)
    key = "IoU 0.5 blue, solid; IoU 0.5:0.95 red, dashed; x recall, y precision"
    fig.suptitle(
        f"precision-recall per class\n{key}" if cols < 6 else f"precision-recall per class: {key}", fontsize=10
    )
    return fig


def draw_confusion(matrix: ConfusionMatrix, normalized: bool) -> Figure:
    """The matrix over the categories present (rows: ground truth, columns: detected), plus background."""
    from matplotlib.colors import LogNorm

    keep = [*matrix.present(), len(matrix.cat_ids)]
    values = (matrix.normalized() if normalized else matrix.counts)[np.ix_(keep, keep)]
    labels = [*(matrix.names[k] for k in keep[:-1]), "background"]
    n = len(keep)
    side = max(7.0, 0.24 * n + 3.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    shown = np.ma.masked_equal(values, 0)
    if normalized:
        image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    else:
        image = ax.imshow(shown, cmap="Blues", norm=LogNorm(vmin=0.7, vmax=max(int(values.max()), 2)))
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, shrink=1.0 if n <= ANNOTATE_CELLS else 0.5)
    bar.set_label("share of the row" if normalized else "boxes (log scale)")
    if not normalized:
        from matplotlib.ticker import LogFormatter

        bar.ax.yaxis.set_major_formatter(LogFormatter())  # 1, 10, 100 (not 10^0); 2, 3, 4 over a short range
        bar.ax.yaxis.set_minor_formatter(LogFormatter())
    font = 9 if n <= ANNOTATE_CELLS else 7
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    big = n > ANNOTATE_CELLS
    ax.set_xlabel("detected as (background: missed)", fontsize=13 if big else 10)
    ax.set_ylabel("ground truth (background: false positive)", fontsize=13 if big else 10)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.85", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    if n <= ANNOTATE_CELLS:
        top = values.max() if values.size else 0
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                if v:
                    text = f"{v:.2f}" if normalized else str(int(v))
                    dark = (v / top if normalized or top <= 1 else math.log(v) / math.log(top)) > 0.6
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    kind = "each row divided by its sum" if normalized else "box counts"
    hidden = len(matrix.cat_ids) - (n - 1)
    note = f"\n({_count(hidden, 'category', 'categories')} with no box and no detection left out)" if hidden else ""
    ax.set_title(
        f"confusion matrix ({kind}): IoU >= {matrix.iou_thr:g}, score >= {matrix.score_thr:g}{note}",
        fontsize=15 if big else 10,
    )
    fig.tight_layout()
    return fig


def _rgb(bgr: tuple[int, int, int]) -> tuple[float, float, float]:
    return bgr[2] / 255, bgr[1] / 255, bgr[0] / 255


def draw_examples(
    examples: Sequence[Example], image_dir: Path | None, names: dict[Any, str], options: PlotOptions
) -> Figure:
    """Two examples per row, each as ground truth | detections, with counts in the titles and a colour key."""
    from matplotlib.patches import Patch

    pairs = 2 if len(examples) > 1 else 1
    rows = math.ceil(len(examples) / pairs)
    tile = options.max_side / 100
    fig = _figure(4 * tile * pairs / 2 + 0.2, rows * (tile * 0.8 + 0.55) + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, 2 * pairs, squeeze=False))
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, example in enumerate(examples):
        ax_gt, ax_dt = axes[i // pairs, 2 * (i % pairs)], axes[i // pairs, 2 * (i % pairs) + 1]
        gt, dt, error = draw_pair(example, image_dir, names, options.max_side)
        m = example.match
        ax_gt.imshow(gt)
        ax_dt.imshow(dt)
        head = "worst" if example.kind == "worst" else "sample"
        name = example.file_name if len(example.file_name) <= 34 else "…" + example.file_name[-33:]
        ax_gt.set_title(
            f"{head}: {name}\nground truth: {_count(len(m.gt_status), 'box', 'boxes')}, {m.missed} missed", fontsize=8
        )
        tp, confused, fp = (sum(s == x for s in m.dt_status) for x in (TP, CONFUSED, FP))
        ax_dt.set_title(
            f"detections >= {options.score_thr:g}: {tp} right,\n{confused} wrong class, {fp} false", fontsize=8
        )
        if error is not None:
            text = textwrap.fill(error, 48, break_long_words=True)
            ax_gt.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, transform=ax_gt.transAxes)
    key = [
        Patch(color=_rgb(STATUS_COLORS["good"]), label="found / right"),
        Patch(color=_rgb(STATUS_COLORS[CONFUSED]), label="wrong class"),
        Patch(color=_rgb(STATUS_COLORS["bad"]), label="missed / false positive"),
    ]
    fig.legend(handles=key, loc="upper center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


def write_eval_plots(
    out_dir: str | os.PathLike,
    gt: COCO,
    detections: Iterable[dict],
    metrics: CocoMetrics,
    img_ids: Sequence[Any] | None = None,
    image_dir: str | os.PathLike | None = None,
    options: PlotOptions = PlotOptions(),
) -> EvalPlots:
    """Draw the evaluation pictures of one evaluation into ``out_dir`` (see the module's docstring).

    Args:
        out_dir: the folder of ``metrics.json``.
        gt: the ground truth evaluated against.
        detections: the COCO results entries scored.
        metrics: their metrics (``metrics.arrays``: pycocotools' precision array).
        img_ids: the images evaluated (default: all of ``gt``'s).
        image_dir: the folder the ``file_name`` entries are relative to; None: no ``examples.jpg``.
        options: thresholds and sizes.

    Raises:
        PlotsUnavailable: matplotlib is not installed.
        OutputWriteError: a file could not be written.
    """
    require_matplotlib()
    if metrics.arrays is None:
        raise ValueError("the metrics carry no precision arrays (made by paadet.evaluation.coco_evaluate?)")
    out = Path(out_dir)
    ids = sorted(gt.imgs) if img_ids is None else list(img_ids)
    curves = pr_curves(metrics.arrays)
    confusion, matches = match_detections(gt, detections, ids, options.iou_thr, options.score_thr)
    file_names = {i: str(gt.imgs[i].get("file_name", i)) for i in ids}
    examples = pick_examples(matches, file_names, options.worst, options.samples)
    names = dict(zip(confusion.cat_ids, confusion.names, strict=True))
    plots = EvalPlots(curves, confusion, examples)
    figures: list[tuple[str, Any]] = [
        ("pr_curves.png", lambda: draw_pr_curves(curves)),
        ("pr_curves_per_class.png", lambda: draw_pr_per_class(curves)),
        ("confusion_matrix.png", lambda: draw_confusion(confusion, normalized=False)),
        ("confusion_matrix_normalized.png", lambda: draw_confusion(confusion, normalized=True)),
    ]
    if image_dir is not None and examples:
        folder = Path(image_dir)
        figures.append(("examples.jpg", lambda: draw_examples(examples, folder, names, options)))
    for name, draw in figures:
        plots.files.append(_save(draw(), out / name))
    data = {
        "pr_curves": curves.to_json(),
        "confusion_matrix": confusion.to_json(),
        "examples": [
            {"image_id": e.match.image_id, "file_name": e.file_name, "kind": e.kind, "missed": e.match.missed}
            for e in examples
        ],
        "options": {k: getattr(options, k) for k in ("score_thr", "iou_thr", "worst", "samples", "max_side")},
    }
    plots.files.append(atomic_write_json(out / "plots.json", data, indent=1))
    return plots
