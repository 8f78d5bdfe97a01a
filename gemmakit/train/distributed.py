"""torch.distributed plumbing: process-group setup from torchrun's environment, DDP / FSDP2 wrapping,
and the few collectives the loop needs (sums, a barrier, broadcasting one object).

Where it sits: `train.run` calls `setup()` and `wrap()`; `train.loop` calls the collectives, which are
no-ops in a single process, so one code path serves `python -m ...` and `torchrun --nproc-per-node N`.
Everything here is torch.distributed's own API: no home-made collective code.

Key trade-off: FSDP2 (`fully_shard`) shards each Block and then the root, so parameters, gradients
and AdamW state are split over ranks (~1/N of the 16 bytes per parameter each) at the price of an
all-gather per block in forward and backward; DDP keeps a full replica and only all-reduces
gradients, faster when the model fits. Backends: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as td
from torch import nn

MODES = ("none", "ddp", "fsdp")


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def setup(mode: str, device: str = "cpu") -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...); returns this rank's device.

    mode "none" with no torchrun environment is a single process. A world size > 1 with mode "none" is
    refused: every rank would train its own copy.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if mode not in MODES:
        raise ValueError(f"parallel.mode: expected one of {MODES}, got {mode!r}")
    if not launched or mode == "none":
        if launched and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError("parallel.mode is 'none' but torchrun started several processes; "
                             "set --set parallel.mode=ddp or fsdp")  # fmt: skip
        return torch.device(device)
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not is_distributed():
        td.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return dev


def teardown() -> None:
    if is_distributed():
        td.destroy_process_group()


def wrap(module: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around a loss module whose `.model` is a Gemma; unchanged for 'none' or one process."""
    if mode == "none" or not is_distributed():
        return module
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in module.model.blocks:
        fully_shard(block)
    fully_shard(module)
    return module


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a copy; float64 on CPU for exact token and loss totals)."""
    if not is_distributed():
        return t
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if td.get_backend() == "nccl"
        else torch.device("cpu")
    )
    out = t.detach().to(dev, torch.float64).clone()
    td.all_reduce(out, op=td.ReduceOp.SUM)
    return out.cpu()


def barrier() -> None:
    if is_distributed():
        td.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a path, a small dict)."""
    if not is_distributed():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]
