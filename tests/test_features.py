"""Features: extraction matches the backbone, the cache is keyed and robust, views are reproducible."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import seeded_weights
from PIL import Image

from florist.backbones import create_backbone
from florist.features import (
    FeatureCache,
    build_transform,
    extract_features,
    extract_views,
    feature_key,
    view_names,
)
from florist.files import sha256_file
from florist.remote import default_cache_dir

COLOURS = [(220, 40, 40), (40, 200, 60), (30, 60, 210), (240, 220, 30)]


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "florist-cache"))


def _image(colour, seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.empty((size[1], size[0], 3), dtype=np.int16)
    arr[:] = colour
    arr += rng.integers(-40, 41, size=arr.shape, dtype=np.int16)
    arr[:, : size[0] // 3] //= 2  # something asymmetric, so a mirror image differs
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate(COLOURS):
        path = folder / f"img{i}.png"
        _image(colour, i).save(path)
        paths.append(path)
    return paths


def _reference(backbone, paths, view="clean") -> np.ndarray:
    transform = build_transform(backbone.data_config, view)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return backbone.model(x).numpy()


def test_cache_dir_follows_environment(tmp_path):
    assert default_cache_dir() == tmp_path / "florist-cache"


def test_view_names():
    assert view_names(0) == ["clean"]
    assert view_names(1) == ["clean", "flip"]
    assert view_names(3) == ["clean", "flip", "aug0", "aug1"]


def test_features_match_the_backbone(tiny_backbone, images):
    result = extract_features(tiny_backbone, images, batch_size=3)
    assert result.features.shape == (len(images), tiny_backbone.num_features)
    assert result.features.dtype == np.float32
    assert result.errors == {}
    assert result.computed == len(images)
    assert result.ok.all()
    np.testing.assert_allclose(result.features, _reference(tiny_backbone, images), atol=1e-5, rtol=1e-5)
    # different images give different features (not one constant vector)
    assert not np.allclose(result.features[0], result.features[1], atol=1e-3)


def test_progress_is_reported(tiny_backbone, images):
    calls = []
    extract_features(tiny_backbone, images[:2], batch_size=1, progress=lambda *a: calls.append(a))
    assert calls[0] == (0, 2)
    assert calls[-1] == (2, 2)


def test_cache_is_used_and_survives_corruption(tiny_backbone, images, tmp_path):
    shas = [sha256_file(p) for p in images]
    cache = FeatureCache(tmp_path / "cache", feature_key(tiny_backbone))
    first = extract_features(tiny_backbone, images, shas=shas, cache=cache)
    assert first.computed == len(images)
    (shard,) = cache.dir.glob("*.shard")  # one file for every image of the call
    assert not list(cache.dir.glob(".*"))

    second = extract_features(tiny_backbone, images, shas=shas, cache=FeatureCache(cache.dir.parent, cache.dir.name))
    assert second.computed == 0
    assert np.array_equal(second.features, first.features)

    # a damaged row is recomputed (into a new shard), not trained on; the others are still served
    data = bytearray(shard.read_bytes())
    data[tiny_backbone.num_features * 4 + 5] ^= 0x40  # inside image 1's row
    shard.write_bytes(bytes(data))
    third = extract_features(tiny_backbone, images, shas=shas, cache=FeatureCache(cache.dir.parent, cache.dir.name))
    assert third.computed == 1
    assert third.errors == {}
    # rtol: features reach ~10, and one image recomputed alone (another batch) differs in its last bits
    np.testing.assert_allclose(third.features, first.features, atol=1e-6, rtol=1e-5)
    assert len(list(cache.dir.glob("*.shard"))) == 2

    # an entry of the wrong size is not trusted either
    cache = FeatureCache(cache.dir.parent, cache.dir.name)
    cache.put(shas[2], np.zeros(7, dtype=np.float32))
    cache.flush()
    fourth = extract_features(tiny_backbone, images, shas=shas, cache=FeatureCache(cache.dir.parent, cache.dir.name))
    assert fourth.computed == 1
    np.testing.assert_allclose(fourth.features, first.features, atol=1e-6, rtol=1e-5)


def test_filling_the_cache_only_reads_nothing_back(tiny_backbone, images, tmp_path):
    """``collect=False`` (a torchrun rank's share, a cluster extraction) computes and stores, returns no rows."""
    shas = [sha256_file(p) for p in images]
    key = feature_key(tiny_backbone)
    filled = extract_features(tiny_backbone, images[:3], shas=shas[:3], cache=FeatureCache(tmp_path, key), collect=False)
    assert filled.computed == 3 and filled.features.shape == (0, tiny_backbone.num_features)
    again = extract_features(tiny_backbone, images, shas=shas, cache=FeatureCache(tmp_path, key), collect=False)
    assert again.computed == 1, "only the image not stored yet"
    read = extract_features(tiny_backbone, images, shas=shas, cache=FeatureCache(tmp_path, key))
    assert read.computed == 0
    np.testing.assert_allclose(read.features, _reference(tiny_backbone, images), atol=1e-5, rtol=1e-5)


def test_a_cache_that_cannot_be_written_costs_speed_not_the_run(tiny_backbone, images, tmp_path, caplog):
    """Disk full or read-only cache: features are computed, used and the run goes on, with one warning."""
    cache = FeatureCache(tmp_path / "cache", feature_key(tiny_backbone))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with mock.patch("florist.store.atomic_open", full):
        result = extract_features(tiny_backbone, images, shas=[sha256_file(p) for p in images], cache=cache)
    assert result.errors == {} and result.computed == len(images)
    np.testing.assert_allclose(result.features, _reference(tiny_backbone, images), atol=1e-5, rtol=1e-5)
    warnings = [r.message for r in caplog.records if "cannot write the feature cache" in r.message]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


def test_cache_entries_are_served_without_reading_the_image(tiny_backbone, images, tmp_path):
    shas = [sha256_file(p) for p in images]
    cache = FeatureCache(tmp_path / "cache", feature_key(tiny_backbone))
    cache.put(shas[0], np.full(tiny_backbone.num_features, 3.0, dtype=np.float32))
    cache.flush()
    result = extract_features(tiny_backbone, images[:1], shas=shas[:1], cache=cache)
    assert result.computed == 0
    assert np.all(result.features[0] == 3.0)


def test_feature_key_separates_what_matters(tiny_backbone, tmp_path):
    # a second tiny network, same 160 px and 256 features
    other = seeded_weights("test_efficientnet_gn", tmp_path / "other.safetensors")
    assert feature_key(tiny_backbone) != feature_key(create_backbone("test_efficientnet_gn", other))
    keys = {feature_key(tiny_backbone, view) for view in ("clean", "flip", "aug0", "aug1")}
    assert len(keys) == 4
    assert feature_key(tiny_backbone, "aug0", seed=0) != feature_key(tiny_backbone, "aug0", seed=1)
    assert feature_key(tiny_backbone, "clean", seed=0) == feature_key(tiny_backbone, "clean", seed=1)
    assert feature_key(tiny_backbone, "flip", seed=0) == feature_key(tiny_backbone, "flip", seed=1)
    assert feature_key(tiny_backbone) == feature_key(tiny_backbone, "clean")  # stable


def test_bad_files_are_reported_and_others_kept(tiny_backbone, images, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    buf = tmp_path / "full.jpg"
    _image(COLOURS[0], 99, size=(64, 48)).save(buf, quality=90)
    truncated.write_bytes(buf.read_bytes()[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    missing = tmp_path / "missing.png"
    paths = [images[0], truncated, images[1], text, missing, images[2]]

    result = extract_features(tiny_backbone, paths, batch_size=4)
    assert set(result.errors) == {1, 3, 4}
    for i in (1, 3, 4):
        assert isinstance(result.errors[i], str) and result.errors[i]
        assert not result.features[i].any()
    assert "not an image" in result.errors[3]
    assert result.ok.tolist() == [True, False, True, False, False, True]
    good = [0, 2, 5]
    np.testing.assert_allclose(
        result.features[good], _reference(tiny_backbone, [paths[i] for i in good]), atol=1e-5, rtol=1e-5
    )


def test_bad_files_are_not_cached(tiny_backbone, images, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("nope")
    cache = FeatureCache(tmp_path / "cache", feature_key(tiny_backbone))
    paths = [images[0], text]
    shas = [sha256_file(p) for p in paths]
    result = extract_features(tiny_backbone, paths, shas=shas, cache=cache)
    assert list(result.errors) == [1]
    assert cache.get(shas[1]) is None
    again = extract_features(tiny_backbone, paths, shas=shas, cache=cache)
    assert again.computed == 0 and list(again.errors) == [1]  # re-read, still refused, never cached


def test_random_views_are_reproducible(tiny_backbone, images):
    paths = images[:3]
    a0 = extract_features(tiny_backbone, paths, view="aug0", seed=7, workers=0, batch_size=2).features
    a2 = extract_features(tiny_backbone, paths, view="aug0", seed=7, workers=2, batch_size=2).features
    np.testing.assert_array_equal(a0, a2)
    other_seed = extract_features(tiny_backbone, paths, view="aug0", seed=8, workers=0).features
    other_view = extract_features(tiny_backbone, paths, view="aug1", seed=7, workers=0).features
    clean = extract_features(tiny_backbone, paths, workers=0).features
    for other in (other_seed, other_view, clean):
        for i in range(len(paths)):
            assert not np.allclose(a0[i], other[i], atol=1e-4)


def test_flip_view_is_the_clean_crop_mirrored(tiny_backbone, images):
    pixels = extract_views(tiny_backbone, images[:2], ["clean/u8", "flip/u8"])
    np.testing.assert_array_equal(pixels["flip/u8"].features, pixels["clean/u8"].features[..., ::-1])
    flip = extract_features(tiny_backbone, images[:2], view="flip").features
    clean = extract_features(tiny_backbone, images[:2]).features
    np.testing.assert_allclose(flip, _reference(tiny_backbone, images[:2], "flip"), atol=1e-6)
    assert not np.allclose(flip, clean, atol=1e-4)  # the images are not symmetric


def test_unknown_view_is_refused(tiny_backbone):
    with pytest.raises(ValueError):
        build_transform(tiny_backbone.data_config, "sideways")


def test_cache_is_used_even_without_known_hashes(tmp_path: Path, tiny_backbone) -> None:
    """Without manifest hashes each file is hashed on read; a cached one skips the network."""
    from PIL import Image

    from florist.features import FeatureCache, extract_features, feature_key

    paths = []
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        paths.append(path)
    cache = FeatureCache(tmp_path / "cache", feature_key(tiny_backbone))
    first = extract_features(tiny_backbone, paths, cache=cache)
    second = extract_features(tiny_backbone, paths, cache=cache)
    assert (first.computed, second.computed) == (2, 0)
    np.testing.assert_array_equal(first.features, second.features)


def test_random_views_leave_the_callers_rng_alone(tmp_path: Path, tiny_backbone) -> None:
    from PIL import Image

    from florist.features import extract_features

    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (90, 20, 160)).save(path)
    torch.manual_seed(123)
    extract_features(tiny_backbone, [path], view="aug0", workers=0)
    assert torch.initial_seed() == 123


def test_the_allocator_is_steadied_only_while_an_engine_other_than_torch_runs(
    tiny_backbone, images, tmp_path, monkeypatch
) -> None:
    """64 KiB mmap threshold during extraction (flat memory), glibc's own ceiling afterwards (fast training steps).

    Eager torch allocates every layer's output afresh, so its passes leave the allocator alone.
    """
    from florist import features
    from florist.engines import engine_problem

    calls = []
    monkeypatch.setattr(features, "_mmap_threshold", calls.append)
    steadied = [features.EXTRACTION_MMAP_THRESHOLD, features.LATER_MMAP_THRESHOLD]
    extract_features(tiny_backbone, images[:2], workers=0)
    assert calls == [], "torch"
    extract_views(tiny_backbone, images[:2], ["clean/u8"], workers=0)  # pixels only: no network
    assert calls == steadied
    calls.clear()
    if engine_problem("openvino") is None:
        monkeypatch.setattr(tiny_backbone, "engine", "openvino")
        extract_features(tiny_backbone, images[:2], workers=0)
        assert calls == steadied
        monkeypatch.undo()
        monkeypatch.setattr(features, "_mmap_threshold", calls.append)
        calls.clear()
    shas = [sha256_file(p) for p in images[:2]]
    cached = dict(shas=shas, cache_root=tmp_path / "cache", workers=0)
    extract_views(tiny_backbone, images[:2], ["clean/u8"], **cached)
    assert calls == steadied
    calls.clear()
    extract_views(tiny_backbone, images[:2], ["clean/u8"], **cached)
    assert calls == [], "a fully cached call leaves the allocator alone"
