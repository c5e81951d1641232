"""Preprocessing without torch: image bytes -> the normalised arrays a backbone takes.

Training computes features through a torchvision transform (see
:func:`florist.features.build_transform`). An exported model must see the same
numbers on a machine where torch is not installed, so this module performs the
same steps with Pillow and numpy alone: decode with :func:`florist.data.decode_image`
(EXIF rotation, alpha, pixel-count guard, JPEG draft decoding), resize and centre
crop with :func:`eval_crop` (the one implementation of that geometry, which the
torch transform calls too), mirror for the ``flip`` view, scale to [0, 1] and
normalise. ``tests/test_preprocess.py`` checks the arrays equal the torch
transform's.

An exported model has one input per backbone and test-time view (see
:func:`model_inputs`); :func:`image_arrays` fills all of them for one image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .data import DEFAULT_MAX_PIXELS, decode_image
from .errors import FloristError

#: Views an exported model can take: the centre crop and the centre crop of the mirrored image.
VIEWS = ("clean", "flip")


def resize_size(data_config: dict[str, Any]) -> int:
    """Shorter side an image is resized to before the centre crop (timm's rule)."""
    return int(np.floor(data_config["input_size"][-1] / data_config["crop_pct"]))


def load_for_backbone(data: bytes, data_config: dict[str, Any], max_pixels: int | None = None) -> Image.Image:
    """Decode bytes the way every stage must: draft-decoded to no less than the resize size."""
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    return decode_image(data, draft_size=resize_size(data_config), **kwargs)


def _resample(name: str) -> Image.Resampling:
    try:
        return Image.Resampling[name.upper()]
    except KeyError:
        raise FloristError(f"unknown interpolation {name!r} in the model's preprocessing") from None


def _resized_size(size: tuple[int, int], data_config: dict[str, Any], square: bool = False) -> tuple[int, int]:
    """``(width, height)`` timm's eval transform resizes an image of ``size`` to (torchvision ``Resize``).

    ``square`` is fine-tuning's ``square`` view: the shorter side becomes the resize
    size whatever the crop mode.
    """
    height, width = data_config["input_size"][-2:]
    crop_pct = data_config["crop_pct"]
    mode = "center" if square else data_config.get("crop_mode", "center") or "center"
    if mode == "squash":
        return int(np.floor(width / crop_pct)), int(np.floor(height / crop_pct))
    if mode == "center" and (height == width or square):
        short = resize_size(data_config)
        w, h = size
        # torchvision: the shorter side becomes `short`, the longer one int(short * long / short_side).
        return (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    raise FloristError(
        f"preprocessing with crop_mode={mode!r} and input size {height}x{width} is not supported "
        "outside torch (centre crop of a square input or 'squash' are)"
    )


def supports_eval_crop(data_config: dict[str, Any]) -> bool:
    """Whether :func:`eval_crop` handles this preprocessing (a square centre crop or 'squash'; timm's others do not)."""
    try:
        _resized_size((1, 1), data_config)
    except FloristError:
        return False
    return True


def eval_crop(image: Image.Image, data_config: dict[str, Any], view: str = "clean") -> Image.Image:
    """timm's evaluation geometry: resize (shorter side, or 'squash'), then centre crop.

    Only the part of the image inside the crop is resampled (Pillow's ``box``): the
    same filter centred on the same points as resizing the whole image and cropping
    it, at about half the cost (resizing was 60% of decoding a flower photo). The
    result differs from the two-step one by Pillow's rounding: a few percent of the
    pixels by one level or so (``tests/test_preprocess.py`` bounds it).

    Args:
        view: ``clean``; ``flip``, the clean crop mirrored; or ``square``, the image
            resized and centre-cropped to a square of the resize size (fine-tuning's
            input, which it augments on the fly).
    """
    if view == "square":
        height = width = resize_size(data_config)
    else:
        height, width = data_config["input_size"][-2:]
    target = _resized_size(image.size, data_config, square=view == "square")
    return view_of_crop(_resized_crop(image, target, (height, width), _resample(data_config["interpolation"])), view)


def view_of_crop(clean: Image.Image, view: str) -> Image.Image:
    """``view`` (``clean`` or ``flip``) made from the clean crop: one resample serves both views."""
    return clean.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view == "flip" else clean


def _resized_crop(
    image: Image.Image, target: tuple[int, int], crop: tuple[int, int], resample: Image.Resampling
) -> Image.Image:
    """The centre ``crop`` (height, width) of ``image`` resized to ``target``, resampling only that crop."""
    (w, h), (tw, th), (height, width) = image.size, target, crop
    if tw < width or th < height:  # the crop is padded with black: resize the whole image first
        return _center_crop(image.resize(target, resample), height, width)
    top = int(round((th - height) / 2.0))
    left = int(round((tw - width) / 2.0))
    if (w, h) == target:  # torchvision leaves the image untouched
        return image.crop((left, top, left + width, top + height))
    sx, sy = w / tw, h / th
    return image.resize((width, height), resample, box=(left * sx, top * sy, (left + width) * sx, (top + height) * sy))


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's ``CenterCrop``: zero padding first when the image is smaller than the crop."""
    w, h = image.size
    if w < width or h < height:
        left, top = max(0, (width - w) // 2), max(0, (height - h) // 2)
        padded = Image.new(image.mode, (max(w, width), max(h, height)), 0)
        padded.paste(image, (left, top))
        image, (w, h) = padded, padded.size
    top = int(round((h - height) / 2.0))
    left = int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def crop_pixels(image: Image.Image, data_config: dict[str, Any], view: str = "clean") -> np.ndarray:
    """One RGB image -> the ``[H, W, 3]`` uint8 pixels the backbone sees, before normalisation.

    This is the input of an exported TFLite model, which normalises inside its graph.

    Args:
        view: ``clean`` (centre crop) or ``flip`` (the same crop mirrored), as
            :func:`florist.features.build_transform` computes them.
    """
    if view not in VIEWS:
        raise FloristError(f"unknown view {view!r}: exported models take {', '.join(VIEWS)}")
    return np.asarray(eval_crop(image, data_config, view), dtype=np.uint8)


def to_array(image: Image.Image, data_config: dict[str, Any], view: str = "clean") -> np.ndarray:
    """One RGB image -> ``[3, H, W]`` float32, normalised as the backbone expects (views: :func:`crop_pixels`)."""
    return _normalised(crop_pixels(image, data_config, view), data_config)


def _normalised(crop: np.ndarray, data_config: dict[str, Any]) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels -> ``[3, H, W]`` float32, scaled to [0, 1] and normalised."""
    pixels = crop.astype(np.float32) / np.float32(255)
    mean = np.asarray(data_config["mean"], dtype=np.float32)
    std = np.asarray(data_config["std"], dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


@dataclass(frozen=True)
class ModelInput:
    """One input of an exported model: a batch ``[N, 3, H, W]`` of one view for one backbone."""

    name: str
    backbone: int  # index into the model's backbones (features are concatenated in this order)
    view: str  # "clean" or "flip"
    data_config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backbone": self.backbone,
            "view": self.view,
            "preprocessing": self.data_config,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelInput":
        return cls(d["name"], int(d["backbone"]), d["view"], d["preprocessing"])


def model_inputs(data_configs: Sequence[dict[str, Any]], views: Sequence[str]) -> list[ModelInput]:
    """The inputs of a model with these backbones (their preprocessing) and test-time views.

    Names: ``pixels`` (clean view) and ``pixels_flip`` for one backbone; with several,
    the backbone's index is appended (``pixels_0``, ``pixels_flip_0``, ``pixels_1``...).
    Order: backbone by backbone, views in the given order.
    """
    for view in views:
        if view not in VIEWS:
            raise FloristError(f"test-time view {view!r} cannot be exported (supported: {', '.join(VIEWS)})")
    several = len(data_configs) > 1
    return [
        ModelInput(
            ("pixels" if view == "clean" else f"pixels_{view}") + (f"_{b}" if several else ""),
            b,
            view,
            dict(config),
        )
        for b, config in enumerate(data_configs)
        for view in views
    ]


def image_arrays(
    data: bytes, inputs: Sequence[ModelInput], max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Decode one image's bytes and preprocess it for every input: name -> ``[3, H, W]``.

    The image is decoded once per backbone preprocessing (the JPEG draft size
    depends on it), exactly as feature extraction decodes it.

    Raises:
        florist.data.BadImage: not a usable image (reason in the message).
    """
    decoded: dict[int, Image.Image] = {}
    crops: dict[int, Image.Image] = {}  # backbone -> its clean crop, which its flip view mirrors
    arrays = {}
    for spec in inputs:
        draft = resize_size(spec.data_config)
        if draft not in decoded:
            decoded[draft] = load_for_backbone(data, spec.data_config, max_pixels)
        if spec.backbone not in crops:
            crops[spec.backbone] = eval_crop(decoded[draft], spec.data_config)
        arrays[spec.name] = _normalised(np.asarray(view_of_crop(crops[spec.backbone], spec.view)), spec.data_config)
    return arrays
