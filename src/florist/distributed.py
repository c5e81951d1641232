"""Multi-process runs under ``torchrun``: one process per core group or GPU.

``torchrun --nproc_per_node=N -m florist train ...`` starts N copies of the same
command with ``RANK``/``WORLD_SIZE`` set. Florist then

* shares feature extraction: each process computes every N-th image into the
  shared feature cache, and after a barrier all of them read the full set;
* trains ``--mode finetune`` with DistributedDataParallel: each process takes
  every N-th example of the same global batch, so N processes take the same
  steps as one (batch-norm statistics are frozen, so nothing else differs);
* writes the run folder from rank 0 only.

Without ``torchrun`` every function here is a cheap no-op, so the rest of the
code calls them unconditionally.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def _group() -> Any:
    """``torch.distributed`` once this process has joined a process group, else None.

    A group can only exist after ``torch.distributed`` was imported (by :func:`init`, or by
    a caller's own set-up), so looking in ``sys.modules`` first keeps this module, and the
    data and remote code that import it, free of torch's import time (3 s on a 2-core CPU).
    """
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Number of processes in this run (1 without torchrun)."""
    group = _group()
    return group.get_world_size() if group else 1


def rank() -> int:
    """This process's index (0 without torchrun)."""
    group = _group()
    return group.get_rank() if group else 0


def is_main() -> bool:
    """True in the process that writes files and logs."""
    return rank() == 0


def launch_rank() -> int:
    """The rank torchrun gave this process (0 without torchrun), valid before and after :func:`init`."""
    return int(os.environ.get("RANK", "0"))


def launched_by_torchrun() -> bool:
    """True when the environment asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA).

    Returns:
        True if this call joined it (and the caller should :func:`shutdown` it).
    """
    if not launched_by_torchrun():
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    group = _group()
    if group:
        group.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here."""
    if world_size() > 1:
        _group().barrier()


def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` run by rank 0 alone, its result (or its error, raised) handed to every process.

    For work whose result every process needs but which only one should do: checking
    the photos reads each of them, from remote storage too.
    """
    if world_size() == 1:
        return compute()
    box: list[Any] = [None]
    if is_main():
        try:
            box = [(compute(), None)]
        except Exception as e:  # every process fails with it, rather than waiting for a result
            box = [(None, e)]
    _group().broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def my_share(n: int) -> list[int]:
    """Indices ``0..n-1`` this process handles: every ``world_size``-th, from its rank."""
    return list(range(rank(), n, world_size()))


def gather_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """Reassemble an ``[n, ...]`` array from each process's :func:`my_share` rows."""
    if world_size() == 1:
        return rows
    parts: list[Any] = [None] * world_size()
    _group().all_gather_object(parts, rows)
    out = np.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    for r, part in enumerate(parts):
        out[r::world_size()] = part
    return out


def _tensor_device() -> Any:
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if _group().get_backend() == "nccl" else "cpu"


def sum_over_processes(value: int) -> int:
    """The sum of ``value`` over every process (``value`` itself in a single process)."""
    if world_size() == 1:
        return value
    import torch

    total = torch.tensor([value], dtype=torch.long, device=_tensor_device())
    _group().all_reduce(total)
    return int(total.item())


def broadcast_flag(value: bool) -> bool:
    """Rank 0's ``value`` in every process (so all of them stop at the same epoch)."""
    if world_size() == 1:
        return value
    import torch

    flag = torch.tensor([int(value)], device=_tensor_device())
    _group().broadcast(flag, src=0)
    return bool(flag.item())
