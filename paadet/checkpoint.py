"""Safe loading of PAA checkpoints (mmdetection's format or a bare state dict).

Files are read with ``torch.load(..., weights_only=True)`` only: tensors and plain containers,
never arbitrary pickled objects. A file name carrying mmdetection's hash suffix
(``..._20200821-936edec3.pth``) is checked against the file's sha256 before it is unpickled.
Every error is a :class:`CheckpointError` whose message is one line and names the file.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from paadet.preprocess import Preset
from torch import Tensor

from paadet.classes import ClassList
from paadet.console import listed
from paadet.errors import PaadetError, one_line
from paadet.fileio import sha256_file  # re-exported: it lives with the other file helpers (no torch)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "expected_sha256_prefix",
    "key_mismatch_report",
    "load_checkpoint",
    "load_state_dict",
    "load_weights",
    "safe_torch_load",
    "sha256_file",
    "verify_sha256_prefix",
]

CLASS_WEIGHT_KEY = "bbox_head.atss_cls.weight"
"""The state-dict entry whose first dimension is the number of classes."""
HASH_SUFFIX_RE = re.compile(r"-([0-9a-f]{8,})\.pth$")


class CheckpointError(PaadetError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model; the message names the file."""


def expected_sha256_prefix(path: str | os.PathLike[str]) -> str | None:
    """The hex prefix of the sha256 that mmdetection encodes in a file name, or ``None``.

    ``paa_r50_fpn_1x_coco_20200821-936edec3.pth`` -> ``"936edec3"``; names without a suffix of
    at least 8 lower-case hex digits before ``.pth`` carry no hash.
    """
    match = HASH_SUFFIX_RE.search(Path(path).name)
    return match.group(1) if match else None


def _hash_mismatch_message(path: str | os.PathLike[str], expected: str, actual: str) -> str:
    """The one-line error for a file whose sha256 does not start with the hash in its name."""
    return (
        f"{path}: sha256 starts with {actual[: len(expected)]} but the file name expects {expected}; "
        f"the file is corrupt or truncated, delete it and re-download it"
    )


def verify_sha256_prefix(path: str | os.PathLike[str]) -> None:
    """Check the file against the hash suffix of its name, if it has one; raise on a mismatch."""
    expected = expected_sha256_prefix(path)
    if expected is None:
        return
    actual = sha256_file(path)
    if not actual.startswith(expected):
        raise CheckpointError(_hash_mismatch_message(path, expected, actual))


