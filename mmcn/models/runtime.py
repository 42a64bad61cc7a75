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


@torch.no_grad()
def token_metrics(model, dataset, collate, device: torch.device, batch_size: int = 64) -> dict:
    """A caption model's loss and accuracy over the tokens it predicts on ``dataset``
    (``out.correct``: one flag per predicted token, ``out.loss`` their mean loss):
    ``valid_loss`` and ``valid_token_accuracy`` (percent)."""
    from torch.utils.data import DataLoader

    losses, correct, total = [], 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        out = model(**{k: v.to(device) for k, v in batch.items()})
        losses.append(out.loss.item() * len(out.correct))
        correct, total = correct + int(out.correct.sum()), total + len(out.correct)
    return {"valid_loss": round(sum(losses) / max(total, 1), 5),
            "valid_token_accuracy": round(100.0 * correct / max(total, 1), 3)}
