"""Prediction from preprocessed arrays, and the ONNX Runtime and OpenVINO back ends (no torch needed).

An exported model (see :mod:`florist.export`) is one graph: every backbone, the
head and the test-time average, from preprocessed pixels to probabilities. Its
metadata holds everything else (classes, inputs with their preprocessing), so
``OnnxClassifier("model.onnx")`` needs nothing but the file, Pillow, numpy and
onnxruntime; ``OpenVINOClassifier("model.xml")`` the same with OpenVINO.

:class:`ArrayClassifier` is what every serving back end shares: bytes or files ->
:func:`florist.preprocess.image_arrays` -> a batched ``probabilities`` call -> ranked
:class:`~florist.prediction.Prediction` objects. A run folder is served by
:class:`florist.export.GraphClassifier`, the same graph on one of florist's engines.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .data import DEFAULT_MAX_PIXELS, BadImage, read_file
from .errors import FloristError
from .inputs import expand_inputs
from .prediction import Prediction, rank
from .preprocess import ModelInput, image_arrays
from .progress import ProgressFn

#: Key of the JSON metadata in an exported model (ONNX ``metadata_props``; TorchScript extra file name).
METADATA_KEY = "florist"
#: Version of that metadata's layout.
EXPORT_FORMAT = 1
#: Name of the exported graph's only output: ``[N, classes]`` probabilities.
OUTPUT_NAME = "probabilities"


class ArrayClassifier:
    """A model that maps preprocessed arrays (one per :attr:`inputs` entry) to probabilities.

    Subclasses set :attr:`classes` and :attr:`inputs` and implement :meth:`probabilities`.

    Attributes:
        backend: ``"onnx"``, ``"openvino"``, ``"pytorch"`` or ``"onnxruntime"``, reported by the server.
        max_pixels: images whose header claims more pixels are refused before decoding.
    """

    backend = "arrays"
    classes: list[str]
    inputs: list[ModelInput]
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 32
    has_ood: bool = False  # scores how unlike the training classes an image is (run folders only)
    ood_threshold: float | None = None

    def probabilities(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``[N, classes]`` float32 for a batch: input name -> ``[N, 3, H, W]`` float32."""
        raise NotImplementedError

    def ood_scores(self, batch: dict[str, np.ndarray]) -> np.ndarray | None:
        """``[N]`` out-of-distribution scores for a batch, or None for a model without a detector."""
        return None

    def outputs_of(self, images: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`probabilities_of` and, when the model has a detector, the images' out-of-distribution scores."""
        if not self.has_ood or not images:
            return self.probabilities_of(images), None
        probs, scores = [], []
        for batch in self._batches(images):
            probs.append(self.probabilities(batch))
            scores.append(self.ood_scores(batch))
        return np.concatenate(probs).astype(np.float32, copy=False), np.concatenate(scores)

    def arrays(self, data: bytes) -> dict[str, np.ndarray]:
        """Decode and preprocess one image's bytes for every input.

        Raises:
            florist.data.BadImage: the bytes are not a usable image.
        """
        return image_arrays(data, self.inputs, self.max_pixels)

    def probabilities_of(self, images: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        """Probabilities for preprocessed images (from :meth:`arrays`), run in batches."""
        if not images:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        out = [self.probabilities(batch) for batch in self._batches(images)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def _batches(self, images: Sequence[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """Preprocessed images stacked into batches of :attr:`batch_size`: input name -> ``[n, ...]``."""
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            yield {s.name: np.stack([im[s.name] for im in chunk]) for s in self.inputs}

    def _read_all(self, paths: Sequence[str | Path]) -> tuple[list[dict[str, np.ndarray] | None], dict[int, str]]:
        """Read and preprocess every file in a thread pool (Pillow releases the GIL); failures -> errors."""

        def one(path: str | Path) -> dict[str, np.ndarray] | str:
            try:
                return self.arrays(read_file(path))
            except BadImage as e:
                return str(e) or "unreadable image"

        workers = min(8, (os.cpu_count() or 1) + 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, paths))
        errors = {i: r for i, r in enumerate(results) if isinstance(r, str)}
        return [None if isinstance(r, str) else r for r in results], errors

    def _probabilities_with_errors(
        self, arrays: list[dict[str, np.ndarray] | None], errors: dict[int, str]
    ) -> np.ndarray:
        probs = np.full((len(arrays), len(self.classes)), np.nan, dtype=np.float32)
        ok = [i for i in range(len(arrays)) if i not in errors]
        if ok:
            probs[ok] = self.probabilities_of([arrays[i] for i in ok])  # type: ignore[misc]
        return probs

    def predict_proba(
        self, paths: Sequence[str | Path], *, progress: ProgressFn | None = None, **_: Any
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Probabilities ``[N, classes]`` for image files and index -> error for unreadable ones.

        Rows of unreadable images are NaN. Accepts (and ignores) the feature-cache
        arguments of :meth:`florist.predict.Classifier.predict_proba`.
        """
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        errors: dict[int, str] = {}
        step = self.batch_size * 4
        for start in range(0, len(paths), step):
            chunk = list(paths[start : start + step])
            arrays, chunk_errors = self._read_all(chunk)
            probs[start : start + len(chunk)] = self._probabilities_with_errors(arrays, chunk_errors)
            errors.update({start + i: e for i, e in chunk_errors.items()})
            if progress:
                progress(start + len(chunk), len(paths))
        return probs, errors

    def predict(
        self,
        inputs: Iterable[str | Path],
        top_k: int = 5,
        progress: ProgressFn | None = None,
        *,
        ood_threshold: float | None = None,
    ) -> list[Prediction]:
        """Top-``k`` predictions for files, folders (recursive) or glob patterns (as ``Classifier.predict``).

        Exported graphs give the classes only: an ``ood_threshold`` is refused.
        """
        refuse_ood_threshold(ood_threshold, has_detector=False)
        pairs = expand_inputs(inputs)  # (name as given, path to read)
        probs, errors = self.predict_proba([path for _, path in pairs], progress=progress)
        return rank([name for name, _ in pairs], probs, errors, self.classes, top_k)


def refuse_ood_threshold(threshold: float | None, *, has_detector: bool) -> None:
    """Refuse an ``ood_threshold`` for a model that has no detector (an exported file, or an older run)."""
    if threshold is not None and not has_detector:
        raise FloristError(
            "--ood-threshold needs a run folder trained with an out-of-distribution detector; "
            "exported models give the classes only"
        )


def read_metadata(meta: dict[str, Any], source: str) -> tuple[list[str], list[ModelInput], dict[str, Any]]:
    """Classes, inputs and the full metadata dict from an exported model's ``florist`` JSON.

    Raises:
        FloristError: the metadata is missing or from an incompatible florist.
    """
    if meta.get("format") != EXPORT_FORMAT:
        raise FloristError(
            f"{source} was exported by an incompatible florist (format {meta.get('format')}, "
            f"this version reads {EXPORT_FORMAT})"
        )
    return list(meta["classes"]), [ModelInput.from_dict(d) for d in meta["inputs"]], meta


class ExportedClassifier(ArrayClassifier):
    """An exported file run by its own runtime: classes, inputs and views come from its metadata."""

    metadata: dict[str, Any]
    tta_views: list[str]

    def take_metadata(self, meta: dict[str, Any], source: str) -> None:
        """Take the classes, inputs and test-time views of :func:`read_metadata`'s ``meta``."""
        self.classes, self.inputs, self.metadata = read_metadata(meta, source)
        self.tta_views = list(self.metadata.get("tta_views", ["clean"]))


class OnnxClassifier(ExportedClassifier):
    """An exported ``.onnx`` model run by ONNX Runtime on the CPU.

    Example:
        >>> model = florist.load("model.onnx")                 # doctest: +SKIP
        >>> model.predict(["rose.jpg"], top_k=3)[0].labels     # doctest: +SKIP

    Args:
        path: a file written by ``florist export``.
        threads: intra-op threads (default: ONNX Runtime's choice, one per core).

    Raises:
        FloristError: missing file, not an ONNX model, or not exported by florist.
    """

    backend = "onnx"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FloristError(f"model file not found: {self.path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise FloristError(
                f"cannot load {self.path} as an ONNX model: {str(e).splitlines()[0][:200]}"
            ) from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise FloristError(f"{self.path} has no florist metadata: export it with `florist export`")
        self.take_metadata(json.loads(raw), str(self.path))

    def probabilities(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], batch)[0]


class OpenVINORunner:
    """A compiled OpenVINO model called from any thread: one infer request per thread (a request is not thread-safe)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self._local = threading.local()

    def __call__(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer([np.ascontiguousarray(a) for a in arrays])  # in the model's input types
        return np.array(result[0], dtype=np.float32)  # a copy: the request reuses its output buffer


def import_openvino() -> ModuleType:
    """``import openvino``, without OpenVINO's usage reports.

    Importing OpenVINO's converter sends a Google Analytics event, and so does each
    conversion, unless a consent file in the user's home folder says no (a missing file
    counts as yes), each from a newly forked process. florist runs OpenVINO on every CPU
    run and reports nothing about its users (a fork while torch or JAX threads run can
    also deadlock). With ``openvino_telemetry`` marked as not importable, OpenVINO uses
    its own no-op stand-in, as it does where that package is not installed. A process
    that imported the package before florist keeps it.
    """
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


@functools.cache
def openvino_core() -> Any:
    """The process's one ``openvino.Core``, kept until exit.

    Every Core loads its own CPU plugin, which installs an alternate signal stack on
    the calling thread and puts the previous one back when it is destroyed. Cores
    destroyed out of creation order put back a stack that another one already freed,
    and the next signal handled on that thread (SIGCHLD after any subprocess) kills
    the process with SIGSEGV: seen here after a few dozen short-lived Cores.
    """
    return import_openvino().Core()


def compile_openvino(model: Any, bf16: bool, threads: int | None = None) -> OpenVINORunner:
    """An ``openvino.Model`` compiled for this CPU, in bf16 or strictly fp32.

    OpenVINO computes in bf16 by default where the CPU has it; florist asks for the
    precision the run chose, so features match their cache key and exported fp32
    files their parity check. ``threads`` (default: OpenVINO's, one per core) lets a
    caller follow torch's budget, which torchrun and ``OMP_NUM_THREADS`` set.
    """
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return OpenVINORunner(openvino_core().compile_model(model, "CPU", config))


def _check_ir_xml(path: Path) -> None:
    """Refuse a file that is not whole XML with a ``<net>`` root, the form of every OpenVINO IR model."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()  # the whole file: a truncated one is refused too
    except (ET.ParseError, OSError) as e:
        raise FloristError(f"cannot load {path} as an OpenVINO model: not XML ({e})") from None
    if root.tag != "net":
        raise FloristError(f"cannot load {path} as an OpenVINO model: its root element is <{root.tag}>, not <net>")


class OpenVINOClassifier(ExportedClassifier):
    """An exported OpenVINO model (``model.xml`` + ``model.bin``) run on the CPU; needs no torch.

    Args:
        path: the ``.xml`` file written by ``florist export --format openvino``.
        threads: inference threads (default: one per core).
        bf16: compute in bfloat16 where the CPU has it (default: fp32, as the export was checked).

    Raises:
        FloristError: missing files, not an OpenVINO model, or not exported by florist.
    """

    backend = "openvino"

    def __init__(self, path: str | Path, *, threads: int | None = None, bf16: bool = False):
        self.path = Path(path)
        if not self.path.is_file() or not self.path.with_suffix(".bin").is_file():
            raise FloristError(f"model files not found: {self.path} and {self.path.with_suffix('.bin').name}")
        _check_ir_xml(self.path)  # else OpenVINO tries every frontend, and TensorFlow's logs to stderr
        try:
            model = openvino_core().read_model(str(self.path))
            raw = model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
        except Exception as e:  # OpenVINO raises its own exception types for bad files
            reason = next((line for line in str(e).splitlines() if line and not line.startswith("Exception from")), "")
            raise FloristError(f"cannot load {self.path} as an OpenVINO model: {reason[:200]}") from None
        if raw is None:
            raise FloristError(f"{self.path} has no florist metadata: export it with `florist export`")
        self.take_metadata(json.loads(raw), str(self.path))
        self.run = compile_openvino(model, bf16, threads)

    def probabilities(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.run([batch[s.name] for s in self.inputs])
