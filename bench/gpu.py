"""Benchmark on one GPU, without Ray or LMDB: the real-size detectors' bare ``detect`` and the
BERT-base caption / retrieval models' training step, plus a short CPU-vs-GPU correctness check.

    python bench/gpu.py [--part detector|train|all] [--out results.json] [--budget 380]

(a) ``--part detector``: ``Detector.detect`` of the VinVL X152-C4 and BUTD R101-C4 presets
    (random weights: speed barely depends on them) on pre-decoded 600x800 uint8 RGB tensors,
    moved to the device inside the timed loop as ``extract.py`` does, with the pipeline's
    box settings (params.yaml ``features``: 10..50 boxes, score 0.2, NMS 0.3). Images/s
    after warm-up, ``torch.cuda.synchronize`` around the timed loop. Dtypes: ``fp32`` (torch
    defaults: cuDNN convolutions may use TF32, matmuls do not; what the features stage runs
    with ``use_gpu``), ``bf16`` (autocast around ``detect``; the stage does not do this
    yet), and when time is left ``fp32-strict`` (TF32 off) and ``bf16+cudnn.benchmark``;
    plus ``select_detections`` alone (the per-class NMS over 300 proposals x 1594/1600
    classes), and (``--det-mode``) the network alone: ``detect`` without the box selection.
    With ``--device cpu`` it times the same on the CPU.
(b) ``--part train``: synthetic batches made by the real collators
    (:class:`mmcn.models.regions.inputs.CaptionCollator` / ``RetrievalCollator``, with a stand-in
    tokenizer over bert-base-chinese's 21128 ids) fed to the models of
    ``mmcn.models.factory.build_model`` at ``--size base``, trained as
    ``mmcn.train.loop`` does (AdamW with the decay / no-decay groups, linear warmup
    schedule, bf16 autocast on cuda, grad clipping 1.0, ``loss.item()`` per step).
    Samples/s over ``--steps`` steps after ``--warmup`` steps, batches already on the GPU
    (one extra run copies each batch from the CPU per step). Then the check: one caption
    batch's fp32 loss on the CPU vs the GPU (same weights, eval mode), the bf16 loss, and
    beam-search ``generate()`` on cuda (timed, and compared with the CPU's on 2 images).

Every result is written to ``--out`` as soon as it is measured, so a run cut short still
reports what it got; ``--budget`` (seconds) makes the later, optional runs skip themselves.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/gpu.py` from a plain checkout (no install)
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

VOCAB = 21128  # bert-base-chinese
PAD, CLS, SEP, MASK = 0, 101, 102, 103
BOX_SETTINGS = {"min_boxes": 10, "max_boxes": 50, "score_thresh": 0.2, "nms_thresh": 0.3}  # params.yaml features
CAPTION = {"max_text_len": 40, "max_tag_len": 30, "max_regions": 50, "copy_tags": True, "label_smoothing": 0.1}
RETRIEVAL = {"max_text_len": 40, "max_tag_len": 30, "max_regions": 50, "embed_dim": 128}
MASKING = {"mask_prob": 0.4, "max_masked": 10}  # params.yaml caption.train
GENERATE = {"num_beams": 5, "max_length": 30, "length_penalty": 1.0, "no_repeat_ngram_size": 6}  # caption.eval


class Results:
    """The JSON results file, rewritten after every measurement."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "env": {}, "detector": [], "train": [],
                           "check": {}, "errors": []}

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, ensure_ascii=False, default=str) + "\n")
        tmp.replace(self.path)

    def error(self, what: str, e: BaseException) -> None:
        print(f"!! {what}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        self.data["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}"})
        self.save()


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def env_info(device: torch.device) -> dict:
    import torchvision
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=p.name,
                    capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
            info["nvidia_smi"] = out.stdout.strip()
        except Exception as e:  # noqa: BLE001
            info["nvidia_smi"] = f"unavailable: {e}"
    return info


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# --------------------------------------------------------------------------- (a) detector


