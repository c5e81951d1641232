"""Stage 3, *features*: images -> pooled backbone features ("bottlenecks"), cached on disk.

A frozen backbone maps each image to the same vector every time, so florist
computes it once and stores it under a key made of the image's content hash
and everything that affects the vector: backbone architecture, exact weights,
preprocessing and the florist feature version. A second ``train`` on the same
photos (or on a superset, or with other head settings) reads the cache instead
of running the network. Entries are single checksummed safetensors files
written atomically, so a killed run leaves no corrupt entry and concurrent runs
can share one cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as st_save
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone
from .data import BadImage
from .files import atomic_write_bytes, sha256_bytes
from .preprocess import load_for_backbone, resize_size
from .progress import ProgressFn
from .tfrecord import read_image_bytes

log = logging.getLogger("florist")

#: Bump when the way features are computed changes, so stale cache entries are not reused.
FEATURE_VERSION = 1

# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


#: Random-view augmentation: what the original project called "distortions".
AUGMENT = {"scale": (0.3, 1.0), "ratio": (3 / 4, 4 / 3), "brightness": 0.3, "contrast": 0.3, "saturation": 0.3}


#: Suffix of views cached as uint8 pixels (before normalisation) for fine-tuning, e.g. ``clean/u8``.
PIXELS = "/u8"


def is_random_view(view: str) -> bool:
    """``aug0``, ``aug1``, ... are random views; ``clean`` and ``flip`` are fixed."""
    return view.startswith("aug")


def view_names(views: int) -> list[str]:
    """The cached views used for ``views`` augmented copies: clean and flip first."""
    return ["clean", "flip"] + [f"aug{k}" for k in range(max(0, views - 1))] if views > 0 else ["clean"]


def view_seed(sha: str, view: str, seed: int) -> int:
    """A per-image, per-view seed so augmented views are reproducible in any worker."""
    digest = hashlib.sha256(f"{sha}:{view}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def view_shape(data_config: dict[str, Any], view: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the tensor :func:`build_transform` makes for ``view``."""
    if view == "square" + PIXELS:
        side = resize_size(data_config)
        return (3, side, side)
    return tuple(data_config["input_size"])  # type: ignore[return-value]


def build_transform(data_config: dict[str, Any], view: str = "clean"):
    """PIL image -> normalised tensor, exactly as timm evaluates the backbone.

    ``view="flip"`` mirrors the image first; ``aug<k>`` views take a random resized
    crop, a random flip and colour jitter (seeded per image by the caller).
    ``clean/u8`` and ``flip/u8`` give the same pixels as uint8, before scaling and
    normalisation (``normalize_pixels`` finishes them bit for bit); ``square/u8`` is
    the image resized and centre-cropped to a square of the resize size, the input
    of fine-tuning's on-the-fly augmentation.
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    if view.endswith(PIXELS):
        return _pixel_transform(data_config, view[: -len(PIXELS)])
    size = tuple(data_config["input_size"][-2:])
    if is_random_view(view):
        from timm.data.transforms import str_to_interp_mode

        return T.Compose(
            [
                T.RandomResizedCrop(
                    size,
                    scale=AUGMENT["scale"],
                    ratio=AUGMENT["ratio"],
                    interpolation=str_to_interp_mode(data_config["interpolation"]),
                ),
                T.RandomHorizontalFlip(),
                T.ColorJitter(AUGMENT["brightness"], AUGMENT["contrast"], AUGMENT["saturation"]),
                T.ToTensor(),
                T.Normalize(data_config["mean"], data_config["std"]),
            ]
        )
    base = create_transform(
        input_size=tuple(data_config["input_size"]),
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
        is_training=False,
    )
    if view == "clean":
        return base
    if view == "flip":
        return T.Compose([T.RandomHorizontalFlip(p=1.0), base])
    raise ValueError(f"unknown view {view!r}")


def _pixel_transform(data_config: dict[str, Any], view: str):
    """The geometric steps of ``view``'s transform, ending in a uint8 tensor."""
    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms as T

    if view == "square":
        side = resize_size(data_config)
        interpolation = str_to_interp_mode(data_config["interpolation"])
        return T.Compose([T.Resize(side, interpolation=interpolation), T.CenterCrop(side), T.PILToTensor()])
    if view not in ("clean", "flip"):
        raise ValueError(f"no uint8 version of view {view!r}")
    geometry = [t for t in build_transform(data_config, "clean").transforms if isinstance(t, (T.Resize, T.CenterCrop))]
    flip = [T.RandomHorizontalFlip(p=1.0)] if view == "flip" else []
    return T.Compose([*flip, *geometry, T.PILToTensor()])


