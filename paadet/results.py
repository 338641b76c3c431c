"""COCO results entries for listed input files: the ``image_id`` rule and the entries ``predict`` and ``batch`` write."""
from __future__ import annotations

from collections.abc import Sequence

from .data.images import ImageSource


def image_ids(sources: list[ImageSource]) -> list[int]:
    """COCO ``image_id`` per input: the file stem when every stem is a distinct integer (COCO's
    ``000000397133.jpg`` -> 397133), otherwise the position in the input list (0, 1, ...: inputs in the
    order given, each folder's images sorted by their path in it)."""
    stems = [s.path.stem for s in sources]
    if stems and all(st.isdigit() for st in stems) and len({int(st) for st in stems}) == len(stems):
        return [int(st) for st in stems]
    return list(range(len(sources)))


def coco_entries(results: dict, sources: list[ImageSource], category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results entries for ``results`` keyed by input position, ids from :func:`image_ids` over
    ``sources``, in input order; inputs without a result contribute nothing. ``category_ids``: the
    model's (default COCO's 80)."""
    ids = image_ids(sources)
    entries: list[dict] = []
    for index in sorted(results):
        entries.extend(results[index].to_coco(ids[index], category_ids=category_ids))
    return entries
