"""The OpenVINO backend: runs a graph made by ``paadet export`` on OpenVINO's CPU plugin.

Needs ``pip install "paadet[openvino]"``. The choices, in short:

* **Which file.** The ``.onnx`` of ``paadet export`` itself, read once by OpenVINO's ONNX front end
  alone: no conversion step, one file for ONNX Runtime and OpenVINO. OpenVINO keeps the ONNX metadata
  (preset, batch, classes...) in the model's ``rt_info`` (``framework``), where paadet reads it. An
  OpenVINO IR (``.xml`` + ``.bin``) saved from it is accepted too: ``ov.save_model`` writes that
  ``rt_info`` into the IR. Save it with
  ``compress_to_fp16=False``, or the IR's weights are rounded to float16.
* **Shapes.** A graph's dynamic dimensions (batch, height, width) stay dynamic: the model is compiled once
  and the CPU plugin handles each new input shape itself (shape inference, kernels cached per shape), so
  the ``mmdet`` preset's many padded sizes cost no recompilation. ``shape_cache=N`` instead compiles a
  static copy per input shape (the ``N`` most recent kept): a few seconds per new shape, for workloads
  whose shapes repeat (the ``800`` preset with a dynamic batch). A static graph is compiled as it is.
* **Precision.** ``precision="f32"`` (the default) or ``"bf16"``, set as ``INFERENCE_PRECISION_HINT``.
  OpenVINO's own CPU default is bf16 wherever the CPU has bfloat16 (AMX, AVX512_BF16), which changes
  detections; paadet runs f32 unless bf16 is asked for, and refuses bf16 on a CPU without it.
* **Threads.** ``INFERENCE_NUM_THREADS`` = ``threads``, else ``OMP_NUM_THREADS``, else OpenVINO's own
  choice (its physical cores: torch's default too). ``describe()`` reports the compiled model's count (once
  one is compiled). (torch is not imported: a full graph runs without it.)
* **Streams.** ``streams=1``: one batch at a time on all the threads (latency hint), as the other backends
  run. ``streams=N``: OpenVINO's ``NUM_STREAMS`` = N (throughput hint), the threads split between them,
  N infer requests, and ``concurrency`` = N, so the :class:`~paadet.detector.Detector` keeps N batches in
  flight from N threads. Each request's detections are the same computation either way; only how many
  threads each convolution gets differs.

Pre- and post-processing are the ONNX Runtime backend's: a full graph gets the padded ``uint8`` batch
and does the rest (normalisation, network, decoding, NMS, score voting); a raw graph (the network's 15
maps) is normalised and post-processed in PyTorch.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from paadet.errors import PaadetError, one_line
from paadet.preprocess import Preset
from paadet.runtime.exported_graph import ExportedGraphBackend, OnnxModelError, check_graph_preset
from paadet.runtime.graph_info import ExportFormatError, ExportInfo
from paadet.runtime.spec import OPENVINO, normalize_precision

INSTALL_HINT = 'pip install "paadet[openvino]"'
IR_SUFFIXES = (".xml",)


_CORE = None
_CORE_LOCK = threading.Lock()


def shared_core():
    """The process's one ``openvino.Core``: every model paadet reads or compiles goes through it.

    One, not one per backend, because OpenVINO's CPU plugin (2022.2 and later, for AMX) gives the thread that
    loads it an alternate signal stack, and each plugin instance (one per ``Core``) takes that stack away again
    when it is destroyed, restoring the stack it saw when it was created. Two ``Core`` objects freed in the order
    they were made in (A, B, then A freed before B) leave the thread's alternate stack pointing at A's unmapped
    memory, and the next signal with a Python handler (Ctrl-C, SIGTERM, SIGCHLD) kills the process with
    SIGSEGV. With one ``Core``, kept for the life of the process, that cannot happen; the plugin is also loaded
    once.
    """
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = import_openvino().Core()
        return _CORE


def _omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a thread count (torch's rule too), or None when unset or not a positive int."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


class OpenVinoModelError(OnnxModelError):
    """A graph that OpenVINO cannot run as asked (preset, size, batch, precision, compilation); names the file."""


def import_openvino():
    """The ``openvino`` module, or a one-line :class:`PaadetError` saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise PaadetError(f"OpenVINO is not installed ({one_line(exc)}); install it with: {INSTALL_HINT}") from None
    return openvino


def _rt_metadata(model) -> dict[str, str]:
    """The ONNX ``metadata_props`` that OpenVINO keeps in ``rt_info['framework']`` (ONNX files and IR alike)."""
    try:
        if not model.has_rt_info(["framework"]):
            return {}
        framework = model.get_rt_info()["framework"]
        props = {}
        for key in framework:
            value = framework[key]
            props[str(key)] = value.astype(str) if hasattr(value, "astype") else str(value)
    except Exception:
        return {}
    return props


