"""Stage 3, *features*: images -> pooled backbone features ("bottlenecks"), cached on disk.

A frozen backbone maps each image to the same vector every time, so florist
computes it once and stores it under a key made of the image's content hash
and everything that affects the vector: backbone architecture, exact weights,
preprocessing and the florist feature version. A second ``train`` on the same
photos (or on a superset, or with other head settings) reads the cache instead
of running the network. The cache is a sharded store (:mod:`florist.store`):
large checksummed shard files published atomically, so a killed run leaves no
corrupt entry, concurrent runs can share one cache, and a warm run over a
million photos opens a few hundred files, not a million.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone
from .data import BadImage
from .engines import FrozenNet, compile_frozen, weights_token
from .files import sha256_bytes
from .preprocess import VIEWS, eval_crop, load_for_backbone, resize_size, supports_eval_crop, view_of_crop
from .progress import ProgressFn
from .remote import Unavailable
from .store import FeatureCache
from .tfrecord import read_image_bytes

log = logging.getLogger("florist")

#: Bump when the way features are computed changes, so stale cache entries are not reused.
FEATURE_VERSION = 2  # 2: eval_crop resamples only the crop; flip mirrors the clean crop

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
    """PIL image -> normalised tensor, as timm evaluates the backbone (geometry: :func:`florist.preprocess.eval_crop`).

    ``view="flip"`` is the clean crop mirrored; ``aug<k>`` views take a random resized
    crop, a random flip and colour jitter (seeded per image by the caller). A view
    name ending in ``/u8`` (:data:`PIXELS`) gives the same pixels as uint8, before
    scaling and normalisation (:func:`normalize_pixels` finishes them bit for bit);
    ``square/u8`` is the image resized and centre-cropped to a square of the resize
    size, the input of fine-tuning's on-the-fly augmentation.
    """
    from torchvision import transforms as T

    pixels = view.endswith(PIXELS)
    base = view[: -len(PIXELS)] if pixels else view
    if pixels:
        tail = [T.PILToTensor()]
    else:
        tail = [T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])]
    return T.Compose([*_image_steps(data_config, base), *tail])


def _image_steps(data_config: dict[str, Any], view: str) -> list:
    """The PIL-image steps of ``view`` (geometry, and colour jitter for random views)."""
    from timm.data import create_transform
    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms as T

    interpolation = str_to_interp_mode(data_config["interpolation"])
    if view == "square":
        return [EvalCrop(data_config, view)]
    if is_random_view(view):
        size = tuple(data_config["input_size"][-2:])
        return [
            T.RandomResizedCrop(size, scale=AUGMENT["scale"], ratio=AUGMENT["ratio"], interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.ColorJitter(AUGMENT["brightness"], AUGMENT["contrast"], AUGMENT["saturation"]),
        ]
    if view not in ("clean", "flip"):
        raise ValueError(f"unknown view {view!r}")
    if supports_eval_crop(data_config):
        return [EvalCrop(data_config, view)]
    evaluation = create_transform(  # timm's own geometry for preprocessing eval_crop does not handle
        input_size=tuple(data_config["input_size"]),
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
        is_training=False,
    )
    geometry = [t for t in evaluation.transforms if isinstance(t, (T.Resize, T.CenterCrop))]
    return [*geometry, T.RandomHorizontalFlip(p=1.0)] if view == "flip" else geometry


class EvalCrop:
    """:func:`florist.preprocess.eval_crop` as a transform step: one implementation of the geometry for every path."""

    def __init__(self, data_config: dict[str, Any], view: str):
        self.data_config, self.view = data_config, view

    def __call__(self, image: Any) -> Any:
        return eval_crop(image, self.data_config, self.view)

    def __repr__(self) -> str:
        return f"EvalCrop(view={self.view!r}, input_size={self.data_config['input_size']})"


def normalize_pixels(pixels: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> the normalised float tensor the backbone expects.

    The same float32 operations as torchvision's ``ToTensor`` + ``Normalize``, so a
    ``clean/u8`` view finished here equals the ``clean`` view exactly.
    """
    return _normalized(pixels, *_channel_stats(data_config, pixels.device))


