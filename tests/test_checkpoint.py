"""Checkpoint conversion: detectron2 (BUTD) and maskrcnn_benchmark (VinVL) names, layouts and files."""
import os
import pickle

import numpy as np
import pytest
import torch

from mmcn.vision import build_detector, detector_config, save_detector
from mmcn.vision.checkpoint import (CheckpointError, convert_state_dict, guess_source, load_checkpoint,
                                    read_state_dict)
from mmcn.vision.detector import BoxCoder, cell_anchors

# Key names and shapes exactly as the real files have them (airsplay's faster_rcnn_from_caffe_attr.pkl
# for BUTD R101-C4; VinVL's vinvl_vg_x152c4.pth, here with a DataParallel "module." prefix).
BUTD_REAL = {
    "backbone.stem.conv1.weight": (64, 3, 7, 7),
    "backbone.stem.conv1.norm.running_var": (64,),
    "backbone.res2.0.shortcut.weight": (256, 64, 1, 1),
    "backbone.res2.0.shortcut.norm.bias": (256,),
    "backbone.res2.0.conv1.weight": (64, 64, 1, 1),
    "backbone.res3.0.conv1.weight": (128, 256, 1, 1),
    "backbone.res4.22.conv3.weight": (1024, 256, 1, 1),
    "backbone.res4.22.conv3.norm.weight": (1024,),
    "roi_heads.res5.0.shortcut.weight": (2048, 1024, 1, 1),
    "roi_heads.res5.2.conv2.weight": (512, 512, 3, 3),
    "proposal_generator.rpn_head.conv.weight": (512, 1024, 3, 3),
    "proposal_generator.rpn_head.objectness_logits.weight": (12, 512, 1, 1),
    "proposal_generator.rpn_head.anchor_deltas.weight": (48, 512, 1, 1),
    "roi_heads.box_predictor.cls_score.weight": (1601, 2048),
    "roi_heads.box_predictor.bbox_pred.weight": (6400, 2048),
    "roi_heads.box_predictor.cls_embedding.weight": (1601, 256),
    "roi_heads.box_predictor.fc_attr.weight": (512, 2304),
    "roi_heads.box_predictor.attr_score.weight": (401, 512),
}
VINVL_REAL = {
    "module.backbone.body.stem.conv1.weight": (64, 3, 7, 7),
    "module.backbone.body.stem.bn1.weight": (64,),
    "module.backbone.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "module.backbone.body.layer1.0.conv2.weight": (256, 8, 3, 3),
    "module.backbone.body.layer3.35.conv3.weight": (1024, 1024, 1, 1),
    "module.rpn.anchor_generator.cell_anchors.0": (15, 4),
    "module.rpn.head.conv.weight": (1024, 1024, 3, 3),
    "module.rpn.head.cls_logits.weight": (15, 1024, 1, 1),
    "module.rpn.head.bbox_pred.weight": (60, 1024, 1, 1),
    "module.roi_heads.box.feature_extractor.head.layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "module.roi_heads.box.feature_extractor.head.layer4.0.conv2.weight": (2048, 64, 3, 3),
    "module.roi_heads.box.predictor.cls_score.weight": (1595, 2048),
    "module.roi_heads.box.predictor.bbox_pred.weight": (6380, 2048),
    "module.attribute.feature_extractor.head.layer4.2.conv3.weight": (2048, 2048, 1, 1),
    "module.attribute.predictor.cls_embedding.weight": (1595, 256),
    "module.attribute.predictor.fc_attr.weight": (512, 2304),
    "module.attribute.predictor.attr_score.weight": (525, 512),
}


