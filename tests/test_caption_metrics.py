"""Caption metrics: parity with pycocoevalcap 1.2 (random sets and edge cases), tokenizers, `mmcn eval-captions`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from mmcn.cli import main as cli_main
from mmcn.eval.caption_metrics import METRICS, CaptionMatchError, score_captions
from mmcn.text.segment import tokenize

TOLERANCE = 1e-9


def coco_scores(refs: dict, preds: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """pycocoevalcap's corpus and per-image scores for the same tokens, space-joined."""
    gts = {i: [" ".join(r) for r in refs[i]] for i in refs}
    res = {i: [" ".join(preds[i])] for i in refs}
    bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_images = Rouge().compute_score(gts, res)
    cider, cider_images = Cider().compute_score(gts, res)
    corpus = {**{f"Bleu_{k + 1}": bleu[k] for k in range(4)}, "ROUGE_L": rouge, "CIDEr": cider}
    images = {**{f"Bleu_{k + 1}": np.array(bleu_images[k]) for k in range(4)}, "ROUGE_L": np.array(rouge_images),
              "CIDEr": np.array(cider_images)}
    return corpus, images


def assert_parity(refs: dict, preds: dict) -> None:
    ours = score_captions(refs, preds)
    corpus, images = coco_scores(refs, preds)
    assert ours.image_ids == list(refs)
    for key in METRICS:
        assert abs(ours.corpus[key] - corpus[key]) <= TOLERANCE, key
        assert ours.per_image[key].shape == images[key].shape, key
        assert np.abs(ours.per_image[key] - images[key]).max() <= TOLERANCE, key


def random_captions(seed: int, n_images: int = 200, vocab: int = 50, max_len: int = 20) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]

    def sentence(lo: int, hi: int) -> list[str]:
        # a skewed distribution, so that n-grams repeat within and across images
        return [words[j] for j in np.minimum(rng.geometric(0.15, rng.integers(lo, hi + 1)) - 1, vocab - 1)]

    refs = {f"img{i}": [sentence(1, max_len) for _ in range(rng.integers(1, 6))] for i in range(n_images)}
    preds = {}
    for i, image in enumerate(refs):
        if i % 4 == 0:  # near-copies of a reference
            preds[image] = list(refs[image][0][: rng.integers(1, len(refs[image][0]) + 1)])
        else:
            preds[image] = sentence(1, max_len)
    return refs, preds


@pytest.mark.parametrize("seed, vocab, max_len", [(0, 50, 20), (1, 10, 8), (2, 50, 90)])
def test_random_sets_match_pycocoevalcap(seed, vocab, max_len):
    assert_parity(*random_captions(seed, vocab=vocab, max_len=max_len))


