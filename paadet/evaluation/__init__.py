"""``paadet eval``'s library: COCO box metrics of a detector on a dataset, or of a results file.

* :mod:`.metrics`: scoring with pycocotools (:func:`evaluate_results_file`, :func:`coco_evaluate`,
  :class:`CocoMetrics`);
* :mod:`.run`: running a :class:`~paadet.detector.Detector` over a dataset, resumably (:func:`evaluate_detector`);
* :mod:`.journal`: the append-only journal a run writes as it goes.
"""

from __future__ import annotations

from paadet.evaluation.journal import JournalError, JournalRecord
from paadet.evaluation.metrics import CocoMetrics, ResultsError, coco_evaluate, evaluate_results_file, format_metrics
from paadet.evaluation.run import EvalReport, evaluate_detector

__all__ = [
    "CocoMetrics",
    "EvalReport",
    "JournalError",
    "JournalRecord",
    "ResultsError",
    "coco_evaluate",
    "evaluate_detector",
    "evaluate_results_file",
    "format_metrics",
]