def detectron2_shapes(blocks=(3, 4, 23, 3), classes=1600, attributes=400, anchors=12) -> dict:
    """Every key of a detectron2 R-C4 + airsplay attribute head checkpoint (detectron2's own naming)."""
    shapes = {}

    def conv(prefix, out, inp, k):
        shapes[f"{prefix}.weight"] = (out, inp, k, k)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{stat}"] = (out,)

    conv("backbone.stem.conv1", 64, 3, 7)
    inp = 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=2):
        out = width * 4
        for i in range(n):
            p = f"{'backbone' if stage < 5 else 'roi_heads'}.res{stage}.{i}"
            if i == 0:
                conv(f"{p}.shortcut", out, inp, 1)
            conv(f"{p}.conv1", width, inp if i == 0 else out, 1)
            conv(f"{p}.conv2", width, width, 3)
            conv(f"{p}.conv3", out, width, 1)
        inp = out
    head = "proposal_generator.rpn_head"
    shapes.update({f"{head}.conv.weight": (512, 1024, 3, 3), f"{head}.conv.bias": (512,),
                   f"{head}.objectness_logits.weight": (anchors, 512, 1, 1), f"{head}.objectness_logits.bias": (anchors,),
                   f"{head}.anchor_deltas.weight": (anchors * 4, 512, 1, 1), f"{head}.anchor_deltas.bias": (anchors * 4,)})
    p = "roi_heads.box_predictor"
    shapes.update({f"{p}.cls_score.weight": (classes + 1, 2048), f"{p}.cls_score.bias": (classes + 1,),
                   f"{p}.bbox_pred.weight": (classes * 4, 2048), f"{p}.bbox_pred.bias": (classes * 4,),
                   f"{p}.cls_embedding.weight": (classes + 1, 256),
                   f"{p}.fc_attr.weight": (512, 2048 + 256), f"{p}.fc_attr.bias": (512,),
                   f"{p}.attr_score.weight": (attributes + 1, 512), f"{p}.attr_score.bias": (attributes + 1,)})
    return shapes


