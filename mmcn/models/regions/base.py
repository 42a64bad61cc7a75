"""What the Oscar-style models share: a BERT over text tokens followed by region features
(2054 → hidden, linear + LayerNorm, no position embeddings), run under an explicit
attention mask. Built on transformers' BERT so models save and load with
``save_pretrained`` / ``from_pretrained``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel


class VLConfig(BertConfig):
    """BERT's config plus the region-feature and layout settings."""

    model_type = "mmcn_vl"

    def __init__(self, img_feature_dim: int = 2054, max_text_len: int = 32, max_tag_len: int = 32,
                 max_regions: int = 50, add_od_labels: bool = True, use_img_layernorm: bool = True,
                 img_layer_norm_eps: float | None = None, add_pooler: bool = False, oscar: dict | None = None,
                 **kwargs):
        kwargs.setdefault("attn_implementation", "sdpa")
        super().__init__(**kwargs)
        self.img_feature_dim = img_feature_dim
        self.max_text_len = max_text_len      # text segment incl. [CLS] and [SEP]
        self.max_tag_len = max_tag_len        # tag segment incl. its [SEP]
        self.max_regions = max_regions
        self.add_od_labels = add_od_labels
        self.use_img_layernorm = use_img_layernorm          # Oscar's English checkpoints have none
        self.img_layer_norm_eps = img_layer_norm_eps if img_layer_norm_eps is not None else self.layer_norm_eps
        self.add_pooler = add_pooler          # BERT's pooler (tanh(dense([CLS]))): Oscar checkpoints have one
        self.oscar = oscar                    # an imported Oscar folder's own config + training args (for export)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool "query may attend to key" -> (B, 1, L, L) additive mask for BERT's layers."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device) \
        .masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def bidirectional(key_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) valid-key mask -> (B, L, L): every position sees every valid position."""
    return key_mask[:, None, :].expand(-1, key_mask.shape[1], -1)


class VLPreTrainedModel(BertPreTrainedModel):
    """A BERT encoder whose sequence is ``text tokens ⊕ regions``."""

    config_class = VLConfig

    def __init__(self, config: VLConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=config.add_pooler)
        self.img_embedding = nn.Linear(config.img_feature_dim, config.hidden_size)
        self.img_norm = nn.LayerNorm(config.hidden_size, eps=config.img_layer_norm_eps) if config.use_img_layernorm \
            else nn.Identity()
        self.img_dropout = nn.Dropout(config.hidden_dropout_prob)

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, img_feats: torch.Tensor | None,
               allowed: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T + R, H) of text tokens (B, T) then regions (B, R, 2054) under ``allowed``;
        text positions 0..T-1 unless ``position_ids`` (B, T) are given."""
        hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        if img_feats is not None and img_feats.shape[1]:
            regions = self.img_dropout(self.img_norm(self.img_embedding(img_feats.to(hidden.dtype))))
            hidden = torch.cat([hidden, regions], dim=1)
        return self.bert.encoder(hidden, attention_mask=additive_mask(allowed, hidden.dtype)).last_hidden_state

    def freeze(self, embedding: bool = False, visual: bool = False) -> None:
        """Freeze the word embeddings and/or the region projection (Oscar's fine-tuning options)."""
        self.bert.embeddings.word_embeddings.weight.requires_grad_(not embedding)
        for p in (*self.img_embedding.parameters(), *self.img_norm.parameters()):
            p.requires_grad_(not visual)


class MaskedTokenHeadModel(VLPreTrainedModel):
    """A model with BERT's masked-token head as ``self.cls.predictions`` (captioning,
    pretraining): its decoder tied to the word embeddings, its bias to the head's bias."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                          "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def get_output_embeddings(self):
        return self.cls.predictions.decoder


def load_pretrained_bert(model: VLPreTrainedModel, path: str) -> None:
    """Copy a local pretrained BERT's weights (e.g. a downloaded Mengzi-BERT) into ``model``:
    the encoder always, and the masked-token head too when the model has one (a caption
    model: BERT's MLM head, as Oscar starts from it). A weight the checkpoint lacks, or of
    another shape, is an error naming them; weights the model has no place for (BERT's
    next-sentence head, its pooler) are left out and logged."""
    import logging

    from transformers import BertForMaskedLM

    loader = BertForMaskedLM if hasattr(model, "cls") else BertModel
    kwargs = {} if hasattr(model, "cls") else {"add_pooling_layer": model.config.add_pooler}
    source, info = loader.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    mismatched = [str(k) for k in info.get("mismatched_keys", [])]
    if missing or mismatched:
        what = "the encoder" + (" and the masked-token head (cls.predictions)" if hasattr(model, "cls") else "")
        raise ValueError(f"{path}: a pretrained BERT must fill {what}; missing {missing[:8]}, other shapes "
                         f"{mismatched[:8]}. Use a checkpoint saved with its MLM head (BertForMaskedLM / "
                         "BertForPreTraining), or train from scratch (init empty)")
    if info.get("unexpected_keys"):
        logging.getLogger(__name__).info("%s: left out %s (no place in a %s model)", path,
                                         sorted({k.rsplit(".", 1)[0] for k in info["unexpected_keys"]}),
                                         type(model).__name__)
    bert = source.bert if hasattr(source, "bert") else source
    missing, unexpected = model.bert.load_state_dict(bert.state_dict(), strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if hasattr(model, "cls"):
        model.cls.load_state_dict(source.cls.state_dict())
