"""Oscar / Mengzi-Oscar checkpoint folders in and out (microsoft/Oscar's layout, read by its
own ``from_pretrained`` and ``--do_test``).

An Oscar folder holds ``config.json`` (BERT's fields plus ``img_feature_dim``,
``img_feature_type``, ``use_img_layernorm``, ``img_layer_norm_eps``; a caption fine-tune
also ``tie_weights``, ``label_smoothing``, ``drop_worst_*``; a retrieval one ``num_labels``,
``loss_type``; a pretrained one ``num_contrast_classes``), ``pytorch_model.bin`` (a plain
state dict), ``vocab.txt`` + ``special_tokens_map.json`` + ``added_tokens.json`` and, for
fine-tunes, ``training_args.bin`` (a pickled ``argparse.Namespace`` with the layout:
``max_seq_length``, ``max_seq_a_length``, ``max_img_seq_length``, ``add_od_labels``,
``do_lower_case``, ``od_label_type``), read here with ``torch.load(weights_only=True)`` and
``argparse.Namespace`` as the one class allowed through.

Key map (Oscar -> mmcn): ``bert.embeddings.*``, ``bert.encoder.*``, ``bert.pooler.*`` stay;
``bert.img_embedding.*`` -> ``img_embedding.*``; ``bert.LayerNorm.*`` (the image LayerNorm)
-> ``img_norm.*``; ``cls.predictions.*`` stay (``cls.predictions.bias`` is also the
decoder's bias; a decoder equal to the word embeddings is a tied one); ``classifier.*`` (the
retrieval matcher on the pooled [CLS]) -> ``match_head.*``; ``cls.seq_relationship.*`` (the
pretrained 3-way head) stays in a pretraining model (:mod:`mmcn.models.regions.pretrain`) and has no
place in a caption or retrieval model. Every key must be
placed and every model weight filled: anything else is an error naming the keys and file.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WEIGHTS = "pytorch_model.bin"
TRAINING_ARGS = "training_args.bin"
SIDE_FILE = "mmcn_extra_heads.safetensors"   # heads Oscar has no place for, written beside an export
RENAMES = (("bert.img_embedding.", "img_embedding."), ("bert.LayerNorm.", "img_norm."), ("classifier.", "match_head."))
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
               "type_vocab_size", "initializer_range", "layer_norm_eps")
TASK_HEADS = {"caption": ("cls.predictions.",), "retrieval": ("match_head.",),
              "pretrained": ("cls.predictions.", "cls.seq_relationship.")}


class OscarCheckpointError(ValueError):
    """An Oscar folder that cannot be mapped onto an mmcn model exactly (message names file and keys)."""


def is_oscar_dir(path: Path | str) -> bool:
    """An Oscar-layout folder: a ``config.json`` with ``img_feature_dim`` that is not mmcn's own."""
    config = Path(path) / "config.json"
    if not config.is_file() or not (Path(path) / WEIGHTS).is_file():
        return False
    fields = json.loads(config.read_text(encoding="utf-8"))
    return "img_feature_dim" in fields and not str(fields.get("model_type", "")).startswith("mmcn_")


