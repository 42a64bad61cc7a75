"""Chinese-CLIP on pixels (task ``clip``): transformers' ``ChineseCLIPModel`` (a ViT and a
Chinese BERT/RoBERTa, each projected to a shared embedding), trained as Chinese-CLIP
trains it: a symmetric InfoNCE loss over the features of the whole global batch
(:mod:`mmcn.models.pixels.contrastive`), a learnable logit scale kept at most
100 (log value clamped to [0, ln 100] before every training forward, as Chinese-CLIP clamps
it after every step), optionally with the vision tower frozen.

A model folder is Hugging Face's layout: ``ChineseCLIPModel.save_pretrained`` + the
tokenizer (BertTokenizerFast: vocab.txt ...) + ``ChineseCLIPImageProcessor``
(preprocessor_config.json); :func:`load_clip` reads it, and a downloaded
``OFA-Sys/chinese-clip-vit-base-patch16`` folder is one. Images are resized to the
processor's square size with bicubic resampling and normalised with OpenAI CLIP's mean/std,
no crop (Chinese-CLIP's own transform). From scratch (the demo), :func:`build_clip` makes a
config of ``CLIP_SIZES`` and the char tokenizer of :mod:`mmcn.models.tokenizer`. A folder
holding one of Chinese-CLIP's own ``.pt`` checkpoints and its vocab.txt is read too, converted
on load (:mod:`mmcn.models.pixels.cn_clip`); :func:`convert_cn_clip` writes it as a Hugging
Face folder once (``mmcn convert-clip``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel
from transformers.utils import ModelOutput

from mmcn.models.pixels import cn_clip
from mmcn.models.pixels.contrastive import contrastive_loss, gather_features

# name -> ((text hidden, layers, heads, intermediate), (vision hidden, layers, heads, intermediate), patch)
CLIP_SIZES = {
    "tiny": ((64, 2, 2, 128), (64, 2, 2, 128), 16),           # tests and the CPU demo (no dropout)
    "small": ((128, 3, 4, 512), (128, 4, 4, 512), 16),
    "medium": ((256, 4, 4, 1024), (256, 6, 4, 1024), 16),
    "base": ((768, 12, 12, 3072), (768, 12, 12, 3072), 16),   # Chinese-CLIP ViT-B/16 + RoBERTa-wwm-base
}
MAX_LOGIT_SCALE = math.log(100.0)   # CLIP: the temperature's inverse at most 100
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ClipSettings:
    """``clip.model`` besides ``size`` and ``init`` (with ``init``, ``image_size`` and
    ``embed_dim`` come from the pretrained folder and these are ignored)."""

    model_type = "chinese_clip"
    image_size: int = 224          # square input side (pixels)
    embed_dim: int = 512           # shared embedding (projection) size
    max_text_len: int = 52         # tokens incl. [CLS]/[SEP] (Chinese-CLIP's context_length)
    gather_with_grad: bool = False  # Chinese-CLIP's --gather-with-grad: gradients through the other workers' features

    def __post_init__(self) -> None:
        for name in ("image_size", "embed_dim", "max_text_len"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        if self.image_size % CLIP_SIZES["tiny"][2]:
            raise ValueError(f"image_size: must be a multiple of the ViT patch ({CLIP_SIZES['tiny'][2]} px), "
                             f"got {self.image_size}")
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len: must be >= 3 ([CLS] a token [SEP]), got {self.max_text_len}")


@dataclass
class ClipOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


class ClipModel(ChineseCLIPModel):
    """``ChineseCLIPModel`` whose forward is Chinese-CLIP's training step: normalised features
    of a batch of pairs, gathered over the workers, InfoNCE over the global batch. Saved
    weights and config are ``ChineseCLIPModel``'s (``ChineseCLIPModel.from_pretrained`` reads them)."""

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings of a batch."""
        image = self.get_image_features(pixel_values=pixel_values).pooler_output
        text = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                cached: tuple[list[torch.Tensor], list[torch.Tensor], int] | None = None, **_) -> ClipOutput:
        """The contrastive loss of this batch over all workers' batches. ``cached`` (image
        features, text features, slot): gradient accumulation as Chinese-CLIP's ``accum_freq``,
        this batch's features (with gradient) replace ``slot`` among the micro-batches' features
        computed without gradient, so the contrastive batch is all of them."""
        if self.training:
            with torch.no_grad():
                self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        image, text = self.features(input_ids, attention_mask, pixel_values)
        if cached is not None:
            images, texts, slot = cached
            image = torch.cat([*images[:slot], image, *images[slot + 1:]])
            text = torch.cat([*texts[:slot], text, *texts[slot + 1:]])
        image, text = gather_features(image, text, getattr(self.config, "gather_with_grad", False))
        loss, logits = contrastive_loss(image, text, self.logit_scale)
        return ClipOutput(loss=loss, logits_per_image=logits, image_embeds=image, text_embeds=text)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """``save_pretrained``, the config naming ``ChineseCLIPModel`` (what loads it without mmcn)."""
        import json

        super().save_pretrained(save_directory, **kwargs)
        config = Path(save_directory) / "config.json"
        data = json.loads(config.read_text(encoding="utf-8"))
        data["architectures"] = ["ChineseCLIPModel"]
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def freeze(self, embedding: bool = False, visual: bool = False) -> None:
        """``visual``: the vision tower's weights fixed (Chinese-CLIP's --freeze-vision; its
        projection still trains); ``embedding``: the text word embeddings fixed."""
        for p in self.vision_model.parameters():
            p.requires_grad_(not visual)
        self.text_model.embeddings.word_embeddings.weight.requires_grad_(not embedding)


def accumulated_step(model, batches: list[dict], autocast) -> torch.Tensor:
    """One optimizer step's gradients over ``batches`` (``grad_accum`` micro-batches) as one
    contrastive batch, Chinese-CLIP's ``accum_freq``: the features of all of them without
    gradient first, then per micro-batch its own with gradient in their place and a
    backward of the whole loss (so the weights get the gradient of one big batch, and the
    logit scale, in every pass, ``grad_accum`` times it, as in Chinese-CLIP's loop).
    Returns the loss (of the last pass)."""
    if len(batches) == 1:  # no accumulation: the batch is the contrastive batch
        with autocast:
            loss = model(**batches[0]).loss
        loss.backward()
        return loss.detach()
    core = model.module if hasattr(model, "module") else model
    with torch.no_grad(), autocast:
        feats = [core.features(b["input_ids"], b["attention_mask"], b["pixel_values"]) for b in batches]
    images, texts = [f[0] for f in feats], [f[1] for f in feats]
    loss = None
    for slot, batch in enumerate(batches):
        with autocast:
            loss = model(**batch, cached=(images, texts, slot)).loss
        loss.backward()
    return loss.detach()


# --------------------------------------------------------------------------- building and loading

def image_processor(image_size: int) -> ChineseCLIPImageProcessor:
    """Chinese-CLIP's transform: a bicubic resize to ``image_size`` square, no crop, OpenAI CLIP's mean/std."""
    return ChineseCLIPImageProcessor(do_resize=True, size={"height": image_size, "width": image_size},
                                     resample=3, do_center_crop=False,
                                     crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                                     do_normalize=True,
                                     image_mean=OPENAI_MEAN, image_std=OPENAI_STD, do_convert_rgb=True)


def build_clip(vocab_size: int, size: str = "tiny", init: str = "", image_size: int = 224, embed_dim: int = 512,
               max_text_len: int = 52, gather_with_grad: bool = False) -> ClipModel:
    """A new model of ``size`` (``CLIP_SIZES``) for a tokenizer of ``vocab_size``, or the
    pretrained ``init`` folder's (its shape and weights)."""
    settings = {"max_text_len": max_text_len, "gather_with_grad": gather_with_grad}
    if init:
        checkpoint = cn_clip.find_checkpoint(init)
        if checkpoint is not None:  # Chinese-CLIP's own .pt (+ vocab.txt): converted on load
            return cn_clip.load(checkpoint, model_class=ClipModel, **settings)[0]
        _check_dir(init)
        model = ClipModel.from_pretrained(init, local_files_only=True)
        for k, v in settings.items():
            setattr(model.config, k, v)
        return model
    if size not in CLIP_SIZES:
        raise ValueError(f"unknown CLIP size {size!r}: use one of {', '.join(CLIP_SIZES)}")
    (th, tl, tn, ti), (vh, vl, vn, vi), patch = CLIP_SIZES[size]
    config = ChineseCLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": th, "num_hidden_layers": tl, "num_attention_heads": tn,
                     "intermediate_size": ti, "max_position_embeddings": max(512, max_text_len),
                     **({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if size == "tiny" else {})},
        vision_config={"hidden_size": vh, "num_hidden_layers": vl, "num_attention_heads": vn, "intermediate_size": vi,
                       "image_size": image_size, "patch_size": patch, "projection_dim": embed_dim},
        projection_dim=embed_dim, **settings)
    return ClipModel(config)


