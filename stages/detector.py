"""DVC stage `detector`: train the native detector on data/tsv's ground-truth boxes, or
convert given detectron2 / VinVL weights; writes models/detector/ and metrics/detector.json."""
import csv
import json
from pathlib import Path

from common import stage_params, start

from mmcn.eval.detection import evaluate_detector
from mmcn.vision.checkpoint import load_checkpoint
from mmcn.vision.config import detector_config
from mmcn.vision.detector import build_detector, save_detector
from mmcn.vision.train import DetectorTrainConfig, load_samples, train_detector, vocab_from_manifest

TSV = Path("data/tsv")
OUT = Path("models/detector")
METRICS = Path("metrics/detector.json")
PLOT = Path("plots/detector_loss.csv")
CHECKPOINT_SUFFIXES = (".pkl", ".pth")


def checkpoint_file(weights: Path) -> Path | None:
    """``detector.weights``: a checkpoint file, or a folder holding at most one (none: train).
    It is a dep of the stage in dvc.yaml (``${detector.weights}``), so new weights rerun it."""
    if weights.is_file():
        return weights
    if not weights.is_dir():
        raise SystemExit(f"detector.weights: {weights}: no such file or folder")
    found = sorted(p for p in weights.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SystemExit(f"detector.weights: {weights} holds {len(found)} checkpoints ({names}): keep one there "
                         f"or point detector.weights at the file")
    return found[0] if found else None


if __name__ == "__main__":
    log = start("detector")
    p = stage_params("detector")
    METRICS.parent.mkdir(exist_ok=True)
    PLOT.parent.mkdir(exist_ok=True)
    weights = checkpoint_file(Path(p["weights"]))
    if weights:
        model = load_checkpoint(weights, detector_config(p["arch"]))
        history = []
        metrics = {"source": "converted", "arch": p["arch"]}
    else:
        classes, attributes = vocab_from_manifest(TSV, "train")
        model = build_detector(detector_config(p["arch"], classes=classes, attributes=attributes))
        train_cfg = DetectorTrainConfig(epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"],
                                        warmup_steps=p["warmup_steps"], seed=p["seed"], max_images=p["max_images"])
        train = load_samples(TSV, "train", classes, attributes, limit=p["max_images"])
        history = train_detector(model, train, train_cfg)
        valid = load_samples(TSV, "valid", classes, attributes)
        result = evaluate_detector(model, valid)
        metrics = {"source": "trained", "arch": p["arch"], "mAP50": round(result["mAP"], 4),
                   "AP50": {k: round(v, 4) for k, v in result["AP"].items()}, "valid_images": result["n_images"],
                   "train_images": len(train), "steps": len(history)}
        log.info("valid mAP@0.5 = %.3f (%d images)", result["mAP"], result["n_images"])
    save_detector(model, OUT)
    METRICS.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(PLOT, "w", newline="") as f:
        fields = ["step", "epoch", "lr", "loss"] + sorted(k for k in (history[0] if history else {}) if k.startswith("loss_"))
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