EDGE_CASES = {
    "empty prediction": ([["a", "b", "c"], ["a", "d"]], []),
    "single token": ([["a", "b", "c"], ["a", "d"]], ["a"]),
    "single unseen token": ([["a", "b", "c"]], ["zzz"]),
    "repeated tokens": ([["a", "a", "b", "a"], ["b", "a"]], ["a"] * 9),
    "one reference": ([["a", "b", "c", "d"]], ["a", "c", "d"]),
    "identical to a reference": ([["x", "y", "z", "w", "v"], ["a", "b"]], ["x", "y", "z", "w", "v"]),
    "length tie goes to the shorter reference": ([["a", "b", "c", "d"], ["a", "b", "c", "d", "e", "f"]],
                                                 ["a", "b", "c", "d", "e"]),
    "empty reference": ([[], ["a", "b"]], ["a", "b", "c"]),
    "empty reference and prediction": ([[], ["a"]], []),
    "very long prediction": ([["a", "b", "c"], ["c", "b", "a", "d"]], list("abcdefgh") * 40),
    "long on both sides (multi-word LCS)": ([list("abcab") * 30, list("ba") * 70], list("abcba") * 27),
    "exactly 64 and 65 tokens": ([list("ab") * 32, list("abc") * 22], list("ba") * 32 + ["c"]),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_pycocoevalcap(name):
    edge_refs, edge_pred = EDGE_CASES[name]
    refs, preds = random_captions(7, n_images=30)
    refs["edge"], preds["edge"] = edge_refs, edge_pred
    assert_parity(refs, preds)  # inside a corpus, which gives CIDEr-D's idf something to work with
    assert_parity({"edge": edge_refs, "other": [["p", "q"]]}, {"edge": edge_pred, "other": ["p"]})


def test_all_edge_cases_together_and_a_single_image():
    refs, preds = random_captions(3, n_images=20)
    for name, (edge_refs, edge_pred) in EDGE_CASES.items():
        refs[name], preds[name] = edge_refs, edge_pred
    assert_parity(refs, preds)
    assert_parity({1: [["a", "b"], ["a"]]}, {1: ["a", "b"]})  # one image: idf is 0, CIDEr-D is 0


def test_perfect_prediction_scores_one():
    refs = {i: [["猫", "在", "桌", "上"]] for i in range(3)}
    scores = score_captions(refs, {i: ["猫", "在", "桌", "上"] for i in range(3)}, metrics=("Bleu", "ROUGE_L"))
    assert scores.corpus["ROUGE_L"] == pytest.approx(1.0)
    assert scores.corpus["Bleu_4"] == pytest.approx(1.0)
    assert "CIDEr" not in scores.corpus


def test_score_captions_rejects_bad_input():
    with pytest.raises(ValueError, match="same image ids"):
        score_captions({1: [["a"]], 2: [["b"]]}, {1: ["a"], 3: ["b"]})
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({1: []}, {1: ["a"]})
    with pytest.raises(TypeError, match="list of tokens"):
        score_captions({1: [["a"]]}, {1: "a"})
    with pytest.raises(ValueError, match="unknown metrics"):
        score_captions({1: [["a"]]}, {1: ["a"]}, metrics=("METEOR",))


def test_rows_are_per_image_dicts():
    scores = score_captions({"x": [["a", "b"]], "y": [["c"]]}, {"x": ["a", "b"], "y": ["d"]})
    rows = scores.rows()
    assert [r["image_id"] for r in rows] == ["x", "y"]
    assert set(rows[0]) == {"image_id", *METRICS}
    assert rows[1]["ROUGE_L"] == 0.0


# --- tokenizers ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [
    ("一只猫坐在桌子上。", ["一", "只", "猫", "坐", "在", "桌", "子", "上"]),
    ("一只猫，坐在3D打印的iPhone上！", ["一", "只", "猫", "坐", "在", "3d", "打", "印", "的", "iphone", "上"]),
    ("  两个 人\t在\n跑步  ", ["两", "个", "人", "在", "跑", "步"]),
    ("C++ 3.5米（约）", ["c", "3", "5", "米", "约"]),
    ("ＡＢ１２和café", ["ａｂ１２", "和", "café"]),
    ("“你好”……——《书》", ["你", "好", "书"]),
    ("", []),
    ("，。！？", []),
])
def test_char_tokenizer(text, tokens):
    assert tokenize(text) == tokens
    assert tokenize(text, "char") == tokens


def test_jieba_tokenizer():
    assert tokenize("一个穿着红色衣服的男人在跑步。", "jieba") == ["一个", "穿着", "红色", "衣服", "的", "男人", "在", "跑步"]
    assert tokenize("他说：“Hello World！” C++ 3.5米", "jieba") == ["他", "说", "hello", "world", "c++", "3.5", "米"]
    assert tokenize(" ，。 ", "jieba") == []
    with pytest.raises(ValueError, match="char, jieba"):
        tokenize("猫", "bpe")


# --- CLI ----------------------------------------------------------------------------------

REFS = {1: ["一只猫坐在桌子上。", "桌子上有一只猫"], 2: ["两个人在公园里跑步", "公园里有人跑步。"], 3: ["一辆红色的汽车"]}
PREDS = {1: "一只猫在桌子上", 2: "两个人在跑步", 3: "一辆红色的车"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def refs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "refs.jsonl", [{"image_id": i, "captions": c} for i, c in REFS.items()])


def preds_file(tmp_path: Path, preds: dict | list = PREDS) -> Path:
    rows = preds if isinstance(preds, list) else [{"image_id": i, "caption": c} for i, c in preds.items()]
    return write_jsonl(tmp_path / "preds.jsonl", rows)


