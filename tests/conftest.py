"""Shared fixtures: a session feature cache, synthetic photo folders, the bad-input corpus, the real flower photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flower_photos"

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (30, 50, 210)}


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every test's feature cache out of the user's home folder, and the temporary folders
    of the processes tests start (torchrun's among them) inside pytest's own, which it prunes."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FLORIST_CACHE", str(tmp_path_factory.mktemp("florist-cache")))
    mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
    yield
    mp.undo()


def write_photos(root: Path, n_per_class: int = 8, colours: dict = COLOURS, seed: int = 0) -> Path:
    """Noisy solid-colour JPEGs of varied sizes in ``root/<colour>/``: trivially learnable classes."""
    rng = np.random.default_rng(seed)
    for name, rgb in colours.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three colour classes, 8 photos each (read-only by convention: copy before changing)."""
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def trained_run(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run on :func:`photos` (shared by tests that only read it)."""
    import florist

    run = tmp_path_factory.mktemp("run") / "colours"
    florist.train(photos, run, epochs=10, eval_fraction=0.25, mode="head")
    return run


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """The bad-input corpus (tests/images.py ``make_corpus``): read-only by convention."""
    import images

    return images.make_corpus(tmp_path_factory.mktemp("corpus") / "photos")


@pytest.fixture(scope="session")
def corpus_run(corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head-mode run trained on :func:`corpus` (one test-time view, to keep it quick)."""
    import florist

    run = tmp_path_factory.mktemp("corpus-run") / "run"
    florist.train(corpus.root, run, mode="head", epochs=3, eval_fraction=0.25, tta=False)
    return run


@pytest.fixture
def flower_photos() -> Path:
    """The real flower photos from ../shared/data, or skip."""
    if not SHARED_FLOWERS.is_dir():
        pytest.skip(f"real data not present at {SHARED_FLOWERS} (see shared/README.md)")
    return SHARED_FLOWERS


@pytest.fixture(scope="session")
def exported_onnx(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`trained_run` exported to ONNX (read-only by convention)."""
    from florist.export import export

    path = tmp_path_factory.mktemp("export") / "colours.onnx"
    export(trained_run, path, check_images=4)
    return path
