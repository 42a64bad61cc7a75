"""Chinese-CLIP's original ``.pt`` checkpoints (mmcn.models.pixels.cn_clip): a tiny random
model of cn_clip's own ``CLIP`` class, saved as cn_clip's training saves it, converted by mmcn
(on load from a folder, and by ``mmcn convert-clip``), gives the image features, text features
and logit scale of cn_clip's ``encode_image`` / ``encode_text`` on the same inputs, and its
tokenizer the ids of cn_clip's ``tokenize``. A key too many or too few is an error naming it.

cn_clip (PyPI) pins lmdb==1.3.0 against mmcn's lmdb 3, so it is installed without its
dependencies (README's test command: ``pip install --no-deps cn_clip==1.6.0``); its model and
tokenizer need only torch, torchvision, numpy and six."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

SENTENCES = ["一只小狗在草地上奔跑", "两个人在海边散步。", "Hello 世界，红色的圆形！", "猫"]
IMAGE_SIZE, PATCH = 32, 16
LOGIT_SCALE = math.log(1 / 0.05)


def _cn_clip():
    try:
        import cn_clip.clip  # noqa: F401
    except ImportError:
        pytest.fail("cn_clip is not installed: pip install --no-deps cn_clip==1.6.0 (README's test command)")
    from cn_clip.clip import model as cn_model, tokenize

    return cn_model, tokenize


def cn_vocab() -> Path:
    import cn_clip.clip

    return Path(cn_clip.clip.__file__).parent / "vocab.txt"


@pytest.fixture(scope="module")
def reference():
    """A tiny cn_clip ``CLIP`` (2-layer 128-wide ViT with 2 heads on 32 px, 2-layer 128-wide
    RoBERTa with 2 heads and 64 positions, 32-dim embedding, cn_clip's 21128-token vocabulary),
    every weight perturbed from its init so biases and norms are not 0/1, in eval mode."""
    cn_model, _ = _cn_clip()
    torch.manual_seed(0)
    model = cn_model.CLIP(embed_dim=32, image_resolution=IMAGE_SIZE, vision_layers=2, vision_width=128,
                          vision_patch_size=PATCH, vocab_size=21128, text_attention_probs_dropout_prob=0.1,
                          text_hidden_act="gelu", text_hidden_dropout_prob=0.1, text_hidden_size=128,
                          text_initializer_range=0.02, text_intermediate_size=256, text_max_position_embeddings=64,
                          text_num_attention_heads=2, text_num_hidden_layers=2, text_type_vocab_size=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.logit_scale.fill_(LOGIT_SCALE)
    return model.eval()


def save_checkpoint(model, path: Path, drop: str | None = None, extra: str | None = None) -> Path:
    """cn_clip's training checkpoint layout (DDP's ``module.`` prefix, epoch/step/name, optimizer)."""
    state = {"module." + k: v for k, v in model.state_dict().items() if k != drop}
    if extra:
        state["module." + extra] = torch.zeros(3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "step": 10, "name": "tiny", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}}, path)
    return path


@pytest.fixture(scope="module")
def init_dir(reference, tmp_path_factory) -> Path:
    """A clip.model.init folder as a user fills it: the .pt and cn_clip's vocab.txt."""
    folder = tmp_path_factory.mktemp("cn-clip-init")
    save_checkpoint(reference, folder / "clip_cn_tiny.pt")
    shutil.copy(cn_vocab(), folder / "vocab.txt")
    return folder


def cn_features(reference, pixels: torch.Tensor):
    _, tokenize = _cn_clip()
    ids = tokenize(SENTENCES)  # context length 52, [PAD] 0
    with torch.no_grad():
        return reference.encode_image(pixels), reference.encode_text(ids), ids


