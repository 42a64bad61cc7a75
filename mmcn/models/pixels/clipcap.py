"""ClipCap captioning (Mokady et al., 2021; ClipCap-Chinese): a frozen Chinese-CLIP's image
embedding -> a mapping network -> prefix embeddings that a GPT-2 continues into the caption.

* ``mapping: mlp`` (ClipCap's MLP): ``Linear(clip_dim, gpt_dim * prefix_len // 2)``, ``Tanh``,
  ``Linear(.., gpt_dim * prefix_len)``, reshaped to ``prefix_len`` prefix embeddings.
* ``mapping: transformer`` (ClipCap's TransformerMapper, ClipCap-Chinese's BertMapper): the
  CLIP embedding projected to ``prefix_len`` tokens, ``constant_len`` learned constants after
  them, a pre-norm transformer encoder (8 heads, MLP ratio 2, no dropout) over both; its
  outputs at the constants' positions are the prefix: ``constant_len`` embeddings (ClipCap
  names the two lengths clip_length and prefix_length; ClipCap-Chinese sets both to 10).
* GPT-2: transformers' ``GPT2LMHeadModel``, from a local Chinese GPT-2 (e.g. a downloaded
  uer/gpt2-chinese-cluecorpussmall, whose tokenizer is BERT's: [CLS] ... [SEP]) or a small
  one from scratch; frozen (``finetune_gpt2`` false: only the mapper learns and GPT-2 stays in
  eval mode, as ClipCap's ClipCaptionPrefix) or fine-tuned with it.
* Sequence (ClipCap-Chinese): ``prefix ⊕ caption tokens ⊕ [SEP]``, no [CLS]; the loss is on
  the caption tokens and the closing [SEP] only (never on prefix positions).
* Decoding (:class:`ClipCapDecoding`): transformers' ``generate`` on the prefix embeddings
  (``inputs_embeds``): beam search (``num_beams`` 1: greedy), top-k or top-p sampling, each
  image sampled from its own generator state seeded with ``seed`` (so a caption does not
  depend on the batch it was in).

Saved layout (:meth:`ClipCapModel.save_pretrained`): ``config.json`` (model_type
``mmcn_clipcap``: the mapping, and the CLIP model it was trained on), ``mapper.safetensors``,
``gpt2/`` (``GPT2LMHeadModel.save_pretrained``), ``clip/`` (a copy of that CLIP model, so the
folder alone captions raw images); the training loop adds the tokenizer at the top.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as nnf
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig

MAPPINGS = ("mlp", "transformer")
DECODINGS = ("beam", "top_k", "top_p")
MAPPER_HEADS = 8          # ClipCap's TransformerMapper
SCRATCH_POSITIONS = 256   # a GPT-2 from scratch: prefix + caption positions it can take
MAPPER_FILE = "mapper.safetensors"


class ClipCapConfig(PretrainedConfig):
    """The ``clipcap.model`` settings (``size`` and ``init`` are the stage's own) plus what
    the model was built with (``clip_dim``, ``clip_source``, ``clip_name``)."""

    model_type = "mmcn_clipcap"

    def __init__(self, clip: str = "models/clip", mapping: str = "mlp", prefix_len: int = 10, constant_len: int = 10,
                 num_layers: int = 8, finetune_gpt2: bool = True, max_text_len: int = 40, clip_dim: int = 0,
                 clip_source: str = "", clip_name: str = "", **kwargs):
        super().__init__(**kwargs)
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping: must be one of {', '.join(MAPPINGS)}, got {mapping!r}")
        for name, value in (("prefix_len", prefix_len), ("constant_len", constant_len), ("num_layers", num_layers),
                            ("max_text_len", max_text_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if max_text_len < 2:
            raise ValueError(f"max_text_len: must be >= 2 (a caption token and [SEP]), got {max_text_len!r}")
        if not isinstance(clip, str) or not clip:
            raise ValueError(f"clip: must name the CLIP model folder (models/clip or a downloaded Chinese-CLIP), "
                             f"got {clip!r}")
        self.clip = clip                      # the CLIP model folder (inside a saved folder: "clip")
        self.mapping = mapping
        self.prefix_len = prefix_len          # mlp: prefix embeddings; transformer: projected CLIP tokens
        self.constant_len = constant_len      # transformer: learned constants (their outputs are the prefix)
        self.num_layers = num_layers          # transformer: encoder layers
        self.finetune_gpt2 = finetune_gpt2
        self.max_text_len = max_text_len      # caption tokens incl. the closing [SEP]
        self.clip_dim = clip_dim              # the CLIP image embedding's size
        self.clip_source = clip_source        # the CLIP folder as given for training (e.g. models/clip)
        self.clip_name = clip_name            # that CLIP's own name (its config's _name_or_path), when it has one

    @property
    def prefix_tokens(self) -> int:
        """Prefix embeddings GPT-2 sees."""
        return self.prefix_len if self.mapping == "mlp" else self.constant_len


class MLPMapper(nn.Module):
    """ClipCap's MLP: clip_dim -> gpt_dim * prefix_len // 2 -> Tanh -> gpt_dim * prefix_len."""

    def __init__(self, clip_dim: int, gpt_dim: int, prefix_len: int):
        super().__init__()
        self.prefix_len, self.gpt_dim = prefix_len, gpt_dim
        self.model = nn.Sequential(nn.Linear(clip_dim, gpt_dim * prefix_len // 2), nn.Tanh(),
                                   nn.Linear(gpt_dim * prefix_len // 2, gpt_dim * prefix_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).view(x.shape[0], self.prefix_len, self.gpt_dim)


class TransformerMapper(nn.Module):
    """ClipCap's TransformerMapper: ``prefix_len`` tokens projected from the CLIP embedding,
    then ``constant_len`` learned constants; the encoder's outputs at the constants are the prefix."""

    def __init__(self, clip_dim: int, gpt_dim: int, prefix_len: int, constant_len: int, num_layers: int):
        super().__init__()
        if gpt_dim % MAPPER_HEADS:
            raise ValueError(f"mapping transformer: GPT-2's width {gpt_dim} is not a multiple of its {MAPPER_HEADS} "
                             "heads; use mapping mlp or another GPT-2 size")
        self.prefix_len, self.gpt_dim = prefix_len, gpt_dim
        self.linear = nn.Linear(clip_dim, prefix_len * gpt_dim)
        self.constants = nn.Parameter(torch.randn(constant_len, gpt_dim))
        layer = nn.TransformerEncoderLayer(gpt_dim, MAPPER_HEADS, dim_feedforward=2 * gpt_dim, dropout=0.0,
                                           activation="relu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(x).view(x.shape[0], self.prefix_len, self.gpt_dim)
        seq = torch.cat([tokens, self.constants.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        return self.transformer(seq)[:, self.prefix_len:]


@dataclass
class ClipCapOutput:
    loss: torch.Tensor
    logits: torch.Tensor           # (B, T, V): the predictions of the caption positions
    correct: torch.Tensor          # (N,) bool, one per scored token: the argmax was right


class ClipCapModel(nn.Module):
    """Mapper + GPT-2 on precomputed CLIP image embeddings (``clip_embeds`` (B, clip_dim))."""

    def __init__(self, config: ClipCapConfig, gpt2: GPT2LMHeadModel):
        super().__init__()
        self.config, self.gpt2 = config, gpt2
        gpt_dim = gpt2.config.n_embd
        self.mapper = MLPMapper(config.clip_dim, gpt_dim, config.prefix_len) if config.mapping == "mlp" else \
            TransformerMapper(config.clip_dim, gpt_dim, config.prefix_len, config.constant_len, config.num_layers)
        if not config.finetune_gpt2:
            self.gpt2.requires_grad_(False)
        if config.prefix_tokens + config.max_text_len > gpt2.config.n_positions:
            raise ValueError(f"max_text_len: {config.prefix_tokens} prefix + {config.max_text_len} caption positions "
                             f"exceed GPT-2's {gpt2.config.n_positions}")

    def freeze(self, embedding: bool = False, visual: bool = False) -> None:
        """The training loop's freezing options: ``embedding`` freezes GPT-2's token embeddings
        (tied to its output layer); ``visual`` has nothing to freeze (CLIP is always frozen)."""
        if embedding:
            self.gpt2.transformer.wte.weight.requires_grad_(False)

    def train(self, mode: bool = True) -> "ClipCapModel":
        super().train(mode)
        if not self.config.finetune_gpt2:  # frozen GPT-2: no dropout (ClipCap's ClipCaptionPrefix)
            self.gpt2.eval()
        return self

    def prefix(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        """(B, clip_dim) -> (B, prefix_tokens, gpt_dim) in GPT-2's dtype."""
        return self.mapper(clip_embeds.to(self.mapper_dtype)).to(self.gpt2.dtype)

    @property
    def mapper_dtype(self) -> torch.dtype:
        return next(self.mapper.parameters()).dtype

    def forward(self, clip_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> ClipCapOutput:
        """Cross entropy of the caption tokens (``input_ids`` (B, T): caption then [SEP], padded;
        ``attention_mask`` (B, T)) after the prefix; prefix positions are never scored."""
        prefix = self.prefix(clip_embeds)
        p = prefix.shape[1]
        embeds = torch.cat([prefix, self.gpt2.transformer.wte(input_ids)], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        logits = self.gpt2(inputs_embeds=embeds, attention_mask=mask).logits[:, p - 1:-1]  # predicts position p + t
        scored = attention_mask.bool()
        flat = logits[scored].float()
        target = input_ids[scored]
        return ClipCapOutput(nnf.cross_entropy(flat, target), logits, flat.argmax(-1) == target)

    @torch.no_grad()
    def generate(self, clip_embeds: torch.Tensor, decoding: "ClipCapDecoding", sep_id: int, pad_id: int,
                 banned: Sequence[int] = ()) -> tuple[list[list[int]], list[float]]:
        """Token ids (caption tokens, no [SEP]) and their mean log-probability per token (the
        closing [SEP] counted when emitted), one per image, through transformers' ``generate``
        on the prefix embeddings."""
        from transformers import GenerationConfig

        if self.config.prefix_tokens + decoding.max_length > self.gpt2.config.n_positions:
            raise ValueError(f"max_length: {decoding.max_length} tokens after a {self.config.prefix_tokens}-embedding "
                             f"prefix exceed GPT-2's {self.gpt2.config.n_positions} positions; lower max_length")
        common = dict(max_new_tokens=decoding.max_length, eos_token_id=sep_id, pad_token_id=pad_id,
                      suppress_tokens=list(banned) or None)
        if decoding.decoding == "beam":
            beams = dict(length_penalty=decoding.length_penalty, early_stopping=True) if decoding.num_beams > 1 else {}
            gen = GenerationConfig(**common, do_sample=False, num_beams=decoding.num_beams, **beams)
        elif decoding.decoding == "top_k":
            gen = GenerationConfig(**common, do_sample=True, top_k=decoding.top_k, top_p=1.0)
        else:
            gen = GenerationConfig(**common, do_sample=True, top_k=0, top_p=decoding.top_p)
        prefix = self.prefix(clip_embeds)
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if gen.do_sample:  # one image at a time, each from the seed: the caption is the batch's business alone
            rows = []
            for k in range(len(prefix)):
                with torch.random.fork_rng(devices=[prefix.device] if prefix.device.type == "cuda" else []):
                    torch.manual_seed(decoding.seed)
                    rows += self.gpt2.generate(inputs_embeds=prefix[k:k + 1], attention_mask=ones[k:k + 1],
                                               generation_config=gen).tolist()
        else:
            rows = self.gpt2.generate(inputs_embeds=prefix, attention_mask=ones, generation_config=gen).tolist()
        ids = [r[:r.index(sep_id) + 1] if sep_id in r else r for r in rows]
        scores = self._mean_log_probs(prefix, ids)
        return [r[:-1] if r and r[-1] == sep_id else r for r in ids], scores

    def _mean_log_probs(self, prefix: torch.Tensor, ids: list[list[int]]) -> list[float]:
        out = []
        for k, row in enumerate(ids):
            if not row:
                out.append(0.0)
                continue
            tokens = torch.tensor([row], device=prefix.device)
            embeds = torch.cat([prefix[k:k + 1], self.gpt2.transformer.wte(tokens)], dim=1)
            logp = self.gpt2(inputs_embeds=embeds).logits[0, prefix.shape[1] - 1:-1].float().log_softmax(-1)
            out.append(float(logp.gather(1, tokens[0, :, None]).mean()))
        return out

    # ----------------------------------------------------------------------- saving, loading

    def save_pretrained(self, path: Path | str, **_) -> None:
        """``config.json`` + ``mapper.safetensors`` + ``gpt2/`` + ``clip/`` (a copy of the CLIP model)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.gpt2.save_pretrained(str(path / "gpt2"))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.mapper.state_dict().items()}, str(path / MAPPER_FILE))
        clip = Path(self.config.clip)
        if clip.resolve() != (path / "clip").resolve():
            if not clip.is_dir():
                raise FileNotFoundError(f"{clip}: the CLIP model folder this ClipCap model was trained on is gone; "
                                        "the saved folder must hold a copy to caption raw images")
            shutil.copytree(clip, path / "clip", dirs_exist_ok=True)
        config = ClipCapConfig(**{**self.config.to_dict(), "clip": "clip"})
        config.save_pretrained(str(path))

    @classmethod
    def from_pretrained(cls, path: Path | str, **_) -> "ClipCapModel":
        """A folder written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        path = Path(path)
        config = ClipCapConfig.from_pretrained(str(path), local_files_only=True)
        if not Path(config.clip).is_absolute():
            config.clip = str(path / config.clip)
        gpt2 = GPT2LMHeadModel.from_pretrained(str(path / "gpt2"), local_files_only=True)
        model = cls(config, gpt2)
        missing, unexpected = model.mapper.load_state_dict(load_file(str(path / MAPPER_FILE)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / MAPPER_FILE}: does not fit the {config.mapping} mapper of config.json "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.eval()


def is_clipcap_dir(path: Path | str) -> bool:
    """A folder written by :meth:`ClipCapModel.save_pretrained` (config.json's model_type)."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == ClipCapConfig.model_type
    except (OSError, ValueError):
        return False


def clip_info(clip_dir: Path | str) -> tuple[int, str]:
    """``(image embedding size, the model's own name)`` of a CLIP folder, from its config.json."""
    config = Path(clip_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing; clipcap.model.clip must name a Chinese-CLIP model folder "
                                "(models/clip from train@clip, or a downloaded chinese-clip-vit-base-patch16)")
    found = json.loads(config.read_text(encoding="utf-8"))
    if "projection_dim" not in found:
        raise ValueError(f"{config}: not a CLIP config (no projection_dim)")
    return int(found["projection_dim"]), str(found.get("_name_or_path") or "")


def build_clipcap(vocab_size: int, size: str = "small", init: str = "", special: dict | None = None,
                  **settings) -> ClipCapModel:
    """A new ClipCap model: GPT-2 from the local folder ``init`` (its weights and shape), or of
    ``size`` (mmcn.models.factory.SIZES) from scratch over ``vocab_size`` tokens; ``special``: the
    tokenizer's ``{"bos": id, "eos": id, "pad": id}`` for a new GPT-2; ``settings``: the
    :class:`ClipCapConfig` fields (``clip`` names the CLIP folder)."""
    from mmcn.models.factory import SIZES

    config = ClipCapConfig(**settings)
    config.clip_dim, config.clip_name = clip_info(config.clip)
    config.clip_source = config.clip_source or config.clip
    if init:
        gpt2 = GPT2LMHeadModel.from_pretrained(init, local_files_only=True)
        if gpt2.config.vocab_size < vocab_size:
            raise ValueError(f"{init}: GPT-2 has {gpt2.config.vocab_size} token embeddings but its tokenizer "
                             f"{vocab_size} tokens; use the GPT-2 folder's own tokenizer (vocab.txt)")
    else:
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}: use one of {', '.join(SIZES)}")
        hidden, layers, heads, inter = SIZES[size]
        special = special or {}
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=SCRATCH_POSITIONS, n_embd=hidden,
                                          n_layer=layers, n_head=heads, n_inner=inter,
                                          bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
                                          pad_token_id=special.get("pad")))
    return ClipCapModel(config, gpt2)


# --------------------------------------------------------------------------- inputs, decoding


class ClipCapCollator:
    """Items (``embedding`` (clip_dim,), ``caption``) -> ``clip_embeds``, ``input_ids`` (caption
    tokens then [SEP], at most ``max_text_len``, right-padded) and ``attention_mask``."""

    def __init__(self, tokenizer, max_text_len: int):
        self.tok, self.max_text_len = tokenizer, max_text_len

    def __call__(self, items: list[dict]) -> dict:
        rows = [self.tok.encode(it["caption"], add_special_tokens=False)[:self.max_text_len - 1]
                + [self.tok.sep_token_id] for it in items]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :len(r)], mask[k, :len(r)] = torch.tensor(r), 1
        return {"clip_embeds": torch.stack([torch.as_tensor(it["embedding"], dtype=torch.float32) for it in items]),
                "input_ids": ids, "attention_mask": mask}


@dataclass(frozen=True)
class ClipCapDecoding:
    """How ClipCap captions are decoded (the ``clipcap.eval`` params)."""

    decoding: str = "beam"        # beam | top_k | top_p
    num_beams: int = 3            # beam: 1 is greedy
    top_k: int = 10               # top_k: sample among the k likeliest tokens
    top_p: float = 0.9            # top_p: sample within the smallest set of this probability
    max_length: int = 30          # new tokens, the closing [SEP] included
    length_penalty: float = 1.0   # beam: score = log P / length ** length_penalty
    seed: int = 0                 # top_k / top_p: every image sampled from this seed

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding: must be one of {', '.join(DECODINGS)}, got {self.decoding!r}")
        for name in ("num_beams", "top_k", "max_length"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) >= 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not abs(self.length_penalty) < float("inf"):
            raise ValueError(f"length_penalty: must be a finite number, got {self.length_penalty!r}")


@dataclass(frozen=True)
class ClipCapEvalConfig:
    """``clipcap.eval`` (+ ``execution.clipcap.eval``): ClipCap's decoding
    (:class:`mmcn.models.pixels.clipcap.ClipCapDecoding`: beam | top_k | top_p) and how the actors run."""

    batch_size: int = 32
    workers: int = 1              # Ray Data model actors
    use_gpu: bool = False         # one GPU per actor
    tokenize: str = "char"        # char | jieba
    decoding: str = "beam"        # beam (num_beams 1: greedy) | top_k | top_p
    num_beams: int = 3
    top_k: int = 10
    top_p: float = 0.9
    max_length: int = 30
    length_penalty: float = 1.0
    seed: int = 0                 # top_k / top_p: every image sampled from this seed

    def __post_init__(self) -> None:
        if self.tokenize not in ("char", "jieba"):
            raise ValueError(f"tokenize: must be one of char, jieba, got {self.tokenize!r}")
        for name in ("batch_size", "workers"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        self.decoding_settings()  # its own checks

    def decoding_settings(self) -> "ClipCapDecoding":
        from dataclasses import fields

        return ClipCapDecoding(**{f.name: getattr(self, f.name) for f in fields(ClipCapDecoding)})


class ClipCapGenerator:
    """A ClipCap model + its tokenizer + its CLIP: image bytes (or CLIP embeddings) -> captions."""

    def __init__(self, model: ClipCapModel, tokenizer, decoding: ClipCapDecoding = ClipCapDecoding(),
                 device: str | torch.device = "cpu", clip=None):
        self.device = torch.device(device)
        self.model, self.tok, self.decoding = model.to(self.device).eval(), tokenizer, decoding
        self.clip = clip  # (CLIP model, processor), loaded on first use of raw images
        self.banned = sorted({t for t in (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id)
                              if t is not None})

    @classmethod
    def from_dir(cls, model_dir: Path | str, decoding: ClipCapDecoding = ClipCapDecoding(),
                 device: str | torch.device = "cpu") -> "ClipCapGenerator":
        from mmcn.models.tokenizer import load_tokenizer

        return cls(ClipCapModel.from_pretrained(model_dir), load_tokenizer(model_dir), decoding, device)

    @torch.no_grad()
    def embed(self, images: Sequence[bytes]) -> torch.Tensor:
        """CLIP image embeddings of image file bytes (:func:`mmcn.models.pixels.clip.image_embeddings`)."""
        from mmcn.models.pixels.clip import image_embeddings, load_clip

        if self.clip is None:
            model, _, processor = load_clip(self.model.config.clip, self.device)
            self.clip = (model, processor)
        return image_embeddings(*self.clip, images)

    def __call__(self, images: Sequence[bytes]) -> tuple[list[str], list[float]]:
        return self.from_embeddings(self.embed(images))

    def from_embeddings(self, embeddings: torch.Tensor) -> tuple[list[str], list[float]]:
        from mmcn.models.tokenizer import detokenize

        ids, scores = self.model.generate(embeddings.to(self.device), self.decoding, self.tok.sep_token_id,
                                          self.tok.pad_token_id, self.banned)
        return [detokenize(self.tok.decode(x, skip_special_tokens=True)) for x in ids], scores
