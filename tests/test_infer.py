"""One-line inference: raw files through the pipeline's chain give the pipeline's own
results; the CLI's lines, JSON, globs, directories and bad files; image search."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

import mmcn
from mmcn.cli import main
from mmcn.data.eval_files import read_caption_predictions
from mmcn.data.manifest import manifest_path, read_manifest
from mmcn.infer import Captioner, ChainConfig, Decoding, Searcher, expand_images
from mmcn.text.translate import TranslateConfig
from mmcn.vision.extract import ExtractConfig

ROOT = Path(__file__).resolve().parents[1]
# the settings chain_project ran the pipeline with (conftest.py)
CHAIN = ChainConfig(ExtractConfig(min_boxes=3, max_boxes=6, batch_size=4), TranslateConfig(max_attributes=2),
                    overrides=str(ROOT / "data/labels_zh_overrides.tsv"), max_side=48)
DECODING = Decoding(num_beams=2, max_length=8)


def raw_test_images(project: Path) -> dict[Path, int]:
    """Raw test image path -> its image id (from the ingest manifest)."""
    return {project / "raw" / e.source: e.image_id for e in read_manifest(manifest_path(project / "tsv", "test"))}


@pytest.fixture(scope="module")
def captioner(chain_project):
    return Captioner.from_dir(chain_project / "models/caption", chain_project / "models/detector", CHAIN, DECODING,
                              device="cpu", batch_size=5)


def test_raw_files_get_the_captions_the_evaluation_stage_gave(chain_project, captioner):
    images = raw_test_images(chain_project)
    expected = {p.image_id: p.caption for p in read_caption_predictions(chain_project / "reports/caption/predictions.jsonl")}
    paths = sorted(images)
    results = captioner.caption(paths)
    assert [r.source for r in results] == [str(p) for p in paths]
    assert all(not r.error and r.tags for r in results)
    assert {images[p]: r.caption for p, r in zip(paths, results)} == {images[p]: expected[images[p]] for p in paths}
    assert captioner([p.read_bytes() for p in paths[:2]]) == [r.caption for r in results[:2]]


def test_a_bad_image_is_reported_not_fatal(chain_project, captioner, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    good = sorted(raw_test_images(chain_project))[0]
    results = captioner.caption([bad, good])
    assert results[0].error.startswith("not an image: PIL recognises no image format") and results[0].source == str(bad)
    assert results[1].caption and not results[1].error
    with pytest.raises(ValueError, match="broken.jpg"):
        captioner([bad])


def test_expand_images_takes_files_directories_and_globs(chain_project, tmp_path):
    test_dir = chain_project / "raw/test/images"
    (tmp_path / "notes.txt").write_text("not an image")
    paths, missing = expand_images([test_dir, str(test_dir / "00000[0-1].jpg"), tmp_path, tmp_path / "nope.jpg"])
    assert len(paths) == 12 and paths == sorted(paths)  # the glob's two files are already in the directory's
    assert [m.source for m in missing] == [str(tmp_path), str(tmp_path / "nope.jpg")]


def write_params(path: Path, **features) -> Path:
    """A params.yaml with the pipeline sections the CLI takes its chain settings from."""
    import yaml

    path.write_text(yaml.safe_dump({
        "ingest": {"max_side": 48}, "features": {"min_boxes": 3, "max_boxes": 6, "batch_size": 4, **features},
        "translate": {"overrides": CHAIN.overrides, "unknown": "keep", "max_attributes": 2},
        "caption": {"eval": {"num_beams": 2, "max_length": 8}}}))
    return path


def test_cli_caption_prints_one_line_per_image_and_skips_bad_files(chain_project, captioner, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", max_pixels=50_000)
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    big = tmp_path / "big.png"   # 320x240 = 76800 pixels, over the params' features.max_pixels
    Image.new("RGB", (320, 240)).save(big)
    test_dir = chain_project / "raw/test/images"
    models = chain_project / "models"
    common = ["--model", str(models / "caption"), "--detector", str(models / "detector"), "--params", str(params),
              "--device", "cpu"]
    code = main(["caption", str(test_dir / "00000[0-2].jpg"), str(bad), str(big), *common])
    out, err = capsys.readouterr()
    assert code == 1  # something was skipped
    lines = [line.split("\t") for line in out.splitlines()]
    expected = captioner.caption(sorted(test_dir.glob("00000[0-2].jpg")))
    assert [(path, caption) for path, caption, _ in lines] == [(r.source, r.caption) for r in expected]
    assert all(float(score) < 0 for _, _, score in lines)
    assert f"skipped {bad}: empty file (0 bytes)\n" in err  # the words ingest and features use too
    assert (f"skipped {big}: image of 320x240 = 0.077 MP exceeds max_pixels=50000: raise features.max_pixels or "
            "downscale it\n") in err

    assert main(["caption", str(test_dir), "--json", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"image", "caption", "score", "tags"}

    assert main(["caption", str(tmp_path / "missing.jpg"), *common]) == 2
    assert main(["caption", str(test_dir), *common[:5], str(tmp_path / "nope.yaml"), *common[6:]]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    assert main(["caption", str(test_dir), *common[:1], str(tmp_path / "no-model"), *common[2:]]) == 2
    assert "dvc repro" in capsys.readouterr().err


def test_search_ranks_raw_files_as_the_stored_features(chain_project, tmp_path, capsys):
    images = raw_test_images(chain_project)
    searcher = Searcher.from_dir(chain_project / "models/retrieval", chain_project / "models/detector", CHAIN, "cpu")
    assert searcher.index_images(sorted(images)) == []
    stored = Searcher.from_dir(chain_project / "models/retrieval", None, device="cpu")
    assert stored.index_lmdb(chain_project / "lmdb/test") == 12
    query = "一个红色的圆形"
    from_files = [(images[Path(h.name)], round(h.score, 4)) for h in searcher.search(query, k=12)]
    from_store = [(int(h.name), round(h.score, 4)) for h in stored.search(query, k=12)]
    assert from_files == from_store and [h.rank for h in stored.search(query, k=3)] == [1, 2, 3]

    assert main(["search", query, "--lmdb", str(chain_project / "lmdb/test"), "--model",
                 str(chain_project / "models/retrieval"), "--top-k", "3", "--json", "--device", "cpu"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(int(h["image"]), h["score"]) for h in hits] == from_store[:3]


def test_search_names_unknown_characters_and_refuses_a_query_of_only_them(chain_project, capsys, caplog):
    import logging

    from mmcn.models.tokenizer import load_tokenizer

    model = chain_project / "models/retrieval"
    vocab = load_tokenizer(model).get_vocab()
    assert not {"猫", "狗", "鸟"} & set(vocab) and {"红", "色", "的"} <= set(vocab)  # the demo's captions: shapes
    stored = Searcher.from_dir(model, None, device="cpu")
    stored.index_lmdb(chain_project / "lmdb/test")
    with caplog.at_level(logging.WARNING, logger="mmcn.infer"):
        assert len(stored.search("红色的猫", k=3)) == 3
    assert "query '红色的猫': 1 of its 4 tokens are not in the model's vocabulary and read as [UNK]: 猫×1" in caplog.text
    with pytest.raises(ValueError, match=r"none of its characters is in the model's vocabulary \(猫×1 狗×1 鸟×1\)"):
        stored.search("猫狗鸟")
    capsys.readouterr()
    assert main(["search", "猫狗鸟", "--lmdb", str(chain_project / "lmdb/test"), "--model", str(model),
                 "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "error: query '猫狗鸟': none of its characters is in the model's vocabulary" in err


def test_the_api_is_importable_from_the_package():
    assert mmcn.Captioner is Captioner and mmcn.Searcher is Searcher


def test_a_model_folder_carries_its_chain_settings_anywhere(chain_project, tmp_path, monkeypatch, capsys):
    """The settings of ingest (max_side 48), features (3-6 boxes) and translate (2 attributes,
    the override rows) travel through the data into mmcn.json: a copy of the model folder,
    used from a folder without the pipeline's params, gives the evaluation stage's captions."""
    record = json.loads((chain_project / "models/caption/mmcn.json").read_text(encoding="utf-8"))["chain"]
    assert record["ingest"]["max_side"] == 48
    assert (record["features"]["min_boxes"], record["features"]["max_boxes"]) == (3, 6)
    assert record["translate"]["max_attributes"] == 2 and record["translate"]["overrides"]  # the rows, not a path
    copied = tmp_path / "elsewhere/caption"
    shutil.copytree(chain_project / "models/caption", copied)
    images = raw_test_images(chain_project)
    paths = sorted(images)[:4]
    expected = {p.image_id: p.caption for p in read_caption_predictions(chain_project / "reports/caption/predictions.jsonl")}
    captioner = Captioner.from_dir(copied, chain_project / "models/detector", decoding=DECODING, device="cpu")
    assert [r.caption for r in captioner.caption(paths)] == [expected[images[p]] for p in paths]

    monkeypatch.chdir(tmp_path)  # decoding from ./params.yaml, the chain from the model folder alone
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"caption": {"eval": {"num_beams": 2, "max_length": 8}}}))
    assert main(["caption", *map(str, paths), "--model", str(copied), "--detector",
                 str(chain_project / "models/detector"), "--device", "cpu"]) == 0
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == [expected[images[p]] for p in paths]


def test_search_caches_the_image_index_by_file_content_and_model(chain_project, tmp_path, monkeypatch, caplog):
    """A second index of the same files runs no detector (nor loads it) and ranks as the first;
    a changed image goes through the detector alone; a rewritten model file invalidates all."""
    from mmcn.infer import RegionChain

    folder, models, cache = tmp_path / "images", tmp_path / "models", tmp_path / "cache"
    folder.mkdir()
    for path in sorted(raw_test_images(chain_project))[:4]:
        shutil.copy(path, folder / path.name)
    shutil.copytree(chain_project / "models/retrieval", models / "retrieval")
    detected: list[str] = []
    real_call = RegionChain.__call__

    def counting(self, images):
        detected.extend(Path(str(im)).name for im in images)
        return real_call(self, images)

    monkeypatch.setattr(RegionChain, "__call__", counting)

    def index(cache_dir=cache) -> Searcher:
        searcher = Searcher.from_dir(models / "retrieval", chain_project / "models/detector", CHAIN, "cpu")
        assert searcher.index_images(sorted(folder.iterdir()), cache_dir=cache_dir) == []
        return searcher

    def ranking(searcher: Searcher) -> list:
        return [(Path(h.name).name, round(h.score, 5)) for h in searcher.search("一个红色的圆形", k=4)]

    first = index()
    assert sorted(detected) == sorted(p.name for p in folder.iterdir()) and len(list(cache.glob("*.npz"))) == 1
    caplog.set_level("INFO", logger="mmcn.infer")
    second = index()
    assert len(detected) == 4 and second._chain is None  # no detector loaded, none run
    assert "4 of 4 images from the cache" in caplog.text
    assert ranking(second) == ranking(first) == ranking(index(cache_dir=None))  # as without a cache
    detected.clear()

    changed = sorted(folder.iterdir())[1]
    with Image.open(changed) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=95)
    third = index()
    assert detected == [changed.name]
    assert ranking(third) == ranking(index(cache_dir=None))
    detected.clear()

    config = models / "retrieval/config.json"
    config.write_bytes(config.read_bytes())  # the same bytes, a new file: the model may have changed
    index()
    assert len(detected) == 4 and len(list(cache.glob("*.npz"))) == 2
    detected.clear()

    from mmcn import provenance  # another mmcn: code that computes the entries changed
    extra = tmp_path / "code.py"
    extra.write_text("version = 2\n")
    walk = provenance.code_files
    monkeypatch.setattr(provenance, "code_files", lambda target: [*walk(target), extra])
    index()
    assert len(detected) == 4 and len(list(cache.glob("*.npz"))) == 3


def test_the_index_cache_file_keeps_embeddings_and_matcher_items_without_pickle(tmp_path, caplog):
    import numpy as np
    import torch

    from mmcn.infer import IndexCache

    cache = IndexCache(tmp_path / "c", "dual")
    rows = {"a" * 64: np.arange(4, dtype=np.float32), "b" * 64: np.ones(4, np.float32)}
    cache.save(rows)
    got = cache.load()
    assert list(got) == list(rows) and all(np.array_equal(got[k], rows[k]) for k in rows)

    items = {"c" * 64: {"image_id": 7, "tags": "红色 圆形", "features": torch.rand(3, 2054)},
             "d" * 64: {"image_id": -2, "tags": "", "features": torch.rand(1, 2054)}}
    matcher = IndexCache(tmp_path / "c", "matcher")
    matcher.save(items)
    with np.load(matcher.path, allow_pickle=False) as z:  # plain arrays only
        assert sorted(z.files) == ["features", "image_id", "offsets", "sha256", "tags"]
    back = matcher.load()
    for key, item in items.items():
        assert back[key]["image_id"] == item["image_id"] and back[key]["tags"] == item["tags"]
        assert torch.equal(back[key]["features"], item["features"])

    matcher.path.write_bytes(b"not a zip")  # a damaged file: indexed again, with a warning
    assert matcher.load() == {} and "unreadable" in caplog.text
