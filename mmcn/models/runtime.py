"""Where and how models run: the device to use, torch's CPU thread count (set and restored)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def autocast(device: torch.device):
    """bf16 autocast on GPUs, a no-op on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads, then give the caller back its own count.

    ``torch.set_num_threads`` is process-global: a training loop that runs in the caller's
    process (Ray Train's in-process mode, tests) would otherwise leave its count behind and
    change the numerics of everything that runs after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