def normalize_pixels(pixels: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> the normalised float tensor the backbone expects.

    The same float32 operations as torchvision's ``ToTensor`` + ``Normalize``, so a
    ``clean/u8`` view finished here equals the ``clean`` view exactly.
    """
    x = pixels.float().div(255)
    mean = torch.tensor(data_config["mean"], dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(data_config["std"], dtype=x.dtype, device=x.device)[:, None, None]
    return x.sub(mean).div(std)


def feature_key(backbone: Backbone, view: str = "clean", seed: int = 0, part: str = "pooled") -> str:
    """Cache namespace for one backbone + weights + preprocessing + view (+ seed for random views).

    ``part`` names what is cached ("pooled" features, or e.g. "blocks-4" activations).
    """
    payload = json.dumps(
        {
            **({"part": part} if part != "pooled" else {}),
            **({"tuned": backbone.tuned_id} if backbone.tuned_id else {}),
            **({"precision": "bf16"} if backbone.bf16 else {}),
            **({"augment": AUGMENT, "seed": seed} if is_random_view(view) else {}),
            "version": FEATURE_VERSION,
            "timm_name": backbone.spec.timm_name,
            "weights": backbone.spec.weights_id,
            "data_config": backbone.data_config,
            "view": view,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


class FeatureCache:
    """One folder of per-image feature files: ``<root>/<key>/<sha[:2]>/<sha>.safetensors``.

    Each entry carries the SHA-256 of its array in the safetensors metadata and is
    only served when the array still matches it: an entry damaged on disk is
    recomputed, never trained on. Entries are written atomically (see
    :func:`florist.files.atomic_write_bytes`), so processes sharing the cache, or
    killed while writing to it, leave whole entries or none; no lock is needed.
    """

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self._write_failed = False

    def _path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.safetensors"

    def get(self, sha: str) -> np.ndarray | None:
        """The cached array, or None if absent, unreadable or damaged (a damaged entry is removed)."""
        path = self._path(sha)
        try:
            with safe_open(path, framework="np") as f:
                expected = (f.metadata() or {}).get("sha256")
                features = f.get_tensor("features")
        except OSError:  # absent, or unreadable right now: compute it
            return None
        except Exception:  # not a safetensors file, or truncated
            expected, features = None, None
        if features is not None and expected == _digest(features):
            return features
        with suppress(OSError):
            path.unlink()
        return None

    def put(self, sha: str, features: np.ndarray) -> None:
        """Store an array; when the cache cannot be written (read-only, disk full) the run goes on without it."""
        array = np.ascontiguousarray(features)
        try:
            atomic_write_bytes(self._path(sha), st_save({"features": array}, metadata={"sha256": _digest(array)}))
        except OSError as e:
            if not self._write_failed:
                log.warning("cannot write the feature cache %s (%s); going on without caching", self.dir, e)
            self._write_failed = True


def _digest(array: np.ndarray) -> str:
    """Checksum of an array's values, shape and type: what a cache entry must still match."""
    return sha256_bytes(f"{array.dtype.str}{array.shape}".encode() + np.ascontiguousarray(array).tobytes())


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------


class _ImageFiles(Dataset):
    """Reads, hashes and preprocesses files (or TFRecord records); a bad one yields its error instead of raising."""

    def __init__(
        self,
        paths: Sequence[str],
        data_config: dict[str, Any],
        view: str = "clean",
        seed: int = 0,
        *,
        uint8: bool = False,
    ):
        """``uint8=True`` yields :func:`pixel_view`'s uint8 pixels for fixed views (see :func:`normalize_pixels`)."""
        self.paths = list(paths)
        self.data_config = data_config
        self.view = view
        self.seed = seed
        transform_view = pixel_view(view) if uint8 else view
        self.transform = build_transform(data_config, transform_view)
        dtype = torch.uint8 if transform_view.endswith(PIXELS) else None
        self.blank = torch.zeros(view_shape(data_config, view), dtype=dtype)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str, str]:
        try:
            data = read_image_bytes(self.paths[i])  # a file or a TFRecord record
            image = load_for_backbone(data, self.data_config)
            sha = sha256_bytes(data)
            if not is_random_view(self.view):
                return i, self.transform(image), sha, ""
            # Seed torchvision's (global) RNG per image, without disturbing the caller's.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(sha, self.view, self.seed))
                return i, self.transform(image), sha, ""
        except BadImage as e:
            return i, self.blank, "", str(e) or "unreadable image"


