"""Reference fidelity (issue 18, D1-D8): mmcn's ``fidelity="vinvl"`` / ``"butd"`` rules against
expectations computed here from the references' rules as written in their sources
(scene_graph_benchmark's maskrcnn_benchmark; bottom-up-attention's caffe code), on hand-built
tensors and on the real presets' structure shrunk to a tiny width and image size."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import nms

from mmcn.vision import reference as R
from mmcn.vision.config import DetectorConfig, detector_config
from mmcn.vision.detector import build_detector, cell_anchors

TINY = dict(stage_blocks=(1, 1, 1, 1), stage_planes=(8, 8, 8, 8), groups=1, width_per_group=64, rpn_channels=16,
            stem_channels=16)


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


def _tiny(name: str, **changes) -> torch.nn.Module:
    return build_detector(detector_config(name, **{**TINY, **changes})).eval()


# --------------------------------------------------------------------------- reference rules, written here


def greedy_nms_plus_one(boxes: np.ndarray, scores: np.ndarray, thresh: float, suppress_equal: bool) -> list[int]:
    """cpu_nms.pyx / maskrcnn_benchmark's nms kernel, one box at a time, float32 arithmetic."""
    boxes = boxes.astype(np.float32)
    x1, y1, x2, y2 = boxes.T
    one = np.float32(1)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        for j in order[a + 1:]:
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]) + one)
            h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]) + one)
            inter = np.float32(w * h)
            iou = np.float32(inter / np.float32(areas[i] + areas[j] - inter))
            if (float(iou) >= thresh) if suppress_equal else (iou > np.float32(thresh)):
                suppressed[j] = True
    return keep


def vinvl_get_size(h: int, w: int, size: int = 600, max_size: int = 1000) -> tuple[int, int]:
    """maskrcnn_benchmark ``Resize.get_size`` as written in transforms.py."""
    lo, hi = float(min(w, h)), float(max(w, h))
    if hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    return (int(size * h / w), size) if w < h else (size, int(size * w / h))


def cv2_linear(img: np.ndarray, s: float, out_h: int, out_w: int) -> np.ndarray:
    """cv2.resize(fx=s, fy=s, INTER_LINEAR) on a float (C, H, W) image: source (d + 0.5) / s - 0.5,
    clamped to the first / last pixel."""
    def axis(n_out: int, n_in: int):
        f = (np.arange(n_out) + 0.5) / s - 0.5
        i0 = np.floor(f).astype(int)
        t = f - i0
        t[i0 < 0], i0[i0 < 0] = 0.0, 0
        t[i0 >= n_in - 1], i0[i0 >= n_in - 1] = 0.0, n_in - 1
        return i0, np.minimum(i0 + 1, n_in - 1), t

    y0, y1, ty = axis(out_h, img.shape[1])
    x0, x1, tx = axis(out_w, img.shape[2])
    rows = img[:, y0] * (1 - ty)[None, :, None] + img[:, y1] * ty[None, :, None]
    return rows[:, :, x0] * (1 - tx) + rows[:, :, x1] * tx


# --------------------------------------------------------------------------- D2 / D3: resizing


def test_d2_vinvl_truncates_the_size_and_passes_the_cap_as_vinvl_does():
    assert R.vinvl_size(333, 500, 600, 1000) == vinvl_get_size(333, 500) == (600, 900)  # mmcn native: 901
    assert R.vinvl_size(431, 1300, 600, 1000) == vinvl_get_size(431, 1300) == (332, 1001)  # past 1000, as VinVL
    for h, w in [(500, 333), (600, 800), (1300, 431), (37, 53), (1000, 1)]:
        assert R.vinvl_size(h, w, 600, 1000) == vinvl_get_size(h, w)