def _channel_stats(data_config: dict[str, Any], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's per-channel mean and std as float32 ``[3, 1, 1]`` tensors."""
    return tuple(  # type: ignore[return-value]
        torch.tensor(data_config[k], dtype=torch.float32, device=device)[:, None, None] for k in ("mean", "std")
    )


def _normalized(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return pixels.float().div(255).sub(mean).div(std)


def feature_key(backbone: Backbone, view: str = "clean", seed: int = 0, part: str = "pooled") -> str:
    """Cache namespace for one backbone + weights + preprocessing + view (+ seed for random views).

    ``part`` names what is cached ("pooled" features, or e.g. "blocks-4" activations).
    The engine is named when it is not torch (so entries written before engines
    existed keep their keys); cached pixels depend on no engine.
    """
    payload = json.dumps(
        {
            **({"part": part} if part != "pooled" else {}),
            **({"tuned": backbone.tuned_id} if backbone.tuned_id else {}),
            **({"precision": "bf16"} if backbone.bf16 else {}),
            **({"engine": backbone.engine} if backbone.engine != "torch" and not view.endswith(PIXELS) else {}),
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
# Extraction
# ---------------------------------------------------------------------------


class _ImageFiles(Dataset):
    """Reads, hashes and decodes each file (or TFRecord record) once, and makes every view of it.

    Each item is ``(index, pixels, sha256, error)`` with ``pixels`` a tuple holding
    one uint8 ``[3, H, W]`` tensor per view (see :func:`loaded_view`): decoding and
    resizing a JPEG costs more than a random crop of it, so the views share one
    decode. A bad file yields blank tensors and its error instead of raising; so does a
    remote file that stayed unreadable after retries (checked a moment ago, it is then
    left out like a file that changed since).
    """

    def __init__(self, paths: Sequence[str], data_config: dict[str, Any], views: Sequence[str], seed: int = 0):
        self.paths = list(paths)
        self.data_config = data_config
        self.views = list(views)
        self.seed = seed
        self.transforms = [build_transform(data_config, loaded_view(v)) for v in self.views]
        # The clean and mirrored views share one resampled crop (see preprocess.view_of_crop).
        self.shares_crop = supports_eval_crop(data_config) and any(_crop_view(v) in VIEWS for v in self.views)
        self.blanks = tuple(torch.zeros(view_shape(data_config, v), dtype=torch.uint8) for v in self.views)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, tuple[torch.Tensor, ...], str, str]:
        try:
            data = read_image_bytes(self.paths[i])  # a file or a TFRecord record
            image = load_for_backbone(data, self.data_config)
            sha = sha256_bytes(data)
            clean = eval_crop(image, self.data_config) if self.shares_crop else None
            views = tuple(self._view(image, clean, sha, v, t) for v, t in zip(self.views, self.transforms))
            return i, views, sha, ""
        except (BadImage, Unavailable) as e:
            return i, self.blanks, "", str(e) or "unreadable image"

    def _view(self, image: Any, clean: Any, sha: str, view: str, transform: Callable) -> torch.Tensor:
        if clean is not None and _crop_view(view) in VIEWS:  # transform's uint8 output, without resampling again
            from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(view_of_crop(clean, _crop_view(view)))
        if not is_random_view(view):
            return transform(image)
        # Seed torchvision's (global) RNG per image and view, without disturbing the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(sha, view, self.seed))
            return transform(image)


def _crop_view(view: str) -> str:
    """The geometry of a view (``flip/u8`` -> ``flip``)."""
    return view.removesuffix(PIXELS)


def loaded_view(view: str) -> str:
    """The uint8 view the loader makes for ``view`` (``clean`` -> ``clean/u8``).

    Workers send a quarter of the bytes of float images through shared memory, and
    :func:`normalize_pixels` finishes them next to the model, bit for bit as the
    float transform would: every step before ``ToTensor`` works on uint8 PIL images.
    """
    return view if view.endswith(PIXELS) else view + PIXELS


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
#: block's activations in cache. Measured in one run, five interleaved rounds, on 1,500
#: photos (OpenVINO bf16 lite0, 2 decoding workers, 2-core CPU): extraction medians
#: 236 img/s at 8 and 226 at 16; the network alone is as fast at 8 as at 16, and
#: slower at 32 and 64 (bench/results/speed.json). Decoding workers still hand over
#: batches of 64.
FORWARD_BATCH = 8


class FromPixels(nn.Module):
    """uint8 pixels -> ``network``'s output: :func:`normalize_pixels`, then ``network``.

    Normalising inside the compiled module lets an engine fuse it with the first
    convolution; as separate torch operations on each batch it took about 15% of
    OpenVINO extraction's time (profiled on 600 photos). For the torch engine the
    operations are the same as before, so its features are unchanged bit for bit.
    """

    def __init__(self, network: nn.Module, data_config: dict[str, Any]):
        super().__init__()
        self.network = network
        mean, std = _channel_stats(data_config, next(network.parameters()).device)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def extra_repr(self) -> str:  # part of the OpenVINO cache's key (engines.openvino_model)
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(_normalized(pixels, self.mean, self.std))


def frozen_pass(backbone: Backbone, network: nn.Module | None = None) -> FrozenNet:
    """``network`` (default: the whole backbone) on uint8 pixels, compiled for the backbone's engine and precision.

    Compiling for OpenVINO traces the network (seconds), so the compiled copy is kept
    on the backbone and reused for as long as the same module's weights, engine,
    precision and input size are unchanged.
    """
    network = backbone.model if network is None else network
    size = tuple(backbone.data_config["input_size"])
    token = (backbone.engine, backbone.bf16, size, weights_token(network))
    kept = backbone.compiled.get(id(network))
    if kept is not None and kept[0]() is network and kept[1] == token:
        return kept[2]
    module = FromPixels(network, backbone.data_config).eval()
    example = [torch.zeros(1, *size, dtype=torch.uint8)]
    compiled = compile_frozen(module, example, backbone.engine, bf16=backbone.bf16)
    backbone.compiled[id(network)] = (weakref.ref(network), token, compiled)
    return compiled


def _forward(net: FrozenNet | None, pixels: torch.Tensor, forward_batch: int | None) -> np.ndarray:
    """``net`` on a loaded uint8 batch, ``forward_batch`` images at a time (None: the pixels themselves)."""
    if net is None:
        return pixels.numpy()
    if forward_batch is None:
        forward_batch = FORWARD_BATCH if net.device.type == "cpu" else len(pixels)
    return np.concatenate([net(x.to(net.device)) for x in pixels.split(forward_batch)])


def extract_features(backbone: Backbone, paths: Sequence[str | Path], *, view: str = "clean", **kwargs: Any) -> FeatureResult:
    """Pooled backbone features of one view of ``paths`` (:func:`extract_views` for one view).

    Args:
        cache: a :class:`FeatureCache` made with the same ``view`` and ``seed`` (see
            :func:`feature_key`), read and filled; None computes everything.
        kwargs: the other arguments of :func:`extract_views` (``shas``, ``seed``, ...).
    """
    cache = kwargs.pop("cache", None)
    return _extract(backbone, paths, {view: cache}, **kwargs)[view]


#: Entries looked up in the cache at a time: bounds the rows read but not yet copied.
LOOKUP_CHUNK = 4096
#: glibc's ``M_MMAP_THRESHOLD`` option of ``mallopt``; the threshold during extraction, and after it
#: (the most glibc's own adjustment reaches on 64-bit systems).
_M_MMAP_THRESHOLD, EXTRACTION_MMAP_THRESHOLD, LATER_MMAP_THRESHOLD = -3, 1 << 16, 32 << 20


def _mmap_threshold(size: int) -> bool:
    """Set glibc's mmap threshold; False where there is no glibc ``mallopt`` (other systems, musl)."""
    if sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, size))


@contextmanager
def steady_allocator() -> Iterator[None]:
    """Keep extraction's memory flat: large allocations are served by ``mmap`` while it runs (glibc only).

    Used when the network runs on OpenVINO or ONNX Runtime, which allocate their own
    buffers once: eager torch allocates every layer's output afresh, and mapping each
    one cost its extraction 25-35% (lite0 bf16, measured 54 vs 67-75 images/s).
    Every loaded batch is a few large arrays. glibc raises its mmap threshold each
    time such a block is freed, after which they come from the heap, fragment it and
    are never handed back: extraction's RSS grew by 840 MiB over its first 3,000
    photos, then stayed there (lite0, OpenVINO bf16). With the threshold at 64 KiB
    it stayed at its start (937 against 1,688 MiB peak), at the same speed within
    noise. Training is the opposite case: each step allocates and frees the same
    large tensors, and mapping them afresh every time doubled tune-top's training
    time, so afterwards the threshold is set where glibc's own adjustment ends up.
    """
    _mmap_threshold(EXTRACTION_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _mmap_threshold(LATER_MMAP_THRESHOLD)


@torch.inference_mode()
def _extract(
    backbone: Backbone,
    paths: Sequence[str | Path],
    caches: dict[str, FeatureCache | None],
    *,
    shas: Sequence[str | None] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    forward_batch: int | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    network: nn.Module | None = None,
    out_shape: tuple[int, ...] | None = None,
    dtype: type = np.float32,
    collect: bool = True,
) -> dict[str, FeatureResult]:
    """Outputs of every view in ``caches`` (view -> its cache or None), each image decoded once.

    ``collect=False`` only fills the caches: nothing is read back and the results'
    ``features`` are empty, so memory does not grow with the number of images.
    """
    paths = [str(p) for p in paths]
    views = list(caches)
    shapes = {v: _out_shape(backbone, v, out_shape) for v in views}
    outputs = {v: np.zeros((len(paths) if collect else 0, *shapes[v]), dtype=dtype) for v in views}
    known = list(shas) if shas else [None] * len(paths)
    missing = {v: _lookup(caches[v], known, outputs[v] if collect else None, shapes[v]) for v in views}
    todo = sorted(set().union(*missing.values()))
    total, done = len(paths), len(paths) - len(todo)
    if progress:
        progress(done, total)
    errors: dict[int, str] = {}
    ran = dict.fromkeys(views, 0)
    load = [v for v in views if missing[v]]
    try:
        if todo:
            networked = [v for v in load if not v.endswith(PIXELS)]  # pixel views are their own output
            net = frozen_pass(backbone, network) if networked else None
            with steady_allocator() if net is None or net.engine != "torch" else nullcontext():
                workers = default_workers(len(todo)) if workers is None else workers
                loader = DataLoader(
                    _ImageFiles([paths[i] for i in todo], backbone.data_config, load, seed),
                    batch_size=batch_size,
                    num_workers=workers,
                    pin_memory=torch.cuda.is_available(),
                )
                for idx, pixels, batch_shas, batch_errors in loader:
                    rows = [todo[int(j)] for j in idx]
                    errors.update({row: err for row, err in zip(rows, batch_errors) if err})
                    for v, view_pixels in zip(load, pixels):
                        cache, out = caches[v], outputs[v] if collect else None
                        wanted = [j for j, row in enumerate(rows) if not batch_errors[j] and row in missing[v]]
                        if cache is not None:  # hashes known only now that the files were read
                            late = [batch_shas[j] if not known[rows[j]] else None for j in wanted]
                            unserved = _lookup(cache, late, out, shapes[v], rows=[rows[j] for j in wanted])
                            wanted = [j for k, j in enumerate(wanted) if k in unserved]
                        if not wanted:
                            continue
                        ran[v] += len(wanted)
                        view_net = net if v in networked else None
                        values = _forward(view_net, view_pixels[wanted], forward_batch).astype(dtype)
                        for j, value in zip(wanted, values):
                            if out is not None:
                                out[rows[j]] = value
                            if cache is not None:
                                cache.put(batch_shas[j], value)
                    done += len(rows)
                    if progress:
                        progress(done, total)
    finally:
        for cache in caches.values():
            if cache is not None:
                cache.close()
    return {v: FeatureResult(outputs[v], dict(errors), computed=ran[v]) for v in views}


def _lookup(
    cache: FeatureCache | None,
    shas: Sequence[str | None],
    out: np.ndarray | None,
    shape: tuple[int, ...],
    rows: Sequence[int] | None = None,
) -> set[int]:
    """Positions in ``shas`` the cache cannot serve (no hash, absent, damaged or of another shape).

    The rows it serves are copied into ``out`` (at ``rows[i]``, default ``i``);
    without ``out`` entries are only looked up, not read.
    """
    if cache is None:
        return set(range(len(shas)))
    if out is None:
        return {i for i, sha in enumerate(shas) if not sha or sha not in cache}
    found: set[int] = set()
    for start in range(0, len(shas), LOOKUP_CHUNK):
        for i, array in cache.get_many(shas[start : start + LOOKUP_CHUNK]).items():
            if array.shape == shape:
                found.add(start + i)
                out[rows[start + i] if rows is not None else start + i] = array
    return set(range(len(shas))) - found


def _out_shape(backbone: Backbone, view: str, out_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if out_shape:
        return tuple(out_shape)
    return view_shape(backbone.data_config, view) if view.endswith(PIXELS) else (backbone.num_features,)


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
    """Network outputs of several views of ``paths``, each view cached under its own key.

    Every image is read and decoded once for all its views; only the (image, view)
    pairs missing from the cache go through the network.

    Args:
        views: names from :func:`view_names` (or TTA views such as ``["clean", "flip"]``);
            ``.../u8`` views are the loader's uint8 pixels themselves, cached as they are.
        shas: known content hashes (from a manifest) so cached images are not even read;
            without them each file is read and hashed, and the network still runs only
            for images missing from the cache.
        cache_root: cache folder; None disables caching.
        seed: seed of random views.
        part: what is extracted, part of the cache key (see :func:`feature_key`).
        progress_for: given a label of the views, returns a context manager yielding a
            ``progress(done, total)`` callback.
        kwargs: ``batch_size`` (images per loaded batch, what decoding workers hand over),
            ``forward_batch`` (images per forward pass; default :data:`FORWARD_BATCH` on CPU,
            the whole loaded batch on an accelerator), ``workers`` (decoding processes;
            default by data size), ``network`` (module run on the preprocessed batch,
            default the whole backbone, such as tune-top's frozen bottom), ``out_shape``
            and ``dtype`` of one image's output.
    """
    caches = {
        v: FeatureCache(cache_root, feature_key(backbone, v, seed, part)) if cache_root else None for v in views
    }
    label = ", ".join(views) if len(views) <= 2 else f"{len(views)} views"
    with progress_for(label) if progress_for else nullcontext(None) as bar:
        return _extract(backbone, paths, caches, shas=shas, seed=seed, progress=bar, **kwargs)


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