def pixel_view(view: str) -> str:
    """The view the loader produces for ``view``: fixed views travel as uint8 (``clean/u8``).

    Workers then send a quarter of the bytes through shared memory (prefetched batches
    of 64 float images hold 38 MB each) and :func:`normalize_pixels` finishes them, bit
    for bit as the float view would, next to the model. Random views stay float
    (their colour jitter works on floats).
    """
    return view + PIXELS if view in ("clean", "flip") else view


@dataclass
class FeatureResult:
    """Features for a list of images, in input order.

    Attributes:
        features: ``[N, D]`` float32; rows of failed images are zero.
        errors: index -> reason for images that could not be read.
        computed: how many images went through the network (the rest came from the cache).
    """

    features: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    computed: int = 0

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.features), dtype=bool)
        mask[list(self.errors)] = False
        return mask


def merged_errors(results: Iterable[FeatureResult]) -> dict[int, str]:
    """Index -> reason for images that failed in any of ``results`` (views or backbones of one list)."""
    errors: dict[int, str] = {}
    for result in results:
        errors.update(result.errors)
    return errors


def default_workers(n_images: int) -> int:
    """DataLoader worker processes: decode in parallel with the model only when it pays off."""
    if n_images < 64:
        return 0
    return max(1, min(4, (os.cpu_count() or 1)))


#: Images per forward pass during extraction on CPU, where small batches keep a
#: block's activations in cache. bf16 lite0's forward pass alone measured 163, 122 and
#: 86 img/s at batches of 8, 16 and 64 (bench/results/speed.json). In full extraction,
#: measured in one run, 16 gave 76 and 68 img/s where 64 gave 49 and 56; 8 was within
#: noise of 16. Decoding workers still hand over batches of 64.
FORWARD_BATCH = 16


def _forward(
    network: torch.nn.Module, backbone: Backbone, images: torch.Tensor, view: str, forward_batch: int | None
) -> np.ndarray:
    """``network`` on a loaded batch, ``forward_batch`` images at a time: float32 ``[N, ...]``."""
    device = next(backbone.model.parameters()).device
    if forward_batch is None:
        forward_batch = FORWARD_BATCH if device.type == "cpu" else len(images)
    outputs = []
    for x in images.split(forward_batch):
        x = x.to(device)
        if pixel_view(view) != view:
            x = normalize_pixels(x, backbone.data_config)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=backbone.bf16):
            outputs.append(network(x).float().cpu().numpy())
    return np.concatenate(outputs)