def make_images(n: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """Pre-decoded uint8 RGB (3, H, W) tensors, laid out like ``extract.decode``'s (a permuted HWC array):
    smooth random colour fields plus noise, so they are not constant."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        low = torch.rand(1, 3, height // 40, width // 40, generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
        img = (img + torch.randn(3, height, width, generator=g) * 20).clamp(0, 255).to(torch.uint8)
        out.append(img.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    return out


@torch.no_grad()
def network(model, images: list[torch.Tensor]) -> torch.Tensor:
    """``Detector.detect`` up to the class probabilities (the same calls, in the same order):
    preprocess, backbone, RPN, RoI features, predictor, softmax; no box selection."""
    image_list, _, _ = model.preprocess(images)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, {"res4": features})
    proposals = [p if len(p) else p.new_tensor([[0.0, 0.0, float(w), float(h)]])
                 for p, (h, w) in zip(proposals, image_list.image_sizes)]
    x = model.roi_heads.box_features(features, proposals)
    class_logits, _ = model.roi_heads.box_predictor(x)
    return torch.nn.functional.softmax(class_logits, dim=1)[:, 1:]


def time_detect(model, images: list[torch.Tensor], batch: int, device: torch.device, bf16: bool, warmup: int,
                min_seconds: float, max_iters: int, budget: Budget, mode: str = "detect") -> dict:
    n_img = len(images)

    def step(i: int):
        chunk = [images[(i * batch + k) % n_img] for k in range(batch)]
        with autocast(device, bf16):
            if mode == "network":
                return network(model, [im.to(device) for im in chunk])
            return model.detect([im.to(device) for im in chunk], **BOX_SETTINGS)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        dets = step(i)
    sync(device)
    warm_s = time.perf_counter() - t0
    iters, start = 0, time.perf_counter()
    while True:
        dets = step(warmup + iters)
        iters += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if iters >= max_iters or elapsed >= min_seconds or budget.left() < 0:
            break
    row = {"mode": mode, "batch": batch, "iters": iters, "warmup": warmup, "warmup_s": round(warm_s, 3),
           "s_per_batch": round(elapsed / iters, 4), "images_per_s": round(batch * iters / elapsed, 2)}
    if mode == "network":
        row.update(boxes_per_image=float("nan"), probs_finite=bool(torch.isfinite(dets).all()),
                   rois_per_image=len(dets) / batch)
    else:
        row.update(boxes_per_image=sum(len(d) for d in dets) / len(dets),
                   features_finite=all(bool(torch.isfinite(d.features).all()) for d in dets),
                   feature_dim=int(dets[0].features.shape[1]))
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def time_select(config, device: torch.device, proposals: int = 300, reps: int = 5) -> dict:
    """``select_detections`` alone (per-class NMS over proposals x classes, then the box pick) on
    one image's worth of inputs: its cost depends on the number of classes, not on the weights."""
    from mmcn.vision.detector import select_detections

    g = torch.Generator().manual_seed(1)
    xy = torch.rand(proposals, 2, generator=g) * torch.tensor([700.0, 500.0])
    wh = torch.rand(proposals, 2, generator=g) * 300 + 8
    props = torch.cat([xy, (xy + wh).minimum(torch.tensor([799.0, 599.0]))], 1).to(device)
    probs = torch.randn(proposals, config.num_classes + 1, generator=g).softmax(1)[:, 1:].to(device)
    boxes = props[:, None, :].expand(proposals, config.num_classes, 4)
    args = (BOX_SETTINGS["score_thresh"], BOX_SETTINGS["nms_thresh"], BOX_SETTINGS["min_boxes"],
            BOX_SETTINGS["max_boxes"])
    select_detections(boxes, probs, *args)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        select_detections(boxes, probs, *args)
    sync(device)
    return {"proposals": proposals, "classes": config.num_classes,
            "ms_per_image": round(1000 * (time.perf_counter() - start) / reps, 2)}


def bench_detector(args, device: torch.device, res: Results, budget: Budget) -> None:
    from mmcn.vision.detector import build_detector

    images = make_images(max(args.det_batches) * 2, 600, 800)
    # (dtype, batches, cudnn.benchmark, tf32, must-run); optional runs skip themselves when time runs short
    plan = [("fp32", args.det_batches, False, True, True), ("bf16", args.det_batches, False, True, True)]
    if device.type == "cuda":
        mid = [args.det_batches[min(1, len(args.det_batches) - 1)]]
        plan += [("fp32-strict", mid, False, False, False), ("bf16", mid, True, True, False)]
    for name in args.configs:
        if budget.left() < 20:
            print(f"-- detector {name}: skipped, budget spent", flush=True)
            res.data["errors"].append({"what": f"detector {name}", "error": "skipped: budget"})
            continue
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = build_detector(name).eval()
        params = sum(p.numel() for p in model.parameters())
        model = model.to(device)
        print(f"-- detector {name}: {params / 1e6:.1f} M parameters, built in {time.perf_counter() - t0:.1f}s",
              flush=True)
        try:
            sel = time_select(model.config, device)
            res.data.setdefault("select_detections", []).append({"config": name, "device": str(device), **sel})
            res.save()
            print(f"   select_detections alone ({sel['proposals']} proposals x {sel['classes']} classes): "
                  f"{sel['ms_per_image']:.1f} ms/image", flush=True)
        except Exception as e:  # noqa: BLE001
            res.error(f"select_detections {name}", e)
        for dtype, batches, bench_mode, tf32, must in plan:
            if device.type == "cpu" and dtype != "fp32" and not args.cpu_bf16:
                continue
            for b in batches:
                if not must and budget.left() < 45:
                    print(f"   {dtype} batch {b}: skipped (budget)", flush=True)
                    continue
                if budget.left() < 10:
                    continue
                label = dtype + ("+cudnn.benchmark" if bench_mode else "")
                for mode in (("detect", "network") if args.det_mode == "both" else (args.det_mode,)):
                    if device.type == "cuda":
                        torch.backends.cudnn.benchmark = bench_mode
                        torch.backends.cudnn.allow_tf32 = tf32
                    try:
                        row = time_detect(model, images, b, device, dtype.startswith("bf16"), args.det_warmup,
                                          args.det_seconds, args.det_iters, budget, mode)
                    except Exception as e:  # noqa: BLE001
                        res.error(f"detector {name} {label} {mode} batch {b}", e)
                        continue
                    finally:
                        if device.type == "cuda":
                            torch.backends.cudnn.benchmark = False
                            torch.backends.cudnn.allow_tf32 = True
                    row = {"config": name, "params_m": round(params / 1e6, 1), "dtype": label,
                           "device": str(device), "image_hw": [600, 800], **row}
                    res.data["detector"].append(row)
                    res.save()
                    print(f"   {label:22s} {mode:8s} batch {b:3d}: {row['images_per_s']:8.2f} img/s  "
                          f"({row['s_per_batch'] * 1000:.1f} ms/batch, {row['iters']} iters, "
                          f"{row['boxes_per_image']:.0f} boxes/img, peak {row.get('peak_mem_gib', '-')} GiB)",
                          flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- (b) training


class StandInTokenizer:
    """What the collators use of a tokenizer, over bert-base-chinese's ids: texts are space-separated ids."""

    pad_token_id, cls_token_id, sep_token_id, mask_token_id = PAD, CLS, SEP, MASK

    def __len__(self) -> int:
        return VOCAB

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[int(t) for t in s.split()] for s in texts]}


