"""Chinese-CLIP's original checkpoints (OFA-Sys/Chinese-CLIP, the ``cn_clip`` package:
``clip_cn_vit-b-16.pt`` and the like) read as transformers' ``ChineseCLIPModel``.

Such a file is ``torch.save({"state_dict": ..., "epoch", "step", "name", ["optimizer"]})`` of
cn_clip's ``CLIP`` (keys prefixed ``module.`` when saved from DDP): ``visual.*`` an OpenAI-CLIP
ViT (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.N.{attn.in_proj_*, attn.out_proj.*, ln_1, mlp.c_fc, mlp.c_proj,
ln_2}``, ``ln_post``, ``proj``), ``bert.*`` a Chinese RoBERTa in Hugging Face BERT names,
``text_projection`` and ``logit_scale``. The architecture is read off the tensors' shapes
(:func:`infer_config`) and every key is mapped onto ``ChineseCLIPModel``'s state dict
(:func:`to_hf_state_dict`): nothing left over, nothing left unfilled, else an error naming the
keys and the file. cn_clip's tokenizer is a BERT WordPiece of its ``vocab.txt``
(lower-cased, CJK characters split), which :func:`load_vocab` reads as a ``BertTokenizerFast``.
ResNet-50 checkpoints (``RN50``) have no ``ChineseCLIPModel`` counterpart and are refused.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path

import torch
from transformers import BertTokenizerFast, ChineseCLIPConfig, ChineseCLIPModel

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIX = ".pt"
VOCAB_FILE = "vocab.txt"
CONTEXT_LENGTH = 52   # cn_clip's tokenize(): tokens incl. [CLS]/[SEP]
# Attention heads by width, from cn_clip's model_configs/*.json: the ViT has width //
# vision_head_width heads (64 wide, 80 for ViT-H-14's 1280), the RoBERTas 64-wide heads
# (RBT3 and RoBERTa-wwm-ext-base 768 -> 12, -large 1024 -> 16); other widths: width // 64.
VISION_HEADS = {768: 12, 1024: 16, 1280: 16}
TEXT_HEADS = {768: 12, 1024: 16}
HEAD_WIDTH = 64
IGNORED_PREFIXES = ("bert.pooler.",)  # BERT's NSP pooler: cn_clip drops it on load and never uses it
VOCAB_HELP = ("Chinese-CLIP's vocabulary is the vocab.txt of its code (cn_clip/clip/vocab.txt in the cn_clip package "
              "or the OFA-Sys/Chinese-CLIP repository; the Hugging Face OFA-Sys/chinese-clip-* folders hold the same "
              "file): put it next to the checkpoint")


def find_checkpoint(folder: Path | str) -> Path | None:
    """The cn_clip checkpoint (``*.pt``) of a folder without a Hugging Face ``config.json``;
    None for any other folder. More than one ``.pt`` there is an error naming them."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    found = sorted(p for p in folder.glob(f"*{CHECKPOINT_SUFFIX}") if p.is_file())
    if len(found) > 1:
        raise ValueError(f"{folder}: {len(found)} Chinese-CLIP checkpoints ({', '.join(p.name for p in found)}); "
                         "keep one")
    return found[0] if found else None


def vocab_path(checkpoint: Path | str, vocab: Path | str | None = None) -> Path:
    """``vocab``, or the ``vocab.txt`` next to ``checkpoint``; missing: an error saying where to get it."""
    path = Path(vocab) if vocab else Path(checkpoint).parent / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; the tokenizer of {checkpoint} needs it. {VOCAB_HELP}"
                                + ("" if vocab else " (or pass --vocab to `mmcn convert-clip`)"))
    return path