def test_d2_vinvl_input_is_pil_antialiased_bilinear_bit_for_bit():
    model = _tiny("vinvl_x152_c4", min_size=24, max_size=40)
    img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    h, w = vinvl_get_size(37, 53, 24, 40)
    expect = np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR))
    expect = torch.from_numpy(expect.copy()).permute(2, 0, 1).float().div(255) * 255  # ToTensor, to_bgr255
    got = model.prepare(img)
    assert got.tensor.shape == (3, h, w) == (3, 24, 34)
    assert torch.equal(got.tensor, expect.flip(0))  # BGR
    native = _tiny("vinvl_x152_c4", min_size=24, max_size=40, fidelity="native").prepare(img)
    assert native.tensor.shape != got.tensor.shape or (native.tensor - got.tensor).abs().max() > 1


def test_d3_butd_resizes_with_caffe_scale_sampled_exactly():
    s, size = R.caffe_scale(431, 1300, 600, 1000)
    assert (s, size) == (1000 / 1300, (332, 1000))
    assert R.caffe_scale(333, 500, 600, 1000) == (600 / 333, (600, 901))  # cv2 rounds, VinVL truncates
    model = _tiny("butd_r101_c4", min_size=20, max_size=40)
    img = torch.randint(0, 256, (3, 30, 47), dtype=torch.uint8)
    got = model.prepare(img)
    s = 20 / 30
    assert got.scale == (s, s) and got.tensor.shape == (3, 20, round(47 * s))
    expect = cv2_linear(img.flip(0).double().numpy(), s, 20, round(47 * s))
    assert np.abs(got.tensor.double().numpy() - expect).max() < 1e-3
    native = _tiny("butd_r101_c4", min_size=20, max_size=40, fidelity="native").prepare(img)
    assert np.abs(native.tensor.double().numpy() - expect).max() > 0.02  # size-ratio sampling drifts


# --------------------------------------------------------------------------- D6: +1 NMS


def test_d6_plus_one_areas_flip_an_nms_decision():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.2).tolist() == [0, 1]  # IoU 1/7 without +1
    assert greedy_nms_plus_one(boxes.numpy(), scores.numpy(), 0.2, False) == [0]  # 4/14 with +1
    for rule in R.NMS_RULES:
        assert R.nms_plus_one(boxes, scores, 0.2, rule).tolist() == [0]
        survived = R.per_class_nms_plus_one(boxes[:, None].expand(2, 3, 4), scores[:, None].expand(2, 3), 0.2, rule)
        assert survived.tolist() == [[True] * 3, [False] * 3]
    # an IoU exactly at the threshold (+1 areas 1 and 2, intersection 1: 0.5): cpu_nms (>=) drops, the CUDA kernel (>) keeps
    tie = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert R.nms_plus_one(tie, scores, 0.5, "cpu").tolist() == [0] == greedy_nms_plus_one(tie.numpy(), scores.numpy(), 0.5, True)
    assert R.nms_plus_one(tie, scores, 0.5, "cuda").tolist() == [0, 1] == greedy_nms_plus_one(tie.numpy(), scores.numpy(), 0.5, False)


@pytest.mark.parametrize("rule", R.NMS_RULES)
def test_d6_per_class_nms_matches_greedy_nms_per_class(rule):
    g = torch.Generator().manual_seed(1)
    n, k = 40, 7
    xy = torch.rand(n, 2, generator=g) * 30
    shared = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 12], dim=1).round()  # integer boxes: +1 matters
    scores = torch.rand(n, k, generator=g)
    per_class = shared[:, None] + torch.randint(0, 3, (n, k, 4), generator=g).float() * torch.tensor([-1.0, -1, 1, 1])
    for boxes in (shared[:, None].expand(n, k, 4), per_class):
        survived = R.per_class_nms_plus_one(boxes, scores, 0.3, rule, classes_per_chunk=3)
        for c in range(k):
            keep = greedy_nms_plus_one(boxes[:, c].numpy(), scores[:, c].numpy(), 0.3, rule == "cpu")
            assert sorted(torch.nonzero(survived[:, c]).squeeze(1).tolist()) == sorted(keep)
            assert R.nms_plus_one(boxes[:, c], scores[:, c], 0.3, rule).tolist() == keep


# --------------------------------------------------------------------------- D1: VinVL proposals