def make_items(n: int, rng: np.random.Generator, max_regions: int) -> list[dict]:
    """Dataset items as ``mmcn.data.datasets`` yields them (caption / retrieval fields together)."""
    items = []
    for i in range(n):
        words = rng.integers(670, VOCAB, int(rng.integers(8, 30)))
        tags = rng.integers(670, VOCAB, int(rng.integers(6, 28)))
        regions = int(rng.integers(10, max_regions + 1))
        feats = rng.standard_normal((regions, 2054), dtype=np.float32)
        feats[:, :2048] = np.abs(feats[:, :2048])  # pooled ReLU features are >= 0
        feats[:, 2048:] = rng.random((regions, 6), dtype=np.float32)  # box geometry in [0, 1]
        caption = " ".join(map(str, words))
        items.append({"image_id": 1000 + i, "features": torch.from_numpy(feats), "tags": " ".join(map(str, tags)),
                      "text_id": 10 * (1000 + i), "caption": caption, "text": caption})
    return items


def make_batches(task: str, config, batch: int, count: int, seed: int) -> list[dict]:
    from mmcn.models.regions.inputs import CaptionCollator, RetrievalCollator

    rng = np.random.default_rng(seed)
    tok = StandInTokenizer()
    if task == "caption":
        collate = CaptionCollator(tok, config, True, MASKING["mask_prob"], MASKING["max_masked"],
                                  generator=torch.Generator().manual_seed(seed))
    else:
        collate = RetrievalCollator(tok, config)
    return [collate(make_items(batch, rng, config.max_regions)) for _ in range(count)]