def load_vocab(path: Path | str) -> BertTokenizerFast:
    """cn_clip's tokenizer as transformers': WordPiece over ``vocab.txt``, lower-cased, accents
    stripped, CJK characters split (cn_clip's ``FullTokenizer``), [CLS] ... [SEP], [PAD] 0."""
    from transformers.models.bert.tokenization_bert import load_vocab as read_vocab  # one token a line -> its id

    return BertTokenizerFast(vocab=read_vocab(str(path)), do_lower_case=True, tokenize_chinese_chars=True,
                             model_max_length=512)


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """The state dict of a cn_clip checkpoint (``module.`` dropped), read with
    ``weights_only=True`` (tensors and plain containers, no code) and memory-mapped. A bare
    state dict (``torch.save(model.state_dict())``) is accepted too. fp16 weights stay fp16
    here; loading them into a model casts them to its (float32) parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Chinese-CLIP checkpoint")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) file cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a Chinese-CLIP checkpoint torch.load(weights_only=True) can read "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a Chinese-CLIP checkpoint (a dict with a 'state_dict' of tensors, as cn_clip's "
                         "training saves it)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state):
        raise ValueError(f"{path}: a ResNet Chinese-CLIP (RN50); transformers' ChineseCLIPModel has a ViT image "
                         "encoder only, so mmcn reads the ViT checkpoints (ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14)")
    return state


def _need(state: dict, key: str, path: Path | str, dims: int) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{path}: key {key!r} is missing; not a complete Chinese-CLIP ViT checkpoint")
    if state[key].dim() != dims:
        raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {dims} dimensions")
    return state[key]


def _layers(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def _heads(width: int, table: dict[int, int], what: str, path: Path | str) -> int:
    heads = table.get(width, width // HEAD_WIDTH)
    if heads < 1 or width % heads:
        raise ValueError(f"{path}: {what} width {width} is not one of Chinese-CLIP's, and not a multiple of "
                         f"{HEAD_WIDTH}: its number of attention heads cannot be inferred")
    return heads


def infer_config(state: dict[str, torch.Tensor], path: Path | str = "<state dict>") -> ChineseCLIPConfig:
    """The ``ChineseCLIPConfig`` of a cn_clip state dict, from its shapes: the ViT's width and
    patch (``conv1``), image size (patch × the position grid's side), layers (the resblocks),
    MLP size; the text encoder's vocabulary, width, layers, positions, token types, MLP size;
    the embedding size (``visual.proj``). Heads: :data:`VISION_HEADS` / :data:`TEXT_HEADS`.
    Activations and norms are cn_clip's: QuickGELU and LayerNorm eps 1e-5 in the ViT, GELU and
    1e-12 in the RoBERTa (transformers' defaults for Chinese-CLIP)."""
    conv = _need(state, "visual.conv1.weight", path, 4)
    width, patch = conv.shape[0], conv.shape[-1]
    positions = _need(state, "visual.positional_embedding", path, 2).shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"{path}: visual.positional_embedding has {positions} rows, not 1 + a square grid")
    embed_dim = _need(state, "visual.proj", path, 2).shape[1]
    text_dim = _need(state, "text_projection", path, 2).shape[1]
    if text_dim != embed_dim:
        raise ValueError(f"{path}: text_projection projects to {text_dim}, visual.proj to {embed_dim}")
    words = _need(state, "bert.embeddings.word_embeddings.weight", path, 2)
    hidden = words.shape[1]
    vision_layers = _layers(state, "visual.transformer.resblocks.")
    text_layers = _layers(state, "bert.encoder.layer.")
    if not vision_layers or not text_layers:
        raise ValueError(f"{path}: no {'visual.transformer.resblocks' if not vision_layers else 'bert.encoder.layer'}"
                         ".N keys; not a Chinese-CLIP ViT checkpoint")
    return ChineseCLIPConfig(
        text_config={
            "vocab_size": words.shape[0], "hidden_size": hidden, "num_hidden_layers": text_layers,
            "num_attention_heads": _heads(hidden, TEXT_HEADS, "text encoder", path),
            "intermediate_size": _need(state, "bert.encoder.layer.0.intermediate.dense.weight", path, 2).shape[0],
            "max_position_embeddings": _need(state, "bert.embeddings.position_embeddings.weight", path, 2).shape[0],
            "type_vocab_size": _need(state, "bert.embeddings.token_type_embeddings.weight", path, 2).shape[0],
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0},
        vision_config={
            "hidden_size": width, "num_hidden_layers": vision_layers,
            "num_attention_heads": _heads(width, VISION_HEADS, "vision", path),
            "intermediate_size": _need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", path, 2).shape[0],
            "image_size": grid * patch, "patch_size": patch, "projection_dim": embed_dim,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        projection_dim=embed_dim)


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ChineseCLIPConfig,
                     path: Path | str = "<state dict>") -> dict[str, torch.Tensor]:
    """cn_clip's keys -> ``ChineseCLIPModel``'s. The ViT's fused ``attn.in_proj_{weight,bias}``
    splits into q, k, v (rows in that order); ``visual.proj`` and ``text_projection`` (used as
    ``x @ P``) become the transposed ``nn.Linear`` weights; ``bert.X`` is ``text_model.X``.
    Keys of the checkpoint nothing takes (but :data:`IGNORED_PREFIXES`) and keys the mapping
    expects but the checkpoint lacks are an error listing them."""
    taken: set[str] = set()
    missing: list[str] = []

    def take(key: str) -> torch.Tensor | None:
        if key not in state:
            missing.append(key)
            return None
        taken.add(key)
        return state[key]

    def transposed(key: str) -> torch.Tensor | None:
        t = take(key)
        return None if t is None else t.t().contiguous()

    out: dict[str, torch.Tensor | None] = {
        "logit_scale": take("logit_scale"),
        "visual_projection.weight": transposed("visual.proj"),
        "text_projection.weight": transposed("text_projection"),
        "vision_model.embeddings.patch_embedding.weight": take("visual.conv1.weight"),
        "vision_model.embeddings.class_embedding": take("visual.class_embedding"),
        "vision_model.embeddings.position_embedding.weight": take("visual.positional_embedding"),
    }
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"vision_model.{ours}.{p}"] = take(f"visual.{theirs}.{p}")
    for i in range(config.vision_config.num_hidden_layers):
        src, dst = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            fused = take(f"{src}attn.in_proj_{p}")
            if fused is not None:
                if fused.shape[0] % 3:
                    raise ValueError(f"{path}: {src}attn.in_proj_{p} has {fused.shape[0]} rows, not 3 × the width")
                for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}.{p}"] = part.contiguous()
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("layer_norm2", "ln_2")):
                out[f"{dst}{ours}.{p}"] = take(f"{src}{theirs}.{p}")
    for key in state:
        if key.startswith("bert.") and not key.startswith(IGNORED_PREFIXES):
            out["text_model." + key[len("bert."):]] = take(key)

    expected = _shapes(config)
    unused = sorted(k for k in state if k not in taken and not k.startswith(IGNORED_PREFIXES))
    unused += sorted(f"{k} (-> {k.replace('bert.', 'text_model.', 1)}, which ChineseCLIPModel does not have)"
                     for k in state if k.startswith("bert.") and k in taken
                     and "text_model." + k[len("bert."):] not in expected)
    missing += sorted(f"{_source_name(k)} (for {k})" for k in expected if k not in out)
    problems = []
    if missing:
        problems.append(f"missing key(s) {', '.join(missing)}")
    if unused:
        problems.append(f"key(s) no ChineseCLIPModel weight takes: {', '.join(unused)}")
    if problems:
        raise ValueError(f"{path}: does not map onto ChineseCLIPModel ({config.vision_config.num_hidden_layers}-layer "
                         f"ViT, {config.text_config.num_hidden_layers}-layer text encoder): {'; '.join(problems)}")
    bad = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in out.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{path}: tensor shapes do not fit the inferred architecture: {', '.join(bad)}")
    return out