def test_d1_maskrcnn_proposals_clip_to_w_minus_1_and_keep_zero_size_boxes():
    h, w = 20, 30
    boxes = torch.tensor([[-5.0, 2.0, 40.0, 10.0],    # crosses both sides: x2 -> 29 (W-1), not 30
                          [35.0, 5.0, 50.0, 9.0],     # right of the image: zero width after clipping, kept
                          [3.0, 3.0, 12.0, 15.0],
                          [4.0, 3.0, 13.0, 15.0],     # overlaps the one above (IoU 0.82 with +1): dropped at 0.7
                          [1.0, 1.0, 2.0, 2.0]])      # lowest score: cut by pre_nms_top_n
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, -1.0])
    got = R.filter_maskrcnn(boxes, logits, (h, w), pre_nms=4, post_nms=10, nms_thresh=0.7)
    # the rule: top 4 by sigmoid, clip to [0, W-1] x [0, H-1], min size 0 (+1 widths), +1 NMS (IoU > 0.7), top 10
    top = np.argsort(-logits.sigmoid().numpy(), kind="stable")[:4]
    clipped = boxes.numpy()[top].copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, w - 1)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, h - 1)
    keep = greedy_nms_plus_one(clipped, logits.sigmoid().numpy()[top], 0.7, False)[:10]
    assert torch.equal(got, torch.from_numpy(clipped[keep]))
    assert got.tolist() == [[0.0, 2.0, 29.0, 10.0], [29.0, 5.0, 29.0, 9.0], [3.0, 3.0, 12.0, 15.0]]
    # mmcn's former (torchvision) filtering clips to W and drops the zero-width box
    from torchvision.ops import clip_boxes_to_image, remove_small_boxes
    tv = clip_boxes_to_image(boxes[:4], (h, w))
    assert tv[0, 2] == w and 1 not in remove_small_boxes(tv, 1e-3).tolist()


def test_d1_vinvl_detector_uses_maskrcnn_proposals():
    model = _tiny("vinvl_x152_c4", min_size=64, max_size=96)
    img = torch.randint(0, 256, (3, 50, 73), dtype=torch.uint8)
    net = model.prepare(img)
    image_list, _, scales = model.preprocess([net])
    feats = model.backbone(image_list.tensors)
    props = R.proposals(model.rpn, image_list, feats, "maskrcnn", scales)[0]
    nh, nw = image_list.image_sizes[0]
    assert len(props) <= 300 and props[:, 2].max() <= nw - 1 and props[:, 3].max() <= nh - 1
    # the same proposals from the head outputs by the rule written here
    logits, deltas = model.rpn.head([feats])
    a = cell_anchors(model.config.anchor_sizes, model.config.anchor_ratios, "maskrcnn_benchmark")
    fh, fw = feats.shape[-2:]
    sy, sx = torch.meshgrid(torch.arange(fh) * 16.0, torch.arange(fw) * 16.0, indexing="ij")
    anchors = (torch.stack([sx, sy, sx, sy], -1).reshape(-1, 1, 4) + a[None]).reshape(-1, 4)
    lo = logits[0][0].permute(1, 2, 0).reshape(-1)
    d = deltas[0][0].view(-1, 4, fh, fw).permute(2, 3, 0, 1).reshape(-1, 4)
    wa, ha = anchors[:, 2] - anchors[:, 0] + 1, anchors[:, 3] - anchors[:, 1] + 1
    cx, cy = anchors[:, 0] + 0.5 * wa + d[:, 0] * wa, anchors[:, 1] + 0.5 * ha + d[:, 1] * ha
    pw = torch.exp(d[:, 2].clamp(max=math.log(1000 / 16))) * wa
    ph = torch.exp(d[:, 3].clamp(max=math.log(1000 / 16))) * ha
    decoded = torch.stack([cx - 0.5 * pw, cy - 0.5 * ph, cx + 0.5 * pw - 1, cy + 0.5 * ph - 1], 1)
    top = torch.sort(lo.sigmoid(), descending=True, stable=True).indices[:6000]
    clipped = decoded[top].detach().numpy().copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, nw - 1)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, nh - 1)
    keep = greedy_nms_plus_one(clipped, lo.sigmoid()[top].detach().numpy(), 0.7, False)[:300]
    assert np.allclose(props.numpy(), clipped[keep], atol=1e-4)


