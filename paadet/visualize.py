"""Drawing detections on images (``paadet predict --save-vis``)."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np

from .coco import CLASS_NAMES


def _color(label: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    score_thr: float = 0.3) -> np.ndarray:
    """A copy of a BGR ``uint8`` image with labelled boxes (xyxy) for detections scoring at least ``score_thr``."""
    out = image.copy()
    thickness = max(1, round(max(out.shape[:2]) / 500))
    for box, score, label in zip(boxes, scores, labels):
        if score < score_thr:
            continue
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        color = _color(int(label))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        text = f"{CLASS_NAMES[int(label)]} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(y1, th + base)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), color, -1)
        cv2.putText(out, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out