def _shapes(config: ChineseCLIPConfig) -> dict[str, torch.Tensor]:
    """``ChineseCLIPModel(config)``'s state dict as shapes only (meta tensors: nothing allocated)."""
    with torch.device("meta"):
        return ChineseCLIPModel(config).state_dict()


def _source_name(hf_key: str) -> str:
    """The cn_clip key a ``ChineseCLIPModel`` key is read from (for messages)."""
    if hf_key.startswith("text_model."):
        return "bert." + hf_key[len("text_model."):]
    m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf_key)
    if m:
        i, name, p = m.groups()
        names = {"self_attn.q_proj": "attn.in_proj_", "self_attn.k_proj": "attn.in_proj_",
                 "self_attn.v_proj": "attn.in_proj_", "self_attn.out_proj": "attn.out_proj.", "layer_norm1": "ln_1.",
                 "layer_norm2": "ln_2.", "mlp.fc1": "mlp.c_fc.", "mlp.fc2": "mlp.c_proj."}
        return f"visual.transformer.resblocks.{i}.{names.get(name, name + '.')}{p}"
    return hf_key


def check_vocab(tokenizer, config: ChineseCLIPConfig, checkpoint: Path | str, vocab: Path | str) -> None:
    """The tokenizer of ``vocab`` has exactly the rows of the checkpoint's word embeddings."""
    if len(tokenizer) != config.text_config.vocab_size:
        raise ValueError(f"{vocab}: {len(tokenizer)} tokens, but {checkpoint} embeds {config.text_config.vocab_size}: "
                         f"not the vocabulary of this checkpoint. {VOCAB_HELP}")


def load_model(path: Path | str, model_class: type[ChineseCLIPModel] = ChineseCLIPModel, **config_fields):
    """A ``model_class`` (a ``ChineseCLIPModel``) holding the weights of the cn_clip checkpoint
    ``path`` in float32, in eval mode; ``config_fields`` are set on its config (mmcn's
    ``max_text_len``...)."""
    state = read_checkpoint(path)
    config = infer_config(state, path)
    for k, v in config_fields.items():
        setattr(config, k, v)
    weights = to_hf_state_dict(state, config, path)
    v, t = config.vision_config, config.text_config
    log.info("%s: Chinese-CLIP ViT %d wide x %d layers (%d heads), patch %d at %d px; text %d wide x %d layers "
             "(%d heads), vocab %d; embedding %d", path, v.hidden_size, v.num_hidden_layers, v.num_attention_heads,
             v.patch_size, v.image_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size,
             config.projection_dim)
    model = model_class(config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def load(checkpoint: Path | str, vocab: Path | str | None = None,
         model_class: type[ChineseCLIPModel] = ChineseCLIPModel, **config_fields) -> tuple:
    """``(model, tokenizer)`` of a cn_clip checkpoint and its ``vocab`` (default: the
    ``vocab.txt`` next to it), the model's config with ``max_text_len`` 52 (cn_clip's context
    length) unless ``config_fields`` say otherwise."""
    vocab = vocab_path(checkpoint, vocab)
    tokenizer = load_vocab(vocab)
    model = load_model(checkpoint, model_class, **{"max_text_len": CONTEXT_LENGTH, **config_fields})
    check_vocab(tokenizer, model.config, checkpoint, vocab)
    return model, tokenizer
