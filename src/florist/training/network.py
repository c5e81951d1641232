"""Full fine-tuning (``--mode finetune``): every backbone layer learns from augmented photos.

tune-top trains only the last block because its input can be cached. finetune
pays for running the whole network forward and backward at every step, and in
return adapts every layer. What keeps that affordable on a CPU:

* each photo is decoded and resized once into a small uint8 square (cached on
  disk like features), so a step does no JPEG decoding, only a random crop,
  flip and colour jitter of a 256x256 tensor;
* training starts from tune-top's result (the last block and a head trained on
  cached activations in a few minutes), so the expensive full-network steps
  refine a model that already scores well, and no random head's gradients reach
  the pretrained layers;
* learning rates shrink layer by layer towards the stem (timm's layer-wise
  decay), after a linear warm-up and then along a cosine;
* batch-norm statistics stay frozen: batches of 32 give noisy statistics, and
  frozen statistics make a multi-process run take exactly the steps of one;
* bf16 autocast and channels_last where the hardware gains from them.

The fine-tuned model is evaluated and saved with a centre crop of the whole
square (see :func:`florist.training.modes.finetune.whole_image`).

After every epoch a checkpoint (``checkpoint.pt``: tensors and numbers only,
loaded with ``weights_only=True``) lets an interrupted run resume where it
stopped, with the same result as an uninterrupted one; a resumed run skips the
warm start, whose result the checkpoint's weights already hold.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..features import AUGMENT, normalize_pixels, view_seed
from ..files import atomic_write_bytes
from ..predict import average_probabilities
from ..runfiles import CHECKPOINT
from .blocks import TopConfig, freeze_bn_stats
from .loop import History, Plan, Watch, run_steps, warmup_cosine

log = logging.getLogger("florist")


@dataclass
class FinetuneConfig(TopConfig):
    """Top-block settings plus what only full fine-tuning has.

    Attributes:
        layer_decay: each block's learning rate is this times the next block's
            (1.0 = one rate for the whole backbone).
        keep: ``"last"`` epoch's weights, or the ``"best"`` epoch by eval top-1
            (which then selects on the eval split: its top-1 is optimistic).
        patience: stop after this many epochs without a better eval top-1 (None: never).
        trainable: state-dict prefixes of the trained backbone tensors (None: all).
        fingerprint: identifies the run's settings and data; a checkpoint with another
            fingerprint is not resumed.
    """

    layer_decay: float = 0.85
    keep: str = "last"
    patience: int | None = None
    trainable: Sequence[str] | None = None
    fingerprint: str = ""


class Network(nn.Module):
    """uint8 pixels -> logits: normalisation, backbone and head in one module.

    Normalising inside the module keeps fine-tuning's input exactly the one
    prediction uses (see :func:`florist.features.normalize_pixels`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, data_config: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.data_config = data_config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize_pixels(pixels, self.data_config).contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())  # in fp32, as at prediction time


def _view_params(image: int, step: int, seed: int, side: int) -> list[float]:
    """Crop box, flip and colour factors of one image's random view, seeded by (image, step, seed).

    Seeding per image rather than per batch makes the views independent of how a
    batch is split between processes, and of where a resumed run restarts.
    """
    from torchvision.transforms import RandomResizedCrop

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(str(image), f"step{step}", seed))
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(1, side, side), AUGMENT["scale"], AUGMENT["ratio"])
        flip = float(torch.rand(()) < 0.5)
        jitter = [AUGMENT[k] for k in ("brightness", "contrast", "saturation")]
        factors = [float(torch.empty(()).uniform_(1 - j, 1 + j)) for j in jitter]
    return [left, top, left + w, top + h, flip, *factors]


