"""Task clip (Chinese-CLIP on pixels): a tiny model overfits a handful of pairs through the
shared Ray Train loop, its folder loads with plain transformers, the zero-shot path with a
tiny saved Hugging Face folder as init, Chinese-CLIP's feature files read back, and the
gathered InfoNCE of two workers equals the loss of their global batch on one."""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# (mmcn, PIL: imported in the tests, so that the gather test's spawned workers start fast)

COLOURS = {"红色": (220, 30, 30), "绿色": (30, 200, 40), "蓝色": (30, 40, 220), "黄色": (230, 220, 20),
           "黑色": (10, 10, 10), "白色": (250, 250, 250)}
SHAPES = ("圆", "方块")
IMAGE_SIZE = 32


def image_bytes(colour: tuple[int, int, int], shape: str) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (40, 36), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "圆" else draw.rectangle)((6, 6, 34, 30), fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory) -> Path:
    """Six images (a coloured shape each) with one caption each, the same in every split."""
    from mmcn.data import tsv
    from mmcn.data.lmdb_build import build_lmdb

    root = tmp_path_factory.mktemp("clip-data")
    (root / "tsv").mkdir()
    pairs = [(name, SHAPES[k % 2]) for k, name in enumerate(COLOURS)]
    for split in ("train", "valid", "test"):
        with tsv.TsvWriter(tsv.imgs_path(root / "tsv", split)) as w:
            for k, (name, shape) in enumerate(pairs):
                w.write(100 + k, tsv.pybase64.b64encode(image_bytes(COLOURS[name], shape)))
        tsv.write_texts(tsv.texts_path(root / "tsv", split),
                        [tsv.Text(10 + k, f"一个{name}的{shape}", [100 + k]) for k, (name, shape) in enumerate(pairs)])
    build_lmdb(root / "tsv", root / "lmdb")
    return root / "lmdb"


def tiny_settings(**over) -> dict:
    return {"image_size": IMAGE_SIZE, "embed_dim": 32, "max_text_len": 16, **over}


def ranks_are_perfect(texts: np.ndarray, images: np.ndarray) -> tuple[bool, bool]:
    """Every text's best image is its own (row k <-> row k), and every image's best text."""
    scores = texts @ images.T
    return bool((scores.argmax(1) == np.arange(len(texts))).all()), bool((scores.argmax(0) == np.arange(len(texts))).all())


@pytest.fixture(scope="module")
def trained(lmdb_dir, tmp_path_factory) -> tuple[Path, dict]:
    from mmcn.train.loop import ModelSpec, TrainConfig, train

    out = tmp_path_factory.mktemp("clip-model")
    cfg = TrainConfig(epochs=60, batch_size=6, lr=2e-3, warmup_ratio=0.0, weight_decay=0.0, checkpoint_every=1000,
                      workers=0, cpus_per_worker=1, seed=0)
    summary = train(ModelSpec("clip", "tiny", settings=tiny_settings()), lmdb_dir, out / "clip", cfg, out / "ray")
    return out / "clip", summary


def test_a_tiny_clip_overfits_a_handful_of_pairs(trained, lmdb_dir):
    from mmcn.models.pixels.datasets import ClipDataset
    from mmcn.models.pixels.clip import ClipEncoder

    model_dir, summary = trained
    assert summary["steps"] == 60 and summary["train"][-1]["loss"] < summary["train"][0]["loss"]
    assert summary["valid"][-1]["valid_t2i_r1"] == 100.0 and summary["valid"][-1]["valid_i2t_r1"] == 100.0
    encoder, data = ClipEncoder.from_dir(model_dir), ClipDataset(lmdb_dir / "test")
    texts = encoder.texts([data.text(k)["text"] for k in range(6)])
    images = encoder.images([data.image(k) for k in range(6)])
    assert ranks_are_perfect(texts, images) == (True, True)  # R@1 = 100 both ways
    scale = json.loads((model_dir / "mmcn.json").read_text())
    assert scale["task"] == "clip"


