"""The output folder of a batch run: ``run.json``, committed shards (results + manifest), ``errors.jsonl``,
``summary.json``; and reading the results back."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from paadet.batch.errors import BatchError
from paadet.batch.inputs import input_key
from paadet.data.images import ImageSource
from paadet.errors import one_line
from paadet.fileio import atomic_write_bytes, atomic_write_json, writing

if TYPE_CHECKING:
    from paadet.detections import ImageResult

FORMAT = "paadet-batch/1"
SHARD_FORMAT = "paadet-batch-shard/1"
SHARDS_DIR = "shards"
RUN_FILE = "run.json"
ERRORS_FILE = "errors.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"


# --- records --------------------------------------------------------------------------------------


def result_record(source_key: str, file_name: str, result: ImageResult) -> dict[str, Any]:
    """One line of a shard's results file. Floats are the float32 values written exactly (as in ``predict``)."""
    return {
        "path": source_key,
        "file_name": file_name,
        "height": int(result.ori_shape[0]),
        "width": int(result.ori_shape[1]),
        "boxes": result.boxes.tolist(),
        "scores": result.scores.tolist(),
        "labels": result.labels.tolist(),
    }


def record_to_result(record: dict[str, Any]) -> ImageResult:
    """The :class:`~paadet.detector.ImageResult` a results line was made from (bit-identical arrays)."""
    from paadet.detections import ImageResult

    return ImageResult(
        boxes=np.asarray(record["boxes"], np.float32).reshape(-1, 4),
        scores=np.asarray(record["scores"], np.float32),
        labels=np.asarray(record["labels"], np.int64),
        ori_shape=(record["height"], record["width"]),
        file_name=record["file_name"],
    )


# --- the output folder ----------------------------------------------------------------------------


@dataclass
class ShardManifest:
    """A committed shard: the inputs it covers and where their results are."""

    shard: int
    inputs: list[tuple[str, str]]
    errors: list[dict[str, Any]]
    results: str
    size: int
    sha256: str
    worker: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> ShardManifest:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != SHARD_FORMAT:
            raise ValueError(f"{path}: not a {SHARD_FORMAT} manifest")
        return cls(
            shard=int(data["shard"]),
            inputs=[tuple(i) for i in data["inputs"]],
            errors=data["errors"],
            results=data["results"],
            size=int(data["size"]),
            sha256=data["sha256"],
            worker=data.get("worker", {}),
        )

    def to_json(self) -> dict[str, Any]:
        return {"format": SHARD_FORMAT, **dataclasses.asdict(self)}


def shard_stem(shard: int) -> str:
    return f"shard-{shard:06d}"


