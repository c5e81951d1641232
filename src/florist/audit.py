"""``florist audit``: what is wrong with a photo folder, before any training.

    >>> report = florist.audit("flower_photos")     # doctest: +SKIP
    >>> [g.paths for g in report.label_conflicts]   # doctest: +SKIP
    [['roses/15922772266_1167a06620.jpg', 'tulips/15922772266_1167a06620.jpg']]

Every file under the class folders is read and decoded once, as
:func:`florist.data.scan` does, and checked for what silently hurts a
classifier: class imbalance, files that cannot be used (corrupt, empty, not an
image), odd files (content that does not match the extension, files outside any
class folder), exact duplicates (same SHA-256), the same image under two classes
(a label conflict), near duplicates (a perceptual hash of the decoded picture:
resized, re-compressed or lightly edited copies) and tiny images.

:func:`florist.data.prepare` acts on the exact duplicates itself (a group stays
on one side of the split; a label conflict goes to train only); near duplicates
are only reported here.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data import (
    BadImage,
    Item,
    check_all,
    class_files,
    decode_image,
    duplicate_groups,
    find_class_folders,
    read_file,
)
from .errors import FloristError
from .files import sha256_bytes
from .labels import DEFAULT_FOLDS, LabelIssue, find_label_issues, folds_fitted
from .progress import ProgressFn

#: Largest Hamming distance (of 64 bits) between perceptual hashes that counts as a
#: near duplicate. On flower_photos every pair at 8 or less was the same photo
#: (re-sized, re-compressed or re-cropped); at 10 unrelated photos start to match.
DEFAULT_NEAR_DISTANCE = 8
#: Images whose shorter side is below this many pixels are reported as tiny
#: (half the 224 px input of the default backbone: they are blown up more than 2x).
DEFAULT_MIN_SIDE = 112
#: Largest/smallest class size above which the class imbalance is worth a warning.
DEFAULT_IMBALANCE = 2.0

#: File extensions expected for each format Pillow reports.
_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "MPO": {".jpg", ".jpeg", ".mpo"},
    "PNG": {".png"},
    "BMP": {".bmp", ".dib"},
    "GIF": {".gif"},
    "WEBP": {".webp"},
    "PPM": {".ppm", ".pnm"},
}


@dataclass
class FileIssue:
    """One file and what is wrong with it (paths are relative to the audited folder)."""

    path: str
    reason: str


@dataclass
class DuplicateGroup:
    """Files with identical bytes; ``classes`` has more than one name for a label conflict."""

    sha256: str
    paths: list[str]
    classes: list[str]


@dataclass
class NearDuplicate:
    """Two different files whose pictures look the same (perceptual hash distance)."""

    paths: list[str]
    classes: list[str]
    distance: int


@dataclass
class TinyImage:
    path: str
    width: int
    height: int


@dataclass
class AuditReport:
    """Everything :func:`audit` found; :meth:`to_dict` is the ``--json`` output."""

    root: str
    classes: dict[str, int]
    n_files: int
    unreadable: list[FileIssue] = field(default_factory=list)
    odd: list[FileIssue] = field(default_factory=list)
    exact_duplicates: list[DuplicateGroup] = field(default_factory=list)
    near_duplicates: list[NearDuplicate] = field(default_factory=list)
    tiny: list[TinyImage] = field(default_factory=list)
    label_issues: list[LabelIssue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return sum(self.classes.values())

    @property
    def label_conflicts(self) -> list[DuplicateGroup]:
        """Exact duplicates filed under more than one class."""
        return [g for g in self.exact_duplicates if len(set(g.classes)) > 1]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["n_images"] = self.n_images
        data["label_conflicts"] = [asdict(g) for g in self.label_conflicts]
        return data


@dataclass
class _Picture:
    """What :func:`_inspect` learns from one readable file."""

    sha256: str
    format: str
    width: int
    height: int
    phash: int


def _inspect(path: Path) -> _Picture:
    """Read, hash and decode one file (same checks as prepare); raise :class:`BadImage` if unusable."""
    import imagehash

    data = read_file(path)
    picture = decode_image(data, draft_size=64)  # a perceptual hash needs only a small picture
    with Image.open(io.BytesIO(data)) as header:  # the size before draft decoding
        fmt, (width, height) = header.format, header.size
    return _Picture(sha256_bytes(data), fmt, width, height, int(str(imagehash.phash(picture)), 16))


def near_duplicate_pairs(hashes: Sequence[int], max_distance: int) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for every pair i < j of 64-bit hashes at most ``max_distance`` bits apart.

    All pairs are compared, vectorised a block of rows at a time (blocks of about
    16 M comparisons, so memory stays near 150 MB however many images there are).
    """
    h = np.array(hashes, dtype=np.uint64)
    chunk = max(1, (1 << 24) // max(1, len(h)))
    pairs = []
    for start in range(0, len(h), chunk):
        distances = np.bitwise_count(h[start : start + chunk, None] ^ h[None, :])
        rows, cols = np.nonzero(distances <= max_distance)
        for i, j in zip(rows + start, cols):
            if i < j:
                pairs.append((int(i), int(j), int(distances[i - start, j])))
    return pairs


def _odd_extension(path: Path, fmt: str) -> str | None:
    expected = _EXTENSIONS.get(fmt, set())
    if path.suffix.lower() in expected:
        return None
    return f"{fmt} content but named {path.suffix or '(no extension)'}"


def _loose_images(root: Path) -> list[Path]:
    """Image files directly in the top folder: florist ignores them, as they have no class.

    Judged by extension only: a README or LICENSE there is expected, not odd.
    """
    extensions = set().union(*_EXTENSIONS.values())
    return sorted(
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    )


def audit(
    data_dir: str | Path,
    *,
    near_distance: int = DEFAULT_NEAR_DISTANCE,
    min_side: int = DEFAULT_MIN_SIDE,
    imbalance: float = DEFAULT_IMBALANCE,
    labels: bool = False,
    folds: int = DEFAULT_FOLDS,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    engine: str = "auto",
    workers: int | None = None,
    progress: ProgressFn | None = None,
    labels_progress: ProgressFn | None = None,
) -> AuditReport:
    """Check a ``<folder>/<class>/<images>`` tree for problems that hurt training or evaluation.

    Args:
        data_dir: the photo folder, as given to ``florist train``.
        near_distance: perceptual-hash distance (0-64) at or below which two pictures
            are near duplicates; negative turns the search off.
        min_side: report images whose shorter side is below this many pixels.
        imbalance: warn when the largest class has more than this many times the
            images of the smallest.
        labels: also look for suspect labels (:mod:`florist.labels`): out-of-fold heads on
            ``backbone``'s cached features, ranked by cleanlab.
        folds: parts the photos are split into for those heads.
        backbone, weights, engine: the network the heads use, as ``florist train`` takes them
            (its feature cache is shared).
        workers: threads reading and decoding files.
        progress: ``progress(done, total)`` while files are read.
        labels_progress: the same while features are computed for ``labels``.

    Returns:
        An :class:`AuditReport`; its ``warnings`` summarise what deserves attention.

    Raises:
        FloristError: the folder is missing or has no class folders.
    """
    root = Path(data_dir)
    folders = find_class_folders(root)
    if not folders:
        raise FloristError(f"no class folders in {root} (expected {root}/<class>/<images>)")
    candidates = class_files(root, folders, list(folders))
    results = check_all(_inspect, [p for _, p in candidates], workers, progress)

    def rel(path: Path | str) -> str:
        return os.path.relpath(path, root)

    report = AuditReport(
        root=str(root),
        classes={name: 0 for name in folders},
        n_files=len(candidates),
        settings={"near_distance": near_distance, "min_side": min_side, "imbalance": imbalance},
    )
    report.odd = [FileIssue(rel(p), "image outside any class folder: ignored") for p in _loose_images(root)]
    good: list[tuple[str, Path, _Picture]] = []
    for (name, path), result in zip(candidates, results):
        if isinstance(result, BadImage):
            report.unreadable.append(FileIssue(rel(path), str(result)))
            continue
        good.append((name, path, result))
        report.classes[name] += 1
        if reason := _odd_extension(path, result.format):
            report.odd.append(FileIssue(rel(path), reason))
        if min(result.width, result.height) < min_side:
            report.tiny.append(TinyImage(rel(path), result.width, result.height))

    index = {name: i for i, name in enumerate(folders)}
    names = list(folders)
    items = [Item(str(path), index[name], pic.sha256) for name, path, pic in good]
    report.exact_duplicates = [
        DuplicateGroup(g[0].sha256, [rel(it.path) for it in g], [names[it.label] for it in g])
        for g in duplicate_groups(items)
    ]
    if near_distance >= 0:
        pairs = near_duplicate_pairs([pic.phash for _, _, pic in good], near_distance)
        report.near_duplicates = sorted(
            (
                NearDuplicate([rel(good[i][1]), rel(good[j][1])], [good[i][0], good[j][0]], d)
                for i, j, d in pairs
                if good[i][2].sha256 != good[j][2].sha256  # exact copies are reported above
            ),
            key=lambda n: (n.distance, n.paths),
        )
    if labels:
        report.label_issues = find_label_issues(
            [it.path for it in items], [it.label for it in items], names, [rel(it.path) for it in items],
            shas=[it.sha256 for it in items], backbone=backbone, weights=weights, engine=engine, folds=folds, progress=labels_progress,
        )
        report.settings.update(labels=True, folds=folds_fitted(folds, len(items)), backbone=backbone)
    report.warnings = _warnings(report, imbalance)
    return report


def _warnings(report: AuditReport, imbalance: float) -> list[str]:
    """One line per kind of problem found, in order of how much it matters."""
    out = []
    counts = report.classes
    for name, n in counts.items():
        if n < 2:
            out.append(f"class {name!r} has {n} usable image(s): training leaves it out (needs 2)")
    usable = {name: n for name, n in counts.items() if n > 0}
    if len(usable) >= 2:
        (big, n_big), (small, n_small) = Counter(usable).most_common()[0], Counter(usable).most_common()[-1]
        if n_big > imbalance * n_small:
            out.append(
                f"class imbalance: {big!r} has {n_big} images, {small!r} only {n_small} "
                f"({n_big / n_small:.1f}x); consider --class-weights balanced or more {small!r} photos"
            )
    if conflicts := report.label_conflicts:
        out.append(
            f"{len(conflicts)} image(s) are filed under two or more classes (label conflict), "
            f"e.g. {' = '.join(conflicts[0].paths)}: one label is wrong; training keeps them out of eval"
        )
    same = [g for g in report.exact_duplicates if len(set(g.classes)) == 1]
    if same:
        extra = sum(len(g.paths) - 1 for g in same)
        out.append(f"{extra} redundant exact duplicate(s) in {len(same)} group(s) within a class")
    if report.near_duplicates:
        out.append(
            f"{len(report.near_duplicates)} near-duplicate pair(s) (perceptual hash distance <= "
            f"{report.settings['near_distance']}): copies can leak between train and eval"
        )
    if report.label_issues:
        first = report.label_issues[0]
        out.append(
            f"{len(report.label_issues)} photo(s) look mislabelled (a head that never saw them disagrees), "
            f"e.g. {first.path}: filed as {first.given!r}, looks like {first.suggested!r}"
        )
    if report.unreadable:
        out.append(f"{len(report.unreadable)} file(s) cannot be used (corrupt, empty or not images)")
    if report.odd:
        out.append(f"{len(report.odd)} odd file(s) (misleading extension or outside any class folder)")
    if report.tiny:
        out.append(f"{len(report.tiny)} tiny image(s) (shorter side < {report.settings['min_side']} px)")
    return out