def check_against_reference(model, tokenizer, reference) -> None:
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    image_ref, text_ref, ids_ref = cn_features(reference, pixels)
    enc = tokenizer(SENTENCES, padding="max_length", max_length=52, truncation=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == ids_ref.tolist()
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=enc["input_ids"],
                                       attention_mask=enc["attention_mask"]).pooler_output
    assert image.shape == image_ref.shape == (3, 32) and text.shape == text_ref.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(image, image_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, text_ref, atol=1e-5, rtol=1e-5)
    assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item(), abs=1e-7)
    assert image_ref.abs().max() > 0.1 and text_ref.abs().max() > 0.1  # not a degenerate (all-zero) model


def test_load_clip_reads_a_cn_clip_folder(reference, init_dir):
    """clip.model.init / load_clip on a folder holding the .pt + vocab.txt: cn_clip's features,
    and mmcn's text path (padding to the longest) and the training loop's tokenizer agree."""
    from mmcn.models.pixels.clip import ClipModel, build_clip, load_clip, processor_of, text_embeddings
    from mmcn.models.tokenizer import load_tokenizer

    model, tokenizer, processor = load_clip(init_dir)
    assert isinstance(model, ClipModel) and model.config.max_text_len == 52
    check_against_reference(model, tokenizer, reference)
    # the training loop's tokenizer of the init folder (vocab.txt) and its model (build_clip)
    loop_tok = load_tokenizer(init_dir)
    assert loop_tok(SENTENCES)["input_ids"] == tokenizer(SENTENCES)["input_ids"]
    built = build_clip(len(loop_tok), init=str(init_dir), max_text_len=40)
    assert built.config.max_text_len == 40
    for k, v in model.state_dict().items():
        assert torch.equal(v, built.state_dict()[k]), k
    _, text_ref, _ = cn_features(reference, torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    torch.testing.assert_close(text_embeddings(model, tokenizer, SENTENCES), text_ref, atol=1e-5, rtol=1e-5)
    # Chinese-CLIP's transform at the checkpoint's size: bicubic, no crop, OpenAI mean/std
    for proc in (processor, processor_of(init_dir)):
        assert proc.size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE} and not proc.do_center_crop
        assert proc.resample == 3
        assert np.allclose(proc.image_mean, [0.48145466, 0.4578275, 0.40821073])
        assert np.allclose(proc.image_std, [0.26862954, 0.26130258, 0.27577711])
    # and its pixels are cn_clip's image_transform's within one grey level (resize rounding)
    import io

    from PIL import Image
    from cn_clip.clip.utils import image_transform

    from mmcn.models.pixels.clip import pixel_values

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    ours = pixel_values(processor, [buf.getvalue()])[0]
    theirs = image_transform(IMAGE_SIZE)(img)
    assert ours.shape == theirs.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - theirs).abs().max() <= 1.001 / 255 / min(processor.image_std)