def _check_readable_file(path: Path) -> None:
    """Raise unless ``path`` is an existing, non-empty regular file."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file, expected a .pth checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint (an interrupted download?)")


_UNSAFE_GLOBAL_RE = re.compile(r"unsupported\s+global:?\s*(?:GLOBAL\s+)?([\w.]+)", re.IGNORECASE)
"""torch's words for a pickled callable or class it refuses: ``Unsupported global: GLOBAL builtins.eval was not
an allowed global`` (torch <= 2.5 and for allowed modules) and ``Trying to load unsupported GLOBAL
posix.system whose module posix is blocked`` (torch >= 2.6 for blocked modules)."""
_UNSAFE_OPCODE_RE = re.compile(r"unsupported\s+operand\s+(\d+)", re.IGNORECASE)
"""torch's words for a byte its restricted unpickler does not implement (a text file, or the protocol-4
``FRAME`` of a plain ``pickle.dump``): not a PyTorch checkpoint, and nothing was unpickled."""


def _describe_load_failure(path: Path, exc: Exception) -> str:
    """A one-line message for an exception raised by ``torch.load(weights_only=True)``."""
    text = str(exc)
    unsafe = _UNSAFE_GLOBAL_RE.search(text)
    if unsafe:
        return (
            f"{path}: refused as unsafe: the file pickles the Python object {unsafe.group(1)}, which loading it "
            f"would run or create; paadet loads only tensors and plain containers (weights_only=True) and ran nothing"
        )
    opcode = _UNSAFE_OPCODE_RE.search(text)
    if opcode:
        return (
            f"{path}: cannot be read as a PyTorch checkpoint (corrupt, truncated or not a checkpoint): not a "
            f"torch.save file (a raw pickle or another format: instruction {opcode.group(1)} is not one the "
            f"safe loader accepts); nothing in it was run"
        )
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    first = unpickler.group(1) if unpickler else next((ln for ln in text.splitlines() if ln.strip()), "")
    first = one_line(first).split(". ")[0].rstrip(".")
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{path}: cannot be read as a PyTorch checkpoint (corrupt, truncated or not a checkpoint): {detail}"


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` of an existing, non-empty file onto the CPU: tensors and plain
    containers only, every failure a one-line :class:`CheckpointError` (unsafe content named as such)."""
    path = Path(path)
    _check_readable_file(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ...
        raise CheckpointError(_describe_load_failure(path, exc)) from exc


def _extract_state_dict(path: Path, obj: Any) -> Mapping[Any, Any]:
    """The state dict inside mmdetection's ``{"meta", "state_dict"}`` layout, or ``obj`` itself."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint, it holds a {type(obj).__name__} instead of a dict of tensors")
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping):
        return inner
    return obj


def _validate_tensors(path: Path, state: Mapping[Any, Any]) -> dict[str, Tensor]:
    """Check that ``state`` maps strings to tensors and return it as a plain dict."""
    if not state:
        raise CheckpointError(f"{path}: not a checkpoint, its state dict is empty")
    bad = [key for key, value in state.items() if not (isinstance(key, str) and isinstance(value, Tensor))]
    if len(bad) == len(state):
        raise CheckpointError(f"{path}: not a checkpoint, it holds no tensors (keys: {listed(list(state), 3)})")
    if bad:
        raise CheckpointError(f"{path}: not a state dict, {len(bad)} entries are not named tensors ({listed(bad, 3)})")
    return dict(state)


def _strip_module_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds, when every key has it."""
    prefix = "module."
    if all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return state


@dataclass
class Checkpoint:
    """A checkpoint file's contents.

    Attributes:
        path: the file.
        state_dict: ``{name: tensor}`` on the CPU (a ``module.`` prefix removed).
        meta: mmdetection's ``meta`` dict (empty for a bare state dict).
    """

    path: Path
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int | None:
        """The head's class count, from ``bbox_head.atss_cls.weight`` (None if absent)."""
        weight = self.state_dict.get(CLASS_WEIGHT_KEY)
        return int(weight.shape[0]) if weight is not None and weight.ndim == 4 else None

    @property
    def preset(self) -> Preset | None:
        """The input sizing the model was trained at (``meta.preset``, written by ``paadet train``); None
        when the file records none (the official checkpoint: mmdetection's 1333x800).

        Raises:
            CheckpointError: a malformed ``meta.preset``.
        """
        data = self.meta.get("preset")
        if data is None:
            return None
        from paadet.preprocess import Preset

        try:
            return Preset.from_meta(data)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: {one_line(exc)} in meta.preset") from exc

    @property
    def classes(self) -> ClassList:
        """The class list in ``meta.dataset_meta`` (COCO's 80 when there is none and the head has 80 outputs).

        Raises:
            CheckpointError: the meta's class list does not fit the head.
        """
        try:
            classes = ClassList.from_meta(self.meta, self.num_classes)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.path}: malformed class list in meta.dataset_meta: {one_line(exc)}") from exc
        if self.num_classes is not None and len(classes) != self.num_classes:
            raise CheckpointError(
                f"{self.path}: meta.dataset_meta lists {len(classes)} classes but the head predicts {self.num_classes}"
            )
        return classes


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint file: its state dict and its ``meta`` (see :func:`load_state_dict` for the rules).

    Raises:
        CheckpointError: as :func:`load_state_dict`.
    """
    path = Path(path)
    _check_readable_file(path)
    verify_sha256_prefix(path)
    obj = safe_torch_load(path)
    state = _validate_tensors(path, _extract_state_dict(path, obj))
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    return Checkpoint(path, _strip_module_prefix(state), dict(meta))


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a checkpoint file into a ``{name: tensor}`` dict on the CPU.

    Accepts mmdetection's ``{"meta": ..., "state_dict": {...}}`` layout and a bare state dict;
    a ``module.`` prefix on every key is removed. If the file name carries mmdetection's hash
    suffix, the file's sha256 is checked before anything is unpickled.

    Raises:
        CheckpointError: missing, empty, corrupt or truncated file, hash mismatch, a file that is
            not a checkpoint, or one that would need ``weights_only=False``.
    """
    return load_checkpoint(path).state_dict


def _shape(tensor: Tensor) -> str:
    """A shape as ``[a, b]`` (``[]`` for a 0-dim tensor)."""
    return "[" + ", ".join(str(size) for size in tensor.shape) + "]"


def key_mismatch_report(checkpoint: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str | None:
    """Describe missing, unexpected and mis-shaped keys on one line, or ``None`` when all match."""
    missing = [key for key in expected if key not in checkpoint]
    unexpected = [key for key in checkpoint if key not in expected]
    misshaped = [
        f"{key} (checkpoint {_shape(checkpoint[key])} vs model {_shape(ref)})"
        for key, ref in expected.items()
        if key in checkpoint and checkpoint[key].shape != ref.shape
    ]
    parts = [
        f"{kind} keys: {len(names)} ({listed(names, 3)})"
        for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if names
    ]
    return "; ".join(parts) if parts else None


def load_weights(model: torch.nn.Module, path: str | os.PathLike[str] | Checkpoint) -> None:
    """Load a checkpoint (a path or a :class:`Checkpoint`) into ``model`` strictly (every key present, no
    extra key, same shapes).

    Raises:
        CheckpointError: any error of :func:`load_state_dict`, or keys that do not match the model
            (the message counts missing, unexpected and mis-shaped keys and names the first few).
    """
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    state, path = checkpoint.state_dict, checkpoint.path
    report = key_mismatch_report(state, model.state_dict())
    if report is not None:
        raise CheckpointError(f"{path}: checkpoint does not match {type(model).__name__}: {report}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: cannot load into {type(model).__name__}: {one_line(exc)}") from exc
