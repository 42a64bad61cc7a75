"""The no-weights fallback (mmcn.vision.grid): a torchvision ImageNet ResNet/ResNeXt checkpoint
with random weights of the real key names -> the detector stage's conversion -> load_detector
-> grid boxes whose features, scores and tags equal what torchvision's own layers compute on
the same boxes, 2054-dim rows through the extractor, Chinese tags through the en->zh table,
and clear errors for checkpoints that are not ImageNet classifiers."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from safetensors.torch import save_file
from torchvision.models import ResNet50_Weights
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import roi_align

from mmcn.settings import SettingsError
from mmcn.text.translate import LabelTable
from mmcn.vision.checkpoint import CheckpointError
from mmcn.vision.detector import build_detector, load_detector, save_detector
from mmcn.vision.extract import ExtractConfig, detect_regions
from mmcn.vision.grid import IMAGENET_SENSES, GridDetector, convert_grid, grid_config_for

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255   # torchvision's ImageNet normalisation
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """torchvision's ResNet-50 with random weights (seeded) and its state dict saved as a .pth."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    path = tmp_path_factory.mktemp("weights") / "resnet50-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def tiny_resnext(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A one-block-per-layer ResNeXt 32x4d (torchvision's key names and grouped conv shapes)."""
    torch.manual_seed(1)
    model = ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4).eval()
    path = tmp_path / "resnext-tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)  # DataParallel-saved
    return model, path


def expected_boxes(height: int, width: int) -> torch.Tensor:
    """The documented boxes: the whole image, then the 2x2 and the 3x3 grid cells, row by row."""
    boxes = [[0, 0, width, height]]
    for n in (2, 3):
        boxes += [[width * j / n, height * i / n, width * (j + 1) / n, height * (i + 1) / n]
                  for i in range(n) for j in range(n)]
    return torch.tensor(boxes, dtype=torch.float32)


def reference(model: torch.nn.Module, image: torch.Tensor, boxes: torch.Tensor, min_size: int, max_size: int):
    """Features (N, 2048) and class probabilities (N, 1000) of ``boxes`` computed with torchvision's
    layers: resize so the shorter side is min_size unless the longer would pass max_size (bilinear),
    normalise, conv1..layer3, RoIAlign 14x14 at 1/16 (aligned, adaptive sampling), layer4, mean, fc."""
    h, w = image.shape[1:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    x = F.interpolate(image.float()[None], size=(nh, nw), mode="bilinear", align_corners=False)
    x = (x - MEAN) / STD
    m = model
    res4 = m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))
    scaled = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    rois = roi_align(res4, [scaled], output_size=(14, 14), spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    features = m.layer4(rois).mean(dim=(2, 3))
    return features, F.softmax(m.fc(features), dim=1)


def random_image(seed: int, height: int, width: int, gray: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (1 if gray else 3, height, width), generator=g, dtype=torch.uint8)
    return img.expand(3, -1, -1).contiguous() if gray else img


@pytest.mark.parametrize("builder, layers, groups, width, arch", [
    ("resnet50", (3, 4, 6, 3), 1, 64, "resnet50"),
    ("resnet101", (3, 4, 23, 3), 1, 64, "resnet101"),
    ("resnet152", (3, 8, 36, 3), 1, 64, "resnet152"),
    ("resnext50_32x4d", (3, 4, 6, 3), 32, 4, "resnext50_32x4d"),
    ("resnext101_32x8d", (3, 4, 23, 3), 32, 8, "resnext101_32x8d"),
    ("wide_resnet50_2", (3, 4, 6, 3), 1, 128, "wide_resnet50_2"),
])
def test_the_architecture_is_read_from_the_state_dict(builder, layers, groups, width, arch):
    """Blocks per layer and group widths as torchvision's builders document them."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        state = getattr(torchvision.models, builder)().state_dict()
    config = grid_config_for(state, f"{builder}.pth")
    assert (config.layers, config.groups, config.width_per_group, config.arch) == (layers, groups, width, arch)
    with torch.device("meta"):
        assert GridDetector(config).body.state_dict().keys() == state.keys()


def test_labels_are_imagenet_names_with_a_chinese_translation():
    config = grid_config_for(_meta_state("resnet50"), "x.pth")
    assert len(config.classes) == 1000 and len(set(config.classes)) == 1000
    for i, (label, name) in enumerate(zip(config.classes, CATEGORIES)):
        assert label == name or (i in IMAGENET_SENSES and label == IMAGENET_SENSES[i]), (i, label, name)
    table = LabelTable.load()
    untranslated = [c for c in config.classes if not re.search(r"[\u4e00-\u9fff]", table.get(c, "object") or "")]
    assert untranslated == []
    # the grid's ImageNet senses, while the detectors' labels keep theirs
    assert table.get("kite (bird)", "object") == "鸢" and table.get("kite", "object") == "风筝"
    assert table.get("crane bird", "object") == "鹤" and table.get("crane", "object") == "起重机"
    assert table.get("tench", "object") == "丁鲷" and table.get("iron", "object") == "熨斗"


