"""Top-block tuning from cached activations (``--mode tune-top``).

A frozen backbone tops out near 91-92% on flowers whatever the head, so the
gains must come from adapting the top of the network. Fine-tuning the whole
network on a CPU means running every image through every layer at every step.
tune-top splits the backbone in two: the frozen *bottom* runs once per image
and view, its output (the activations entering the last ``N`` blocks, a small
7x7 map for EfficientNet-Lite) is cached in fp16, and only the *top* (those
``N`` blocks, the final 1x1 convolution and a new linear head) is trained, for
many epochs, on the cached activations.

Batch-norm layers in the top keep their ImageNet running statistics (eval mode)
while their scale and shift are trained: batches of 32 flower photos would give
noisy statistics, and the frozen bottom's outputs are distributed as in ImageNet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone
from ..errors import SettingError, escape, literal
from ..predict import average_probabilities
from .loop import History, Plan, Watch, run_steps, warmup_cosine


@dataclass
class SplitBackbone:
    """A backbone cut before its last ``blocks`` blocks.

    Attributes:
        bottom: frozen stem and first blocks (image -> activations).
        top: last blocks + final conv + pooling (activations -> pooled features);
            its modules are the backbone's own, so training ``top`` tunes the backbone.
        top_prefixes: state-dict name prefixes of the tuned modules.
        activation_shape: ``(C, H, W)`` of one image's cached activations.
    """

    bottom: nn.Module
    top: nn.Module
    top_prefixes: list[str]
    activation_shape: tuple[int, int, int]


class _Top(nn.Sequential):
    """Last blocks, final 1x1 conv + BN/act, global pooling, flattened."""


#: Modules a backbone needs for tune-top to cut it (timm's EfficientNet/MobileNet layout).
_SPLIT_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")


def can_split(backbone: Backbone) -> bool:
    """True if tune-top can cut this backbone into a frozen bottom and a trainable top."""
    return all(hasattr(backbone.model, name) for name in _SPLIT_PARTS)


def _named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's blocks in order, with their state-dict names (``blocks.5.1``)."""
    return [(f"blocks.{i}.{j}", block) for i, stage in enumerate(model.blocks) for j, block in enumerate(stage)]


def split_backbone(backbone: Backbone, blocks: int) -> SplitBackbone:
    """Cut ``backbone`` so the last ``blocks`` blocks (plus the final conv) can be trained.

    Raises:
        SettingError: unsupported architecture or an out-of-range ``blocks``.
    """
    model = backbone.model
    if not can_split(backbone):
        raise SettingError(
            "{mode:tune-top} supports EfficientNet/MobileNet-style backbones (efficientnet_lite0/1/2, "
            f"timm efficientnet_*, mobilenetv2/3), not {escape(type(model).__name__)}; use {{mode:head}}"
        )
    named = _named_blocks(model)
    if not 1 <= blocks <= len(named):
        raise SettingError(
            f"{{blocks}} must be between 1 and {len(named)} for {escape(backbone.spec.name)}, got {literal(blocks)}"
        )
    cut = len(named) - blocks
    bottom = nn.Sequential(model.conv_stem, model.bn1, *(b for _, b in named[:cut])).eval()
    top = _Top(*(b for _, b in named[cut:]), model.conv_head, model.bn2, model.global_pool)
    with torch.inference_mode():
        probe = torch.zeros(1, *backbone.data_config["input_size"])
        shape = tuple(bottom(probe).shape[1:])
    prefixes = [f"{name}." for name, _ in named[cut:]] + ["conv_head.", "bn2."]
    return SplitBackbone(bottom, top, prefixes, shape)  # type: ignore[arg-type]


def tuned_state(model: nn.Module, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors of the tuned modules, by their names in the full backbone."""
    return {k: v for k, v in model.state_dict().items() if any(k.startswith(p) for p in prefixes)}


def freeze_bn_stats(module: nn.Module) -> None:
    """Keep batch-norm running statistics fixed while the rest of ``module`` trains."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@dataclass
class TopConfig:
    """Hyperparameters of top-block training (filled from :class:`florist.training.TrainConfig`)."""

    epochs: int
    steps: int | None  # overrides epochs when set
    batch_size: int
    lr_head: float
    lr_top: float
    weight_decay: float
    label_smoothing: float
    warmup: float  # fraction of steps spent warming up
    seed: int
    class_weights: torch.Tensor | None = None
    bf16: bool = False  # autocast the forward pass to bfloat16

    def total_steps(self, n_examples: int) -> int:
        """``steps`` if set, else ``epochs`` passes over ``n_examples`` in batches."""
        return self.steps or self.epochs * math.ceil(n_examples / self.batch_size)


def _top_forward(top: nn.Module, head: nn.Module):
    """Cached activations (any float dtype) -> logits through the tuned top and the head."""
    return lambda x: head(top(x.float().contiguous(memory_format=torch.channels_last)))


def evaluate_top(top: nn.Module, head: nn.Module, views: Sequence[np.ndarray]) -> np.ndarray:
    """Probabilities averaged over test-time views of cached activations."""
    top.eval()
    head.eval()
    return average_probabilities(_top_forward(top, head), views)


def fit_top(
    split: SplitBackbone,
    head: nn.Module,
    train_acts: np.ndarray,
    train_y: np.ndarray,
    cfg: TopConfig,
    *,
    eval_acts: Sequence[np.ndarray] = (),
    watch: Watch | None = None,
) -> History:
    """Train ``split.top`` and ``head`` together on cached activations, in place.

    AdamW with a smaller learning rate for the pretrained blocks than for the new
    head, linear warm-up then cosine decay, label smoothing, frozen BN statistics.
    Deterministic for a given ``cfg.seed``.

    Returns:
        Per-epoch curves.
    """
    top = split.top
    for p in top.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    y = torch.as_tensor(train_y, dtype=torch.long)
    opt = torch.optim.AdamW(
        [{"params": top.parameters(), "lr": cfg.lr_top}, {"params": head.parameters(), "lr": cfg.lr_head}],
        weight_decay=cfg.weight_decay,
    )
    total = cfg.total_steps(len(y))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup))
    loss_fn = nn.CrossEntropyLoss(weight=cfg.class_weights, label_smoothing=cfg.label_smoothing)

    logits_of = _top_forward(top, head)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            return logits_of(torch.as_tensor(train_acts[batch.numpy()]))

    def train_mode() -> None:
        top.train()
        head.train()
        freeze_bn_stats(top)

    def evaluate() -> np.ndarray:
        return evaluate_top(top, head, eval_acts)

    plan = Plan(total, cfg.batch_size, cfg.seed)
    history = run_steps(
        forward, y, plan,
        loss_fn=loss_fn, optimizer=opt, schedule=schedule, train_mode=train_mode, evaluate=evaluate, watch=watch,
    )  # fmt: skip
    top.eval()
    head.eval()
    for p in top.parameters():
        p.requires_grad_(False)
    return history