def test_fp16_checkpoint(reference, tmp_path):
    """cn_clip's released weights may be half precision (its convert_weights): read into float32."""
    from mmcn.models.pixels import cn_clip

    half = {"module." + k: v.half() for k, v in reference.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": half}, tmp_path / "half.pt")
    model = cn_clip.load_model(tmp_path / "half.pt")
    assert model.visual_projection.weight.dtype == torch.float32
    expected = reference.visual.proj.detach().half().float().t()
    assert torch.equal(model.visual_projection.weight, expected)


def test_convert_clip_cli_writes_a_hf_folder(reference, init_dir, tmp_path, capsys):
    from transformers import ChineseCLIPModel

    from mmcn.cli import main
    from mmcn.models.pixels.clip import load_clip

    out = tmp_path / "hf"
    assert main(["convert-clip", str(init_dir / "clip_cn_tiny.pt"), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file()
    assert (out / "vocab.txt").read_bytes() == cn_vocab().read_bytes()
    plain = ChineseCLIPModel.from_pretrained(str(out), local_files_only=True).eval()
    model, tokenizer, processor = load_clip(out)
    assert processor.size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    check_against_reference(model, tokenizer, reference)
    check_against_reference(plain, tokenizer, reference)
    # --vocab elsewhere; no vocab anywhere: an error saying what to do
    lone = save_checkpoint(reference, tmp_path / "lone" / "clip.pt")
    assert main(["convert-clip", str(lone), "--out", str(tmp_path / "hf2"), "--vocab", str(cn_vocab())]) == 0
    capsys.readouterr()
    assert main(["convert-clip", str(lone), "--out", str(tmp_path / "hf3")]) == 2
    err = capsys.readouterr().err
    assert "vocab.txt" in err and str(lone) in err and "--vocab" in err
    assert main(["convert-clip", str(lone), "--out", str(out), "--vocab", str(cn_vocab())]) == 2  # out not empty
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("drop, extra, named", [
    ("visual.transformer.resblocks.1.attn.in_proj_bias", None, "visual.transformer.resblocks.1.attn.in_proj_bias"),
    ("bert.encoder.layer.0.output.LayerNorm.weight", None, "bert.encoder.layer.0.output.LayerNorm.weight"),
    ("logit_scale", None, "logit_scale"),
    (None, "visual.extra_head.weight", "visual.extra_head.weight"),
    (None, "bert.encoder.layer.0.attention.self.rotary.weight", "bert.encoder.layer.0.attention.self.rotary.weight"),
])
def test_missing_or_extra_key_is_named(reference, tmp_path, drop, extra, named):
    from mmcn.models.pixels import cn_clip

    path = save_checkpoint(reference, tmp_path / "bad.pt", drop=drop, extra=extra)
    with pytest.raises(ValueError) as e:
        cn_clip.load_model(path)
    assert named in str(e.value) and str(path) in str(e.value)
    assert ("missing" if drop else "no ChineseCLIPModel weight takes") in str(e.value)


def test_pooler_is_ignored_and_bad_files_refused(reference, tmp_path):
    """BERT's pooler (in some released files) is dropped as cn_clip drops it; a file that is no
    checkpoint, two .pt in one folder, a vocabulary of another size: errors naming the file."""
    from mmcn.models.pixels import cn_clip

    path = save_checkpoint(reference, tmp_path / "pooler" / "p.pt", extra="bert.pooler.dense.bias")
    cn_clip.load_model(path)  # no error
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        cn_clip.read_checkpoint(tmp_path / "junk.pt")
    shutil.copy(path, tmp_path / "pooler" / "q.pt")
    with pytest.raises(ValueError, match="p.pt, q.pt"):
        cn_clip.find_checkpoint(tmp_path / "pooler")
    (tmp_path / "pooler" / "q.pt").unlink()
    (tmp_path / "pooler" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="5 tokens, but .* embeds 21128"):
        cn_clip.load(path)


def test_train_at_clip_starts_from_the_checkpoint_folder(reference, init_dir, tmp_path, ray_session):
    """The shared training loop with clip.model.init = the .pt folder (as stages/train.py passes
    it): the tokenizer is cn_clip's vocabulary, the processor the checkpoint's size, and the
    steps start from the checkpoint's weights (one step at lr 1e-12 leaves them as cn_clip's)."""
    import io

    from PIL import Image

    from mmcn.data import tsv
    from mmcn.data.lmdb_build import build_lmdb
    from mmcn.models.pixels.clip import load_clip
    from mmcn.train.loop import ModelSpec, TrainConfig, train

    root = tmp_path / "data"
    (root / "tsv").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        with tsv.TsvWriter(tsv.imgs_path(root / "tsv", split)) as w:
            for k in range(4):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(buf, "PNG")
                w.write(100 + k, tsv.pybase64.b64encode(buf.getvalue()))
        tsv.write_texts(tsv.texts_path(root / "tsv", split),
                        [tsv.Text(10 + k, SENTENCES[k], [100 + k]) for k in range(4)])
    build_lmdb(root / "tsv", root / "lmdb")
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-12, warmup_ratio=0.0, weight_decay=0.0, checkpoint_every=1000,
                      workers=0, seed=0)
    summary = train(ModelSpec("clip", "tiny", init=str(init_dir), settings={"image_size": 64, "embed_dim": 16}),
                    root / "lmdb", tmp_path / "clip", cfg, tmp_path / "ray")
    assert summary["steps"] == 1
    model, tokenizer, processor = load_clip(tmp_path / "clip")
    assert len(tokenizer) == 21128 and processor.size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert model.config.projection_dim == 32  # the checkpoint's, not the settings'
    check_against_reference(model, tokenizer, reference)
    # evaluate@clip: the zero-shot score of the .pt folder it started from (converted on the fly)
    # is the fine-tuned one's (one step at lr 1e-12 changed nothing)
    from mmcn.eval.evaluate import EvalConfig, evaluate_clip

    metrics = evaluate_clip(tmp_path / "clip", root / "lmdb", tmp_path / "report", EvalConfig(batch_size=4))
    assert metrics["zero_shot"]["mean_recall"] == metrics["mean_recall"]
    assert (tmp_path / "report/zero_shot/test_imgs.img_feat.jsonl").is_file()


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"])
def test_released_architectures_are_inferred(name):
    """cn_clip's released ViT models (their _MODEL_INFO structs and model_configs/*.json), built
    on the meta device (shapes only): the inferred config is the JSON's (heads: the ViT's width
    over its vision_head_width, 64 unless the JSON says, as cn_clip's CLIP computes them) and
    every key maps."""
    import json

    from cn_clip.clip.utils import _MODEL_INFO

    from mmcn.models.pixels import cn_clip

    cn_model, _ = _cn_clip()
    configs = Path(cn_model.__file__).parent / "model_configs"
    vision, text = _MODEL_INFO[name]["struct"].split("@")
    info = {**json.loads((configs / f"{vision}.json").read_text()), **json.loads((configs / f"{text}.json").read_text())}
    with torch.device("meta"):
        state = cn_model.CLIP(**info).state_dict()
    config = cn_clip.infer_config(state, name)
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == (
        info["vision_width"], info["vision_layers"], info["vision_patch_size"], _MODEL_INFO[name]["input_resolution"])
    assert v.num_attention_heads == info["vision_width"] // info.get("vision_head_width", 64)
    assert v.intermediate_size == 4 * info["vision_width"] and config.projection_dim == info["embed_dim"]
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size,
            t.max_position_embeddings, t.type_vocab_size) == (
        info["vocab_size"], info["text_hidden_size"], info["text_num_hidden_layers"], info["text_num_attention_heads"],
        info["text_intermediate_size"], info["text_max_position_embeddings"], info["text_type_vocab_size"])
    # each fused in_proj weight and bias becomes q, k, v: 4 more tensors per ViT layer, nothing else gained or lost
    assert len(cn_clip.to_hf_state_dict(state, config, name)) == len(state) + 4 * info["vision_layers"]


def test_the_train_stage_takes_a_checkpoint_folder_as_init(init_dir, tmp_path):
    """stages/train.py's clip.model.init: a folder with a .pt (and vocab.txt) is starting weights
    for clip only; without vocab.txt it stops, saying what to add."""
    import importlib.util
    import sys

    stages = Path(__file__).resolve().parents[1] / "stages"
    if str(stages) not in sys.path:
        sys.path.insert(0, str(stages))
    spec = importlib.util.spec_from_file_location("_stage_train_cn_clip", stages / "train.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    assert stage.init_dir(init_dir, "clip") == str(init_dir)
    assert stage.init_dir(init_dir, "caption") == ""  # only Chinese-CLIP has this format
    assert stage.init_dir(tmp_path, "clip") == ""  # empty: from scratch
    (tmp_path / "clip_cn_vit-b-16.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        stage.init_dir(tmp_path, "clip")
