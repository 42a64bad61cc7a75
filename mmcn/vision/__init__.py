"""Vision: the native C4 Faster R-CNN detector with attribute head, its configs, vocabularies and checkpoint converters."""
from mmcn.vision.checkpoint import CheckpointError, convert_state_dict, load_checkpoint
from mmcn.vision.config import DetectorConfig, detector_config
from mmcn.vision.detector import Detections, Detector, build_detector, load_detector, save_detector
from mmcn.vision.vocab import display_label, load_vocab

__all__ = [
    "CheckpointError", "DetectorConfig", "Detections", "Detector", "build_detector", "convert_state_dict",
    "detector_config", "display_label", "load_checkpoint", "load_detector", "load_vocab", "save_detector",
]