def _check_dir(path: Path | str) -> None:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: a Chinese-CLIP model folder is a Hugging Face folder "
                                "(config.json, weights, vocab.txt, preprocessor_config.json), e.g. a downloaded "
                                "OFA-Sys/chinese-clip-vit-base-patch16 or models/clip, or a folder holding one "
                                "Chinese-CLIP .pt checkpoint (clip_cn_vit-b-16.pt ...) and its vocab.txt")
    import json

    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type != "chinese_clip":
        raise ValueError(f"{config}: model_type {model_type!r} is not a Chinese-CLIP model (chinese_clip)")


def processor_of(path: Path | str, image_size: int | None = None) -> ChineseCLIPImageProcessor:
    """The folder's image processor, or Chinese-CLIP's transform at the model's input size
    when it has none (a Chinese-CLIP folder without preprocessor_config.json)."""
    if (Path(path) / "preprocessor_config.json").is_file():
        return ChineseCLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
    if image_size is None:
        checkpoint = cn_clip.find_checkpoint(path)
        config = cn_clip.infer_config(cn_clip.read_checkpoint(checkpoint), checkpoint) if checkpoint is not None \
            else ChineseCLIPConfig.from_pretrained(str(path), local_files_only=True)
        image_size = config.vision_config.image_size
    return image_processor(image_size)