def read_model(path: str | os.PathLike, core=None):
    """``(openvino model, ExportInfo)`` of a ``paadet export`` graph (``.onnx``, or an IR ``.xml`` saved from one).

    A file that is not an IR ``.xml`` is read by OpenVINO's ONNX front end alone (``Core.read_model`` would
    try its other front ends on a file that is not ONNX, and TensorFlow's prints parse errors), once: the
    export's metadata comes from the model's ``rt_info``, so the file is not parsed a second time by
    ``onnx`` (a quarter of a second for R50-FPN's 130 MB). ``core`` (default: :func:`shared_core`) reads
    IR files; the ONNX front end needs none.

    Raises:
        PaadetError: OpenVINO is not installed.
        ExportFormatError: a missing file, one OpenVINO cannot read, or not a paadet export.
    """
    import_openvino()  # one line naming the extra when OpenVINO is missing
    path = os.fspath(path)
    if not Path(path).is_file():
        raise ExportFormatError(f"{path}: model file not found")
    is_ir = path.lower().endswith(IR_SUFFIXES)
    kind = "an OpenVINO IR" if is_ir else "an ONNX model"
    try:
        if is_ir:
            model = (core or shared_core()).read_model(path)
        else:
            from openvino.frontend import FrontEndManager

            onnx_frontend = FrontEndManager().load_by_framework("onnx")
            model = onnx_frontend.convert(onnx_frontend.load(path))
    except Exception as exc:  # OpenVINO raises RuntimeError / GeneralFailure with multi-line texts
        raise ExportFormatError(
            f"{path}: cannot be read as {kind} by OpenVINO ({type(exc).__name__}: {one_line(exc)[:300]})"
        ) from exc
    return model, ExportInfo.from_metadata(_rt_metadata(model), path)


def read_export_info_any(path: str | os.PathLike) -> ExportInfo:
    """The :class:`ExportInfo` of an ``.onnx`` export (parsed by ``onnx``, no graph built) or of an IR ``.xml``
    (read by OpenVINO)."""
    from paadet.runtime.graph_info import read_export_info

    if os.fspath(path).lower().endswith(IR_SUFFIXES):
        return read_model(path)[1]
    return read_export_info(path)