def _meta_state(builder: str) -> dict:
    with torch.device("meta"):
        return getattr(torchvision.models, builder)().state_dict()


def test_the_whole_image_region_is_the_classifier_itself(resnet50):
    """At a 224x224 network input RoIAlign of the whole image samples res4 exactly on its 14x14
    grid, so the whole-image region's feature is torchvision's pooled layer4 output and its
    class probabilities are the classifier's softmax (model(x))."""
    model, path = resnet50
    grid = convert_grid(path, min_size=224, max_size=224, grids=(1,))  # the whole image only
    image = random_image(0, 224, 224)
    det = grid.detect([image])[0]
    assert det.boxes.tolist() == [[0, 0, 224, 224]]
    whole = [0]
    pooled = []
    hook = model.avgpool.register_forward_hook(lambda module, args, out: pooled.append(torch.flatten(out, 1)[0]))
    try:
        with torch.no_grad():
            logits = model((image.float()[None] - MEAN) / STD)[0]   # torchvision's forward
    finally:
        hook.remove()
    pooled = pooled[0]
    torch.testing.assert_close(det.features[whole[0]], pooled, rtol=1e-4, atol=1e-4)
    probs = F.softmax(logits, dim=0)
    assert int(det.labels[whole[0]]) == int(probs.argmax())
    torch.testing.assert_close(det.scores[whole[0]], probs.max(), rtol=1e-4, atol=1e-6)