def test_the_folder_loads_with_plain_transformers(trained, lmdb_dir):
    from PIL import Image
    from transformers import AutoTokenizer, ChineseCLIPImageProcessor, ChineseCLIPModel

    from mmcn.models.pixels.clip import image_embeddings, load_clip, pixel_values

    model_dir, _ = trained
    plain = ChineseCLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(model_dir), ChineseCLIPImageProcessor.from_pretrained(model_dir)
    assert processor.size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE} and not processor.do_center_crop
    ours, our_tokenizer, our_processor = load_clip(model_dir)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in ours.state_dict().items())
    data = [image_bytes(COLOURS["红色"], "圆"), image_bytes(COLOURS["蓝色"], "方块")]
    with torch.no_grad():
        expected = plain.get_image_features(pixel_values=pixel_values(processor, data)).pooler_output
    assert torch.allclose(image_embeddings(ours, our_processor, data), expected, atol=1e-6)
    assert our_tokenizer("一个红色的圆")["input_ids"] == tokenizer("一个红色的圆")["input_ids"]
    # Chinese-CLIP's transform: bicubic resize to the square side, OpenAI CLIP's mean/std (computed here by hand)
    img = Image.open(io.BytesIO(data[0])).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    by_hand = (torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
               - torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]) \
        / torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    assert (pixel_values(processor, data[:1])[0] - by_hand).abs().mean() < 0.05  # resampler implementations differ


