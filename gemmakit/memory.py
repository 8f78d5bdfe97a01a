"""How much memory this machine can still give, and a check before any large allocation.

Where it sits: at the bottom (rank 0, imports only `errors`); the KV cache (infer) and the training
batch (train) call `check_fits` before they allocate, so a request that cannot fit (a config.json
with `max_position_embeddings: 1e15`, `--max-new-tokens 100000000`, `data.seq_len=100000`) fails with
one line saying what it needs and what there is, instead of the kernel's OOM killer ending the process.

Key trade-off: the figure is Linux's `MemAvailable` (free plus reclaimable page cache), read at the
moment of the check; it is an estimate, so only requests above it are refused, never ones that merely
come close. Elsewhere (no /proc/meminfo) the physical-page count from `sysconf` stands in, and on a
CUDA device the free device memory.
"""

from __future__ import annotations

import os

from gemmakit.errors import UserError


class MemoryLimitError(UserError):
    """A requested allocation is larger than the memory the machine has available."""


def available_bytes(device: str = "cpu") -> int | None:
    """Bytes the device can still allocate now, or None where it cannot be told."""
    if str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    """A byte count for messages: '3.2 GiB', '512.0 MiB'."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(what: str, nbytes: int, device: str = "cpu") -> None:
    """Raise MemoryLimitError if `nbytes` for `what` exceed what `device` has available."""
    have = available_bytes(device)
    if have is not None and nbytes > have:
        raise MemoryLimitError(f"{what} needs {gib(nbytes)} but this machine has {gib(have)} available")