def build(task: str, size: str, **extra):
    from mmcn.models.factory import build_model

    return build_model(task, VOCAB, size, **(CAPTION if task == "caption" else RETRIEVAL), **extra)


def time_training(model, batches: list[dict], device: torch.device, bf16: bool, steps: int, warmup: int,
                  on_device: bool) -> dict:
    """``mmcn.train.loop``'s step: autocast forward, backward, clip 1.0, AdamW, scheduler, zero_grad, loss.item()."""
    from transformers import get_scheduler

    model.train()
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4)
    sched = get_scheduler("linear", opt, num_warmup_steps=max(1, (steps + warmup) // 20),
                          num_training_steps=10 * (steps + warmup))
    ready = [{k: v.to(device) for k, v in b.items()} for b in batches] if on_device else batches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, start = [], None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        b = ready[i % len(ready)]
        if not on_device:
            b = {k: v.to(device) for k, v in b.items()}
        with autocast(device, bf16):
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sync(device)
    elapsed = time.perf_counter() - start
    batch = len(next(iter(batches[0].values())))
    row = {"batch": batch, "steps": steps, "warmup": warmup, "ms_per_step": round(1000 * elapsed / steps, 2),
           "samples_per_s": round(batch * steps / elapsed, 1), "first_loss": round(losses[0], 4),
           "last_loss": round(losses[-1], 4), "losses_finite": all(math.isfinite(x) for x in losses),
           "batches_on_device": on_device}
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def bench_train(args, device: torch.device, res: Results, budget: Budget) -> None:
    bf16 = device.type == "cuda"
    # (task, extra config, batch, bf16, batches on device, must-run)
    plan = []
    for b in args.train_batches:
        plan.append(("caption", {}, b, bf16, True, True))
    plan.append(("caption", {}, max(args.train_batches), bf16, False, False))  # + host-to-device copy per step
    if bf16:
        plan.append(("caption", {}, min(args.train_batches), False, True, False))  # fp32 for comparison
    for b in args.train_batches:
        plan.append(("retrieval", {"match_weight": 0.0}, b, bf16, True, False))  # params.yaml: no matcher
    for b in args.train_batches:
        plan.append(("retrieval", {"match_weight": 1.0}, b, bf16, True, False))
    models: dict = {}
    for task, extra, b, use_bf16, on_device, must in plan:
        key = (task, json.dumps(extra, sort_keys=True))
        label = f"{task}{'' if not extra else ' ' + json.dumps(extra)} batch {b} " \
                f"{'bf16' if use_bf16 else 'fp32'}{'' if on_device else ' +H2D copy'}"
        if not must and budget.left() < 30:
            print(f"   {label}: skipped (budget)", flush=True)
            continue
        try:
            if key not in models:
                models.clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                torch.manual_seed(0)
                model = build(task, args.size, **extra)
                models[key] = (model.to(device), sum(p.numel() for p in model.parameters()))
            model, params = models[key]
            batches = make_batches(task, model.config, b, 4, seed=b)
            row = time_training(model, batches, device, use_bf16, args.steps, args.warmup, on_device)
        except Exception as e:  # noqa: BLE001
            res.error(f"train {label}", e)
            continue
        row = {"task": task, "size": args.size, "params_m": round(params / 1e6, 1), **extra,
               "dtype": "bf16-autocast" if use_bf16 else "fp32", "device": str(device), **row}
        res.data["train"].append(row)
        res.save()
        print(f"   {label:52s}: {row['samples_per_s']:8.1f} samples/s ({row['ms_per_step']:.1f} ms/step, "
              f"loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}, peak {row.get('peak_mem_gib', '-')} GiB)",
              flush=True)
    models.clear()


def check_caption(args, device: torch.device, res: Results) -> None:
    """fp32 loss on the CPU vs ``device`` for one batch (same weights, eval mode), bf16 loss, beam search."""
    from mmcn.models.runtime import autocast as runtime_autocast

    torch.manual_seed(0)
    cpu_model = build("caption", args.size).eval()
    batch = make_batches("caption", cpu_model.config, 8, 1, seed=123)[0]
    check: dict = {"size": args.size, "batch": 8}
    with torch.no_grad():
        t0 = time.perf_counter()
        cpu_out = cpu_model(**batch)
        check["cpu_forward_s"] = round(time.perf_counter() - t0, 3)
        model = copy.deepcopy(cpu_model).to(device)
        dev_batch = {k: v.to(device) for k, v in batch.items()}
        gpu_out = model(**dev_batch)
        with runtime_autocast(device):
            bf16_out = model(**dev_batch)
    cpu_loss, gpu_loss, bf16_loss = float(cpu_out.loss), float(gpu_out.loss), float(bf16_out.loss)
    check.update(cpu_fp32_loss=cpu_loss, gpu_fp32_loss=gpu_loss, gpu_bf16_loss=bf16_loss,
                 fp32_loss_abs_diff=abs(cpu_loss - gpu_loss), bf16_loss_abs_diff=abs(cpu_loss - bf16_loss),
                 fp32_logprob_max_abs_diff=float((cpu_out.logits - gpu_out.logits.cpu()).abs().max()),
                 fp32_argmax_agree=float((cpu_out.logits.argmax(-1) == gpu_out.logits.argmax(-1).cpu())
                                         .float().mean()))
    print(f"-- check (caption {args.size}, batch 8, eval mode): CPU fp32 loss {cpu_loss:.6f}, GPU fp32 {gpu_loss:.6f} "
          f"(|diff| {check['fp32_loss_abs_diff']:.2e}, max |dlogp| {check['fp32_logprob_max_abs_diff']:.2e}), "
          f"GPU bf16 {bf16_loss:.6f} (|diff| {check['bf16_loss_abs_diff']:.2e})", flush=True)
    res.data["check"] = check
    res.save()

    ids = {"cls_id": CLS, "sep_id": SEP, "mask_id": MASK, "pad_id": PAD}

    def inputs(b: dict, dev) -> list[torch.Tensor]:
        return [b[k].to(dev) for k in ("tag_ids", "tag_mask", "img_feats", "img_mask")]

    # beam search as caption.eval runs it (bf16 autocast on cuda, like mmcn.infer), timed on 32 images
    big = make_batches("caption", cpu_model.config, 32, 1, seed=7)[0]
    for name, bf16 in (("bf16", True), ("fp32", False)):
        try:
            with autocast(device, bf16 and device.type == "cuda"):
                model.generate(*inputs(big, device), **ids, **GENERATE)  # warm-up
                sync(device)
                t0 = time.perf_counter()
                caps, scores = model.generate(*inputs(big, device), **ids, **GENERATE)
                sync(device)
            dt = time.perf_counter() - t0
            check[f"generate_{name}"] = {"device": str(device), "images": 32, **GENERATE, "seconds": round(dt, 3),
                                         "images_per_s": round(32 / dt, 1),
                                         "mean_len": round(float(np.mean([len(c) for c in caps])), 2),
                                         "scores_finite": all(math.isfinite(s) for s in scores)}
            print(f"   generate() on {device} ({name}, {GENERATE['num_beams']} beams, max_length "
                  f"{GENERATE['max_length']}, 32 images): {dt:.2f}s = {32 / dt:.1f} img/s, "
                  f"mean length {check[f'generate_{name}']['mean_len']}", flush=True)
        except Exception as e:  # noqa: BLE001
            res.error(f"generate {name} on {device}", e)
        res.save()
    # the same decoding, fp32, on the CPU and the GPU: same captions?
    try:
        small = {k: v[:2] for k, v in big.items()}
        short = {**GENERATE, "num_beams": 3, "max_length": 10}
        cpu_caps, cpu_scores = cpu_model.generate(*inputs(small, "cpu"), **ids, **short)
        gpu_caps, gpu_scores = model.generate(*inputs(small, device), **ids, **short)
        check["generate_cpu_vs_gpu_fp32"] = {"images": 2, **short, "same_tokens": cpu_caps == gpu_caps,
                                             "score_max_abs_diff": max(abs(a - b) for a, b in
                                                                       zip(cpu_scores, gpu_scores))}
        print(f"   generate() fp32, 2 images, 3 beams: CPU and {device} captions identical: {cpu_caps == gpu_caps}, "
              f"max |score diff| {check['generate_cpu_vs_gpu_fp32']['score_max_abs_diff']:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001
        res.error("generate CPU vs GPU", e)
    res.save()


# --------------------------------------------------------------------------- report


def print_table(res: Results) -> None:
    d = res.data
    env = d["env"]
    print("\n" + "=" * 100)
    print(f"{env.get('gpu', env.get('device'))}  torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN "
          f"{env.get('cudnn')})  torchvision {env.get('torchvision')}  transformers {env.get('transformers')}  "
          f"{d['date']}")
    if d["detector"]:
        print(f"\n{'detector':15s} {'dtype':22s} {'timed':8s} {'batch':>5s} {'img/s':>9s} {'ms/batch':>9s} "
              f"{'boxes':>6s} {'peak GiB':>8s}")
        for r in d["detector"]:
            print(f"{r['config']:15s} {r['dtype']:22s} {r.get('mode', 'detect'):8s} {r['batch']:5d} "
                  f"{r['images_per_s']:9.2f} "
                  f"{r['s_per_batch'] * 1000:9.1f} {r['boxes_per_image']:6.0f} {r.get('peak_mem_gib', '-')!s:>8s}")
    for r in d.get("select_detections", []):
        print(f"  {r['config']}: select_detections alone (per-class NMS, {r['proposals']} proposals x "
              f"{r['classes']} classes) {r['ms_per_image']:.1f} ms/image on {r['device']}")
    if d["train"]:
        print(f"\n{'model':32s} {'dtype':14s} {'batch':>5s} {'samples/s':>10s} {'ms/step':>8s} {'peak GiB':>8s}")
        for r in d["train"]:
            name = f"{r['task']} {r['size']}" + (f" match_weight={r['match_weight']}" if "match_weight" in r else "") \
                + ("" if r["batches_on_device"] else " +H2D")
            print(f"{name:32s} {r['dtype']:14s} {r['batch']:5d} {r['samples_per_s']:10.1f} {r['ms_per_step']:8.1f} "
                  f"{r.get('peak_mem_gib', '-')!s:>8s}")
    if d["check"]:
        c = d["check"]
        print(f"\ncheck: caption {c['size']} loss CPU fp32 {c['cpu_fp32_loss']:.6f} vs GPU fp32 {c['gpu_fp32_loss']:.6f} "
              f"|diff| {c['fp32_loss_abs_diff']:.2e}; GPU bf16 |diff| {c['bf16_loss_abs_diff']:.2e}")
        for k in ("generate_bf16", "generate_fp32", "generate_cpu_vs_gpu_fp32"):
            if k in c:
                print(f"  {k}: {c[k]}")
    if d["errors"]:
        print("\nerrors / skips:")
        for e in d["errors"]:
            print(f"  {e['what']}: {e['error']}")
    print("=" * 100, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=("detector", "train", "all"))
    ap.add_argument("--out", type=Path, default=None, help="JSON results (rewritten after every measurement)")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one) | cuda | cpu")
    ap.add_argument("--budget", type=float, default=380, help="seconds; optional runs skip when it runs short")
    ap.add_argument("--configs", nargs="+", default=["vinvl_x152_c4", "butd_r101_c4"])
    ap.add_argument("--det-batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--det-warmup", type=int, default=2)
    ap.add_argument("--det-iters", type=int, default=20, help="most timed detect() calls per row")
    ap.add_argument("--det-seconds", type=float, default=4.0, help="stop timing a row after this long")
    ap.add_argument("--det-mode", default="both", choices=("detect", "network", "both"),
                    help="time detect(), the network alone (detect() without the box selection), or both")
    ap.add_argument("--cpu-bf16", action="store_true", help="on the CPU, also time bf16 autocast")
    ap.add_argument("--size", default="base")
    ap.add_argument("--train-batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()

    budget = Budget(args.budget)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    res = Results(args.out)
    res.data["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    res.data["env"] = env_info(device)
    res.save()
    print(json.dumps(res.data["env"]), flush=True)
    start = time.perf_counter()
    if args.part in ("train", "all"):
        bench_train(args, device, res, budget)
        if not args.no_check:
            try:
                check_caption(args, device, res)
            except Exception as e:  # noqa: BLE001
                res.error("check", e)
    if args.part in ("detector", "all"):
        bench_detector(args, device, res, budget)
    res.data["total_s"] = round(time.perf_counter() - start, 1)
    res.save()
    print_table(res)
    return 1 if any("skipped" not in e["error"] for e in res.data["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
