"""Oscar+ pretraining (microsoft/Oscar's ``run_oscarplus_pretrain.py``, ``BertImgForPreTraining``):
``[CLS] a [SEP] b [SEP]`` + regions in one BERT under full attention over the valid
positions; a masked-token head (tied to the word embeddings) over the text and a
``num_contrast_classes``-way head on the pooled [CLS] that tells a matched triple (0) from one
whose text b (1) or text a (C - 1) belongs to another image. Loss: the two cross entropies,
summed with equal weights (each a mean: over the masked tokens, over the batch).

a is a caption, b the image's tag text; the polluted pairs and the masking are drawn by
:class:`mmcn.models.regions.inputs.PretrainCollator` with this config's settings. Weight names follow
Oscar's (``cls.predictions.*``, ``cls.seq_relationship.*``, ``bert.pooler.*``), so a pretrained
model exports to and imports from Oscar's layout (:mod:`mmcn.models.regions.oscar`), and its encoder
starts the caption and retrieval fine-tunes (``{task}.model.init``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import nn
from transformers.models.bert.modeling_bert import BertLMPredictionHead

from mmcn.models.regions.base import MaskedTokenHeadModel, VLConfig, bidirectional

TEXTB_SAMPLE_MODES = (0, 1)   # 0: a polluted b is any text of another pair (a or b); 1: only a tag text


def contrast_classes(texta_false_prob: float) -> int:
    """Oscar's ``num_contrast_classes`` for ``use_b``: 3 when 0 < texta_false_prob < 0.5 (matched,
    wrong b, wrong a), else 2 (matched, polluted)."""
    return 3 if 0 < texta_false_prob < 0.5 else 2


class PretrainConfig(VLConfig):
    """``max_text_len`` is the whole text sequence ``[CLS] a [SEP] b [SEP]`` (Oscar's
    ``max_seq_length``, 35 in Mengzi-Oscar's run); ``max_tag_len`` is unused (0)."""

    model_type = "mmcn_pretrain"

    def __init__(self, texta_false_prob: float = 0.25, textb_sample_mode: int = 1,
                 mask_loss_for_unmatched: bool = True, num_contrast_classes: int | None = None, **kwargs):
        kwargs.setdefault("add_pooler", True)
        kwargs.setdefault("max_text_len", 35)
        kwargs.setdefault("max_tag_len", 0)
        super().__init__(**kwargs)
        if not 0.0 <= texta_false_prob <= 1.0:
            raise ValueError(f"texta_false_prob: must be in [0, 1], got {texta_false_prob!r}")
        if textb_sample_mode not in TEXTB_SAMPLE_MODES:
            raise ValueError(f"textb_sample_mode: must be 0 (any text of another pair) or 1 (another image's tags); "
                             f"Oscar's 2 samples QA answers, which mmcn's data has none of; got {textb_sample_mode!r}")
        if not self.add_pooler:
            raise ValueError("add_pooler: the contrastive head reads BERT's pooled [CLS]; it must be true")
        if self.max_text_len < 5:
            raise ValueError(f"max_text_len: [CLS] a [SEP] b [SEP] needs at least 5 positions, got {self.max_text_len}")
        self.texta_false_prob = texta_false_prob
        self.textb_sample_mode = textb_sample_mode
        self.mask_loss_for_unmatched = mask_loss_for_unmatched  # false: no masked tokens in a polluted b
        self.num_contrast_classes = num_contrast_classes or contrast_classes(texta_false_prob)


class PretrainHeads(nn.Module):
    """Oscar's ``BertPreTrainingHeads`` with ``num_contrast_classes`` outputs."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, config.num_contrast_classes)


@dataclass
class PretrainOutput:
    loss: torch.Tensor | None
    mlm_loss: torch.Tensor
    contrast_loss: torch.Tensor | None
    mlm_correct: torch.Tensor       # (n masked tokens,) bool
    contrast_logits: torch.Tensor   # (B, C)


class PretrainModel(MaskedTokenHeadModel):
    config_class = PretrainConfig

    def __init__(self, config: PretrainConfig):
        super().__init__(config)
        self.cls = PretrainHeads(config)
        self.post_init()

    def forward(self, input_ids, token_type_ids, text_mask, img_feats, img_mask, lm_labels=None,
                contrast_labels=None, **_) -> PretrainOutput:
        """``input_ids``/``token_type_ids``/``text_mask`` (B, T); ``lm_labels`` (B, T), -100 where
        nothing is predicted; ``contrast_labels`` (B,) in 0..C-1."""
        hidden = self.encode(input_ids, token_type_ids, img_feats, bidirectional(torch.cat([text_mask, img_mask], 1)))
        contrast_logits = self.cls.seq_relationship(self.bert.pooler(hidden)).float()
        where = lm_labels != -100 if lm_labels is not None else torch.zeros_like(text_mask)
        logits = self.cls.predictions(hidden[:, :input_ids.shape[1]][where]).float()
        target = lm_labels[where] if lm_labels is not None else torch.zeros(0, dtype=torch.long)
        mlm = nnf.cross_entropy(logits, target) if len(target) else logits.sum() * 0.0
        contrast = nnf.cross_entropy(contrast_logits, contrast_labels) if contrast_labels is not None else None
        loss = mlm + contrast if contrast is not None else None
        return PretrainOutput(loss, mlm, contrast, logits.argmax(-1) == target, contrast_logits)
