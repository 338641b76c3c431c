"""``--backend auto`` for ``predict``, ``eval``, ``serve`` and ``batch``: the fastest backend on this machine that
keeps fp32 detections, measured once and remembered.

:func:`resolve_auto` turns a spec whose backend is ``auto`` into one with a concrete backend:

1. An option that only one backend has decides (:func:`paadet.runtime.spec.auto_rule`: ``--tta`` or ``--device
   cuda`` the torch backend, ``--precision`` OpenVINO...).
2. Otherwise the candidates are the torch backend (for a checkpoint) and the graph runtimes installed (ONNX
   Runtime; OpenVINO at ``f32`` with ``paadet[openvino]``). Reduced precision is never chosen: the user asks for it.
3. A checkpoint is exported once to the full graph (NMS and score voting inside, a dynamic batch) at the preset
   the run uses, and checked against the torch backend on a generated image (the parity rule of ``paadet export``:
   at least 99.5 % of the detections matched, at most 0.5 % extra). A graph that fails the check is not used.
   The graph is kept in the cache folder (:func:`paadet.zoo.cache_dir`), under the checkpoint's SHA-256:
   ``exports/<sha256[:16]>/graph-<key>.onnx``, where ``key`` hashes the preset, score voting and paadet's
   version.
4. Each candidate runs a generated image at the run's preset (one untimed call, then ``rounds`` timed ones; the
   median decides). The choice is remembered beside the graph (``choices.json``), per machine (the CPU's model,
   its usable cores and the runtimes' versions), so that the next run builds the chosen backend only.

The line :meth:`AutoChoice.line` says what was chosen and why; commands print it on stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from paadet.cpu import cpu_model, usable_cores
from paadet.errors import PaadetError
from paadet.fileio import atomic_write_json, sha256_file
from paadet.preprocess import Preset, get_preset
from paadet.runtime.spec import AUTO, GRAPH_BACKENDS, ONNXRUNTIME, OPENVINO, TITLES, TORCH, DetectorSpec, auto_rule
from paadet.version import __version__
from paadet.zoo import DEFAULT_MODEL, cache_dir, find_model

EXPORTS = "exports"
"""The cache folder's sub-folder of auto's exports."""
CHOICES = "choices.json"

_DISTRIBUTIONS = {TORCH: "torch", ONNXRUNTIME: "onnxruntime", OPENVINO: "openvino"}


@dataclass
class AutoChoice:
    """What ``--backend auto`` resolved to.

    Attributes:
        spec: the spec to run (a concrete backend; a graph backend's ``model`` is the cached export).
        reason: why this backend, in words.
        candidates_ms: milliseconds per image of each candidate measured (empty when an option decided).
        measured_now: the candidates were timed in this run (False: remembered, or an option decided).
        graph: the cached export (None when no checkpoint was exported).
        export_seconds: the time the export and its check took in this run (None: cached, or none needed).
    """

    spec: DetectorSpec
    reason: str
    candidates_ms: dict[str, float] = field(default_factory=dict)
    measured_now: bool = False
    graph: Path | None = None
    export_seconds: float | None = None

    @property
    def backend(self) -> str:
        return self.spec.backend

    def line(self) -> str:
        """One line for the console: the backend chosen and why."""
        text = f"--backend auto: {TITLES[self.backend]} ({self.reason}"
        if self.candidates_ms:
            timed = ", ".join(f"{TITLES[k]} {v:.0f} ms" for k, v in sorted(self.candidates_ms.items(), key=_by_ms))
            text += f"; {timed} per image, {'measured now' if self.measured_now else 'measured before on this machine'}"
        if self.export_seconds is not None:
            text += f"; exported and checked in {self.export_seconds:.0f} s"
        if self.backend in GRAPH_BACKENDS and self.graph is not None:
            text += f"; graph {self.graph}"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        """The report's ``auto`` field."""
        return {
            "chosen": self.backend,
            "reason": self.reason,
            "candidates_ms": {k: round(v, 1) for k, v in self.candidates_ms.items()},
            "measured_now": self.measured_now,
            "graph": str(self.graph) if self.graph is not None else None,
            "export_seconds": None if self.export_seconds is None else round(self.export_seconds, 1),
        }


def _by_ms(item: tuple[str, float]) -> float:
    return item[1]


def installed(name: str) -> bool:
    """Whether ``name``'s runtime is installed (read from the package metadata: nothing is imported)."""
    try:
        metadata.version(_DISTRIBUTIONS[name])
    except metadata.PackageNotFoundError:
        return False
    return True


def machine_key() -> str:
    """This machine as far as speed goes: the CPU, its usable cores, and the versions of paadet and the runtimes."""
    parts = [cpu_model(), f"{usable_cores()} cores", f"paadet {__version__}"]
    for name, dist in _DISTRIBUTIONS.items():
        if installed(name):
            parts.append(f"{dist} {metadata.version(dist)}")
    return " | ".join(parts)


def _graph_key(preset: Preset, batch: int | None, score_voting: bool) -> str:
    """The export's settings as a short hash (its file name's key); ``batch`` None: dynamic."""
    text = json.dumps([preset.to_meta(), batch, score_voting, __version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_choices(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again and rewritten
    return data if isinstance(data, dict) else {}


def _remembered(known: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The reason and the candidates' milliseconds of a remembered choice."""
    return str(known.get("reason", "remembered")), {k: float(v) for k, v in known.get("candidates_ms", {}).items()}


def _remember(folder: Path, key: str, choice: AutoChoice) -> None:
    """Add ``choice`` to ``folder/choices.json`` under ``key`` (written atomically; a cache that cannot be written
    costs the next run a measurement, nothing else)."""
    path = folder / CHOICES
    data = _read_choices(path)
    data[key] = {
        "chosen": choice.backend,
        "reason": choice.reason,
        "candidates_ms": {k: round(v, 1) for k, v in choice.candidates_ms.items()},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with contextlib.suppress(OSError, PaadetError):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data, indent=1)


def probe(backends: dict[str, Any], image, meta, rounds: int = 2) -> dict[str, float]:
    """Median milliseconds of ``infer`` on one resized image for each backend, after one untimed call."""
    out = {}
    for name, backend in backends.items():
        backend.infer([image], [meta])
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            backend.infer([image], [meta])
            times.append(1000.0 * (time.perf_counter() - start))
        out[name] = statistics.median(times)
    return out


def _graph_spec(spec: DetectorSpec, backend: str, graph: Path) -> DetectorSpec:
    """``spec`` on a graph backend running ``graph`` (OpenVINO at f32)."""
    return spec.replace(backend=backend, model=str(graph), checkpoint=None, precision=None, streams=None)


def resolve_auto(spec: DetectorSpec, cache: Path | None = None, rounds: int = 2) -> AutoChoice | None:
    """Resolve ``spec.backend == "auto"`` (see the module's docstring); None when the spec names a backend.

    Args:
        spec: the command's spec (validated).
        cache: the cache folder (default :func:`paadet.zoo.cache_dir`).
        rounds: timed calls per candidate.

    Raises:
        PaadetError: the checkpoint or graph cannot be used (one line naming it), as with an explicit backend.
    """
    if spec.backend != AUTO:
        return None
    forced, why = auto_rule(spec)
    if forced is not None:
        return AutoChoice(spec.replace(backend=forced), why)
    if spec.model is not None:
        return _choose_runtime(spec, cache, rounds)
    return _choose_for_checkpoint(spec, cache, rounds)


def _choose_runtime(spec: DetectorSpec, cache: Path | None, rounds: int) -> AutoChoice:
    """A user's graph: the faster installed runtime for it."""
    from paadet.runtime.registry import build_backend

    candidates = [name for name in GRAPH_BACKENDS if installed(name)]
    if len(candidates) == 1:
        return AutoChoice(spec.replace(backend=candidates[0]), "the only graph runtime installed")
    from paadet.runtime.registry import graph_info

    base = spec.replace(backend=ONNXRUNTIME)
    info = graph_info(base)  # a missing or unreadable file: its one-line error, as with --backend onnxruntime
    folder = (cache or cache_dir()) / EXPORTS / sha256_file(Path(spec.model))[:16]
    key = f"{_graph_key(info.preset, info.batch, info.score_voting)} | {machine_key()}"
    known = _read_choices(folder / CHOICES).get(key)
    if known and known.get("chosen") in candidates:
        return AutoChoice(spec.replace(backend=known["chosen"]), *_remembered(known))
    preset = get_preset(spec.preset) if spec.preset is not None else info.preset
    backends = {name: build_backend(spec.replace(backend=name)) for name in candidates}
    image, meta = _probe_image(preset, backends[candidates[0]])
    timings = probe(backends, image, meta, rounds)
    chosen = min(timings, key=timings.get)
    choice = AutoChoice(spec.replace(backend=chosen), "the faster graph runtime here", timings, measured_now=True)
    _remember(folder, key, choice)
    return choice


def _checkpoint_file(spec: DetectorSpec) -> Path:
    """The checkpoint's file: an existing file or a model's cached file without importing torch (a run that ends on
    a graph runtime never loads it); otherwise :func:`paadet.hub.resolve_checkpoint` (which downloads)."""
    name = spec.checkpoint if spec.checkpoint is not None else DEFAULT_MODEL
    given = Path(name).expanduser()
    if given.is_file():
        return given
    entry = find_model(name)
    if entry is not None and entry.cached_path.is_file():
        return entry.cached_path
    from paadet.hub import resolve_checkpoint

    return resolve_checkpoint(spec.checkpoint)


def _recorded_preset(folder: Path, checkpoint: Path) -> Preset | None:
    """The preset the checkpoint records (its training scale), remembered in ``folder/checkpoint.json`` so that a
    second run does not read the checkpoint for it."""
    path = folder / "checkpoint.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Preset.from_meta(data["preset"]) if data.get("preset") else None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from paadet.checkpoint import load_checkpoint

    preset = load_checkpoint(checkpoint).preset
    with contextlib.suppress(OSError, PaadetError):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"file": str(checkpoint), "preset": preset.to_meta() if preset else None}, indent=1)
    return preset


def _choose_for_checkpoint(spec: DetectorSpec, cache: Path | None, rounds: int) -> AutoChoice:
    checkpoint = _checkpoint_file(spec)
    graphs = [name for name in GRAPH_BACKENDS if installed(name)]
    torch_spec = spec.replace(backend=TORCH, checkpoint=str(checkpoint))
    if not graphs:
        return AutoChoice(torch_spec, "no graph runtime is installed")
    folder = (cache or cache_dir()) / EXPORTS / sha256_file(checkpoint)[:16]
    if spec.preset is not None:
        preset = get_preset(spec.preset)
    else:
        preset = _recorded_preset(folder, checkpoint) or get_preset(spec.default_preset)
    graph = folder / f"graph-{_graph_key(preset, None, spec.score_voting)}.onnx"
    key = f"{graph.name} | {machine_key()}"
    known = _read_choices(folder / CHOICES).get(key)
    candidates = [TORCH, *graphs]
    if known and known.get("chosen") in candidates and (known["chosen"] == TORCH or graph.is_file()):
        chosen = known["chosen"]
        run = torch_spec if chosen == TORCH else _graph_spec(spec, chosen, graph)
        return AutoChoice(run, *_remembered(known), graph=graph if graph.is_file() else None)
    return _measure(spec, torch_spec, checkpoint, preset, graph, key, graphs, rounds)


def _measure(
    spec: DetectorSpec,
    torch_spec: DetectorSpec,
    checkpoint: Path,
    preset: Preset,
    graph: Path,
    key: str,
    graphs: list[str],
    rounds: int,
) -> AutoChoice:
    """Export the checkpoint (unless cached), check it, time every candidate, remember the fastest."""
    from paadet.console import stderr
    from paadet.model.build import load_network
    from paadet.runtime.registry import build_backend, torch_backend

    net = load_network(checkpoint)
    export_seconds = None
    if not graph.is_file():
        from paadet.export.exporter import export_onnx

        stderr(f"--backend auto: exporting {checkpoint.name} to {graph} once, then timing each backend...")
        start = time.perf_counter()
        graph.parent.mkdir(parents=True, exist_ok=True)
        report = export_onnx(net, graph, preset, dynamic_batch=True, score_voting=spec.score_voting, verify=True)
        export_seconds = time.perf_counter() - start
        if not report.parity_ok:  # remembered: the next run does not export again
            graph.unlink(missing_ok=True)
            choice = AutoChoice(torch_spec, f"the export failed its parity check ({report.parity})")
            _remember(graph.parent, key, choice)
            return choice
    backends = {TORCH: torch_backend(net, torch_spec.replace(preset=preset), preset)}
    for name in graphs:
        backends[name] = build_backend(_graph_spec(spec, name, graph))
    image, meta = _probe_image(preset, backends[graphs[0]])
    timings = probe(backends, image, meta, rounds)
    chosen = min(timings, key=timings.get)
    run = torch_spec if chosen == TORCH else _graph_spec(spec, chosen, graph)
    choice = AutoChoice(run, "fastest here at fp32", timings, True, graph, export_seconds)
    _remember(graph.parent, key, choice)
    return choice


def _probe_image(preset: Preset, graph_backend) -> tuple[Any, Any]:
    from paadet.export.sample import sample_image

    return sample_image(preset, graph_backend.info.input_size)
