"""Heatmaps: where in a photo the trained network found its answer (Grad-CAM).

    >>> explainer = florist.Explainer.from_run("runs/flowers")           # doctest: +SKIP
    >>> explainer.explain(["rose.jpg"], out_dir="heat")[0].png           # doctest: +SKIP
    'heat/rose.png'

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the backbone's last feature
map, the input of its global pooling, by the mean gradient of a class's score over
the map, sums the channels and keeps the positive part: the places whose features
raised that score. It is computed on :class:`florist.export.ExportGraph`, the module
``florist export`` and ``florist serve`` run, so the heat is that of the real trained
network (re-trained top blocks and head included), fed by the run's own
preprocessing (:mod:`florist.preprocess`). The score is the class's logit averaged
over the run's test-time views, the quantity the prediction ranks; each view gets its
map, the mirrored view's map is mirrored back, and the maps are averaged.

captum's ``LayerGradCam`` computes the map. The ``grad-cam`` package would do as
well, but 1.5 requires ``opencv-python-headless``: a second distribution of the
``cv2`` module that florist's ``opencv-contrib-python`` already installs, and two
of them overwrite each other's files. captum needs only torch, numpy and matplotlib.

Exported files (``.onnx``, ``.xml``, ``.tflite``) hold no gradients: heatmaps need
the run folder. So does a run of several backbones, whose feature maps have no
common grid (different inputs and crops); both are refused with a one-line error.
"""

from __future__ import annotations

import copy
import io
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import BadImage, read_file
from .errors import FloristError
from .export import ExportGraph
from .files import atomic_write_bytes
from .inputs import expand_inputs
from .prediction import is_exported
from .preprocess import crop_pixels, load_for_backbone, to_array
from .progress import ProgressFn

#: How much of an overlay pixel is the heat's colour (the rest is the photo).
ALPHA = 0.45
#: matplotlib colormap of the heat: blue (none) to red (most).
COLORMAP = "jet"


@dataclass
class Heatmap:
    """One image's heatmap, or why there is none.

    Attributes:
        path: the image as given.
        label, probability: the model's answer (top class) and its probability.
        target: the class the heat is for: ``label`` unless another was asked for.
        target_probability: the model's probability of ``target``.
        heat: ``[H, W]`` float32 in [0, 1] (1 = the hottest place) over :attr:`crop`.
        crop: ``[H, W, 3]`` uint8, the centre crop the network saw.
        png: where the overlay was written, if it was.
        error: why the image could not be explained (then the rest is unset).
    """

    path: str
    label: str = ""
    probability: float = float("nan")
    target: str = ""
    target_probability: float = float("nan")
    heat: np.ndarray | None = None
    crop: np.ndarray | None = None
    png: str | None = None
    error: str | None = None

    def overlay(self, alpha: float = ALPHA) -> np.ndarray:
        """The crop with the heat blended over it in :data:`COLORMAP`: ``[H, W, 3]`` uint8."""
        if self.heat is None or self.crop is None:
            raise FloristError(f"no heatmap for {self.path}: {self.error}")
        return overlay(self.crop, self.heat, alpha)

    def encoded(self, fmt: str = "PNG", **options: Any) -> bytes:
        """:meth:`overlay` as an image file's bytes (Pillow's ``fmt`` and save ``options``)."""
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(self.overlay()).save(out, fmt, **options)
        return out.getvalue()

    def to_dict(self) -> dict[str, Any]:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path,
            "label": self.label,
            "probability": self.probability,
            "target": self.target,
            "target_probability": self.target_probability,
            "png": self.png,
        }