class OutputFolder:
    """The output folder of a batch run: ``run.json``, ``shards/``, ``errors.jsonl``, ``summary.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shards = self.root / SHARDS_DIR

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder: two drivers must not write one folder."""
        with writing(self.shards):
            self.shards.mkdir(parents=True, exist_ok=True)
        with writing(self.root / LOCK_FILE):
            handle = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 (closed below, after the run)
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BatchError(f"{self.root}: another paadet batch run is writing this output folder") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check_run(self, fingerprint: dict[str, Any], weights: dict[str, str] | None = None) -> None:
        """Record the model settings and the weights' identity, or check that they are those of the runs before.

        ``weights`` is :func:`~paadet.batch.model.weights_identity`: a folder whose results were
        made from other contents of the same weights file is refused. A folder written before weights
        were recorded takes them on now.

        Raises:
            BatchError: other settings, or the weights file was replaced since the folder's results.
        """
        run_file = self.root / RUN_FILE
        record = {"format": FORMAT, "model": fingerprint, "weights": weights}
        if not run_file.exists():
            atomic_write_json(run_file, record, indent=1)
            return
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as exc:
            raise BatchError(one_line(f"{run_file}: unreadable ({exc}); use a new --output-dir")) from None
        if recorded.get("model") != fingerprint:
            raise BatchError(
                f"{self.root} holds results of other model settings ({recorded.get('model')}); "
                f"use a new --output-dir for {fingerprint}"
            )
        if "weights" not in recorded:  # written before weights were recorded: take them on
            atomic_write_json(run_file, record, indent=1)
            return
        before = recorded["weights"]
        if before != weights:
            file = (weights or before or {}).get("file")
            was = (before or {}).get("sha256", "?")
            now = (weights or {}).get("sha256", "?")
            raise BatchError(
                f"{self.root} holds another model's results: {file} has changed since they were made "
                f"(sha256 {now[:16]}..., was {was[:16]}...); use a new --output-dir for this model, "
                f"or put the original file back to resume"
            )

    def manifests(self, warn: Callable[[str], None] = print) -> list[ShardManifest]:
        """The committed shards, lowest number first; a manifest whose results file is missing or of the
        wrong size is skipped (its inputs are done again)."""
        found = []
        for path in sorted(self.shards.glob("shard-*.manifest.json")):
            try:
                manifest = ShardManifest.load(path)
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                warn(one_line(f"ignoring unreadable shard manifest {path}: {exc}"))
                continue
            results = self.shards / manifest.results
            if not results.is_file() or results.stat().st_size != manifest.size:
                warn(f"ignoring shard {manifest.shard}: its results file {results} is missing or truncated")
                continue
            found.append(manifest)
        found.sort(key=lambda m: m.shard)
        return found

    def remove_uncommitted(self, committed: list[ShardManifest]) -> int:
        """Delete results files no manifest names and temporary files left by a killed run; returns how many."""
        keep = {m.results for m in committed} | {f"{shard_stem(m.shard)}.manifest.json" for m in committed}
        removed = 0
        for path in self.shards.iterdir():
            if path.name not in keep and (path.name.startswith("shard-") or path.name.startswith(".shard-")):
                path.unlink()
                removed += 1
        return removed

    def next_shard(self) -> int:
        """A shard number above every file in ``shards/`` (committed or not), so none is reused."""
        numbers = [int(p.name.split("-")[1].split(".")[0]) for p in self.shards.glob("shard-*")]
        return max(numbers, default=-1) + 1

    def commit(self, shard: int, inputs: Sequence[Sequence[Any]], outcome: dict[str, Any]) -> ShardManifest:
        """Write a shard's results, then its manifest (the commit), each atomically.

        ``inputs`` are the shard's ``(path, file_name, ...)`` items; the manifest keeps path and name.
        """
        stem = shard_stem(shard)
        text = "".join(json.dumps(r) + "\n" for r in outcome["records"])
        data = text.encode("utf-8")
        atomic_write_bytes(self.shards / f"{stem}.jsonl", data)
        manifest = ShardManifest(
            shard=shard,
            inputs=[(item[0], item[1]) for item in inputs],
            errors=outcome["errors"],
            results=f"{stem}.jsonl",
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            worker={k: outcome[k] for k in ("worker", "pid", "node", "seconds")},
        )
        atomic_write_json(self.shards / f"{stem}.manifest.json", manifest.to_json())
        return manifest

    def iter_records(
        self, manifests: list[ShardManifest] | None = None, verify: bool = True
    ) -> Iterator[dict[str, Any]]:
        """Every results line of the committed shards (checked against the manifests' SHA-256)."""
        for manifest in self.manifests() if manifests is None else manifests:
            data = (self.shards / manifest.results).read_bytes()
            if verify and hashlib.sha256(data).hexdigest() != manifest.sha256:
                raise BatchError(f"{self.shards / manifest.results}: contents do not match its manifest's SHA-256")
            for line in data.decode("utf-8").splitlines():
                yield json.loads(line)


def read_results(output_dir: str | os.PathLike) -> dict[str, ImageResult]:
    """The detections stored in an output folder, by input path (absolute); each input once."""
    out: dict[str, ImageResult] = {}
    for record in OutputFolder(output_dir).iter_records():
        out.setdefault(record["path"], record_to_result(record))
    return out


def merge_coco(
    output_dir: str | os.PathLike, sources: list[ImageSource], category_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """The COCO results entries ``paadet predict`` writes for ``sources``, from an output folder.

    Image ids follow :func:`paadet.detections.image_ids` over ``sources``; inputs without results
    (unreadable, or not done yet) contribute nothing, as in ``predict``. ``category_ids``: the model's
    (default COCO's 80).
    """
    from paadet.detections import coco_entries

    wanted = {input_key(s): i for i, s in enumerate(sources)}
    results: dict[int, ImageResult] = {}
    for key, result in read_results(output_dir).items():
        if key in wanted:
            results[wanted[key]] = result
    return coco_entries(results, sources, category_ids)