def augmented_batch(
    squares: np.ndarray, indices: Sequence[int], step: int, seed: int, size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Random views of ``squares[indices]`` as floats in [0, 255]: ``[B, 3, size, size]``.

    The same augmentation as the cached ``aug<k>`` views (random resized crop, flip,
    brightness/contrast/saturation jitter), done for the whole batch at once: one
    ``roi_align`` crops and resizes every image, and the jitter is a few batched
    tensor operations, on ``device`` (a GPU does it while the CPU prepares the next
    batch). Per image, torchvision's transforms cost about as much CPU time as a
    quarter of a training step.
    """
    from torchvision.ops import roi_align

    side = squares.shape[-1]
    rows = [_view_params(int(i), step, seed, side) for i in indices]
    params = torch.tensor(rows, dtype=torch.float32, device=device)
    images = torch.from_numpy(squares[np.asarray(indices, dtype=np.int64)]).to(device).float()
    numbers = torch.arange(len(indices), dtype=torch.float32, device=device)[:, None]
    boxes = torch.cat([numbers, params[:, :4]], dim=1)
    x = roi_align(images, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    flip, brightness, contrast, saturation = (params[:, k, None, None, None] for k in range(4, 8))
    x = torch.where(flip > 0, x.flip(-1), x)
    x = (x * brightness).clamp(0, 255)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 255)
    grey = _grey(x)
    return ((x - grey) * saturation + grey).clamp(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``[B, 1, H, W]`` of RGB ``[B, 3, H, W]`` (torchvision's greyscale)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def layerwise_groups(backbone: nn.Module, head: nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: decayed learning rates down the backbone, the head's own rate.

    timm's ``param_groups_layer_decay`` ranks the blocks (stem lowest); norms and
    biases get no weight decay.
    """
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(backbone, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr_top * group.pop("lr_scale", 1.0)
    groups.append({"params": list(head.parameters()), "lr": cfg.lr_head, "weight_decay": cfg.weight_decay})
    return groups


def _set_trainable(backbone: nn.Module, prefixes: Sequence[str] | None) -> None:
    for name, p in backbone.named_parameters():
        p.requires_grad_(prefixes is None or any(name.startswith(x) for x in prefixes))


def _save_checkpoint(out: Path, net: Network, opt: torch.optim.Optimizer, schedule: Any, state: dict[str, Any]) -> None:
    """Everything needed to resume, as tensors and plain values (no pickled objects)."""
    buffer = io.BytesIO()
    torch.save(
        {"net": net.state_dict(), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(), **state}, buffer
    )
    atomic_write_bytes(out / CHECKPOINT, buffer.getvalue())


def load_checkpoint(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The run's checkpoint if it exists and belongs to these settings and data, else None.

    ``torch.save`` writes a zip archive holding a CRC-32 of every member, which
    ``torch.load`` does not check: they are checked here first, so a checkpoint
    damaged on disk is never resumed from. Loading is ``weights_only`` (no pickled
    code can run).
    """
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        damaged = zipfile.ZipFile(io.BytesIO(data)).testzip()
        if damaged is not None:
            raise ValueError(f"checksum mismatch in {damaged}")
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged checkpoint costs the progress it held, never the run
        log.warning("ignoring unreadable checkpoint %s: %s", path, e)
        return None
    if checkpoint.get("fingerprint") != fingerprint:
        log.warning("not resuming from %s: it was made with other settings or data", path)
        return None
    return checkpoint


class _Tracker:
    """Best epoch, early stopping and per-epoch checkpoints."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        net: Network,
        out: Path | None,
        save: Callable[[dict[str, Any]], None],
        notes: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.net = net
        self.out = out
        self.save = save
        self.notes = notes or {}
        self.best_top1 = -1.0
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.best_top1 = checkpoint["best_top1"]
        self.best_epoch = checkpoint["best_epoch"]
        self.best_state = checkpoint.get("best_state")

    def __call__(self, history: History) -> bool:
        epoch = len(history.step) - 1
        top1 = history.eval_top1[-1]
        if not math.isnan(top1) and top1 > self.best_top1:
            self.best_top1, self.best_epoch = top1, epoch
            if self.cfg.keep == "best":
                self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        stop = self.cfg.patience is not None and epoch - self.best_epoch >= self.cfg.patience
        state = {
            "history": asdict(history),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "fingerprint": self.cfg.fingerprint,
            "notes": self.notes,
            **({"best_state": self.best_state} if self.best_state is not None else {}),
        }
        if self.out is not None and dist.is_main():
            self.save(state)
        dist.barrier()
        return dist.broadcast_flag(stop)


def fit_finetune(
    backbone: nn.Module,
    head: nn.Module,
    data_config: dict[str, Any],
    squares: np.ndarray,
    train_y: np.ndarray,
    cfg: FinetuneConfig,
    *,
    device: torch.device,
    eval_pixels: Sequence[np.ndarray] = (),
    watch: Watch | None = None,
    out: Path | None = None,
    checkpoint: dict[str, Any] | None = None,
    notes: dict[str, Any] | None = None,
) -> tuple[History, np.ndarray, dict[str, Any]]:
    """Fine-tune ``backbone`` and ``head`` in place on random views of ``squares``.

    Args:
        squares: ``[N, 3, S, S]`` uint8 training images (``square/u8`` views).
        train_y: ``[N]`` labels.
        eval_pixels: one ``[M, 3, H, W]`` uint8 array per test-time view, scored against
            ``watch.eval_labels`` (see :class:`~florist.training.loop.Watch`; its board is
            written by rank 0 only).
        out: where ``checkpoint.pt`` is written after each epoch (None: nowhere).
        checkpoint: what :func:`load_checkpoint` gave for this run, to continue from
            (None: start from ``backbone`` and ``head`` as they are).
        notes: plain values saved with every checkpoint, for the caller to read
            back from it when resuming (e.g. what the warm start scored).

    Returns:
        The curves; the kept weights' TTA-averaged probabilities on the eval views;
        ``{"best_epoch", "best_top1", "kept_epoch", "resumed_from_epoch"}``.
    """
    watch = watch or Watch()
    net = Network(backbone, head, data_config).to(device).to(memory_format=torch.channels_last)
    _set_trainable(backbone, cfg.trainable)
    head.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(layerwise_groups(backbone, head, cfg))
    total = cfg.total_steps(len(train_y))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup))
    model: nn.Module = net
    if dist.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
    tracker = _Tracker(cfg, net, out, partial(_save_checkpoint, out, net, opt, schedule), notes)  # type: ignore[arg-type]

    history = History()
    if checkpoint:
        net.load_state_dict(checkpoint["net"])
        opt.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        history = History(**{k: list(v) for k, v in checkpoint["history"].items()})
        tracker.restore(checkpoint)
        log.info("resuming from epoch %d of %s", len(history.step), out / CHECKPOINT)
    resumed_from = len(history.step)

    size = int(data_config["input_size"][-1])
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    y = torch.as_tensor(train_y, dtype=torch.long)
    step = [history.step[-1] if history.step else 0]

    def forward(batch: torch.Tensor) -> torch.Tensor:
        pixels = augmented_batch(squares, batch.tolist(), step[0], cfg.seed, size, device)
        step[0] += 1
        with torch.autocast(**autocast):
            return model(pixels).float().cpu()

    def train_mode() -> None:
        net.train()
        freeze_bn_stats(net)

    def evaluate() -> np.ndarray:
        if watch.eval_labels is None or not len(watch.eval_labels) or not len(eval_pixels):
            return np.zeros((0, 0), dtype=np.float32)
        return evaluate_pixels(net, eval_pixels, device, cfg.bf16)

    loss_fn = nn.CrossEntropyLoss(weight=cfg.class_weights, label_smoothing=cfg.label_smoothing)
    history = run_steps(
        forward, y, Plan(total, cfg.batch_size, cfg.seed),
        loss_fn=loss_fn, optimizer=opt, schedule=schedule, train_mode=train_mode, evaluate=evaluate,
        watch=watch if dist.is_main() else replace(watch, board=None),
        history=history, on_epoch=tracker, shard=(dist.rank(), dist.world_size()),
    )  # fmt: skip
    kept = len(history.step) - 1
    if cfg.keep == "best" and tracker.best_state is not None:
        net.load_state_dict(tracker.best_state)
        kept = tracker.best_epoch
    eval_probs = evaluate_pixels(net, eval_pixels, device, cfg.bf16) if len(eval_pixels) else np.zeros((0, 0))
    net.eval().cpu()
    net.requires_grad_(False)
    return history, eval_probs, {
        "best_epoch": tracker.best_epoch,
        "best_top1": tracker.best_top1,
        "kept_epoch": kept,
        "resumed_from_epoch": resumed_from,
    }


def evaluate_pixels(
    net: Network, views: Sequence[np.ndarray], device: torch.device, bf16: bool, batch_size: int = 64
) -> np.ndarray:
    """TTA-averaged probabilities ``[M, classes]`` on uint8 views; each process scores its share."""
    net.eval()
    n = len(views[0])
    mine = dist.my_share(n)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(x.to(device)).float().cpu()

    probs = average_probabilities(forward, [v[mine] for v in views], batch_size=batch_size)
    return dist.gather_rows(probs, n)