def test_mmcn_search_ranks_raw_images_with_the_clip_model(trained, tmp_path, capsys):
    from mmcn.cli import main

    model_dir, _ = trained
    (tmp_path / "images").mkdir()
    for k, name in enumerate(COLOURS):
        (tmp_path / "images" / f"{k}.jpg").write_bytes(image_bytes(COLOURS[name], SHAPES[k % 2]))
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image")
    args = ["search", "一个蓝色的圆", "--model", str(model_dir), "--images", str(tmp_path / "images"), "--top-k", "2",
            "--json", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0  # no detector folder anywhere: the CLIP reads the pixels
    out = capsys.readouterr()
    hits = [json.loads(line) for line in out.out.splitlines()]
    assert Path(hits[0]["image"]).name == "2.jpg" and len(hits) == 2  # 蓝色 is the third colour, a circle
    assert "broken.jpg" in out.err
    assert main(args) == 0 and [json.loads(line) for line in capsys.readouterr().out.splitlines()] == hits  # cached


def save_hf_clip(folder: Path, texts: list[str]) -> None:
    """A tiny Chinese-CLIP folder as Hugging Face writes one (plain ChineseCLIPModel, a BERT
    tokenizer, the image processor): what a downloaded chinese-clip-vit-base-patch16 looks like."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    from mmcn.models.pixels.clip import image_processor
    from mmcn.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(texts)
    torch.manual_seed(3)
    config = ChineseCLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 64},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": IMAGE_SIZE, "patch_size": 16},
        projection_dim=16)
    ChineseCLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(IMAGE_SIZE).save_pretrained(folder)


def test_zero_shot_and_fine_tuned_from_a_saved_hf_folder_with_chinese_clip_files(lmdb_dir, tmp_path, ray_session):
    from mmcn.data.eval_files import feature_paths, read_features, read_retrieval_predictions
    from mmcn.eval.evaluate import EvalConfig, evaluate_clip
    from mmcn.models.pixels.clip import ClipEncoder
    from mmcn.train.loop import ModelSpec, TrainConfig, train

    init = tmp_path / "init"
    save_hf_clip(init, [f"一个{c}的{s}" for c in COLOURS for s in SHAPES])
    cfg = TrainConfig(epochs=2, batch_size=3, grad_accum=2, lr=1e-3, checkpoint_every=1000, workers=0, seed=0)
    summary = train(ModelSpec("clip", "tiny", init=str(init), settings=tiny_settings()), lmdb_dir, tmp_path / "clip",
                    cfg, tmp_path / "ray")
    assert summary["steps"] == 2  # 6 pairs, micro-batches of 3, one contrastive batch of 6 per step
    metrics = evaluate_clip(tmp_path / "clip", lmdb_dir, tmp_path / "out", EvalConfig(batch_size=4))  # init: mmcn.json
    assert set(metrics) >= {"t2i", "i2t", "mean_recall", "zero_shot"}
    assert set(metrics["t2i"]) == {"r1", "r5", "r10", "mean_recall"}

    # the feature files are Chinese-CLIP's; expectations from the init model itself
    zero = ClipEncoder.from_dir(init)
    image_file, text_file = feature_paths(tmp_path / "out" / "zero_shot", "test")
    assert image_file.name == "test_imgs.img_feat.jsonl" and text_file.name == "test_texts.txt_feat.jsonl"
    images, texts = read_features(image_file, "image_id"), read_features(text_file, "text_id")
    assert sorted(images) == list(range(100, 106)) and sorted(texts) == list(range(10, 16))
    from mmcn.models.pixels.datasets import ClipDataset

    data = ClipDataset(lmdb_dir / "test")
    want_img = zero.images([data.image(k) for k in range(6)])
    want_txt = zero.texts([data.text(k)["text"] for k in range(6)])
    got_img = np.array([images[data.image(k)["image_id"]] for k in range(6)])
    got_txt = np.array([texts[data.text(k)["text_id"]] for k in range(6)])
    assert np.allclose(got_img, want_img, atol=1e-5) and np.allclose(got_txt, want_txt, atol=1e-5)
    assert np.allclose(np.linalg.norm(got_img, axis=1), 1, atol=1e-5)
    # top-k files (make_topk_predictions.py): each text's images by cosine, best first
    preds = read_retrieval_predictions(tmp_path / "out" / "zero_shot" / "t2i_predictions.jsonl", "t2i", k=6)
    for k in range(6):
        order = np.argsort(-(want_txt[k] @ want_img.T), kind="stable")
        assert preds[10 + k].ranked_ids[:3] == [100 + int(i) for i in order[:3]]
    # zero-shot recall computed here from the files: R@1 of t2i is the share of texts whose best image is theirs
    hits = sum(preds[10 + k].ranked_ids[0] == 100 + k for k in range(6))
    assert metrics["zero_shot"]["t2i"]["r1"] == pytest.approx(100 * hits / 6, abs=1e-3)


def test_feature_file_errors_name_the_line(tmp_path):
    from mmcn.data.eval_files import EvalFileError, read_features

    path = tmp_path / "test_imgs.img_feat.jsonl"
    path.write_text('{"image_id": 1, "feature": [0.1, 0.2]}\n{"image_id": 2, "feature": [0.1]}\n')
    with pytest.raises(EvalFileError, match=r"img_feat.jsonl:2: image_id 2 has 1 values"):
        read_features(path, "image_id")
    path.write_text('{"image_id": "a", "feature": [0.1]}\n')
    with pytest.raises(EvalFileError, match=r":1: \"image_id\" must be an integer"):
        read_features(path, "image_id")


def test_accumulated_micro_batches_give_the_gradients_of_one_contrastive_batch():
    """Chinese-CLIP's accum_freq: 2 micro-batches of 3 pairs train as one batch of 6 (the tiny
    model has no dropout, so both passes see the same features)."""
    from contextlib import nullcontext

    from mmcn.models.pixels.clip import ClipCollator, accumulated_step, build_clip, image_processor
    from mmcn.models.tokenizer import build_tokenizer

    texts = [f"一个{c}的{s}" for c, s in zip(COLOURS, SHAPES * 3)]
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    model = build_clip(len(tokenizer), "tiny", image_size=IMAGE_SIZE, embed_dim=16, max_text_len=16).train()
    collate = ClipCollator(tokenizer, image_processor(IMAGE_SIZE), 16)
    items = [{"image": image_bytes(COLOURS[c], s), "text": t, "image_id": k}
             for k, (c, s, t) in enumerate(zip(COLOURS, SHAPES * 3, texts))]
    whole = model(**collate(items)).loss
    whole.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss = accumulated_step(model, [collate(items[:3]), collate(items[3:])], nullcontext())
    assert loss.item() == pytest.approx(whole.item(), rel=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 10
    # every pass backpropagates the whole loss, so the logit scale's gradient comes once per
    # micro-batch (Chinese-CLIP's get_loss per accum chunk does the same); the weights' once
    assert torch.allclose(got.pop("logit_scale"), 2 * want.pop("logit_scale"), rtol=1e-4)
    assert all(torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4) for n in want)


# --------------------------------------------------------------------------- InfoNCE over gathered features

def reference_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE written out: for each row i, -log softmax of the scaled
    cosines at the diagonal, image->text over row i, text->image over column i; the mean of both."""
    image = image / image.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    n = len(image)
    sims = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-(sims[i][i] - math.log(sum(math.exp(s) for s in sims[i]))) for i in range(n)) / n
    t2i = sum(-(sims[i][i] - math.log(sum(math.exp(sims[j][i]) for j in range(n)))) for i in range(n)) / n
    return torch.tensor((i2t + t2i) / 2)