# --------------------------------------------------------------------------- D8: caffe proposals


def test_d8_legacy_anchors_are_py_faster_rcnns():
    # generate_anchors.py's documented output for base 16, scales (8, 16, 32), ratios (0.5, 1, 2)
    documented = [[-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
                  [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
                  [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360]]
    # ... as Shaoqing's MATLAB code printed them, 1-based: generate_anchors' base box is [1, 1, 16, 16] - 1,
    # so the Python function returns each of them minus 1, which the rule below computes too
    def legacy(scales, ratios, base=16):
        ctr = (base - 1) / 2
        out = []
        for r in ratios:
            ws = np.round(np.sqrt(base * base / r))
            hs = np.round(ws * r)
            for s in scales:
                w, h = ws * s, hs * s
                out.append([ctr - (w - 1) / 2, ctr - (h - 1) / 2, ctr + (w - 1) / 2, ctr + (h - 1) / 2])
        return out

    assert legacy((8, 16, 32), (0.5, 1, 2)) == (np.array(documented) - 1).tolist()
    assert cell_anchors((128.0, 256.0, 512.0), (0.5, 1.0, 2.0), "maskrcnn_benchmark").tolist() == legacy(
        (8, 16, 32), (0.5, 1, 2))
    assert cell_anchors((64.0, 128.0, 256.0, 512.0), (0.5, 1.0, 2.0), "maskrcnn_benchmark").tolist() == legacy(
        (4, 8, 16, 32), (0.5, 1, 2))  # the BUTD VG prototxt's scales
    butd = detector_config("butd_r101_c4")
    assert (butd.rpn_rule, butd.rpn_anchor_style) == ("caffe", "maskrcnn_benchmark")
    assert detector_config("butd_r101_c4", butd_proposals="detectron2").rpn_anchor_style == "detectron2"
    assert detector_config("small").rpn_rule == "torchvision"


def test_d8_caffe_box_coder_min_size_and_nms():
    anchors = torch.tensor([[0.0, 0.0, 15.0, 15.0], [10.0, 10.0, 25.0, 41.0]])
    deltas = torch.tensor([[0.1, -0.2, 0.3, -0.1], [0.0, 0.0, 0.0, 0.0]])
    got = R.decode_caffe(deltas, anchors)
    # bbox_transform_inv: widths + 1, x2 = cx + w/2 (no - 1), no clamp
    w, h = 16.0, 16.0
    cx, cy = 0.5 * w + 0.1 * w, 0.5 * h - 0.2 * h
    pw, ph = math.exp(0.3) * w, math.exp(-0.1) * h
    assert torch.allclose(got[0], torch.tensor([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2]), atol=1e-5)
    assert got[1].tolist() == [10.0, 10.0, 26.0, 42.0]  # the anchor itself comes back one pixel larger
    # proposal layer at im_scale 0.5: sides (+1) under 16 * 0.5 = 8 dropped; clip to W-1; sort; NMS (IoU >= 0.7)
    boxes = torch.tensor([[0.0, 0.0, 7.0, 9.0],     # 8 wide: kept
                          [0.0, 0.0, 6.0, 9.0],     # 7 wide: dropped
                          [20.0, 0.0, 60.0, 9.0],   # clipped to x2 = 29
                          [21.0, 0.0, 60.0, 9.0]])  # then IoU (+1) with the one above 0.9: dropped
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    got = R.filter_caffe(boxes, logits, (10, 30), 0.5, pre_nms=10, post_nms=10, nms_thresh=0.7)
    assert got.tolist() == [[20.0, 0.0, 29.0, 9.0], [0.0, 0.0, 7.0, 9.0]]


@pytest.mark.parametrize("proposals", ["caffe", "detectron2"])
def test_d8_butd_detector_runs_either_proposal_rule(proposals):
    model = _tiny("butd_r101_c4", min_size=64, max_size=96, butd_proposals=proposals)
    img = torch.randint(0, 256, (3, 50, 73), dtype=torch.uint8)
    net = model.prepare(img)
    image_list, _, scales = model.preprocess([net])
    feats = model.backbone(image_list.tensors)
    props = R.proposals(model.rpn, image_list, feats, proposals, scales)[0]
    nh, nw = image_list.image_sizes[0]
    edge = nw - 1 if proposals == "caffe" else nw
    assert 0 < len(props) <= 300 and props[:, 2].max() <= edge
    if proposals == "caffe":
        least = 16 * scales[0][0]
        assert ((props[:, 2] - props[:, 0] + 1) >= least - 1e-4).all() and ((props[:, 3] - props[:, 1] + 1) >= least - 1e-4).all()
    else:
        assert ((props[:, 2] - props[:, 0]) > 0).all()
    dets = model.detect([img])[0]
    assert 1 <= len(dets) <= 100 and dets.attr_ids.shape == (len(dets), 1)


# --------------------------------------------------------------------------- selection, D4, D7


def test_selection_rules_of_vinvl_and_generate_tsv():
    scores = torch.tensor([[0.5, 0.1], [0.3, 0.6], [0.25, 0.05], [0.0, 0.0]])
    survived = torch.tensor([[True, False], [False, True], [False, False], [True, True]])
    # VinVL: best surviving score, only boxes above 0; at least 3 boxes
    keep, label, score = R.select_vinvl(survived, scores, 0.2, 3, 10)
    assert keep.tolist() == [1, 0] and label.tolist() == [1, 0] and score.tolist() == pytest.approx([0.6, 0.5])
    # generate_tsv: max_conf 0 for box 2 (survived nothing), which can still fill min_boxes; label = argmax fg
    keep, label, score = R.select_butd(survived, scores, 0.2, 3, 10)
    assert keep.tolist() == [1, 0, 2] and label.tolist() == [1, 0, 0] and score.tolist() == pytest.approx([0.6, 0.5, 0.0])


def test_d4_butd_attribute_head_embeds_the_argmax_with_background():
    model = _tiny("butd_r101_c4", min_size=64, max_size=96)
    heads = model.roi_heads
    with torch.no_grad():
        heads.box_predictor.cls_score.bias[0] = 20.0  # background wins every proposal
        att = heads.attribute_predictor
        att.cls_embed.weight.zero_()
        att.cls_embed.weight[0, 0] = 10.0   # background row -> hidden unit 0 -> attribute 5
        att.cls_embed.weight[1:, 1] = 10.0  # any object row -> hidden unit 1 -> attribute 7
        att.fc.weight.zero_()
        att.fc.bias.zero_()
        att.fc.weight[0, 2048] = att.fc.weight[1, 2049] = 1.0
        att.attr_score.weight.zero_()
        att.attr_score.bias.zero_()
        att.attr_score.weight[1 + 5, 0] = att.attr_score.weight[1 + 7, 1] = 1.0
    det = model.detect([torch.randint(0, 256, (3, 50, 73), dtype=torch.uint8)])[0]
    assert det.attr_ids[:, 0].tolist() == [5] * len(det)  # caffe: embedding of argmax incl. background (0)
    native = build_detector(model.config.replace(fidelity="native")).eval()
    native.load_state_dict(model.state_dict())
    other = native.detect([torch.randint(0, 256, (3, 50, 73), dtype=torch.uint8)])[0].attr_ids[:, 0].tolist()
    assert other and set(other) == {7}  # the detected (foreground) class embedded
    logits, _ = heads.box_predictor(det.features)
    assert torch.equal(det.labels, logits.softmax(1)[:, 1:].argmax(1))  # label: argmax over the foreground


def test_d7_vinvl_keeps_every_attribute_over_its_threshold():
    probs = torch.full((3, 21), 1e-4)
    probs[0, 1:19] = torch.linspace(0.08, 0.04, 18)   # 18 over 0.02 after the softmax -> the 16 best
    probs[1, 0] = 0.99                                # "no attribute": nothing kept
    probs[2, 3], probs[2, 4] = 0.3, 0.004             # one over, one under
    ids, scores = R.vinvl_attributes(probs.log(), 0.02, 16, 100)
    p = probs.log().softmax(1)
    assert ids[0].tolist() == list(range(16)) and torch.equal(scores[0], p[0, 1:17])
    assert ids[1].tolist() == [-1] * 16 and ids[2].tolist() == [2] + [-1] * 15


def test_d7_vinvl_per_image_cap_uses_the_kth_value_over_all_entries():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 11, generator=g) * 0.3 + 3  # 10 attributes, about 0.1 each
    logits[:, 0] = -5
    ids, scores = R.vinvl_attributes(logits, 0.05, 16, 100)
    # attribute_head/inference.py: zero column 0 and <= thresh; n found > 100 -> zero entries under the
    # (n - 100 + 1)-th smallest of all 20 x 11 entries (zeros included); top 16 per box, zeros dropped
    p = logits.softmax(1).numpy().copy()
    p[:, 0] = 0
    p[p <= 0.05] = 0
    n = int((p > 0).sum())
    assert n > 100
    cut = np.sort(p.ravel())[n - 100]
    p[p < cut] = 0
    assert 0 < cut and (p > 0).sum() < n  # the cap bites here
    for row, got_ids, got_scores in zip(p, ids.tolist(), scores.tolist()):
        want = [i - 1 for i in np.argsort(-row, kind="stable") if row[i] > 0][:16]
        assert [i for i in got_ids if i >= 0] == want
        assert [s for s in got_scores if s > 0] == pytest.approx([row[i + 1] for i in want])


def test_vinvl_detector_end_to_end_and_prepared_inputs_give_the_same():
    model = _tiny("vinvl_x152_c4", min_size=64, max_size=96)
    imgs = [torch.randint(0, 256, (3, 50, 73), dtype=torch.uint8), torch.randint(0, 256, (3, 61, 40), dtype=torch.uint8)]
    dets = model.detect(imgs)
    again = model.detect([model.prepare(i) for i in imgs])
    for d, e, img in zip(dets, again, imgs):
        assert 1 <= len(d) <= 100 and d.attr_ids.shape == (len(d), 16)
        assert torch.equal(d.boxes, e.boxes) and torch.equal(d.features, e.features)
        h, w = img.shape[1:]
        nh, nw = vinvl_get_size(h, w, 64, 96)
        assert (d.boxes[:, 2] <= (nw - 1) * w / nw + 1e-4).all()  # clipped at W-1 in the network input


# --------------------------------------------------------------------------- configs and max_boxes


def test_presets_default_to_their_reference_and_old_configs_load_by_name():
    assert detector_config("vinvl_x152_c4").fidelity == "vinvl"
    assert detector_config("butd_r101_c4").fidelity == "butd"
    assert detector_config("small").fidelity == "native"
    for name in ("small", "vinvl_x152_c4", "butd_r101_c4"):
        old = detector_config(name).to_dict()
        for key in ("fidelity", "butd_proposals", "max_attributes_per_image"):
            del old[key]
        old["max_attributes"] = 2
        loaded = DetectorConfig.from_dict(old)
        assert loaded.fidelity == detector_config(name).fidelity and loaded.max_attributes == 2
    with pytest.raises(ValueError, match="fidelity must be one of"):
        detector_config("small", fidelity="caffe")


def test_max_boxes_null_means_the_detectors_own():
    from mmcn.vision.extract import ExtractConfig

    assert ExtractConfig().max_boxes is None and ExtractConfig(max_boxes=None, min_boxes=10).max_boxes is None
    with pytest.raises(ValueError, match="^max_boxes: 'x' is not a whole number"):
        ExtractConfig(max_boxes="x")
    assert detector_config("vinvl_x152_c4").max_boxes == detector_config("butd_r101_c4").max_boxes == 100
