"""Shared fixtures: a session feature cache, a tiny backbone, synthetic photo folders, the bad-input
corpus, the real flower photos.

Most tests train on :func:`tiny` rather than the real EfficientNet-Lite0: timm's ``test_efficientnet``
has the same EfficientNet layout (so head, tune-top and finetune all cut and train it the same way)
at about 1/50 of the compute, with seeded random weights loaded through the user's ``--weights FILE``
path. The real network keeps its own tests: the weight-mapping proofs (test_backbones.py), the real
flower photos (accuracy, export parity, audit) and one default run end to end (test_train.py).
"""

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


#: timm's tiny EfficientNet (160 px input, 256 pooled features), the tests' backbone.
TINY_BACKBONE = "test_efficientnet"


def cache_entries(cache: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every published entry of a feature cache, by (cache key, image hash); each must pass its checksum."""
    from florist.store import FeatureCache, cache_keys

    entries = {}
    for key in cache_keys(cache):
        with FeatureCache(cache, key) as store:
            shas = store.shas()
            got = store.get_many(shas)
            assert len(got) == len(shas), f"damaged entries under {key}"
            entries.update(((key, shas[i]), np.array(array)) for i, array in got.items())
    return entries


def seeded_weights(name: str, path: Path) -> Path:
    """Seeded random weights for the timm model ``name`` in a safetensors file at ``path`` (no download).

    Freshly initialised batch norms (mean 0, variance 1) shrink the signal layer after layer, to
    pooled features of about 0.005 that a head barely moves in a few epochs. So the batch-norm
    statistics are first measured on smooth random images, as a trained network's were on its
    data: features then come out at the scale of a real backbone's.
    """
    import timm
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(), torch.no_grad():  # seeded, without moving the generator other tests see
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches below
        model.train()
        side = model.default_cfg["input_size"][-1]
        for _ in range(4 if norms else 0):  # group norms have no statistics to measure
            blobs = torch.rand(8, 3, 10, 10) * 2 - 1
            model(torch.nn.functional.interpolate(blobs, size=side, mode="bilinear"))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded weights for :data:`TINY_BACKBONE` (see :func:`seeded_weights`)."""
    return seeded_weights(TINY_BACKBONE, tmp_path_factory.mktemp("tiny-net") / f"{TINY_BACKBONE}.safetensors")


@pytest.fixture(scope="session")
def tiny(tiny_weights: Path) -> dict[str, str]:
    """``florist.train``/``TrainConfig`` settings that select the tiny backbone: ``train(..., **tiny)``."""
    return {"backbone": TINY_BACKBONE, "weights": str(tiny_weights)}


def cli_flags(settings: dict) -> list[str]:
    """``florist.train`` keyword settings as the ``florist train`` flags that say the same."""
    return [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]


@pytest.fixture(scope="session")
def tiny_cli(tiny: dict[str, str]) -> list[str]:
    """The same as :func:`tiny`, as ``florist train`` flags."""
    return cli_flags(tiny)


@pytest.fixture(scope="session")
def tiny_backbone(tiny: dict[str, str]):
    """The tiny backbone itself, for tests of feature extraction (read-only by convention)."""
    from florist.backbones import create_backbone

    return create_backbone(tiny["backbone"], tiny["weights"])


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three colour classes, 8 photos each (read-only by convention: copy before changing)."""
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def trained_run(photos: Path, tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished head-mode run of the tiny backbone on :func:`photos` (shared by tests that only read it)."""
    import florist

    run = tmp_path_factory.mktemp("run") / "colours"
    florist.train(photos, run, epochs=10, eval_fraction=0.25, mode="head", **tiny)
    return run


#: Two classes drawn from the same grey noise (so the model must confuse them) and one red;
#: one name needs HTML escaping.
MIXED_CLASSES = {"grey one": (128, 128, 128), "x<y & z": (128, 128, 128), "red": (200, 30, 30)}


@pytest.fixture(scope="session")
def mixed_run(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, str]) -> Path:
    """A finished run with misclassified eval images (so its report has heatmaps) and one skipped file."""
    import florist

    photos = write_photos(tmp_path_factory.mktemp("mixed") / "photos", n_per_class=8, colours=MIXED_CLASSES, seed=3)
    (photos / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    run = tmp_path_factory.mktemp("run") / "mixed"
    florist.train(photos, run, epochs=5, eval_fraction=0.5, mode="head", **tiny)
    return run


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """The bad-input corpus (tests/images.py ``make_corpus``): read-only by convention."""
    import images

    return images.make_corpus(tmp_path_factory.mktemp("corpus") / "photos")


@pytest.fixture(scope="session")
def corpus_run(corpus, tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head-mode run of the tiny backbone trained on :func:`corpus` (one test-time view, to keep it quick)."""
    import florist

    run = tmp_path_factory.mktemp("corpus-run") / "run"
    florist.train(corpus.root, run, mode="head", epochs=3, eval_fraction=0.25, tta=False, **tiny)
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
