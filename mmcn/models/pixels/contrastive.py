"""Chinese-CLIP's contrastive objective: the features of every data-parallel worker gathered
into one global batch (:func:`gather_features`, its ``gather_features`` with
``gather_with_grad`` off or on) and the symmetric InfoNCE over it (:func:`contrastive_loss`).
Plain torch: no model code here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_features(image: torch.Tensor, text: torch.Tensor, with_grad: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's (batch, dim) features concatenated in rank order, as Chinese-CLIP's
    ``gather_features``: with ``with_grad`` through ``torch.distributed.nn.all_gather``
    (gradients reach every worker's features), otherwise a plain all-gather with this
    worker's slot replaced by its own features, so gradients flow to the local part only.
    One process (no process group, or world size 1): the features themselves."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image, text
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(image)), torch.cat(all_gather(text))
    world, rank = dist.get_world_size(), dist.get_rank()
    images, texts = [torch.zeros_like(image) for _ in range(world)], [torch.zeros_like(text) for _ in range(world)]
    dist.all_gather(images, image.contiguous())
    dist.all_gather(texts, text.contiguous())
    images[rank], texts[rank] = image, text
    return torch.cat(images), torch.cat(texts)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Symmetric InfoNCE over L2-normalised ``image`` and ``text`` features whose row i is a
    pair: ``(loss, logits_per_image)``, the mean of image->text and text->image cross-entropy
    of ``logit_scale.exp() * image @ text.T`` against the diagonal."""
    logits = logit_scale.exp() * image @ text.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2, logits
