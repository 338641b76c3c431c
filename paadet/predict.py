"""Predicting on files: image files and folders in, a COCO results JSON (and optionally drawn copies) out.

The library side of ``paadet predict``: start-up checks of the output paths, the run over the inputs with a
progress bar, the results written atomically (also on Ctrl-C), and the visualisations.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from paadet.data.images import ImageSource, list_images
from paadet.detections import coco_entries
from paadet.detector import Detector
from paadet.fileio import OutputPathError, check_output_dir, check_output_file


def check_outputs(sources: list[ImageSource], output: str, save_vis: str | None) -> list[Path] | None:
    """Start-up checks of ``--output`` and ``--save-vis``; returns the visualisation targets (None without).

    Raises:
        OutputPathError: an output that cannot be written or would overwrite an input.
    """
    inputs = [s.path for s in sources]
    check_output_file(output, "--output", inputs=inputs)
    if save_vis is None:
        return None
    check_output_dir(save_vis, "--save-vis", inputs=inputs)
    from paadet.visualize import vis_targets

    targets = vis_targets([s.file_name for s in sources], inputs, save_vis)
    if any(Path(output).resolve() == t.resolve() for t in targets):
        raise OutputPathError(f"{output}: --output is also where --save-vis would draw an image")
    return targets


def predict_sources(
    sources: list[ImageSource],
    output: str,
    detector: Detector,
    vis_targets: list[Path] | None = None,
    vis_score_thr: float = 0.3,
    progress: bool = True,
):
    """Run ``detector`` over ``sources`` and write the results JSON atomically.

    Returns ``(images done, images skipped, boxes drawn, timer)``. Unreadable files are reported on
    stderr and skipped; the others' results are still written. On Ctrl-C the results so far are
    written (atomically) and a line says they are partial, then ``KeyboardInterrupt`` propagates.
    """
    from tqdm import tqdm

    from paadet.data.pipeline import iter_loaded
    from paadet.fileio import atomic_write_json
    from paadet.runtime.base import StageTimer

    timer = StageTimer(getattr(detector.backend, "device", None))
    results: dict = {}
    skipped = drawn = 0
    classes = detector.classes
    loaded = iter_loaded(sources, detector.preset, detector.workers)
    bar = tqdm(total=len(sources), unit="img", disable=not progress, desc="predict")
    try:
        for item, result in detector.run(loaded, timer):
            bar.update(1)
            if result is None:
                skipped += 1
                tqdm.write(f"skipped {item.name}: {item.error}", file=sys.stderr)
                continue
            results[item.index] = result
            if vis_targets is not None:
                drawn += write_visualisation(
                    sources[item.index], result, vis_targets[item.index], vis_score_thr, classes.names
                )
    except KeyboardInterrupt:
        bar.close()
        atomic_write_json(output, coco_entries(results, sources, classes.category_ids))
        print(
            f"paadet predict: interrupted; wrote the partial results of {len(results)} of {len(sources)} images "
            f"to {output}",
            file=sys.stderr,
        )
        raise
    bar.close()
    atomic_write_json(output, coco_entries(results, sources, classes.category_ids))
    return len(results), skipped, drawn, timer


def predict_files(
    paths: list[str],
    output: str,
    detector: Detector,
    save_vis: str | None = None,
    vis_score_thr: float = 0.3,
    progress: bool = True,
):
    """:func:`predict_sources` over every image under ``paths``; returns ``(done, skipped, timer)``."""
    sources = list_images(paths)
    targets = check_outputs(sources, output, save_vis)
    done, skipped, _drawn, timer = predict_sources(sources, output, detector, targets, vis_score_thr, progress)
    return done, skipped, timer


def write_visualisation(source: ImageSource, result, target: Path, score_thr: float, class_names: Sequence[str]) -> int:
    """Draw ``result`` on the image and write it to ``target`` atomically; returns the number of boxes drawn."""
    import cv2

    from paadet.data.images import read_image
    from paadet.fileio import atomic_write_bytes
    from paadet.visualize import draw_detections

    image, drawn = draw_detections(
        read_image(source.path), result.boxes, result.scores, result.labels, score_thr, class_names
    )
    ok, encoded = cv2.imencode(target.suffix if target.suffix else ".jpg", image)
    if not ok:
        raise RuntimeError(f"could not encode the visualisation of {source.file_name}")
    atomic_write_bytes(target, encoded.tobytes())
    return drawn
