"""DVC stage `detector`: train the native detector on data/tsv's ground-truth boxes, or
convert given detectron2 / VinVL weights, or (``detector.arch: grid_resnet``) wrap a torchvision
ImageNet classifier as grid-region features (mmcn.vision.grid); writes models/detector/ and
metrics/detector.json.
With released features in ``features.source`` no detector is needed: the stage writes a
folder that says so (and the features stage imports them)."""
import csv
import json
from pathlib import Path

from common import run, stage_param, stage_params, start

from mmcn.data.manifest import manifest_path, read_manifest
from mmcn.data.oscar_import import find_files
from mmcn.eval.detection import evaluate_detector
from mmcn.settings import SettingsError, build, expect
from mmcn.vision.config import PRESETS, detector_config
from mmcn.vision.convert import convert_detector
from mmcn.vision.detector import build_detector, save_detector, save_no_detector
from mmcn.vision.grid import GRID_ARCH, convert_grid
from mmcn.vision.train import DetectorTrainConfig, load_samples, train_detector, vocab_from_manifest

TSV = Path("data/tsv")
OUT = Path("models/detector")
METRICS = Path("metrics/detector.json")
PLOT = Path("plots/detector_loss.csv")
CHECKPOINT_SUFFIXES = (".pkl", ".pth")
LABEL_SUFFIXES = (".json", ".txt")  # a label map beside the checkpoint: VinVL's *.json, BUTD's *_vocab.txt
README_SECTION = "README, 'Region features from published detectors'"
GRID_README = "README, 'No detector weights: grid features'"


def checkpoint_file(weights: Path) -> Path | None:
    """``detector.weights``: a checkpoint file, or a folder holding at most one (none: train).
    It is a dep of the stage in dvc.yaml (``${detector.weights}``), so new weights rerun it."""
    if weights.is_file():
        return weights
    found = sorted(p for p in weights.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SettingsError(f"params.yaml: detector.weights: {weights} holds {len(found)} checkpoints ({names}); "
                            f"keep one there or point detector.weights at the file")
    return found[0] if found else None


def label_files(weights: Path) -> list[Path]:
    """The label map files in a ``detector.weights`` folder (none for a file: its neighbours are
    no dep of the stage): VinVL's ``VG-SGG-dicts-vgoi6-clipped.json``, BUTD's ``objects_vocab.txt``
    / ``attributes_vocab.txt``. None: the ``detector.arch`` preset's packaged names."""
    return [] if weights.is_file() else sorted(p for p in weights.iterdir() if p.is_file()
                                                and p.suffix in LABEL_SUFFIXES)


def require_boxes(weights: Path) -> None:
    """Training needs ground-truth boxes; a captioning dataset has none: say what to do instead,
    before any work (a settings error: one line, exit 2)."""
    manifest = manifest_path(TSV, "train")
    if not any(entry.objects for entry in read_manifest(manifest)):
        raise SettingsError(
            f"{manifest}: no ground-truth boxes (`objects` in captions.jsonl; captioning datasets such as MUGE, "
            f"Flickr30k-CN and COCO-CN have none) and no checkpoint in detector.weights ({weights}), so the "
            f"detector stage has nothing to train or convert. Choose one ({README_SECTION}): a published "
            f"detector (BUTD's faster_rcnn_from_caffe_attr.pkl with detector.arch: butd_r101_c4, or VinVL's "
            f"vinvl_vg_x152c4.pth with detector.arch: vinvl_x152_c4, put in detector.weights); the grid-feature "
            f"fallback when you have no detector (detector.arch: grid_resnet with an ImageNet ResNet checkpoint in "
            f"detector.weights; {GRID_README}); or released VinVL/Oscar features in features.source")


def read_params() -> tuple[str, Path, Path | None, DetectorTrainConfig, Path]:
    """``(arch, detector.weights, its checkpoint file or None: train, training settings,
    features.source)``, checked."""
    p = stage_params("detector")
    arch = expect(p, "detector", "arch", choices=(*PRESETS, GRID_ARCH))
    expect(p, "detector", "weights", path="any")
    source = Path(expect({"source": stage_param("features.source")}, "features", "source", path="any"))
    weights = Path(p["weights"])
    return arch, weights, checkpoint_file(weights), build(DetectorTrainConfig, ("detector", p),
                                                          own=("weights", "arch")), source


def main() -> None:
    log = start("detector")
    arch, weights_param, weights, train_cfg, source = read_params()
    released = find_files(source)[0]
    if not released and not weights and arch in PRESETS:  # would train: first check there is something to train on
        require_boxes(weights_param)
    METRICS.parent.mkdir(exist_ok=True)
    PLOT.parent.mkdir(exist_ok=True)
    if released:
        reason = f"features imported from {source} (features.source)"
        log.info("no detector: %s", reason)
        model, history, metrics = None, [], {"source": "none", "reason": reason}
        save_no_detector(OUT, reason)
    elif arch == GRID_ARCH:  # no-weights fallback: an ImageNet classifier on grid boxes (mmcn.vision.grid)
        if not weights:
            raise SettingsError(f"params.yaml: detector.arch {GRID_ARCH} needs detector.weights: a torchvision "
                                "ImageNet ResNet/ResNeXt checkpoint such as resnet101-63fe2227.pth (see README, "
                                "'No detector weights: grid features')")
        model = convert_grid(weights)  # CheckpointError (a ValueError) naming the file: exit 2
        history = []
        metrics = {"source": "grid", "arch": model.config.arch, "grids": list(model.config.grids),
                   "boxes_per_image": model.config.boxes_per_image}
        log.info("grid detector from %s: %s, %d boxes per image", weights, model.config.arch,
                 model.config.boxes_per_image)
    elif weights:
        # the inspection summary and what was assumed go to the log; CheckpointError (a ValueError): exit 2
        conversion = convert_detector(weights, arch, label_files(weights_param))
        model, history = conversion.model, []
        metrics = {"source": "converted", "arch": arch, "checkpoint": conversion.info.as_dict(),
                   "assumed": conversion.assumed}
    else:
        classes, attributes = vocab_from_manifest(TSV, "train")
        model = build_detector(detector_config(arch, classes=classes, attributes=attributes))
        train = load_samples(TSV, "train", classes, attributes, limit=train_cfg.max_images)
        history = train_detector(model, train, train_cfg)
        valid = load_samples(TSV, "valid", classes, attributes)
        result = evaluate_detector(model, valid)
        metrics = {"source": "trained", "arch": arch, "mAP50": round(result["mAP"], 4),
                   "AP50": {k: round(v, 4) for k, v in result["AP"].items()}, "valid_images": result["n_images"],
                   "train_images": len(train), "steps": len(history)}
        log.info("valid mAP@0.5 = %.3f (%d images)", result["mAP"], result["n_images"])
    if model is not None:
        save_detector(model, OUT)
    METRICS.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(PLOT, "w", newline="") as f:
        fields = ["step", "epoch", "lr", "loss"] + sorted(k for k in (history[0] if history else {}) if k.startswith("loss_"))
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


if __name__ == "__main__":
    run(main)
