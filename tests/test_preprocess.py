"""Torch-free preprocessing: the same arrays as the torch transform training uses."""

from __future__ import annotations

from pathlib import Path

import images as im  # tests/images.py
import numpy as np
import pytest
from PIL import Image

from florist.data import BadImage, read_file
from florist.errors import FloristError
from florist.features import build_transform
from florist.preprocess import eval_crop, image_arrays, load_for_backbone, model_inputs, to_array

LITE0 = {
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 0.875,
    "crop_mode": "center",
}
LITE2 = {**LITE0, "input_size": [3, 260, 260], "crop_pct": 0.89}
IMAGENET = {**LITE0, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SQUASH = {**IMAGENET, "crop_mode": "squash"}
PADDED = {**LITE0, "crop_pct": 1.25}  # resize below the crop size: torchvision pads with black


def noisy(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, size[0])[None, :, None]
    return Image.fromarray(
        np.clip(rng.normal(0, 30, (size[1], size[0], 3)) + gradient, 0, 255).astype(np.uint8)
    )


# Odd sizes make the centre crop's rounding matter.
SIZES = [(224, 224), (257, 191), (191, 257), (500, 333), (333, 500), (31, 17), (1, 1), (640, 259)]


@pytest.mark.parametrize(
    "config", [LITE0, LITE2, IMAGENET, SQUASH, PADDED], ids=["lite0", "lite2", "imagenet", "squash", "pad"]
)
@pytest.mark.parametrize("view", ["clean", "flip"])
def test_arrays_equal_the_torch_transform(config: dict, view: str) -> None:
    transform = build_transform(config, view)
    for i, size in enumerate(SIZES):
        image = noisy(size, seed=i)
        expected = transform(image).numpy()
        got = to_array(image, config, view)
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, *config["input_size"][-2:])
        np.testing.assert_array_equal(got, expected, err_msg=f"size {size}")


@pytest.mark.parametrize(
    "config", [LITE0, LITE2, IMAGENET, SQUASH, PADDED], ids=["lite0", "lite2", "imagenet", "squash", "pad"]
)
def test_eval_crop_is_timms_resize_then_centre_crop_up_to_rounding(config: dict) -> None:
    from timm.data import create_transform
    from torchvision import transforms as T

    timm_eval = create_transform(
        input_size=tuple(config["input_size"]),
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
        crop_mode=config["crop_mode"],
        is_training=False,
    )
    two_steps = T.Compose([t for t in timm_eval.transforms if isinstance(t, (T.Resize, T.CenterCrop))])
    for i, size in enumerate(SIZES):
        image = noisy(size, seed=i)
        got = np.asarray(eval_crop(image, config)).astype(int)
        expected = np.asarray(two_steps(image)).astype(int)
        assert got.shape == expected.shape
        diff = np.abs(got - expected)
        # Resampling only the crop moves Pillow's rounding: mostly by one level, never on average.
        assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 1, f"size {size}: mean {diff.mean()}"
        if config in (SQUASH, PADDED):  # a whole-image resize either way: identical
            assert diff.max() == 0
    mirrored = np.asarray(eval_crop(noisy((333, 500)), config, "flip"))
    np.testing.assert_array_equal(mirrored, np.asarray(eval_crop(noisy((333, 500)), config))[:, ::-1])


def test_real_photos_decode_and_preprocess_as_in_training(flower_photos: Path) -> None:
    files = sorted(flower_photos.glob("*/*.jpg"))[::150]
    assert files
    for path in files:
        image = load_for_backbone(read_file(path), LITE2)
        for view in ("clean", "flip"):
            np.testing.assert_array_equal(
                to_array(image, LITE2, view), build_transform(LITE2, view)(image).numpy()
            )


def test_model_inputs_names_and_order() -> None:
    one = model_inputs([LITE0], ["clean", "flip"])
    assert [(s.name, s.backbone, s.view) for s in one] == [("pixels", 0, "clean"), ("pixels_flip", 0, "flip")]
    two = model_inputs([LITE0, LITE2], ["clean"])
    assert [(s.name, s.backbone) for s in two] == [("pixels_0", 0), ("pixels_1", 1)]
    assert two[1].data_config == LITE2
    with pytest.raises(FloristError, match="cannot be exported"):
        model_inputs([LITE0], ["aug0"])


def test_image_arrays_goes_through_decode_image(tmp_path: Path) -> None:
    inputs = model_inputs([LITE0, LITE2], ["clean", "flip"])
    png = im.write_png_with_alpha(tmp_path / "alpha.png", size=(90, 60))
    arrays = image_arrays(png.read_bytes(), inputs)
    assert sorted(arrays) == ["pixels_0", "pixels_1", "pixels_flip_0", "pixels_flip_1"]
    assert arrays["pixels_1"].shape == (3, 260, 260)
    # Transparent pixels are composited on white (1.0 after normalisation), as everywhere in florist.
    assert arrays["pixels_0"][:, 112, 0].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(
        arrays["pixels_flip_0"], arrays["pixels_0"][:, :, ::-1]
    )  # 224-px crop of 336: exact
    rotated = im.write_exif_rotated_jpeg(tmp_path / "rotated.jpg", size=(64, 32), orientation=6)
    upright = image_arrays(rotated.read_bytes(), inputs[:1])["pixels_0"]
    assert upright[0, 20, 112] > upright[2, 20, 112]  # red (stored left half) ends up on top
    with pytest.raises(BadImage, match="not an image"):
        image_arrays(b"not an image at all", inputs)
    with pytest.raises(BadImage, match="too many pixels"):
        image_arrays(im.write_huge_png_header(tmp_path / "bomb.png").read_bytes(), inputs)