def load_clip(path: Path | str, device: str | torch.device = "cpu"):
    """``(model, tokenizer, image_processor)`` of a saved Chinese-CLIP folder (mmcn's
    ``models/clip`` or a downloaded Hugging Face one, or a folder holding a Chinese-CLIP ``.pt``
    checkpoint and its vocab.txt: converted on load), the model in eval mode on ``device``."""
    from mmcn.models.tokenizer import load_tokenizer

    checkpoint = cn_clip.find_checkpoint(path)
    if checkpoint is not None:
        model, tokenizer = cn_clip.load(checkpoint, model_class=ClipModel)
        return model.to(device).eval(), tokenizer, image_processor(model.config.vision_config.image_size)
    _check_dir(path)
    model = ClipModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    return model, load_tokenizer(path), processor_of(path, model.config.vision_config.image_size)


def convert_cn_clip(checkpoint: Path | str, out: Path | str, vocab: Path | str | None = None) -> ClipModel:
    """Write a Chinese-CLIP ``.pt`` checkpoint (+ its ``vocab``, default the vocab.txt next to
    it) as a Hugging Face folder ``out``: the model (:mod:`mmcn.models.pixels.cn_clip`), its
    tokenizer (and vocab.txt) and Chinese-CLIP's image processor at the checkpoint's input size, what
    ``clip.model.init``, :func:`load_clip` and ``ChineseCLIPModel.from_pretrained`` read."""
    import shutil

    model, tokenizer = cn_clip.load(checkpoint, vocab, model_class=ClipModel)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # vocab.txt as Hugging Face's own Chinese-CLIP folders have it
    shutil.copyfile(cn_clip.vocab_path(checkpoint, vocab), Path(out) / cn_clip.VOCAB_FILE)
    image_processor(model.config.vision_config.image_size).save_pretrained(str(out))
    return model


def decode_images(images: Sequence[bytes], names: Sequence[object] | None = None) -> list[torch.Tensor]:
    """Image bytes -> uint8 RGB (3, H, W) tensors (:func:`mmcn.data.image.decode_rgb`); an
    image that does not decode is an error naming it (``names[i]``, else its position)."""
    from mmcn.data.image import ImageError, decode_rgb

    out = []
    for i, data in enumerate(images):
        try:
            out.append(decode_rgb(data))
        except ImageError as e:
            raise ValueError(f"image {names[i] if names is not None else i}: {e}") from None
    return out