def run_cli(capsys, *args) -> tuple[int, dict | None, str]:
    code = cli_main(["eval-captions", *map(str, args)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


@pytest.mark.parametrize("mode", ["char", "jieba"])
def test_cli_scores_match_the_library(tmp_path, capsys, mode):
    per_image = tmp_path / "per_image.jsonl"
    code, out, _ = run_cli(capsys, "--refs", refs_file(tmp_path), "--preds", preds_file(tmp_path),
                           "--tokenize", mode, "--per-image", per_image)
    assert code == 0
    expected = score_captions({i: [tokenize(c, mode) for c in caps] for i, caps in REFS.items()},
                              {i: tokenize(c, mode) for i, c in PREDS.items()})
    assert {k: out[k] for k in METRICS} == pytest.approx(expected.corpus, abs=1e-12)
    assert (out["n_images"], out["n_missing"], out["n_unknown"], out["tokenize"]) == (3, 0, 0, mode)
    rows = [json.loads(line) for line in per_image.read_text(encoding="utf-8").splitlines()]
    assert [r["image_id"] for r in rows] == [1, 2, 3]
    assert rows[0]["CIDEr"] == pytest.approx(expected.per_image["CIDEr"][0])


def test_cli_coco_references_give_the_same_scores(tmp_path, capsys):
    coco = {"images": [{"id": i} for i in REFS],
            "annotations": [{"image_id": i, "caption": c, "id": n} for n, (i, c) in
                            enumerate((i, c) for i, caps in REFS.items() for c in caps)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    _, from_coco, _ = run_cli(capsys, "--refs", tmp_path / "coco.json", "--preds", preds_file(tmp_path))
    _, from_jsonl, _ = run_cli(capsys, "--refs", refs_file(tmp_path), "--preds", preds_file(tmp_path))
    assert from_coco == from_jsonl


def test_cli_missing_predictions_are_an_error_unless_allow_partial(tmp_path, capsys):
    preds = preds_file(tmp_path, {1: PREDS[1], 3: PREDS[3]})
    code, _, err = run_cli(capsys, "--refs", refs_file(tmp_path), "--preds", preds)
    assert code == 2
    assert "1 of 3 reference images have no prediction (2)" in err and "--allow-partial" in err
    code, out, _ = run_cli(capsys, "--refs", refs_file(tmp_path), "--preds", preds, "--allow-partial")
    assert code == 0 and (out["n_images"], out["n_missing"], out["n_unknown"]) == (2, 1, 0)
    expected = score_captions({i: [tokenize(c) for c in REFS[i]] for i in (1, 3)},
                              {i: tokenize(PREDS[i]) for i in (1, 3)})
    assert out["CIDEr"] == pytest.approx(expected.corpus["CIDEr"], abs=1e-12)


def test_cli_unknown_ids_are_an_error_unless_allow_partial(tmp_path, capsys):
    preds = preds_file(tmp_path, {**PREDS, 99: "一只狗"})
    code, _, err = run_cli(capsys, "--refs", refs_file(tmp_path), "--preds", preds)
    assert code == 2 and "99 (line 4)" in err and "--allow-partial" in err
    code, out, _ = run_cli(capsys, "--refs", refs_file(tmp_path), "--preds", preds, "--allow-partial")
    assert code == 0 and (out["n_images"], out["n_missing"], out["n_unknown"]) == (3, 0, 1)


def test_cli_duplicate_predictions_are_always_an_error(tmp_path, capsys):
    rows = [{"image_id": i, "caption": c} for i, c in PREDS.items()] + [{"image_id": 2, "caption": "别的"}]
    for extra in ([], ["--allow-partial"]):
        code, _, err = run_cli(capsys, "--refs", refs_file(tmp_path), "--preds", preds_file(tmp_path, rows), *extra)
        assert code == 2 and "2 (lines 2 and 4)" in err and "one caption per image" in err


@pytest.mark.parametrize("line, message", [
    ("{not json", "preds.jsonl:2: not valid JSON"),
    ('{"image_id": 2}', 'preds.jsonl:2: "caption" of image_id 2 must be a string'),
    ('{"image_id": 2.5, "caption": "x"}', 'preds.jsonl:2: "image_id" must be an integer or a string'),
    ("[1, 2]", "preds.jsonl:2: expected a JSON object"),
])
def test_cli_malformed_prediction_lines_name_file_and_line(tmp_path, capsys, line, message):
    rows = [{"image_id": 1, "caption": "猫"}, line]
    code, _, err = run_cli(capsys, "--refs", refs_file(tmp_path), "--preds", preds_file(tmp_path, rows))
    assert code == 2 and message in err


def test_cli_malformed_references(tmp_path, capsys):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"image_id": 1, "captions": ["猫"]}, {"image_id": 1, "captions": []}])
    code, _, err = run_cli(capsys, "--refs", refs, "--preds", preds_file(tmp_path))
    assert code == 2 and "refs.jsonl:2" in err and "non-empty list" in err
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "caption": "猫"}]}))
    code, _, err = run_cli(capsys, "--refs", coco, "--preds", preds_file(tmp_path))
    assert code == 2 and "have no caption" in err and "2" in err
    code, _, err = run_cli(capsys, "--refs", tmp_path / "nope.jsonl", "--preds", preds_file(tmp_path))
    assert code == 2 and "nope.jsonl" in err


def test_match_error_is_a_value_error():
    assert issubclass(CaptionMatchError, ValueError)