def read_training_args(path: Path | str) -> dict:
    """``training_args.bin`` as a dict (``{}`` when the folder has none, as pretrained ones)."""
    file = Path(path) / TRAINING_ARGS
    if not file.is_file():
        return {}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            args = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise OscarCheckpointError(f"{file}: not an Oscar training_args.bin holding only an argparse.Namespace "
                                   f"({str(e).splitlines()[0]}); nothing from it was run. Remove the file to "
                                   "take the layout from params instead") from None
    if not isinstance(args, argparse.Namespace):
        raise OscarCheckpointError(f"{file}: holds a {type(args).__name__}, not Oscar's argparse.Namespace")
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise OscarCheckpointError(f"{file}: not a plain state dict of tensors ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OscarCheckpointError(f"{file}: expected a dict of tensors (a state dict)")
    return state


def checkpoint_task(state: dict[str, torch.Tensor]) -> str:
    """pretrained (3-way contrastive head) | caption (masked-token head) | retrieval (classifier)."""
    if "cls.seq_relationship.weight" in state:
        return "pretrained"
    if "classifier.weight" in state:
        return "retrieval"
    if "cls.predictions.bias" in state:
        return "caption"
    raise OscarCheckpointError("neither cls.predictions.* (caption), classifier.* (retrieval) nor "
                               "cls.seq_relationship.* (pretrained): not an Oscar model")


def mmcn_settings(path: Path | str, task: str, layout: dict | None = None) -> dict:
    """The mmcn config fields of an Oscar folder's model for ``task``: BERT's shape, Oscar's
    switches (image LayerNorm and eps, pooler, tied decoder, matcher head) and the layout
    from ``training_args.bin`` (``layout`` fills what it lacks: ``max_text_len``, ...)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    args = read_training_args(path)
    state = read_state_dict(path)
    shape = {k: config[k] for k in BERT_FIELDS if k in config}
    if "vocab_size" not in shape and isinstance(config.get("vocab_size_or_config_json_file"), int):
        shape["vocab_size"] = config["vocab_size_or_config_json_file"]  # pytorch_pretrained_bert's name
    if config.get("img_feature_type", "faster_r-cnn") in ("dis_code", "dis_code_t", "dis_code_scale"):
        raise OscarCheckpointError(f"{path / 'config.json'}: img_feature_type {config['img_feature_type']!r} "
                                   "(discrete codes) is not supported: mmcn reads region features")
    settings = {**shape, "img_feature_dim": int(config["img_feature_dim"]),
                "use_img_layernorm": bool(config.get("use_img_layernorm")),  # Oscar: absent or 0 -> none
                "img_layer_norm_eps": float(config.get("img_layer_norm_eps", 1e-12)),
                "add_pooler": "bert.pooler.dense.weight" in state,  # always, in Oscar's own folders
                "oscar": {"config": config, "training_args": args}}
    layout = dict(layout or {})
    if args:
        seq, seq_a = int(args.get("max_seq_length", 70)), int(args.get("max_seq_a_length", 40))
        layout.update(max_regions=int(args.get("max_img_seq_length", 50)),
                      add_od_labels=bool(args.get("add_od_labels", True)))
        if task == "caption":
            layout.update(max_text_len=seq_a, max_tag_len=seq - seq_a)
        elif task == "pretrain":
            layout.update(max_text_len=seq, max_tag_len=0)
        else:
            layout.update(max_text_len=seq, max_tag_len=seq)
    settings.update(layout)
    if task == "caption":
        decoder = state.get("cls.predictions.decoder.weight")
        tied = decoder is None or torch.equal(decoder, state["bert.embeddings.word_embeddings.weight"])
        settings.update(tie_word_embeddings=tied, copy_tags=False, loss_form="oscar",
                        **{k: config[k] for k in ("label_smoothing", "drop_worst_ratio", "drop_worst_after")
                           if k in config})
    elif task == "pretrain":
        if "cls.seq_relationship.weight" not in state:
            raise OscarCheckpointError(f"{path / WEIGHTS}: no cls.seq_relationship.* (the contrastive head): not a "
                                       "pretrained Oscar model; pretraining starts from a BERT or an Oscar+ checkpoint")
        settings.update(num_contrast_classes=int(state["cls.seq_relationship.weight"].shape[0]),
                        **{k: type_(args[k]) for k, type_ in (("texta_false_prob", float), ("textb_sample_mode", int),
                                                              ("mask_loss_for_unmatched", bool)) if k in args})
    elif task == "retrieval":
        if config.get("classifier", "linear") != "linear" or int(config.get("num_labels", 2)) != 2:
            raise OscarCheckpointError(f"{path / 'config.json'}: classifier {config.get('classifier')!r} with "
                                       f"{config.get('num_labels')} labels; mmcn maps Oscar's linear 2-way matcher")
        settings.update(dual_encoder=False, match_head="oscar", match_weight=1.0, negatives="random")
    return settings


def fixed_settings(settings: dict) -> set[str]:
    """The fields of :func:`mmcn_settings` that describe the checkpoint's architecture and
    layout; other settings (loss options, ``copy_tags``) may be changed for fine-tuning."""
    layout = {"max_text_len", "max_tag_len", "max_regions", "add_od_labels"} if settings["oscar"]["training_args"] \
        else set()
    return set(BERT_FIELDS) | layout | {"img_feature_dim", "use_img_layernorm", "img_layer_norm_eps", "add_pooler",
                                        "oscar", "tie_word_embeddings", "dual_encoder", "match_head", "negatives",
                                        "match_weight",  # a matcher alone: its loss is the loss
                                        "num_contrast_classes"}


def to_mmcn_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Oscar's key names -> mmcn's (see the module docstring)."""
    out = {}
    for key, value in state.items():
        for old, new in RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    if "cls.predictions.bias" in out:  # Oscar's decoder has no bias of its own: the head's bias is it
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


def load_into(model, path: Path | str) -> list[str]:
    """Copy an Oscar folder's weights into ``model`` (its config from :func:`mmcn_settings`).
    Heads of another task are left out (returned, and logged by name); a missing weight, a
    key with no place, or a shape that differs is an :class:`OscarCheckpointError`."""
    path = Path(path)
    file = path / WEIGHTS
    raw = read_state_dict(path)
    source_task, state = checkpoint_task(raw), to_mmcn_state(raw)
    own = model.state_dict()
    target_task = _task_of(model)
    foreign = [k for k in state if any(k.startswith(p) for p in TASK_HEADS[source_task])
               and not any(k.startswith(p) for p in TASK_HEADS[target_task])]
    unexpected = sorted(k for k in state if k not in own and k not in foreign)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    fresh_heads = [p for p in TASK_HEADS[target_task] if p not in TASK_HEADS[source_task]]
    missing = sorted(k for k in own if k not in state and k not in tied and not k.endswith("position_ids")
                     and not any(k.startswith(p) for p in fresh_heads) and not k.startswith("copy_"))
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                   if k in own and state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        parts = [f"{len(unexpected)} key(s) with no place: {', '.join(unexpected[:8])}" if unexpected else "",
                 f"{len(missing)} weight(s) missing: {', '.join(missing[:8])}" if missing else "",
                 f"shapes differ: {'; '.join(wrong[:8])}" if wrong else ""]
        raise OscarCheckpointError(f"{file} does not fit an Oscar {target_task} model exactly: "
                                   + "; ".join(p for p in parts if p) + ". Nothing was loaded")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if foreign:
        log.info("%s: %s checkpoint into a %s model: left out its %s (%d tensors), as Oscar's fine-tuning does",
                 path, source_task, target_task, ", ".join(sorted({k.rsplit(".", 1)[0] for k in foreign})),
                 len(foreign))
    new = [p for p in [*fresh_heads, "copy_"] if any(k.startswith(p) for k in own)]
    if new:
        log.info("%s: new %s head(s) %s start from random weights", path, target_task, ", ".join(new))
    return foreign


def _task_of(model) -> str:
    """The Oscar head set of an mmcn model: pretrained | caption | retrieval."""
    if hasattr(model, "cls"):
        return "pretrained" if hasattr(model.cls, "seq_relationship") else "caption"
    return "retrieval"


# --------------------------------------------------------------------------- export

def export(model, tokenizer, out_dir: Path | str) -> dict:
    """Write ``model`` (an mmcn caption, retrieval or pretraining model) as an Oscar folder into ``out_dir``:
    ``pytorch_model.bin`` in Oscar's key names, ``config.json`` with Oscar's fields (an imported
    model's own config, updated), ``training_args.bin`` with the layout, ``vocab.txt`` and the
    tokenizer's maps. Weights Oscar has no place for (the copy heads of ``copy_tags``, the
    dual encoder's projections) go to ``mmcn_extra_heads.safetensors``, and the log says so.
    Returns what was written: ``{"task", "tensors", "side_file"}``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    cfg = model.config
    task = _task_of(model)
    if task == "retrieval" and cfg.match_head != "oscar":
        raise OscarCheckpointError("this retrieval model's matcher reads the [CLS] state, Oscar's the pooled one "
                                   "(match_head 'oscar'): Oscar could not score pairs with it; export a model "
                                   "trained or imported with match_head: oscar")
    state, extra = {}, {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids") or key == "cls.predictions.decoder.bias":
            continue  # a buffer; Oscar's decoder bias is cls.predictions.bias
        if key.startswith(("copy_", "text_proj.", "image_proj.", "logit_scale")):
            extra[key] = value.detach().clone().contiguous()
            continue
        for new, old in RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value.detach().clone()
    if task in ("caption", "pretrained") and "cls.predictions.decoder.weight" not in state:
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / WEIGHTS)
    original = (cfg.oscar or {}).get("config") or {}
    config = {**original, **{k: getattr(cfg, k) for k in BERT_FIELDS}, "img_feature_dim": cfg.img_feature_dim,
              "img_feature_type": original.get("img_feature_type", "faster_r-cnn"),
              "use_img_layernorm": type(original.get("use_img_layernorm", 1))(cfg.use_img_layernorm),
              "img_layer_norm_eps": cfg.img_layer_norm_eps}
    if task == "caption":
        config.update(tie_weights=bool(cfg.tie_word_embeddings), label_smoothing=cfg.label_smoothing,
                      drop_worst_ratio=cfg.drop_worst_ratio, drop_worst_after=cfg.drop_worst_after)
        config.setdefault("freeze_embedding", False)
    elif task == "pretrained":
        config.update(num_contrast_classes=cfg.num_contrast_classes)
    else:
        config.update(num_labels=2)
        config.setdefault("loss_type", "sfmx")
    config.pop("vocab_size_or_config_json_file", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    args = dict((cfg.oscar or {}).get("training_args") or {})
    if not args and task == "pretrained":  # run_oscarplus_pretrain.py's own flags
        args = {"max_seq_length": cfg.max_text_len, "max_img_seq_length": cfg.max_regions, "use_b": 1,
                "texta_false_prob": cfg.texta_false_prob, "textb_sample_mode": cfg.textb_sample_mode,
                "mask_loss_for_unmatched": int(cfg.mask_loss_for_unmatched),
                "num_contrast_classes": cfg.num_contrast_classes, "img_feature_dim": cfg.img_feature_dim,
                "do_lower_case": True}
    elif not args:
        seq_a = cfg.max_text_len
        args = {"max_seq_length": seq_a + cfg.max_tag_len if task == "caption" else cfg.max_text_len,
                "max_seq_a_length": seq_a, "max_img_seq_length": cfg.max_regions,
                "add_od_labels": bool(cfg.add_od_labels), "do_lower_case": True, "od_label_type": "vg"}
    torch.save(argparse.Namespace(**args), out / TRAINING_ARGS)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}) + "\n", encoding="utf-8")
    (out / "added_tokens.json").write_text("{}\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": bool(args.get("do_lower_case", True))}) + "\n", encoding="utf-8")
    side = None
    if extra:
        side = out / SIDE_FILE
        save_file(extra, str(side))
        log.warning("%s: %s have no place in Oscar's %s model: written to %s (Oscar ignores them)", out,
                    ", ".join(sorted({k.split(".")[0] for k in extra})), task, side.name)
    if not cfg.add_pooler:
        log.warning("%s: the model has no BERT pooler; Oscar's from_pretrained initialises one (its captioning "
                    "does not use it)", out)
    return {"task": task, "tensors": len(state), "side_file": str(side) if side else None}