@torch.inference_mode()
def extract_features(
    backbone: Backbone,
    paths: Sequence[str | Path],
    *,
    shas: Sequence[str | None] | None = None,
    cache: FeatureCache | None = None,
    view: str = "clean",
    seed: int = 0,
    batch_size: int = 64,
    forward_batch: int | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    network: torch.nn.Module | None = None,
    out_shape: tuple[int, ...] | None = None,
    dtype: type = np.float32,
) -> FeatureResult:
    """Pooled backbone features for ``paths``, reading and filling ``cache`` when given.

    With ``network``/``out_shape``/``dtype`` the same machinery caches other outputs,
    such as the fp16 activations entering the top blocks (see :mod:`florist.tune`).

    Args:
        backbone: from :func:`florist.backbones.create_backbone`.
        paths: image files, or TFRecord records named by :func:`florist.tfrecord.record_ref`.
        shas: known content hashes (from a manifest) so cached images are not even read;
            without them each file is read and hashed, and the network still runs only
            for images missing from the cache.
        cache: where to look up and store features; None computes everything. It must
            have been made with the same ``view`` and ``seed`` (see :func:`feature_key`).
        view: ``clean``, ``flip`` or ``aug<k>`` (see :func:`build_transform`).
        seed: seed of random views.
        batch_size: images per loaded batch (what decoding workers hand over).
        forward_batch: images per forward pass (default: :data:`FORWARD_BATCH` on CPU,
            the whole loaded batch on an accelerator).
        workers: DataLoader worker processes for decoding (default: by data size).
        progress: ``progress(done, total)`` callback.
        network: module run on the preprocessed batch (default: the whole backbone).
        out_shape: shape of one image's output (default: ``(num_features,)``, or the
            pixel view's shape for ``.../u8`` views).
        dtype: dtype of the returned and cached arrays.
    """
    paths = [str(p) for p in paths]
    network = network if network is not None else backbone.model
    if out_shape:
        shape = tuple(out_shape)
    else:
        shape = view_shape(backbone.data_config, view) if view.endswith(PIXELS) else (backbone.num_features,)
    features = np.zeros((len(paths), *shape), dtype=dtype)
    todo: list[int] = []
    hash_known: set[int] = set()  # looked up already: no second lookup once the file is read
    for i, sha in enumerate(shas or [None] * len(paths)):
        cached = cache.get(sha) if (cache is not None and sha) else None
        if cached is not None and cached.shape == shape:
            features[i] = cached
        else:
            todo.append(i)
            if sha:
                hash_known.add(i)
    total = len(paths)
    done = total - len(todo)
    if progress:
        progress(done, total)
    errors: dict[int, str] = {}
    ran = 0
    if todo:
        workers = default_workers(len(todo)) if workers is None else workers
        loader = DataLoader(
            _ImageFiles([paths[i] for i in todo], backbone.data_config, view, seed, uint8=True),
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
        )
        for idx, images, batch_shas, batch_errors in loader:
            good = []
            for j, err in enumerate(batch_errors):
                lookup = cache is not None and not err and todo[int(idx[j])] not in hash_known
                cached = cache.get(batch_shas[j]) if lookup else None
                if cached is not None and cached.shape == shape:
                    features[todo[int(idx[j])]] = cached  # hash known only after reading the file
                elif not err:
                    good.append(j)
            ran += len(good)
            if good:
                out = _forward(network, backbone, images[good], view, forward_batch).astype(dtype)
                for row, j in zip(out, good):
                    features[todo[int(idx[j])]] = row
                    if cache is not None:
                        cache.put(batch_shas[j], row)
            for j, err in enumerate(batch_errors):
                if err:
                    errors[todo[int(idx[j])]] = err
            done += len(idx)
            if progress:
                progress(done, total)
    return FeatureResult(features, errors, computed=ran)


def extract_views(
    backbone: Backbone,
    paths: Sequence[str | Path],
    views: Sequence[str],
    *,
    shas: Sequence[str | None] | None = None,
    cache_root: str | Path | None = None,
    seed: int = 0,
    part: str = "pooled",
    progress_for: Callable[[str], AbstractContextManager[ProgressFn]] | None = None,
    **kwargs: Any,
) -> dict[str, FeatureResult]:
    """:func:`extract_features` for several views, each cached under its own key.

    Args:
        views: names from :func:`view_names` (or TTA views such as ``["clean", "flip"]``).
        cache_root: cache folder; None disables caching.
        part: what is extracted, part of the cache key (see :func:`feature_key`).
        progress_for: given a view name, returns a context manager yielding a progress callback.
        kwargs: passed on to :func:`extract_features` (``network``, ``out_shape``, ``dtype``...).
    """
    results = {}
    for view in views:
        cache = FeatureCache(cache_root, feature_key(backbone, view, seed, part)) if cache_root else None
        with progress_for(view) if progress_for else nullcontext(None) as bar:
            results[view] = extract_features(
                backbone, paths, shas=shas, cache=cache, view=view, seed=seed, progress=bar, **kwargs
            )
    return results


def extract_concat(
    backbones: Sequence[Backbone], paths: Sequence[str | Path], views: Sequence[str], **kwargs: Any
) -> dict[str, FeatureResult]:
    """:func:`extract_views` for each backbone, features concatenated in backbone order.

    Each backbone keeps its own preprocessing and its own cache entries; an image
    that fails for any backbone is reported as failed.
    """
    per_backbone = [extract_views(b, paths, views, **kwargs) for b in backbones]
    if len(per_backbone) == 1:
        return per_backbone[0]
    merged = {}
    for view in views:
        results = [p[view] for p in per_backbone]
        features = np.concatenate([r.features for r in results], axis=1)
        merged[view] = FeatureResult(features, merged_errors(results), sum(r.computed for r in results))
    return merged
