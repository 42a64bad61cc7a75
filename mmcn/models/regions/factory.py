"""Build a region-feature task's model (pretrain, caption, retrieval) from a size name, a local
pretrained BERT, an Oscar folder or mmcn's own pretrained model, and load saved ones: the
region family's part of :mod:`mmcn.models.factory`."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import BertConfig

from mmcn.models.factory import SIZES
from mmcn.models.regions import oscar
from mmcn.models.regions.base import VLPreTrainedModel, load_pretrained_bert
from mmcn.models.regions.caption import CaptionConfig, CaptionModel
from mmcn.models.regions.pretrain import PretrainConfig, PretrainModel
from mmcn.models.regions.retrieval import RetrievalConfig, RetrievalModel

TASKS = {"caption": (CaptionConfig, CaptionModel), "retrieval": (RetrievalConfig, RetrievalModel),
         "pretrain": (PretrainConfig, PretrainModel)}
# what a fine-tune takes over from mmcn's pretrained model: its architecture ...
ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "max_position_embeddings", "type_vocab_size", "vocab_size", "layer_norm_eps", "img_feature_dim",
                "use_img_layernorm", "img_layer_norm_eps", "add_pooler")
SHARED = ("bert.", "img_embedding.", "img_norm.")   # ... and these weights (+ cls.predictions.* for captioning)
MODEL_TYPES = {config.model_type: (task, model) for task, (config, model) in TASKS.items()}


def build_model(task: str, vocab_size: int, size: str = "small", init: str = "", **settings) -> VLPreTrainedModel:
    """A new ``task`` model: BERT of ``size`` (tiny | small | medium | base) trained from scratch, or,
    when ``init`` names a local pretrained BERT directory, that BERT's shape and weights.
    ``settings`` are the task config's own fields (layout, loss options)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    config_cls, model_cls = TASKS[task]
    if init and _model_type(init) == PretrainConfig.model_type:
        return from_pretrained_model(task, init, settings)
    if init and oscar.is_oscar_dir(init):  # Oscar's architecture and layout; settings may change the rest
        found = oscar.mmcn_settings(init, task, _layout(settings))
        fixed = oscar.fixed_settings(found)
        model = model_cls(config_cls(**{**found, **{k: v for k, v in settings.items() if k not in fixed}}))
        oscar.load_into(model, init)
        return model
    if init:
        shape = BertConfig.from_pretrained(init, local_files_only=True).to_dict()
        shape = {k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                       "max_position_embeddings", "type_vocab_size", "vocab_size", "hidden_act")}
    else:
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}: use one of {', '.join(SIZES)}")
        hidden, layers, heads, inter = SIZES[size]
        shape = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                 "intermediate_size": inter, "vocab_size": vocab_size, "max_position_embeddings": 512}
    model = model_cls(config_cls(**shape, **settings))
    if init:
        load_pretrained_bert(model, init)
    return model


def _model_type(path: str) -> str | None:
    config = Path(path) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None


def from_pretrained_model(task: str, path: str, settings: dict) -> VLPreTrainedModel:
    """A ``task`` model that starts from mmcn's pretrained model in ``path`` (the pretrain stage's
    ``models/pretrain``): its architecture, its encoder, region projection and pooler and, for
    captioning (or pretraining further), its masked-token head; the task's own heads start
    afresh. ``settings`` give the task's layout and options."""
    import logging

    source = PretrainModel.from_pretrained(path, local_files_only=True)
    config_cls, model_cls = TASKS[task]
    shape = {k: getattr(source.config, k) for k in ARCHITECTURE}
    if task == "pretrain":
        shape.update({k: getattr(source.config, k) for k in ("texta_false_prob", "textb_sample_mode",
                                                             "mask_loss_for_unmatched", "num_contrast_classes")})
    model = model_cls(config_cls(**{**settings, **shape}))
    own, state = model.state_dict(), source.state_dict()
    heads = ("cls.predictions.",) if hasattr(model, "cls") else ()
    heads += ("cls.seq_relationship.",) if task == "pretrain" else ()
    taken = {k: v for k, v in state.items() if k.startswith(SHARED + heads) and k in own}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in taken.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path}: weights do not fit the {task} model: {'; '.join(wrong[:5])}")
    model.load_state_dict(taken, strict=False)
    fresh = sorted({k.split(".")[0] for k in own if k not in taken and not k.endswith("position_ids")} - {"bert"})
    logging.getLogger(__name__).info("%s: %s model from mmcn's pretrained model (%d tensors); new: %s", path, task,
                                     len(taken), ", ".join(fresh) or "none")
    return model


def _layout(settings: dict) -> dict:
    return {k: settings[k] for k in ("max_text_len", "max_tag_len", "max_regions", "add_od_labels") if k in settings}


def load_model(path: Path | str) -> tuple[str, VLPreTrainedModel]:
    """``(task, model)`` of a saved region model folder: mmcn's ``save_pretrained`` layout, or
    an Oscar / Mengzi-Oscar caption or retrieval fine-tune (:mod:`mmcn.models.regions.oscar`)."""
    from mmcn.models.factory import MODEL_TYPES as ALL_TYPES

    if oscar.is_oscar_dir(path):
        task = oscar.checkpoint_task(oscar.read_state_dict(path))
        if task == "pretrained":
            raise ValueError(f"{path} is a pretrained Oscar checkpoint, not a caption or retrieval model: "
                             "fine-tune it first (caption.model.init / retrieval.model.init)")
        if not oscar.read_training_args(path):
            raise ValueError(f"{path}: an Oscar {task} model without training_args.bin: its layout (text, tag and "
                             f"region lengths) is unknown; fine-tune from it with {task}.model.init instead")
        return task, build_model(task, 0, init=str(path))
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: not a model folder written by mmcn")
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config}: model_type {model_type!r} is not an mmcn model ({', '.join(ALL_TYPES)})")
    task, model_cls = MODEL_TYPES[model_type]
    return task, model_cls.from_pretrained(str(path), local_files_only=True)
