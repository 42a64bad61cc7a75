"""Vision: the native C4 Faster R-CNN detector with attribute head, its configs, vocabularies and checkpoint converters.

The names below load on first use, so that importing a light submodule (the extraction
settings, say) does not import torch."""
_LAZY = {
    "CheckpointError": "mmcn.vision.checkpoint", "convert_state_dict": "mmcn.vision.checkpoint",
    "load_checkpoint": "mmcn.vision.checkpoint",
    "DetectorConfig": "mmcn.vision.config", "detector_config": "mmcn.vision.config",
    "Detections": "mmcn.vision.detector", "Detector": "mmcn.vision.detector", "build_detector": "mmcn.vision.detector",
    "load_detector": "mmcn.vision.detector", "save_detector": "mmcn.vision.detector",
    "display_label": "mmcn.vision.vocab", "load_vocab": "mmcn.vision.vocab",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmcn.vision' has no attribute {name!r}")