class OpenVinoBackend(ExportedGraphBackend):
    """Runs a paadet export with OpenVINO on the CPU.

    Args:
        core: the ``openvino.Core``.
        model: the ``openvino.Model`` read from ``path``.
        info: the export's metadata.
        path: the graph's file (for messages).
        preset: the preset to pre-process with (must size images as the graph's preset does).
        precision: ``f32`` or ``bf16`` (OpenVINO's inference precision).
        threads: CPU threads for inference (default: ``OMP_NUM_THREADS``, else OpenVINO's choice, its
            physical cores).
        shape_cache: 0 = compile the graph once with its dynamic dimensions; N > 0 = compile a static copy
            per input shape, keeping the N most recent (a static graph is compiled once either way).
        device: the OpenVINO device (``CPU``), kept as ``ov_device``.
        streams: OpenVINO streams (and infer requests) per compiled model: that many :meth:`infer` calls
            run at once from different threads (``concurrency``); 1 = one at a time, latency hint.
    """

    name = OPENVINO
    model_error = OpenVinoModelError

    def __init__(
        self,
        core,
        model,
        info: ExportInfo,
        path: str,
        preset: Preset | None = None,
        precision: str = "f32",
        threads: int | None = None,
        shape_cache: int = 0,
        device: str = "CPU",
        streams: int = 1,
    ) -> None:
        super().__init__(info, path, preset)
        if int(streams) < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.streams = int(streams)
        self.core = core
        self.model = model
        self.ov_device = device  # OpenVINO's device name (not a torch device: the Detector reads `.device`)
        self.inference_precision = normalize_precision(precision)
        self.threads = int(threads) if threads else _omp_threads()  # None: OpenVINO's choice, read after compiling
        if shape_cache < 0:
            raise ValueError(f"shape_cache must be >= 0, got {shape_cache}")
        self.input_names = [i.get_any_name() for i in model.inputs]
        self.output_names = [o.get_any_name() for o in model.outputs]
        self.dynamic = any(i.get_partial_shape().is_dynamic for i in model.inputs)
        self.shape_cache = shape_cache if self.dynamic else 0
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple, object] = OrderedDict()
        self._check_precision_supported()
        if not self.shape_cache:  # one compiled model for every shape: compile now, errors surface at load
            self._compiled[()] = self._compile(model)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        preset: str | Preset | None = None,
        precision: str = "f32",
        threads: int | None = None,
        shape_cache: int = 0,
        device: str = "CPU",
        streams: int = 1,
    ) -> OpenVinoBackend:
        """Open ``path`` (a ``paadet export`` ``.onnx``, or an IR ``.xml`` saved from one) and compile it.

        Raises:
            PaadetError: OpenVINO is not installed.
            ExportFormatError: unreadable file or not a paadet export.
            OpenVinoModelError: a preset that does not fit the graph, bf16 on a CPU without it, or a graph
                OpenVINO cannot compile.
        """
        path = os.fspath(path)
        core = shared_core()
        model, info = read_model(path, core)
        preset = check_graph_preset(path, info, preset, OpenVinoModelError)
        return cls(
            core,
            model,
            info,
            path,
            preset,
            precision=precision,
            threads=threads,
            shape_cache=shape_cache,
            device=device,
            streams=streams,
        )

    @property
    def concurrency(self) -> int:
        """One :meth:`infer` call at a time per stream (each has its own infer request)."""
        return self.streams

    # -- compilation -------------------------------------------------------------------------------------------

    def _check_precision_supported(self) -> None:
        if self.inference_precision != "bf16":
            return
        try:
            caps = list(self.core.get_property(self.ov_device, "OPTIMIZATION_CAPABILITIES"))
        except Exception:
            return
        if "BF16" not in caps:
            raise OpenVinoModelError(
                f"{self.path}: --precision bf16 asked, but this {self.ov_device} has no bfloat16 support "
                f"(OpenVINO capabilities: {', '.join(caps)}); use --precision f32"
            )

    def compile_config(self) -> dict:
        """The properties every compilation gets."""
        config = {
            "INFERENCE_PRECISION_HINT": self.inference_precision,
            "NUM_STREAMS": self.streams,
            "PERFORMANCE_HINT": "LATENCY" if self.streams == 1 else "THROUGHPUT",
        }
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _compile(self, model):
        try:
            compiled = self.core.compile_model(model, self.ov_device, self.compile_config())
        except Exception as exc:  # OpenVINO's errors are multi-line
            raise OpenVinoModelError(
                f"{self.path}: OpenVINO cannot compile it for {self.ov_device} "
                f"({type(exc).__name__}: {one_line(exc)[:300]})"
            ) from exc
        if self.threads is None:
            with contextlib.suppress(Exception):  # a device without the property: the count stays unknown (None)
                self.threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        try:
            granted = int(compiled.get_property("NUM_STREAMS"))
        except Exception:
            granted = self.streams
        if granted != self.streams:
            raise OpenVinoModelError(
                f"{self.path}: {self.streams} streams asked, but OpenVINO made {granted} "
                f"(with {self.threads} threads); use --streams {granted}"
            )
        requests: queue.SimpleQueue = queue.SimpleQueue()  # the idle ones; a caller takes one and puts it back
        for _ in range(self.streams):
            requests.put(compiled.create_infer_request())
        return compiled, requests

    def _requests_for(self, feeds: dict[str, np.ndarray]) -> queue.SimpleQueue:
        """The idle infer requests that run ``feeds``: the one compiled model's, or the static copy's for their
        shapes (compiled here if new; call with ``_lock`` held)."""
        if not self.shape_cache:
            return self._compiled[()][1]
        key = tuple((name, feeds[name].shape) for name in self.input_names)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key][1]
        static = self.model.clone()
        static.reshape({name: list(shape) for name, shape in key})
        self._compiled[key] = self._compile(static)
        while len(self._compiled) > self.shape_cache:  # a request in use keeps its compiled model alive
            self._compiled.popitem(last=False)
        return self._compiled[key][1]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs (copies, in the graph's output order) for ``feeds``; up to ``streams`` calls run
        at once (each on its own infer request; OpenVINO releases the GIL while it infers)."""
        with self._lock:
            requests = self._requests_for(feeds)
        request = requests.get()  # blocks while every request of this model is busy
        try:
            request.infer(feeds)
            return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(len(self.output_names))]
        except Exception as exc:
            raise OpenVinoModelError(
                f"{self.path}: OpenVINO inference failed ({type(exc).__name__}: {one_line(exc)[:300]})"
            ) from exc
        finally:
            requests.put(request)

    @property
    def compiled_precision(self) -> str | None:
        """The inference precision a compiled model reports (``f32``, ``bf16``); None before the first compile."""
        with self._lock:  # other threads may be compiling a new shape
            if not self._compiled:
                return None
            compiled = next(reversed(self._compiled.values()))[0]
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

    def _runtime_facts(self) -> dict:
        return {
            "device": "cpu" if self.ov_device == "CPU" else self.ov_device,
            "precision": "bf16" if self.inference_precision == "bf16" else self.info.precision,
            "inference_precision": self.compiled_precision or self.inference_precision,
            "threads": self.threads,
            **({"streams": self.streams} if self.streams != 1 else {}),  # absent at 1: older eval journals resume
        }

    def describe(self) -> dict:
        info = super().describe()
        info.update(
            shapes=(
                "static"
                if not self.dynamic
                else f"compiled per input shape, {self.shape_cache} kept"
                if self.shape_cache
                else "dynamic, compiled once"
            ),
            openvino=_openvino_version(),
        )
        return info


def _openvino_version() -> str:
    import openvino

    return str(getattr(openvino, "__version__", "?")).split("-")[0]