def _shard_worker(rank: int, world: int, store: str, image: torch.Tensor, text: torch.Tensor, scale: float,
                  out: str) -> None:
    """One simulated worker: its rows of the global batch, the gathered loss and its local
    features' gradient, with and without gradient through the gather."""
    import torch.distributed as dist

    from mmcn.models.pixels.contrastive import contrastive_loss, gather_features

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = slice(rank * len(image) // world, (rank + 1) * len(image) // world)
    result = {}
    for with_grad in (False, True):
        img = torch.nn.functional.normalize(image[rows], dim=1).requires_grad_(True)
        txt = torch.nn.functional.normalize(text[rows], dim=1)
        all_img, all_txt = gather_features(img, txt, with_grad)
        loss, _ = contrastive_loss(all_img, all_txt, torch.tensor(math.log(scale)))
        loss.backward()
        result[with_grad] = {"loss": loss.detach(), "grad": img.grad}
    torch.save({"plain": result[False], "with_grad": result[True]}, f"{out}-{rank}.pt")
    dist.destroy_process_group()


def test_gathered_loss_of_two_shards_equals_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    from mmcn.models.pixels.contrastive import contrastive_loss

    torch.manual_seed(0)
    image, text, scale = torch.randn(8, 5), torch.randn(8, 5), 20.0
    # one worker, the global batch
    img = torch.nn.functional.normalize(image, dim=1).requires_grad_(True)
    txt = torch.nn.functional.normalize(text, dim=1)
    loss, _ = contrastive_loss(img, txt, torch.tensor(math.log(scale)))
    loss.backward()
    assert loss.item() == pytest.approx(reference_loss(image, text, scale).item(), rel=1e-5)
    # two simulated workers (gloo processes), 4 rows each
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "store"), image, text, scale, str(tmp_path / "r")), nprocs=2,
             join=True)
    for rank in (0, 1):
        shard = torch.load(tmp_path / f"r-{rank}.pt", weights_only=True)
        for mode, factor in (("plain", 1), ("with_grad", 2)):
            assert shard[mode]["loss"].item() == pytest.approx(loss.item(), rel=1e-5)  # every worker: the global loss
            # the local features' gradient is the global loss's; with gradient through the
            # gather, each worker's copy of the loss adds its share: world x that
            want = img.grad[rank * 4:(rank + 1) * 4] * factor
            assert torch.allclose(shard[mode]["grad"], want, atol=1e-6), mode


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
