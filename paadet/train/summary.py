"""What a training run did: :class:`TrainSummary`, returned by :func:`paadet.train.train` and printed in one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainSummary:
    """What a run did.

    Attributes:
        output_dir: its folder.
        iterations: iterations completed in all (a resumed run counts the earlier ones).
        epochs: epochs completed in all.
        run_iterations: iterations this call ran.
        images: images trained on in this call.
        skipped: unreadable images skipped in this call, and their names.
        seconds: wall time of this call's iterations (validation excluded).
        last_losses: the last iteration's ``loss``, ``loss_cls``, ``loss_bbox``, ``loss_iou``.
        best_ap, best_epoch: the best validation AP and its epoch (None without validation).
        checkpoint: ``latest.pth`` (None if nothing was saved).
        plot: the PNG (None: matplotlib missing, or no iteration).
        stopped: ``finished`` (every epoch), ``max_iters`` or ``nothing to do``.
        init_note: how the weights were initialised, when it is worth saying (re-initialised ``atss_cls``).
        rank, world_size: this process's rank and the processes training together (DDP; 1: one process).
            Under DDP ``images`` counts every rank's, ``skipped`` this rank's.
    """

    output_dir: Path
    iterations: int
    epochs: int
    run_iterations: int = 0
    images: int = 0
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    last_losses: dict[str, float] = field(default_factory=dict)
    best_ap: float | None = None
    best_epoch: int | None = None
    checkpoint: Path | None = None
    plot: Path | None = None
    stopped: str = "finished"
    init_note: str | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def seconds_per_iter(self) -> float | None:
        return self.seconds / self.run_iterations if self.run_iterations else None

    def line(self) -> str:
        """One line with the figures."""
        parts = [
            f"{self.stopped}: {self.iterations} iterations, {self.epochs} epochs"
            + (f" on {self.world_size} processes" if self.world_size > 1 else "")
        ]
        if self.run_iterations:
            parts.append(
                f"this run {self.run_iterations} iterations on {self.images} images in {self.seconds:.1f} s "
                f"({self.seconds_per_iter:.3f} s/iter)"
            )
        if self.last_losses:
            parts.append(
                "last loss {loss:.4f} (cls {loss_cls:.4f}, bbox {loss_bbox:.4f}, iou {loss_iou:.4f})".format(
                    **self.last_losses
                )
            )
        if self.best_ap is not None:
            parts.append(f"best val AP {self.best_ap:.4f} (epoch {self.best_epoch})")
        parts.append(f"{self.skipped} unreadable images skipped")
        if self.checkpoint is not None:
            parts.append(f"checkpoint {self.checkpoint}")
        if self.plot is not None:
            parts.append(f"plot {self.plot}")
        return "; ".join(parts)