def overlay(crop: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """``crop`` (``[H, W, 3]`` uint8) with ``heat`` (``[H, W]`` in [0, 1]) blended over it in :data:`COLORMAP`."""
    from matplotlib import colormaps

    colours = colormaps[COLORMAP](np.clip(heat, 0, 1))[..., :3] * 255
    return np.rint((1 - alpha) * crop + alpha * colours).astype(np.uint8)


class Explainer:
    """Grad-CAM heatmaps of one run's network (see the module docstring).

    Thread-safe: attribution hooks the network, so one image is explained at a time.

    Args:
        graph: the run's :class:`~florist.export.ExportGraph`; the explainer hooks its
            modules, so it must own it (:meth:`of_graph` copies a shared one).
        classes: the class names, in the model's order.

    Raises:
        FloristError: several backbones, or a backbone without a pooled feature map.
    """

    def __init__(self, graph: ExportGraph, classes: Sequence[str]):
        from captum.attr import LayerGradCam

        if len(graph.nets) != 1:
            raise FloristError(
                f"heatmaps need a run with one backbone; this one concatenates {len(graph.nets)} "
                "(their feature maps cover different crops)"
            )
        pool = getattr(graph.nets[0], "global_pool", None)
        if not isinstance(pool, nn.Module):
            raise FloristError(
                f"heatmaps need a convolutional backbone with a global pooling layer; "
                f"{type(graph.nets[0]).__name__} has none"
            )
        self.graph = graph.eval()
        self.classes = list(classes)
        self.views = list(graph.views)
        self.data_config = graph.inputs[0].data_config
        self._cam = LayerGradCam(self._scores, pool)
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run: str | Path) -> Explainer:
        """The explainer of a run folder (local or a URL), its network on torch in the run's precision.

        Raises:
            FloristError: an exported file, or not a finished run folder.
        """
        from .loader import load_run

        if is_exported(run):
            raise FloristError(
                f"{run} is an exported model, which cannot give the gradients a heatmap needs; "
                "pass the run folder it was exported from"
            )
        if Path(run).is_file():
            raise FloristError(f"{run} is a file: expected a run folder")
        classifier = load_run(run, engine="torch")
        graph = ExportGraph(classifier)
        graph.bf16 = any(b.bf16 for b in classifier.backbones)  # as the run computes its features
        return cls(graph, classifier.classes)

    @classmethod
    def of_graph(cls, graph: ExportGraph, classes: Sequence[str]) -> Explainer:
        """An explainer with its own copy of ``graph`` (one that serves predictions meanwhile, say)."""
        return cls(copy.deepcopy(graph), classes)

    def _scores(self, *pixels: torch.Tensor) -> torch.Tensor:
        """``[N, classes]``: each class's logit averaged over the test-time views."""
        logits = self.graph.logits(*pixels)
        return logits.reshape(len(self.views), -1, logits.shape[1]).mean(dim=0)

    def _class_index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise FloristError(f"unknown class {name!r}: the model's classes are {', '.join(self.classes)}") from None

    def explain_bytes(self, data: bytes, name: str = "", target: str | None = None) -> Heatmap:
        """The heatmap of one image's bytes, for ``target`` (default: the model's answer).

        Raises:
            florist.data.BadImage: not a usable image.
            FloristError: ``target`` is not one of the model's classes.
        """
        wanted = None if target is None else self._class_index(target)
        image = load_for_backbone(data, self.data_config)
        pixels = tuple(torch.from_numpy(to_array(image, s.data_config, s.view))[None] for s in self.graph.inputs)
        crop = crop_pixels(image, self.data_config)
        with self._lock:
            with torch.no_grad():
                probs = self.graph(*pixels)[0].float().numpy()
            top = int(np.argmax(probs))
            index = top if wanted is None else wanted
            maps = self._cam.attribute(pixels, target=index, attribute_to_layer_input=True, relu_attributions=True)
        return Heatmap(
            path=name,
            label=self.classes[top],
            probability=float(probs[top]),
            target=self.classes[index],
            target_probability=float(probs[index]),
            heat=self._upsampled(maps.detach(), crop.shape[:2]),
            crop=crop,
        )

    def _upsampled(self, maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """``[views, 1, h, w]`` maps -> one ``[H, W]`` map in [0, 1]: mirrored views mirrored back, averaged, resized."""
        from captum.attr import LayerAttribution

        aligned = [m.flip(-1) if view == "flip" else m for m, view in zip(maps.float(), self.views)]
        mean = torch.stack(aligned).mean(dim=0, keepdim=True)
        heat = LayerAttribution.interpolate(mean, size, "bilinear")[0, 0].clamp(min=0)
        peak = float(heat.max())
        return (heat / peak if peak > 0 else heat).numpy().astype(np.float32)

    def explain_file(self, path: str | Path, target: str | None = None, name: str | None = None) -> Heatmap:
        """The heatmap of one file; an unusable image gives a :class:`Heatmap` with ``error`` set."""
        try:
            return self.explain_bytes(read_file(path), str(path) if name is None else name, target)
        except BadImage as e:
            return Heatmap(str(path) if name is None else name, error=str(e) or "unreadable image")

    def explain(
        self,
        inputs: Iterable[str | Path],
        out_dir: str | Path | None = None,
        *,
        target: str | None = None,
        progress: ProgressFn | None = None,
    ) -> list[Heatmap]:
        """Heatmaps of image files, folders (recursive) or glob patterns, local or URLs, as ``predict`` takes them.

        With ``out_dir``, each readable image's overlay is written there atomically as
        ``<stem>.png`` (``<stem>-2.png``... when names clash). An unusable image gets
        a :class:`Heatmap` with ``error`` set; it never stops the others.

        Raises:
            FloristError: an input that matches nothing, no images at all, an unknown
                ``target`` class, or ``out_dir`` that is a file.
        """
        if target is not None:
            self._class_index(target)  # an unknown class fails before any work
        pairs = expand_inputs(inputs)
        if not pairs:
            raise FloristError("no image files in the given inputs")
        folder = Path(out_dir) if out_dir is not None else None
        if folder is not None:
            if folder.exists() and not folder.is_dir():
                raise FloristError(f"{folder} is a file: --out must be a folder")
            folder.mkdir(parents=True, exist_ok=True)
        names = png_names([name for name, _ in pairs])
        results = []
        for i, ((name, path), png_name) in enumerate(zip(pairs, names)):
            heatmap = self.explain_file(path, target, name=name)
            if folder is not None and heatmap.error is None:
                png = folder / png_name
                atomic_write_bytes(png, heatmap.encoded())
                heatmap.png = str(png)
            results.append(heatmap)
            if progress:
                progress(i + 1, len(pairs))
        return results


def png_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.png`` for each path, ``<stem>-2.png``, ``-3``... for stems seen before (ignoring case, for macOS/Windows)."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path.rstrip("/")).stem or "image"
        name, n = f"{stem}.png", 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.casefold())
        names.append(name)
    return names