def pixel_values(processor, images: Sequence[bytes], names: Sequence[object] | None = None) -> torch.Tensor:
    """(N, 3, S, S) model inputs of image bytes."""
    return processor(images=decode_images(images, names), return_tensors="pt")["pixel_values"]


@torch.no_grad()
def image_embeddings(model, processor, images: Sequence[bytes], batch_size: int = 64,
                     normalize: bool = False) -> torch.Tensor:
    """(N, embed_dim) float32 CPU image embeddings of image bytes: the projected ViT output,
    as CLIP's ``encode_image`` (what ClipCap maps to a prefix), unit length with ``normalize``."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = pixel_values(processor, images[start:start + batch_size]).to(device)
        out.append(model.get_image_features(pixel_values=pixels).pooler_output.float().cpu())
    emb = torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)
    return F.normalize(emb, dim=-1) if normalize else emb


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 64, normalize: bool = False,
                    max_length: int | None = None) -> torch.Tensor:
    """(N, embed_dim) float32 CPU text embeddings (the projected [CLS] state)."""
    device = next(model.parameters()).device
    max_length = max_length or getattr(model.config, "max_text_len", 52)
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append(model.get_text_features(input_ids=enc["input_ids"].to(device),
                                           attention_mask=enc["attention_mask"].to(device)).pooler_output.float().cpu())
    emb = torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)
    return F.normalize(emb, dim=-1) if normalize else emb


class ClipCollator:
    """(image bytes, text) pairs -> model inputs: decoded and processed pixels, tokens padded
    to the batch's longest (at most ``max_text_len``)."""

    def __init__(self, tokenizer, processor, max_text_len: int = 52):
        self.tokenizer, self.processor, self.max_text_len = tokenizer, processor, max_text_len

    def __call__(self, items: list[dict]) -> dict:
        enc = self.tokenizer([it["text"] for it in items], padding=True, truncation=True,
                             max_length=self.max_text_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "pixel_values": pixel_values(self.processor, [it["image"] for it in items],
                                             [f"{it['image_id']}" for it in items])}


class ClipEncoder:
    """Unit-length embeddings for ranking (the evaluation actors' and ``mmcn search``'s
    interface, as :class:`mmcn.models.regions.inference.RetrievalEncoder`): ``texts(strings)`` and
    ``images(items with "image" bytes)`` -> float32 arrays."""

    dual_encoder = True

    def __init__(self, model, tokenizer, processor):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.tok, self.device = tokenizer, next(model.parameters()).device

    @classmethod
    def from_dir(cls, model_dir: Path | str, device: str | torch.device = "cpu") -> "ClipEncoder":
        return cls(*load_clip(model_dir, device))

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return text_embeddings(self.model, self.tokenizer, texts, normalize=True).numpy()

    def images(self, items: list[dict]) -> np.ndarray:
        return image_embeddings(self.model, self.processor, [it["image"] for it in items], normalize=True).numpy()


@torch.no_grad()
def validate(model, tokenizer, processor, store_path: Path) -> dict:
    """Recall on the valid split (t2i / i2t R@1, mean recall), every text against every image."""
    from mmcn.models.pixels.datasets import ClipDataset
    from mmcn.eval.retrieval_metrics import retrieval_scores

    data = ClipDataset(store_path)
    encoder = ClipEncoder(model, tokenizer, processor)
    texts = encoder.texts([data.text(t)["text"] for t in range(data.num_texts)])
    images = np.concatenate([encoder.images([data.image(i) for i in range(s, min(s + 64, data.num_images))])
                             for s in range(0, data.num_images, 64)])
    r = retrieval_scores(texts @ images.T, data.store.gold_positions()[0], ks=(1, 5))
    return {"valid_t2i_r1": round(r["t2i"]["r1"], 3), "valid_i2t_r1": round(r["i2t"]["r1"], 3),
            "valid_mean_recall": round(r["mean_recall"], 3)}
