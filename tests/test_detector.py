"""The native detector: training losses, detect() contract, pre/post-processing, configs, save/load."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from conftest import pinned_numerics

from mmcn.vision import DetectorConfig, build_detector, detector_config, display_label, load_detector, load_vocab, save_detector
from mmcn.vision.detector import Detector, select_detections

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 210)}


def _scene(rng: np.random.Generator, config: DetectorConfig) -> tuple[torch.Tensor, dict]:
    """A 128x128 image with 1-2 coloured squares, and its target (1-based labels and attribute ids)."""
    image = Image.new("RGB", (128, 128), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    boxes, labels, attrs = [], [], []
    for k in range(int(rng.integers(1, 3))):
        side = int(rng.integers(20, 50))
        x = int(rng.integers(0, 128 - side)) if k == 0 else (128 - side if boxes[0][0] > 64 - side else 0)
        y = int(rng.integers(0, 128 - side))
        colour = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
        boxes.append([x, y, x + side, y + side])
        labels.append(config.classes.index("square") + 1)
        size = "large" if side >= 35 else "small"
        attrs.append([config.attributes.index(colour) + 1, config.attributes.index(size) + 1])
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    return tensor, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                    "attributes": torch.tensor(attrs)}


@pytest.fixture(scope="module")
def trained():
    """A small detector after a few SGD steps on 8 synthetic images, with its data and loss history."""
    config = detector_config("small")
    rng = np.random.default_rng(0)
    data = [_scene(rng, config) for _ in range(8)]
    images, targets = [d[0] for d in data], [d[1] for d in data]
    history = []
    with pinned_numerics():
        model = build_detector(config).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        for _ in range(16):
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append({k: v.item() for k, v in losses.items()})
    return model.eval(), images, targets, history


def test_train_mode_returns_finite_losses_that_decrease(trained):
    _, _, _, history = trained
    assert set(history[0]) == {"loss_rpn_objectness", "loss_rpn_box", "loss_roi_cls", "loss_roi_box", "loss_attribute"}
    assert all(math.isfinite(v) for step in history for v in step.values())
    total = [sum(step.values()) for step in history]
    assert np.mean(total[-3:]) < 0.8 * total[0]
    assert history[-1]["loss_attribute"] < history[0]["loss_attribute"]


def test_training_needs_targets_and_valid_labels():
    model = build_detector("small").train()
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one target dict"):
        model([image])
    with pytest.raises(ValueError, match="labels must be 1..6"):
        model([image], [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}])


def test_detect_contract(trained):
    model, images, _, _ = trained
    wide = torch.randint(0, 255, (3, 96, 160), dtype=torch.uint8)  # resized to 192 x 320 inside
    results = model.detect(images[:3] + [wide])
    assert len(results) == 4
    for image, det in zip(images[:3] + [wide], results):
        h, w = image.shape[-2:]
        n = len(det)
        assert 10 <= n <= 100
        assert det.image_size == (h, w)
        assert det.boxes.shape == (n, 4) and det.boxes.dtype == torch.float32
        assert det.features.shape == (n, 2048) and det.features.dtype == torch.float32
        assert torch.isfinite(det.features).all()
        assert (det.boxes[:, 0] >= 0).all() and (det.boxes[:, 2] <= w).all()
        assert (det.boxes[:, 1] >= 0).all() and (det.boxes[:, 3] <= h).all()
        assert (det.boxes[:, 2] >= det.boxes[:, 0]).all() and (det.boxes[:, 3] >= det.boxes[:, 1]).all()
        assert torch.all(det.scores[:-1] >= det.scores[1:])
        assert ((det.labels >= 0) & (det.labels < 6)).all()
        k = model.config.max_attributes
        assert det.attr_ids.shape == (n, k) and det.attr_scores.shape == (n, k)
        valid = det.attr_ids >= 0
        assert (det.attr_ids[valid] < 9).all()
        assert (det.attr_scores[valid] > model.config.attr_score_thresh).all()
        assert (det.attr_scores[~valid] == 0).all()
    assert model.training is False


def test_detect_box_count_limits(trained):
    model, images, _, _ = trained
    assert all(len(d) <= 5 for d in model.detect(images[:2], max_boxes=5))
    # nothing clears the threshold: the best min_boxes still come back
    assert [len(d) for d in model.detect(images[:2], score_thresh=1.01, min_boxes=7)] == [7, 7]
    # eval(): forward gives detections; detect() restores train mode if it was set
    model.train()
    assert len(model.detect(images[:1])) == 1 and model.training
    model.eval()
    assert len(model(images[:1])[0]) >= 10


def test_features_follow_regressed_boxes(trained):
    model, images, _, _ = trained
    with_reg = model.detect(images[:1], box_regression=True)[0]
    without = model.detect(images[:1], box_regression=False)[0]
    assert with_reg.features.shape[1] == without.features.shape[1] == 2048
    # re-pooling the final boxes by hand gives the returned features
    image_list, _, scales = model.preprocess(images[:1])
    feats = model.backbone(image_list.tensors)
    sx, sy = scales[0]
    boxes = with_reg.boxes * torch.tensor([sx, sy, sx, sy])
    with torch.no_grad():
        again = model.roi_heads.box_features(feats, [boxes])
    torch.testing.assert_close(again, with_reg.features, atol=1e-4, rtol=1e-4)


def test_zero_proposals_give_the_whole_image(trained):
    model, images, _, _ = trained
    model.rpn.score_thresh = 2.0  # no proposal passes
    try:
        det = model.detect([images[0][:, :100, :120]], box_regression=False)[0]
        regressed = model.detect([images[0][:, :100, :120]])[0]
    finally:
        model.rpn.score_thresh = 0.0
    assert len(det) == 1
    torch.testing.assert_close(det.boxes, torch.tensor([[0.0, 0.0, 120.0, 100.0]]))
    assert det.features.shape == (1, 2048)
    assert len(regressed) == 1 and (regressed.boxes >= 0).all() and (regressed.boxes[0, 2:] <= torch.tensor([120, 100])).all()


def test_select_detections_per_class_nms_then_best_class():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.5]], dtype=torch.float32)
    boxes = boxes[:, None, :].expand(4, 2, 4)
    scores = torch.tensor([[0.9, 0.05], [0.1, 0.8], [0.15, 0.1], [0.3, 0.2]])
    keep, label, score = select_detections(boxes, scores, score_thresh=0.2, nms_thresh=0.3, min_boxes=0, max_boxes=10)
    # class 0: box 0 suppresses 1 and 3; class 1: box 1 suppresses 0 and 3; box 2 survives both
    assert keep.tolist() == [0, 1] and label.tolist() == [0, 1]
    torch.testing.assert_close(score, torch.tensor([0.9, 0.8]))
    keep, _, _ = select_detections(boxes, scores, 0.2, 0.3, min_boxes=3, max_boxes=10)
    assert keep.tolist() == [0, 1, 2]  # box 3 was suppressed in every class: never a candidate
    keep, _, _ = select_detections(boxes, scores, 0.0, 0.3, min_boxes=0, max_boxes=1)
    assert keep.tolist() == [0]


def test_preprocess_bgr_resize_and_targets():
    config = detector_config("small", input_format="BGR", pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0),
                             min_size=128, max_size=224)
    model = build_detector(config)
    image = torch.zeros(3, 64, 100, dtype=torch.uint8)
    image[0], image[1], image[2] = 10, 20, 30  # R, G, B
    target = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "labels": torch.tensor([2])}
    batch, targets, scales = model.preprocess([image], [target])
    assert batch.image_sizes == [(128, 200)]
    assert batch.tensors.shape == (1, 3, 128, 208)  # padded to a multiple of 16
    assert batch.tensors[0, :, 5, 5].tolist() == [30.0, 20.0, 10.0]  # BGR
    assert (batch.tensors[0, :, :, 200:] == 0).all()
    assert scales == [(2.0, 2.0)]
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[20.0, 40.0, 60.0, 80.0]]))


def test_save_load_round_trip(trained, tmp_path):
    model, images, _, _ = trained
    out = save_detector(model, tmp_path / "detector")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_detector(out)
    assert loaded.config == model.config and not loaded.training
    a, b = model.detect(images[:2]), loaded.detect(images[:2])
    for x, y in zip(a, b):
        for field in ("boxes", "scores", "labels", "attr_ids", "attr_scores", "features"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field
    (out / "config.json").write_text(json.dumps({**model.config.to_dict(), "classes": ["only_one"]}))
    with pytest.raises(ValueError, match="does not match"):
        load_detector(out)


@pytest.mark.parametrize("name", ["small", "butd_r101_c4", "vinvl_x152_c4"])
def test_config_json_round_trip(name):
    config = detector_config(name)
    assert DetectorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown keys"):
        DetectorConfig.from_dict({**config.to_dict(), "colour": 1})


def test_vocabularies_are_packaged():
    assert [len(load_vocab(n)) for n in ("vg1600_objects", "vg400_attributes", "vinvl1594_objects",
                                         "vinvl524_attributes")] == [1600, 400, 1594, 524]
    assert display_label(load_vocab("vg400_attributes")[0]) == "gray"
    assert detector_config("vinvl_x152_c4").class_labels[0] == "ad"


@pytest.mark.parametrize("name, dims", [
    ("butd_r101_c4", dict(cls=1601, box=1600 * 4, embed=1601, attr=401, anchors=12, rpn=512, blocks=(3, 4, 23, 3))),
    ("vinvl_x152_c4", dict(cls=1595, box=1594 * 4, embed=1595, attr=525, anchors=15, rpn=1024, blocks=(3, 8, 36, 3))),
])
def test_real_size_configs_build(name, dims):
    with torch.device("meta"):
        model = Detector(detector_config(name))
    heads = model.roi_heads
    assert heads.box_predictor.cls_score.weight.shape == (dims["cls"], 2048)
    assert heads.box_predictor.bbox_pred.weight.shape == (dims["box"], 2048)
    assert heads.attribute_predictor.cls_embed.weight.shape == (dims["embed"], 256)
    assert heads.attribute_predictor.fc.weight.shape == (512, 2048 + 256)
    assert heads.attribute_predictor.attr_score.weight.shape == (dims["attr"], 512)
    assert model.rpn.head.cls_logits.weight.shape == (dims["anchors"], dims["rpn"], 1, 1)
    assert heads.box_proj is None  # res5 already gives 2048
    assert tuple(len(s) for s in (model.backbone.res2, model.backbone.res3, model.backbone.res4, heads.res5)) == dims["blocks"]
    res5 = heads.res5[0]
    if name == "butd_r101_c4":  # MSRA: stride in 1x1; res5 stride 1 dilation 2; caffe max-pool
        assert model.backbone.res3[0].conv1.stride == (2, 2) and model.backbone.res3[0].conv2.stride == (1, 1)
        assert res5.conv2.dilation == (2, 2) and res5.downsample[0].stride == (1, 1)
        assert model.backbone.stem.caffe_maxpool
    else:  # ResNeXt 32x8d: stride in 3x3, groups 32; res5 stride 2
        assert model.backbone.res3[0].conv2.stride == (2, 2) and model.backbone.res3[0].conv2.groups == 32
        assert res5.conv2.stride == (2, 2) and res5.conv2.dilation == (1, 1)
        assert model.backbone.res2[0].conv2.weight.shape == (256, 8, 3, 3)


@pytest.mark.parametrize("name", ["butd_r101_c4", "vinvl_x152_c4"])
def test_reduced_depth_real_width_variants_run(name):
    """One block per stage but the real widths, pooling, strides and vocabularies: detect works end to end."""
    torch.manual_seed(0)
    config = detector_config(name, stage_blocks=(1, 1, 1, 1), min_size=64, max_size=96, rpn_post_nms_test=40)
    model = build_detector(config).eval()
    det = model.detect([torch.randint(0, 255, (3, 50, 70), dtype=torch.uint8)])[0]
    assert 1 <= len(det) <= 100 and det.features.shape == (len(det), 2048)
    assert ((det.labels >= 0) & (det.labels < config.num_classes)).all()
    assert (det.boxes[:, 2] <= 70).all() and (det.boxes[:, 3] <= 50).all()


@pytest.mark.parametrize("n, k, shared", [(300, 401, False), (300, 401, True), (40, 7, False), (64, 37, True)])  # 120k boxes: above 100k
def test_nms_of_all_classes_at_once_decides_as_torchvision_per_class(n, k, shared):
    """The GPU path of per-class NMS against torchvision's batched_nms (its per-class loop above
    100k boxes), on random boxes: per-class regressed or shared by all classes."""
    from torchvision.ops import batched_nms

    from mmcn.vision.detector import _nms_all_classes_at_once

    g = torch.Generator().manual_seed(n + k)
    xy, wh = torch.rand(n, 1 if shared else k, 2, generator=g) * 500, torch.rand(n, 1 if shared else k, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + wh], -1).expand(n, k, 4)
    scores = torch.rand(n, k, generator=g)
    scores[: n // 4] = scores[0]  # exact ties in every class
    kept = batched_nms(boxes.reshape(-1, 4), scores.reshape(-1), torch.arange(k).repeat(n), 0.3)
    expected = torch.zeros(n * k, dtype=torch.bool)
    expected[kept] = True
    assert torch.equal(_nms_all_classes_at_once(boxes, scores, 0.3), expected.view(n, k))
