"""Ingest: raw layout and Chinese-CLIP folders, every kind of bad input, stable ids, options."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcn.cli import main as cli_main
from mmcn.data import tsv
from mmcn.data.ingest import IngestConfig, IngestError, ingest
from mmcn.data.manifest import manifest_path, read_manifest


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scene(color=(200, 30, 30), size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), 230, np.uint8)
    arr[8:24, 8:40] = color
    arr[30:, 30:] = rng.integers(0, 255, (size[1] - 30, size[0] - 30, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def png_bomb() -> bytes:
    """A tiny PNG whose header claims 100000 x 100000 pixels."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def write_raw(root: Path, split: str, files: dict[str, bytes], lines: list) -> None:
    images = root / split / "images"
    for rel, data in files.items():
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(data)
    with open(root / split / "captions.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")


def rec(image: str, *captions: str, objects=None) -> dict:
    out = {"image": image, "captions": list(captions)}
    if objects is not None:
        out["objects"] = objects
    return out


GOOD = encode(scene())
TRUNCATED = GOOD[: len(GOOD) // 2]


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """A raw dataset with one of every bad input next to good data."""
    root = tmp_path / "raw"
    png16 = Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20))
    palette = scene(seed=3).convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = scene(seed=4).convert("RGBA")
    rgba.putalpha(128)
    files = {
        "good.jpg": GOOD,
        "sub/dir/good.png": encode(scene((20, 200, 20), seed=1), "PNG"),
        "图 片 1.jpg": encode(scene((20, 20, 200), seed=2)),
        "cmyk.jpg": encode(scene(seed=5).convert("CMYK")),
        "gray.png": encode(scene(seed=6).convert("L"), "PNG"),
        "16bit.png": encode(png16, "PNG"),
        "palette.png": encode(palette, "PNG", transparency=0),
        "alpha.png": encode(rgba, "PNG"),
        "trailing.jpg": GOOD + b"\x00\x00garbage-after-eoi",
        "copy_of_good.jpg": GOOD,
        "truncated.jpg": TRUNCATED,
        "truncated.png": encode(scene(seed=7), "PNG")[:300],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "bomb.png": png_bomb(),
        "unlisted.jpg": encode(scene(seed=8)),
    }
    lines = [
        rec("good.jpg", "一个红色的长方形", "  ", objects=[{"box": [8, 8, 40, 24], "label": "rectangle",
                                                         "attributes": ["red"]}]),
        rec("sub/dir/good.png", "绿色", objects=[{"box": [8, 8, 40, 24], "label": "box"},
                                                {"box": [50, 50, 90, 90], "label": "outside"},
                                                {"box": [5, 5, 1, 1], "label": "degenerate"}]),
        rec("图 片 1.jpg", "蓝色的图片"),
        rec("cmyk.jpg", "cmyk"), rec("gray.png", "gray"), rec("16bit.png", "16bit"),
        rec("palette.png", "palette"), rec("alpha.png", "alpha"), rec("trailing.jpg", "trailing"),
        rec("copy_of_good.jpg", "复制的图片"),
        rec("truncated.jpg", "t1"), rec("truncated.png", "t2"), rec("empty.jpg", "e"), rec("text.jpg", "x"),
        rec("bomb.png", "bomb"),
        rec("missing.jpg", "不存在"),
        rec("../outside.jpg", "outside"),
        rec("/etc/passwd", "absolute"),
        '{"image": "good.jpg", "captions": [',
        "[1, 2, 3]",
        rec("gray.png", 7),
        "",
    ]
    write_raw(root, "train", files, lines)
    write_raw(root, "test", {"a.jpg": encode(scene(seed=9)), "b.jpg": GOOD}, [rec("a.jpg"), rec("b.jpg", "测试")])
    return root