def test_grid_boxes_features_and_tags_on_odd_sizes(tmp_path):
    model, path = tiny_resnext(tmp_path)
    grid = convert_grid(path, min_size=96, max_size=160)
    assert (grid.config.arch, grid.config.groups, grid.config.width_per_group) == ("resnext14_32x4d", 32, 4)
    images = [random_image(1, 61, 150), random_image(2, 97, 143, gray=True), random_image(3, 200, 33)]
    dets = grid.detect(images)
    for image, det in zip(images, dets):
        h, w = image.shape[1:]
        boxes = expected_boxes(h, w)
        with torch.no_grad():
            feats, probs = reference(model, image, boxes, 96, 160)
        scores, labels = probs.max(dim=1)
        order = torch.argsort(scores, descending=True, stable=True)   # best first
        assert len(det) == 14 and det.image_size == (h, w)
        torch.testing.assert_close(det.boxes, boxes[order])
        torch.testing.assert_close(det.features, feats[order], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(det.scores, scores[order], rtol=1e-4, atol=1e-6)
        assert det.labels.tolist() == labels[order].tolist()
        assert det.attr_ids.shape == (14, 0)
    # an image's regions do not depend on the batch it came in; max_boxes keeps the best
    alone = grid.detect([images[1]], max_boxes=5)[0]
    torch.testing.assert_close(alone.features, dets[1].features[:5])
    assert alone.boxes.tolist() == dets[1].boxes[:5].tolist()


def run_detector_stage(project: Path, monkeypatch, weights: str | None):
    params = yaml.safe_load((ROOT / "params.yaml").read_text("utf-8"))
    params["detector"].update(arch="grid_resnet", weights=weights or "data/detector_weights")
    params["features"]["source"] = "data/released_features"
    (project / "data" / "released_features").mkdir(parents=True, exist_ok=True)  # empty: no released features
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(project)
    if weights is None:
        (project / "data" / "detector_weights").mkdir()
    monkeypatch.syspath_prepend(str(ROOT / "stages"))
    spec = importlib.util.spec_from_file_location("_grid_stage_detector", ROOT / "stages" / "detector.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    stage.main()


def test_the_stage_converts_and_the_extractor_gives_2054_dim_rows(resnet50, tmp_path, monkeypatch):
    """detector stage (grid_resnet) -> models/detector -> load_detector -> the extractor's
    rows on three images -> Chinese tags: the photos case without boxes or detector weights."""
    model, path = resnet50
    run_detector_stage(tmp_path, monkeypatch, str(path))
    metrics = json.loads((tmp_path / "metrics" / "detector.json").read_text("utf-8"))
    assert metrics == {"source": "grid", "arch": "resnet50", "grids": [1, 2, 3], "boxes_per_image": 14}
    folder = tmp_path / "models" / "detector"
    config = json.loads((folder / "config.json").read_text("utf-8"))
    assert config["kind"] == "grid" and (config["min_size"], config["max_size"]) == (600, 1000)
    # the default 600 px input costs ~20 s per image on a busy 2-core CPU: a smaller one here
    (folder / "config.json").write_text(json.dumps({**config, "min_size": 128, "max_size": 200}), "utf-8")
    detector = load_detector(folder)
    assert isinstance(detector, GridDetector)
    for k, v in model.state_dict().items():
        assert torch.equal(detector.body.state_dict()[k], v), k
    images = [(11, random_image(4, 90, 120)), (12, random_image(5, 77, 41, gray=True)), (13, random_image(6, 64, 64))]
    records = dict(detect_regions(detector, images, ExtractConfig(min_boxes=10, max_boxes=50, batch_size=2)))
    table = LabelTable.load()
    for image_id, image in images:
        rec = records[image_id]
        h, w = image.shape[1:]
        assert rec.features.shape == (14, 2054) and (rec.width, rec.height) == (w, h)
        boxes = torch.from_numpy(rec.boxes)
        geometry = torch.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h,
                                (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], dim=1)
        torch.testing.assert_close(torch.from_numpy(rec.features[:, 2048:]), geometry)
        assert sorted(map(tuple, rec.boxes.tolist())) == sorted(map(tuple, expected_boxes(h, w).tolist()))
        with torch.no_grad():
            feats, probs = reference(model, image, torch.from_numpy(rec.boxes), 128, 200)
        torch.testing.assert_close(torch.from_numpy(rec.features[:, :2048]), feats, rtol=1e-4, atol=1e-4)
        assert rec.classes == [detector.config.classes[i] for i in probs.argmax(dim=1).tolist()]
        assert all(table.get(c, "object") for c in rec.classes) and rec.attributes == [[]] * 14


def test_wrong_checkpoints_are_named_with_what_to_do(tmp_path, monkeypatch):
    detector = tmp_path / "small-detector.pth"
    torch.save(build_detector("small").state_dict(), detector)
    with pytest.raises(CheckpointError, match=r"small-detector\.pth: not a torchvision ResNet.*detector checkpoint"):
        convert_grid(detector)
    junk = tmp_path / "random.pth"
    torch.save({"weight": torch.zeros(3), "bias": torch.ones(2)}, junk)
    with pytest.raises(CheckpointError, match=r"random\.pth: not a torchvision ResNet.*resnet101-63fe2227\.pth"):
        convert_grid(junk)
    basic = tmp_path / "resnet-basic.pth"
    torch.save(ResNet(BasicBlock, [1, 1, 1, 1]).state_dict(), basic)
    with pytest.raises(CheckpointError, match=r"resnet-basic\.pth: .*ResNet-18/34"):
        convert_grid(basic)
    other_head = tmp_path / "places.pth"
    torch.save(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=365).state_dict(), other_head)
    with pytest.raises(CheckpointError, match=r"places\.pth: fc\.weight is \(365, 2048\).*ImageNet-1k"):
        convert_grid(other_head)
    (tmp_path / "project").mkdir()
    with pytest.raises(SettingsError, match="grid_resnet needs detector.weights.*No detector weights"):
        run_detector_stage(tmp_path / "project", monkeypatch, None)


def test_a_saved_grid_folder_with_foreign_weights_is_refused(tmp_path):
    model, path = tiny_resnext(tmp_path)
    grid = convert_grid(path)
    save_detector(grid, tmp_path / "det")
    save_file(build_detector("small").state_dict(), str(tmp_path / "det" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"det/model\.safetensors: not a torchvision resnext14_32x4d"):
        load_detector(tmp_path / "det")


def test_a_half_precision_checkpoint_converts_to_float32(tmp_path):
    model, _ = tiny_resnext(tmp_path)
    path = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    grid = convert_grid(path)
    for k, v in model.state_dict().items():
        got = grid.body.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v.half().to(v.dtype) if v.is_floating_point() else v), k


def test_convert_detector_cli_writes_a_grid_folder(tmp_path, capsys):
    """`mmcn convert-detector W --arch grid_resnet`: the stage's grid conversion outside DVC; the
    folder's weights are the checkpoint's own (DataParallel prefix stripped) and it detects."""
    import json

    from mmcn.cli import main as cli_main

    model, path = tiny_resnext(tmp_path)
    assert cli_main(["convert-detector", str(path), "--arch", "grid_resnet", "--out", str(tmp_path / "det")]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "grid_resnet"
    loaded = load_detector(tmp_path / "det")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.body.state_dict()[k], v), k
    det = loaded.detect([random_image(3, 50, 70)])[0]
    assert len(det) == det.features.shape[0] and det.features.shape[1] == 2048
    assert cli_main(["convert-detector", str(path), "--arch", "grid_resnet", "--out", str(tmp_path / "det"),
                     "--labels", str(path)]) == 2  # exists (no --force) / labels refused: a user error either way