def maskrcnn_shapes(blocks=(3, 8, 36, 3), classes=1595, attributes=525, anchors=15, groups=32, width=8,
                    prefix="module.") -> dict:
    """Every key of a maskrcnn_benchmark / scene_graph_benchmark AttrRCNN X-C4 checkpoint (its own naming)."""
    shapes = {}

    def bn(name, c):
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}{name}.{stat}"] = (c,)

    shapes[f"{prefix}backbone.body.stem.conv1.weight"] = (64, 3, 7, 7)
    bn("backbone.body.stem.bn1", 64)
    inp = 64
    for index, n in enumerate(blocks, start=1):
        inner, out = groups * width * 2 ** (index - 1), 256 * 2 ** (index - 1)
        heads = [f"backbone.body.layer{index}"] if index < 4 else [
            "roi_heads.box.feature_extractor.head.layer4", "attribute.feature_extractor.head.layer4"]
        for head in heads:
            for i in range(n):
                p = f"{head}.{i}"
                if i == 0:
                    shapes[f"{prefix}{p}.downsample.0.weight"] = (out, inp, 1, 1)
                    bn(f"{p}.downsample.1", out)
                shapes[f"{prefix}{p}.conv1.weight"] = (inner, inp if i == 0 else out, 1, 1)
                bn(f"{p}.bn1", inner)
                shapes[f"{prefix}{p}.conv2.weight"] = (inner, inner // groups, 3, 3)
                bn(f"{p}.bn2", inner)
                shapes[f"{prefix}{p}.conv3.weight"] = (out, inner, 1, 1)
                bn(f"{p}.bn3", out)
        inp = out
    shapes.update({f"{prefix}rpn.anchor_generator.cell_anchors.0": (anchors, 4),
                   f"{prefix}rpn.head.conv.weight": (1024, 1024, 3, 3), f"{prefix}rpn.head.conv.bias": (1024,),
                   f"{prefix}rpn.head.cls_logits.weight": (anchors, 1024, 1, 1), f"{prefix}rpn.head.cls_logits.bias": (anchors,),
                   f"{prefix}rpn.head.bbox_pred.weight": (anchors * 4, 1024, 1, 1),
                   f"{prefix}rpn.head.bbox_pred.bias": (anchors * 4,)})
    p = f"{prefix}roi_heads.box.predictor"
    shapes.update({f"{p}.cls_score.weight": (classes, 2048), f"{p}.cls_score.bias": (classes,),
                   f"{p}.bbox_pred.weight": (classes * 4, 2048), f"{p}.bbox_pred.bias": (classes * 4,)})
    p = f"{prefix}attribute.predictor"
    shapes.update({f"{p}.cls_embedding.weight": (classes, 256), f"{p}.fc_attr.weight": (512, 2048 + 256),
                   f"{p}.fc_attr.bias": (512,), f"{p}.attr_score.weight": (attributes, 512),
                   f"{p}.attr_score.bias": (attributes,)})
    return shapes


def meta_state(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def real_state(shapes: dict, seed: int = 0) -> dict:
    """Small random weights; norms as identity so activations stay tame."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, s in shapes.items():
        if k.endswith(("norm.weight", "running_var")) or (".bn" in k and k.endswith("weight")) \
                or ("downsample.1" in k and k.endswith("weight")):
            state[k] = torch.ones(s)
        elif k.endswith(("bias", "running_mean")):
            state[k] = torch.zeros(s)
        else:
            state[k] = torch.randn(s, generator=g) * 0.01
    return state


@pytest.mark.parametrize("source, shapes, real, name", [
    ("detectron2", detectron2_shapes(), BUTD_REAL, "butd_r101_c4"),
    ("maskrcnn_benchmark", maskrcnn_shapes(), VINVL_REAL, "vinvl_x152_c4"),
])
def test_full_size_mapping_covers_every_key(source, shapes, real, name):
    for key, shape in real.items():  # the generated dict agrees with the hand-written real names
        assert shapes[key] == shape, key
    state = meta_state(shapes)
    assert guess_source(state) == source
    converted = convert_state_dict(state, source, name)  # strict: raises on any missing/unexpected/shape
    with torch.device("meta"):
        expected = build_detector(name).state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == v.shape for k, v in expected.items())


def _butd_small():
    return detector_config("butd_r101_c4", stage_blocks=(1, 1, 1, 1), classes=("a", "b", "c"),
                           attributes=("x", "y"), min_size=64, max_size=96, rpn_post_nms_test=50)


def _vinvl_small():
    return detector_config("vinvl_x152_c4", stage_blocks=(1, 1, 1, 1), classes=("a", "b", "c"),
                           attributes=("x", "y"), min_size=64, max_size=96, rpn_post_nms_test=50)


def test_detectron2_background_attribute_and_anchor_layout():
    config = _butd_small()
    state = meta_state(detectron2_shapes((1, 1, 1, 1), classes=3, attributes=2))
    state = {k: torch.zeros(v.shape) for k, v in state.items()}
    state["roi_heads.box_predictor.cls_score.bias"] = torch.tensor([1.0, 2.0, 3.0, 100.0])  # background last
    state["roi_heads.box_predictor.cls_embedding.weight"] = torch.arange(4.0)[:, None].expand(4, 256).clone()
    state["roi_heads.box_predictor.attr_score.bias"] = torch.tensor([1.0, 2.0, -7.0])  # no-attribute last
    # detectron2 orders a cell's anchors size-major: k = size_index * 3 + ratio_index
    sizes, ratios = config.anchor_sizes, config.anchor_ratios
    s, r = 2, 0  # size 256, ratio 0.5
    k = s * len(ratios) + r
    state["proposal_generator.rpn_head.objectness_logits.bias"][k] = 50.0
    state["proposal_generator.rpn_head.anchor_deltas.bias"][4 * k + 2] = 7.0  # dw of that anchor
    converted = convert_state_dict(state, "detectron2", config)

    model = build_detector(config).eval()
    model.load_state_dict(converted)
    predictor = model.roi_heads.box_predictor
    logits, _ = predictor(torch.zeros(1, 2048))
    assert logits.argmax().item() == 0 and logits[0, 0].item() == 100.0  # background is native 0
    assert logits[0, 1:].tolist() == [1.0, 2.0, 3.0]
    embed = model.roi_heads.attribute_predictor.cls_embed.weight[:, 0]
    assert embed.tolist() == [3.0, 0.0, 1.0, 2.0]  # detectron2's background row (3) moved to 0
    assert model.roi_heads.attribute_predictor.attr_score.bias.tolist() == [-7.0, 1.0, 2.0]
    # the marked channel now sits at the native index of the same (size, ratio), and acts on that anchor
    native = model.rpn.head.cls_logits.bias.argmax().item()
    assert native == r * len(sizes) + s
    x1, y1, x2, y2 = model.rpn.anchor_generator.cell_anchors[0][native].tolist()  # caffe's rounded legacy anchors
    assert (x2 - x1) * (y2 - y1) == pytest.approx(sizes[s] ** 2, rel=0.1)             # (butd_proposals: caffe)
    assert (y2 - y1) / (x2 - x1) == pytest.approx(ratios[r], rel=0.1)
    assert model.rpn.head.bbox_pred.bias.nonzero().flatten().tolist() == [4 * native + 2]


def _vinvl_state(config) -> dict:
    """A reduced VinVL-format state dict as the real file has it: legacy cell anchors, shared res5 copy."""
    state = real_state(maskrcnn_shapes((1, 1, 1, 1), classes=4, attributes=3))
    state["module.rpn.anchor_generator.cell_anchors.0"] = cell_anchors(config.anchor_sizes, config.anchor_ratios,
                                                                        "maskrcnn_benchmark")
    for key in [k for k in state if "box.feature_extractor" in k]:
        state[key.replace("roi_heads.box.feature_extractor", "attribute.feature_extractor")] = state[key]
    return state


def test_maskrcnn_background_rows_anchor_check_and_shared_res5():
    config = _vinvl_small()
    state = _vinvl_state(config)
    state["module.roi_heads.box.predictor.cls_score.bias"] = torch.tensor([9.0, 1.0, 2.0, 3.0])  # background first
    state["module.roi_heads.box.predictor.bbox_pred.bias"] = torch.arange(16.0)  # class j (0 = background) owns rows 4j..4j+3
    state["module.rpn.head.cls_logits.bias"] = torch.arange(15.0)
    converted = convert_state_dict(state, "maskrcnn_benchmark", config)
    assert converted["roi_heads.box_predictor.cls_score.bias"].tolist() == [9.0, 1.0, 2.0, 3.0]
    assert converted["roi_heads.box_predictor.bbox_pred.bias"].tolist() == list(range(4, 16))
    assert converted["rpn.head.cls_logits.bias"].tolist() == list(range(15))  # already ratio-major
    # the stored cell anchors are Detectron's legacy ones, in the same order as ours
    legacy = cell_anchors((32,), (0.5, 1.0, 2.0), "maskrcnn_benchmark")
    assert legacy.tolist() == [[-15.0, -4.0, 30.0, 19.0], [-8.0, -8.0, 23.0, 23.0], [-3.0, -14.0, 18.0, 29.0]]

    wrong = dict(state)
    wrong["module.rpn.anchor_generator.cell_anchors.0"] = cell_anchors(config.anchor_sizes, config.anchor_ratios,
                                                                        "detectron2")
    with pytest.raises(CheckpointError, match="cell anchors"):
        convert_state_dict(wrong, "maskrcnn_benchmark", config)
    unshared = dict(state)
    key = "module.attribute.feature_extractor.head.layer4.0.conv1.weight"
    unshared[key] = unshared[key] + 1
    with pytest.raises(CheckpointError, match="separate attribute"):
        convert_state_dict(unshared, "maskrcnn_benchmark", config)


def test_legacy_plus_one_box_coding():
    box = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    double = torch.tensor([[0.0, 0.0, np.log(2.0), np.log(2.0)]], dtype=torch.float32)
    legacy, plain = BoxCoder((1, 1, 1, 1), legacy_plus_one=True), BoxCoder((1, 1, 1, 1))
    # legacy: width 10, centre 5 -> width 20 spans [-5, 14]; plain: width 9, centre 4.5 -> [-4.5, 13.5]
    torch.testing.assert_close(legacy.decode_single(double, box), torch.tensor([[-5.0, -5.0, 14.0, 14.0]]))
    torch.testing.assert_close(plain.decode_single(double, box), torch.tensor([[-4.5, -4.5, 13.5, 13.5]]))
    for coder in (legacy, plain):
        torch.testing.assert_close(coder.decode_single(torch.zeros(1, 4), box), box)
        target = torch.tensor([[2.0, 3.0, 20.0, 11.0]])
        torch.testing.assert_close(coder.decode_single(coder.encode_single(target, box), box), target)
    vinvl = build_detector(_vinvl_small())
    assert vinvl.rpn.box_coder.offset == 1.0 and vinvl.roi_heads.box_coder.offset == 1.0
    assert build_detector(_butd_small()).rpn.box_coder.offset == 0.0


@pytest.mark.parametrize("protocol", [2, 5])
def test_pkl_round_trip_through_restricted_unpickler(tmp_path, protocol):
    config = _butd_small()
    state = real_state(detectron2_shapes((1, 1, 1, 1), classes=3, attributes=2))
    path = tmp_path / "butd.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f, protocol=protocol)
    assert read_state_dict(path)["roi_heads.box_predictor.cls_score.weight"].shape == (4, 2048)
    model = load_checkpoint(path, config)
    assert not model.training
    torch.testing.assert_close(model.backbone.res4[0].conv1.weight, state["backbone.res4.0.conv1.weight"])
    det = model.detect([torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8)])[0]
    assert det.features.shape == (len(det), 2048) and torch.isfinite(det.features).all()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pkl_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.stem.conv1.weight": _Exploit(marker)}}, f)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        read_state_dict(path)
    assert not marker.exists()


def test_pth_with_module_prefix_loads_and_runs(tmp_path):
    config = _vinvl_small()
    state = _vinvl_state(config)
    path = tmp_path / "vinvl.pth"
    torch.save({"model": state, "iteration": 80000}, path)
    model = load_checkpoint(path, config)
    det = model.detect([torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8)])[0]
    assert det.features.shape == (len(det), 2048)


def test_native_weights_load_back(tmp_path):
    model = build_detector("small").eval()
    save_detector(model, tmp_path)
    assert guess_source(read_state_dict(tmp_path / "model.safetensors")) == "native"
    loaded = load_checkpoint(tmp_path / "model.safetensors", model.config)
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    assert torch.equal(model.detect([image])[0].features, loaded.detect([image])[0].features)


def test_mismatch_errors_name_the_keys():
    config = _butd_small()
    good = meta_state(detectron2_shapes((1, 1, 1, 1), classes=3, attributes=2))
    bigger_vocab = meta_state(detectron2_shapes((1, 1, 1, 1), classes=5, attributes=2))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*cls_score\.weight: checkpoint \(6, 2048\) vs model \(4, 2048\)"):
        convert_state_dict(bigger_vocab, "detectron2", config)
    lacking = {k: v for k, v in good.items() if "res4.0.conv2" not in k}
    extra = {**good, "roi_heads.mask_head.predictor.weight": torch.empty(1, device="meta")}
    with pytest.raises(CheckpointError, match=r"(?s)missing \(5\).*backbone\.res4\.0\.bn2\.bias"):
        convert_state_dict(lacking, "detectron2", config)
    with pytest.raises(CheckpointError, match=r"(?s)unexpected \(1\).*mask_head"):
        convert_state_dict(extra, "detectron2", config)
    partial = convert_state_dict(lacking, "detectron2", config, strict=False)
    assert "backbone.res4.0.conv2.weight" not in partial and "backbone.res4.0.conv1.weight" in partial
    more_anchors = meta_state(detectron2_shapes((1, 1, 1, 1), classes=3, attributes=2, anchors=15))
    with pytest.raises(CheckpointError, match="15 anchors per location.*4 sizes x 3 ratios = 12"):
        convert_state_dict(more_anchors, "detectron2", config)
    with pytest.raises(CheckpointError, match="cannot tell"):
        guess_source({"foo.weight": torch.zeros(1)})