def skips_of(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in report.skips:
        out.setdefault(s.reason, set()).add(f"{s.file}:{s.line}" if s.line else s.file)
    return out


def test_bad_inputs_are_skipped_with_reasons_and_good_data_kept(messy, tmp_path):
    out = tmp_path / "tsv"
    report = ingest(messy, out, IngestConfig(workers=1))
    skips = skips_of(report)
    assert skips["truncated"] == {"train/images/truncated.jpg:11", "train/images/truncated.png:12"}
    assert skips["empty_file"] == {"train/images/empty.jpg:13"}
    assert skips["not_an_image"] == {"train/images/text.jpg:14"}
    assert skips["too_many_pixels"] == {"train/images/bomb.png:15"}
    assert skips["missing_file"] == {"train/captions.jsonl:16"}
    assert skips["outside_images"] == {"train/captions.jsonl:17", "train/captions.jsonl:18"}
    assert skips["malformed_json"] == {"train/captions.jsonl:19"}
    assert skips["bad_record"] == {"train/captions.jsonl:20"}
    assert skips["bad_caption"] == {"train/captions.jsonl:21"}
    assert skips["empty_caption"] == {"train/captions.jsonl:1"}
    assert skips["duplicate"] == {"train/images/copy_of_good.jpg:10", "train/images/gray.png:21"}
    assert skips["bad_object"] == {"train/captions.jsonl:2", "train/images/sub/dir/good.png:2"}
    assert skips["unlisted"] == {"train/images/unlisted.jpg"}
    # test/b.jpg has the same bytes as train/good.jpg: kept in both, noted as a leak
    assert any("test/images/b.jpg" in n and "train/images/good.jpg" in n for n in report.notes)

    manifest = {e.source: e for e in read_manifest(manifest_path(out, "train"))}
    assert set(manifest) == {f"train/images/{n}" for n in (
        "good.jpg", "sub/dir/good.png", "图 片 1.jpg", "cmyk.jpg", "gray.png", "16bit.png", "palette.png",
        "alpha.png", "trailing.jpg")}
    assert manifest["train/images/cmyk.jpg"].mode == "CMYK"
    assert manifest["train/images/16bit.png"].mode.startswith("I")
    assert [o.label for o in manifest["train/images/sub/dir/good.png"].objects] == ["box"]
    good = manifest["train/images/good.jpg"]
    assert (good.width, good.height, good.format) == (64, 48, "JPEG")
    assert good.objects[0].attributes == ("red",)

    # original bytes untouched, ids match the manifest, lineidx gives random access
    reader = tsv.TsvReader(tsv.imgs_path(out, "train"))
    assert len(reader) == len(manifest)
    by_id = dict(reader)
    assert by_id[good.image_id] == GOOD
    assert reader[len(reader) - 1][0] == read_manifest(manifest_path(out, "train"))[-1].image_id

    # captions of the duplicate are merged onto the kept image, whitespace captions dropped
    texts = {t.text: t for t in tsv.read_texts(tsv.texts_path(out, "train"))}
    assert texts["复制的图片"].image_ids == [good.image_id]
    assert "一个红色的长方形" in texts and "" not in texts and "  " not in texts
    assert set(texts) >= {"绿色", "蓝色的图片", "cmyk", "16bit", "palette", "alpha", "trailing"}

    counts = report.splits["train"]
    assert counts.images_written == 9 and counts.texts_written == len(texts)
    on_disk = json.loads((out / "ingest_report.json").read_text(encoding="utf-8"))
    assert on_disk["splits"]["train"]["skipped"]["truncated"] == 2
    assert on_disk["skipped_total"] == len(report.skips)
    # test images without captions are still ingested
    assert report.splits["test"].images_written == 2 and report.splits["test"].texts_written == 1


def test_same_input_gives_same_bytes_with_and_without_workers(messy, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ingest(messy, a, IngestConfig(workers=1))
    ingest(messy, b, IngestConfig(workers=2))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "train_imgs.lineidx" in names and "test_manifest.jsonl" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def line_offsets(path: Path) -> list[int]:
    starts, pos = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        starts.append(pos)
        pos += len(line)
    return starts


def oscar_lineidx(path: Path) -> Path:
    """Where microsoft/Oscar's ``TSVFile`` looks for the index of ``path``."""
    return Path(os.path.splitext(path)[0] + ".lineidx")


def test_lineidx_offsets_point_at_line_starts(messy, tmp_path):
    out = tmp_path / "tsv"
    ingest(messy, out, IngestConfig(workers=1))
    path = tsv.imgs_path(out, "train")
    assert oscar_lineidx(path).name == "train_imgs.lineidx"
    offsets = [int(x) for x in oscar_lineidx(path).read_text().split()]
    assert offsets == line_offsets(path) and len(offsets) == 9
    assert not list(out.glob("*.tsv.lineidx"))


def test_tsv_writer_and_build_lineidx_use_oscars_name(tmp_path):
    path = tmp_path / "train.feature.tsv"
    Path(f"{path}.lineidx").write_text("0\n999\n")  # a stale index under the former name
    with tsv.TsvWriter(path) as w:
        for i in range(5):
            w.write(i, b"x" * (i * 7))
    assert oscar_lineidx(path) == tmp_path / "train.feature.lineidx"
    assert [int(x) for x in oscar_lineidx(path).read_text().split()] == line_offsets(path)
    assert not Path(f"{path}.lineidx").exists()
    oscar_lineidx(path).unlink()
    assert tsv.build_lineidx(path) == 5
    assert [int(x) for x in oscar_lineidx(path).read_text().split()] == line_offsets(path)


def test_folder_with_only_the_former_lineidx_name_still_reads(tmp_path):
    images = {7: GOOD, 8: encode(scene(seed=12))}
    write_clip(tmp_path / "clip", "valid", [b"%d\t" % i + base64.b64encode(d) for i, d in images.items()],
               [{"text_id": 1, "text": "红色", "image_ids": [7]}])
    path = tsv.imgs_path(tmp_path / "clip", "valid")
    Path(f"{path}.lineidx").write_text("".join(f"{o}\n" for o in line_offsets(path)))
    reader = tsv.TsvReader(path)
    assert len(reader) == 2 and reader[1] == (8, images[8]) and dict(reader) == images
    # Oscar's name wins when both are there
    oscar_lineidx(path).write_text("0\n")
    assert len(tsv.TsvReader(path)) == 1
    Path(f"{path}.lineidx").unlink()
    oscar_lineidx(path).unlink()
    with pytest.raises(FileNotFoundError, match="valid_imgs.lineidx is missing"):
        tsv.TsvReader(path)


def test_unlisted_include_and_strict(messy, tmp_path):
    report = ingest(messy, tmp_path / "inc", IngestConfig(workers=1, unlisted="include"))
    assert "unlisted" not in skips_of(report)
    assert report.splits["train"].images_written == 10

    with pytest.raises(IngestError) as err:
        ingest(messy, tmp_path / "strict", IngestConfig(workers=1, strict=True))
    assert "train/images/truncated.jpg:11: truncated" in str(err.value)
    assert (tmp_path / "strict" / "ingest_report.json").is_file()


def test_cli_strict_exit_code_and_help(messy, tmp_path, capsys):
    assert cli_main(["ingest", "--src", str(messy), "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    assert cli_main(["ingest", "--src", str(messy), "--out", str(tmp_path / "o"), "--workers", "1",
                     "--strict"]) == 1
    assert "empty_file" in capsys.readouterr().err
    assert cli_main(["ingest", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        cli_main(["ingest", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--src", "--out", "--max-side", "--strict", "--workers", "--full-decode", "--max-pixels",
                   "--unlisted", "--jpeg-quality"):
        assert option in help_text


def test_max_side_reencodes_rgb_and_scales_boxes_given_on_the_displayed_picture(tmp_path):
    # a 200x100 file whose EXIF says "rotate 90 clockwise to display"; a red block at x 20..60, y 10..30
    # of the stored grid. Displayed (100x200), the stored column x lands on row x and the stored row y
    # on column 99 - y, so the block the annotator sees spans x 70..90, y 20..60: the box given
    arr = np.full((100, 200, 3), 240, np.uint8)
    arr[10:30, 20:60] = (220, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    files = {"rot.jpg": encode(img, exif=exif.tobytes(), quality=95),
             "cmyk.jpg": encode(scene(size=(300, 150)).convert("CMYK")),
             "alpha.png": encode(scene(size=(80, 40)).convert("RGBA"), "PNG"),
             "16bit.png": encode(Image.fromarray(np.full((30, 30), 60000, np.uint16)), "PNG"),
             "palette.png": encode(scene(size=(90, 60)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG",
                                   transparency=0),
             "gray.png": encode(scene(size=(90, 60)).convert("L"), "PNG")}
    write_raw(tmp_path / "raw", "train", files,
              [rec("rot.jpg", "旋转", objects=[{"box": [70, 20, 90, 60], "label": "block"}]),
               rec("cmyk.jpg", "c"), rec("alpha.png", "a"), rec("16bit.png", "b"), rec("palette.png", "p"),
               rec("gray.png", "g")])
    out = tmp_path / "tsv"
    report = ingest(tmp_path / "raw", out, IngestConfig(workers=1, max_side=50))
    assert not report.skips
    entries = {e.source.rsplit("/", 1)[-1]: e for e in read_manifest(manifest_path(out, "train"))}
    images = {i: Image.open(io.BytesIO(b)) for i, b in tsv.TsvReader(tsv.imgs_path(out, "train"))}
    for name, e in entries.items():
        im = images[e.image_id]
        assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 50, name
        assert (e.width, e.height) == im.size
    rot = entries["rot.jpg"]
    assert (rot.width, rot.height) == (25, 50)  # displayed 100x200, scaled by 1/4
    x1, y1, x2, y2 = rot.objects[0].box
    assert (x1, y1, x2, y2) == pytest.approx((17.5, 5, 22.5, 15))
    block = np.asarray(images[rot.image_id])[int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1].reshape(-1, 3)
    assert block.mean(0)[0] > 150 and block.mean(0)[1] < 90  # the red block is where the box says
    bright = np.asarray(images[entries["16bit.png"].image_id]).mean()
    assert bright > 200  # 60000/65535 of full scale, not clipped to 255 or wrapped


def test_max_pixels_limit(tmp_path):
    write_raw(tmp_path / "raw", "train", {"ok.png": encode(scene(size=(90, 90)), "PNG")}, [rec("ok.png", "好")])
    write_raw(tmp_path / "raw", "valid", {"big.png": encode(scene(size=(200, 200)), "PNG"),
                                          "ok.png": encode(scene(size=(90, 90), seed=3), "PNG")},
              [rec("big.png", "大"), rec("ok.png", "小")])
    report = ingest(tmp_path / "raw", tmp_path / "o", IngestConfig(workers=1, max_pixels=10_000))
    assert [s.reason for s in report.skips] == ["too_many_pixels"]
    assert report.splits["valid"].images_written == 1


def test_a_split_left_empty_is_an_error_naming_the_reasons_and_the_report(tmp_path, capsys):
    # the case: a Chinese-CLIP folder none of whose test images decodes; train is fine
    b64 = lambda data: base64.b64encode(data)  # noqa: E731
    write_clip(tmp_path / "clip", "train", [b"1\t" + b64(GOOD)], [{"text_id": 1, "text": "好", "image_ids": [1]}])
    write_clip(tmp_path / "clip", "test", [b"2\t" + b64(b"<html>not an image</html>"), b"3\t" + b64(TRUNCATED),
                                           b"4\t" + b64(b"plain text")],
               [{"text_id": 2, "text": "坏", "image_ids": [2, 3, 4]}])
    out = tmp_path / "tsv"
    with pytest.raises(IngestError) as err:
        ingest(tmp_path / "clip", out, IngestConfig(workers=1))
    message = str(err.value)
    assert "split test: 3 image(s) in, none kept" in message and "split train" not in message
    # reasons by count (ties by name), each with its first case; then the report to read
    assert "not_an_image 2 (e.g. test_imgs.tsv:1: not an image" in message
    assert "truncated 1 (e.g. test_imgs.tsv:2: truncated JPEG" in message
    assert message.index("not_an_image 2") < message.index("truncated 1")
    assert str(out / "ingest_report.json") in message
    written = json.loads((out / "ingest_report.json").read_text(encoding="utf-8"))  # written all the same
    assert written["splits"]["test"]["images_written"] == 0 and written["splits"]["train"]["images_written"] == 1
    # the CLI: the message, exit 1; no split with an image at all is an error too
    assert cli_main(["ingest", "--src", str(tmp_path / "clip"), "--out", str(tmp_path / "o"), "--workers", "1"]) == 1
    assert "none kept" in capsys.readouterr().err
    (tmp_path / "clip" / "train_imgs.tsv").write_bytes(b"1\t" + b64(b"") + b"\n")
    with pytest.raises(IngestError, match="split train: 1 image"):
        ingest(tmp_path / "clip", out, IngestConfig(workers=1))
    # images kept but every caption skipped: an error as well
    write_raw(tmp_path / "raw", "train", {"a.jpg": GOOD}, [rec("a.jpg", " ", "\t")])
    with pytest.raises(IngestError, match=r"split train: 2 caption\(s\) in, none kept; skipped: empty_caption 2"):
        ingest(tmp_path / "raw", tmp_path / "o2", IngestConfig(workers=1))


def test_the_ingest_stage_exits_non_zero_on_an_empty_split(tmp_path):
    import subprocess
    import sys

    b64 = lambda data: base64.b64encode(data)  # noqa: E731
    write_clip(tmp_path / "clip", "train", [b"1\t" + b64(b"not an image")], [{"text_id": 1, "text": "坏", "image_ids": [1]}])
    (tmp_path / "params.yaml").write_text(f"ingest:\n  src: {tmp_path / 'clip'}\n  max_side: null\n")
    stage = Path(__file__).resolve().parent.parent / "stages" / "ingest.py"
    run = subprocess.run([sys.executable, str(stage)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ingest of") and "not_an_image 1" in last and "data/tsv/ingest_report.json" in last
    assert (tmp_path / "data" / "tsv" / "ingest_report.json").is_file()


def write_clip(root: Path, split: str, img_lines: list[bytes], texts: list) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_imgs.tsv").write_bytes(b"".join(line + b"\n" for line in img_lines))
    with open(root / f"{split}_texts.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write((t if isinstance(t, str) else json.dumps(t, ensure_ascii=False)) + "\n")


def test_chinese_clip_folder_is_validated_and_indexed(tmp_path):
    b64 = lambda data: base64.b64encode(data)  # noqa: E731
    other = encode(scene(seed=11))
    write_clip(tmp_path / "muge", "valid", [
        b"1000002\t" + b64(GOOD),
        b"1000003\t" + b64(other),
        b"abc\t" + b64(GOOD),
        b"1000004\t!!!not-base64!!!",
        b"1000002\t" + b64(other),            # duplicate id
        b"1000005\t" + b64(TRUNCATED),
        b"1000006\t" + b64(GOOD),             # same bytes as 1000002
    ], [
        {"text_id": 1, "text": "红色", "image_ids": [1000002]},
        {"text_id": 2, "text": "两张", "image_ids": [1000003, 1000006, 999]},
        {"text_id": 3, "text": "坏的", "image_ids": [1000005]},
        "{not json",
        {"text_id": 1, "text": "重复", "image_ids": [1000002]},
        {"text_id": 4, "text": " ", "image_ids": [1000002]},
        {"text_id": 5, "text": "无标注"},
        {"text_id": "6", "text": "bad id", "image_ids": []},
    ])
    out = tmp_path / "tsv"
    report = ingest(tmp_path / "muge", out, IngestConfig(workers=1))
    assert report.source_format == "chinese-clip"
    assert {s.reason: s.line for s in report.skips if s.file == "valid_imgs.tsv"} == {
        "bad_id": 3, "bad_base64": 4, "duplicate_id": 5, "truncated": 6, "duplicate": 7}
    text_skips = {(s.reason, s.line) for s in report.skips if s.file == "valid_texts.jsonl"}
    assert text_skips == {("unknown_image_id", 2), ("no_valid_image", 3), ("unknown_image_id", 3),
                          ("malformed_json", 4), ("duplicate_text_id", 5), ("empty_caption", 6),
                          ("bad_record", 8)}
    assert dict(tsv.TsvReader(tsv.imgs_path(out, "valid"))) == {1000002: GOOD, 1000003: other}
    texts = {t.text_id: t.image_ids for t in tsv.read_texts(tsv.texts_path(out, "valid"))}
    assert texts == {1: [1000002], 2: [1000003, 1000002], 5: []}
    # the output is itself a valid Chinese-CLIP folder: ingesting it again changes nothing
    again = tmp_path / "again"
    assert not ingest(out, again, IngestConfig(workers=1)).skips
    for name in ("valid_imgs.tsv", "valid_imgs.lineidx", "valid_texts.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_chinese_clip_urlsafe_base64_is_accepted_and_stored_standard(tmp_path):
    # images whose standard base64 has '+' or '/', so the url-safe text differs from it
    images = {}
    for seed in range(20, 60):
        data = encode(scene(seed=seed))
        if b"+" in base64.b64encode(data) and b"/" in base64.b64encode(data):
            images[1000 + seed] = data
        if len(images) == 3:
            break
    assert len(images) == 3
    lines = [b"%d\t" % i + base64.urlsafe_b64encode(d) for i, d in images.items()]
    assert all(b"-" in line and b"_" in line and b"+" not in line and b"/" not in line for line in lines)
    write_clip(tmp_path / "clip", "train", lines + [b"5\t!!!not-base64!!!"],
               [{"text_id": 1, "text": "图", "image_ids": list(images)}])
    for workers in (1, 2):
        out = tmp_path / f"tsv{workers}"
        report = ingest(tmp_path / "clip", out, IngestConfig(workers=workers))
        assert [(s.reason, s.line) for s in report.skips] == [("bad_base64", 4)]
        assert dict(tsv.TsvReader(tsv.imgs_path(out, "train"))) == images
        # stored in the standard alphabet, so every downstream reader sees one format
        assert tsv.imgs_path(out, "train").read_bytes() == b"".join(
            b"%d\t" % i + base64.b64encode(d) + b"\n" for i, d in images.items())


def test_output_folder_gets_the_umask_mode(messy, tmp_path):
    old = os.umask(0o027)
    try:
        ingest(messy, tmp_path / "out", IngestConfig(workers=1))
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~0o027


def test_unknown_source_layout_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither the raw layout"):
        ingest(tmp_path / "empty", tmp_path / "o")


# --------------------------------------------------------------------------- inputs that used to abort a whole run

DEEP = "[" * 10_000 + "]" * 10_000   # deeper than Python's recursion limit


def test_any_json_error_skips_its_line_only(tmp_path):
    write_raw(tmp_path / "raw", "train", {"a.jpg": GOOD, "b.jpg": encode(scene(seed=13))}, [
        rec("a.jpg", "好"),
        '{"image": "b.jpg", "captions": ' + DEEP + "}",
        '{"image": "b.jpg", "captions": ["\\ud800"]}',      # a lone surrogate: no UTF-8 file can hold it
        '{"image": "b.jpg", "captions": [' + "1" * 5000 + "]}",  # more digits than int() converts
    ])
    report = ingest(tmp_path / "raw", tmp_path / "o", IngestConfig(workers=1))
    assert [(s.reason, s.line) for s in report.skips if s.file == "train/captions.jsonl"] == [
        ("malformed_json", 2), ("malformed_json", 3), ("malformed_json", 4)]
    details = [s.detail for s in report.skips if s.file == "train/captions.jsonl"]
    assert "recursion limit" in details[0] and "surrogate" in details[1]
    assert report.splits["train"].images_written == 1
    json.loads((tmp_path / "o" / "ingest_report.json").read_text(encoding="utf-8"))

    write_clip(tmp_path / "clip", "valid", [b"7\t" + base64.b64encode(GOOD)],
               [{"text_id": 1, "text": "红色", "image_ids": [7]}, '{"text_id": 2, "text": ' + DEEP + "}",
                '{"text_id": 3, "text": "\\ud800", "image_ids": [7]}'])
    report = ingest(tmp_path / "clip", tmp_path / "o2", IngestConfig(workers=1))
    assert [(s.reason, s.line) for s in report.skips] == [("malformed_json", 2), ("malformed_json", 3)]
    assert [t.text_id for t in tsv.read_texts(tsv.texts_path(tmp_path / "o2", "valid"))] == [1]


def test_file_names_that_are_not_utf8_are_reported_escaped(tmp_path):
    write_raw(tmp_path / "raw", "train", {"good.jpg": GOOD}, [rec("good.jpg", "好")])
    images = os.fsencode(tmp_path / "raw" / "train" / "images")
    os.mkdir(os.path.join(images, b"dir\xfe"))
    for name in (b"bad\xff.jpg", b"dir\xfe/x.png"):
        with open(os.path.join(images, name), "wb") as f:
            f.write(encode(scene(seed=14)))
    for unlisted in ("skip", "include"):
        out = tmp_path / f"o-{unlisted}"
        report = ingest(tmp_path / "raw", out, IngestConfig(workers=1, unlisted=unlisted))
        assert {(s.reason, s.file) for s in report.skips} == {
            ("bad_file_name", "train/images/bad\\xff.jpg"), ("bad_file_name", "train/images/dir\\xfe/x.png")}
        assert report.splits["train"].images_written == 1 and report.splits["train"].images_seen == 3
        assert "bad\\\\xff.jpg" in (out / "ingest_report.json").read_text(encoding="utf-8")

    write_clip(tmp_path / "clip", "valid", [b"7\t" + base64.b64encode(GOOD)], [])
    with open(os.path.join(os.fsencode(tmp_path / "clip"), b"v\xffl_imgs.tsv"), "wb") as f:
        f.write(b"8\t" + base64.b64encode(GOOD) + b"\n")
    report = ingest(tmp_path / "clip", tmp_path / "o-clip", IngestConfig(workers=1))
    assert [(s.reason, s.file) for s in report.skips] == [("bad_file_name", "v\\xffl_imgs.tsv")]
    assert report.splits["valid"].images_written == 1


def test_chinese_clip_ids_must_be_canonical_int64(tmp_path):
    keys = [b"42", b"100000000000000000000000", b"1_000", b"+5", b" 7", b"007", b"-0", b"1.0",
            b"9223372036854775808", b"-9223372036854775808"]
    write_clip(tmp_path / "clip", "train", [key + b"\t" + base64.b64encode(encode(scene(seed=20 + i)))
                                            for i, key in enumerate(keys)], [
        {"text_id": 1, "text": "好", "image_ids": [42]},
        {"text_id": 10 ** 23, "text": "大", "image_ids": [42]},
        {"text_id": 3, "text": "大图", "image_ids": [42, 10 ** 23]},
        {"text_id": 4, "text": "浮点", "image_ids": [1.0]},
        {"text_id": True, "text": "布尔", "image_ids": [42]},
    ])
    report = ingest(tmp_path / "clip", tmp_path / "o", IngestConfig(workers=1))
    bad_ids = {s.line: s.detail for s in report.skips if s.file == "train_imgs.tsv"}
    assert set(bad_ids) == set(range(2, 10)) and all(s.reason == "bad_id" for s in report.skips
                                                     if s.file == "train_imgs.tsv")
    assert "64-bit" in bad_ids[2] and "64-bit" in bad_ids[9]
    assert "write it 1000" in bad_ids[3] and "write it 5" in bad_ids[4] and "write it 7" in bad_ids[5]
    assert "not an integer" in bad_ids[8]
    assert [i for i, _ in tsv.TsvReader(tsv.imgs_path(tmp_path / "o", "train"))] == [42, -(2 ** 63)]
    assert {(s.reason, s.line) for s in report.skips if s.file == "train_texts.jsonl"} == {
        ("bad_id", 2), ("bad_id", 3), ("bad_record", 4), ("bad_record", 5)}


# --------------------------------------------------------------------------- leftovers of killed runs

NEVER_A_PID = 4_194_304  # Linux's PID_MAX_LIMIT: pids stay below it


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="pids are checked the POSIX way; Linux assumed for the limit")
def test_temp_folders_of_dead_ingests_are_removed_live_ones_kept(messy, tmp_path, caplog):
    dead = tmp_path / f".tsv.tmp-{NEVER_A_PID}-abc123"
    live = tmp_path / f".tsv.tmp-{os.getppid()}-def456"   # the parent of this test process: alive
    other = tmp_path / f".other.tmp-{NEVER_A_PID}-abc123"  # another output's: not ingest's to judge
    for folder in (dead, live, other):
        (folder / ".shards").mkdir(parents=True)
        (folder / ".shards" / "shard-1.b64").write_bytes(b"x" * 1000)
    with caplog.at_level("INFO", logger="mmcn.data.ingest"):
        ingest(messy, tmp_path / "tsv", IngestConfig(workers=2))
    assert not dead.exists() and live.is_dir() and other.is_dir()
    assert any(str(NEVER_A_PID) in r.getMessage() and "killed" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other.name, "raw", "tsv"])  # this run's temp folder is gone too


def test_output_is_replaced_by_renames_never_deleted_first(messy, tmp_path, monkeypatch):
    out = tmp_path / "tsv"
    ingest(messy, out, IngestConfig(workers=1))
    (out / "from-the-last-run.txt").write_text("old")
    deleted = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # the output must be complete whenever anything is deleted
        deleted.append((Path(path).name, (out / "ingest_report.json").is_file()))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    ingest(messy, out, IngestConfig(workers=1))
    assert deleted and all(name != "tsv" and complete for name, complete in deleted), deleted
    assert not (out / "from-the-last-run.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "tsv"]


# --------------------------------------------------------------------------- what is wrong with an image, in words

def png_of_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_unusable_images_are_described_in_words_the_same_in_ingest_and_features(tmp_path):
    from mmcn.vision.extract import ExtractConfig, decode

    cases = {  # file -> (reason, message); "{setting}": the limit the user can raise
        "empty.jpg": (b"", "empty_file", "empty file (0 bytes)"),
        "huge.png": (png_of_size(12000, 9000), "too_many_pixels",
                     "image of 12000x9000 = 108 MP exceeds max_pixels=89478485: raise {setting} or downscale it"),
        "text.jpg": (b"plain text\n", "not_an_image",
                     "not an image: PIL recognises no image format in it (it starts with b'plain text\\n')"),
        "cut.jpg": (TRUNCATED, "truncated", "truncated JPEG: image file is truncated"),
    }
    write_raw(tmp_path / "raw", "train", {"ok.jpg": GOOD, **{name: data for name, (data, _, _) in cases.items()}},
              [rec(name, "图") for name in ["ok.jpg", *cases]])
    report = ingest(tmp_path / "raw", tmp_path / "o", IngestConfig(workers=1, full_decode=True))
    got = {s.file.rsplit("/", 1)[-1]: (s.reason, s.detail) for s in report.skips}
    for name, (data, reason, message) in cases.items():
        assert got[name][0] == reason
        assert got[name][1].startswith(message.format(setting="ingest.max_pixels (or --max-pixels)")), got[name]
        with pytest.raises(ValueError) as err:
            decode(data, ExtractConfig())
        assert str(err.value).startswith(message.format(setting="features.max_pixels")), str(err.value)
        assert err.value.reason == reason


def test_a_raised_max_pixels_is_honoured_past_pils_own_limit():
    from mmcn.data.image import inspect

    data = encode(Image.new("L", (20000, 10000)), "PNG")  # 200 MP: PIL alone refuses it (its limit is 179 MP)
    assert inspect(data, max_pixels=250_000_000).width == 20000
    with pytest.raises(ValueError, match="= 200 MP exceeds max_pixels=190000000"):
        inspect(data, max_pixels=190_000_000)
